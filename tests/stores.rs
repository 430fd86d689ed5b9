//! Workers with Nix stores of their own (a private mount namespace each, as on separate
//! machines): inputs travel between stores through the dataspace, results come back to the
//! frontend's store, and nothing crosses without its hash checked.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::{nonce, run, Space};

const LIMIT: Duration = Duration::from_secs(120);

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
    let (s1, s2) = (space.tmp.path().join("w1"), space.tmp.path().join("w2"));
    space.worker(
        "w1",
        &["--features", "fa", "--own-store", s1.to_str().unwrap()],
    );
    space.worker(
        "w2",
        &["--features", "fb", "--own-store", s2.to_str().unwrap()],
    );
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
