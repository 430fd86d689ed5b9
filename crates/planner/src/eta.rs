//! Each frontend's estimated time to completion: the planner keeps which steps each requester
//! demands and, on its tick, asserts `<eta requester millis>` for each (from
//! [`Schedule::eta_ms`]) and sets the `nixspace_eta_seconds{requester}` gauge.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use nixspace_protocol::{build, DrvPath};
use syndicate::actor::{Activation, Cap, Handle};

use crate::metrics::Metrics;
use crate::schedule::Schedule;

/// The most frontends an estimate is published for (requester names come from frontends: a
/// flood of names must not grow the planner's assertions and metrics without bound).
const MAX_FRONTENDS: usize = 256;

/// The steps each frontend demands, and what the planner asserted about them.
#[derive(Debug, Default)]
pub(crate) struct Frontends {
    /// Demands per step, by requester.
    demands: BTreeMap<String, BTreeMap<DrvPath, usize>>,
    /// The `eta` record asserted for each requester, with its value.
    published: HashMap<String, (u64, Handle)>,
}

impl Frontends {
    /// `requester` demands `drv`.
    pub(crate) fn demanded(&mut self, requester: String, drv: &DrvPath) {
        *self
            .demands
            .entry(requester)
            .or_default()
            .entry(drv.clone())
            .or_default() += 1;
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

    /// Assert each frontend's estimate as of `now` (where it changed) and withdraw those of
    /// frontends gone; the gauge follows.
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
            if let Some((_, handle)) = self.published.remove(&requester) {
                t.retract(handle);
            }
            metrics.forget_eta(&requester);
        }
        for (requester, steps) in self.demands.iter().take(MAX_FRONTENDS) {
            let millis = schedule.eta_ms(steps.keys(), now);
            if self
                .published
                .get(requester)
                .is_some_and(|(m, _)| *m == millis)
            {
                continue;
            }
            metrics.set_eta(requester, millis);
            let record = build::Eta {
                requester: requester.clone(),
                millis: millis.into(),
            };
            let Some(handle) = ds.assert(t, &record) else {
                continue;
            };
            if let Some((_, old)) = self.published.insert(requester.clone(), (millis, handle)) {
                t.retract(old);
            }
        }
    }
}
