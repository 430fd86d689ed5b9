//! From root derivations to dataspace demands, and the outcomes that come back.
//!
//! Shared by every frontend that submits builds (`nixspace build` and the translator):
//! [`plan`] reads the closure of the roots and keeps the derivations whose outputs are not
//! valid yet (the *steps*); [`demands`] orders them inputs first with their depths; and
//! [`observe`] turns `unschedulable`, `built`, `failed`, `assigned`, `demands-refused` and `log` in the dataspace
//! into [`StepEvent`]s for the caller's handler.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use nixspace_nix_formats::store_path::StorePath;
use nixspace_nix_tools::{DaemonPool, DerivationInfo, NixError};
use nixspace_protocol::{build, on_retraction};
use preserves_schema::Parse;
use syndicate::actor::{Activation, ActorResult, Cap};
use syndicate::enclose;
use syndicate_macros::{during, on_message};

use crate::phase::PhaseClock;
use crate::realisation::{base_name, OutputIds};
use crate::store_db::{valid_paths, StoreDb};

/// The derivation closure of some roots and which of its derivations must be built.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Every derivation of the closure, by `.drv` path.
    pub infos: BTreeMap<String, DerivationInfo>,
    /// The derivations with an output that is not valid (or not known before building).
    pub needed: BTreeSet<String>,
    /// Derivations whose outputs are not known before building but which the local store
    /// has realised already (its realisations name valid paths): output name → path. They
    /// are not needed.
    pub realised: BTreeMap<String, BTreeMap<String, String>>,
}

impl Plan {
    /// The output paths of `drv` known now: fixed in the derivation or realised already.
    pub fn known_outputs(&self, drv: &str) -> Vec<String> {
        if let Some(realised) = self.realised.get(drv) {
            return realised.values().cloned().collect();
        }
        self.infos
            .get(drv)
            .into_iter()
            .flat_map(|i| i.outputs.values().flatten().cloned())
            .collect()
    }

