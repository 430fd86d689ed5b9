//! What each role's capability lets its holder put into the dataspace, and observe there.
//!
//! The host binds every role's sturdy ref to the dataspace *attenuated* by a
//! Syndicate caveat (see [`role_caveats`]): an `<or [<rewrite …> …]>` whose
//! alternatives pass the records of the role's vocabulary unchanged and turn
//! everything else into `<nixspace-refused role value>`. A Syndicate caveat
//! filters assertions and messages alike, so a role that may send `<log …>`
//! messages may also assert them. The attenuation lives on the host side of the
//! gatekeeper, so holding a route file cannot lift it.
//!
//! Observing is confined the same way: an `<Observe pattern observer>` passes only when
//! its pattern is a record pattern (`<group <rec LABEL> …>`, bound or not) for one of the
//! records the role may observe ([`observable`]). An observer entity is reachable by whoever
//! can see the `Observe` assertion that carries it, and a capture published into it is
//! believed as if the dataspace had sent it; so no role may observe `Observe` assertions (nor
//! use a pattern, a discard or a bare binding, that would match them), and no participant
//! obtains another's entities that way.
//!
//! The host logs every refused value ([`REFUSED_LABEL`] records are observed
//! by `host`), which keeps a misbehaving client visible without giving it a
//! way to reach the planner: nothing in nixspace reacts to refused values, and
//! no role may observe them.

use nixspace_protocol::{build, store};
use std::sync::Arc;

use syndicate::actor::{Activation, AnyValue, Cap};
use syndicate::dataspace_patterns::AsDataspacePattern;
use syndicate::schemas::dataspace_patterns as dp;
use syndicate::schemas::sturdy::{
    Alts, Caveat, Lit, PBind, PCompound, PDiscard, Pattern, Rewrite, TCompound, TRef, Template,
};
use syndicate_macros::{during, on_message};

use crate::doorman::brief;
use crate::route::Role;

/// The label of what a role's caveat makes of a value the role may not
/// assert or send: `<nixspace-refused role value>`.
pub const REFUSED_LABEL: &str = "nixspace-refused";

/// A record a role may assert or send: its label and number of fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    /// The record label (a symbol).
    pub label: String,
    /// How many fields the record has.
    pub arity: usize,
}

impl Shape {
    fn new(label: &str, arity: usize) -> Shape {
        Shape {
            label: label.to_owned(),
            arity,
        }
    }

    /// The shape of a record type from the schemas (its label and field
    /// count, read from the type's dataspace pattern).
    fn of<T: AsDataspacePattern>() -> Option<Shape> {
        match T::wildcard_dataspace_pattern() {
            dp::Pattern::Group {
                type_: dp::GroupType::Rec { label },
                entries,
            } => Some(Shape::new(&label.as_symbol()?, entries.len())),
            _ => None,
        }
    }
}

/// The records `role` may assert or send to the dataspace, besides observing.
pub fn allowed(role: Role) -> Vec<Shape> {
    let mut shapes = vec![
        Shape::of::<build::Probe>(),
        Shape::of::<store::Want>(),
        Shape::of::<store::WantHashPart>(),
        Shape::of::<store::Available>(),
        Shape::of::<store::NarRequest>(),
        // Any participant with a store may compute a closure and share it.
        Shape::of::<store::Closure>(),
        Shape::of::<store::WantRealisation>(),
    ];
    match role {
        // Submitters hand jobs to the coordinator and cancel them.
        Role::Submit => shapes.extend([
            Shape::of::<build::Demand>(),
            Shape::of::<build::Demands>(),
            Shape::of::<build::SubmitJob>(),
            Shape::of::<build::CancelJob>(),
        ]),
        // A trusted frontend vouches for the derivations its trusted clients sent inline.
        Role::Trusted => shapes.extend([
            Shape::of::<build::Demand>(),
            Shape::of::<build::Demands>(),
            Shape::of::<build::SubmitJob>(),
            Shape::of::<build::CancelJob>(),
            Shape::of::<build::InlineDerivation>(),
        ]),
        Role::Worker => {
            shapes.extend([
                Shape::of::<build::Worker>(),
                Shape::of::<build::Offer>(),
                Shape::of::<build::Claim>(),
                // A worker reports its outcomes (with the realisations of the
                // content-addressed outputs it built) to the planner, which alone asserts
                // `built`, `failed` and `realisation`.
                Shape::of::<build::ReportBuilt>(),
                Shape::of::<build::ReportFailed>(),
                Shape::of::<build::Log>(),
                Shape::of::<build::BuildActivity>(),
                Shape::of::<build::Lost>(),
                // Substituters join with the worker capability.
                Shape::of::<store::Substituter>(),
                Shape::of::<store::Missing>(),
                Shape::of::<store::RealisationOffer>(),
                Shape::of::<store::RealisationMissing>(),
            ]);
            // `NarReply` is an or-type of inline records: no pattern type of
            // its own. Normally sent to a requester's sink, not the dataspace.
            shapes.extend([
                Some(Shape::new("nar-chunk", 1)),
                // Flow control: the sender's start, the receiver's credit.
                Shape::of::<store::NarStart>(),
                Shape::of::<store::NarCredit>(),
                Some(Shape::new("nar-end", 0)),
                Some(Shape::new("nar-error", 1)),
            ]);
        }
    }
    shapes.into_iter().flatten().collect()
}

