//! Reliability under faults: workers and the coordinator killed (SIGKILL) in the middle of a
//! large build, connections cut in the middle of a transfer, and clients that ask for too
//! much. Every figure printed here is recorded in `docs/RELIABILITY.md`.
//!
//! `NIXSPACE_SOAK_LONG=1` runs the long variant of the soak.
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use nixspace_protocol::build;
use nixspace_space::{Role, Route, Transport};
use nixspace_test_support::dataspace::Session;
use nixspace_test_support::proxy::{tcp_address, CuttingProxy};
use nixspace_test_support::{
    check_dag_outputs, epoch_ms, marked_dag_file, name_store, peak_rss, run, step_binding, Running,
    Space,
};
use preserves_schema::{Parse, Unparse};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use syndicate::actor::AnyValue;

/// How big a soak is and how hard it is hit.
struct Soak {
    /// Steps in the DAG, the root included.
    steps: usize,
    /// Steps per layer.
    width: usize,
    /// Workers (each with 2 slots).
    workers: usize,
    /// How long each builder sleeps, so that kills land on running builds.
    sleep: &'static str,
    /// A random worker is killed and restarted this often.
    fault_period: Duration,
    /// The coordinator is killed and restarted when this fraction of the steps is done.
    up_kills_at: &'static [f64],
    /// The whole build must finish within this.
    limit: Duration,
}

impl Soak {
    fn from_env() -> Soak {
        if std::env::var_os("NIXSPACE_SOAK_LONG").is_some() {
            Soak {
                steps: 1000,
                width: 40,
                workers: 4,
                sleep: "0.5",
                fault_period: Duration::from_secs(2),
                up_kills_at: &[0.15, 0.35, 0.55, 0.75, 0.9],
                limit: Duration::from_secs(1800),
            }
        } else {
            Soak {
                steps: 200,
                width: 20,
                workers: 4,
                sleep: "0.5",
                fault_period: Duration::from_secs(3),
                up_kills_at: &[0.25, 0.6],
                limit: Duration::from_secs(240),
            }
        }
    }
}

/// A layered DAG: each step depends on two steps of the layer below and one of any earlier
/// layer (a cross-layer edge); `root` depends on every step nothing else depends on. Step
/// names are Nix identifiers; dependencies by name.
fn layered_dag(steps: usize, width: usize, rng: &mut StdRng) -> BTreeMap<String, Vec<String>> {
    let name = |i: usize| format!("s{}_{}", i / width, i % width);
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for i in 0..steps - 1 {
        let layer = i / width;
        let mut mine = BTreeSet::new();
        if layer > 0 {
            let below = (layer - 1) * width;
            for _ in 0..2 {
                mine.insert(name(below + rng.gen_range(0..width)));
            }
        }
        if layer > 1 {
            mine.insert(name(rng.gen_range(0..(layer - 1) * width)));
        }
        deps.insert(name(i), mine.into_iter().collect());
    }
    let needed: BTreeSet<&String> = deps.values().flatten().collect();
    let tops: Vec<String> = deps
        .keys()
        .filter(|n| !needed.contains(n))
        .cloned()
        .collect();
    deps.insert("root".to_owned(), tops);
    deps
}

/// How long before a builder run a kill of its worker may still explain it: a killed worker's
/// daemon may start a build it had been asked for.
const STARTING: u64 = 1000;

/// How long after a builder run finished a kill of its worker may still explain running the
/// step again: registering and reporting the output take a moment.
const REGISTERING: u64 = 2000;

/// A worker kill: which worker, and when (ms since the epoch).
#[derive(Debug, Clone)]
struct Kill {
    worker: String,
    at: u64,
}

/// One builder run: the worker it ran on, when it started, when it finished (if it did).
#[derive(Debug)]
struct Run {
    worker: String,
    started: u64,
    finished: Option<u64>,
}

impl Run {
    /// Whether its worker was killed while it ran: from just before it started until its
    /// output could have been registered and reported.
    fn worker_killed_during(&self, kills: &[Kill]) -> bool {
        let Some(finished) = self.finished else {
            return kills
                .iter()
                .any(|k| k.worker == self.worker && k.at + STARTING >= self.started);
        };
        let during = self.started.saturating_sub(STARTING)..=finished + REGISTERING;
        kills
            .iter()
            .any(|k| k.worker == self.worker && during.contains(&k.at))
    }
}

