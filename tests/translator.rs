//! End-to-end: unmodified Nix 2.8 clients (`nix-build`, `nix-store`, `nix-instantiate`)
//! through `nixspace translate` and `nixspace daemon` (also installed as a package's
//! `nix-daemon`, on a socket or on stdin and stdout): builds run on dataspace workers, store
//! operations on the upstream daemon.
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use nixspace_test_support::{command_lines_with, nonce, repo_root, run, sleeper, Space};

use crate::nixbuild::{built_by, CachedFixedOutput};

const LIMIT: Duration = Duration::from_secs(120);

fn demo_file(space: &Space) -> std::path::PathBuf {
    let demo = repo_root().join("examples/demo/default.nix");
    space.nix_file(
        "demo.nix",
        &format!("import {} {{ nonce = \"{}\"; }}", demo.display(), nonce()),
    )
}

/// Run `program args` with the test's Nix configuration against `remote` (`None`: the local
/// store directly); it must succeed. Its stdout.
fn stdout_of(space: &Space, remote: Option<&Path>, program: &str, args: &[&str]) -> String {
    let mut c = space.nix(program, remote);
    c.args(args);
    let out = run(c, LIMIT);
    assert!(out.status.success(), "{program} {args:?}: {out:?}");
    out.stdout
}

/// `program args` prints the same through the translator at `socket` as directly against
/// the local store; what it printed.
fn same_answer(space: &Space, socket: &Path, program: &str, args: &[&str]) -> String {
    let via = stdout_of(space, Some(socket), program, args);
    let direct = stdout_of(space, None, program, args);
    assert_eq!(via, direct, "{program} {args:?}");
    via
}

/// `nix-store -q --references` of the translator's answer equals the direct one.
fn references_agree(space: &Space, socket: &Path, path: &str) {
    same_answer(space, socket, "nix-store", &["-q", "--references", path]);
}

#[test]
fn nix_build_through_the_translator_builds_on_workers() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let socket = space.translator();
    let file = demo_file(&space);
    let result = space.tmp.path().join("result");

    let mut c = space.nix("nix-build", Some(&socket));
    c.arg(&file).arg("-o").arg(&result);
    let built = run(c, LIMIT);
    assert!(built.status.success(), "{built:?}");
    let out = built.stdout.trim();
    assert!(out.ends_with("-demo-top"), "{built:?}");
    let content = std::fs::read_to_string(&result).expect("result symlink resolves");
    assert_eq!(
        content,
        "demo-base\ndemo-left\ndemo-base\ndemo-right\ndemo-top\n"
    );
    // The builder's own output reached nix-build's stderr.
    assert!(built.stderr.contains("building demo-top"), "{built:?}");
    assert!(
        built.stderr.contains("on nixspace worker 'w1'"),
        "{built:?}"
    );
    // The worker built the four steps.
    let worker = space.log("w1");
    assert_eq!(worker.matches(" built ").count(), 4, "{worker}");

    // Store queries and evaluation agree with the local store.
    let mut q = space.nix("nix-store", None);
    q.args(["-q", "--deriver", out]);
    let deriver = run(q, LIMIT);
    assert!(deriver.status.success(), "{deriver:?}");
    references_agree(&space, &socket, deriver.stdout.trim());
    references_agree(&space, &socket, out);
    let mut via = space.nix("nix-instantiate", Some(&socket));
    via.arg(&file);
    let via = run(via, LIMIT);
    let mut direct = space.nix("nix-instantiate", None);
    direct.arg(&file);
    let direct = run(direct, LIMIT);
    assert!(via.status.success(), "{via:?}");
    assert_eq!(via.stdout, direct.stdout);
    assert_eq!(via.stdout.trim(), deriver.stdout.trim());

    // `nix build` (BuildPathsWithResults) learns the output path from the build result.
    let mut nb = space.nix("nix", Some(&socket));
    nb.args(["build", "--json", "--no-link", "-f"]).arg(&file);
    let nb = run(nb, LIMIT);
    assert!(nb.status.success(), "{nb:?}");
    assert!(nb.stdout.contains(&format!("\"out\":\"{out}\"")), "{nb:?}");
}

#[test]
fn a_failing_build_fails_the_client() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let socket = space.translator();
    let file = space.sh_derivation(
        "broken.nix",
        &format!("broken-{}", nonce()),
        "echo about to fail; exit 3",
    );
    let mut c = space.nix("nix-build", Some(&socket));
    c.arg(&file).arg("--no-out-link");
    let built = run(c, LIMIT);
    assert!(!built.status.success(), "{built:?}");
    assert!(built.stderr.contains("about to fail"), "{built:?}");
    assert!(
        built.stderr.contains("failed with exit code 3"),
        "{built:?}"
    );
}

#[test]
fn a_client_that_leaves_withdraws_its_demands() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let socket = space.translator();
    let seconds = 3000 + (rand::random::<u32>() % 1000);
    let (file, needles) = sleeper(&space, seconds);
    let mut c = space.nix("nix-build", Some(&socket));
    c.arg(&file)
        .arg("--no-out-link")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut client = c.spawn().expect("spawn nix-build");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while command_lines_with(&needles[1..]).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the build never started; translator said:\n{}",
            space.log("translator")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    client.kill().expect("kill nix-build");
    client.wait().expect("reap nix-build");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let left = command_lines_with(&needles);
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still running after the client left: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    space.wait_for_log("translator", "demands withdrawn", Duration::from_secs(5));
}

/// A raw client that has done the handshake at protocol 1.34.
fn handshaken(socket: &Path) -> UnixStream {
    Raw::connect(socket, 0x122).0
}

/// A raw worker-protocol client, for operations no Nix 2.8 command sends.
struct Raw(UnixStream);

impl Raw {
    /// Connect and shake hands at protocol `version` (1.21 ≤ version ≤ 1.34).
    fn connect(socket: &Path, version: u64) -> Raw {
        let (mut raw, _) = Raw::greet(socket, version);
        assert_eq!(raw.u64(), 0x616c_7473, "STDERR_LAST");
        raw
    }

    /// The handshake at `version` (1.21 ≤ version ≤ 1.37) up to its final stderr frame;
    /// the trust flag, if the version carries it.
    fn greet(socket: &Path, version: u64) -> (Raw, Option<u64>) {
        let mut s = UnixStream::connect(socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        s.write_all(&0x6e69_7863u64.to_le_bytes()).expect("magic");
        let mut raw = Raw(s);
        assert_eq!(raw.u64(), 0x6478_696f);
        raw.u64();
        for v in [version, 0, 0] {
            raw.put(v);
        }
        if version >= 0x121 {
            raw.string(); // the daemon's Nix version
        }
        let trust = (version >= 0x123).then(|| raw.u64());
        (raw, trust)
    }

    fn put(&mut self, v: u64) {
        self.0.write_all(&v.to_le_bytes()).expect("write");
    }

    fn put_str(&mut self, b: &[u8]) {
        self.put(b.len() as u64);
        self.0.write_all(b).expect("write");
        self.0
            .write_all(&[0u8; 8][..(8 - b.len() % 8) % 8])
            .expect("padding");
    }

    fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.0.read_exact(&mut b).expect("read u64");
        u64::from_le_bytes(b)
    }

    fn string(&mut self) -> String {
        let n = self.u64() as usize;
        let mut b = vec![0u8; n.div_ceil(8) * 8];
        self.0.read_exact(&mut b).expect("read string");
        b.truncate(n);
        String::from_utf8_lossy(&b).into_owned()
    }

    fn skip_u64s(&mut self, n: usize) {
        for _ in 0..n {
            self.u64();
        }
    }

    fn fields(&mut self) {
        for _ in 0..self.u64() {
            if self.u64() == 0 {
                self.u64();
            } else {
                self.string();
            }
        }
    }

