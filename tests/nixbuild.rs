//! `nixspace build` as `nix-build`: its arguments (`--arg`, `--argstr`, `-I`, several `-A`,
//! `--keep-going`, `-o`), its out-links as garbage collector roots, and Nix's top-down
//! pruning and substitution before building.
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use nixspace_test_support::{nonce, run, Finished, Space, NIX_CONF};

const LIMIT: Duration = Duration::from_secs(120);

/// `nix-store ARGS…` on the space's store.
fn nix_store(space: &Space, args: &[&str]) -> Finished {
    let mut c = space.nix("nix-store", None);
    c.args(args);
    run(c, LIMIT)
}

/// The output path of attribute `attr` of `file`.
fn output_of(space: &Space, file: &Path, attr: &str) -> String {
    let mut c = space.nix("nix-instantiate", None);
    c.arg(file).args(["-A", attr]);
    let drv = run(c, LIMIT);
    assert!(drv.status.success(), "{drv:?}");
    let out = nix_store(space, &["-q", "--outputs", drv.stdout.trim()]);
    assert!(out.status.success(), "{out:?}");
    out.stdout.trim().to_owned()
}

/// How many steps the space's worker `id` built.
pub(crate) fn built_by(space: &Space, id: &str) -> usize {
    space.log(id).matches(" built ").count()
}

/// A Nix file of shell steps: `sh name script deps`.
fn steps_file(space: &Space, name: &str, body: &str) -> std::path::PathBuf {
    space.nix_file(
        name,
        &format!(
            r#"
let
  sh = name: script: deps: derivation {{
    inherit name deps;
    nonce = "{nonce}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
  }};
in {body}
"#,
            nonce = nonce()
        ),
    )
}

#[test]
fn arg_argstr_and_search_path_reach_the_evaluation() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let dir = space.tmp.path().join("foo-dir");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("val.nix"), "\"from-foo\"").unwrap();
    let name = format!("named-{}", nonce());
    let file = space.nix_file(
        "f.nix",
        r#"{ name, n }: derivation {
  inherit name;
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo ${toString (n * 2)} ${import <foo/val.nix>} > $out" ];
}"#,
    );
    let include = format!("foo={}", dir.display());
    let result = space.build_with(
        &file,
        &["--argstr", "name", &name, "--arg", "n", "3", "-I", &include],
        LIMIT,
    );
    assert!(result.status.success(), "{result:?}");
    let out = result.stdout.trim();
    assert!(out.ends_with(&format!("-{name}")), "{result:?}");
    assert_eq!(std::fs::read_to_string(out).unwrap(), "6 from-foo\n");
}

#[test]
fn two_attrs_are_two_roots_linked_as_nix_build_links_them() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let file = steps_file(
        &space,
        "two.nix",
        r#"{ a = sh "root-a" "echo a > $out" [ ]; b = sh "root-b" "echo b > $out" [ ]; }"#,
    );
    let result = space.build_with(&file, &["-A", "a", "-A", "b"], LIMIT);
    assert!(result.status.success(), "{result:?}");
    let outputs: Vec<&str> = result.stdout.lines().collect();
    assert_eq!(outputs.len(), 2, "{result:?}");
    let (a, b) = (output_of(&space, &file, "a"), output_of(&space, &file, "b"));
    assert!(outputs.contains(&a.as_str()) && outputs.contains(&b.as_str()));
    let link = space.tmp.path().join("result");
    let link2 = space.tmp.path().join("result-2");
    assert_eq!(std::fs::read_link(&link).unwrap().to_str().unwrap(), a);
    assert_eq!(std::fs::read_link(&link2).unwrap().to_str().unwrap(), b);
    // nix-store lists the links as roots, as it lists nix-build's.
    let roots = nix_store(&space, &["--gc", "--print-roots"]);
    assert!(roots.status.success(), "{roots:?}");
    assert!(
        roots.stdout.contains(&format!("{} -> {a}", link.display())),
        "{roots:?}"
    );
    assert!(
        roots
            .stdout
            .contains(&format!("{} -> {b}", link2.display())),
        "{roots:?}"
    );
}

