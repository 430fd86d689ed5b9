//! Workers on hosts of their own: the coordinator (`up --tcp` on its host's address, and the
//! frontend beside it) on one host of a test bed, each worker on another with a store of its
//! own (`--own-store`), joined over Noise TCP through a switch that delays every packet by half
//! the round-trip time (`nixspace_test_support::hosts`). A DAG built across three hosts; a
//! worker's host partitioned for 30 s in the middle of a build; the coordinator's host
//! partitioned from every worker and healed.
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nixspace_space::{Role, Route};
use nixspace_test_support::hosts::{Entered, Host, TestBed};
use nixspace_test_support::{
    check_dag_outputs, epoch_ms, marked_dag_file, name_store, Dag, Running, Space,
};

/// The round-trip time between hosts.
const RTT: Duration = Duration::from_millis(50);

/// How long the worker's host stays cut off in the partition test.
const PARTITION: Duration = Duration::from_secs(30);

/// The most any build here may take.
const LIMIT: Duration = Duration::from_secs(300);

/// A dataspace spread over a test bed: the coordinator's host and one host per worker.
struct Spread {
    // Fields drop in order: the processes end before their hosts go, and this thread leaves
    // the coordinator's host last.
    space: Space,
    workers: BTreeMap<String, Host>,
    coordinator: Host,
    _bed: TestBed,
    _on_coordinator: Entered,
    /// The file the builders append their `start`/`done` lines to.
    runs: PathBuf,
}

impl Spread {
    /// Start `up --tcp` on the coordinator's host (this thread moves there: the frontends it
    /// starts run there too), then each of `workers` on a host of its own with its own store,
    /// joined over TCP only, with `worker_args`.
    fn start(workers: &[&str], worker_args: &[&str]) -> Spread {
        let mut bed = TestBed::new(RTT);
        let coordinator = bed.host();
        let on_coordinator = coordinator.enter();
        let tcp = format!("{}:0", coordinator.address());
        let mut space = Space::start_with(&[
            "--tcp",
            &tcp,
            "--max-attempts",
            "20",
            "--retry-backoff",
            "0.2",
        ]);
        let route = Route::read(&Role::Worker.route_file(&space.dir()))
            .expect("route")
            .tcp_only();
        assert!(route.noise.is_some(), "the route pins the host's Noise key");
        let route = space.worker_route_file("remote", &route);
        let mut hosts = BTreeMap::new();
        for w in workers {
            let host = bed.host();
            let store = space.tmp.path().join(format!("store-{w}"));
            name_store(&store, w);
            let mut args = vec![
                "--route",
                route.to_str().expect("utf-8 path"),
                "--own-store",
                store.to_str().expect("utf-8 path"),
            ];
            args.extend_from_slice(worker_args);
            host.on(|| space.worker(w, &args));
            hosts.insert(w.to_string(), host);
        }
        let runs = space.tmp.path().join("runs");
        Spread {
            space,
            workers: hosts,
            coordinator,
            _bed: bed,
            _on_coordinator: on_coordinator,
            runs,
        }
    }

    /// Start building [`layered`]`(layers, 6)` whose builders sleep `sleep` seconds, in the
    /// background.
    fn start_build(&self, layers: usize, sleep: &str) -> (Dag, Running) {
        let dag = layered(layers, 6);
        let file = marked_dag_file(&self.space, "dag.nix", &dag, &self.runs, sleep);
        (dag, Running::new(self.space.spawn_build(&file)))
    }

    /// The builder runs so far.
    fn runs(&self) -> Vec<Run> {
        read_runs(&std::fs::read_to_string(&self.runs).unwrap_or_default())
    }

