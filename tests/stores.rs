//! Workers with Nix stores of their own (a private mount namespace each, as on separate
//! machines): inputs travel between stores through the dataspace, results come back to the
//! frontend's store, and nothing crosses without its hash checked, nor without a signature by
//! a key the receiving store trusts.
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nixspace_nix_formats::signature::SecretKey;
use nixspace_test_support::{
    command_lines_with, counted_referring_script, nonce, run, step_binding, unique_sleep,
    wait_output, KillOnDrop, Space,
};

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
    let binding = step_binding(
        "name: features: deps",
        "requiredSystemFeatures = features;",
        r#"for d in $deps; do
        while IFS= read -r line; do echo "$line"; done < "$d"
      done > "$out"
      echo "${name}" >> "$out""#,
    );
    space.nix_file(
        "split.nix",
        &format!(
            "let\n{binding}  first = step \"first\" [ \"fa\" ] [ ];\nin\nstep \"second\" [ \"fb\" ] [ first ]\n"
        ),
    )
}

/// A chain `base` → `top` whose `top` output refers to `base`'s, each builder run appended
/// to `runs`.
pub(crate) fn referring_chain(space: &Space, runs: &Path) -> PathBuf {
    let binding = step_binding("name: deps", "", &counted_referring_script(runs));
    space.nix_file(
        "chain.nix",
        &format!("let\n{binding}in\nstep \"top\" [ (step \"base\" [ ]) ]\n"),
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
    let sleep = unique_sleep(seconds);
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

/// The key binary caches and other stores of these tests sign with.
pub(crate) fn cache_key() -> SecretKey {
    SecretKey::from_seed("stores-test-cache-1", &[5; 32]).unwrap()
}

/// A space whose stores trust [`cache_key`], with the key's secret file in its directory.
pub(crate) fn space_trusting_the_cache_key() -> (Space, PathBuf) {
    let public = cache_key().to_public().to_string();
    let space = Space::start_with(&["--trusted-public-key", &public]);
    let secret = space.tmp.path().join("cache.key");
    std::fs::write(&secret, cache_key().to_text()).unwrap();
    (space, secret)
}

/// A chain `base` → `top` built with plain `nix-build` on the local store, copied into a
/// binary cache at `cache` (`nix copy --to file://…` with `compression`, signed with the key
/// in `secret`), then deleted from the store. Returns the Nix file and `top`'s output path.
pub(crate) fn cached_chain(
    space: &Space,
    runs: &Path,
    cache: &Path,
    compression: &str,
    secret: &Path,
) -> (PathBuf, String) {
    // `top`'s output names `base`'s, so the cache holds both and `base` comes first.
    let file = referring_chain(space, runs);
    let mut b = space.nix("nix-build", None);
    b.arg(&file).arg("--no-out-link");
    let built = run(b, LIMIT);
    assert!(built.status.success(), "{built:?}");
    let top = built.stdout.trim().to_owned();
    let mut q = space.nix("nix-store", None);
    q.args(["-qR", &top]);
    let closure = run(q, LIMIT);
    let mut copy = space.nix("nix", None);
    copy.args(["copy", "--to"])
        .arg(format!(
            "file://{}?compression={compression}&secret-key={}",
            cache.display(),
            secret.display()
        ))
        .arg(&top);
    let copied = run(copy, LIMIT);
    assert!(copied.status.success(), "{copied:?}");
    let mut delete = space.nix("nix-store", None);
    delete.arg("--delete").args(closure.stdout.lines());
    let deleted = run(delete, LIMIT);
    assert!(deleted.status.success(), "{deleted:?}");
    assert_eq!(closure.stdout.lines().count(), 2, "{closure:?}");
    assert!(!Path::new(&top).exists());
    std::fs::remove_file(runs).unwrap();
    (file, top)
}

/// Start `nixspace substitute CACHE…` on `space`, logging to `<tmp>/substituter.log`.
pub(crate) fn substituter(space: &Space, caches: &[&std::ffi::OsStr]) -> KillOnDrop {
    let log = space.tmp.path().join("substituter.log");
    let child = space
        .command(&["substitute", "--name", "cache"])
        .arg("--dir")
        .arg(space.dir())
        .args(caches)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    space.wait_for_log("substituter", "serving", LIMIT);
    KillOnDrop(child)
}

#[test]
fn outputs_in_a_binary_cache_are_substituted_not_built() {
    let (mut space, secret) = space_trusting_the_cache_key();
    let (runs, cache) = (
        space.tmp.path().join("runs"),
        space.tmp.path().join("cache"),
    );
    let (file, top) = cached_chain(&space, &runs, &cache, "xz", &secret);
    space.worker("w1", &[]);
    let _cache = substituter(&space, &[cache.as_os_str()]);

    let built = space.build(&file, LIMIT);
    assert!(built.status.success(), "{built:?}");
    assert_eq!(built.stdout.trim(), top);
    assert!(std::fs::read_to_string(&top)
        .unwrap()
        .starts_with("top /nix/store/"));
    assert!(
        !runs.exists(),
        "nothing was built: {:?}",
        std::fs::read_to_string(&runs)
    );
    let worker = space.log("w1");
    assert_eq!(
        worker.matches("substituted the outputs").count(),
        0,
        "logs are relayed, not printed"
    );
    assert!(
        worker.contains("fetched") && worker.contains("from") && worker.contains("cache"),
        "{worker}"
    );
    let mut verify = space.nix("nix-store", None);
    verify.args(["--verify-path", &top]);
    assert!(run(verify, LIMIT).status.success());
}

/// A floating content-addressed step appending its name to `runs`, built with plain
/// `nix-build` on the local store (its realisation signed with `secret` if given), copied
/// into the binary cache at `cache` with its realisation (`nix copy --file`), then deleted
/// from the store (its realisation with it). Returns the Nix file and its output path.
fn cached_ca_step(
    space: &Space,
    name: &str,
    runs: &Path,
    cache: &Path,
    secret: Option<&Path>,
) -> (PathBuf, String) {
    let file = space.nix_file(
        &format!("{name}.nix"),
        &format!(
            r#"derivation {{
  name = "{name}"; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ "-c" "echo {name} >> {runs}; echo {name}-{tag} > $out" ];
  __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256";
}}"#,
            runs = runs.display(),
            tag = nonce()
        ),
    );
    let mut b = space.nix("nix-build", None);
    b.arg(&file).arg("--no-out-link");
    if let Some(secret) = secret {
        b.env(
            "NIX_CONFIG",
            format!("secret-key-files = {}", secret.display()),
        );
    }
    let built = run(b, LIMIT);
    assert!(built.status.success(), "{built:?}");
    let out = built.stdout.trim().to_owned();
    let mut copy = space.nix("nix", None);
    copy.args(["copy", "--to"])
        .arg(format!("file://{}", cache.display()))
        .arg("--file")
        .arg(&file);
    let copied = run(copy, LIMIT);
    assert!(copied.status.success(), "{copied:?}");
    let mut delete = space.nix("nix-store", None);
    delete.args(["--delete", &out]);
    let deleted = run(delete, LIMIT);
    assert!(deleted.status.success(), "{deleted:?}");
    assert!(!Path::new(&out).exists());
    (file, out)
}

