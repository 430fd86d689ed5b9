//! A client's build settings honoured on the worker: `nixspace build --max-silent-time`,
//! `--timeout`, `--check` (and `nix-build --option max-silent-time` through the translator)
//! reach the worker's Nix, which fails the build as Nix says.
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use nixspace_test_support::{nonce, run, Space};

const LIMIT: Duration = Duration::from_secs(120);

/// A step that prints nothing for three seconds, then succeeds (a new one on each call).
fn quiet_step(space: &Space) -> PathBuf {
    space.sh_derivation(
        &format!("quiet-{}.nix", nonce()),
        &format!("quiet-{}", nonce()),
        "/bin/sleep 3; echo done > $out",
    )
}

#[test]
fn max_silent_time_fails_a_quiet_step_on_the_worker() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let silenced = space.build_with(&quiet_step(&space), &["--max-silent-time", "1"], LIMIT);
    assert!(!silenced.status.success(), "{silenced:?}");
    assert!(
        silenced
            .stderr
            .contains("timed out after 1 seconds of silence"),
        "{silenced:?}"
    );
    // Positive control: without the limit, the same kind of step builds.
    let built = space.build(&quiet_step(&space), LIMIT);
    assert!(built.status.success(), "{built:?}");
}

#[test]
fn timeout_fails_a_long_step_on_the_worker() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let timed_out = space.build_with(&quiet_step(&space), &["--timeout", "1"], LIMIT);
    assert!(!timed_out.status.success(), "{timed_out:?}");
    assert!(
        timed_out.stderr.contains("timed out after 1 seconds"),
        "{timed_out:?}"
    );
    assert!(!timed_out.stderr.contains("of silence"), "{timed_out:?}");
    let built = space.build_with(&quiet_step(&space), &["--timeout", "60"], LIMIT);
    assert!(built.status.success(), "{built:?}");
}

#[test]
fn check_rebuilds_a_valid_step_and_finds_non_determinism() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let same = space.sh_derivation("same.nix", &format!("same-{}", nonce()), "echo same > $out");
    let first = space.build_with(&same, &["--no-out-link"], LIMIT);
    assert!(first.status.success(), "{first:?}");
    let checked = space.build_with(&same, &["--no-out-link", "--check"], LIMIT);
    assert!(checked.status.success(), "{checked:?}");
    // The check built the step again, on the worker.
    assert_eq!(
        space.log("w1").matches(" built ").count(),
        2,
        "{}",
        space.log("w1")
    );

    // The builder's process id differs from one build to the next.
    let differs = space.sh_derivation(
        "differs.nix",
        &format!("differs-{}", nonce()),
        "echo $$ > $out",
    );
    let first = space.build_with(&differs, &["--no-out-link"], LIMIT);
    assert!(first.status.success(), "{first:?}");
    let checked = space.build_with(&differs, &["--no-out-link", "--check"], LIMIT);
    assert!(!checked.status.success(), "{checked:?}");
    assert!(
        checked.stderr.contains("may not be deterministic"),
        "{checked:?}"
    );
}

#[test]
fn check_on_a_worker_with_a_store_of_its_own_compares_with_the_outputs_here() {
    // The worker's store lacks the outputs the check compares with (they were built on
    // another worker and copied here): it fetches them first, as it fetches inputs.
    let mut space = Space::start();
    let store = space.tmp.path().join("w1-store");
    let store = store.to_str().expect("utf-8").to_owned();
    space.worker("w0", &[]);
    let same = space.sh_derivation("same.nix", &format!("same-{}", nonce()), "echo same > $out");
    let differs = space.sh_derivation(
        "differs.nix",
        &format!("differs-{}", nonce()),
        "echo $$ > $out",
    );
    for file in [&same, &differs] {
        let first = space.build_with(file, &["--no-out-link"], LIMIT);
        assert!(first.status.success(), "{first:?}");
    }
    space.kill_worker("w0");
    space.worker("w1", &["--own-store", &store]);
    let checked = space.build_with(&same, &["--no-out-link", "--check"], LIMIT);
    assert!(checked.status.success(), "{checked:?}\n{}", space.log("w1"));
    assert_eq!(
        space.log("w1").matches(" built ").count(),
        1,
        "{}",
        space.log("w1")
    );
    // Positive control: the comparison really happened on that worker.
    let checked = space.build_with(&differs, &["--no-out-link", "--check"], LIMIT);
    assert!(!checked.status.success(), "{checked:?}");
    assert!(
        checked.stderr.contains("may not be deterministic"),
        "{checked:?}"
    );
}

#[test]
fn nix_build_max_silent_time_through_the_translator() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let socket = space.translator();
    let mut c = space.nix("nix-build", Some(&socket));
    c.arg(quiet_step(&space))
        .args(["--no-out-link", "--option", "max-silent-time", "1"]);
    let silenced = run(c, LIMIT);
    assert!(!silenced.status.success(), "{silenced:?}");
    assert!(
        silenced
            .stderr
            .contains("timed out after 1 seconds of silence"),
        "{silenced:?}"
    );
    let mut c = space.nix("nix-build", Some(&socket));
    c.arg(quiet_step(&space)).arg("--no-out-link");
    let built = run(c, LIMIT);
    assert!(built.status.success(), "{built:?}");
}
