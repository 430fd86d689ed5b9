//! Reliability under faults: workers and the coordinator killed (SIGKILL) in the middle of a
//! large build, connections cut in the middle of a transfer, and clients that ask for too
//! much. Every figure printed here is recorded in `docs/RELIABILITY.md`.
//!
//! `NIXSPACE_SOAK_LONG=1` runs the long variant of the soak.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::{run, step_binding, Running, Space};

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

/// The Nix file of `dag`: each builder appends `start NAME` to `runs`, sleeps, writes its
/// name and its inputs' paths to `$out`, then appends `done NAME`.
fn dag_file(
    space: &Space,
    dag: &BTreeMap<String, Vec<String>>,
    runs: &Path,
    sleep: &str,
) -> std::path::PathBuf {
    let binding = step_binding(
        "name: deps",
        "",
        &format!(
            "echo start ${{name}} >> {runs}
      /bin/sleep {sleep}
      echo ${{name}} $deps > $out
      echo done ${{name}} >> {runs}",
            runs = runs.display()
        ),
    );
    // `let` bindings are recursive: their order does not matter.
    let steps: String = dag
        .iter()
        .map(|(name, deps)| format!("  {name} = step \"{name}\" [ {} ];\n", deps.join(" ")))
        .collect();
    space.nix_file("soak.nix", &format!("let\n{binding}{steps}in\nroot\n"))
}

/// What the builders' start and done markers say.
#[derive(Debug, Default)]
struct Runs {
    /// Steps whose builder finished at least once.
    done: BTreeSet<String>,
    /// Builder runs that did not finish (killed) and were run again: retries.
    retries: usize,
    /// Builder runs of a step that had finished already: defects.
    rebuilt: Vec<String>,
}

fn read_runs(runs: &Path) -> Runs {
    let text = std::fs::read_to_string(runs).unwrap_or_default();
    let mut r = Runs::default();
    let mut started: BTreeMap<&str, usize> = BTreeMap::new();
    for line in text.lines() {
        match line.split_once(' ') {
            Some(("start", name)) => {
                if r.done.contains(name) {
                    r.rebuilt.push(name.to_owned());
                }
                *started.entry(name).or_default() += 1;
            }
            Some(("done", name)) => {
                if !r.done.insert(name.to_owned()) {
                    r.rebuilt.push(name.to_owned());
                }
            }
            _ => panic!("unexpected line in the runs file: {line:?}"),
        }
    }
    r.retries = started
        .iter()
        .map(|(name, n)| n - usize::from(r.done.contains(*name)).min(*n))
        .sum();
    r
}

/// Check every output in the closure of `root_out`: one per step of `dag`, each naming its
/// step and referring to exactly the outputs of that step's dependencies.
fn check_outputs(space: &Space, root_out: &str, dag: &BTreeMap<String, Vec<String>>) {
    let mut closure = space.nix("nix-store", None);
    closure.args(["-qR", root_out]);
    let closure = run(closure, Duration::from_secs(60));
    assert!(closure.status.success(), "{closure:?}");
    let name_of = |path: &str| -> String {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        text.split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    let mut seen = BTreeSet::new();
    for path in closure.stdout.lines() {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let mut words = text.split_whitespace();
        let name = words.next().expect("a name").to_owned();
        let mut inputs: Vec<String> = words.map(name_of).collect();
        inputs.sort();
        let expected = dag
            .get(&name)
            .unwrap_or_else(|| panic!("unknown step {name} in {path}"));
        assert_eq!(&inputs, expected, "inputs of {name} ({path})");
        assert!(seen.insert(name.clone()), "two outputs for {name}");
    }
    assert_eq!(
        seen.len(),
        dag.len(),
        "outputs in the closure of {root_out}"
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
    for w in &workers {
        space.worker(w, &[]);
    }
    let runs = space.tmp.path().join("runs");
    let dag = layered_dag(soak.steps, soak.width, &mut rng);
    let file = dag_file(&space, &dag, &runs, soak.sleep);

    let started = Instant::now();
    let mut client = Running::new(space.spawn_build(&file));
    let (mut worker_kills, mut up_kills) = (0usize, 0usize);
    let mut lives: BTreeMap<String, usize> = workers.iter().map(|w| (w.clone(), 1)).collect();
    let mut next_fault = Instant::now() + soak.fault_period;
    while !client.exited() {
        assert!(
            started.elapsed() < soak.limit,
            "the soak did not finish in {:?}",
            soak.limit
        );
        let done = read_runs(&runs).done.len() as f64 / soak.steps as f64;
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
        }
        if Instant::now() >= next_fault {
            let victim = &workers[rng.gen_range(0..workers.len())];
            space.kill_worker(victim);
            worker_kills += 1;
            std::thread::sleep(Duration::from_millis(300));
            let life = lives.get_mut(victim).expect("a worker");
            *life += 1;
            space.worker_logged(victim, &format!("{victim}-{life}"), &[]);
            next_fault = Instant::now() + soak.fault_period;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let built = client.finish(Duration::from_secs(10));
    let wall = started.elapsed();
    assert!(built.status.success(), "{built:?}");
    let root_out = built.stdout.trim();
    check_outputs(&space, root_out, &dag);

    let runs = read_runs(&runs);
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
        "soak: {} steps, {} workers: {worker_kills} worker kills, {up_kills} coordinator kills, \
         {} builder runs retried (planner retries: {planner_retries}), {} extra builds, {:.1} s",
        soak.steps,
        soak.workers,
        runs.retries,
        runs.rebuilt.len(),
        wall.as_secs_f64()
    );
    assert_eq!(runs.done.len(), soak.steps, "every step's builder finished");
    assert!(
        runs.rebuilt.is_empty(),
        "steps built again after succeeding: {:?}",
        runs.rebuilt
    );
    assert_eq!(
        up_kills,
        soak.up_kills_at.len(),
        "every coordinator kill happened"
    );
    assert!(
        worker_kills >= 2,
        "only {worker_kills} worker kills: the build was too short"
    );
}
