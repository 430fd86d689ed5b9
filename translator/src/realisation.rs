//! The realisations a `BuildPathsWithResults` answer carries for built derivations:
//! `sha256:<hash modulo in base16>!<output>` ↦ output path, as Nix's `staticOutputHashes`
//! computes them. Clients such as `nix build` take the output paths from there.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use nixspace_nix_formats::derivation::{Derivation, DerivationError, DrvHash};
use nixspace_nix_formats::store_path::{StoreDir, StorePath};
use nixspace_nix_protocol::Realisation;

/// Why realisations could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum RealisationError {
    /// A `.drv` file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A derivation could not be parsed or hashed.
    #[error("derivation {path}")]
    Derivation {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: Box<DerivationError>,
    },
}

fn read(store_dir: &StoreDir, path: &StorePath) -> Result<Derivation, RealisationError> {
    let file = store_dir.print(path);
    let text = std::fs::read(&file).map_err(|source| RealisationError::Read {
        path: file.clone(),
        source,
    })?;
    Derivation::parse_at(store_dir, path, &text).map_err(|source| RealisationError::Derivation {
        path: file,
        source: Box::new(source),
    })
}

/// The realisations of `drv`'s outputs, keyed by their `DrvOutput` id: outputs with a path
/// in the derivation, and those `realised` gives (by output name) for the others. Reads the
/// derivation closure from the store (blocking).
pub fn built_outputs(
    store_dir: &StoreDir,
    drv: &StorePath,
    realised: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, Realisation>, RealisationError> {
    let (root, ids) = output_ids(store_dir, drv)?;
    let mut out = BTreeMap::new();
    for (name, id) in ids {
        let path = root
            .outputs
            .get(&name)
            .and_then(|o| o.path())
            .map(|p| p.to_string())
            .or_else(|| {
                realised
                    .get(&name)
                    .map(|p| p.rsplit('/').next().unwrap_or(p).to_owned())
            });
        let Some(out_path) = path else {
            continue;
        };
        out.insert(
            id.clone(),
            Realisation {
                dependent_realisations: BTreeMap::new(),
                id,
                out_path,
                signatures: BTreeSet::new(),
            },
        );
    }
    Ok(out)
}

/// The derivation `drv` and the `DrvOutput` id (`sha256:<hash modulo in base16>!<output>`) of
/// each of its outputs, as Nix's `staticOutputHashes` computes them. Reads the derivation
/// closure (blocking).
fn output_ids(
    store_dir: &StoreDir,
    drv: &StorePath,
) -> Result<(Derivation, BTreeMap<String, String>), RealisationError> {
    // Inputs first, so every lookup finds its hash.
    let mut derivations: HashMap<StorePath, Derivation> = HashMap::new();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    let mut stack = vec![(drv.clone(), false)];
    while let Some((path, expanded)) = stack.pop() {
        if expanded {
            order.push(path);
            continue;
        }
        if !seen.insert(path.clone()) {
            continue;
        }
        let d = read(store_dir, &path)?;
        stack.push((path.clone(), true));
        for input in d.input_drvs.keys() {
            if !seen.contains(input) {
                stack.push((input.clone(), false));
            }
        }
        derivations.insert(path, d);
    }
    let mut hashes: HashMap<StorePath, DrvHash> = HashMap::new();
    for path in order.iter().filter(|p| *p != drv) {
        let Some(d) = derivations.get(path) else {
            continue;
        };
        let h = d
            .hash_modulo(store_dir, false, |p| hashes.get(p).cloned())
            .map_err(|source| RealisationError::Derivation {
                path: store_dir.print(path),
                source: Box::new(source),
            })?;
        hashes.insert(path.clone(), h);
    }
    // The walk reads `drv` first, so it is there.
    let root = match derivations.remove(drv) {
        Some(root) => root,
        None => read(store_dir, drv)?,
    };
    let h = root
        .hash_modulo(store_dir, true, |p| hashes.get(p).cloned())
        .map_err(|source| RealisationError::Derivation {
            path: store_dir.print(drv),
            source: Box::new(source),
        })?;
    let ids = root
        .outputs
        .keys()
        .filter_map(|name| {
            let hash = h.hashes.get(name)?;
            Some((
                name.clone(),
                format!("{}:{}!{name}", hash.algo(), hash.to_base16()),
            ))
        })
        .collect();
    Ok((root, ids))
}
