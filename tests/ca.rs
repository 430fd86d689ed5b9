//! Floating content-addressed derivations (`ca-derivations`) built on the dataspace: steps
//! whose inputs are content-addressed are resolved as their inputs land, the resolved
//! derivations are built by workers, and the links are recorded.
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use nixspace_nix_formats::signature::{realisation_fingerprint, verify, PublicKeys};
use nixspace_test_support::dataspace::Session;
use nixspace_test_support::{run, step_binding, Space, CA_ATTRS};

const LIMIT: Duration = Duration::from_secs(120);

/// A diamond of floating content-addressed steps (`base` → `left`, `right` → `top`), each
/// appending its name to `runs` when its builder runs. `left` and `right` write the same
/// content, so they resolve `top`'s inputs to identical paths.
fn ca_diamond(space: &Space, runs: &std::path::Path, broken_base: bool) -> PathBuf {
    ca_diamond_under(space, runs, broken_base, "ca.nix", "top")
}

/// [`ca_diamond`] with `root` (an expression that may use `step` and `top`) built instead of
/// `top`, written to `file`.
fn ca_diamond_under(
    space: &Space,
    runs: &std::path::Path,
    broken_base: bool,
    file: &str,
    root: &str,
) -> PathBuf {
    let fail = if broken_base { "exit 3;" } else { "" };
    let binding = step_binding(
        "name: script: deps",
        CA_ATTRS,
        &format!(
            r#"echo ${{name}} >> {runs}
      {{ for d in $deps; do
        while IFS= read -r line; do echo "$line"; done < "$d"
      done; ${{script}}; }} > "$out""#,
            runs = runs.display()
        ),
    );
    space.nix_file(
        file,
        &format!(
            r#"
let
{binding}  base = step "base" "{fail} echo base" [ ];
  left = step "left" "echo side" [ base ];
  right = step "right" "echo side" [ base ];
  top = step "top" "echo top" [ left right ];
in
{root}
"#
        ),
    )
}

fn runs_of(runs: &std::path::Path) -> Vec<String> {
    let mut r: Vec<String> = std::fs::read_to_string(runs)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    r.sort();
    r
}

#[test]
fn a_content_addressed_diamond_is_resolved_and_built_once_per_step() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let runs = space.tmp.path().join("runs");
    let file = ca_diamond(&space, &runs, false);
    let built = space.build(&file, LIMIT);
    assert!(built.status.success(), "{built:?}");
    let out = built.stdout.trim();
    assert_eq!(
        std::fs::read_to_string(out).unwrap(),
        "base\nside\nbase\nside\ntop\n"
    );
    assert_eq!(runs_of(&runs), ["base", "left", "right", "top"]);

    // The history links each original to its resolved derivation, which is in the store
    // (rooted while the frontend ran) with its realisation registered by the build.
    let history = run(space.command(&["history", "--json"]), LIMIT);
    assert!(history.status.success(), "{history:?}");
    let steps: serde_json::Value = serde_json::from_str(&history.stdout).unwrap();
    let steps = steps.as_array().unwrap();
    let resolved: Vec<&serde_json::Value> =
        steps.iter().filter(|s| s["status"] == "resolved").collect();
    let names: Vec<&str> = resolved
        .iter()
        .map(|s| s["drv"].as_str().unwrap().rsplit('-').next().unwrap())
        .collect();
    assert_eq!(
        names.len(),
        3,
        "left, right and top are resolved: {steps:?}"
    );
    for original in resolved {
        let to = original["resolved_to"].as_str().unwrap();
        assert!(std::path::Path::new(to).exists(), "{to}");
        let target = steps.iter().find(|s| s["drv"] == to).unwrap();
        assert_eq!(target["status"], "built", "{target}");
        assert_eq!(target["resolved_from"][0], original["drv"]);
        assert_eq!(original["outputs"], target["outputs"]);
        let mut info = space.nix("nix", None);
        info.args(["realisation", "info", "--json", to]);
        let info = run(info, LIMIT);
        assert!(info.status.success(), "{info:?}");
        let output = target["outputs"][0].as_str().unwrap();
        let base = output.rsplit('/').next().unwrap();
        assert!(info.stdout.contains(base), "{info:?}");
    }
    // The planner recorded the originals' realisations.
    for original in steps.iter().filter(|s| s["status"] == "resolved") {
        let ids = original["realisations"].as_array().unwrap();
        assert!(
            ids.iter()
                .any(|id| id.as_str().unwrap().starts_with("sha256:")
                    && id.as_str().unwrap().ends_with("!out")),
            "{original}"
        );
    }
    // The originals' realisations are registered too: Nix finds the root's output.
    for original in steps.iter().filter(|s| s["status"] == "resolved") {
        let mut info = space.nix("nix", None);
        info.args([
            "realisation",
            "info",
            "--json",
            original["drv"].as_str().unwrap(),
        ]);
        let info = run(info, LIMIT);
        let output = original["outputs"][0].as_str().unwrap();
        let base = output.rsplit('/').next().unwrap();
        assert!(
            info.status.success() && info.stdout.contains(base),
            "{info:?}"
        );
    }
}

