//! `nixspace build`: `nix-build` on a dataspace. It takes the arguments `nix-build` takes
//! (`-A`, `--arg`, `--argstr`, `-I`, `--keep-going`, `-o`/`--no-out-link`, `--check`,
//! `--repair`, `--keep-failed`, `--max-silent-time`, `--timeout`), demands what
//! the roots' outputs need and follows it to the end. The build itself is a frontend
//! [`BuildSession`]; this command parses arguments, renders its progress and report, and
//! makes the out-links ([`out_links`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use nixspace_frontend::phase::PhaseClock;
use nixspace_frontend::{BuildSession, PostBuild, Report, SessionConfig, StoreDb};
use nixspace_nix_tools::nix_conf::NixConf;
use nixspace_nix_tools::{DaemonPool, PoolConfig};
use nixspace_protocol::{BuildMode, BuildSettings, DrvPath};
use nixspace_space::Role;

use super::out_links::{self, OutLink};
use super::{EvalArgs, JoinArgs};
use crate::progress::{print_line, Terminal};

/// Build a Nix file or a derivation on the dataspace's workers.
///
/// Like nix-build: instantiates FILE.nix with the local `nix-instantiate` (or
/// takes a /nix/store/…drv path as is), finds top-down what the roots' outputs
/// still need (substituting what the store's substituters have), demands the
/// derivations that must be built, shows progress, prints the output paths and
/// links them as `./result` (a garbage collector root). Exits 0 when everything
/// was built, 1 with the failing steps' log tails otherwise. Ctrl-C withdraws
/// the demands (steps nobody else wants stop).
#[derive(Args, Debug)]
pub struct BuildArgs {
    #[command(flatten)]
    join: JoinArgs,

    /// A Nix file to instantiate, or a store path ending in `.drv`.
    #[arg(value_name = "FILE.nix|DRV")]
    target: PathBuf,

    #[command(flatten)]
    eval: EvalArgs,

    /// Keep building everything that can be built after a step failed, and
    /// report every failure (like nix-build --keep-going). Without it the build
    /// stops at the first failure.
    #[arg(short = 'k', long)]
    keep_going: bool,

    /// Where to link the result (like nix-build -o): PATH for the first root,
    /// PATH-2, PATH-3… for the next ones, with -OUTPUT appended for an output
    /// other than `out`. Each link is a garbage collector root.
    #[arg(
        short = 'o',
        long = "out-link",
        value_name = "PATH",
        default_value = "result"
    )]
    out_link: PathBuf,

    /// Make no result link (like nix-build --no-out-link): the outputs are not
    /// protected from garbage collection.
    #[arg(long, conflicts_with = "out_link")]
    no_out_link: bool,

    /// Rebuild the roots, whose outputs are valid, and fail if the result
    /// differs (like nix-build --check).
    #[arg(long, conflicts_with = "repair")]
    check: bool,

    /// Rebuild the roots and replace their outputs (like nix-build --repair;
    /// the workers' Nix must trust them).
    #[arg(long)]
    repair: bool,

    /// Keep the build directory of a failed build on its worker (like
    /// nix-build --keep-failed).
    #[arg(short = 'K', long)]
    keep_failed: bool,

    /// Fail a build whose builder prints nothing for this many seconds (like
    /// nix-build --max-silent-time); 0 for the workers' own setting.
    #[arg(long, default_value_t = 0, value_name = "SECONDS")]
    max_silent_time: u64,

    /// Fail a build that runs longer than this many seconds (like nix-build
    /// --timeout); 0 for the workers' own setting.
    #[arg(long, default_value_t = 0, value_name = "SECONDS")]
    timeout: u64,

    /// Priority of this build's demands (higher first).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i64,

    /// Show build logs as they arrive.
    #[arg(short = 'L', long)]
    print_build_logs: bool,

    /// How long a step may wait for a worker able to build it (right system
    /// and features) before the build fails as unschedulable, in seconds.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    wait_for_workers: f64,

    /// How long to keep trying to rejoin the dataspace after losing it (for
    /// example while `nixspace up` restarts), in seconds; the build's pending
    /// demands are asserted again on rejoining.
    #[arg(long, default_value_t = 60.0, value_name = "SECONDS")]
    reconnect_for: f64,
}

