//! The first object every connection sees.
//!
//! A client reaches the dataspace only by asserting a gatekeeper `<resolve
//! <ref {oid sig …}> observer>` to the object the host exports as oid 0.
//! The [`Doorman`] stands in front of syndicate-server's gatekeeper: it checks
//! the sturdy ref against the host's keys, answers an unknown or forged one
//! at once with an error (instead of the gatekeeper's silence for an unknown
//! oid), and logs every refusal with the peer it came from. Only valid refs
//! reach the gatekeeper, which resolves them to the role's attenuated
//! dataspace; the client gets that dataspace behind a
//! [`Limiter`](crate::limits::Limiter) enforcing per-connection [`Limits`].
//! Anything else asserted or sent to oid 0 is logged and ignored.
//!
//! On a host with a Noise key, a doorman may also pass `noise` steps to its connection's own
//! gatekeeper ([`Doorman::with_noise`]), which answers with a Noise responder session; the
//! session's decrypted channel leads to a second doorman that checks the `ref` step sent
//! inside it. A doorman on a TCP listener that must not carry refs in clear refuses a `ref`
//! step outside such a session ([`Refusal::Plaintext`]). Once the gatekeeper
//! answered with the dataspace, the connection's [`Resolved`] flag is set: the connection's
//! larger packet cap applies, and its resolve time limit no longer does.

use crate::limits::{LimitedAnswer, Limits};

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use preserves_schema::Parse;
use syndicate::actor::{Activation, ActorResult, AnyValue, Cap, Entity, Handle};
use syndicate::schemas::sturdy::{SturdyRef, SturdyStepDetail};
use syndicate::schemas::{gatekeeper, rpc};

/// Why a capability request was refused; the error symbol the client gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The step is not a sturdy `ref` step, or its detail is malformed.
    Malformed,
    /// The oid names no capability of this host.
    Unknown,
    /// The signature does not match the host's key for that oid.
    Forged,
    /// A `ref` step in clear on a connection that must open a Noise session first.
    Plaintext,
}

impl Refusal {
    /// The symbol sent back to the client in the gatekeeper's error answer.
    pub fn symbol(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed-capability",
            Refusal::Unknown => "unknown-capability",
            Refusal::Forged => "sturdyref-failed-validation",
            Refusal::Plaintext => "noise-required",
        }
    }
}

/// The host's capabilities: the secret key of each oid (a role name).
pub type KeyRing = Arc<BTreeMap<String, Vec<u8>>>;

/// Check a gatekeeper step against `keys`: the name of the role it opens.
pub fn check(keys: &KeyRing, step: &gatekeeper::Step) -> Result<String, Refusal> {
    if step.step_type != "ref" {
        return Err(Refusal::Malformed);
    }
    let SturdyStepDetail(parameters) =
        SturdyStepDetail::parse(&step.detail).map_err(|_| Refusal::Malformed)?;
    let oid = parameters.oid.clone();
    let sturdy_ref = SturdyRef { parameters };
    let role = oid.as_string().ok_or(Refusal::Unknown)?.into_owned();
    let key = keys.get(&role).ok_or(Refusal::Unknown)?;
    sturdy_ref.validate(key).map_err(|_| Refusal::Forged)?;
    Ok(role)
}

/// Whether a connection resolved a capability (shared by its doorman, reader and timer).
#[derive(Debug, Clone, Default)]
pub struct Resolved(Arc<AtomicBool>);

