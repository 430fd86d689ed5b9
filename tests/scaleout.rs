//! Scale-out: the dataspace in a standalone `syndicate-server` process (set
//! up by `nixspace server-config`), the planner joined to it with `nixspace
//! up --external`, workers and frontends as separate processes joining with
//! the route files. Needs `syndicate-server` installed (the tests fail saying
//! how when it is not).
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use nixspace_test_support::syndicate_server::ExternalSpace;

const BUILD_LIMIT: Duration = Duration::from_secs(180);

/// Build a 3 × 3 layered DAG plus a root (10 steps) on `space` and check that
/// it succeeded, each step was built once and the root output is valid.
fn build_a_small_dag(space: &ExternalSpace, runs_name: &str) {
    let runs = space.tmp.path().join(runs_name);
    let file = nixspace_test_support::layered_dag(space, 3, 3, &runs);
    let result = space.build(&file, BUILD_LIMIT);
    assert!(result.status.success(), "{result:?}");
    assert!(
        result.stderr.contains("10 of 10 derivations to build"),
        "{result:?}"
    );
    nixspace_test_support::assert_each_step_built_once(&runs, 10);
    let out = result.stdout.trim();
    assert_eq!(std::fs::read_to_string(out).expect("root output"), "root\n");
    let mut check = space.nix("nix-store", None);
    check.arg("--check-validity").arg(out);
    let valid = nixspace_test_support::run(check, Duration::from_secs(30));
    assert!(valid.status.success(), "root output not valid: {valid:?}");
}

#[test]
fn two_worker_processes_build_a_dag_on_a_syndicate_server() {
    let mut space = ExternalSpace::start();
    for w in ["w1", "w2"] {
        space.worker(w, &[]);
    }
    build_a_small_dag(&space, "runs");
    for w in ["w1", "w2"] {
        assert!(
            space.log(w).contains(" built "),
            "{w} built nothing:\n{}",
            space.log(w)
        );
    }
    // The dataspace was the server's: nixspace hosted nothing.
    assert!(!space.dir().join("nixspace.sock").exists());
    assert!(
        space.log("up").contains("worker joined"),
        "{}",
        space.log("up")
    );
}

#[test]
fn nix_build_through_the_translator_of_up_external_builds_on_the_server() {
    let (mut space, socket) = ExternalSpace::start_with_translator();
    space.worker("w1", &[]);
    let runs = space.tmp.path().join("runs");
    let file = nixspace_test_support::layered_dag(&space, 2, 2, &runs);
    let mut c = space.nix("nix-build", Some(&socket));
    c.arg(&file).arg("--no-out-link");
    let built = nixspace_test_support::run(c, BUILD_LIMIT);
    assert!(built.status.success(), "{built:?}");
    nixspace_test_support::assert_each_step_built_once(&runs, 5);
    let out = built.stdout.trim();
    assert_eq!(std::fs::read_to_string(out).expect("root output"), "root\n");
    assert!(space.log("w1").contains(" built "), "{}", space.log("w1"));
}

#[test]
fn a_worker_capability_on_the_server_cannot_demand() {
    let space = ExternalSpace::start();
    nixspace_test_support::dataspace::assert_a_worker_cannot_demand(&space);
}

#[test]
fn the_planner_and_workers_rejoin_a_restarted_server() {
    let mut space = ExternalSpace::start();
    space.worker("w1", &[]);
    space.kill_server();
    space.wait_for_log(
        "up",
        "planner lost the external dataspace",
        Duration::from_secs(20),
    );
    space.restart_server("syndicate-server-restarted");
    space.wait_for_log(
        "up",
        "planner joined the external dataspace (connection 2)",
        Duration::from_secs(30),
    );
    space.wait_for_log("w1", "rejoined the dataspace", Duration::from_secs(30));
    build_a_small_dag(&space, "runs-after-restart");
}

#[test]
fn a_restarted_planner_rejoins_the_server_and_plans_again() {
    let mut space = ExternalSpace::start();
    space.worker("w1", &[]);
    build_a_small_dag(&space, "runs-before");
    space.restart_planner();
    // The worker stayed joined to the server; the new planner learns it from there.
    space.wait_for_log("up-restarted", "worker joined", Duration::from_secs(20));
    build_a_small_dag(&space, "runs-after");
}