/// How the steps build, from the flags.
fn build_settings(args: &BuildArgs) -> BuildSettings {
    let mode = match (args.check, args.repair) {
        (true, _) => BuildMode::Check,
        (_, true) => BuildMode::Repair,
        _ => BuildMode::Normal,
    };
    BuildSettings {
        mode,
        max_silent_time: args.max_silent_time,
        timeout: args.timeout,
        keep_failed: args.keep_failed,
        optimise: false,
    }
}

/// Run `nixspace build`.
pub async fn run(args: BuildArgs) -> anyhow::Result<ExitCode> {
    let mut clock = PhaseClock::start("build");
    let route = args.join.route(Role::Submit)?;
    clock.end("read the route");
    let selected = resolve_target(&args).await?;
    clock.end("instantiate");
    let mut roots: Vec<DrvPath> = Vec::new();
    for (drv, _) in &selected {
        if !roots.iter().any(|r| r.as_str() == drv) {
            roots.push(DrvPath::from(drv.as_str()));
        }
    }
    let links = match args.no_out_link {
        true => Vec::new(),
        false => out_links::out_links(&args.out_link, &selected),
    };
    let seconds = |flag: &str, value: f64| {
        Duration::try_from_secs_f64(value).map_err(|e| anyhow::anyhow!("{flag} {value}: {e}"))
    };
    let pool = DaemonPool::new(PoolConfig::new(2));
    let config = SessionConfig {
        route,
        requester: format!("nixspace-build-{}", std::process::id()),
        priority: args.priority,
        patience: seconds("--wait-for-workers", args.wait_for_workers)?,
        reconnect_for: seconds("--reconnect-for", args.reconnect_for)?,
        keep_going: args.keep_going,
        settings: build_settings(&args),
        // Validity is read from the local store's database when it can be (no process).
        db: StoreDb::open_local(pool.store_dir().clone()).map(Into::into),
        pool: pool.clone(),
        // Signing and the post-build hook, as this machine's Nix configuration sets them.
        post_build: PostBuild::from_settings(&NixConf::load()?, &BTreeMap::new())?.into(),
        // Substituters as this machine's Nix configuration names them.
        substitution: None,
    };
    let mut session = BuildSession::start(config, roots).await?;
    let substituted = &session.plan().substituted;
    if !substituted.is_empty() {
        eprintln!(
            "nixspace: substituted {} path(s) from the substituters",
            substituted.len()
        );
    }
    let known = root_outputs(&session, &links);
    if session.is_empty() {
        eprintln!("nixspace: nothing to build; all outputs are valid");
        let report = session.finish().await?;
        link_outputs(&pool, &links, &known, &report).await?;
        print_outputs(&report);
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "nixspace: {} of {} derivations to build",
        session.len(),
        session.plan().infos.len()
    );
    let mut terminal = Terminal::new(session.len(), args.print_build_logs);
    loop {
        let progress = tokio::select! {
            progress = session.next() => progress,
            r = super::shutdown_signal() => {
                r?;
                terminal.finish();
                drop(session);
                eprintln!("nixspace: interrupted; demands withdrawn");
                return Ok(ExitCode::from(130));
            }
        };
        match progress {
            Ok(Some(progress)) => terminal.show(&progress, session.done(), session.running()),
            Ok(None) => break,
            Err(e) => {
                terminal.finish();
                return Err(e.into());
            }
        }
    }
    terminal.finish();
    let report = session.finish().await?;
    let code = show_report(&report);
    if code == ExitCode::SUCCESS {
        link_outputs(&pool, &links, &known, &report).await?;
    }
    Ok(code)
}

