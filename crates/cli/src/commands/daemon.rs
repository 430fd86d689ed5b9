//! `nixspace daemon`: a drop-in for `nix-daemon` whose builds go through an embedded
//! dataspace.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use nixspace_coordinator::{CoordinatorOptions, HostedCoordinator};
use nixspace_space::{HostConfig, Role};

use crate::services::{join_worker, local_builder, start_translator, Announce};
use nixspace_translator::{serve_legacy_stdio, serve_stdio, TranslatorOptions, UpstreamSpec};

/// Serve the Nix daemon socket, like nix-daemon, with builds on a dataspace.
///
/// Its local worker offers the system features the local Nix has
/// (`system-features` in nix.conf, or Nix's defaults for this machine).
///
/// Needs no configuration: it serves NIX_DAEMON_SOCKET_PATH (default
/// $NIX_STATE_DIR/daemon-socket/socket, that is
/// /nix/var/nix/daemon-socket/socket), hosts a private dataspace with one
/// local worker, and answers store operations with a private
/// `nix-daemon` on the local store (the real nix-daemon on PATH,
/// never nixspace itself). NIX_STORE_DIR, NIX_STATE_DIR,
/// NIX_LOG_DIR and NIX_CONF_DIR mean what they mean to Nix; `allowed-users`
/// and `trusted-users` in nix.conf decide who may connect and who is
/// trusted. Exits on Ctrl-C or SIGTERM, removing the socket.
///
/// Workers on other machines cannot join this dataspace; to spread builds,
/// run `nixspace up --translator PATH` and `nixspace worker` instead.
///
/// Installed under the name `nix-daemon` (a symlink or copy named so, in a
/// package's bin/), nixspace takes nix-daemon's command line: no arguments
/// or --daemon serve the socket, --stdio one client, and --version prints
/// the real nix-daemon's version.
#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// Steps the local worker builds at once. Default: the number of CPUs.
    #[arg(long, value_name = "N")]
    max_jobs: Option<u32>,

    /// Serve one client on stdin and stdout instead of the socket, as
    /// `nix-daemon --stdio` does (what an ssh-ng store runs on the remote
    /// side); the client is trusted, as Nix trusts it. Exits when it leaves.
    /// Logs only warnings and errors on stderr unless --log-level or RUST_LOG
    /// asks for more (an ssh-ng client shows that stderr to its user).
    #[arg(long)]
    stdio: bool,

    /// The socket's mode, in octal (e.g. 660). Default: 666 when run as root (as
    /// nix-daemon's), else 600.
    #[arg(long, value_name = "MODE", value_parser = super::parse_mode, conflicts_with_all = ["stdio", "serve"])]
    socket_mode: Option<u32>,

    /// Serve one session of the serve protocol on stdin and stdout instead,
    /// as `nix-store --serve` does: what Nix's legacy ssh:// store (and
    /// Hydra) runs on the remote side, as `REMOTE-PROGRAM --serve --write`.
    /// So `ssh://HOST?remote-program=nixspace%20daemon` makes the remote side
    /// this command, whose builds (BuildPaths, BuildDerivation) go to its
    /// dataspace and whose store operations go to the local store, with the
    /// client trusted as with --stdio. Errors end the session, saying why on
    /// stderr; logs only warnings and errors unless asked for more.
    #[arg(long, conflicts_with = "stdio")]
    serve: bool,

    /// With --serve: allow the commands that add paths to the store or build
    /// (ImportPaths, AddToStoreNar, BuildPaths, BuildDerivation), as
    /// `nix-store --serve --write` does; without it they end the session.
    #[arg(long, requires = "serve")]
    write: bool,
}

impl DaemonArgs {
    /// What `nix-daemon [--stdio]` asks for: a socket or stdin and stdout, the rest as
    /// `nixspace daemon` has it by default.
    pub fn nix_daemon(stdio: bool) -> DaemonArgs {
        DaemonArgs {
            max_jobs: None,
            stdio,
            socket_mode: None,
            serve: false,
            write: false,
        }
    }

    /// What `nix-store --serve [--write]` asks for: one serve-protocol session, the rest as
    /// `nixspace daemon` has it by default.
    pub fn nix_store_serve(write: bool) -> DaemonArgs {
        DaemonArgs {
            serve: true,
            write,
            ..DaemonArgs::nix_daemon(false)
        }
    }

