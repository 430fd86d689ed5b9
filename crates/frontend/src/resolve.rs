//! Content-addressed derivations, on the frontend's side: which steps the planner resolves.
//!
//! A step with an input whose outputs are known only once built (floating content-addressed
//! outputs, and the deferred outputs of input-addressed derivations that depend on them) is
//! resolved by the planner, where the outputs of what the dataspace builds are known (see the
//! planner's `resolution`). The frontend resolves what its own store knows first: each input
//! whose outputs are known here (input-addressed, or realised in this store) is replaced by
//! its paths, and each other input is named as it is demanded (an input resolved this way is
//! demanded under its new path). The step is demanded under the path of the result, with its
//! text, which hashes to that path: no frontend can make another derivation pass for it.
//! The planner builds the resolved derivation in its place and announces `<resolved from to>`;
//! this frontend reports the events of both as its original step's. At the end it registers
//! the realisations of the originals (and of the resolved derivations in its store) here.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use nixspace_nix_formats::derivation::{Derivation, DerivationError};
use nixspace_nix_formats::store_path::{StoreDir, StorePath, StorePathError};
use nixspace_nix_protocol::Realisation;
use nixspace_nix_tools::{DaemonPool, StepError};
use nixspace_protocol::{build, on_retraction, DrvPath};
use syndicate::actor::{Account, Activation, AnyValue, Cap, FacetRef};
use syndicate::enclose;
use syndicate_macros::{during, on_message};

use crate::demands::inputs_first;
use crate::events::{Handler, StepEvent};
use crate::outcome::FailureCause;
use crate::plan::Plan;
use crate::realisation::{built_outputs, RealisationError};

/// Why the steps the planner resolves could not be prepared: a derivation could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ResolverError {
    /// A derivation path does not name a store path.
    #[error("{path}: {source}")]
    Path {
        /// The path.
        path: String,
        /// Why it is not one.
        source: StorePathError,
    },
    /// The `.drv` file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The `.drv` file could not be parsed, or its partly resolved form printed.
    #[error("cannot parse {path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// The cause.
        source: DerivationError,
    },
}

/// Why the realisations could not be registered in the local store.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// A realisation could not be computed.
    #[error(transparent)]
    Realisation(#[from] RealisationError),
    /// A derivation path does not name a store path.
    #[error("{path}: {source}")]
    Path {
        /// The path.
        path: String,
        /// Why it is not one.
        source: StorePathError,
    },
    /// The blocking task computing them failed.
    #[error("computing realisations failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StepError),
    /// The local store refused one.
    #[error("cannot register {id}: {source}")]
    Register {
        /// The realisation's id.
        id: String,
        /// The store's answer.
        source: StepError,
    },
}

/// A derivation, and the original step whose outputs it has (itself, or one it stands for).
type WithOutputsOf = (String, String);

/// A step the planner resolves: the path it is demanded under, and its text.
#[derive(Debug, Clone)]
struct ToResolve {
    demanded: String,
    text: Vec<u8>,
}

#[derive(Default)]
struct State {
    /// Realised outputs: original derivation → output name → path.
    realised: BTreeMap<String, BTreeMap<String, StorePath>>,
    /// Resolved derivation → the originals of this build it stands for (from the planner's
    /// `<resolved from to>`).
    resolved: BTreeMap<String, BTreeSet<String>>,
}

/// The steps of one build the planner resolves, and the events about them as the original
/// steps'. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Resolver {
    inner: Arc<Inner>,
}

struct Inner {
    store_dir: StoreDir,
    pool: DaemonPool,
    requester: String,
    /// Original → how it is demanded, for the steps the planner resolves.
    to_resolve: BTreeMap<String, ToResolve>,
    /// Demanded path → original, for those steps.
    originals: BTreeMap<String, String>,
    /// Output names of every known derivation, sorted (as `built` lists outputs).
    output_names: BTreeMap<String, Vec<String>>,
    /// Needed steps with an output not known before building, demanded as they are: the
    /// worker's Nix registers its realisation under the id of the derivation it was sent
    /// (inputs resolved), so the original's is this frontend's to register.
    floating: BTreeSet<String>,
    /// Derivations with impure outputs: Nix registers no realisation of theirs.
    impure: BTreeSet<String>,
    state: Mutex<State>,
    link: Mutex<Option<Link>>,
}

