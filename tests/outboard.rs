//! The outboard-toolchains example (`examples/outboard-toolchains`), run as a separate
//! process: a store that starts empty receives the closure an input root's symlink points
//! into, fetched through the dataspace from the worker that has it, and the symlinked
//! program runs there; the closure is shared in the dataspace and reused.
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nixspace_protocol::store;
use nixspace_space::{Role, Route};
use nixspace_test_support::dataspace::Session;
use nixspace_test_support::{nonce, run, KillOnDrop, Space};
use preserves_schema::Unparse;

const LIMIT: Duration = Duration::from_secs(120);

/// A Nix file for the toolchain: `tool`, whose `bin/tool` prints the contents of its
/// dependency `dep` (so `tool` refers to `dep`; `(import file).dep` is `dep`).
fn toolchain_file(space: &Space) -> PathBuf {
    space.nix_file(
        "toolchain.nix",
        &format!(
            r#"let
  nonce = "{nonce}";
  dep = derivation {{
    name = "dep";
    inherit nonce;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "echo toolchain-data > $out" ];
  }};
in derivation {{
  name = "tool";
  inherit nonce dep;
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" ''
    /bin/mkdir -p $out/bin
    printf '#!/bin/sh\n/bin/cat %s\n' "$dep" > $out/bin/tool
    /bin/chmod +x $out/bin/tool
  '' ];
}}
"#,
            nonce = nonce()
        ),
    )
}

/// The output path of `expr` (a Nix expression), evaluated without building.
fn out_path(space: &Space, expr: &str) -> String {
    let mut e = space.nix("nix-instantiate", None);
    e.args(["--eval", "--json", "-E", expr]);
    let evaluated = run(e, LIMIT);
    assert!(evaluated.status.success(), "{evaluated:?}");
    evaluated.stdout.trim().trim_matches('"').to_owned()
}

/// The toolchain built with plain `nix-build` in the machine's store, signed with the shared
/// worker's key (as the store's owner signs what it builds for others), with a nonce for
/// which `tool` sorts before `dep`: a store fetching paths in order then meets `dep` first
/// as `tool`'s reference, and must not fetch it again. Returns `tool` and `dep`.
fn toolchain(space: &Space) -> (String, String) {
    let (file, tool, dep) = (0..64)
        .map(|_| {
            let file = toolchain_file(space);
            let import = format!("(import {})", file.display());
            let tool = out_path(space, &format!("{import}.outPath"));
            let dep = out_path(space, &format!("{import}.dep.outPath"));
            (file, tool, dep)
        })
        .find(|(_, tool, dep)| tool < dep)
        .expect("a nonce with tool before dep");
    let mut b = space.nix("nix-build", None);
    b.arg(&file)
        .arg("--no-out-link")
        .args(["--option", "secret-key-files"])
        .arg(space.dir().join("worker.key"));
    let built = run(b, LIMIT);
    assert!(built.status.success(), "{built:?}");
    assert_eq!(built.stdout.trim(), tool);
    let mut q = space.nix("nix-store", None);
    q.args(["-qR", &tool]);
    let closure = run(q, LIMIT);
    assert_eq!(
        closure.stdout.lines().collect::<BTreeSet<_>>(),
        BTreeSet::from([tool.as_str(), dep.as_str()]),
        "{closure:?}"
    );
    (tool, dep)
}

/// An input root (`<tmp>/<name>`) holding `bin/tool`, a symlink to `target`.
fn input_root(space: &Space, name: &str, target: &str) -> PathBuf {
    let root = space.tmp.path().join(name);
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::os::unix::fs::symlink(target, root.join("bin/tool")).unwrap();
    root
}

/// The example filling the store kept in `store` for `root`, with the test's Nix
/// configuration.
fn outboard(space: &Space, root: &Path, store: &Path, extra: &[&str]) -> Command {
    let example =
        Path::new(nixspace_test_support::nixspace_bin()).with_file_name("outboard-toolchains");
    assert!(
        example.exists(),
        "{} missing: build the workspace's binaries first (./setup.sh test does)",
        example.display()
    );
    let mut c = Command::new(example);
    c.arg("--route")
        .arg(Role::Worker.route_file(&space.dir()))
        .arg("--input-root")
        .arg(root)
        .arg("--own-store")
        .arg(store)
        .args(extra)
        .env("NIX_CONF_DIR", space.tmp.path().join("nix-conf"))
        .env_remove("NIX_REMOTE")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    c
}

