//! Closures shared in the dataspace: `<closure path paths>` records, computed once by
//! whoever needed them first and reused by everybody else.
//!
//! A closure is computed from path-infos' references ([`StoreNode::path_info`]: this store's
//! daemon when it has the path, otherwise the `available` answers of the stores in the
//! dataspace), using closures already asserted for any path met on the way. The closures this
//! program computed stay asserted while it is joined (again after a reconnection).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nixspace_protocol::{build, on_retraction, store};
use nixspace_transfer::{FetchError, StoreNode};
use syndicate::actor::{Account, Activation, AnyValue, Cap, FacetRef};
use syndicate::enclose;
use syndicate_macros::{during, on_message};
use tokio::sync::watch;

/// Where a closure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Somebody had asserted it already.
    Dataspace,
    /// Computed here (and asserted for others).
    Computed,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Origin::Dataspace => "from the dataspace",
            Origin::Computed => "computed",
        })
    }
}

/// The closures known in the dataspace and the ones this program asserts. Cheap to clone.
#[derive(Clone)]
pub struct Closures {
    state: Arc<Mutex<State>>,
    /// How many connections have seen every closure asserted before they joined.
    synced: watch::Sender<u32>,
}

#[derive(Default)]
struct State {
    /// Every closure asserted in the dataspace, by path.
    known: BTreeMap<String, Vec<String>>,
    /// The closures computed here.
    ours: BTreeMap<String, Vec<String>>,
    /// Where to assert new ones: the current connection's root facet and dataspace.
    link: Option<(FacetRef, Arc<Cap>)>,
    /// Connections so far.
    connections: u32,
}

impl Default for Closures {
    /// No closures known yet.
    fn default() -> Closures {
        Closures {
            state: Arc::default(),
            synced: watch::channel(0).0,
        }
    }
}

impl Closures {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Follow `<closure …>` records on `ds` and assert ours, from the current (root) facet;
    /// call on every connection. Once a probe comes back, every closure asserted before has
    /// arrived, and [`Closures::synced`] returns.
    pub fn attach(&self, t: &mut Activation, ds: Arc<Cap>) {
        let connection = {
            let mut s = self.state();
            for (path, paths) in &s.ours {
                ds.assert(t, &closure_record(path, paths));
            }
            s.link = Some((t.facet_ref(), Arc::clone(&ds)));
            s.connections += 1;
            s.connections
        };
        let state = &self.state;
        enclose!((state, ds) during!(t, ds, <closure $path: String $paths: Vec<String>>, |t: &mut Activation| {
            if let Ok(mut s) = state.lock() {
                s.known.insert(path.clone(), paths.clone());
            }
            on_retraction(t, enclose!((state, path) move |_t| {
                if let Ok(mut s) = state.lock() {
                    if !s.ours.contains_key(&path) {
                        s.known.remove(&path);
                    }
                }
                Ok(())
            }));
            Ok(())
        }));
        // The relay cannot forward a Syndicate sync: send ourselves a probe instead.
        let id = format!("outboard-toolchains-{}-{connection}", std::process::id());
        let synced = self.synced.clone();
        enclose!((id, ds) on_message!(t, ds, <probe $echo: String>, |_t: &mut Activation| {
            if echo == id {
                synced.send_replace(connection);
            }
            Ok(())
        }));
        ds.message(t, &build::Probe { id });
    }

    /// Wait until the closures asserted before this program joined have arrived.
    pub async fn synced(&self, limit: Duration) -> anyhow::Result<()> {
        let mut rx = self.synced.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|n| *n > 0))
            .await
            .map_err(|_| anyhow::anyhow!("the dataspace did not answer within {limit:?}"))?
            .map_err(|_| anyhow::anyhow!("the dataspace connection ended"))?;
        Ok(())
    }

    /// The closure of `path` if somebody asserted it.
    fn known(&self, path: &str) -> Option<Vec<String>> {
        self.state().known.get(path).cloned()
    }

    /// Remember `paths` as the closure of `path` and assert it for others.
    fn publish(&self, path: &str, paths: &[String]) {
        let link = {
            let mut s = self.state();
            s.ours.insert(path.to_owned(), paths.to_vec());
            s.known.insert(path.to_owned(), paths.to_vec());
            s.link.clone()
        };
        // If the connection is being replaced, the next `attach` asserts it.
        if let Some((facet, ds)) = link {
            let record = closure_record(path, paths);
            let account = Account::new(Some(AnyValue::symbol("closure")), None);
            facet.activate(&account, None, move |t| {
                ds.assert(t, &record);
                Ok(())
            });
        }
    }

    /// The closure of `path` (sorted): the one in the dataspace if there is one, else
    /// computed from path-infos with `store` (waiting up to `patience` for each path's
    /// holder) and asserted.
    pub async fn resolve(
        &self,
        store: &StoreNode,
        path: &str,
        patience: Duration,
    ) -> Result<(Vec<String>, Origin), FetchError> {
        if let Some(paths) = self.known(path) {
            return Ok((paths, Origin::Dataspace));
        }
        let mut closure = BTreeSet::new();
        let mut queue = vec![path.to_owned()];
        while let Some(next) = queue.pop() {
            if closure.contains(&next) {
                continue;
            }
            if let Some(paths) = self.known(&next) {
                closure.extend(paths);
                closure.insert(next);
                continue;
            }
            let info = store.path_info(&next, patience).await?;
            queue.extend(info.references.into_iter().filter(|r| !closure.contains(r)));
            closure.insert(next);
        }
        let paths: Vec<String> = closure.into_iter().collect();
        self.publish(path, &paths);
        Ok((paths, Origin::Computed))
    }
}

fn closure_record(path: &str, paths: &[String]) -> store::Closure {
    store::Closure {
        path: path.to_owned(),
        paths: paths.to_vec(),
    }
}
