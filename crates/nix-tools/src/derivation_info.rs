//! Reading a derivation closure straight from the store, with our own
//! ATerm parser (no `nix` process per derivation, or at all).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;

use nixspace_nix_formats::derivation::{Derivation, DerivationOutput};
use nixspace_nix_formats::store_path::{ContentAddress, StoreDir};

use crate::command::NixError;

/// The facts about one derivation that scheduling needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DerivationInfo {
    /// The platform it builds on.
    pub system: String,
    /// Its `requiredSystemFeatures`.
    pub features: Vec<String>,
    /// The memory its build needs, in bytes, as it states it: `requiredMemory`, a number of
    /// MiB (`None`: not stated, or not a number).
    pub required_memory: Option<u64>,
    /// The derivations it depends on.
    pub input_drvs: Vec<String>,
    /// The outputs it uses of each derivation it depends on (its `inputDrvs`).
    pub input_outputs: BTreeMap<String, BTreeSet<String>>,
    /// Whether its outputs may be fetched from substituters (`allowSubstitutes`, default on).
    pub allow_substitutes: bool,
    /// Output name → path (`None` for floating content-addressed outputs).
    pub outputs: BTreeMap<String, Option<String>>,
    /// The content address of a fixed-output derivation's `out` (`fixed:[r:]algo:hash`, as
    /// Nix's `getDerivationCA`): what lets a substituter with another store directory offer it.
    pub fixed_ca: Option<String>,
    /// Whether its outputs are impure (experimental in Nix 2.8): built anew every time, never
    /// taken from a realisation.
    pub impure: bool,
}

impl DerivationInfo {
    /// The facts about `drv`, its paths printed in `store`.
    pub fn from_derivation(drv: &Derivation, store: &StoreDir) -> DerivationInfo {
        DerivationInfo {
            system: drv.system.clone(),
            features: drv
                .env_str("requiredSystemFeatures")
                .map(|f| f.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default(),
            required_memory: drv
                .env_str("requiredMemory")
                .and_then(|mib| mib.trim().parse::<u64>().ok())
                .and_then(|mib| mib.checked_mul(1 << 20)),
            input_drvs: drv.input_drvs.keys().map(|p| store.print(p)).collect(),
            input_outputs: drv
                .input_drvs
                .iter()
                .map(|(p, outputs)| (store.print(p), outputs.clone()))
                .collect(),
            // As Nix reads it from the environment: "1" is true, anything else false.
            allow_substitutes: drv.env_str("allowSubstitutes").is_none_or(|v| v == "1"),
            outputs: drv
                .outputs
                .iter()
                .map(|(name, out)| (name.clone(), out.path().map(|p| store.print(p))))
                .collect(),
            fixed_ca: match drv.outputs.get("out") {
                Some(DerivationOutput::CaFixed { method, hash, .. }) => {
                    Some(ContentAddress::Fixed(*method, hash.clone()).to_string())
                }
                _ => None,
            },
            impure: drv
                .outputs
                .values()
                .any(|out| matches!(out, DerivationOutput::Impure { .. })),
        }
    }
}

/// Every derivation in the closure of `roots` (`.drv` store paths), keyed by
/// `.drv` path. The store directory is the roots' parent directory.
pub async fn read_closure(roots: &[String]) -> Result<BTreeMap<String, DerivationInfo>, NixError> {
    let roots = roots.to_vec();
    tokio::task::spawn_blocking(move || read_closure_blocking(&roots))
        .await
        .map_err(|e| NixError::Derivation {
            path: String::new(),
            detail: e.to_string(),
        })?
}

fn read_closure_blocking(roots: &[String]) -> Result<BTreeMap<String, DerivationInfo>, NixError> {
    let mut closure = BTreeMap::new();
    let mut queue: VecDeque<String> = roots.iter().cloned().collect();
    while let Some(path) = queue.pop_front() {
        if closure.contains_key(&path) {
            continue;
        }
        let info = read_one(&path)?;
        queue.extend(info.input_drvs.iter().cloned());
        closure.insert(path, info);
    }
    Ok(closure)
}

fn read_one(path: &str) -> Result<DerivationInfo, NixError> {
    let err = |detail: String| NixError::Derivation {
        path: path.to_owned(),
        detail,
    };
    let dir = Path::new(path)
        .parent()
        .and_then(Path::to_str)
        .ok_or_else(|| err("not an absolute store path".to_owned()))?;
    let store = StoreDir::new(dir).map_err(|e| err(e.to_string()))?;
    let store_path = store.parse(path).map_err(|e| err(e.to_string()))?;
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let drv = Derivation::parse_at(&store, &store_path, &bytes).map_err(|e| err(e.to_string()))?;
    Ok(DerivationInfo::from_derivation(&drv, &store))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unreadable_derivations_name_the_path() {
        let e =
            read_closure(&["/nix/store/00000000000000000000000000000000-missing.drv".to_owned()])
                .await
                .unwrap_err();
        assert!(e.to_string().contains("missing.drv"), "{e}");
        let e = read_closure(&["relative.drv".to_owned()])
            .await
            .unwrap_err();
        assert!(e.to_string().contains("relative.drv"), "{e}");
    }
}