/// Two workers, `w1` and `w2`, each with a store of its own (as on other machines).
fn own_store_workers(space: &mut Space) {
    for worker in ["w1", "w2"] {
        let store = space.tmp.path().join(format!("{worker}-store"));
        space.worker(worker, &["--own-store", store.to_str().unwrap()]);
    }
}

/// `nixspace build FILE` on a space with [`own_store_workers`], which must succeed (else the
/// workers' logs say why).
fn built_on_own_stores(space: &Space, file: &std::path::Path) -> nixspace_test_support::Finished {
    let built = space.build(file, LIMIT);
    assert!(
        built.status.success(),
        "{built:?}\n{}\n{}",
        space.log("w1"),
        space.log("w2")
    );
    built
}

/// The output paths `nix realisation info` finds for `drv` in the local store.
fn realised_here(space: &Space, drv: &str) -> Vec<String> {
    store_realisations(space, drv)
        .iter()
        .filter_map(|r| r["outPath"].as_str())
        .map(|base| format!("/nix/store/{base}"))
        .collect()
}

/// `drv` (a `.drv` path) of the derivation `nix-instantiate` makes of `file`.
fn instantiate(space: &Space, file: &std::path::Path) -> String {
    let mut c = space.nix("nix-instantiate", None);
    c.arg(file);
    let made = run(c, LIMIT);
    assert!(made.status.success(), "{made:?}");
    made.stdout.trim().to_owned()
}

#[test]
fn a_content_addressed_diamond_builds_on_workers_with_stores_of_their_own() {
    let mut space = Space::start();
    own_store_workers(&mut space);
    let runs = space.tmp.path().join("runs");
    // A diamond whose outputs no earlier build made (content addressing would find them).
    let tag = nixspace_test_support::nonce();
    let file = ca_diamond_under(
        &space,
        &runs,
        false,
        "fresh.nix",
        &format!(
            r#"let b = step "base" "echo base-{tag}" [ ];
  l = step "left" "echo side" [ b ]; r = step "right" "echo side" [ b ];
in step "top" "echo top" [ l r ]"#
        ),
    );
    let built = built_on_own_stores(&space, &file);
    let out = built.stdout.trim();
    assert_eq!(
        std::fs::read_to_string(out).unwrap(),
        format!("base-{tag}\nside\nbase-{tag}\nside\ntop\n")
    );
    assert_eq!(runs_of(&runs), ["base", "left", "right", "top"]);
    // The root's realisation is registered here: Nix finds its output through it.
    let top = instantiate(&space, &file);
    let realised = realised_here(&space, &top);
    assert!(realised.iter().any(|p| p == out), "{realised:?}");
    // Only the root's output came here: the others stay in the workers' stores (the planner
    // resolved the derivations and sent them with the assignments; none was written here).
    let history = run(space.command(&["history", "--json"]), LIMIT);
    let steps: serde_json::Value = serde_json::from_str(&history.stdout).unwrap();
    let outputs: std::collections::BTreeSet<String> = steps
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["outputs"].as_array().cloned().unwrap_or_default())
        .filter_map(|o| o.as_str().map(str::to_owned))
        .collect();
    assert_eq!(outputs.len(), 4, "{steps}");
    for output in outputs.iter().filter(|o| *o != out) {
        assert!(
            !std::path::Path::new(output).exists(),
            "{output} was copied here: {built:?}"
        );
    }
}

