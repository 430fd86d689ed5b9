//! `nixspace build`: demand a derivation's closure and follow it to the end. The build itself
//! is a frontend [`BuildSession`]; this command parses arguments and renders its progress
//! and report.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use nixspace_frontend::phase::PhaseClock;
use nixspace_frontend::{BuildSession, PostBuild, Report, SessionConfig, StoreDb};
use nixspace_nix_tools::nix_conf::NixConf;
use nixspace_nix_tools::{DaemonPool, PoolConfig};
use nixspace_protocol::DrvPath;
use nixspace_space::Role;

use super::JoinArgs;
use crate::progress::{print_line, Terminal};

/// Build a Nix file or a derivation on the dataspace's workers.
///
/// Instantiates FILE.nix with the local `nix-instantiate` (or takes a
/// /nix/store/…drv path as is), demands every derivation in its closure whose
/// outputs are not valid yet, shows progress, and prints the output paths.
/// Exits 0 when everything was built, 1 with the failing steps' log tails
/// otherwise. Ctrl-C withdraws the demands (steps nobody else wants stop).
#[derive(Args, Debug)]
pub struct BuildArgs {
    #[command(flatten)]
    join: JoinArgs,

    /// A Nix file to instantiate, or a store path ending in `.drv`.
    #[arg(value_name = "FILE.nix|DRV")]
    target: PathBuf,

    /// Attribute(s) of the file to build (like nix-build -A).
    #[arg(short = 'A', long = "attr", value_name = "ATTR")]
    attrs: Vec<String>,

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

/// Run `nixspace build`.
pub async fn run(args: BuildArgs) -> anyhow::Result<ExitCode> {
    let mut clock = PhaseClock::start("build");
    let route = args.join.route(Role::Submit)?;
    clock.end("read the route");
    let roots = resolve_target(&args.target, &args.attrs).await?;
    clock.end("instantiate");
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
        keep_going: true,
        // Validity is read from the local store's database when it can be (no process).
        db: StoreDb::open_local(pool.store_dir().clone()).map(Into::into),
        pool,
        // Signing and the post-build hook, as this machine's Nix configuration sets them.
        post_build: PostBuild::from_settings(&NixConf::load()?, &BTreeMap::new())?.into(),
    };
    let mut session = BuildSession::start(config, roots).await?;
    if session.is_empty() {
        eprintln!("nixspace: nothing to build; all outputs are valid");
        print_outputs(&session.finish().await?);
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "nixspace: {} of {} derivations to build",
        session.len(),
        session.plan().infos.len()
    );
    let terminal = Terminal::new(session.len(), args.print_build_logs);
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
    Ok(show_report(&report))
}

/// Turn the command-line target into root derivations.
async fn resolve_target(
    target: &std::path::Path,
    attrs: &[String],
) -> anyhow::Result<Vec<DrvPath>> {
    let text = target.to_string_lossy();
    if text.ends_with(".drv") {
        if !attrs.is_empty() {
            anyhow::bail!("-A/--attr applies to Nix files, not to a .drv path");
        }
        if !target.is_file() {
            anyhow::bail!("derivation {text} does not exist");
        }
        return Ok(vec![DrvPath::from(text.into_owned())]);
    }
    if !target.exists() {
        anyhow::bail!("{text}: no such file");
    }
    let drvs = nixspace_nix_tools::instantiate(target, attrs).await?;
    if drvs.is_empty() {
        anyhow::bail!("{text} evaluates to no derivation");
    }
    Ok(drvs.into_iter().map(DrvPath::from).collect())
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