#[derive(Clone)]
struct Link {
    ds: Arc<Cap>,
    facet: FacetRef,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("to_resolve", &self.inner.to_resolve.keys())
            .finish_non_exhaustive()
    }
}

impl Resolver {
    /// The steps of `plan` the planner resolves, each resolved here as far as this store
    /// knows its inputs' outputs; realisations are registered through `pool` as
    /// `requester`'s.
    pub(crate) async fn new(
        plan: &Plan,
        store_dir: StoreDir,
        pool: DaemonPool,
        requester: &str,
    ) -> Result<Resolver, ResolverError> {
        let mut state = State::default();
        let mut impure = BTreeSet::new();
        let mut output_names = BTreeMap::new();
        for (drv, info) in &plan.infos {
            if info.impure {
                impure.insert(drv.clone());
            }
            output_names.insert(drv.clone(), info.outputs.keys().cloned().collect());
            let known: BTreeMap<String, StorePath> = info
                .outputs
                .iter()
                .filter_map(|(n, p)| Some((n.clone(), store_dir.parse(p.as_ref()?).ok()?)))
                .collect();
            if known.len() == info.outputs.len() {
                state.realised.insert(drv.clone(), known);
            }
        }
        // Built before: the store has their realisations.
        for (drv, outputs) in &plan.realised {
            let known: BTreeMap<String, StorePath> = outputs
                .iter()
                .filter_map(|(n, p)| Some((n.clone(), store_dir.parse(p).ok()?)))
                .collect();
            state.realised.insert(drv.clone(), known);
        }
        let steps = plan.steps();
        let mut to_resolve: BTreeMap<String, ToResolve> = BTreeMap::new();
        let mut floating = BTreeSet::new();
        // Inputs first: a step names its inputs as they are demanded.
        for (drv, info) in inputs_first(&steps) {
            let unknown_input = info.input_drvs.iter().any(|i| {
                plan.infos
                    .get(i)
                    .is_some_and(|i| i.outputs.values().any(Option::is_none))
            });
            if !unknown_input {
                if info.outputs.values().any(Option::is_none) {
                    floating.insert(drv.clone());
                }
                continue;
            }
            let parse_error = |source| ResolverError::Parse {
                path: drv.clone(),
                source,
            };
            let path = store_dir.parse(drv).map_err(|source| ResolverError::Path {
                path: drv.clone(),
                source,
            })?;
            let text = tokio::fs::read(drv)
                .await
                .map_err(|source| ResolverError::Read {
                    path: drv.clone(),
                    source,
                })?;
            let original = Derivation::parse_at(&store_dir, &path, &text).map_err(parse_error)?;
            let partly = original.resolve_some(
                &store_dir,
                |input, output| {
                    state
                        .realised
                        .get(&store_dir.print(input))?
                        .get(output)
                        .cloned()
                },
                |input| {
                    let demanded = &to_resolve.get(&store_dir.print(input))?.demanded;
                    store_dir.parse(demanded).ok()
                },
            );
            let demanded = store_dir.print(&partly.drv_path(&store_dir).map_err(parse_error)?);
            to_resolve.insert(
                drv.clone(),
                ToResolve {
                    demanded,
                    text: partly.to_aterm(&store_dir),
                },
            );
        }
        let originals = to_resolve
            .iter()
            .map(|(o, r)| (r.demanded.clone(), o.clone()))
            .collect();
        Ok(Resolver {
            inner: Arc::new(Inner {
                store_dir,
                pool,
                requester: requester.to_owned(),
                to_resolve,
                originals,
                output_names,
                floating,
                impure,
                state: Mutex::new(state),
                link: Mutex::new(None),
            }),
        })
    }

