//! The top-down walk that decides what a build must do, as Nix's worker decides it, with no
//! input or output of its own: the caller feeds it what the store says, one layer at a time.
//!
//! It starts from the roots' outputs. A derivation whose wanted outputs are all present
//! (valid, or realised to valid paths) needs nothing below it; one whose missing outputs a
//! substituter has is substituted, and nothing below it is looked at either; only a
//! derivation that must be built makes its inputs' outputs wanted: the outputs it names in
//! its `inputDrvs`, no others. A derivation asked for more outputs later is looked at again
//! for those. The walk is iterative: a chain as long as a client cares to make costs memory,
//! not stack.

use std::collections::{BTreeMap, BTreeSet};

use nixspace_nix_tools::DerivationInfo;

/// What the store says about one wanted output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Presence {
    /// It is valid (or realised to a valid path).
    Valid,
    /// It is not valid, but a substituter has this path.
    Substitutable(String),
    /// Neither: its derivation must be built.
    Missing,
}

/// What the walk decided for one derivation.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Decision {
    /// Its wanted outputs are valid.
    Present,
    /// These of its outputs are fetched from substituters; the others are valid.
    Substitute(BTreeSet<String>),
    /// It is built.
    Build,
}

/// The walk over one build's derivations: see the module's documentation.
#[derive(Debug)]
pub struct Walk<'a> {
    infos: &'a BTreeMap<String, DerivationInfo>,
    /// The outputs looked at so far, per derivation.
    checked: BTreeMap<String, BTreeSet<String>>,
    decisions: BTreeMap<String, Decision>,
    /// Outputs wanted and not looked at yet.
    pending: BTreeMap<String, BTreeSet<String>>,
}

