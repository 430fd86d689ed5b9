//! Hosting a dataspace: listeners, gatekeeper and the capabilities it honours.
//!
//! [`Listeners::bind`] opens the sockets first, outside any actor, so that
//! "address in use" and permission problems surface as clear errors before
//! anything starts. [`HostedSpace::start`] then creates the dataspace, a
//! syndicate-server gatekeeper in front of it, binds one sturdy ref per
//! [`Role`] to the dataspace attenuated to that role's vocabulary
//! ([`crate::policy`]), serves every accepted connection with
//! syndicate-server's relay behind a [`Doorman`] that checks and logs
//! capability requests, and writes the route files. Each connection is held to the
//! [`Limits`]' budgets: its packet caps and queue ([`connection::Budgets`]), and the time it
//! has to resolve a capability (then it is closed).
//!
//! A host listening on TCP keeps a Noise key pair ([`NoiseKey`], file `noise-key`) and serves
//! Syndicate's `noise` step on every connection: each connection's actor gets its own
//! bindspace and gatekeeper binding that key, so a failed handshake (a client pinning another
//! key) ends that connection's actor only. The session's decrypted channel leads to a second
//! doorman, which checks the `ref` step sent inside it. Route files pin the public key, so
//! clients open the session before sending the ref; a `ref` step in clear is refused on TCP
//! unless the listener is on loopback or the host runs with `insecure_tcp` (whose route
//! files then leave the Noise step out).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use syndicate::actor::{Account, Activation, ActorError, AnyValue, Cap, LinkedTaskTermination};
use syndicate::dataspace::Dataspace;
use syndicate::schemas::gatekeeper;
use tokio::net::{TcpListener, UnixListener, UnixStream};

use crate::connection::{self, Budgets, Reader, Writer};
use crate::doorman::{Doorman, KeyRing, Resolved};
use crate::keys::{KeyError, Keys, NoiseKey};
use crate::limits::Limits;
use crate::policy::{log_refused, role_caveats};
use crate::route::{Role, Route, RouteError, Transport};

/// Where the host listens and keeps its files.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Directory for route files and keys (created 0700 if missing).
    pub dir: PathBuf,
    /// The unix socket path.
    pub socket: PathBuf,
    /// Optional TCP address (port 0 picks a free port).
    pub tcp: Option<SocketAddr>,
    /// Let refs cross TCP in clear: route files without the Noise step, and the host
    /// accepting refs outside a Noise session on any TCP address (not only on loopback).
    pub insecure_tcp: bool,
    /// What each connection may hold in the dataspace.
    pub limits: Limits,
}

