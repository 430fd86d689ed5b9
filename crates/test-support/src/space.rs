//! A nixspace on this machine for end-to-end tests: real `nixspace` processes,
//! a real dataspace over a unix socket, and the real Nix.
//!
//! Every process gets `NIX_CONF_DIR` pointing at a private nix.conf fit for
//! a root CI box (no build users, no sandbox, no substituters), so the tests
//! do not depend on the machine's Nix configuration. Children are killed when
//! the [`Space`] is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::process::{run, Finished};

/// The `nixspace` binary under test: `nixspace` beside the directory of the running test
/// program (`target/<profile>/deps/<test>` → `target/<profile>/nixspace`), where cargo builds
/// the package's binaries before running its integration tests.
pub fn nixspace_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let test = std::env::current_exe().expect("the test program's path");
        let profile = test
            .parent()
            .and_then(Path::parent)
            .expect("the test program runs from target/<profile>/deps");
        profile.join("nixspace")
    })
}

/// The repository root (for `examples/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A running dataspace with its workers.
pub struct Space {
    /// The directory everything of this space lives in (removed at the end).
    pub tmp: tempfile::TempDir,
    pub(crate) children: Vec<Child>,
    workers: Vec<(String, Child)>,
    pub(crate) up_args: Vec<String>,
}

impl Space {
    /// Start `nixspace up` in a fresh directory and wait for its route files.
    pub fn start() -> Space {
        Space::start_with(&[])
    }

    /// Like [`Space::start`], with extra arguments for `nixspace up`.
    pub fn start_with(up_args: &[&str]) -> Space {
        let mut space = Space::unstarted(up_args);
        let up = space.spawn_up("up");
        space.children.push(up);
        space.wait_for(&space.dir().join("worker.route"));
        space
    }

    /// A fresh directory with the test's Nix configuration; nothing runs yet.
    pub(crate) fn unstarted(up_args: &[&str]) -> Space {
        let tmp = tempfile::Builder::new()
            .prefix("nixspace-test-")
            .tempdir()
            .expect("tempdir");
        crate::write_nix_conf(&tmp.path().join("nix-conf")).expect("nix.conf");
        Space {
            tmp,
            children: Vec::new(),
            workers: Vec::new(),
            up_args: up_args.iter().map(|a| a.to_string()).collect(),
        }
    }

    /// Start `nixspace up` on this space's directory; stderr to `<log>.log`.
    pub(crate) fn spawn_up(&self, log: &str) -> Child {
        self.command(&["up"])
            .args(&self.up_args)
            .arg("--dir")
            .arg(self.dir())
            .stderr(Stdio::from(self.log_file(log)))
            .spawn()
            .expect("spawn nixspace up")
    }

    /// Start `nixspace up` again after [`Space::kill_up`]: same socket,
    /// keys (so the same route files) and state directory.
    pub fn restart_up(&mut self) {
        self.restart_up_logged("up-restarted");
    }

    /// Like [`Space::restart_up`], logging to `<log>.log`.
    pub fn restart_up_logged(&mut self, log: &str) {
        let up = self.spawn_up(log);
        self.children[0] = up;
        self.wait_for_log(log, "dataspace up", Duration::from_secs(20));
    }

    /// Kill `nixspace up` (SIGKILL): the dataspace vanishes.
    pub fn kill_up(&mut self) {
        let up = &mut self.children[0];
        up.kill().expect("kill nixspace up");
        up.wait().expect("reap nixspace up");
    }

    /// Whether `nixspace up` is still running.
    pub fn up_is_running(&mut self) -> bool {
        self.children[0].try_wait().expect("wait").is_none()
    }

    /// The runtime directory (socket, route files).
    pub fn dir(&self) -> PathBuf {
        self.tmp.path().join("run")
    }

    /// `route` written as `NAME.route` in the test's temporary directory, for a worker, with a
    /// copy of the shared worker's signing key beside it (`NAME.key`), as an operator gives
    /// both files to a worker host: what the worker builds is signed by a key the stores trust.
    pub fn worker_route_file(&self, name: &str, route: &nixspace_space::Route) -> PathBuf {
        let path = self.tmp.path().join(format!("{name}.route"));
        route.write(&path).expect("write route");
        std::fs::copy(
            nixspace_space::route::signing_key_beside(&self.dir().join("worker.route")),
            nixspace_space::route::signing_key_beside(&path),
        )
        .expect("copy the worker's signing key");
        path
    }

    /// The address (`host:port`) of `up`'s metrics endpoint, from its log (started with
    /// `--metrics 127.0.0.1:0`).
    pub fn metrics_address(&self) -> String {
        self.address_in_up_log("metrics on http://")
    }

    /// The address (`host:port`) of `up`'s web view, from its log (started with `--http
    /// 127.0.0.1:0`).
    pub fn web_address(&self) -> String {
        self.address_in_up_log("web view on http://")
    }

