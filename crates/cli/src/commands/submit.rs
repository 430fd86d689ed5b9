//! `nixspace submit`: hand a release expression's jobs to the coordinator, which builds them
//! whether or not this process stays (see `nixspace jobs` and `nixspace cancel`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use nixspace_coordinator::jobs::MAX_JOB_ATTRIBUTES;
use nixspace_nix_tools::{DaemonPool, PoolConfig};
use nixspace_protocol::build;
use nixspace_space::Role;
use syndicate::actor::Activation;
use syndicate::enclose;
use syndicate_macros::during;

use super::{EvalArgs, JoinArgs};
use crate::ask::{ask, wait_for, Reply};

/// Submit a release expression's jobs to the coordinator and return.
///
/// Evaluates FILE.nix as Hydra evaluates a release expression: every derivation in the
/// (auto-called) value is a job, named by its attribute path, recursing into every nested
/// attribute set that is not a derivation (not only those marked `recurseForDerivations`),
/// skipping names with a dot or a space; `null` is no job. The derivations are instantiated
/// here; the coordinator keeps the job in its history, keeps its derivations from the garbage
/// collector, and builds it until every job is built or failed, across its own restarts.
/// Prints the job's number: `nixspace jobs NUMBER` shows its progress and results,
/// `nixspace cancel NUMBER` withdraws it.
#[derive(Args, Debug)]
pub struct SubmitArgs {
    #[command(flatten)]
    join: JoinArgs,

    /// The release expression: a Nix file (or a function taking `--arg`s) whose value is an
    /// attribute set of derivations.
    #[arg(value_name = "FILE.nix")]
    file: PathBuf,

    #[command(flatten)]
    eval: EvalArgs,

    /// The job's name. Default: the file's name without `.nix`.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,

    /// Stay until the job ends, showing its progress; exit 0 when every job was built, 1
    /// otherwise (leaving does not cancel it).
    #[arg(long)]
    wait: bool,
}

/// What the coordinator answered.
enum Answer {
    Accepted(i64),
    Refused(String),
}

/// Run `nixspace submit`.
pub async fn run(args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let route = args.join.route(Role::Submit)?;
    if !args.file.exists() {
        anyhow::bail!("{}: no such file", args.file.display());
    }
    let evaluated = nixspace_nix_tools::evaluate_jobs(&args.eval.evaluation(&args.file)).await?;
    let mut attributes = Vec::with_capacity(evaluated.len());
    for job in evaluated {
        match job.drv {
            Some(drv) => attributes.push(build::JobAttribute {
                name: job.name,
                drv,
            }),
            None => eprintln!(
                "nixspace: job {} does not evaluate to a derivation; left out",
                job.name
            ),
        }
    }
    if attributes.is_empty() {
        anyhow::bail!("{} has no job to submit", args.file.display());
    }
    if attributes.len() > MAX_JOB_ATTRIBUTES {
        anyhow::bail!(
            "{} has {} jobs, more than the {MAX_JOB_ATTRIBUTES} one submission takes",
            args.file.display(),
            attributes.len()
        );
    }
    // Until the coordinator roots them, the derivations are kept by this connection's
    // temporary roots.
    let pool = DaemonPool::new(PoolConfig::new(1));
    let mut lease = pool.lease_for_roots().await?;
    for a in &attributes {
        let path = pool.store_dir().parse(&a.drv)?;
        lease.client().add_temp_root(&path).await?;
    }
    let name = args.name.unwrap_or_else(|| {
        args.file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "job".to_owned())
    });
    let submission = format!(
        "{}-{}-{}",
        rustix::system::uname().nodename().to_string_lossy(),
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let count = attributes.len();
    let request = build::SubmitJob {
        submission: submission.clone(),
        name: name.clone(),
        attributes,
    };
    let answer = ask(&route, request, move |t: &mut Activation, ds, reply| {
        enclose!((submission, reply) during!(t, ds, <job-accepted $s: String $job: i64>, |_t: &mut Activation| {
            if s == submission {
                reply.give(Answer::Accepted(job));
            }
            Ok(())
        }));
        during!(t, ds, <job-refused $s: String $reason: String>, |_t: &mut Activation| {
            if s == submission {
                reply.give(Answer::Refused(reason.clone()));
            }
            Ok(())
        });
        Ok(())
    })
    .await?;
    drop(lease);
    match answer {
        Answer::Accepted(job) => {
            eprintln!("nixspace: submitted job {job} ({name}, {count} attributes); `nixspace jobs {job}` shows it");
            println!("{job}");
            match args.wait {
                true => wait(&route, job).await,
                false => Ok(ExitCode::SUCCESS),
            }
        }
        Answer::Refused(reason) => {
            eprintln!("nixspace: the coordinator refused the job: {reason}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Follow job `job` until it ends: its progress on stderr, exit 0 when it was built.
async fn wait(route: &nixspace_space::Route, id: i64) -> anyhow::Result<ExitCode> {
    let body = move |t: &mut Activation,
                     ds: &std::sync::Arc<syndicate::actor::Cap>,
                     reply: Reply<String>| {
        during!(t, ds, <job $job: i64 _ $status: String $built: i64 $failed: i64 $total: i64>, |_t: &mut Activation| {
            if job == id {
                eprintln!("nixspace: job {id} {status}: {built} built, {failed} failed of {total} steps");
                if status != "pending" {
                    reply.give(status.clone());
                }
            }
            Ok(())
        });
        Ok(())
    };
    let status = wait_for(route, body, None)
        .await
        .map_err(|e| anyhow::anyhow!("{e}; the job goes on (`nixspace jobs {id}` shows it)"))?;
    eprintln!("nixspace: job {id} ended {status}; `nixspace jobs {id}` shows its results");
    Ok(match status.as_str() {
        "built" => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    })
}
