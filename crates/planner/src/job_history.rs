//! Jobs in the build history (`nixspace submit`): each job with its attributes, kept until
//! it ends (built, failed or cancelled) so that a restarted coordinator demands the pending
//! ones again, and read back by `nixspace jobs`. Each change is one transaction; progress is
//! written as steps end, as the history writes steps.

use rusqlite::{params, OptionalExtension, Row};
use serde::Serialize;

use crate::history::{now, History, HistoryError};

/// One attribute of a job: its name (an attribute path such as `tests.unit`) and the `.drv`
/// it evaluated to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobAttribute {
    /// The attribute path.
    pub name: String,
    /// The derivation.
    pub drv: String,
}

/// A job still to be built, as a restarted coordinator takes it up again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingJob {
    /// The job's number.
    pub id: i64,
    /// Its name.
    pub name: String,
    /// Its attributes.
    pub attributes: Vec<JobAttribute>,
    /// How many of its steps were built before (by an earlier run of the coordinator).
    pub steps_built: i64,
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEnd {
    /// Every attribute was built.
    Built,
    /// At least one attribute failed (or the job could not be built at all).
    Failed,
    /// A holder of the submit capability cancelled it.
    Cancelled,
}

impl JobEnd {
    fn as_str(self) -> &'static str {
        match self {
            JobEnd::Built => "built",
            JobEnd::Failed => "failed",
            JobEnd::Cancelled => "cancelled",
        }
    }
}

/// How one attribute of a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttributeEnd {
    /// Built: its output paths.
    Built {
        /// The output paths.
        outputs: Vec<String>,
    },
    /// Not built: why, and the last lines of the failing step's log.
    Failed {
        /// Why, in words.
        error: String,
        /// The log's last lines (Nix's 10), oldest first.
        log_tail: Vec<String>,
    },
}

/// A job as `nixspace jobs` shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct JobRecord {
    /// The job's number.
    pub id: i64,
    /// Its name.
    pub name: String,
    /// `pending`, `built`, `failed` or `cancelled`.
    pub status: String,
    /// When it was submitted (seconds since the epoch).
    pub submitted: i64,
    /// When it ended, if it did.
    pub finished: Option<i64>,
    /// How many steps it needs built in all (known once the coordinator planned it).
    pub steps_total: i64,
    /// How many of them were built.
    pub steps_built: i64,
    /// How many of them failed.
    pub steps_failed: i64,
    /// How many are still queued or building.
    pub steps_queued: i64,
    /// Why the job could not be built at all (its derivations could not be read, …).
    pub error: Option<String>,
    /// Its attributes (only when one job is read).
    pub attributes: Vec<AttributeRecord>,
}

/// One attribute of a job as `nixspace jobs ID` shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AttributeRecord {
    /// The attribute path.
    pub name: String,
    /// Its derivation.
    pub drv: String,
    /// `pending`, `built`, `failed` or `cancelled`.
    pub status: String,
    /// Its output paths, once built.
    pub outputs: Vec<String>,
    /// Why it was not built, if it failed.
    pub error: Option<String>,
    /// The last lines of the failing step's log.
    pub log_tail: Vec<String>,
}

const JOB_COLUMNS: &str =
    "id, name, status, submitted, finished, steps_total, steps_built, steps_failed, error";

fn job_row(r: &Row<'_>) -> rusqlite::Result<JobRecord> {
    let (total, built, failed): (i64, i64, i64) = (r.get(5)?, r.get(6)?, r.get(7)?);
    let status: String = r.get(2)?;
    let steps_queued = match status.as_str() {
        "pending" => (total - built - failed).max(0),
        _ => 0,
    };
    Ok(JobRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        status,
        submitted: r.get(3)?,
        finished: r.get(4)?,
        steps_total: total,
        steps_built: built,
        steps_failed: failed,
        steps_queued,
        error: r.get(8)?,
        attributes: Vec::new(),
    })
}