    /// The `host:port` that follows `marker` in `up`'s log, once it is there.
    fn address_in_up_log(&self, marker: &str) -> String {
        self.wait_for_log("up", marker, Duration::from_secs(20));
        let log = self.log("up");
        log.split(marker)
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_else(|| panic!("no {marker:?} in:\n{log}"))
            .to_owned()
    }

    /// A new, empty directory `name` in the test's temporary directory.
    pub fn scratch_dir(&self, name: &str) -> PathBuf {
        let dir = self.tmp.path().join(name);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        dir
    }

    /// The process id of `nixspace up`.
    pub fn up_pid(&self) -> u32 {
        self.children[0].id()
    }

    /// The process id of the process this space started last (e.g. the translator just
    /// started by [`Space::translator`]).
    pub fn newest_pid(&self) -> u32 {
        self.children.last().map_or(0, Child::id)
    }

    /// The process id of worker `id`.
    pub fn worker_pid(&self, id: &str) -> u32 {
        let (_, child) = self
            .workers
            .iter()
            .find(|(w, _)| w == id)
            .expect("no such worker");
        child.id()
    }

    /// A `nixspace` command with the test's Nix configuration, run in the test's own
    /// directory (so `nixspace build`'s `./result` links land there).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(nixspace_bin());
        c.args(args)
            .current_dir(self.tmp.path())
            .env("NIX_CONF_DIR", self.tmp.path().join("nix-conf"))
            .env("NIXSPACE_STATE_DIR", self.tmp.path().join("state"))
            .env_remove("NIX_REMOTE")
            .env(
                "RUST_LOG",
                std::env::var("NIXSPACE_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null());
        c
    }

    pub(crate) fn log_file(&self, name: &str) -> std::fs::File {
        std::fs::File::create(self.tmp.path().join(format!("{name}.log"))).expect("log file")
    }

    /// The log a background process wrote so far (without colour codes:
    /// logs are coloured even in files).
    pub fn log(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.tmp.path().join(format!("{name}.log")))
            .unwrap_or_default();
        nixspace_nix_tools::strip_ansi(&text)
    }

    /// Start a worker; its stderr goes to `<id>.log`.
    pub fn worker(&mut self, id: &str, extra: &[&str]) {
        self.worker_logged(id, id, extra);
    }

    /// Start a worker whose stderr goes to `<log>.log` (e.g. a restarted worker keeping the
    /// log of its previous life).
    pub fn worker_logged(&mut self, id: &str, log: &str, extra: &[&str]) {
        let child = self
            .command(&["worker", "--id", id, "--max-jobs", "2"])
            .args(extra)
            .arg("--dir")
            .arg(self.dir())
            .stderr(Stdio::from(self.log_file(log)))
            .spawn()
            .expect("spawn nixspace worker");
        self.workers.push((id.to_owned(), child));
        self.wait_for_log(log, "joined", Duration::from_secs(20));
    }

    /// Kill worker `id` (SIGKILL) and forget it: its connection drops mid-whatever.
    pub fn kill_worker(&mut self, id: &str) {
        let at = self
            .workers
            .iter()
            .position(|(w, _)| w == id)
            .expect("no such worker");
        let (_, mut child) = self.workers.remove(at);
        child.kill().expect("kill worker");
        child.wait().expect("reap worker");
    }

    /// Send `signal` to worker `id`.
    pub fn signal_worker(&mut self, id: &str, signal: rustix::process::Signal) {
        let (_, child) = self
            .workers
            .iter()
            .find(|(w, _)| w == id)
            .expect("no such worker");
        let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
        rustix::process::kill_process(pid, signal).expect("signal worker");
    }

