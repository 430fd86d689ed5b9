//! Each frontend's estimated time to completion and its steps waiting for a worker: the
//! planner keeps which steps each requester demands and, on its tick, asserts
//! `<eta requester millis>` and `<queued requester steps>` for each (from
//! [`Schedule::progress`]) and sets the `nixspace_eta_seconds{requester}` gauge.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use nixspace_protocol::{build, DrvPath};
use syndicate::actor::{Activation, Cap, Handle};

use crate::metrics::Metrics;
use crate::schedule::Schedule;
use crate::service::republish;

/// The most frontends an estimate is published for (requester names come from frontends: a
/// flood of names must not grow the planner's assertions and metrics without bound).
const MAX_FRONTENDS: usize = 256;

/// The steps each frontend demands, and what the planner asserted about them.
#[derive(Debug, Default)]
pub(crate) struct Frontends {
    /// Demands per step, by requester.
    demands: BTreeMap<String, BTreeMap<DrvPath, u32>>,
    /// The `eta` record asserted for each requester, with its value.
    published: HashMap<String, (u64, Handle)>,
    /// The `queued` record asserted for each requester, with its value.
    queued: HashMap<String, (u64, Handle)>,
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
            for published in [&mut self.published, &mut self.queued] {
                if let Some((_, handle)) = published.remove(&requester) {
                    t.retract(handle);
                }
            }
            metrics.forget_eta(&requester);
        }
        for (requester, steps) in self.demands.iter().take(MAX_FRONTENDS) {
            let progress = schedule.progress(steps.keys(), now);
            let millis = progress.eta_ms;
            let record = build::Eta {
                requester: requester.clone(),
                millis: millis.into(),
            };
            if republish(t, ds, &mut self.published, requester, millis, &record) {
                metrics.set_eta(requester, millis);
            }
            let queued = progress.queued as u64;
            let record = build::Queued {
                requester: requester.clone(),
                steps: queued.into(),
            };
            republish(t, ds, &mut self.queued, requester, queued, &record);
        }
    }
}