    /// Wait until `done` holds for the builder runs so far.
    fn wait_for_runs(&self, what: &str, done: impl Fn(&[Run]) -> bool) {
        let deadline = Instant::now() + LIMIT;
        while !done(&self.runs()) {
            assert!(
                Instant::now() < deadline,
                "the runs never showed {what}:\n{}",
                std::fs::read_to_string(&self.runs).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `layers` layers of `width` steps, each depending on two steps of the layer below, and
/// `root` over the top layer.
fn layered(layers: usize, width: usize) -> Dag {
    let name = |l: usize, i: usize| format!("s{l}_{i}");
    let mut dag = Dag::new();
    for l in 0..layers {
        for i in 0..width {
            let mut deps = if l == 0 {
                vec![]
            } else {
                vec![name(l - 1, i), name(l - 1, (i + 1) % width)]
            };
            deps.sort();
            deps.dedup();
            dag.insert(name(l, i), deps);
        }
    }
    let mut top: Vec<String> = (0..width).map(|i| name(layers - 1, i)).collect();
    top.sort();
    dag.insert("root".to_owned(), top);
    dag
}

/// One builder run, from the runs file.
#[derive(Debug, Clone)]
struct Run {
    step: String,
    worker: String,
    started: u64,
    finished: Option<u64>,
}

/// The builder runs of a runs file's `text`, in the order they started.
fn read_runs(text: &str) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let [what, step, worker, at] = fields[..] else {
            // A line still being written.
            continue;
        };
        let Ok(at) = at.parse() else { continue };
        match what {
            "start" => runs.push(Run {
                step: step.to_owned(),
                worker: worker.to_owned(),
                started: at,
                finished: None,
            }),
            "done" => {
                if let Some(run) = runs
                    .iter_mut()
                    .rev()
                    .find(|r| r.step == step && r.worker == worker && r.finished.is_none())
                {
                    run.finished = Some(at);
                }
            }
            _ => panic!("unexpected line in the runs file: {line:?}"),
        }
    }
    runs
}

/// How long after a builder run finished its outcome may still be on its way to the
/// coordinator (registered, reported): a partition then may keep it from arriving.
const REPORTING: u64 = 2000;

/// A time during which some workers could not reach the coordinator (ms since the epoch).
#[derive(Debug)]
struct Cut {
    /// The workers cut off.
    workers: Vec<String>,
    from: u64,
    to: u64,
}

/// The steps whose builder ran again when nothing explains it: a step may run again only if
/// its earlier run was cut off (on a worker of `cut`, started before the cut ended, and not
/// finished by [`REPORTING`] before it began).
fn unexplained_reruns(runs: &[Run], cut: &Cut) -> Vec<String> {
    let mut by_step: BTreeMap<&str, Vec<&Run>> = BTreeMap::new();
    let mut again = Vec::new();
    for run in runs {
        let earlier = by_step.entry(&run.step).or_default();
        let last = earlier
            .iter()
            .rev()
            .find(|r| r.finished.is_some())
            .or(earlier.last());
        if let Some(last) = last {
            let cut_off = cut.workers.contains(&last.worker)
                && last.started <= cut.to
                && last.finished.is_none_or(|f| f + REPORTING >= cut.from);
            if !cut_off {
                again.push(run.step.clone());
            }
        }
        earlier.push(run);
    }
    again
}

/// A run of `step` on `worker` from `started` to `finished`.
fn run(step: &str, worker: &str, started: u64, finished: Option<u64>) -> Run {
    Run {
        step: step.to_owned(),
        worker: worker.to_owned(),
        started,
        finished,
    }
}

#[test]
fn a_rerun_is_explained_only_by_a_cut_of_the_earlier_runs_worker() {
    let cut = Cut {
        workers: vec!["w3".to_owned()],
        from: 10_000,
        to: 40_000,
    };
    // Cut off mid-run, or finished just before the cut (its report maybe lost): explained.
    for finished in [None, Some(12_000), Some(9_000)] {
        let runs = [
            run("s", "w3", 8_000, finished),
            run("s", "w1", 20_000, None),
        ];
        assert!(unexplained_reruns(&runs, &cut).is_empty(), "{finished:?}");
    }
    // The positive controls: built and reported long before the cut, built on a worker not
    // cut off, or started after the cut ended: built again for nothing.
    for earlier in [
        run("s", "w3", 1_000, Some(2_000)),
        run("s", "w2", 11_000, Some(12_000)),
        run("s", "w3", 41_000, Some(42_000)),
    ] {
        let runs = [earlier.clone(), run("s", "w1", 50_000, Some(51_000))];
        assert_eq!(unexplained_reruns(&runs, &cut), ["s"], "{earlier:?}");
    }
}

#[test]
fn the_test_bed_delays_each_round_trip_and_a_partition_cuts_a_host_off_until_healed() {
    let mut bed = TestBed::new(RTT);
    let (a, b) = (bed.host(), bed.host());
    let listener = b.on(|| TcpListener::bind((b.address(), 0)).expect("listen on b"));
    let to_b = listener.local_addr().expect("address");
    std::thread::spawn(move || {
        for mut c in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut byte = [0u8; 1];
                while c.read_exact(&mut byte).is_ok() && c.write_all(&byte).is_ok() {}
            });
        }
    });
    let connect = |to: SocketAddr| a.on(|| TcpStream::connect_timeout(&to, Duration::from_secs(2)));
    let mut c = connect(to_b).expect("a reaches b");
    for _ in 0..5 {
        let sent = Instant::now();
        c.write_all(b"x").unwrap();
        c.read_exact(&mut [0u8; 1]).unwrap();
        let took = sent.elapsed();
        assert!(took >= RTT, "a round trip took {took:?}, under {RTT:?}");
    }
    b.partition();
    // The same connect, cut off: refused or timed out. Healed: it connects (the control).
    assert!(connect(to_b).is_err(), "a reached b across a partition");
    b.heal();
    let deadline = Instant::now() + Duration::from_secs(30);
    while connect(to_b).is_err() {
        assert!(Instant::now() < deadline, "a never reached b after healing");
    }
}

