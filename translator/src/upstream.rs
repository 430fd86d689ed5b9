//! The upstream store: a `nix-daemon` socket, or the translator's own private `nix-daemon`
//! (the real `nix-daemon`, never nixspace itself installed as one; started with
//! `NIX_REMOTE=local`, so it can never connect back to a daemon socket), which forks a
//! process per client connection that ends with it.

use std::collections::BTreeSet;
use std::path::PathBuf;

use nixspace_nix_formats::store_path::StoreDir;
use nixspace_nix_protocol::handshake::client_handshake;
use nixspace_nix_protocol::stderr::DiscardLogs;
use nixspace_nix_protocol::{HandshakeError, HandshakeInfo, NixReader, NixWriter, ProtocolVersion};
use nixspace_nix_tools::{DaemonPool, DaemonTarget, PoolConfig, StepError};

use crate::{BoxRead, BoxWrite};

/// Where store operations go.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum UpstreamSpec {
    /// A `nix-daemon` listening on this socket.
    Socket(PathBuf),
    /// The translator's own private `nix-daemon` on the local store, started with the first
    /// connection.
    #[default]
    Private,
}

impl UpstreamSpec {
    /// A few connections to the same store, for moving paths in and out of it; for
    /// [`UpstreamSpec::Private`], the pool owns the private daemon that clients' upstream
    /// connections go to as well.
    pub fn transfer_pool(&self, store_dir: &StoreDir) -> DaemonPool {
        let mut config = PoolConfig::new(2);
        config.store_dir = store_dir.clone();
        if let UpstreamSpec::Socket(path) = self {
            config.target = DaemonTarget::Socket(path.clone());
        }
        DaemonPool::new(config)
    }
}

impl std::fmt::Display for UpstreamSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamSpec::Socket(p) => write!(f, "nix-daemon at {}", p.display()),
            UpstreamSpec::Private => write!(f, "a private nix-daemon"),
        }
    }
}

/// Why the upstream could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Connecting to the socket failed.
    #[error("cannot connect to the upstream nix-daemon at {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The private daemon could not be started.
    #[error("cannot start the upstream nix-daemon: {0}")]
    Private(#[source] StepError),
    /// The handshake with the upstream failed.
    #[error("handshake with the upstream nix-daemon failed")]
    Handshake(#[from] HandshakeError),
}

/// One connection to the upstream store.
pub struct Upstream {
    /// Replies from the upstream.
    pub reader: NixReader<BoxRead>,
    /// Requests to the upstream.
    pub writer: NixWriter<BoxWrite>,
    /// What the handshake established.
    pub info: HandshakeInfo,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// Connect as `spec` says (for [`UpstreamSpec::Private`], to the private daemon of
    /// `transfers`, the spec's [`UpstreamSpec::transfer_pool`]) and shake hands offering
    /// `version`.
    pub async fn connect(
        spec: &UpstreamSpec,
        transfers: &DaemonPool,
        version: ProtocolVersion,
        store_dir: &StoreDir,
    ) -> Result<Upstream, UpstreamError> {
        let path = match spec {
            UpstreamSpec::Socket(path) => path.clone(),
            UpstreamSpec::Private => transfers.socket().await.map_err(UpstreamError::Private)?,
        };
        let stream = nixspace_nix_tools::daemon_socket::connect(&path)
            .await
            .map_err(|source| UpstreamError::Connect { path, source })?;
        let (read, write) = stream.into_split();
        let (read, write): (BoxRead, BoxWrite) = (Box::new(read), Box::new(write));
        let mut reader = NixReader::new(read, version).with_store_dir(store_dir.clone());
        let mut writer = NixWriter::new(write, version).with_store_dir(store_dir.clone());
        let info = client_handshake(
            &mut reader,
            &mut writer,
            version,
            &BTreeSet::new(),
            &mut DiscardLogs,
        )
        .await?;
        Ok(Upstream {
            reader,
            writer,
            info,
        })
    }
}
