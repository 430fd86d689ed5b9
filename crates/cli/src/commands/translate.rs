//! `nixspace translate`: serve the Nix daemon protocol so unmodified Nix clients build on
//! the dataspace.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use nixspace_space::Role;
use nixspace_translator::service::{DEFAULT_PATIENCE, DEFAULT_RECONNECT_FOR};
use nixspace_translator::{TranslatorOptions, UpstreamSpec};

use super::JoinArgs;

/// Serve the Nix daemon protocol on a unix socket; builds run on the dataspace.
///
/// Point unmodified Nix tools at the socket:
///
///   NIX_REMOTE=unix://PATH nix-build default.nix
///
///   nix-store --store unix://PATH --realise /nix/store/…drv
///
/// Store operations (queries, adding .drv files, NARs, GC roots) are passed
/// to an upstream nix-daemon: the socket given with --upstream-socket, or by
/// default a private `nix-daemon` (NIX_REMOTE=local) of the translator's
/// own, a connection per client. Build operations (BuildPaths, BuildPathsWithResults,
/// BuildDerivation) become demands on the dataspace joined with the trusted
/// route when this user can read it (then a trusted client's derivation sent
/// inline, as a remote builder's client sends it, is built too), else the
/// submit route; build logs are relayed to the client, and a client that goes away
/// withdraws its demands; a client's build rejoins a dataspace that restarts
/// (--reconnect-for). Runs until Ctrl-C or SIGTERM.
///
/// The socket is created mode 0600 (only you may connect), or 0666 when run
/// as root, like nix-daemon's; --socket-mode chooses another. Who may connect,
/// and who is trusted, is further decided from each client's peer credentials by
/// `allowed-users` and `trusted-users` in $NIX_CONF_DIR/nix.conf (default
/// /etc/nix). Untrusted clients get what nix-daemon grants them: signature
/// checks are enforced and restricted settings are ignored.
#[derive(Args, Debug)]
pub struct TranslateArgs {
    #[command(flatten)]
    join: JoinArgs,

    /// The socket to serve (created; an existing socket file is replaced).
    #[arg(long, value_name = "PATH", required_unless_present = "stdio")]
    socket: Option<PathBuf>,

    /// Serve one client on stdin and stdout instead, trusted, as `nix-daemon --stdio` does:
    /// what an ssh-ng store runs on the remote side, so a Nix client can use the dataspace
    /// as a remote builder (`ssh-ng://host?remote-program=nixspace%20translate`).
    #[arg(long, conflicts_with_all = ["socket", "socket_mode"])]
    stdio: bool,

    /// The socket's mode, in octal (e.g. 660). Default: 600, or 666 when run as root.
    #[arg(long, value_name = "MODE", value_parser = super::parse_mode)]
    socket_mode: Option<u32>,

    /// Send store operations to the nix-daemon at this socket instead of a
    /// private `nix-daemon` of the translator's own.
    #[arg(long, value_name = "PATH")]
    upstream_socket: Option<PathBuf>,

    /// Priority of the demands made for clients.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i64,

    /// How long a step may wait for a worker able to build it before the
    /// client's build fails, in seconds.
    #[arg(long, default_value_t = DEFAULT_PATIENCE.as_secs_f64(), value_name = "SECONDS")]
    wait_for_workers: f64,

    /// How long a client's build keeps trying to rejoin the dataspace after
    /// losing it (for example while `nixspace up` restarts), in seconds; its
    /// pending demands are asserted again on rejoining.
    #[arg(long, default_value_t = DEFAULT_RECONNECT_FOR.as_secs_f64(), value_name = "SECONDS")]
    reconnect_for: f64,
}

/// Run `nixspace translate`.
pub async fn run(args: TranslateArgs) -> anyhow::Result<ExitCode> {
    // The trusted route, when this user may read it, vouches for trusted clients' inline
    // derivations (a remote builder's client sends its derivations inline).
    // (`--route` names one route, taken as a submit route.)
    let trusted = match &args.join.route {
        Some(_) => None,
        None => nixspace_space::Route::read(&args.join.route_file(Role::Trusted)).ok(),
    };
    let vouches = trusted.is_some();
    let vouching_key = match vouches {
        true => crate::signing_keys::vouching_key(&args.join.route_file(Role::Trusted)),
        false => None,
    };
    let route = match trusted {
        Some(route) => route,
        None => args.join.route(Role::Submit)?,
    };
    let patience = Duration::try_from_secs_f64(args.wait_for_workers)
        .map_err(|e| anyhow::anyhow!("--wait-for-workers {}: {e}", args.wait_for_workers))?;
    let reconnect_for = Duration::try_from_secs_f64(args.reconnect_for)
        .map_err(|e| anyhow::anyhow!("--reconnect-for {}: {e}", args.reconnect_for))?;
    let upstream = match args.upstream_socket {
        Some(p) => UpstreamSpec::Socket(p),
        None => UpstreamSpec::default(),
    };
    let options = TranslatorOptions {
        route,
        vouches,
        vouching_key,
        upstream,
        patience,
        reconnect_for,
        priority: args.priority,
        socket_mode: args.socket_mode,
    };
    let Some(socket) = args.socket else {
        return tokio::select! {
            r = nixspace_translator::serve_stdio(options) => r.map(|()| ExitCode::SUCCESS).map_err(anyhow::Error::from),
            r = super::shutdown_signal() => r.map(|()| ExitCode::SUCCESS).map_err(anyhow::Error::from),
        };
    };
    let mut translator = crate::services::start_translator(socket, options).await?;
    tokio::select! {
        e = translator.failed() => Err(e.into()),
        r = super::shutdown_signal() => r.map(|()| ExitCode::SUCCESS).map_err(anyhow::Error::from),
    }
}
