//! Flow control on NAR streams between real processes: a serving store never runs more than
//! a window of chunks ahead of what its receiver acknowledged, stops when the request is
//! withdrawn, gives up on a receiver that stops granting credit, and a big path moves between
//! stores without the dataspace's host or the receiving worker holding it in memory.
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use nixspace_space::Role;
use nixspace_test_support::dataspace::{route, runtime, NarFetch, ANSWER};
use nixspace_test_support::{peak_rss, run, Space};
use nixspace_transfer::nar_stream::{CHUNK, WINDOW};

const LIMIT: Duration = Duration::from_secs(50);

/// A file of `size` random bytes at `file`.
fn random_file(file: &Path, size: usize) {
    use rand::RngCore;
    let mut bytes = vec![0u8; size];
    rand::thread_rng().fill_bytes(&mut bytes);
    std::fs::write(file, bytes).expect("random file");
}

/// The answer of `nix-store -q <query> path` in the space's shared store.
fn query(space: &Space, query: &str, path: &str) -> String {
    let mut q = space.nix("nix-store", None);
    q.args(["-q", query, path]);
    let out = run(q, LIMIT);
    assert!(out.status.success(), "{out:?}");
    out.stdout.trim().to_owned()
}

/// Remove test paths from the shared store (best effort: a test's garbage, not its result).
fn delete(space: &Space, paths: &[&str]) {
    let mut d = space.nix("nix-store", None);
    d.arg("--delete").args(paths);
    let _ = run(d, LIMIT);
}

#[test]
fn a_sender_keeps_to_its_window_stops_when_withdrawn_and_gives_up_without_credit() {
    let mut space = Space::start();
    space.worker("w1", &["--stream-idle", "2"]);
    let file = space.tmp.path().join("flow-medium");
    random_file(&file, 8 << 20);
    let mut add = space.nix("nix-store", None);
    add.arg("--add").arg(&file);
    let added = run(add, LIMIT);
    assert!(added.status.success(), "{added:?}");
    let path = added.stdout.trim().to_owned();
    let (hash, size) = (
        query(&space, "--hash", &path),
        query(&space, "--size", &path),
    );
    let route = route(&space, Role::Worker);

    runtime().block_on(async {
        // A request withdrawn mid-stream stops its sender at once: it does not wait out its
        // idle time for credit (which it would log).
        let withdrawn = NarFetch::request(&route, &path, "w1", false)
            .await
            .expect("request");
        assert!(withdrawn.wait_until(ANSWER, |a| a.chunks == WINDOW).await);
        withdrawn.leave();

        let stalled = NarFetch::request(&route, &path, "w1", false)
            .await
            .expect("request");
        // A window of chunks arrives without any credit, and not a chunk more.
        assert!(stalled.wait_until(ANSWER, |a| a.chunks == WINDOW).await);
        assert_eq!(stalled.arrived(), (WINDOW, WINDOW << 16, None));
        // Credit for 8 chunks lets exactly 8 more through.
        stalled.grant(8);
        assert!(stalled.wait_until(ANSWER, |a| a.chunks == WINDOW + 8).await);
        // No more credit: the sender gives up after its idle time (2 s) with an error.
        let waiting = Instant::now();
        assert!(stalled.wait_until(ANSWER, |a| a.ended.is_some()).await);
        // Not a chunk more than the credit allowed came before the end, which follows every
        // chunk sent.
        let (chunks, _, ended) = stalled.arrived();
        assert_eq!(chunks, WINDOW + 8);
        let reason = ended.expect("ended").expect_err("a <nar-error>");
        assert!(reason.contains("no credit for 2s"), "{reason}");
        assert!(
            waiting.elapsed() >= Duration::from_secs(1),
            "gave up too early"
        );
        stalled.leave();

        // The worker goes on serving: a receiver that acknowledges every chunk gets the whole
        // NAR, intact.
        let whole = NarFetch::request(&route, &path, "w1", true)
            .await
            .expect("request");
        assert!(whole.wait_until(LIMIT, |a| a.ended.is_some()).await);
        let (_, bytes, ended) = whole.arrived();
        assert_eq!(ended, Some(Ok(hash)));
        assert_eq!(bytes.to_string(), size);
        whole.leave();
    });
    // The stalled stream logged giving up (the measure works); the withdrawn one, which would
    // have given up earlier, did not.
    assert_eq!(
        space.log("w1").matches("no credit").count(),
        1,
        "{}",
        space.log("w1")
    );
    delete(&space, &[&path]);
}

#[test]
fn a_big_path_moves_between_stores_without_being_held_in_memory() {
    const SIZE: u64 = 64 << 20;
    let mut space = Space::start();
    let store = space.tmp.path().join("w1");
    space.worker("w1", &["--own-store", store.to_str().expect("utf-8 path")]);
    random_file(&space.tmp.path().join("big"), SIZE as usize);
    // The file becomes a source in the shared store at evaluation; the worker, with a store
    // of its own, fetches it from the frontend's store through the dataspace.
    let file = space.nix_file(
        "big.nix",
        r#"derivation {
  name = "flow-big-size";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  big = ./big;
  args = [ "-c" "/usr/bin/wc -c < $big > $out" ];
}"#,
    );
    let peaks = || (peak_rss(space.up_pid()), peak_rss(space.worker_pid("w1")));
    let before = peaks();
    let started = Instant::now();
    let built = space.build(&file, LIMIT);
    let took = started.elapsed();
    assert!(built.status.success(), "{built:?}");
    let out = built.stdout.trim();
    assert_eq!(std::fs::read_to_string(out).unwrap(), format!("{SIZE}\n"));
    // The derivation's only reference is the source.
    let drv = query(&space, "--deriver", out);
    let big = query(&space, "--references", &drv);
    let nar_size = query(&space, "--size", &big);
    let log = space.log("w1");
    assert!(
        log.lines().any(|l| l.contains("fetched")
            && l.contains(&format!("{big} "))
            && l.contains(&format!("size={nar_size}"))),
        "w1 did not fetch {big}:\n{log}"
    );

    // Without flow control the worker's peak grew by more than the NAR (it buffered what its
    // store had not taken yet), and the host's by about 18 MiB.
    let after = peaks();
    let growth = (after.0 - before.0, after.1 - before.1);
    eprintln!(
        "64 MiB path moved in {took:.1?} (with the build); peak RSS before and after: \
         up {} -> {} KiB, worker {} -> {} KiB",
        before.0 >> 10,
        after.0 >> 10,
        before.1 >> 10,
        after.1 >> 10
    );
    // With it, each holds about a window (the relay's queue, the receiver's channel) and
    // its own working memory, whatever the size of the path: three windows are well under
    // the NAR.
    let bound = 3 * WINDOW * CHUNK as u64;
    assert!(
        bound < SIZE / 4,
        "the bound must be able to catch a buffered NAR"
    );
    assert!(
        growth.0 < bound,
        "nixspace up's peak grew by {} bytes",
        growth.0
    );
    assert!(
        growth.1 < bound,
        "the worker's peak grew by {} bytes",
        growth.1
    );
    delete(&space, &[out, &drv, &big]);
}
