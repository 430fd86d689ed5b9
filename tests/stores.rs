//! Workers with Nix stores of their own (a private mount namespace each, as on separate
//! machines): inputs travel between stores through the dataspace, results come back to the
//! frontend's store, and nothing crosses without its hash checked.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::{command_lines_with, nonce, run, wait_output, Space};

const LIMIT: Duration = Duration::from_secs(120);

/// Workers `w1` (feature `fa`) and `w2` (feature `fb`), each with a store of its own under
/// the test directory. Those stores' directories.
fn own_store_workers(space: &mut Space) -> (PathBuf, PathBuf) {
    let (s1, s2) = (space.tmp.path().join("w1"), space.tmp.path().join("w2"));
    for (id, feature, store) in [("w1", "fa", &s1), ("w2", "fb", &s2)] {
        let store = store.to_str().expect("utf-8 path");
        space.worker(id, &["--features", feature, "--own-store", store]);
    }
    (s1, s2)
}

/// A two-step chain whose steps need different features: `first` (feature `fa`) and
/// `second` (feature `fb`) reading `first`'s output.
fn split_chain(space: &Space) -> PathBuf {
    space.nix_file(
        "split.nix",
        &format!(
            r#"
let
  step = name: features: deps: derivation {{
    inherit name deps;
    nonce = "{nonce}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    requiredSystemFeatures = features;
    args = [ "-c" ''
      for d in $deps; do
        while IFS= read -r line; do echo "$line"; done < "$d"
      done > "$out"
      echo "${{name}}" >> "$out"
    '' ];
  }};
  first = step "first" [ "fa" ] [ ];
in
step "second" [ "fb" ] [ first ]
"#,
            nonce = nonce()
        ),
    )
}

/// Whether `path` (a `/nix/store/…` path) is present in the own store kept in `dir`.
fn in_own_store(dir: &Path, path: &str) -> bool {
    dir.join(path.trim_start_matches('/')).exists()
}

#[test]
fn workers_with_their_own_stores_pass_inputs_and_return_outputs() {
    let mut space = Space::start();
    let (s1, s2) = own_store_workers(&mut space);
    let file = split_chain(&space);

    let built = space.build(&file, LIMIT);
    assert!(built.status.success(), "{built:?}");
    let out = built.stdout.trim();
    assert!(out.ends_with("-second"), "{built:?}");
    // The result is valid in the frontend's store, with the right content.
    assert_eq!(std::fs::read_to_string(out).unwrap(), "first\nsecond\n");
    let mut verify = space.nix("nix-store", None);
    verify.args(["--verify-path", out]);
    let verify = run(verify, LIMIT);
    assert!(verify.status.success(), "{verify:?}");

    // w1 built `first`, w2 fetched it from w1 to build `second`; neither store saw the
    // other's build directly, and only w2 has `second`.
    let (log1, log2) = (space.log("w1"), space.log("w2"));
    assert!(
        log1.contains("-first.drv") && log1.contains(" built "),
        "{log1}"
    );
    assert!(
        log2.contains("-second.drv") && log2.contains(" built "),
        "{log2}"
    );
    assert!(
        log2.lines()
            .any(|l| l.contains("fetched") && l.contains("-first ") && l.contains("w1")),
        "{log2}"
    );
    // The frontend copied the result back from w2.
    assert!(
        built
            .stderr
            .lines()
            .any(|l| l.contains("fetched") && l.contains("w2")),
        "{built:?}"
    );
    assert!(in_own_store(&s2, out), "second is in w2's store");
    assert!(!in_own_store(&s1, out), "second never reached w1's store");
}

/// One step that sleeps `seconds` on a worker whose store holds the file
/// `/nix/var/nixspace-test-slow`, and finishes at once elsewhere. Returns the file and the
/// sleep's command line (to find it among the processes).
fn slow_somewhere(space: &Space, seconds: u32) -> (PathBuf, String) {
    let sleep = format!("/bin/sleep {seconds}.{}", std::process::id());
    let file = space.nix_file(
        "slow.nix",
        &format!(
            r#"derivation {{
  name = "slow-somewhere";
  nonce = "{nonce}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "if [ -e /nix/var/nixspace-test-slow ]; then {sleep}; fi; echo done > $out" ];
}}"#,
            nonce = nonce()
        ),
    );
    (file, sleep)
}

#[test]
fn a_faster_idle_worker_steals_a_slow_step_and_the_slow_build_stops() {
    let mut space = Space::start_with(&["--steal-after", "1"]);
    let (s1, s2) = (space.tmp.path().join("slow"), space.tmp.path().join("fast"));
    std::fs::create_dir_all(s1.join("nix/var")).unwrap();
    std::fs::write(s1.join("nix/var/nixspace-test-slow"), "").unwrap();
    let (file, sleep) = slow_somewhere(&space, 90);
    let own = |dir: &Path| dir.to_str().unwrap().to_owned();
    space.worker("slow", &["--speed", "1", "--own-store", &own(&s1)]);
    let build = space.spawn_build(&file);
    space.wait_for_log("slow", "building", LIMIT);

    // The fast worker joins while the slow one builds, and steals the step.
    space.worker("fast", &["--speed", "4", "--own-store", &own(&s2)]);
    // Well before the slow build could have finished.
    let built = wait_output(build, Duration::from_secs(60));
    assert!(built.status.success(), "{built:?}");
    let out = built.stdout.trim();
    assert_eq!(std::fs::read_to_string(out).unwrap(), "done\n");

    let (slow, fast) = (space.log("slow"), space.log("fast"));
    assert!(
        fast.contains("stealing a step") && fast.contains(" built "),
        "{fast}"
    );
    assert!(!slow.contains(" built "), "{slow}");
    assert!(slow.contains("assignment withdrawn"), "{slow}");
    assert!(space.log("up").contains("stolen"), "{}", space.log("up"));
    // The slow build is stopped and its slot is free again.
    space.wait_for_status("the slow worker's slot to be free", |r| {
        r["workers"]
            .as_array()
            .is_some_and(|ws| ws.iter().any(|w| w["id"] == "slow" && w["slots_used"] == 0))
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !command_lines_with(std::slice::from_ref(&sleep)).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the slow build still runs"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn nix_build_through_the_translator_gets_results_from_workers_with_their_own_stores() {
    let mut space = Space::start();
    let (s1, s2) = own_store_workers(&mut space);
    let socket = space.translator();
    let file = split_chain(&space);
    let result = space.tmp.path().join("result");

    let mut c = space.nix("nix-build", Some(&socket));
    c.arg(&file).arg("-o").arg(&result);
    let built = run(c, LIMIT);
    assert!(built.status.success(), "{built:?}");
    // The result symlink resolves in the client's store, which never built anything.
    assert_eq!(std::fs::read_to_string(&result).unwrap(), "first\nsecond\n");
    let out = built.stdout.trim();
    assert!(in_own_store(&s2, out) && !in_own_store(&s1, out));
    let translator = space.log("translator");
    assert!(
        translator
            .lines()
            .any(|l| l.contains("fetched") && l.contains("-second") && l.contains("w2")),
        "{translator}"
    );
}
