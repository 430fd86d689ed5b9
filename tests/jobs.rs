//! Jobs that outlive their client: `nixspace submit` hands a release expression's jobs to
//! the coordinator, which keeps them in its history, roots their derivations and builds them
//! across its own restarts; `nixspace jobs` shows their progress and results.
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nixspace_protocol::build;
use nixspace_space::Role;
use nixspace_test_support::dataspace::{fake_drv, route, runtime, Session, ANSWER};
use nixspace_test_support::syndicate_server::ExternalSpace;
use nixspace_test_support::{
    command_lines_with, nonce, run, unique_sleep, wait_output, Finished, Space,
};
use preserves_schema::Unparse;
use syndicate::actor::AnyValue;

const LIMIT: Duration = Duration::from_secs(120);

/// `nixspace submit FILE ARGS…` against `space`; the job's number.
pub(crate) fn submit(space: &Space, file: &Path, args: &[&str]) -> i64 {
    let mut c = space.command(&["submit", "--dir"]);
    c.arg(space.dir()).args(args).arg(file);
    let submitted = run(c, LIMIT);
    assert!(submitted.status.success(), "{submitted:?}");
    submitted
        .stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no job number: {submitted:?}"))
}

/// `nixspace jobs --json ARGS…`.
fn jobs(space: &Space, args: &[&str]) -> serde_json::Value {
    let mut c = space.command(&["jobs", "--json"]);
    c.args(args);
    let shown = run(c, LIMIT);
    assert!(shown.status.success(), "{shown:?}");
    serde_json::from_str(&shown.stdout).unwrap_or_else(|e| panic!("{e}: {shown:?}"))
}

/// Job `id` once its status is no longer `pending`.
fn ended_job(space: &Space, id: i64) -> serde_json::Value {
    let deadline = Instant::now() + LIMIT;
    loop {
        let job = jobs(space, &[&id.to_string()]);
        if job["status"] != "pending" {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} still pending: {job}\nup said:\n{}{}",
            space.log("up"),
            space.log("up-restarted")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The attribute `name` of a job as `nixspace jobs --json ID` shows it.
fn attribute<'a>(job: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    job["attributes"]
        .as_array()
        .and_then(|a| a.iter().find(|a| a["name"] == name))
        .unwrap_or_else(|| panic!("no attribute {name} in {job}"))
}

/// What the first output of attribute `name` of `job` holds.
fn output_text(job: &serde_json::Value, name: &str) -> String {
    let out = attribute(job, name)["outputs"][0].as_str().unwrap();
    std::fs::read_to_string(out).unwrap()
}

/// `nix-store ARGS…` on the space's store.
fn nix_store(space: &Space, args: &[&str]) -> Finished {
    let mut c = space.nix("nix-store", None);
    c.args(args);
    run(c, LIMIT)
}

/// A release expression of shell steps `sh name script`, with `body` as its value.
pub(crate) fn release(space: &Space, file: &str, body: &str) -> std::path::PathBuf {
    let nonce = nonce();
    space.nix_file(
        file,
        &format!(
            r#"let sh = name: script: derivation {{
  inherit name;
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo {nonce} >/dev/null; ${{script}}" ];
}}; in {body}"#
        ),
    )
}

/// Submit a release expression, written to `file`, whose one job, `gated`, builds once the
/// returned gate file exists; return the gate and the job's number once the step is building
/// on the space's one worker (the submitter is gone by then).
pub(crate) fn submit_gated_job(space: &Space, file: &str) -> (std::path::PathBuf, i64) {
    let gate = space.tmp.path().join("gate");
    let file = release(
        space,
        file,
        &format!(
            r#"{{ gated = sh "gated" "while [ ! -e {} ]; do /bin/sleep 0.1; done; echo done > $out"; }}"#,
            gate.display()
        ),
    );
    let id = submit(space, &file, &[]);
    space.wait_for_status("the job's step building", |r| {
        r["workers"][0]["building"]
            .as_array()
            .is_some_and(|b| !b.is_empty())
    });
    (gate, id)
}

