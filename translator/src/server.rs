//! The translator's server: one task per client connection on a socket ([`serve`]), or the one
//! client on this process's stdin and stdout ([`serve_stdio`], as `nix-daemon --stdio`).
//!
//! Per connection: decide from the peer's credentials whether it may connect and is trusted
//! (a client on stdin and stdout is trusted, as Nix trusts it), connect the upstream store (offering our newest version), shake hands with the client
//! offering the upstream's version, and if the client settles on an older one, reconnect the
//! upstream at that version, so both sides of the proxy speak the same version and replies can
//! be relayed field by field. Then the op loop hands each request to the connection's backend
//! ([`Translator`]: builds on the dataspace, the rest passed through). A request that cannot be
//! decoded gets an error frame and ends that connection only; the server keeps serving others.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nixspace_frontend::StoreDb;
use nixspace_nix_formats::signature::SecretKey;
use nixspace_nix_formats::store_path::StoreDir;
use nixspace_nix_protocol::handshake::{server_greeting, server_handshake, ServerHello};
use nixspace_nix_protocol::stderr::send_error;
use nixspace_nix_protocol::{DaemonError, NixReader, NixWriter, Request, TrustedFlag, WireError};
use nixspace_nix_tools::nix_conf::NixConf;
use nixspace_nix_tools::DaemonPool;
use nixspace_space::Route;
use tokio::net::{UnixListener, UnixStream};

use crate::backend::{dispatch, DaemonBackend};
use crate::builds::Translator;
use crate::client::{not_supported, Client, ClientStreams, ConnError};
use crate::passthrough::PassThrough;
use crate::trust::{Peer, Refusal, SystemGroups, Trust, TrustConfig};
use crate::upstream::{Upstream, UpstreamSpec};

/// What the translator serves with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where store operations go.
    pub upstream: UpstreamSpec,
    /// The dataspace builds go to (a submit route, or a trusted one).
    pub route: Route,
    /// Whether `route` is a trusted route, which may vouch for inline derivations.
    pub vouches: bool,
    /// The key trusted clients' inputs are vouched for with (see
    /// [`crate::TranslatorOptions::vouching_key`]).
    pub vouching_key: Option<Arc<SecretKey>>,
    /// How long a step may stay unschedulable before its build fails.
    pub patience: Duration,
    /// How long a build keeps trying to rejoin a dataspace that went away.
    pub reconnect_for: Duration,
    /// Priority of the demands.
    pub priority: i64,
    /// The store directory (`/nix/store` unless NIX_STORE_DIR says otherwise).
    pub store_dir: StoreDir,
    /// Who may connect and who is trusted.
    pub trust: TrustConfig,
    /// The Nix configuration the translator started with (what acts after a build:
    /// `post-build-hook`, `secret-key-files`).
    pub nix_conf: NixConf,
    /// Connections to the upstream store for path transfers: workers with stores of their
    /// own fetch inputs from it, and results are copied back into it.
    pub transfers: DaemonPool,
    /// The upstream store's database, when it is the local store: `IsValidPath` and
    /// `QueryPathInfo` are answered from it instead of relayed.
    pub store_db: Option<Arc<StoreDb>>,
}

/// Accept clients on `listener` forever, one task each. Each peer's credentials decide, as
/// `config.trust` says, whether it may connect and whether it is trusted.
pub async fn serve(listener: UnixListener, config: Arc<Config>) -> std::io::Result<()> {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and friends: wait a little rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let config = Arc::clone(&config);
        tokio::spawn(async move {
            let trust = admit(&stream, &config.trust, id).await;
            let served = match ClientStreams::socket(stream) {
                Ok(streams) => handle(streams, &config, id, trust).await,
                Err(e) => Err(e.into()),
            };
            match served {
                Ok(()) => tracing::debug!(client = id, "disconnected"),
                Err(e) => {
                    tracing::warn!(client = id, error = %crate::error_chain(&e), "connection closed")
                }
            }
        });
    }
}

/// Serve the one client on this process's stdin and stdout until it leaves, as `nix-daemon
/// --stdio` does. The client is trusted: like Nix, the daemon leaves limiting access to its
/// standard streams to whoever connects them (an ssh server, a parent process).
pub async fn serve_stdio(config: &Config) -> Result<(), ConnError> {
    let streams = ClientStreams::stdio()?;
    tracing::info!(
        client = 0,
        "serving one client on stdin and stdout (trusted)"
    );
    handle(streams, config, 0, Ok(Trust::Trusted)).await
}

/// Serve a client of this process's own on `stream` (the serve protocol's session, see
/// [`crate::serve`]), trusted as the client on stdin and stdout is.
pub(crate) async fn serve_in_process(stream: UnixStream, config: &Config) -> Result<(), ConnError> {
    handle(
        ClientStreams::socket(stream)?,
        config,
        0,
        Ok(Trust::Trusted),
    )
    .await
}