/// The records `role` may observe (by label): what its participants watch. A submitter
/// (frontends, `nixspace status`) sees the whole vocabulary; a worker what it reacts to
/// (the planner's presence, assignments and invitations to steal) and the store vocabulary
/// its store node serves and fetches with. Neither sees `Observe` assertions (they carry
/// other participants' entities) nor refused values.
pub fn observable(role: Role) -> Vec<String> {
    let stores = [
        Shape::of::<build::Probe>(),
        Shape::of::<store::Want>(),
        Shape::of::<store::WantHashPart>(),
        Shape::of::<store::Available>(),
        Shape::of::<store::NarRequest>(),
        Shape::of::<store::Substituter>(),
        Shape::of::<store::Missing>(),
        Shape::of::<store::Closure>(),
        Shape::of::<store::WantRealisation>(),
        Shape::of::<store::RealisationOffer>(),
        Shape::of::<store::RealisationMissing>(),
        // The keys the coordinator tells every store to trust; no role may assert it.
        Shape::of::<store::TrustedKeys>(),
    ];
    let builds = match role {
        Role::Submit | Role::Trusted => vec![
            Shape::of::<build::Demand>(),
            Shape::of::<build::Demands>(),
            Shape::of::<build::Worker>(),
            Shape::of::<build::Offer>(),
            Shape::of::<build::Queue>(),
            Shape::of::<build::Queued>(),
            Shape::of::<build::Unschedulable>(),
            Shape::of::<build::Claim>(),
            Shape::of::<build::Assigned>(),
            Shape::of::<build::Log>(),
            Shape::of::<build::BuildActivity>(),
            Shape::of::<build::Built>(),
            Shape::of::<build::Failed>(),
            Shape::of::<build::Planner>(),
            Shape::of::<build::Steal>(),
            Shape::of::<build::Lost>(),
            Shape::of::<build::Resolved>(),
            Shape::of::<build::Realisation>(),
            Shape::of::<build::Rejected>(),
            Shape::of::<build::DemandsRefused>(),
            // The coordinator's answers to submitted and cancelled jobs.
            Shape::of::<build::JobAccepted>(),
            Shape::of::<build::JobRefused>(),
            Shape::of::<build::JobCancelled>(),
            Shape::of::<build::Job>(),
            Shape::of::<build::Eta>(),
        ],
        Role::Worker => vec![
            Shape::of::<build::Planner>(),
            Shape::of::<build::Assigned>(),
            Shape::of::<build::Steal>(),
        ],
    };
    builds
        .into_iter()
        .chain(stores)
        .flatten()
        .map(|shape| shape.label)
        .collect()
}

/// A value pattern a caveat passes, in a form that both a Syndicate caveat
/// ([`Form::pattern`]) and syndicate-server's configuration language (`space::external`)
/// can spell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Form {
    /// Any value.
    Any,
    /// Exactly this atom (a symbol or a string).
    Literal(AnyValue),
    /// A record with this label and exactly these fields.
    Record {
        /// The label (a symbol).
        label: String,
        /// One form per field.
        fields: Vec<Form>,
    },
}

