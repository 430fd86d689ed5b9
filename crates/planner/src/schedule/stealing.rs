//! Work stealing: an idle worker at least `ratio` times faster than the one building a step
//! that has run for `after` duplicates it; the first to finish wins and the other's
//! assignment is withdrawn (which stops its build).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use nixspace_protocol::{DrvPath, WorkerId};

use super::{Effect, Schedule, StepState};
use crate::matching::mismatch;

/// When a running step may be duplicated by a faster idle worker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StealPolicy {
    /// The thief must be at least this many times faster than the worker building the step.
    pub ratio: f64,
    /// The step must have been running at least this long.
    pub after: Duration,
}

impl Default for StealPolicy {
    fn default() -> Self {
        StealPolicy {
            ratio: 2.0,
            after: Duration::from_secs(10),
        }
    }
}

impl Schedule {
    /// `worker` announced how many build slots it has free.
    pub fn offer(&mut self, worker: &WorkerId, free_slots: i64) {
        self.free_slots.insert(worker.clone(), free_slots);
        self.reopen(worker);
    }

    /// Look for steals as of `now`: invite idle, fast enough workers to duplicate steps that
    /// have run past the policy's threshold, and withdraw invitations nobody can take up any
    /// more. Looks at the running steps only, and at the rest of the schedule once (see
    /// [`Scan`]).
    pub fn tick(&mut self, now: Instant) -> Vec<Effect> {
        let mut effects = Vec::new();
        let running: BTreeSet<DrvPath> = self
            .running
            .values()
            .flatten()
            .filter(|drv| {
                self.steps.get(*drv).is_some_and(|s| {
                    matches!(s.state, StepState::Assigned(_))
                        && s.extras().thief.is_none()
                        && s.since
                            .is_some_and(|at| now.saturating_duration_since(at) >= self.steal.after)
                })
            })
            .cloned()
            .collect();
        if running.is_empty() {
            return effects;
        }
        let mut scan = self.scan();
        for drv in running {
            let invited = self
                .steps
                .get(&drv)
                .and_then(|s| s.extras().steal_offer.clone());
            match invited {
                Some(thief) if self.can_steal(&drv, &thief, &scan) => {}
                Some(thief) => {
                    if let Some(step) = self.steps.get_mut(&drv) {
                        step.extras_mut().steal_offer = None;
                    }
                    scan.taken.remove(&thief);
                    effects.push(Effect::WithdrawSteal { drv: drv.clone() });
                }
                None => {
                    if let Some(thief) = self.best_thief(&drv, &scan) {
                        let Some(step) = self.steps.get_mut(&drv) else {
                            continue;
                        };
                        let StepState::Assigned(from) = &step.state else {
                            continue;
                        };
                        effects.push(Effect::OfferSteal {
                            drv: drv.clone(),
                            from: from.clone(),
                            to: thief.clone(),
                        });
                        scan.taken.insert(thief.clone(), drv.clone());
                        step.extras_mut().steal_offer = Some(thief);
                    }
                }
            }
        }
        effects
    }

    /// What [`Schedule::can_steal`] needs to know of the steps other than the one to steal.
    fn scan(&self) -> Scan {
        let kinds: BTreeSet<(&str, &[String])> = self
            .ready_queue
            .values()
            .filter_map(|drv| self.steps.get(drv))
            .filter(|s| s.state == StepState::Ready)
            .map(|s| (&*s.info.system, s.info.features.as_slice()))
            .collect();
        let mut taken = BTreeMap::new();
        for drv in self.running.values().flatten() {
            if let Some(step) = self.steps.get(drv) {
                for worker in step.extras().steal_offer.iter().chain(&step.extras().thief) {
                    taken.insert(worker.clone(), drv.clone());
                }
            }
        }
        Scan {
            ready_kinds: kinds
                .into_iter()
                .map(|(system, features)| (system.to_owned(), features.to_vec()))
                .collect(),
            taken,
        }
    }