#[test]
fn a_content_addressed_chain_through_an_input_addressed_step_builds_on_stores_of_their_own() {
    let mut space = Space::start();
    own_store_workers(&mut space);
    let runs = space.tmp.path().join("runs");
    let script = format!(
        "echo step >> {}; {{ for d in $deps; do /bin/cat $d; done; echo step; }} > $out",
        runs.display()
    );
    // `mid` is input-addressed on a content-addressed input: its output path is deferred.
    let file = space.nix_file(
        "mixed.nix",
        &format!(
            r#"
let
  mk = name: attrs: deps: derivation ({{
    inherit name deps; system = builtins.currentSystem; builder = "/bin/sh";
    args = [ "-c" "{script}" ];
  }} // attrs);
  ca = {{ {CA_ATTRS} }};
  base = mk "base" ca [ ];
  mid = mk "mid" {{ }} [ base ];
in
mk "top" ca [ mid ]
"#
        ),
    );
    let built = built_on_own_stores(&space, &file);
    let out = built.stdout.trim();
    assert_eq!(std::fs::read_to_string(out).unwrap(), "step\nstep\nstep\n");
    assert_eq!(runs_of(&runs), ["step", "step", "step"]);
}

#[test]
fn two_frontends_whose_originals_resolve_alike_build_it_once_on_stores_of_their_own() {
    let mut space = Space::start();
    own_store_workers(&mut space);
    let runs = space.tmp.path().join("runs");
    // `a1` and `a2` differ but write the same content: `c` over either resolves to the same
    // derivation, demanded by two frontends at once and built once.
    let binding = step_binding(
        "name: variant: deps",
        &format!("{CA_ATTRS} variant = toString variant;"),
        &format!(
            "echo ${{name}} >> {}; /bin/sleep 1; echo same > $out",
            runs.display()
        ),
    );
    let files: Vec<PathBuf> = [1, 2]
        .iter()
        .map(|variant| {
            space.nix_file(
                &format!("front-{variant}.nix"),
                &format!("let\n{binding}in\nstep \"c\" 0 [ (step \"a\" {variant} [ ]) ]\n"),
            )
        })
        .collect();
    let builds: Vec<_> = files.iter().map(|f| space.spawn_build(f)).collect();
    for build in builds {
        let finished = nixspace_test_support::wait_output(build, LIMIT);
        assert!(finished.status.success(), "{finished:?}");
    }
    assert_eq!(runs_of(&runs), ["a", "a", "c"]);
}

#[test]
fn nix_build_through_the_translator_resolves_on_stores_of_their_own() {
    let mut space = Space::start();
    own_store_workers(&mut space);
    let socket = space.translator();
    let runs = space.tmp.path().join("runs");
    let file = ca_diamond(&space, &runs, false);
    let mut c = space.nix("nix-build", Some(&socket));
    c.arg(&file).arg("--no-out-link");
    let built = run(c, LIMIT);
    assert!(
        built.status.success(),
        "{built:?}\n{}",
        space.log("translator")
    );
    let out = built.stdout.trim();
    assert_eq!(
        std::fs::read_to_string(out).unwrap(),
        "base\nside\nbase\nside\ntop\n"
    );
    assert_eq!(runs_of(&runs), ["base", "left", "right", "top"]);
}

/// A CA chain `base` (feature fa) → `top` (feature fb), each writing its input's content and
/// `<name>-<tag>` (then, for `base`, what the shell code `base_noise` prints) and appending
/// its name to `runs`: `base` is built on `w1`, which is then killed before any worker can
/// build `top`; `w2` (fb) and `w3` (fa) join, all with stores of their own. Returns how the
/// build ended, with the tag.
fn build_with_base_lost(
    space: &mut Space,
    runs: &std::path::Path,
    base_noise: &str,
) -> (nixspace_test_support::Finished, String) {
    let store = |space: &Space, w: &str| {
        let s = space.tmp.path().join(format!("{w}-store"));
        s.to_str().unwrap().to_owned()
    };
    // `base` needs feature fa (only w1, later w3), `top` feature fb (only w2, started after
    // w1 is killed): when `top` is built, no store has `base`'s output.
    let w1 = store(space, "w1");
    space.worker("w1", &["--features", "fa", "--own-store", &w1]);
    let tag = nixspace_test_support::nonce();
    let binding = step_binding(
        "name: features: noise: deps",
        &format!("{CA_ATTRS} requiredSystemFeatures = features;"),
        &format!(
            "echo ${{name}} >> {runs}; {{ for d in $deps; do /bin/cat $d; done; echo ${{name}}-{tag}; ${{noise}} }} > $out",
            runs = runs.display()
        ),
    );
    let file = space.nix_file(
        "lost.nix",
        &format!("let\n{binding}in\nstep \"top\" [ \"fb\" ] \"\" [ (step \"base\" [ \"fa\" ] \"{base_noise}\" [ ]) ]\n"),
    );
    let build = space.spawn_build(&file);
    let deadline = std::time::Instant::now() + LIMIT;
    while !space.log("w1").contains("built drv=") {
        assert!(std::time::Instant::now() < deadline, "{}", space.log("w1"));
        std::thread::sleep(Duration::from_millis(20));
    }
    space.kill_worker("w1");
    let (w2, w3) = (store(space, "w2"), store(space, "w3"));
    space.worker("w2", &["--features", "fb", "--own-store", &w2]);
    space.worker("w3", &["--features", "fa", "--own-store", &w3]);
    let finished = nixspace_test_support::wait_output(build, LIMIT);
    assert!(
        finished.status.success(),
        "{finished:?}\n{}\n{}",
        space.log("w2"),
        space.log("w3")
    );
    (finished, tag)
}

#[test]
fn a_content_addressed_input_lost_with_its_only_worker_is_built_again() {
    let mut space = Space::start();
    let runs = space.tmp.path().join("runs");
    let (finished, tag) = build_with_base_lost(&mut space, &runs, "");
    // Deterministic: built again with the same output, which `top` was resolved against.
    assert_eq!(
        std::fs::read_to_string(finished.stdout.trim()).unwrap(),
        format!("base-{tag}\ntop-{tag}\n")
    );
    assert_eq!(
        run_counts(&runs),
        [("base".to_owned(), 2), ("top".to_owned(), 1)].into()
    );
}

#[test]
fn a_lost_content_addressed_input_rebuilt_with_another_output_resolves_its_dependent_anew() {
    let mut space = Space::start();
    let runs = space.tmp.path().join("runs");
    let seen = space.tmp.path().join("seen");
    // `base` writes the time in nanoseconds (and notes it in `seen`): each build differs.
    let noise = format!(
        "n=$(/bin/date +%s%N); echo $n >> {}; echo $n;",
        seen.display()
    );
    let (finished, tag) = build_with_base_lost(&mut space, &runs, &noise);
    let seen: Vec<String> = std::fs::read_to_string(&seen)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_ne!(seen[0], seen[1]);
    // `top` was built against the second `base`, resolved anew.
    assert_eq!(
        std::fs::read_to_string(finished.stdout.trim()).unwrap(),
        format!("base-{tag}\n{}\ntop-{tag}\n", seen[1])
    );
    assert_eq!(
        run_counts(&runs),
        [("base".to_owned(), 2), ("top".to_owned(), 1)].into()
    );
    // The root's realisation registered here names the output the frontend got.
    let top = instantiate(&space, &space.tmp.path().join("lost.nix"));
    assert_eq!(realised_here(&space, &top), [finished.stdout.trim()]);
    // The planner replaced `base`'s realisation (lost) with the rebuild's, no conflict.
    let up = space.log("up");
    assert!(
        up.contains("withdrawing the realisation of a lost output"),
        "{up}"
    );
    assert!(
        !up.contains("names another path than the one recorded"),
        "{up}"
    );
}

#[test]
fn originals_that_resolve_alike_share_one_build() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let runs = space.tmp.path().join("runs");
    // `a1` and `a2` differ but write the same content, so `c` over either resolves to the
    // same derivation: built once (early cut-off).
    let binding = step_binding(
        "name: variant: deps",
        &format!("{CA_ATTRS} variant = toString variant;"),
        &format!("echo ${{name}} >> {}; echo same > $out", runs.display()),
    );
    let file = space.nix_file(
        "cutoff.nix",
        &format!(
            r#"
let
{binding}  c1 = step "c" 0 [ (step "a" 1 [ ]) ];
  c2 = step "c" 0 [ (step "a" 2 [ ]) ];
in
step "top" 0 [ c1 c2 ]
"#
        ),
    );
    let built = space.build(&file, LIMIT);
    assert!(built.status.success(), "{built:?}");
    assert_eq!(runs_of(&runs), ["a", "a", "c", "top"]);
}

