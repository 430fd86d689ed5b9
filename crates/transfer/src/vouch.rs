//! A store's holder vouching for some of its paths. A trusted client of the translator may
//! copy paths into its store unsigned, as Nix lets trusted users do, but a worker with a store
//! of its own adds only paths signed by a key it trusts (or content-addressed ones). For the
//! closure of what such a client's build needs, the translator's store serves the path-infos
//! with one more signature, by the key the trusted route comes with, made when a path-info is
//! asked for; the store itself is left as it is.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use nixspace_nix_formats::signature::{fingerprint, sign, SecretKey};
use nixspace_nix_formats::store_path::{StoreDir, StorePath};
use nixspace_nix_tools::{DaemonPool, StepError};
use nixspace_protocol::store;

use crate::nar_stream::NarSender;
use crate::path_info::from_wire;
use crate::source::{BoxFuture, DaemonSource, PathSource, SourceError};

/// At most this many paths are vouched for in one closure.
pub const MAX_VOUCHED_PATHS: usize = 100_000;

/// Why a closure could not be vouched for.
#[derive(Debug, thiserror::Error)]
pub enum VouchError {
    /// The store's daemon failed.
    #[error("cannot read the closure to vouch for: {0}")]
    Store(#[from] StepError),
    /// The closure reaches more paths than [`MAX_VOUCHED_PATHS`].
    #[error("the closure to vouch for has more than {MAX_VOUCHED_PATHS} paths")]
    TooLarge,
}

/// The paths a store's holder vouches for, and the key it signs them with.
#[derive(Debug)]
pub struct Vouch {
    key: Arc<SecretKey>,
    /// The vouched paths, printed.
    paths: BTreeSet<String>,
}

impl Vouch {
    /// Vouch with `key` for `roots` and every path they reference, directly or not, in the
    /// store of `pool` (paths not valid there are left out).
    pub async fn over_closure(
        pool: &DaemonPool,
        key: Arc<SecretKey>,
        roots: impl IntoIterator<Item = StorePath>,
    ) -> Result<Vouch, VouchError> {
        let store_dir = pool.store_dir();
        let mut seen: BTreeSet<StorePath> = BTreeSet::new();
        let mut paths: BTreeSet<String> = BTreeSet::new();
        let mut queue: VecDeque<StorePath> = roots.into_iter().collect();
        let mut lease = pool.lease().await?;
        while let Some(path) = queue.pop_front() {
            if !seen.insert(path.clone()) {
                continue;
            }
            if seen.len() > MAX_VOUCHED_PATHS {
                return Err(VouchError::TooLarge);
            }
            let info = match lease.client().query_path_info(&path).await {
                Ok(Some(info)) => info,
                Ok(None) => continue,
                Err(e) => return Err(lease.failed(e).into()),
            };
            paths.insert(store_dir.print(&path));
            queue.extend(info.references.into_iter().filter(|r| !seen.contains(r)));
        }
        lease.release();
        Ok(Vouch { key, paths })
    }

    /// How many paths are vouched for.
    pub fn len(&self) -> usize {
        self.paths.len()
    }

    /// Whether no path is vouched for.
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// `info` of `path` (printed) with the vouching signature added, if `path` is vouched for
    /// and `info` describes it well enough to sign.
    fn signed(
        &self,
        store_dir: &StoreDir,
        path: &str,
        mut info: store::PathInfo,
    ) -> store::PathInfo {
        if !self.paths.contains(path) {
            return info;
        }
        let Ok(parsed) = store_dir.parse(path) else {
            return info;
        };
        let Ok(valid) = from_wire(store_dir, &parsed, &info) else {
            return info;
        };
        let Ok(text) = fingerprint(
            store_dir,
            &parsed,
            &valid.info.nar_hash,
            valid.info.nar_size,
            &valid.info.references,
        ) else {
            return info;
        };
        let signature = sign(&self.key, &text);
        if !info.signatures.contains(&signature) {
            info.signatures.push(signature);
        }
        info
    }
}

/// A Nix store served with a [`Vouch`]: its vouched paths' path-infos carry the signature.
pub(crate) struct VouchingSource {
    pub(crate) store: DaemonSource,
    pub(crate) vouch: Arc<Vouch>,
}

impl PathSource for VouchingSource {
    fn path_info<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Option<store::PathInfo>> {
        Box::pin(async move {
            let info = self.store.path_info(path).await?;
            Some(self.vouch.signed(self.store.0.store_dir(), path, info))
        })
    }

    fn write_nar<'a>(
        &'a self,
        path: &'a str,
        out: &'a mut NarSender,
    ) -> BoxFuture<'a, Result<u64, SourceError>> {
        self.store.write_nar(path, out)
    }
}
