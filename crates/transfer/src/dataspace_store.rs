//! The dataspace's stores seen from outside as one read-only store, with no Nix store of its
//! own (what `nixspace cache serve` answers binary cache clients from): a path is found by its
//! hash part (`<want-hash-part …>`, answered with `available` by whichever store has it), taken
//! only if signed by a key trusted here or content-addressed (as a store adds a path, but
//! whatever the local `require-sigs`: what is served here is vouched for to others), and its
//! NAR streamed from that store, checked against the size and hash it claimed.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use nixspace_nix_formats::signature::PublicKeys;
use nixspace_nix_formats::store_path::StoreDir;
use nixspace_nix_protocol::ValidPathInfo;
use nixspace_protocol::store;
use syndicate::actor::{Activation, Cap};
use syndicate::enclose;
use syndicate_macros::during;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::mpsc;

use crate::nar_stream::NarReceiver;
use crate::node::{ChildFacet, Link};
use crate::path_info::from_wire;
use crate::source::is_hash_part;
use crate::trust::{SharedTrust, TrustPolicy};
use crate::FetchError;

/// A path some store of the dataspace has.
#[derive(Debug, Clone)]
pub struct Found {
    /// The path, printed.
    pub printed: String,
    /// What it is registered with there.
    pub info: ValidPathInfo,
    /// The store that has it.
    pub holder: String,
}

/// The dataspace's stores as one read-only store, known in the dataspace as `name`.
pub struct DataspaceStore {
    name: String,
    store_dir: StoreDir,
    stream_idle: Duration,
    link: Mutex<Option<Link>>,
    trust: Arc<SharedTrust>,
}

impl DataspaceStore {
    /// Reading paths of `store_dir` as `name`, giving up on NAR streams that stall for
    /// `stream_idle`, taking paths signed by `trusted` keys (besides the local Nix
    /// configuration's and those the coordinator announces) or content-addressed.
    pub fn new(
        name: impl Into<String>,
        store_dir: StoreDir,
        stream_idle: Duration,
        trusted: &PublicKeys,
    ) -> Self {
        let mut policy = TrustPolicy::from_nix_conf().requiring_signatures();
        policy.add(trusted);
        DataspaceStore {
            name: name.into(),
            store_dir,
            stream_idle,
            link: Mutex::new(None),
            trust: SharedTrust::new(policy),
        }
    }

    /// Read through `ds` from the current facet from now on (call again after rejoining).
    pub fn attach(&self, t: &mut Activation, ds: Arc<Cap>) {
        self.trust.follow_announcements(t, &ds);
        if let Ok(mut link) = self.link.lock() {
            *link = Some(Link::attach(t, ds));
        }
    }

    fn link(&self) -> Result<Link, FetchError> {
        self.link
            .lock()
            .ok()
            .and_then(|l| l.clone())
            .filter(|l| !l.is_lost())
            .ok_or(FetchError::Detached)
    }

    /// The first path with hash part `hash_part` that a store of the dataspace says it has
    /// within `patience`, with a well-formed path-info that is trusted, or `None`.
    pub async fn find(
        &self,
        hash_part: &str,
        patience: Duration,
    ) -> Result<Option<Found>, FetchError> {
        if !is_hash_part(hash_part) {
            return Ok(None);
        }
        let link = self.link()?;
        let (tx, mut offers) = mpsc::unbounded_channel();
        let me = self.name.clone();
        let _want = ChildFacet::start(&link, |t| {
            link.ds.assert(
                t,
                &store::WantHashPart {
                    hash_part: hash_part.to_owned(),
                    store: me.clone(),
                },
            );
            enclose!((me) during!(t, link.ds, <available $path: String $store: String $info: store::PathInfo>, |_t| {
                if store != me {
                    let _ = tx.send((path.clone(), store.clone(), info.clone()));
                }
                Ok(())
            }));
            Ok(())
        });
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let offer = tokio::select! {
                offer = tokio::time::timeout_at(deadline, offers.recv()) => offer,
                () = link.until_lost() => return Err(FetchError::Detached),
            };
            let Ok(Some((printed, holder, wire))) = offer else {
                return Ok(None);
            };
            let Ok(path) = self.store_dir.parse(&printed) else {
                continue;
            };
            if path.hash_part() != hash_part {
                continue;
            }
            let info = match from_wire(&self.store_dir, &path, &wire) {
                Ok(info) => info,
                Err(reason) => {
                    tracing::warn!(path = %printed, %holder, %reason, "ignoring a malformed path-info");
                    continue;
                }
            };
            let trusted = match self.trust.lock() {
                Ok(policy) => policy.check(&self.store_dir, &info),
                Err(_) => return Err(FetchError::Detached),
            };
            match trusted {
                Ok(_) => {
                    return Ok(Some(Found {
                        printed,
                        info,
                        holder,
                    }))
                }
                Err(reason) => {
                    tracing::warn!(path = %printed, %holder, %reason, "not serving a path another store offers");
                }
            }
        }
    }

    /// The NAR of `found`, streamed from the store that has it: it ends in an error, not at
    /// its end, if what arrives is not the NAR of the size and hash the store claimed.
    pub fn nar(&self, found: &Found) -> Result<NarStream, FetchError> {
        let link = self.link()?;
        let (request, receiver) =
            link.request_nar(&found.printed, &found.holder, &found.info, self.stream_idle);
        Ok(NarStream {
            _request: request,
            receiver,
        })
    }
}

/// A NAR streaming from a store of the dataspace; dropping it withdraws the request.
pub struct NarStream {
    _request: ChildFacet,
    receiver: NarReceiver,
}

impl AsyncRead for NarStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.receiver).poll_read(cx, buf)
    }
}
