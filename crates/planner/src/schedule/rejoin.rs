//! After a restart of the coordinator, the steps that were assigned when it went down are
//! kept for their workers a little while: a worker rejoining a moment later claims the step
//! it built (or is still building) and reports it, instead of another worker that happened
//! to rejoin first building it again. And a step the history says was built just before the
//! restart, demanded again by a frontend that missed its `built`, is taken as built.

use std::time::Instant;

use nixspace_protocol::{DrvPath, WorkerId};

use super::{Effect, Schedule, StepState};

impl Schedule {
    /// Keep `drv` for `worker` until `until`: other workers' claims on it wait until then.
    pub fn reserve(&mut self, drv: &DrvPath, worker: &WorkerId, until: Instant) {
        self.reserved.insert(drv.clone(), (worker.clone(), until));
    }

    /// Whether `drv` is kept, as of `now`, for a worker other than `worker`.
    pub(super) fn kept_from(&self, drv: &DrvPath, worker: &WorkerId, now: Instant) -> bool {
        self.reserved
            .get(drv)
            .is_some_and(|(keeper, until)| keeper != worker && now < *until)
    }

    /// End the reservations run out by `now`; a ready step goes to a connected worker whose
    /// claim waited for it, and a step nobody demanded again is abandoned.
    pub fn expire_reservations(&mut self, now: Instant) -> Vec<Effect> {
        let expired: Vec<DrvPath> = self
            .reserved
            .iter()
            .filter(|(_, (_, until))| now >= *until)
            .map(|(drv, _)| drv.clone())
            .collect();
        let mut effects = Vec::new();
        for drv in expired {
            let Some((keeper, _)) = self.reserved.remove(&drv) else {
                continue;
            };
            match self.state(&drv) {
                None => {
                    effects.push(Effect::Abandoned {
                        drv,
                        worker: keeper,
                    });
                    continue;
                }
                Some(StepState::Ready) => {}
                Some(_) => continue,
            }
            let waiting = self.early_claims.remove(&drv).unwrap_or_default();
            if let Some(worker) = waiting.into_iter().find(|w| self.workers.contains_key(w)) {
                effects.extend(self.claim(&drv, &worker));
            }
        }
        effects
    }