#[test]
fn a_job_whose_client_left_is_built_after_the_coordinator_was_killed_and_restarted() {
    let mut space = Space::start();
    let file = release(
        &space,
        "release.nix",
        r#"{
  hello = sh "hello" "echo hello > $out";
  nested = { world = sh "world" "echo world > $out"; nothing = null; };
}"#,
    );
    // No worker yet: the job waits, and the submitting process returns.
    let id = submit(&space, &file, &["--name", "release"]);
    let job = jobs(&space, &[&id.to_string()]);
    assert_eq!(job["status"], "pending", "{job}");
    assert_eq!(job["name"], "release", "{job}");
    // Hydra's walk: nested sets are recursed into, null is no job.
    let names: Vec<&str> = job["attributes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["hello", "nested.world"], "{job}");
    // The coordinator keeps the job's derivations from the garbage collector…
    let drv = attribute(&job, "hello")["drv"].as_str().unwrap().to_owned();
    let refused = nix_store(&space, &["--delete", &drv]);
    assert!(!refused.status.success(), "{refused:?}");
    assert!(refused.stderr.contains("still alive"), "{refused:?}");
    // …while an unrooted derivation is collected (the positive control).
    let loose = release(&space, "loose.nix", r#"sh "loose" "echo loose > $out""#);
    let mut instantiate = space.nix("nix-instantiate", None);
    instantiate.arg(&loose);
    let loose = run(instantiate, LIMIT);
    assert!(loose.status.success(), "{loose:?}");
    let deleted = nix_store(&space, &["--delete", loose.stdout.trim()]);
    assert!(deleted.status.success(), "{deleted:?}");

    space.kill_up();
    space.restart_up();
    space.worker("w1", &[]);
    let job = ended_job(&space, id);
    assert_eq!(job["status"], "built", "{job}");
    assert_eq!(job["steps_built"], 2, "{job}");
    assert_eq!(job["steps_queued"], 0, "{job}");
    for (name, content) in [("hello", "hello\n"), ("nested.world", "world\n")] {
        let outputs = attribute(&job, name)["outputs"].as_array().unwrap().clone();
        assert_eq!(outputs.len(), 1, "{job}");
        let out = outputs[0].as_str().unwrap();
        assert_eq!(std::fs::read_to_string(out).unwrap(), content);
        // The coordinator keeps the outputs too.
        let kept = nix_store(&space, &["--delete", out]);
        assert!(!kept.status.success(), "{kept:?}");
    }
    // The list shows the job with its progress.
    let listed = jobs(&space, &[]);
    let listed = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == id)
        .unwrap_or_else(|| panic!("job {id} not listed: {listed}"));
    assert_eq!(listed["status"], "built", "{listed}");
}

/// `nixspace cancel ID` against `space`.
fn cancel(space: &Space, id: i64) -> Finished {
    let mut c = space.command(&["cancel", "--dir"]);
    c.arg(space.dir()).arg(id.to_string());
    run(c, LIMIT)
}