/// Start `c` (which keeps running) and return it with what it printed up to and including
/// its `ready:` line; its stderr goes to `<tmp>/<log>.log`.
fn start_until_ready(space: &Space, mut c: Command, log: &str) -> (KillOnDrop, Vec<String>) {
    let log_path = space.tmp.path().join(format!("{log}.log"));
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .expect("spawn the example");
    let stdout = child.stdout.take().expect("stdout");
    let child = KillOnDrop(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Read to the end: a closed pipe would make the example's writes fail.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    while !lines
        .last()
        .is_some_and(|l: &String| l.starts_with("ready:"))
    {
        match rx.recv_timeout(LIMIT) {
            Ok(line) => lines.push(line),
            Err(_) => panic!("no ready line: {lines:?}\n{}", space.log(log)),
        }
    }
    (child, lines)
}

#[test]
fn an_empty_store_receives_the_toolchain_closure_and_runs_the_action() {
    let mut space = Space::start();
    let (tool, dep) = toolchain(&space);
    // The worker shares the machine's store, so it serves the toolchain.
    space.worker("w1", &[]);
    let root = input_root(&space, "input", &format!("{tool}/bin/tool"));
    let cold = space.tmp.path().join("cold");
    assert!(!cold.exists());

    let (mut example, lines) = start_until_ready(
        &space,
        outboard(&space, &root, &cold, &["--keep-serving"]),
        "example",
    );
    assert!(
        lines.contains(&format!("closure {tool}: 2 paths (computed)")),
        "{lines:?}"
    );
    for path in [&tool, &dep] {
        assert!(lines.contains(&format!("fetched {path}")), "{lines:?}");
    }
    assert!(
        lines
            .last()
            .unwrap()
            .starts_with("ready: 2 paths valid, 2 fetched"),
        "{lines:?}"
    );
    // Each path was fetched once, from the worker (the toolchain's references first).
    let log = space.log("example");
    let fetches: Vec<&str> = log.lines().filter(|l| l.contains(" fetched ")).collect();
    assert_eq!(fetches.len(), 2, "{log}");
    assert!(fetches.iter().all(|l| l.contains("from=w1")), "{log}");
    assert!(fetches[0].contains(&dep), "{log}");

    // Both paths are valid in the cold store (checked by Nix there), and the action runs in
    // its namespace; in another empty store it cannot.
    let check = format!("nix-store --check-validity {tool} {dep}");
    let valid = run(space.in_other_store(&cold, &check), LIMIT);
    assert!(valid.status.success(), "{valid:?}");
    let action = root.join("bin/tool").display().to_string();
    let ran = run(space.in_other_store(&cold, &action), LIMIT);
    assert!(ran.status.success(), "{ran:?}");
    assert_eq!(ran.stdout, "toolchain-data\n");
    let elsewhere = space.tmp.path().join("elsewhere");
    let failed = run(space.in_other_store(&elsewhere, &action), LIMIT);
    assert!(!failed.status.success(), "{failed:?}");

    // The closure is in the dataspace, for anybody to see, while the first run serves.
    assert!(
        example.0.try_wait().unwrap().is_none(),
        "{}",
        space.log("example")
    );
    let mut closure = vec![tool.clone(), dep.clone()];
    closure.sort();
    let record = store::Closure {
        path: tool.clone(),
        paths: closure,
    }
    .unparse();
    let route = Route::read(&Role::Submit.route_file(&space.dir())).expect("route file");
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let session = runtime
        .block_on(Session::join(&route, vec![]))
        .expect("join");
    assert!(session.sees(&record), "{:?}", session.with_label("closure"));
    session.leave();

    // A second run on the same store reuses that closure and fetches nothing.
    let again = run(outboard(&space, &root, &cold, &[]), LIMIT);
    assert!(again.status.success(), "{again:?}");
    assert!(
        again
            .stdout
            .contains(&format!("closure {tool}: 2 paths (from the dataspace)")),
        "{again:?}"
    );
    assert!(
        again.stdout.contains("ready: 2 paths valid, 0 fetched"),
        "{again:?}"
    );
    assert!(!again.stdout.contains("fetched /"), "{again:?}");
}

#[test]
fn a_symlink_to_a_path_nobody_has_is_a_clear_error() {
    let space = Space::start();
    let nowhere = format!("/nix/store/{}-nowhere", "0".repeat(32));
    let root = input_root(&space, "input", &format!("{nowhere}/bin/tool"));
    let cold = space.tmp.path().join("cold");
    let failed = run(
        outboard(&space, &root, &cold, &["--patience", "2"]),
        Duration::from_secs(30),
    );
    assert!(!failed.status.success(), "{failed:?}");
    assert!(
        failed.stderr.contains(&format!(
            "cannot find the closure of {nowhere}: no store in the dataspace has {nowhere}"
        )),
        "{failed:?}"
    );
}

#[test]
fn a_missing_input_root_is_a_clear_error() {
    let space = Space::start();
    let missing = space.tmp.path().join("missing");
    let failed = run(
        outboard(&space, &missing, &space.tmp.path().join("cold"), &[]),
        Duration::from_secs(30),
    );
    assert_eq!(failed.status.code(), Some(1), "{failed:?}");
    assert!(
        failed
            .stderr
            .contains(&format!("error: cannot read {}", missing.display())),
        "{failed:?}"
    );
}