/// Turn the command-line target into the selected (derivation, output) pairs, in the order
/// evaluated.
async fn resolve_target(args: &BuildArgs) -> anyhow::Result<Vec<(String, String)>> {
    let target = &args.target;
    let text = target.to_string_lossy();
    if text.ends_with(".drv") {
        if !args.eval.attrs.is_empty() {
            anyhow::bail!("-A/--attr applies to Nix files, not to a .drv path");
        }
        if !target.is_file() {
            anyhow::bail!("derivation {text} does not exist");
        }
        return Ok(vec![(text.into_owned(), "out".to_owned())]);
    }
    if !target.exists() {
        anyhow::bail!("{text}: no such file");
    }
    let evaluation = args.eval.evaluation(target);
    let drvs = nixspace_nix_tools::instantiate(&evaluation).await?;
    if drvs.is_empty() {
        anyhow::bail!("{text} evaluates to no derivation");
    }
    Ok(drvs.into_iter().map(|i| (i.drv, i.output)).collect())
}

/// The output paths of the linked roots known before building: fixed in the derivation, or
/// realised already (derivation → output → path).
fn root_outputs(
    session: &BuildSession,
    links: &[OutLink],
) -> BTreeMap<String, BTreeMap<String, String>> {
    let plan = session.plan();
    links
        .iter()
        .map(|l| {
            let mut outputs: BTreeMap<String, String> = plan
                .infos
                .get(&l.drv)
                .into_iter()
                .flat_map(|i| &i.outputs)
                .filter_map(|(name, path)| Some((name.clone(), path.clone()?)))
                .collect();
            outputs.extend(plan.realised.get(&l.drv).cloned().unwrap_or_default());
            (l.drv.clone(), outputs)
        })
        .collect()
}

/// Make the out-links of a successful build; `known` holds the outputs known before it, the
/// report those realised by it.
async fn link_outputs(
    pool: &DaemonPool,
    links: &[OutLink],
    known: &BTreeMap<String, BTreeMap<String, String>>,
    report: &Report,
) -> anyhow::Result<()> {
    let mut targets = Vec::with_capacity(links.len());
    for link in links {
        let realised = report
            .realised
            .get(&DrvPath::from(link.drv.as_str()))
            .and_then(|o| o.get(&link.output));
        let path = realised
            .or_else(|| known.get(&link.drv).and_then(|o| o.get(&link.output)))
            .ok_or_else(|| {
                anyhow::anyhow!("{} has no output {:?} to link", link.drv, link.output)
            })?;
        targets.push((link.clone(), path.clone()));
    }
    out_links::make(pool, &targets).await?;
    Ok(())
}

/// Print the roots' outputs on stdout, one per line.
fn print_outputs(report: &Report) {
    for path in report.outputs.values().flatten() {
        println!("{path}");
    }
}

/// Print the outcome: the outputs, or why the build did not succeed (root causes first, with
/// their log tails).
fn show_report(report: &Report) -> ExitCode {
    if !report.unschedulable.is_empty() {
        for (drv, reason) in &report.unschedulable {
            print_line(&format!(
                "error: {} is unschedulable: {reason}",
                drv.short_name()
            ));
        }
        eprintln!(
            "nixspace: the build cannot finish: no connected worker can take {} step(s); start a worker that can, or raise --wait-for-workers",
            report.unschedulable.len()
        );
        return ExitCode::FAILURE;
    }
    let failures = report.failures();
    if failures.is_empty() {
        print_outputs(report);
        return ExitCode::SUCCESS;
    }
    for (drv, failure) in &failures {
        let at = match &failure.worker {
            Some(worker) => format!(" on {worker}"),
            None => String::new(),
        };
        print_line(&format!(
            "error: {}{at}: {}",
            drv.short_name(),
            failure.reason
        ));
        if let Some(tail) = report.tail(drv) {
            eprintln!("  last {} log lines of {drv}:", tail.len());
            for line in tail {
                print_line(&format!("  > {line}"));
            }
        }
    }
    eprintln!(
        "nixspace: {} of {} steps failed",
        failures.len(),
        report.outcomes.len()
    );
    ExitCode::FAILURE
}
