//! Jobs that outlive their client (`nixspace submit`): a job is named attributes of
//! derivations that the coordinator keeps in its build history and builds itself, as a
//! frontend of its own dataspace, until every attribute is built or failed, or the job is
//! cancelled.
//!
//! - [`intake`]: the `submit-job` and `cancel-job` records, checked, and the answers.
//! - [`board`]: the `<job …>` records of the pending and recently ended jobs.
//! - [`runner`]: one job's build: garbage collector roots for its derivations, a frontend
//!   `BuildSession` demanding its steps, its progress and results written to the history.
//!
//! The keeper (this module) records each accepted job before it is answered, runs one runner
//! per pending job, and on start takes up every job an earlier run left pending (the
//! coordinator was stopped or killed): their demands are asserted again.

mod board;
mod intake;
mod runner;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use nixspace_frontend::StoreDb;
use nixspace_nix_tools::{DaemonPool, PoolConfig};
use nixspace_planner::history::History;
use nixspace_planner::job_history::{JobEnd, PendingJob};
use nixspace_protocol::build;
use nixspace_space::Route;
use syndicate::actor::{Activation, Cap};
use tokio::sync::mpsc::{self, UnboundedReceiver};
use tokio::task::{AbortHandle, JoinSet};

use board::Board;
use intake::{Answer, Submission};
pub use intake::{MAX_JOB_ATTRIBUTES, MAX_NAME_BYTES};
use runner::JobContext;

/// What keeping jobs takes.
#[derive(Debug, Clone)]
pub struct JobsOptions {
    /// The build history file the jobs are kept in (opened and migrated by the caller).
    pub history: PathBuf,
    /// Where each job's garbage collector roots go: `<roots>/<job>/`, one link per
    /// derivation and, once built, per output.
    pub roots: PathBuf,
    /// The most jobs kept pending at once; a submission past it is refused with the reason.
    pub max_pending: usize,
}

/// The default of [`JobsOptions::max_pending`].
pub const DEFAULT_MAX_PENDING_JOBS: usize = 1_000;

/// What the intake hands the keeper.
pub(crate) enum Request {
    /// A checked submission, answered once recorded and rooted.
    Submit {
        /// The submission.
        submission: Submission,
        /// Where the answer goes.
        answer: Answer,
    },
    /// A request to cancel job `job`.
    Cancel {
        /// The job's number.
        job: i64,
        /// Where the answer goes.
        answer: Answer,
    },
}

/// Start keeping jobs on `ds`, the jobs' sessions joining it with `route` (a submit or
/// trusted route); the keeper stops with the active facet or its actor.
pub(crate) fn start(t: &mut Activation, ds: &Arc<Cap>, route: Route, options: JobsOptions) {
    let history = match History::open(&options.history) {
        Ok(history) => history,
        Err(error) => {
            tracing::error!(%error, "cannot keep jobs without the build history");
            return;
        }
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let pool = DaemonPool::new(PoolConfig::new(2));
    intake::observe(t, ds, pool.store_dir().as_str().to_owned(), tx);
    let context = Arc::new(JobContext {
        route,
        db: StoreDb::open_local(pool.store_dir().clone()).map(Arc::new),
        pool,
        history: Arc::new(Mutex::new(history)),
        roots: options.roots,
        board: Board::new(t.facet_ref(), Arc::clone(ds)),
    });
    // The keeper goes with the facet: when it stops, or when the actor ends without stopping
    // it (aborted, or its connection dropped), which drops the facet's stop actions.
    let keeper = StopOnDrop(tokio::spawn(keep(context, options.max_pending, rx)));
    t.on_stop(move |_| {
        drop(keeper);
        Ok(())
    });
}

/// A task aborted when this is dropped.
struct StopOnDrop(tokio::task::JoinHandle<()>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The keeper's state: the runner of each pending job.
struct Keeper {
    context: Arc<JobContext>,
    runners: JoinSet<i64>,
    running: HashMap<i64, AbortHandle>,
    /// The most jobs pending at once.
    max_pending: usize,
}

/// Take up the pending jobs, then serve the intake's requests until it stops.
async fn keep(
    context: Arc<JobContext>,
    max_pending: usize,
    mut requests: UnboundedReceiver<Request>,
) {
    let mut keeper = Keeper {
        context,
        runners: JoinSet::new(),
        running: HashMap::new(),
        max_pending,
    };
    match keeper.context.with_history(|h| h.pending_jobs()) {
        Some(pending) => {
            if !pending.is_empty() {
                tracing::info!(jobs = pending.len(), "taking up the pending jobs");
            }
            for job in pending {
                keeper.run(job, None);
            }
        }
        None => tracing::error!("cannot read the pending jobs"),
    }
    loop {
        tokio::select! {
            request = requests.recv() => match request {
                Some(Request::Submit { submission, answer }) => keeper.submit(submission, answer),
                Some(Request::Cancel { job, answer }) => keeper.cancel(job, answer),
                None => return,
            },
            Some(ended) = keeper.runners.join_next() => {
                if let Ok(job) = ended {
                    keeper.running.remove(&job);
                }
            }
        }
    }
}

impl Keeper {
    /// Run `job`; `answer`, if any, is told once its derivations are rooted.
    fn run(&mut self, job: PendingJob, answer: Option<(Answer, String)>) {
        let id = job.id;
        let handle = self
            .runners
            .spawn(runner::run(job, Arc::clone(&self.context), answer));
        self.running.insert(id, handle);
    }

    fn submit(&mut self, submission: Submission, answer: Answer) {
        let Submission {
            submission,
            name,
            attributes,
        } = submission;
        if self.running.len() >= self.max_pending {
            tracing::warn!(%name, "a job refused: {} pending already", self.running.len());
            answer.give(build::JobRefused {
                submission,
                reason: format!(
                    "the coordinator keeps at most {} pending jobs (up --max-pending-jobs); \
                     wait for some to end, or cancel some",
                    self.max_pending
                ),
            });
            return;
        }
        let recorded = self
            .context
            .with_history(|h| h.job_submitted(&submission, &name, &attributes));
        let Some((id, new)) = recorded else {
            answer.give(build::JobRefused {
                submission,
                reason: "the coordinator cannot record the job in its history".into(),
            });
            return;
        };
        if !new {
            answer.give(build::JobAccepted {
                submission,
                job: id.into(),
            });
            return;
        }
        tracing::info!(job = id, %name, attributes = attributes.len(), "job submitted");
        let job = PendingJob {
            id,
            name,
            attributes,
            steps_built: 0,
        };
        self.run(job, Some((answer, submission)));
    }

    fn cancel(&mut self, job: i64, answer: Answer) {
        if let Some(runner) = self.running.remove(&job) {
            // Its session is dropped: its demands are withdrawn.
            runner.abort();
        }
        let outcome = match self
            .context
            .with_history(|h| h.job_ended(job, JobEnd::Cancelled, None, &[]))
        {
            Some(true) => {
                tracing::info!(job, "job cancelled");
                self.context.board.end(job, "cancelled");
                "cancelled".to_owned()
            }
            Some(false) => match self.context.with_history(|h| h.job(job)) {
                Some(Some(ended)) => format!("job {job} has ended already: {}", ended.status),
                Some(None) => format!("there is no job {job}"),
                None => "the coordinator cannot read its history".to_owned(),
            },
            None => "the coordinator cannot record the cancellation".to_owned(),
        };
        answer.give(build::JobCancelled {
            job: job.into(),
            outcome,
        });
    }
}
