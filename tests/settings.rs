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

/// `nix-store --verify-path PATH` on the local store: whether its contents are as registered.
fn verifies(path: &str) -> bool {
    let mut c = std::process::Command::new("nix-store");
    c.args(["--verify-path", path]);
    run(c, LIMIT).status.success()
}

/// Make the store path `path` writable and add a file to it (its NAR hash changes).
fn corrupt(path: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(format!("{path}/corruption"), "bad").unwrap();
}

#[test]
fn repair_rebuilds_a_corrupted_path_of_the_output_closure() {
    repair_rebuilds_a_corrupted_path(None);
}

#[test]
fn repair_on_a_worker_with_a_store_of_its_own_replaces_the_corrupted_path_here() {
    repair_rebuilds_a_corrupted_path(Some("own-store"));
}

/// Build a root whose output refers to its input's, corrupt the input's output here, and
/// repair it, with one worker sharing this store or (`own_store`: the directory's name) with
/// a store of its own, from which the repaired path is copied over the corrupted one.
fn repair_rebuilds_a_corrupted_path(own_store: Option<&str>) {
    let mut space = Space::start();
    // Nix 2.8 with `ca-derivations` enabled takes an output with a realisation to be valid
    // without checking its contents, so it never repairs one: this test runs without it (as
    // most installations do), for its workers and frontends alike.
    let conf = space.tmp.path().join("nix-conf/nix.conf");
    let text = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(
        &conf,
        text.replace("nix-command ca-derivations", "nix-command"),
    )
    .unwrap();
    let store = own_store.map(|name| space.tmp.path().join(name));
    match &store {
        Some(store) => space.worker("w1", &["--own-store", store.to_str().unwrap()]),
        None => space.worker("w1", &[]),
    }
    let tag = nonce();
    // The root refers to its input's output at run time: the input is in its output closure.
    let file = space.nix_file(
        "closure.nix",
        &format!(
            r#"let
  input = derivation {{
    name = "input-{tag}"; system = builtins.currentSystem; builder = "/bin/sh";
    args = [ "-c" "/bin/mkdir $out; echo good > $out/file" ];
  }};
in derivation {{
  name = "root-{tag}"; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ "-c" "echo ${{input}} > $out" ];
}}"#
        ),
    );
    let built = space.build_with(&file, &["--no-out-link"], LIMIT);
    assert!(built.status.success(), "{built:?}");
    let root = built.stdout.trim().to_owned();
    let input = std::fs::read_to_string(&root).unwrap().trim().to_owned();
    assert!(verifies(&input), "{input} verifies after the build");

    // A build without --repair does nothing: the root's outputs are valid.
    corrupt(&input);
    assert!(!verifies(&input), "the corruption shows (positive control)");
    let plain = space.build_with(&file, &["--no-out-link"], LIMIT);
    assert!(plain.status.success(), "{plain:?}");
    assert!(!verifies(&input), "a plain build repairs nothing");

    let repaired = space.build_with(&file, &["--no-out-link", "--repair"], LIMIT);
    assert!(
        repaired.status.success(),
        "{repaired:?}\n{}",
        space.log("w1")
    );
    assert!(verifies(&input), "{input} repaired\n{}", space.log("w1"));
    assert_eq!(
        std::fs::read_to_string(format!("{input}/file")).unwrap(),
        "good\n"
    );
    assert!(!std::path::Path::new(&format!("{input}/corruption")).exists());
    // Only the corrupted input was built again, not the root (its contents are good).
    assert!(
        repaired.stderr.contains(&format!("input-{tag}"))
            && !repaired.stderr.contains(&format!("building root-{tag}")),
        "{repaired:?}"
    );
}