/// What the builders' start and done markers say.
#[derive(Debug, Default)]
struct Runs {
    /// Steps whose builder finished at least once.
    done: BTreeSet<String>,
    /// Builder runs again of a step whose earlier run's worker was killed while that run ran
    /// (killed mid-run, or before its output was registered and reported): retries.
    retries: usize,
    /// Builder runs again of a step whose earlier run's worker was not killed while it ran:
    /// defects (a step built twice, or a builder abandoned without a kill).
    rebuilt: Vec<String>,
}

/// Read the runs file `runs` and classify its builder runs, given the worker kills.
fn read_runs(runs: &Path, kills: &[Kill]) -> Runs {
    classify_runs(&std::fs::read_to_string(runs).unwrap_or_default(), kills)
}

/// Classify the builder runs of a runs file's `text`: a run again of a step is a retry only
/// if the worker of the step's last earlier run was killed while that run ran.
fn classify_runs(text: &str, kills: &[Kill]) -> Runs {
    let mut r = Runs::default();
    // Per step: its runs so far, in the order they started.
    let mut runs: BTreeMap<String, Vec<Run>> = BTreeMap::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let [what, name, worker, at] = fields[..] else {
            panic!("unexpected line in the runs file: {line:?}");
        };
        let at: u64 = at.parse().expect("a time");
        let of_step = runs.entry(name.to_owned()).or_default();
        match what {
            "start" => {
                // The earlier run that this one repeats: the last one that finished, else
                // the last one started.
                let earlier = of_step
                    .iter()
                    .rev()
                    .find(|run| run.finished.is_some())
                    .or(of_step.last());
                if let Some(earlier) = earlier {
                    if earlier.worker_killed_during(kills) {
                        r.retries += 1;
                    } else {
                        r.rebuilt.push(name.to_owned());
                    }
                }
                of_step.push(Run {
                    worker: worker.to_owned(),
                    started: at,
                    finished: None,
                });
            }
            "done" => {
                r.done.insert(name.to_owned());
                let run = of_step
                    .iter_mut()
                    .rev()
                    .find(|run| run.worker == worker && run.finished.is_none())
                    .unwrap_or_else(|| panic!("done without a start: {line:?}"));
                run.finished = Some(at);
            }
            _ => panic!("unexpected line in the runs file: {line:?}"),
        }
    }
    r
}

/// What every log of the space (and the runs file) says about `steps`, for a failure report.
fn story(space: &Space, steps: &[String]) -> String {
    let mut out = String::new();
    let mut logs: Vec<_> = std::fs::read_dir(space.tmp.path())
        .expect("test directory")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log") || p.ends_with("runs"))
        .collect();
    logs.sort();
    for path in logs {
        let name = path
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let text = if path.ends_with("runs") {
            std::fs::read_to_string(&path).unwrap_or_default()
        } else {
            space.log(&name)
        };
        for line in text.lines() {
            if steps.iter().any(|s| {
                line.contains(&format!("-{s}.drv"))
                    || line.ends_with(&format!(" {s}"))
                    || line.contains(&format!(" {s} "))
            }) {
                out.push_str(&format!("{name}: {line}\n"));
            }
        }
    }
    out
}

