//! Per-connection limits: what one client may send, hold in the dataspace and make the host
//! buffer, before and after it resolved a capability.
//!
//! Before a capability is resolved a connection may send packets of at most
//! [`Limits::max_unauthenticated_packet_bytes`] (a capability request is well under 1 KiB) and
//! must resolve one within [`Limits::resolve_timeout`]; after, packets of at most
//! [`Limits::max_packet_bytes`]. Either way the host queues at most
//! [`Limits::max_queued_bytes`] for a peer that does not read what it is sent (see
//! [`crate::connection`] and [`crate::framing`]).
//!
//! The [`Doorman`](crate::doorman::Doorman) hands every client that resolved a capability a
//! [`Limiter`] in front of the role's dataspace instead of the dataspace itself. The limiter
//! forwards everything, counting the demands in the client's live `<demand …>` and
//! `<demands …>` assertions. A record that would take the count past
//! [`Limits::max_demands`] it drops whole, and it asserts, once and for as long as the
//! connection lasts, `<demands-refused requester reason>` (which the frontend turns into a
//! clear error). Dropped demands never reach the dataspace's index or the planner.
//!
//! It also counts the bytes of `<log drv worker line>` and `<build-activity drv worker event>`
//! messages per step ([`LogBudget`]): past [`Limits::max_log_bytes_per_step`] it passes one
//! notice on (as a `log` line) instead of the first message over and drops the rest of that
//! step's log, so a worker ignoring its own log cap cannot flood the frontends. A step's count
//! starts afresh once the connection sends `<report-built drv …>` or `<report-failed drv …>`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::doorman::Resolved;
use crate::log_budget::{LogBudget, Verdict, DEFAULT_MAX_LOG_BYTES_PER_STEP};
use nixspace_protocol::build;
use preserves::packed::view::View;
use preserves::{NoEmbeddedDomainCodec, PackedWriter, Record, ValueImpl};
use preserves_schema::{Parse, Unparse};
use syndicate::actor::{Activation, ActorResult, AnyValue, Cap, Entity, Handle};
use syndicate::schemas::rpc;

/// The default cap on live demands per connection.
pub const DEFAULT_MAX_DEMANDS: usize = 100_000;
/// The default largest packet before a capability is resolved.
pub const DEFAULT_MAX_UNAUTHENTICATED_PACKET_BYTES: usize = 64 << 10;
/// The default largest packet once a capability is resolved (a frontend asserts all its
/// demands in one packet; a NAR chunk is 64 KiB).
pub const DEFAULT_MAX_PACKET_BYTES: usize = 256 << 20;
/// The default most bytes queued for one peer that does not read them.
pub const DEFAULT_MAX_QUEUED_BYTES: usize = 256 << 20;
/// The default time a connection has to resolve a capability.
pub const DEFAULT_RESOLVE_TIMEOUT: Duration = Duration::from_secs(30);

/// What one connection may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Live demands per connection (one per `demand` record, each of a `demands` record).
    pub max_demands: usize,
    /// Bytes of build log per step and connection passed on (0: no cap).
    pub max_log_bytes_per_step: u64,
    /// The largest packet a connection may send before it resolved a capability.
    pub max_unauthenticated_packet_bytes: usize,
    /// The largest packet a connection may send once it resolved a capability.
    pub max_packet_bytes: usize,
    /// The most bytes the host queues for a peer that does not read them.
    pub max_queued_bytes: usize,
    /// How long a connection may stay without a resolved capability.
    pub resolve_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_demands: DEFAULT_MAX_DEMANDS,
            max_log_bytes_per_step: DEFAULT_MAX_LOG_BYTES_PER_STEP,
            max_unauthenticated_packet_bytes: DEFAULT_MAX_UNAUTHENTICATED_PACKET_BYTES,
            max_packet_bytes: DEFAULT_MAX_PACKET_BYTES,
            max_queued_bytes: DEFAULT_MAX_QUEUED_BYTES,
            resolve_timeout: DEFAULT_RESOLVE_TIMEOUT,
        }
    }
}

/// Stands between one client and the (attenuated) dataspace, enforcing [`Limits`].
pub struct Limiter {
    target: Arc<Cap>,
    /// The unattenuated dataspace, for the refusal (no role may assert it).
    dataspace: Arc<Cap>,
    limits: Limits,
    peer: String,
    /// The client's handles → what we asserted on their behalf.
    forwarded: HashMap<Handle, Handle>,
    /// The client's handles that are demand records → how many demands each carries.
    demands: HashMap<Handle, usize>,
    /// The demands in [`Limiter::demands`], together.
    live_demands: usize,
    refused: u64,
    refusal: Option<Handle>,
    /// Log bytes per step.
    log: LogBudget,
    /// What we warned about already (once per connection): dropped log lines, by why.
    warned: HashSet<&'static str>,
}

