//! One build on the dataspace: join, assert the demands, stream [`StepEvent`]s to the caller,
//! and withdraw everything when the build is stopped or dropped.

use std::collections::BTreeMap;
use std::sync::Arc;

use nixspace_nix_tools::DerivationInfo;
use nixspace_space::join::{join, JoinError};
use nixspace_space::Route;
use nixspace_transfer::StoreNode;

use crate::resolve::Resolver;
use syndicate::actor::{Account, ActorHandle, FacetRef};
use tokio::sync::mpsc;

use crate::steps::{self, StepEvent};

/// Demands held in the dataspace for one build, and the events about them.
pub struct DataspaceBuild {
    events: mpsc::UnboundedReceiver<StepEvent>,
    facet: Option<FacetRef>,
    actor: Option<ActorHandle>,
}

impl std::fmt::Debug for DataspaceBuild {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataspaceBuild").finish_non_exhaustive()
    }
}

impl DataspaceBuild {
    /// Join the dataspace at `route` and demand `steps` (inputs first) as `requester`,
    /// serving `store` there (workers with stores of their own fetch the derivations from it)
    /// and resolving the steps `resolver` holds back as their inputs land.
    pub async fn start(
        route: &Route,
        steps: &BTreeMap<String, &DerivationInfo>,
        requester: &str,
        priority: i64,
        store: &StoreNode,
        resolver: &Resolver,
    ) -> Result<DataspaceBuild, JoinError> {
        let store = store.clone();
        let resolver = resolver.clone();
        let held = resolver.held();
        let steps: BTreeMap<String, &DerivationInfo> = steps
            .iter()
            .filter(|(d, _)| !held.contains(*d))
            .map(|(d, i)| (d.clone(), *i))
            .collect();
        let steps = &steps;
        let demands = steps::demands(steps, requester, priority);
        let (tx, events) = mpsc::unbounded_channel();
        let (facet_tx, facet_rx) = tokio::sync::oneshot::channel();
        let handler: steps::Handler = Arc::new(move |_t, ev| {
            // The receiver is gone once the build is over; late events do not matter.
            let _ = tx.send(ev);
            Ok(())
        });
        let actor = join(route, move |t, ds| {
            let _ = facet_tx.send(t.facet_ref());
            store.attach(t, Arc::clone(&ds));
            steps::observe(t, &ds, Arc::clone(&handler));
            resolver.attach(t, Arc::clone(&ds), handler);
            for d in &demands {
                ds.assert(t, d);
            }
            Ok(())
        })
        .await?;
        // The body runs in the turn that answered the join, right after `join` was told.
        let facet = tokio::time::timeout(std::time::Duration::from_secs(10), facet_rx)
            .await
            .ok()
            .and_then(Result::ok);
        Ok(DataspaceBuild {
            events,
            facet,
            actor: Some(actor),
        })
    }

    /// The next event; `None` once the dataspace connection has ended.
    pub async fn next(&mut self) -> Option<StepEvent> {
        self.events.recv().await
    }

    /// Withdraw the demands and leave the dataspace.
    pub fn stop(&mut self) {
        if let Some(facet) = self.facet.take() {
            let account = Account::new(None, None);
            facet.activate(&account, None, |t| {
                t.stop_root();
                Ok(())
            });
        } else if let Some(actor) = self.actor.take() {
            actor.abort();
        }
        self.actor = None;
    }
}

impl Drop for DataspaceBuild {
    fn drop(&mut self) {
        self.stop();
    }
}
