//! End-to-end: what Nix's daemon does after each build, done by the translator for steps
//! built on workers: the `post-build-hook` of its nix.conf run once per built step with the
//! step's `DRV_PATH` and `OUT_PATHS`, the outputs signed with its `secret-key-files`, and a
//! failing hook failing the build in Nix's words. Real `nixspace` processes, real Nix.
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nixspace_test_support::{nonce, run, Finished, Space};

const LIMIT: Duration = Duration::from_secs(120);

/// Write `file`: a two-step build (`top` reads `base`'s output), unique to this call.
fn two_steps(space: &Space, file: &str) -> PathBuf {
    let n = nonce();
    space.nix_file(
        file,
        &format!(
            r#"let
  base = derivation {{
    name = "hook-base-{n}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "echo base > $out" ];
  }};
in derivation {{
  name = "hook-top-{n}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "/bin/cat ${{base}} > $out; echo top >> $out" ];
}}"#
        ),
    )
}

/// Write an executable shell script `name` in the test directory.
fn script(space: &Space, name: &str, text: &str) -> PathBuf {
    let path = space.tmp.path().join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{text}\n")).unwrap();
    let executable = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755);
    std::fs::set_permissions(&path, executable).unwrap();
    path
}

/// `nix-build file --no-out-link` through the translator at `socket`.
fn nix_build(space: &Space, socket: &Path, file: &Path) -> Finished {
    let mut c = space.nix("nix-build", Some(socket));
    c.arg(file).arg("--no-out-link");
    run(c, LIMIT)
}

/// The lines of `program args` run against the local store; it must succeed.
fn lines_of(space: &Space, program: &str, args: &[&str]) -> Vec<String> {
    let mut c = space.nix(program, None);
    c.args(args);
    let out = run(c, LIMIT);
    assert!(out.status.success(), "{program} {args:?}: {out:?}");
    out.stdout.lines().map(str::to_owned).collect()
}

/// `DRV_PATH OUT_PATHS` of each step of the two-step build in `file`, as the hook is expected
/// to see them.
fn expected_hook_lines(space: &Space, file: &Path) -> BTreeSet<String> {
    let file = file.to_str().unwrap();
    let top = lines_of(space, "nix-instantiate", &[file]).remove(0);
    let base: Vec<String> = lines_of(space, "nix-store", &["-q", "--references", &top])
        .into_iter()
        .filter(|p| p.ends_with(".drv"))
        .collect();
    assert_eq!(base.len(), 1, "{base:?}");
    [top, base[0].clone()]
        .into_iter()
        .map(|drv| {
            let outputs = lines_of(space, "nix-store", &["-q", "--outputs", &drv]).join(" ");
            format!("{drv} {outputs}")
        })
        .collect()
}

#[test]
fn the_hook_runs_once_per_built_step_with_its_paths() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let record = space.tmp.path().join("hook-record");
    let hook = script(
        &space,
        "hook",
        &format!("echo \"$DRV_PATH $OUT_PATHS\" >> {}", record.display()),
    );
    let hooked =
        space.translator_with("hooked", &format!("post-build-hook = {}\n", hook.display()));
    let file = two_steps(&space, "hooked.nix");
    let built = nix_build(&space, &hooked, &file);
    assert!(built.status.success(), "{built:?}");
    let seen: Vec<String> = std::fs::read_to_string(&record)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(
        seen.into_iter().collect::<BTreeSet<_>>(),
        expected_hook_lines(&space, &file)
    );

    // Control: without a hook, nothing writes the record.
    std::fs::remove_file(&record).unwrap();
    let plain = space.translator_with("plain", "");
    let built = nix_build(&space, &plain, &two_steps(&space, "plain.nix"));
    assert!(built.status.success(), "{built:?}");
    assert!(!record.exists(), "the hook ran without being configured");
}

#[test]
fn a_failing_hook_fails_the_build_in_nix_words() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let hook = script(&space, "failing-hook", "exit 1");
    let socket =
        space.translator_with("hooked", &format!("post-build-hook = {}\n", hook.display()));
    let built = nix_build(&space, &socket, &two_steps(&space, "failing.nix"));
    assert!(!built.status.success(), "{built:?}");
    assert!(
        built.stderr.contains(&format!(
            "program '{}' failed with exit code 1",
            hook.display()
        )),
        "{built:?}"
    );
}

/// Whether `nix store verify` accepts `path` with one signature by the key `public`.
fn signed_by(space: &Space, public: &str, path: &str) -> Finished {
    let mut c = space.nix("nix", None);
    c.args([
        "store",
        "verify",
        "--sigs-needed",
        "1",
        "--trusted-public-keys",
        public,
        path,
    ]);
    run(c, LIMIT)
}

#[test]
fn built_outputs_are_signed_with_the_secret_key_files() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let (secret, public) = (space.tmp.path().join("sk"), space.tmp.path().join("pk"));
    let mut c = space.nix("nix-store", None);
    c.args(["--generate-binary-cache-key", "nixspace-test-1"])
        .arg(&secret)
        .arg(&public);
    let generated = run(c, LIMIT);
    assert!(generated.status.success(), "{generated:?}");
    let public = std::fs::read_to_string(&public).unwrap();
    let public = public.trim();

    let signing = space.translator_with(
        "signing",
        &format!("secret-key-files = {}\n", secret.display()),
    );
    let file = two_steps(&space, "signed.nix");
    let built = nix_build(&space, &signing, &file);
    assert!(built.status.success(), "{built:?}");
    for line in expected_hook_lines(&space, &file) {
        for output in line.split(' ').skip(1) {
            let verified = signed_by(&space, public, output);
            assert!(verified.status.success(), "{output}: {verified:?}");
        }
    }

    // Control: built without the key, the outputs carry no signature by it.
    let plain = space.translator_with("plain", "");
    let file = two_steps(&space, "unsigned.nix");
    let built = nix_build(&space, &plain, &file);
    assert!(built.status.success(), "{built:?}");
    let top = built.stdout.trim();
    let verified = signed_by(&space, public, top);
    assert!(!verified.status.success(), "{top}: {verified:?}");
}