    /// Skip log frames until `STDERR_LAST` (`Ok`) or `STDERR_ERROR` (`Err` with its
    /// message; protocol ≥ 1.26 layout).
    fn result(&mut self) -> Result<(), String> {
        loop {
            match self.u64() {
                0x616c_7473 => return Ok(()),
                0x6f6c_6d67 => drop(self.string()),
                0x5354_5254 => {
                    // id, level, type, text, fields, parent
                    self.skip_u64s(3);
                    self.string();
                    self.fields();
                    self.skip_u64s(1);
                }
                0x5354_4f50 => drop(self.u64()),
                0x5253_4c54 => {
                    // id, type, fields
                    self.skip_u64s(2);
                    self.fields();
                }
                0x6378_7470 => {
                    let (_, _, _, msg) = (self.string(), self.u64(), self.string(), self.string());
                    self.u64(); // no position
                    for _ in 0..self.u64() {
                        self.u64();
                        self.string();
                    }
                    return Err(msg);
                }
                other => panic!("unexpected stderr frame {other:#x}"),
            }
        }
    }
}

/// Read until the translator closes the connection; true if an error frame came first.
fn error_then_close(mut s: UnixStream) -> bool {
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    all.len() >= 8 && all[..8] == 0x6378_7470u64.to_le_bytes()
}

#[test]
fn bad_clients_are_dropped_and_others_keep_being_served() {
    let mut space = Space::start();
    let socket = space.translator();

    // Garbage instead of a handshake.
    let mut g = UnixStream::connect(&socket).expect("connect");
    g.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    g.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("garbage");
    let mut sink = Vec::new();
    let _ = g.read_to_end(&mut sink);

    // A truncated handshake: magic only, then hang up.
    let mut t = UnixStream::connect(&socket).expect("connect");
    t.write_all(&0x6e69_7863u64.to_le_bytes()).expect("magic");
    drop(t);

    // An unknown operation number: an error frame, then the connection closes.
    let mut u = handshaken(&socket);
    u.write_all(&999u64.to_le_bytes()).expect("op");
    assert!(error_then_close(u), "no error frame for op 999");

    // A huge length prefix: IsValidPath with a 2^63-byte path.
    let mut h = handshaken(&socket);
    h.write_all(&1u64.to_le_bytes()).expect("op");
    h.write_all(&(1u64 << 63).to_le_bytes()).expect("length");
    assert!(error_then_close(h), "no error frame for a huge length");

    // A well-behaved client still gets answers.
    let mut ok = space.nix("nix-store", Some(&socket));
    ok.args(["--add"])
        .arg(space.nix_file("hello.txt", &nonce()));
    let added = run(ok, LIMIT);
    assert!(added.status.success(), "{added:?}");
    assert!(added.stdout.trim().ends_with("-hello.txt"), "{added:?}");
    let log = space.log("translator");
    assert!(log.contains("connection closed"), "{log}");
}

#[test]
fn the_translator_never_takes_over_a_live_socket_or_a_file() {
    let space = Space::start();
    let live = space.dir().join("nixspace.sock");
    let mut c = space.command(&["translate", "--dir"]);
    c.arg(space.dir()).arg("--socket").arg(&live);
    let out = run(c, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        out.stderr.contains("is in use by a running process"),
        "{out:?}"
    );

    let file = space.tmp.path().join("precious");
    std::fs::write(&file, "keep me").expect("write");
    let mut c = space.command(&["translate", "--dir"]);
    c.arg(space.dir()).arg("--socket").arg(&file);
    let out = run(c, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("exists and is not a socket"), "{out:?}");
    assert_eq!(
        std::fs::read_to_string(&file).expect("still there"),
        "keep me"
    );
}

#[test]
fn the_socket_is_open_to_all_and_allowed_users_decide() {
    let mut space = Space::start();
    let open = space.translator();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&open).expect("socket").permissions(),
    );
    assert_eq!(mode & 0o777, 0o666);

    // root is neither allowed nor trusted here: refused with nix-daemon's words.
    let closed = space.translator_with(
        "closed",
        "allowed-users = nobody @nogroup\ntrusted-users = nobody\n",
    );
    let mut c = space.nix("nix-store", Some(&closed));
    c.arg("--add").arg(space.nix_file("refused.txt", &nonce()));
    let out = run(c, LIMIT);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        out.stderr
            .contains("user 'root' is not allowed to connect to the Nix daemon"),
        "{out:?}"
    );
    space.wait_for_log("closed", "refused connection", Duration::from_secs(5));
    // A client at protocol 1.35 also learns that it is not trusted (flag 2).
    let (mut raw, trust) = Raw::greet(&closed, 0x123);
    assert_eq!(trust, Some(2));
    assert_eq!(
        raw.result(),
        Err("user 'root' is not allowed to connect to the Nix daemon".to_owned())
    );
}

/// A path built in the local store (input-addressed, unsigned) and its `nix-store --export`.
fn unsigned_export(space: &Space) -> (String, Vec<u8>) {
    let file = space.sh_derivation(
        "unsigned.nix",
        &format!("unsigned-{}", nonce()),
        "echo unsigned > $out",
    );
    let mut b = space.nix("nix-build", None);
    b.arg(&file).arg("--no-out-link");
    let built = run(b, LIMIT);
    assert!(built.status.success(), "{built:?}");
    let path = built.stdout.trim().to_owned();
    let nar = export(space, None, &path);
    (path, nar)
}

/// `nix-store --export path` against `remote` (`None`: the local store directly).
fn export(space: &Space, remote: Option<&Path>, path: &str) -> Vec<u8> {
    let mut e = space.nix("nix-store", remote);
    e.args(["--export", path]);
    let out = e
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("nix-store --export");
    assert!(out.status.success(), "{out:?}");
    out.stdout
}

/// `nix-store --import` of `nar` through `socket` (`None`: into the local store directly; it
/// asks to skip signature checks), with a restricted and an unrestricted setting on the
/// command line.
fn import(space: &Space, socket: Option<&Path>, nar: &[u8]) -> nixspace_test_support::Finished {
    let mut c = space.nix("nix-store", socket);
    c.args(["--option", "sandbox", "false", "--option", "timeout", "600"])
        .arg("--import")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().expect("spawn nix-store --import");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(nar).expect("write the export");
    drop(stdin);
    nixspace_test_support::wait_output(child, LIMIT)
}

#[test]
fn untrusted_clients_cannot_skip_signature_checks() {
    let mut space = Space::start();
    let trusted = space.translator();
    let untrusted = space.translator_with("untrusted", "trusted-users = nobody\n");
    let (path, nar) = unsigned_export(&space);

    let refused = import(&space, Some(&untrusted), &nar);
    assert!(!refused.status.success(), "{refused:?}");
    assert!(
        refused
            .stderr
            .contains("because it lacks a valid signature"),
        "{refused:?}"
    );
    // Restricted settings of the client's nix.conf were withheld, with nix-daemon's warning.
    assert!(
        refused
            .stderr
            .contains("ignoring the client-specified setting 'sandbox'"),
        "{refused:?}"
    );
    assert!(!refused.stderr.contains("'timeout'"), "{refused:?}");

    let imported = import(&space, Some(&trusted), &nar);
    assert!(imported.status.success(), "{imported:?}");
    assert_eq!(imported.stdout.trim(), path);
    space.wait_for_log("untrusted", "accepted connection", Duration::from_secs(5));
    let log = space.log("untrusted");
    let accepted = log
        .lines()
        .find(|l| l.contains("accepted connection"))
        .unwrap_or_default();
    assert!(accepted.contains("false"), "{log}");
}

/// A fresh store path base name (a random nixbase32 hash part and `name`).
fn fake_base_name(name: &str) -> String {
    const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let hash: String = (0..32)
        .map(|_| ALPHABET[rand::random::<usize>() % ALPHABET.len()] as char)
        .collect();
    format!("{hash}-{name}")
}

/// Send `AddBuildLog` for `drv` (a base name) with `log` as its framed stream.
fn add_build_log(raw: &mut Raw, drv: &str, log: &str) {
    raw.put(45);
    raw.put_str(drv.as_bytes());
    raw.put(log.len() as u64);
    raw.0.write_all(log.as_bytes()).expect("log");
    raw.put(0);
}