    /// Wait for worker `id` to exit; its exit status.
    pub fn wait_worker(&mut self, id: &str, limit: Duration) -> ExitStatus {
        let (_, child) = self
            .workers
            .iter_mut()
            .find(|(w, _)| w == id)
            .expect("no such worker");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "worker {id} did not exit:\n{}",
                self.log(id)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Start `nixspace build` in the background; the test decides when it ends.
    pub fn spawn_build(&self, file: &Path) -> Child {
        self.spawn_build_with(file, &[])
    }

    /// Like [`Space::spawn_build`], with extra arguments for `nixspace build`.
    pub fn spawn_build_with(&self, file: &Path, args: &[&str]) -> Child {
        self.command(&["build", "--dir"])
            .arg(self.dir())
            .args(args)
            .arg(file)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nixspace build")
    }

    /// Wait until `name.log` contains `needle`.
    pub fn wait_for_log(&self, name: &str, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.log(name).contains(needle) {
            assert!(
                Instant::now() < deadline,
                "{name}.log never said {needle:?}:\n{}",
                self.log(name)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `nixspace status --json` of this space.
    pub fn status(&self) -> serde_json::Value {
        let mut c = self.command(&["status", "--json", "--dir"]);
        c.arg(self.dir());
        let out = run(c, Duration::from_secs(30));
        assert!(out.status.success(), "{out:?}");
        serde_json::from_str(&out.stdout).expect("status JSON")
    }

    /// Poll `nixspace status` until `done` holds for its report.
    pub fn wait_for_status(
        &self,
        what: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let report = self.status();
            if done(&report) {
                return report;
            }
            assert!(
                Instant::now() < deadline,
                "status never showed {what}: {report}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Write `file`: one derivation named `name` whose builder runs `script` with `/bin/sh`
    /// (no `"` in the script; builders have no PATH, so call programs by absolute path).
    pub fn sh_derivation(&self, file: &str, name: &str, script: &str) -> PathBuf {
        self.nix_file(
            file,
            &format!(
                r#"derivation {{
  name = "{name}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "{script}" ];
}}"#
            ),
        )
    }

    /// Write a Nix file into the test directory.
    pub fn nix_file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.tmp.path().join(name);
        std::fs::write(&path, text).expect("write nix file");
        path
    }

    /// Run `nixspace build` against this space, failing the test after `limit`.
    pub fn build(&self, file: &Path, limit: Duration) -> Finished {
        self.build_with(file, &[], limit)
    }

    /// Like [`Space::build`], with extra arguments for `nixspace build`.
    pub fn build_with(&self, file: &Path, args: &[&str], limit: Duration) -> Finished {
        let mut c = self.command(&["build", "--dir"]);
        c.arg(self.dir()).args(args).arg(file);
        run(c, limit)
    }

    fn wait_for(&self, path: &Path) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !path.exists() {
            assert!(
                Instant::now() < deadline,
                "{} did not appear; nixspace up said:\n{}",
                path.display(),
                self.log("up")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Space {
    fn drop(&mut self) {
        for (_, child) in &mut self.workers {
            let _ = child.kill();
            let _ = child.wait();
        }
        for child in self.children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Space {
    /// Start `nixspace translate` on `<tmp>/translator.sock` against this space (stderr to
    /// `translator.log`) and wait for its socket. Returns the socket path.
    pub fn translator(&mut self) -> PathBuf {
        self.translator_with("translator", "")
    }

    /// Start `nixspace translate` on `<tmp>/<name>.sock` (stderr to `<name>.log`) with the
    /// test's nix.conf plus `extra_conf` (e.g. `trusted-users = nobody`) as its own
    /// configuration. Returns the socket path.
    pub fn translator_with(&mut self, name: &str, extra_conf: &str) -> PathBuf {
        let socket = self.tmp.path().join(format!("{name}.sock"));
        let conf = self.tmp.path().join(format!("{name}-conf"));
        crate::write_nix_conf(&conf).expect("nix.conf");
        let mut text = crate::NIX_CONF.to_owned();
        text.push_str(extra_conf);
        std::fs::write(conf.join("nix.conf"), text).expect("nix.conf");
        let child = self
            .command(&["translate", "--socket"])
            .arg(&socket)
            .arg("--dir")
            .arg(self.dir())
            .env("NIX_CONF_DIR", &conf)
            .stderr(Stdio::from(self.log_file(name)))
            .spawn()
            .expect("spawn nixspace translate");
        self.children.push(child);
        self.wait_for(&socket);
        socket
    }

    /// `sh -c script` in a private mount namespace where `store/nix` is mounted on `/nix`: a
    /// Nix store of its own, as on another machine.
    pub fn in_other_store(&self, store: &Path, script: &str) -> Command {
        for sub in ["nix/store", "nix/var/nix/db"] {
            std::fs::create_dir_all(store.join(sub)).expect("store directories");
        }
        let mut c = self.nix("unshare", None);
        c.args(["--mount", "--propagation", "private", "/bin/sh", "-c"])
            .arg(format!(
                "mount --bind {}/nix /nix && NIX_REMOTE=local {script}",
                store.display()
            ));
        c
    }

    /// A Nix command (e.g. `nix-build`) with the test's Nix configuration, talking to the
    /// store at `NIX_REMOTE=remote` (`None`: the local store directly).
    pub fn nix(&self, program: &str, remote: Option<&Path>) -> Command {
        let mut c = Command::new(program);
        c.env("NIX_CONF_DIR", self.tmp.path().join("nix-conf"))
            .stdin(Stdio::null());
        match remote {
            Some(socket) => c.env("NIX_REMOTE", format!("unix://{}", socket.display())),
            None => c.env_remove("NIX_REMOTE"),
        };
        c
    }
}

/// The whole HTTP/1.1 response (status line, headers, body) to `GET path` from `addr`.
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").expect("send request");
    let mut response = String::new();
    s.read_to_string(&mut response).expect("read response");
    response
}
