//! Scheduling over the dataspace with several real worker processes:
//! exactly-once builds, feature matching, unschedulable steps, worker loss
//! and graceful leave.
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use nixspace_test_support::{counted_step_bindings, http_get, layered_dag, nonce, sleeper, Space};
use rustix::process::Signal;

const BUILD_LIMIT: Duration = Duration::from_secs(180);

#[test]
fn a_fifty_step_dag_is_built_exactly_once_by_three_workers() {
    let mut space = Space::start();
    for w in ["w1", "w2", "w3"] {
        space.worker(w, &[]);
    }
    let runs = space.tmp.path().join("runs");
    let file = layered_dag(&space, 7, 7, &runs); // 49 + root = 50 steps
    let result = space.build(&file, BUILD_LIMIT);
    assert!(result.status.success(), "{result:?}");
    assert!(
        result.stderr.contains("50 of 50 derivations to build"),
        "{result:?}"
    );
    nixspace_test_support::assert_each_step_built_once(&runs, 50);
    let out = result.stdout.trim();
    assert_eq!(std::fs::read_to_string(out).expect("root output"), "root\n");
    // All three workers took part.
    for w in ["w1", "w2", "w3"] {
        assert!(
            space.log(w).contains(" built "),
            "{w} built nothing:\n{}",
            space.log(w)
        );
    }
}

fn needs_feature(space: &Space, feature: &str) -> std::path::PathBuf {
    space.nix_file(
        "feature.nix",
        &format!(
            r#"derivation {{
  name = "needs-{feature}";
  nonce = "{nonce}";
  requiredSystemFeatures = [ "{feature}" ];
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo big > $out" ];
}}"#,
            nonce = nonce()
        ),
    )
}

#[test]
fn a_step_needing_a_feature_goes_to_the_worker_offering_it() {
    let mut space = Space::start();
    space.worker("small", &[]);
    space.worker("large", &["--features", "big,kvm"]);
    let result = space.build(&needs_feature(&space, "big"), BUILD_LIMIT);
    assert!(result.status.success(), "{result:?}");
    assert!(result.stderr.contains("on large"), "{result:?}");
    assert!(
        !space.log("small").contains("building"),
        "{}",
        space.log("small")
    );
}

#[test]
fn a_step_no_worker_can_take_is_reported_unschedulable() {
    let mut space = Space::start();
    space.worker("small", &[]);
    let result = space.build_with(
        &needs_feature(&space, "big"),
        &["--wait-for-workers", "1"],
        BUILD_LIMIT,
    );
    assert_eq!(result.status.code(), Some(1), "{result:?}");
    assert!(
        result
            .stderr
            .contains("no worker for system x86_64-linux offers the required features: big"),
        "{result:?}"
    );
    assert!(result.stderr.contains("is unschedulable"), "{result:?}");
}

#[test]
fn a_step_whose_worker_is_killed_completes_on_another_worker() {
    let mut space = Space::start();
    space.worker("doomed", &[]);
    let build = space.spawn_build(&sleeper(&space, 2).0);
    space.wait_for_log("doomed", "building", Duration::from_secs(30));
    space.worker("survivor", &[]);
    space.signal_worker("doomed", Signal::KILL);
    let result = nixspace_test_support::wait_output(build, BUILD_LIMIT);
    assert!(result.status.success(), "{result:?}");
    assert!(result.stderr.contains("on survivor"), "{result:?}");
    assert_eq!(
        std::fs::read_to_string(result.stdout.trim()).expect("output"),
        "done\n"
    );
}

#[test]
fn a_terminated_worker_finishes_its_build_before_leaving() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let build = space.spawn_build(&sleeper(&space, 2).0);
    space.wait_for_log("w1", "building", Duration::from_secs(30));
    space.signal_worker("w1", Signal::TERM);
    let status = space.wait_worker("w1", Duration::from_secs(60));
    assert!(status.success(), "{}", space.log("w1"));
    assert!(
        space.log("w1").contains("left after finishing its builds"),
        "{}",
        space.log("w1")
    );
    let result = nixspace_test_support::wait_output(build, BUILD_LIMIT);
    assert!(result.status.success(), "{result:?}");
    assert!(result.stderr.contains("built sleeper-"), "{result:?}");
}

