//! Targeted dispatch: the planner gives each ready step to one idle worker that can build it,
//! instead of every worker claiming every ready step and all but one withdrawing (the claim
//! herd). A step no worker has room for stays ready (asserted) until one has.
//!
//! Room is counted on both sides: a worker takes part while its last offer has free slots
//! (a draining worker offers none), and it gets at most `max_jobs` steps at once by the
//! planner's own count, which is exact the moment an outcome arrives (the offer lags), plus
//! the `hold` it keeps waiting: a held step starts the moment one of its builds ends.
//!
//! Memory is admitted too: a worker is never given steps whose predicted memory adds up to
//! more than it offers, nor one predicted to need more than one build may use there. A step
//! predicted to need more than every worker that can build it allows one build still runs:
//! on the biggest of them, alone (that worker is kept for it, given nothing else, until it is
//! idle), so nothing waits for ever. Steps with no prediction count for nothing.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::Arc;
use std::time::Instant;

use nixspace_protocol::{DrvPath, WorkerId};

use super::{Effect, Schedule, Step, StepState, WorkerOffer};

/// Where a ready step sits in the queue: highest priority first, then the longest predicted
/// path of demanded steps from it up (see [`super::critical_path`]), then the deepest (the
/// longest chain of demanded steps waits on it), then the oldest. The path and the depth are
/// kept in 32 bits (a path of 49 days and a chain of four billion steps are as long as any
/// longer): every ready step has one, in the queue and in its step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct TakeOrder {
    priority: Reverse<i64>,
    remaining_ms: Reverse<u32>,
    depth: Reverse<u32>,
    age: u64,
}

impl TakeOrder {
    /// `step`'s place, `age` its turn in the order steps were queued.
    fn of(step: &Step, age: u64) -> TakeOrder {
        let saturated = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        TakeOrder {
            priority: Reverse(step.urgency.priority),
            remaining_ms: Reverse(saturated(step.remaining_ms)),
            depth: Reverse(saturated(step.urgency.depth)),
            age,
        }
    }
}

/// An open worker's place in dispatch's order of preference (inputs aside): the fastest
/// first, then the one with the most room, then by name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct OpenWorker {
    speed: Reverse<Speed>,
    slots: Reverse<usize>,
    id: WorkerId,
}

/// A worker's speed, ordered as [`f64::total_cmp`] orders it.
#[derive(Debug, Clone, Copy)]
struct Speed(f64);

impl PartialEq for Speed {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Speed {}

impl PartialOrd for Speed {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Speed {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl Schedule {
    /// Give ready steps, in take order, to workers with room: each to the fastest capable
    /// worker, preferring (at equal speed) the one that built most of its inputs, then the
    /// one with the most room. Call after every change; it does nothing when no worker has
    /// room or nothing is ready.
    ///
    /// The open workers are kept in that order of preference (inputs aside), so a step
    /// goes to the first of them that may take it, unless one holding its inputs is as fast:
    /// on a farm of like workers a grant costs a look at one worker, not at every open one.
    pub fn dispatch(&mut self, effects: &mut Vec<Effect>) {
        let now = Instant::now();
        // Workers kept for a step bigger than every worker allows one build: given nothing
        // else in this dispatch.
        let mut kept = BTreeSet::new();
        let mut after: Option<TakeOrder> = None;
        while self.open.len() > kept.len() {
            let next = match after {
                None => self.ready_queue.iter().next(),
                Some(order) => self
                    .ready_queue
                    .range((Bound::Excluded(order), Bound::Unbounded))
                    .next(),
            };
            let Some((&order, drv)) = next else {
                break;
            };
            after = Some(order);
            let Some(step) = self.steps.get(drv) else {
                continue;
            };
            // Only a step with a memory prediction asks how big the biggest worker is.
            let biggest = step
                .info
                .memory
                .and_then(|_| self.biggest_build(drv, step, now));
            if let Some(worker) = self.best_worker(drv, step, now, biggest, &kept) {
                // Copied only to be given: the steps nobody may take are looked at in place.
                let drv = drv.clone();
                self.grant(&drv, &worker, effects);
                continue;
            }
            if let (Some(need), Some(biggest)) = (step.info.memory, biggest) {
                if need > biggest {
                    // Kept for the step: the biggest workers get nothing else until one of
                    // them is idle.
                    let biggest_ones = self
                        .open
                        .keys()
                        .filter(|w| self.one_build(w) == Some(biggest))
                        .cloned()
                        .collect::<Vec<_>>();
                    kept.extend(biggest_ones);
                }
            }
        }
    }

