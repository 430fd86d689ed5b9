//! `nixspace translate`: serve the Nix daemon protocol so unmodified Nix clients build on
//! the dataspace.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use nixspace_nix_formats::store_path::StoreDir;
use nixspace_space::{Role, Route};
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
/// The socket is created mode 0666, like nix-daemon's: who may connect,
/// and who is trusted, is decided from each client's peer credentials by
/// `allowed-users` and `trusted-users` in $NIX_CONF_DIR/nix.conf (default
/// /etc/nix). Untrusted clients get what nix-daemon grants them: signature
/// checks are enforced and restricted settings are ignored.
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
    #[arg(long, default_value_t = DEFAULT_PATIENCE.as_secs_f64(), value_name = "SECONDS")]
    wait_for_workers: f64,
}

/// What a translator serves with (shared by `translate`, `up --translator` and `daemon`).
pub struct TranslatorOptions {
    /// The socket to serve.
    pub socket: PathBuf,
    /// The dataspace's submit route.
    pub route: Route,
    /// Where store operations go.
    pub upstream: UpstreamSpec,
    /// How long a step may wait for a capable worker.
    pub patience: Duration,
    /// Priority of the demands.
    pub priority: i64,
}

impl TranslatorOptions {
    /// Serve `socket` for the dataspace at `route`, with the defaults of `nixspace translate`.
    pub fn new(socket: PathBuf, route: Route) -> TranslatorOptions {
        TranslatorOptions {
            socket,
            route,
            upstream: UpstreamSpec::default(),
            patience: DEFAULT_PATIENCE,
            priority: 0,
        }
    }
}

/// How long a step may wait for a capable worker by default.
const DEFAULT_PATIENCE: Duration = Duration::from_secs(30);

/// A translator serving in this process; dropping it stops serving and removes the socket.
pub struct Translator {
    socket: PathBuf,
    serving: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Translator {
    /// Read the trust settings and the store directory from the Nix configuration and
    /// environment, bind `options.socket` (mode 0666, like nix-daemon's) and start serving.
    pub async fn start(options: TranslatorOptions) -> anyhow::Result<Translator> {
        let store_dir = match std::env::var("NIX_STORE_DIR") {
            Ok(d) if !d.is_empty() => {
                StoreDir::new(&d).map_err(|e| anyhow::anyhow!("NIX_STORE_DIR={d}: {e}"))?
            }
            _ => StoreDir::default(),
        };
        let trust = nixspace_translator::TrustConfig::load()?;
        let socket = options.socket;
        let listener = nixspace_space::host::bind_unix(&socket).await?;
        // Access is decided per connection (allowed-users), as nix-daemon does.
        std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
        eprintln!(
            "nixspace: translating on {} (store operations: {}); use NIX_REMOTE=unix://{}",
            socket.display(),
            options.upstream,
            socket.display()
        );
        let transfers = options.upstream.transfer_pool(&store_dir);
        // The local store's database answers the cheapest queries without a relay hop.
        let store_db = match options.upstream {
            UpstreamSpec::Private { .. } => {
                let db = nixspace_translator::store_db::StoreDb::open_local(store_dir.clone());
                if db.is_some() {
                    tracing::info!(
                        "answering IsValidPath and QueryPathInfo from the store database"
                    );
                }
                db.map(Arc::new)
            }
            UpstreamSpec::Socket(_) => None,
        };
        let config = Arc::new(Config {
            transfers,
            store_db,
            upstream: options.upstream,
            route: options.route,
            patience: options.patience,
            priority: options.priority,
            store_dir,
            trust,
        });
        let serving = tokio::spawn(nixspace_translator::serve(listener, config));
        Ok(Translator { socket, serving })
    }

    /// Wait until serving fails; the error says why.
    pub async fn failed(&mut self) -> anyhow::Error {
        let why = match (&mut self.serving).await {
            Ok(Ok(())) => "stopped".to_owned(),
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        anyhow::anyhow!("serving {} failed: {why}", self.socket.display())
    }
}

impl Drop for Translator {
    fn drop(&mut self) {
        self.serving.abort();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Run `nixspace translate`.
pub async fn run(args: TranslateArgs) -> anyhow::Result<ExitCode> {
    let route = args.join.route(Role::Submit)?;
    let patience = Duration::try_from_secs_f64(args.wait_for_workers)
        .map_err(|e| anyhow::anyhow!("--wait-for-workers {}: {e}", args.wait_for_workers))?;
    let upstream = match args.upstream_socket {
        Some(p) => UpstreamSpec::Socket(p),
        None => UpstreamSpec::default(),
    };
    let mut translator = Translator::start(TranslatorOptions {
        socket: args.socket,
        route,
        upstream,
        patience,
        priority: args.priority,
    })
    .await?;
    tokio::select! {
        e = translator.failed() => Err(e),
        r = super::shutdown_signal() => r.map(|()| ExitCode::SUCCESS).map_err(anyhow::Error::from),
    }
}
