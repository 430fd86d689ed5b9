//! The step table and its transitions.

use std::collections::{BTreeMap, BTreeSet};

/// How many times a step is tried before a transient failure becomes final.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// What the planner knows about a step without reading its derivation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepInfo {
    /// The platform the step must build on, e.g. `x86_64-linux`.
    pub system: String,
    /// Features a worker must offer (`requiredSystemFeatures`).
    pub features: Vec<String>,
    /// The derivations whose outputs this step needs.
    pub input_drvs: Vec<String>,
}

/// Whether a failure is worth retrying elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The worker or its link went away: retry elsewhere.
    Transient,
    /// The builder failed: do not retry.
    Permanent,
}

/// Where a step is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepState {
    /// Some input step has not been built yet.
    Waiting,
    /// All inputs are built; waiting for a worker to claim it.
    Ready,
    /// A worker was granted the step and is building it.
    Assigned(String),
    /// Outputs are valid.
    Built {
        /// The worker that built it.
        worker: String,
        /// Output store paths.
        outputs: Vec<String>,
    },
    /// The step will not be built.
    Failed {
        /// The worker that reported it ("" when the planner decided).
        worker: String,
        /// Human-readable cause.
        reason: String,
    },
}

/// Something the planner actor must publish or withdraw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Assert that the step is ready to be claimed.
    Ready(String, StepInfo),
    /// Withdraw the step's ready assertion.
    Unready(String),
    /// Assert that `worker` is building the step.
    Assign(String, String),
    /// Withdraw the step's assignment (the worker must stop building it).
    Unassign(String),
    /// Assert the step's successful outcome.
    Built {
        /// The step.
        drv: String,
        /// Who built it.
        worker: String,
        /// Its outputs.
        outputs: Vec<String>,
    },
    /// Assert that the step failed for good.
    Failed {
        /// The step.
        drv: String,
        /// Who reported it ("" for the planner).
        worker: String,
        /// Why.
        reason: String,
    },
    /// Withdraw any outcome assertion of the step (nobody wants it any more).
    Forget(String),
}

#[derive(Debug)]
struct Step {
    info: StepInfo,
    demands: usize,
    state: StepState,
    attempts: u32,
    transient_reasons: Vec<String>,
}

/// The planner's table of demanded steps.
#[derive(Debug)]
pub struct Schedule {
    steps: BTreeMap<String, Step>,
    /// input drv → steps that list it as an input.
    dependents: BTreeMap<String, BTreeSet<String>>,
    max_attempts: u32,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule::new(DEFAULT_MAX_ATTEMPTS)
    }
}

impl Schedule {
    /// An empty schedule that tries each step at most `max_attempts` times.
    pub fn new(max_attempts: u32) -> Schedule {
        Schedule {
            steps: BTreeMap::new(),
            dependents: BTreeMap::new(),
            max_attempts: max_attempts.max(1),
        }
    }

    /// The state of a step, if it is demanded.
    pub fn state(&self, drv: &str) -> Option<&StepState> {
        self.steps.get(drv).map(|s| &s.state)
    }

    /// How many steps are demanded.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Whether no step is demanded.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// A frontend demands `drv`.
    pub fn demand(&mut self, drv: &str, info: StepInfo) -> Vec<Effect> {
        if let Some(step) = self.steps.get_mut(drv) {
            step.demands += 1;
            return Vec::new();
        }
        for input in &info.input_drvs {
            self.dependents
                .entry(input.clone())
                .or_default()
                .insert(drv.to_owned());
        }
        self.steps.insert(
            drv.to_owned(),
            Step {
                info,
                demands: 1,
                state: StepState::Waiting,
                attempts: 0,
                transient_reasons: Vec::new(),
            },
        );
        let mut effects = Vec::new();
        // Dependents that were ready because this input was not demanded
        // (and so taken to be valid) must wait for it after all.
        for dependent in self.dependents_of(drv) {
            if let Some(d) = self.steps.get_mut(&dependent) {
                if d.state == StepState::Ready {
                    d.state = StepState::Waiting;
                    effects.push(Effect::Unready(dependent));
                }
            }
        }
        self.settle(drv, &mut effects);
        effects
    }

    /// A frontend withdrew its demand for `drv`.
    pub fn undemand(&mut self, drv: &str) -> Vec<Effect> {
        let mut effects = Vec::new();
        let Some(step) = self.steps.get_mut(drv) else {
            return effects;
        };
        step.demands -= 1;
        if step.demands > 0 {
            return effects;
        }
        let Some(step) = self.steps.remove(drv) else {
            return effects;
        };
        for input in &step.info.input_drvs {
            if let Some(d) = self.dependents.get_mut(input) {
                d.remove(drv);
                if d.is_empty() {
                    self.dependents.remove(input);
                }
            }
        }
        match step.state {
            StepState::Ready => effects.push(Effect::Unready(drv.to_owned())),
            StepState::Assigned(_) => effects.push(Effect::Unassign(drv.to_owned())),
            StepState::Built { .. } | StepState::Failed { .. } => {
                effects.push(Effect::Forget(drv.to_owned()))
            }
            StepState::Waiting => {}
        }
        effects
    }