impl Resolved {
    /// Note that the connection holds the dataspace.
    pub fn set(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether the connection holds the dataspace.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// The per-connection front of the gatekeeper (see the module docs).
pub struct Doorman {
    gatekeeper: Arc<Cap>,
    keys: KeyRing,
    /// The unattenuated dataspace (for the limiter's refusals).
    dataspace: Arc<Cap>,
    limits: Limits,
    peer: String,
    resolved: Resolved,
    /// The connection's own gatekeeper serving the host's Noise binding, if it has one.
    noise: Option<Arc<Cap>>,
    /// Whether a `ref` step may come in clear (not inside a Noise session).
    plaintext: bool,
    /// The client's handles → what we asserted on their behalf.
    forwarded: HashMap<Handle, Handle>,
}

impl Doorman {
    /// A doorman for one connection from `peer` (for logs), whose client gets `dataspace`
    /// (as the gatekeeper resolves it) held to `limits`; `resolved` is set once it has it.
    pub fn new(
        gatekeeper: Arc<Cap>,
        keys: KeyRing,
        dataspace: Arc<Cap>,
        limits: Limits,
        peer: String,
        resolved: Resolved,
    ) -> Doorman {
        Doorman {
            gatekeeper,
            keys,
            dataspace,
            limits,
            peer,
            resolved,
            noise: None,
            plaintext: true,
            forwarded: HashMap::new(),
        }
    }

    /// The same doorman passing `noise` steps to `gatekeeper` (the connection's own, binding
    /// the host's Noise key), and accepting `ref` steps in clear only if `plaintext`.
    pub fn with_noise(self, gatekeeper: Arc<Cap>, plaintext: bool) -> Doorman {
        Doorman {
            noise: Some(gatekeeper),
            plaintext,
            ..self
        }
    }

    /// Forward a request to open a Noise session, or refuse it when this doorman has none.
    fn open_noise_session(
        &self,
        t: &mut Activation,
        resolve: &gatekeeper::Resolve<Arc<Cap>>,
    ) -> Option<Handle> {
        match &self.noise {
            Some(gatekeeper) => {
                tracing::debug!(peer = %self.peer, "opening a noise session");
                gatekeeper.assert(t, resolve)
            }
            None => self.refuse(t, resolve, Refusal::Malformed),
        }
    }

    /// Log `refusal` and answer `resolve`'s observer with its error.
    fn refuse(
        &self,
        t: &mut Activation,
        resolve: &gatekeeper::Resolve<Arc<Cap>>,
        refusal: Refusal,
    ) -> Option<Handle> {
        tracing::warn!(peer = %self.peer, reason = refusal.symbol(),
            step = %brief(&resolve.step.detail), "refused a capability");
        let answer = rpc::Result::Error(rpc::Error {
            error: AnyValue::symbol(refusal.symbol()),
        });
        resolve.observer.assert(t, &answer)
    }
}

/// A value for a log line, cut to a readable length.
pub(crate) fn brief(v: &AnyValue) -> String {
    let text = format!("{v:?}");
    match text.char_indices().nth(200) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

impl Entity<AnyValue> for Doorman {
    fn assert(&mut self, t: &mut Activation, a: AnyValue, h: Handle) -> ActorResult {
        let Ok(resolve) = gatekeeper::Resolve::<Arc<Cap>>::parse(&a) else {
            tracing::warn!(peer = %self.peer, value = %brief(&a),
                "refused an assertion made without a capability");
            return Ok(());
        };
        if resolve.step.step_type == "noise" {
            if let Some(ours) = self.open_noise_session(t, &resolve) {
                self.forwarded.insert(h, ours);
            }
            return Ok(());
        }
        let checked = if self.plaintext {
            check(&self.keys, &resolve.step)
        } else {
            Err(Refusal::Plaintext)
        };
        let ours = match checked {
            Ok(role) => {
                tracing::debug!(peer = %self.peer, %role, "capability accepted");
                let answer = LimitedAnswer::new(
                    Arc::clone(&resolve.observer),
                    Arc::clone(&self.dataspace),
                    self.limits,
                    self.peer.clone(),
                    self.resolved.clone(),
                );
                let limited = gatekeeper::Resolve {
                    step: resolve.step.clone(),
                    observer: Cap::new(&t.create_ref(answer)),
                };
                self.gatekeeper.assert(t, &limited)
            }
            Err(refusal) => self.refuse(t, &resolve, refusal),
        };
        if let Some(ours) = ours {
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

    fn message(&mut self, _t: &mut Activation, m: AnyValue) -> ActorResult {
        tracing::warn!(peer = %self.peer, value = %brief(&m),
            "refused a message sent without a capability");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use preserves_schema::Unparse;

    fn keys() -> KeyRing {
        Arc::new(BTreeMap::from([("worker".to_owned(), b"key".to_vec())]))
    }

    fn step(sr: &SturdyRef) -> gatekeeper::Step {
        gatekeeper::Step::parse(&sr.unparse()).expect("a sturdy ref is a step")
    }

    #[test]
    fn checks_oid_and_signature() {
        let good = SturdyRef::mint(AnyValue::new("worker"), b"key");
        assert_eq!(check(&keys(), &step(&good)), Ok("worker".to_owned()));
        let forged = SturdyRef::mint(AnyValue::new("worker"), b"guess");
        assert_eq!(check(&keys(), &step(&forged)), Err(Refusal::Forged));
        let unknown = SturdyRef::mint(AnyValue::new("admin"), b"key");
        assert_eq!(check(&keys(), &step(&unknown)), Err(Refusal::Unknown));
        let symbol_oid = SturdyRef::mint(AnyValue::symbol("worker"), b"key");
        assert_eq!(check(&keys(), &step(&symbol_oid)), Err(Refusal::Unknown));
        let not_ref = gatekeeper::Step {
            step_type: "noise".to_owned(),
            detail: AnyValue::new(1),
        };
        assert_eq!(check(&keys(), &not_ref), Err(Refusal::Malformed));
        let bad_detail = gatekeeper::Step {
            step_type: "ref".to_owned(),
            detail: AnyValue::new("garbage"),
        };
        assert_eq!(check(&keys(), &bad_detail), Err(Refusal::Malformed));
    }

    #[test]
    fn attenuated_refs_still_validate() {
        let good = SturdyRef::mint(AnyValue::new("worker"), b"key");
        let narrower = good
            .attenuate(&crate::policy::role_caveats(crate::Role::Worker))
            .expect("valid caveats");
        assert_eq!(check(&keys(), &step(&narrower)), Ok("worker".to_owned()));
    }

    #[test]
    fn brief_cuts_long_values() {
        let long = AnyValue::new("x".repeat(1000));
        assert!(brief(&long).chars().count() <= 201);
        assert_eq!(brief(&AnyValue::new(1)), "1");
    }
}
