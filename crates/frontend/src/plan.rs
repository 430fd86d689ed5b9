//! What one build must do: [`plan`] reads the derivation closure of the roots and walks it
//! top-down as Nix's worker does ([`Walk`]): from the roots' outputs, a derivation whose
//! wanted outputs are valid (or realised, for content-addressed ones) needs nothing below
//! it, one whose missing outputs the store's substituters have is substituted (the daemon
//! fetches them before anything is demanded), and only derivations that must be built (the
//! *steps*) make the outputs they use of their inputs wanted.
//!
//! Substitutes are found as Nix's `queryMissing` finds them (`QuerySubstitutablePathInfos`,
//! which asks every substituter, with a fixed output's content address so a cache with another
//! store directory can offer it) and fetched as derivation outputs (`BuildPaths` of
//! `drv!outputs`, which substitutes with that content address) on a connection told to build
//! nothing (`max-jobs = 0`, no builders): building is the workers' job. A client's settings
//! (its `--substituters`) are sent with `SetOptions` on the connections that do this, which
//! are closed afterwards.

use std::collections::{BTreeMap, BTreeSet};

use nixspace_nix_formats::store_path::{StorePath, StorePathError};
use nixspace_nix_protocol::{BuildMode, ClientSettings, DerivedPath, LogEvent, OutputSpec};
use nixspace_nix_tools::{DaemonPool, DerivationInfo, Lease, NixConf, NixError, StepError};

use crate::phase::PhaseClock;
use crate::realisation::{base_name, OutputIds, RealisationError};
use crate::store_db::{valid_paths, StoreDb};
use crate::walk::{Presence, Walk};

/// The substituters Nix uses when its configuration names none.
const DEFAULT_SUBSTITUTERS: &str = "https://cache.nixos.org/";

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
    /// A derivation that is neither impure nor fixed-output depends on an impure one.
    #[error("derivation '{drv}' depends on impure derivation '{input}'")]
    DependsOnImpure {
        /// The derivation.
        drv: String,
        /// Its impure input.
        input: String,
    },
    /// The blocking task computing output ids failed.
    #[error("computing output ids failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The substituters did not deliver what they offered.
    #[error("cannot substitute {count} path(s): {source}")]
    Substitute {
        /// How many paths were to be substituted.
        count: usize,
        /// The daemon's answer.
        source: StepError,
    },
}

/// The derivation closure of some roots and what of it must be built or substituted.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Every derivation of the closure, by `.drv` path.
    pub infos: BTreeMap<String, DerivationInfo>,
    /// The derivations to build: the roots' outputs need them.
    pub needed: BTreeSet<String>,
    /// Derivations whose outputs are not known before building but which the local store
    /// has realised already (its realisations name valid paths), and that are not needed:
    /// output name → path, for the outputs realised.
    pub realised: BTreeMap<String, BTreeMap<String, String>>,
    /// Output paths the local store fetched from its substituters instead of building them.
    pub substituted: BTreeSet<String>,
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

    /// The needed steps with their facts.
    pub fn steps(&self) -> BTreeMap<String, &DerivationInfo> {
        self.needed
            .iter()
            .filter_map(|d| self.infos.get(d).map(|i| (d.clone(), i)))
            .collect()
    }
}