impl Form {
    fn record(label: &str, fields: Vec<Form>) -> Form {
        Form::Record {
            label: label.to_owned(),
            fields,
        }
    }

    /// Any record of `shape`.
    fn any(shape: Shape) -> Form {
        Form::Record {
            fields: vec![Form::Any; shape.arity],
            label: shape.label,
        }
    }

    /// The two observations of records labelled `label`: `<Observe <group <rec label> _> _>`
    /// and the same pattern bound whole, `<Observe <bind <group <rec label> _>> _>`. Neither
    /// can match an `Observe` assertion.
    fn observations(label: &str) -> [Form; 2] {
        let literal = Form::Literal(AnyValue::symbol(label.to_owned()));
        let group = Form::record("group", vec![Form::record("rec", vec![literal]), Form::Any]);
        [
            Form::record("Observe", vec![group.clone(), Form::Any]),
            Form::record(
                "Observe",
                vec![Form::record("bind", vec![group]), Form::Any],
            ),
        ]
    }

    /// The caveat pattern of this form.
    pub fn pattern(&self) -> Pattern {
        match self {
            Form::Any => Pattern::PDiscard(PDiscard),
            Form::Literal(value) => Pattern::Lit(Lit {
                value: value.clone(),
            }),
            Form::Record { label, fields } => Pattern::PCompound(PCompound::Rec {
                label: AnyValue::symbol(label.clone()),
                fields: fields.iter().map(Form::pattern).collect(),
            }),
        }
    }
}

/// Everything `role` may assert or send: the records of its vocabulary ([`allowed`]) and
/// the observations of what it may see ([`observable`]).
pub fn passing(role: Role) -> Vec<Form> {
    let records = allowed(role).into_iter().map(Form::any);
    let observations = observable(role)
        .into_iter()
        .flat_map(|label| Form::observations(&label));
    records.chain(observations).collect()
}

/// The caveat that confines a capability to `role`'s vocabulary: allowed
/// records and observations pass unchanged, anything else becomes `<nixspace-refused role
/// value>` (logged by the host, ignored by everything else).
pub fn role_caveats(role: Role) -> Vec<Caveat> {
    passing_or_refused(passing(role).iter().map(Form::pattern), role.name())
}

/// The field of each worker record that names the worker (or its store, named after the
/// worker): label and field index.
const IDENTITY_FIELDS: &[(&str, usize)] = &[
    ("worker", 0),
    ("offer", 0),
    ("claim", 1),
    ("log", 1),
    ("build-activity", 1),
    ("report-built", 1),
    ("report-failed", 1),
    ("lost", 2),
    ("want", 1),
    ("want-hash-part", 1),
    ("available", 1),
    ("substituter", 0),
    ("missing", 1),
];

/// The caveat that narrows a worker capability to one worker, `name`: records that name a
/// worker (or a worker's store) pass only with `name` there; the rest of the worker
/// vocabulary (its observations included) passes unchanged; anything else becomes
/// `<nixspace-refused worker:NAME value>` (refused again, and logged, by the role caveat
/// behind it). Any holder of a worker route can add it (a sturdy ref's caveats can be
/// extended without the host's key, never removed), so each machine can get a route that
/// lets it act only as itself.
pub fn identity_caveats(name: &str) -> Vec<Caveat> {
    let passing = passing(Role::Worker).into_iter().map(|form| match form {
        Form::Record { label, mut fields } => {
            let identity = IDENTITY_FIELDS
                .iter()
                .find(|(l, _)| *l == label)
                .map(|(_, i)| *i);
            if let Some(field) = identity.and_then(|i| fields.get_mut(i)) {
                *field = Form::Literal(AnyValue::new(name.to_owned()));
            }
            Form::Record { label, fields }.pattern()
        }
        other => other.pattern(),
    });
    passing_or_refused(passing, &format!("worker:{name}"))
}

