//! One participant's store in the dataspace: serving its paths to others and fetching what
//! it lacks.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nixspace_nix_formats::store_path::StorePath;
use nixspace_nix_protocol::ValidPathInfo;
use nixspace_nix_tools::DaemonPool;
use nixspace_protocol::store::{self, NarReply};
use preserves_schema::Parse;
use syndicate::actor::{
    Account, Activation, ActorResult, AnyValue, Cap, Entity, FacetId, FacetRef,
    LinkedTaskTermination,
};
use syndicate::enclose;
use syndicate_macros::during;
use tokio::sync::{mpsc, OnceCell};

use crate::nar_stream::{NarReceiver, NarSender};
use crate::path_info::{from_wire, to_wire};

/// How long a fetch waits for some store to say it has the path.
pub const WANT_PATIENCE: Duration = Duration::from_secs(30);

/// How long a NAR stream may stay silent before the transfer is abandoned.
const STREAM_IDLE: Duration = Duration::from_secs(60);

/// Why a path could not be made valid in the local store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// The node is not attached to a dataspace (yet, or any more).
    #[error("not connected to a dataspace")]
    Detached,
    /// Nobody answered the want.
    #[error("no store in the dataspace has {0} (waited {WANT_PATIENCE:?})")]
    Nowhere(String),
    /// Every store that had the path failed to send a good copy.
    #[error("cannot fetch {path}: {reasons}")]
    Failed {
        /// The path.
        path: String,
        /// What went wrong with each store tried.
        reasons: String,
    },
    /// The local store could not be asked or written.
    #[error("local store: {0}")]
    Local(String),
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
    link: Mutex<Option<Link>>,
    /// Fetches under way, so that a path is fetched once however many steps need it.
    inflight: Mutex<HashMap<StorePath, Arc<FetchOnce>>>,
    fetched: AtomicU64,
    fetched_bytes: AtomicU64,
}

/// The dataspace the node is attached to, and the facet its assertions live in.
#[derive(Clone)]
struct Link {
    ds: Arc<Cap>,
    facet: FacetRef,
}

impl std::fmt::Debug for StoreNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreNode")
            .field("name", &self.inner.name)
            .field("fetched", &self.fetched())
            .finish_non_exhaustive()
    }
}

/// The outcome of one fetch, shared by everyone waiting for it.
type FetchOnce = OnceCell<Result<(), FetchError>>;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

fn account(what: &'static str) -> Arc<Account> {
    Account::new(Some(AnyValue::symbol(what)), None)
}

