//! Helpers for tests against Debian's real Nix: a private config, `nix-daemon --stdio`
//! children in their own process group (killed on drop), and CLI wrappers.
#![allow(dead_code)]

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nixspace_nix_formats::store_path::{StoreDir, StorePath};
use nixspace_nix_protocol::{ClientSettings, DaemonClient};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// A private Nix configuration directory.
pub struct NixEnv {
    pub dir: tempfile::TempDir,
}

impl NixEnv {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        nixspace_test_support::write_nix_conf(dir.path()).unwrap();
        Self { dir }
    }

    pub fn conf_dir(&self) -> &Path {
        self.dir.path()
    }

    /// A Nix CLI command with the private config and the local store.
    pub fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        c.env("NIX_CONF_DIR", self.conf_dir())
            .env("NIX_REMOTE", "local")
            .stdin(Stdio::null());
        c
    }

    /// Runs a command and returns its trimmed stdout; panics on failure.
    pub fn run(&self, prog: &str, args: &[&str]) -> String {
        let out = self.cmd(prog).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{prog} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    pub fn run_bytes(&self, prog: &str, args: &[&str]) -> Vec<u8> {
        let out = self.cmd(prog).args(args).output().unwrap();
        assert!(out.status.success(), "{prog} {args:?} failed");
        out.stdout
    }

    /// Starts `nix-daemon --stdio` in its own process group.
    pub fn daemon(&self) -> Daemon {
        let mut c = tokio::process::Command::new("nix-daemon");
        c.arg("--stdio")
            .env("NIX_CONF_DIR", self.conf_dir())
            .env("NIX_REMOTE", "local")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        // Own process group, so Drop can kill the daemon and any builder it forked.
        c.as_std_mut().process_group(0);
        let child = c.spawn().unwrap();
        Daemon { child }
    }
}

/// A `nix-daemon --stdio` child; its whole process group is killed on drop.
pub struct Daemon {
    pub child: Child,
}

impl Daemon {
    pub async fn client(&mut self) -> DaemonClient<ChildStdout, ChildStdin> {
        DaemonClient::from_child(&mut self.child).await.unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .stderr(Stdio::null())
                .status();
        }
    }
}

pub use nixspace_test_support::unique;

/// Writes a small tree (file, executable, symlink, subdirectory) with unique contents.
pub fn make_tree(root: &Path, tag: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = root.join(tag);
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("a.txt"), format!("hello {tag}\n")).unwrap();
    std::fs::write(dir.join("sub/big"), vec![b'z'; 100_003]).unwrap();
    let exe = dir.join("run.sh");
    std::fs::write(&exe, "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("a.txt", dir.join("link")).unwrap();
    dir
}

/// Parses a full path in the default store (the one these tests' Nix uses).
pub fn store_path(s: &str) -> StorePath {
    StoreDir::default().parse(s).unwrap()
}

/// The full path of `p` in the default store, for the Nix CLI.
pub fn full(p: &StorePath) -> String {
    StoreDir::default().print(p)
}

pub fn settings() -> ClientSettings {
    ClientSettings::default()
}

/// A `nix-daemon` listening on a private socket, in its own process group (killed on drop).
pub struct SocketDaemon {
    pub socket: PathBuf,
    child: std::process::Child,
}

impl NixEnv {
    pub fn socket_daemon(&self) -> SocketDaemon {
        let socket = self.conf_dir().join("socket");
        let child = self
            .cmd("nix-daemon")
            .env("NIX_DAEMON_SOCKET_PATH", &socket)
            .process_group(0)
            .spawn()
            .unwrap();
        for _ in 0..200 {
            if socket.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        SocketDaemon { socket, child }
    }
}

impl Drop for SocketDaemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
    }
}