/// Failures while starting a host.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A filesystem problem with the runtime directory or key file.
    #[error("{what} {path}: {source}")]
    Io {
        /// What we were doing.
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The runtime directory exists but is not a directory of the user running the host.
    #[error(
        "runtime directory {path} is owned by uid {owner} (mode {mode:04o}), not by you \
         (uid {me}), or is not a plain directory: someone else may have created it; \
         remove it, or choose another --dir"
    )]
    ForeignDir {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Its permission bits.
        mode: u32,
        /// The user running the host.
        me: u32,
    },
    /// Another live process already serves this socket.
    #[error("socket {0} is in use by a running process; stop it or choose another --socket")]
    SocketInUse(PathBuf),
    /// Something that is not a socket is in the way.
    #[error("{0} exists and is not a socket; not replacing it")]
    NotASocket(PathBuf),
    /// TCP bind failure.
    #[error("cannot listen on tcp {addr}: {source}")]
    Tcp {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The key file is unreadable or malformed.
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// Writing a route file failed.
    #[error(transparent)]
    Route(#[from] RouteError),
}

/// Sockets bound and ready to accept.
pub struct Listeners {
    unix: UnixListener,
    unix_path: PathBuf,
    tcp: Option<(TcpListener, SocketAddr)>,
}

impl Listeners {
    /// Bind the unix socket (replacing a stale one) and the optional TCP port.
    pub async fn bind(config: &HostConfig) -> Result<Listeners, HostError> {
        create_private_dir(&config.dir)?;
        if let Some(parent) = config.socket.parent() {
            std::fs::create_dir_all(parent).map_err(|source| HostError::Io {
                what: "cannot create socket directory",
                path: parent.to_owned(),
                source,
            })?;
        }
        let unix = bind_unix(&config.socket).await?;
        // Only its owner may connect (the route files' capabilities are checked after that).
        std::fs::set_permissions(
            &config.socket,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .map_err(|source| HostError::Io {
            what: "cannot restrict socket",
            path: config.socket.clone(),
            source,
        })?;
        let tcp = match config.tcp {
            None => None,
            Some(addr) => {
                let l = TcpListener::bind(addr)
                    .await
                    .map_err(|source| HostError::Tcp { addr, source })?;
                let local = l
                    .local_addr()
                    .map_err(|source| HostError::Tcp { addr, source })?;
                Some((l, local))
            }
        };
        Ok(Listeners {
            unix,
            unix_path: config.socket.clone(),
            tcp,
        })
    }

    /// The transports clients can use, unix first.
    pub fn transports(&self) -> Vec<Transport> {
        let mut t = vec![Transport::Unix(self.unix_path.clone())];
        if let Some((_, addr)) = &self.tcp {
            t.push(Transport::Tcp(addr.ip().to_string(), addr.port()));
        }
        t
    }
}

/// Listen on the unix socket `path`. A stale socket file (nobody accepts on
/// it) is replaced; a live one, or a file that is not a socket, is an error.
pub async fn bind_unix(path: &Path) -> Result<UnixListener, HostError> {
    match UnixListener::bind(path) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let is_socket = std::fs::symlink_metadata(path)
                .map(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                .unwrap_or(false);
            if !is_socket {
                return Err(HostError::NotASocket(path.to_owned()));
            }
            if UnixStream::connect(path).await.is_ok() {
                return Err(HostError::SocketInUse(path.to_owned()));
            }
            tracing::debug!(path = %path.display(), "removing stale socket");
            let io = |what, source| HostError::Io {
                what,
                path: path.to_owned(),
                source,
            };
            std::fs::remove_file(path).map_err(|e| io("cannot remove stale socket", e))?;
            UnixListener::bind(path).map_err(|e| io("cannot listen on", e))
        }
        Err(source) => Err(HostError::Io {
            what: "cannot listen on",
            path: path.to_owned(),
            source,
        }),
    }
}

/// Create `dir` (and its parents) and make it owner-only (mode 0700). A `dir` that already
/// exists must be a directory (not a link to one) owned by the effective user: one that someone
/// else created (say `/tmp/nixspace-<uid>`, planted before the first `up`) is refused.
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), HostError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let io = |what, source| HostError::Io {
        what,
        path: dir.to_owned(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io("cannot create runtime directory", e))?;
    let meta = std::fs::symlink_metadata(dir).map_err(|e| io("cannot inspect", e))?;
    let me = rustix::process::geteuid().as_raw();
    if !meta.is_dir() || meta.uid() != me {
        return Err(HostError::ForeignDir {
            path: dir.to_owned(),
            owner: meta.uid(),
            mode: meta.mode() & 0o7777,
            me,
        });
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| io("cannot restrict runtime directory", e))
}

/// A running dataspace host.
pub struct HostedSpace {
    /// The dataspace itself (for in-process services such as the planner).
    pub dataspace: Arc<Cap>,
    /// The route handed out for each role, also written to `<dir>/<role>.route`.
    pub routes: BTreeMap<&'static str, (Route, PathBuf)>,
}