    /// The open worker (not in `kept`) that ready step `drv` goes to, if any may take it:
    /// the first in the order of preference, or one as fast that built more of its inputs.
    fn best_worker(
        &self,
        drv: &DrvPath,
        step: &Step,
        now: Instant,
        biggest: Option<u64>,
        kept: &BTreeSet<WorkerId>,
    ) -> Option<WorkerId> {
        let may_take = |w: &WorkerId| {
            !kept.contains(w) && self.can_take(drv, step, w, now) && self.fits(step, w, biggest)
        };
        let first = self.open_order.iter().find(|o| may_take(&o.id));
        let holders =
            step.info
                .input_drvs
                .iter()
                .filter_map(|input| match &self.steps.get(input)?.state {
                    StepState::Built { worker, .. } => self.open.get(worker),
                    _ => None,
                });
        first
            .into_iter()
            .chain(holders.filter(|o| may_take(&o.id)))
            .max_by(|a, b| {
                b.speed
                    .cmp(&a.speed)
                    .then_with(|| {
                        self.inputs_built_by(step, &a.id)
                            .cmp(&self.inputs_built_by(step, &b.id))
                    })
                    .then_with(|| b.cmp(a))
            })
            .map(|o| o.id.clone())
    }

    /// Put `worker` among the open workers, or take it out, by what it offers and runs now,
    /// in its place in the order of preference. Called wherever either changes.
    pub(super) fn reopen(&mut self, worker: &WorkerId) {
        if let Some(old) = self.open.remove(worker) {
            self.open_order.remove(&old);
        }
        let Some(offer) = self.workers.get(worker) else {
            return;
        };
        let running = self.running_on(worker);
        let offers_slots = self.free_slots.get(worker).is_some_and(|&free| free > 0);
        if !offers_slots || running >= offer.capacity() {
            return;
        }
        let place = OpenWorker {
            speed: Reverse(Speed(offer.speed)),
            slots: Reverse(offer.capacity() - running),
            id: worker.clone(),
        };
        self.open_order.insert(place.clone());
        self.open.insert(worker.clone(), place);
    }

    /// The memory `worker`'s running steps leave of what it offers, by their predictions
    /// (`None`: it says nothing).
    fn free_memory(&self, worker: &WorkerId) -> Option<u64> {
        let all = self.workers.get(worker)?.resources.memory;
        if all == 0 {
            return None;
        }
        let predicted: u64 = self
            .running
            .get(worker)
            .into_iter()
            .flatten()
            .filter_map(|drv| self.steps.get(drv)?.info.memory)
            .sum();
        Some(all.saturating_sub(predicted))
    }

    /// Whether `step` may run on `worker` beside what runs there, by memory alone: its
    /// prediction fits what one build may use there and what the running steps leave, and it
    /// was not killed for going over a limit `worker` does not exceed. A step or worker that
    /// says nothing of memory fits. (Dispatch also lets a step bigger than every worker's
    /// per-build limit run alone on one of the biggest: see [`Schedule::fits`].)
    pub(super) fn fits_beside(&self, step: &Step, worker: &WorkerId) -> bool {
        let Some(offer) = self.workers.get(worker) else {
            return false;
        };
        // No step counts as bigger than every worker here: it fits by its prediction alone.
        self.fits(step, worker, None) && allows_what_killed(step, offer)
    }

    /// The most memory one build may use on `worker` (`None`: it says nothing).
    fn one_build(&self, worker: &WorkerId) -> Option<u64> {
        self.workers.get(worker)?.resources.one_build()
    }

    /// The most memory one build may use on the biggest connected worker that may build the
    /// ready step `drv` (`None`: none of them says).
    fn biggest_build(&self, drv: &DrvPath, step: &Step, now: Instant) -> Option<u64> {
        self.workers
            .keys()
            .filter(|w| self.can_take(drv, step, w, now))
            .filter_map(|w| self.one_build(w))
            .max()
    }

    /// Whether `step` fits `worker` by memory: its prediction fits what one build may use
    /// there and what the worker's running steps leave; or it is bigger than what one build
    /// may use on every worker that may build it (`biggest`), and `worker`, one of the
    /// biggest, is idle. A step or worker that says nothing of memory always fits.
    fn fits(&self, step: &Step, worker: &WorkerId, biggest: Option<u64>) -> bool {
        let (Some(need), Some(one)) = (step.info.memory, self.one_build(worker)) else {
            return true;
        };
        if need <= one {
            return self.free_memory(worker).is_none_or(|free| need <= free);
        }
        let idle = self.running.get(worker).is_none_or(|r| r.is_empty());
        biggest.is_some_and(|biggest| need > biggest && one == biggest) && idle
    }

