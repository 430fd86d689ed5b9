//! What each role's capability lets its holder put into the dataspace.
//!
//! The host binds every role's sturdy ref to the dataspace *attenuated* by a
//! Syndicate caveat (see [`role_caveats`]): an `<or [<rewrite …> …]>` whose
//! alternatives pass the records of the role's vocabulary unchanged and turn
//! everything else into `<nixspace-refused role value>`. A Syndicate caveat
//! filters assertions and messages alike, so a role that may send `<log …>`
//! messages may also assert them. Observing (`<Observe pattern observer>`)
//! is allowed to every role. The attenuation lives on the host side of the
//! gatekeeper, so holding a route file cannot lift it.
//!
//! The host logs every refused value ([`REFUSED_LABEL`] records are observed
//! by `host`), which keeps a misbehaving client visible without giving it a
//! way to reach the planner: nothing in nixspace reacts to refused values.

use nixspace_protocol::{build, store};
use std::sync::Arc;

use syndicate::actor::{Activation, AnyValue, Cap};
use syndicate::dataspace_patterns::AsDataspacePattern;
use syndicate::schemas::dataspace::Observe;
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
        Shape::of::<Observe>(),
        Shape::of::<build::Probe>(),
        Shape::of::<store::Want>(),
        Shape::of::<store::Available>(),
        Shape::of::<store::NarRequest>(),
        // Any participant with a store may compute a closure and share it.
        Shape::of::<store::Closure>(),
    ];
    match role {
        Role::Submit => shapes.extend([
            Shape::of::<build::Demand>(),
            // A frontend resolving content-addressed steps links them and reports the
            // realisations.
            Shape::of::<build::Resolved>(),
            Shape::of::<build::Realisation>(),
        ]),
        Role::Worker => {
            shapes.extend([
                Shape::of::<build::Worker>(),
                Shape::of::<build::Offer>(),
                Shape::of::<build::Claim>(),
                Shape::of::<build::Built>(),
                Shape::of::<build::Failed>(),
                Shape::of::<build::Log>(),
                // The realisations of the content-addressed outputs a worker built.
                Shape::of::<build::Realisation>(),
                Shape::of::<build::Lost>(),
                // Substituters join with the worker capability.
                Shape::of::<store::Substituter>(),
                Shape::of::<store::Missing>(),
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

/// The caveat that confines a capability to `role`'s vocabulary: allowed
/// records pass unchanged, anything else becomes `<nixspace-refused role
/// value>` (logged by the host, ignored by everything else).
pub fn role_caveats(role: Role) -> Vec<Caveat> {
    let passing = allowed(role)
        .into_iter()
        .map(|shape| record(shape.label, vec![discard(); shape.arity]));
    passing_or_refused(passing, role.name())
}

/// The field of each worker record that names the worker (or its store, named after the
/// worker): label and field index.
const IDENTITY_FIELDS: &[(&str, usize)] = &[
    ("worker", 0),
    ("offer", 0),
    ("claim", 1),
    ("log", 1),
    ("built", 1),
    ("failed", 1),
    ("lost", 2),
    ("want", 1),
    ("available", 1),
    ("substituter", 0),
    ("missing", 1),
];

/// The caveat that narrows a worker capability to one worker, `name`: records that name a
/// worker (or a worker's store) pass only with `name` there; the rest of the worker
/// vocabulary passes unchanged; anything else becomes `<nixspace-refused worker:NAME value>`
/// (refused again, and logged, by the role caveat behind it). Any holder of a worker route
/// can add it (a sturdy ref's caveats can be extended without the host's key, never
/// removed), so each machine can get a route that lets it act only as itself.
pub fn identity_caveats(name: &str) -> Vec<Caveat> {
    let passing = allowed(Role::Worker).into_iter().map(|shape| {
        let mut fields = vec![discard(); shape.arity];
        let identity = IDENTITY_FIELDS
            .iter()
            .find(|(label, _)| *label == shape.label)
            .map(|(_, i)| *i);
        if let Some(field) = identity.and_then(|i| fields.get_mut(i)) {
            *field = Pattern::Lit(Lit {
                value: AnyValue::new(name.to_owned()),
            });
        }
        record(shape.label, fields)
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
        pattern: bind(discard()),
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

fn discard() -> Pattern {
    Pattern::PDiscard(PDiscard)
}

fn record(label: String, fields: Vec<Pattern>) -> Pattern {
    Pattern::PCompound(PCompound::Rec {
        label: AnyValue::symbol(label),
        fields,
    })
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
            },
            requester: "me".into(),
            priority: 0.into(),
            depth: 0.into(),
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

    #[test]
    fn every_shape_is_derived_from_the_schemas() {
        assert_eq!(allowed(Role::Submit).len(), 9);
        assert_eq!(allowed(Role::Worker).len(), 21);
        assert!(allowed(Role::Worker).contains(&Shape::new("realisation", 3)));
        assert!(allowed(Role::Worker).contains(&Shape::new("lost", 3)));
        assert!(allowed(Role::Worker).contains(&Shape::new("closure", 2)));
        assert!(allowed(Role::Worker).contains(&Shape::new("built", 3)));
        assert!(allowed(Role::Submit).contains(&Shape::new("demand", 5)));
        assert!(allowed(Role::Submit).contains(&Shape::new("Observe", 2)));
    }

    #[test]
    fn roles_pass_their_own_vocabulary_only() {
        assert!(passes(Role::Submit, demand()));
        assert!(!passes(Role::Worker, demand()));
        assert!(passes(Role::Worker, built()));
        assert!(!passes(Role::Submit, built()));
        let assigned = build::Assigned {
            drv: "d".into(),
            worker: "w".into(),
            settings: nixspace_protocol::BuildSettings::default().to_wire(),
        }
        .unparse();
        // Only the coordinator (the host, or the planner's whole-dataspace capability on a
        // syndicate-server) refuses demands.
        let refusal = build::DemandsRefused {
            requester: "someone".into(),
            reason: "forged".into(),
        }
        .unparse();
        for planners_only in [assigned, refusal] {
            assert!(!passes(Role::Submit, planners_only.clone()));
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

    #[test]
    fn observing_is_allowed() {
        let observe = AnyValue::record(
            AnyValue::symbol("Observe"),
            vec![dp::Pattern::Discard.unparse(), AnyValue::new(0)],
        );
        assert!(passes(Role::Submit, observe.clone()));
        assert!(passes(Role::Worker, observe));
    }
}
