//! What builds use: each build on a worker runs in a control group of its own, which
//! measures it and holds it to the worker's memory limit per build.
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nixspace_test_support::{nonce, step_binding, Space};

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

/// The step whose derivation path ends with `drv_suffix` as `nixspace history --json` shows it.
fn recorded_step(space: &Space, drv_suffix: &str) -> serde_json::Value {
    let history = nixspace_test_support::run(space.command(&["history", "--json"]), LIMIT);
    let steps: serde_json::Value = serde_json::from_str(&history.stdout).unwrap();
    steps
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["drv"].as_str().unwrap().ends_with(drv_suffix))
        .unwrap_or_else(|| panic!("{steps}"))
        .clone()
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

    // The same builder holding four times as much: the kernel kills it, and with no worker
    // allowing more, the frontend is told why.
    let big = allocating(&space, "big", 256);
    let failed = space.build(&big, LIMIT);
    assert!(!failed.status.success(), "{failed:?}");
    assert!(
        failed
            .stderr
            .contains("killed for going over the memory limit of 64 MiB per build")
            && failed
                .stderr
                .contains("no connected worker allows one build more than 64 MiB"),
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
    let step = recorded_step(&space, "-big.drv");
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

/// A Nix file of steps named `names`, each with the Nix attributes `attrs`, whose builders
/// append `start NAME MS` to `runs` (milliseconds since the epoch), hold about `mib` MiB at
/// once, sleep two seconds, write their output and append `done NAME MS`.
fn timed_steps(space: &Space, names: &[&str], attrs: &str, mib: u64, runs: &Path) -> PathBuf {
    let binding = step_binding(
        "name: deps",
        attrs,
        &format!(
            "echo start ${{name}} $(/bin/date +%s%3N) >> {runs}
      /usr/bin/head -c {bytes} /dev/zero | /usr/bin/tail -n 1 > /dev/null
      /bin/sleep 2
      echo ${{name}} > $out
      echo done ${{name}} $(/bin/date +%s%3N) >> {runs}",
            runs = runs.display(),
            bytes = mib << 20
        ),
    );
    let steps: String = names
        .iter()
        .map(|name| format!("(step \"{name}\" [ ]) "))
        .collect();
    space.nix_file(
        &format!("{}.nix", names.join("-")),
        &format!("let\n{binding}in [ {steps}]\n"),
    )
}

/// Build `file` and return each step's (start, done) as its builder recorded them in `runs`.
fn build_timed(space: &Space, file: &Path, runs: &Path) -> BTreeMap<String, (u64, u64)> {
    let built = space.build(file, LIMIT);
    assert!(built.status.success(), "{built:?}\n{}", space.log("w1"));
    let text = std::fs::read_to_string(runs).unwrap();
    let mut times: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let [what, name, ms] = words[..] else {
            panic!("{text}");
        };
        let entry = times.entry(name.to_owned()).or_default();
        match what {
            "start" => entry.0 = ms.parse().unwrap(),
            _ => entry.1 = ms.parse().unwrap(),
        }
    }
    times
}

/// Whether the builds of steps `a` and `b` overlapped in time.
fn overlapped(times: &BTreeMap<String, (u64, u64)>, a: &str, b: &str) -> bool {
    let (a, b) = (times[a], times[b]);
    a.0 < b.1 && b.0 < a.1
}

/// Build `hungry-a` and `hungry-b`, each stating that it needs 600 MiB (`requiredMemory`),
/// on one worker offering `memory` (two slots); return each step's (start, done).
fn hungry_runs(memory: &str) -> BTreeMap<String, (u64, u64)> {
    let mut space = Space::start();
    space.worker("w1", &["--memory", memory]);
    let runs = space.scratch_dir("runs").join("runs");
    let names = ["hungry-a", "hungry-b"];
    let file = timed_steps(&space, &names, "requiredMemory = 600;", 1, &runs);
    build_timed(&space, &file, &runs)
}