    /// Whether `worker` may be given the ready step `drv` now.
    fn can_take(&self, drv: &DrvPath, step: &Step, worker: &WorkerId, now: Instant) -> bool {
        let Some(offer) = self.workers.get(worker) else {
            return false;
        };
        step.state == StepState::Ready
            && !self.kept_from(drv, worker, now)
            && !step.extras().excluded.contains(worker)
            && allows_what_killed(step, offer)
            && offer.builds(&step.info)
    }

    /// How many of the step's inputs `worker` built (their outputs are in its store).
    fn inputs_built_by(&self, step: &Step, worker: &WorkerId) -> usize {
        step.info
            .input_drvs
            .iter()
            .filter(|input| {
                matches!(
                    self.steps.get(*input).map(|s| &s.state),
                    Some(StepState::Built { worker: w, .. }) if w == worker
                )
            })
            .count()
    }

    /// Assign the ready step `drv` to `worker`, ending any reservation of it. A readiness
    /// announced in the same batch of effects is dropped rather than asserted and withdrawn
    /// at once.
    pub(super) fn grant(&mut self, drv: &DrvPath, worker: &WorkerId, effects: &mut Vec<Effect>) {
        self.reserved.remove(drv);
        let announced = effects
            .iter()
            .rposition(|e| matches!(e, Effect::Ready { drv: d, .. } if d == drv));
        effects.push(Effect::Assign {
            drv: drv.clone(),
            worker: worker.clone(),
        });
        self.leave_ready(drv, StepState::Assigned(worker.clone()), effects);
        if let Some(at) = announced {
            effects.remove(at);
            if let Some(unready) = effects
                .iter()
                .rposition(|e| matches!(e, Effect::Unready { drv: d } if d == drv))
            {
                effects.remove(unready);
            }
        }
        if let Some(step) = self.steps.get_mut(drv) {
            let now = Instant::now();
            step.attempts += 1;
            let waited = step.since.map(|ready| now.saturating_duration_since(ready));
            step.waited_us = waited.map_or(0, |w| u32::try_from(w.as_micros()).unwrap_or(u32::MAX));
            step.since = Some(now);
        }
    }

    /// Put the ready step `drv` in the queue (again, if its urgency changed).
    pub(super) fn queue(&mut self, drv: &DrvPath) {
        self.unqueue(drv);
        self.queued_count += 1;
        let Some(step) = self.steps.get_mut(drv) else {
            return;
        };
        let order = TakeOrder::of(step, self.queued_count);
        step.queued = Some(order);
        *self
            .queue_by_system
            .entry(Arc::clone(&step.info.system))
            .or_default() += 1;
        self.ready_queue.insert(order, drv.clone());
    }

    /// Move the queued step `drv` to where its remaining path now puts it, keeping its age.
    pub(super) fn requeue(&mut self, drv: &DrvPath) {
        let Some(step) = self.steps.get_mut(drv) else {
            return;
        };
        let Some(order) = step.queued else {
            return;
        };
        let moved = TakeOrder::of(step, order.age);
        if moved != order {
            step.queued = Some(moved);
            self.ready_queue.remove(&order);
            self.ready_queue.insert(moved, drv.clone());
        }
    }

    /// Take `drv` out of the ready queue.
    pub(super) fn unqueue(&mut self, drv: &DrvPath) {
        let Some(step) = self.steps.get_mut(drv) else {
            return;
        };
        let Some(order) = step.queued.take() else {
            return;
        };
        self.ready_queue.remove(&order);
        if let Some(n) = self.queue_by_system.get_mut(&step.info.system) {
            *n -= 1;
            if *n == 0 {
                self.queue_by_system.remove(&step.info.system);
            }
        }
    }

    /// How many steps wait in the ready queue, per system (none listed with none waiting).
    pub fn queue_by_system(&self) -> &BTreeMap<Arc<str>, usize> {
        &self.queue_by_system
    }

    /// How many steps `worker` is building (given to it, or stolen by it).
    pub(super) fn running_on(&self, worker: &WorkerId) -> usize {
        self.running.get(worker).map_or(0, BTreeSet::len)
    }