#[test]
fn a_build_running_while_the_planner_restarts_is_not_built_again() {
    let mut space = ExternalSpace::start();
    space.worker("w1", &[]);
    let runs = space.tmp.path().join("runs");
    let binding = nixspace_test_support::step_binding(
        "name: deps",
        "",
        &format!(
            "echo ${{name}} >> {}; /bin/sleep 3; echo ${{name}} $deps > $out",
            runs.display()
        ),
    );
    let file = space.nix_file(
        "slow.nix",
        &format!("let\n{binding}in\nstep \"top\" [ (step \"slow\" [ ]) ]\n"),
    );
    let build = space.spawn_build(&file);
    space.wait_for_log("w1", "building", BUILD_LIMIT);
    // The planner dies while `slow` builds; the worker keeps building and the next planner
    // grants the step back to it.
    space.restart_planner();
    let finished = nixspace_test_support::wait_output(build, BUILD_LIMIT);
    assert!(finished.status.success(), "{finished:?}");
    nixspace_test_support::assert_each_step_built_once(&runs, 2);
    let log = space.log("w1");
    assert!(
        log.contains("the planner went away; the build goes on"),
        "{log}"
    );
}

#[test]
fn the_planner_caps_demands_per_requester_on_the_server() {
    use nixspace_test_support::dataspace::{
        demand_by, fake_drv, poll_until, route, runtime, text, Session, ANSWER,
    };
    const CAP: usize = 3;
    let mut space = ExternalSpace::start_with(&["--max-demands-per-client", &CAP.to_string()]);
    space.worker("w1", &[]);
    let submit = route(&space, nixspace_space::Role::Submit);
    runtime().block_on(async {
        // A client holding more demands than the cap, for a system no worker has.
        // Positive control: after them on the same connection, one demand of another
        // requester, within its cap: once the planner found it unschedulable, it has
        // handled every demand before it.
        let control = fake_drv("hog-control");
        let hog: Vec<_> = (0..2 * CAP)
            .map(|i| demand_by(&fake_drv(&format!("hog-{i}")), "hog"))
            .chain([demand_by(&control, "control")])
            .collect();
        let hog = Session::join(&submit, hog).await.expect("join as submit");
        let control_planned = || {
            hog.with_label("unschedulable")
                .iter()
                .any(|u| text(u).contains(&control))
        };
        assert!(
            poll_until(ANSWER, control_planned).await,
            "the control demand was never planned"
        );
        let refusals = hog.with_label("demands-refused");
        assert_eq!(refusals.len(), 1, "{refusals:?}");
        let refusal = text(&refusals[0]);
        assert!(
            refusal.contains("\"hog\"")
                && refusal.contains(&format!("at most {CAP}"))
                && refusal.contains("--max-demands-per-client"),
            "{refusal}"
        );
        // Only the demands within the cap were planned (each found unschedulable), and the
        // control.
        assert_eq!(hog.with_label("unschedulable").len(), CAP + 1);

        // A frontend over the cap fails, saying so.
        let binding =
            nixspace_test_support::step_binding("name: deps", "", "echo ${name} $deps > $out");
        let five = space.nix_file(
            "five.nix",
            &format!(
                "let\n{binding}  a = step \"a\" [ ];\n  b = step \"b\" [ a ];\n  \
                 c = step \"c\" [ b ];\n  d = step \"d\" [ c ];\nin\nstep \"e\" [ d ]\n"
            ),
        );
        let refused = space.build(&five, BUILD_LIMIT);
        assert!(!refused.status.success(), "{refused:?}");
        assert!(
            refused.stderr.contains("too many demands from requester")
                && refused.stderr.contains(&format!("at most {CAP}")),
            "{refused:?}"
        );

        // Another frontend within the cap builds, while the hog is still over it.
        let two = space.nix_file(
            "two.nix",
            &format!("let\n{binding}  a = step \"a2\" [ ];\nin\nstep \"b2\" [ a ]\n"),
        );
        let built = space.build(&two, BUILD_LIMIT);
        assert!(built.status.success(), "{built:?}");
        assert!(
            hog.sees(&refusals[0]),
            "the refusal lasts while the hog is over the cap"
        );
        hog.leave();
    });
    space.wait_for_log(
        "up",
        "refused demands over the per-requester cap",
        Duration::from_secs(5),
    );
}
