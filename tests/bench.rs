//! The benchmarks run end to end on tiny inputs: every column of `bench dag` (the real
//! `nix-build`, `nix-daemon`, a private sshd as an ssh-ng builder, nixspace with local
//! workers, with a worker on its own store over TCP, and the translator) builds, and the
//! planner, dataspace, dispatch, cache, remote and resources benchmarks report what they
//! promise.
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use nixspace_test_support::{nixspace_bin, run, Finished};

const LIMIT: Duration = Duration::from_secs(300);

/// Run `nixspace bench ARGS` with the test Nix configuration; fail unless it succeeds.
fn bench(args: &[&str]) -> (Finished, tempfile::TempDir) {
    let tmp = tempfile::Builder::new()
        .prefix("nixspace-test-bench-")
        .tempdir()
        .expect("tempdir");
    let conf = tmp.path().join("nix-conf");
    nixspace_test_support::write_nix_conf(&conf).expect("nix.conf");
    let mut c = std::process::Command::new(nixspace_bin());
    c.arg("bench")
        .args(args)
        .env("NIX_CONF_DIR", conf)
        .env_remove("NIX_REMOTE")
        .stdin(std::process::Stdio::null());
    let out = run(c, LIMIT);
    assert!(out.status.success(), "{out:?}");
    (out, tmp)
}

/// The rows of `stdout` that start (after the size column) with `label`.
fn rows<'a>(stdout: &'a str, label: &str) -> Vec<&'a str> {
    stdout
        .lines()
        .filter(|l| {
            l.trim_start()
                .split_once(' ')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(label))
        })
        .collect()
}

#[test]
fn bench_dag_builds_every_shape_with_every_column_and_plots_them() {
    let plots = tempfile::tempdir().expect("tempdir");
    let plot_dir = plots.path().to_str().expect("utf-8");
    let (out, _tmp) = bench(&[
        "dag",
        "--shapes",
        "chain,fanout,layered",
        "--nodes",
        "3",
        "--width",
        "2",
        "--runs",
        "1",
        "--workers",
        "1",
        "--jobs",
        "2",
        "--columns",
        "local,daemon,ssh,nixspace,own-store,translator,ssh-nixspace",
        "--plot",
        plot_dir,
    ]);
    for label in [
        "(a) nix-build local",
        "(a') nix-build via nix-daemon",
        "(b) nix-build, ssh-ng builder",
        "(c) nixspace build",
        "(c') nixspace, own-store worker/TCP",
        "(d) nix-build via translator",
        "(e) ssh-ng builder = nixspace",
    ] {
        assert_eq!(
            rows(&out.stdout, label).len(),
            3,
            "{label} once per shape: {out:?}"
        );
    }
    // The (a) row is its own baseline.
    assert!(
        rows(&out.stdout, "(a) nix-build local")
            .iter()
            .all(|r| r.ends_with("1.00x")),
        "{out:?}"
    );
    assert!(
        out.stdout
            .contains("goal (c') ≥ 15x faster per derivation than (b)"),
        "{out:?}"
    );
    assert!(
        out.stdout
            .contains("(e) ssh-ng builder = nixspace vs (b) plain ssh-ng"),
        "{out:?}"
    );
    assert!(
        out.stdout.contains("dispatch latency of (c)/(d)"),
        "{out:?}"
    );
    for shape in ["chain", "fanout", "layered"] {
        let svg = std::fs::read_to_string(plots.path().join(format!("bench-dag-{shape}.svg")))
            .expect("plot written");
        assert!(
            svg.contains("(b) nix-build, ssh-ng builder") && svg.contains(shape),
            "{shape}"
        );
    }
}

#[test]
fn bench_planner_reports_time_and_memory_per_size() {
    let (out, _tmp) = bench(&["planner", "--nodes", "1000,5000", "--runs", "2"]);
    for n in ["1000", "5000"] {
        let row = out
            .stdout
            .lines()
            .find(|l| l.trim_start().starts_with(n))
            .unwrap_or_else(|| panic!("no row for {n}: {out:?}"));
        assert!(row.ends_with("MiB"), "{row}");
    }
}

#[test]
fn bench_dataspace_and_dispatch_report_rates_and_latencies() {
    let (out, _tmp) = bench(&["dataspace", "--count", "500", "--runs", "2"]);
    assert!(out.stdout.contains("\nin process "), "{out:?}");
    assert!(
        out.stdout.contains("\nunix socket (nixspace up) "),
        "{out:?}"
    );
    let (out, _tmp) = bench(&[
        "dispatch",
        "--steps",
        "50",
        "--layers",
        "5",
        "--runs",
        "1",
        "--latency-steps",
        "10",
        "--dataspace-records",
        "500",
    ]);
    for row in [
        "50 steps in 5 layers",
        "demand → assigned",
        "assigned → built",
        "demand → built",
        "first assignment",
        "bytes per demanded step",
        "the dataspace allows",
    ] {
        assert!(out.stdout.contains(row), "{row}: {out:?}");
    }
}

#[test]
fn bench_cache_copies_from_a_file_server_and_from_cache_serve() {
    let (out, _tmp) = bench(&["cache", "--paths", "3", "--size", "4096", "--runs", "1"]);
    for row in [
        "(a) file server",
        "(b) cache serve <- substitute (a)",
        "(c) cache serve <- worker's store",
    ] {
        assert!(
            out.stdout.lines().any(|l| l.starts_with(row)),
            "{row}: {out:?}"
        );
    }
}

#[test]
fn bench_remote_builds_through_the_delaying_proxy_both_ways_at_each_rtt() {
    let (out, _tmp) = bench(&["remote", "--nodes", "2", "--rtt", "0,20"]);
    for setup in ["nixspace worker", "ssh-ng builder"] {
        let rows = rows(&out.stdout, &format!("ms {setup}"));
        assert_eq!(rows.len(), 2, "{setup}: {out:?}");
    }
}

#[test]
fn bench_nar_moves_a_path_each_of_the_three_ways_at_each_rtt() {
    let (out, _tmp) = bench(&["nar", "--mib", "2", "--rtt", "0,20"]);
    for way in [
        "nixspace, Noise TCP",
        "nixspace, TCP in clear",
        "nix copy, ssh-ng",
    ] {
        let rows = rows(&out.stdout, &format!("ms {way}"));
        assert_eq!(rows.len(), 2, "{way}: {out:?}");
    }
}

#[test]
fn bench_resources_counts_the_builds_killed_for_memory_with_and_without_admission() {
    let (out, _tmp) = bench(&["resources", "--hungry", "2", "--cpu", "1", "--hold", "128"]);
    let killed = |setup: &str| -> String {
        let row = out
            .stdout
            .lines()
            .find(|l| l.starts_with(setup))
            .unwrap_or_else(|| panic!("{setup}: {out:?}"));
        row.split_whitespace().last().unwrap().to_owned()
    };
    // Admission keeps the hungry steps off the small worker; nix-build counts none.
    assert_eq!(killed("(2) nixspace, admission"), "0", "{out:?}");
    assert_eq!(killed("(3) nix-build"), "-", "{out:?}");
    // Positive control: without admission, the small (faster) worker takes hungry steps
    // first and they are killed there.
    assert_ne!(killed("(1) nixspace, slot only"), "0", "{out:?}");
}
