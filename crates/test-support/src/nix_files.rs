//! Nix expressions for tests: fresh nonces (so derivations are new in the shared store),
//! sleeping builders and DAGs of counted trivial steps.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::space::Space;

/// A fresh string that makes a test's derivations unique in the shared store.
pub fn nonce() -> String {
    use rand::Rng;
    format!("{:016x}", rand::thread_rng().gen::<u64>())
}

/// A derivation whose builder sleeps (by absolute path: builders have no
/// PATH). Returns the file and strings that identify its processes: the
/// marker (in `nix-store`'s and `sh`'s command lines) and the sleep itself.
pub fn sleeper(space: &Space, seconds: u32) -> (PathBuf, Vec<String>) {
    let marker = format!("sleeper-{}", nonce());
    let sleep = unique_sleep(seconds);
    let file = space.sh_derivation(
        "sleeper.nix",
        &marker,
        &format!("echo started {marker}; {sleep}; echo done > $out"),
    );
    (file, vec![marker, format!("{sleep} ")])
}

/// The command line of a `/bin/sleep` of `seconds` (and a fraction far below a millisecond)
/// that no other test's sleep has: the fraction carries this process's id and a count of
/// the calls, so a test finds its own sleep among the machine's processes while other tests
/// of this program or of another one sleep as long.
pub fn unique_sleep(seconds: u32) -> String {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    format!("/bin/sleep {seconds}.0000{}{call:06}", std::process::id())
}

/// Check that the builder runs logged in `runs` (one step name a line, appended by each
/// builder) are `expected` many, all of different steps.
pub fn assert_each_step_built_once(runs: &Path, expected: usize) {
    let log = std::fs::read_to_string(runs).expect("runs file");
    let mut names: Vec<&str> = log.lines().collect();
    assert_eq!(names.len(), expected, "builder runs:\n{log}");
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), expected, "a step was built twice:\n{log}");
}

/// A layered DAG of `layers` × `width` trivial steps plus one root; every
/// builder run appends the step's name to `runs` (outside the store), so the
/// test can count builder runs.
pub fn layered_dag(space: &Space, layers: usize, width: usize, runs: &Path) -> PathBuf {
    layered_dag_with(space, layers, width, runs, "")
}

/// [`layered_dag`] whose builders also run the shell code `extra` (e.g. a sleep).
pub fn layered_dag_with(
    space: &Space,
    layers: usize,
    width: usize,
    runs: &Path,
    extra: &str,
) -> PathBuf {
    let text = format!(
        r#"
let
{step}  layer = n: prev: builtins.genList (i: step "l${{toString n}}-${{toString i}}" prev) {width};
  layers = builtins.foldl' (acc: n: acc ++ [ (layer n (if acc == [ ] then [ ] else builtins.elemAt acc (n - 1))) ]) [ ] (builtins.genList (n: n) {layers});
in step "root" (builtins.elemAt layers ({layers} - 1))
"#,
        step = counted_step_bindings(runs, extra),
    );
    space.nix_file("dag.nix", &text)
}

/// Nix bindings (for a `let`) of a fresh `nonce` and `step = name: deps: derivation …`: a
/// trivial step whose builder appends its name to `runs` (outside the store, so tests can
/// count builder runs), runs the shell code `extra` (which may use `${name}`), then writes
/// its output.
pub fn counted_step_bindings(runs: &Path, extra: &str) -> String {
    format!(
        r#"  nonce = "{nonce}";
  step = name: deps: derivation {{
    inherit name nonce deps;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "echo ${{name}} >> {runs}; {extra} echo ${{name}} > $out" ];
  }};
"#,
        nonce = nonce(),
        runs = runs.display(),
    )
}

/// Nix attributes that make a derivation floating content-addressed.
pub const CA_ATTRS: &str =
    r#"__contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256";"#;

