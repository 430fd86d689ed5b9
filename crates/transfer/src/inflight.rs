//! Fetches under way in one store: a path is fetched once however many callers need it, and a
//! fetch that would wait on fetches that (transitively) wait on it is refused instead of
//! waiting forever (two fetches each holding one end of a claimed reference cycle).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use nixspace_nix_formats::store_path::StorePath;
use tokio::sync::watch;

/// A fetch under way and where its outcome will appear.
type Following<T> = (FetchId, watch::Receiver<Option<T>>);

/// One fetch under way, as the fetches waiting on each other know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FetchId(u64);

/// The fetches under way, by path, and which fetch waits on which.
pub(crate) struct Inflight<T> {
    state: Mutex<State<T>>,
    next: AtomicU64,
}

struct State<T> {
    /// Each path being fetched: the fetch doing it, and where its outcome will appear.
    running: HashMap<StorePath, Running<T>>,
    /// Each waiting fetch: the fetch it waits on, and the path that one fetches.
    waits: HashMap<FetchId, (FetchId, StorePath)>,
}

struct Running<T> {
    owner: FetchId,
    outcome: watch::Receiver<Option<T>>,
}

/// What a caller asking for a path gets: the fetch to do, or one to wait for.
pub(crate) enum Claim<'a, T> {
    /// Nobody fetches the path: the caller does.
    Own(Ownership<'a, T>),
    /// Another fetch has the path under way.
    Wait(Waiting<'a, T>),
}

/// The right (and duty) to fetch a path; dropping it unfinished lets a waiter take over.
pub(crate) struct Ownership<'a, T> {
    inflight: &'a Inflight<T>,
    path: StorePath,
    id: FetchId,
    outcome: watch::Sender<Option<T>>,
}

/// A wait for another fetch's outcome.
pub(crate) struct Waiting<'a, T> {
    inflight: &'a Inflight<T>,
    waiter: Option<FetchId>,
    outcome: watch::Receiver<Option<T>>,
}

/// Waiting would close a cycle: these paths' fetches each wait on the next, the last on the
/// asking fetch.
#[derive(Debug)]
pub(crate) struct WaitCycle(pub(crate) Vec<StorePath>);

impl<T: Clone> Inflight<T> {
    /// No fetch under way.
    pub(crate) fn new() -> Inflight<T> {
        Inflight {
            state: Mutex::new(State {
                running: HashMap::new(),
                waits: HashMap::new(),
            }),
            next: AtomicU64::new(0),
        }
    }

    /// Fetch `path` or wait for the fetch of it under way, for a caller that is no fetch
    /// itself (nothing waits on it, so its wait closes no cycle).
    pub(crate) fn claim(&self, path: &StorePath) -> Claim<'_, T> {
        let mut state = self.state();
        match self.own_or_follow(&mut state, path) {
            Ok(own) => Claim::Own(own),
            Err((_, outcome)) => Claim::Wait(Waiting {
                inflight: self,
                waiter: None,
                outcome,
            }),
        }
    }

    /// Fetch `path` or wait for the fetch of it under way, for the fetch `waiter`; refused if
    /// the fetch of `path` waits, directly or not, on `waiter`.
    pub(crate) fn claim_for(
        &self,
        path: &StorePath,
        waiter: FetchId,
    ) -> Result<Claim<'_, T>, WaitCycle> {
        let mut state = self.state();
        let (owner, outcome) = match self.own_or_follow(&mut state, path) {
            Ok(own) => return Ok(Claim::Own(own)),
            Err(running) => running,
        };
        // Each fetch waits on at most one other, and no chain of waits is a cycle (none is
        // let in): follow the chain from the owner.
        let mut cycle = vec![path.clone()];
        let mut next = owner;
        while next != waiter {
            let Some((further, waited)) = state.waits.get(&next) else {
                state.waits.insert(waiter, (owner, path.clone()));
                return Ok(Claim::Wait(Waiting {
                    inflight: self,
                    waiter: Some(waiter),
                    outcome,
                }));
            };
            cycle.push(waited.clone());
            next = *further;
        }
        Err(WaitCycle(cycle))
    }

    /// Make the caller the fetch of `path` if none is under way; else that fetch and where
    /// its outcome will appear.
    fn own_or_follow(
        &self,
        state: &mut State<T>,
        path: &StorePath,
    ) -> Result<Ownership<'_, T>, Following<T>> {
        if let Some(running) = state.running.get(path) {
            return Err((running.owner, running.outcome.clone()));
        }
        let id = FetchId(self.next.fetch_add(1, Ordering::Relaxed));
        let (outcome, receiver) = watch::channel(None);
        state.running.insert(
            path.clone(),
            Running {
                owner: id,
                outcome: receiver,
            },
        );
        Ok(Ownership {
            inflight: self,
            path: path.clone(),
            id,
            outcome,
        })
    }
}

