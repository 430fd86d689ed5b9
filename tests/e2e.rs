//! End-to-end: `nixspace up`, worker processes and `nixspace build` with the
//! real Nix, over a real unix socket.
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use nixspace_space::{Role, Route};
use nixspace_test_support::{nonce, repo_root, run, sleeper, Space};

const BUILD_LIMIT: Duration = Duration::from_secs(120);

#[test]
fn builds_a_chain_with_a_fan_out_on_two_workers() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    space.worker("w2", &[]);
    let demo = repo_root().join("examples/demo/default.nix");
    let file = space.nix_file(
        "demo.nix",
        &format!("import {} {{ nonce = \"{}\"; }}", demo.display(), nonce()),
    );
    let result = space.build(&file, BUILD_LIMIT);
    assert!(result.status.success(), "{result:?}");
    let outputs: Vec<&str> = result.stdout.lines().collect();
    assert_eq!(outputs.len(), 1, "{result:?}");
    assert!(outputs[0].ends_with("-demo-top"), "{result:?}");
    let content = std::fs::read_to_string(outputs[0]).expect("output exists in the store");
    assert_eq!(
        content,
        "demo-base\ndemo-left\ndemo-base\ndemo-right\ndemo-top\n"
    );
    for step in ["demo-base", "demo-left", "demo-right", "demo-top"] {
        assert!(
            result.stderr.contains(&format!("built {step}.drv")),
            "{step} not reported built: {result:?}"
        );
    }
    // The workers, not the frontend, built the steps.
    let worker_logs = space.log("w1") + &space.log("w2");
    assert_eq!(worker_logs.matches(" built ").count(), 4, "{worker_logs}");
}

#[test]
fn a_failing_derivation_fails_the_build_with_its_log() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let file = space.nix_file(
        "broken.nix",
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
  ok = sh "fine" "echo fine > $out" [ ];
  broken = sh "broken" "echo boom-marker-{nonce}; echo more detail >&2; exit 3" [ ok ];
in sh "after-broken" "echo never > $out" [ broken ]
"#,
            nonce = nonce()
        ),
    );
    // Every failure is reported with --keep-going (without it the build stops at the first).
    let result = space.build_with(&file, &["--keep-going"], BUILD_LIMIT);
    assert_eq!(result.status.code(), Some(1), "{result:?}");
    let err = &result.stderr;
    assert!(err.contains("error: broken.drv on w1"), "{result:?}");
    assert!(err.contains("boom-marker-"), "log tail missing: {result:?}");
    assert!(err.contains("more detail"), "log tail missing: {result:?}");
    assert!(
        err.contains("error: after-broken.drv: dependency") && err.contains("broken.drv failed"),
        "dependent not reported: {result:?}"
    );
    assert!(err.contains("2 of 3 steps failed"), "{result:?}");
    assert!(
        result.stdout.is_empty(),
        "no output paths on failure: {result:?}"
    );
}

#[test]
fn a_worker_with_a_forged_ref_is_refused() {
    let space = Space::start();
    let good = Route::read(&Role::Worker.route_file(&space.dir())).expect("route");
    let forged = Route {
        sturdy_ref: syndicate::schemas::sturdy::SturdyRef::mint(
            syndicate::actor::AnyValue::new("worker"),
            b"not the key",
        ),
        ..good.clone()
    };
    let path = space.tmp.path().join("forged.route");
    forged.write(&path).expect("write forged route");
    let mut c = space.command(&["worker", "--route"]);
    c.arg(&path);
    let result = run(c, Duration::from_secs(30));
    assert!(!result.status.success(), "{result:?}");
    assert!(
        result.stderr.contains("refused the capability"),
        "{result:?}"
    );
    assert!(!result.stderr.contains("joined"), "{result:?}");
}

#[test]
fn a_garbage_route_file_is_a_clear_error() {
    let space = Space::start();
    let path = space.tmp.path().join("garbage.route");
    std::fs::write(&path, "<route [<unix").expect("write");
    let mut c = space.command(&["build", "--route"]);
    c.arg(&path)
        .arg(repo_root().join("examples/demo/default.nix"));
    let result = run(c, Duration::from_secs(30));
    assert_eq!(result.status.code(), Some(1), "{result:?}");
    assert!(
        result.stderr.contains("route is not valid Preserves text"),
        "{result:?}"
    );
}

#[test]
fn a_second_up_on_the_same_socket_is_refused() {
    let space = Space::start();
    let mut c = space.command(&["up", "--dir"]);
    c.arg(space.dir());
    let result = run(c, Duration::from_secs(30));
    assert_eq!(result.status.code(), Some(1), "{result:?}");
    assert!(result.stderr.contains("in use"), "{result:?}");
}

/// Start a space with worker `w1` and a build that sleeps for an hour, and
/// wait until `w1` builds it. Returns the build and its process needles.
fn long_build() -> (Space, std::process::Child, Vec<String>) {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let seconds = 3000 + (rand::random::<u32>() % 1000);
    let (file, needles) = sleeper(&space, seconds);
    let build = space.spawn_build(&file);
    space.wait_for_log("w1", "building", Duration::from_secs(30));
    (space, build, needles)
}

