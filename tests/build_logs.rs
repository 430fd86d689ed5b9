//! Build logs retrievable afterwards with `nix-store -l` and `nix log`, for steps built by a
//! worker with a store of its own: the frontend stores each step's relayed log in its local
//! store (`AddBuildLog`), and what Nix prints is what it prints for the same build run by the
//! real Nix on the local store.
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use nixspace_test_support::{nonce, run, Finished, Space};

const LIMIT: Duration = Duration::from_secs(120);

/// A space with one worker, `w1`, whose store is its own; that store's directory.
fn own_store_worker(space: &mut Space) -> PathBuf {
    let store = space.tmp.path().join("w1");
    space.worker("w1", &["--own-store", store.to_str().expect("utf-8 path")]);
    store
}

/// A derivation tagged `tag` whose builder writes to stdout and stderr, then exits with
/// `exit` (0: it builds its output). The file and its `.drv`.
fn logged(space: &Space, tag: &str, exit: u8) -> (PathBuf, String) {
    let script = format!(
        "echo first line {tag}; echo on stderr {tag} >&2; echo; echo last line {tag}; \
         echo x > $out; exit {exit}"
    );
    let file = space.sh_derivation(&format!("{tag}.nix"), &format!("logged-{tag}"), &script);
    let mut c = space.nix("nix-instantiate", None);
    c.arg(&file);
    let drv = run(c, LIMIT);
    assert!(drv.status.success(), "{drv:?}");
    (file, drv.stdout.trim().to_owned())
}

/// `nix-store -l drv` (or `nix log drv`) against `remote` (`None`: the local store).
fn read_log(space: &Space, program: &str, drv: &str, remote: Option<&Path>) -> Finished {
    let mut c = space.nix(program, remote);
    match program {
        "nix-store" => c.args(["-l", drv]),
        _ => c.args(["log", drv]),
    };
    run(c, LIMIT)
}

/// The log of the same builder (tagged anew) built by the real Nix on the local store, with
/// the new tag replaced by `tag`: what nixspace's log must be.
fn as_nix_logs_it(space: &Space, tag: &str, exit: u8) -> String {
    let other = format!("{tag}-nix");
    let (file, drv) = logged(space, &other, exit);
    let mut c = space.nix("nix-build", None);
    c.arg("--no-out-link").arg(&file);
    let built = run(c, LIMIT);
    assert_eq!(built.status.success(), exit == 0, "{built:?}");
    let log = read_log(space, "nix-store", &drv, None);
    assert!(log.status.success(), "{log:?}");
    log.stdout.replace(&other, tag)
}

/// Whether the own store kept in `dir` holds a log for `drv`: the worker's Nix built it there.
fn has_log_in(dir: &Path, drv: &str) -> bool {
    let base = drv.rsplit('/').next().expect("a store path");
    dir.join("nix/var/log/nix/drvs")
        .join(&base[..2])
        .join(format!("{}.bz2", &base[2..]))
        .exists()
}

#[test]
fn a_step_built_on_a_worker_with_its_own_store_leaves_its_log_here() {
    let mut space = Space::start();
    let store = own_store_worker(&mut space);
    let tag = format!("ok{}", nonce());
    let (file, drv) = logged(&space, &tag, 0);
    // Positive control: no log here before the build.
    let before = read_log(&space, "nix-store", &drv, None);
    assert!(!before.status.success(), "{before:?}");

    let built = space.build(&file, LIMIT);
    assert!(built.status.success(), "{built:?}");
    assert!(has_log_in(&store, &drv), "the worker's own store built it");

    let expected = as_nix_logs_it(&space, &tag, 0);
    assert!(
        expected.contains(&format!("first line {tag}\n")),
        "{expected}"
    );
    for program in ["nix-store", "nix"] {
        let log = read_log(&space, program, &drv, None);
        assert!(log.status.success(), "{program}: {log:?}");
        assert_eq!(log.stdout, expected, "{program}");
    }
}

#[test]
fn a_failed_step_keeps_its_log_as_nix_does() {
    let mut space = Space::start();
    own_store_worker(&mut space);
    let tag = format!("fail{}", nonce());
    let (file, drv) = logged(&space, &tag, 3);
    let before = read_log(&space, "nix-store", &drv, None);
    assert!(!before.status.success(), "{before:?}");

    let built = space.build(&file, LIMIT);
    assert!(!built.status.success(), "{built:?}");

    let expected = as_nix_logs_it(&space, &tag, 3);
    assert!(
        expected.contains(&format!("last line {tag}\n")),
        "{expected}"
    );
    let log = read_log(&space, "nix-store", &drv, None);
    assert!(log.status.success(), "{log:?}");
    assert_eq!(log.stdout, expected);
}

#[test]
fn nix_log_after_nix_build_through_the_translator_prints_the_workers_log() {
    let mut space = Space::start();
    own_store_worker(&mut space);
    let socket = space.translator();
    let tag = format!("tr{}", nonce());
    let (file, drv) = logged(&space, &tag, 0);
    let before = read_log(&space, "nix", &drv, Some(&socket));
    assert!(!before.status.success(), "{before:?}");

    let mut c = space.nix("nix-build", Some(&socket));
    c.arg("--no-out-link").arg(&file);
    let built = run(c, LIMIT);
    assert!(built.status.success(), "{built:?}");

    let expected = as_nix_logs_it(&space, &tag, 0);
    let log = read_log(&space, "nix", &drv, Some(&socket));
    assert!(log.status.success(), "{log:?}");
    assert_eq!(log.stdout, expected);
}
