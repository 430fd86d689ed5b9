//! Steps the planner resolves before they are built (content-addressed inputs, see
//! [`crate::resolution`]): once its inputs are built, such a step is resolved, and the
//! resolved derivation is built in its place. Several originals may resolve to one
//! derivation, built once; an original is built, fails or is lost with it. An original whose
//! input is built again with other outputs before its resolution is built (the input's output
//! was lost and the rebuild was not deterministic) is resolved anew.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use nixspace_protocol::{DrvPath, WorkerId};

use super::{Effect, FailureCause, Schedule, StepDerivation, StepFailure, StepInfo, StepState};
use crate::resolution::{Resolved, ToResolve};

/// What an original was resolved to, and against which outputs of its inputs.
#[derive(Debug, Clone)]
pub(super) struct Link {
    /// The resolved derivation built in its place.
    pub(super) to: DrvPath,
    /// Each input step's outputs when it was resolved.
    against: BTreeMap<DrvPath, Vec<String>>,
}

impl Schedule {
    /// The derivation of step `drv` to resolve, while it waits to be resolved.
    pub fn to_resolve(&self, drv: &DrvPath) -> Option<Arc<ToResolve>> {
        let step = self.steps.get(drv)?;
        match (&step.state, &step.info.derivation) {
            (StepState::Resolving, StepDerivation::ToResolve(r)) => Some(Arc::clone(r)),
            _ => None,
        }
    }

    /// The outputs of the built step `drv` by output name.
    pub fn built_outputs(&self, drv: &DrvPath) -> Option<BTreeMap<String, String>> {
        let step = self.steps.get(drv)?;
        let StepState::Built { outputs, .. } = &step.state else {
            return None;
        };
        let names = step
            .info
            .outputs
            .iter()
            .map(|e| e.split_once('=').map_or(e.as_str(), |(n, _)| n));
        Some(
            names
                .zip(outputs)
                .map(|(n, p)| (n.to_owned(), p.clone()))
                .collect(),
        )
    }

    /// What the original `drv` was resolved to, if it was.
    pub fn resolved_to(&self, drv: &DrvPath) -> Option<&DrvPath> {
        self.links.get(drv).map(|l| &l.to)
    }

    /// The text of a derivation the planner resolved, for the worker that builds it (empty
    /// for any other step: the worker reads it from the stores).
    pub fn derivation_text(&self, drv: &DrvPath) -> Vec<u8> {
        match self.steps.get(drv).map(|s| &s.info.derivation) {
            Some(StepDerivation::Resolved(text)) => text.to_vec(),
            _ => Vec::new(),
        }
    }

    /// The original `from`, being resolved, resolved to `resolved`: it waits for that
    /// derivation, demanded for it (with its urgency and settings), and is built, fails or is
    /// lost with it.
    pub fn resolved(&mut self, from: &DrvPath, resolved: Resolved) -> Vec<Effect> {
        let mut effects = Vec::new();
        let Some(step) = self.steps.get(from) else {
            return effects;
        };
        if step.state != StepState::Resolving {
            return effects;
        }
        let info = StepInfo {
            outputs: resolved.outputs,
            derivation: StepDerivation::Resolved(resolved.text),
            ..step.info.clone()
        };
        let urgency = step.urgency;
        if resolved.to == *from {
            // Nothing to resolve: built as it is.
            if let Some(step) = self.steps.get_mut(from) {
                step.info = info;
                step.state = StepState::Waiting;
                step.inputs_built = 0;
            }
            self.settle(from, &mut effects);
            return effects;
        }
        let against = step
            .info
            .input_drvs
            .iter()
            .filter_map(|input| Some((input.clone(), self.built_outcome(input)?.1.clone())))
            .collect();
        let to = resolved.to;
        self.links.insert(
            from.clone(),
            Link {
                to: to.clone(),
                against,
            },
        );
        self.resolutions
            .entry(to.clone())
            .or_default()
            .insert(from.clone());
        if let Some(step) = self.steps.get_mut(from) {
            step.state = StepState::Resolved { to: to.clone() };
        }
        effects.push(Effect::Linked {
            from: from.clone(),
            to: to.clone(),
            system: info.system.to_string(),
        });
        effects.extend(self.demand(&to, info, urgency));
        // Resolved like another original before: it has ended already.
        match self.state(&to).cloned() {
            Some(StepState::Built { worker, outputs }) => {
                self.mark_built(&to, &worker, &outputs, &mut effects)
            }
            Some(StepState::Failed(failure)) => {
                let StepFailure {
                    worker,
                    reason,
                    cause,
                } = *failure;
                self.fail_for_good(from, worker.as_ref(), reason, cause, &mut effects)
            }
            _ => {}
        }
        effects
    }

    /// The original `drv`, being resolved, cannot be: it fails for good with `reason`.
    pub fn cannot_resolve(&mut self, drv: &DrvPath, reason: String) -> Vec<Effect> {
        let mut effects = Vec::new();
        if self.state(drv) == Some(&StepState::Resolving) {
            self.fail_for_good(drv, None, reason, FailureCause::Build, &mut effects);
        }
        effects
    }