#[test]
fn a_step_whose_input_failed_cannot_be_resolved() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let runs = space.tmp.path().join("runs");
    let file = ca_diamond(&space, &runs, true);
    // With --keep-going every step is followed to its end (without it the build stops at the
    // first failure): the steps the planner would resolve fail with the input they wait on,
    // named as the frontend knows it.
    let built = space.build_with(&file, &["--keep-going"], LIMIT);
    assert_eq!(built.status.code(), Some(1), "{built:?}");
    for step in ["left", "right"] {
        let line = built
            .stderr
            .lines()
            .find(|l| l.starts_with(&format!("error: {step}.drv")))
            .unwrap_or_else(|| panic!("{step} failed: {built:?}"));
        assert!(
            line.contains("dependency") && line.contains("-base.drv failed"),
            "{line}"
        );
    }
    assert_eq!(runs_of(&runs), ["base"]);
}

#[test]
fn nix_build_through_the_translator_resolves_content_addressed_steps() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let socket = space.translator();
    let runs = space.tmp.path().join("runs");
    let file = ca_diamond(&space, &runs, false);
    let mut c = space.nix("nix-build", Some(&socket));
    c.arg(&file).arg("--no-out-link");
    let built = run(c, LIMIT);
    assert!(built.status.success(), "{built:?}");
    let out = built.stdout.trim();
    assert_eq!(
        std::fs::read_to_string(out).unwrap(),
        "base\nside\nbase\nside\ntop\n"
    );
    assert_eq!(runs_of(&runs), ["base", "left", "right", "top"]);
    assert!(space.log("translator").contains("resolved"));
}