impl History {
    /// Record job `name` with its attributes, submitted as `submission`; returns its number
    /// and whether it is new. A submission recorded before (the submitter asked again) keeps
    /// its number.
    pub fn job_submitted(
        &mut self,
        submission: &str,
        name: &str,
        attributes: &[JobAttribute],
    ) -> Result<(i64, bool), HistoryError> {
        let known: Option<i64> = self
            .conn
            .query_row(
                "SELECT id FROM jobs WHERE submission = ?1",
                params![submission],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        if let Some(id) = known {
            return Ok((id, false));
        }
        self.in_transaction(|tx| {
            tx.execute(
                "INSERT INTO jobs (submission, name, status, submitted) VALUES (?1, ?2, 'pending', ?3)",
                params![submission, name, now()],
            )?;
            let id = tx.last_insert_rowid();
            let mut add =
                tx.prepare("INSERT INTO job_attributes (job, name, drv) VALUES (?1, ?2, ?3)")?;
            for a in attributes {
                add.execute(params![id, a.name, a.drv])?;
            }
            Ok((id, true))
        })
    }

    /// The jobs not ended yet, oldest first, with their attributes.
    pub fn pending_jobs(&self) -> Result<Vec<PendingJob>, HistoryError> {
        let mut jobs = self
            .conn
            .prepare("SELECT id, name, steps_built FROM jobs WHERE status = 'pending' ORDER BY id")
            .map_err(|e| self.err(e))?
            .query_map([], |r| {
                Ok(PendingJob {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    attributes: Vec::new(),
                    steps_built: r.get(2)?,
                })
            })
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        for job in &mut jobs {
            job.attributes = self
                .conn
                .prepare("SELECT name, drv FROM job_attributes WHERE job = ?1 ORDER BY name")
                .map_err(|e| self.err(e))?
                .query_map(params![job.id], |r| {
                    Ok(JobAttribute {
                        name: r.get(0)?,
                        drv: r.get(1)?,
                    })
                })
                .map_err(|e| self.err(e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| self.err(e))?;
        }
        Ok(jobs)
    }

    /// Job `id`'s progress: of `total` steps, `built` were built and `failed` failed.
    pub fn job_progress(
        &mut self,
        id: i64,
        total: i64,
        built: i64,
        failed: i64,
    ) -> Result<(), HistoryError> {
        self.conn
            .execute(
                "UPDATE jobs SET steps_total = ?2, steps_built = ?3, steps_failed = ?4
                 WHERE id = ?1 AND status = 'pending'",
                params![id, total, built, failed],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Job `id` ended as `end` (with `error` when it could not be built at all), its
    /// attributes as `attributes` says (by name; the others keep their status, or become
    /// `cancelled` with the job). Returns whether the job was still pending (an ended job is
    /// not rewritten).
    pub fn job_ended(
        &mut self,
        id: i64,
        end: JobEnd,
        error: Option<&str>,
        attributes: &[(String, AttributeEnd)],
    ) -> Result<bool, HistoryError> {
        self.in_transaction(|tx| {
            let changed = tx.execute(
                "UPDATE jobs SET status = ?2, error = ?3, finished = ?4
                 WHERE id = ?1 AND status = 'pending'",
                params![id, end.as_str(), error, now()],
            )?;
            if changed == 0 {
                return Ok(false);
            }
            {
                let mut set = tx.prepare(
                    "UPDATE job_attributes SET status = ?3, outputs = ?4, error = ?5, log_tail = ?6
                     WHERE job = ?1 AND name = ?2",
                )?;
                for (name, ended) in attributes {
                    match ended {
                        AttributeEnd::Built { outputs } => {
                            set.execute(params![id, name, "built", outputs.join(" "), None::<String>, None::<String>])?
                        }
                        AttributeEnd::Failed { error, log_tail } => set.execute(params![
                            id,
                            name,
                            "failed",
                            None::<String>,
                            error,
                            log_tail.join("\n")
                        ])?,
                    };
                }
            }
            if end == JobEnd::Cancelled {
                tx.execute(
                    "UPDATE job_attributes SET status = 'cancelled' WHERE job = ?1 AND status = 'pending'",
                    params![id],
                )?;
            }
            Ok(true)
        })
    }

    /// The most recently submitted jobs, newest first (without their attributes).
    pub fn jobs(&self, limit: usize) -> Result<Vec<JobRecord>, HistoryError> {
        self.conn
            .prepare(&format!(
                "SELECT {JOB_COLUMNS} FROM jobs ORDER BY id DESC LIMIT ?1"
            ))
            .map_err(|e| self.err(e))?
            .query_map(params![limit as i64], job_row)
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))
    }

    /// Job `id` with its attributes, if there is one.
    pub fn job(&self, id: i64) -> Result<Option<JobRecord>, HistoryError> {
        let job = self
            .conn
            .query_row(
                &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"),
                params![id],
                job_row,
            )
            .optional()
            .map_err(|e| self.err(e))?;
        let Some(mut job) = job else {
            return Ok(None);
        };
        job.attributes = self
            .conn
            .prepare(
                "SELECT name, drv, status, outputs, error, log_tail FROM job_attributes
                 WHERE job = ?1 ORDER BY name",
            )
            .map_err(|e| self.err(e))?
            .query_map(params![id], |r| {
                let outputs: Option<String> = r.get(3)?;
                let tail: Option<String> = r.get(5)?;
                Ok(AttributeRecord {
                    name: r.get(0)?,
                    drv: r.get(1)?,
                    status: r.get(2)?,
                    outputs: outputs
                        .map(|o| o.split_whitespace().map(str::to_owned).collect())
                        .unwrap_or_default(),
                    error: r.get(4)?,
                    log_tail: tail
                        .map(|t| t.lines().map(str::to_owned).collect())
                        .unwrap_or_default(),
                })
            })
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        Ok(Some(job))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attribute(name: &str) -> JobAttribute {
        JobAttribute {
            name: name.to_owned(),
            drv: format!("/nix/store/x-{name}.drv"),
        }
    }

    #[test]
    fn a_job_stays_pending_until_it_ends_and_keeps_its_results() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = History::open(&dir.path().join("history.sqlite")).unwrap();
        let (id, new) = h
            .job_submitted("s1", "release", &[attribute("a"), attribute("b")])
            .unwrap();
        assert!(new);
        assert_eq!(h.job_submitted("s1", "release", &[]).unwrap(), (id, false));
        let pending = h.pending_jobs().unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].attributes, [attribute("a"), attribute("b")]);
        h.job_progress(id, 3, 1, 1).unwrap();
        assert_eq!(h.job(id).unwrap().unwrap().steps_queued, 1);
        let ends = [
            (
                "a".to_owned(),
                AttributeEnd::Built {
                    outputs: vec!["/nix/store/y-a".into()],
                },
            ),
            (
                "b".to_owned(),
                AttributeEnd::Failed {
                    error: "exit code 1".into(),
                    log_tail: vec!["one".into(), "two".into()],
                },
            ),
        ];
        assert!(h.job_ended(id, JobEnd::Failed, None, &ends).unwrap());
        assert!(h.pending_jobs().unwrap().is_empty());
        let job = h.job(id).unwrap().unwrap();
        assert_eq!(job.status, "failed");
        assert_eq!(job.attributes[0].outputs, ["/nix/store/y-a"]);
        assert_eq!(job.attributes[1].log_tail, ["one", "two"]);
        // An ended job is not rewritten.
        assert!(!h.job_ended(id, JobEnd::Cancelled, None, &[]).unwrap());
        assert_eq!(h.job(id).unwrap().unwrap().status, "failed");
    }
}