impl<'a> Walk<'a> {
    /// A walk over `infos` wanting every output of each of `roots`.
    pub fn new(infos: &'a BTreeMap<String, DerivationInfo>, roots: &[String]) -> Walk<'a> {
        let mut walk = Walk {
            infos,
            checked: BTreeMap::new(),
            decisions: BTreeMap::new(),
            pending: BTreeMap::new(),
        };
        for root in roots {
            let outputs = infos
                .get(root)
                .map(|i| i.outputs.keys().cloned().collect())
                .unwrap_or_default();
            walk.want(root, &outputs);
        }
        walk
    }

    /// Want `outputs` of `drv`: those not looked at yet are pending (nothing, once it is built).
    fn want(&mut self, drv: &str, outputs: &BTreeSet<String>) {
        if self.decisions.get(drv) == Some(&Decision::Build) {
            return;
        }
        let checked = self.checked.get(drv);
        let new: BTreeSet<String> = outputs
            .iter()
            .filter(|o| !checked.is_some_and(|c| c.contains(*o)))
            .cloned()
            .collect();
        if !new.is_empty() {
            self.pending.entry(drv.to_owned()).or_default().extend(new);
        }
    }

    /// The derivations to look at next, each with its wanted outputs not looked at yet; empty
    /// once the walk is over.
    pub fn next_layer(&mut self) -> BTreeMap<String, BTreeSet<String>> {
        std::mem::take(&mut self.pending)
    }

    /// Take in what the store says about outputs of `drv` (those of the last layer).
    pub fn settle(&mut self, drv: &str, presence: &BTreeMap<String, Presence>) {
        if self.decisions.get(drv) == Some(&Decision::Build) {
            return;
        }
        self.checked
            .entry(drv.to_owned())
            .or_default()
            .extend(presence.keys().cloned());
        if presence.values().any(|p| *p == Presence::Missing) {
            self.build(drv);
            return;
        }
        let fetched: BTreeSet<String> = presence
            .values()
            .filter_map(|p| match p {
                Presence::Substitutable(path) => Some(path.clone()),
                _ => None,
            })
            .collect();
        let decision = self
            .decisions
            .entry(drv.to_owned())
            .or_insert(Decision::Present);
        if !fetched.is_empty() {
            match decision {
                Decision::Substitute(paths) => paths.extend(fetched),
                _ => *decision = Decision::Substitute(fetched),
            }
        }
    }

    /// `drv` must be built: the outputs its build uses of its inputs are wanted.
    fn build(&mut self, drv: &str) {
        self.decisions.insert(drv.to_owned(), Decision::Build);
        let Some(info) = self.infos.get(drv) else {
            return;
        };
        for (input, outputs) in &info.input_outputs {
            self.want(input, outputs);
        }
    }

    /// The derivations to build and the output paths to substitute.
    pub fn finish(self) -> (BTreeSet<String>, BTreeSet<String>) {
        let mut build = BTreeSet::new();
        let mut fetch = BTreeSet::new();
        for (drv, decision) in self.decisions {
            match decision {
                Decision::Build => {
                    build.insert(drv);
                }
                Decision::Substitute(paths) => fetch.extend(paths),
                Decision::Present => {}
            }
        }
        (build, fetch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A derivation with outputs `outputs` using `inputs` (drv, outputs).
    fn info(outputs: &[&str], inputs: &[(&str, &[&str])]) -> DerivationInfo {
        DerivationInfo {
            system: "x86_64-linux".into(),
            features: Vec::new(),
            required_memory: None,
            input_drvs: inputs.iter().map(|(d, _)| d.to_string()).collect(),
            input_outputs: inputs
                .iter()
                .map(|(d, o)| (d.to_string(), o.iter().map(|o| o.to_string()).collect()))
                .collect(),
            allow_substitutes: true,
            outputs: outputs
                .iter()
                .map(|o| (o.to_string(), Some(format!("/nix/store/x-{o}"))))
                .collect(),
            fixed_ca: None,
            impure: false,
        }
    }

    /// Run the walk to its end, answering from `store`: (drv, output) → presence; anything
    /// not in it is valid. Returns the walk's result and the derivations looked at, in order.
    fn walk(
        infos: &BTreeMap<String, DerivationInfo>,
        roots: &[&str],
        store: &BTreeMap<(&str, &str), Presence>,
    ) -> ((BTreeSet<String>, BTreeSet<String>), Vec<String>) {
        let roots: Vec<String> = roots.iter().map(|r| r.to_string()).collect();
        let mut walk = Walk::new(infos, &roots);
        let mut looked_at = Vec::new();
        loop {
            let layer = walk.next_layer();
            if layer.is_empty() {
                break;
            }
            for (drv, outputs) in layer {
                let presence = outputs
                    .iter()
                    .map(|o| {
                        let p = store
                            .get(&(drv.as_str(), o.as_str()))
                            .cloned()
                            .unwrap_or(Presence::Valid);
                        (o.clone(), p)
                    })
                    .collect();
                walk.settle(&drv, &presence);
                looked_at.push(drv);
            }
        }
        (walk.finish(), looked_at)
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    /// top → mid → base, each with one output `out`.
    fn chain() -> BTreeMap<String, DerivationInfo> {
        BTreeMap::from([
            ("base".to_owned(), info(&["out"], &[])),
            ("mid".to_owned(), info(&["out"], &[("base", &["out"])])),
            ("top".to_owned(), info(&["out"], &[("mid", &["out"])])),
        ])
    }

    #[test]
    fn a_valid_root_needs_nothing_below_it() {
        let infos = chain();
        let store = BTreeMap::from([(("base", "out"), Presence::Missing)]);
        let ((build, fetch), looked_at) = walk(&infos, &["top"], &store);
        assert!(build.is_empty() && fetch.is_empty());
        assert_eq!(looked_at, ["top"]);
    }

    #[test]
    fn a_missing_root_over_valid_inputs_is_the_only_step() {
        let infos = chain();
        let store = BTreeMap::from([(("top", "out"), Presence::Missing)]);
        let ((build, _), looked_at) = walk(&infos, &["top"], &store);
        assert_eq!(build, set(&["top"]));
        assert_eq!(looked_at, ["top", "mid"]);
    }

    #[test]
    fn missing_outputs_down_the_chain_are_all_built() {
        let infos = chain();
        let store = BTreeMap::from([
            (("top", "out"), Presence::Missing),
            (("mid", "out"), Presence::Missing),
            (("base", "out"), Presence::Missing),
        ]);
        let ((build, _), _) = walk(&infos, &["top"], &store);
        assert_eq!(build, set(&["base", "mid", "top"]));
    }

    #[test]
    fn a_substitutable_output_is_fetched_and_its_inputs_are_not_looked_at() {
        let infos = chain();
        let store = BTreeMap::from([
            (("top", "out"), Presence::Missing),
            (
                ("mid", "out"),
                Presence::Substitutable("/nix/store/m".into()),
            ),
            (("base", "out"), Presence::Missing),
        ]);
        let ((build, fetch), looked_at) = walk(&infos, &["top"], &store);
        assert_eq!(build, set(&["top"]));
        assert_eq!(fetch, set(&["/nix/store/m"]));
        assert_eq!(looked_at, ["top", "mid"]);
    }

    #[test]
    fn only_the_outputs_named_in_input_drvs_are_wanted() {
        // top uses lib's "dev" only; lib's "out" is missing but nobody needs it.
        let infos = BTreeMap::from([
            ("lib".to_owned(), info(&["dev", "out"], &[])),
            ("top".to_owned(), info(&["out"], &[("lib", &["dev"])])),
        ]);
        let store = BTreeMap::from([
            (("top", "out"), Presence::Missing),
            (("lib", "out"), Presence::Missing),
        ]);
        let ((build, _), _) = walk(&infos, &["top"], &store);
        assert_eq!(build, set(&["top"]));
        // Wanting "out" as well makes lib a step.
        let infos = BTreeMap::from([
            ("lib".to_owned(), info(&["dev", "out"], &[])),
            (
                "top".to_owned(),
                info(&["out"], &[("lib", &["dev", "out"])]),
            ),
        ]);
        let ((build, _), _) = walk(&infos, &["top"], &store);
        assert_eq!(build, set(&["lib", "top"]));
    }

    #[test]
    fn a_derivation_wanted_again_for_a_missing_output_is_built_not_substituted() {
        // a uses lib.dev (substitutable), b uses lib.out (missing, looked at a layer later).
        let infos = BTreeMap::from([
            ("lib".to_owned(), info(&["dev", "out"], &[])),
            ("a".to_owned(), info(&["out"], &[("lib", &["dev"])])),
            ("b".to_owned(), info(&["out"], &[("mid", &["out"])])),
            ("mid".to_owned(), info(&["out"], &[("lib", &["out"])])),
            (
                "top".to_owned(),
                info(&["out"], &[("a", &["out"]), ("b", &["out"])]),
            ),
        ]);
        let store = BTreeMap::from([
            (("top", "out"), Presence::Missing),
            (("a", "out"), Presence::Missing),
            (("b", "out"), Presence::Missing),
            (("mid", "out"), Presence::Missing),
            (
                ("lib", "dev"),
                Presence::Substitutable("/nix/store/dev".into()),
            ),
            (("lib", "out"), Presence::Missing),
        ]);
        let ((build, fetch), _) = walk(&infos, &["top"], &store);
        assert_eq!(build, set(&["a", "b", "lib", "mid", "top"]));
        assert!(fetch.is_empty(), "{fetch:?}");
    }

    #[test]
    fn several_roots_share_their_inputs() {
        let mut infos = chain();
        infos.insert("other".into(), info(&["out"], &[("mid", &["out"])]));
        let store = BTreeMap::from([
            (("top", "out"), Presence::Missing),
            (("other", "out"), Presence::Missing),
            (("mid", "out"), Presence::Missing),
        ]);
        let ((build, _), looked_at) = walk(&infos, &["top", "other"], &store);
        assert_eq!(build, set(&["mid", "other", "top"]));
        assert_eq!(looked_at.iter().filter(|d| *d == "mid").count(), 1);
    }
}
