//! End-to-end: a dataspace as one remote builder for an unmodified Nix client. The client has
//! a store of its own and builds nothing itself (`--max-jobs 0`); its `builders` line names an
//! ssh-ng store whose remote side is `nixspace translate --stdio` (an `ssh` on PATH that runs
//! the remote command stands in for sshd). The client copies each step's inputs, sends the
//! derivation inline with BuildDerivation (never the `.drv`) and copies the outputs back; the
//! translator, holding the trusted route, vouches for each derivation and the steps build on
//! the dataspace's workers.
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nixspace_test_support::{
    counted_step_bindings, layered_dag_with, nixspace_bin, run, Finished, Space,
};

const LIMIT: Duration = Duration::from_secs(240);

/// The steps of the DAG the first test builds: `LAYERS` layers of `WIDTH` steps, each on every
/// step of the layer below, plus one root: 100 steps, the issue's target (the client opens an
/// ssh-ng session per step).
const LAYERS: usize = 9;
const WIDTH: usize = 11;

/// A fake `ssh` first on PATH, and the client's store.
struct Client {
    fake_ssh: PathBuf,
    store: String,
}

impl Client {
    fn new(space: &Space) -> Client {
        let fake_ssh =
            nixspace_test_support::fake_ssh(&space.scratch_dir("fake-ssh")).expect("fake ssh");
        let store = space.scratch_dir("client-store").display().to_string();
        Client { fake_ssh, store }
    }

    /// `nix-build FILE` on the client's store, building only on the dataspace through an
    /// ssh-ng builder offering `features`; `translate` are extra arguments of the remote
    /// `nixspace translate --stdio`.
    fn nix_build(&self, space: &Space, file: &Path, features: &str, translate: &str) -> Command {
        let program = format!(
            "{} translate --dir {} {translate}",
            nixspace_bin().display(),
            space.dir().display()
        );
        let builders = format!(
            "ssh-ng://localhost?remote-program={} {} - 64 1 {features}",
            program.replace(' ', "%20"),
            nixspace_nix_tools::current_system()
        );
        let rest = std::env::var_os("PATH").unwrap_or_default();
        let path = std::env::join_paths(
            std::iter::once(self.fake_ssh.clone()).chain(std::env::split_paths(&rest)),
        )
        .expect("PATH");
        let mut c = space.nix("nix-build", None);
        c.env("PATH", path)
            .env("NIX_REMOTE", "local")
            .args(["--store", &self.store, "--no-out-link", "--max-jobs", "0"])
            .args(["--builders", &builders])
            .arg(file);
        c
    }
}

/// The Nix file of one trivial derivation `name` with the extra attributes `attrs`.
fn one_step(space: &Space, name: &str, attrs: &str) -> PathBuf {
    let text = format!(
        r#"derivation {{
  name = "{name}";
  nonce = "{}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  {attrs}
  args = [ "-c" "echo > $out" ];
}}
"#,
        nixspace_test_support::nonce()
    );
    space.nix_file(&format!("{name}.nix"), &text)
}

/// How many steps worker `id` started, from its log.
fn built_by(space: &Space, id: &str) -> usize {
    space
        .log(id)
        .lines()
        .filter(|l| l.contains("building"))
        .count()
}

#[test]
fn a_nix_client_builds_a_dag_through_an_ssh_ng_builder_on_two_workers() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    space.worker("w2", &[]);
    let client = Client::new(&space);
    let runs = space.scratch_dir("runs").join("runs");
    let file = layered_dag_with(&space, LAYERS, WIDTH, &runs, "/bin/sleep 0.5;");
    let built = run(client.nix_build(&space, &file, "", ""), LIMIT);
    assert!(built.status.success(), "{built:?}");
    let root = built.stdout.trim();
    assert!(root.ends_with("-root"), "{built:?}");
    // The output is valid in the client's store, copied back by Nix.
    let mut check = space.nix("nix-store", None);
    check.args(["--store", &client.store, "--check-validity", root]);
    let checked = run(check, LIMIT);
    assert!(checked.status.success(), "{checked:?}");
    // Every step was built on the dataspace, once, spread over both workers.
    nixspace_test_support::assert_each_step_built_once(&runs, LAYERS * WIDTH + 1);
    let (w1, w2) = (built_by(&space, "w1"), built_by(&space, "w2"));
    assert_eq!(w1 + w2, LAYERS * WIDTH + 1, "w1 {w1}, w2 {w2}");
    assert!(w1 > 0 && w2 > 0, "w1 built {w1}, w2 built {w2}");
}

