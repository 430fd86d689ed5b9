//! Asking the coordinator something through the dataspace (`submit`, `cancel`): assert a
//! request record, wait for the answer the coordinator asserts while the request lasts, then
//! leave (the request goes with the connection); or, with no request, wait for a record
//! (`submit --wait`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nixspace_protocol::build;
use nixspace_space::Route;
use preserves_schema::Unparse;
use syndicate::actor::{Activation, ActorResult, Cap};
use syndicate_macros::during;
use tokio::sync::oneshot;

/// How long to wait for the coordinator's answer.
const PATIENCE: Duration = Duration::from_secs(60);

/// Where an observer puts the answer (the first one counts).
pub struct Reply<T>(Arc<Mutex<Option<oneshot::Sender<T>>>>);

impl<T> Clone for Reply<T> {
    fn clone(&self) -> Self {
        Reply(Arc::clone(&self.0))
    }
}

impl<T> Reply<T> {
    /// Give the answer.
    pub fn give(&self, answer: T) {
        if let Some(tx) = self.0.lock().ok().and_then(|mut tx| tx.take()) {
            let _ = tx.send(answer);
        }
    }
}

/// Join the dataspace at `route`, assert `request`, and wait for the answer that the
/// observers `observe` sets up give.
pub async fn ask<Q, T, F>(route: &Route, request: Q, observe: F) -> anyhow::Result<T>
where
    Q: Unparse<Arc<Cap>> + Send + 'static,
    T: Send + 'static,
    F: FnOnce(&mut Activation, &Arc<Cap>, Reply<T>) -> ActorResult + Send + 'static,
{
    let body = move |t: &mut Activation, ds: &Arc<Cap>, reply| {
        observe(t, ds, reply)?;
        ds.assert(t, &request);
        Ok(())
    };
    wait_for(route, body, Some(PATIENCE)).await
}

/// Ask the coordinator, through the dataspace at `route` (a submit or trusted capability), to
/// cancel job `id`; its answer: `cancelled`, or why not.
pub async fn cancel_job(route: &Route, id: i64) -> anyhow::Result<String> {
    let request = build::CancelJob { job: id.into() };
    ask(route, request, move |t: &mut Activation, ds, reply| {
        during!(t, ds, <job-cancelled $job: i64 $outcome: String>, |_t: &mut Activation| {
            if job == id {
                reply.give(outcome.clone());
            }
            Ok(())
        });
        Ok(())
    })
    .await
}

/// Join the dataspace at `route`, run `body` there, and wait for the answer it gives, for at
/// most `patience` (`None`: as long as it takes, while the connection lasts).
pub async fn wait_for<T, F>(route: &Route, body: F, patience: Option<Duration>) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce(&mut Activation, &Arc<Cap>, Reply<T>) -> ActorResult + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    let reply = Reply(Arc::new(Mutex::new(Some(tx))));
    let actor =
        nixspace_space::join::join(route, move |t: &mut Activation, ds| body(t, &ds, reply))
            .await?;
    let patience = async {
        match patience {
            Some(p) => tokio::time::sleep(p).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(actor);
    tokio::select! {
        answer = rx => answer.map_err(|_| anyhow::anyhow!("the dataspace closed the connection before the coordinator answered")),
        end = &mut actor => anyhow::bail!("lost the dataspace: {}", nixspace_space::join::describe_end(end)),
        _ = patience => anyhow::bail!(
            "the coordinator did not answer within {PATIENCE:?} (jobs are kept by `nixspace up` hosting the dataspace)"
        ),
    }
}