    /// The fastest worker that may steal `drv` now, if any.
    fn best_thief(&self, drv: &DrvPath, scan: &Scan) -> Option<WorkerId> {
        self.workers
            .iter()
            .filter(|(id, _)| self.can_steal(drv, id, scan))
            .max_by(|(_, a), (_, b)| a.speed.total_cmp(&b.speed))
            .map(|(id, _)| id.clone())
    }

    /// Whether `thief` may duplicate `drv`: it can build it, is fast enough, has a free build
    /// slot (room to hold a step does not count) and the memory the step is predicted to
    /// need, no ready step it could take instead, and no other invitation.
    fn can_steal(&self, drv: &DrvPath, thief: &WorkerId, scan: &Scan) -> bool {
        let (Some(step), Some(offer)) = (self.steps.get(drv), self.workers.get(thief)) else {
            return false;
        };
        let StepState::Assigned(owner) = &step.state else {
            return false;
        };
        let Some(owner_speed) = self.workers.get(owner).map(|w| w.speed) else {
            return false;
        };
        let matches = |system: &str, features: &[String]| {
            mismatch(&offer.systems, &offer.features, system, features).is_none()
        };
        owner != thief
            && !step.extras().excluded.contains(thief)
            && offer.speed >= self.steal.ratio * owner_speed
            && self.free_slots.get(thief).is_some_and(|&f| f > 0)
            && self.running_on(thief) < offer.max_jobs as usize
            && matches(&step.info.system, &step.info.features)
            && self.fits_beside(step, thief)
            && !scan.ready_kinds.iter().any(|(s, f)| matches(s, f))
            && !matches!(scan.taken.get(thief), Some(other) if other != drv)
    }
}

/// The rest of the schedule as stealing sees it, taken once per tick: a farm's tail has
/// thousands of long steps running, hundreds of fast workers idle, and every step built so
/// far still demanded, so looking through all steps for each step and worker would not end.
struct Scan {
    /// The platforms and features of the ready steps.
    ready_kinds: Vec<(String, Vec<String>)>,
    /// The workers invited to steal a step or stealing one, with that step.
    taken: BTreeMap<WorkerId, DrvPath>,
}

impl Schedule {
    /// A claim on a step that is already assigned: granted to the invited thief.
    pub(super) fn claim_steal(&mut self, drv: &DrvPath, worker: &WorkerId) -> Vec<Effect> {
        let Some(step) = self.steps.get_mut(drv) else {
            return Vec::new();
        };
        if !matches!(step.state, StepState::Assigned(_))
            || step.extras().thief.is_some()
            || step.extras().steal_offer.as_ref() != Some(worker)
        {
            return Vec::new();
        }
        let extras = step.extras_mut();
        extras.steal_offer = None;
        extras.thief = Some(worker.clone());
        self.occupy(worker, drv);
        // The thief sees its assignment before the invitation goes away, so it keeps its claim.
        vec![
            Effect::Stolen {
                drv: drv.clone(),
                thief: worker.clone(),
            },
            Effect::WithdrawSteal { drv: drv.clone() },
        ]
    }

    /// `worker` stopped building `drv` without a result (it left, or failed transiently).
    /// If a duplicate build goes on, the step does not fail: the thief's assignment is
    /// dropped, or the thief becomes the step's only builder. `None` if no steal is involved.
    pub(super) fn thief_gone(&mut self, drv: &DrvPath, worker: &WorkerId) -> Option<Vec<Effect>> {
        let step = self.steps.get_mut(drv)?;
        let StepState::Assigned(owner) = &step.state else {
            return None;
        };
        let thief = step.extras().thief.clone()?;
        if thief == *worker {
            step.extras_mut().thief = None;
            self.leave(&thief, drv);
            return Some(vec![Effect::Unsteal { drv: drv.clone() }]);
        }
        if owner != worker {
            return None;
        }
        let owner = owner.clone();
        step.state = StepState::Assigned(thief);
        step.extras_mut().thief = None;
        self.leave(&owner, drv);
        Some(vec![Effect::Promote { drv: drv.clone() }])
    }
}

#[cfg(test)]
mod tests {
    use super::super::{StepInfo, Urgency, WorkerOffer};
    use super::*;