    /// Take the needed derivations whose outputs are realised in the store of `pool`
    /// (`QueryRealisation`, valid paths only) out of [`Plan::needed`]: they were built before,
    /// here or elsewhere, and need no worker.
    async fn count_realised(
        &mut self,
        pool: &DaemonPool,
        db: Option<&StoreDb>,
    ) -> Result<(), String> {
        let floating: Vec<String> = self
            .needed
            .iter()
            .filter(|d| {
                self.infos
                    .get(*d)
                    .is_some_and(|i| i.outputs.values().any(Option::is_none))
            })
            .cloned()
            .collect();
        if floating.is_empty() {
            return Ok(());
        }
        let store = pool.store_dir().clone();
        let ids = tokio::task::spawn_blocking(move || {
            let mut ids = OutputIds::new(&store);
            floating
                .into_iter()
                .map(|drv| {
                    let path = store.parse(&drv).map_err(|e| format!("{drv}: {e}"))?;
                    let (_, outputs) = ids.of(&path).map_err(|e| e.to_string())?;
                    Ok((drv, outputs))
                })
                .collect::<Result<Vec<_>, String>>()
        })
        .await
        .map_err(|e| e.to_string())??;
        let mut lease = pool.lease().await.map_err(|e| e.to_string())?;
        let mut candidates: BTreeMap<String, BTreeMap<String, StorePath>> = BTreeMap::new();
        for (drv, outputs) in ids {
            let mut found = BTreeMap::new();
            for (name, id) in outputs {
                match lease.client().query_realisation(&id).await {
                    Ok(Some(r)) => {
                        if let Ok(p) = StorePath::from_base_name(base_name(&r.out_path)) {
                            found.insert(name, p);
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return Err(lease.failed(e).to_string()),
                }
            }
            let all = self
                .infos
                .get(&drv)
                .is_some_and(|i| i.outputs.len() == found.len());
            if all {
                candidates.insert(drv, found);
            }
        }
        lease.release();
        let paths: BTreeSet<StorePath> = candidates
            .values()
            .flat_map(|o| o.values().cloned())
            .collect();
        let valid = valid_paths(&paths, db, pool).await?;
        let store = pool.store_dir();
        for (drv, outputs) in candidates {
            if outputs.values().all(|p| valid.contains(p)) {
                self.needed.remove(&drv);
                let printed = outputs
                    .into_iter()
                    .map(|(n, p)| (n, store.print(&p)))
                    .collect();
                self.realised.insert(drv, printed);
            }
        }
        Ok(())
    }

    /// The needed steps with their facts.
    pub fn steps(&self) -> BTreeMap<String, &DerivationInfo> {
        self.needed
            .iter()
            .filter_map(|d| self.infos.get(d).map(|i| (d.clone(), i)))
            .collect()
    }
}

/// Read the closure of `roots` (`.drv` paths) from the local store and find the steps:
/// derivations with an output that is not valid in `pool`'s store (read from its database
/// `db` when given), except those whose outputs that store has realised already.
pub async fn plan(
    roots: &[String],
    pool: &DaemonPool,
    db: Option<&StoreDb>,
) -> Result<Plan, NixError> {
    let mut clock = PhaseClock::start("plan");
    let infos = nixspace_nix_tools::read_closure(roots).await?;
    clock.end("read the closure");
    let store = pool.store_dir();
    // An output path that does not parse cannot be valid: its step is needed (and fails).
    let known: BTreeSet<StorePath> = infos
        .values()
        .flat_map(|i| i.outputs.values().flatten())
        .filter_map(|p| store.parse(p).ok())
        .collect();
    let valid = valid_paths(&known, db, pool)
        .await
        .map_err(NixError::Store)?;
    clock.end("query valid outputs");
    let is_valid = |p: &String| store.parse(p).is_ok_and(|p| valid.contains(&p));
    let needed = infos
        .iter()
        .filter(|(_, i)| {
            i.outputs
                .values()
                .any(|p| p.as_ref().is_none_or(|p| !is_valid(p)))
        })
        .map(|(d, _)| d.clone())
        .collect();
    let mut plan = Plan {
        infos,
        needed,
        realised: BTreeMap::new(),
    };
    if let Err(error) = plan.count_realised(pool, db).await {
        tracing::warn!(%error, "cannot look up the realisations in the store; building those steps");
    }
    clock.end("query realisations");
    Ok(plan)
}

/// The steps ordered so that every step comes after its inputs, so the
/// planner never sees a step before the inputs it must wait for.
pub fn inputs_first<'a>(
    steps: &'a BTreeMap<String, &'a DerivationInfo>,
) -> Vec<(&'a String, &'a DerivationInfo)> {
    fn visit<'a>(
        drv: &'a String,
        steps: &'a BTreeMap<String, &'a DerivationInfo>,
        seen: &mut BTreeSet<&'a str>,
        order: &mut Vec<(&'a String, &'a DerivationInfo)>,
    ) {
        let Some(info) = steps.get(drv) else { return };
        if !seen.insert(drv) {
            return;
        }
        for input in &info.input_drvs {
            visit(input, steps, seen, order);
        }
        order.push((drv, info));
    }
    let mut seen = BTreeSet::new();
    let mut order = Vec::with_capacity(steps.len());
    for drv in steps.keys() {
        visit(drv, steps, &mut seen, &mut order);
    }
    order
}

/// How many demanded steps wait on each step, at most, in a chain: steps in
/// `order` come after their inputs, so walking it backwards sees every
/// dependent before its inputs.
pub fn depths<'a>(order: &[(&'a String, &'a DerivationInfo)]) -> HashMap<&'a str, u64> {
    let mut depth: HashMap<&str, u64> = order.iter().map(|(d, _)| (d.as_str(), 0)).collect();
    for (drv, info) in order.iter().rev() {
        let mine = depth.get(drv.as_str()).copied().unwrap_or(0);
        for input in &info.input_drvs {
            if let Some(d) = depth.get_mut(input.as_str()) {
                *d = (*d).max(mine + 1);
            }
        }
    }
    depth
}

/// One demand per step, inputs first, each with its depth.
pub fn demands(
    steps: &BTreeMap<String, &DerivationInfo>,
    requester: &str,
    priority: i64,
) -> Vec<build::Demand> {
    let order = inputs_first(steps);
    let depths = depths(&order);
    order
        .into_iter()
        .map(|(drv, info)| build::Demand {
            drv: drv.clone(),
            step: build::StepInfo {
                system: info.system.clone(),
                features: info.features.clone(),
                input_drvs: info.input_drvs.clone(),
            },
            requester: requester.to_owned(),
            priority: priority.into(),
            depth: (depths.get(drv.as_str()).copied().unwrap_or(0) as i64).into(),
        })
        .collect()
}

