//! Which demands the planner takes: with a cap ([`PlannerConfig::max_demands_per_requester`](
//! crate::PlannerConfig::max_demands_per_requester), set by `nixspace up --external
//! --max-demands-per-client`), at most that many live demands per requester name.
//!
//! On a standalone syndicate-server the connections are not ours, so the embedded host's
//! per-connection limiter does not exist there; this is the planner's own cap. A demand over
//! it is neither scheduled nor kept (only its handle and requester are, to count it), and
//! while a requester has such a demand live the planner asserts `<demands-refused requester
//! reason>`, which the frontend of that name turns into an error. A client using many
//! requester names is not caught here.
//!
//! Demands come one to a `<demand …>` record or many to a `<demands …>` record; the cap counts
//! demands, and a record's retraction withdraws each of its demands.
//!
//! A demand whose derivation text is not its step's is taken only while a trusted frontend
//! vouches for exactly that text with `<inline-derivation drv text>` (a record only the
//! trusted role may assert): a derivation a trusted Nix client sent inline, built as it is
//! (the worker gets the text with its assignment). Until a vouch arrives such a demand waits
//! here, untaken.

use std::collections::HashMap;
use std::sync::Arc;

use nixspace_protocol::{build, DrvPath};
use preserves_schema::Parse;
use syndicate::actor::{Activation, ActorResult, AnyValue, Cap, Entity, Handle, Ref};
use syndicate::dataspace_patterns::AsDataspacePattern;
use syndicate::schemas::dataspace::Observe;
use syndicate::schemas::dataspace_patterns as dp;

use crate::resolution::{ToResolve, MAX_DERIVATION_TEXT};
use crate::schedule::{StepDerivation, StepInfo, Urgency};
use crate::service::{Event, Message};
use crate::wire::step_from_wire;

/// Whether a demand was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Within the requester's cap: scheduled.
    Taken,
    /// Over it: ignored. `first` when the requester had no other refused demand live.
    Refused {
        /// The requester's first live refused demand.
        first: bool,
    },
}

/// Live demands per requester.
#[derive(Debug, Default)]
struct Live {
    taken: usize,
    refused: usize,
}

/// Counts live demands per requester against a cap.
#[derive(Debug)]
pub struct RequesterCap {
    max: usize,
    live: HashMap<String, Live>,
}

impl RequesterCap {
    /// A cap of `max` live demands per requester.
    pub fn new(max: usize) -> RequesterCap {
        RequesterCap {
            max,
            live: HashMap::new(),
        }
    }

    /// A demand of `requester` appeared.
    pub fn admit(&mut self, requester: &str) -> Admission {
        let live = self.live.entry(requester.to_owned()).or_default();
        if live.taken < self.max {
            live.taken += 1;
            Admission::Taken
        } else {
            live.refused += 1;
            Admission::Refused {
                first: live.refused == 1,
            }
        }
    }

    /// A demand of `requester` admitted as `admission` went. Whether that was the
    /// requester's last refused demand (it is no longer over the cap).
    pub fn withdraw(&mut self, requester: &str, admission: Admission) -> bool {
        let Some(live) = self.live.get_mut(requester) else {
            return false;
        };
        let cleared = match admission {
            Admission::Taken => {
                live.taken = live.taken.saturating_sub(1);
                false
            }
            Admission::Refused { .. } => {
                live.refused = live.refused.saturating_sub(1);
                live.refused == 0
            }
        };
        if live.taken == 0 && live.refused == 0 {
            self.live.remove(requester);
        }
        cleared
    }

    /// How many requesters have live demands.
    pub fn requesters(&self) -> usize {
        self.live.len()
    }
}

/// A live demand record as the gate saw it: the record (the value the dataspace keeps, shared;
/// its demands are read again when it goes) and, by position, what became of each of its
/// demands (`None`: ignored, or waiting for a vouch).
struct Seen {
    record: AnyValue,
    admissions: Vec<Option<Admission>>,
}

/// Observes `<demand …>` and `<demands …>` assertions and passes the demands within the cap
/// on to the planner.
pub struct DemandGate {
    ds: Arc<Cap>,
    planner: Arc<Ref<Message>>,
    cap: RequesterCap,
    /// Each live demand record.
    seen: HashMap<Handle, Seen>,
    /// The refusal asserted for each requester over the cap.
    refusals: HashMap<String, Handle>,
    /// The inline derivations trusted frontends vouch for: step → (vouch, text).
    vouched: HashMap<String, Vec<(Handle, Vec<u8>)>>,
    /// Demands whose text is not their step's and that no vouch covers (yet), by record, with
    /// their positions in it.
    unvouched: HashMap<Handle, Vec<(usize, build::Demand)>>,
    /// The platform of the last demand taken: the steps of a run of demands of one platform
    /// share this copy of its name.
    last_system: Arc<str>,
}