impl StoreNode {
    /// The store reached through `pool`, known in the dataspace as `name`.
    pub fn new(name: impl Into<String>, pool: DaemonPool) -> StoreNode {
        StoreNode {
            inner: Arc::new(Inner {
                name: name.into(),
                pool,
                link: Mutex::new(None),
                inflight: Mutex::new(HashMap::new()),
                fetched: AtomicU64::new(0),
                fetched_bytes: AtomicU64::new(0),
            }),
        }
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
    /// (call again after rejoining a dataspace).
    pub fn attach(&self, t: &mut Activation, ds: Arc<Cap>) {
        if let Ok(mut link) = self.inner.link.lock() {
            *link = Some(Link {
                ds: Arc::clone(&ds),
                facet: t.facet_ref(),
            });
        }
        let inner = &self.inner;
        enclose!((inner, ds) during!(t, ds, <want $path: String $store: String>, |t: &mut Activation| {
            if store != inner.name {
                let facet = t.facet_ref();
                t.linked_task(Some(AnyValue::symbol("answer-want")), enclose!((inner, ds, path) async move {
                    if let Some(info) = inner.path_info(&path).await {
                        let available = store::Available { path, store: inner.name.clone(), info };
                        facet.activate(&account("available"), None, |t| {
                            ds.assert(t, &available);
                            Ok(())
                        });
                    }
                    Ok(LinkedTaskTermination::KeepFacet)
                }));
            }
            Ok(())
        }));
        enclose!((inner) during!(t, ds, <nar-request $path: String $store: String $sink>, |t: &mut Activation| {
            if store != inner.name {
                return Ok(());
            }
            let Some(sink) = sink.as_embedded().map(|s| Arc::clone(&s)) else {
                tracing::warn!(%path, "NAR request without a sink capability; ignored");
                return Ok(());
            };
            let facet = t.facet_ref();
            t.linked_task(Some(AnyValue::symbol("send-nar")), enclose!((inner, path) async move {
                inner.send_nar(facet, &path, sink).await;
                Ok(LinkedTaskTermination::KeepFacet)
            }));
            Ok(())
        }));
    }

    /// Make `paths` (printed store paths) and their closures valid in this store, fetching
    /// what is missing from the stores in the dataspace.
    pub async fn ensure(&self, paths: &[String]) -> Result<(), FetchError> {
        let store_dir = self.inner.pool.store_dir();
        let parsed = paths
            .iter()
            .map(|p| {
                store_dir
                    .parse(p)
                    .map_err(|e| FetchError::Local(format!("{p}: {e}")))
            })
            .collect::<Result<BTreeSet<_>, _>>()?;
        self.inner.ensure(parsed).await
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

    /// What the local store knows about `path`, if it is valid here.
    async fn path_info(&self, path: &str) -> Option<store::PathInfo> {
        let store_dir = self.pool.store_dir();
        let parsed = store_dir.parse(path).ok()?;
        let mut lease = self.pool.lease().await.ok()?;
        match lease.client().query_path_info(&parsed).await {
            Ok(info) => {
                lease.release();
                info.map(|i| to_wire(store_dir, &i))
            }
            Err(e) => {
                let e = lease.failed(e);
                tracing::warn!(%path, error = %e, "cannot query the local store");
                None
            }
        }
    }

    /// Stream the NAR of `path` to `sink`, from `facet`.
    async fn send_nar(&self, facet: FacetRef, path: &str, sink: Arc<Cap>) {
        let mut sender = NarSender::new(facet, sink);
        let parsed = match self.pool.store_dir().parse(path) {
            Ok(p) => p,
            Err(e) => return sender.fail(format!("{path}: {e}")),
        };
        let mut lease = match self.pool.lease().await {
            Ok(l) => l,
            Err(e) => return sender.fail(e.to_string()),
        };
        match lease.client().nar_from_path(&parsed, &mut sender).await {
            Ok(size) => {
                lease.release();
                tracing::debug!(%path, size, "sent a NAR");
                if let Err(e) = sender.finish() {
                    tracing::debug!(%path, error = %e, "NAR sent to nobody");
                }
            }
            Err(e) => {
                let e = lease.failed(e);
                tracing::warn!(%path, error = %e, "cannot send a NAR");
                sender.fail(e.to_string());
            }
        }
    }

    fn ensure(
        self: &Arc<Self>,
        paths: BTreeSet<StorePath>,
    ) -> BoxFuture<'_, Result<(), FetchError>> {
        Box::pin(async move {
            if paths.is_empty() {
                return Ok(());
            }
            let mut lease = self
                .pool
                .lease()
                .await
                .map_err(|e| FetchError::Local(e.to_string()))?;
            let valid = match lease.client().query_valid_paths(&paths, false).await {
                Ok(v) => {
                    lease.release();
                    v
                }
                Err(e) => return Err(FetchError::Local(lease.failed(e).to_string())),
            };
            drop(lease);
            for path in paths.difference(&valid) {
                self.fetch_once(path).await?;
            }
            Ok(())
        })
    }

    /// Fetch `path`, or wait for the fetch already under way.
    async fn fetch_once(self: &Arc<Self>, path: &StorePath) -> Result<(), FetchError> {
        let cell = match self.inflight.lock() {
            Ok(mut m) => Arc::clone(m.entry(path.clone()).or_default()),
            Err(_) => Arc::new(OnceCell::new()),
        };
        let result = cell.get_or_init(|| self.fetch(path)).await.clone();
        if let Ok(mut m) = self.inflight.lock() {
            if m.get(path).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                m.remove(path);
            }
        }
        result
    }