    /// Note that `worker` builds `drv`.
    pub(super) fn occupy(&mut self, worker: &WorkerId, drv: &DrvPath) {
        self.running
            .entry(worker.clone())
            .or_default()
            .insert(drv.clone());
        self.reopen(worker);
    }

    /// Note that `worker` no longer builds `drv`.
    pub(super) fn leave(&mut self, worker: &WorkerId, drv: &DrvPath) {
        if let Some(running) = self.running.get_mut(worker) {
            running.remove(drv);
            if running.is_empty() {
                self.running.remove(worker);
            }
        }
        self.reopen(worker);
    }

    /// Note that nobody builds `drv` any more (its assignee and thief, if any, let go).
    pub(super) fn vacate(&mut self, drv: &DrvPath) {
        let Some(step) = self.steps.get(drv) else {
            return;
        };
        let owner = match &step.state {
            StepState::Assigned(owner) => Some(owner.clone()),
            _ => None,
        };
        for worker in owner.into_iter().chain(step.extras().thief.clone()) {
            self.leave(&worker, drv);
        }
    }
}

/// Whether `offer` lets one build use more memory than the limit `step` was killed for
/// going over (true if it never was).
fn allows_what_killed(step: &Step, offer: &WorkerOffer) -> bool {
    step.extras()
        .needs_more_than
        .is_none_or(|limit| offer.resources.allows_more_than(limit))
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::time::Duration;

    use super::super::{FailureCause, FailureKind, StepInfo, Urgency, WorkerOffer};
    use super::*;

    fn worker(system: &str, max_jobs: u32) -> WorkerOffer {
        WorkerOffer {
            systems: vec![system.into()],
            features: vec![],
            speed: 1.0,
            max_jobs,
            hold: 0,
            resources: Default::default(),
        }
    }

    fn step(system: &str, inputs: &[&str]) -> StepInfo {
        StepInfo {
            system: system.into(),
            features: vec![],
            input_drvs: inputs.iter().map(|s| DrvPath::from(*s)).collect(),
            settings: Default::default(),
            outputs: vec![],
            memory: None,
            duration_ms: None,
            derivation: Default::default(),
        }
    }

    fn urgency(priority: i64, depth: u64) -> Urgency {
        Urgency { priority, depth }
    }

    /// `s` with workers `(id, slots)` for x86_64-linux, each offering all its slots.
    fn with_workers(workers: &[(&str, u32)]) -> Schedule {
        let mut s = Schedule::default();
        for (id, slots) in workers {
            s.worker_joined(&(*id).into(), worker("x86_64-linux", *slots));
            s.offer(&(*id).into(), (*slots).into());
        }
        s
    }

    /// Apply a change and dispatch after it, as the planner does; check the occupancy index.
    fn then(s: &mut Schedule, mut effects: Vec<Effect>) -> Vec<Effect> {
        s.dispatch(&mut effects);
        let mut expected: BTreeMap<WorkerId, BTreeSet<DrvPath>> = BTreeMap::new();
        for (drv, step) in &s.steps {
            if let StepState::Assigned(w) = &step.state {
                expected.entry(w.clone()).or_default().insert(drv.clone());
            }
            if let Some(thief) = &step.extras().thief {
                expected
                    .entry(thief.clone())
                    .or_default()
                    .insert(drv.clone());
            }
        }
        assert_eq!(s.running, expected, "occupancy out of step with the states");
        let mut open = BTreeSet::new();
        for (w, offer) in &s.workers {
            let running = s.running.get(w).map_or(0, |r| r.len());
            if s.free_slots.get(w).is_some_and(|&f| f > 0) && running < offer.capacity() {
                open.insert(w.clone());
            }
        }
        assert_eq!(
            s.open.keys().cloned().collect::<BTreeSet<_>>(),
            open,
            "open workers out of step with offers and occupancy"
        );
        assert_eq!(
            s.open.values().cloned().collect::<BTreeSet<_>>(),
            s.open_order,
            "the order of the open workers out of step with them"
        );
        for place in &s.open_order {
            let offer = &s.workers[&place.id];
            let running = s.running.get(&place.id).map_or(0, |r| r.len());
            assert_eq!(place.slots.0, offer.capacity() - running, "{place:?}");
        }
        effects
    }

    fn assigns(effects: &[Effect]) -> Vec<(&str, &str)> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Assign { drv: d, worker: w } => Some((d.as_str(), w.as_str())),
                _ => None,
            })
            .collect()
    }