impl DemandGate {
    /// Observe the demands in `ds` for `planner`, taking at most `max` per requester
    /// (`usize::MAX`: all).
    pub fn observe(t: &mut Activation, ds: &Arc<Cap>, planner: Arc<Ref<Message>>, max: usize) {
        let gate = DemandGate {
            ds: Arc::clone(ds),
            planner,
            cap: RequesterCap::new(max),
            seen: HashMap::new(),
            refusals: HashMap::new(),
            vouched: HashMap::new(),
            unvouched: HashMap::new(),
            last_system: Arc::from(""),
        };
        let observer = t.create_cap(gate);
        for pattern in [
            build::Demand::wildcard_dataspace_pattern(),
            build::Demands::wildcard_dataspace_pattern(),
            build::InlineDerivation::wildcard_dataspace_pattern(),
        ] {
            ds.assert(
                t,
                &Observe {
                    pattern: dp::Pattern::Bind {
                        pattern: Box::new(pattern),
                    },
                    observer: Arc::clone(&observer),
                },
            );
        }
    }

    /// Whether a trusted frontend vouches for `text` as step `drv`'s inline derivation.
    fn vouches(&self, drv: &str, text: &[u8]) -> bool {
        self.vouched
            .get(drv)
            .is_some_and(|texts| texts.iter().any(|(_, t)| t == text))
    }

    /// A trusted frontend vouched for an inline derivation: the demands waiting for it are
    /// taken.
    fn vouch(&mut self, t: &mut Activation, vouch: build::InlineDerivation, h: Handle) {
        let covered = |(_, d): &(usize, build::Demand)| {
            d.drv == vouch.drv && d.derivation == vouch.derivation
        };
        let mut waiting = Vec::new();
        self.unvouched.retain(|handle, demands| {
            let (now, still): (Vec<_>, Vec<_>) = demands.drain(..).partition(covered);
            waiting.extend(now.into_iter().map(|(at, d)| (*handle, at, d)));
            *demands = still;
            !demands.is_empty()
        });
        self.vouched
            .entry(vouch.drv)
            .or_default()
            .push((h, vouch.derivation));
        for (handle, at, demand) in waiting {
            self.take(t, demand, handle, at);
        }
    }

    /// A vouch went: later demands of its text wait again (taken ones stay).
    fn unvouch(&mut self, h: Handle) -> bool {
        let Some(drv) = self
            .vouched
            .iter()
            .find(|(_, texts)| texts.iter().any(|(v, _)| *v == h))
            .map(|(drv, _)| drv.clone())
        else {
            return false;
        };
        if let Some(texts) = self.vouched.get_mut(&drv) {
            texts.retain(|(v, _)| *v != h);
            if texts.is_empty() {
                self.vouched.remove(&drv);
            }
        }
        true
    }

    /// Take `demand` (at position `at` of record `h`) if it is wanted and within its
    /// requester's cap.
    fn take(&mut self, t: &mut Activation, demand: build::Demand, h: Handle, at: usize) {
        let inline = self.vouches(&demand.drv, &demand.derivation);
        if *self.last_system != *demand.step.system {
            self.last_system = Arc::from(demand.step.system.as_str());
        }
        let system = Arc::clone(&self.last_system);
        let (step, urgency) = match wanted(&demand, system, inline) {
            Ok(wanted) => wanted,
            Err(why) => {
                tracing::warn!(drv = %demand.drv, requester = %demand.requester, %why, "ignoring a demand");
                if !demand.derivation.is_empty() {
                    self.unvouched.entry(h).or_default().push((at, demand));
                }
                return;
            }
        };
        let admission = self.cap.admit(&demand.requester);
        match admission {
            Admission::Taken => t.message(
                &self.planner,
                Event::Demand {
                    drv: demand.drv.into(),
                    info: step,
                    urgency,
                    requester: demand.requester,
                }
                .into(),
            ),
            Admission::Refused { first: true } => self.refuse(t, &demand.requester),
            Admission::Refused { first: false } => {}
        }
        if let Some(place) = self
            .seen
            .get_mut(&h)
            .and_then(|seen| seen.admissions.get_mut(at))
        {
            *place = Some(admission);
        }
    }

    /// Tell `requester` (once while it is over the cap) that demands were refused.
    fn refuse(&mut self, t: &mut Activation, requester: &str) {
        let max = self.cap.max;
        tracing::warn!(%requester, max, "refused demands over the per-requester cap");
        let refusal = build::DemandsRefused {
            requester: requester.to_owned(),
            reason: format!(
                "too many demands from requester {requester:?}: the planner takes at most \
                 {max} at once per requester (nixspace up --external --max-demands-per-client); \
                 the rest were refused"
            ),
        };
        if let Some(h) = self.ds.assert(t, &refusal) {
            self.refusals.insert(requester.to_owned(), h);
        }
    }
}

