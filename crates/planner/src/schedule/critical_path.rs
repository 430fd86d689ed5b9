//! The critical path: ready steps are taken (after priority) by how long the longest path of
//! demanded steps from each up to a root is predicted to take, each step counting its learned
//! duration ([`StepInfo::duration_ms`]; [`UNKNOWN_DURATION_MS`] when none was learned), so
//! the step the whole build waits on longest starts first.
//!
//! The paths are computed over the whole table in one pass (O(steps + edges)) when
//! [`Schedule::update_critical_paths`] is called and demands changed since: the service does
//! it on its periodic tick, not on every demand (a frontend demands thousands at once). A
//! step demanded in between is queued with [`first_guess`]: its own duration plus one
//! [`UNKNOWN_DURATION_MS`] per step its demand says waits above it.

use std::time::Instant;

use nixspace_protocol::DrvPath;

use super::{Schedule, StepInfo, StepState, Urgency};

/// What a step whose duration nothing predicts counts for on a path.
pub const UNKNOWN_DURATION_MS: u64 = 1000;

/// How far one frontend's steps are (see [`Schedule::progress`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// How long its unfinished steps are predicted to take, in milliseconds.
    pub eta_ms: u64,
    /// How many of its steps wait in the ready queue for a worker with room.
    pub queued: usize,
}

/// A step's predicted duration.
fn duration(info: &StepInfo) -> u64 {
    info.duration_ms.unwrap_or(UNKNOWN_DURATION_MS)
}

/// The remaining path of a step just demanded, until the next computation: its own duration
/// and an unknown one per step of the chain its demand says waits on it.
pub(super) fn first_guess(info: &StepInfo, urgency: Urgency) -> u64 {
    duration(info).saturating_add(urgency.depth.saturating_mul(UNKNOWN_DURATION_MS))
}

/// What [`Schedule::count`] has counted so far of one frontend's steps; [`Schedule::progress_of`]
/// makes it a [`Progress`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// The longest remaining path among the unfinished steps counted.
    path: u64,
    /// Their predicted work left, in milliseconds.
    work: u64,
    /// How many of them wait in the ready queue.
    queued: usize,
}

