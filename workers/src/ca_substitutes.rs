//! Substituting a floating content-addressed step instead of building it: its output paths
//! are known only through realisations, so the worker asks the dataspace's substituters for
//! the realisation of each output (a binary cache `nix copy` filled has them), believes only
//! those signed by a key its store trusts, fetches the paths they name and registers the
//! realisations in its own store, as Nix's substitution of a content-addressed output does.

use std::collections::BTreeMap;

use nixspace_nix_formats::derivation::Derivation;
use nixspace_nix_formats::store_path::StoreDir;
use nixspace_nix_protocol::Realisation;
use nixspace_nix_tools::{BuiltStep, DaemonPool};
use nixspace_protocol::DrvPath;
use nixspace_transfer::StoreNode;

/// The output ids of `drv` (in the local store) by output name, if it is a step whose outputs
/// substituters can only know by realisation: every output floating content-addressed, and
/// no input derivation left (built as it is or resolved), so its ids are its own.
async fn floating_output_ids(
    store_dir: &StoreDir,
    drv: &DrvPath,
) -> Option<BTreeMap<String, String>> {
    let text = tokio::fs::read(drv.as_str()).await.ok()?;
    let path = store_dir.parse(drv.as_str()).ok()?;
    let derivation = Derivation::parse_at(store_dir, &path, &text).ok()?;
    if !derivation.input_drvs.is_empty() || derivation.outputs.values().any(|o| o.path().is_some())
    {
        return None;
    }
    let hash = derivation.hash_modulo(store_dir, true, |_| None).ok()?;
    Some(hash.output_ids())
}

/// `drv`'s outputs substituted through trusted realisations, with those realisations
/// registered in the local store; `None` means build it (no substituter, an output with no
/// trusted realisation, or a path that could not be fetched).
pub(crate) async fn realised_by_substituters(
    store: &StoreNode,
    pool: &DaemonPool,
    drv: &DrvPath,
) -> Option<BuiltStep> {
    if !store.has_substituters() {
        return None;
    }
    let ids = floating_output_ids(pool.store_dir(), drv).await?;
    let wanted: Vec<String> = ids.values().cloned().collect();
    let offered = match store.substitute_realisations(&wanted).await {
        Ok(offered) => offered?,
        Err(e) => {
            tracing::warn!(%drv, error = %e, "cannot ask for realisations; building instead");
            return None;
        }
    };
    let outputs: Vec<String> = ids
        .values()
        .filter_map(|id| offered.get(id).map(|o| o.path.clone()))
        .collect();
    match store.substitute(&outputs).await {
        Ok(true) => {}
        Ok(false) => return None,
        Err(e) => {
            tracing::warn!(%drv, error = %e, "substitution failed; building instead");
            return None;
        }
    }
    let realisations: Vec<Realisation> = offered
        .into_iter()
        .map(|(id, offer)| Realisation {
            dependent_realisations: BTreeMap::new(),
            id,
            out_path: offer.path.rsplit('/').next().unwrap_or_default().to_owned(),
            signatures: offer.signatures.into_iter().collect(),
        })
        .collect();
    let mut lease = match pool.lease().await {
        Ok(lease) => lease,
        Err(e) => {
            tracing::warn!(%drv, error = %e, "cannot register substituted realisations; building instead");
            return None;
        }
    };
    for realisation in &realisations {
        if let Err(e) = lease.client().register_drv_output(realisation).await {
            let e = lease.failed(e);
            tracing::warn!(%drv, error = %e, "cannot register a substituted realisation; building instead");
            return None;
        }
    }
    lease.release();
    Some(BuiltStep {
        outputs,
        realisations,
        usage: None,
    })
}