    /// The worker and outputs of the built step `drv`.
    fn built_outcome(&self, drv: &DrvPath) -> Option<(&WorkerId, &Vec<String>)> {
        match &self.steps.get(drv)?.state {
            StepState::Built { worker, outputs } => Some((worker, outputs)),
            _ => None,
        }
    }

    /// `drv` is built by `worker` with `outputs`: the originals resolved to it are built with
    /// it, originals resolved against other outputs of it are resolved anew, and the steps
    /// waiting on any of them settle. A worklist: how many originals chain is up to input.
    pub(super) fn mark_built(
        &mut self,
        drv: &DrvPath,
        worker: &WorkerId,
        outputs: &[String],
        effects: &mut Vec<Effect>,
    ) {
        let mut built = vec![drv.clone()];
        while let Some(drv) = built.pop() {
            for from in self.originals_of(&drv) {
                let Some(step) = self.steps.get_mut(&from) else {
                    continue;
                };
                if !matches!(step.state, StepState::Resolved { .. }) {
                    continue;
                }
                step.state = StepState::Built {
                    worker: worker.clone(),
                    outputs: outputs.to_vec(),
                };
                effects.push(Effect::Built {
                    drv: from.clone(),
                    worker: worker.clone(),
                    outputs: outputs.to_vec(),
                });
                built.push(from);
            }
            // Every step of the worklist was built with `outputs`.
            for dependent in self.dependents_of(&drv) {
                let stale = self
                    .links
                    .get(&dependent)
                    .is_some_and(|l| l.against.get(&drv).is_some_and(|then| then != outputs))
                    && matches!(self.state(&dependent), Some(StepState::Resolved { .. }));
                if stale {
                    tracing::info!(original = %dependent, input = %drv, "an input was built again with other outputs; resolving anew");
                    self.unlink(&dependent, effects);
                    if let Some(step) = self.steps.get_mut(&dependent) {
                        step.state = StepState::Waiting;
                        step.inputs_built = 0;
                    }
                }
                self.settle(&dependent, effects);
            }
        }
    }

    /// Forget what the original `from` was resolved to, and withdraw its demand of it.
    pub(super) fn unlink(&mut self, from: &DrvPath, effects: &mut Vec<Effect>) {
        let Some(link) = self.links.remove(from) else {
            return;
        };
        if let Some(froms) = self.resolutions.get_mut(&link.to) {
            froms.remove(from);
            if froms.is_empty() {
                self.resolutions.remove(&link.to);
            }
        }
        effects.push(Effect::Unlinked { from: from.clone() });
        effects.extend(self.undemand(&link.to));
    }

