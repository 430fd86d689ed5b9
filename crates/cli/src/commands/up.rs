//! `nixspace up`: host a dataspace with its planner.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use std::sync::Arc;

use clap::Args;
use nixspace_planner::metrics::Metrics;
use nixspace_planner::{PlannerConfig, StealPolicy};
use nixspace_space::host::Listeners;
use nixspace_space::{HostConfig, HostedSpace};
use syndicate::actor::Actor;

/// Host a dataspace (embedded; nothing else to install) with its planner.
///
/// Listens on a unix socket (and optionally TCP), guarded by a gatekeeper.
/// Writes `worker.route` and `submit.route` (mode 0600) into the runtime
/// directory: they carry the capabilities workers and frontends need.
/// Runs until Ctrl-C or SIGTERM.
#[derive(Args, Debug)]
pub struct UpArgs {
    /// Runtime directory for the socket, keys and route files.
    /// Default: $XDG_RUNTIME_DIR/nixspace or /tmp/nixspace-<uid>.
    #[arg(long, env = "NIXSPACE_DIR", value_name = "DIR")]
    dir: Option<PathBuf>,

    /// Unix socket path. Default: <dir>/nixspace.sock.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,

    /// Also listen on TCP, e.g. 127.0.0.1:7420 (port 0 picks a free port).
    /// Route files then list it too, for workers on other machines.
    #[arg(long, value_name = "ADDR")]
    tcp: Option<SocketAddr>,

    /// Directory for state kept across restarts (the build history,
    /// `history.sqlite`). Default: $XDG_STATE_HOME/nixspace or
    /// ~/.local/state/nixspace.
    #[arg(long, env = "NIXSPACE_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// Serve Prometheus metrics on this address (GET /metrics), e.g.
    /// 127.0.0.1:9420: queue sizes, running steps, builds done/failed,
    /// dispatch latency, retries, steals, workers.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,

    /// How many times a step is tried when its worker goes away.
    #[arg(long, default_value_t = nixspace_planner::DEFAULT_MAX_ATTEMPTS, value_name = "N")]
    max_attempts: u32,

    /// Delay before retrying a step whose worker went away, in seconds;
    /// doubles with every attempt.
    #[arg(long, default_value_t = nixspace_planner::DEFAULT_RETRY_BACKOFF.as_secs_f64(), value_name = "SECONDS")]
    retry_backoff: f64,

    /// Work stealing: an idle worker at least this many times faster (by
    /// `worker --speed`) than the one building a step may duplicate it; the
    /// first to finish wins and the other build is stopped.
    #[arg(long, default_value_t = StealPolicy::default().ratio, value_name = "RATIO")]
    steal_ratio: f64,

    /// Work stealing: how long a step must have been running, in seconds,
    /// before a faster worker may duplicate it.
    #[arg(long, default_value_t = StealPolicy::default().after.as_secs_f64(), value_name = "SECONDS")]
    steal_after: f64,
}

/// Run `nixspace up`.
pub async fn run(args: UpArgs) -> anyhow::Result<ExitCode> {
    let dir = args
        .dir
        .unwrap_or_else(nixspace_space::runtime_dir::default_runtime_dir);
    let socket = args.socket.unwrap_or_else(|| dir.join("nixspace.sock"));
    let config = HostConfig {
        dir,
        socket: socket.clone(),
        tcp: args.tcp,
    };
    let state_dir = args
        .state_dir
        .unwrap_or_else(nixspace_space::runtime_dir::default_state_dir);
    let history = super::open_history(&state_dir, true)?;
    let listeners = Listeners::bind(&config).await?;
    let metrics = Arc::new(Metrics::default());
    let metrics_listener = match args.metrics {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?,
        ),
        None => None,
    };
    let transports = listeners.transports();
    let (tx, rx) = tokio::sync::oneshot::channel();
    if !(args.steal_ratio.is_finite() && args.steal_ratio >= 1.0) {
        anyhow::bail!("--steal-ratio must be at least 1, got {}", args.steal_ratio);
    }
    let seconds = |flag: &str, value: f64| {
        std::time::Duration::try_from_secs_f64(value)
            .map_err(|e| anyhow::anyhow!("--{flag} {value}: {e}"))
    };
    let planner_config = PlannerConfig {
        max_attempts: args.max_attempts,
        retry_backoff: seconds("retry-backoff", args.retry_backoff)?,
        steal: StealPolicy {
            ratio: args.steal_ratio,
            after: seconds("steal-after", args.steal_after)?,
        },
    };
    let planner_metrics = Arc::clone(&metrics);
    let _actor = Actor::top(None, move |t| {
        let hosted = HostedSpace::start(t, &config, listeners);
        let ok = hosted.as_ref().ok().map(|h| {
            nixspace_planner::service::start(
                t,
                h.dataspace.clone(),
                planner_config,
                planner_metrics,
                Some(history),
            );
            h.routes
                .values()
                .map(|(_, p)| p.clone())
                .collect::<Vec<_>>()
        });
        let _ = tx.send(hosted.map(|_| ok.unwrap_or_default()));
        Ok(())
    });
    let route_files = rx
        .await
        .map_err(|_| anyhow::anyhow!("the dataspace stopped while starting"))??;
    for t in &transports {
        eprintln!("nixspace: listening on {t}");
    }
    for f in &route_files {
        eprintln!("nixspace: wrote {}", f.display());
    }
    if let Some(listener) = metrics_listener {
        if let Ok(addr) = listener.local_addr() {
            eprintln!("nixspace: metrics on http://{addr}/metrics");
        }
        tokio::spawn(crate::metrics_http::serve(listener, metrics));
    }
    eprintln!("nixspace: dataspace up; start workers with `nixspace worker`, build with `nixspace build FILE.nix`; Ctrl-C stops");
    super::shutdown_signal().await?;
    eprintln!("nixspace: shutting down");
    let _ = std::fs::remove_file(&socket);
    Ok(ExitCode::SUCCESS)
}