#[test]
fn a_content_addressed_output_is_substituted_through_its_signed_realisation() {
    let (mut space, secret) = space_trusting_the_cache_key();
    let (runs, cache) = (
        space.tmp.path().join("runs"),
        space.tmp.path().join("cache"),
    );
    let (signed, signed_out) = cached_ca_step(&space, "signed", &runs, &cache, Some(&secret));
    let (unsigned, unsigned_out) = cached_ca_step(&space, "unsigned", &runs, &cache, None);
    std::fs::remove_file(&runs).unwrap();
    let store = space.tmp.path().join("w1-store");
    space.worker("w1", &["--own-store", store.to_str().unwrap()]);
    let _cache = substituter(&space, &[cache.as_os_str()]);

    // Signed by a key the stores trust: the worker takes the realisation, fetches the path
    // it names and builds nothing; the frontend gets the output and its realisation.
    let built = space.build(&signed, LIMIT);
    assert!(built.status.success(), "{built:?}");
    assert_eq!(built.stdout.trim(), signed_out);
    assert!(
        !runs.exists(),
        "built: {:?}",
        std::fs::read_to_string(&runs)
    );
    let worker = space.log("w1");
    assert!(
        worker.contains("fetched") && worker.contains("cache"),
        "{worker}"
    );
    let mut info = space.nix("nix", None);
    info.args(["realisation", "info", "--json", "--file"])
        .arg(&signed);
    let info = run(info, LIMIT);
    assert!(info.status.success(), "{info:?}");
    assert!(
        info.stdout
            .contains(&signed_out[signed_out.rfind('/').unwrap() + 1..])
            && info.stdout.contains("stores-test-cache-1:"),
        "{info:?}"
    );

    // The control: the same cache, the same substituter, a realisation nobody signed. The
    // worker does not believe it and builds the step.
    let built = space.build(&unsigned, LIMIT);
    assert!(built.status.success(), "{built:?}");
    assert_eq!(built.stdout.trim(), unsigned_out);
    assert_eq!(std::fs::read_to_string(&runs).unwrap(), "unsigned\n");
    assert!(
        space
            .log("w1")
            .contains("ignoring a realisation not signed by a trusted key"),
        "{}",
        space.log("w1")
    );
}