    /// Want `path`, then copy it from the first store that has it and sends a good copy.
    async fn fetch(self: &Arc<Self>, path: &StorePath) -> Result<(), FetchError> {
        let printed = self.pool.store_dir().print(path);
        let link = self.link()?;
        let (tx, mut offers) = mpsc::unbounded_channel();
        let me = self.name.clone();
        let want = ChildFacet::start(&link, |t| {
            link.ds.assert(
                t,
                &store::Want {
                    path: printed.clone(),
                    store: me.clone(),
                },
            );
            let literal = AnyValue::new(printed.clone());
            enclose!((me) during!(t, link.ds, <available #(literal) $store: String $info: store::PathInfo>, |_t| {
                if store != me {
                    let _ = tx.send((store.clone(), info.clone()));
                }
                Ok(())
            }));
            Ok(())
        });
        tracing::debug!(path = %printed, "wanted");
        let mut reasons = Vec::new();
        let mut patience = WANT_PATIENCE;
        loop {
            let offer = tokio::time::timeout(patience, offers.recv()).await;
            let Ok(Some((holder, info))) = offer else {
                break;
            };
            // Later offers are alternatives: do not wait long for them.
            patience = Duration::from_secs(2);
            match self.copy_from(&link, path, &printed, &holder, &info).await {
                Ok(size) => {
                    self.fetched.fetch_add(1, Ordering::Relaxed);
                    self.fetched_bytes.fetch_add(size, Ordering::Relaxed);
                    tracing::info!(path = %printed, from = %holder, size, "fetched");
                    drop(want);
                    return Ok(());
                }
                Err(reason) => {
                    tracing::warn!(path = %printed, from = %holder, %reason, "fetch failed");
                    reasons.push(format!("from {holder}: {reason}"));
                }
            }
        }
        drop(want);
        if reasons.is_empty() {
            Err(FetchError::Nowhere(printed))
        } else {
            Err(FetchError::Failed {
                path: printed,
                reasons: reasons.join("; "),
            })
        }
    }

    /// Copy `path` from `holder`: its references first, then its NAR. Returns the NAR size.
    async fn copy_from(
        self: &Arc<Self>,
        link: &Link,
        path: &StorePath,
        printed: &str,
        holder: &str,
        info: &store::PathInfo,
    ) -> Result<u64, String> {
        let store_dir = self.pool.store_dir();
        let info: ValidPathInfo = from_wire(store_dir, path, info)?;
        let references: BTreeSet<StorePath> = info
            .info
            .references
            .iter()
            .filter(|r| *r != path)
            .cloned()
            .collect();
        self.ensure(references)
            .await
            .map_err(|e| format!("its references: {e}"))?;
        let (tx, replies) = mpsc::unbounded_channel();
        let _request = ChildFacet::start(link, |t| {
            let sink = t.create_cap(NarSink(tx));
            link.ds.assert(
                t,
                &store::NarRequest {
                    path: printed.to_owned(),
                    store: holder.to_owned(),
                    sink,
                },
            );
            Ok(())
        });
        let mut nar = NarReceiver::new(
            replies,
            info.info.nar_hash.clone(),
            info.info.nar_size,
            STREAM_IDLE,
        );
        let mut lease = self.pool.lease().await.map_err(|e| e.to_string())?;
        // Our own daemon, trusted: the hash is what is checked, not signatures.
        match lease
            .client()
            .add_to_store_nar(&info, &mut nar, false, true)
            .await
        {
            Ok(()) => {
                lease.release();
                Ok(nar.received())
            }
            Err(e) => Err(lease.failed(e).to_string()),
        }
    }
}

/// Receives the replies to one NAR request.
struct NarSink(mpsc::UnboundedSender<NarReply>);

impl Entity<AnyValue> for NarSink {
    fn message(&mut self, _t: &mut Activation, m: AnyValue) -> ActorResult {
        match NarReply::parse(&m) {
            Ok(reply) => {
                let _ = self.0.send(reply);
            }
            Err(_) => tracing::warn!(?m, "ignoring a malformed NAR reply"),
        }
        Ok(())
    }
}

/// A child facet of the link's facet, stopped (withdrawing what it asserted) when dropped.
struct ChildFacet {
    facet: FacetRef,
    id: Option<FacetId>,
}

impl ChildFacet {
    fn start(link: &Link, body: impl FnOnce(&mut Activation) -> ActorResult) -> ChildFacet {
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
