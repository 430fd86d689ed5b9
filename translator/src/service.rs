//! The translator as a service: [`TranslatorService::start`] reads the Nix configuration,
//! binds the socket and serves; [`TranslatorService::failed`] waits for serving to fail;
//! dropping the service stops serving and removes the socket. `nixspace translate`, `nixspace
//! up --translator` and `nixspace daemon` start it the same way. [`serve_stdio`] serves the
//! one client on stdin and stdout instead (`nixspace daemon --stdio`), and
//! [`serve_legacy_stdio`] one session of the serve protocol (`nixspace daemon --serve`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nixspace_frontend::StoreDb;
use nixspace_nix_formats::signature::SecretKey;
use nixspace_nix_formats::store_path::{StoreDir, StorePathError};
use nixspace_space::host::{bind_unix, HostError};
use nixspace_space::Route;

use crate::client::ConnError;
use crate::server::{serve, Config};
use crate::trust::TrustConfig;
use crate::upstream::UpstreamSpec;
use nixspace_nix_tools::nix_conf::NixConf;
use nixspace_nix_tools::NixConfError;

/// How long a step may wait for a capable worker by default.
pub const DEFAULT_PATIENCE: Duration = Duration::from_secs(30);

/// How long a build keeps trying to rejoin the dataspace by default.
pub const DEFAULT_RECONNECT_FOR: Duration = Duration::from_secs(60);

/// What a translator serves with.
#[derive(Debug, Clone)]
pub struct TranslatorOptions {
    /// The dataspace's submit route, or its trusted route (see `vouches`).
    pub route: Route,
    /// Whether `route` is a trusted route: then a trusted client's inline derivations (or
    /// anyone's content-addressed ones) are built, vouched for on the dataspace.
    pub vouches: bool,
    /// The key a vouching translator signs its trusted clients' inputs with, as they are
    /// served to the dataspace (the one beside the trusted route), so that workers with
    /// stores of their own take them; without one, only signed or content-addressed inputs
    /// reach those workers.
    pub vouching_key: Option<Arc<SecretKey>>,
    /// Where store operations go.
    pub upstream: UpstreamSpec,
    /// How long a step may wait for a capable worker.
    pub patience: Duration,
    /// How long a build keeps trying to rejoin a dataspace that went away.
    pub reconnect_for: Duration,
    /// Priority of the demands.
    pub priority: i64,
    /// The socket's permission bits; `None` chooses by [`socket_mode`].
    pub socket_mode: Option<u32>,
}

impl TranslatorOptions {
    /// Serve for the dataspace at `route`, with the defaults of `nixspace translate`.
    pub fn new(route: Route) -> TranslatorOptions {
        TranslatorOptions {
            route,
            vouches: false,
            vouching_key: None,
            upstream: UpstreamSpec::default(),
            patience: DEFAULT_PATIENCE,
            reconnect_for: DEFAULT_RECONNECT_FOR,
            priority: 0,
            socket_mode: None,
        }
    }
}

/// The mode the socket gets: `requested`, else 0666 when serving as root (nix-daemon's case:
/// anyone may connect, and `allowed-users` decides per connection) and 0600 otherwise (only
/// the user running the translator, whose builds they are, may connect).
pub fn socket_mode(requested: Option<u32>, as_root: bool) -> u32 {
    requested.unwrap_or(if as_root { 0o666 } else { 0o600 })
}