    /// Demand the steps the planner resolves under the paths they are demanded as, with their
    /// text, and every step's inputs as they are demanded.
    pub(crate) fn rename_demands(&self, demands: &mut [build::Demand]) {
        let demanded = |drv: &str| {
            self.inner
                .to_resolve
                .get(drv)
                .map_or_else(|| drv.to_owned(), |r| r.demanded.clone())
        };
        for d in demands {
            if let Some(r) = self.inner.to_resolve.get(&d.drv) {
                d.drv = r.demanded.clone();
                d.derivation = r.text.clone();
            }
            for input in &mut d.step.input_drvs {
                *input = demanded(input);
            }
        }
    }

    /// The original step demanded as `demanded`.
    pub(crate) fn original<'a>(&'a self, demanded: &'a str) -> &'a str {
        self.inner
            .originals
            .get(demanded)
            .map_or(demanded, String::as_str)
    }

    /// The output paths of `drv` by output name, as far as they are realised.
    pub(crate) fn realised(&self, drv: &str) -> BTreeMap<String, String> {
        let state = self.inner.state.lock();
        state
            .ok()
            .and_then(|s| s.realised.get(drv).cloned())
            .unwrap_or_default()
            .into_iter()
            .map(|(n, p)| (n, self.inner.store_dir.print(&p)))
            .collect()
    }

    /// A handler that passes the events about the steps this resolver renamed, and about
    /// their resolutions, to `handler` as events about the original steps (the rest as they
    /// are), noting the outputs of each step built.
    pub(crate) fn translating(&self, handler: Handler) -> Handler {
        let inner = Arc::clone(&self.inner);
        Arc::new(move |t, event| {
            let steps: Vec<String> = match event.drv() {
                None => Vec::new(),
                Some(drv) => match inner.originals.get(drv.as_str()) {
                    Some(original) => vec![original.clone()],
                    None => inner
                        .state
                        .lock()
                        .ok()
                        .and_then(|s| s.resolved.get(drv.as_str()).cloned())
                        .map(|o| o.into_iter().collect())
                        .unwrap_or_else(|| vec![drv.to_string()]),
                },
            };
            if steps.is_empty() {
                return handler(t, event);
            }
            let event = inner.name_the_failed_input(event);
            for step in steps {
                if let StepEvent::Built { outputs, .. } = &event {
                    inner.note_built(&step, outputs);
                }
                handler(t, event.clone().about(DrvPath::from(step)))?;
            }
            Ok(())
        })
    }

    /// Record in the local store the realisations of the resolved originals (and of the
    /// content-addressed steps built as they were) whose outputs are valid there
    /// (`RegisterDrvOutput`), so Nix finds their outputs as if it had built them. The resolved
    /// derivations' realisations are recorded too, with the signatures their builders gave
    /// them, as the planner asserts them. Returns how many were registered locally.
    pub(crate) async fn register_realisations(&self) -> Result<usize, RegisterError> {
        // Each derivation, with the original whose outputs it has.
        let (originals, resolved): (Vec<WithOutputsOf>, Vec<WithOutputsOf>) = self
            .inner
            .state
            .lock()
            .map(|s| {
                let inner = &self.inner;
                let built = inner
                    .to_resolve
                    .keys()
                    .chain(&inner.floating)
                    .filter(|d| s.realised.contains_key(*d))
                    .map(|d| (d.clone(), d.clone()));
                let resolved = s.resolved.iter().filter_map(|(to, originals)| {
                    Some((to.clone(), originals.iter().next()?.clone()))
                });
                (built.collect(), resolved.collect())
            })
            .unwrap_or_default();
        let mut realisations = self.realisations_of(&originals).await?;
        realisations.append(&mut self.realisations_of(&resolved).await?);
        if realisations.is_empty() {
            return Ok(0);
        }
        // Learn the signatures of those built as they are (the steps built as they were and
        // the resolved ones) from the planner's records (a frontend asserts no realisations:
        // the planner records them only from the builders, or the substituters they trusted).
        if let Some(link) = self.inner.link() {
            let signatures = link
                .signatures_of(&self.inner.requester, &realisations)
                .await;
            for r in &mut realisations {
                if let Some(s) = signatures.get(&r.id) {
                    r.signatures.extend(s.iter().cloned());
                }
            }
        }
        self.record(realisations).await
    }

