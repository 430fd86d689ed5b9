//! `nixspace status`: what the dataspace holds right now.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use nixspace_protocol::{build, on_retraction};
use nixspace_space::Role;
use syndicate::actor::{Activation, ActorResult, Cap};
use syndicate::enclose;
use syndicate_macros::{during, on_message};

use super::JoinArgs;
use crate::snapshot::{Snapshot, StepView, WorkerView};

/// Show workers, demands, the queue and unschedulable steps.
///
/// Joins the dataspace with the submit capability, reads what is asserted
/// there and prints it: each worker (systems, features, slots used/total,
/// speed, memory and CPUs, current steps), each frontend's demands (steps built,
/// running, queued, waiting for inputs, failed) and the planner's estimate of
/// its time to completion, ready steps per system, steps no
/// worker can take with the reason, and the most recent workers' results the
/// planner discarded (outputs other than the step's) with the reason.
#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    join: JoinArgs,

    /// Print JSON instead of tables (one object; with --watch, one per line).
    #[arg(long)]
    json: bool,

    /// Keep printing every SECONDS until interrupted.
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
    watch: Option<f64>,
}

/// Run `nixspace status`.
pub async fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let interval = match args.watch {
        Some(s) => {
            Some(Duration::try_from_secs_f64(s).map_err(|e| anyhow::anyhow!("--watch {s}: {e}"))?)
        }
        None => None,
    };
    let route = args.join.route(Role::Submit)?;
    let snapshot = Arc::new(Mutex::new(Snapshot::default()));
    let (tx, synced) = tokio::sync::oneshot::channel();
    let actor = nixspace_space::join::join(
        &route,
        enclose!((snapshot) move |t: &mut Activation, ds| {
            observe(t, &ds, &snapshot);
            // The relay cannot forward a Syndicate sync: send ourselves a
            // probe instead. When it comes back, the dataspace has sent us
            // every assertion our observers matched.
            let id = format!("status-{}", std::process::id());
            let mut tx = Some(tx);
            enclose!((id) on_message!(t, ds, <probe $echo: String>, |_t: &mut Activation| {
                if echo == id {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(())
            }));
            ds.message(t, &build::Probe { id });
            Ok(())
        }),
    )
    .await?;
    synced
        .await
        .map_err(|_| anyhow::anyhow!("the dataspace closed the connection"))?;
    tokio::pin!(actor);
    loop {
        let text = {
            let s = snapshot
                .lock()
                .map_err(|_| anyhow::anyhow!("status state poisoned"))?;
            if args.json {
                serde_json::to_string(&s.report())?
            } else {
                s.report().to_string()
            }
        };
        println!("{text}");
        let Some(interval) = interval else {
            return Ok(ExitCode::SUCCESS);
        };
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            r = super::shutdown_signal() => { r?; return Ok(ExitCode::SUCCESS); }
            end = &mut actor => {
                anyhow::bail!("lost the dataspace: {}", nixspace_space::join::describe_end(end))
            }
        }
    }
}

type Shared = Arc<Mutex<Snapshot>>;

/// Apply `f` now and `undo` when the matched assertion goes away.
fn track(
    t: &mut Activation,
    snapshot: &Shared,
    f: impl FnOnce(&mut Snapshot),
    undo: impl 'static + Send + FnOnce(&mut Snapshot),
) -> ActorResult {
    if let Ok(mut s) = snapshot.lock() {
        f(&mut s);
    }
    on_retraction(
        t,
        enclose!((snapshot) move |_t| {
            if let Ok(mut s) = snapshot.lock() {
                undo(&mut s);
            }
            Ok(())
        }),
    );
    Ok(())
}

