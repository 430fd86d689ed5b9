//! A nixspace on this machine for end-to-end tests: real `nixspace` processes,
//! a real dataspace over a unix socket, and the real Nix.
//!
//! Every process gets `NIX_CONF_DIR` pointing at a private nix.conf fit for
//! a root CI box (no build users, no sandbox, no substituters), so the tests
//! do not depend on the machine's Nix configuration. Children are killed when
//! the [`Space`] is dropped.

#![allow(dead_code)] // each test file uses a different part of the harness

pub mod dataspace;
pub mod proxy;
pub mod syndicate_server;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The `nixspace` binary under test.
pub fn nixspace_bin() -> &'static str {
    env!("CARGO_BIN_EXE_nixspace")
}

/// The repository root (for `examples/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A fresh string that makes a test's derivations unique in the shared store.
pub fn nonce() -> String {
    use rand::Rng;
    format!("{:016x}", rand::thread_rng().gen::<u64>())
}

/// What a finished command printed.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Debug for Finished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// A running dataspace with its workers.
pub struct Space {
    pub tmp: tempfile::TempDir,
    children: Vec<Child>,
    workers: Vec<(String, Child)>,
    up_args: Vec<String>,
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
    fn unstarted(up_args: &[&str]) -> Space {
        let tmp = tempfile::Builder::new()
            .prefix("nixspace-test-")
            .tempdir()
            .expect("tempdir");
        nixspace_test_support::write_nix_conf(&tmp.path().join("nix-conf")).expect("nix.conf");
        Space {
            tmp,
            children: Vec::new(),
            workers: Vec::new(),
            up_args: up_args.iter().map(|a| a.to_string()).collect(),
        }
    }

    /// Start `nixspace up` on this space's directory; stderr to `<log>.log`.
    fn spawn_up(&self, log: &str) -> Child {
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

    /// The process id of worker `id`.
    pub fn worker_pid(&self, id: &str) -> u32 {
        let (_, child) = self
            .workers
            .iter()
            .find(|(w, _)| w == id)
            .expect("no such worker");
        child.id()
    }

    /// A `nixspace` command with the test's Nix configuration.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(nixspace_bin());
        c.args(args)
            .env("NIX_CONF_DIR", self.tmp.path().join("nix-conf"))
            .env("NIXSPACE_STATE_DIR", self.tmp.path().join("state"))
            .env_remove("NIX_REMOTE")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null());
        c
    }

    fn log_file(&self, name: &str) -> std::fs::File {
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

/// Run a command to completion, killing it (and failing) after `limit`.
pub fn run(mut c: Command, limit: Duration) -> Finished {
    let child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    wait_output(child, limit)
}

/// A child started with piped stdout and stderr, both read as it runs (so it never blocks
/// on a full pipe) while the test does something else.
pub struct Running {
    child: Child,
    out: std::thread::JoinHandle<String>,
    err: std::thread::JoinHandle<String>,
}

impl Running {
    /// Start reading `child`'s stdout and stderr.
    pub fn new(mut child: Child) -> Running {
        let read = |mut pipe: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = pipe.read_to_string(&mut s);
                s
            })
        };
        let out = read(Box::new(child.stdout.take().expect("stdout")));
        let err = read(Box::new(child.stderr.take().expect("stderr")));
        Running { child, out, err }
    }

    /// Whether the child has exited.
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().expect("wait").is_some()
    }

    /// Wait for the child to exit, killing it (and failing) after `limit`.
    pub fn finish(mut self, limit: Duration) -> Finished {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "command did not finish within {limit:?}; stderr so far:\n{}",
                    self.err.join().unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Finished {
            status,
            stdout: self.out.join().unwrap_or_default(),
            stderr: self.err.join().unwrap_or_default(),
        }
    }
}

/// Wait for a child started with piped stdout and stderr, killing it (and
/// failing) after `limit`.
pub fn wait_output(child: Child, limit: Duration) -> Finished {
    Running::new(child).finish(limit)
}