/// Something the dataspace said about a step (any step: handlers filter their own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepEvent {
    /// No connected worker can take the step.
    Unschedulable {
        /// The step.
        drv: String,
        /// The planner's reason.
        reason: String,
    },
    /// The step is no longer unschedulable.
    Schedulable {
        /// The step.
        drv: String,
    },
    /// The step's outputs are valid.
    Built {
        /// The step.
        drv: String,
        /// Its output paths.
        outputs: Vec<String>,
    },
    /// The step failed.
    Failed {
        /// The step.
        drv: String,
        /// The worker (empty if none was involved).
        worker: String,
        /// Why, in words.
        reason: String,
        /// What made it fail: its own build, a failed dependency, or the infrastructure.
        cause: build::FailureCause,
    },
    /// A worker was granted the step.
    Assigned {
        /// The step.
        drv: String,
        /// The worker.
        worker: String,
    },
    /// The assignment was withdrawn.
    Unassigned {
        /// The step.
        drv: String,
    },
    /// The coordinator refused demands of the frontend named `requester` (too many).
    Refused {
        /// The frontend.
        requester: String,
        /// The coordinator's reason.
        reason: String,
    },
    /// One line of a step's build log.
    Log {
        /// The step.
        drv: String,
        /// The worker building it.
        worker: String,
        /// The line (no newline).
        line: String,
    },
}

/// A receiver of [`StepEvent`]s, called inside the actor's turns.
pub type Handler = Arc<dyn Fn(&mut Activation, StepEvent) -> ActorResult + Send + Sync>;

/// Register observers on `ds` that pass every step event to `handler`.
pub fn observe(t: &mut Activation, ds: &Arc<Cap>, handler: Handler) {
    enclose!((handler) during!(t, ds, <unschedulable $drv: String $reason: String>,
    |t: &mut Activation| {
        handler(t, StepEvent::Unschedulable { drv: drv.clone(), reason: reason.clone() })?;
        on_retraction(t, enclose!((handler, drv) move |t| handler(t, StepEvent::Schedulable { drv })));
        Ok(())
    }));
    enclose!((handler) during!(t, ds, <built $drv: String _ $outputs: Vec<String>>,
    |t: &mut Activation| {
        handler(t, StepEvent::Built { drv: drv.clone(), outputs: outputs.clone() })
    }));
    // Only final failures: a worker's transient failure is retried by the planner, which
    // asserts its own (permanent) copy when it gives up.
    enclose!((handler) during!(t, ds, <failed $drv: String $worker: String $reason: String $kind $cause>,
    |t: &mut Activation| {
        if !matches!(build::FailureKind::parse(&kind), Ok(build::FailureKind::Permanent)) {
            return Ok(());
        }
        let Ok(cause) = build::FailureCause::parse(&cause) else {
            tracing::warn!(%drv, ?cause, "ignoring a failure of unknown cause");
            return Ok(());
        };
        handler(t, StepEvent::Failed { drv: drv.clone(), worker: worker.clone(), reason: reason.clone(), cause })
    }));
    enclose!((handler) during!(t, ds, <assigned $drv: String $worker: String>,
    |t: &mut Activation| {
        handler(t, StepEvent::Assigned { drv: drv.clone(), worker: worker.clone() })?;
        on_retraction(t, enclose!((handler, drv) move |t| handler(t, StepEvent::Unassigned { drv })));
        Ok(())
    }));
    enclose!((handler) during!(t, ds, <demands-refused $requester: String $reason: String>,
    |t: &mut Activation| {
        handler(t, StepEvent::Refused { requester: requester.clone(), reason: reason.clone() })
    }));
    enclose!((handler) on_message!(t, ds, <log $drv: String $worker: String $line: String>,
    |t: &mut Activation| {
        handler(t, StepEvent::Log { drv: drv.clone(), worker: worker.clone(), line: line.clone() })
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(inputs: &[&str]) -> DerivationInfo {
        DerivationInfo {
            system: "x86_64-linux".into(),
            features: Vec::new(),
            input_drvs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: BTreeMap::new(),
        }
    }

    #[test]
    fn demands_come_inputs_first_with_depths() {
        // top -> left, right -> base; "valid" is an input that is not demanded.
        let infos = [
            ("a-top", info(&["b-left", "c-right"])),
            ("b-left", info(&["d-base"])),
            ("c-right", info(&["d-base", "valid"])),
            ("d-base", info(&[])),
        ];
        let steps: BTreeMap<String, &DerivationInfo> =
            infos.iter().map(|(d, i)| (d.to_string(), i)).collect();
        let demands = demands(&steps, "me", 5);
        let order: Vec<&str> = demands.iter().map(|d| d.drv.as_str()).collect();
        assert_eq!(order, ["d-base", "b-left", "c-right", "a-top"]);
        let depth: Vec<i64> = demands
            .iter()
            .map(|d| i64::try_from(&d.depth).unwrap())
            .collect();
        assert_eq!(depth, [2, 1, 1, 0]);
        assert!(demands.iter().all(|d| d.requester == "me"));
    }
}
