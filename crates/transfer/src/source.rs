//! Serving paths to the dataspace from any source: a Nix store (through its daemon) or a
//! binary cache.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use nixspace_nix_formats::narinfo::NarInfoError;
use nixspace_nix_formats::nixbase32;
use nixspace_nix_formats::signature::SignatureError;
use nixspace_nix_formats::store_path::{StorePathError, HASH_PART_LEN};
use nixspace_nix_tools::{DaemonPool, StepError};
use nixspace_protocol::store;
use syndicate::actor::{Activation, AnyValue, Cap, LinkedTaskTermination};
use syndicate::enclose;
use syndicate_macros::during;

use crate::nar_stream::NarSender;
use crate::node::account;
use crate::path_info::to_wire;

/// A boxed future, as the object-safe [`PathSource`] returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a source could not send a NAR (or describe a path).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The path is not a store path of the source's store.
    #[error("{path}: {source}")]
    BadPath {
        /// The path asked for.
        path: String,
        /// Why.
        #[source]
        source: StorePathError,
    },
    /// The store's daemon failed.
    #[error(transparent)]
    Store(#[from] StepError),
    /// A file of a binary cache cannot be read.
    #[error("{file}: {source}")]
    Read {
        /// The file.
        file: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A binary cache does not have a file (its directory lacks it, or its server answered
    /// 404).
    #[error("{0}: not in the cache")]
    NotInCache(String),
    /// A binary cache's server failed, or answered other than with the file or "not found".
    #[error("{url}: {reason}")]
    Http {
        /// The URL asked for.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// A file of a binary cache is larger than any file of its kind may be.
    #[error("{file} is over {limit} bytes")]
    TooLarge {
        /// The file.
        file: String,
        /// The most bytes it may have.
        limit: u64,
    },
    /// A narinfo does not parse.
    #[error("{file}: {source}")]
    NarInfo {
        /// The file.
        file: String,
        /// The cause.
        #[source]
        source: NarInfoError,
    },
    /// A narinfo describes a path other than the one its name says.
    #[error("{0} describes another path")]
    OtherPath(String),
    /// A narinfo carries no valid signature by a trusted key.
    #[error("{file}: {source}")]
    Signature {
        /// The file.
        file: String,
        /// The cause.
        #[source]
        source: SignatureError,
    },
    /// A narinfo's NAR URL points outside the cache.
    #[error("NAR URL {0:?} leaves the cache")]
    UrlOutsideCache(String),
    /// A NAR cannot be read or decompressed (or is compressed in a way not supported).
    #[error("{file}: {source}")]
    Decompress {
        /// The file.
        file: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing the NAR into the stream failed.
    #[error("{0}")]
    Stream(#[source] io::Error),
    /// The task reading the NAR did not finish.
    #[error("{0}")]
    Task(#[source] tokio::task::JoinError),
    /// A realisation was asked for under something that is not a derivation output's id.
    #[error("{0:?} is not a derivation output id")]
    BadOutputId(String),
    /// A realisation file does not parse (or names an output other than its own).
    #[error("{file}: {reason}")]
    Realisation {
        /// The file.
        file: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A realisation carries no valid signature by a trusted key.
    #[error("{0}: not signed by a trusted key")]
    RealisationNotSigned(String),
}

/// The most bytes a realisation file (`realisations/<id>.doi`) may have.
pub const MAX_REALISATION_FILE: u64 = 64 * 1024;

/// A realisation a source offers: the output `id` was realised as `path` (printed), with
/// `signatures`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferedRealisation {
    /// The output path, printed.
    pub path: String,
    /// Nix's realisation signatures (`name:base64`).
    pub signatures: Vec<String>,
}

/// Somewhere paths can be served from.
pub trait PathSource: Send + Sync + 'static {
    /// What a copy of `path` (printed) is registered with, if this source has it.
    fn path_info<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Option<store::PathInfo>>;
    /// Write the NAR of `path` into `out`; its size, or why it could not be sent.
    fn write_nar<'a>(
        &'a self,
        path: &'a str,
        out: &'a mut NarSender,
    ) -> BoxFuture<'a, Result<u64, SourceError>>;
    /// The realisation of the derivation output `id` this source offers, if any. A binary
    /// cache has those `nix copy` wrote; a store answers none (the planner asserts what was
    /// built in the dataspace).
    fn realisation<'a>(&'a self, _id: &'a str) -> BoxFuture<'a, Option<OfferedRealisation>> {
        Box::pin(async { None })
    }
    /// The path (printed) whose hash part is `hash_part` (checked by [`is_hash_part`]), if
    /// this source has one (and serves it).
    fn path_of_hash_part<'a>(&'a self, _hash_part: &'a str) -> BoxFuture<'a, Option<String>> {
        Box::pin(async { None })
    }
}

/// Whether `text` is a store path's hash part: 32 characters of Nix's base-32 alphabet (so
/// it is also a safe file name).
pub fn is_hash_part(text: &str) -> bool {
    text.len() == HASH_PART_LEN && text.bytes().all(|b| nixbase32::ALPHABET.contains(&b))
}

/// How a store serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A participant's own store: answers only for the paths it has.
    Peer,
    /// A substituter: announces itself and also answers `missing` for what it lacks.
    Substituter,
}

/// Serve `source` on `ds` as the store `name`, from the current facet: answer others'
/// `want`s with `available` while they last, and stream NARs to `nar-request` sinks as their
/// credit allows, giving up on a sink that grants no credit for `idle`
/// ([`crate::nar_stream::STREAM_IDLE`] unless a test needs less).
pub fn serve(
    t: &mut Activation,
    ds: &Arc<Cap>,
    name: &str,
    source: Arc<dyn PathSource>,
    role: Role,
    idle: Duration,
) {
    let name = name.to_owned();
    if role == Role::Substituter {
        ds.assert(
            t,
            &store::Substituter {
                store: name.clone(),
            },
        );
    }
    enclose!((name, source, ds) during!(t, ds, <want $path: String $store: String>, |t: &mut Activation| {
        if store != name {
            let facet = t.facet_ref();
            t.linked_task(Some(AnyValue::symbol("answer-want")), enclose!((name, source, ds, path) async move {
                let info = source.path_info(&path).await;
                facet.activate(&account("available"), None, |t| {
                    match info {
                        Some(info) => {
                            ds.assert(t, &store::Available { path, store: name, info });
                        }
                        None if role == Role::Substituter => {
                            ds.assert(t, &store::Missing { path, store: name });
                        }
                        None => {}
                    }
                    Ok(())
                });
                Ok(LinkedTaskTermination::KeepFacet)
            }));
        }
        Ok(())
    }));
    answer_hash_part_wants(t, ds, &name, &source);
    if role == Role::Substituter {
        answer_realisation_wants(t, ds, &name, &source);
    }
    enclose!((name, source) during!(t, ds, <nar-request $path: String $store: String $sink>, |t: &mut Activation| {
        if store != name {
            return Ok(());
        }
        let Some(sink) = sink.as_embedded().map(|s| Arc::clone(&s)) else {
            tracing::warn!(%path, "NAR request without a sink capability; ignored");
            return Ok(());
        };
        let facet = t.facet_ref();
        t.linked_task(Some(AnyValue::symbol("send-nar")), enclose!((source, path) async move {
            let mut sender = NarSender::new(facet, sink, idle);
            let sent = match source.write_nar(&path, &mut sender).await {
                Ok(size) => sender.finish().await.map(|()| size).map_err(SourceError::Stream),
                Err(e) => Err(e),
            };
            match sent {
                Ok(size) => tracing::debug!(%path, size, "sent a NAR"),
                Err(e) => {
                    // A stalled receiver made the stream fail: say so rather than how the
                    // source noticed.
                    let reason = sender.stall().unwrap_or_else(|| e.to_string());
                    tracing::warn!(%path, %reason, "cannot send a NAR");
                    sender.fail(reason);
                }
            }
            Ok(LinkedTaskTermination::KeepFacet)
        }));
        Ok(())
    }));
}

/// As store `name`, answer others' `want-hash-part`s with `available` for the path of that
/// hash part, if `source` has one, while they last.
fn answer_hash_part_wants(
    t: &mut Activation,
    ds: &Arc<Cap>,
    name: &str,
    source: &Arc<dyn PathSource>,
) {
    let name = name.to_owned();
    enclose!((name, source, ds) during!(t, ds, <want-hash-part $hash_part: String $store: String>, |t: &mut Activation| {
        if store == name || !is_hash_part(&hash_part) {
            return Ok(());
        }
        let facet = t.facet_ref();
        t.linked_task(Some(AnyValue::symbol("answer-want-hash-part")), enclose!((name, source, ds) async move {
            let Some(path) = source.path_of_hash_part(&hash_part).await else {
                return Ok(LinkedTaskTermination::KeepFacet);
            };
            let info = source.path_info(&path).await;
            facet.activate(&account("available"), None, |t| {
                if let Some(info) = info {
                    ds.assert(t, &store::Available { path, store: name, info });
                }
                Ok(())
            });
            Ok(LinkedTaskTermination::KeepFacet)
        }));
        Ok(())
    }));
}

/// As substituter `name`, answer others' `want-realisation`s with `realisation-offer` or
/// `realisation-missing` while they last.
fn answer_realisation_wants(
    t: &mut Activation,
    ds: &Arc<Cap>,
    name: &str,
    source: &Arc<dyn PathSource>,
) {
    let name = name.to_owned();
    enclose!((name, source, ds) during!(t, ds, <want-realisation $id: String $store: String>, |t: &mut Activation| {
        if store == name {
            return Ok(());
        }
        let facet = t.facet_ref();
        t.linked_task(Some(AnyValue::symbol("answer-want-realisation")), enclose!((name, source, ds) async move {
            let offered = source.realisation(&id).await;
            facet.activate(&account("realisation-offer"), None, |t| {
                match offered {
                    Some(OfferedRealisation { path, signatures }) => {
                        ds.assert(t, &store::RealisationOffer { id, store: name, path, signatures });
                    }
                    None => {
                        ds.assert(t, &store::RealisationMissing { id, store: name });
                    }
                }
                Ok(())
            });
            Ok(LinkedTaskTermination::KeepFacet)
        }));
        Ok(())
    }));
}

/// A Nix store, through connections to its daemon.
pub struct DaemonSource(pub DaemonPool);

impl PathSource for DaemonSource {
    fn path_info<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Option<store::PathInfo>> {
        Box::pin(async move {
            let store_dir = self.0.store_dir();
            let parsed = store_dir.parse(path).ok()?;
            let mut lease = self.0.lease().await.ok()?;
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
        })
    }

    fn path_of_hash_part<'a>(&'a self, hash_part: &'a str) -> BoxFuture<'a, Option<String>> {
        Box::pin(async move {
            let mut lease = self.0.lease().await.ok()?;
            match lease.client().query_path_from_hash_part(hash_part).await {
                Ok(path) => {
                    lease.release();
                    path
                }
                Err(e) => {
                    let e = lease.failed(e);
                    tracing::warn!(%hash_part, error = %e, "cannot query the local store");
                    None
                }
            }
        })
    }

    fn write_nar<'a>(
        &'a self,
        path: &'a str,
        out: &'a mut NarSender,
    ) -> BoxFuture<'a, Result<u64, SourceError>> {
        Box::pin(async move {
            let parsed = self
                .0
                .store_dir()
                .parse(path)
                .map_err(|source| SourceError::BadPath {
                    path: path.to_owned(),
                    source,
                })?;
            let mut lease = self.0.lease().await?;
            match lease.client().nar_from_path(&parsed, out).await {
                Ok(size) => {
                    lease.release();
                    Ok(size)
                }
                Err(e) => Err(lease.failed(e).into()),
            }
        })
    }
}