/// A Nix `let` binding `step = PARAMS: derivation { … };` (PARAMS must include `name` and
/// `deps`): a fresh `nonce`, `/bin/sh` running `script` (Nix string text: it may use
/// `${name}`, `$deps` and `$out`), plus the Nix attributes `attrs`.
pub fn step_binding(params: &str, attrs: &str, script: &str) -> String {
    format!(
        r#"  step = {params}: derivation {{
    inherit name deps;
    nonce = "{nonce}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    {attrs}
    args = [ "-c" ''
      {script}
    '' ];
  }};
"#,
        nonce = nonce()
    )
}

/// Shell code for [`step_binding`]: append the step's name to `runs` (outside the store, so
/// tests count builder runs), then write the name and the input paths to `$out` (so the
/// output refers to its inputs).
pub fn counted_referring_script(runs: &Path) -> String {
    format!(
        "echo ${{name}} >> {}; echo ${{name}} $deps > $out",
        runs.display()
    )
}

/// A DAG of steps by name (Nix identifiers), each with the names of its dependencies
/// (sorted); `root` is the step built.
pub type Dag = std::collections::BTreeMap<String, Vec<String>>;

/// The file in a worker's own store (`DIR/nix/worker`, seen by its builders as `/nix/worker`)
/// that names the worker: each store is mounted on `/nix` only in its worker's namespace.
const WORKER_FILE: &str = "worker";

/// Write the file that tells the builders running in the own store `store` (a worker's
/// `--own-store DIR`) the name of their worker.
pub fn name_store(store: &Path, worker: &str) {
    let nix = store.join("nix");
    std::fs::create_dir_all(&nix).expect("store directory");
    std::fs::write(nix.join(WORKER_FILE), worker).expect("worker name file");
}

/// Write `file`, the Nix file of `dag`: each builder appends `start NAME WORKER MS` to `runs`
/// (WORKER: the worker whose store it runs in, as [`name_store`] wrote it; MS: the time in
/// milliseconds since the epoch), sleeps `sleep` seconds, writes its name and its inputs'
/// paths to `$out`, then appends `done NAME WORKER MS`.
pub fn marked_dag_file(space: &Space, file: &str, dag: &Dag, runs: &Path, sleep: &str) -> PathBuf {
    let binding = step_binding(
        "name: deps",
        "",
        &format!(
            "me=$(/bin/cat /nix/{WORKER_FILE})
      echo start ${{name}} $me $(/bin/date +%s%3N) >> {runs}
      /bin/sleep {sleep}
      echo ${{name}} $deps > $out
      echo done ${{name}} $me $(/bin/date +%s%3N) >> {runs}",
            runs = runs.display()
        ),
    );
    // `let` bindings are recursive: their order does not matter.
    let steps: String = dag
        .iter()
        .map(|(name, deps)| format!("  {name} = step \"{name}\" [ {} ];\n", deps.join(" ")))
        .collect();
    space.nix_file(file, &format!("let\n{binding}{steps}in\nroot\n"))
}

/// Milliseconds since the epoch (the clock of [`marked_dag_file`]'s runs file).
pub fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Check every output in the closure of `root_out` (built from [`marked_dag_file`]): one per
/// step of `dag`, each naming its step and referring to exactly the outputs of that step's
/// dependencies.
pub fn check_dag_outputs(space: &Space, root_out: &str, dag: &Dag) {
    let mut closure = space.nix("nix-store", None);
    closure.args(["-qR", root_out]);
    let closure = crate::run(closure, std::time::Duration::from_secs(60));
    assert!(closure.status.success(), "{closure:?}");
    let name_of = |path: &str| -> String {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        text.split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    let mut seen = std::collections::BTreeSet::new();
    for path in closure.stdout.lines() {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let mut words = text.split_whitespace();
        let name = words.next().expect("a name").to_owned();
        let mut inputs: Vec<String> = words.map(name_of).collect();
        inputs.sort();
        let expected = dag
            .get(&name)
            .unwrap_or_else(|| panic!("unknown step {name} in {path}"));
        assert_eq!(&inputs, expected, "inputs of {name} ({path})");
        assert!(seen.insert(name.clone()), "two outputs for {name}");
    }
    assert_eq!(
        seen.len(),
        dag.len(),
        "outputs in the closure of {root_out}"
    );
}