#[test]
fn a_dag_is_built_across_three_worker_hosts_at_50_ms_round_trip_time() {
    let spread = Spread::start(&["w1", "w2", "w3"], &[]);
    let dag = layered(3, 6);
    let file = marked_dag_file(&spread.space, "dag.nix", &dag, &spread.runs, "1");
    let built = spread.space.build(&file, LIMIT);
    assert!(built.status.success(), "{built:?}");
    check_dag_outputs(&spread.space, built.stdout.trim(), &dag);
    let runs = spread.runs();
    assert_eq!(runs.len(), dag.len(), "each step built once: {runs:?}");
    for w in spread.workers.keys() {
        assert!(
            runs.iter().any(|r| &r.worker == w),
            "{w} built nothing: {runs:?}"
        );
    }
}

#[test]
fn a_worker_host_partitioned_for_30_s_mid_build_loses_nothing_and_nothing_is_built_twice() {
    // Workers wait for an input longer than the partition lasts, so what the cut-off host
    // built before is fetched from it once it is back, not built again.
    let spread = Spread::start(&["w1", "w2", "w3"], &["--fetch-patience", "120"]);
    let (dag, client) = spread.start_build(4, "3");
    // Cut w3 off once it has built a step and is building two more (both its slots).
    spread.wait_for_runs("w3 building two steps after one", |runs| {
        let on_w3 = || runs.iter().filter(|r| r.worker == "w3");
        on_w3().any(|r| r.finished.is_some())
            && on_w3().filter(|r| r.finished.is_none()).count() == 2
    });
    let w3 = &spread.workers["w3"];
    let from = epoch_ms();
    w3.partition();
    let cut_off: Vec<String> = spread
        .runs()
        .into_iter()
        .filter(|r| r.worker == "w3" && r.finished.is_none())
        .map(|r| r.step)
        .collect();
    // While w3 is away the coordinator notices it gone and gives the steps it was building to
    // the others (which may wait there for inputs only w3 holds).
    let moved = |log: &str| {
        let Some((_, after)) = log.split_once("worker left worker=w3") else {
            return false;
        };
        cut_off.iter().all(|s| {
            ["w1", "w2"]
                .iter()
                .any(|w| after.contains(&format!("-{s}.drv worker={w}")))
        })
    };
    while !moved(&spread.space.log("up")) {
        assert!(
            epoch_ms() - from < PARTITION.as_millis() as u64,
            "w3's steps {cut_off:?} were not given to another worker while it was away:\n{}",
            spread.space.log("up")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(PARTITION.saturating_sub(Duration::from_millis(epoch_ms() - from)));
    w3.heal();
    let to = epoch_ms();
    // w3 comes back (it lost its connection to the partition, and joins again).
    spread
        .space
        .wait_for_log("w3", "rejoined the dataspace", Duration::from_secs(60));
    let built = client.finish(LIMIT);
    assert!(built.status.success(), "{built:?}");
    check_dag_outputs(&spread.space, built.stdout.trim(), &dag);
    let runs = spread.runs();
    for step in &cut_off {
        assert!(
            runs.iter()
                .any(|r| &r.step == step && r.worker != "w3" && r.finished.is_some()),
            "{step}, cut off on w3, was not built elsewhere: {runs:?}"
        );
    }
    for step in dag.keys() {
        assert!(
            runs.iter().any(|r| &r.step == step && r.finished.is_some()),
            "{step} never built: {runs:?}"
        );
    }
    let cut = Cut {
        workers: vec!["w3".to_owned()],
        from,
        to,
    };
    assert_eq!(
        unexplained_reruns(&runs, &cut),
        Vec::<String>::new(),
        "{cut:?}: {runs:?}"
    );
}

#[test]
fn the_coordinators_host_partitioned_from_every_worker_and_healed_completes_the_build() {
    let spread = Spread::start(&["w1", "w2", "w3"], &["--fetch-patience", "120"]);
    let (dag, client) = spread.start_build(3, "2");
    spread.wait_for_runs("a layer done", |runs| {
        runs.iter().filter(|r| r.finished.is_some()).count() >= 6
    });
    let from = epoch_ms();
    spread.coordinator.partition();
    // Every worker notices it lost the coordinator.
    for w in spread.workers.keys() {
        spread
            .space
            .wait_for_log(w, "lost the dataspace", Duration::from_secs(60));
    }
    spread.coordinator.heal();
    let to = epoch_ms();
    let built = client.finish(LIMIT);
    eprintln!(
        "coordinator cut off for {} ms (until every worker noticed), the build done {} ms after healing",
        to - from,
        epoch_ms() - to
    );
    assert!(built.status.success(), "{built:?}");
    check_dag_outputs(&spread.space, built.stdout.trim(), &dag);
    // Not asserted: a worker cut off while it fetched a step's inputs may run that step's
    // builder after it rejoins although another worker built it meanwhile (a defect of the
    // workers' detached builds, seen here and reported; not in this test's scope).
    let cut = Cut {
        workers: spread.workers.keys().cloned().collect(),
        from,
        to,
    };
    eprintln!(
        "builder runs again with no cut to explain them: {:?}",
        unexplained_reruns(&spread.runs(), &cut)
    );
}
