//! A dataspace hosted in this process, with its planner.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use nixspace_planner::history::History;
use nixspace_planner::metrics::Metrics;
use nixspace_planner::PlannerConfig;

use crate::jobs::JobsOptions;
use nixspace_space::host::{HostError, Listeners};
use nixspace_space::{HostConfig, HostedSpace, Role, Route, Transport};
use syndicate::actor::{Actor, ActorHandle};

/// What hosting a dataspace with its planner takes.
pub struct CoordinatorOptions {
    /// Where the socket, keys and route files go.
    pub host: HostConfig,
    /// The build history, if kept.
    pub history: Option<History>,
    /// How the planner retries and steals.
    pub planner: PlannerConfig,
    /// The planner's metrics.
    pub metrics: Arc<Metrics>,
    /// Public keys (`name:base64`) announced for every store to trust (`<trusted-keys …>`).
    pub trusted_keys: Vec<String>,
    /// Where jobs are kept, if the coordinator keeps them (`nixspace submit`).
    pub jobs: Option<JobsOptions>,
}

/// Why the coordinator could not start.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The listeners, keys or route files could not be set up.
    #[error(transparent)]
    Host(#[from] HostError),
    /// The dataspace's actor ended before it was ready.
    #[error("the dataspace stopped while starting")]
    Stopped,
    /// A role has no route (a bug: every role gets one).
    #[error("the dataspace has no {0} route")]
    NoRoute(&'static str),
}

/// A dataspace hosted in this process with its planner; dropping it stops both.
pub struct HostedCoordinator {
    /// Where it listens.
    pub transports: Vec<Transport>,
    /// The route of each role (by [`Role::name`]) and the file it was written to.
    pub routes: BTreeMap<&'static str, (Route, PathBuf)>,
    actor: ActorHandle,
}

impl std::fmt::Debug for HostedCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostedCoordinator")
            .field("transports", &self.transports)
            .finish_non_exhaustive()
    }
}

impl HostedCoordinator {
    /// Bind the listeners, start the dataspace and its planner, write the route files;
    /// returns once they are written.
    pub async fn start(options: CoordinatorOptions) -> Result<HostedCoordinator, CoordinatorError> {
        let CoordinatorOptions {
            host,
            history,
            planner,
            metrics,
            trusted_keys,
            jobs,
        } = options;
        let listeners = Listeners::bind(&host).await?;
        let transports = listeners.transports();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let actor = Actor::top(None, move |t| {
            let hosted = HostedSpace::start(t, &host, listeners).map(|h| {
                crate::announce_trusted_keys(t, &h.dataspace, &trusted_keys);
                nixspace_planner::service::start(t, h.dataspace.clone(), planner, metrics, history);
                // The jobs' sessions join as trusted frontends do.
                let route = h.routes.get(Role::Trusted.name()).map(|(r, _)| r.clone());
                if let (Some(jobs), Some(route)) = (jobs, route) {
                    crate::jobs::start(t, &h.dataspace, route, jobs);
                }
                h.routes
            });
            let _ = tx.send(hosted);
            Ok(())
        });
        let routes = rx.await.map_err(|_| CoordinatorError::Stopped)??;
        Ok(HostedCoordinator {
            transports,
            routes,
            actor,
        })
    }

    /// The route for `role`.
    pub fn route(&self, role: Role) -> Result<Route, CoordinatorError> {
        self.routes
            .get(role.name())
            .map(|(r, _)| r.clone())
            .ok_or(CoordinatorError::NoRoute(role.name()))
    }
}

impl Drop for HostedCoordinator {
    fn drop(&mut self) {
        self.actor.abort();
    }
}