/// Steps the planner recorded built more than once (`nixspace history`): a worker reports
/// an outcome again when the coordinator restarted before withdrawing the step (no builder
/// runs for that; the runs file counts those).
fn recorded_built_twice(space: &Space, steps: usize) -> Vec<String> {
    let limit = steps.to_string();
    let history = run(
        space.command(&["history", "--json", "--limit", &limit]),
        Duration::from_secs(60),
    );
    assert!(history.status.success(), "{history:?}");
    let steps: serde_json::Value = serde_json::from_str(&history.stdout).expect("history JSON");
    steps
        .as_array()
        .expect("steps")
        .iter()
        .filter(|s| {
            s["attempts"]
                .as_array()
                .is_some_and(|a| a.iter().filter(|a| a["outcome"] == "built").count() > 1)
        })
        .map(|s| s["drv"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn kill(worker: &str, at: u64) -> Kill {
    Kill {
        worker: worker.to_owned(),
        at,
    }
}

/// A step built on `w1` (10 000 to 10 500 ms), then started again on `w2` at 20 000 ms.
const BUILT_THEN_RUN_AGAIN: &str = "start s w1 10000\ndone s w1 10500\nstart s w2 20000\n";

#[test]
fn a_rerun_after_a_kill_of_another_worker_is_a_rebuild() {
    let runs = classify_runs(
        BUILT_THEN_RUN_AGAIN,
        &[kill("w2", 10200), kill("w3", 11000)],
    );
    assert_eq!(runs.rebuilt, ["s"]);
    assert_eq!(runs.retries, 0);
    // Nor does a kill of its own worker long after its output was reported excuse it.
    let runs = classify_runs(BUILT_THEN_RUN_AGAIN, &[kill("w1", 15000)]);
    assert_eq!(runs.rebuilt, ["s"]);
}

#[test]
fn a_rerun_after_a_kill_of_its_own_worker_while_it_ran_is_a_retry() {
    // Killed while building, and killed after finishing but before reporting: both retries.
    for at in [10200, 11000] {
        let runs = classify_runs(BUILT_THEN_RUN_AGAIN, &[kill("w2", at), kill("w1", at)]);
        assert_eq!(runs.retries, 1, "killed at {at}");
        assert!(runs.rebuilt.is_empty(), "killed at {at}");
        assert_eq!(runs.done.len(), 1);
    }
    // A run that never finished, its worker killed: a retry; not killed: a defect.
    let abandoned = "start s w1 10000\nstart s w2 20000\ndone s w2 20500\n";
    assert_eq!(classify_runs(abandoned, &[kill("w1", 10300)]).retries, 1);
    assert_eq!(
        classify_runs(abandoned, &[kill("w2", 10300)]).rebuilt,
        ["s"]
    );
}

#[test]
fn soak() {
    let soak = Soak::from_env();
    let seed: u64 = rand::thread_rng().gen();
    eprintln!("soak: seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut space = Space::start_with(&["--max-attempts", "20", "--retry-backoff", "0.2"]);
    let workers: Vec<String> = (1..=soak.workers).map(|i| format!("w{i}")).collect();
    // Each worker has a store of its own (kept across its restarts), so a step built again
    // anywhere runs its builder again: the runs file sees every duplicate build.
    let store_of = |w: &str| {
        let dir = space.tmp.path().join(format!("store-{w}"));
        dir.to_str().expect("utf-8 path").to_owned()
    };
    let stores: BTreeMap<String, String> =
        workers.iter().map(|w| (w.clone(), store_of(w))).collect();
    for w in &workers {
        // Its builders read which worker they run on from its store.
        name_store(Path::new(&stores[w]), w);
        space.worker(w, &["--own-store", &stores[w]]);
    }
    let runs = space.tmp.path().join("runs");
    let dag = layered_dag(soak.steps, soak.width, &mut rng);
    let file = marked_dag_file(&space, "soak.nix", &dag, &runs, soak.sleep);

    let started = Instant::now();
    let mut client = Running::new(space.spawn_build(&file));
    let mut up_kills = 0usize;
    let mut worker_kills: Vec<Kill> = Vec::new();
    let mut lives: BTreeMap<String, usize> = workers.iter().map(|w| (w.clone(), 1)).collect();
    let mut next_fault = Instant::now() + soak.fault_period;
    while !client.exited() {
        assert!(
            started.elapsed() < soak.limit,
            "the soak did not finish in {:?}",
            soak.limit
        );
        let done = read_runs(&runs, &worker_kills).done.len() as f64 / soak.steps as f64;
        if soak.up_kills_at.get(up_kills).is_some_and(|at| done >= *at) {
            space.kill_up();
            up_kills += 1;
            eprintln!(
                "soak: killed nixspace up at {:.0}% ({:?})",
                done * 100.0,
                started.elapsed()
            );
            std::thread::sleep(Duration::from_millis(500));
            space.restart_up_logged(&format!("up-{}", up_kills + 1));
            // Give workers time to rejoin and hand in what they built meanwhile: a worker
            // killed before that takes its outcomes with it.
            next_fault = Instant::now() + soak.fault_period;
        }
        if Instant::now() >= next_fault {
            let victim = &workers[rng.gen_range(0..workers.len())];
            worker_kills.push(Kill {
                worker: victim.clone(),
                at: epoch_ms(),
            });
            space.kill_worker(victim);
            std::thread::sleep(Duration::from_millis(300));
            let life = lives.get_mut(victim).expect("a worker");
            *life += 1;
            space.worker_logged(
                victim,
                &format!("{victim}-{life}"),
                &["--own-store", &stores[victim]],
            );
            next_fault = Instant::now() + soak.fault_period;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let built = client.finish(Duration::from_secs(10));
    let wall = started.elapsed();
    assert!(built.status.success(), "{built:?}");
    let root_out = built.stdout.trim();
    check_dag_outputs(&space, root_out, &dag);

    let runs = read_runs(&runs, &worker_kills);
    let built_twice = recorded_built_twice(&space, soak.steps);
    let planner_retries: usize = std::iter::once("up".to_owned())
        .chain((2..=up_kills + 1).map(|i| format!("up-{i}")))
        .map(|log| {
            space
                .log(&log)
                .matches("retrying after a transient failure")
                .count()
        })
        .sum();
    eprintln!(
        "soak: {} steps, {} workers: {} worker kills, {up_kills} coordinator kills, \
         {} builder runs retried (planner retries: {planner_retries}), {} extra builds, {:.1} s; \
         {} outcomes reported again after a coordinator restart",
        soak.steps,
        soak.workers,
        worker_kills.len(),
        runs.retries,
        runs.rebuilt.len(),
        wall.as_secs_f64(),
        built_twice.len()
    );
    assert_eq!(runs.done.len(), soak.steps, "every step's builder finished");
    assert!(
        runs.rebuilt.is_empty(),
        "steps built again after succeeding: {:?}\nworker kills at {worker_kills:?}\n{}",
        runs.rebuilt,
        story(&space, &runs.rebuilt)
    );
    assert_eq!(
        up_kills,
        soak.up_kills_at.len(),
        "every coordinator kill happened"
    );
    assert!(
        worker_kills.len() >= 2,
        "only {} worker kills: the build was too short",
        worker_kills.len()
    );
}

/// Bytes of random data in the input that crosses the cut connection.
const BIG: usize = 8 << 20;

/// `route` with its TCP transport only, pointed at `proxy` instead.
fn through(route: &Route, proxy: &CuttingProxy) -> Route {
    assert!(
        route
            .transports
            .iter()
            .any(|t| matches!(t, Transport::Tcp(..))),
        "up listens on TCP: {:?}",
        route.transports
    );
    route.with_transports(vec![Transport::Tcp(
        "127.0.0.1".to_owned(),
        proxy.addr().port(),
    )])
}

#[test]
fn a_connection_cut_mid_transfer_is_retried_and_nothing_half_written_is_valid() {
    let mut space = Space::start_with(&["--tcp", "127.0.0.1:0"]);
    let worker_route = Route::read(&Role::Worker.route_file(&space.dir())).expect("route");
    // Cut the first connection once 3 MiB went to the worker: in the middle of the NAR.
    let proxy = CuttingProxy::start(tcp_address(&worker_route), 3 << 20);
    let proxied = space.worker_route_file("proxied-worker", &through(&worker_route, &proxy));
    let (s1, s2) = (space.tmp.path().join("s1"), space.tmp.path().join("s2"));
    let own = |p: &Path| p.to_str().expect("utf-8").to_owned();
    space.worker("w1", &["--features", "fa", "--own-store", &own(&s1)]);
    let route_arg = own(&proxied);
    space.worker(
        "w2",
        &[
            "--features",
            "fb",
            "--own-store",
            &own(&s2),
            "--route",
            &route_arg,
        ],
    );
    // `big` (random, built by w1) is read by `sum` (built by w2, through the proxy).
    let binding = step_binding(
        "name: features: script: deps",
        "requiredSystemFeatures = features;",
        "${script} > $out",
    );
    let file = space.nix_file(
        "cut.nix",
        &format!(
            "let\n{binding}  big = step \"big\" [ \"fa\" ] \"/usr/bin/head -c {BIG} /dev/urandom\" [ ];\n\
             in\nstep \"sum\" [ \"fb\" ] \"/usr/bin/sha256sum $deps\" [ big ]\n"
        ),
    );
    let started = Instant::now();
    let built = space.build(&file, Duration::from_secs(180));
    assert!(built.status.success(), "{built:?}");
    let stats = proxy.stats();
    eprintln!(
        "cut transfer: {stats:?}, build {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(stats.cuts, 1, "{stats:?}");
    // Fetched again over the new connection at once: not after a fetch's patience (30 s) or
    // a stream's idle timeout (60 s), nor by the planner retrying the whole step.
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "took {:?}",
        started.elapsed()
    );
    space.wait_for_log("w2", "fetching again once rejoined", Duration::from_secs(1));
    assert!(stats.connections >= 2, "the worker came back: {stats:?}");

    // The sum w2 computed is that of the data w1 made: the transfer was complete and right.
    let sum = std::fs::read_to_string(built.stdout.trim()).expect("sum output");
    let (digest, big) = sum.split_once("  ").expect("sha256sum output");
    let mut check = std::process::Command::new("/usr/bin/sha256sum");
    check.arg(big.trim());
    let check = run(check, Duration::from_secs(30));
    assert!(check.stdout.starts_with(digest), "{sum} vs {check:?}");
    assert_eq!(
        std::fs::metadata(big.trim()).expect("big").len(),
        BIG as u64
    );

    // The cut landed in the middle of the NAR, and w2 fetched it again afterwards.
    let log = space.log("w2");
    let fetch_lines: Vec<&str> = log.lines().filter(|l| l.contains("-big")).collect();
    let failed = fetch_lines.iter().position(|l| l.contains("fetch failed"));
    let fetched = fetch_lines.iter().rposition(|l| l.contains("fetched"));
    assert!(
        matches!((failed, fetched), (Some(f), Some(g)) if f < g),
        "expected a failed fetch of big, then a good one:\n{log}"
    );
    // In w2's store every valid path has the contents its hash says (so nothing half
    // written was registered), and big is valid.
    let verify = run(
        space.in_other_store(
            &s2,
            &format!(
                "nix-store --verify --check-contents && nix-store --check-validity {}",
                big.trim()
            ),
        ),
        Duration::from_secs(60),
    );
    assert!(verify.status.success(), "{verify:?}");
    assert!(!verify.stderr.contains("error"), "{verify:?}");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A flood of 100,000 demands, each as `demand` says, for steps no worker can build.
fn flood_demands() -> Vec<build::Demand> {
    (0..100_000)
        .map(|i| {
            nixspace_test_support::dataspace::demand_record(
                &format!("/nix/store/{i:032}-flood.drv"),
                "flooder",
            )
        })
        .collect()
}

/// A client asserting `records` on a coordinator taking at most `cap` demands per client is
/// told it was refused, the coordinator keeps `kept` steps and still answers, and leaving
/// withdraws them.
fn a_flood_is_capped(cap: usize, records: Vec<AnyValue>, kept: usize) {
    let space = Space::start_with(&["--max-demands-per-client", &cap.to_string()]);
    let route = Route::read(&Role::Submit.route_file(&space.dir())).expect("route");
    let started = Instant::now();
    runtime().block_on(async {
        let flood = Session::join_within(&route, records, Duration::from_secs(120))
            .await
            .expect("join with the flood");
        eprintln!("flood: demands taken or refused in {:?}", started.elapsed());
        // The flooder is told, in words.
        let refusals = flood.with_label("demands-refused");
        assert_eq!(refusals.len(), 1, "{refusals:?}");
        let text = nixspace_test_support::dataspace::text(&refusals[0]);
        assert!(text.contains("\"flooder\""), "{text}");
        assert!(text.contains(&format!("at most {cap}")), "{text}");
        // The coordinator kept the demands within the cap only, and still answers.
        space.wait_for_status("the capped flood, each step unschedulable", |r| {
            r["demands"]
                .as_array()
                .is_some_and(|d| d.iter().any(|d| d["steps"] == kept))
                && r["unschedulable"].as_object().map(|u| u.len()) == Some(kept)
        });
        let rss = peak_rss(space.up_pid()) / 1024;
        eprintln!("flood: peak RSS of nixspace up {} MiB", rss / 1024);
        assert!(rss < 512 * 1024, "nixspace up peaked at {rss} KiB");
        // Leaving withdraws the demands and the refusal.
        flood.leave();
        space.wait_for_status("the flood withdrawn", |r| {
            r["demands"].as_array().is_some_and(|d| d.is_empty())
        });
    });
    space.wait_for_log(
        "up",
        "refused demands over the per-connection cap",
        Duration::from_secs(5),
    );
}

#[test]
fn a_client_over_the_demand_cap_is_refused_and_the_coordinator_keeps_answering() {
    let records = flood_demands().iter().map(Unparse::unparse).collect();
    a_flood_is_capped(1_000, records, 1_000);
}

#[test]
fn a_demands_record_counts_each_of_its_demands_against_the_cap() {
    // 333 records of 300 demands: three fit under a cap of 1,000, the fourth would go past
    // it and is refused whole, as are the rest. Counted per record, all would be taken.
    let records = flood_demands()[..99_900]
        .chunks(300)
        .map(|demands| {
            build::Demands {
                demands: demands.to_vec(),
            }
            .unparse()
        })
        .collect();
    a_flood_is_capped(1_000, records, 900);
}

#[test]
fn a_frontend_over_the_demand_cap_fails_with_a_clear_error() {
    let space = Space::start_with(&["--max-demands-per-client", "3"]);
    let binding = step_binding("name: deps", "", "echo ${name} $deps > $out");
    let file = space.nix_file(
        "five.nix",
        &format!(
            "let\n{binding}  a = step \"a\" [ ];\n  b = step \"b\" [ a ];\n  \
             c = step \"c\" [ b ];\n  d = step \"d\" [ c ];\nin\nstep \"e\" [ d ]\n"
        ),
    );
    let built = space.build(&file, Duration::from_secs(60));
    assert!(!built.status.success(), "{built:?}");
    assert!(
        built.stderr.contains("too many demands on one connection")
            && built.stderr.contains("at most 3"),
        "{built:?}"
    );
    let status = space.status();
    assert!(status["workers"].is_array(), "{status}");
}

#[test]
fn a_huge_build_log_is_truncated_and_the_coordinator_stays_up() {
    const LOG: u64 = 200 << 20;
    const CAP: u64 = 1 << 20;
    let mut space = Space::start();
    space.worker("w1", &["--max-log-bytes", &CAP.to_string()]);
    // 200 MiB of log in lines of 1 KiB.
    let file = space.sh_derivation(
        "spew.nix",
        &format!("spew-{}", nixspace_test_support::nonce()),
        &format!(
            "/usr/bin/yes $(/usr/bin/printf %01023d 0) | /usr/bin/head -c {LOG}; echo spewed > $out"
        ),
    );
    let started = Instant::now();
    let built = space.build_with(&file, &["-L"], Duration::from_secs(300));
    assert!(built.status.success(), "{built:?}");
    let shown: usize = built
        .stderr
        .lines()
        .filter(|l| l.contains("> 00000000"))
        .count();
    eprintln!(
        "spew: {} MiB of log, {shown} lines shown, {:.1} s",
        LOG >> 20,
        started.elapsed().as_secs_f64()
    );
    assert!(
        built
            .stderr
            .contains(&format!("log truncated after {CAP} bytes")),
        "no truncation notice: {}",
        built
            .stderr
            .lines()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(shown as u64, CAP / 1024, "lines shown");
    assert!(space.up_is_running(), "nixspace up died");
    let rss = peak_rss(space.up_pid()) / 1024;
    eprintln!("spew: peak RSS of nixspace up {} MiB", rss / 1024);
    assert!(rss < 256 * 1024, "nixspace up peaked at {rss} KiB");
    assert!(space.status()["workers"].is_array());
}

#[test]
fn a_worker_ignoring_its_log_cap_is_truncated_by_the_coordinator() {
    const CAP: usize = 64 << 10;
    const FLOOD: usize = 8 << 20;
    const LINE: usize = 1023;
    const AFRESH: &str = "the next build of the step";
    let space = Space::start_with(&["--max-log-bytes-per-step", &CAP.to_string()]);
    let drv = nixspace_test_support::dataspace::fake_drv("chatty");
    let other = nixspace_test_support::dataspace::fake_drv("quiet");
    let log = |drv: &str, line: String| {
        build::Log {
            drv: drv.to_owned(),
            worker: "rogue".to_owned(),
            line,
        }
        .unparse()
    };
    // 8 MiB of log for one step (a well-behaved worker would stop at its own cap), 1 MiB of
    // malformed log messages (no step named), the step reported failed and one more line of
    // it (its next build, counted afresh), then one line of another step.
    let malformed = AnyValue::record(
        AnyValue::symbol("log"),
        vec![
            AnyValue::new(0),
            AnyValue::new(0),
            AnyValue::new("x".repeat(LINE)),
        ],
    );
    let mut flood: Vec<_> = (0..FLOOD / (LINE + 1))
        .map(|i| log(&drv, format!("{i:0LINE$}")))
        .chain(std::iter::repeat_n(malformed, 1024))
        .collect();
    flood.push(nixspace_test_support::dataspace::reported_failed_for_good(
        &drv, "rogue",
    ));
    flood.push(log(&drv, AFRESH.to_owned()));
    flood.push(log(&other, "still heard".to_owned()));
    let (worker, submit) = (
        nixspace_test_support::dataspace::route(&space, Role::Worker),
        nixspace_test_support::dataspace::route(&space, Role::Submit),
    );
    runtime().block_on(async {
        let observer = Session::join(&submit, vec![])
            .await
            .expect("join as submit");
        let started = Instant::now();
        let rogue = Session::join_sending(&worker, vec![], flood, Duration::from_secs(120))
            .await
            .expect("join as worker with the flood");
        eprintln!(
            "log flood: {} MiB sent and handled in {:?}",
            FLOOD >> 20,
            started.elapsed()
        );
        let heard = |observer: &Session| {
            observer
                .messages_with_label("log")
                .iter()
                .filter_map(|m| build::Log::parse(m).ok())
                .collect::<Vec<_>>()
        };
        let got_all = nixspace_test_support::dataspace::poll_until(
            nixspace_test_support::dataspace::ANSWER,
            || heard(&observer).iter().any(|l| l.drv == other),
        )
        .await;
        assert!(got_all, "the other step's line never came");
        let lines = heard(&observer);
        let (chatty, rest): (Vec<&build::Log>, Vec<_>) = lines.iter().partition(|l| l.drv == drv);
        let (notices, mut passed): (Vec<&build::Log>, Vec<_>) = chatty
            .into_iter()
            .partition(|l| l.line.contains("truncated by the coordinator"));
        // The line after the report passed: the cap is per build of the step.
        assert_eq!(
            passed.pop().map(|l| l.line.as_str()),
            Some(AFRESH),
            "the line logged after the step was reported"
        );
        let bytes: usize = passed.iter().map(|l| l.line.len() + 1).sum();
        eprintln!(
            "log flood: the observer got {} lines ({bytes} bytes) of {}",
            passed.len(),
            FLOOD / (LINE + 1)
        );
        assert!(bytes <= CAP, "{bytes} bytes passed the {CAP}-byte cap");
        assert_eq!(passed.len(), CAP / (LINE + 1), "lines within the cap");
        assert_eq!(notices.len(), 1, "{notices:?}");
        assert!(
            notices[0].line.contains(&format!(
                "after {CAP} bytes (nixspace up --max-log-bytes-per-step {CAP}"
            )),
            "{}",
            notices[0].line
        );
        assert_eq!(rest.len(), 1, "the other step's log is its own");
        assert_eq!(
            observer.messages_with_label("log").len(),
            lines.len(),
            "malformed logs"
        );
        // The coordinator still answers at once.
        let asked = Instant::now();
        assert!(space.status()["workers"].is_array());
        eprintln!(
            "log flood: nixspace status answered in {:?}",
            asked.elapsed()
        );
        assert!(asked.elapsed() < Duration::from_secs(10));
        rogue.leave();
        observer.leave();
    });
    let up = space.log("up");
    assert_eq!(
        up.matches("build log over the per-step cap: truncated")
            .count(),
        1,
        "{up}"
    );
    assert_eq!(
        up.matches("dropping malformed log messages").count(),
        1,
        "{up}"
    );
}

/// The outcomes of `drv`'s attempts in the history, oldest first (`null` while open).
fn attempt_outcomes(space: &Space, drv: &str) -> Vec<serde_json::Value> {
    let step = crate::jobs::history_of(space, drv);
    step["attempts"]
        .as_array()
        .map(|a| a.iter().map(|a| a["outcome"].clone()).collect())
        .unwrap_or_default()
}

#[test]
fn a_worker_restarted_before_its_old_connection_is_noticed_gone_loses_only_the_old_steps() {
    use nixspace_test_support::dataspace::{
        assigned, demand, fake_drv, offer, poll_until, route, runtime, test_worker_process, ANSWER,
    };
    let space = Space::start_with(&["--retry-backoff", "0.1"]);
    let drv = fake_drv("restarted-worker");
    let worker = route(&space, Role::Worker);
    let offer = offer("w", 1);
    let outcomes = |expected: &[serde_json::Value]| {
        let deadline = Instant::now() + ANSWER;
        loop {
            let now = attempt_outcomes(&space, &drv);
            if now == expected || Instant::now() > deadline {
                return now;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let (open, lost) = (serde_json::Value::Null, serde_json::json!("lost"));
    runtime().block_on(async {
        let frontend = Session::join(&route(&space, Role::Submit), vec![demand(&drv)])
            .await
            .expect("join as submit");
        // The old process; its connection stays, as one whose host went down unnoticed does.
        let old = Session::join(
            &worker,
            vec![test_worker_process("w", "old"), offer.clone()],
        )
        .await
        .expect("join as worker");
        assert!(frontend.wait_until(&assigned(&drv, "w"), true).await);
        let expected = [open.clone()];
        assert_eq!(outcomes(&expected), expected);
        // The restarted process joins under the same name: the old one's step is lost and
        // given to the new one.
        let new = Session::join(&worker, vec![test_worker_process("w", "new"), offer])
            .await
            .expect("join as worker");
        let expected = [lost.clone(), open.clone()];
        assert_eq!(outcomes(&expected), expected, "{}", space.log("up"));
        assert!(frontend.wait_until(&assigned(&drv, "w"), true).await);
        // The old connection noticed gone at last: the new process keeps its step.
        old.leave();
        space.wait_for_log("up", "worker left worker=w session=old", ANSWER);
        let taken = poll_until(Duration::from_secs(1), || {
            !frontend.sees(&assigned(&drv, "w"))
        })
        .await;
        assert!(!taken, "the new process's step was taken away");
        assert_eq!(attempt_outcomes(&space, &drv), expected);
        // Positive control: the new process leaving loses it.
        new.leave();
        let expected = [lost.clone(), lost];
        assert_eq!(outcomes(&expected), expected, "{}", space.log("up"));
    });
}

#[test]
fn a_step_built_just_before_a_coordinator_kill_is_not_built_again_after_the_restart() {
    use nixspace_protocol::{BuildMode, BuildSettings};
    use nixspace_test_support::dataspace::{
        assigned, built, demand, demand_record, fake_drv, offer, reported_built, route, runtime,
        test_worker,
    };
    let mut space = Space::start();
    let (drv, checked) = (
        fake_drv("built-before-the-kill"),
        fake_drv("checked-after-it"),
    );
    let check = BuildSettings {
        mode: BuildMode::Check,
        ..BuildSettings::default()
    };
    let worker = |free: i64| vec![test_worker("w"), offer("w", free)];
    let (submit, as_worker) = (route(&space, Role::Submit), route(&space, Role::Worker));
    runtime().block_on(async {
        for step in [&drv, &checked] {
            let frontend = Session::join(&submit, vec![demand(step)])
                .await
                .expect("join as submit");
            let _worker = Session::join(&as_worker, worker(1))
                .await
                .expect("join as worker");
            assert!(frontend.wait_until(&assigned(step, "w"), true).await);
            let _report = Session::send(&as_worker, vec![reported_built(step, "w")])
                .await
                .expect("report");
            assert!(frontend.wait_until(&built(step, "w", &[]), true).await);
        }
    });
    // Killed right after the planner took the reports: a frontend that had not seen the
    // `built` yet demands the step again from the restarted coordinator, and the worker
    // forgot it (the planner had withdrawn the assignment).
    space.kill_up();
    space.restart_up();
    let (submit, as_worker) = (route(&space, Role::Submit), route(&space, Role::Worker));
    let check_it = build::Demand {
        step: build::StepInfo {
            settings: check.to_wire(),
            ..demand_record(&checked, "frontend").step
        },
        ..demand_record(&checked, "frontend")
    };
    runtime().block_on(async {
        let frontend = Session::join(&submit, vec![demand(&drv), check_it.unparse()])
            .await
            .expect("join as submit");
        let _worker = Session::join(&as_worker, worker(2))
            .await
            .expect("join as worker");
        assert!(
            frontend.wait_until(&built(&drv, "w", &[]), true).await,
            "{}",
            space.log("up-restarted")
        );
        // Positive control: a step to be checked is built again, so a step taken for
        // building would have been seen given out by now.
        let check_assigned = build::Assigned {
            drv: checked.clone(),
            worker: "w".to_owned(),
            settings: check.to_wire(),
            derivation: Vec::new(),
        }
        .unparse();
        assert!(frontend.wait_until(&check_assigned, true).await);
        assert!(!frontend.sees(&assigned(&drv, "w")), "built again");
    });
    assert_eq!(attempt_outcomes(&space, &drv), [serde_json::json!("built")]);
    space.wait_for_log(
        "up-restarted",
        "built just before the restart: taken as built",
        Duration::from_secs(1),
    );
}
