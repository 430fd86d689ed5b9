//! `nixspace bench dispatch`: the scheduler without Nix. Simulated workers (actors in this
//! process, each joined over the dataspace's unix socket like a real worker) "build" a step
//! by reporting it built as soon as it is assigned, so what is measured is the dataspace and
//! the planner: how long a slot stays idle between reporting a step built and being given the
//! next one, and how many steps per second go through demand → assigned → built.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use clap::Args;
use nixspace_nix_formats::hash::{compress_hash, Hash};
use nixspace_nix_formats::nixbase32;
use nixspace_protocol::{build, on_retraction};
use nixspace_space::{Role, Route};
use syndicate::actor::{Activation, ActorResult, AnyValue, Cap, Entity, Ref};
use syndicate::enclose;
use syndicate_macros::during;

use crate::dataspace;
use crate::error::BenchError;
use crate::processes::{spawn_space, Children, Scratch};
use crate::resident::Process;

/// The scheduler alone: simulated workers that finish every step at once.
///
/// Starts `nixspace up`, joins WORKERS simulated workers of JOBS slots each over its socket,
/// demands STEPS steps in LAYERS layers (each step past the first layer needs two steps of
/// the layer before; one layer: independent steps) and waits until all are reported built.
/// Prints how long a worker's slot stays idle (step reported built → next step assigned to
/// it) as min/median/p99/max, and the steps per second through the whole cycle, per run;
/// then, per run, how long after the demands the first step was assigned, and how much
/// `up`'s peak resident memory grew over its size before the run, per demanded step. Then it
/// measures the same dataspace alone and prints how many steps per second it allows and how
/// close each run came to that. Last it demands LATENCY_STEPS steps one at a time and prints
/// the median and p99 of demand → assigned → built.
#[derive(Args, Debug)]
pub struct DispatchArgs {
    /// Steps demanded per run.
    #[arg(long, default_value_t = 2000)]
    steps: usize,
    /// Layers the steps are spread over, as evenly as they go: each step past the first layer
    /// needs the step in its place in the layer before and the next one. 1: independent steps.
    #[arg(long, default_value_t = 1)]
    layers: usize,
    /// Simulated workers.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Slots per simulated worker.
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// Steps each simulated worker holds beyond its slots (`nixspace worker --hold`): a held
    /// step starts the moment a slot frees.
    #[arg(long, default_value_t = 0)]
    hold: usize,
    /// Repetitions.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// How long a simulated worker "builds" each step (sleeps before reporting it built), in
    /// milliseconds; 0 reports at once. With a build time the table also shows the rate
    /// against the ideal (every slot always busy).
    #[arg(long, default_value_t = 0)]
    build_ms: u64,
    /// Then measure the same dataspace alone with this many records per run (three runs, as
    /// `nixspace bench dataspace` does over the socket) and print the steps per second it
    /// allows at this benchmark's assertions and retractions per step; 0 skips it.
    #[arg(long, default_value_t = 20_000)]
    dataspace_records: usize,
    /// Then demand this many steps one at a time (each once the previous one is built)
    /// and report demand → assigned → built latencies; 0 skips it.
    #[arg(long, default_value_t = 200)]
    latency_steps: usize,
}

/// Run `nixspace bench dispatch`.
pub async fn run(args: DispatchArgs) -> Result<ExitCode, BenchError> {
    if [args.steps, args.layers, args.workers, args.jobs, args.runs].contains(&0) {
        return Err(BenchError::Arguments(
            "--steps, --layers, --workers, --jobs and --runs must be at least 1",
        ));
    }
    let Scratch {
        exe,
        tmp,
        dir,
        mut children,
    } = Scratch::new("nixspace-bench-")?;
    let result = runs(&args, &exe, &dir, tmp.path(), &mut children).await;
    children.stop().await;
    result
}