/// Read the closure of `roots` (`.drv` paths) from the local store and find what the roots'
/// outputs need (see the module's documentation), reading validity from the store of
/// `pool` (from its database `db` when given); substitute what the substituters have, with
/// `settings` (a client's) sent to the daemon first when given.
pub async fn plan(
    roots: &[String],
    pool: &DaemonPool,
    db: Option<&StoreDb>,
    settings: Option<&ClientSettings>,
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
    let mut realised = match realisations(&infos, pool, db).await {
        Ok(realised) => realised,
        Err(error) => {
            tracing::warn!(%error, "cannot look up the realisations in the store; building those steps");
            BTreeMap::new()
        }
    };
    clock.end("query realisations");
    let substituting = substituters_enabled(settings);
    // The derivation output each offered path is, to fetch it as that output.
    let mut offered_as: BTreeMap<String, (String, String)> = BTreeMap::new();
    let mut walk = Walk::new(&infos, roots);
    loop {
        let layer = walk.next_layer();
        if layer.is_empty() {
            break;
        }
        let mut presence: BTreeMap<String, BTreeMap<String, Presence>> = BTreeMap::new();
        // Missing outputs a substituter may have: (derivation, output) → path.
        let mut candidates: BTreeMap<(String, String), StorePath> = BTreeMap::new();
        for (drv, outputs) in &layer {
            let info = infos.get(drv);
            let mine = presence.entry(drv.clone()).or_default();
            for output in outputs {
                let here = match info.and_then(|i| i.outputs.get(output)) {
                    Some(Some(p)) => match store.parse(p) {
                        Ok(parsed) if valid.contains(&parsed) => Presence::Valid,
                        Ok(parsed) => {
                            if substituting && info.is_some_and(|i| i.allow_substitutes) {
                                candidates.insert((drv.clone(), output.clone()), parsed);
                            }
                            Presence::Missing
                        }
                        Err(_) => Presence::Missing,
                    },
                    Some(None) if realised.get(drv).is_some_and(|r| r.contains_key(output)) => {
                        Presence::Valid
                    }
                    _ => Presence::Missing,
                };
                mine.insert(output.clone(), here);
            }
        }
        if !candidates.is_empty() {
            // A fixed output goes with its content address, as Nix's `queryMissing` sends it.
            let asked = candidates
                .iter()
                .map(|((drv, output), path)| {
                    let ca = infos
                        .get(drv)
                        .filter(|_| output == "out")
                        .and_then(|i| i.fixed_ca.clone());
                    (path.clone(), ca)
                })
                .collect();
            let mut offered = substitutable(&asked, pool, settings).await;
            let unoffered: BTreeMap<(String, String), StorePath> = candidates
                .iter()
                .filter(|(_, p)| {
                    !offered.contains(*p) && asked.get(*p).is_some_and(Option::is_some)
                })
                .map(|(k, p)| (k.clone(), p.clone()))
                .collect();
            offered.extend(fetch_fixed(&unoffered, pool, db, settings).await?);
            for ((drv, output), path) in candidates {
                if offered.contains(&path) {
                    if let Some(p) = presence.get_mut(&drv).and_then(|o| o.get_mut(&output)) {
                        *p = Presence::Substitutable(store.print(&path));
                        offered_as.insert(store.print(&path), (drv, output));
                    }
                }
            }
        }
        for (drv, outputs) in &presence {
            walk.settle(drv, outputs);
        }
    }
    let (needed, substitutes) = walk.finish();
    clock.end("walk the closure top-down");
    refuse_impure_inputs(&infos, &needed)?;
    // The resolver takes a realised derivation as done: only those not built again count.
    realised.retain(|drv, _| !needed.contains(drv));
    let mut fetched: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in &substitutes {
        if let Some((drv, output)) = offered_as.remove(path) {
            fetched.entry(drv).or_default().insert(output);
        }
    }
    substitute(&fetched, pool, settings).await?;
    clock.end("substitute");
    Ok(Plan {
        infos,
        needed,
        realised,
        substituted: substitutes,
    })
}

/// Nix's rule: only impure and fixed-output derivations may depend on impure ones.
fn refuse_impure_inputs(
    infos: &BTreeMap<String, DerivationInfo>,
    needed: &BTreeSet<String>,
) -> Result<(), PlanError> {
    for drv in needed {
        let Some(info) = infos.get(drv) else { continue };
        if info.impure || info.fixed_ca.is_some() {
            continue;
        }
        let impure_input = info
            .input_drvs
            .iter()
            .find(|input| infos.get(*input).is_some_and(|i| i.impure));
        if let Some(input) = impure_input {
            return Err(PlanError::DependsOnImpure {
                drv: drv.clone(),
                input: input.clone(),
            });
        }
    }
    Ok(())
}

