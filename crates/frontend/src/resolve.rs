//! Content-addressed derivations resolved reactively, on the frontend's side.
//!
//! A step whose inputs include outputs not known before they are built (floating
//! content-addressed outputs, and the deferred outputs of input-addressed derivations that
//! depend on them) is *held*: it is not demanded. When every input's outputs are realised
//! (their steps reported `built`), the [`Resolver`] resolves it (inputs replaced by their
//! realised paths, Nix's `tryResolve`), writes the resolved `.drv` into the local store (held
//! by a temporary GC root while this frontend runs), asserts `<resolved from to>` and demands
//! the resolved derivation in its place. Workers only ever see resolved derivations;
//! originals that resolve to the same derivation share its build. When the resolved step is
//! built, its outputs are the original's, reported to the frontend as the original's `built`
//! (which may in turn let dependents resolve). A held step whose input failed fails with
//! "cannot resolve: input X failed". A resolved original not built yet whose input is built
//! again with other outputs (lost, then rebuilt by a non-deterministic builder) is held again:
//! its `<resolved>` and demand are retracted and it is resolved with the new outputs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, Weak};

use nixspace_nix_formats::derivation::{Derivation, DerivationError};
use nixspace_nix_formats::store_path::{StoreDir, StorePath, StorePathError};
use nixspace_nix_protocol::Realisation;
use nixspace_nix_tools::{DaemonPool, DerivationInfo, Lease, StepError};
use nixspace_protocol::{build, expected_outputs, DrvPath, WorkerId};
use nixspace_transfer::{FetchError, OfferError, StoreNode};
use preserves_schema::Parse;
use syndicate::actor::{Account, Activation, ActorResult, AnyValue, Cap, FacetRef, Handle};
use syndicate::enclose;
use syndicate_macros::{during, on_message};

use crate::demands::StepSettings;
use crate::events::{failure_of, Handler, StepEvent};
use crate::outcome::{Failure, FailureCause};
use crate::plan::Plan;
use crate::realisation::{built_outputs, RealisationError};

/// Why the resolver could not start: a held step's derivation could not be read.
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
    /// The `.drv` file could not be parsed.
    #[error("cannot parse {path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// The cause.
        source: DerivationError,
    },
}