#[test]
fn remaining_store_operations_are_proxied() {
    let mut space = Space::start();
    let socket = space.translator();
    let untrusted = space.translator_with("untrusted", "trusted-users = nobody\n");

    // Substitutable infos: there are no substituters here, so nothing is known.
    let mut raw = Raw::connect(&socket, 0x122);
    let missing = format!("/nix/store/{}", fake_base_name("missing"));
    raw.put(21);
    raw.put_str(missing.as_bytes());
    assert_eq!(raw.result(), Ok(()));
    assert_eq!(raw.u64(), 0);
    raw.put(30);
    raw.put(1);
    raw.put_str(missing.as_bytes());
    raw.put_str(b"");
    assert_eq!(raw.result(), Ok(()));
    assert_eq!(raw.u64(), 0);

    // A trusted client's build log lands in the store's log directory.
    let drv = fake_base_name("logged.drv");
    let log = format!("the log of {drv}\n");
    add_build_log(&mut raw, &drv, &log);
    assert_eq!(raw.result(), Ok(()));
    assert_eq!(raw.u64(), 1);
    let mut read = space.nix("nix-store", None);
    read.arg("--read-log").arg(format!("/nix/store/{drv}"));
    let read = run(read, LIMIT);
    assert!(read.status.success(), "{read:?}");
    assert_eq!(read.stdout, log);

    // An untrusted client's is refused; the connection goes on.
    let mut u = Raw::connect(&untrusted, 0x122);
    add_build_log(&mut u, &fake_base_name("refused.drv"), "nope\n");
    assert_eq!(
        u.result(),
        Err("you are not privileged to add logs".to_owned())
    );
    u.put(1);
    u.put_str(missing.as_bytes());
    assert_eq!(u.result(), Ok(()));
    assert_eq!(u.u64(), 0, "IsValidPath of a missing path");

    // CollectGarbage: `nix-store --delete` of a path added through the translator.
    let mut add = space.nix("nix-store", Some(&socket));
    add.arg("--add").arg(space.nix_file("doomed.txt", &nonce()));
    let added = run(add, LIMIT);
    assert!(added.status.success(), "{added:?}");
    let doomed = added.stdout.trim().to_owned();
    let mut del = space.nix("nix-store", Some(&socket));
    del.args(["--delete", &doomed]);
    let deleted = run(del, LIMIT);
    assert!(deleted.status.success(), "{deleted:?}");
    assert!(!Path::new(&doomed).exists(), "{deleted:?}");

    // Operations the translator does not model are named in the error.
    let mut x = Raw::connect(&socket, 0x122);
    x.put(24);
    assert_eq!(
        x.result(),
        Err("operation QueryFailedPaths (24) is not supported by nixspace".to_owned())
    );
}

#[test]
fn a_client_build_survives_a_restart_of_the_dataspace() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let socket = space.translator();
    let (file, _) = sleeper(&space, 2);
    let mut c = space.nix("nix-build", Some(&socket));
    c.arg(&file)
        .arg("--no-out-link")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let build = c.spawn().expect("spawn nix-build");
    space.wait_for_log("w1", "building", Duration::from_secs(30));
    space.kill_up();
    space.restart_up();
    let finished = nixspace_test_support::wait_output(build, LIMIT);
    assert!(finished.status.success(), "{finished:?}");
    assert_eq!(
        std::fs::read_to_string(finished.stdout.trim()).expect("output"),
        "done\n"
    );
    // It did lose the dataspace: the build was followed across the restart.
    space.wait_for_log(
        "translator",
        "lost the dataspace during a build",
        Duration::from_secs(5),
    );
}

#[test]
fn outputs_built_for_a_client_that_left_can_be_garbage_collected() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let socket = space.translator();
    let name = format!("collectable-{}", nonce());
    let file = space.sh_derivation("collectable.nix", &name, "echo collectable > $out");
    let mut c = space.nix("nix-build", Some(&socket));
    c.arg(&file).arg("--no-out-link");
    let built = run(c, LIMIT);
    assert!(built.status.success(), "{built:?}");
    let out = built.stdout.trim().to_owned();
    assert!(Path::new(&out).exists(), "{built:?}");
    // The client has gone; the translator and the worker run on. Nothing roots the output.
    let mut delete = space.nix("nix-store", Some(&socket));
    delete.args(["--delete", &out]);
    let deleted = run(delete, LIMIT);
    assert!(deleted.status.success(), "{deleted:?}");
    assert!(!Path::new(&out).exists(), "{deleted:?}");
}

#[test]
fn old_clients_add_to_the_store_in_the_pre_1_25_form() {
    let mut space = Space::start();
    let socket = space.translator();
    let contents = nonce();
    let file = space.nix_file("legacy.txt", &contents);
    let mut direct = space.nix("nix-store", None);
    direct.arg("--add").arg(&file);
    let direct = run(direct, LIMIT);
    assert!(direct.status.success(), "{direct:?}");

    // Protocol 1.24: name, fixed, recursive, hash algorithm, then the NAR unframed.
    let mut raw = Raw::connect(&socket, 0x118);
    raw.put(7);
    raw.put_str(b"legacy.txt");
    raw.put(1);
    raw.put(1);
    raw.put_str(b"sha256");
    for token in [
        b"nix-archive-1".as_slice(),
        b"(",
        b"type",
        b"regular",
        b"contents",
        contents.as_bytes(),
        b")",
    ] {
        raw.put_str(token);
    }
    assert_eq!(raw.result(), Ok(()));
    assert_eq!(raw.string(), direct.stdout.trim());
}

#[test]
fn ensure_path_of_a_missing_output_builds_it_on_workers() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let socket = space.translator();
    let file = space.sh_derivation(
        "ensured.nix",
        &format!("ensured-{}", nonce()),
        "echo ensured > $out",
    );
    let mut inst = space.nix("nix-instantiate", None);
    inst.arg(&file);
    let drv = run(inst, LIMIT);
    assert!(drv.status.success(), "{drv:?}");
    let mut outs = space.nix("nix-store", None);
    outs.args(["-q", "--outputs", drv.stdout.trim()]);
    let out = run(outs, LIMIT);
    assert!(out.status.success(), "{out:?}");
    let out = out.stdout.trim().to_owned();
    assert!(!Path::new(&out).exists());

    // `builtins.storePath` asks the daemon to EnsurePath the output.
    let mut eval = space.nix("nix-instantiate", Some(&socket));
    eval.args(["--eval", "--read-write-mode", "-E"])
        .arg(format!("builtins.readFile (builtins.storePath \"{out}\")"));
    let eval = run(eval, LIMIT);
    assert!(eval.status.success(), "{eval:?}");
    assert_eq!(eval.stdout.trim(), r#""ensured\n""#);
    let worker = space.log("w1");
    assert_eq!(worker.matches(" built ").count(), 1, "{worker}");
}

/// A directory for a daemon under test: the tests' `nix.conf`, the socket's place (its
/// directory does not exist yet: the daemon creates it, like nix-daemon), the daemon's log, and
/// a package whose `bin/nix-daemon` is a symlink to the nixspace binary.
struct DaemonDir {
    tmp: tempfile::TempDir,
    conf: std::path::PathBuf,
    socket: std::path::PathBuf,
}

impl DaemonDir {
    fn new() -> DaemonDir {
        let tmp = tempfile::Builder::new()
            .prefix("nixspace-daemon-test-")
            .tempdir()
            .expect("tempdir");
        let conf = tmp.path().join("nix-conf");
        nixspace_test_support::write_nix_conf(&conf).expect("nix.conf");
        let socket = tmp.path().join("daemon-socket/socket");
        DaemonDir { tmp, conf, socket }
    }

