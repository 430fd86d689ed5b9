//! `nixspace jobs`: submitted jobs, their progress and results, from the coordinator's
//! history.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use nixspace_planner::job_history::JobRecord;

/// Show submitted jobs with their progress, or one job with its results.
///
/// Reads the build history that `nixspace up` keeps in its state directory (also while it is
/// down). Without ID: the most recent jobs, each with its status (pending, built, failed,
/// cancelled) and its steps built, failed and queued. With ID: that job's attributes, each
/// with its outputs, or its error and the last log lines of the step that failed.
#[derive(Args, Debug)]
pub struct JobsArgs {
    /// State directory of the dataspace (as given to `nixspace up`).
    #[arg(long, env = "NIXSPACE_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// The job to show with its results.
    #[arg(value_name = "ID")]
    id: Option<i64>,

    /// How many jobs to list, newest first.
    #[arg(long, default_value_t = 20)]
    limit: usize,

    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Run `nixspace jobs`.
pub async fn run(args: JobsArgs) -> anyhow::Result<ExitCode> {
    let state_dir = args
        .state_dir
        .unwrap_or_else(nixspace_space::runtime_dir::default_state_dir);
    let history = super::open_history(&state_dir, false)?;
    let Some(id) = args.id else {
        let jobs = history.jobs(args.limit)?;
        if args.json {
            println!("{}", serde_json::to_string(&jobs)?);
        } else if jobs.is_empty() {
            println!("no jobs submitted yet");
        }
        for job in jobs.iter().filter(|_| !args.json) {
            println!("{}", summary(job));
        }
        return Ok(ExitCode::SUCCESS);
    };
    let Some(job) = history.job(id)? else {
        anyhow::bail!("there is no job {id}");
    };
    if args.json {
        println!("{}", serde_json::to_string(&job)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{}", summary(&job));
    if let Some(error) = &job.error {
        println!("  error: {error}");
    }
    for a in &job.attributes {
        match (a.status.as_str(), &a.error) {
            ("built", _) => println!("  {}: built → {}", a.name, a.outputs.join(" ")),
            (status, Some(error)) => println!("  {}: {status}: {error}", a.name),
            (status, None) => println!("  {}: {status}", a.name),
        }
        for line in &a.log_tail {
            println!("    > {line}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One line about `job`.
fn summary(job: &JobRecord) -> String {
    format!(
        "job {} {} [{}]: {} built, {} failed, {} queued of {} steps",
        job.id,
        job.name,
        job.status,
        job.steps_built,
        job.steps_failed,
        job.steps_queued,
        job.steps_total
    )
}