#[test]
fn interrupting_a_build_withdraws_its_demand_and_stops_the_builder() {
    let (space, build, needles) = long_build();
    // The builder really runs (nix-store and the sleeping sh).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while nixspace_test_support::command_lines_with(&needles[1..]).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the build never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = rustix::process::Pid::from_raw(build.id() as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::INT).expect("SIGINT");
    let out = build.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(130), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("interrupted"));
    // Within a few seconds nothing about the step runs any more.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let left = nixspace_test_support::command_lines_with(&needles);
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "build still running after the demand was withdrawn: {left:?}\nworker log:\n{}",
            space.log("w1")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_worker_joins_over_tcp() {
    let mut space = Space::start_with(&["--tcp", "127.0.0.1:0"]);
    let route = Route::read(&Role::Worker.route_file(&space.dir())).expect("route");
    let tcp_only = route.tcp_only();
    assert_eq!(tcp_only.transports.len(), 1, "{route:?}");
    let path = space.worker_route_file("tcp", &tcp_only);
    space.worker(
        "tcp-worker",
        &["--route", path.to_str().expect("utf-8 path")],
    );
    let (file, _) = sleeper(&space, 0);
    let result = space.build(&file, BUILD_LIMIT);
    assert!(result.status.success(), "{result:?}");
    assert!(result.stderr.contains("on tcp-worker"), "{result:?}");
}

#[test]
fn a_dataspace_that_stays_away_fails_the_build_instead_of_hanging() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let (file, _) = sleeper(&space, 3000 + (rand::random::<u32>() % 1000));
    let build = space.spawn_build_with(&file, &["--reconnect-for", "2"]);
    space.wait_for_log("w1", "building", Duration::from_secs(30));
    space.kill_up();
    let finished = nixspace_test_support::wait_output(build, Duration::from_secs(60));
    assert_eq!(finished.status.code(), Some(1), "{finished:?}");
    assert!(
        finished.stderr.contains("lost the dataspace")
            && finished
                .stderr
                .contains("could not rejoin the dataspace within 2s"),
        "{finished:?}"
    );
    space.wait_for_log("w1", "lost the dataspace", Duration::from_secs(30));
}

#[test]
fn a_build_survives_a_restart_of_the_dataspace() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    let (file, _) = sleeper(&space, 2);
    let build = space.spawn_build(&file);
    space.wait_for_log("w1", "building", Duration::from_secs(30));
    space.kill_up();
    space.restart_up();
    let finished = nixspace_test_support::wait_output(build, BUILD_LIMIT);
    assert!(finished.status.success(), "{finished:?}");
    assert!(
        finished.stderr.contains("rejoined the dataspace"),
        "{finished:?}"
    );
    assert_eq!(
        std::fs::read_to_string(finished.stdout.trim()).expect("output"),
        "done\n"
    );
    space.wait_for_log("w1", "rejoined the dataspace", Duration::from_secs(30));
}

#[test]
fn a_build_on_workers_sharing_its_store_runs_no_nix_program_but_the_evaluator() {
    let mut space = Space::start();
    space.worker("w1", &[]);
    // Every Nix program the frontend starts goes through a shim that records its name.
    let shims = space.scratch_dir("shims");
    let started = shims.join("started");
    for program in ["nix-instantiate", "nix-store", "nix-daemon", "nix"] {
        let real = std::env::var_os("PATH")
            .and_then(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join(program))
                    .find(|p| p.is_file())
            })
            .unwrap_or_else(|| panic!("{program} is not on PATH"));
        let shim = shims.join(program);
        let script = format!(
            "#!/bin/sh\necho {program} >> {}\nexec {} \"$@\"\n",
            started.display(),
            real.display()
        );
        std::fs::write(&shim, script).expect("write shim");
        std::fs::set_permissions(&shim, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("make shim executable");
    }
    let tag = nonce();
    let file = space.nix_file(
        "pair.nix",
        &format!(
            r#"let
  mk = name: deps: derivation {{
    inherit name deps; tag = "{tag}"; system = builtins.currentSystem;
    builder = "/bin/sh"; args = [ "-c" "echo ${{name}} > $out" ];
  }};
in mk "pair-top" [ (mk "pair-base" [ ]) ]
"#
        ),
    );
    let path = std::env::join_paths(std::iter::once(shims.clone()).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .expect("PATH");
    // No out-link: registering one as a GC root is the daemon's job.
    let mut c = space.command(&["build", "--no-out-link", "--dir"]);
    c.arg(space.dir()).arg(&file).env("PATH", path);
    let result = run(c, BUILD_LIMIT);
    assert!(result.status.success(), "{result:?}");
    let output = result.stdout.trim();
    assert!(output.ends_with("-pair-top"), "{result:?}");
    assert_eq!(
        std::fs::read_to_string(output).expect("output in the store"),
        "pair-top\n"
    );
    // Evaluation needs Nix; validity comes from the store's database, and outputs the
    // workers built in this store are not copied (no daemon started for them).
    let programs = std::fs::read_to_string(&started).expect("the shims ran");
    assert_eq!(programs, "nix-instantiate\n", "{result:?}");
}