    /// `pkg/bin`, holding `nix-daemon` → the nixspace binary (as a package's daemon).
    fn package_bin(&self) -> std::path::PathBuf {
        let bin = self.tmp.path().join("pkg/bin");
        if !bin.exists() {
            std::fs::create_dir_all(&bin).expect("pkg/bin");
            std::os::unix::fs::symlink(
                nixspace_test_support::nixspace_bin(),
                bin.join("nix-daemon"),
            )
            .expect("symlink");
        }
        bin
    }

    /// `PATH` with the package's `bin` first, as Nix's tests run its daemon.
    fn package_first_on_path(&self) -> std::ffi::OsString {
        let rest = std::env::var_os("PATH").unwrap_or_default();
        std::env::join_paths(
            std::iter::once(self.package_bin()).chain(std::env::split_paths(&rest)),
        )
        .expect("PATH")
    }

    /// `daemon` with the test's Nix configuration and socket, logging to `daemon.log`.
    fn daemon(&self, mut daemon: std::process::Command) -> std::process::Command {
        let log = std::fs::File::create(self.tmp.path().join("daemon.log")).expect("log");
        daemon
            .env("NIX_CONF_DIR", &self.conf)
            .env("NIX_DAEMON_SOCKET_PATH", &self.socket)
            .env("NIX_REMOTE", "daemon")
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log);
        daemon
    }

    /// Start `daemon` (see [`DaemonDir::daemon`]) and wait for its socket.
    fn start(&self, daemon: std::process::Command) -> RunningDaemon<'_> {
        let child = self.daemon(daemon).spawn().expect("spawn the daemon");
        let daemon = RunningDaemon {
            dir: self,
            child: nixspace_test_support::KillOnDrop(child),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !self.socket.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "no socket: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        daemon
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.tmp.path().join("daemon.log")).unwrap_or_default()
    }

    /// A Nix client of the daemon's socket (`local`: of the local store directly).
    fn nix(&self, program: &str, local: bool) -> std::process::Command {
        let mut c = std::process::Command::new(program);
        c.env("NIX_CONF_DIR", &self.conf)
            .env("NIX_REMOTE", if local { "local" } else { "daemon" })
            .env("NIX_DAEMON_SOCKET_PATH", &self.socket)
            .stdin(std::process::Stdio::null());
        c
    }

    /// Run `program args` on the local store directly; it must succeed. Its stdout, trimmed.
    fn local(&self, program: &str, args: &[&std::ffi::OsStr]) -> String {
        let mut c = self.nix(program, true);
        c.args(args);
        let out = run(c, LIMIT);
        assert!(out.status.success(), "{program} {args:?}: {out:?}");
        out.stdout.trim().to_owned()
    }

    /// The package's `nix-daemon --stdio`, found on PATH, its stdin and stdout piped, with
    /// its default log level (no `RUST_LOG`).
    fn stdio_daemon(&self) -> tokio::process::Command {
        let mut daemon =
            tokio::process::Command::from(self.daemon(std::process::Command::new("nix-daemon")));
        daemon
            .arg("--stdio")
            .env_remove("RUST_LOG")
            .env("PATH", self.package_first_on_path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true);
        daemon
    }

    /// The package's `nix-daemon --stdio` started with `RUST_LOG` set to `log` (its quiet
    /// default when `None`), and a client that shook hands with it.
    async fn stdio_client(
        &self,
        log: Option<&str>,
    ) -> (
        tokio::process::Child,
        nixspace_nix_protocol::DaemonClient<
            tokio::process::ChildStdout,
            tokio::process::ChildStdin,
        >,
    ) {
        let mut daemon = self.stdio_daemon();
        if let Some(log) = log {
            daemon.env("RUST_LOG", log);
        }
        let mut child = daemon.spawn().expect("spawn nix-daemon --stdio");
        let client = nixspace_nix_protocol::DaemonClient::from_child(&mut child)
            .await
            .unwrap_or_else(|e| panic!("handshake: {e}\n{}", self.log()));
        (child, client)
    }

    /// The demo with a fresh nonce (so it is built anew).
    fn demo_file(&self) -> std::path::PathBuf {
        let demo = repo_root().join("examples/demo/default.nix");
        let file = self.tmp.path().join("demo.nix");
        std::fs::write(
            &file,
            format!("import {} {{ nonce = \"{}\"; }}", demo.display(), nonce()),
        )
        .expect("demo.nix");
        file
    }
}

/// A daemon serving a [`DaemonDir`]'s socket, killed when dropped.
struct RunningDaemon<'a> {
    dir: &'a DaemonDir,
    child: nixspace_test_support::KillOnDrop,
}

impl RunningDaemon<'_> {
    /// `nix-build` the demo through the socket, on the daemon's worker; its output path.
    fn builds_the_demo(&self) -> String {
        let mut build = self.dir.nix("nix-build", false);
        build.arg(self.dir.demo_file()).arg("--no-out-link");
        let built = run(build, LIMIT);
        assert!(built.status.success(), "{built:?}\n{}", self.dir.log());
        assert!(built.stdout.trim().ends_with("-demo-top"), "{built:?}");
        assert!(built.stderr.contains("on nixspace worker"), "{built:?}");
        built.stdout.trim().to_owned()
    }

    /// SIGTERM: the daemon exits with status 0 and removes its socket.
    fn terminate(mut self) {
        let pid = rustix::process::Pid::from_raw(self.child.0.id() as i32).expect("pid");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = self.child.0.try_wait().expect("wait") {
                break s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the daemon did not exit: {}",
                self.dir.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(status.code(), Some(0), "{}", self.dir.log());
        assert!(!self.dir.socket.exists(), "the socket was left behind");
    }
}

#[test]
fn nixspace_daemon_is_a_drop_in_nix_daemon() {
    let dir = DaemonDir::new();
    let mut daemon = std::process::Command::new(nixspace_test_support::nixspace_bin());
    daemon.arg("daemon");
    let daemon = dir.start(daemon);
    let mut version = std::process::Command::new(nixspace_test_support::nixspace_bin());
    version.args(["daemon", "--version"]);
    let version = run(version, LIMIT);
    assert!(version.status.success(), "{version:?}");
    assert!(
        version.stdout.contains(env!("CARGO_PKG_VERSION")),
        "{version:?}"
    );
    daemon.builds_the_demo();
    daemon.terminate();
}

#[test]
fn the_daemon_builds_what_needs_a_system_feature_its_nix_has() {
    let dir = DaemonDir::new();
    let feature = format!("feature-{}", nonce());
    let conf = dir.conf.join("nix.conf");
    let mut text = std::fs::read_to_string(&conf).expect("nix.conf");
    text.push_str(&format!("system-features = {feature}\n"));
    std::fs::write(&conf, text).expect("nix.conf");
    let file = dir.tmp.path().join("featured.nix");
    std::fs::write(
        &file,
        format!(
            r#"derivation {{
  name = "featured-{feature}"; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ "-c" "echo {feature} > $out" ]; requiredSystemFeatures = [ "{feature}" ];
}}"#
        ),
    )
    .expect("featured.nix");
    let mut daemon = std::process::Command::new(nixspace_test_support::nixspace_bin());
    daemon.arg("daemon");
    let daemon = dir.start(daemon);
    let mut build = dir.nix("nix-build", false);
    build.arg(&file).arg("--no-out-link");
    let built = run(build, LIMIT);
    assert!(built.status.success(), "{built:?}\n{}", dir.log());
    assert!(built.stderr.contains("on nixspace worker"), "{built:?}");
    daemon.terminate();
}

#[test]
fn the_nixspace_binary_installed_as_nix_daemon_is_started_as_nix_daemon() {
    let dir = DaemonDir::new();
    // As Nix's tests start the package's daemon: found on PATH, no arguments.
    let mut daemon = std::process::Command::new("nix-daemon");
    daemon.env("PATH", dir.package_first_on_path());
    let daemon = dir.start(daemon);
    let out = daemon.builds_the_demo();
    let references = |local| {
        let mut q = dir.nix("nix-store", local);
        q.args(["-q", "--references", &out]);
        let answer = run(q, LIMIT);
        assert!(answer.status.success(), "{answer:?}\n{}", dir.log());
        answer.stdout
    };
    assert_eq!(references(false), references(true));
    daemon.terminate();
}