/// The step (of platform `system`, the demand's) and urgency of a demand, if its numbers are in
/// range and the derivation it carries (if any) is the step's, or an inline derivation a
/// trusted frontend vouches for (`vouched`: built as it is, with no input steps).
fn wanted(
    demand: &build::Demand,
    system: Arc<str>,
    vouched: bool,
) -> Result<(StepInfo, Urgency), String> {
    let out_of_range = || "an out-of-range priority or depth".to_owned();
    let urgency = Urgency {
        priority: i64::try_from(&demand.priority).map_err(|_| out_of_range())?,
        depth: u64::try_from(&demand.depth).map_err(|_| out_of_range())?,
    };
    let derivation = if demand.derivation.is_empty() {
        StepDerivation::InStores
    } else {
        let drv = DrvPath::from(demand.drv.as_str());
        match ToResolve::check(&drv, &demand.derivation) {
            Ok(checked) => StepDerivation::ToResolve(Arc::new(checked)),
            Err(_)
                if vouched
                    && demand.step.input_drvs.is_empty()
                    && demand.derivation.len() <= MAX_DERIVATION_TEXT =>
            {
                StepDerivation::Resolved(Arc::new(demand.derivation.clone()))
            }
            Err(e) => {
                return Err(format!(
                    "{e}, and no trusted frontend vouches for it as an inline derivation"
                ))
            }
        }
    };
    Ok((
        step_from_wire(demand.step.clone(), system, derivation),
        urgency,
    ))
}

impl Entity<Vec<AnyValue>> for DemandGate {
    fn assert(&mut self, t: &mut Activation, captures: Vec<AnyValue>, h: Handle) -> ActorResult {
        let Some(value) = captures.first() else {
            return Ok(());
        };
        if let Ok(vouch) = build::InlineDerivation::parse(value) {
            self.vouch(t, vouch, h);
            return Ok(());
        }
        let Some(demands) = demands_of(value) else {
            tracing::warn!("ignoring a malformed demand record");
            return Ok(());
        };
        let seen = Seen {
            record: value.clone(),
            admissions: vec![None; demands.len()],
        };
        self.seen.insert(h, seen);
        for (at, demand) in demands.into_iter().enumerate() {
            self.take(t, demand, h, at);
        }
        Ok(())
    }

    fn retract(&mut self, t: &mut Activation, h: Handle) -> ActorResult {
        self.unvouched.remove(&h);
        let Some(seen) = self.seen.remove(&h) else {
            self.unvouch(h);
            return Ok(());
        };
        let demands = demands_of(&seen.record).unwrap_or_default();
        for (demand, admission) in demands.into_iter().zip(seen.admissions) {
            let Some(admission) = admission else {
                continue;
            };
            if admission == Admission::Taken {
                t.message(
                    &self.planner,
                    Event::Undemand {
                        drv: demand.drv.into(),
                        requester: demand.requester.clone(),
                    }
                    .into(),
                );
            }
            if self.cap.withdraw(&demand.requester, admission) {
                if let Some(refusal) = self.refusals.remove(&demand.requester) {
                    t.retract(refusal);
                }
            }
        }
        Ok(())
    }
}

/// The demands of a `<demand …>` or `<demands [..]>` record, in order; `None` if it is
/// neither.
fn demands_of(record: &AnyValue) -> Option<Vec<build::Demand>> {
    if let Ok(demand) = build::Demand::parse(record) {
        Some(vec![demand])
    } else {
        build::Demands::parse(record).ok().map(|r| r.demands)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_requester_gets_its_own_cap() {
        let mut cap = RequesterCap::new(2);
        assert_eq!(cap.admit("a"), Admission::Taken);
        assert_eq!(cap.admit("a"), Admission::Taken);
        assert_eq!(cap.admit("a"), Admission::Refused { first: true });
        assert_eq!(cap.admit("a"), Admission::Refused { first: false });
        assert_eq!(cap.admit("b"), Admission::Taken);
        assert_eq!(cap.requesters(), 2);
    }

    #[test]
    fn a_requester_stays_refused_while_a_refused_demand_lives() {
        let mut cap = RequesterCap::new(1);
        let taken = cap.admit("a");
        let refused = [cap.admit("a"), cap.admit("a")];
        // A taken demand going frees a place, but the refused ones stay refused.
        assert!(!cap.withdraw("a", taken));
        assert_eq!(cap.admit("a"), Admission::Taken);
        assert!(!cap.withdraw("a", refused[0]));
        assert!(cap.withdraw("a", refused[1]));
        // The last taken demand going forgets the requester.
        assert!(!cap.withdraw("a", Admission::Taken));
        assert_eq!(cap.requesters(), 0);
        assert!(!cap.withdraw("unknown", Admission::Taken));
    }
}