    fn worker(speed: f64) -> WorkerOffer {
        WorkerOffer {
            systems: vec!["x86_64-linux".into()],
            features: vec![],
            speed,
            max_jobs: 1,
            hold: 0,
            resources: Default::default(),
        }
    }

    fn step() -> StepInfo {
        StepInfo {
            system: "x86_64-linux".into(),
            features: vec![],
            input_drvs: vec![],
            settings: Default::default(),
            outputs: vec![],
            memory: None,
            duration_ms: None,
            derivation: Default::default(),
        }
    }

    /// `a` running on `slow` (speed 1) since now, `fast` (speed `fast`) idle.
    fn running(fast: f64) -> (Schedule, Instant) {
        running_beside(worker(fast), 1)
    }

    /// `a` running on `slow` (speed 1) since now; `fast`, offering `offer`, offers `free`
    /// slots.
    fn running_beside(offer: WorkerOffer, free: i64) -> (Schedule, Instant) {
        let policy = StealPolicy {
            ratio: 2.0,
            after: Duration::from_secs(5),
        };
        let mut s = Schedule::default().with_stealing(policy);
        s.worker_joined(&"slow".into(), worker(1.0));
        s.demand(&"a".into(), step(), Urgency::default());
        s.claim(&"a".into(), &"slow".into());
        s.worker_joined(&"fast".into(), offer);
        s.offer(&"fast".into(), free);
        (s, Instant::now())
    }

    #[test]
    fn a_fast_idle_worker_steals_a_long_step_and_the_first_result_wins() {
        let (mut s, start) = running(4.0);
        assert!(s.tick(start).is_empty(), "too early");
        let later = start + Duration::from_secs(6);
        let e = s.tick(later);
        assert_eq!(
            e,
            vec![Effect::OfferSteal {
                drv: "a".into(),
                from: "slow".into(),
                to: "fast".into()
            }]
        );
        assert!(s.tick(later).is_empty(), "invited once");
        let e = s.claim(&"a".into(), &"fast".into());
        assert_eq!(
            e,
            vec![
                Effect::Stolen {
                    drv: "a".into(),
                    thief: "fast".into()
                },
                Effect::WithdrawSteal { drv: "a".into() }
            ]
        );
        let e = s.built(&"a".into(), &"fast".into(), vec!["/out".into()]);
        assert!(e.contains(&Effect::Unassign { drv: "a".into() }), "{e:?}");
        assert!(s
            .built(&"a".into(), &"slow".into(), vec!["/out".into()])
            .is_empty());
    }

    #[test]
    fn a_worker_with_room_only_to_hold_a_step_does_not_steal() {
        let holding = WorkerOffer {
            hold: 1,
            ..worker(4.0)
        };
        let (mut s, start) = running_beside(holding, 2);
        let mut e = s.demand(&"b".into(), step(), Urgency::default());
        s.dispatch(&mut e);
        assert!(
            matches!(s.state(&"b".into()), Some(StepState::Assigned(w)) if w.as_str() == "fast"),
            "{e:?}"
        );
        s.offer(&"fast".into(), 1);
        assert!(
            s.tick(start + Duration::from_secs(60)).is_empty(),
            "its one build slot is taken"
        );
    }

    #[test]
    fn no_steal_from_a_worker_not_slow_enough_or_by_a_busy_one() {
        let (mut s, start) = running(1.5);
        assert!(s.tick(start + Duration::from_secs(60)).is_empty());
        let (mut s, start) = running(4.0);
        s.offer(&"fast".into(), 0);
        assert!(s.tick(start + Duration::from_secs(60)).is_empty());
        // A ready step the fast worker could take instead keeps it busy.
        let (mut s, start) = running(4.0);
        s.demand(&"b".into(), step(), Urgency::default());
        assert!(s.tick(start + Duration::from_secs(60)).is_empty());
    }