/// What a client of `nix-daemon --stdio` is told, as one text.
#[derive(Default)]
struct LogText(String);

impl nixspace_nix_protocol::LogSink for LogText {
    fn log(&mut self, event: nixspace_nix_protocol::LogEvent) {
        self.0.push_str(&format!("{event:?}\n"));
    }
}

#[test]
fn nix_daemon_stdio_serves_one_client_on_stdin_and_stdout() {
    use nixspace_nix_protocol::{BuildMode, DerivedPath, OutputSpec};
    let dir = DaemonDir::new();
    let drv = dir.local("nix-instantiate", &[dir.demo_file().as_os_str()]);
    let out = dir.local(
        "nix-store",
        &["-q".as_ref(), "--outputs".as_ref(), drv.as_ref()],
    );
    let store = nixspace_nix_formats::store_path::StoreDir::default();
    let (drv, out) = (
        store.parse(&drv).expect("drv"),
        store.parse(&out).expect("out"),
    );
    let absent = store
        .parse("/nix/store/00000000000000000000000000000000-nixspace-absent")
        .expect("absent");
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let status = runtime.block_on(async {
        let (mut child, mut client) = dir.stdio_client(None).await;
        assert!(client.is_valid_path(&drv).await.expect("IsValidPath"));
        assert!(!client.is_valid_path(&absent).await.expect("IsValidPath"));
        assert!(!client.is_valid_path(&out).await.expect("IsValidPath"));
        let mut logs = LogText::default();
        let wanted = [DerivedPath::Built {
            drv_path: drv.clone(),
            outputs: OutputSpec::All,
        }];
        client
            .build_paths(&wanted, BuildMode::Normal, &mut logs)
            .await
            .unwrap_or_else(|e| panic!("BuildPaths: {e}\n{}", dir.log()));
        assert!(logs.0.contains("nixspace worker"), "{}", logs.0);
        assert!(client.is_valid_path(&out).await.expect("IsValidPath"));
        // The client leaves (its end of stdin closes): the daemon exits.
        drop(client);
        tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .unwrap_or_else(|_| panic!("nix-daemon --stdio did not exit: {}", dir.log()))
            .expect("wait")
    });
    assert_eq!(status.code(), Some(0), "{}", dir.log());
    // Like nix-daemon --stdio, it says nothing on stderr when nothing is wrong (an ssh-ng
    // client shows that stderr to its user); the worker joining and the translator starting
    // are in its log only at info level.
    assert_eq!(dir.log(), "", "stderr of a quiet session");
}

#[test]
fn a_stdio_client_that_leaves_during_a_build_ends_its_daemon_and_the_build() {
    use nixspace_nix_protocol::{BuildMode, DerivedPath, OutputSpec};
    let dir = DaemonDir::new();
    // The builder's shell stays (it has a command after the sleep), its command line marked.
    let marker = nixspace_test_support::unique("stdio-leaves");
    let file = dir.tmp.path().join("slow.nix");
    std::fs::write(
        &file,
        format!(
            "derivation {{ name = \"{marker}\"; system = builtins.currentSystem; \
             builder = \"/bin/sh\"; args = [ \"-c\" \"/bin/sleep 120; echo {marker} > $out\" ]; }}"
        ),
    )
    .expect("slow.nix");
    let drv = dir.local("nix-instantiate", &[file.as_os_str()]);
    let drv = nixspace_nix_formats::store_path::StoreDir::default()
        .parse(&drv)
        .expect("drv");
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async {
        let (mut child, mut client) = dir.stdio_client(Some("info")).await;
        let wanted = [DerivedPath::Built {
            drv_path: drv,
            outputs: OutputSpec::All,
        }];
        let mut logs = nixspace_nix_protocol::stderr::DiscardLogs;
        let build = client.build_paths(&wanted, BuildMode::Normal, &mut logs);
        // Leave once the builder runs.
        let running = async {
            while nixspace_test_support::command_lines_with(&[format!("sleep 120; echo {marker}")])
                .is_empty()
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::select! {
            r = build => panic!("the build ended first: {r:?}\n{}", dir.log()),
            () = running => {}
            () = tokio::time::sleep(LIMIT) => panic!("the builder never ran: {}", dir.log()),
        }
        drop(client);
        tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .unwrap_or_else(|_| panic!("nix-daemon --stdio did not exit: {}", dir.log()))
            .expect("wait");
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !nixspace_test_support::command_lines_with(&[format!("sleep 120; echo {marker}")])
        .is_empty()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the builder outlived its client: {}",
            dir.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        dir.log().contains("client left during a build"),
        "{}",
        dir.log()
    );
}

#[test]
fn an_ssh_ng_store_runs_nix_daemon_stdio_on_the_remote_side() {
    let dir = DaemonDir::new();
    let fake_ssh =
        nixspace_test_support::fake_ssh(&dir.tmp.path().join("fake-ssh")).expect("fake ssh");
    let path = std::env::join_paths(
        std::iter::once(fake_ssh).chain(std::env::split_paths(&dir.package_first_on_path())),
    )
    .expect("PATH");
    // The remote side runs `nix-daemon --stdio`, found on its PATH: the package's.
    let mut build = dir.nix("nix", true);
    build
        .args([
            "build",
            "--json",
            "--no-link",
            "--store",
            "ssh-ng://nixspace-test",
            "-f",
        ])
        .arg(dir.demo_file())
        .env("PATH", path)
        .env("RUST_LOG", "warn");
    let built = run(build, LIMIT);
    assert!(built.status.success(), "{built:?}");
    assert!(built.stdout.contains("-demo-top"), "{built:?}");
    assert!(built.stderr.contains("on nixspace worker"), "{built:?}");
}

#[test]
fn nix_daemon_never_starts_itself_as_the_real_nix_daemon() {
    let dir = DaemonDir::new();
    let bin = dir.package_bin();
    let nix_daemon = |path: &std::ffi::OsStr, args: &[&str]| {
        let mut c = dir.daemon(std::process::Command::new(bin.join("nix-daemon")));
        c.args(args).env("PATH", path);
        run(c, LIMIT)
    };
    // Only nixspace's nix-daemon on PATH: serving, --stdio and --version fail, saying why.
    for args in [&[][..], &["--stdio"], &["--version"]] {
        let refused = nix_daemon(bin.as_os_str(), args);
        assert_eq!(refused.status.code(), Some(1), "{args:?}: {refused:?}");
        let why = format!(
            "no `nix-daemon` on PATH={} other than this program",
            bin.display()
        );
        assert!(refused.stderr.contains(&why), "{args:?}: {refused:?}");
    }
    assert!(!dir.socket.exists());
    // The positive control: with the real one after it, --version is the real one's.
    let mut real = std::process::Command::new("nix-daemon");
    real.arg("--version");
    let real = run(real, LIMIT);
    assert!(real.status.success(), "{real:?}");
    let ours = nix_daemon(&dir.package_first_on_path(), &["--version"]);
    assert!(ours.status.success(), "{ours:?}");
    assert_eq!(ours.stdout, real.stdout);
    assert!(ours.stdout.starts_with("nix-daemon (Nix) "), "{ours:?}");
    // Anything else is refused as Nix refuses it.
    let refused = nix_daemon(&dir.package_first_on_path(), &["--bogus"]);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(
        refused
            .stderr
            .contains("error: unrecognised flag '--bogus'"),
        "{refused:?}"
    );
}

#[test]
fn up_can_serve_a_translator_in_process() {
    let socket_dir = tempfile::tempdir().expect("tempdir");
    let socket = socket_dir.path().join("up-translator.sock");
    let mut space = Space::start_with(&["--translator", socket.to_str().expect("utf-8")]);
    space.worker("w1", &[]);
    space.wait_for_log("up", "translating on", Duration::from_secs(20));
    let file = demo_file(&space);
    let mut c = space.nix("nix-build", Some(&socket));
    c.arg(&file).arg("--no-out-link");
    let built = run(c, LIMIT);
    assert!(built.status.success(), "{built:?}\n{}", space.log("up"));
    assert!(built.stdout.trim().ends_with("-demo-top"), "{built:?}");
    assert!(
        built.stderr.contains("on nixspace worker 'w1'"),
        "{built:?}"
    );
}

#[test]
fn eight_concurrent_clients_share_their_common_steps() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    space.worker("w2", &[]);
    let socket = space.translator();
    let runs = space.tmp.path().join("runs");
    // Client i builds top-i ← [own-i, pair-(i/2), shared-2 ← shared-1 ← shared-0]: the shared
    // chain is common to all eight, each pair step to two. Every builder run appends the
    // step's name to `runs` (outside the store); shared-0 takes a second, so that every
    // client wants it while it is being built.
    let step = nixspace_test_support::counted_step_bindings(
        &runs,
        "if [ ${name} = shared-0 ]; then /bin/sleep 1; fi;",
    );
    let file = space.nix_file(
        "overlap.nix",
        &format!(
            r#"{{ i }}:
let
{step}  shared0 = step "shared-0" [ ];
  shared1 = step "shared-1" [ shared0 ];
  shared2 = step "shared-2" [ shared1 ];
  pair = step "pair-${{toString (i / 2)}}" [ shared2 ];
  own = step "own-${{toString i}}" [ ];
in step "top-${{toString i}}" [ own pair shared2 ]
"#
        ),
    );
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let mut c = space.nix("nix-build", Some(&socket));
            c.arg(&file)
                .args(["--arg", "i", &i.to_string(), "--no-out-link"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            c.spawn().expect("spawn nix-build")
        })
        .collect();
    for (i, client) in clients.into_iter().enumerate() {
        let built = nixspace_test_support::wait_output(client, LIMIT);
        assert!(built.status.success(), "client {i}: {built:?}");
        assert!(
            built.stdout.trim().ends_with(&format!("-top-{i}")),
            "client {i}: {built:?}"
        );
    }
    // 3 shared + 4 pairs + 8 own + 8 tops.
    nixspace_test_support::assert_each_step_built_once(&runs, 23);
}

