//! One job's build: its derivations rooted against the garbage collector, a frontend
//! [`BuildSession`] demanding its steps (inputs first, keep going after failures, waiting for
//! capable workers as long as it takes), its progress written to the history at most once per
//! [`PROGRESS_EVERY`] while steps end (a large job's steps end faster than that) and shown as
//! a `<job …>` record, and at the end each attribute's outputs (rooted too) or failure with
//! the failing step's log tail.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nixspace_frontend::{
    BuildSession, FailureCause, PostBuild, Progress, Report, SessionConfig, SessionError,
    StepOutcome, StoreDb,
};
use nixspace_nix_tools::DaemonPool;
use nixspace_planner::history::{History, HistoryError};
use nixspace_planner::job_history::{AttributeEnd, JobEnd, PendingJob};
use nixspace_protocol::{build, BuildSettings, DrvPath};
use nixspace_space::Route;

use super::board::{Board, JobState};
use super::intake::Answer;

/// How long a job's steps wait for a capable worker, and its session for the dataspace:
/// a job is kept until it ends, not given up.
const WAIT_FOREVER: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// How often at most a job's progress is written to the history while its steps end.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// What every job's runner shares.
pub(crate) struct JobContext {
    /// The dataspace, as the jobs' sessions join it.
    pub route: Route,
    /// The coordinator's store.
    pub pool: DaemonPool,
    /// Its database, when it can be read.
    pub db: Option<Arc<StoreDb>>,
    /// The build history the jobs are kept in.
    pub history: Arc<Mutex<History>>,
    /// Where each job's garbage collector roots go.
    pub roots: PathBuf,
    /// The jobs' records in the dataspace.
    pub board: Board,
}

impl JobContext {
    /// Apply `f` to the history; `None` (logged) when it fails.
    pub fn with_history<T>(
        &self,
        f: impl FnOnce(&mut History) -> Result<T, HistoryError>,
    ) -> Option<T> {
        let mut history = self.history.lock().ok()?;
        match f(&mut history) {
            Ok(value) => Some(value),
            Err(error) => {
                tracing::warn!(%error, "cannot use the build history for jobs");
                None
            }
        }
    }

    /// Job `job` has `built` and `failed` steps of `total`: written to the history and shown.
    fn progress(&self, job: &PendingJob, built: i64, failed: i64, total: i64) {
        self.with_history(|h| h.job_progress(job.id, total, built, failed));
        let state = JobState {
            name: job.name.clone(),
            status: "pending",
            built,
            failed,
            total,
        };
        self.board.show(job.id, state);
    }

    /// Make `path` a garbage collector root of job `job` (a link named by its base name).
    async fn root(&self, job: i64, path: &str) {
        let dir = self.roots.join(job.to_string());
        if let Err(error) = std::fs::create_dir_all(&dir) {
            tracing::warn!(job, %error, dir = %dir.display(), "cannot make the job's root directory");
            return;
        }
        let name = Path::new(path).file_name().unwrap_or_default();
        let link = dir.join(name);
        if let Err(error) = nixspace_nix_tools::add_perm_root(&self.pool, path, &link).await {
            tracing::warn!(job, %error, %path, "cannot keep a job's path from the garbage collector");
        }
    }
}

/// Build `job` to its end and record it; `accepted`, if any (a new submission), is answered
/// once the job's derivations are rooted. Returns the job's number.
pub(crate) async fn run(
    job: PendingJob,
    context: Arc<JobContext>,
    accepted: Option<(Answer, String)>,
) -> i64 {
    let id = job.id;
    let drvs: BTreeSet<&str> = job.attributes.iter().map(|a| a.drv.as_str()).collect();
    for drv in &drvs {
        context.root(id, drv).await;
    }
    context.progress(&job, job.steps_built, 0, 0);
    if let Some((answer, submission)) = accepted {
        answer.give(build::JobAccepted {
            submission,
            job: id.into(),
        });
    }
    let (end, error, attributes) = match build(&job, &context).await {
        Ok(report) => judge(&job, &report),
        Err(error) => {
            tracing::warn!(job = id, %error, "the job cannot be built");
            (JobEnd::Failed, Some(error.to_string()), Vec::new())
        }
    };
    for (_, ended) in &attributes {
        if let AttributeEnd::Built { outputs } = ended {
            for output in outputs {
                context.root(id, output).await;
            }
        }
    }
    tracing::info!(job = id, ?end, "job ended");
    context.with_history(|h| h.job_ended(id, end, error.as_deref(), &attributes));
    context.board.end(
        id,
        match end {
            JobEnd::Built => "built",
            JobEnd::Failed => "failed",
            JobEnd::Cancelled => "cancelled",
        },
    );
    id
}