#[test]
fn a_corrupted_nar_in_a_binary_cache_is_rejected_and_the_step_built() {
    let (mut space, secret) = space_trusting_the_cache_key();
    let (runs, cache) = (
        space.tmp.path().join("runs"),
        space.tmp.path().join("cache"),
    );
    let (file, top) = cached_chain(&space, &runs, &cache, "none", &secret);
    // Flip one byte in the middle of every NAR of the cache.
    for entry in std::fs::read_dir(cache.join("nar")).unwrap() {
        let path = entry.unwrap().path();
        let mut bytes = std::fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x20;
        std::fs::write(&path, bytes).unwrap();
    }
    space.worker("w1", &[]);
    let _cache = substituter(&space, &[cache.as_os_str()]);

    let built = space.build(&file, LIMIT);
    assert!(built.status.success(), "{built:?}");
    assert!(std::fs::read_to_string(&top)
        .unwrap()
        .starts_with("top /nix/store/"));
    let worker = space.log("w1");
    assert!(worker.contains("hash mismatch"), "{worker}");
    // Both steps were built after all, and what is in the store is sound.
    nixspace_test_support::assert_each_step_built_once(&runs, 2);
    let mut verify = space.nix("nix-store", None);
    verify.args(["--verify-path", &top]);
    assert!(run(verify, LIMIT).status.success());
}

