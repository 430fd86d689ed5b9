//! Workers joining over TCP: the Noise session that hides the capability and the builds from
//! the link, the plaintext session `--insecure-tcp` allows, and a route pinning another key.
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use nixspace_space::{Role, Route, Transport};
use nixspace_test_support::proxy::{tcp_address, RecordingProxy};
use nixspace_test_support::{nonce, run, Space};

const LIMIT: Duration = Duration::from_secs(120);

/// The worker route of `space`, reaching it only through `proxy`, written for a worker.
fn route_through(space: &Space, name: &str, route: &Route, proxy: &RecordingProxy) -> PathBuf {
    let port = proxy.addr().port();
    let through = route.with_transports(vec![Transport::Tcp("127.0.0.1".to_owned(), port)]);
    space.worker_route_file(name, &through)
}

/// What an eavesdropper on a worker's TCP link saw of its capability and of a build's output.
struct Seen {
    /// The sturdy ref's signature.
    signature: bool,
    /// The output's contents (in the NAR the frontend fetched from the worker's store).
    output: bool,
    /// Whether the worker's route pinned a Noise key.
    pinned: bool,
}

/// Start `up --tcp 127.0.0.1:0` with `up_args`, one worker with its own store joined through a
/// recording proxy, build a derivation whose output holds a marker only the build computes,
/// and say what the proxy saw.
fn build_over_recorded_tcp(up_args: &[&str]) -> Seen {
    let mut args = vec!["--tcp", "127.0.0.1:0"];
    args.extend_from_slice(up_args);
    let mut space = Space::start_with(&args);
    let route = Route::read(&Role::Worker.route_file(&space.dir())).expect("route");
    let proxy = RecordingProxy::start(tcp_address(&route));
    let path = route_through(&space, "recorded", &route, &proxy);
    let store = space.tmp.path().join("w1-store");
    space.worker(
        "w1",
        &[
            "--route",
            path.to_str().expect("utf-8 path"),
            "--own-store",
            store.to_str().expect("utf-8 path"),
        ],
    );
    let tag = nonce();
    // The derivation says `$((6*7))`; only the output says 42.
    let file = space.sh_derivation(
        "marked.nix",
        "marked",
        &format!("echo nar-$((6*7))-marker-{tag} > $out"),
    );
    let result = space.build(&file, LIMIT);
    assert!(result.status.success(), "{result:?}");
    assert!(result.stderr.contains("on w1"), "{result:?}");
    let out = result.stdout.trim();
    let contents = std::fs::read_to_string(out).expect("the output is in the local store");
    let marker = format!("nar-42-marker-{tag}");
    assert_eq!(contents.trim(), marker);
    assert!(proxy.bytes() > 0, "nothing crossed the proxy");
    Seen {
        signature: proxy.saw(&route.sturdy_ref.parameters.sig),
        output: proxy.saw(marker.as_bytes()),
        pinned: route.noise.is_some(),
    }
}

#[test]
fn a_worker_over_noise_tcp_builds_and_the_link_shows_neither_its_capability_nor_the_output() {
    let seen = build_over_recorded_tcp(&[]);
    assert!(seen.pinned, "the route pins the host's Noise key");
    assert!(
        !seen.signature,
        "the sturdy ref's signature crossed in clear"
    );
    assert!(!seen.output, "the output's bytes crossed in clear");
}

#[test]
fn with_insecure_tcp_the_same_capture_shows_the_capability_and_the_output() {
    // Positive control for the test above: the same capture, in clear, sees both.
    let seen = build_over_recorded_tcp(&["--insecure-tcp"]);
    assert!(!seen.pinned, "an --insecure-tcp route pins no key");
    assert!(
        seen.signature,
        "the capture missed the signature sent in clear"
    );
    assert!(seen.output, "the capture missed the output sent in clear");
}

#[test]
fn a_route_pinning_another_key_is_refused_with_a_clear_error_and_the_host_serves_on() {
    let mut space = Space::start_with(&["--tcp", "127.0.0.1:0"]);
    let route = Route::read(&Role::Worker.route_file(&space.dir())).expect("route");
    let tcp = route.tcp_only();
    let mut wrong = tcp.clone();
    let spec = wrong.noise.as_mut().expect("the route pins a key");
    spec.key = nixspace_space::keys::NoiseKey::load_or_create(&space.tmp.path().join("other"))
        .expect("another key")
        .public()
        .to_vec();
    let path = space.worker_route_file("wrong-key", &wrong);
    let mut c = space.command(&["worker", "--id", "impostor", "--route"]);
    c.arg(&path).arg("--dir").arg(space.dir());
    let refused = run(c, LIMIT);
    assert!(!refused.status.success(), "{refused:?}");
    assert!(
        refused.stderr.contains("Noise handshake"),
        "{}",
        refused.stderr
    );
    // Positive control, and the host survived the failed handshake: the right key joins.
    let path = space.worker_route_file("right-key", &tcp);
    space.worker("w1", &["--route", path.to_str().expect("utf-8 path")]);
    let file = space.sh_derivation("after.nix", "after", &format!("echo {} > $out", nonce()));
    let result = space.build(&file, LIMIT);
    assert!(result.status.success(), "{result:?}");
    assert!(result.stderr.contains("on w1"), "{result:?}");
}

/// Move this test's thread, and so every process it starts from now on, into a network
/// namespace of its own whose `lo` is up with `address` (not a loopback address) besides
/// 127.0.0.1: a listener off loopback without touching the machine's network.
fn own_network_with(address: &str) {
    use rustix::thread::{unshare_unsafe, UnshareFlags};
    // SAFETY: only the network namespace is unshared (not the file table, the one flag whose
    // effect on other threads makes the call unsafe).
    unsafe { unshare_unsafe(UnshareFlags::NEWNET) }.expect("a network namespace");
    for args in [
        vec!["link", "set", "lo", "up"],
        vec!["addr", "add", address, "dev", "lo"],
    ] {
        let mut ip = std::process::Command::new("ip");
        ip.args(&args);
        let done = run(ip, LIMIT);
        assert!(done.status.success(), "ip {args:?}: {done:?}");
    }
}

#[test]
fn a_capability_in_clear_is_refused_on_a_listener_off_loopback_unless_insecure_tcp() {
    own_network_with("10.42.0.1/32");
    for insecure in [false, true] {
        let mut args = vec!["--tcp", "10.42.0.1:0"];
        if insecure {
            args.push("--insecure-tcp");
        }
        let space = Space::start_with(&args);
        let mut clear = Route::read(&Role::Submit.route_file(&space.dir()))
            .expect("route")
            .tcp_only();
        assert!(
            !clear.transports.is_empty()
                && clear
                    .transports
                    .iter()
                    .all(|t| matches!(t, Transport::Tcp(host, _) if host == "10.42.0.1")),
            "{clear:?}"
        );
        // The capability sent in clear over TCP.
        clear.noise = None;
        let path = space.tmp.path().join("clear.route");
        clear.write(&path).expect("route");
        let status = run(
            space.command(&["status", "--route", path.to_str().expect("utf-8")]),
            LIMIT,
        );
        if insecure {
            // The positive control: the same client, the same connection, allowed.
            assert!(status.status.success(), "{status:?}");
        } else {
            assert!(!status.status.success(), "{status:?}");
            assert!(
                format!("{}{}", status.stderr, space.log("up")).contains("noise-required"),
                "{status:?}\n{}",
                space.log("up")
            );
        }
    }
}
