//! An external substituter for nixspace: serves the paths of another Nix store (reached
//! through its daemon socket) to a dataspace. It is a separate program that only uses
//! nixspace's libraries and a route file; nixspace itself needs no change to use it.
//!
//! Workers ask substituters for a step's outputs before building it: this program answers
//! `<want …>` for paths its store has with `<available …>` (and `<missing …>` otherwise) and
//! streams their NARs; the worker checks size and hash before registering them.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use nixspace_nix_tools::{DaemonPool, DaemonTarget, PoolConfig};
use nixspace_space::{Backoff, Route, SessionEvent};
use nixspace_transfer::nar_stream::STREAM_IDLE;
use nixspace_transfer::source::{serve, DaemonSource, PathSource, Role};
use syndicate::actor::Activation;

/// Serve another Nix store's paths to a nixspace dataspace as a substituter.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The route file of the dataspace (the `worker.route` that `nixspace up` writes).
    #[arg(long, value_name = "FILE")]
    route: PathBuf,

    /// The daemon socket of the store to serve (e.g. another machine's store mounted or
    /// forwarded here).
    #[arg(long, value_name = "PATH")]
    store_socket: PathBuf,

    /// Name of this substituter in the dataspace.
    #[arg(long, default_value = "store-substituter")]
    name: String,

    /// Log filter (error, warn, info, debug, trace); RUST_LOG when not given.
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = match &args.log_level {
        Some(level) => tracing_subscriber::EnvFilter::try_new(level)?,
        None => tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let route = Route::read(&args.route).with_context(|| args.route.display().to_string())?;
    let mut pool = PoolConfig::new(2);
    pool.target = DaemonTarget::Socket(args.store_socket.clone());
    let source: Arc<dyn PathSource> = Arc::new(DaemonSource(DaemonPool::new(pool)));
    let name = args.name.clone();
    let body = move |t: &mut Activation, ds| {
        serve(
            t,
            &ds,
            &name,
            Arc::clone(&source),
            Role::Substituter,
            STREAM_IDLE,
        );
        Ok(())
    };
    let (name, socket) = (args.name, args.store_socket.display().to_string());
    let end = nixspace_space::join::stay_joined(&route, Backoff::default(), body, |event| {
        if let SessionEvent::Joined { .. } = event {
            eprintln!("store-substituter {name}: serving the store at {socket}");
        }
    })
    .await;
    anyhow::bail!("cannot join the dataspace: {end}")
}