#[test]
fn an_external_substituter_serves_another_store() {
    let (mut space, secret) = space_trusting_the_cache_key();
    let runs = space.tmp.path().join("runs");
    let other = space.tmp.path().join("other");
    // Build the chain in the other store only, signed as that store's owner would.
    let file = referring_chain(&space, &runs);
    let built = run(
        space.in_other_store(
            &other,
            &format!(
                "nix-build {} --no-out-link --option secret-key-files {}",
                file.display(),
                secret.display()
            ),
        ),
        LIMIT,
    );
    assert!(built.status.success(), "{built:?}");
    let top = built.stdout.trim().to_owned();
    assert!(!Path::new(&top).exists(), "built in the other store only");
    std::fs::remove_file(&runs).unwrap();
    // Its daemon, reachable from here.
    let socket = space.tmp.path().join("other.sock");
    let daemon = space
        .in_other_store(
            &other,
            &format!(
                "NIX_DAEMON_SOCKET_PATH={} exec nix-daemon",
                socket.display()
            ),
        )
        .process_group(0)
        .spawn()
        .unwrap();
    let _daemon = KillOnDrop(daemon);
    let deadline = std::time::Instant::now() + LIMIT;
    while !socket.exists() {
        assert!(std::time::Instant::now() < deadline, "no daemon socket");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The example, a separate program knowing only the route file and that socket.
    let example =
        Path::new(nixspace_test_support::nixspace_bin()).with_file_name("store-substituter");
    assert!(
        example.exists(),
        "{} missing: build the workspace's binaries first (./setup.sh test does)",
        example.display()
    );
    let log = space.tmp.path().join("example.log");
    let substituter = std::process::Command::new(&example)
        .arg("--route")
        .arg(space.dir().join("worker.route"))
        .arg("--store-socket")
        .arg(&socket)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _substituter = KillOnDrop(substituter);
    space.wait_for_log("example", "serving the store", LIMIT);
    space.worker("w1", &[]);

    let got = space.build(&file, LIMIT);
    assert!(got.status.success(), "{got:?}");
    assert_eq!(got.stdout.trim(), top);
    assert!(std::fs::read_to_string(&top)
        .unwrap()
        .starts_with("top /nix/store/"));
    assert!(!runs.exists(), "nothing was built here");
    let worker = space.log("w1");
    assert!(worker.contains("store-substituter"), "{worker}");
}

#[test]
fn an_output_whose_only_store_left_is_built_again() {
    let mut space = Space::start();
    let runs = space.tmp.path().join("runs");
    let binding = step_binding(
        "name: features: deps",
        "requiredSystemFeatures = features;",
        &counted_referring_script(&runs),
    );
    let file = space.nix_file(
        "lost.nix",
        &format!(
            "let\n{binding}in\nstep \"second\" [ \"fb\" ] [ (step \"first\" [ \"fa\" ] [ ]) ]\n"
        ),
    );
    let s1 = space.tmp.path().join("w1");
    space.worker(
        "w1",
        &["--features", "fa", "--own-store", s1.to_str().unwrap()],
    );
    let build = space.spawn_build(&file);
    // `first` is built, in w1's store only; then w1 and its store leave for good.
    space.wait_for_log("up", " built drv=", LIMIT);
    space.signal_worker("w1", rustix::process::Signal::KILL);
    space.wait_worker("w1", LIMIT);
    let s2 = space.tmp.path().join("w2");
    space.worker(
        "w2",
        &[
            "--features",
            "fa,fb",
            "--own-store",
            s2.to_str().unwrap(),
            "--fetch-patience",
            "1",
        ],
    );
    let built = wait_output(build, LIMIT);
    assert!(built.status.success(), "{built:?}");
    let out = built.stdout.trim();
    assert!(out.ends_with("-second"), "{built:?}");
    let mut runs: Vec<String> = std::fs::read_to_string(&runs)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    runs.sort();
    assert_eq!(runs, ["first", "first", "second"], "first was built again");
    assert!(
        space
            .log("up")
            .contains("no store has this output any more; building its step again"),
        "{}",
        space.log("up")
    );
    let mut verify = space.nix("nix-store", None);
    verify.args(["--verify-path", out]);
    assert!(run(verify, LIMIT).status.success());
}

#[test]
fn what_a_running_worker_built_can_be_garbage_collected() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let name = format!("collectable-{}", nonce());
    let file = space.sh_derivation("collectable.nix", &name, "echo collectable > $out");
    // No out-link: that would be a root.
    let built = space.build_with(&file, &["--no-out-link"], LIMIT);
    assert!(built.status.success(), "{built:?}");
    let out = built.stdout.trim().to_owned();
    assert!(Path::new(&out).exists(), "{built:?}");
    // The worker goes on running (with its daemon connections), and nothing roots the output:
    // Nix collects it, as it does once nix-daemon's client has gone.
    let mut roots = space.nix("nix-store", None);
    roots.args(["-q", "--roots", &out]);
    let roots = run(roots, LIMIT);
    assert!(roots.status.success(), "{roots:?}");
    assert_eq!(roots.stdout.trim(), "", "{roots:?}");
    let mut delete = space.nix("nix-store", None);
    delete.args(["--delete", &out]);
    let deleted = run(delete, LIMIT);
    assert!(deleted.status.success(), "{deleted:?}");
    assert!(!Path::new(&out).exists(), "{deleted:?}");
    space.wait_for_log("w1", "joined", Duration::from_secs(1));
}