    /// `drv`, just demanded and not given out yet, was built by `worker` with `outputs`
    /// before the coordinator restarted (its history says so): take it as built, as the
    /// restarted coordinator would have had the frontend demanding it again not missed the
    /// `built` that went down with it. Nothing for a step in any other state.
    pub fn built_before_restart(
        &mut self,
        drv: &DrvPath,
        worker: &WorkerId,
        outputs: Vec<String>,
    ) -> Vec<Effect> {
        let mut effects = Vec::new();
        let built = StepState::Built {
            worker: worker.clone(),
            outputs: outputs.clone(),
        };
        match self.steps.get_mut(drv) {
            Some(step) if step.state == StepState::Waiting => step.state = built,
            Some(step) if step.state == StepState::Ready => {
                self.leave_ready(drv, built, &mut effects)
            }
            _ => return effects,
        }
        self.reserved.remove(drv);
        self.announce_built(drv, worker, outputs, &mut effects);
        effects
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::schedule::{StepInfo, Urgency, WorkerOffer};

    fn offer() -> WorkerOffer {
        WorkerOffer {
            systems: vec!["x86_64-linux".into()],
            features: vec![],
            speed: 1.0,
            max_jobs: 1,
            hold: 0,
            resources: Default::default(),
        }
    }

    fn info() -> StepInfo {
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

    #[test]
    fn a_kept_step_waits_for_its_worker() {
        let mut s = Schedule::default();
        let soon = Instant::now() + Duration::from_secs(60);
        s.reserve(&"a".into(), &"keeper".into(), soon);
        s.worker_joined(&"other".into(), offer());
        s.demand(&"a".into(), info(), Urgency::default());
        // Another worker rejoined first: its claim waits.
        assert!(s.claim(&"a".into(), &"other".into()).is_empty());
        assert_eq!(s.state(&"a".into()), Some(&StepState::Ready));
        // The keeper comes back and gets its step.
        s.worker_joined(&"keeper".into(), offer());
        let e = s.claim(&"a".into(), &"keeper".into());
        assert!(
            e.contains(&Effect::Assign {
                drv: "a".into(),
                worker: "keeper".into()
            }),
            "{e:?}"
        );
    }

    #[test]
    fn a_kept_step_claimed_early_goes_to_its_worker() {
        let mut s = Schedule::default();
        s.reserve(
            &"a".into(),
            &"keeper".into(),
            Instant::now() + Duration::from_secs(60),
        );
        s.worker_joined(&"other".into(), offer());
        s.worker_joined(&"keeper".into(), offer());
        assert!(s.claim(&"a".into(), &"other".into()).is_empty());
        assert!(s.claim(&"a".into(), &"keeper".into()).is_empty());
        let e = s.demand(&"a".into(), info(), Urgency::default());
        assert_eq!(
            e,
            vec![Effect::Assign {
                drv: "a".into(),
                worker: "keeper".into()
            }]
        );
    }

    #[test]
    fn a_kept_step_nobody_demands_again_is_abandoned_once_the_grace_is_over() {
        let mut s = Schedule::default();
        let until = Instant::now() + Duration::from_secs(60);
        s.reserve(&"a".into(), &"keeper".into(), until);
        s.reserve(&"b".into(), &"keeper".into(), until);
        s.worker_joined(&"keeper".into(), offer());
        // The keeper claims both; only `b` is demanded again, and it gets it.
        assert!(s.claim(&"a".into(), &"keeper".into()).is_empty());
        assert!(s.claim(&"b".into(), &"keeper".into()).is_empty());
        s.demand(&"b".into(), info(), Urgency::default());
        assert_eq!(
            s.state(&"b".into()),
            Some(&StepState::Assigned("keeper".into()))
        );
        assert!(s.expire_reservations(Instant::now()).is_empty(), "not yet");
        assert_eq!(
            s.expire_reservations(until),
            vec![Effect::Abandoned {
                drv: "a".into(),
                worker: "keeper".into()
            }]
        );
        assert!(s.expire_reservations(until).is_empty(), "once");
    }

    #[test]
    fn once_the_grace_is_over_a_waiting_claim_is_granted() {
        let mut s = Schedule::default();
        let until = Instant::now() + Duration::from_secs(60);
        s.reserve(&"a".into(), &"keeper".into(), until);
        s.worker_joined(&"other".into(), offer());
        s.demand(&"a".into(), info(), Urgency::default());
        assert!(s.claim(&"a".into(), &"other".into()).is_empty());
        assert!(s.expire_reservations(Instant::now()).is_empty(), "not yet");
        let e = s.expire_reservations(until);
        assert!(
            e.contains(&Effect::Assign {
                drv: "a".into(),
                worker: "other".into()
            }),
            "{e:?}"
        );
        assert_eq!(
            s.state(&"a".into()),
            Some(&StepState::Assigned("other".into()))
        );
    }

    #[test]
    fn a_step_built_before_the_restart_is_taken_as_built_and_its_dependents_get_ready() {
        let mut s = Schedule::default();
        s.worker_joined(&"w".into(), offer());
        let top = StepInfo {
            input_drvs: vec!["a".into()],
            ..info()
        };
        s.demand(&"top".into(), top, Urgency::default());
        // Ready, and no worker asked for it yet: taken as built.
        s.demand(&"a".into(), info(), Urgency::default());
        assert_eq!(s.state(&"a".into()), Some(&StepState::Ready));
        let outputs = vec!["/nix/store/a-out".to_owned()];
        let e = s.built_before_restart(&"a".into(), &"builder".into(), outputs.clone());
        assert!(e.contains(&Effect::Unready { drv: "a".into() }), "{e:?}");
        assert!(
            e.contains(&Effect::Built {
                drv: "a".into(),
                worker: "builder".into(),
                outputs: outputs.clone()
            }),
            "{e:?}"
        );
        assert_eq!(
            s.state(&"a".into()),
            Some(&StepState::Built {
                worker: "builder".into(),
                outputs
            })
        );
        assert_eq!(s.state(&"top".into()), Some(&StepState::Ready));
        // Positive control: a step given out already is left to its worker.
        assert!(s
            .claim(&"top".into(), &"w".into())
            .contains(&Effect::Assign {
                drv: "top".into(),
                worker: "w".into()
            }));
        let e = s.built_before_restart(&"top".into(), &"builder".into(), Vec::new());
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(
            s.state(&"top".into()),
            Some(&StepState::Assigned("w".into()))
        );
    }
}
