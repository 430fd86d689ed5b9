//! The planner as a client of a dataspace hosted elsewhere (a standalone syndicate-server set
//! up by `nixspace server-config`), instead of hosting one: `nixspace up --external`.

use std::path::PathBuf;
use std::sync::Arc;

use nixspace_planner::history::History;
use nixspace_planner::metrics::Metrics;
use nixspace_planner::PlannerConfig;
use nixspace_space::{Backoff, JoinError, Route, SessionEvent};
use syndicate::actor::{Activation, Cap};

use crate::jobs::JobsOptions;

/// What the planner needs on every connection.
#[derive(Clone)]
pub struct ExternalPlanner {
    /// How it retries and steals.
    pub planner: PlannerConfig,
    /// Its metrics (shared by every connection's planner).
    pub metrics: Arc<Metrics>,
    /// The build history database (`history.sqlite`), reopened per connection.
    pub history: PathBuf,
    /// Public keys (`name:base64`) announced for every store to trust (`<trusted-keys …>`),
    /// on every connection.
    pub trusted_keys: Vec<String>,
    /// Where jobs are kept and the route their sessions join with, if the coordinator keeps
    /// them (`nixspace submit`): each connection takes up the pending jobs anew.
    pub jobs: Option<(Route, JobsOptions)>,
}

impl ExternalPlanner {
    /// Join the dataspace at `route` (it must grant the whole dataspace: the
    /// planner asserts what no role may) and keep a planner running on it,
    /// rejoining with back-off whenever the connection drops or the server is
    /// away; each connection gets a fresh planner, which learns the demands,
    /// workers and claims anew from the dataspace; `on_event` hears of its
    /// connections. Returns only when joining can never succeed (the capability
    /// is refused or unknown).
    pub async fn stay_joined(
        self,
        route: Route,
        on_event: impl FnMut(SessionEvent<'_>),
    ) -> JoinError {
        let body = move |t: &mut Activation, ds: Arc<Cap>| {
            // The previous connection's planner has stopped with it.
            self.metrics.workers.set(0);
            nixspace_space::policy::log_refused(t, &ds);
            crate::announce_trusted_keys(t, &ds, &self.trusted_keys);
            let history = History::open(&self.history)
                .map_err(|error| tracing::error!(%error, "running without a build history"))
                .ok();
            nixspace_planner::service::start(
                t,
                Arc::clone(&ds),
                self.planner,
                Arc::clone(&self.metrics),
                history,
            );
            if let Some((route, jobs)) = &self.jobs {
                crate::jobs::start(t, &ds, route.clone(), jobs.clone());
            }
            Ok(())
        };
        nixspace_space::join::stay_joined(&route, Backoff::default(), body, on_event).await
    }
}