/// The steps of `runs` whose builder ran, by name, with how many times.
fn run_counts(runs: &std::path::Path) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for name in runs_of(runs) {
        *counts.entry(name).or_default() += 1;
    }
    counts
}

/// When, in a content-addressed chain `base` → `mid` → `top` (each step taking 2 s), the
/// coordinator is killed.
enum Crash {
    /// `base` is built: its realisation landed, `mid` is being resolved and scheduled.
    InputRealised,
    /// The resolved `mid` is building (the coordinator stays down until it is done).
    ResolvedBuilding,
    /// `mid` was just reported built, perhaps not recorded yet.
    JustBuilt,
}

/// Kill `nixspace up` (-9) at the moment `crash` names, restart it, and check that the build
/// still succeeds, every builder ran exactly once, and the history has one row per step with
/// the resolved links.
fn survive(crash: Crash) {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let runs = space.tmp.path().join("runs");
    let binding = step_binding(
        "name: deps",
        CA_ATTRS,
        &format!(
            "echo ${{name}} >> {}; /bin/sleep 2; echo ${{name}} $deps > $out",
            runs.display()
        ),
    );
    let file = space.nix_file(
        "chain.nix",
        &format!("let\n{binding}in\nstep \"top\" [ (step \"mid\" [ (step \"base\" [ ]) ]) ]\n"),
    );
    let build = space.spawn_build(&file);
    let (needle, times) = match crash {
        Crash::InputRealised => ("built drv=", 1),
        Crash::ResolvedBuilding => ("-mid.drv", 1),
        Crash::JustBuilt => ("built drv=", 2),
    };
    let deadline = std::time::Instant::now() + LIMIT;
    while space.log("w1").matches(needle).count() < times {
        assert!(std::time::Instant::now() < deadline, "{}", space.log("w1"));
        std::thread::sleep(Duration::from_millis(20));
    }
    space.kill_up();
    // Down long enough for a running build to finish while nobody listens.
    std::thread::sleep(Duration::from_secs(3));
    space.restart_up();
    let finished = nixspace_test_support::wait_output(build, LIMIT);
    assert!(finished.status.success(), "{finished:?}");
    assert_eq!(
        run_counts(&runs),
        [
            ("base".to_owned(), 1),
            ("mid".to_owned(), 1),
            ("top".to_owned(), 1)
        ]
        .into(),
        "every builder ran once"
    );
    let worker = space.log("w1");
    assert!(worker.contains("rejoined the dataspace"), "{worker}");
    if matches!(crash, Crash::ResolvedBuilding) {
        assert!(
            worker.contains("claiming a step built while the dataspace was away"),
            "{worker}"
        );
    }
    // The history survived: one row per step, links intact.
    let history = run(space.command(&["history", "--json"]), LIMIT);
    let steps: serde_json::Value = serde_json::from_str(&history.stdout).unwrap();
    let steps = steps.as_array().unwrap();
    let mut drvs: Vec<&str> = steps.iter().map(|s| s["drv"].as_str().unwrap()).collect();
    let all = drvs.len();
    drvs.sort_unstable();
    drvs.dedup();
    assert_eq!(drvs.len(), all, "no duplicate rows: {steps:?}");
    let resolved: Vec<&serde_json::Value> =
        steps.iter().filter(|s| s["status"] == "resolved").collect();
    assert_eq!(resolved.len(), 2, "mid and top were resolved: {steps:?}");
    for original in resolved {
        let to = original["resolved_to"].as_str().unwrap();
        assert!(steps.iter().any(|s| s["drv"] == to), "{steps:?}");
    }
}