/// Why a held step could not be resolved (its failure's reason).
#[derive(Debug, thiserror::Error)]
pub enum CannotResolve {
    /// An input failed for good.
    #[error("cannot resolve: input {0} failed")]
    InputFailed(DrvPath),
    /// The step was not held (resolved or failed already).
    #[error("cannot resolve: the step is not held")]
    NotHeld,
    /// Some input's output is not known.
    #[error("cannot resolve: an input's output was not realised")]
    Unrealised,
    /// Nix's resolution rules refused the derivation.
    #[error("cannot resolve: {0}")]
    Derivation(#[from] DerivationError),
    /// The local store failed.
    #[error("cannot resolve: {0}")]
    Store(#[from] StepError),
    /// The resolved derivation could not be offered to the dataspace.
    #[error("cannot resolve: {0}")]
    Offer(#[from] OfferError),
    /// Whether the inputs' outputs the resolved derivation refers to are valid here could not
    /// be asked.
    #[error("cannot resolve: {0}")]
    Fetch(#[from] FetchError),
    /// The resolver's state lock was poisoned by a panic.
    #[error("cannot resolve: the resolver's state is poisoned")]
    Poisoned,
    /// The build the step belongs to has ended.
    #[error("cannot resolve: the build has ended")]
    Ended,
    /// The store wrote the resolved derivation under another path.
    #[error(
        "cannot resolve: the store wrote the resolved derivation as {written}, expected {expected}"
    )]
    WrittenElsewhere {
        /// Where it went.
        written: String,
        /// Where it should have gone.
        expected: String,
    },
}

impl CannotResolve {
    /// Whose fault it is: the derivation's (its own build's), or the local store's.
    fn cause(&self) -> FailureCause {
        match self {
            CannotResolve::InputFailed(input) => FailureCause::Dependency(input.clone()),
            CannotResolve::NotHeld
            | CannotResolve::Unrealised
            | CannotResolve::Derivation(_)
            | CannotResolve::Ended => FailureCause::Build,
            CannotResolve::Store(_)
            | CannotResolve::Fetch(_)
            | CannotResolve::Offer(_)
            | CannotResolve::Poisoned
            | CannotResolve::WrittenElsewhere { .. } => FailureCause::Infrastructure,
        }
    }
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

/// A held step.
#[derive(Clone)]
struct Held {
    drv: Derivation,
    info: DerivationInfo,
}

/// A resolved original, not held any more: what was asserted for it, and what it was resolved
/// against (it is held again if one of those inputs is built anew with other outputs before the
/// resolved derivation is built).
struct Resolution {
    /// The original as it was held.
    held: Held,
    /// The `<resolved from to>` record.
    resolved: build::Resolved,
    /// The demand of the resolved derivation.
    demand: build::Demand,
    /// The outputs of the original's inputs it was resolved against: input → output → path.
    against: BTreeMap<String, BTreeMap<String, StorePath>>,
    /// The handles of the record and the demand as asserted on the current link.
    handles: Vec<Handle>,
}

impl State {
    /// Resolved originals not built yet whose inputs' outputs are not those they were resolved
    /// against any more (an input lost and built again with another output): no longer
    /// resolved, held again, with the handles of what was asserted for them to retract.
    fn unresolve_stale(&mut self) -> Vec<Handle> {
        let stale: Vec<String> = self
            .resolved
            .iter()
            .filter(|(original, r)| {
                !self.realised.contains_key(*original)
                    && r.against
                        .iter()
                        .any(|(input, outputs)| self.realised.get(input) != Some(outputs))
            })
            .map(|(original, _)| original.clone())
            .collect();
        let mut handles = Vec::new();
        for original in stale {
            let Some(r) = self.resolved.remove(&original) else {
                continue;
            };
            tracing::info!(%original, old = %r.resolved.to, "an input was built again with other outputs; resolving anew");
            if let Some(originals) = self.originals.get_mut(&r.resolved.to) {
                originals.remove(&original);
                if originals.is_empty() {
                    self.originals.remove(&r.resolved.to);
                }
            }
            self.held.insert(original, r.held);
            handles.extend(r.handles);
        }
        handles
    }

    /// Held steps whose inputs are all realised and that nobody is resolving yet, now marked
    /// as being resolved.
    fn take_resolvable(&mut self) -> Vec<String> {
        let ready: Vec<String> = self
            .held
            .iter()
            .filter(|(d, h)| {
                !self.resolving.contains(*d)
                    && h.info
                        .input_drvs
                        .iter()
                        .all(|i| self.realised.contains_key(i))
            })
            .map(|(d, _)| d.clone())
            .collect();
        self.resolving.extend(ready.iter().cloned());
        ready
    }
}

#[derive(Default)]
struct State {
    held: BTreeMap<String, Held>,
    /// Output names of every known derivation, sorted (as `built` lists outputs).
    output_names: BTreeMap<String, Vec<String>>,
    /// Realised outputs: derivation → output name → path.
    realised: BTreeMap<String, BTreeMap<String, StorePath>>,
    /// Held steps being resolved right now.
    resolving: BTreeSet<String>,
    /// What was asserted for each resolved original (re-asserted on rejoining).
    resolved: BTreeMap<String, Resolution>,
    /// Resolved derivation → the originals it stands for.
    originals: BTreeMap<String, BTreeSet<String>>,
    /// Needed steps with an output not known before building, demanded as they are: the
    /// worker's Nix registers its realisation under the id of the derivation it was sent
    /// (inputs resolved), so the original's is this frontend's to register.
    floating: BTreeSet<String>,
    /// Derivations with impure outputs: Nix registers no realisation of theirs.
    impure: BTreeSet<String>,
}

impl State {
    /// Whether `drv`, or an original it was resolved from, has impure outputs.
    fn is_impure(&self, drv: &str) -> bool {
        self.impure.contains(drv)
            || self
                .originals
                .get(drv)
                .is_some_and(|o| o.iter().any(|o| self.impure.contains(o)))
    }
}

/// Resolves this frontend's held steps as their inputs are realised. Cheap to clone; the
/// resolved derivations it wrote stay rooted until its last clone is dropped.
#[derive(Clone)]
pub(crate) struct Resolver {
    inner: Arc<Inner>,
    _roots: Arc<RootConnection>,
}

/// The connection whose temporary GC roots keep the resolved derivations written so far (none
/// before the first): held by the resolver's owners only, so that the roots go when the build
/// ends, whatever the dataspace's actors still hold of the resolver's state.
type RootConnection = tokio::sync::Mutex<Option<Lease>>;

struct Inner {
    store_dir: StoreDir,
    pool: DaemonPool,
    /// This machine's store in the dataspace: says whether the inputs' outputs a resolved
    /// derivation refers to are here, and offers the derivation to the others when they are not.
    store: StoreNode,
    requester: String,
    priority: i64,
    settings: StepSettings,
    state: Mutex<State>,
    link: Mutex<Option<Link>>,
    /// The resolver's [`RootConnection`], while it lives.
    roots: Weak<RootConnection>,
}

#[derive(Clone)]
struct Link {
    ds: Arc<Cap>,
    facet: FacetRef,
    handler: Handler,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("held", &self.held())
            .finish_non_exhaustive()
    }
}

impl Resolver {
    /// A resolver for the needed steps of `plan`; the steps it holds back are in
    /// [`Resolver::held`]. Resolved derivations are written through `pool` as `requester`'s
    /// when their inputs' outputs are in the local store, else offered through `store`.
    pub(crate) async fn new(
        plan: &Plan,
        store_dir: StoreDir,
        pool: DaemonPool,
        store: StoreNode,
        requester: &str,
        priority: i64,
        settings: StepSettings,
    ) -> Result<Resolver, ResolverError> {
        let mut state = State::default();
        for (drv, info) in &plan.infos {
            if info.impure {
                state.impure.insert(drv.clone());
            }
            state
                .output_names
                .insert(drv.clone(), info.outputs.keys().cloned().collect());
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
        for drv in &plan.needed {
            let Some(info) = plan.infos.get(drv) else {
                continue;
            };
            let unknown_input = info.input_drvs.iter().any(|i| {
                plan.infos
                    .get(i)
                    .is_some_and(|i| i.outputs.values().any(Option::is_none))
            });
            if !unknown_input {
                if info.outputs.values().any(Option::is_none) {
                    state.floating.insert(drv.clone());
                }
                continue;
            }
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
            let parsed = Derivation::parse_at(&store_dir, &path, &text).map_err(|source| {
                ResolverError::Parse {
                    path: drv.clone(),
                    source,
                }
            })?;
            state.held.insert(
                drv.clone(),
                Held {
                    drv: parsed,
                    info: info.clone(),
                },
            );
        }
        let roots = Arc::new(RootConnection::default());
        Ok(Resolver {
            _roots: Arc::clone(&roots),
            inner: Arc::new(Inner {
                store_dir,
                pool,
                store,
                requester: requester.to_owned(),
                priority,
                settings,
                state: Mutex::new(state),
                link: Mutex::new(None),
                roots: Arc::downgrade(&roots),
            }),
        })
    }

    /// The steps held back until their inputs are realised (not to be demanded directly).
    pub(crate) fn held(&self) -> BTreeSet<String> {
        self.inner
            .state
            .lock()
            .map(|s| s.held.keys().cloned().collect())
            .unwrap_or_default()
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

    /// Record in the local store the realisations of the resolved originals (and of the
    /// content-addressed steps built as they were) whose outputs are valid there
    /// (`RegisterDrvOutput`), so Nix finds their outputs as if it had built them. The resolved
    /// derivations' realisations are recorded too, with the signatures their builders gave
    /// them, as the planner asserts them. Returns how many were registered locally.
    pub(crate) async fn register_realisations(&self) -> Result<usize, RegisterError> {
        let (originals, resolved): (Vec<String>, Vec<String>) = self
            .inner
            .state
            .lock()
            .map(|s| {
                let built_floating = s.floating.iter().filter(|d| s.realised.contains_key(*d));
                (
                    s.resolved.keys().chain(built_floating).cloned().collect(),
                    s.originals.keys().cloned().collect(),
                )
            })
            .unwrap_or_default();
        let mut realisations = self.realisations_of(&originals).await?;
        let mut built = self.realisations_of(&resolved).await?;
        if realisations.is_empty() && built.is_empty() {
            return Ok(0);
        }
        // Learn the signatures of the resolved ones from the planner's records (a frontend
        // asserts no realisations: the planner records them only from the builders).
        if let Some(link) = self.inner.link() {
            let signatures = link.signatures_of(&self.inner.requester, &built).await;
            for r in &mut built {
                if let Some(s) = signatures.get(&r.id) {
                    r.signatures.extend(s.iter().cloned());
                }
            }
        }
        realisations.append(&mut built);
        self.record(realisations).await
    }

    /// Record the realisations of `drv`'s outputs in the local store now, if its outputs were
    /// not known before building (a step the post-build hook is about to see as built).
    pub(crate) async fn register_step(&self, drv: &str) -> Result<usize, RegisterError> {
        let ours = self
            .inner
            .state
            .lock()
            .map(|s| s.floating.contains(drv) || s.resolved.contains_key(drv))
            .unwrap_or(false);
        if !ours {
            return Ok(0);
        }
        let realisations = self.realisations_of(&[drv.to_owned()]).await?;
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

    /// The realisations of the outputs of `drvs` (`.drv` paths) as this frontend saw them built
    /// (none for impure derivations, which Nix never records).
    async fn realisations_of(&self, drvs: &[String]) -> Result<Vec<Realisation>, RegisterError> {
        let store = self.inner.store_dir.clone();
        let mut realisations = Vec::new();
        for drv in drvs {
            let impure = self
                .inner
                .state
                .lock()
                .map(|s| s.is_impure(drv))
                .unwrap_or(false);
            // A resolved derivation offered from memory is not here (nor are the outputs of
            // the inputs it refers to): nothing to read, and its realisation is not needed
            // here (its original's is).
            if impure || !tokio::fs::try_exists(drv).await.unwrap_or(false) {
                continue;
            }
            let path = store.parse(drv).map_err(|source| RegisterError::Path {
                path: drv.clone(),
                source,
            })?;
            let realised = self.realised(drv);
            let dir = store.clone();
            let found = tokio::task::spawn_blocking(move || built_outputs(&dir, &path, &realised))
                .await??;
            realisations.extend(found.into_values());
        }
        Ok(realisations)
    }

    /// Resolve on `ds` from the current facet, reporting originals' outcomes to `handler`;
    /// demands of steps already resolved are asserted again (after rejoining a dataspace).
    pub(crate) fn attach(&self, t: &mut Activation, ds: Arc<Cap>, handler: Handler) {
        if let Ok(mut link) = self.inner.link.lock() {
            *link = Some(Link {
                ds: Arc::clone(&ds),
                facet: t.facet_ref(),
                handler,
            });
        }
        let resolvable = match self.inner.state.lock() {
            Ok(mut state) => {
                for r in state.resolved.values_mut() {
                    r.handles = [ds.assert(t, &r.resolved), ds.assert(t, &r.demand)]
                        .into_iter()
                        .flatten()
                        .collect();
                }
                // Steps whose resolution was lost with the previous connection.
                state.take_resolvable()
            }
            Err(_) => Vec::new(),
        };
        Inner::spawn_resolutions(&self.inner, resolvable);
        let inner = &self.inner;
        enclose!((inner) during!(t, ds, <built $drv: String _ $outputs: Vec<String>>, |t: &mut Activation| {
            Inner::built(&inner, t, &drv, &outputs)
        }));
        enclose!((inner) during!(t, ds, <failed $drv: String $worker: String $reason: String $kind $cause>, |t: &mut Activation| {
            // Transient failures are retried; only final ones stop a resolution.
            match (build::FailureKind::parse(&kind), build::FailureCause::parse(&cause)) {
                (Ok(build::FailureKind::Permanent), Ok(cause)) => inner.failed(t, &drv, &failure_of(&worker, &reason, cause)),
                _ => Ok(()),
            }
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

    /// `drv` was built: record its outputs, report the originals it stands for, and resolve
    /// the held steps this completes.
    fn built(inner: &Arc<Inner>, t: &mut Activation, drv: &str, outputs: &[String]) -> ActorResult {
        let (originals, ready) = {
            let mut state = inner.state.lock().map_err(|_| "resolver state poisoned")?;
            let originals = state.originals.get(drv).cloned().unwrap_or_default();
            let names = state
                .output_names
                .get(drv)
                .or_else(|| originals.iter().find_map(|o| state.output_names.get(o)))
                .cloned()
                .unwrap_or_default();
            let realised: BTreeMap<String, StorePath> = names
                .into_iter()
                .zip(outputs)
                .filter_map(|(n, p)| Some((n, inner.store_dir.parse(p).ok()?)))
                .collect();
            for d in originals.iter().map(String::as_str).chain([drv]) {
                state.realised.insert(d.to_owned(), realised.clone());
            }
            for handle in state.unresolve_stale() {
                t.retract(handle);
            }
            (originals, state.take_resolvable())
        };
        if let Some(link) = inner.link() {
            for original in originals {
                tracing::info!(%original, resolved = %drv, "built through its resolved derivation");
                (link.handler)(
                    t,
                    StepEvent::Built {
                        drv: DrvPath::from(original),
                        worker: WorkerId::default(),
                        outputs: outputs.to_vec(),
                    },
                )?;
            }
        }
        Inner::spawn_resolutions(inner, ready);
        Ok(())
    }

    fn spawn_resolutions(inner: &Arc<Inner>, held: Vec<String>) {
        for original in held {
            let inner = Arc::clone(inner);
            tokio::spawn(async move { inner.resolve(original).await });
        }
    }

    /// `drv` failed: the originals it stands for fail with it, and held steps that need it
    /// cannot be resolved.
    fn failed(&self, t: &mut Activation, drv: &str, failure: &Failure) -> ActorResult {
        let Some(link) = self.link() else {
            return Ok(());
        };
        let mut failures: Vec<(String, Failure)> = Vec::new();
        {
            let mut state = self.state.lock().map_err(|_| "resolver state poisoned")?;
            for original in state.originals.get(drv).cloned().unwrap_or_default() {
                failures.push((original, failure.clone()));
            }
            // Held steps waiting on a failed step, and on those, and so on.
            let mut gone = vec![drv.to_owned()];
            gone.extend(failures.iter().map(|(d, _)| d.clone()));
            while let Some(failed) = gone.pop() {
                let waiting: Vec<String> = state
                    .held
                    .iter()
                    .filter(|(_, h)| h.info.input_drvs.contains(&failed))
                    .map(|(d, _)| d.clone())
                    .collect();
                for d in waiting {
                    state.held.remove(&d);
                    let unresolvable = CannotResolve::InputFailed(DrvPath::from(failed.as_str()));
                    let failure = Failure {
                        worker: None,
                        cause: unresolvable.cause(),
                        reason: unresolvable.to_string(),
                    };
                    failures.push((d.clone(), failure));
                    gone.push(d);
                }
            }
        }
        for (drv, failure) in failures {
            (link.handler)(
                t,
                StepEvent::Failed {
                    drv: DrvPath::from(drv),
                    failure,
                },
            )?;
        }
        Ok(())
    }

    /// Resolve `original`, write the resolved derivation and demand it in the original's place.
    async fn resolve(self: Arc<Self>, original: String) {
        let outcome = self.write_resolved(&original).await;
        let account = Account::new(Some(AnyValue::symbol("resolve")), None);
        // The dataspace may be gone (restarting): then the step is resolved again on rejoining.
        let name = original.clone();
        let delivered = self.link().is_some_and(|link| {
            link.facet.activate(&account, None, |t| {
                match outcome {
                    Ok(mut resolution) => {
                        let to = resolution.resolved.to.clone();
                        tracing::info!(%original, %to, "resolved");
                        resolution.handles = [
                            link.ds.assert(t, &resolution.resolved),
                            link.ds.assert(t, &resolution.demand),
                        ]
                        .into_iter()
                        .flatten()
                        .collect();
                        let (already, stale, ready) = {
                            let mut state =
                                self.state.lock().map_err(|_| "resolver state poisoned")?;
                            state
                                .originals
                                .entry(to.clone())
                                .or_default()
                                .insert(original.clone());
                            state.held.remove(&original);
                            state.resolving.remove(&original);
                            state.resolved.insert(original.clone(), resolution);
                            // An input built anew while this resolution was under way.
                            let stale = state.unresolve_stale();
                            let ready = state.take_resolvable();
                            let already = state.realised.get(&to).map(|r| {
                                r.values()
                                    .map(|p| self.store_dir.print(p))
                                    .collect::<Vec<_>>()
                            });
                            (already, stale, ready)
                        };
                        for handle in stale {
                            t.retract(handle);
                        }
                        Inner::spawn_resolutions(&self, ready);
                        // Another original resolved to the same derivation, already built: this
                        // one is done too (early cut-off), and its `built` will not come again.
                        match already {
                            Some(outputs) => Inner::built(&self, t, &to, &outputs),
                            None => Ok(()),
                        }
                    }
                    Err(reason) => {
                        tracing::warn!(%original, %reason, "cannot resolve");
                        if let Ok(mut state) = self.state.lock() {
                            state.held.remove(&original);
                            state.resolving.remove(&original);
                        }
                        let failure = Failure {
                            worker: None,
                            cause: reason.cause(),
                            reason: reason.to_string(),
                        };
                        (link.handler)(
                            t,
                            StepEvent::Failed {
                                drv: DrvPath::from(original),
                                failure,
                            },
                        )
                    }
                }
            })
        });
        if !delivered {
            tracing::info!(original = %name, "the dataspace went away while resolving; resolving again on rejoining");
            if let Ok(mut state) = self.state.lock() {
                state.resolving.remove(&name);
            }
        }
    }

    /// Write the resolved derivation `text` into the local store (it must come out as `path`,
    /// returned), with `references`, rooted by the resolver's connection while it lives.
    async fn write_here(
        &self,
        path: &StorePath,
        text: &[u8],
        references: &BTreeSet<StorePath>,
    ) -> Result<StorePath, CannotResolve> {
        let roots = self.roots.upgrade().ok_or(CannotResolve::Ended)?;
        let mut roots = roots.lock().await;
        let lease = match roots.as_mut() {
            Some(lease) => lease,
            None => roots.insert(self.pool.lease_for_roots().await?),
        };
        let client = lease.client();
        let written = match client
            .add_text_to_store(path.name(), text, references)
            .await
        {
            Ok(w) if w == *path => client.add_temp_root(path).await.map(|()| w),
            other => other,
        };
        match written {
            Ok(w) => Ok(w),
            Err(e) => {
                let broken = !e.is_recoverable();
                let error = lease.failed(e);
                if broken {
                    // Closed: the next resolution opens another.
                    *roots = None;
                }
                Err(error.into())
            }
        }
    }

    /// The resolved derivation of `original`, written into the local store or offered to the
    /// dataspace.
    async fn write_resolved(&self, original: &str) -> Result<Resolution, CannotResolve> {
        let (held, realised) = {
            let state = self.state.lock().map_err(|_| CannotResolve::Poisoned)?;
            let held = state.held.get(original).ok_or(CannotResolve::NotHeld)?;
            (held.clone(), state.realised.clone())
        };
        let (derivation, info) = (&held.drv, held.info.clone());
        let against = info
            .input_drvs
            .iter()
            .filter_map(|i| Some((i.clone(), realised.get(i)?.clone())))
            .collect();
        let store = &self.store_dir;
        let basic = derivation
            .try_resolve(store, |input, output| {
                realised.get(&store.print(input))?.get(output).cloned()
            })?
            .ok_or(CannotResolve::Unrealised)?;
        let resolved = Derivation::from(basic);
        let text = resolved.to_aterm(store);
        let path = resolved.drv_path(store)?;
        // It refers to its inputs' outputs. When they are all valid here (workers sharing
        // this store built them), it is written here, rooted while the build lasts. When some
        // are not (workers with stores of their own built them), it is offered to the
        // dataspace from memory instead: the worker that builds it fetches it with its inputs
        // from where they are, and nothing but the roots' outputs comes here.
        let inputs: Vec<String> = resolved.input_srcs.iter().map(|p| store.print(p)).collect();
        let placed = if self.store.missing(&inputs).await?.is_empty() {
            self.write_here(&path, &text, &resolved.input_srcs).await?
        } else {
            self.store
                .offer_text(path.name(), &text, &resolved.input_srcs)?
        };
        if placed != path {
            return Err(CannotResolve::WrittenElsewhere {
                written: store.print(&placed),
                expected: store.print(&path),
            });
        }
        let to = store.print(&path);
        let outputs = resolved
            .outputs
            .iter()
            .map(|(name, output)| {
                expected_outputs::entry(name, output.path().map(|p| store.print(p)).as_deref())
            })
            .collect();
        Ok(Resolution {
            held,
            resolved: build::Resolved {
                from: original.to_owned(),
                to: to.clone(),
                system: info.system.clone(),
            },
            demand: build::Demand {
                drv: to,
                step: build::StepInfo {
                    system: info.system,
                    features: info.features,
                    input_drvs: Vec::new(),
                    settings: self.settings.of(original).to_wire(),
                    outputs,
                },
                requester: self.requester.clone(),
                priority: self.priority.into(),
                depth: 0.into(),
            },
            against,
            handles: Vec::new(),
        })
    }
}