impl Limiter {
    /// A limiter for `peer` (for logs) in front of `target`.
    pub fn new(target: Arc<Cap>, dataspace: Arc<Cap>, limits: Limits, peer: String) -> Limiter {
        Limiter {
            target,
            dataspace,
            limits,
            peer,
            forwarded: HashMap::new(),
            demands: HashMap::new(),
            live_demands: 0,
            refused: 0,
            refusal: None,
            log: LogBudget::new(limits.max_log_bytes_per_step),
            warned: HashSet::new(),
        }
    }

    /// Note `count` demands of `record` over the cap; tell the client once.
    fn refuse(&mut self, t: &mut Activation, record: &AnyValue, count: usize) {
        self.refused += count as u64;
        if self.refusal.is_some() {
            return;
        }
        let requester = build::Demand::parse(record)
            .ok()
            .or_else(|| {
                build::Demands::parse(record)
                    .ok()
                    .and_then(|r| r.demands.into_iter().next())
            })
            .map(|d| d.requester)
            .unwrap_or_default();
        let max = self.limits.max_demands;
        tracing::warn!(peer = %self.peer, %requester, max,
            "refused demands over the per-connection cap");
        self.refusal = self.dataspace.assert(
            t,
            &build::DemandsRefused {
                requester,
                reason: format!(
                    "too many demands on one connection: the coordinator takes at most {max} \
                     at once (nixspace up --max-demands-per-client); the rest were refused"
                ),
            },
        );
    }

    /// Pass one log line on, a truncation notice instead, or nothing.
    fn log(&mut self, t: &mut Activation, m: &AnyValue) {
        let Ok(log) = build::Log::parse(m) else {
            // No observer could read it, and it would escape the count.
            self.warn_once("dropping malformed log messages");
            return;
        };
        self.count(t, m, log.drv, log.worker, log.line.len());
    }

    /// Pass one activity event of a build on, a truncation notice instead, or nothing; it
    /// counts its texts and 8 bytes per number.
    fn activity(&mut self, t: &mut Activation, m: &AnyValue) {
        let Ok(activity) = build::BuildActivity::parse(m) else {
            self.warn_once("dropping malformed build-activity messages");
            return;
        };
        let size = event_size(&activity.event);
        self.count(t, m, activity.drv, activity.worker, size);
    }

    /// Count `len` bytes of `drv`'s log from `worker` and pass `m` on, a notice instead, or
    /// nothing.
    fn count(&mut self, t: &mut Activation, m: &AnyValue, drv: String, worker: String, len: usize) {
        match self.log.admit(&drv, len) {
            Verdict::Pass => self.target.message(t, m),
            Verdict::Truncate { after } => {
                let max = self.log.max();
                tracing::warn!(peer = %self.peer, %drv, %worker, max,
                    "build log over the per-step cap: truncated");
                let notice = build::Log {
                    drv,
                    worker,
                    line: format!(
                        "nixspace: log truncated by the coordinator after {after} bytes \
                         (nixspace up --max-log-bytes-per-step {max}; raise it to see more)"
                    ),
                };
                self.target.message(t, &notice);
            }
            Verdict::Drop => {}
        }
    }

    /// Log `why` lines are dropped, the first time only.
    fn warn_once(&mut self, why: &'static str) {
        if self.warned.insert(why) {
            tracing::warn!(peer = %self.peer, "{why}");
        }
    }
}

/// The bytes an activity event counts against a step's log budget: its texts, and 8 per
/// number.
fn event_size(event: &build::ActivityEvent) -> usize {
    let fields = |fields: &[build::ActivityField]| -> usize {
        fields
            .iter()
            .map(|f| match f {
                build::ActivityField::Int(_) => 8,
                build::ActivityField::Text(s) => 8 + s.len(),
            })
            .sum()
    };
    match event {
        build::ActivityEvent::Start {
            text, fields: f, ..
        } => 40 + text.len() + fields(f),
        build::ActivityEvent::Result { fields: f, .. } => 24 + fields(f),
        build::ActivityEvent::Stop { .. } => 8,
    }
}

