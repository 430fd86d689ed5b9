//! Outboard toolchains for nixspace: make the store paths a remote-execution input root
//! points into valid in a (possibly empty) Nix store, fetched through the dataspace from
//! whoever has them, so that an action can run on a worker that starts cold.
//!
//! It walks the input root for symlinks into the store, looks up or computes each target's
//! closure (shared in the dataspace as `<closure path paths>`), then makes every path of
//! those closures valid in its store through `nixspace-transfer`'s `StoreNode` (references
//! first, size and hash checked), and reports what it fetched. A separate program: it only
//! uses nixspace's libraries and a route file.

mod closures;
mod input_root;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use closures::Closures;
use nixspace_nix_tools::{DaemonPool, PoolConfig};
use nixspace_space::{Backoff, Route, SessionEvent};
use nixspace_transfer::StoreNode;
use syndicate::actor::Activation;
use syndicate::enclose;

/// Fill a Nix store with the closures an input root's symlinks point into.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The route file of the dataspace (the `worker.route` that `nixspace up` writes).
    #[arg(long, value_name = "FILE")]
    route: PathBuf,

    /// The directory tree to prepare for (e.g. a remote-execution input root): every
    /// symlink under it into the store names a path whose closure must be valid.
    #[arg(long, value_name = "DIR")]
    input_root: PathBuf,

    /// Fill the store kept in DIR (mounted on /nix in a private mount namespace, as
    /// `nixspace worker --own-store` does; root only) instead of the local store.
    #[arg(long, value_name = "DIR")]
    own_store: Option<PathBuf>,

    /// Name of this store in the dataspace.
    #[arg(long)]
    name: Option<String>,

    /// How long to wait for the dataspace, and for some store to have a path.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    patience: f64,

    /// Once the store is ready, stay joined until interrupted: serve the store's paths to
    /// others and keep the closures computed here asserted.
    #[arg(long)]
    keep_serving: bool,

    /// Log filter (error, warn, info, debug, trace); RUST_LOG when not given.
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match prepare_process(&args).and_then(|targets| {
        tokio::runtime::Runtime::new()
            .context("cannot start the async runtime")?
            .block_on(run(args, targets))
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outboard-toolchains: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What must happen while this is the only thread: logging, reading the input root, and
/// entering the store's mount namespace. Returns the store paths the input root points into.
fn prepare_process(args: &Args) -> anyhow::Result<BTreeSet<String>> {
    let filter = match &args.log_level {
        Some(level) => tracing_subscriber::EnvFilter::try_new(level)?,
        None => tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let store_dir = PoolConfig::new(1).store_dir;
    let targets = input_root::store_targets(&args.input_root, &store_dir)?;
    if targets.is_empty() {
        tracing::warn!(root = %args.input_root.display(), "no symlink into the store");
    }
    if let Some(dir) = &args.own_store {
        nixspace_nix_tools::own_store::enter(dir)?;
    }
    Ok(targets)
}

async fn run(args: Args, targets: BTreeSet<String>) -> anyhow::Result<()> {
    let patience = Duration::try_from_secs_f64(args.patience)
        .map_err(|e| anyhow::anyhow!("--patience {}: {e}", args.patience))?;
    let route = Route::read(&args.route).with_context(|| args.route.display().to_string())?;
    let name = args
        .name
        .unwrap_or_else(|| format!("outboard-toolchains-{}", std::process::id()));
    let store = StoreNode::new(name, DaemonPool::new(PoolConfig::new(2)));
    let closures = Closures::default();
    let body = enclose!((store, closures) move |t: &mut Activation, ds: Arc<syndicate::actor::Cap>| {
        store.attach(t, Arc::clone(&ds));
        closures.attach(t, ds);
        Ok(())
    });
    let backoff = Backoff {
        give_up_after: Some(patience),
        ..Backoff::default()
    };
    let session = nixspace_space::join::stay_joined(&route, backoff, body, |event| {
        if let SessionEvent::Joined { connection } = event {
            tracing::info!(connection, "joined the dataspace");
        }
    });
    tokio::pin!(session);
    tokio::select! {
        r = prepare(&store, &closures, &targets, patience) => r?,
        e = &mut session => anyhow::bail!("cannot join the dataspace: {e}"),
    }
    if !args.keep_serving {
        return Ok(());
    }
    println!(
        "serving {} and its closures until interrupted",
        store.name()
    );
    tokio::select! {
        e = &mut session => anyhow::bail!("cannot join the dataspace: {e}"),
        r = shutdown_signal() => r,
    }
}

/// Resolve the closures of `targets` and make them valid in `store`; print each closure,
/// each path fetched, and a summary line starting with `ready:`.
async fn prepare(
    store: &StoreNode,
    closures: &Closures,
    targets: &BTreeSet<String>,
    patience: Duration,
) -> anyhow::Result<()> {
    closures.synced(patience).await?;
    let mut all = BTreeSet::new();
    for target in targets {
        let (paths, origin) = closures
            .resolve(store, target, patience)
            .await
            .with_context(|| format!("cannot find the closure of {target}"))?;
        say(format_args!(
            "closure {target}: {} paths ({origin})",
            paths.len()
        ))?;
        all.extend(paths);
        all.insert(target.clone());
    }
    let all: Vec<String> = all.into_iter().collect();
    let missing = store.missing(&all).await?;
    store
        .ensure(&all)
        .await
        .context("cannot make the closures valid in this store")?;
    for path in &missing {
        say(format_args!("fetched {path}"))?;
    }
    let (_, bytes) = store.fetched();
    say(format_args!(
        "ready: {} paths valid, {} fetched ({bytes} NAR bytes)",
        all.len(),
        missing.len()
    ))
}

/// Print one line of the report on stdout (an error, not a panic, if nobody reads it).
fn say(line: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .context("cannot write the report to stdout")
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}
