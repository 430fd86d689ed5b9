//! What one build must do: [`plan`] reads the derivation closure of the roots and keeps the
//! derivations whose outputs are not valid yet (the *steps*), leaving out those whose
//! content-addressed outputs the store has realised before.

use std::collections::{BTreeMap, BTreeSet};

use nixspace_nix_formats::store_path::{StorePath, StorePathError};
use nixspace_nix_tools::{DaemonPool, DerivationInfo, NixError, StepError};

use crate::phase::PhaseClock;
use crate::realisation::{base_name, OutputIds, RealisationError};
use crate::store_db::{valid_paths, StoreDb};

/// Why a build could not be planned.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The derivation closure could not be read.
    #[error(transparent)]
    Closure(#[from] NixError),
    /// The local store could not say which outputs are valid or realised.
    #[error("cannot query the local store: {0}")]
    Store(#[from] StepError),
    /// A derivation path does not name a store path.
    #[error("{path}: {source}")]
    Path {
        /// The path.
        path: String,
        /// Why it is not one.
        source: StorePathError,
    },
    /// A derivation's output ids could not be computed.
    #[error(transparent)]
    Realisation(#[from] RealisationError),
    /// The blocking task computing output ids failed.
    #[error("computing output ids failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// The derivation closure of some roots and which of its derivations must be built.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Every derivation of the closure, by `.drv` path.
    pub infos: BTreeMap<String, DerivationInfo>,
    /// The derivations with an output that is not valid (or not known before building).
    pub needed: BTreeSet<String>,
    /// Derivations whose outputs are not known before building but which the local store
    /// has realised already (its realisations name valid paths): output name → path. They
    /// are not needed.
    pub realised: BTreeMap<String, BTreeMap<String, String>>,
}

impl Plan {
    /// The output paths of `drv` known now: fixed in the derivation or realised already.
    pub fn known_outputs(&self, drv: &str) -> Vec<String> {
        if let Some(realised) = self.realised.get(drv) {
            return realised.values().cloned().collect();
        }
        self.infos
            .get(drv)
            .into_iter()
            .flat_map(|i| i.outputs.values().flatten().cloned())
            .collect()
    }

    /// Take the needed derivations whose outputs are realised in the store of `pool`
    /// (`QueryRealisation`, valid paths only) out of [`Plan::needed`]: they were built before,
    /// here or elsewhere, and need no worker.
    async fn count_realised(
        &mut self,
        pool: &DaemonPool,
        db: Option<&StoreDb>,
    ) -> Result<(), PlanError> {
        let floating: Vec<String> = self
            .needed
            .iter()
            .filter(|d| {
                self.infos
                    .get(*d)
                    .is_some_and(|i| i.outputs.values().any(Option::is_none))
            })
            .cloned()
            .collect();
        if floating.is_empty() {
            return Ok(());
        }
        let store = pool.store_dir().clone();
        let ids = tokio::task::spawn_blocking(move || {
            let mut ids = OutputIds::new(&store);
            floating
                .into_iter()
                .map(|drv| {
                    let path = store.parse(&drv).map_err(|source| PlanError::Path {
                        path: drv.clone(),
                        source,
                    })?;
                    let (_, outputs) = ids.of(&path)?;
                    Ok((drv, outputs))
                })
                .collect::<Result<Vec<_>, PlanError>>()
        })
        .await??;
        let mut lease = pool.lease().await?;
        let mut candidates: BTreeMap<String, BTreeMap<String, StorePath>> = BTreeMap::new();
        for (drv, outputs) in ids {
            let mut found = BTreeMap::new();
            for (name, id) in outputs {
                match lease.client().query_realisation(&id).await {
                    Ok(Some(r)) => {
                        if let Ok(p) = StorePath::from_base_name(base_name(&r.out_path)) {
                            found.insert(name, p);
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return Err(lease.failed(e).into()),
                }
            }
            let all = self
                .infos
                .get(&drv)
                .is_some_and(|i| i.outputs.len() == found.len());
            if all {
                candidates.insert(drv, found);
            }
        }
        lease.release();
        let paths: BTreeSet<StorePath> = candidates
            .values()
            .flat_map(|o| o.values().cloned())
            .collect();
        let valid = valid_paths(&paths, db, pool).await?;
        let store = pool.store_dir();
        for (drv, outputs) in candidates {
            if outputs.values().all(|p| valid.contains(p)) {
                self.needed.remove(&drv);
                let printed = outputs
                    .into_iter()
                    .map(|(n, p)| (n, store.print(&p)))
                    .collect();
                self.realised.insert(drv, printed);
            }
        }
        Ok(())
    }

    /// The needed steps with their facts.
    pub fn steps(&self) -> BTreeMap<String, &DerivationInfo> {
        self.needed
            .iter()
            .filter_map(|d| self.infos.get(d).map(|i| (d.clone(), i)))
            .collect()
    }
}

/// Read the closure of `roots` (`.drv` paths) from the local store and find the steps:
/// derivations with an output that is not valid in `pool`'s store (read from its database
/// `db` when given), except those whose outputs that store has realised already.
pub async fn plan(
    roots: &[String],
    pool: &DaemonPool,
    db: Option<&StoreDb>,
) -> Result<Plan, PlanError> {
    let mut clock = PhaseClock::start("plan");
    let infos = nixspace_nix_tools::read_closure(roots).await?;
    clock.end("read the closure");
    let store = pool.store_dir();
    // An output path that does not parse cannot be valid: its step is needed (and fails).
    let known: BTreeSet<StorePath> = infos
        .values()
        .flat_map(|i| i.outputs.values().flatten())
        .filter_map(|p| store.parse(p).ok())
        .collect();
    let valid = valid_paths(&known, db, pool).await?;
    clock.end("query valid outputs");
    let is_valid = |p: &String| store.parse(p).is_ok_and(|p| valid.contains(&p));
    let needed = infos
        .iter()
        .filter(|(_, i)| {
            i.outputs
                .values()
                .any(|p| p.as_ref().is_none_or(|p| !is_valid(p)))
        })
        .map(|(d, _)| d.clone())
        .collect();
    let mut plan = Plan {
        infos,
        needed,
        realised: BTreeMap::new(),
    };
    if let Err(error) = plan.count_realised(pool, db).await {
        tracing::warn!(%error, "cannot look up the realisations in the store; building those steps");
    }
    clock.end("query realisations");
    Ok(plan)
}
