//! Serving paths to the dataspace from any source: a Nix store (through its daemon) or a
//! binary cache directory.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use nixspace_nix_tools::DaemonPool;
use nixspace_protocol::store;
use syndicate::actor::{Activation, AnyValue, Cap, LinkedTaskTermination};
use syndicate::enclose;
use syndicate_macros::during;

use crate::nar_stream::NarSender;
use crate::node::account;
use crate::path_info::to_wire;

/// A boxed future, as the object-safe [`PathSource`] returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Somewhere paths can be served from.
pub trait PathSource: Send + Sync + 'static {
    /// What a copy of `path` (printed) is registered with, if this source has it.
    fn path_info<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Option<store::PathInfo>>;
    /// Write the NAR of `path` into `out`; its size, or why it could not be sent.
    fn write_nar<'a>(
        &'a self,
        path: &'a str,
        out: &'a mut NarSender,
    ) -> BoxFuture<'a, Result<u64, String>>;
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
                Ok(size) => sender.finish().await.map(|()| size).map_err(|e| e.to_string()),
                Err(reason) => Err(reason),
            };
            match sent {
                Ok(size) => tracing::debug!(%path, size, "sent a NAR"),
                Err(reason) => {
                    // A stalled receiver made the stream fail: say so rather than how the
                    // source noticed.
                    let reason = sender.stall().unwrap_or(reason);
                    tracing::warn!(%path, %reason, "cannot send a NAR");
                    sender.fail(reason);
                }
            }
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

    fn write_nar<'a>(
        &'a self,
        path: &'a str,
        out: &'a mut NarSender,
    ) -> BoxFuture<'a, Result<u64, String>> {
        Box::pin(async move {
            let parsed = self
                .0
                .store_dir()
                .parse(path)
                .map_err(|e| format!("{path}: {e}"))?;
            let mut lease = self.0.lease().await.map_err(|e| e.to_string())?;
            match lease.client().nar_from_path(&parsed, out).await {
                Ok(size) => {
                    lease.release();
                    Ok(size)
                }
                Err(e) => Err(lease.failed(e).to_string()),
            }
        })
    }
}