/// Demand `job`'s steps and follow them to the end, writing its progress.
async fn build(job: &PendingJob, context: &JobContext) -> Result<Report, SessionError> {
    let roots: BTreeSet<DrvPath> = job
        .attributes
        .iter()
        .map(|a| DrvPath::from(a.drv.as_str()))
        .collect();
    let config = SessionConfig {
        route: context.route.clone(),
        requester: format!("job-{}", job.id),
        priority: 0,
        patience: WAIT_FOREVER,
        reconnect_for: WAIT_FOREVER,
        keep_going: true,
        settings: BuildSettings::default(),
        pool: context.pool.clone(),
        db: context.db.clone(),
        post_build: Arc::new(PostBuild::default()),
        substitution: None,
    };
    let mut session = BuildSession::start(config, roots.into_iter().collect()).await?;
    // Steps built by an earlier run of the coordinator are not planned again.
    let total = job.steps_built + session.len() as i64;
    let (mut built, mut failed) = (job.steps_built, 0);
    context.progress(job, built, failed, total);
    let mut written = Instant::now();
    while let Some(progress) = session.next().await? {
        match progress {
            Progress::Built { .. } => built += 1,
            Progress::Failed { .. } => failed += 1,
            _ => continue,
        }
        if written.elapsed() >= PROGRESS_EVERY {
            context.progress(job, built, failed, total);
            written = Instant::now();
        }
    }
    context.progress(job, built, failed, total);
    session.finish().await
}

/// How the job and each of its attributes ended, by the report.
fn judge(
    job: &PendingJob,
    report: &Report,
) -> (JobEnd, Option<String>, Vec<(String, AttributeEnd)>) {
    let attributes: Vec<(String, AttributeEnd)> = job
        .attributes
        .iter()
        .map(|a| {
            (
                a.name.clone(),
                attribute_end(report, &DrvPath::from(a.drv.as_str())),
            )
        })
        .collect();
    let end = match attributes
        .iter()
        .all(|(_, e)| matches!(e, AttributeEnd::Built { .. }))
    {
        true => JobEnd::Built,
        false => JobEnd::Failed,
    };
    (end, None, attributes)
}

/// How the attribute whose derivation is `drv` ended.
fn attribute_end(report: &Report, drv: &DrvPath) -> AttributeEnd {
    if let Some(StepOutcome::Failed(failure)) = report.outcomes.get(drv) {
        // The log tail worth reading is the root cause's: follow failed inputs (at most
        // one hop per step in the report).
        let (mut at, mut cause) = (drv, failure);
        for _ in 0..report.outcomes.len() {
            let FailureCause::Dependency(input) = &cause.cause else {
                break;
            };
            match report.outcomes.get(input) {
                Some(StepOutcome::Failed(next)) => (at, cause) = (input, next),
                _ => break,
            }
        }
        let error = match at == drv {
            true => failure.reason.clone(),
            false => format!(
                "{} (its input {} failed: {})",
                failure.reason,
                at.short_name(),
                cause.reason
            ),
        };
        return AttributeEnd::Failed {
            error,
            log_tail: report
                .tail(at)
                .map(|t| t.iter().cloned().collect())
                .unwrap_or_default(),
        };
    }
    if let Some(reason) = report.unschedulable.get(drv) {
        return AttributeEnd::Failed {
            error: format!("no worker can build it: {reason}"),
            log_tail: Vec::new(),
        };
    }
    match report.outputs.get(drv) {
        Some(outputs) if !outputs.is_empty() => AttributeEnd::Built {
            outputs: outputs.clone(),
        },
        _ => AttributeEnd::Failed {
            error: "not built".to_owned(),
            log_tail: Vec::new(),
        },
    }
}
