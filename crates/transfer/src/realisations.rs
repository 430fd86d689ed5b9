//! Asking the dataspace's substituters for the realisation of a content-addressed
//! derivation output (`want-realisation`) and waiting for their answers.

use std::collections::BTreeSet;
use std::time::Duration;

use nixspace_protocol::store;
use syndicate::actor::AnyValue;
use syndicate::enclose;
use syndicate_macros::during;
use tokio::sync::mpsc;

use crate::node::{ChildFacet, Link};
use crate::source::OfferedRealisation;

/// An answer to a `want-realisation`, from the substituter that gave it.
enum Answer {
    Offer(String, OfferedRealisation),
    Missing(String),
}

/// Want the realisation of output `id` for store `me` and take the first offer `trusts`
/// accepts; `None` once every one of `substituters` said it has none (or offered only
/// realisations not trusted), after `patience`, or when the link is lost.
pub(crate) async fn wanted_realisation(
    link: &Link,
    me: &str,
    id: &str,
    substituters: &BTreeSet<String>,
    patience: Duration,
    trusts: impl Fn(&OfferedRealisation) -> bool,
) -> Option<OfferedRealisation> {
    let (tx, mut answers) = mpsc::unbounded_channel();
    let _want = ChildFacet::start(link, |t| {
        link.ds.assert(
            t,
            &store::WantRealisation {
                id: id.to_owned(),
                store: me.to_owned(),
            },
        );
        let literal = AnyValue::new(id.to_owned());
        enclose!((tx, literal) during!(t, link.ds, <realisation-offer #(literal) $store: String $path: String $signatures: Vec<String>>, |_t| {
            let _ = tx.send(Answer::Offer(store.clone(), OfferedRealisation { path: path.clone(), signatures: signatures.clone() }));
            Ok(())
        }));
        during!(t, link.ds, <realisation-missing #(literal) $store: String>, |_t| {
            let _ = tx.send(Answer::Missing(store.clone()));
            Ok(())
        });
        Ok(())
    });
    let mut waiting = substituters.clone();
    let deadline = tokio::time::Instant::now() + patience;
    while !waiting.is_empty() {
        let answer = tokio::select! {
            answer = answers.recv() => answer?,
            () = link.until_lost() => return None,
            () = tokio::time::sleep_until(deadline) => {
                tracing::debug!(%id, waiting = ?waiting, "substituters did not answer for a realisation in time");
                return None;
            }
        };
        match answer {
            Answer::Offer(store, offer) if trusts(&offer) => {
                tracing::debug!(%id, %store, path = %offer.path, "a substituter offers a trusted realisation");
                return Some(offer);
            }
            Answer::Offer(store, offer) => {
                tracing::warn!(%id, %store, path = %offer.path, "ignoring a realisation not signed by a trusted key");
                waiting.remove(&store);
            }
            Answer::Missing(store) => {
                waiting.remove(&store);
            }
        }
    }
    None
}
