//! What `nixspace status` and the web view show: the workers, offers, jobs, demands and their
//! estimated times to completion, steps,
//! transfers, rejected results and unschedulable steps asserted in a dataspace, kept in a
//! [`Snapshot`] while they are asserted.

use std::sync::{Arc, Mutex};

use nixspace_protocol::{build, on_retraction};
use syndicate::actor::{Activation, ActorResult, Cap};
use syndicate::enclose;
use syndicate_macros::during;
use tokio::sync::watch;

use crate::snapshot::{JobView, Replaced, Snapshot, StepView, WorkerView};

/// What the dataspace holds, as far as the observers have seen it, and a counter bumped at
/// every change (for those waiting for the next one).
#[derive(Clone)]
pub struct Observed {
    /// The picture.
    pub snapshot: Arc<Mutex<Snapshot>>,
    /// Bumped after every change to `snapshot`.
    pub changed: Arc<watch::Sender<u64>>,
}

impl Default for Observed {
    fn default() -> Self {
        Observed {
            snapshot: Arc::default(),
            changed: Arc::new(watch::channel(0).0),
        }
    }
}

impl Observed {
    /// Change the snapshot with `f` and tell those waiting.
    pub fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        if let Ok(mut s) = self.snapshot.lock() {
            f(&mut s);
        }
        self.changed.send_modify(|n| *n += 1);
    }
}

/// Apply `f` now and `undo` when the matched assertion goes away.
fn track(
    t: &mut Activation,
    snapshot: &Observed,
    f: impl FnOnce(&mut Snapshot),
    undo: impl 'static + Send + FnOnce(&mut Snapshot),
) -> ActorResult {
    snapshot.update(f);
    on_retraction(
        t,
        enclose!((snapshot) move |_t| {
            snapshot.update(undo);
            Ok(())
        }),
    );
    Ok(())
}

/// Show `value` for `key` in the snapshot's `field` (a record replaced by asserting the new one
/// first, see [`Replaced`]) while the matched assertion is there.
fn track_replaced<K, V>(
    t: &mut Activation,
    snapshot: &Observed,
    field: fn(&mut Snapshot) -> &mut Replaced<K, V>,
    key: K,
    value: V,
) -> ActorResult
where
    K: Ord + Clone + Send + 'static,
    V: PartialEq + Clone + Send + 'static,
{
    let (k, v) = (key.clone(), value.clone());
    track(
        t,
        snapshot,
        move |s| field(s).asserted(key, value),
        move |s| field(s).retracted(&k, &v),
    )
}

/// What the snapshot shows of one demand.
struct DemandView {
    drv: String,
    requester: String,
    priority: i64,
}

/// Show `demands` (one record's) while the record is asserted.
fn track_demands(t: &mut Activation, snapshot: &Observed, demands: Vec<DemandView>) -> ActorResult {
    let gone: Vec<(String, String)> = demands
        .iter()
        .map(|d| (d.requester.clone(), d.drv.clone()))
        .collect();
    track(
        t,
        snapshot,
        |s| {
            for d in demands {
                s.demands
                    .entry(d.requester)
                    .or_default()
                    .insert(d.drv, d.priority);
            }
        },
        move |s| {
            for (requester, drv) in gone {
                if let Some(steps) = s.demands.get_mut(&requester) {
                    steps.remove(&drv);
                    if steps.is_empty() {
                        s.demands.remove(&requester);
                    }
                }
            }
        },
    )
}

/// Keep `observed` up to date with the workers, offers, demands, steps, transfers, rejected
/// results and unschedulable steps asserted in `ds`.
pub fn observe(t: &mut Activation, ds: &Arc<Cap>, snapshot: &Observed) {
    enclose!((snapshot) during!(t, ds,
    <worker $id: String _ $host: String $systems: Vec<String> $features: Vec<String> $max_jobs: i64 $hold: i64 $speed: f64 $memory: u64 $build_memory: u64 $cpus: u32>,
    |t: &mut Activation| {
        let view = WorkerView {
            host: host.clone(),
            systems: systems.clone(),
            features: features.clone(),
            max_jobs,
            hold,
            speed,
            memory,
            build_memory,
            cpus,
        };
        track_replaced(t, &snapshot, |s| &mut s.workers, id.clone(), view)
    }));
    enclose!((snapshot) during!(t, ds, <eta $requester: String $millis: u64>, |t: &mut Activation| {
        track_replaced(t, &snapshot, |s| &mut s.etas, requester.clone(), millis)
    }));
    enclose!((snapshot) during!(t, ds, <offer $id: String $free: i64>, |t: &mut Activation| {
        track_replaced(t, &snapshot, |s| &mut s.offers, id.clone(), free)
    }));
    enclose!((snapshot) during!(t, ds,
    <job $id: i64 $name: String $status: String $built: i64 $failed: i64 $total: i64>,
    |t: &mut Activation| {
        let job = JobView { name, status, built, failed, total };
        track_replaced(t, &snapshot, |s| &mut s.jobs, id, job)
    }));
    enclose!((snapshot) during!(t, ds,
    <demand $drv: String _ $requester: String $priority: i64 _>,
    |t: &mut Activation| {
        track_demands(t, &snapshot, vec![DemandView { drv, requester, priority }])
    }));
    enclose!((snapshot) during!(t, ds, <demands $demands: Vec<build::Demand>>,
    |t: &mut Activation| {
        // A demand whose priority is out of range is left out, as the planner leaves it.
        let views = demands.into_iter().filter_map(|d| Some(DemandView {
            priority: i64::try_from(&d.priority).ok()?,
            drv: d.drv,
            requester: d.requester,
        }));
        track_demands(t, &snapshot, views.collect())
    }));
    enclose!((snapshot) during!(t, ds, <queue $system: String $steps: u64>, |t: &mut Activation| {
        track_replaced(t, &snapshot, |s| &mut s.queue, system.clone(), steps)
    }));
    enclose!((snapshot) during!(t, ds, <queued $requester: String $steps: u64>, |t: &mut Activation| {
        track_replaced(t, &snapshot, |s| &mut s.queued, requester.clone(), steps)
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
