//! Each frontend's estimated time to completion and its steps waiting for a worker: the
//! planner keeps which steps each requester demands and, on its tick, asserts
//! `<eta requester millis>` and `<queued requester steps>` for each (from
//! [`Schedule::count`]) and sets the `nixspace_eta_seconds{requester}` gauge.
//!
//! A tick counts at most [`STEPS_PER_TICK`] steps, going on where the last one stopped: a
//! frontend of 100,000 steps took the planner's turn for 40 ms a second, every worker's
//! report waiting behind it. A frontend's figures change once all its steps are counted,
//! every tick for most, every ten seconds for one of 100,000 steps.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use nixspace_protocol::{build, DrvPath};
use syndicate::actor::{Activation, Cap, Handle};

use crate::metrics::Metrics;
use crate::schedule::{Progress, Schedule, Tally};
use crate::service::republish;

/// The most frontends an estimate is published for (requester names come from frontends: a
/// flood of names must not grow the planner's assertions and metrics without bound).
const MAX_FRONTENDS: usize = 256;

/// The most steps one tick counts (about 4 ms of the planner's turn at 100,000 steps).
const STEPS_PER_TICK: usize = 10_000;

/// The steps each frontend demands, and what the planner asserted about them.
#[derive(Debug, Default)]
pub(crate) struct Frontends {
    /// Demands per step, by requester.
    demands: BTreeMap<String, BTreeMap<DrvPath, u32>>,
    /// The `eta` record asserted for each requester, with its value.
    published: HashMap<String, (u64, Handle)>,
    /// The `queued` record asserted for each requester, with its value.
    queued: HashMap<String, (u64, Handle)>,
    /// Where the count that the last tick left unfinished goes on.
    resume: Option<Resume>,
}

/// A count of one frontend's steps left unfinished by a tick.
#[derive(Debug)]
struct Resume {
    requester: String,
    /// The first step not counted yet.
    from: DrvPath,
    tally: Tally,
}

impl Frontends {
    /// `requester` demands `drv`.
    pub(crate) fn demanded(&mut self, requester: String, drv: &DrvPath) {
        let n = self
            .demands
            .entry(requester)
            .or_default()
            .entry(drv.clone())
            .or_default();
        *n = n.saturating_add(1);
    }

    /// `requester` withdrew a demand of `drv`.
    pub(crate) fn undemanded(&mut self, requester: &str, drv: &DrvPath) {
        let Some(steps) = self.demands.get_mut(requester) else {
            return;
        };
        if let Some(n) = steps.get_mut(drv) {
            *n -= 1;
            if *n == 0 {
                steps.remove(drv);
            }
        }
        if steps.is_empty() {
            self.demands.remove(requester);
        }
    }

    /// Assert the estimate of each frontend whose steps were all counted by this tick (where
    /// it changed) and withdraw those of frontends gone; the gauge follows.
    pub(crate) fn publish(
        &mut self,
        t: &mut Activation,
        ds: &Arc<Cap>,
        schedule: &Schedule,
        metrics: &Metrics,
        now: Instant,
    ) {
        let gone: Vec<String> = self
            .published
            .keys()
            .filter(|r| !self.demands.contains_key(*r))
            .cloned()
            .collect();
        for requester in gone {
            for published in [&mut self.published, &mut self.queued] {
                if let Some((_, handle)) = published.remove(&requester) {
                    t.retract(handle);
                }
            }
            metrics.forget_eta(&requester);
        }
        for (requester, progress) in self.count(schedule, now, STEPS_PER_TICK) {
            let millis = progress.eta_ms;
            let record = build::Eta {
                requester: requester.clone(),
                millis: millis.into(),
            };
            if republish(t, ds, &mut self.published, &requester, millis, &record) {
                metrics.set_eta(&requester, millis);
            }
            let queued = progress.queued as u64;
            let record = build::Queued {
                requester: requester.clone(),
                steps: queued.into(),
            };
            republish(t, ds, &mut self.queued, &requester, queued, &record);
        }
    }

    /// Count at most `budget` steps of the first [`MAX_FRONTENDS`] frontends, going on where
    /// the last call stopped: the progress of each frontend whose steps were all counted.
    fn count(
        &mut self,
        schedule: &Schedule,
        now: Instant,
        mut budget: usize,
    ) -> Vec<(String, Progress)> {
        let mut counted = Vec::new();
        let resume = self.resume.take();
        let frontends = self
            .demands
            .iter()
            .take(MAX_FRONTENDS)
            .skip_while(|(requester, _)| {
                resume.as_ref().is_some_and(|r| **requester < r.requester)
            });
        for (requester, steps) in frontends {
            let (mut tally, left) = match resume.as_ref().filter(|r| r.requester == *requester) {
                Some(r) => (r.tally, steps.range::<DrvPath, _>(&r.from..)),
                None => (Tally::default(), steps.range::<DrvPath, _>(..)),
            };
            for (drv, _) in left {
                if budget == 0 {
                    self.resume = Some(Resume {
                        requester: requester.clone(),
                        from: drv.clone(),
                        tally,
                    });
                    return counted;
                }
                schedule.count(drv, now, &mut tally);
                budget -= 1;
            }
            counted.push((requester.clone(), schedule.progress_of(tally)));
        }
        counted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::tests::info;
    use crate::schedule::Urgency;

    /// A schedule of independent steps, and the frontends that demand them: each requester
    /// with its number of steps.
    fn demanded(frontends: &[(&str, usize)]) -> (Schedule, Frontends) {
        let (mut s, mut f) = (Schedule::default(), Frontends::default());
        for &(requester, n) in frontends {
            for i in 0..n {
                let drv: DrvPath = format!("{requester}-{i:04}").as_str().into();
                s.demand(&drv, info(&[]), Urgency::default());
                f.demanded(requester.to_owned(), &drv);
            }
        }
        (s, f)
    }

    #[test]
    fn a_frontend_larger_than_a_tick_is_counted_over_several_and_comes_out_whole() {
        let (s, mut f) = demanded(&[("big", 25), ("small", 3)]);
        let now = Instant::now();
        let whole = |f: &Frontends, s: &Schedule, who: &str| s.progress(f.demands[who].keys(), now);
        let (big, small) = (whole(&f, &s, "big"), whole(&f, &s, "small"));
        assert_eq!(
            big.queued, 25,
            "every step waits: the count is of something"
        );
        // Ten steps a tick: the big frontend takes three ticks, the small one follows in the
        // third; then the count starts over.
        assert!(f.count(&s, now, 10).is_empty());
        assert!(f.count(&s, now, 10).is_empty());
        assert_eq!(
            f.count(&s, now, 10),
            [("big".to_owned(), big), ("small".to_owned(), small)]
        );
        assert!(f.resume.is_none());
        assert_eq!(
            f.count(&s, now, 100).len(),
            2,
            "a budget for all: every tick"
        );
    }

    #[test]
    fn a_count_whose_frontend_left_goes_on_with_the_next() {
        let (s, mut f) = demanded(&[("a", 5), ("b", 2)]);
        let now = Instant::now();
        assert!(f.count(&s, now, 3).is_empty(), "stopped inside a");
        for i in 0..5 {
            f.undemanded("a", &format!("a-{i:04}").as_str().into());
        }
        let b = s.progress(f.demands["b"].keys(), now);
        assert_eq!(f.count(&s, now, 3), [("b".to_owned(), b)]);
    }
}