    fn announced(effects: &[Effect]) -> Vec<&str> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Ready { drv: d, .. } | Effect::Unready { drv: d } => Some(d.as_str()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_ready_step_goes_to_one_idle_worker_without_being_announced() {
        let mut s = with_workers(&[("w1", 2), ("w2", 2)]);
        let e = s.demand(&"a".into(), step("x86_64-linux", &[]), Urgency::default());
        let e = then(&mut s, e);
        assert_eq!(assigns(&e).len(), 1, "{e:?}");
        assert!(announced(&e).is_empty(), "{e:?}");
        assert!(matches!(s.state(&"a".into()), Some(StepState::Assigned(_))));
    }

    #[test]
    fn a_worker_gets_at_most_its_slots_and_the_rest_stays_ready() {
        let mut s = with_workers(&[("w", 1)]);
        let e = s.demand(&"a".into(), step("x86_64-linux", &[]), Urgency::default());
        assert_eq!(assigns(&then(&mut s, e)), vec![("a", "w")]);
        let e = s.demand(&"b".into(), step("x86_64-linux", &[]), Urgency::default());
        let e = then(&mut s, e);
        assert!(assigns(&e).is_empty());
        assert_eq!(announced(&e), vec!["b"], "b is announced ready");
        let e = s.built(&"a".into(), &"w".into(), vec![]);
        let e = then(&mut s, e);
        assert_eq!(assigns(&e), vec![("b", "w")]);
        assert!(e.contains(&Effect::Unready { drv: "b".into() }), "{e:?}");
    }

    #[test]
    fn a_step_assigned_says_how_long_it_waited_ready() {
        let mut s = with_workers(&[("w", 1)]);
        let e = s.demand(&"a".into(), step("x86_64-linux", &[]), Urgency::default());
        assert_eq!(assigns(&then(&mut s, e)), vec![("a", "w")]);
        let e = s.demand(&"b".into(), step("x86_64-linux", &[]), Urgency::default());
        assert!(assigns(&then(&mut s, e)).is_empty());
        std::thread::sleep(Duration::from_millis(30));
        let e = s.built(&"a".into(), &"w".into(), vec![]);
        assert_eq!(assigns(&then(&mut s, e)), vec![("b", "w")]);
        // b waited for the slot; a was given it the moment it was ready.
        assert!(s.waited(&"b".into()) >= Duration::from_millis(30));
        assert!(s.waited(&"a".into()) < Duration::from_millis(30));
        assert_eq!(s.waited(&"unknown".into()), Duration::ZERO);
    }

    #[test]
    fn a_worker_that_holds_steps_is_given_its_slots_and_its_hold() {
        let mut s = Schedule::default();
        let held = WorkerOffer {
            hold: 1,
            ..worker("x86_64-linux", 1)
        };
        s.worker_joined(&"w".into(), held);
        s.offer(&"w".into(), 2);
        for drv in ["a", "b", "c"] {
            let e = s.demand(&drv.into(), step("x86_64-linux", &[]), Urgency::default());
            then(&mut s, e);
        }
        let given = |s: &Schedule| {
            ["a", "b", "c"]
                .into_iter()
                .filter(|d| matches!(s.state(&(*d).into()), Some(StepState::Assigned(_))))
                .collect::<Vec<_>>()
        };
        assert_eq!(given(&s), vec!["a", "b"], "one to build, one to hold");
        let e = s.built(&"a".into(), &"w".into(), vec![]);
        let e = then(&mut s, e);
        assert_eq!(
            assigns(&e),
            vec![("c", "w")],
            "the held one builds now; c is held"
        );
        assert_eq!(given(&s), vec!["b", "c"]);
    }

    #[test]
    fn steps_go_by_priority_then_depth_then_age() {
        let mut s = Schedule::default();
        for (drv, u) in [
            ("old", urgency(0, 1)),
            ("young", urgency(0, 1)),
            ("deep", urgency(0, 5)),
            ("urgent", urgency(3, 0)),
        ] {
            let e = s.demand(&drv.into(), step("x86_64-linux", &[]), u);
            then(&mut s, e);
        }
        s.worker_joined(&"w".into(), worker("x86_64-linux", 1));
        s.offer(&"w".into(), 1);
        let mut order = Vec::new();
        let mut e = then(&mut s, Vec::new());
        while let Some((drv, _)) = assigns(&e).first().map(|(d, w)| (d.to_string(), *w)) {
            order.push(drv.clone());
            let built = s.built(&drv.as_str().into(), &"w".into(), vec![]);
            e = then(&mut s, built);
        }
        assert_eq!(order, vec!["urgent", "deep", "old", "young"]);
    }

    #[test]
    fn a_worker_offering_no_slots_is_given_nothing() {
        let mut s = with_workers(&[("draining", 2)]);
        s.offer(&"draining".into(), 0);
        let e = s.demand(&"a".into(), step("x86_64-linux", &[]), Urgency::default());
        let e = then(&mut s, e);
        assert!(assigns(&e).is_empty());
        assert_eq!(s.state(&"a".into()), Some(&StepState::Ready));
    }

    #[test]
    fn the_worker_holding_the_inputs_gets_the_dependent() {
        let mut s = with_workers(&[("w1", 1), ("w2", 1)]);
        let e = s.demand(&"a".into(), step("x86_64-linux", &[]), urgency(0, 2));
        let e = then(&mut s, e);
        let holder = assigns(&e)[0].1.to_owned();
        let e = s.demand(&"b".into(), step("x86_64-linux", &["a"]), urgency(0, 1));
        then(&mut s, e);
        let e = s.built(&"a".into(), &holder.as_str().into(), vec!["/out/a".into()]);
        let e = then(&mut s, e);
        assert_eq!(assigns(&e), vec![("b", holder.as_str())]);
    }

    #[test]
    fn the_fastest_worker_goes_first_then_the_one_with_the_most_room() {
        let mut s = Schedule::default();
        for (id, speed, slots) in [
            ("slow-big", 1.0, 3),
            ("fast", 2.0, 1),
            ("slow-small", 1.0, 1),
        ] {
            let offer = WorkerOffer {
                speed,
                ..worker("x86_64-linux", slots)
            };
            s.worker_joined(&id.into(), offer);
            s.offer(&id.into(), slots.into());
        }
        let mut given = Vec::new();
        for (drv, depth) in [("a", 9), ("b", 8), ("c", 7), ("d", 6), ("e", 5)] {
            let e = s.demand(&drv.into(), step("x86_64-linux", &[]), urgency(0, depth));
            let e = then(&mut s, e);
            given.extend(assigns(&e).into_iter().map(|(d, w)| format!("{d}:{w}")));
        }
        // slow-big keeps the most room until it is down to one slot, then goes by name.
        assert_eq!(
            given,
            [
                "a:fast",
                "b:slow-big",
                "c:slow-big",
                "d:slow-big",
                "e:slow-small"
            ]
        );
        // A fast worker freed takes the next step before any slower one with room.
        let e = s.built(&"a".into(), &"fast".into(), vec!["/out/a".into()]);
        then(&mut s, e);
        let e = s.built(&"c".into(), &"slow-big".into(), vec!["/out/c".into()]);
        then(&mut s, e);
        let e = s.demand(&"f".into(), step("x86_64-linux", &["c"]), urgency(0, 1));
        let e = then(&mut s, e);
        assert_eq!(assigns(&e), vec![("f", "fast")]);
    }

    #[test]
    fn a_step_no_worker_with_room_can_build_does_not_hold_up_the_others() {
        let mut s = with_workers(&[("x86", 1)]);
        let e = s.demand(&"arm".into(), step("aarch64-linux", &[]), urgency(9, 9));
        then(&mut s, e);
        let e = s.demand(&"x".into(), step("x86_64-linux", &[]), Urgency::default());
        let e = then(&mut s, e);
        assert_eq!(assigns(&e), vec![("x", "x86")]);
        assert_eq!(s.state(&"arm".into()), Some(&StepState::Ready));
    }

    #[test]
    fn a_worker_leaving_before_it_claimed_its_step_loses_it() {
        let mut s = with_workers(&[("w", 1)]);
        let e = s.demand(&"a".into(), step("x86_64-linux", &[]), Urgency::default());
        then(&mut s, e);
        let e = s.worker_left(&"w".into());
        let e = then(&mut s, e);
        assert!(
            e.iter()
                .any(|e| matches!(e, Effect::RetryAfter { drv: d, .. } if d == "a")),
            "{e:?}"
        );
        assert_eq!(s.state(&"a".into()), Some(&StepState::Retrying));
        // Its claim going away afterwards changes nothing.
        let e = s.unclaim(&"a".into(), &"w".into());
        assert!(then(&mut s, e).is_empty());
    }

    /// Workers `honest` and `liar`, the liar ten times faster, one slot each.
    fn with_a_faster_liar() -> Schedule {
        let mut s = with_workers(&[("honest", 1)]);
        s.worker_joined(
            &"liar".into(),
            WorkerOffer {
                speed: 10.0,
                ..worker("x86_64-linux", 1)
            },
        );
        s.offer(&"liar".into(), 1);
        s
    }

    #[test]
    fn a_worker_whose_result_was_rejected_is_not_given_the_step_again() {
        // The liar is the faster worker: it gets the step first.
        let mut s = with_a_faster_liar();
        let e = s.demand(&"a".into(), step("x86_64-linux", &[]), urgency(0, 0));
        assert_eq!(assigns(&then(&mut s, e)), vec![("a", "liar")]);
        // A report from a worker not building the step is not a rejection.
        assert!(s.rejected(&"a".into(), &"honest".into(), "no").is_empty());
        let e = s.rejected(&"a".into(), &"liar".into(), "wrong outputs");
        assert!(
            e.iter().any(
                |e| matches!(e, Effect::RetryAfter { reason, .. } if reason == "wrong outputs")
            ),
            "{e:?}"
        );
        then(&mut s, e);
        let e = s.retry(&"a".into());
        assert_eq!(assigns(&then(&mut s, e)), vec![("a", "honest")]);
        // Nor does its claim get it.
        assert!(s.claim(&"a".into(), &"liar".into()).is_empty());
        // Positive control: without the rejection, the faster worker would have got it again.
        let mut control = with_a_faster_liar();
        let e = control.demand(&"a".into(), step("x86_64-linux", &[]), urgency(0, 0));
        then(&mut control, e);
        let e = control.failed(
            &"a".into(),
            Some(&"liar".into()),
            "lost",
            FailureKind::Transient,
            FailureCause::Infrastructure,
        );
        then(&mut control, e);
        let e = control.retry(&"a".into());
        assert_eq!(assigns(&then(&mut control, e)), vec![("a", "liar")]);
    }

    const MIB: u64 = 1 << 20;

    /// `s` with workers `(id, slots, MiB offered)` for x86_64-linux, each offering all its
    /// slots.
    fn with_memory(workers: &[(&str, u32, u64)]) -> Schedule {
        let mut s = Schedule::default();
        for (id, slots, mib) in workers {
            let offer = WorkerOffer {
                resources: super::super::Resources {
                    memory: mib * MIB,
                    build_memory: 0,
                    cpus: 2,
                },
                ..worker("x86_64-linux", *slots)
            };
            s.worker_joined(&(*id).into(), offer);
            s.offer(&(*id).into(), (*slots).into());
        }
        s
    }

    /// Demand `drvs`, each predicted to need `mib` MiB, and dispatch.
    fn demand_hungry(s: &mut Schedule, drvs: &[&str], mib: Option<u64>) -> Vec<Effect> {
        let mut effects = Vec::new();
        for drv in drvs {
            let info = StepInfo {
                memory: mib.map(|m| m * MIB),
                ..step("x86_64-linux", &[])
            };
            effects.extend(s.demand(&(*drv).into(), info, Urgency::default()));
        }
        then(s, effects)
    }

    #[test]
    fn a_worker_is_given_no_more_predicted_memory_than_it_offers() {
        let mut s = with_memory(&[("w", 2, 1024)]);
        let e = demand_hungry(&mut s, &["a", "b"], Some(600));
        assert_eq!(assigns(&e), vec![("a", "w")], "one at a time: {e:?}");
        assert_eq!(s.state(&"b".into()), Some(&StepState::Ready));
        let e = s.built(&"a".into(), &"w".into(), vec![]);
        assert_eq!(assigns(&then(&mut s, e)), vec![("b", "w")]);
        // Positive controls: offering enough for both, or steps with no prediction, both go.
        let mut s = with_memory(&[("w", 2, 2048)]);
        let e = demand_hungry(&mut s, &["a", "b"], Some(600));
        assert_eq!(assigns(&e).len(), 2, "{e:?}");
        let mut s = with_memory(&[("w", 2, 1024)]);
        let e = demand_hungry(&mut s, &["a", "b"], None);
        assert_eq!(assigns(&e).len(), 2, "{e:?}");
    }

    #[test]
    fn a_step_goes_to_a_worker_its_prediction_fits() {
        let mut s = with_memory(&[("small", 2, 512), ("big", 2, 4096)]);
        // Equal but for their memory: the step goes where it fits.
        let e = demand_hungry(&mut s, &["a"], Some(1024));
        assert_eq!(assigns(&e), vec![("a", "big")]);
    }

    #[test]
    fn a_step_bigger_than_every_worker_runs_alone_on_the_biggest() {
        let mut s = with_memory(&[("small", 2, 512), ("big", 2, 1024)]);
        let e = demand_hungry(&mut s, &["first"], Some(600));
        assert_eq!(assigns(&e), vec![("first", "big")]);
        // Bigger than any worker: never on the small one, and the big one is kept for it (a
        // later step goes to the small one) until it is idle.
        let e = demand_hungry(&mut s, &["huge"], Some(8192));
        assert!(assigns(&e).is_empty(), "{e:?}");
        let e = demand_hungry(&mut s, &["later"], Some(100));
        assert_eq!(assigns(&e), vec![("later", "small")]);
        let e = s.built(&"first".into(), &"big".into(), vec![]);
        assert_eq!(assigns(&then(&mut s, e)), vec![("huge", "big")]);
        // Alone: nothing else goes to the big worker while the huge step runs there.
        let e = demand_hungry(&mut s, &["tiny"], Some(1));
        assert_eq!(assigns(&e), vec![("tiny", "small")]);
        let e = demand_hungry(&mut s, &["more"], Some(1));
        assert!(assigns(&e).is_empty(), "the small worker is full: {e:?}");
    }

    /// Fail `drv` on `worker` as killed for going over `mib` MiB, and dispatch.
    fn killed(s: &mut Schedule, drv: &str, worker: &str, mib: u64) -> Vec<Effect> {
        let e = s.failed(
            &drv.into(),
            Some(&worker.into()),
            &format!("killed for going over the memory limit of {mib} MiB per build"),
            FailureKind::Transient,
            FailureCause::OutOfMemory { limit: mib * MIB },
        );
        then(s, e)
    }

    fn failures(effects: &[Effect]) -> Vec<(&str, &str, &FailureCause)> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Failed {
                    drv, reason, cause, ..
                } => Some((drv.as_str(), reason.as_str(), cause)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_build_killed_for_memory_is_tried_once_more_on_a_worker_that_allows_more() {
        let mut s = with_memory(&[("small", 2, 64)]);
        let e = demand_hungry(&mut s, &["a"], None);
        assert_eq!(assigns(&e), vec![("a", "small")]);
        for (id, mib) in [("other-small", 64), ("big", 1024)] {
            let offer = WorkerOffer {
                resources: super::super::Resources {
                    memory: mib * MIB,
                    build_memory: 0,
                    cpus: 2,
                },
                ..worker("x86_64-linux", 2)
            };
            s.worker_joined(&id.into(), offer);
            s.offer(&id.into(), 2);
        }
        let e = killed(&mut s, "a", "small", 64);
        assert!(
            e.iter().any(|e| matches!(
                e,
                Effect::RetryAfter {
                    cause: FailureCause::OutOfMemory { .. },
                    ..
                }
            )),
            "{e:?}"
        );
        let e = s.retry(&"a".into());
        // Not the same worker, nor one that allows no more.
        assert_eq!(assigns(&then(&mut s, e)), vec![("a", "big")]);
        // Killed again: it fails for good, saying so.
        let e = killed(&mut s, "a", "big", 1024);
        let failed = failures(&e);
        assert_eq!(failed.len(), 1, "{e:?}");
        assert!(failed[0].1.contains("killed again"), "{}", failed[0].1);
        assert_eq!(
            failed[0].2,
            &FailureCause::OutOfMemory { limit: 1024 * MIB }
        );
    }

    #[test]
    fn a_build_killed_for_memory_with_no_bigger_worker_fails_with_the_reason() {
        let mut s = with_memory(&[("small", 2, 64), ("same", 2, 64)]);
        let e = demand_hungry(&mut s, &["a"], None);
        let holder = assigns(&e)[0].1.to_owned();
        let e = killed(&mut s, "a", &holder, 64);
        let failed = failures(&e);
        assert_eq!(failed.len(), 1, "{e:?}");
        assert!(
            failed[0]
                .1
                .contains("killed for going over the memory limit of 64 MiB")
                && failed[0]
                    .1
                    .contains("no connected worker allows one build more than 64 MiB"),
            "{}",
            failed[0].1
        );
    }
}
