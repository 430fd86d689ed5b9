//! The demands of one build: one `<demand …>` per step, inputs first, each with its depth.
//!
//! The planner never sees a step before the inputs it must wait for, and a step's depth (the
//! longest chain of demanded steps waiting on it) lets it start the critical path first. The
//! walk is iterative, so a chain as long as a client cares to make costs memory, not stack.
//! Each demand carries the settings its step builds with ([`StepSettings`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use nixspace_nix_tools::DerivationInfo;
use nixspace_protocol::{build, expected_outputs, BuildMode, BuildSettings};

/// The settings of each step of one build: the client's, except that `--check` applies to
/// the roots only, as Nix checks only the derivations it was asked to build (their inputs
/// are built as usual).
#[derive(Debug, Clone, Default)]
pub struct StepSettings {
    settings: BuildSettings,
    roots: BTreeSet<String>,
}

impl StepSettings {
    /// `settings` for a build of `roots` (`.drv` paths).
    pub fn new(settings: BuildSettings, roots: impl IntoIterator<Item = String>) -> StepSettings {
        StepSettings {
            settings,
            roots: roots.into_iter().collect(),
        }
    }

    /// The settings step `drv` builds with.
    pub fn of(&self, drv: &str) -> BuildSettings {
        match self.settings.mode {
            BuildMode::Check if !self.roots.contains(drv) => BuildSettings {
                mode: BuildMode::Normal,
                ..self.settings
            },
            _ => self.settings,
        }
    }
}

/// The steps ordered so that every step comes after its inputs (inputs that are not steps
/// are skipped).
pub fn inputs_first<'a>(
    steps: &'a BTreeMap<String, &'a DerivationInfo>,
) -> Vec<(&'a String, &'a DerivationInfo)> {
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    let mut order = Vec::with_capacity(steps.len());
    // Depth-first, post-order: a step is pushed once all its inputs are.
    let mut stack: Vec<(&'a String, &'a DerivationInfo, usize)> = Vec::new();
    for (drv, info) in steps {
        if !seen.insert(drv) {
            continue;
        }
        stack.push((drv, *info, 0));
        while let Some((drv, info, next)) = stack.pop() {
            match info.input_drvs.get(next) {
                Some(input) => {
                    stack.push((drv, info, next + 1));
                    if let Some((input, input_info)) = steps.get_key_value(input) {
                        if seen.insert(input) {
                            stack.push((input, *input_info, 0));
                        }
                    }
                }
                None => order.push((drv, info)),
            }
        }
    }
    order
}

/// How many demanded steps wait on each step, at most, in a chain: steps in `order` come
/// after their inputs, so walking it backwards sees every dependent before its inputs.
pub fn depths<'a>(order: &[(&'a String, &'a DerivationInfo)]) -> HashMap<&'a str, u64> {
    let mut depth: HashMap<&str, u64> = order.iter().map(|(d, _)| (d.as_str(), 0)).collect();
    for (drv, info) in order.iter().rev() {
        let mine = depth.get(drv.as_str()).copied().unwrap_or(0);
        for input in &info.input_drvs {
            if let Some(d) = depth.get_mut(input.as_str()) {
                *d = (*d).max(mine + 1);
            }
        }
    }
    depth
}

/// A step's outputs as its demand carries them (see `nixspace_protocol::expected_outputs`).
pub fn outputs_of(info: &DerivationInfo) -> Vec<String> {
    info.outputs
        .iter()
        .map(|(name, path)| expected_outputs::entry(name, path.as_deref()))
        .collect()
}

/// One demand per step, inputs first, each with its depth and its settings.
pub fn demands(
    steps: &BTreeMap<String, &DerivationInfo>,
    requester: &str,
    priority: i64,
    settings: &StepSettings,
) -> Vec<build::Demand> {
    let order = inputs_first(steps);
    let depths = depths(&order);
    order
        .into_iter()
        .map(|(drv, info)| build::Demand {
            drv: drv.clone(),
            step: build::StepInfo {
                system: info.system.clone(),
                features: info.features.clone(),
                input_drvs: info.input_drvs.clone(),
                settings: settings.of(drv).to_wire(),
                outputs: outputs_of(info),
                memory: info.required_memory.unwrap_or(0).into(),
            },
            requester: requester.to_owned(),
            priority: priority.into(),
            depth: (depths.get(drv.as_str()).copied().unwrap_or(0) as i64).into(),
            derivation: Vec::new(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(inputs: &[&str]) -> DerivationInfo {
        DerivationInfo {
            system: "x86_64-linux".into(),
            features: Vec::new(),
            required_memory: None,
            input_drvs: inputs.iter().map(|s| s.to_string()).collect(),
            input_outputs: BTreeMap::new(),
            allow_substitutes: true,
            outputs: BTreeMap::new(),
            fixed_ca: None,
            impure: false,
        }
    }

    #[test]
    fn demands_come_inputs_first_with_depths() {
        // top -> left, right -> base; "valid" is an input that is not demanded.
        let infos = [
            ("a-top", info(&["b-left", "c-right"])),
            ("b-left", info(&["d-base"])),
            ("c-right", info(&["d-base", "valid"])),
            ("d-base", info(&[])),
        ];
        let steps: BTreeMap<String, &DerivationInfo> =
            infos.iter().map(|(d, i)| (d.to_string(), i)).collect();
        let demands = demands(&steps, "me", 5, &StepSettings::default());
        let order: Vec<&str> = demands.iter().map(|d| d.drv.as_str()).collect();
        assert_eq!(order, ["d-base", "b-left", "c-right", "a-top"]);
        let depth: Vec<i64> = demands
            .iter()
            .map(|d| i64::try_from(&d.depth).unwrap())
            .collect();
        assert_eq!(depth, [2, 1, 1, 0]);
        assert!(demands.iter().all(|d| d.requester == "me"));
    }

    #[test]
    fn a_chain_deeper_than_any_stack_is_ordered() {
        // 200,000 steps, each on the one before: recursion would overflow the test's stack.
        let n = 200_000;
        // The base is named last, so the walk (in name order) starts at the top.
        let names: Vec<String> = (0..n).map(|i| format!("s{:06}", n - 1 - i)).collect();
        let infos: Vec<DerivationInfo> = (0..n)
            .map(|i| match i {
                0 => info(&[]),
                _ => info(&[names[i - 1].as_str()]),
            })
            .collect();
        let steps: BTreeMap<String, &DerivationInfo> = names
            .iter()
            .zip(infos.iter())
            .map(|(d, i)| (d.clone(), i))
            .collect();
        let order = inputs_first(&steps);
        assert_eq!(order.len(), n);
        assert!(order
            .iter()
            .map(|(d, _)| d.as_str())
            .eq(names.iter().map(String::as_str)));
        let depths = depths(&order);
        assert_eq!(depths[names[0].as_str()], (n - 1) as u64);
    }
}
