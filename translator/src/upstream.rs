//! The upstream store: a `nix-daemon` socket, or a private `nix-daemon --stdio` child per
//! client connection (the real `nix-daemon`, never nixspace itself installed as one; started
//! with `NIX_REMOTE=local`, so it can never connect back to a daemon socket, and killed with
//! its process group when the connection ends).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Stdio;

use nixspace_nix_formats::store_path::StoreDir;
use nixspace_nix_protocol::handshake::client_handshake;
use nixspace_nix_protocol::stderr::DiscardLogs;
use nixspace_nix_protocol::{HandshakeError, HandshakeInfo, NixReader, NixWriter, ProtocolVersion};
use nixspace_nix_tools::{
    real_program, DaemonPool, DaemonTarget, PoolConfig, ProgramNotFound, NIX_DAEMON,
};
use tokio::process::{Child, Command};

use crate::{BoxRead, BoxWrite};

/// Where store operations go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamSpec {
    /// A `nix-daemon` listening on this socket.
    Socket(PathBuf),
    /// A private `nix-daemon --stdio` per client connection, run from this program.
    Private {
        /// The `nix-daemon` program (looked up on PATH if it is a bare name, passing over
        /// this process's own executable).
        program: PathBuf,
    },
}

impl UpstreamSpec {
    /// A few connections to the same store, for moving paths in and out of it.
    pub fn transfer_pool(&self, store_dir: &StoreDir) -> DaemonPool {
        let mut config = PoolConfig::new(2);
        config.store_dir = store_dir.clone();
        if let UpstreamSpec::Socket(path) = self {
            config.target = DaemonTarget::Socket(path.clone());
        }
        DaemonPool::new(config)
    }
}

impl Default for UpstreamSpec {
    fn default() -> Self {
        UpstreamSpec::Private {
            program: PathBuf::from(NIX_DAEMON),
        }
    }
}

impl std::fmt::Display for UpstreamSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamSpec::Socket(p) => write!(f, "nix-daemon at {}", p.display()),
            UpstreamSpec::Private { program } => {
                write!(f, "private `{} --stdio`", program.display())
            }
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
    /// Starting the private daemon failed.
    #[error("cannot start the upstream `{program} --stdio`")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// There is no such program other than nixspace itself.
    #[error(transparent)]
    Program(#[from] ProgramNotFound),
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
    /// The private daemon, if any (killed on drop).
    child: Option<Child>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("info", &self.info)
            .field("child", &self.child.as_ref().and_then(Child::id))
            .finish()
    }
}

impl Upstream {
    /// Connect as `spec` says and shake hands offering `version`.
    pub async fn connect(
        spec: &UpstreamSpec,
        version: ProtocolVersion,
        store_dir: &StoreDir,
    ) -> Result<Upstream, UpstreamError> {
        let (read, write, child): (BoxRead, BoxWrite, Option<Child>) = match spec {
            UpstreamSpec::Socket(path) => {
                let s = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|source| UpstreamError::Connect {
                        path: path.clone(),
                        source,
                    })?;
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w), None)
            }
            UpstreamSpec::Private { program } => {
                let program = real_program(program)?;
                let spawn_err = |source| UpstreamError::Spawn {
                    program: program.clone(),
                    source,
                };
                let mut child = Command::new(&program)
                    .arg("--stdio")
                    // Never "auto": a daemon that resolves its store to a daemon socket
                    // can connect to itself.
                    .env("NIX_REMOTE", "local")
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit())
                    .process_group(0)
                    .kill_on_drop(true)
                    .spawn()
                    .map_err(spawn_err)?;
                let missing = || {
                    spawn_err(std::io::Error::other(
                        "the child's stdin and stdout are not piped",
                    ))
                };
                let stdout = child.stdout.take().ok_or_else(missing)?;
                let stdin = child.stdin.take().ok_or_else(missing)?;
                (Box::new(stdout), Box::new(stdin), Some(child))
            }
        };
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
            child,
        })
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        // The daemon runs in its own process group: end the group, not just the leader
        // (kill_on_drop then reaps the leader).
        let pid = self
            .child
            .as_ref()
            .and_then(Child::id)
            .and_then(|p| i32::try_from(p).ok())
            .and_then(rustix::process::Pid::from_raw);
        if let Some(pid) = pid {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::TERM);
        }
    }
}
