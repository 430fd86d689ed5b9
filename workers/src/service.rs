//! The worker as a service: [`WorkerService::join`] starts a builder that stays joined to a
//! dataspace (rejoining whenever it restarts; its builds go on meanwhile),
//! [`WorkerService::ended`] waits for the only end a session has (a refused capability),
//! [`WorkerService::drain`] stops it taking steps and tells when its builds are finished, and
//! dropping it leaves. `nixspace worker` and `nixspace daemon` start it the same way.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use nixspace_protocol::WorkerId;
use nixspace_space::{Backoff, JoinError, Route, SessionEvent};
use syndicate::actor::{Account, Activation, AnyValue, FacetRef, Ref};

use crate::builder::{BuilderConfig, DrainDone, Event};
use crate::detached::Builds;

/// Where the running builder can be reached (set once it has joined).
type BuilderHandle = Arc<Mutex<Option<(FacetRef, Arc<Ref<Event>>)>>>;

/// A worker in this process that stays joined to a dataspace.
pub struct WorkerService {
    /// The worker's name.
    pub id: WorkerId,
    session: Pin<Box<dyn Future<Output = JoinError> + Send>>,
    handle: BuilderHandle,
}

impl std::fmt::Debug for WorkerService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WorkerService({})", self.id)
    }
}

impl WorkerService {
    /// Join the dataspace at `route` as a worker configured by `config`; `on_event` hears of
    /// the session's connections (joined, lost, retrying).
    pub fn join(
        route: Route,
        config: BuilderConfig,
        on_event: impl FnMut(SessionEvent<'_>) + Send + 'static,
    ) -> WorkerService {
        let id = config.id.clone();
        let handle: BuilderHandle = Arc::default();
        // Builds outlive a connection: a restarted dataspace gets their outcomes.
        let builds = Builds::with_log_limit(config.max_log_bytes);
        // So does the store: a fetch cut by a lost connection resumes on the next one.
        let store = config.store();
        let body = {
            let handle = Arc::clone(&handle);
            move |t: &mut Activation, ds| {
                let builder = crate::start(t, ds, config.clone(), builds.clone(), store.clone())?;
                if let Ok(mut h) = handle.lock() {
                    *h = Some((t.facet_ref(), builder));
                }
                Ok(())
            }
        };
        let session = async move {
            nixspace_space::join::stay_joined(&route, Backoff::default(), body, on_event).await
        };
        WorkerService {
            id,
            session: Box::pin(session),
            handle,
        }
    }

    /// Wait until the worker cannot join any more; the error says why. Cancel-safe.
    pub async fn ended(&mut self) -> JoinError {
        (&mut self.session).await
    }

    /// Ask the worker to drain: take nothing new, finish its running builds. The receiver
    /// fires once they are finished.
    pub fn drain(&self) -> tokio::sync::oneshot::Receiver<()> {
        let (done, drained) = DrainDone::new();
        let builder = self.handle.lock().ok().and_then(|mut h| h.take());
        if let Some((facet, builder)) = builder {
            let account = Account::new(Some(AnyValue::symbol("drain")), None);
            facet.activate(&account, None, |t| {
                t.message(&builder, Event::Drain { done });
                Ok(())
            });
        }
        drained
    }
}