impl Schedule {
    /// How far the steps among `drvs` (one frontend's) are as of `now`: how long the
    /// unfinished ones are predicted to take, in milliseconds (the longer of the longest
    /// remaining path among them and their predicted work spread over every connected
    /// worker's slots; a running step counts what is left of its duration, none once it ran
    /// past it), and how many wait in the ready queue. One pass over the steps.
    pub fn progress<'a>(
        &self,
        drvs: impl IntoIterator<Item = &'a DrvPath>,
        now: Instant,
    ) -> Progress {
        let mut tally = Tally::default();
        for drv in drvs {
            self.count(drv, now, &mut tally);
        }
        self.progress_of(tally)
    }

    /// Count `drv` into `tally` as of `now`, if it is unfinished (see [`Schedule::progress`]).
    pub fn count(&self, drv: &DrvPath, now: Instant, tally: &mut Tally) {
        let Some(step) = self.steps.get(drv) else {
            return;
        };
        if matches!(
            step.state,
            StepState::Built { .. } | StepState::Failed { .. } | StepState::Resolved { .. }
        ) {
            return;
        }
        if step.queued.is_some() {
            tally.queued += 1;
        }
        let own = duration(&step.info);
        let spent = match (&step.state, step.since) {
            (StepState::Assigned(_), Some(at)) => {
                let ms = now.saturating_duration_since(at).as_millis();
                u64::try_from(ms).unwrap_or(u64::MAX).min(own)
            }
            _ => 0,
        };
        tally.path = tally.path.max(step.remaining_ms.saturating_sub(spent));
        tally.work = tally.work.saturating_add(own - spent);
    }

    /// The progress of the steps counted in `tally`, over the slots connected now.
    pub fn progress_of(&self, tally: Tally) -> Progress {
        let slots: u64 = self.workers.values().map(|w| u64::from(w.max_jobs)).sum();
        Progress {
            eta_ms: tally.path.max(tally.work / slots.max(1)),
            queued: tally.queued,
        }
    }

    /// Recompute every demanded step's remaining path if demands changed since the last time,
    /// and move the ready steps to where their paths put them in the queue. Steps whose
    /// dependents form a cycle (no derivations do) keep their own duration.
    pub fn update_critical_paths(&mut self) {
        if !self.paths_stale {
            return;
        }
        self.paths_stale = false;
        // Dependents before inputs: a step is done once all its demanded dependents are. Each
        // step counts its dependents not done yet, and its path is written in place: no table
        // of the whole schedule is built beside it.
        let mut done = Vec::new();
        for (drv, step) in &mut self.steps {
            let dependents = self.dependents.get(drv).map_or(0, |d| d.len());
            step.dependents_left = u32::try_from(dependents).unwrap_or(u32::MAX);
            if step.dependents_left == 0 {
                done.push(drv.clone());
            }
        }
        while let Some(drv) = done.pop() {
            let above = self
                .dependents
                .get(&drv)
                .into_iter()
                .flatten()
                .filter_map(|d| self.steps.get(d))
                .map(|d| d.remaining_ms)
                .max()
                .unwrap_or(0);
            let Some(step) = self.steps.get_mut(&drv) else {
                continue;
            };
            step.remaining_ms = duration(&step.info).saturating_add(above);
            for i in 0..step.info.input_drvs.len() {
                let input = self.steps[&drv].info.input_drvs[i].clone();
                // An input a step lists twice is counted down twice (it is one dependent in
                // `dependents`): never below zero, and taken once.
                let Some(input_step) = self.steps.get_mut(&input) else {
                    continue;
                };
                if input_step.dependents_left == 1 {
                    done.push(input);
                }
                input_step.dependents_left = input_step.dependents_left.saturating_sub(1);
            }
            self.requeue(&drv);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::super::Effect;
    use super::*;

    fn step(inputs: &[&str], duration_ms: Option<u64>) -> StepInfo {
        StepInfo {
            duration_ms,
            ..super::super::tests::info(inputs)
        }
    }

    fn first_assigned(effects: &[Effect]) -> Option<&str> {
        effects.iter().find_map(|e| match e {
            Effect::Assign { drv, .. } => Some(drv.as_str()),
            _ => None,
        })
    }

    /// Two ready leaves: `long-leaf` under four learned 1 s steps, `short-leaf` under three
    /// learned 10 s steps; one worker with one slot.
    fn two_paths(learned: bool) -> Schedule {
        let ms = |n: u64| learned.then_some(n);
        let mut s = Schedule::default();
        // The long chain is demanded first: older, and deeper by count.
        let demands = [
            ("long-leaf", vec![], ms(100)),
            ("quick-1", vec!["long-leaf"], ms(1_000)),
            ("quick-2", vec!["quick-1"], ms(1_000)),
            ("quick-3", vec!["quick-2"], ms(1_000)),
            ("quick-4", vec!["quick-3"], ms(1_000)),
            ("short-leaf", vec![], ms(100)),
            ("slow-1", vec!["short-leaf"], ms(10_000)),
            ("slow-2", vec!["slow-1"], ms(10_000)),
            ("slow-3", vec!["slow-2"], ms(10_000)),
        ];
        for (drv, inputs, duration) in demands {
            s.demand(&drv.into(), step(&inputs, duration), Urgency::default());
        }
        s.update_critical_paths();
        s.worker_joined(&"w".into(), super::super::more_tests::offer(&[]));
        s.offer(&"w".into(), 1);
        s
    }

    #[test]
    fn the_step_under_the_longest_predicted_path_goes_first() {
        let mut s = two_paths(true);
        let mut effects = Vec::new();
        s.dispatch(&mut effects);
        assert_eq!(first_assigned(&effects), Some("short-leaf"), "{effects:?}");
        assert_eq!(s.state(&"long-leaf".into()), Some(&StepState::Ready));
        // The whole build waits on the slow chain (30.1 s); one slot takes 34.2 s for all.
        let all: Vec<DrvPath> = s.steps.keys().cloned().collect();
        let now = Instant::now();
        assert_eq!(s.progress(&all, now).eta_ms, 34_200);
        assert_eq!(s.progress(&all, now).queued, 1, "the other leaf waits");
        s.worker_joined(&"w2".into(), super::super::more_tests::offer(&[]));
        s.worker_joined(&"w3".into(), super::super::more_tests::offer(&[]));
        assert_eq!(
            s.progress(&all, now).eta_ms,
            30_100,
            "three slots: the path"
        );
        // The running leaf counts what is left of its 100 ms, none once it ran past it.
        let at = s.steps[&DrvPath::from("short-leaf")]
            .since
            .expect("assigned");
        let later = |ms: u64| at + std::time::Duration::from_millis(ms);
        assert_eq!(s.progress(&all, later(40)).eta_ms, 30_060);
        assert_eq!(s.progress(&all, later(5_000)).eta_ms, 30_000);
        // Built steps count no more.
        s.built(&"short-leaf".into(), &"w".into(), vec![]);
        assert_eq!(s.progress(&all, now).eta_ms, 30_000);
        // Its dependent is ready now, and waits beside the other leaf (nothing dispatched).
        assert_eq!(s.progress(&all, now).queued, 2);
        assert_eq!(
            s.queue_by_system(),
            &BTreeMap::from([(Arc::from("x86_64-linux"), 2)])
        );
        // Positive control: with nothing learned every step counts the same, and the chain of
        // more steps goes first.
        let mut s = two_paths(false);
        let mut effects = Vec::new();
        s.dispatch(&mut effects);
        assert_eq!(first_assigned(&effects), Some("long-leaf"), "{effects:?}");
    }
}