/// Wait until some process's command line contains `needle` (`present`) or none does.
fn wait_for_process(needle: &str, present: bool) {
    let deadline = Instant::now() + LIMIT;
    while command_lines_with(&[needle.to_owned()]).is_empty() == present {
        assert!(
            Instant::now() < deadline,
            "{needle} never {}",
            if present { "started" } else { "stopped" }
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn cancelling_a_job_withdraws_its_demands_and_stops_its_running_step() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let long = unique_sleep(300);
    let short = unique_sleep(1);
    let cancelled = release(
        &space,
        "long.nix",
        &format!(r#"{{ long = sh "long" "{long}; echo done > $out"; }}"#),
    );
    let kept = release(
        &space,
        "short.nix",
        &format!(r#"{{ short = sh "short" "{short}; echo done > $out"; }}"#),
    );
    let cancelled = submit(&space, &cancelled, &[]);
    // The positive control's submitter stays until its job ends.
    let waiting = space
        .command(&["submit", "--wait", "--dir"])
        .arg(space.dir())
        .arg(&kept)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_process(&long, true);
    let done = cancel(&space, cancelled);
    assert!(done.status.success(), "{done:?}");
    // The running step stops: nobody demands it any more.
    wait_for_process(&long, false);
    let job = jobs(&space, &[&cancelled.to_string()]);
    assert_eq!(job["status"], "cancelled", "{job}");
    assert_eq!(attribute(&job, "long")["status"], "cancelled", "{job}");
    // A job that ended is not cancelled again.
    let again = cancel(&space, cancelled);
    assert_eq!(again.status.code(), Some(1), "{again:?}");
    assert!(again.stderr.contains("ended already"), "{again:?}");
    // Positive control: the job nobody cancelled is built, and its waiting submitter says so.
    let waited = wait_output(waiting, LIMIT);
    assert!(waited.status.success(), "{waited:?}");
    assert!(waited.stderr.contains("ended built"), "{waited:?}");
    let job = jobs(&space, &[waited.stdout.trim()]);
    assert_eq!(job["status"], "built", "{job}");
    assert_eq!(attribute(&job, "short")["status"], "built", "{job}");
}

#[test]
fn a_failing_attribute_shows_as_failed_with_its_log_tail() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let file = release(
        &space,
        "failing.nix",
        r#"rec {
  bad = sh "bad" "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do echo bad line $i; done; exit 3";
  after = sh "after" "/bin/cat ${bad} > $out";
  good = sh "good" "echo good > $out";
}"#,
    );
    // A waiting submitter stays until the job ends, and fails with it.
    let mut c = space.command(&["submit", "--wait", "--dir"]);
    c.arg(space.dir()).arg(&file);
    let waited = run(c, LIMIT);
    assert_eq!(waited.status.code(), Some(1), "{waited:?}");
    assert!(waited.stderr.contains("ended failed"), "{waited:?}");
    let id: i64 = waited.stdout.trim().parse().unwrap();
    let job = jobs(&space, &[&id.to_string()]);
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["steps_failed"], 2, "{job}");
    assert_eq!(job["steps_built"], 1, "{job}");
    let bad = attribute(&job, "bad");
    assert_eq!(bad["status"], "failed", "{job}");
    assert!(
        bad["error"].as_str().unwrap().contains("exit code 3"),
        "{job}"
    );
    // Nix's 10 lines: the last ones.
    let tail: Vec<&str> = bad["log_tail"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert_eq!(tail.len(), 10, "{job}");
    assert_eq!(tail.first(), Some(&"bad line 3"), "{job}");
    assert_eq!(tail.last(), Some(&"bad line 12"), "{job}");
    // A dependent fails with its input, and shows the input's log tail.
    let after = attribute(&job, "after");
    assert_eq!(after["status"], "failed", "{job}");
    assert!(after["error"].as_str().unwrap().contains("bad"), "{job}");
    assert_eq!(after["log_tail"], bad["log_tail"], "{job}");
    // Positive control: the independent attribute is built.
    let good = attribute(&job, "good");
    assert_eq!(good["status"], "built", "{job}");
    assert_eq!(good["log_tail"].as_array().map(Vec::len), Some(0), "{job}");
    // The text view shows the failure with its tail.
    let mut c = space.command(&["jobs", &id.to_string()]);
    c.arg("--limit").arg("5");
    let shown = run(c, LIMIT);
    assert!(shown.status.success(), "{shown:?}");
    assert!(shown.stdout.contains("bad: failed:"), "{shown:?}");
    assert!(shown.stdout.contains("    > bad line 12"), "{shown:?}");
}

#[test]
fn a_worker_capability_can_neither_submit_nor_cancel_a_job() {
    let space = Space::start();
    let file = release(
        &space,
        "kept.nix",
        r#"{ kept = sh "kept" "echo kept > $out"; }"#,
    );
    let id = submit(&space, &file, &[]);
    let forged = vec![
        build::CancelJob { job: id.into() }.unparse(),
        build::SubmitJob {
            submission: "forged".into(),
            name: "forged".into(),
            attributes: vec![build::JobAttribute {
                name: "a".into(),
                drv: fake_drv("forged-job"),
            }],
        }
        .unparse(),
    ];
    runtime().block_on(async {
        let _worker = Session::join(&route(&space, Role::Worker), forged)
            .await
            .expect("join as worker");
        for label in ["cancel-job", "submit-job"] {
            space.wait_for_log("up", &format!("value=<{label} "), ANSWER);
        }
    });
    let job = jobs(&space, &[&id.to_string()]);
    assert_eq!(job["status"], "pending", "{job}");
    assert_eq!(jobs(&space, &[]).as_array().map(Vec::len), Some(1));
    // Positive control: the submit capability cancels it.
    let cancelled = cancel(&space, id);
    assert!(cancelled.status.success(), "{cancelled:?}");
    assert_eq!(jobs(&space, &[&id.to_string()])["status"], "cancelled");
}

#[test]
fn a_submission_past_the_pending_jobs_cap_is_refused_until_one_ends() {
    let space = Space::start_with(&["--max-pending-jobs", "1"]);
    // No worker: the first job stays pending.
    let first = release(
        &space,
        "first.nix",
        r#"{ a = sh "first" "echo a > $out"; }"#,
    );
    let second = release(
        &space,
        "second.nix",
        r#"{ b = sh "second" "echo b > $out"; }"#,
    );
    let id = submit(&space, &first, &[]);
    let mut c = space.command(&["submit", "--dir"]);
    c.arg(space.dir()).arg(&second);
    let refused = run(c, LIMIT);
    assert!(!refused.status.success(), "{refused:?}");
    assert!(
        refused.stderr.contains("at most 1 pending jobs"),
        "{refused:?}"
    );
    assert_eq!(jobs(&space, &[]).as_array().map(Vec::len), Some(1));
    // Positive control: once the first has ended, the second is taken.
    let cancelled = cancel(&space, id);
    assert!(cancelled.status.success(), "{cancelled:?}");
    submit(&space, &second, &[]);
    assert_eq!(jobs(&space, &[]).as_array().map(Vec::len), Some(2));
}

#[test]
fn a_job_whose_step_was_building_when_the_coordinator_was_killed_is_built() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let sleep = unique_sleep(3);
    let file = release(
        &space,
        "midway.nix",
        &format!(
            r#"rec {{
  first = sh "first" "{sleep}; echo first > $out";
  second = sh "second" "/bin/cat ${{first}} > $out; echo second >> $out";
}}"#
        ),
    );
    let id = submit(&space, &file, &[]);
    wait_for_process(&sleep, true);
    space.kill_up();
    space.restart_up();
    let job = ended_job(&space, id);
    assert_eq!(job["status"], "built", "{job}");
    assert_eq!(output_text(&job, "second"), "first\nsecond\n");
}