#[test]
fn killing_the_coordinator_once_an_input_is_realised_loses_nothing() {
    survive(Crash::InputRealised);
}

#[test]
fn killing_the_coordinator_while_a_resolved_step_builds_loses_nothing() {
    survive(Crash::ResolvedBuilding);
}

#[test]
fn killing_the_coordinator_right_after_a_step_is_built_loses_nothing() {
    survive(Crash::JustBuilt);
}

/// The realisations `nix realisation info --json` finds in the local store for `drv`.
fn store_realisations(space: &Space, drv: &str) -> Vec<serde_json::Value> {
    let mut info = space.nix("nix", None);
    info.args(["realisation", "info", "--json", drv]);
    let info = run(info, LIMIT);
    assert!(info.status.success(), "{info:?}");
    let parsed: serde_json::Value = serde_json::from_str(&info.stdout).unwrap();
    parsed.as_array().cloned().unwrap_or_default()
}

/// Whether `realisation` (Nix's JSON) carries a valid signature by one of `keys`.
fn signed_by(realisation: &serde_json::Value, keys: &PublicKeys) -> bool {
    let fingerprint = realisation_fingerprint(
        realisation["id"].as_str().unwrap(),
        realisation["outPath"].as_str().unwrap(),
        &Default::default(),
    );
    realisation["signatures"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| verify(keys, &fingerprint, s.as_str().unwrap()))
}