impl HostedSpace {
    /// Start the dataspace, its gatekeeper and the accept loops; write route files.
    pub fn start(
        t: &mut Activation,
        config: &HostConfig,
        listeners: Listeners,
    ) -> Result<HostedSpace, HostError> {
        let names = [Role::Submit, Role::Worker].map(Role::name);
        let keys = Keys::load_with(&config.dir, &names, Role::Trusted.name())?;
        let noise = match listeners.tcp {
            Some(_) => Some(Arc::new(NoiseKey::load_or_create(
                &config.dir.join("noise-key"),
            )?)),
            None => None,
        };
        let route_noise = match &noise {
            Some(key) if !config.insecure_tcp => Some(key.spec()),
            _ => None,
        };
        let dataspace = Dataspace::new(t, Some(AnyValue::symbol("nixspace")));
        let bindspace = Dataspace::new(t, Some(AnyValue::symbol("bindspace")));
        let gatekeeper = syndicate_server::services::gatekeeper::create_gatekeeper(t, &bindspace)
            .map_err(|e| HostError::Io {
            what: "cannot start gatekeeper for",
            path: config.dir.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        log_refused(t, &dataspace);
        let transports = listeners.transports();
        let mut routes = BTreeMap::new();
        for role in Role::ALL {
            let target = dataspace
                .attenuate(&role_caveats(role))
                .map_err(|e| HostError::Io {
                    what: "cannot confine the capabilities of",
                    path: config.dir.clone(),
                    source: std::io::Error::other(format!("{e:?}")),
                })?;
            bindspace.assert(
                t,
                &gatekeeper::Bind {
                    description: keys.description(role.name()),
                    target,
                    observer: gatekeeper::BindObserver::Absent,
                },
            );
            let route = Route {
                transports: transports.clone(),
                sturdy_ref: keys.sturdy_ref(role.name()),
                noise: route_noise.clone(),
            };
            let path = role.route_file(&config.dir);
            route.write(&path)?;
            routes.insert(role.name(), (route, path));
        }
        let Listeners { unix, tcp, .. } = listeners;
        let front = Front {
            gatekeeper,
            keys: keys.ring(),
            dataspace: Arc::clone(&dataspace),
            limits: config.limits,
            noise,
            plaintext: true,
        };
        serve(t, "unix", unix, front.clone());
        if let Some((tcp, addr)) = tcp {
            let plaintext = config.insecure_tcp || addr.ip().is_loopback();
            if config.insecure_tcp {
                tracing::warn!(%addr, "--insecure-tcp: capabilities and builds cross TCP in clear");
            }
            serve(t, "tcp", tcp, Front { plaintext, ..front });
        }
        Ok(HostedSpace { dataspace, routes })
    }
}

/// A listener whose connections become byte streams for the relay.
trait Accept: Send + 'static {
    /// Wait for the next connection; describe the peer for logs.
    fn next(
        &self,
    ) -> impl std::future::Future<Output = std::io::Result<(Reader, Writer, String)>> + Send;
}

impl Accept for UnixListener {
    async fn next(&self) -> std::io::Result<(Reader, Writer, String)> {
        let (stream, _) = self.accept().await?;
        let peer = match stream.peer_cred() {
            Ok(c) => format!("pid {} uid {}", c.pid().unwrap_or(-1), c.uid()),
            Err(_) => "unknown peer".to_owned(),
        };
        let (i, o) = stream.into_split();
        Ok((Box::pin(i), Box::pin(o), peer))
    }
}

impl Accept for TcpListener {
    async fn next(&self) -> std::io::Result<(Reader, Writer, String)> {
        let (stream, addr) = self.accept().await?;
        stream.set_nodelay(true)?;
        crate::dead_peer::drop_when_silent(&stream)?;
        let (i, o) = stream.into_split();
        Ok((Box::pin(i), Box::pin(o), addr.to_string()))
    }
}

/// What each connection's [`Doorman`] needs.
#[derive(Clone)]
struct Front {
    gatekeeper: Arc<Cap>,
    keys: KeyRing,
    dataspace: Arc<Cap>,
    limits: Limits,
    /// The host's Noise key, served on every connection when present.
    noise: Option<Arc<NoiseKey>>,
    /// Whether a `ref` step may come outside a Noise session.
    plaintext: bool,
}

impl Front {
    /// A doorman for the connection from `peer`, checking the `ref` steps sent to it.
    fn doorman(&self, peer: &str, resolved: &Resolved) -> Doorman {
        Doorman::new(
            Arc::clone(&self.gatekeeper),
            Arc::clone(&self.keys),
            Arc::clone(&self.dataspace),
            self.limits,
            peer.to_owned(),
            resolved.clone(),
        )
    }

