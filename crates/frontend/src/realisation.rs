//! The realisations a `BuildPathsWithResults` answer carries for built derivations:
//! `sha256:<hash modulo in base16>!<output>` ↦ output path, as Nix's `staticOutputHashes`
//! computes them. Clients such as `nix build` take the output paths from there.

use std::collections::hash_map::Entry;
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
    let (root, ids) = OutputIds::new(store_dir).of(drv)?;
    let mut out = BTreeMap::new();
    for (name, id) in ids {
        let path = root
            .outputs
            .get(&name)
            .and_then(|o| o.path())
            .map(|p| p.to_string())
            .or_else(|| realised.get(&name).map(|p| base_name(p).to_owned()));
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

/// Computes the `DrvOutput` ids (`sha256:<hash modulo in base16>!<output>`) of derivations'
/// outputs, as Nix's `staticOutputHashes` does, reading and hashing each derivation of their
/// closures once however many are asked for (blocking reads).
pub struct OutputIds<'a> {
    store_dir: &'a StoreDir,
    derivations: HashMap<StorePath, Derivation>,
    /// Hashes modulo of input derivations (outputs not masked).
    hashes: HashMap<StorePath, DrvHash>,
}

impl<'a> OutputIds<'a> {
    /// Nothing read yet.
    pub fn new(store_dir: &'a StoreDir) -> OutputIds<'a> {
        OutputIds {
            store_dir,
            derivations: HashMap::new(),
            hashes: HashMap::new(),
        }
    }

    /// The derivation `drv` and the id of each of its outputs, by output name.
    pub fn of(
        &mut self,
        drv: &StorePath,
    ) -> Result<(Derivation, BTreeMap<String, String>), RealisationError> {
        // Inputs first, so every lookup finds its hash.
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        let mut stack = vec![(drv.clone(), false)];
        while let Some((path, expanded)) = stack.pop() {
            if expanded {
                order.push(path);
                continue;
            }
            if self.hashes.contains_key(&path) || !seen.insert(path.clone()) {
                continue;
            }
            let inputs: Vec<StorePath> = load(&mut self.derivations, self.store_dir, &path)?
                .input_drvs
                .keys()
                .cloned()
                .collect();
            stack.push((path, true));
            for input in inputs {
                if !seen.contains(&input) {
                    stack.push((input, false));
                }
            }
        }
        for path in order.iter().filter(|p| *p != drv) {
            let h = self.hash(path, false)?;
            self.hashes.insert(path.clone(), h);
        }
        let h = self.hash(drv, true)?;
        let root = load(&mut self.derivations, self.store_dir, drv)?.clone();
        let mut ids = h.output_ids();
        ids.retain(|name, _| root.outputs.contains_key(name));
        Ok((root, ids))
    }

    fn hash(&mut self, path: &StorePath, mask_outputs: bool) -> Result<DrvHash, RealisationError> {
        let d = load(&mut self.derivations, self.store_dir, path)?;
        d.hash_modulo(self.store_dir, mask_outputs, |p| {
            self.hashes.get(p).cloned()
        })
        .map_err(|source| RealisationError::Derivation {
            path: self.store_dir.print(path),
            source: Box::new(source),
        })
    }
}

/// The derivation at `path` from `derivations`, read from the store the first time.
fn load<'m>(
    derivations: &'m mut HashMap<StorePath, Derivation>,
    store_dir: &StoreDir,
    path: &StorePath,
) -> Result<&'m Derivation, RealisationError> {
    match derivations.entry(path.clone()) {
        Entry::Occupied(e) => Ok(e.into_mut()),
        Entry::Vacant(e) => Ok(e.insert(read(store_dir, path)?)),
    }
}

/// The base name of a store path given with or without its directory.
pub(crate) fn base_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}