fn has_label(v: &AnyValue, label: &'static str) -> bool {
    v.is_record() && v.label() == AnyValue::symbol(label)
}

/// How many demands `v` counts for: one for a `<demand …>` record; for a `<demands [..]>`
/// record, one per element of its sequence and at least one, so that no record the index
/// must hold escapes the cap (an empty or malformed one, which the planner ignores).
fn demands_in(v: &AnyValue) -> usize {
    if has_label(v, "demand") {
        1
    } else if has_label(v, "demands") {
        let items = (v.len() > 0).then(|| v.index(0));
        items
            .filter(|i| i.is_sequence())
            .map_or(0, |i| i.len())
            .max(1)
    } else {
        0
    }
}

/// A demand record as the dataspace keeps it: each demand as its packed bytes (read in place)
/// instead of a tree of decoded values (some twenty heap nodes per demand), the bytes of all
/// of a record's demands in one allocation. A `<demands [..]>` record stays a decoded record
/// of packed demands, so that comparing two records (the dataspace's index does, often) reads
/// one demand of each, not the whole sequence. `None` (the record passed on as it came) unless
/// every demand in it is well-formed: only values of the schema's fixed shape are packed,
/// never nesting a client chose.
fn packed(v: &AnyValue) -> Option<AnyValue> {
    if !has_label(v, "demands") {
        return packed_demands([v.clone()])?.pop();
    }
    let items = (v.len() == 1).then(|| v.index(0))?;
    if !items.is_sequence() {
        return None;
    }
    let demands = packed_demands(items.iter())?;
    let mut record = Record::_from_vec(vec![v.label()]);
    record._vec_mut().push(AnyValue::new(demands));
    Some(AnyValue::new(record))
}

/// Each of `demands` as a view of its packed bytes, the bytes of all in one buffer; `None` if
/// one is not a well-formed `<demand …>`.
fn packed_demands(demands: impl IntoIterator<Item = AnyValue>) -> Option<Vec<AnyValue>> {
    let mut bytes = Vec::new();
    let mut starts = Vec::new();
    for demand in demands {
        build::Demand::parse(&demand).ok()?;
        starts.push(bytes.len());
        demand
            .write(
                &mut PackedWriter::new(&mut bytes),
                &mut NoEmbeddedDomainCodec,
            )
            .ok()?;
    }
    let bytes: Arc<[u8]> = Arc::from(bytes);
    starts
        .into_iter()
        .map(|start| {
            let view: View<Arc<Cap>, Arc<[u8]>> =
                View::new_offset(Arc::clone(&bytes), &mut NoEmbeddedDomainCodec, start, false)
                    .ok()?;
            Some(AnyValue::new(view))
        })
        .collect()
}

impl Entity<AnyValue> for Limiter {
    fn assert(&mut self, t: &mut Activation, a: AnyValue, h: Handle) -> ActorResult {
        let count = demands_in(&a);
        if count > 0 {
            if self.live_demands + count > self.limits.max_demands {
                self.refuse(t, &a, count);
                return Ok(());
            }
            self.live_demands += count;
            self.demands.insert(h, count);
        }
        // What the dataspace keeps longest, demands, it keeps packed.
        let a = if count > 0 {
            packed(&a).unwrap_or(a)
        } else {
            a
        };
        if let Some(ours) = self.target.assert(t, &a) {
            self.forwarded.insert(h, ours);
        }
        Ok(())
    }

    fn retract(&mut self, t: &mut Activation, h: Handle) -> ActorResult {
        if let Some(count) = self.demands.remove(&h) {
            self.live_demands -= count;
        }
        if let Some(ours) = self.forwarded.remove(&h) {
            t.retract(ours);
        }
        Ok(())
    }

    fn message(&mut self, t: &mut Activation, m: AnyValue) -> ActorResult {
        if has_label(&m, "log") {
            self.log(t, &m);
        } else if has_label(&m, "build-activity") {
            self.activity(t, &m);
        } else {
            if (has_label(&m, "report-built") || has_label(&m, "report-failed")) && m.len() > 0 {
                if let Some(drv) = m.index(0).as_string() {
                    self.log.ended(&drv);
                }
            }
            self.target.message(t, &m);
        }
        Ok(())
    }
}

impl Drop for Limiter {
    fn drop(&mut self) {
        if self.refused > 0 {
            tracing::info!(peer = %self.peer, refused = self.refused, "connection with refused demands ended");
        }
    }
}