/// A caveat passing values that match one of `passing` unchanged and turning anything else
/// into `<nixspace-refused tag value>`.
fn passing_or_refused(passing: impl Iterator<Item = Pattern>, tag: &str) -> Vec<Caveat> {
    let first_binding = || Template::TRef(TRef { binding: 0.into() });
    let mut alternatives: Vec<Rewrite> = passing
        .map(|pattern| Rewrite {
            pattern: bind(pattern),
            template: first_binding(),
        })
        .collect();
    alternatives.push(Rewrite {
        pattern: bind(Form::Any.pattern()),
        template: Template::TCompound(TCompound::Rec {
            label: AnyValue::symbol(REFUSED_LABEL),
            fields: vec![
                Template::Lit(Lit {
                    value: AnyValue::symbol(tag.to_owned()),
                }),
                first_binding(),
            ],
        }),
    });
    vec![Caveat::Alts(Alts { alternatives })]
}

fn bind(pattern: Pattern) -> Pattern {
    Pattern::PBind(Box::new(PBind {
        pattern: Box::new(pattern),
    }))
}

/// Log what the role caveats refused (`<nixspace-refused role value>`
/// assertions and messages) in `dataspace`; nothing else in nixspace looks
/// at them. Run by whoever holds the full capability: the embedded host, or
/// `nixspace up --external` on a syndicate-server.
pub fn log_refused(t: &mut Activation, dataspace: &Arc<Cap>) {
    during!(t, dataspace, <nixspace-refused $role $value>, |_t: &mut Activation| {
        tracing::warn!(role = %brief(&role), value = %brief(&value),
            "refused an assertion the role may not make");
        Ok(())
    });
    on_message!(t, dataspace, <nixspace-refused $role $value>, |_t: &mut Activation| {
        tracing::warn!(role = %brief(&role), value = %brief(&value),
            "refused a message the role may not send");
        Ok(())
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use preserves::ValueImpl;
    use preserves_schema::Unparse;

    /// What `role`'s attenuation makes of `value`.
    fn through(role: Role, value: AnyValue) -> Option<AnyValue> {
        let caveats = role_caveats(role);
        let checked = Caveat::check_many(&caveats).expect("valid caveats");
        checked.iter().try_fold(value, |v, c| c.rewrite(&v))
    }

    fn passes(role: Role, value: AnyValue) -> bool {
        through(role, value.clone()) == Some(value)
    }

    fn demand() -> AnyValue {
        build::Demand {
            drv: "/nix/store/x.drv".into(),
            step: build::StepInfo {
                system: "x86_64-linux".into(),
                features: vec![],
                input_drvs: vec![],
                settings: nixspace_protocol::BuildSettings::default().to_wire(),
                outputs: vec![],
                memory: 0.into(),
            },
            requester: "me".into(),
            priority: 0.into(),
            depth: 0.into(),
            derivation: vec![],
        }
        .unparse()
    }

    fn built() -> AnyValue {
        build::Built {
            drv: "/nix/store/x.drv".into(),
            worker: "w".into(),
            outputs: vec![],
        }
        .unparse()
    }

    fn report_built() -> AnyValue {
        build::ReportBuilt {
            drv: "/nix/store/x.drv".into(),
            worker: "w".into(),
            outputs: vec![],
            realisations: vec![],
            usage: vec![],
        }
        .unparse()
    }

    #[test]
    fn every_shape_is_derived_from_the_schemas() {
        // Observing is not a record of the vocabulary: see `observing_is_confined`.
        assert_eq!(allowed(Role::Submit).len(), 11);
        assert_eq!(allowed(Role::Worker).len(), 24);
        assert!(allowed(Role::Worker).contains(&Shape::new("want-hash-part", 2)));
        assert!(allowed(Role::Worker).contains(&Shape::new("build-activity", 3)));
        assert!(!allowed(Role::Worker).contains(&Shape::new("realisation", 3)));
        assert!(allowed(Role::Worker).contains(&Shape::new("report-built", 5)));
        assert!(allowed(Role::Worker).contains(&Shape::new("lost", 3)));
        assert!(allowed(Role::Worker).contains(&Shape::new("closure", 2)));
        assert!(!allowed(Role::Worker).contains(&Shape::new("built", 3)));
        assert!(allowed(Role::Submit).contains(&Shape::new("demand", 6)));
        assert!(allowed(Role::Submit).contains(&Shape::new("demands", 1)));
        assert!(!allowed(Role::Worker).contains(&Shape::new("demands", 1)));
        assert!(!allowed(Role::Submit).contains(&Shape::new("Observe", 2)));
        assert_eq!(observable(Role::Submit).len(), 37);
        assert!(observable(Role::Submit).contains(&"eta".to_owned()));
        assert!(observable(Role::Submit).contains(&"queued".to_owned()));
        assert!(!allowed(Role::Submit).contains(&Shape::new("queue", 2)));
        assert!(!allowed(Role::Submit).contains(&Shape::new("eta", 2)));
        assert!(observable(Role::Submit).contains(&"build-activity".to_owned()));
        assert_eq!(observable(Role::Worker).len(), 15);
        for role in [Role::Submit, Role::Worker] {
            assert!(observable(role).contains(&"trusted-keys".to_owned()));
        }
        assert!(observable(Role::Submit).contains(&"demands-refused".to_owned()));
        assert!(observable(Role::Worker).contains(&"nar-request".to_owned()));
    }

    #[test]
    fn roles_pass_their_own_vocabulary_only() {
        assert!(passes(Role::Submit, demand()));
        assert!(!passes(Role::Worker, demand()));
        assert!(passes(Role::Worker, report_built()));
        assert!(!passes(Role::Submit, report_built()));
        // Only a trusted frontend vouches for an inline derivation; it demands as a
        // submitter does.
        let inline = build::InlineDerivation {
            drv: "/nix/store/a.drv".into(),
            derivation: b"Derive([],[],[],\"x\",\"b\",[],[])".to_vec(),
        }
        .unparse();
        assert!(passes(Role::Trusted, inline.clone()));
        assert!(passes(Role::Trusted, demand()));
        assert!(!passes(Role::Submit, inline.clone()));
        assert!(!passes(Role::Worker, inline));
        assert!(!passes(Role::Trusted, report_built()));
        let assigned = build::Assigned {
            drv: "d".into(),
            worker: "w".into(),
            settings: nixspace_protocol::BuildSettings::default().to_wire(),
            derivation: vec![],
        }
        .unparse();
        // Only the planner links an original to its resolution.
        let resolved = build::Resolved {
            from: "/nix/store/a.drv".into(),
            to: "/nix/store/b.drv".into(),
            system: "x86_64-linux".into(),
        }
        .unparse();
        // Only the coordinator (the host, or the planner's whole-dataspace capability on a
        // syndicate-server) refuses demands.
        let refusal = build::DemandsRefused {
            requester: "someone".into(),
            reason: "forged".into(),
        }
        .unparse();
        // Only the coordinator tells the stores which keys to trust.
        let trusted_keys = store::TrustedKeys {
            keys: vec!["forged-1:AAAA".into()],
        }
        .unparse();
        let realisation = build::Realisation {
            id: "sha256:00!out".into(),
            path: "/nix/store/x".into(),
            signatures: vec![],
        }
        .unparse();
        // Outcomes and realisations are the planner's records: workers report theirs.
        for planners_only in [
            assigned,
            refusal,
            trusted_keys,
            built(),
            realisation,
            resolved,
        ] {
            assert!(!passes(Role::Submit, planners_only.clone()));
            assert!(!passes(Role::Trusted, planners_only.clone()));
            assert!(!passes(Role::Worker, planners_only));
        }
    }

    #[test]
    fn refused_values_are_wrapped_with_the_role() {
        let out = through(Role::Worker, demand()).expect("rewritten, not dropped");
        assert_eq!(out.label(), AnyValue::symbol(REFUSED_LABEL));
        assert_eq!(out.index(0), AnyValue::symbol("worker"));
        assert_eq!(out.index(1), demand());
        // A wrong arity is refused too.
        let short = AnyValue::record(AnyValue::symbol("demand"), vec![AnyValue::new(1)]);
        assert!(!passes(Role::Submit, short));
    }

    #[test]
    fn a_named_worker_acts_only_as_itself() {
        let caveats = [role_caveats(Role::Worker), identity_caveats("w1")].concat();
        let checked = Caveat::check_many(&caveats).expect("valid caveats");
        // Applied as a capability applies them: the holder's last caveat first.
        let through = |v: AnyValue| checked.iter().rev().try_fold(v, |v, c| c.rewrite(&v));
        let claim = |worker: &str| {
            build::Claim {
                drv: "/nix/store/x.drv".into(),
                worker: worker.into(),
            }
            .unparse()
        };
        assert_eq!(through(claim("w1")), Some(claim("w1")));
        let other = through(claim("w2")).expect("rewritten, not dropped");
        assert_eq!(other.label(), AnyValue::symbol(REFUSED_LABEL));
        assert!(format!("{other:?}").contains("worker:w1"), "{other:?}");
        let want = |store: &str| {
            store::Want {
                path: "/nix/store/x".into(),
                store: store.into(),
            }
            .unparse()
        };
        assert_eq!(through(want("w1")), Some(want("w1")));
        assert_ne!(through(want("w2")), Some(want("w2")));
        let phase = |worker: &str| {
            build::BuildActivity {
                drv: "/nix/store/x.drv".into(),
                worker: worker.into(),
                event: build::ActivityEvent::Stop { activity: 1.into() },
            }
            .unparse()
        };
        assert_eq!(through(phase("w1")), Some(phase("w1")));
        assert_ne!(through(phase("w2")), Some(phase("w2")));
        // Records without a worker name pass; other roles' records do not.
        let request = AnyValue::record(
            AnyValue::symbol("nar-request"),
            vec![
                AnyValue::new("/nix/store/x"),
                AnyValue::new("w2"),
                AnyValue::new(0),
            ],
        );
        assert_eq!(through(request.clone()), Some(request));
        assert_ne!(through(demand()), Some(demand()));
    }

    /// `<Observe pattern 0>` (the observer, an entity on the wire, does not matter here).
    fn observe(pattern: dp::Pattern) -> AnyValue {
        AnyValue::record(
            AnyValue::symbol("Observe"),
            vec![pattern.unparse(), AnyValue::new(0)],
        )
    }

    /// A record pattern for `label` binding each of `fields` fields.
    fn watching(label: &str, fields: usize) -> dp::Pattern {
        dp::Pattern::Group {
            type_: dp::GroupType::Rec {
                label: AnyValue::symbol(label.to_owned()),
            },
            entries: (0..fields)
                .map(|i| (AnyValue::new(i), bound(dp::Pattern::Discard)))
                .collect(),
        }
    }

    fn bound(pattern: dp::Pattern) -> dp::Pattern {
        dp::Pattern::Bind {
            pattern: Box::new(pattern),
        }
    }

    #[test]
    fn observing_is_confined_to_the_records_a_role_may_see() {
        // What `during!` and the schemas' patterns send, bound whole or not.
        let built = build::Built::wildcard_dataspace_pattern();
        for role in Role::ALL {
            assert!(passes(role, observe(watching("assigned", 2))));
            assert!(passes(role, observe(bound(watching("want", 2)))));
        }
        assert!(passes(Role::Submit, observe(built.clone())));
        assert!(passes(Role::Submit, observe(bound(built.clone()))));
        // A worker does not watch frontends' outcomes.
        assert!(!passes(Role::Worker, observe(built)));
        let observers = watching("Observe", 2);
        let refused = [
            // Other participants' observers, and with them their entities.
            observers.clone(),
            bound(observers),
            // Patterns that match anything, `Observe` assertions included.
            dp::Pattern::Discard,
            bound(dp::Pattern::Discard),
            // Refused values carry what others tried to assert.
            watching(REFUSED_LABEL, 2),
            // Not a record pattern.
            dp::Pattern::Group {
                type_: dp::GroupType::Arr,
                entries: Default::default(),
            },
        ];
        for role in Role::ALL {
            for pattern in &refused {
                let out = through(role, observe(pattern.clone())).expect("rewritten, not dropped");
                assert_eq!(out.label(), AnyValue::symbol(REFUSED_LABEL), "{pattern:?}");
            }
        }
        // A named worker observes what any worker observes, and no more.
        let caveats = [role_caveats(Role::Worker), identity_caveats("w1")].concat();
        let checked = Caveat::check_many(&caveats).expect("valid caveats");
        let named = |v: AnyValue| checked.iter().rev().try_fold(v, |v, c| c.rewrite(&v));
        let assignments = observe(watching("assigned", 2));
        assert_eq!(named(assignments.clone()), Some(assignments));
        let anything = observe(dp::Pattern::Discard);
        assert_ne!(named(anything.clone()), Some(anything));
    }
}