async fn runs(
    args: &DispatchArgs,
    exe: &Path,
    dir: &Path,
    tmp: &Path,
    children: &mut Children,
) -> Result<ExitCode, BenchError> {
    let state = tmp.join("state");
    let up_args = ["--state-dir", state.to_str().unwrap_or("state")];
    spawn_space(exe, &["--log-level", "warn"], dir, 0, 0, &up_args, children).await?;
    let up = children.first_id().map(Process::Id);
    let worker_route = Route::read(&Role::Worker.route_file(dir))?;
    let submit_route = Route::read(&Role::Submit.route_file(dir))?;
    let slots = SlotTimes::default();
    let assigned = AssignTimes::default();
    let mut actors = Vec::new();
    for i in 0..args.workers {
        let worker = SimWorker {
            id: format!("sim-{i}"),
            slots: args.jobs,
            hold: args.hold,
            build_time: Duration::from_millis(args.build_ms),
            times: slots.clone(),
            assigned: assigned.clone(),
            ds: None,
            held: HashSet::new(),
            running: 0,
            waiting: VecDeque::new(),
            me: Arc::new(OnceLock::new()),
        };
        actors.push(
            nixspace_space::join::join(&worker_route, move |t, ds| {
                worker.start(t, ds);
                Ok(())
            })
            .await?,
        );
    }
    println!(
        "nixspace bench dispatch: {} steps in {} layers, {} simulated workers × {} slots (holding {} more), {} ms per step, {} runs",
        args.steps, args.layers, args.workers, args.jobs, args.hold, args.build_ms, args.runs
    );
    // Every slot busy all the time.
    let ideal = (args.build_ms > 0)
        .then(|| (args.workers * args.jobs) as f64 * 1000.0 / args.build_ms as f64);
    println!("a full worker's slot idle from reporting a step built to being given the next one:");
    println!(
        "{:>4} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12} {:>9}",
        "run", "min", "median", "p99", "max", "total", "steps/s", "of ideal"
    );
    let mut footprints = Vec::new();
    let mut rates_reached = Vec::new();
    for run in 0..args.runs {
        if let Ok(mut s) = slots.lock() {
            *s = Slots::default();
        }
        let before = up.map(Process::resident_peak_reset).transpose()?;
        let (start, total) = demand_all(&submit_route, args.steps, args.layers, run).await?;
        let peak = up.map(Process::peak_resident).transpose()?;
        let suffix = run_suffix(run);
        let first = assigned.lock().ok().and_then(|a| {
            a.iter()
                .filter(|(drv, _)| drv.ends_with(&suffix))
                .map(|(_, at)| at.saturating_duration_since(start))
                .min()
        });
        footprints.push((run, first, before.zip(peak)));
        rates_reached.push(args.steps as f64 / total.as_secs_f64());
        let mut lat = slots.lock().map(|s| s.idle.clone()).unwrap_or_default();
        lat.sort();
        let q = |f: f64| {
            lat.get(((lat.len() as f64 - 1.0) * f).round() as usize)
                .copied()
                .unwrap_or_default()
        };
        let us = |d: Duration| format!("{:.0} µs", d.as_secs_f64() * 1e6);
        let rate = args.steps as f64 / total.as_secs_f64();
        let of_ideal = ideal.map_or("-".to_owned(), |i| format!("{:.0}%", 100.0 * rate / i));
        println!(
            "{:>4} {:>10} {:>10} {:>10} {:>10} {:>9.3}s {:>12.0} {:>9}",
            run + 1,
            us(q(0.0)),
            us(q(0.5)),
            us(q(0.99)),
            us(q(1.0)),
            total.as_secs_f64(),
            rate,
            of_ideal
        );
    }
    println!("the first step assigned after the first demand, and `nixspace up`'s peak resident set over its size before the run:");
    for (run, first, memory) in footprints {
        let first = first.map_or("-".to_owned(), |d| {
            format!("{:.0} ms", d.as_secs_f64() * 1e3)
        });
        let memory = memory.map_or("-".to_owned(), |(before, peak)| {
            let grown = peak.saturating_sub(before);
            format!(
                "+{:.0} MiB, {} bytes per demanded step",
                grown as f64 / (1 << 20) as f64,
                grown / args.steps as u64
            )
        });
        println!(
            "{:>4} first assignment {first:>9}  memory {memory}",
            run + 1
        );
    }
    if args.dataspace_records > 0 {
        let rates = dataspace_alone(dir, args.dataspace_records).await?;
        let ceiling = 1.0
            / (ASSERTIONS_PER_STEP / rates[0]
                + RETRACTIONS_PER_STEP / rates[1]
                + MESSAGES_PER_STEP / rates[2]);
        println!(
            "at {ASSERTIONS_PER_STEP:.3} assertions, {RETRACTIONS_PER_STEP} retractions and {MESSAGES_PER_STEP} message per step, the dataspace allows {ceiling:.0} steps/s; the runs reached {}",
            rates_reached
                .iter()
                .map(|r| format!("{:.0}%", 100.0 * r / ceiling))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if args.latency_steps > 0 {
        let lat = one_at_a_time(&submit_route, args.latency_steps, &assigned).await?;
        print_latency(args.latency_steps, &lat);
    }
    for a in actors {
        a.abort();
    }
    Ok(ExitCode::SUCCESS)
}

/// What one step of this benchmark asks of the dataspace: the assignment and the planner's
/// `built` are asserted, and its demand's share of a `<demands …>` record; the assignment is
/// retracted (the demands and `built` stay until the run ends); the worker's report is a
/// message. A step waiting for a slot has no record of its own (the planner's `<queue>` and
/// `<queued>` counts change once a tick).
const ASSERTIONS_PER_STEP: f64 = 2.0 + 1.0 / nixspace_space::paced::DEMANDS_PER_RECORD as f64;
/// See [`ASSERTIONS_PER_STEP`].
const RETRACTIONS_PER_STEP: f64 = 1.0;
/// See [`ASSERTIONS_PER_STEP`].
const MESSAGES_PER_STEP: f64 = 1.0;

/// The dataspace in `dir` alone, through its socket: a table as `bench dataspace` prints
/// it, and the median assertions, retractions and messages per second.
async fn dataspace_alone(dir: &Path, records: usize) -> Result<[f64; 3], BenchError> {
    println!("the same dataspace alone, {records} records per run, 3 runs (rates per second: min / median / max):");
    dataspace::print_heading();
    let client = dataspace::over_socket(dir).await?;
    dataspace::report("unix socket (nixspace up)", &client, records, 3).await
}

/// When each step was first assigned to a simulated worker.
type AssignTimes = Arc<Mutex<HashMap<String, Instant>>>;

/// The simulated workers' slots in one run.
#[derive(Debug, Default)]
struct Slots {
    /// When each worker, full, reported a step built (freeing a slot), oldest first.
    freed: HashMap<String, VecDeque<Instant>>,
    /// How long each freed slot stayed idle until the next step was assigned to it.
    idle: Vec<Duration>,
}

/// [`Slots`], shared by the simulated workers.
type SlotTimes = Arc<Mutex<Slots>>;

/// Demand `steps` steps one after the other, each once the previous one is reported built;
/// for each, (demand → assigned, assigned → built seen by the frontend).
async fn one_at_a_time(
    route: &Route,
    steps: usize,
    assigned: &AssignTimes,
) -> Result<Vec<(Duration, Duration)>, BenchError> {
    let (built_tx, mut built_rx) = tokio::sync::mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let actor = nixspace_space::join::join(route, move |t, ds| {
        enclose!((built_tx) during!(t, ds, <built $drv: String _ _>, |_t| {
            let _ = built_tx.send(drv);
            Ok(())
        }));
        let _ = ready_tx.send((t.facet_ref(), ds));
        Ok(())
    })
    .await?;
    let (facet, ds) = ready_rx
        .await
        .map_err(|_| BenchError::Client("latency client did not start"))?;
    let account = syndicate::actor::Account::new(None, None);
    let limit = Duration::from_secs(60);
    let mut out = Vec::new();
    for i in 0..steps {
        let demand = sim_demand(
            &format!("/nix/store/latency{i:025}-sim.drv"),
            "bench-latency",
            vec![],
            0,
        );
        let drv = demand.drv.clone();
        let ds = Arc::clone(&ds);
        let demanded = Instant::now();
        facet.activate(&account, None, move |t| {
            ds.assert(t, &demand);
            Ok(())
        });
        loop {
            match tokio::time::timeout(limit, built_rx.recv()).await {
                Ok(Some(b)) if b == drv => break,
                Ok(Some(_)) => {}
                _ => {
                    return Err(BenchError::Timeout {
                        what: format!("step {drv} was not built"),
                        limit,
                    })
                }
            }
        }
        let built = Instant::now();
        let given = assigned
            .lock()
            .ok()
            .and_then(|c| c.get(&drv).copied())
            .ok_or_else(|| BenchError::Unassigned(drv.clone()))?;
        out.push((given - demanded, built - given));
    }
    actor.abort();
    Ok(out)
}

fn print_latency(steps: usize, lat: &[(Duration, Duration)]) {
    let q = |mut xs: Vec<Duration>, f: f64| {
        xs.sort();
        xs[((xs.len() as f64 - 1.0) * f).round() as usize]
    };
    let row = |name: &str, xs: Vec<Duration>| {
        let us = |d: Duration| format!("{:.0} µs", d.as_secs_f64() * 1e6);
        println!(
            "{name:<22} median {:>10}  p99 {:>10}",
            us(q(xs.clone(), 0.5)),
            us(q(xs, 0.99))
        );
    };
    println!("one step at a time, {steps} steps (nothing else queued):");
    row("demand → assigned", lat.iter().map(|l| l.0).collect());
    row("assigned → built", lat.iter().map(|l| l.1).collect());
    row("demand → built", lat.iter().map(|l| l.0 + l.1).collect());
}

/// A demand for step `drv` of this machine's system, needing the steps `inputs`, with
/// `depth` demanded steps above it.
fn sim_demand(drv: &str, requester: &str, inputs: Vec<String>, depth: usize) -> build::Demand {
    build::Demand {
        drv: drv.to_owned(),
        step: build::StepInfo {
            system: nixspace_nix_tools::current_system(),
            features: vec![],
            input_drvs: inputs,
            settings: nixspace_protocol::BuildSettings::default().to_wire(),
            outputs: vec![],
            memory: 0.into(),
        },
        requester: requester.to_owned(),
        priority: 0.into(),
        depth: (depth as i64).into(),
        derivation: Vec::new(),
    }
}

/// How the store paths of run `run`'s steps end.
fn run_suffix(run: usize) -> String {
    format!("-sim-{run}.drv")
}

/// The store path of step `i` of run `run`: a hash part as Nix makes one (SHA-256 folded to
/// 20 bytes, in Nix's base 32), so names differ from their first characters after the store
/// directory and come in no order, as a real build's do. (Numbered names came in sorted
/// order: every insert into the dataspace's index and the planner's tables landed next to
/// the last one, which flattered the figures by about a third.)
fn step_path(run: usize, i: usize) -> String {
    let digest = Hash::sha256(format!("{run}/{i}"));
    let hash_part = nixbase32::encode(&compress_hash(digest.as_bytes(), 20));
    format!("/nix/store/{hash_part}{}", run_suffix(run))
}

/// Demand `steps` steps in `layers` layers (see [`DispatchArgs`]), inputs first, and wait
/// until every one is reported built: when the demands were asserted, and how long until
/// the last was built.
async fn demand_all(
    route: &Route,
    steps: usize,
    layers: usize,
    run: usize,
) -> Result<(Instant, Duration), BenchError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = Arc::new(Mutex::new(Some(tx)));
    let suffix = run_suffix(run);
    let requester = format!("bench-dispatch-{run}");
    let name = |i: usize| step_path(run, i);
    let width = steps.div_ceil(layers);
    let demands: Vec<build::Demand> = (0..steps)
        .map(|i| {
            let (layer, place) = (i / width, i % width);
            let below = (layer * width).saturating_sub(width);
            let inputs = if layer == 0 {
                vec![]
            } else {
                let mut inputs = vec![name(below + place)];
                if width > 1 {
                    inputs.push(name(below + (place + 1) % width));
                }
                inputs
            };
            let depth = (steps - 1) / width - layer;
            sim_demand(&name(i), &requester, inputs, depth)
        })
        .collect();
    let start = Instant::now();
    let built = Arc::new(Mutex::new(0usize));
    let actor = nixspace_space::join::join(route, move |t, ds| {
        // Capture the step: observers see each distinct capture once. Count this run's only.
        enclose!((built, tx, suffix) during!(t, ds, <built $drv: String _ _>, |_t| {
            if !drv.ends_with(&suffix) {
                return Ok(());
            }
            let mut n = built.lock().map_err(|_| "poisoned")?;
            *n += 1;
            if *n == steps {
                if let Some(tx) = tx.lock().ok().and_then(|mut g| g.take()) {
                    let _ = tx.send(());
                }
            }
            Ok(())
        }));
        // As a frontend's session does.
        nixspace_space::paced::assert_demands(t, ds, demands.into_iter());
        Ok(())
    })
    .await?;
    let limit = Duration::from_secs(600);
    let done = tokio::time::timeout(limit, rx).await;
    let total = start.elapsed();
    actor.abort();
    match done {
        Ok(Ok(())) => Ok((start, total)),
        _ => Err(BenchError::Timeout {
            what: "the steps were not all built".to_owned(),
            limit,
        }),
    }
}

/// What a simulated worker's observers saw, and its own timers.
#[derive(Debug)]
enum SimEvent {
    Assigned(String),
    Unassigned(String),
    /// The simulated build of a step is over.
    Done(String),
}

/// A worker that builds up to `slots` steps assigned to it at once, holds up to `hold` more
/// until a slot frees, and reports each built `build_time` after it started.
struct SimWorker {
    id: String,
    slots: usize,
    hold: usize,
    build_time: Duration,
    times: SlotTimes,
    assigned: AssignTimes,
    ds: Option<Arc<Cap>>,
    /// The steps given to it and not yet withdrawn.
    held: HashSet<String>,
    /// The steps it is "building".
    running: usize,
    /// The steps given to it while every slot was busy, oldest first.
    waiting: VecDeque<String>,
    /// This entity's own reference, for its build timers.
    me: Arc<OnceLock<Weak<Ref<SimEvent>>>>,
}

impl SimWorker {
    fn start(mut self, t: &mut Activation, ds: Arc<Cap>) {
        ds.assert(
            t,
            &build::Worker {
                id: self.id.clone(),
                session: "simulated".to_owned(),
                host: "simulated".to_owned(),
                systems: vec![nixspace_nix_tools::current_system()],
                features: vec![],
                max_jobs: (self.slots as i64).into(),
                hold: (self.hold as i64).into(),
                speed: 1.0.into(),
                memory: 0.into(),
                build_memory: 0.into(),
                cpus: 1.into(),
            },
        );
        // Always all slots: the planner's own count keeps it to them.
        ds.assert(
            t,
            &build::Offer {
                worker: self.id.clone(),
                free_slots: ((self.slots + self.hold) as i64).into(),
            },
        );
        self.ds = Some(Arc::clone(&ds));
        let own = Arc::clone(&self.me);
        // Only our own assignments: the dataspace sends nothing about the other workers'.
        let literal = AnyValue::new(self.id.clone());
        let me: Arc<Ref<SimEvent>> = t.create_ref(self);
        let _ = own.set(Arc::downgrade(&me));
        enclose!((me) during!(t, ds, <assigned $drv: String #(literal) _ _>, |t: &mut Activation| {
            t.message(&me, SimEvent::Assigned(drv.clone()));
            on_retraction(t, enclose!((me, drv) move |t| {
                t.message(&me, SimEvent::Unassigned(drv));
                Ok(())
            }));
            Ok(())
        }));
    }

    /// Take a step given to us: "build" it if a slot is free, else hold it until one is.
    fn take(&mut self, t: &mut Activation, drv: String) {
        if self.ds.is_none() {
            return;
        }
        if let Ok(mut a) = self.assigned.lock() {
            a.entry(drv.clone()).or_insert_with(Instant::now);
        }
        self.held.insert(drv.clone());
        if self.running < self.slots {
            self.build(t, drv);
        } else {
            self.waiting.push_back(drv);
        }
    }

    /// "Build" a step in a free slot (the time since the slot was freed, if it was sampled,
    /// is its idle time).
    fn build(&mut self, t: &mut Activation, drv: String) {
        if let Ok(mut times) = self.times.lock() {
            let freed = times.freed.entry(self.id.clone()).or_default().pop_front();
            if let Some(freed) = freed {
                times.idle.push(freed.elapsed());
            }
        }
        self.running += 1;
        match self.me.get().and_then(Weak::upgrade) {
            Some(me) if !self.build_time.is_zero() => {
                t.after(self.build_time, move |t| {
                    t.message(&me, SimEvent::Done(drv));
                    Ok(())
                });
            }
            _ => self.report(t, drv),
        }
    }

    /// A build started by [`SimWorker::build`] is over: report the step built unless its
    /// assignment was withdrawn meanwhile. Its slot is free from now either way, and takes
    /// the oldest step held, if any. When every slot was busy, the time until the slot's
    /// next step starts is sampled.
    fn report(&mut self, t: &mut Activation, drv: String) {
        self.running -= 1;
        if let Some(ds) = self.ds.clone().filter(|_| self.held.contains(&drv)) {
            let built = build::ReportBuilt {
                drv,
                worker: self.id.clone(),
                outputs: vec![],
                realisations: vec![],
                usage: vec![],
            };
            ds.message(t, &built);
            // The planner counts a slot busy until it has this report: a worker it saw with
            // every slot taken waits for it to give the next step, unless it holds one.
            if self.held.len() >= self.slots {
                if let Ok(mut times) = self.times.lock() {
                    times
                        .freed
                        .entry(self.id.clone())
                        .or_default()
                        .push_back(Instant::now());
                }
            }
        }
        if let Some(next) = self.waiting.pop_front() {
            self.build(t, next);
        }
    }
}

impl Entity<SimEvent> for SimWorker {
    fn message(&mut self, t: &mut Activation, event: SimEvent) -> ActorResult {
        match event {
            SimEvent::Assigned(drv) => {
                if !self.held.contains(&drv) {
                    self.take(t, drv);
                }
            }
            SimEvent::Unassigned(drv) => {
                self.held.remove(&drv);
                self.waiting.retain(|d| *d != drv);
            }
            SimEvent::Done(drv) => self.report(t, drv),
        }
        Ok(())
    }
}
