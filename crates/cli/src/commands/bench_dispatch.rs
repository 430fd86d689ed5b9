//! `nixspace bench dispatch`: the scheduler without Nix. Simulated workers (actors in this
//! process, each joined over the dataspace's unix socket like a real worker) "build" a step
//! by reporting it built as soon as it is granted, so what is measured is the dataspace and
//! the planner: how long a claim waits for its grant, and how many steps per second go
//! through demand → ready → claim → assigned → built.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use nixspace_protocol::{build, on_retraction};
use nixspace_space::{Role, Route};
use syndicate::actor::{Activation, ActorResult, Cap, Entity, Handle, Ref};
use syndicate::enclose;
use syndicate_macros::during;

use super::demo::{spawn_space, Children, Scratch};

/// The scheduler alone: simulated workers that finish every step at once.
///
/// Starts `nixspace up`, joins WORKERS simulated workers of JOBS slots each over its socket,
/// demands STEPS independent steps and waits until all are reported built. Prints the
/// dispatch latency a worker sees (claim asserted → grant received) as min/median/p99/max,
/// and the steps per second through the whole cycle, per run.
#[derive(Args, Debug)]
pub struct DispatchArgs {
    /// Steps demanded per run.
    #[arg(long, default_value_t = 2000)]
    steps: usize,
    /// Simulated workers.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Slots per simulated worker.
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// Repetitions.
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

/// Run `nixspace bench dispatch`.
pub async fn run(args: DispatchArgs) -> anyhow::Result<ExitCode> {
    if args.steps == 0 || args.workers == 0 || args.jobs == 0 || args.runs == 0 {
        anyhow::bail!("--steps, --workers, --jobs and --runs must be at least 1");
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
) -> anyhow::Result<ExitCode> {
    let state = tmp.join("state");
    let up_args = ["--state-dir", state.to_str().unwrap_or("state")];
    spawn_space(exe, &["--log-level", "warn"], dir, 0, 0, &up_args, children).await?;
    let worker_route = Route::read(&Role::Worker.route_file(dir))?;
    let submit_route = Route::read(&Role::Submit.route_file(dir))?;
    let samples = Arc::new(Mutex::new(Vec::new()));
    let mut actors = Vec::new();
    for i in 0..args.workers {
        let worker = SimWorker::new(format!("sim-{i}"), args.jobs, Arc::clone(&samples));
        actors.push(
            nixspace_space::join::join(&worker_route, move |t, ds| {
                worker.start(t, ds);
                Ok(())
            })
            .await?,
        );
    }
    println!(
        "nixspace bench dispatch: {} steps, {} simulated workers × {} slots, {} runs",
        args.steps, args.workers, args.jobs, args.runs
    );
    println!(
        "{:>4} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12}",
        "run", "min", "median", "p99", "max", "total", "steps/s"
    );
    for run in 0..args.runs {
        if let Ok(mut s) = samples.lock() {
            s.clear();
        }
        let total = demand_all(&submit_route, args.steps, run).await?;
        let mut lat = samples.lock().map(|s| s.clone()).unwrap_or_default();
        lat.sort();
        let q = |f: f64| {
            lat.get(((lat.len() as f64 - 1.0) * f).round() as usize)
                .copied()
                .unwrap_or_default()
        };
        let us = |d: Duration| format!("{:.0} µs", d.as_secs_f64() * 1e6);
        println!(
            "{:>4} {:>10} {:>10} {:>10} {:>10} {:>9.3}s {:>12.0}",
            run + 1,
            us(q(0.0)),
            us(q(0.5)),
            us(q(0.99)),
            us(q(1.0)),
            total.as_secs_f64(),
            args.steps as f64 / total.as_secs_f64()
        );
    }
    for a in actors {
        a.abort();
    }
    Ok(ExitCode::SUCCESS)
}

/// Demand `steps` independent steps and wait until every one is reported built.
async fn demand_all(route: &Route, steps: usize, run: usize) -> anyhow::Result<Duration> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = Arc::new(Mutex::new(Some(tx)));
    let system = nixspace_nix_tools::current_system();
    let prefix = format!("/nix/store/{run:08}");
    let demands: Vec<build::Demand> = (0..steps)
        .map(|i| build::Demand {
            drv: format!("{prefix}{i:024}-sim.drv"),
            step: build::StepInfo {
                system: system.clone(),
                features: vec![],
                input_drvs: vec![],
            },
            requester: format!("bench-dispatch-{run}"),
            priority: 0.into(),
            depth: 0.into(),
        })
        .collect();
    let start = Instant::now();
    let built = Arc::new(Mutex::new(0usize));
    let actor = nixspace_space::join::join(route, move |t, ds| {
        // Capture the step: observers see each distinct capture once. Count this run's only.
        enclose!((built, tx, prefix) during!(t, ds, <built $drv: String _ _>, |_t| {
            if !drv.starts_with(&prefix) {
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
        for d in &demands {
            ds.assert(t, d);
        }
        Ok(())
    })
    .await?;
    let done = tokio::time::timeout(Duration::from_secs(600), rx).await;
    let total = start.elapsed();
    actor.abort();
    match done {
        Ok(Ok(())) => Ok(total),
        _ => anyhow::bail!("the steps were not all built within 600 s"),
    }
}

/// What a simulated worker's observers saw.
#[derive(Debug)]
enum SimEvent {
    Ready(String),
    Unready(String),
    Assigned(String, String),
    Unassigned(String, String),
}

/// A worker that reports every granted step built at once.
struct SimWorker {
    id: String,
    slots: usize,
    samples: Arc<Mutex<Vec<Duration>>>,
    ds: Option<Arc<Cap>>,
    ready: VecDeque<String>,
    /// Claims with when they were asserted.
    claims: HashMap<String, (Handle, Instant)>,
    built: HashMap<String, Handle>,
    offer: Option<Handle>,
}

impl SimWorker {
    fn new(id: String, slots: usize, samples: Arc<Mutex<Vec<Duration>>>) -> SimWorker {
        SimWorker {
            id,
            slots,
            samples,
            ds: None,
            ready: VecDeque::new(),
            claims: HashMap::new(),
            built: HashMap::new(),
            offer: None,
        }
    }

    fn start(mut self, t: &mut Activation, ds: Arc<Cap>) {
        ds.assert(
            t,
            &build::Worker {
                id: self.id.clone(),
                host: "simulated".to_owned(),
                systems: vec![nixspace_nix_tools::current_system()],
                features: vec![],
                max_jobs: (self.slots as i64).into(),
                speed: 1.0.into(),
            },
        );
        self.ds = Some(Arc::clone(&ds));
        self.fill(t);
        let me: Arc<Ref<SimEvent>> = t.create_ref(self);
        enclose!((me) during!(t, ds, <ready $drv: String _ _ _>, |t: &mut Activation| {
            t.message(&me, SimEvent::Ready(drv.clone()));
            on_retraction(t, enclose!((me, drv) move |t| {
                t.message(&me, SimEvent::Unready(drv));
                Ok(())
            }));
            Ok(())
        }));
        enclose!((me) during!(t, ds, <assigned $drv: String $worker: String>, |t: &mut Activation| {
            t.message(&me, SimEvent::Assigned(drv.clone(), worker.clone()));
            on_retraction(t, enclose!((me, drv, worker) move |t| {
                t.message(&me, SimEvent::Unassigned(drv, worker));
                Ok(())
            }));
            Ok(())
        }));
    }

    fn fill(&mut self, t: &mut Activation) {
        let Some(ds) = self.ds.clone() else {
            return;
        };
        while self.claims.len() < self.slots {
            let Some(drv) = self.ready.pop_front() else {
                break;
            };
            let claim = build::Claim {
                drv: drv.clone(),
                worker: self.id.clone(),
            };
            if let Some(h) = ds.assert(t, &claim) {
                self.claims.insert(drv, (h, Instant::now()));
            }
        }
        let offer = build::Offer {
            worker: self.id.clone(),
            free_slots: ((self.slots - self.built.len()) as i64).into(),
        };
        ds.update(t, &mut self.offer, Some(&offer));
    }

    fn release(&mut self, t: &mut Activation, drv: &str) {
        if let Some((h, _)) = self.claims.remove(drv) {
            t.retract(h);
        }
    }
}

impl Entity<SimEvent> for SimWorker {
    fn message(&mut self, t: &mut Activation, event: SimEvent) -> ActorResult {
        match event {
            SimEvent::Ready(drv) => self.ready.push_back(drv),
            SimEvent::Unready(drv) => {
                self.ready.retain(|d| *d != drv);
                if !self.built.contains_key(&drv) {
                    self.release(t, &drv);
                }
            }
            SimEvent::Assigned(drv, worker) if worker == self.id => {
                if let (Some((_, at)), Some(ds)) = (self.claims.get(&drv), &self.ds) {
                    if let Ok(mut s) = self.samples.lock() {
                        s.push(at.elapsed());
                    }
                    let built = build::Built {
                        drv: drv.clone(),
                        worker: self.id.clone(),
                        outputs: vec![],
                    };
                    if let Some(h) = ds.assert(t, &built) {
                        self.built.insert(drv, h);
                    }
                }
            }
            SimEvent::Assigned(drv, _) => self.release(t, &drv),
            SimEvent::Unassigned(drv, worker) if worker == self.id => {
                if let Some(h) = self.built.remove(&drv) {
                    t.retract(h);
                }
                self.release(t, &drv);
            }
            SimEvent::Unassigned(..) => {}
        }
        self.fill(t);
        Ok(())
    }
}