#[test]
fn realisations_are_signed_by_their_builder_recorded_and_reused() {
    let mut space = Space::start();
    let keys = space.tmp.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let mut generate = std::process::Command::new("nix-store");
    generate
        .args(["--generate-binary-cache-key", "nixspace-test-1"])
        .arg(keys.join("secret"))
        .arg(keys.join("public"));
    assert!(run(generate, LIMIT).status.success());
    let public = PublicKeys::parse(&std::fs::read_to_string(keys.join("public")).unwrap()).unwrap();
    let secret = keys.join("secret");
    space.worker("w1", &["--signing-key", secret.to_str().unwrap()]);
    let runs = space.tmp.path().join("runs");
    let file = ca_diamond_under(
        &space,
        &runs,
        false,
        "ca.nix",
        r#"{ inherit top; extra = step "extra" "echo extra" [ top ]; }"#,
    );
    let built = space.build_with(&file, &["-A", "top"], LIMIT);
    assert!(built.status.success(), "{built:?}");
    let out = built.stdout.trim().to_owned();
    assert_eq!(runs_of(&runs), ["base", "left", "right", "top"]);

    // What the worker built carries its signature, in the store (where Nix itself
    // registered the realisation) and in the dataspace (the frontend registered it with the
    // signatures it found there), and our fingerprint is the one Nix checks.
    let history = run(space.command(&["history", "--json"]), LIMIT);
    let steps: serde_json::Value = serde_json::from_str(&history.stdout).unwrap();
    let steps = steps.as_array().unwrap().clone();
    let top = steps
        .iter()
        .find(|s| s["status"] == "resolved" && s["drv"].as_str().unwrap().ends_with("-top.drv"))
        .unwrap_or_else(|| panic!("top was resolved: {steps:?}"));
    let resolved_top = top["resolved_to"].as_str().unwrap();
    let realisations = store_realisations(&space, resolved_top);
    assert_eq!(realisations.len(), 1, "{realisations:?}");
    assert!(signed_by(&realisations[0], &public), "{realisations:?}");

    // The coordinator restarts: the planner asserts every recorded realisation again, with
    // the builder's signature.
    space.kill_up();
    space.restart_up();
    let route = nixspace_space::Route::read(&nixspace_space::Role::Submit.route_file(&space.dir()))
        .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let seen = runtime.block_on(async {
        let session = Session::join(&route, vec![]).await.expect("join");
        let seen = session.with_label("realisation");
        session.leave();
        seen
    });
    let id = realisations[0]["id"].as_str().unwrap();
    let again = seen
        .iter()
        .map(nixspace_test_support::dataspace::text)
        .find(|r| r.contains(id))
        .unwrap_or_else(|| panic!("the restarted planner asserts {id}: {seen:?}"));
    assert!(again.contains("nixspace-test-1:"), "{again}");
    // The builders' realisations only: a frontend asserts none (it registers the originals'
    // in its own store, checked below), and the planner takes them from no one else.
    assert_eq!(seen.len(), 4, "base, left, right and top: {seen:?}");

    // Nothing left to build: the store has the realisations, so no worker is needed at all.
    space.signal_worker("w1", rustix::process::Signal::KILL);
    let again = space.build_with(&file, &["-A", "top"], LIMIT);
    assert!(again.status.success(), "{again:?}");
    assert!(again.stderr.contains("nothing to build"), "{again:?}");
    assert_eq!(again.stdout.trim(), out);

    // A new step over the realised diamond: only it is built, resolved against the
    // realisations found in the store.
    space.worker("w2", &[]);
    let built = space.build_with(&file, &["-A", "extra"], LIMIT);
    assert!(built.status.success(), "{built:?}");
    assert!(
        built.stderr.contains("1 of 5 derivations to build"),
        "{built:?}"
    );
    assert_eq!(runs_of(&runs), ["base", "extra", "left", "right", "top"]);
    let content = std::fs::read_to_string(built.stdout.trim()).unwrap();
    assert!(content.ends_with("top\nextra\n"), "{content}");
}

#[test]
fn an_input_realised_on_a_worker_is_not_built_again_for_a_new_dependent() {
    let mut space = Space::start();
    own_store_workers(&mut space);
    let runs = space.tmp.path().join("runs");
    let tag = nixspace_test_support::nonce();
    let file = ca_diamond_under(
        &space,
        &runs,
        false,
        "later.nix",
        &format!(r#"{{ inherit top; later = step "later" "echo later-{tag}" [ left ]; }}"#),
    );
    let first = space.build_with(&file, &["-A", "top"], LIMIT);
    assert!(first.status.success(), "{first:?}");
    assert_eq!(runs_of(&runs), ["base", "left", "right", "top"]);
    // `left`'s output is only in a worker's store, its realisation only in the dataspace.
    let later = space.build_with(&file, &["-A", "later"], LIMIT);
    assert!(
        later.status.success(),
        "{later:?}\n{}\n{}",
        space.log("w1"),
        space.log("w2")
    );
    assert_eq!(runs_of(&runs), ["base", "later", "left", "right", "top"]);
}