/// A plain `nix-daemon` on its own socket, in its own process group (killed with the group
/// when dropped), on the local store.
pub(crate) struct PlainDaemon {
    child: std::process::Child,
    pub(crate) socket: std::path::PathBuf,
}

impl PlainDaemon {
    pub(crate) fn start(space: &Space) -> PlainDaemon {
        use std::os::unix::process::CommandExt;
        let socket = space.tmp.path().join("plain-daemon/socket");
        std::fs::create_dir_all(socket.parent().expect("parent")).expect("socket dir");
        // NIX_REMOTE=local: a daemon whose store is "auto" can connect to itself.
        let child = std::process::Command::new("nix-daemon")
            .env("NIX_CONF_DIR", space.tmp.path().join("nix-conf"))
            .env("NIX_REMOTE", "local")
            .env("NIX_DAEMON_SOCKET_PATH", &socket)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .expect("spawn nix-daemon");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "nix-daemon never listened"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        PlainDaemon { child, socket }
    }
}

impl Drop for PlainDaemon {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
        let _ = self.child.wait();
    }
}

/// `line` with every quoted store path replaced by `PATH`.
fn without_store_paths(line: &str) -> String {
    line.split('\'')
        .enumerate()
        .map(|(i, part)| {
            if i % 2 == 1 && part.starts_with("/nix/store/") {
                "PATH"
            } else {
                part
            }
        })
        .collect::<Vec<_>>()
        .join("'")
}

/// The lines of a client's stderr that say why it failed.
fn error_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.trim_start().starts_with("error:"))
        .collect()
}

#[test]
fn a_failing_build_exits_as_it_does_against_nix_daemon() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let socket = space.translator();
    let plain = PlainDaemon::start(&space);
    // Two identical derivations but for their names, so that neither run sees the other's
    // failure.
    let broken = |which: &str| {
        space.sh_derivation(
            &format!("broken-{which}.nix"),
            &format!("broken-{which}-{}", nonce()),
            "echo about to fail; exit 3",
        )
    };
    let (direct_file, via_file) = (broken("direct"), broken("via"));
    // nix-build sends BuildPaths, `nix build` BuildPathsWithResults.
    for args in [
        &["nix-build", "--no-out-link"][..],
        &["nix", "build", "--no-link", "-f"],
    ] {
        let build = |remote: &Path, file: &Path| {
            let mut c = space.nix(args[0], Some(remote));
            c.args(&args[1..]).arg(file);
            run(c, LIMIT)
        };
        let direct = build(&plain.socket, &direct_file);
        let via = build(&socket, &via_file);
        assert!(!direct.status.success(), "{direct:?}");
        assert_eq!(
            via.status.code(),
            direct.status.code(),
            "{via:?}\n{direct:?}"
        );
        let (direct_errors, via_errors) = (error_lines(&direct.stderr), error_lines(&via.stderr));
        assert!(!direct_errors.is_empty(), "{direct:?}");
        // The same key line but for the derivation.
        assert_eq!(
            without_store_paths(via_errors[0]),
            without_store_paths(direct_errors[0]),
            "\n{via:?}\n{direct:?}"
        );
        assert!(via.stderr.contains("about to fail"), "{via:?}");
    }
}

/// A chain `top ← base` of trivial derivations (fresh names) whose builders print a line
/// with `marker` each; top's output refers to base's.
fn chain_file(space: &Space, file: &str, marker: &str) -> std::path::PathBuf {
    space.nix_file(
        file,
        &format!(
            r#"let
  step = name: deps: derivation {{
    inherit name deps;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "echo {marker} says ${{name}}; echo ${{name}} $deps > $out" ];
  }};
in step "top-{nonce}" [ (step "base-{nonce}" [ ]) ]
"#,
            nonce = nonce()
        ),
    )
}

/// The fields of `nix path-info --json` that must agree between two stores' answers.
fn path_info_essentials(json: &str) -> Vec<serde_json::Value> {
    let infos: serde_json::Value = serde_json::from_str(json).expect("path-info JSON");
    infos
        .as_array()
        .expect("a list of path infos")
        .iter()
        .map(|i| serde_json::json!([i["path"], i["narHash"], i["narSize"], i["references"]]))
        .collect()
}

#[test]
fn store_operations_answer_as_the_local_store_does() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let socket = space.translator();
    let file = chain_file(&space, "parity.nix", "parity");
    let file = file.to_str().expect("utf-8 path");

    let drv = same_answer(&space, &socket, "nix-instantiate", &[file]);
    let drv = drv.trim();
    // Built by the worker through the translator, then already valid locally.
    let out = same_answer(&space, &socket, "nix-store", &["--realise", drv]);
    let out = out.trim();
    assert!(out.contains("-top-"), "{out}");
    let worker = space.log("w1");
    assert_eq!(worker.matches(" built ").count(), 2, "{worker}");
    let base = stdout_of(&space, None, "nix-store", &["-q", "--references", out]);
    let base = base.trim();
    assert!(base.contains("-base-"), "{base}");
    for path in [drv, out, base] {
        for query in ["--references", "--referrers"] {
            same_answer(&space, &socket, "nix-store", &["-q", query, path]);
        }
    }
    let referrers = stdout_of(
        &space,
        Some(&socket),
        "nix-store",
        &["-q", "--referrers", base],
    );
    assert_eq!(referrers.trim(), out);

    let (via, direct) = (
        stdout_of(
            &space,
            Some(&socket),
            "nix",
            &["path-info", "--json", out, base],
        ),
        stdout_of(&space, None, "nix", &["path-info", "--json", out, base]),
    );
    assert_eq!(path_info_essentials(&via), path_info_essentials(&direct));

    let built = same_answer(
        &space,
        &socket,
        "nix",
        &["build", "--json", "--no-link", "-f", file],
    );
    let built: serde_json::Value = serde_json::from_str(&built).expect("nix build JSON");
    assert_eq!(built[0]["outputs"]["out"], out, "{built}");

    let added = space.nix_file("parity.txt", &nonce());
    let added = same_answer(
        &space,
        &socket,
        "nix-store",
        &["--add", added.to_str().expect("utf-8")],
    );
    assert!(added.trim().ends_with("-parity.txt"), "{added}");

    // Exports agree byte for byte; an export of the local store imports through the
    // translator as the same path.
    let nar = export(&space, None, out);
    assert!(
        export(&space, Some(&socket), out) == nar,
        "the exports differ"
    );
    let (via, direct) = (
        import(&space, Some(&socket), &nar),
        import(&space, None, &nar),
    );
    assert!(via.status.success(), "{via:?}");
    assert!(direct.status.success(), "{direct:?}");
    assert_eq!(via.stdout.trim(), out);
    assert_eq!(via.stdout, direct.stdout);
}

