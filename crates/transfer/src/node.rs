//! One participant's store in the dataspace: serving its paths to others and fetching what
//! it lacks.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nixspace_nix_formats::signature::PublicKeys;
use nixspace_nix_formats::store_path::{StorePath, StorePathError};
use nixspace_nix_protocol::ValidPathInfo;
use nixspace_nix_tools::{DaemonPool, StepError};
use nixspace_protocol::on_retraction;
use nixspace_protocol::store;
use syndicate::actor::{
    Account, Activation, ActorResult, AnyValue, Cap, Entity, ExitStatus, FacetId, FacetRef,
};
use syndicate::enclose;
use syndicate_macros::during;
use tokio::sync::{mpsc, watch};

use crate::closure::{Claimed, ClosureLimits, ClosureTooLarge};
use crate::inflight::{Claim, FetchId, Inflight, Ownership, WaitCycle};
use crate::nar_stream::{receive, NarReceiver, STREAM_IDLE};
use crate::path_info::{from_wire, PathInfoError};
use crate::realisations::wanted_realisation;
use crate::source::{serve, DaemonSource, OfferedRealisation, PathSource, Role};
use crate::trust::{SharedTrust, TrustPolicy, Untrusted};
use crate::vouch::{Vouch, VouchingSource};

/// How long a fetch waits for some store to say it has the path, by default.
pub const WANT_PATIENCE: Duration = Duration::from_secs(30);

/// How long a store node waits for other stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// How long a fetch waits for some store to have the path.
    pub want: Duration,
    /// How long a NAR stream, sent or received, may stall (a receiver granting no credit, a
    /// sender sending no data) before it is abandoned.
    pub stream_idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            want: WANT_PATIENCE,
            stream_idle: STREAM_IDLE,
        }
    }
}

/// How long a worker waits for substituters to say whether they have a path.
const SUBSTITUTE_PATIENCE: Duration = Duration::from_secs(5);

/// Whom a fetch waits for.
#[derive(Clone, Copy)]
enum Patience<'a> {
    /// Any store, for up to this long.
    Anyone(Duration),
    /// These substituters, until each said it lacks the path (or [`SUBSTITUTE_PATIENCE`]).
    Substitutes(&'a BTreeSet<String>),
}

impl Patience<'_> {
    /// How long to wait for the first answer.
    fn initial(&self) -> Duration {
        match self {
            Patience::Anyone(patience) => *patience,
            Patience::Substitutes(_) => SUBSTITUTE_PATIENCE,
        }
    }
}

/// What a fetch copies.
#[derive(Clone, Copy)]
enum Scope {
    /// The path and whatever of its closure is missing (the fetch with this id collects the
    /// closure's path-infos first, then adds the paths in dependency order).
    Closure(FetchId),
    /// The path alone: its references must be valid already (it is one path of a closure
    /// being added in dependency order).
    Alone,
    /// The path alone, valid here but with contents other than the store registered: added
    /// again in Nix's repair mode, which replaces them. Its references must be valid.
    Replace,
}

/// How many wants a fetch holds at once while it collects a closure's path-infos.
const WANTS_AT_ONCE: usize = 256;

/// A want being held, and the answers to it.
struct Wanted {
    /// Stopping it withdraws the want.
    facet: ChildFacet,
    /// `(store, info)` of each other store that has the path.
    offers: mpsc::UnboundedReceiver<(String, store::PathInfo)>,
    /// Substituters that lack it.
    missing: mpsc::UnboundedReceiver<String>,
}

/// Why a path could not be made valid in the local store.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// The node is not attached to a dataspace (yet, or any more).
    #[error("not connected to a dataspace")]
    Detached,
    /// The connection to the dataspace dropped while fetching.
    #[error("the connection to the dataspace was lost while fetching {0}")]
    LinkLost(String),
    /// Nobody answered the want.
    #[error("no store in the dataspace has {0} (waited {1:?})")]
    Nowhere(String, Duration),
    /// Every store that had the path failed to send a good copy.
    #[error("cannot fetch {path}: {}", reasons_text(reasons))]
    Failed {
        /// The path.
        path: String,
        /// What went wrong with each store tried, by store.
        reasons: Vec<(String, CopyError)>,
    },
    /// A path to fetch is not a store path of the local store.
    #[error("local store: {path}: {source}")]
    BadPath {
        /// The path.
        path: String,
        /// Why.
        #[source]
        source: StorePathError,
    },
    /// The local store could not be asked or written.
    #[error("local store: {0}")]
    Local(Arc<StepError>),
}

