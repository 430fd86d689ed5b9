//! Builds that outlive the worker's connection to the dataspace.
//!
//! A build runs as its own task, not inside the connection's actor: if the dataspace goes
//! away (its coordinator restarts), the build goes on, and its outcome waits here. On
//! rejoining, the worker claims its pending steps again and, once granted, reports the
//! outcome (or follows the build still running) instead of building again. Only the planner
//! withdrawing a step stops its build ([`Builds::cancel`]).
//!
//! A build runs its builder only while a connection follows it, that is while the step is
//! granted to this worker ([`Grant`]): one cut off before its builder started (while it
//! fetched the inputs) waits for the step to be granted again, so a step another worker
//! built meanwhile, or that nobody demands any more, is not built a second time.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nixspace_nix_tools::{BuildLog, BuiltStep};
use nixspace_protocol::{build, DrvPath};
use tokio::sync::watch;
use tokio::task::AbortHandle;

/// How a build ended: its outputs (and realisations), or why it failed.
pub type Outcome = Result<BuiltStep, BuildFailure>;

/// Why a build produced no outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildFailure {
    /// What went wrong.
    pub reason: String,
    /// Whether building it again (elsewhere) may help.
    pub kind: build::FailureKind,
    /// What made it fail: the build itself, or what is around it.
    pub cause: build::FailureCause,
    /// An input that no store in the dataspace has any more: the step that made it must be
    /// built again.
    pub lost: Option<String>,
}

impl BuildFailure {
    /// A failure of the infrastructure around the build (the daemon connection, a
    /// transfer, …): worth retrying.
    pub fn transient(reason: impl Into<String>) -> BuildFailure {
        BuildFailure {
            reason: reason.into(),
            kind: build::FailureKind::Transient,
            cause: build::FailureCause::Infrastructure,
            lost: None,
        }
    }

    /// A failure of the build itself, which building again would repeat.
    pub fn permanent(reason: impl Into<String>) -> BuildFailure {
        BuildFailure {
            reason: reason.into(),
            kind: build::FailureKind::Permanent,
            cause: build::FailureCause::Build,
            lost: None,
        }
    }
}

/// Where a build's log lines and activity events go (the connection following it, if any).
type LineSink = Box<dyn Fn(BuildLog) + Send + Sync>;

struct Slot {
    outcome: watch::Sender<Option<Outcome>>,
    /// How many connections follow the build now (each holds a [`Following`]).
    followers: watch::Sender<usize>,
    lines: Mutex<Option<LineSink>>,
    task: Mutex<Option<AbortHandle>>,
    /// Log bytes (newlines counted, and activity events' sizes) the build produced so far.
    log_bytes: AtomicU64,
    /// Log bytes passed on at most; the rest is dropped.
    log_limit: u64,
}

/// The default cap on the log bytes one build passes on.
pub const DEFAULT_MAX_LOG_BYTES: u64 = 10 << 20;

/// Sends a running build's log lines and activity events to whichever connection follows it
/// now.
#[derive(Clone)]
pub struct LogLines(Arc<Slot>);

impl LogLines {
    /// Pass one log line or activity event on (dropped while no connection follows the
    /// build). Past the log cap they are dropped, the first of them replaced by a note saying
    /// so.
    pub fn send(&self, log: BuildLog) {
        let size = log.size();
        let before = self.0.log_bytes.fetch_add(size, Ordering::Relaxed);
        let limit = self.0.log_limit;
        if before > limit {
            return;
        }
        let log = if before + size > limit {
            tracing::warn!(limit, "build log truncated");
            BuildLog::Line(format!(
                "nixspace: log truncated after {before} bytes (worker --max-log-bytes {limit})"
            ))
        } else {
            log
        };
        if let Ok(lines) = self.0.lines.lock() {
            if let Some(sink) = lines.as_ref() {
                sink(log);
            }
        }
    }
}

/// Lets a build wait until its step is granted to this worker, i.e. until a connection
/// follows it.
pub struct Grant(watch::Receiver<usize>);