    /// The originals resolved to `drv`.
    pub(super) fn originals_of(&self, drv: &DrvPath) -> BTreeSet<DrvPath> {
        self.resolutions.get(drv).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolution::tests::ca;
    use crate::{FailureKind, StepInfo, Urgency};

    fn step(inputs: &[&DrvPath], derivation: StepDerivation) -> StepInfo {
        StepInfo {
            system: "x86_64-linux".into(),
            features: vec![],
            input_drvs: inputs.iter().map(|d| (*d).clone()).collect(),
            settings: Default::default(),
            outputs: vec!["out=".into()],
            memory: None,
            duration_ms: None,
            derivation,
        }
    }

    fn to_resolve(drv: &DrvPath, text: &[u8]) -> StepDerivation {
        StepDerivation::ToResolve(Arc::new(ToResolve::check(drv, text).unwrap()))
    }

    /// Resolve what the schedule asks to, as the planner's service does.
    fn resolve_asked(s: &mut Schedule, effects: &[Effect]) -> Vec<Effect> {
        let mut more = Vec::new();
        for e in effects {
            if let Effect::Resolve { drv } = e {
                let r = s.to_resolve(drv).unwrap();
                let resolved = r.resolve(|i| s.built_outputs(i)).unwrap();
                more.extend(s.resolved(drv, resolved));
            }
        }
        more
    }

    fn linked(effects: &[Effect]) -> Vec<(DrvPath, DrvPath)> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Linked { from, to, .. } => Some((from.clone(), to.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn originals_resolve_alike_build_once_and_anew_when_an_input_changes() {
        let mut s = Schedule::default();
        let (a, _) = ca("a", &[]);
        let (b1, b1_text) = ca("b", &[&a]);
        let (a2, _) = ca("a2", &[]);
        let w = WorkerId::from("w");
        s.demand(&a, step(&[], StepDerivation::InStores), Urgency::default());
        let e = s.demand(
            &b1,
            step(&[&a], to_resolve(&b1, &b1_text)),
            Urgency::default(),
        );
        assert!(
            !e.iter().any(|e| matches!(e, Effect::Resolve { .. })),
            "{e:?}"
        );
        s.claim(&a, &w);
        let e = s.built(
            &a,
            &w,
            vec!["/nix/store/00000000000000000000000000000000-a".into()],
        );
        // Ready: resolved, not announced itself.
        assert!(e.contains(&Effect::Resolve { drv: b1.clone() }), "{e:?}");
        assert!(!e
            .iter()
            .any(|e| matches!(e, Effect::Ready { drv, .. } if *drv == b1)));
        let e = resolve_asked(&mut s, &e);
        let links = linked(&e);
        assert_eq!(links.len(), 1, "{e:?}");
        let r = links[0].1.clone();
        assert_ne!(r, b1);
        assert!(
            e.iter()
                .any(|e| matches!(e, Effect::Ready { drv, .. } if *drv == r)),
            "{e:?}"
        );
        assert!(!s.derivation_text(&r).is_empty());
        assert!(s.derivation_text(&a).is_empty());

        // Another original with the same inputs' outputs shares the resolution: the step is
        // demanded twice, and built once for both.
        let (b2, b2_text) = ca("b", &[&a2]);
        s.demand(&a2, step(&[], StepDerivation::InStores), Urgency::default());
        s.claim(&a2, &w);
        let e = s.built(
            &a2,
            &w,
            vec!["/nix/store/00000000000000000000000000000000-a".into()],
        );
        assert!(e.is_empty() || !e.iter().any(|e| matches!(e, Effect::Resolve { .. })));
        let e = s.demand(
            &b2,
            step(&[&a2], to_resolve(&b2, &b2_text)),
            Urgency::default(),
        );
        let e = resolve_asked(&mut s, &e);
        assert_eq!(linked(&e), [(b2.clone(), r.clone())]);
        s.claim(&r, &w);
        let e = s.built(
            &r,
            &w,
            vec!["/nix/store/11111111111111111111111111111111-b".into()],
        );
        for original in [&b1, &b2] {
            assert!(
                e.iter()
                    .any(|e| matches!(e, Effect::Built { drv, .. } if drv == original)),
                "{e:?}"
            );
        }

        // `a`'s output is lost and built again elsewhere with another output: b1's resolution
        // is built, so it stands; losing the resolution's output makes b1 wait for it again.
        let (made, e) = s.lost("/nix/store/11111111111111111111111111111111-b");
        assert_eq!(made.as_ref(), Some(&r));
        assert!(e.contains(&Effect::Forget { drv: b1.clone() }), "{e:?}");
        assert_eq!(s.state(&b1), Some(&StepState::Resolved { to: r.clone() }));
        let (made, _) = s.lost("/nix/store/00000000000000000000000000000000-a");
        assert!(made.is_some());
        s.claim(&a, &w);
        // a is built again with another output: b1 (waiting on r) is resolved anew; b2 keeps r.
        let e = s.built(
            &a,
            &w,
            vec!["/nix/store/22222222222222222222222222222222-a".into()],
        );
        assert!(e.contains(&Effect::Unlinked { from: b1.clone() }), "{e:?}");
        let e = resolve_asked(&mut s, &e);
        let links = linked(&e);
        assert_eq!(links.len(), 1, "{e:?}");
        assert_ne!(links[0].1, r);
        assert_eq!(s.resolved_to(&b2), Some(&r));
    }

    #[test]
    fn an_original_fails_with_its_resolution_and_an_unresolvable_one_fails() {
        let mut s = Schedule::default();
        let (a, _) = ca("a", &[]);
        let (b, b_text) = ca("b", &[&a]);
        let w = WorkerId::from("w");
        s.demand(&a, step(&[], StepDerivation::InStores), Urgency::default());
        s.demand(&b, step(&[&a], to_resolve(&b, &b_text)), Urgency::default());
        s.claim(&a, &w);
        let e = s.built(
            &a,
            &w,
            vec!["/nix/store/00000000000000000000000000000000-a".into()],
        );
        let e = resolve_asked(&mut s, &e);
        let r = linked(&e)[0].1.clone();
        s.claim(&r, &w);
        let e = s.failed(
            &r,
            Some(&w),
            "builder failed",
            FailureKind::Permanent,
            FailureCause::Build,
        );
        assert!(
            e.iter().any(|e| matches!(e, Effect::Failed { drv, reason, cause: FailureCause::Build, .. } if *drv == b && reason == "builder failed")),
            "{e:?}"
        );
        // Withdrawing the original withdraws its resolution's demand and announcement.
        let e = s.undemand(&b);
        assert!(e.contains(&Effect::Unlinked { from: b.clone() }), "{e:?}");
        assert!(s.state(&r).is_none());

        let (c, c_text) = ca("c", &[&a]);
        s.demand(&c, step(&[&a], to_resolve(&c, &c_text)), Urgency::default());
        let e = s.cannot_resolve(&c, "cannot resolve: no".into());
        assert!(
            e.iter()
                .any(|e| matches!(e, Effect::Failed { drv, .. } if *drv == c)),
            "{e:?}"
        );
    }
}