    /// Record the realisations of `drv`'s outputs in the local store now, if its outputs were
    /// not known before building (a step the post-build hook is about to see as built).
    pub(crate) async fn register_step(&self, drv: &str) -> Result<usize, RegisterError> {
        let inner = &self.inner;
        if !inner.floating.contains(drv) && !inner.to_resolve.contains_key(drv) {
            return Ok(0);
        }
        let realisations = self
            .realisations_of(&[(drv.to_owned(), drv.to_owned())])
            .await?;
        self.record(realisations).await
    }

    /// Register those of `realisations` whose outputs are valid in the local store; returns
    /// how many.
    async fn record(&self, realisations: Vec<Realisation>) -> Result<usize, RegisterError> {
        let mut lease = self.inner.pool.lease().await?;
        let paths: BTreeSet<StorePath> = realisations
            .iter()
            .filter_map(|r| StorePath::from_base_name(&r.out_path).ok())
            .collect();
        let valid = match lease.client().query_valid_paths(&paths, false).await {
            Ok(v) => v,
            Err(e) => return Err(lease.failed(e).into()),
        };
        let mut registered = 0;
        for r in realisations {
            let Ok(path) = StorePath::from_base_name(&r.out_path) else {
                continue;
            };
            if !valid.contains(&path) {
                continue;
            }
            if let Err(e) = lease.client().register_drv_output(&r).await {
                return Err(RegisterError::Register {
                    id: r.id.clone(),
                    source: lease.failed(e),
                });
            }
            registered += 1;
        }
        lease.release();
        Ok(registered)
    }

    /// The realisations of the outputs of each derivation (`.drv` path) with the outputs of an
    /// original (itself, or one it stands for) as this frontend saw it built (none for impure
    /// derivations, which Nix never records).
    async fn realisations_of(
        &self,
        drvs: &[WithOutputsOf],
    ) -> Result<Vec<Realisation>, RegisterError> {
        let store = self.inner.store_dir.clone();
        let mut realisations = Vec::new();
        for (drv, original) in drvs {
            let impure = self.inner.is_impure(drv);
            // A resolved derivation a worker with a store of its own wrote is not here (nor
            // are the outputs of the inputs it refers to): nothing to read, and its
            // realisation is not needed here (its original's is).
            if impure || !tokio::fs::try_exists(drv).await.unwrap_or(false) {
                continue;
            }
            let path = store.parse(drv).map_err(|source| RegisterError::Path {
                path: drv.clone(),
                source,
            })?;
            let realised = self.realised(original);
            let dir = store.clone();
            let found = tokio::task::spawn_blocking(move || built_outputs(&dir, &path, &realised))
                .await??;
            realisations.extend(found.into_values());
        }
        Ok(realisations)
    }

    /// Follow the planner's resolutions of this build's steps on `ds`, from the current facet.
    pub(crate) fn attach(&self, t: &mut Activation, ds: Arc<Cap>) {
        if let Ok(mut link) = self.inner.link.lock() {
            *link = Some(Link {
                ds: Arc::clone(&ds),
                facet: t.facet_ref(),
            });
        }
        let inner = &self.inner;
        enclose!((inner) during!(t, ds, <resolved $from: String $to: String _>, |t: &mut Activation| {
            let Some(original) = inner.originals.get(&from).cloned() else {
                return Ok(());
            };
            tracing::info!(%original, %to, "resolved by the planner");
            if let Ok(mut state) = inner.state.lock() {
                state.resolved.entry(to.clone()).or_default().insert(original.clone());
            }
            let inner = Arc::clone(&inner);
            on_retraction(t, move |_t| {
                if let Ok(mut state) = inner.state.lock() {
                    if let Some(originals) = state.resolved.get_mut(&to) {
                        originals.remove(&original);
                        if originals.is_empty() {
                            state.resolved.remove(&to);
                        }
                    }
                }
                Ok(())
            });
            Ok(())
        }));
    }
}