/// Decide about the peer of `stream` (the user and group lookups run off the async threads).
async fn admit(stream: &UnixStream, trust: &TrustConfig, id: u64) -> Result<Trust, Refusal> {
    let unknown = || Refusal {
        user: "<unknown>".to_owned(),
    };
    let cred = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(client = id, error = %e, "cannot read the peer's credentials");
            return Err(unknown());
        }
    };
    let (uid, gid, pid) = (cred.uid(), cred.gid(), cred.pid());
    let trust = trust.clone();
    let decided = tokio::task::spawn_blocking(move || {
        let peer = Peer::lookup(uid, gid, pid);
        let decision = trust.decide(&peer, &SystemGroups);
        (peer, decision)
    })
    .await;
    let Ok((peer, decision)) = decided else {
        tracing::warn!(client = id, uid, "looking up the peer's user failed");
        return Err(unknown());
    };
    let pid = peer
        .pid
        .map_or_else(|| "<unknown>".to_owned(), |p| p.to_string());
    match &decision {
        Ok(t) => tracing::info!(
            client = id,
            %pid,
            user = %peer.user,
            trusted = (*t == Trust::Trusted),
            "accepted connection"
        ),
        Err(e) => tracing::warn!(client = id, %pid, error = %e, "refused connection"),
    }
    decision
}

/// The Nix version string announced to a client that is refused before an upstream exists.
const OWN_VERSION: &str = concat!("nixspace ", env!("CARGO_PKG_VERSION"));

/// Serve one client: refuse it, or shake hands and run its operations to the end.
async fn handle(
    streams: ClientStreams,
    config: &Config,
    id: u64,
    trust: Result<Trust, Refusal>,
) -> Result<(), ConnError> {
    let ClientStreams {
        input,
        output,
        watch,
    } = streams;
    let ours = nixspace_nix_protocol::version::MAX_SUPPORTED;
    let mut cr = NixReader::new(input, ours).with_store_dir(config.store_dir.clone());
    let mut cw = NixWriter::new(output, ours).with_store_dir(config.store_dir.clone());
    let trust = match trust {
        Ok(t) => t,
        Err(refusal) => {
            // Like nix-daemon, but the client learns why: the handshake ends in an error.
            let hello = ServerHello {
                version: ours,
                nix_version: OWN_VERSION.to_owned(),
                trusted: Some(TrustedFlag::NotTrusted),
                features: BTreeSet::new(),
            };
            server_greeting(&mut cr, &mut cw, &hello).await?;
            send_error(&mut cw, &DaemonError::new(refusal.to_string())).await?;
            return Ok(());
        }
    };
    let mut up =
        Upstream::connect(&config.upstream, &config.transfers, ours, &config.store_dir).await?;
    let hello = ServerHello {
        version: up.info.version,
        nix_version: up
            .info
            .daemon_nix_version
            .clone()
            .unwrap_or_else(|| OWN_VERSION.to_owned()),
        // Like nix-daemon: trusted only if the upstream trusts us too.
        trusted: match trust {
            Trust::Trusted => up.info.trusted,
            Trust::Untrusted => Some(TrustedFlag::NotTrusted),
        },
        features: up.info.features.clone(),
    };
    let info = server_handshake(&mut cr, &mut cw, &hello).await?;
    if info.version != up.info.version {
        up = Upstream::connect(
            &config.upstream,
            &config.transfers,
            info.version,
            &config.store_dir,
        )
        .await?;
    }
    tracing::debug!(client = id, version = %info.version, "handshake done");
    let mut client = Client::new(id, trust, cr, cw, watch);
    let mut translator = Translator::new(config, PassThrough::new(up, config.trust.clone()));
    op_loop(&mut client, &mut translator).await
}

/// Read the client's requests and serve each with `backend`, until the client closes the
/// connection. A request that cannot be decoded ends the connection, with an error frame.
async fn op_loop<B: DaemonBackend>(client: &mut Client, backend: &mut B) -> Result<(), ConnError> {
    loop {
        let req = match Request::read(&mut client.reader).await {
            Ok(None) => return Ok(()),
            Ok(Some(r)) => r,
            Err(WireError::UnknownOpcode(n)) => {
                let what = n.0.to_string();
                let _ = client.error(&not_supported(&what)).await;
                return Err(ConnError::Unsupported(what));
            }
            Err(WireError::UnsupportedOp(op)) => {
                let what = format!("{op:?} ({})", op as u64);
                let _ = client.error(&not_supported(&what)).await;
                return Err(ConnError::Unsupported(what));
            }
            Err(e) => {
                let message = format!("nixspace translator: malformed request: {e}");
                let _ = client.error(&DaemonError::new(message)).await;
                return Err(e.into());
            }
        };
        tracing::trace!(client = client.id, op = ?req.opcode(), "request");
        if let Err(e) = dispatch(backend, client, req).await {
            if e.can_answer() {
                let _ = client.error(&DaemonError::new(e.to_string())).await;
            }
            return Err(e);
        }
    }
}