#[test]
fn a_worker_holding_a_step_starts_it_when_a_slot_frees() {
    let mut space = Space::start();
    space.worker("w1", &["--hold", "1"]); // and the harness's --max-jobs 2
    let runs = space.tmp.path().join("runs");
    let end = format!("/bin/sleep 5; echo end-${{name}} >> {};", runs.display());
    let file = space.nix_file(
        "held.nix",
        &format!(
            "let\n{}in map (n: step n []) [ \"held-a\" \"held-b\" \"held-c\" ]",
            counted_step_bindings(&runs, &end)
        ),
    );
    let build = space.spawn_build(&file);
    // All three given to the one worker: two build, the third waits there for a slot.
    let report = space.wait_for_status("a step held", |r| {
        r["workers"][0]["held"] == 1 && r["workers"][0]["slots_used"] == 2
    });
    let given = report["workers"][0]["building"].as_array().map(Vec::len);
    assert_eq!(given, Some(3), "{report}");
    let result = nixspace_test_support::wait_output(build, BUILD_LIMIT);
    assert!(result.status.success(), "{result:?}");
    // Never more than its two slots at once, and each step built once.
    let log = std::fs::read_to_string(&runs).expect("runs");
    let (mut running, mut most) = (0, 0);
    for line in log.lines() {
        running += if line.starts_with("end-") { -1 } else { 1 };
        most = most.max(running);
    }
    assert_eq!((log.lines().count(), most), (6, 2), "{log}");
}

#[test]
fn a_worker_holds_no_more_steps_than_it_builds() {
    let space = Space::start();
    // (A worker with --hold 1 and --max-jobs 1 joins: the test above.)
    let worker = space
        .command(&["worker", "--dir"])
        .arg(space.dir())
        .args(["--max-jobs", "1", "--hold", "2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn nixspace worker");
    let out = nixspace_test_support::wait_output(worker, Duration::from_secs(30));
    assert!(!out.status.success(), "{out:?}");
    assert!(
        out.stderr.contains("--hold 2 is more than --max-jobs 1"),
        "{out:?}"
    );
}

#[test]
fn status_shows_workers_demands_and_unschedulable_steps() {
    let mut space = Space::start();
    space.worker("w1", &["--features", "kvm"]);
    let file = space.nix_file(
        "mixed.nix",
        &format!(
            r#"[
  (derivation {{ name = "long-{n}"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "/bin/sleep 30; echo > $out" ]; }})
  (derivation {{ name = "arm-{n}"; system = "aarch64-linux"; builder = "/bin/sh"; }})
]"#,
            n = nonce()
        ),
    );
    let mut build = space.spawn_build(&file);
    space.wait_for_log("w1", "building", Duration::from_secs(30));
    // The planner counts the steps waiting on its tick.
    let report = space.wait_for_status("the unschedulable step, counted as waiting", |r| {
        r["unschedulable"]
            .as_object()
            .is_some_and(|u| !u.is_empty())
            && r["queue"]["aarch64-linux"] == 1
    });
    let workers = report["workers"].as_array().expect("workers");
    assert_eq!(workers.len(), 1, "{report}");
    assert_eq!(workers[0]["id"], "w1");
    assert_eq!(workers[0]["features"][0], "kvm");
    assert_eq!(workers[0]["slots_used"], 1, "{report}");
    assert_eq!(workers[0]["slots_total"], 2, "{report}");
    let demand = &report["demands"][0];
    assert_eq!(demand["steps"], 2, "{report}");
    assert_eq!(demand["running"], 1, "{report}");
    assert_eq!(demand["queued"], 1, "{report}");
    assert_eq!(report["queue"]["aarch64-linux"], 1, "{report}");
    let reasons: Vec<&str> = report["unschedulable"]
        .as_object()
        .expect("unschedulable")
        .values()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(
        reasons,
        vec!["no worker offers system aarch64-linux"],
        "{report}"
    );
    build.kill().expect("stop the build");
    build.wait().expect("reap the build");
}