#[test]
fn an_out_link_keeps_the_output_from_the_garbage_collector() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let file = steps_file(
        &space,
        "gc.nix",
        r#"{ kept = sh "kept" "echo kept > $out" [ ]; loose = sh "loose" "echo loose > $out" [ ]; }"#,
    );
    let link = space.tmp.path().join("keep");
    let kept = space.build_with(&file, &["-A", "kept", "-o", link.to_str().unwrap()], LIMIT);
    assert!(kept.status.success(), "{kept:?}");
    let loose = space.build_with(&file, &["-A", "loose", "--no-out-link"], LIMIT);
    assert!(loose.status.success(), "{loose:?}");
    assert!(!space.tmp.path().join("result").exists());
    let (kept, loose) = (kept.stdout.trim(), loose.stdout.trim());
    // The collector keeps the linked output…
    let refused = nix_store(&space, &["--delete", kept]);
    assert!(!refused.status.success(), "{refused:?}");
    assert!(refused.stderr.contains("still alive"), "{refused:?}");
    assert!(Path::new(kept).exists());
    // …and collects the unlinked one (the positive control).
    let deleted = nix_store(&space, &["--delete", loose]);
    assert!(deleted.status.success(), "{deleted:?}");
    assert!(!Path::new(loose).exists());
}

#[test]
fn keep_going_builds_the_independent_sibling_of_a_failing_step() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let marks = space.tmp.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    // The sibling waits for a slow input: without keep-going, the failure (at once) ends the
    // build long before the sibling could start.
    let file = steps_file(
        &space,
        "kg.nix",
        &format!(
            r#"let
  slow = sh "slow" "/bin/sleep 4; echo slow > $out" [ ];
  sibling = sh "sibling" "/usr/bin/touch {marks}/sibling; echo s > $out" [ slow ];
  failing = sh "failing" "exit 1" [ ];
in sh "top" "echo never > $out" [ failing sibling ]"#,
            marks = marks.display()
        ),
    );
    let stopped = space.build_with(&file, &["--no-out-link"], LIMIT);
    assert_eq!(stopped.status.code(), Some(1), "{stopped:?}");
    assert!(stopped.stderr.contains("error: failing.drv"), "{stopped:?}");
    std::thread::sleep(Duration::from_secs(6));
    assert!(!marks.join("sibling").exists(), "{stopped:?}");
    let kept_going = space.build_with(&file, &["--no-out-link", "--keep-going"], LIMIT);
    assert_eq!(kept_going.status.code(), Some(1), "{kept_going:?}");
    assert!(
        kept_going.stderr.contains("error: failing.drv"),
        "{kept_going:?}"
    );
    assert!(marks.join("sibling").exists(), "{kept_going:?}");
}

/// base → top, top copying base's content (so it does not refer to it).
fn two_steps(space: &Space) -> std::path::PathBuf {
    steps_file(
        space,
        "two-steps.nix",
        r#"rec { base = sh "base" "echo base > $out" [ ]; top = sh "top" "/bin/cat ${base} > $out" [ ]; }"#,
    )
}

#[test]
fn a_valid_root_builds_nothing_even_when_its_inputs_outputs_are_gone() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let file = two_steps(&space);
    let first = space.build_with(&file, &["-A", "top", "--no-out-link"], LIMIT);
    assert!(first.status.success(), "{first:?}");
    assert_eq!(built_by(&space, "w1"), 2);
    let base = output_of(&space, &file, "base");
    let deleted = nix_store(&space, &["--delete", &base]);
    assert!(deleted.status.success(), "{deleted:?}");
    let again = space.build_with(&file, &["-A", "top", "--no-out-link"], LIMIT);
    assert!(again.status.success(), "{again:?}");
    assert!(again.stderr.contains("nothing to build"), "{again:?}");
    assert_eq!(again.stdout.trim(), first.stdout.trim());
    assert_eq!(built_by(&space, "w1"), 2, "no step was built again");
    assert!(!Path::new(&base).exists());
}

#[test]
fn a_deleted_root_over_valid_inputs_builds_only_the_root() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let file = two_steps(&space);
    let first = space.build_with(&file, &["-A", "top", "--no-out-link"], LIMIT);
    assert!(first.status.success(), "{first:?}");
    let deleted = nix_store(&space, &["--delete", first.stdout.trim()]);
    assert!(deleted.status.success(), "{deleted:?}");
    let again = space.build_with(&file, &["-A", "top", "--no-out-link"], LIMIT);
    assert!(again.status.success(), "{again:?}");
    assert!(
        again.stderr.contains("1 of 2 derivations to build"),
        "{again:?}"
    );
    assert!(again.stderr.contains("built top.drv"), "{again:?}");
    assert!(!again.stderr.contains("built base.drv"), "{again:?}");
    assert_eq!(built_by(&space, "w1"), 3);
}