    /// `worker` asks to build `drv`. Granted when the step is ready.
    pub fn claim(&mut self, drv: &str, worker: &str) -> Vec<Effect> {
        let Some(step) = self.steps.get_mut(drv) else {
            return Vec::new();
        };
        if step.state != StepState::Ready {
            return Vec::new();
        }
        step.state = StepState::Assigned(worker.to_owned());
        step.attempts += 1;
        // Assign before Unready: a worker that sees the step stop being ready
        // already knows whether it won.
        vec![
            Effect::Assign(drv.to_owned(), worker.to_owned()),
            Effect::Unready(drv.to_owned()),
        ]
    }

    /// `worker` withdrew its claim on `drv`. If it was building the step and
    /// reported no outcome, the worker was lost: a transient failure.
    pub fn unclaim(&mut self, drv: &str, worker: &str) -> Vec<Effect> {
        match self.steps.get(drv).map(|s| &s.state) {
            Some(StepState::Assigned(w)) if w == worker => {
                let reason = format!("worker {worker} went away while building");
                self.failed(drv, worker, &reason, FailureKind::Transient)
            }
            _ => Vec::new(),
        }
    }

    /// `worker` built `drv`.
    pub fn built(&mut self, drv: &str, worker: &str, outputs: Vec<String>) -> Vec<Effect> {
        let mut effects = Vec::new();
        let Some(step) = self.steps.get_mut(drv) else {
            return effects;
        };
        if matches!(step.state, StepState::Built { .. }) {
            return effects;
        }
        if matches!(step.state, StepState::Assigned(_)) {
            effects.push(Effect::Unassign(drv.to_owned()));
        }
        if step.state == StepState::Ready {
            effects.push(Effect::Unready(drv.to_owned()));
        }
        step.state = StepState::Built {
            worker: worker.to_owned(),
            outputs: outputs.clone(),
        };
        effects.push(Effect::Built {
            drv: drv.to_owned(),
            worker: worker.to_owned(),
            outputs,
        });
        for dependent in self.dependents_of(drv) {
            self.settle(&dependent, &mut effects);
        }
        effects
    }

    /// `worker` could not build `drv`.
    pub fn failed(
        &mut self,
        drv: &str,
        worker: &str,
        reason: &str,
        kind: FailureKind,
    ) -> Vec<Effect> {
        let mut effects = Vec::new();
        let max_attempts = self.max_attempts;
        let Some(step) = self.steps.get_mut(drv) else {
            return effects;
        };
        match &step.state {
            StepState::Assigned(w) if w == worker => {}
            _ => return effects,
        }
        effects.push(Effect::Unassign(drv.to_owned()));
        if kind == FailureKind::Transient {
            step.transient_reasons
                .push(format!("attempt {}: {reason}", step.attempts));
            if step.attempts < max_attempts {
                step.state = StepState::Ready;
                effects.push(Effect::Ready(drv.to_owned(), step.info.clone()));
                return effects;
            }
            let reason = format!(
                "gave up after {} attempts: {}",
                step.attempts,
                step.transient_reasons.join("; ")
            );
            self.fail_for_good(drv, worker, reason, &mut effects);
        } else {
            self.fail_for_good(drv, worker, reason.to_owned(), &mut effects);
        }
        effects
    }

    fn fail_for_good(
        &mut self,
        drv: &str,
        worker: &str,
        reason: String,
        effects: &mut Vec<Effect>,
    ) {
        let Some(step) = self.steps.get_mut(drv) else {
            return;
        };
        match step.state {
            StepState::Ready => effects.push(Effect::Unready(drv.to_owned())),
            StepState::Built { .. } | StepState::Failed { .. } => return,
            StepState::Waiting | StepState::Assigned(_) => {}
        }
        step.state = StepState::Failed {
            worker: worker.to_owned(),
            reason: reason.clone(),
        };
        effects.push(Effect::Failed {
            drv: drv.to_owned(),
            worker: worker.to_owned(),
            reason,
        });
        for dependent in self.dependents_of(drv) {
            let why = format!("dependency {drv} failed");
            self.fail_for_good(&dependent, "", why, effects);
        }
    }