impl<T> Inflight<T> {
    fn state(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<T: Clone> Ownership<'_, T> {
    /// The fetch this is.
    pub(crate) fn id(&self) -> FetchId {
        self.id
    }

    /// Give the outcome to everyone waiting, and end the fetch.
    pub(crate) fn finish(self, outcome: T) {
        self.outcome.send_replace(Some(outcome));
    }
}

impl<T> Drop for Ownership<'_, T> {
    fn drop(&mut self) {
        let mut state = self.inflight.state();
        if state
            .running
            .get(&self.path)
            .is_some_and(|r| r.owner == self.id)
        {
            state.running.remove(&self.path);
        }
        state.waits.remove(&self.id);
    }
}

impl<T: Clone> Waiting<'_, T> {
    /// The other fetch's outcome, or `None` if it was abandoned (then claim the path again).
    pub(crate) async fn outcome(mut self) -> Option<T> {
        let outcome = self.outcome.wait_for(Option::is_some).await;
        outcome.ok().and_then(|o| o.clone())
    }
}

impl<T> Drop for Waiting<'_, T> {
    fn drop(&mut self) {
        if let Some(waiter) = self.waiter {
            self.inflight.state().waits.remove(&waiter);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixspace_nix_formats::store_path::StoreDir;

    fn path(name: &str) -> StorePath {
        StoreDir::default()
            .parse(&format!(
                "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-{name}"
            ))
            .unwrap()
    }

    fn owned<'a>(claim: Claim<'a, u32>) -> Ownership<'a, u32> {
        match claim {
            Claim::Own(o) => o,
            Claim::Wait(_) => panic!("expected to own the fetch"),
        }
    }

    #[tokio::test]
    async fn a_path_is_fetched_once_and_its_outcome_shared() {
        let inflight = Inflight::new();
        let own = owned(inflight.claim(&path("a")));
        let Claim::Wait(wait) = inflight.claim(&path("a")) else {
            panic!("a second caller must wait");
        };
        own.finish(7);
        assert_eq!(wait.outcome().await, Some(7));
        // Finished: the next caller fetches again.
        assert!(matches!(inflight.claim(&path("a")), Claim::Own(_)));
    }

    #[tokio::test]
    async fn an_abandoned_fetch_lets_its_waiters_take_over() {
        let inflight = Inflight::<u32>::new();
        let own = owned(inflight.claim(&path("a")));
        let Claim::Wait(wait) = inflight.claim(&path("a")) else {
            panic!("a second caller must wait");
        };
        drop(own);
        assert_eq!(wait.outcome().await, None);
        assert!(matches!(inflight.claim(&path("a")), Claim::Own(_)));
    }

    #[test]
    fn fetches_waiting_on_each_other_are_refused_the_wait_that_closes_the_cycle() {
        let inflight = Inflight::<u32>::new();
        let (a, b, c) = (
            owned(inflight.claim(&path("a"))),
            owned(inflight.claim(&path("b"))),
            owned(inflight.claim(&path("c"))),
        );
        // a waits on b, b on c: fine; c waiting on a closes the cycle.
        let _ab = inflight.claim_for(&path("b"), a.id()).unwrap();
        let _bc = inflight.claim_for(&path("c"), b.id()).unwrap();
        let WaitCycle(cycle) = inflight
            .claim_for(&path("a"), c.id())
            .err()
            .expect("the cycle is refused");
        assert_eq!(cycle, [path("a"), path("b"), path("c")]);
        // Once b stops waiting, c may wait on a.
        drop(_bc);
        assert!(inflight.claim_for(&path("a"), c.id()).is_ok());
    }
}