/// A fixed-output derivation made locally, put in a binary cache and gone from the store
/// again: what a substituter can fetch instead of a worker building it.
pub(crate) struct CachedFixedOutput {
    /// Its Nix file.
    pub file: std::path::PathBuf,
    /// Its output path.
    pub out: String,
    /// What the output holds.
    pub content: String,
    /// The binary cache (a `file://` substituter's directory).
    pub cache: std::path::PathBuf,
}

impl CachedFixedOutput {
    /// Make it in `space`'s store, copy it to a cache, delete it.
    pub(crate) fn make(space: &Space) -> CachedFixedOutput {
        let content = format!("fod-{}\n", nonce());
        let text = space.tmp.path().join("content");
        std::fs::write(&text, &content).unwrap();
        let mut hash = space.nix("nix-hash", None);
        hash.args(["--type", "sha256", "--flat"]).arg(&text);
        let hash = run(hash, LIMIT);
        assert!(hash.status.success(), "{hash:?}");
        let file = space.nix_file(
            "fod.nix",
            &format!(
                r#"derivation {{
  name = "fod";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "printf '{content}' > $out" ];
  outputHashMode = "flat";
  outputHashAlgo = "sha256";
  outputHash = "{hash}";
}}"#,
                content = content.trim_end().to_owned() + "\\n",
                hash = hash.stdout.trim()
            ),
        );
        let mut local = space.nix("nix-build", None);
        local.arg("--no-out-link").arg(&file);
        let local = run(local, LIMIT);
        assert!(local.status.success(), "{local:?}");
        let out = local.stdout.trim().to_owned();
        let cache = space.tmp.path().join("cache");
        let mut copy = space.nix("nix", None);
        copy.args(["copy", "--to"])
            .arg(format!("file://{}", cache.display()))
            .arg(&out);
        let copied = run(copy, LIMIT);
        assert!(copied.status.success(), "{copied:?}");
        let fixed = CachedFixedOutput {
            file,
            out,
            content,
            cache,
        };
        fixed.delete(space);
        fixed
    }

    /// Delete its output from `space`'s store.
    pub(crate) fn delete(&self, space: &Space) {
        let deleted = nix_store(space, &["--delete", &self.out]);
        assert!(deleted.status.success(), "{deleted:?}");
    }
}

#[test]
fn a_fixed_output_in_a_binary_cache_is_substituted_not_built() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let fixed = CachedFixedOutput::make(&space);
    let (file, out, content, cache) = (
        fixed.file.clone(),
        fixed.out.clone(),
        fixed.content.clone(),
        fixed.cache.clone(),
    );
    let delete = || fixed.delete(&space);
    // Without the cache as substituter, a worker builds it (the positive control).
    let built = space.build_with(&file, &["--no-out-link"], LIMIT);
    assert!(built.status.success(), "{built:?}");
    assert_eq!(built_by(&space, "w1"), 1);
    delete();
    // With it, the store fetches it and nothing is demanded.
    let conf = space.tmp.path().join("conf-with-cache");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(
        conf.join("nix.conf"),
        format!(
            "{}substituters = file://{}\nrequire-sigs = false\n",
            NIX_CONF.replace("substituters =\n", ""),
            cache.display()
        ),
    )
    .unwrap();
    let mut c = space.command(&["build", "--no-out-link", "--dir"]);
    c.arg(space.dir()).arg(&file).env("NIX_CONF_DIR", &conf);
    let substituted = run(c, LIMIT);
    assert!(substituted.status.success(), "{substituted:?}");
    assert!(
        substituted.stderr.contains("substituted 1 path"),
        "{substituted:?}"
    );
    assert!(
        substituted.stderr.contains("nothing to build"),
        "{substituted:?}"
    );
    assert_eq!(substituted.stdout.trim(), out);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), content);
    assert_eq!(built_by(&space, "w1"), 1, "no worker built it again");
}