/// Whether Nix would ask substituters: `substitute` is on (in the configuration and in
/// `settings`) and `substituters` (`settings`' if they set it, else the configuration's) or
/// `extra-substituters` name some.
fn substituters_enabled(settings: Option<&ClientSettings>) -> bool {
    let conf = match NixConf::load() {
        Ok(conf) => conf,
        Err(error) => {
            tracing::warn!(%error, "cannot read the Nix configuration; not substituting");
            return false;
        }
    };
    let overrides = settings.map(|s| &s.overrides);
    let names_some = |name: &str| {
        overrides
            .and_then(|o| o.get(name))
            .is_some_and(|v| v.split_whitespace().next().is_some())
    };
    let listed = match overrides.is_some_and(|o| o.contains_key("substituters")) {
        true => names_some("substituters"),
        false => !conf
            .list("substituters", &[DEFAULT_SUBSTITUTERS.to_owned()])
            .is_empty(),
    };
    settings.is_none_or(|s| s.use_substitutes)
        && conf.value("substitute", "true") == "true"
        && (listed || names_some("extra-substituters"))
}

/// Fetch the fixed outputs `outputs` ((derivation, output) → path) that no substituter
/// offered, if one has them; the paths now valid. Nix 2.8 asks a substituter with another
/// store directory for the wrong path of a fixed output (the local one), but its substitution
/// goal asks for the right one, which is how nix-daemon fetches such an output before
/// building: the same is tried here (those it does not fetch are built).
async fn fetch_fixed(
    outputs: &BTreeMap<(String, String), StorePath>,
    pool: &DaemonPool,
    db: Option<&StoreDb>,
    settings: Option<&ClientSettings>,
) -> Result<BTreeSet<StorePath>, PlanError> {
    if outputs.is_empty() {
        return Ok(BTreeSet::new());
    }
    let mut wanted: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (drv, output) in outputs.keys() {
        wanted
            .entry(drv.clone())
            .or_default()
            .insert(output.clone());
    }
    if let Err(error) = substitute(&wanted, pool, settings).await {
        tracing::debug!(%error, "fixed outputs not substituted; building them");
    }
    let tried = outputs.values().cloned().collect();
    Ok(valid_paths(&tried, db, pool).await?)
}

/// A connection of `pool` with `settings` sent, when given.
async fn lease_with(
    pool: &DaemonPool,
    settings: Option<&ClientSettings>,
) -> Result<Lease, StepError> {
    let mut lease = pool.lease().await?;
    if let Some(settings) = settings {
        if let Err(e) = lease.client().set_options(settings).await {
            return Err(lease.failed(e));
        }
    }
    Ok(lease)
}

/// Which of `paths` (with their content addresses) the substituters of `pool`'s store, or
/// those `settings` name, can provide (`QuerySubstitutablePathInfos`); none if the store
/// cannot say, so those derivations are built.
async fn substitutable(
    paths: &BTreeMap<StorePath, Option<String>>,
    pool: &DaemonPool,
    settings: Option<&ClientSettings>,
) -> BTreeSet<StorePath> {
    let asked = async {
        let mut lease = lease_with(pool, settings).await?;
        match lease.client().query_substitutable_path_infos(paths).await {
            Ok(offered) => {
                // A connection with a client's settings serves nobody else.
                match settings {
                    Some(_) => lease.retire(),
                    None => lease.release(),
                }
                Ok(offered)
            }
            Err(e) => Err(lease.failed(e)),
        }
    };
    asked.await.unwrap_or_else(|error: StepError| {
        tracing::warn!(%error, "cannot ask the substituters; building instead");
        BTreeSet::new()
    })
}

/// Have the store of `pool` fetch `outputs` (derivation → output names) from its
/// substituters, or those `settings` name (`BuildPaths`), building nothing.
async fn substitute(
    outputs: &BTreeMap<String, BTreeSet<String>>,
    pool: &DaemonPool,
    settings: Option<&ClientSettings>,
) -> Result<(), PlanError> {
    if outputs.is_empty() {
        return Ok(());
    }
    let count = outputs.values().map(BTreeSet::len).sum();
    let failed = |source| PlanError::Substitute { count, source };
    let store = pool.store_dir();
    let wanted = outputs
        .iter()
        .map(|(drv, names)| {
            let drv_path = store.parse(drv).map_err(|source| PlanError::Path {
                path: drv.clone(),
                source,
            })?;
            Ok(DerivedPath::Built {
                drv_path,
                outputs: OutputSpec::Names(names.clone()),
            })
        })
        .collect::<Result<Vec<_>, PlanError>>()?;
    // What cannot be substituted fails instead of being built here.
    let mut fetch_only = settings.cloned().unwrap_or_default();
    fetch_only.max_build_jobs = 0;
    fetch_only
        .overrides
        .insert("builders".to_owned(), String::new());
    tracing::info!(paths = count, "substituting");
    let mut lease = lease_with(pool, Some(&fetch_only)).await.map_err(failed)?;
    let mut logs = |event: LogEvent| tracing::debug!(?event, "substituter");
    match lease
        .client()
        .build_paths(&wanted, BuildMode::Normal, &mut logs)
        .await
    {
        // The daemon holds temporary roots on what it fetched: let it go.
        Ok(()) => {
            lease.retire();
            Ok(())
        }
        Err(e) => Err(failed(lease.failed(e))),
    }
}

