//! A private `nix-daemon` on the local store, listening on a socket in a directory only this
//! process's user can enter.
//!
//! Nix's daemon forks a child per connection, which opens the store afresh and exits when the
//! connection ends, taking the connection's temporary GC roots with it. Connecting costs a
//! fork of a running process instead of starting a program (`nix-daemon --stdio`: loading
//! Nix's libraries and configuration, ~20 ms of CPU), so a connection per operation is cheap.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};
use tokio::process::{Child, Command};

use crate::real_program::{real_nix_daemon, ProgramNotFound};

/// How long a starting daemon may take to listen on its socket.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a private daemon could not be started.
#[derive(Debug, thiserror::Error)]
pub enum PrivateDaemonError {
    /// No real `nix-daemon` on `PATH`.
    #[error(transparent)]
    NotFound(#[from] ProgramNotFound),
    /// Its directory could not be made.
    #[error("cannot make the private nix-daemon's directory {path}: {source}")]
    Directory {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The program could not be started.
    #[error("cannot start nix-daemon: {0}")]
    Spawn(#[source] std::io::Error),
    /// It exited before listening.
    #[error("the private nix-daemon exited before listening on {socket}: {status}")]
    Exited {
        /// Its socket.
        socket: PathBuf,
        /// How it exited.
        status: std::process::ExitStatus,
    },
    /// It did not listen in time.
    #[error("the private nix-daemon did not listen on {socket} within {timeout:?}")]
    Timeout {
        /// Its socket.
        socket: PathBuf,
        /// How long it was given.
        timeout: Duration,
    },
}

/// A running private `nix-daemon` in its own process group, killed with its group when
/// dropped (connections being served end with it).
pub struct PrivateDaemon {
    child: Child,
    socket: PathBuf,
    /// The private directory holding the socket, removed on drop (none when the caller
    /// chose the directory).
    _dir: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for PrivateDaemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateDaemon")
            .field("pid", &self.child.id())
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl PrivateDaemon {
    /// Start the real `nix-daemon` on a socket in a new private directory (mode 0700, under
    /// the temporary directory), with `options` as extra `--option NAME VALUE` arguments.
    pub async fn start(options: &[(String, String)]) -> Result<PrivateDaemon, PrivateDaemonError> {
        let dir = private_dir()?;
        let socket = dir.path().join("socket");
        PrivateDaemon::start_at(socket, options, Some(dir)).await
    }

    /// Start the real `nix-daemon` on `dir/socket` (`dir` made if missing).
    pub async fn start_in(
        dir: &Path,
        options: &[(String, String)],
    ) -> Result<PrivateDaemon, PrivateDaemonError> {
        std::fs::create_dir_all(dir).map_err(|source| PrivateDaemonError::Directory {
            path: dir.to_owned(),
            source,
        })?;
        PrivateDaemon::start_at(dir.join("socket"), options, None).await
    }

    async fn start_at(
        socket: PathBuf,
        options: &[(String, String)],
        dir: Option<tempfile::TempDir>,
    ) -> Result<PrivateDaemon, PrivateDaemonError> {
        let mut command = Command::new(real_nix_daemon()?);
        for (name, value) in options {
            command.arg("--option").arg(name).arg(value);
        }
        // Only this user (and root) can enter the socket's directory, so whoever connects is
        // this process's user: trusted, as `nix-daemon --stdio` trusts its client.
        command
            .args(["--option", "extra-trusted-users", "*"])
            // Errors only: not a line per connection on our stderr.
            .arg("--quiet")
            // The store must be the local one: a daemon whose store is "auto" may connect to
            // itself.
            .env("NIX_REMOTE", "local")
            .env("NIX_DAEMON_SOCKET_PATH", &socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            // Its own group: a terminal's Ctrl-C does not reach it, and it is killed with the
            // children serving its connections.
            .process_group(0);
        // Killed if this process dies without dropping it (`kill -9`): nothing else would stop
        // a daemon listening on a socket nobody knows about.
        // SAFETY: the closure runs in the forked child before `exec` and only makes one
        // system call (prctl), which is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                rustix::process::set_parent_process_death_signal(Some(Signal::KILL))
                    .map_err(std::io::Error::from)
            });
        }
        let child = command.spawn().map_err(PrivateDaemonError::Spawn)?;
        let mut daemon = PrivateDaemon {
            child,
            socket,
            _dir: dir,
        };
        daemon.wait_until_listening().await?;
        tracing::debug!(socket = %daemon.socket.display(), pid = ?daemon.child.id(), "started a private nix-daemon");
        Ok(daemon)
    }

    /// Wait for the socket to appear. Not by connecting: the daemon would take a connection
    /// closed before its handshake for an error, and say so. The daemon binds and listens
    /// back to back; a connection in between is refused, and `daemon_socket::connect` tries
    /// again.
    async fn wait_until_listening(&mut self) -> Result<(), PrivateDaemonError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.socket.exists() {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(PrivateDaemonError::Exited {
                    socket: self.socket.clone(),
                    status,
                });
            }
            if Instant::now() >= deadline {
                return Err(PrivateDaemonError::Timeout {
                    socket: self.socket.clone(),
                    timeout: START_TIMEOUT,
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The socket it listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Its process id (none once it was reaped).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for PrivateDaemon {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id().and_then(|p| Pid::from_raw(p as i32)) {
            let _ = rustix::process::kill_process_group(pid, Signal::KILL);
        }
    }
}

/// A new directory only this user can enter, for a socket: under the temporary directory, or
/// under `/tmp` when that path would be too long for a socket's address (108 bytes).
fn private_dir() -> Result<tempfile::TempDir, PrivateDaemonError> {
    const SOCKET_PATH_ROOM: usize = 100 - "/nixspace-nix-daemon-XXXXXX/socket".len();
    let base = std::env::temp_dir();
    let base = if base.as_os_str().len() <= SOCKET_PATH_ROOM {
        base
    } else {
        PathBuf::from("/tmp")
    };
    tempfile::Builder::new()
        .prefix("nixspace-nix-daemon-")
        .tempdir_in(&base)
        .map_err(|source| PrivateDaemonError::Directory { path: base, source })
}