impl Link {
    /// Collect the signatures the planner asserts for `theirs` (by id), in a facet of its own
    /// that ends when the probe of `requester` comes back (or after a while).
    async fn signatures_of(
        &self,
        requester: &str,
        theirs: &[Realisation],
    ) -> BTreeMap<String, BTreeSet<String>> {
        let found: Arc<Mutex<BTreeMap<String, BTreeSet<String>>>> = Arc::default();
        let account = Account::new(Some(AnyValue::symbol("realisations")), None);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut tx = Some(tx);
        let id = format!("realisations-{}-{requester}", std::process::id());
        let ds = &self.ds;
        self.facet.activate(&account, None, |t| {
            t.facet(|t| {
                for r in theirs {
                    let wanted = r.id.clone();
                    let literal = AnyValue::new(wanted.clone());
                    enclose!((found) during!(t, ds, <realisation #(literal) _ $signatures: Vec<String>>, |_t: &mut Activation| {
                        if let Ok(mut found) = found.lock() {
                            found.entry(wanted.clone()).or_default().extend(signatures.iter().cloned());
                        }
                        Ok(())
                    }));
                }
                let echo_id = id.clone();
                on_message!(t, ds, <probe $echo: String>, |t: &mut Activation| {
                    if echo == echo_id {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(());
                        }
                        t.stop();
                    }
                    Ok(())
                });
                ds.message(t, &build::Probe { id: id.clone() });
                Ok(())
            })?;
            Ok(())
        });
        if tokio::time::timeout(std::time::Duration::from_secs(10), rx)
            .await
            .is_err()
        {
            tracing::warn!("the dataspace did not confirm the realisations' signatures");
        }
        let found = found.lock().map(|f| f.clone()).unwrap_or_default();
        found
    }
}

impl Inner {
    fn link(&self) -> Option<Link> {
        self.link.lock().ok().and_then(|l| l.clone())
    }

    /// A failure caused by an input demanded under another path, about the input as this
    /// build knows it.
    fn name_the_failed_input(&self, event: StepEvent) -> StepEvent {
        let StepEvent::Failed { drv, mut failure } = event else {
            return event;
        };
        if let FailureCause::Dependency(input) = &failure.cause {
            if let Some(original) = self.originals.get(input.as_str()) {
                failure.reason = failure.reason.replace(input.as_str(), original);
                failure.cause = FailureCause::Dependency(DrvPath::from(original.as_str()));
            }
        }
        StepEvent::Failed { drv, failure }
    }

    /// `drv` (an original) was built with `outputs`, in output-name order.
    fn note_built(&self, drv: &str, outputs: &[String]) {
        let names = self.output_names.get(drv).cloned().unwrap_or_default();
        let realised: BTreeMap<String, StorePath> = names
            .into_iter()
            .zip(outputs)
            .filter_map(|(n, p)| Some((n, self.store_dir.parse(p).ok()?)))
            .collect();
        if let Ok(mut state) = self.state.lock() {
            state.realised.insert(drv.to_owned(), realised);
        }
    }

    /// Whether `drv`, or an original it stands for, has impure outputs.
    fn is_impure(&self, drv: &str) -> bool {
        self.impure.contains(drv)
            || self.state.lock().is_ok_and(|s| {
                s.resolved
                    .get(drv)
                    .is_some_and(|o| o.iter().any(|o| self.impure.contains(o)))
            })
    }
}