/// A derivation whose builder sleeps (by absolute path: builders have no
/// PATH). Returns the file and strings that identify its processes: the
/// marker (in `nix-store`'s and `sh`'s command lines) and the sleep itself.
pub fn sleeper(space: &Space, seconds: u32) -> (PathBuf, Vec<String>) {
    let marker = format!("sleeper-{}", nonce());
    let file = space.sh_derivation(
        "sleeper.nix",
        &marker,
        &format!("echo started {marker}; /bin/sleep {seconds}; echo done > $out"),
    );
    (file, vec![marker, format!("/bin/sleep {seconds} ")])
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
        nixspace_test_support::write_nix_conf(&conf).expect("nix.conf");
        let mut text = nixspace_test_support::NIX_CONF.to_owned();
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

/// Command lines of the processes whose command line contains any of `needles`.
pub fn command_lines_with(needles: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if needles.iter().any(|n| cmdline.contains(n.as_str())) {
                found.push(cmdline);
            }
        }
    }
    found
}

/// The peak resident set size of process `pid` so far, in bytes (`VmHWM`).
pub fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in the process status");
    kib * 1024
}

/// A child process killed (SIGKILL) and reaped when the test ends, even by a panic.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Check that the builder runs logged in `runs` (one step name a line, appended by each
/// builder) are `expected` many, all of different steps.
pub fn assert_each_step_built_once(runs: &Path, expected: usize) {
    let log = std::fs::read_to_string(runs).expect("runs file");
    let mut names: Vec<&str> = log.lines().collect();
    assert_eq!(names.len(), expected, "builder runs:\n{log}");
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), expected, "a step was built twice:\n{log}");
}

/// A layered DAG of `layers` × `width` trivial steps plus one root; every
/// builder run appends the step's name to `runs` (outside the store), so the
/// test can count builder runs.
pub fn layered_dag(
    space: &Space,
    layers: usize,
    width: usize,
    runs: &std::path::Path,
) -> std::path::PathBuf {
    let text = format!(
        r#"
let
{step}  layer = n: prev: builtins.genList (i: step "l${{toString n}}-${{toString i}}" prev) {width};
  layers = builtins.foldl' (acc: n: acc ++ [ (layer n (if acc == [ ] then [ ] else builtins.elemAt acc (n - 1))) ]) [ ] (builtins.genList (n: n) {layers});
in step "root" (builtins.elemAt layers ({layers} - 1))
"#,
        step = counted_step_bindings(runs, ""),
    );
    space.nix_file("dag.nix", &text)
}

/// Nix bindings (for a `let`) of a fresh `nonce` and `step = name: deps: derivation …`: a
/// trivial step whose builder appends its name to `runs` (outside the store, so tests can
/// count builder runs), runs the shell code `extra` (which may use `${name}`), then writes
/// its output.
pub fn counted_step_bindings(runs: &Path, extra: &str) -> String {
    format!(
        r#"  nonce = "{nonce}";
  step = name: deps: derivation {{
    inherit name nonce deps;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "echo ${{name}} >> {runs}; {extra} echo ${{name}} > $out" ];
  }};
"#,
        nonce = nonce(),
        runs = runs.display(),
    )
}

/// Nix attributes that make a derivation floating content-addressed.
pub const CA_ATTRS: &str =
    r#"__contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256";"#;

/// A Nix `let` binding `step = PARAMS: derivation { … };` (PARAMS must include `name` and
/// `deps`): a fresh `nonce`, `/bin/sh` running `script` (Nix string text: it may use
/// `${name}`, `$deps` and `$out`), plus the Nix attributes `attrs`.
pub fn step_binding(params: &str, attrs: &str, script: &str) -> String {
    format!(
        r#"  step = {params}: derivation {{
    inherit name deps;
    nonce = "{nonce}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    {attrs}
    args = [ "-c" ''
      {script}
    '' ];
  }};
"#,
        nonce = nonce()
    )
}

/// Shell code for [`step_binding`]: append the step's name to `runs` (outside the store, so
/// tests count builder runs), then write the name and the input paths to `$out` (so the
/// output refers to its inputs).
pub fn counted_referring_script(runs: &Path) -> String {
    format!(
        "echo ${{name}} >> {}; echo ${{name}} $deps > $out",
        runs.display()
    )
}