    /// The first object the connection from `peer` sees, in the connection's actor: a doorman,
    /// passing `noise` steps to a gatekeeper of the connection's own when the host has a key.
    fn first_object(
        &self,
        t: &mut Activation,
        peer: &str,
        resolved: &Resolved,
    ) -> Result<Arc<Cap>, ActorError> {
        let doorman = self.doorman(peer, resolved);
        let doorman = match &self.noise {
            None => doorman,
            Some(key) => {
                // The Noise session's channel leads to a doorman of its own.
                let inner = Cap::new(&t.create_ref(self.doorman(peer, resolved)));
                let bindspace = Dataspace::new(t, Some(AnyValue::symbol("noise-bindspace")));
                let gatekeeper =
                    syndicate_server::services::gatekeeper::create_gatekeeper(t, &bindspace)?;
                bindspace.assert(
                    t,
                    &gatekeeper::Bind {
                        description: key.description(),
                        target: inner,
                        observer: gatekeeper::BindObserver::Absent,
                    },
                );
                doorman.with_noise(gatekeeper, self.plaintext)
            }
        };
        Ok(Cap::new(&t.create_ref(doorman)))
    }
}

/// Accept connections forever, each served by its own relay actor whose
/// first reference is a [`Doorman`] in front of the gatekeeper.
fn serve<L: Accept>(t: &mut Activation, kind: &'static str, listener: L, front: Front) {
    let facet = t.facet_ref();
    t.linked_task(Some(AnyValue::symbol(kind)), async move {
        let account = Account::new(Some(AnyValue::symbol(kind)), None);
        loop {
            let (i, o, peer) = match listener.next().await {
                Ok(c) => c,
                Err(error) => {
                    tracing::warn!(%error, kind, "accept failed");
                    continue;
                }
            };
            tracing::debug!(kind, %peer, "connection");
            let front = front.clone();
            let alive = facet.activate(&account, None, move |t| {
                t.spawn(Some(AnyValue::new(format!("{kind} {peer}"))), move |t| {
                    let resolved = Resolved::default();
                    let budgets = Budgets::new(&front.limits, resolved.clone(), peer.clone());
                    close_unless_resolved(t, front.limits.resolve_timeout, &resolved, &peer);
                    let first = front.first_object(t, &peer, &resolved)?;
                    connection::serve(t, i, o, first, budgets);
                    Ok(())
                });
                Ok(())
            });
            if !alive {
                return Ok(LinkedTaskTermination::Normal);
            }
        }
    });
}

/// End the current (connection's) actor after `limit` unless it resolved a capability by then.
fn close_unless_resolved(t: &mut Activation, limit: Duration, resolved: &Resolved, peer: &str) {
    let (resolved, peer) = (resolved.clone(), peer.to_owned());
    t.after(limit, move |t| {
        if !resolved.is_set() {
            tracing::warn!(%peer, ?limit, "closing a connection that resolved no capability in time");
            t.stop_root();
        }
        Ok(())
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn a_runtime_directory_of_another_user_is_refused() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: changing a directory's owner needs root");
            return;
        }
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("nixspace-0");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Positive control: the user's own directory is used, and made owner-only.
        create_private_dir(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
        let e = create_private_dir(&dir).unwrap_err();
        assert!(
            matches!(e, HostError::ForeignDir { owner: 65534, .. }),
            "{e}"
        );
        assert!(e.to_string().contains(&dir.display().to_string()), "{e}");
        // It was left as it was, not taken over.
        assert_eq!(std::fs::metadata(&dir).unwrap().uid(), 65534);
    }

    #[test]
    fn a_link_in_place_of_the_runtime_directory_is_refused() {
        let parent = tempfile::tempdir().unwrap();
        let target = parent.path().join("elsewhere");
        create_private_dir(&target).unwrap();
        let link = parent.path().join("nixspace-0");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = create_private_dir(&link).unwrap_err();
        assert!(matches!(e, HostError::ForeignDir { .. }), "{e}");
    }
}