    fn dependents_of(&self, drv: &str) -> Vec<String> {
        self.dependents
            .get(drv)
            .map(|d| d.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Re-evaluate a waiting step: ready if every demanded input is built,
    /// failed if one failed.
    fn settle(&mut self, drv: &str, effects: &mut Vec<Effect>) {
        let Some(step) = self.steps.get(drv) else {
            return;
        };
        if step.state != StepState::Waiting {
            return;
        }
        let mut all_built = true;
        let mut failed_input = None;
        for input in &step.info.input_drvs {
            match self.steps.get(input).map(|s| &s.state) {
                None | Some(StepState::Built { .. }) => {}
                Some(StepState::Failed { .. }) => failed_input = Some(input.clone()),
                Some(_) => all_built = false,
            }
        }
        if let Some(input) = failed_input {
            self.fail_for_good(drv, "", format!("dependency {input} failed"), effects);
        } else if all_built {
            if let Some(step) = self.steps.get_mut(drv) {
                step.state = StepState::Ready;
                effects.push(Effect::Ready(drv.to_owned(), step.info.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(inputs: &[&str]) -> StepInfo {
        StepInfo {
            system: "x86_64-linux".into(),
            features: vec![],
            input_drvs: inputs.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn readies(effects: &[Effect]) -> Vec<&str> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Ready(d, _) => Some(d.as_str()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn chain_becomes_ready_in_order() {
        let mut s = Schedule::default();
        assert_eq!(readies(&s.demand("a", info(&[]))), vec!["a"]);
        assert!(readies(&s.demand("b", info(&["a"]))).is_empty());
        assert!(readies(&s.demand("c", info(&["b", "valid-elsewhere"]))).is_empty());
        s.claim("a", "w1");
        assert_eq!(
            readies(&s.built("a", "w1", vec!["/out/a".into()])),
            vec!["b"]
        );
        s.claim("b", "w2");
        assert_eq!(readies(&s.built("b", "w2", vec![])), vec!["c"]);
    }

    #[test]
    fn late_input_demand_makes_a_ready_dependent_wait() {
        let mut s = Schedule::default();
        assert_eq!(readies(&s.demand("b", info(&["a"]))), vec!["b"]);
        let e = s.demand("a", info(&[]));
        assert!(e.contains(&Effect::Unready("b".into())), "{e:?}");
        assert_eq!(readies(&e), vec!["a"]);
        assert_eq!(s.state("b"), Some(&StepState::Waiting));
        s.claim("a", "w1");
        assert_eq!(readies(&s.built("a", "w1", vec![])), vec!["b"]);
    }

    #[test]
    fn only_one_claim_is_granted() {
        let mut s = Schedule::default();
        s.demand("a", info(&[]));
        let first = s.claim("a", "w1");
        assert!(first.contains(&Effect::Assign("a".into(), "w1".into())));
        assert!(s.claim("a", "w2").is_empty());
        assert_eq!(s.state("a"), Some(&StepState::Assigned("w1".into())));
    }

    #[test]
    fn lost_worker_is_retried_then_given_up() {
        let mut s = Schedule::new(2);
        s.demand("a", info(&[]));
        s.claim("a", "w1");
        let e = s.unclaim("a", "w1");
        assert_eq!(readies(&e), vec!["a"]);
        s.claim("a", "w2");
        let e = s.unclaim("a", "w2");
        let Some(Effect::Failed { reason, .. }) =
            e.iter().find(|e| matches!(e, Effect::Failed { .. }))
        else {
            panic!("expected a failure, got {e:?}");
        };
        assert!(reason.contains("gave up after 2 attempts"), "{reason}");
        assert!(reason.contains("w1") && reason.contains("w2"), "{reason}");
    }

    #[test]
    fn permanent_failure_reaches_dependents() {
        let mut s = Schedule::default();
        s.demand("a", info(&[]));
        s.demand("b", info(&["a"]));
        s.demand("c", info(&["b"]));
        s.claim("a", "w1");
        let e = s.failed("a", "w1", "builder exited 1", FailureKind::Permanent);
        let failed: Vec<_> = e
            .iter()
            .filter_map(|e| match e {
                Effect::Failed { drv, reason, .. } => Some((drv.as_str(), reason.as_str())),
                _ => None,
            })
            .collect();
        assert_eq!(
            failed,
            vec![
                ("a", "builder exited 1"),
                ("b", "dependency a failed"),
                ("c", "dependency b failed")
            ]
        );
        // A late demand on a failed input fails at once.
        let e = s.demand("d", info(&["a"]));
        assert!(e
            .iter()
            .any(|e| matches!(e, Effect::Failed { drv, .. } if drv == "d")));
    }

    #[test]
    fn shared_step_survives_one_withdrawal() {
        let mut s = Schedule::default();
        s.demand("a", info(&[]));
        s.demand("a", info(&[]));
        s.claim("a", "w1");
        assert!(s.undemand("a").is_empty());
        assert_eq!(s.undemand("a"), vec![Effect::Unassign("a".into())]);
        assert!(s.is_empty());
    }

    #[test]
    fn stale_reports_are_ignored() {
        let mut s = Schedule::default();
        s.demand("a", info(&[]));
        s.claim("a", "w1");
        assert!(s
            .failed("a", "w2", "not mine", FailureKind::Permanent)
            .is_empty());
        assert!(s.unclaim("a", "w2").is_empty());
        assert_eq!(s.state("a"), Some(&StepState::Assigned("w1".into())));
    }
}