#[test]
fn the_client_build_survives_a_worker_killed_mid_build() {
    let mut space = Space::start_with(&["--retry-backoff", "0.2"]);
    space.worker("w1", &[]);
    let client = Client::new(&space);
    let runs = space.scratch_dir("runs").join("runs");
    let file = space.nix_file(
        "slow.nix",
        &format!(
            "let\n{}in step \"slow\" [ ]\n",
            counted_step_bindings(&runs, "/bin/sleep 4;")
        ),
    );
    let command = client.nix_build(&space, &file, "", "");
    let build = std::thread::spawn(move || run(command, LIMIT));
    // The builder runs on w1 (it appended its name) when w1 is killed.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(&runs)
        .unwrap_or_default()
        .is_empty()
    {
        assert!(std::time::Instant::now() < deadline, "{}", space.log("w1"));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(built_by(&space, "w1") > 0, "{}", space.log("w1"));
    space.worker("w2", &[]);
    space.kill_worker("w1");
    let built: Finished = build.join().expect("build thread");
    assert!(built.status.success(), "{built:?}");
    assert!(built.stdout.trim().ends_with("-slow"), "{built:?}");
    // The positive control of the kill: w1 started it, and w2 built it again.
    assert!(built_by(&space, "w2") > 0, "{}", space.log("w2"));
    let started = std::fs::read_to_string(&runs).expect("runs");
    assert!(started.lines().count() >= 2, "{started}");
}

#[test]
fn a_step_no_worker_can_build_fails_at_the_client_with_the_reason() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let client = Client::new(&space);
    let file = one_step(
        &space,
        "needs-a-feature",
        r#"requiredSystemFeatures = [ "nixspace-test-feature" ];"#,
    );
    let failed = run(
        client.nix_build(
            &space,
            &file,
            "nixspace-test-feature",
            "--wait-for-workers 2",
        ),
        LIMIT,
    );
    assert!(!failed.status.success(), "{failed:?}");
    assert!(
        failed.stderr.contains("nixspace-test-feature"),
        "the reason names the feature: {failed:?}"
    );
    // The positive control: the same client builds a step without the feature.
    let plain = one_step(&space, "plain", "");
    let built = run(client.nix_build(&space, &plain, "", ""), LIMIT);
    assert!(built.status.success(), "{built:?}");
}

#[test]
fn a_trusted_clients_unsigned_input_reaches_a_worker_with_a_store_of_its_own() {
    let mut space = Space::start();
    let own = space.scratch_dir("w1-store").display().to_string();
    space.worker("w1", &["--own-store", &own]);
    let client = Client::new(&space);
    let nonce = nixspace_test_support::nonce();
    let file = space.nix_file(
        "input.nix",
        &format!(
            r#"rec {{
  input = derivation {{
    name = "local-input";
    nonce = "{nonce}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "echo local > $out" ];
  }};
  top = derivation {{
    name = "top";
    nonce = "{nonce}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "read line < ${{input}}; echo $line > $out" ];
  }};
}}
"#
        ),
    );
    // The input is built here, by Nix alone, so no key signs it, and the client gets a copy.
    let mut local = space.nix("nix-build", None);
    local.args(["--no-out-link", "-A", "input"]).arg(&file);
    let input = run(local, LIMIT);
    assert!(input.status.success(), "{input:?}");
    let input = input.stdout.trim().to_owned();
    let mut copy = space.nix("nix", None);
    copy.args(["--extra-experimental-features", "nix-command", "copy"])
        .args(["--no-check-sigs", "--to", &client.store, &input]);
    let copied = run(copy, LIMIT);
    assert!(copied.status.success(), "{copied:?}");
    // The client's step on it builds on w1, which fetches the input from the translator's
    // store: the translator vouches for what its trusted client gave it.
    let mut top = client.nix_build(&space, &file, "", "");
    top.args(["-A", "top"]);
    let built = run(top, LIMIT);
    assert!(built.status.success(), "{built:?}\n{}", space.log("w1"));
    assert!(built.stdout.trim().ends_with("-top"), "{built:?}");
    assert!(built_by(&space, "w1") > 0, "{}", space.log("w1"));
}