/// The `@nix` JSON events of a client's stderr (`--log-format internal-json`).
fn internal_json(stderr: &str) -> Vec<serde_json::Value> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("@nix "))
        .map(|l| serde_json::from_str(l).expect("internal-json event"))
        .collect()
}

/// The builder lines of `drv` in internal-json `events`: the text of each buildLogLine
/// result (101) of a build activity (105) started for `drv`, leaving out Nix's own warnings
/// that its database was busy (they come among the lines of whichever build is under way
/// while a concurrent test holds the database).
fn build_log_lines(events: &[serde_json::Value], drv: &str) -> Vec<String> {
    let ids: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["action"] == "start" && e["type"] == 105 && e["fields"][0] == drv)
        .map(|e| &e["id"])
        .collect();
    events
        .iter()
        .filter(|e| e["action"] == "result" && e["type"] == 101 && ids.contains(&&e["id"]))
        .map(|e| e["fields"][0].as_str().unwrap_or_default().to_owned())
        .filter(|l| {
            !(l.starts_with("warning: ") && l.contains("SQLite database") && l.contains("is busy"))
        })
        .collect()
}

#[test]
fn nix_build_shows_the_builders_output_as_nix_daemon_does() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let socket = space.translator();
    let plain = PlainDaemon::start(&space);
    // Fresh derivations per build: each must really run its builder.
    let build = |remote: &Path, args: &[&str]| {
        let file = chain_file(&space, &format!("progress-{}.nix", nonce()), "progress");
        let mut i = space.nix("nix-instantiate", None);
        i.arg(&file);
        let drv = run(i, LIMIT).stdout.trim().to_owned();
        let mut c = space.nix("nix", Some(remote));
        c.args(["build", "--no-link"])
            .args(args)
            .arg("-f")
            .arg(&file);
        let built = run(c, LIMIT);
        assert!(built.status.success(), "{built:?}");
        (drv, built.stderr)
    };
    // Builders' lines, as `-L` and `--log-format raw-with-logs` print them.
    for args in [&["-L"][..], &["--log-format", "raw-with-logs"]] {
        for remote in [&socket, &plain.socket] {
            let (_, stderr) = build(remote, args);
            for step in ["base", "top"] {
                assert!(
                    stderr.contains(&format!("progress says {step}-")),
                    "{args:?} against {}:\n{stderr}",
                    remote.display()
                );
            }
        }
    }
    // Nix's internal-json: a build activity for the step, its lines as its results.
    let (drv, via) = build(&socket, &["--log-format", "internal-json"]);
    let (plain_drv, direct) = build(&plain.socket, &["--log-format", "internal-json"]);
    let (via, direct) = (internal_json(&via), internal_json(&direct));
    let (via, direct) = (
        build_log_lines(&via, &drv),
        build_log_lines(&direct, &plain_drv),
    );
    assert_eq!(via.len(), 1, "{via:?}");
    assert!(via[0].starts_with("progress says top-"), "{via:?}");
    assert_eq!(via.len(), direct.len(), "{via:?} {direct:?}");
}

#[test]
fn a_clients_substituters_are_used_before_building() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let socket = space.translator();
    let fixed = CachedFixedOutput::make(&space);
    let nix_build = |extra: &[&str]| {
        let mut c = space.nix("nix-build", Some(&socket));
        c.arg(&fixed.file).arg("--no-out-link").args(extra);
        run(c, LIMIT)
    };
    // Without the client's substituter, a worker builds it (the positive control).
    let built = nix_build(&[]);
    assert!(built.status.success(), "{built:?}");
    assert_eq!(built_by(&space, "w1"), 1);
    fixed.delete(&space);
    // With it (the test's nix.conf names none), the output is fetched from the cache.
    let cache = format!("file://{}", fixed.cache.display());
    let substituted = nix_build(&["--substituters", &cache]);
    assert!(substituted.status.success(), "{substituted:?}");
    assert_eq!(substituted.stdout.trim(), fixed.out);
    assert_eq!(std::fs::read_to_string(&fixed.out).unwrap(), fixed.content);
    assert_eq!(built_by(&space, "w1"), 1, "no worker built it again");
}

/// A chain of `steps` input-addressed derivations named `name-I`, each depending on the one
/// before, whose base's builder fails: base first, with their `.drv` paths (computed as Nix
/// does, with `nixspace-nix-formats`).
fn failing_chain(
    name: &str,
    steps: usize,
) -> Vec<(
    nixspace_nix_formats::store_path::StorePath,
    nixspace_nix_formats::derivation::Derivation,
)> {
    use nixspace_nix_formats::derivation::{Derivation, DerivationOutput};
    use nixspace_nix_formats::store_path::{StoreDir, StorePath};
    let store = StoreDir::default();
    let system = format!("{}-linux", std::env::consts::ARCH);
    // Hash modulo of each derivation (unmasked), for its dependents' output paths.
    let mut hashes = std::collections::HashMap::new();
    let mut chain: Vec<(StorePath, Derivation)> = Vec::with_capacity(steps);
    for i in 0..steps {
        let step = format!("{name}-{i}");
        let script = if i == 0 {
            "exit 1"
        } else {
            "echo $name > $out"
        };
        let env = [
            ("name", step.as_str()),
            ("system", system.as_str()),
            ("builder", "/bin/sh"),
        ]
        .into_iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect();
        let mut drv = Derivation {
            name: step,
            outputs: [("out".to_owned(), DerivationOutput::Deferred)].into(),
            input_drvs: chain
                .last()
                .map(|(path, _)| (path.clone(), ["out".to_owned()].into()))
                .into_iter()
                .collect(),
            input_srcs: Default::default(),
            system: system.clone(),
            builder: b"/bin/sh".to_vec(),
            args: vec![b"-c".to_vec(), script.as_bytes().to_vec()],
            env,
        };
        drv.compute_input_addressed_outputs(&store, |p| hashes.get(p).cloned())
            .expect("output paths");
        let hash = drv
            .hash_modulo(&store, false, |p| hashes.get(p).cloned())
            .expect("hash modulo");
        let path = drv.drv_path(&store).expect("drv path");
        hashes.insert(path.clone(), hash);
        chain.push((path, drv));
    }
    chain
}

