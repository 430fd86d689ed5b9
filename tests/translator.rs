//! End-to-end: unmodified Nix 2.8 clients (`nix-build`, `nix-store`, `nix-instantiate`)
//! through `nixspace translate`: builds run on dataspace workers, store operations on the
//! upstream daemon.

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use support::{command_lines_with, nonce, repo_root, run, sleeper, Space};

const LIMIT: Duration = Duration::from_secs(120);

fn demo_file(space: &Space) -> std::path::PathBuf {
    let demo = repo_root().join("examples/demo/default.nix");
    space.nix_file(
        "demo.nix",
        &format!("import {} {{ nonce = \"{}\"; }}", demo.display(), nonce()),
    )
}

/// `nix-store -q --references` of the translator's answer equals the direct one.
fn references_agree(space: &Space, socket: &Path, path: &str) {
    let mut via = space.nix("nix-store", Some(socket));
    via.args(["-q", "--references", path]);
    let via = run(via, LIMIT);
    let mut direct = space.nix("nix-store", None);
    direct.args(["-q", "--references", path]);
    let direct = run(direct, LIMIT);
    assert!(via.status.success(), "{via:?}");
    assert!(direct.status.success(), "{direct:?}");
    assert_eq!(via.stdout, direct.stdout);
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
    let file = space.nix_file(
        "broken.nix",
        &format!(
            r#"derivation {{
  name = "broken-{}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo about to fail; exit 3" ];
}}"#,
            nonce()
        ),
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
    let mut s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s.write_all(&0x6e69_7863u64.to_le_bytes()).expect("magic");
    let mut buf = [0u8; 16];
    s.read_exact(&mut buf).expect("daemon magic and version");
    assert_eq!(&buf[..8], &0x6478_696fu64.to_le_bytes());
    for v in [0x122u64, 0, 0] {
        s.write_all(&v.to_le_bytes())
            .expect("version, affinity, reserve");
    }
    // Nix version string, then STDERR_LAST.
    let mut len = [0u8; 8];
    s.read_exact(&mut len).expect("version length");
    let n = u64::from_le_bytes(len) as usize;
    let mut text = vec![0u8; n.div_ceil(8) * 8];
    s.read_exact(&mut text).expect("version string");
    let mut last = [0u8; 8];
    s.read_exact(&mut last).expect("STDERR_LAST");
    assert_eq!(u64::from_le_bytes(last), 0x616c_7473);
    s
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