impl FetchError {
    /// The path no store in the dataspace has, when that is why this fetch failed: the path
    /// itself, or a reference the first store offering it could not get either (what the
    /// planner builds again).
    pub fn missing_path(&self) -> Option<&str> {
        let mut error = self;
        loop {
            match error {
                FetchError::Nowhere(path, _) => return Some(path),
                FetchError::Failed { reasons, .. } => match reasons.first() {
                    Some((_, CopyError::References(inner))) => error = inner,
                    _ => return None,
                },
                _ => return None,
            }
        }
    }
}

/// Why a copy of a path from one store failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CopyError {
    /// The store's path info is malformed.
    #[error(transparent)]
    PathInfo(#[from] PathInfoError),
    /// The path's references could not be fetched first.
    #[error("its references: {0}")]
    References(Box<FetchError>),
    /// The claimed references of the path's closure form a cycle (each path refers to the
    /// next, the last to the first): no order adds them, so none is added.
    #[error("its claimed references form a cycle: {}", .0.join(" -> "))]
    ReferenceCycle(Vec<String>),
    /// The claimed closure is past this store's bounds.
    #[error(transparent)]
    TooLarge(#[from] ClosureTooLarge),
    /// The path is claimed with references that are not valid here, though its closure was
    /// added first (its claim changed since).
    #[error("its references are not valid here: {}", .0.join(" "))]
    ReferencesNotValid(Vec<String>),
    /// The path is neither signed by a key this store trusts nor content-addressed (with an
    /// address that gives its path): nothing of it is asked for or added.
    #[error(transparent)]
    Untrusted(#[from] Untrusted),
    /// The connection to the dataspace dropped during the copy.
    #[error("the connection to the dataspace was lost")]
    LinkLost,
    /// The local store could not be written (or refused the NAR).
    #[error(transparent)]
    Store(Arc<StepError>),
}

/// `from A: reason; from B: reason`.
fn reasons_text(reasons: &[(String, CopyError)]) -> String {
    reasons
        .iter()
        .map(|(holder, reason)| format!("from {holder}: {reason}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// A participant's Nix store in the dataspace, named (a worker's id, a frontend's requester).
/// Cheap to clone.
#[derive(Clone)]
pub struct StoreNode {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    pool: DaemonPool,
    timeouts: Timeouts,
    limits: ClosureLimits,
    link: Mutex<Option<Link>>,
    /// Fetches under way, so that a path is fetched once however many steps need it.
    inflight: Inflight<Fetched>,
    fetched: AtomicU64,
    fetched_bytes: AtomicU64,
    /// The substituters in the dataspace.
    substituters: Mutex<BTreeSet<String>>,
    /// Which keys' signatures make a path trusted here.
    trust: Arc<SharedTrust>,
    /// The paths this store's holder vouches for, if any.
    vouch: Mutex<Option<Arc<Vouch>>>,
}

/// The dataspace the node is attached to, and the facet its assertions live in.
#[derive(Clone)]
pub(crate) struct Link {
    pub(crate) ds: Arc<Cap>,
    facet: FacetRef,
    /// Turns true when the actor holding the connection ends (the connection dropped).
    lost: watch::Receiver<bool>,
}

impl Link {
    /// A link to `ds` from the current facet, lost when the facet's actor ends.
    pub(crate) fn attach(t: &mut Activation, ds: Arc<Cap>) -> Link {
        let (lost_tx, lost) = watch::channel(false);
        let watch = t.create_ref(LinkWatch(lost_tx));
        t.add_exit_hook(&watch);
        Link {
            ds,
            facet: t.facet_ref(),
            lost,
        }
    }

    /// Ask `holder` for `printed`'s NAR, to be checked against `info`, abandoned when it
    /// stalls for `idle`: the request (withdrawn when dropped) and the stream.
    pub(crate) fn request_nar(
        &self,
        printed: &str,
        holder: &str,
        info: &ValidPathInfo,
        idle: Duration,
    ) -> (ChildFacet, NarReceiver) {
        let (sink, nar) = receive(
            self.facet.clone(),
            info.info.nar_hash.clone(),
            info.info.nar_size,
            idle,
        );
        let request = ChildFacet::start(self, |t| {
            let sink = t.create_cap(sink);
            self.ds.assert(
                t,
                &store::NarRequest {
                    path: printed.to_owned(),
                    store: holder.to_owned(),
                    sink,
                },
            );
            Ok(())
        });
        (request, nar)
    }

    pub(crate) fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Resolves once the connection is gone.
    pub(crate) async fn until_lost(&self) {
        let mut lost = self.lost.clone();
        let _ = lost.wait_for(|l| *l).await;
    }
}

/// Tells a [`Link`] that its actor ended: an exit hook runs however the actor ends.
struct LinkWatch(watch::Sender<bool>);

impl Entity<()> for LinkWatch {
    fn exit_hook(&mut self, _t: &mut Activation, _status: &Arc<ExitStatus>) {
        self.0.send_replace(true);
    }
}

/// How many times a fetch cut by a lost connection is tried again on the next one.
const RELINK_TRIES: usize = 3;

impl std::fmt::Debug for StoreNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreNode")
            .field("name", &self.inner.name)
            .field("fetched", &self.fetched())
            .finish_non_exhaustive()
    }
}

/// The outcome of one fetch, shared by everyone waiting for it.
type Fetched = Result<(), FetchError>;

/// An account for turns started outside the actor (tasks, callbacks).
pub(crate) fn account(what: &'static str) -> Arc<Account> {
    Account::new(Some(AnyValue::symbol(what)), None)
}

impl StoreNode {
    /// The store reached through `pool`, known in the dataspace as `name`.
    pub fn new(name: impl Into<String>, pool: DaemonPool) -> StoreNode {
        StoreNode::with_timeouts(name, pool, Timeouts::default())
    }

    /// Like [`StoreNode::new`], with fetches waiting up to `timeouts.want` for some store to
    /// have a path before giving up with [`FetchError::Nowhere`], and NAR streams abandoned
    /// when they stall for `timeouts.stream_idle`.
    pub fn with_timeouts(
        name: impl Into<String>,
        pool: DaemonPool,
        timeouts: Timeouts,
    ) -> StoreNode {
        StoreNode::with_limits(name, pool, timeouts, ClosureLimits::default())
    }

    /// Like [`StoreNode::with_timeouts`], taking at most `limits` of a closure from other
    /// stores' claims in one fetch (past them a fetch fails with [`CopyError::TooLarge`]).
    pub fn with_limits(
        name: impl Into<String>,
        pool: DaemonPool,
        timeouts: Timeouts,
        limits: ClosureLimits,
    ) -> StoreNode {
        StoreNode {
            inner: Arc::new(Inner {
                name: name.into(),
                pool,
                timeouts,
                limits,
                link: Mutex::new(None),
                inflight: Inflight::new(),
                fetched: AtomicU64::new(0),
                fetched_bytes: AtomicU64::new(0),
                substituters: Mutex::new(BTreeSet::new()),
                trust: SharedTrust::new(TrustPolicy::from_nix_conf()),
                vouch: Mutex::new(None),
            }),
        }
    }

    /// Trust signatures by `keys` too (besides the local Nix configuration's
    /// `trusted-public-keys` and the keys announced in the dataspace), for paths fetched from
    /// now on.
    pub fn trust_keys(&self, keys: &PublicKeys) {
        if let Ok(mut trust) = self.inner.trust.lock() {
            trust.add(keys);
        }
    }

    /// Serve the path-infos of `vouch`'s paths with its signature, from the next
    /// [`StoreNode::attach`] on.
    pub fn vouch(&self, vouch: Arc<Vouch>) {
        if let Ok(mut v) = self.inner.vouch.lock() {
            *v = Some(vouch);
        }
    }

    /// The keys whose signatures make a fetched path trusted here now.
    pub fn trusted_keys(&self) -> PublicKeys {
        self.inner
            .trust
            .lock()
            .map(|t| t.keys())
            .unwrap_or_default()
    }

    /// The store's name in the dataspace.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// How many paths were fetched into this store, and how many NAR bytes.
    pub fn fetched(&self) -> (u64, u64) {
        (
            self.inner.fetched.load(Ordering::Relaxed),
            self.inner.fetched_bytes.load(Ordering::Relaxed),
        )
    }

    /// Serve this store on `ds` from the current facet, and fetch through it from now on
    /// (call again after rejoining a dataspace: fetches cut by the lost connection are
    /// tried again on the new one).
    pub fn attach(&self, t: &mut Activation, ds: Arc<Cap>) {
        // Substituters are learnt anew on this connection.
        if let Ok(mut s) = self.inner.substituters.lock() {
            s.clear();
        }
        if let Ok(mut link) = self.inner.link.lock() {
            *link = Some(Link::attach(t, Arc::clone(&ds)));
        }
        let store = DaemonSource(self.inner.pool.clone());
        let vouch = self.inner.vouch.lock().ok().and_then(|v| v.clone());
        let source: Arc<dyn PathSource> = match vouch {
            Some(vouch) => Arc::new(VouchingSource { store, vouch }),
            None => Arc::new(store),
        };
        serve(
            t,
            &ds,
            &self.inner.name,
            source,
            Role::Peer,
            self.inner.timeouts.stream_idle,
        );
        let inner = &self.inner;
        enclose!((inner) during!(t, ds, <substituter $name: String>, |t: &mut Activation| {
            if let Ok(mut s) = inner.substituters.lock() {
                s.insert(name.clone());
            }
            on_retraction(t, enclose!((inner, name) move |_t| {
                if let Ok(mut s) = inner.substituters.lock() {
                    s.remove(&name);
                }
                Ok(())
            }));
            Ok(())
        }));
        inner.trust.follow_announcements(t, &ds);
    }

    /// Whether any substituter is in the dataspace (else [`StoreNode::substitute`] has nobody
    /// to ask).
    pub fn has_substituters(&self) -> bool {
        self.inner.substituters.lock().is_ok_and(|s| !s.is_empty())
    }

    /// The substituters in the dataspace now.
    fn substituters(&self) -> BTreeSet<String> {
        self.inner
            .substituters
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Make `paths` valid in this store from what the dataspace already has (substituters and
    /// peers), without waiting for anything to be built: `Ok(true)` if all are valid now,
    /// `Ok(false)` if some store lacks one (or there is no substituter to ask).
    pub async fn substitute(&self, paths: &[String]) -> Result<bool, FetchError> {
        let substituters = self.substituters();
        if substituters.is_empty() {
            return Ok(false);
        }
        let parsed = self.parse_all(paths)?;
        let valid = self.inner.valid(&parsed).await?;
        for path in parsed.difference(&valid) {
            match self
                .inner
                .fetch_once(path, Patience::Substitutes(&substituters))
                .await
            {
                Ok(()) => {}
                Err(FetchError::Nowhere(..)) => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// The realisations of the derivation outputs `ids` that substituters offer with a
    /// signature this store trusts, by id: `Ok(None)` if some output has none (or there is no
    /// substituter to ask). Waits for each substituter's answer, at most
    /// [`SUBSTITUTE_PATIENCE`] per output. Fetch the paths with [`StoreNode::substitute`].
    pub async fn substitute_realisations(
        &self,
        ids: &[String],
    ) -> Result<Option<BTreeMap<String, OfferedRealisation>>, FetchError> {
        let substituters = self.substituters();
        if substituters.is_empty() {
            return Ok(None);
        }
        let link = self.inner.link()?;
        let mut found = BTreeMap::new();
        for id in ids {
            let trusts = |offer: &OfferedRealisation| {
                let Ok(path) = self.inner.pool.store_dir().parse(&offer.path) else {
                    return false;
                };
                self.inner.trust.lock().is_ok_and(|trust| {
                    trust.trusts_realisation(id, &path.to_string(), &offer.signatures)
                })
            };
            let offered = wanted_realisation(
                &link,
                &self.inner.name,
                id,
                &substituters,
                SUBSTITUTE_PATIENCE,
                trusts,
            )
            .await;
            if link.is_lost() {
                return Err(FetchError::Detached);
            }
            match offered {
                Some(offer) => {
                    found.insert(id.clone(), offer);
                }
                None => return Ok(None),
            }
        }
        Ok(Some(found))
    }

    /// `paths` as store paths of this store.
    fn parse_all(&self, paths: &[String]) -> Result<BTreeSet<StorePath>, FetchError> {
        let store_dir = self.inner.pool.store_dir();
        paths
            .iter()
            .map(|p| {
                store_dir.parse(p).map_err(|source| FetchError::BadPath {
                    path: p.clone(),
                    source,
                })
            })
            .collect()
    }

    /// Which of `paths` (printed store paths) are not valid in this store.
    pub async fn missing(&self, paths: &[String]) -> Result<Vec<String>, FetchError> {
        let parsed = self.parse_all(paths)?;
        let valid = self.inner.valid(&parsed).await?;
        let store_dir = self.inner.pool.store_dir();
        Ok(parsed
            .difference(&valid)
            .map(|p| store_dir.print(p))
            .collect())
    }

    /// What `path` (printed) is registered with: from this store if it is valid here, else
    /// from the first other store in the dataspace that answers a want within `patience`.
    /// Its references are what a closure is computed from.
    pub async fn path_info(
        &self,
        path: &str,
        patience: Duration,
    ) -> Result<store::PathInfo, FetchError> {
        self.parse_all(&[path.to_owned()])?;
        if let Some(info) = DaemonSource(self.inner.pool.clone()).path_info(path).await {
            return Ok(info);
        }
        let link = self.inner.link()?;
        let mut wanted = self.inner.want(&link, path);
        match tokio::time::timeout(patience, wanted.offers.recv()).await {
            Ok(Some((_, info))) => Ok(info),
            _ => Err(FetchError::Nowhere(path.to_owned(), patience)),
        }
    }

    /// Make `paths` (printed store paths) and their closures valid in this store, fetching
    /// what is missing from the stores in the dataspace.
    pub async fn ensure(&self, paths: &[String]) -> Result<(), FetchError> {
        let parsed = self.parse_all(paths)?;
        self.inner.ensure(parsed).await
    }

    /// Replace each of `paths` (printed store paths, valid here but with contents other than
    /// the store registered) with a good copy from another store in the dataspace, added in
    /// Nix's repair mode; their references must be valid here. What `--repair` needs for a
    /// path that a worker with a store of its own made again.
    pub async fn repair(&self, paths: &[String]) -> Result<(), FetchError> {
        for path in self.parse_all(paths)? {
            let patience = Patience::Anyone(self.inner.timeouts.want);
            self.inner
                .fetch_across_reconnections(&path, patience, Scope::Replace)
                .await?;
        }
        Ok(())
    }
}

impl Inner {
    fn link(&self) -> Result<Link, FetchError> {
        self.link
            .lock()
            .ok()
            .and_then(|l| l.clone())
            .ok_or(FetchError::Detached)
    }

    /// Make `paths` and their closures valid in the local store.
    async fn ensure(self: &Arc<Self>, paths: BTreeSet<StorePath>) -> Result<(), FetchError> {
        let valid = self.valid(&paths).await?;
        for path in paths.difference(&valid) {
            self.fetch_once(path, Patience::Anyone(self.timeouts.want))
                .await?;
        }
        Ok(())
    }

    /// Which of `paths` are valid in the local store.
    async fn valid(&self, paths: &BTreeSet<StorePath>) -> Result<BTreeSet<StorePath>, FetchError> {
        if paths.is_empty() {
            return Ok(BTreeSet::new());
        }
        let mut lease = self
            .pool
            .lease()
            .await
            .map_err(|e| FetchError::Local(Arc::new(e)))?;
        match lease.client().query_valid_paths(paths, false).await {
            Ok(v) => {
                lease.release();
                Ok(v)
            }
            Err(e) => Err(FetchError::Local(Arc::new(lease.failed(e)))),
        }
    }

    /// Fetch `path` and what of its closure is missing, waiting as `patience` says, or wait
    /// for the fetch of it already under way (a path is fetched once however many steps, or
    /// substitutions, need it).
    async fn fetch_once(self: &Arc<Self>, path: &StorePath, patience: Patience<'_>) -> Fetched {
        loop {
            match self.inflight.claim(path) {
                Claim::Own(own) => {
                    let scope = Scope::Closure(own.id());
                    return self.run(own, path, patience, scope).await;
                }
                Claim::Wait(wait) => {
                    if let Some(fetched) = wait.outcome().await {
                        return fetched;
                    }
                }
            }
        }
    }

    /// For the closure fetch `fetch`: fetch `path` alone (its references are valid by now),
    /// or wait for the fetch of it under way, unless that fetch waits on `fetch` (the claims
    /// it was ordered by form a cycle with those `fetch` collected).
    async fn fetch_reference(
        self: &Arc<Self>,
        fetch: FetchId,
        path: &StorePath,
    ) -> Result<(), CopyError> {
        loop {
            let claim = self
                .inflight
                .claim_for(path, fetch)
                .map_err(|WaitCycle(cycle)| CopyError::ReferenceCycle(self.print_all(&cycle)))?;
            let fetched = match claim {
                Claim::Own(own) => {
                    let patience = Patience::Anyone(self.timeouts.want);
                    // Boxed: a fetch of a path alone copies no closure, so this nests once,
                    // however long the closure.
                    Some(Box::pin(self.run(own, path, patience, Scope::Alone)).await)
                }
                Claim::Wait(wait) => wait.outcome().await,
            };
            if let Some(fetched) = fetched {
                return fetched.map_err(|e| CopyError::References(Box::new(e)));
            }
        }
    }

    /// Do the fetch `own` stands for, and give its outcome to whoever waits for it.
    async fn run(
        self: &Arc<Self>,
        own: Ownership<'_, Fetched>,
        path: &StorePath,
        patience: Patience<'_>,
        scope: Scope,
    ) -> Fetched {
        // Fetching an earlier path may have fetched this one as its reference.
        let one = BTreeSet::from([path.clone()]);
        let fetched = match self.valid(&one).await {
            Ok(valid) if valid.contains(path) => Ok(()),
            Ok(_) => self.fetch_across_reconnections(path, patience, scope).await,
            Err(e) => Err(e),
        };
        own.finish(fetched.clone());
        fetched
    }

    /// `paths`, printed.
    fn print_all(&self, paths: &[StorePath]) -> Vec<String> {
        let store_dir = self.pool.store_dir();
        paths.iter().map(|p| store_dir.print(p)).collect()
    }

    /// Fetch `path`; when the connection drops mid-fetch, fetch it again over the next one.
    async fn fetch_across_reconnections(
        self: &Arc<Self>,
        path: &StorePath,
        patience: Patience<'_>,
        scope: Scope,
    ) -> Result<(), FetchError> {
        let mut tries = 1;
        loop {
            match self.fetch_within(path, patience, scope).await {
                Err(FetchError::LinkLost(printed)) if tries < RELINK_TRIES => {
                    tries += 1;
                    tracing::warn!(path = %printed, "connection lost while fetching; fetching again once rejoined");
                    self.relinked().await?;
                }
                result => return result,
            }
        }
    }

    /// Wait (up to the want patience) until the node is attached to a live connection.
    async fn relinked(&self) -> Result<(), FetchError> {
        let deadline = tokio::time::Instant::now() + self.timeouts.want;
        while self.link().map_or(true, |l| l.is_lost()) {
            if tokio::time::Instant::now() >= deadline {
                return Err(FetchError::Detached);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Want `path`, then copy it (in `scope`) from the first store that has it and sends a
    /// good copy.
    async fn fetch_within(
        self: &Arc<Self>,
        path: &StorePath,
        patience: Patience<'_>,
        scope: Scope,
    ) -> Result<(), FetchError> {
        let printed = self.pool.store_dir().print(path);
        let link = self.link()?;
        let Wanted {
            facet: want,
            mut offers,
            mut missing,
        } = self.want(&link, &printed);
        let mut reasons = Vec::new();
        let mut wait = patience.initial();
        let mut lacking = match patience {
            Patience::Anyone(_) => BTreeSet::new(),
            Patience::Substitutes(s) => s.clone(),
        };
        loop {
            let offer = tokio::time::timeout(wait, async {
                loop {
                    tokio::select! {
                        offer = offers.recv() => return offer,
                        () = link.until_lost() => return None,
                        Some(store) = missing.recv() => {
                            lacking.remove(&store);
                            // Every substituter asked said it lacks the path.
                            if matches!(patience, Patience::Substitutes(_)) && lacking.is_empty() {
                                return None;
                            }
                        }
                    }
                }
            })
            .await;
            let Ok(Some((holder, info))) = offer else {
                break;
            };
            // Later offers are alternatives: do not wait long for them.
            wait = Duration::from_secs(2);
            let copied = match scope {
                Scope::Closure(fetch) => {
                    self.copy_closure(&link, fetch, path, &printed, &holder, &info)
                        .await
                }
                Scope::Alone | Scope::Replace => {
                    let repair = matches!(scope, Scope::Replace);
                    self.copy_alone(&link, path, &printed, &holder, &info, repair)
                        .await
                }
            };
            match copied {
                Ok(size) => {
                    self.fetched.fetch_add(1, Ordering::Relaxed);
                    self.fetched_bytes.fetch_add(size, Ordering::Relaxed);
                    tracing::info!(path = %printed, from = %holder, size, "fetched");
                    drop(want);
                    return Ok(());
                }
                Err(reason) => {
                    tracing::warn!(path = %printed, from = %holder, %reason, "fetch failed");
                    reasons.push((holder, reason));
                }
            }
        }
        drop(want);
        if link.is_lost() {
            return Err(FetchError::LinkLost(printed));
        }
        if reasons.is_empty() {
            Err(FetchError::Nowhere(printed, patience.initial()))
        } else {
            Err(FetchError::Failed {
                path: printed,
                reasons,
            })
        }
    }

    /// Assert `<want printed me>` in a child facet of `link`'s, forwarding other stores'
    /// `available` answers and substituters' `missing` ones while it lasts.
    fn want(&self, link: &Link, printed: &str) -> Wanted {
        let (tx, offers) = mpsc::unbounded_channel();
        let (missing_tx, missing) = mpsc::unbounded_channel();
        let me = self.name.clone();
        let printed = printed.to_owned();
        let facet = ChildFacet::start(link, |t| {
            link.ds.assert(
                t,
                &store::Want {
                    path: printed.clone(),
                    store: me.clone(),
                },
            );
            let literal = AnyValue::new(printed.clone());
            enclose!((me, literal) during!(t, link.ds, <available #(literal) $store: String $info: store::PathInfo>, |_t| {
                if store != me {
                    let _ = tx.send((store.clone(), info.clone()));
                }
                Ok(())
            }));
            during!(t, link.ds, <missing #(literal) $store: String>, |_t| {
                let _ = missing_tx.send(store.clone());
                Ok(())
            });
            Ok(())
        });
        tracing::debug!(path = %printed, "wanted");
        Wanted {
            facet,
            offers,
            missing,
        }
    }

    /// Copy `path` from `holder`, claimed as `wire`, with what of its closure is missing:
    /// first every missing path's path-info (as other stores claim it, iteratively, within
    /// the limits), then, if no cycle is claimed, each path in dependency order (fetched
    /// alone, or waited for if another fetch has it under way), `path` last. Returns the size
    /// of `path`'s NAR.
    async fn copy_closure(
        self: &Arc<Self>,
        link: &Link,
        fetch: FetchId,
        path: &StorePath,
        printed: &str,
        holder: &str,
        wire: &store::PathInfo,
    ) -> Result<u64, CopyError> {
        let info = from_wire(self.pool.store_dir(), path, wire)?;
        let order = self
            .claimed_closure(link, path, printed, wire, &info)
            .await?;
        for reference in order.iter().filter(|r| *r != path) {
            self.fetch_reference(fetch, reference).await?;
        }
        self.add_nar(link, printed, holder, &info, false).await
    }

    /// The missing paths of `root`'s closure (claimed as `wire`, parsed as `info`), each after
    /// those it refers to: their path-infos asked for level by level, as others claim them.
    async fn claimed_closure(
        &self,
        link: &Link,
        root: &StorePath,
        printed: &str,
        wire: &store::PathInfo,
        info: &ValidPathInfo,
    ) -> Result<Vec<StorePath>, CopyError> {
        let store_dir = self.pool.store_dir();
        let mut claimed = Claimed::new(self.limits);
        let mut asked = HashSet::from([root.clone()]);
        let mut frontier = claimed.add(root, printed, wire, &info.info.references)?;
        loop {
            frontier.retain(|p| asked.insert(p.clone()));
            if frontier.is_empty() {
                break;
            }
            let valid = self
                .valid(&frontier)
                .await
                .map_err(|e| CopyError::References(Box::new(e)))?;
            let missing: Vec<StorePath> = frontier.difference(&valid).cloned().collect();
            claimed.room_for(missing.len())?;
            let mut next = BTreeSet::new();
            for batch in missing.chunks(WANTS_AT_ONCE) {
                for (path, printed, wire) in self.claims(link, batch).await? {
                    let info = from_wire(store_dir, &path, &wire)?;
                    next.extend(claimed.add(&path, &printed, &wire, &info.info.references)?);
                }
            }
            frontier = next;
        }
        claimed
            .dependency_order()
            .map_err(|cycle| CopyError::ReferenceCycle(self.print_all(&cycle)))
    }

    /// What the first store to answer a want for each of `paths` claims about it, wanting
    /// them all at once (up to the want patience in all).
    async fn claims(
        &self,
        link: &Link,
        paths: &[StorePath],
    ) -> Result<Vec<(StorePath, String, store::PathInfo)>, CopyError> {
        let store_dir = self.pool.store_dir();
        let patience = self.timeouts.want;
        let wants: Vec<(StorePath, String, Wanted)> = paths
            .iter()
            .map(|p| {
                let printed = store_dir.print(p);
                let wanted = self.want(link, &printed);
                (p.clone(), printed, wanted)
            })
            .collect();
        let deadline = tokio::time::Instant::now() + patience;
        let mut claims = Vec::with_capacity(wants.len());
        for (path, printed, mut wanted) in wants {
            let offer = tokio::time::timeout_at(deadline, async {
                tokio::select! {
                    offer = wanted.offers.recv() => offer,
                    () = link.until_lost() => None,
                }
            })
            .await;
            match offer {
                Ok(Some((_, wire))) => claims.push((path, printed, wire)),
                _ if link.is_lost() => return Err(CopyError::LinkLost),
                _ => {
                    let nowhere = FetchError::Nowhere(printed, patience);
                    return Err(CopyError::References(Box::new(nowhere)));
                }
            }
        }
        Ok(claims)
    }

    /// Copy `path` from `holder`, claimed as `wire`, whose references must be valid here (in
    /// Nix's repair mode if `repair`: a valid path's contents are replaced).
    async fn copy_alone(
        &self,
        link: &Link,
        path: &StorePath,
        printed: &str,
        holder: &str,
        wire: &store::PathInfo,
        repair: bool,
    ) -> Result<u64, CopyError> {
        let info = from_wire(self.pool.store_dir(), path, wire)?;
        let references: BTreeSet<StorePath> = info
            .info
            .references
            .iter()
            .filter(|r| *r != path)
            .cloned()
            .collect();
        let valid = self
            .valid(&references)
            .await
            .map_err(|e| CopyError::References(Box::new(e)))?;
        let missing: Vec<StorePath> = references.difference(&valid).cloned().collect();
        if !missing.is_empty() {
            return Err(CopyError::ReferencesNotValid(self.print_all(&missing)));
        }
        self.add_nar(link, printed, holder, &info, repair).await
    }

    /// Stream `printed`'s NAR from `holder` into the local store, registered as `info` (in
    /// Nix's repair mode if `repair`). Returns the NAR size.
    async fn add_nar(
        &self,
        link: &Link,
        printed: &str,
        holder: &str,
        info: &ValidPathInfo,
        repair: bool,
    ) -> Result<u64, CopyError> {
        let trusted = self
            .trust
            .lock()
            .map_err(|_| CopyError::LinkLost)?
            .check(self.pool.store_dir(), info);
        let trusted = match trusted {
            Ok(trusted) => trusted,
            Err(untrusted) => {
                tracing::warn!(path = %printed, %holder, reason = %untrusted, "refusing a path another store offers");
                return Err(untrusted.into());
            }
        };
        tracing::debug!(path = %printed, %holder, ?trusted, "adding a fetched path");
        let (_request, mut nar) =
            link.request_nar(printed, holder, info, self.timeouts.stream_idle);
        let mut lease = self
            .pool
            .lease()
            .await
            .map_err(|e| CopyError::Store(Arc::new(e)))?;
        // Our own daemon, trusted: a path we found signed by a trusted key is added without
        // its signature check (it may not know the keys announced in the dataspace); a
        // content-addressed one with it, so that the daemon checks the content against the
        // address. The hash is checked either way. A stream cut by a lost connection ends at
        // once: dropping the lease interrupts its daemon connection mid-NAR, so the daemon
        // registers nothing.
        let dont_check_sigs = trusted.dont_check_sigs();
        let added = tokio::select! {
            added = lease.client().add_to_store_nar(info, &mut nar, repair, dont_check_sigs) => added,
            () = link.until_lost() => return Err(CopyError::LinkLost),
        };
        match added {
            Ok(()) => {
                // The daemon roots what it added for as long as its connection lasts: the
                // path must not stay rooted for this node's whole life.
                lease.retire();
                Ok(nar.received())
            }
            Err(e) => Err(CopyError::Store(Arc::new(lease.failed(e)))),
        }
    }
}

/// A child facet of the link's facet, stopped (withdrawing what it asserted) when dropped.
pub(crate) struct ChildFacet {
    facet: FacetRef,
    id: Option<FacetId>,
}

impl ChildFacet {
    pub(crate) fn start(
        link: &Link,
        body: impl FnOnce(&mut Activation) -> ActorResult,
    ) -> ChildFacet {
        let mut id = None;
        link.facet.activate(&account("transfer"), None, |t| {
            id = Some(t.facet(body)?);
            Ok(())
        });
        ChildFacet {
            facet: link.facet.clone(),
            id,
        }
    }
}

impl Drop for ChildFacet {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.facet.activate(&account("transfer-done"), None, |t| {
                t.stop_facet(id);
                Ok(())
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_missing_path_is_found_under_a_reference_that_failed() {
        let nowhere = || FetchError::Nowhere("/nix/store/a-input".into(), Duration::from_secs(1));
        assert_eq!(nowhere().missing_path(), Some("/nix/store/a-input"));
        let through_reference = FetchError::Failed {
            path: "/nix/store/b-top.drv".into(),
            reasons: vec![(
                "frontend".into(),
                CopyError::References(Box::new(nowhere())),
            )],
        };
        assert_eq!(through_reference.missing_path(), Some("/nix/store/a-input"));
        // Any other failure names no missing path.
        let refused = FetchError::Failed {
            path: "/nix/store/b-top.drv".into(),
            reasons: vec![("liar".into(), CopyError::LinkLost)],
        };
        assert_eq!(refused.missing_path(), None);
        assert_eq!(FetchError::Detached.missing_path(), None);
    }
}