/// The outputs of the closure's floating content-addressed derivations (not impure ones) that
/// the store of `pool` has realised to valid paths (`QueryRealisation`; validity read from
/// `db` when given): derivation → output name → path.
async fn realisations(
    infos: &BTreeMap<String, DerivationInfo>,
    pool: &DaemonPool,
    db: Option<&StoreDb>,
) -> Result<BTreeMap<String, BTreeMap<String, String>>, PlanError> {
    // Impure derivations are built anew every time: Nix never reuses their outputs.
    let floating: Vec<String> = infos
        .iter()
        .filter(|(_, i)| !i.impure && i.outputs.values().any(Option::is_none))
        .map(|(d, _)| d.clone())
        .collect();
    if floating.is_empty() {
        return Ok(BTreeMap::new());
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
    let mut found: BTreeMap<String, BTreeMap<String, StorePath>> = BTreeMap::new();
    for (drv, outputs) in ids {
        for (name, id) in outputs {
            match lease.client().query_realisation(&id).await {
                Ok(Some(r)) => {
                    if let Ok(p) = StorePath::from_base_name(base_name(&r.out_path)) {
                        found.entry(drv.clone()).or_default().insert(name, p);
                    }
                }
                Ok(None) => {}
                Err(e) => return Err(lease.failed(e).into()),
            }
        }
    }
    lease.release();
    let paths: BTreeSet<StorePath> = found.values().flat_map(|o| o.values().cloned()).collect();
    let valid = valid_paths(&paths, db, pool).await?;
    let store = pool.store_dir();
    Ok(found
        .into_iter()
        .map(|(drv, outputs)| {
            let printed = outputs
                .into_iter()
                .filter(|(_, p)| valid.contains(p))
                .map(|(n, p)| (n, store.print(&p)))
                .collect();
            (drv, printed)
        })
        .filter(|(_, outputs): &(String, BTreeMap<String, String>)| !outputs.is_empty())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(inputs: &[&str], impure: bool, fixed: bool) -> DerivationInfo {
        DerivationInfo {
            system: "x86_64-linux".into(),
            features: Vec::new(),
            required_memory: None,
            input_drvs: inputs.iter().map(|d| d.to_string()).collect(),
            input_outputs: BTreeMap::new(),
            allow_substitutes: true,
            outputs: BTreeMap::from([("out".to_owned(), None)]),
            fixed_ca: fixed.then(|| "fixed:r:sha256:x".to_owned()),
            impure,
        }
    }

    #[test]
    fn only_impure_and_fixed_output_derivations_may_depend_on_impure_ones() {
        let infos = BTreeMap::from([
            ("i.drv".to_owned(), info(&[], true, false)),
            ("on-impure.drv".to_owned(), info(&["i.drv"], true, false)),
            ("fixed.drv".to_owned(), info(&["i.drv"], false, true)),
            ("plain.drv".to_owned(), info(&["i.drv"], false, false)),
        ]);
        let allowed: BTreeSet<String> = ["i.drv", "on-impure.drv", "fixed.drv"]
            .map(str::to_owned)
            .into();
        assert!(refuse_impure_inputs(&infos, &allowed).is_ok());
        let mut with_plain = allowed.clone();
        with_plain.insert("plain.drv".to_owned());
        let refused = refuse_impure_inputs(&infos, &with_plain).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "derivation 'plain.drv' depends on impure derivation 'i.drv'"
        );
    }
}