    #[test]
    fn a_ready_step_the_thief_cannot_build_does_not_keep_it_from_stealing() {
        let (mut s, start) = running(4.0);
        let elsewhere = StepInfo {
            system: "aarch64-linux".into(),
            ..step()
        };
        s.demand(&"b".into(), elsewhere, Urgency::default());
        assert_eq!(s.state(&"b".into()), Some(&StepState::Ready));
        assert_eq!(
            s.tick(start + Duration::from_secs(6)),
            vec![Effect::OfferSteal {
                drv: "a".into(),
                from: "slow".into(),
                to: "fast".into()
            }]
        );
    }

    #[test]
    fn a_thief_without_the_memory_the_step_needs_is_not_invited() {
        let gib = 1 << 30;
        let policy = StealPolicy {
            ratio: 2.0,
            after: Duration::from_secs(5),
        };
        let with_memory = |speed: f64, memory: u64| WorkerOffer {
            resources: super::super::Resources {
                memory,
                build_memory: 0,
                cpus: 1,
            },
            ..worker(speed)
        };
        let hungry = StepInfo {
            memory: Some(4 * gib),
            ..step()
        };
        let invited = |thief_memory: u64| {
            let mut s = Schedule::default().with_stealing(policy);
            s.worker_joined(&"slow".into(), with_memory(1.0, 8 * gib));
            s.demand(&"a".into(), hungry.clone(), Urgency::default());
            s.claim(&"a".into(), &"slow".into());
            s.worker_joined(&"fast".into(), with_memory(4.0, thief_memory));
            s.offer(&"fast".into(), 1);
            !s.tick(Instant::now() + Duration::from_secs(6)).is_empty()
        };
        assert!(!invited(2 * gib), "a 4 GiB step invited to a 2 GiB worker");
        assert!(
            invited(8 * gib),
            "the positive control: a worker with room is invited"
        );
    }

    #[test]
    fn a_thief_is_invited_to_one_step_at_a_time() {
        let (mut s, start) = running(4.0);
        s.worker_joined(&"slow2".into(), worker(1.0));
        s.demand(&"c".into(), step(), Urgency::default());
        s.claim(&"c".into(), &"slow2".into());
        s.offer(&"fast".into(), 2);
        let e = s.tick(start + Duration::from_secs(6));
        assert_eq!(e.len(), 1, "one invitation in one tick: {e:?}");
        assert!(s.tick(start + Duration::from_secs(7)).is_empty());
        // Its invitation withdrawn (busy), then free again: invited anew.
        s.offer(&"fast".into(), 0);
        assert_eq!(s.tick(start + Duration::from_secs(8)).len(), 1, "withdrawn");
        s.offer(&"fast".into(), 2);
        assert_eq!(
            s.tick(start + Duration::from_secs(9)).len(),
            1,
            "invited again"
        );
    }

    #[test]
    fn an_invitation_is_withdrawn_once_the_thief_is_busy() {
        let (mut s, start) = running(4.0);
        s.tick(start + Duration::from_secs(6));
        s.offer(&"fast".into(), 0);
        assert_eq!(
            s.tick(start + Duration::from_secs(7)),
            vec![Effect::WithdrawSteal { drv: "a".into() }]
        );
        assert!(
            s.claim(&"a".into(), &"fast".into()).is_empty(),
            "no longer invited"
        );
    }

    #[test]
    fn losing_either_builder_keeps_the_other() {
        let (mut s, start) = running(4.0);
        s.tick(start + Duration::from_secs(6));
        s.claim(&"a".into(), &"fast".into());
        assert_eq!(
            s.unclaim(&"a".into(), &"fast".into()),
            vec![Effect::Unsteal { drv: "a".into() }]
        );
        assert_eq!(
            s.state(&"a".into()),
            Some(&StepState::Assigned("slow".into()))
        );

        let (mut s, start) = running(4.0);
        s.tick(start + Duration::from_secs(6));
        s.claim(&"a".into(), &"fast".into());
        assert_eq!(
            s.failed(
                &"a".into(),
                Some(&"slow".into()),
                "link dropped",
                super::super::FailureKind::Transient,
                super::super::FailureCause::Infrastructure
            ),
            vec![Effect::Promote { drv: "a".into() }]
        );
        assert_eq!(
            s.state(&"a".into()),
            Some(&StepState::Assigned("fast".into()))
        );
    }
}