impl Grant {
    /// Return once a connection follows the build (at once if one does now).
    pub async fn granted(&mut self) {
        // The sender lives in the build's slot, which outlives the build: no error to see.
        let _ = self.0.wait_for(|followers| *followers > 0).await;
    }
}

/// Held by the connection following a build, as long as it follows it (while the step is
/// granted to this worker on that connection); dropping it lets go.
pub struct Following(Arc<Slot>);

impl Drop for Following {
    fn drop(&mut self) {
        self.0.followers.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Following {
    fn of(slot: &Arc<Slot>) -> Following {
        slot.followers.send_modify(|n| *n += 1);
        Following(Arc::clone(slot))
    }
}

/// The worker's builds, running or finished but not yet acknowledged, by step.
#[derive(Clone)]
pub struct Builds {
    slots: Arc<Mutex<HashMap<DrvPath, Arc<Slot>>>>,
    log_limit: u64,
}

impl Default for Builds {
    fn default() -> Self {
        Builds::with_log_limit(DEFAULT_MAX_LOG_BYTES)
    }
}

impl Builds {
    /// No builds yet; each build passes on at most `log_limit` bytes of log.
    pub fn with_log_limit(log_limit: u64) -> Builds {
        Builds {
            slots: Arc::default(),
            log_limit,
        }
    }

    /// Steps built or being built whose outcome the planner has not taken yet.
    pub fn pending(&self) -> Vec<DrvPath> {
        self.slots
            .lock()
            .map(|s| s.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Whether a build of `drv` runs, or finished with its outcome not yet taken.
    pub fn has(&self, drv: &DrvPath) -> bool {
        self.slots.lock().is_ok_and(|s| s.contains_key(drv))
    }

    /// Follow the build of `drv` (granted to this worker) while the returned [`Following`]
    /// is held, sending its log lines and activity events to `lines`; start it with `start` if
    /// it is not running or finished already. The receiver sees its outcome.
    pub fn follow<F>(
        &self,
        drv: &DrvPath,
        lines: LineSink,
        start: impl FnOnce(LogLines, Grant) -> F,
    ) -> Result<(watch::Receiver<Option<Outcome>>, Following), BuildFailure>
    where
        F: Future<Output = Outcome> + Send + 'static,
    {
        let mut slots = self
            .slots
            .lock()
            .map_err(|_| BuildFailure::transient("worker state poisoned"))?;
        if let Some(slot) = slots.get(drv) {
            if let Ok(mut l) = slot.lines.lock() {
                *l = Some(lines);
            }
            tracing::info!(%drv, "following a build that outlived a connection");
            return Ok((slot.outcome.subscribe(), Following::of(slot)));
        }
        let (tx, rx) = watch::channel(None);
        let slot = Arc::new(Slot {
            outcome: tx,
            followers: watch::Sender::new(0),
            lines: Mutex::new(Some(lines)),
            task: Mutex::new(None),
            log_bytes: AtomicU64::new(0),
            log_limit: self.log_limit,
        });
        let following = Following::of(&slot);
        let build = start(
            LogLines(Arc::clone(&slot)),
            Grant(slot.followers.subscribe()),
        );
        let done = Arc::clone(&slot);
        let task = tokio::spawn(async move {
            let outcome = build.await;
            done.outcome.send_replace(Some(outcome));
        });
        if let Ok(mut t) = slot.task.lock() {
            *t = Some(task.abort_handle());
        }
        slots.insert(drv.clone(), slot);
        Ok((rx, following))
    }

    /// The planner withdrew `drv` (its outcome is recorded, or nobody wants it): stop its
    /// build if it still runs, and forget it.
    pub fn cancel(&self, drv: &DrvPath) {
        let slot = self.slots.lock().ok().and_then(|mut s| s.remove(drv));
        if let Some(task) = slot.and_then(|s| s.task.lock().ok().and_then(|mut t| t.take())) {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn quiet() -> LineSink {
        Box::new(|_| {})
    }

    fn built(outputs: &[&str]) -> BuiltStep {
        BuiltStep {
            outputs: outputs.iter().map(|o| o.to_string()).collect(),
            realisations: Vec::new(),
            usage: None,
        }
    }

    #[tokio::test]
    async fn a_build_runs_once_and_its_outcome_waits_to_be_taken() {
        let builds = Builds::default();
        let (mut rx, _following) = builds
            .follow(&"d".into(), quiet(), |lines, _| async move {
                lines.send(BuildLog::Line("hello".into()));
                Ok(built(&["/out"]))
            })
            .unwrap();
        rx.wait_for(Option::is_some).await.unwrap();
        // Followed again (after a reconnection): not started again, the outcome is there.
        let (again, _) = builds
            .follow(&"d".into(), quiet(), |_, _| async { panic!("built twice") })
            .unwrap();
        assert_eq!(*again.borrow(), Some(Ok(built(&["/out"]))));
        assert_eq!(builds.pending(), ["d"]);
        builds.cancel(&"d".into());
        assert!(builds.pending().is_empty());
    }

    #[tokio::test]
    async fn a_log_past_the_cap_is_cut_with_a_note() {
        let builds = Builds::with_log_limit(10);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        let (mut rx, _following) = builds
            .follow(
                &"d".into(),
                Box::new(move |l| match l {
                    BuildLog::Line(l) => sink.lock().unwrap().push(l),
                    BuildLog::Activity(e) => panic!("{e:?}"),
                }),
                |lines, _| async move {
                    for line in ["1234", "5678", "abcd", "efgh"] {
                        lines.send(BuildLog::Line(line.into()));
                    }
                    Ok(built(&[]))
                },
            )
            .unwrap();
        rx.wait_for(Option::is_some).await.unwrap();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert_eq!(seen[..2], ["1234", "5678"]);
        assert!(seen[2].contains("log truncated after 10 bytes"), "{seen:?}");
    }

    #[tokio::test]
    async fn cancelling_stops_a_running_build() {
        let builds = Builds::default();
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let (dropped_tx, dropped) = tokio::sync::oneshot::channel::<()>();
        let _followed = builds
            .follow(&"d".into(), quiet(), |_, _| async move {
                let _guard = dropped_tx;
                let _ = started_tx.send(());
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(built(&[]))
            })
            .unwrap();
        started.await.unwrap();
        builds.cancel(&"d".into());
        // The build's future was dropped: its guard went with it.
        assert!(tokio::time::timeout(Duration::from_secs(5), dropped)
            .await
            .is_ok());
    }

    /// A build cut off from its connection before its builder ran (still fetching inputs)
    /// runs it only once a connection follows it again: never for a step granted to nobody.
    #[tokio::test]
    async fn a_build_left_by_its_connection_runs_its_builder_only_once_followed_again() {
        let builds = Builds::default();
        let (inputs_tx, inputs) = tokio::sync::oneshot::channel::<()>();
        let (ran_tx, mut ran) = watch::channel(false);
        let (mut rx, following) = builds
            .follow(&"d".into(), quiet(), |_, mut grant| async move {
                // Fetching the inputs, past the moment the connection goes.
                let _ = inputs.await;
                grant.granted().await;
                ran_tx.send_replace(true);
                Ok(built(&["/out"]))
            })
            .unwrap();
        drop(following);
        inputs_tx.send(()).unwrap();
        // Positive control for the wait below: the same wait sees a run that happens.
        let (control_tx, mut control) = watch::channel(false);
        tokio::spawn(async move { control_tx.send_replace(true) });
        assert!(
            tokio::time::timeout(Duration::from_secs(2), control.wait_for(|r| *r))
                .await
                .is_ok()
        );
        // Nobody follows the build: its builder does not run.
        assert!(
            tokio::time::timeout(Duration::from_secs(2), ran.wait_for(|r| *r))
                .await
                .is_err(),
            "the builder ran for a step granted to nobody"
        );
        assert_eq!(*rx.borrow(), None);
        // Granted again on a new connection: the build goes on where it was.
        let (_again, _following) = builds
            .follow(&"d".into(), quiet(), |_, _| async {
                panic!("started twice")
            })
            .unwrap();
        rx.wait_for(Option::is_some).await.unwrap();
        assert!(*ran.borrow());
    }
}
