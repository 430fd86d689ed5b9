//! What builds use: each build on a worker runs in a control group of its own, which
//! measures it and holds it to the worker's memory limit per build.
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use nixspace_test_support::{nonce, Space};

const LIMIT: Duration = Duration::from_secs(120);

/// A derivation whose builder holds about `mib` MiB at once (a line of that many zero bytes
/// held whole by `tail -n 1`), then writes its output.
fn allocating(space: &Space, name: &str, mib: u64) -> PathBuf {
    space.nix_file(
        &format!("{name}.nix"),
        &format!(
            r#"derivation {{
  name = "{name}"; system = builtins.currentSystem; builder = "/bin/sh"; nonce = "{tag}";
  args = [ "-c" "/usr/bin/head -c {bytes} /dev/zero | /usr/bin/tail -n 1 > /dev/null && echo held > $out" ];
}}"#,
            tag = nonce(),
            bytes = mib << 20
        ),
    )
}

/// The peak memory, in MiB, the worker's log gives for the build of the derivation whose
/// path ends with `drv_suffix`.
fn peak_mib(log: &str, drv_suffix: &str) -> u64 {
    let measured = log
        .lines()
        .find(|l| {
            l.contains("usage measured by its control group")
                && l.contains(&format!("{drv_suffix} "))
        })
        .unwrap_or_else(|| panic!("no usage of {drv_suffix} in {log}"));
    measured
        .split("peak_mib=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{measured}"))
}

#[test]
fn a_build_over_the_workers_memory_limit_is_killed_and_the_failure_says_so() {
    let mut space = Space::start();
    space.worker("w1", &["--build-memory-limit", "64M"]);

    // Under the limit: built, and measured by its group.
    let small = allocating(&space, "small", 16);
    let built = space.build(&small, LIMIT);
    assert!(built.status.success(), "{built:?}\n{}", space.log("w1"));
    let peak = peak_mib(&space.log("w1"), "-small.drv");
    assert!((16..64).contains(&peak), "{peak} MiB");

    // The same builder holding four times as much: the kernel kills it, and the frontend is
    // told why.
    let big = allocating(&space, "big", 256);
    let failed = space.build(&big, LIMIT);
    assert!(!failed.status.success(), "{failed:?}");
    assert!(
        failed
            .stderr
            .contains("killed for going over the memory limit of 64 MiB per build"),
        "{failed:?}\n{}",
        space.log("w1")
    );
}

#[test]
fn without_a_limit_the_same_build_succeeds_and_is_measured() {
    // The control of the test above: the builder that was killed is fine on a worker
    // without a limit, and its peak is what it held.
    let mut space = Space::start();
    space.worker("w1", &[]);
    let big = allocating(&space, "big", 256);
    let built = space.build(&big, LIMIT);
    assert!(built.status.success(), "{built:?}\n{}", space.log("w1"));
    let peak = peak_mib(&space.log("w1"), "-big.drv");
    assert!(peak >= 256, "{peak} MiB");
    // The planner keeps what the worker reported with the attempt.
    let history = nixspace_test_support::run(space.command(&["history", "--json"]), LIMIT);
    let steps: serde_json::Value = serde_json::from_str(&history.stdout).unwrap();
    let step = steps
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["drv"].as_str().unwrap().ends_with("-big.drv"))
        .unwrap_or_else(|| panic!("{steps}"));
    let usage = &step["attempts"][0]["usage"];
    assert!(
        usage["peak_memory"].as_i64().unwrap() >= 256 << 20
            && usage["wall_ms"].as_i64().unwrap() > 0,
        "{step}"
    );
}

#[test]
fn workers_offer_the_memory_and_cpus_they_are_given_and_status_shows_them() {
    let mut space = Space::start();
    space.worker("given", &["--memory", "3G", "--cpus", "3"]);
    // The harness gives every worker two slots.
    space.worker("limited", &["--build-memory-limit", "64M"]);
    let report = space.wait_for_status("both workers", |r| {
        r["workers"].as_array().is_some_and(|w| w.len() == 2)
    });
    let worker = |id: &str| {
        report["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["id"] == id)
            .unwrap_or_else(|| panic!("{report}"))
            .clone()
    };
    let given = worker("given");
    assert_eq!(given["memory"], 3u64 << 30, "{report}");
    assert_eq!(given["build_memory"], 0, "{report}");
    assert_eq!(given["cpus"], 3, "{report}");
    // Detected: the per-build limit times the slots (less than the machine's memory), and
    // the CPUs the process may use.
    let limited = worker("limited");
    assert_eq!(limited["memory"], 128u64 << 20, "{report}");
    assert_eq!(limited["build_memory"], 64u64 << 20, "{report}");
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert_eq!(limited["cpus"], cpus, "{report}");
    let mut status = space.command(&["status", "--dir"]);
    status.arg(space.dir());
    let text = nixspace_test_support::run(status, LIMIT).stdout;
    assert!(
        text.contains("3072M") && text.contains("128M/64M"),
        "{text}"
    );
}
