//! The planner actor: observes demands, claims and outcomes in a dataspace,
//! feeds them to a [`Schedule`] and publishes its effects as assertions.
//!
//! Observers run in short-lived facets (one per matched assertion), and
//! whatever a facet asserts is retracted when it stops. So observers only
//! forward [`Event`]s to the [`Planner`] entity, which lives in the actor's
//! root facet: everything the planner publishes lasts until the planner
//! itself withdraws it.

use std::collections::HashMap;
use std::sync::Arc;

use nixspace_protocol::{build, on_retraction};
use preserves_schema::Parse;
use syndicate::actor::{Activation, ActorResult, AnyValue, Cap, Entity, Handle, Ref};
use syndicate::enclose;
use syndicate_macros::during;

use crate::schedule::{Effect, FailureKind, Schedule, StepInfo};

/// What the planner's observers saw.
#[derive(Debug)]
pub enum Event {
    /// A demand for a step appeared.
    Demand(String, StepInfo),
    /// A demand for a step went away.
    Undemand(String),
    /// A worker claimed a step.
    Claim(String, String),
    /// A worker's claim went away.
    Unclaim(String, String),
    /// A worker reported a step built.
    Built(String, String, Vec<String>),
    /// A worker reported a step failed.
    Failed(String, String, String, FailureKind),
}

/// The planner entity: the schedule and the handles of what it asserted.
struct Planner {
    ds: Arc<Cap>,
    schedule: Schedule,
    ready: HashMap<String, Handle>,
    assigned: HashMap<String, Handle>,
    outcomes: HashMap<String, Handle>,
}

impl Entity<Event> for Planner {
    fn message(&mut self, t: &mut Activation, event: Event) -> ActorResult {
        tracing::debug!(?event);
        let s = &mut self.schedule;
        let effects = match event {
            Event::Demand(drv, info) => s.demand(&drv, info),
            Event::Undemand(drv) => s.undemand(&drv),
            Event::Claim(drv, worker) => s.claim(&drv, &worker),
            Event::Unclaim(drv, worker) => s.unclaim(&drv, &worker),
            Event::Built(drv, worker, outputs) => s.built(&drv, &worker, outputs),
            Event::Failed(drv, worker, reason, kind) => s.failed(&drv, &worker, &reason, kind),
        };
        self.publish(t, effects);
        Ok(())
    }
}

impl Planner {
    fn publish(&mut self, t: &mut Activation, effects: Vec<Effect>) {
        for effect in effects {
            tracing::debug!(?effect);
            match effect {
                Effect::Ready(drv, info) => {
                    let h = self.ds.assert(
                        t,
                        &build::Ready {
                            drv: drv.clone(),
                            step: to_wire(&info),
                        },
                    );
                    replace(t, &mut self.ready, drv, h);
                }
                Effect::Unready(drv) => retract(t, &mut self.ready, &drv),
                Effect::Assign(drv, worker) => {
                    tracing::info!(%drv, %worker, "assigned");
                    let h = self.ds.assert(
                        t,
                        &build::Assigned {
                            drv: drv.clone(),
                            worker,
                        },
                    );
                    replace(t, &mut self.assigned, drv, h);
                }
                Effect::Unassign(drv) => retract(t, &mut self.assigned, &drv),
                Effect::Built {
                    drv,
                    worker,
                    outputs,
                } => {
                    tracing::info!(%drv, %worker, "built");
                    let h = self.ds.assert(
                        t,
                        &build::Built {
                            drv: drv.clone(),
                            worker,
                            outputs,
                        },
                    );
                    replace(t, &mut self.outcomes, drv, h);
                }
                Effect::Failed {
                    drv,
                    worker,
                    reason,
                } => {
                    tracing::warn!(%drv, %worker, %reason, "failed");
                    let failed = build::Failed {
                        drv: drv.clone(),
                        worker,
                        reason,
                        kind: build::FailureKind::Permanent,
                    };
                    let h = self.ds.assert(t, &failed);
                    replace(t, &mut self.outcomes, drv, h);
                }
                Effect::Forget(drv) => retract(t, &mut self.outcomes, &drv),
            }
        }
    }
}

fn replace(t: &mut Activation, map: &mut HashMap<String, Handle>, drv: String, h: Option<Handle>) {
    let old = match h {
        Some(h) => map.insert(drv, h),
        None => map.remove(&drv),
    };
    if let Some(old) = old {
        t.retract(old);
    }
}

fn retract(t: &mut Activation, map: &mut HashMap<String, Handle>, drv: &str) {
    if let Some(h) = map.remove(drv) {
        t.retract(h);
    }
}

fn to_wire(info: &StepInfo) -> build::StepInfo {
    build::StepInfo {
        system: info.system.clone(),
        features: info.features.clone(),
        input_drvs: info.input_drvs.clone(),
    }
}

fn from_wire(info: build::StepInfo) -> StepInfo {
    StepInfo {
        system: info.system,
        features: info.features,
        input_drvs: info.input_drvs,
    }
}

fn kind_from_wire(kind: &AnyValue) -> Option<FailureKind> {
    // Or-types have no dataspace pattern of their own: parse here.
    match build::FailureKind::parse(kind).ok()? {
        build::FailureKind::Transient => Some(FailureKind::Transient),
        build::FailureKind::Permanent => Some(FailureKind::Permanent),
    }
}

/// Start the planner as its own actor on `ds`, retrying a step whose worker
/// vanished at most `max_attempts` times.
pub fn start(t: &mut Activation, ds: Arc<Cap>, max_attempts: u32) {
    t.spawn(Some(AnyValue::symbol("planner")), move |t| {
        let planner: Arc<Ref<Event>> = t.create_ref(Planner {
            ds: Arc::clone(&ds),
            schedule: Schedule::new(max_attempts),
            ready: HashMap::new(),
            assigned: HashMap::new(),
            outcomes: HashMap::new(),
        });

        enclose!((planner) during!(t, ds, <demand $drv: String $step: build::StepInfo _ _>,
            |t: &mut Activation| {
                t.message(&planner, Event::Demand(drv.clone(), from_wire(step.clone())));
                on_retraction(t, enclose!((planner, drv) move |t| {
                    t.message(&planner, Event::Undemand(drv));
                    Ok(())
                }));
                Ok(())
            }));

        enclose!((planner) during!(t, ds, <claim $drv: String $worker: String>,
            |t: &mut Activation| {
                t.message(&planner, Event::Claim(drv.clone(), worker.clone()));
                on_retraction(t, enclose!((planner, drv, worker) move |t| {
                    t.message(&planner, Event::Unclaim(drv, worker));
                    Ok(())
                }));
                Ok(())
            }));

        enclose!((planner) during!(t, ds, <built $drv: String $worker: String $outputs: Vec<String>>,
            |t: &mut Activation| {
                t.message(&planner, Event::Built(drv.clone(), worker.clone(), outputs.clone()));
                Ok(())
            }));

        enclose!((planner) during!(t, ds, <failed $drv: String $worker: String $reason: String $kind>,
            |t: &mut Activation| {
                match kind_from_wire(&kind) {
                    Some(kind) => t.message(
                        &planner,
                        Event::Failed(drv.clone(), worker.clone(), reason.clone(), kind),
                    ),
                    None => tracing::warn!(%drv, %worker, ?kind, "ignoring failure of unknown kind"),
                }
                Ok(())
            }));
        Ok(())
    });
}
