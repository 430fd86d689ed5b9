//! A nixspace whose dataspace is a real, standalone `syndicate-server`
//! process (scale-out): `nixspace server-config` writes its configuration and
//! the route files, the server listens on 127.0.0.1, and `nixspace up
//! --external` runs the planner as one of its clients.

use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::{run, KillOnDrop};
use crate::space::Space;

/// How to install the server, for the message of a test that needs it.
pub const INSTALL: &str = "RUSTC_BOOTSTRAP=1 cargo install syndicate-server \
     --version =0.51.0-rc.4 --locked   (about 5 minutes; `./setup.sh deps` does it)";

/// The `syndicate-server` binary: on PATH, or in cargo's bin directory.
/// Panics, saying how to install it, when it is in neither.
pub fn binary() -> PathBuf {
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|c| c.join("bin"));
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(cargo_bin)
        .map(|dir| dir.join("syndicate-server"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!("syndicate-server is not installed (not on PATH nor in cargo's bin directory); install it with:\n  {INSTALL}")
        })
}

/// A [`Space`] on a syndicate-server. Fields drop in order: the space's
/// processes are killed first, the server last.
pub struct ExternalSpace {
    space: Space,
    server: Option<KillOnDrop>,
    port: u16,
}

impl Deref for ExternalSpace {
    type Target = Space;
    fn deref(&self) -> &Space {
        &self.space
    }
}

impl DerefMut for ExternalSpace {
    fn deref_mut(&mut self) -> &mut Space {
        &mut self.space
    }
}

impl ExternalSpace {
    /// Write the server's configuration with `nixspace server-config` (TCP on
    /// a free port of 127.0.0.1), start `syndicate-server` on it, then
    /// `nixspace up --external`, and wait until the planner has joined.
    pub fn start() -> ExternalSpace {
        ExternalSpace::start_with(&[])
    }

    /// Like [`ExternalSpace::start`], with extra arguments for `nixspace up --external`.
    pub fn start_with(up_args: &[&str]) -> ExternalSpace {
        ExternalSpace::start_on(Space::unstarted(&[&["--external"], up_args].concat()))
    }

    /// Like [`ExternalSpace::start`], with `up --translator <tmp>/translator.sock`
    /// (unmodified Nix clients build on the server's dataspace); returns that socket too.
    pub fn start_with_translator() -> (ExternalSpace, PathBuf) {
        let mut space = Space::unstarted(&["--external", "--translator"]);
        let socket = space.tmp.path().join("translator.sock");
        space.up_args.push(socket.display().to_string());
        (ExternalSpace::start_on(space), socket)
    }

    fn start_on(space: Space) -> ExternalSpace {
        let binary = binary();
        let port = free_port();
        let mut config = space.command(&["server-config", "--tcp"]);
        config
            .arg(format!("127.0.0.1:{port}"))
            .arg("--dir")
            .arg(space.dir());
        let written = run(config, Duration::from_secs(30));
        assert!(written.status.success(), "{written:?}");
        let mut external = ExternalSpace {
            space,
            server: None,
            port,
        };
        external.start_server(&binary, "syndicate-server");
        let up = external.space.spawn_up("up");
        external.space.children.push(up);
        external.wait_for_log(
            "up",
            "planner joined the external dataspace (connection 1)",
            Duration::from_secs(20),
        );
        external
    }

    /// Start the server on the written configuration (stderr to `<log>.log`)
    /// and wait until it accepts connections.
    fn start_server(&mut self, binary: &std::path::Path, log: &str) {
        let child = Command::new(binary)
            .arg("--no-banner")
            .arg("-c")
            .arg(self.dir().join("syndicate-server.pr"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(self.space.log_file(log)))
            .spawn()
            .expect("spawn syndicate-server");
        self.server = Some(KillOnDrop(child));
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "syndicate-server never listened on 127.0.0.1:{}:\n{}",
                self.port,
                self.log(log)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kill `nixspace up --external` (SIGKILL) and start it again (stderr to
    /// `up-restarted.log`); wait until the new planner has joined.
    pub fn restart_planner(&mut self) {
        self.kill_up();
        let up = self.space.spawn_up("up-restarted");
        self.space.children[0] = up;
        self.wait_for_log(
            "up-restarted",
            "planner joined the external dataspace (connection 1)",
            Duration::from_secs(20),
        );
    }

    /// Kill the server (SIGKILL): the dataspace and everything in it vanish.
    pub fn kill_server(&mut self) {
        self.server = None;
    }

    /// Start the server again after [`ExternalSpace::kill_server`], on the
    /// same port and keys; its log goes to `<log>.log`.
    pub fn restart_server(&mut self, log: &str) {
        self.start_server(&binary(), log);
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