fn observe(t: &mut Activation, ds: &Arc<Cap>, snapshot: &Shared) {
    enclose!((snapshot) during!(t, ds,
    <worker $id: String $host: String $systems: Vec<String> $features: Vec<String> $max_jobs: i64 $speed: f64 $memory: u64 $build_memory: u64 $cpus: u32>,
    |t: &mut Activation| {
        let view = WorkerView {
            host: host.clone(),
            systems: systems.clone(),
            features: features.clone(),
            max_jobs,
            speed,
            memory,
            build_memory,
            cpus,
        };
        let key = id.clone();
        track(t, &snapshot, |s| { s.workers.insert(id.clone(), view); },
            move |s| { s.workers.remove(&key); })
    }));
    enclose!((snapshot) during!(t, ds, <eta $requester: String $millis: u64>, |t: &mut Activation| {
        let key = requester.clone();
        track(t, &snapshot, |s| { s.etas.insert(requester.clone(), millis); },
            move |s| { s.etas.remove(&key); })
    }));
    enclose!((snapshot) during!(t, ds, <offer $id: String $free: i64>, |t: &mut Activation| {
        let key = id.clone();
        track(t, &snapshot, |s| { s.offers.insert(id.clone(), free); },
            move |s| { s.offers.remove(&key); })
    }));
    enclose!((snapshot) during!(t, ds,
    <demand $drv: String $step: build::StepInfo $requester: String $priority: i64 _>,
    |t: &mut Activation| {
        let (d, r) = (drv.clone(), requester.clone());
        track(t, &snapshot, |s| {
            s.demands.entry(requester.clone()).or_default().insert(drv.clone(), priority);
            s.systems.insert(drv.clone(), step.system.clone());
        }, move |s| {
            if let Some(steps) = s.demands.get_mut(&r) {
                steps.remove(&d);
                if steps.is_empty() {
                    s.demands.remove(&r);
                }
            }
        })
    }));
    enclose!((snapshot) during!(t, ds, <ready $drv: String _ _ _>, |t: &mut Activation| {
        let d = drv.clone();
        track(t, &snapshot, |s| { s.steps.insert(drv.clone(), StepView::Queued); },
            move |s| s.clear_step(&d, &StepView::Queued))
    }));
    enclose!((snapshot) during!(t, ds, <assigned $drv: String $worker: String _ _>, |t: &mut Activation| {
        let (d, w) = (drv.clone(), worker.clone());
        track(t, &snapshot, |s| s.assigned(&drv, &worker),
            move |s| s.unassigned(&d, &w))
    }));
    enclose!((snapshot) during!(t, ds, <built $drv: String _ _>, |t: &mut Activation| {
        let d = drv.clone();
        track(t, &snapshot, |s| { s.steps.insert(drv.clone(), StepView::Built); },
            move |s| s.clear_step(&d, &StepView::Built))
    }));
    enclose!((snapshot) during!(t, ds, <failed $drv: String _ $reason: String _ _>, |t: &mut Activation| {
        let (d, view) = (drv.clone(), StepView::Failed(reason.clone()));
        let undo = view.clone();
        track(t, &snapshot, |s| { s.steps.insert(drv.clone(), view); },
            move |s| s.clear_step(&d, &undo))
    }));
    enclose!((snapshot) during!(t, ds, <want $path: String $store: String>, |t: &mut Activation| {
        let key = (path.clone(), store.clone());
        let undo = key.clone();
        track(t, &snapshot, |s| { s.transfers.insert(key); },
            move |s| { s.transfers.remove(&undo); })
    }));
    enclose!((snapshot) during!(t, ds, <rejected $drv: String $worker: String $reason: String>, |t: &mut Activation| {
        let key = (drv.clone(), worker.clone());
        let undo = key.clone();
        track(t, &snapshot, |s| { s.rejected.insert(key, reason.clone()); },
            move |s| { s.rejected.remove(&undo); })
    }));
    enclose!((snapshot) during!(t, ds, <unschedulable $drv: String $reason: String>, |t: &mut Activation| {
        let d = drv.clone();
        track(t, &snapshot, |s| { s.unschedulable.insert(drv.clone(), reason.clone()); },
            move |s| { s.unschedulable.remove(&d); })
    }));
}