/// `drv`'s record in `nixspace history --json`.
pub(crate) fn history_of(space: &Space, drv: &str) -> serde_json::Value {
    let shown = run(space.command(&["history", "--json"]), LIMIT);
    assert!(shown.status.success(), "{shown:?}");
    let steps: serde_json::Value = serde_json::from_str(&shown.stdout).unwrap();
    steps
        .as_array()
        .and_then(|s| s.iter().find(|s| s["drv"] == drv))
        .cloned()
        .unwrap_or_else(|| panic!("{drv} not in the history: {steps}"))
}

#[test]
fn a_step_finished_while_the_coordinator_was_down_is_not_left_running_in_the_history() {
    let mut space = Space::start_with(&["--rejoin-grace", "1"]);
    space.worker("w1", &[]);
    let (gate, id) = submit_gated_job(&space, "gated.nix");
    let job = jobs(&space, &[&id.to_string()]);
    let drv = attribute(&job, "gated")["drv"].as_str().unwrap().to_owned();
    let queried = nix_store(&space, &["--query", "--outputs", &drv]);
    assert!(queried.status.success(), "{queried:?}");
    let out = queried.stdout.trim().to_owned();
    // The build ends while the coordinator is down: the restarted job finds its output
    // valid and demands nothing, so nobody asks w1 for the step again.
    space.kill_up();
    std::fs::write(&gate, "").unwrap();
    let deadline = Instant::now() + LIMIT;
    while !nix_store(&space, &["--check-validity", &out])
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "{out} never became valid");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Before the restart, the attempt is open (the positive control).
    assert_eq!(
        history_of(&space, &drv)["attempts"][0]["outcome"],
        serde_json::Value::Null
    );
    space.restart_up();
    assert_eq!(ended_job(&space, id)["status"], "built");
    loop {
        let step = history_of(&space, &drv);
        let attempts = step["attempts"].as_array().unwrap();
        if attempts.iter().all(|a| !a["outcome"].is_null()) {
            assert_eq!(attempts.len(), 1, "{step}");
            assert_eq!(attempts[0]["worker"], "w1", "{step}");
            assert_eq!(attempts[0]["outcome"], "cancelled", "{step}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "an attempt is still open: {step}\nup said:\n{}",
            space.log("up-restarted")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_job_on_a_syndicate_server_outlives_a_killed_planner() {
    let mut space = ExternalSpace::start();
    let file = release(
        &space,
        "external.nix",
        r#"{ one = sh "one" "echo one > $out"; }"#,
    );
    let id = submit(&space, &file, &[]);
    space.restart_planner();
    space.worker("w1", &[]);
    let job = ended_job(&space, id);
    assert_eq!(job["status"], "built", "{job}");
    assert_eq!(output_text(&job, "one"), "one\n");
}

#[test]
fn malformed_and_oversized_submissions_are_refused_with_a_reason() {
    let space = Space::start();
    let submission = |id: &str, name: AnyValue, attributes: Vec<AnyValue>| {
        AnyValue::record(
            AnyValue::symbol("submit-job".to_owned()),
            vec![
                AnyValue::new(id.to_owned()),
                name,
                AnyValue::new(attributes),
            ],
        )
    };
    let attribute = |name: &str, drv: &str| {
        build::JobAttribute {
            name: name.into(),
            drv: drv.into(),
        }
        .unparse()
    };
    let good = attribute("a", &fake_drv("submitted"));
    let too_many: Vec<AnyValue> = (0..5_001)
        .map(|i| attribute(&format!("a{i}"), &fake_drv("many")))
        .collect();
    let asked = vec![
        submission("not-a-name", AnyValue::new(3), vec![good.clone()]),
        submission(
            "outside",
            AnyValue::new("job"),
            vec![attribute("a", "/etc/passwd")],
        ),
        submission("too-many", AnyValue::new("job"), too_many),
        // Positive control: a well-formed submission is accepted.
        submission("well-formed", AnyValue::new("job"), vec![good]),
    ];
    runtime().block_on(async {
        let s = Session::join(&route(&space, Role::Submit), asked)
            .await
            .expect("join as submit");
        let refused = |id: &str, reason: &str| {
            build::JobRefused {
                submission: id.into(),
                reason: reason.into(),
            }
            .unparse()
        };
        for expected in [
            refused("not-a-name", "a job's name must be a string"),
            refused(
                "outside",
                "attribute a: \"/etc/passwd\" is not a .drv path in /nix/store",
            ),
            refused(
                "too-many",
                "a job has 1 to 5000 attributes, this one has 5001",
            ),
        ] {
            assert!(
                s.wait_until(&expected, true).await,
                "never saw {expected:?}"
            );
        }
        let accepted = build::JobAccepted {
            submission: "well-formed".into(),
            job: 1.into(),
        }
        .unparse();
        assert!(s.wait_until(&accepted, true).await, "never accepted");
    });
    // Only the well-formed one was recorded.
    assert_eq!(jobs(&space, &[]).as_array().map(Vec::len), Some(1));
}