/// Receives the gatekeeper's answer to one client's capability request and passes it on
/// with the dataspace reference behind a [`Limiter`].
pub struct LimitedAnswer {
    client: Arc<Cap>,
    dataspace: Arc<Cap>,
    limits: Limits,
    peer: String,
    /// Set once the gatekeeper answered with the dataspace.
    resolved: Resolved,
    forwarded: HashMap<Handle, Handle>,
}

impl LimitedAnswer {
    /// Pass answers on to `client` (the requester's observer), setting `resolved` once one
    /// carries the dataspace.
    pub fn new(
        client: Arc<Cap>,
        dataspace: Arc<Cap>,
        limits: Limits,
        peer: String,
        resolved: Resolved,
    ) -> Self {
        LimitedAnswer {
            client,
            dataspace,
            limits,
            peer,
            resolved,
            forwarded: HashMap::new(),
        }
    }
}

impl Entity<AnyValue> for LimitedAnswer {
    fn assert(&mut self, t: &mut Activation, a: AnyValue, h: Handle) -> ActorResult {
        let answer = match <rpc::Result>::parse(&a) {
            Ok(rpc::Result::Ok(rpc::Ok { value })) => match value.as_embedded() {
                Some(target) => {
                    self.resolved.set();
                    let limiter = Limiter::new(
                        target.into_owned(),
                        Arc::clone(&self.dataspace),
                        self.limits,
                        self.peer.clone(),
                    );
                    let limited = Cap::new(&t.create_ref(limiter));
                    rpc::Result::Ok(rpc::Ok {
                        value: AnyValue::embedded(limited),
                    })
                    .unparse()
                }
                None => a,
            },
            _ => a,
        };
        if let Some(ours) = self.client.assert(t, &answer) {
            self.forwarded.insert(h, ours);
        }
        Ok(())
    }

    fn retract(&mut self, t: &mut Activation, h: Handle) -> ActorResult {
        if let Some(ours) = self.forwarded.remove(&h) {
            t.retract(ours);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demands(n: usize) -> AnyValue {
        let demand = |i: usize| build::Demand {
            drv: format!("/nix/store/{i:032}-step-{i}.drv"),
            step: build::StepInfo {
                system: "x86_64-linux".to_owned(),
                features: vec!["kvm".to_owned()],
                input_drvs: vec![format!("/nix/store/{:032}-input.drv", i + 1)],
                settings: nixspace_protocol::BuildSettings::default().to_wire(),
                outputs: vec![format!("out=/nix/store/{i:032}-step-{i}")],
                memory: 0.into(),
            },
            requester: "frontend".to_owned(),
            priority: 1.into(),
            depth: (i as i64).into(),
            derivation: Vec::new(),
        };
        build::Demands {
            demands: (0..n).map(demand).collect(),
        }
        .unparse()
    }

    #[test]
    fn a_packed_demands_record_is_the_same_value_to_every_reader() {
        let decoded = demands(250);
        let packed = packed(&decoded).expect("no embedded references");
        assert_eq!(packed, decoded);
        assert_eq!(packed.cmp(&decoded), std::cmp::Ordering::Equal);
        assert_eq!(demands_in(&packed), 250);
        let parsed = build::Demands::parse(&packed).expect("parses");
        assert_eq!(parsed, build::Demands::parse(&decoded).expect("parses"));
        assert_eq!(
            PackedWriter::encode(&mut NoEmbeddedDomainCodec, &packed).expect("encodes"),
            PackedWriter::encode(&mut NoEmbeddedDomainCodec, &decoded).expect("encodes"),
        );
        // A lone demand is packed alike.
        let one = decoded.index(0).index(1);
        assert_eq!(super::packed(&one).expect("well-formed"), one);
        // Positive control: another record is another value.
        assert_ne!(packed, demands(249));
    }

    #[test]
    fn a_record_with_a_malformed_demand_is_passed_on_as_it_came() {
        let good = demands(2);
        assert!(packed(&good).is_some());
        let mut items: Vec<AnyValue> = good.index(0).iter().collect();
        items.push(AnyValue::new(vec![AnyValue::new(vec![AnyValue::new(
            "deep",
        )])]));
        let mut record = Record::_from_vec(vec![good.label()]);
        record._vec_mut().push(AnyValue::new(items));
        let malformed = AnyValue::new(record);
        assert_eq!(demands_in(&malformed), 3);
        assert!(packed(&malformed).is_none());
        assert!(packed(&AnyValue::new("not a demand")).is_none());
    }
}