#[test]
fn metrics_count_builds_workers_and_dispatch() {
    let mut space = Space::start_with(&["--metrics", "127.0.0.1:0"]);
    space.worker("w1", &[]);
    let runs = space.tmp.path().join("runs");
    let file = layered_dag(&space, 2, 3, &runs); // 6 + root = 7 steps
    let result = space.build(&file, BUILD_LIMIT);
    assert!(result.status.success(), "{result:?}");
    let addr = space.metrics_address();
    let response = http_get(&addr, "/metrics");
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    for line in [
        "nixspace_steps_built_total 7",
        "nixspace_steps_failed_total 0",
        "nixspace_workers 1",
        "nixspace_steps_running 0",
        "nixspace_dispatch_seconds_count 7",
    ] {
        assert!(response.contains(line), "{line:?} missing:\n{response}");
    }
    assert!(http_get(&addr, "/other").starts_with("HTTP/1.1 404"));
}

#[test]
fn interrupting_one_of_two_builds_sharing_a_step_keeps_the_step() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let (file, _) = sleeper(&space, 3);
    let first = space.spawn_build(&file);
    space.wait_for_log("w1", "building", Duration::from_secs(30));
    let second = space.spawn_build(&file);
    space.wait_for_status("two frontends", |r| {
        r["demands"].as_array().is_some_and(|d| d.len() == 2)
    });
    let pid = rustix::process::Pid::from_raw(first.id() as i32).expect("pid");
    rustix::process::kill_process(pid, Signal::INT).expect("SIGINT");
    let first = nixspace_test_support::wait_output(first, BUILD_LIMIT);
    assert_eq!(first.status.code(), Some(130), "{first:?}");
    let second = nixspace_test_support::wait_output(second, BUILD_LIMIT);
    assert!(second.status.success(), "{second:?}");
    assert_eq!(
        std::fs::read_to_string(second.stdout.trim()).expect("output"),
        "done\n"
    );
    // The step was built once, never stopped and restarted.
    let log = space.log("w1");
    assert_eq!(log.matches(" building ").count(), 1, "{log}");
}

#[test]
fn history_records_steps_and_attempts_and_outlives_the_dataspace() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let runs = space.tmp.path().join("runs");
    let result = space.build(&layered_dag(&space, 1, 2, &runs), BUILD_LIMIT);
    assert!(result.status.success(), "{result:?}");
    let broken = space.nix_file(
        "broken.nix",
        &format!(
            r#"derivation {{ name = "broken-{n}"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo no; exit 1" ]; }}"#,
            n = nonce()
        ),
    );
    let failed = space.build(&broken, BUILD_LIMIT);
    assert_eq!(failed.status.code(), Some(1), "{failed:?}");
    // The history outlives the dataspace.
    space.kill_up();
    let c = space.command(&["history", "--json"]);
    let out = nixspace_test_support::run(c, Duration::from_secs(30));
    assert!(out.status.success(), "{out:?}");
    let steps: serde_json::Value = serde_json::from_str(&out.stdout).expect("history JSON");
    let steps = steps.as_array().expect("steps");
    assert_eq!(steps.len(), 4, "2 + root + broken: {steps:?}");
    let built = steps.iter().filter(|s| s["status"] == "built").count();
    assert_eq!(built, 3, "{steps:?}");
    let broken = steps
        .iter()
        .find(|s| s["status"] == "failed")
        .expect("the broken step");
    assert!(
        broken["error"]
            .as_str()
            .unwrap_or("")
            .contains("exit code 1"),
        "{broken}"
    );
    assert_eq!(broken["attempts"][0]["worker"], "w1");
    assert_eq!(broken["attempts"][0]["outcome"], "failed");
    for s in steps.iter().filter(|s| s["status"] == "built") {
        assert_eq!(s["attempts"].as_array().map(Vec::len), Some(1), "{s}");
        assert_eq!(s["attempts"][0]["outcome"], "built", "{s}");
        assert!(!s["outputs"].as_array().expect("outputs").is_empty(), "{s}");
    }
}
