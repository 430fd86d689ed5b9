//! A private `nix-daemon` on this machine's store, for the benchmarks that compare with Nix
//! through a daemon socket.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::processes::{kill_group, spawn_error, wait_for_file, ProcessError};

/// A `nix-daemon` on this machine's store in its own process group, killed with its group
/// when dropped.
pub struct PrivateDaemon {
    child: Child,
    /// The socket it listens on.
    pub socket: PathBuf,
}

impl PrivateDaemon {
    /// Start `nix-daemon` on `<dir>/socket`. `NIX_REMOTE=local`: a daemon whose store
    /// resolves to "auto" could connect to its own socket.
    pub async fn start(dir: &Path) -> Result<PrivateDaemon, ProcessError> {
        std::fs::create_dir_all(dir).map_err(|source| ProcessError::Directory {
            path: dir.to_owned(),
            source,
        })?;
        let socket = dir.join("socket");
        let child = Command::new("nix-daemon")
            .env("NIX_REMOTE", "local")
            .env("NIX_DAEMON_SOCKET_PATH", &socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_error("nix-daemon".to_owned()))?;
        let daemon = PrivateDaemon { child, socket };
        wait_for_file(&daemon.socket, Duration::from_secs(15)).await?;
        Ok(daemon)
    }
}

impl Drop for PrivateDaemon {
    fn drop(&mut self) {
        kill_group(&self.child);
    }
}
