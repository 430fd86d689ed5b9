//! What `--repair` must build again, as Nix's `repairClosure` finds it: the outputs of a
//! derivation that need no build are valid, but a path of their closure may be corrupted (its
//! contents changed on disk) or missing. Each path of the output closure of the derivations
//! a repair looks at (the roots, and the inputs of the steps it builds) is checked as Nix's
//! `pathContentsGood` checks it: its NAR is hashed and compared with the hash the store
//! registered. A corrupted path made by a derivation of the build's closure makes that
//! derivation a step, built in repair mode (which replaces the path); one made by none cannot
//! be repaired, and the build fails in Nix's words.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use nixspace_nix_formats::nar::fs::hash_path;
use nixspace_nix_formats::store_path::{StoreDir, StorePath};
use nixspace_nix_formats::Hash;
use nixspace_nix_tools::{DaemonPool, StepError};

use crate::plan::Plan;

/// Why a repair could not be planned.
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    /// The store could not say what a path references.
    #[error("cannot query the local store: {0}")]
    Store(#[from] StepError),
    /// A corrupted or missing path that no derivation of the build makes.
    #[error(
        "found corrupted or missing path '{path}' in the output closure of '{drv}'; \
         some paths in the output closure of derivation '{drv}' could not be repaired"
    )]
    Unrepairable {
        /// The path.
        path: String,
        /// The derivation whose output closure holds it.
        drv: String,
    },
    /// The blocking task hashing paths failed.
    #[error("checking the contents of the store failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// A corrupted or missing path found, and the derivation of the build's closure that makes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corrupted {
    /// The path.
    pub path: String,
    /// The derivation to build again in repair mode.
    pub deriver: String,
}

/// The derivations whose outputs a repair of `plan` (for `roots`) looks at: the roots that need
/// no build, and the inputs of the steps it builds that need none either.
fn looked_at(plan: &Plan, roots: &[String]) -> BTreeSet<String> {
    let inputs = plan
        .needed
        .iter()
        .filter_map(|d| plan.infos.get(d))
        .flat_map(|i| i.input_drvs.iter().cloned());
    roots
        .iter()
        .cloned()
        .chain(inputs)
        .filter(|d| !plan.needed.contains(d))
        .collect()
}

/// Check the output closure of what a repair of `plan` looks at (see the module's
/// documentation) in the store of `pool`, and name the derivations to build again.
pub async fn corrupted(
    plan: &Plan,
    roots: &[String],
    pool: &DaemonPool,
) -> Result<Vec<Corrupted>, RepairError> {
    let store = pool.store_dir().clone();
    // Which derivation of the closure makes each known output path.
    let makers: BTreeMap<String, String> = plan
        .infos
        .keys()
        .flat_map(|drv| {
            plan.known_outputs(drv)
                .into_iter()
                .map(move |p| (p, drv.clone()))
        })
        .collect();
    // Worklist over the closure, each path with the derivation whose output closure holds it.
    let mut pending: Vec<(StorePath, String)> = Vec::new();
    for drv in looked_at(plan, roots) {
        for output in plan.known_outputs(&drv) {
            if let Ok(path) = store.parse(&output) {
                pending.push((path, drv.clone()));
            }
        }
    }
    let mut seen: BTreeSet<StorePath> = pending.iter().map(|(p, _)| p.clone()).collect();
    let mut found = Vec::new();
    let mut lease = pool.lease().await?;
    while let Some((path, owner)) = pending.pop() {
        let info = match lease.client().query_path_info(&path).await {
            Ok(info) => info,
            Err(e) => return Err(lease.failed(e).into()),
        };
        let good = contents_match(&store, &path, info.as_ref().map(|i| &i.nar_hash)).await?;
        let printed = store.print(&path);
        if !good {
            tracing::warn!(path = %printed, drv = %owner, "found a corrupted or missing path in the output closure");
            match makers.get(&printed) {
                Some(deriver) => found.push(Corrupted {
                    path: printed,
                    deriver: deriver.clone(),
                }),
                None => {
                    lease.release();
                    return Err(RepairError::Unrepairable {
                        path: printed,
                        drv: owner,
                    });
                }
            }
        }
        for reference in info.into_iter().flat_map(|i| i.references) {
            if seen.insert(reference.clone()) {
                pending.push((reference, owner.clone()));
            }
        }
    }
    lease.release();
    Ok(found)
}

/// Which of `paths` (printed) are still corrupted in the store of `pool`, after a repair build:
/// a worker sharing the store replaced them, one with a store of its own did not.
pub async fn still_corrupted(
    paths: &[String],
    pool: &DaemonPool,
) -> Result<Vec<String>, RepairError> {
    let store = pool.store_dir().clone();
    let mut lease = pool.lease().await?;
    let mut corrupted = Vec::new();
    for printed in paths {
        let Ok(path) = store.parse(printed) else {
            continue;
        };
        let info = match lease.client().query_path_info(&path).await {
            Ok(info) => info,
            Err(e) => return Err(lease.failed(e).into()),
        };
        if !contents_match(&store, &path, info.as_ref().map(|i| &i.nar_hash)).await? {
            corrupted.push(printed.clone());
        }
    }
    lease.release();
    Ok(corrupted)
}

/// Whether the contents of `path` on disk hash to `registered`, as Nix's `pathContentsGood`
/// decides (a path missing on disk is not good, nor one the store does not register).
async fn contents_match(
    store: &StoreDir,
    path: &StorePath,
    registered: Option<&Hash>,
) -> Result<bool, RepairError> {
    let Some(registered) = registered.cloned() else {
        return Ok(false);
    };
    let file = PathBuf::from(store.print(path));
    let summary = tokio::task::spawn_blocking(move || hash_path(&file)).await?;
    Ok(summary.is_ok_and(|s| s.sha256 == registered))
}
