//! The `<job …>` records: what the coordinator tells the dataspace about its jobs as they
//! go, asserted in the keeper's facet for each pending job and the [`RECENT_ENDED`] most
//! recently ended ones (a submitter waiting for its job sees it end).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use nixspace_protocol::build;
use syndicate::actor::{Account, Cap, FacetRef, Handle};

/// How many ended jobs stay asserted.
const RECENT_ENDED: usize = 64;

/// A job as the dataspace is told about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JobState {
    /// Its name.
    pub name: String,
    /// `pending`, `built`, `failed` or `cancelled`.
    pub status: &'static str,
    /// Steps built.
    pub built: i64,
    /// Steps failed.
    pub failed: i64,
    /// Steps in all.
    pub total: i64,
}

#[derive(Default)]
struct Shown {
    /// Each shown job's state and assertion.
    jobs: HashMap<i64, (JobState, Option<Handle>)>,
    /// The ended jobs shown, oldest first.
    ended: VecDeque<i64>,
}

/// The jobs' records, asserted in the keeper's facet.
pub(crate) struct Board {
    facet: FacetRef,
    ds: Arc<Cap>,
    shown: Arc<Mutex<Shown>>,
}

impl Board {
    /// A board asserting in `facet` on `ds`.
    pub fn new(facet: FacetRef, ds: Arc<Cap>) -> Board {
        Board {
            facet,
            ds,
            shown: Arc::default(),
        }
    }

    /// Show job `id` as `state` (in place of what was shown of it).
    pub fn show(&self, id: i64, state: JobState) {
        let (ds, shown) = (Arc::clone(&self.ds), Arc::clone(&self.shown));
        self.facet
            .activate(&Account::new(None, None), None, move |t| {
                let record = build::Job {
                    job: id.into(),
                    name: state.name.clone(),
                    status: state.status.to_owned(),
                    built: state.built.into(),
                    failed: state.failed.into(),
                    total: state.total.into(),
                };
                let handle = ds.assert(t, &record);
                let mut shown = shown.lock().map_err(|_| "job board poisoned")?;
                let ended = state.status != "pending";
                if let Some((_, Some(old))) = shown.jobs.insert(id, (state, handle)) {
                    t.retract(old);
                }
                if ended && !shown.ended.contains(&id) {
                    shown.ended.push_back(id);
                }
                while shown.ended.len() > RECENT_ENDED {
                    let Some(old) = shown.ended.pop_front() else {
                        break;
                    };
                    if let Some((_, Some(handle))) = shown.jobs.remove(&old) {
                        t.retract(handle);
                    }
                }
                Ok(())
            });
    }

    /// Show job `id` ended as `status`, with the counts last shown (if it was shown).
    pub fn end(&self, id: i64, status: &'static str) {
        let last = self
            .shown
            .lock()
            .ok()
            .and_then(|shown| shown.jobs.get(&id).map(|(state, _)| state.clone()));
        if let Some(state) = last {
            self.show(id, JobState { status, ..state });
        }
    }
}