    /// Whether it serves one client on stdin and stdout (`--stdio` or `--serve`).
    pub fn stdio(&self) -> bool {
        self.stdio || self.serve
    }
}

/// The socket nix-daemon would serve.
fn daemon_socket() -> PathBuf {
    let nonempty = |var| std::env::var_os(var).filter(|v| !v.is_empty());
    match nonempty("NIX_DAEMON_SOCKET_PATH") {
        Some(p) => PathBuf::from(p),
        None => nonempty("NIX_STATE_DIR")
            .map_or_else(|| PathBuf::from("/nix/var/nix"), PathBuf::from)
            .join("daemon-socket/socket"),
    }
}

/// Run `nixspace daemon`.
pub async fn run(args: DaemonArgs) -> anyhow::Result<ExitCode> {
    // Store operations go to the real nix-daemon (never this program, which may be
    // installed as `nix-daemon`): without one, fail now rather than at each client.
    nixspace_nix_tools::real_nix_daemon()?;
    let mut builder = local_builder();
    builder.id = format!("{}-daemon-{}", builder.host, std::process::id()).into();
    // As nix-daemon would build them: with the system features the local Nix has.
    builder.features = nixspace_nix_tools::system_features()
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the system features of the local Nix: {e}"))?;
    match args.max_jobs {
        Some(0) => anyhow::bail!("--max-jobs must be at least 1"),
        Some(n) => builder.max_jobs = n,
        None => {}
    }
    let socket = (!args.stdio()).then(daemon_socket);
    if let Some(parent) = socket.as_deref().and_then(Path::parent) {
        std::fs::create_dir_all(parent)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", parent.display()))?;
    }
    // The dataspace's socket, keys and route files are private to this process.
    let runtime = tempfile::Builder::new()
        .prefix("nixspace-daemon-")
        .tempdir()
        .map_err(|e| anyhow::anyhow!("cannot create a runtime directory: {e}"))?;
    let space = HostedCoordinator::start(CoordinatorOptions {
        host: HostConfig {
            dir: runtime.path().to_owned(),
            socket: runtime.path().join("nixspace.sock"),
            tcp: None,
            insecure_tcp: false,
            limits: nixspace_space::Limits::default(),
        },
        history: None,
        planner: nixspace_planner::PlannerConfig::default(),
        metrics: Arc::default(),
        // Its one worker builds in the store its frontend serves from: nothing is fetched.
        trusted_keys: Vec::new(),
        // No history, no jobs: a daemon serves its clients' builds only.
        jobs: None,
    })
    .await?;
    let mut worker = join_worker(space.route(Role::Worker)?, builder, Announce::Log);
    // The dataspace is its own: its translator vouches for inline derivations (an ssh-ng
    // client's BuildDerivation).
    let mut options = TranslatorOptions::new(space.route(Role::Trusted)?);
    options.vouches = true;
    options.upstream = UpstreamSpec::Private;
    options.socket_mode = args.socket_mode;
    let result = match socket {
        Some(socket) => {
            let mut translator = start_translator(socket, options).await?;
            tracing::info!(worker = %worker.id, "nixspace daemon ready");
            let result = tokio::select! {
                r = super::shutdown_signal() => r.map_err(anyhow::Error::from),
                e = translator.failed() => Err(e.into()),
                e = worker.ended() => Err(anyhow::anyhow!("the local worker cannot join: {e}")),
            };
            // Stop serving (the socket goes) before the dataspace's directory goes.
            drop(translator);
            result
        }
        None => tokio::select! {
            r = super::shutdown_signal() => r.map_err(anyhow::Error::from),
            r = serve_stdio(options.clone()), if !args.serve => r.map_err(anyhow::Error::from),
            r = serve_legacy_stdio(options, args.write), if args.serve => r.map_err(anyhow::Error::from),
            e = worker.ended() => Err(anyhow::anyhow!("the local worker cannot join: {e}")),
        },
    };
    drop(worker);
    drop(space);
    drop(runtime);
    result.map(|()| ExitCode::SUCCESS)
}