/// Why the translator could not start, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// `NIX_STORE_DIR` does not name a store directory.
    #[error("NIX_STORE_DIR={dir}: {source}")]
    StoreDir {
        /// The value.
        dir: String,
        /// Why it is not one.
        source: StorePathError,
    },
    /// The Nix configuration could not be read.
    #[error(transparent)]
    Config(#[from] NixConfError),
    /// The socket could not be bound.
    #[error(transparent)]
    Bind(#[from] HostError),
    /// The socket's mode could not be set.
    #[error("cannot make {socket} reachable by everyone: {source}")]
    Mode {
        /// The socket.
        socket: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Serving stopped.
    #[error("serving {socket} failed: {why}")]
    Stopped {
        /// The socket.
        socket: PathBuf,
        /// Why.
        why: String,
    },
    /// The client on stdin and stdout could not be served to the end.
    #[error("serving the client on stdin and stdout failed")]
    Stdio(#[source] Box<ConnError>),
    /// The serve protocol's session on stdin and stdout ended in an error; its message is
    /// what `nix-store --serve` would print.
    #[error(transparent)]
    Serve(Box<crate::serve::ServeSessionError>),
}

/// A translator serving in this process; dropping it stops serving and removes the socket.
pub struct TranslatorService {
    socket: PathBuf,
    serving: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl std::fmt::Debug for TranslatorService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TranslatorService({})", self.socket.display())
    }
}

impl TranslatorService {
    /// Read the trust settings and the store directory from the Nix configuration and
    /// environment, bind `socket` (with the mode [`socket_mode`] chooses) and start serving.
    pub async fn start(
        socket: PathBuf,
        options: TranslatorOptions,
    ) -> Result<TranslatorService, ServiceError> {
        let mode = socket_mode(options.socket_mode, rustix::process::geteuid().is_root());
        let config = server_config(options)?;
        let listener = bind_unix(&socket).await?;
        // Who may connect is further decided per connection (allowed-users), as nix-daemon does.
        std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .map_err(|source| ServiceError::Mode {
                socket: socket.clone(),
                source,
            })?;
        tracing::info!(socket = %socket.display(), upstream = %config.upstream, "translating");
        let serving = tokio::spawn(serve(listener, Arc::new(config)));
        Ok(TranslatorService { socket, serving })
    }

    /// The socket it serves.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// Wait until serving fails; the error says why.
    pub async fn failed(&mut self) -> ServiceError {
        let why = match (&mut self.serving).await {
            Ok(Ok(())) => "stopped".to_owned(),
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        ServiceError::Stopped {
            socket: self.socket.clone(),
            why,
        }
    }
}

/// Serve the one client on this process's stdin and stdout until it leaves, as `nix-daemon
/// --stdio` does, with the configuration [`TranslatorService::start`] reads.
pub async fn serve_stdio(options: TranslatorOptions) -> Result<(), ServiceError> {
    let config = server_config(options)?;
    crate::server::serve_stdio(&config)
        .await
        .map_err(|e| ServiceError::Stdio(Box::new(e)))
}

/// Serve one session of the serve protocol on this process's stdin and stdout, as `nix-store
/// --serve` does (`--write` when `write_allowed`), with the configuration
/// [`TranslatorService::start`] reads; see [`crate::serve`].
pub async fn serve_legacy_stdio(
    options: TranslatorOptions,
    write_allowed: bool,
) -> Result<(), ServiceError> {
    let config = server_config(options)?;
    crate::serve::serve_legacy_stdio(&config, write_allowed)
        .await
        .map_err(|e| ServiceError::Serve(Box::new(e)))
}

/// The server's configuration: `options`, with the Nix configuration (and the trust settings
/// in it) and the store directory read from the configuration files and environment.
fn server_config(options: TranslatorOptions) -> Result<Config, ServiceError> {
    let store_dir = match std::env::var("NIX_STORE_DIR") {
        Ok(dir) if !dir.is_empty() => {
            StoreDir::new(&dir).map_err(|source| ServiceError::StoreDir { dir, source })?
        }
        _ => StoreDir::default(),
    };
    let nix_conf = NixConf::load()?;
    let trust = TrustConfig::default().with_conf(&nix_conf);
    let transfers = options.upstream.transfer_pool(&store_dir);
    // The local store's database answers the cheapest queries without a relay hop.
    let store_db = match options.upstream {
        UpstreamSpec::Private => {
            let db = StoreDb::open_local(store_dir.clone());
            if db.is_some() {
                tracing::info!("answering IsValidPath and QueryPathInfo from the store database");
            }
            db.map(Arc::new)
        }
        UpstreamSpec::Socket(_) => None,
    };
    Ok(Config {
        transfers,
        store_db,
        upstream: options.upstream,
        route: options.route,
        vouches: options.vouches,
        vouching_key: options.vouching_key,
        patience: options.patience,
        reconnect_for: options.reconnect_for,
        priority: options.priority,
        store_dir,
        trust,
        nix_conf,
    })
}

impl Drop for TranslatorService {
    fn drop(&mut self) {
        self.serving.abort();
        let _ = std::fs::remove_file(&self.socket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;

    #[test]
    fn the_socket_is_private_unless_served_as_root_or_asked() {
        assert_eq!(socket_mode(None, false), 0o600);
        assert_eq!(socket_mode(None, true), 0o666);
        assert_eq!(socket_mode(Some(0o660), false), 0o660);
        assert_eq!(socket_mode(Some(0o600), true), 0o600);
    }

    /// Whether user `nobody` (uid 65534) can connect to the unix socket `path`.
    fn nobody_connects(path: &std::path::Path) -> bool {
        std::process::Command::new("/usr/bin/python3")
            .args([
                "-c",
                "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])",
            ])
            .arg(path)
            .uid(65534)
            .gid(65534)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success()
    }

    #[tokio::test]
    async fn another_user_cannot_connect_to_a_private_socket() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: connecting as another user needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let route =
            Route::parse(r#"<route [<unix "/nonexistent">] <ref {oid: "submit" sig: #[]}>>"#)
                .unwrap();
        let serve = |mode| {
            let socket = dir.path().join(format!("socket-{mode:o}"));
            let mut options = TranslatorOptions::new(route.clone());
            options.socket_mode = Some(mode);
            TranslatorService::start(socket, options)
        };
        // Positive control: the socket nix-daemon would have (0666) admits the other user.
        let open = serve(0o666).await.unwrap();
        assert!(nobody_connects(open.socket()));
        // The mode a translator run by an ordinary user gets refuses it.
        let private = serve(socket_mode(None, false)).await.unwrap();
        assert!(!nobody_connects(private.socket()));
    }
}