/// Through `nixspace daemon --stdio`: add a failing chain of `steps` derivations with
/// `AddTextToStore`, then `BuildPaths` of its top. The daemon answers with the build's
/// failure (it does not crash or hang), and the connection goes on working.
async fn a_failing_chain_added_as_text_is_answered(dir: &DaemonDir, steps: usize) {
    use nixspace_nix_protocol::{BuildMode, ClientError, DerivedPath, OutputSpec};
    let store = nixspace_nix_formats::store_path::StoreDir::default();
    let chain = failing_chain(&nixspace_test_support::unique("text-chain"), steps);
    let (_child, mut client) = dir.stdio_client(None).await;
    let started = std::time::Instant::now();
    for (path, drv) in &chain {
        let references = drv.input_drvs.keys().cloned().collect();
        let added = client
            .add_text_to_store(
                &format!("{}.drv", drv.name),
                &drv.to_aterm(&store),
                &references,
            )
            .await
            .unwrap_or_else(|e| panic!("AddTextToStore: {e}\n{}", dir.log()));
        assert_eq!(&added, path, "the daemon computed another .drv path");
    }
    let added = started.elapsed();
    let (top, _) = chain.last().expect("a step");
    let wanted = [DerivedPath::Built {
        drv_path: top.clone(),
        outputs: OutputSpec::All,
    }];
    let mut logs = nixspace_nix_protocol::stderr::DiscardLogs;
    let Ok(built) = tokio::time::timeout(
        CHAIN_LIMIT,
        client.build_paths(&wanted, BuildMode::Normal, &mut logs),
    )
    .await
    else {
        panic!("BuildPaths not answered in {CHAIN_LIMIT:?}\n{}", dir.log());
    };
    eprintln!(
        "text chain of {steps}: added in {:.1} s, BuildPaths answered in {:.1} s",
        added.as_secs_f64(),
        (started.elapsed() - added).as_secs_f64()
    );
    match built {
        Err(ClientError::Daemon(e)) => {
            assert!(e.to_string().contains("failed"), "{e}\n{}", dir.log());
        }
        other => panic!("expected the build's failure, got {other:?}\n{}", dir.log()),
    }
    // The connection still answers.
    assert!(client.is_valid_path(top).await.expect("IsValidPath"));
}

/// How long adding a chain and building it may take, each.
const CHAIN_LIMIT: Duration = Duration::from_secs(600);

#[test]
fn a_50000_step_chain_added_as_text_fails_and_the_daemon_answers() {
    let dir = DaemonDir::new();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async {
        // Positive control: a short chain, the same way, is answered with its failure.
        a_failing_chain_added_as_text_is_answered(&dir, 10).await;
        a_failing_chain_added_as_text_is_answered(&dir, 50_000).await;
    });
}

/// A derivation a client sends inline with BuildDerivation (its `.drv` not in the store), as a
/// remote builder's client does: an untrusted client's input-addressed one is refused in Nix
/// 2.8's words (its output paths cannot be checked without the derivation closure); a trusted
/// client's is built on the dataspace as sent (the positive control).
#[test]
fn an_inline_input_addressed_derivation_is_built_for_trusted_clients_only() {
    use nixspace_nix_formats::derivation::BasicDerivation;
    use nixspace_nix_formats::store_path::StoreDir;
    use nixspace_nix_protocol::ClientError;
    let mut space = Space::start();
    space.worker("w1", &[]);
    let trusted = space.translator();
    let untrusted = space.translator_with("untrusted", "trusted-users = nobody\n");
    let text = format!(
        r#"derivation {{ name = "inline"; nonce = "{}"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo inline > $out" ]; }}"#,
        nonce()
    );
    let (drv_path, derivation) = instantiated_elsewhere(&space, "inline", &text);
    let basic = BasicDerivation::from_derivation(&derivation);
    match build_inline(untrusted, &drv_path, &basic).map_err(|e| *e) {
        Err(ClientError::Daemon(e)) => assert!(
            e.message
                .contains("you are not privileged to build input-addressed derivations"),
            "{e:?}"
        ),
        other => panic!("not refused: {other:?}"),
    }
    let result = build_inline(trusted, &drv_path, &basic).expect("built");
    assert!(result.status.is_success(), "{result:?}");
    let store = StoreDir::default();
    let out = derivation.outputs["out"]
        .path()
        .map(|p| store.print(p))
        .unwrap();
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "inline\n");
    assert!(space.log("w1").contains("building"), "{}", space.log("w1"));
}

#[test]
fn only_a_trusted_clients_unsigned_inputs_are_vouched_for() {
    use nixspace_nix_formats::derivation::BasicDerivation;
    use nixspace_nix_formats::hash::Hash;
    use nixspace_nix_formats::store_path::StoreDir;
    let mut space = Space::start_with(&["--max-attempts", "1"]);
    let own = space.scratch_dir("w1-store").display().to_string();
    space.worker("w1", &["--own-store", &own]);
    let trusted = space.translator();
    let untrusted = space.translator_with("untrusted", "trusted-users = nobody\n");
    // An input built here by Nix alone: no key signs it.
    let nonce = nonce();
    let input_file = space.nix_file(
        "input.nix",
        &format!(
            r#"derivation {{ name = "unsigned-input"; nonce = "{nonce}"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo {nonce} > $out" ]; }}"#
        ),
    );
    let mut local = space.nix("nix-build", None);
    local.arg("--no-out-link").arg(&input_file);
    let input = run(local, Duration::from_secs(60));
    assert!(input.status.success(), "{input:?}");
    let input = input.stdout.trim().to_owned();
    // A fixed-output derivation on it, which an untrusted client may have built inline too.
    let hash = Hash::sha256(format!("{nonce}\n")).to_nixbase32();
    let text = format!(
        r#"derivation {{ name = "on-unsigned"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "read line < {input}; echo $line > $out" ]; outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = "{hash}"; }}"#
    );
    let (drv_path, derivation) = instantiated_elsewhere(&space, "on-unsigned", &text);
    let mut basic = BasicDerivation::from_derivation(&derivation);
    basic
        .input_srcs
        .insert(StoreDir::default().parse(&input).unwrap());
    // The untrusted client's input reaches no worker with a store of its own.
    let refused = build_inline(untrusted, &drv_path, &basic).expect("answered");
    assert!(!refused.status.is_success(), "{refused:?}");
    assert!(
        space.log("w1").contains("not signed by a trusted key"),
        "{}",
        space.log("w1")
    );
    // The positive control: the trusted client's build of the same derivation gets it there.
    let result = build_inline(trusted, &drv_path, &basic).expect("built");
    assert!(
        result.status.is_success(),
        "{result:?}\n{}",
        space.log("w1")
    );
}

/// `text`, a Nix expression of one derivation, instantiated in a throwaway store (so its
/// `.drv` is not in this one): the `.drv`'s path and the derivation.
fn instantiated_elsewhere(
    space: &Space,
    name: &str,
    text: &str,
) -> (
    nixspace_nix_formats::store_path::StorePath,
    nixspace_nix_formats::derivation::Derivation,
) {
    let elsewhere = space.scratch_dir(&format!("elsewhere-{name}"));
    let file = space.nix_file(&format!("{name}.nix"), text);
    let mut instantiate =
        space.in_other_store(&elsewhere, &format!("nix-instantiate {}", file.display()));
    instantiate.env_remove("NIX_REMOTE");
    let drv_file = run(instantiate, Duration::from_secs(60));
    assert!(drv_file.status.success(), "{drv_file:?}");
    let drv_file = drv_file.stdout.trim().to_owned();
    let store = nixspace_nix_formats::store_path::StoreDir::default();
    let drv_path = store.parse(&drv_file).unwrap();
    let text = std::fs::read(elsewhere.join(drv_file.trim_start_matches('/'))).unwrap();
    let derivation =
        nixspace_nix_formats::derivation::Derivation::parse_at(&store, &drv_path, &text).unwrap();
    assert!(!Path::new(&drv_file).exists(), "{drv_file} is in the store");
    (drv_path, derivation)
}

/// BuildDerivation of `basic` as `drv_path`, sent inline to the translator on `socket`.
fn build_inline(
    socket: std::path::PathBuf,
    drv_path: &nixspace_nix_formats::store_path::StorePath,
    basic: &nixspace_nix_formats::derivation::BasicDerivation,
) -> Result<nixspace_nix_protocol::BuildResult, Box<nixspace_nix_protocol::ClientError>> {
    use nixspace_nix_protocol::stderr::DiscardLogs;
    use nixspace_nix_protocol::{BuildMode, DaemonClient};
    runtime().block_on(async move {
        let mut client = DaemonClient::connect(&socket).await.map_err(Box::new)?;
        client
            .build_derivation(drv_path, basic, BuildMode::Normal, &mut DiscardLogs)
            .await
            .map_err(Box::new)
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}