#[test]
fn two_memory_hungry_steps_on_a_worker_with_memory_for_one_run_one_after_the_other() {
    // 1 GiB holds one 600 MiB step, not two, though the worker has two slots.
    let times = hungry_runs("1G");
    assert!(
        !overlapped(&times, "hungry-a", "hungry-b"),
        "the builds overlapped: {times:?}"
    );
}

#[test]
fn two_memory_hungry_steps_on_a_worker_with_memory_for_both_run_at_once() {
    // The control of the test above: with memory for both, its two slots build them together.
    let times = hungry_runs("2G");
    assert!(
        overlapped(&times, "hungry-a", "hungry-b"),
        "the builds did not overlap: {times:?}"
    );
}

#[test]
fn a_build_killed_for_memory_is_built_again_on_a_worker_with_more_and_the_history_says_why() {
    let mut space = Space::start();
    // The faster worker gets the step first, and its limit kills the build.
    space.worker("small", &["--build-memory-limit", "64M", "--speed", "10"]);
    space.worker("big", &[]);
    let big = allocating(&space, "big", 256);
    let built = space.build(&big, LIMIT);
    assert!(
        built.status.success(),
        "{built:?}\n{}\n{}",
        space.log("small"),
        space.log("big")
    );
    let step = recorded_step(&space, "-big.drv");
    let attempts = step["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{step}");
    let (killed, rebuilt) = (&attempts[0], &attempts[1]);
    assert_eq!(killed["worker"], "small", "{step}");
    assert_eq!(killed["cause"], "out-of-memory", "{step}");
    assert!(
        killed["reason"]
            .as_str()
            .unwrap()
            .contains("killed for going over the memory limit of 64 MiB per build"),
        "{step}"
    );
    assert_eq!(rebuilt["worker"], "big", "{step}");
    assert_eq!(rebuilt["outcome"], "built", "{step}");
}

/// Build `hog-2` and `hog-3`, each holding 256 MiB and stating nothing, on one worker offering
/// 400 MiB (two slots), after `hog-1` (the same package, another version) if `learn`;
/// return each step's (start, done).
fn hog_runs(learn: bool) -> BTreeMap<String, (u64, u64)> {
    let mut space = Space::start();
    space.worker("w1", &["--memory", "400M"]);
    let runs = space.scratch_dir("runs").join("runs");
    if learn {
        let first = timed_steps(&space, &["hog-1"], "", 256, &runs);
        build_timed(&space, &first, &runs);
    }
    let file = timed_steps(&space, &["hog-2", "hog-3"], "", 256, &runs);
    build_timed(&space, &file, &runs)
}

#[test]
fn memory_learned_from_an_earlier_version_of_a_package_keeps_two_builds_apart() {
    // hog-1 peaked at over 256 MiB: two later versions do not fit 400 MiB together.
    let times = hog_runs(true);
    assert!(
        !overlapped(&times, "hog-2", "hog-3"),
        "the builds overlapped: {times:?}"
    );
}

#[test]
fn with_nothing_learned_the_same_builds_run_at_once() {
    // The control of the test above: no earlier build, no prediction, two slots.
    let times = hog_runs(false);
    assert!(
        overlapped(&times, "hog-2", "hog-3"),
        "the builds did not overlap: {times:?}"
    );
}

#[test]
fn a_frontends_estimated_time_to_completion_shows_in_status_and_the_metrics() {
    let mut space = Space::start_with(&["--metrics", "127.0.0.1:0"]);
    space.worker("w1", &[]);
    let (file, _) = nixspace_test_support::sleeper(&space, 30);
    let mut build = space.spawn_build(&file);
    let report = space.wait_for_status("an estimate", |r| {
        r["demands"][0]["eta_seconds"]
            .as_f64()
            .is_some_and(|s| s > 0.0)
    });
    let requester = report["demands"][0]["requester"].as_str().unwrap();
    let metrics = nixspace_test_support::http_get(&space.metrics_address(), "/metrics");
    assert!(
        metrics.contains(&format!(
            "nixspace_eta_seconds{{requester=\"{requester}\"}}"
        )),
        "{metrics}"
    );
    build.kill().expect("stop the build");
    build.wait().expect("reap the build");
}
