//! `nixspace translate`: serve the Nix daemon protocol so unmodified Nix clients build on
//! the dataspace.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use nixspace_nix_formats::store_path::StoreDir;
use nixspace_space::Role;
use nixspace_translator::{Config, UpstreamSpec};

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
/// default a private `nix-daemon --stdio` (NIX_REMOTE=local) per client
/// connection. Build operations (BuildPaths, BuildPathsWithResults,
/// BuildDerivation) become demands on the dataspace joined with the submit
/// route; build logs are relayed to the client, and a client that goes away
/// withdraws its demands. Runs until Ctrl-C or SIGTERM.
///
/// The socket is created mode 0600: a client acts with the upstream
/// daemon's trust (a private daemon trusts its client fully), so only the
/// socket's owner may connect. `allowed-users`/`trusted-users` are not
/// applied yet.
#[derive(Args, Debug)]
pub struct TranslateArgs {
    #[command(flatten)]
    join: JoinArgs,

    /// The socket to serve (created; an existing socket file is replaced).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,

    /// Send store operations to the nix-daemon at this socket instead of a
    /// private `nix-daemon --stdio` per client.
    #[arg(long, value_name = "PATH")]
    upstream_socket: Option<PathBuf>,

    /// Priority of the demands made for clients.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i64,

    /// How long a step may wait for a worker able to build it before the
    /// client's build fails, in seconds.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    wait_for_workers: f64,
}

/// Run `nixspace translate`.
pub async fn run(args: TranslateArgs) -> anyhow::Result<ExitCode> {
    let route = args.join.route(Role::Submit)?;
    let patience = std::time::Duration::try_from_secs_f64(args.wait_for_workers)
        .map_err(|e| anyhow::anyhow!("--wait-for-workers {}: {e}", args.wait_for_workers))?;
    let store_dir = match std::env::var("NIX_STORE_DIR") {
        Ok(d) if !d.is_empty() => {
            StoreDir::new(&d).map_err(|e| anyhow::anyhow!("NIX_STORE_DIR={d}: {e}"))?
        }
        _ => StoreDir::default(),
    };
    let upstream = match args.upstream_socket {
        Some(p) => UpstreamSpec::Socket(p),
        None => UpstreamSpec::default(),
    };
    let listener = nixspace_space::host::bind_unix(&args.socket).await?;
    // Every client acts with the upstream's trust: owner only until peer credentials and
    // trusted-users are checked.
    std::fs::set_permissions(
        &args.socket,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    eprintln!(
        "nixspace: translating on {} (store operations: {upstream}); use NIX_REMOTE=unix://{}",
        args.socket.display(),
        args.socket.display()
    );
    let config = Arc::new(Config {
        upstream,
        route,
        patience,
        priority: args.priority,
        store_dir,
    });
    let socket = args.socket.clone();
    let result = tokio::select! {
        r = nixspace_translator::serve(listener, config) => {
            r.map_err(|e| anyhow::anyhow!("serving {} failed: {e}", socket.display()))
        }
        r = super::shutdown_signal() => r.map_err(anyhow::Error::from),
    };
    let _ = std::fs::remove_file(&socket);
    result.map(|()| ExitCode::SUCCESS)
}
