//! The planner's build history in SQLite: every step it was asked for and
//! every attempt to build it, kept across restarts of `nixspace up`.
//!
//! One file, versioned with `PRAGMA user_version`; [`History::open`] applies
//! the migrations a file lacks, in order, each in its own transaction;
//! [`History::open_read_only`] (for `nixspace history`) never writes, and refuses a file
//! of another version. Each recorded state change is one transaction, or part of a batch
//! ([`History::begin_batch`]: the planner writes one turn's changes in one commit); every
//! connection waits up to [`BUSY_TIMEOUT`] for another's lock. Statements run through the
//! connection's cache of prepared statements. A writing connection only appends its commits
//! to the write-ahead log: a `Checkpointer` thread with a connection of its own moves
//! them into the database file.
//!
//! An outcome closes only the attempt of the worker that reported it. Attempts an earlier
//! run left open (the coordinator stopped or was killed while they ran) stay open while
//! their worker may rejoin and report them; they are closed as `lost` ("interrupted") when
//! the step's next attempt starts or when the step ends on another worker.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nixspace_protocol::{DrvPath, WorkerId};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::Serialize;

use crate::schedule::FailureCause;

/// The schema, one entry per version; never edit a released entry, append.
const MIGRATIONS: &[&str] = &[
    // 1: steps and attempts.
    "CREATE TABLE steps (
         drv TEXT PRIMARY KEY,
         system TEXT NOT NULL,
         first_demanded INTEGER NOT NULL,
         status TEXT NOT NULL CHECK (status IN ('demanded', 'built', 'failed')),
         outputs TEXT,
         error TEXT,
         finished INTEGER
     );
     CREATE TABLE attempts (
         id INTEGER PRIMARY KEY,
         drv TEXT NOT NULL REFERENCES steps(drv),
         worker TEXT NOT NULL,
         started INTEGER NOT NULL,
         finished INTEGER,
         outcome TEXT CHECK (outcome IN ('built', 'failed', 'lost', 'cancelled')),
         reason TEXT
     );
     CREATE INDEX attempts_by_drv ON attempts(drv);",
    // 2: resolved content-addressed steps: status `resolved`, and the link from each original
    // to the derivation it resolved to.
    "CREATE TABLE steps_v2 (
         drv TEXT PRIMARY KEY,
         system TEXT NOT NULL,
         first_demanded INTEGER NOT NULL,
         status TEXT NOT NULL CHECK (status IN ('demanded', 'built', 'failed', 'resolved')),
         outputs TEXT,
         error TEXT,
         finished INTEGER
     );
     INSERT INTO steps_v2 SELECT * FROM steps;
     DROP TABLE steps;
     ALTER TABLE steps_v2 RENAME TO steps;
     CREATE TABLE resolutions (
         resolved_from TEXT PRIMARY KEY REFERENCES steps(drv),
         resolved_to TEXT NOT NULL REFERENCES steps(drv),
         recorded INTEGER NOT NULL
     );
     CREATE INDEX resolutions_by_target ON resolutions(resolved_to);",
    // 3: realisations of content-addressed outputs.
    "CREATE TABLE realisations (
         id TEXT PRIMARY KEY,
         out_path TEXT NOT NULL,
         recorded INTEGER NOT NULL
     );
     CREATE INDEX realisations_by_path ON realisations(out_path);",
    // 4: the signatures a realisation carries, space-separated (as Nix keeps them).
    "ALTER TABLE realisations ADD COLUMN signatures TEXT NOT NULL DEFAULT '';",
    // 5: what made a step fail or an attempt end without outputs, beside the reason in
    // words: `build`, `dependency` (the failed input derivation in `failed_input`) or
    // `infrastructure`. NULL in rows written before.
    "ALTER TABLE steps ADD COLUMN cause TEXT
         CHECK (cause IN ('build', 'dependency', 'infrastructure'));
     ALTER TABLE steps ADD COLUMN failed_input TEXT;
     ALTER TABLE attempts ADD COLUMN cause TEXT
         CHECK (cause IN ('build', 'dependency', 'infrastructure'));
     ALTER TABLE attempts ADD COLUMN failed_input TEXT;",
    // 6: an attempt may end `rejected`: the planner discarded the worker's result (outputs
    // other than the step's), the reason in `reason`.
    "CREATE TABLE attempts_v6 (
         id INTEGER PRIMARY KEY,
         drv TEXT NOT NULL REFERENCES steps(drv),
         worker TEXT NOT NULL,
         started INTEGER NOT NULL,
         finished INTEGER,
         outcome TEXT CHECK (outcome IN ('built', 'failed', 'lost', 'cancelled', 'rejected')),
         reason TEXT,
         cause TEXT CHECK (cause IN ('build', 'dependency', 'infrastructure')),
         failed_input TEXT
     );
     INSERT INTO attempts_v6 (id, drv, worker, started, finished, outcome, reason, cause,
                              failed_input)
         SELECT id, drv, worker, started, finished, outcome, reason, cause, failed_input
         FROM attempts;
     DROP TABLE attempts;
     ALTER TABLE attempts_v6 RENAME TO attempts;
     CREATE INDEX attempts_by_drv ON attempts(drv);",
    // 7: what a built attempt used, as its worker measured it.
    "ALTER TABLE attempts ADD COLUMN peak_memory INTEGER;
     ALTER TABLE attempts ADD COLUMN cpu_ms INTEGER;
     ALTER TABLE attempts ADD COLUMN wall_ms INTEGER;",
    // 8: each step's package (its derivation name without the version), what the planner
    // learns memory estimates by; NULL in rows written before.
    "ALTER TABLE steps ADD COLUMN package TEXT;
     CREATE INDEX steps_by_package ON steps(package);",
    // 9: a cause may be `out-of-memory`: the build was killed for going over the memory one
    // build may use on its worker (the limit in the reason).
    "CREATE TABLE steps_v9 (
         drv TEXT PRIMARY KEY,
         system TEXT NOT NULL,
         first_demanded INTEGER NOT NULL,
         status TEXT NOT NULL CHECK (status IN ('demanded', 'built', 'failed', 'resolved')),
         outputs TEXT,
         error TEXT,
         finished INTEGER,
         cause TEXT CHECK (cause IN ('build', 'dependency', 'infrastructure', 'out-of-memory')),
         failed_input TEXT,
         package TEXT
     );
     INSERT INTO steps_v9 (drv, system, first_demanded, status, outputs, error, finished, cause,
                           failed_input, package)
         SELECT drv, system, first_demanded, status, outputs, error, finished, cause,
                failed_input, package
         FROM steps;
     DROP TABLE steps;
     ALTER TABLE steps_v9 RENAME TO steps;
     CREATE INDEX steps_by_package ON steps(package);
     CREATE TABLE attempts_v9 (
         id INTEGER PRIMARY KEY,
         drv TEXT NOT NULL REFERENCES steps(drv),
         worker TEXT NOT NULL,
         started INTEGER NOT NULL,
         finished INTEGER,
         outcome TEXT CHECK (outcome IN ('built', 'failed', 'lost', 'cancelled', 'rejected')),
         reason TEXT,
         cause TEXT CHECK (cause IN ('build', 'dependency', 'infrastructure', 'out-of-memory')),
         failed_input TEXT,
         peak_memory INTEGER,
         cpu_ms INTEGER,
         wall_ms INTEGER
     );
     INSERT INTO attempts_v9 (id, drv, worker, started, finished, outcome, reason, cause,
                              failed_input, peak_memory, cpu_ms, wall_ms)
         SELECT id, drv, worker, started, finished, outcome, reason, cause, failed_input,
                peak_memory, cpu_ms, wall_ms
         FROM attempts;
     DROP TABLE attempts;
     ALTER TABLE attempts_v9 RENAME TO attempts;
     CREATE INDEX attempts_by_drv ON attempts(drv);",
    // 10: jobs (`nixspace submit`): each job, its progress in steps, and each of its attributes
    // with its `.drv` and, once it ended, its outputs or its failure and log tail.
    "CREATE TABLE jobs (
         id INTEGER PRIMARY KEY,
         submission TEXT NOT NULL UNIQUE,
         name TEXT NOT NULL,
         status TEXT NOT NULL CHECK (status IN ('pending', 'built', 'failed', 'cancelled')),
         submitted INTEGER NOT NULL,
         finished INTEGER,
         steps_total INTEGER NOT NULL DEFAULT 0,
         steps_built INTEGER NOT NULL DEFAULT 0,
         steps_failed INTEGER NOT NULL DEFAULT 0,
         error TEXT
     );
     CREATE INDEX jobs_by_status ON jobs(status);
     CREATE TABLE job_attributes (
         job INTEGER NOT NULL REFERENCES jobs(id),
         name TEXT NOT NULL,
         drv TEXT NOT NULL,
         status TEXT NOT NULL DEFAULT 'pending'
             CHECK (status IN ('pending', 'built', 'failed', 'cancelled')),
         outputs TEXT,
         error TEXT,
         log_tail TEXT,
         PRIMARY KEY (job, name)
     );",
];

/// How many of a package's most recent measured builds its estimates look at.
const ESTIMATE_WINDOW: i64 = 5;

/// The most packages whose estimates are kept in memory (then they are read again).
const MAX_ESTIMATED: usize = 100_000;

/// The package of the derivation `drv`: its name without the version, as Nix's
/// `parseDrvName` splits it (`None` for a path that is not a derivation's).
pub fn package_of(drv: &DrvPath) -> Option<&str> {
    nixspace_nix_formats::drv_name::package_of_drv_path(drv.as_str())
}

/// How long a connection waits for another connection's lock before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How many prepared statements a connection keeps (more than the history has).
const STATEMENT_CACHE: usize = 64;

/// How often the [`Checkpointer`] moves the committed pages of the write-ahead log into the
/// database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// The pages the write-ahead log may hold before the [`Checkpointer`] waits for the writer
/// to pause and empties the log (about 64 MiB): commits that keep coming while it copies
/// would otherwise never let the log start over.
const MOST_LOG_PAGES: i64 = 16_384;

/// Why an attempt left open by an earlier run was closed.
const INTERRUPTED: &str = "interrupted: the coordinator stopped while it ran";

/// A history database could not be used.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// SQLite failed on the file.
    #[error("build history {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// The cause.
        source: rusqlite::Error,
    },
    /// The thread that checkpoints the history's log could not be started.
    #[error("build history {path}: cannot start its checkpoints: {source}")]
    Checkpointer {
        /// The database file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file was written by a newer nixspace.
    #[error("build history {path} has schema version {found}, newer than this nixspace knows ({known}); upgrade nixspace or use another --state-dir")]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// Its version.
        found: i64,
        /// The newest version known here.
        known: usize,
    },
    /// Read-only, a file of an older schema version is not read (it is not migrated).
    #[error("build history {path} has schema version {found}, older than this nixspace reads ({known}); start `nixspace up` with this --state-dir once to migrate it")]
    TooOld {
        /// The database file.
        path: PathBuf,
        /// Its version.
        found: i64,
        /// The version read here.
        known: usize,
    },
}

/// What [`History::resolved`] did with a resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Recorded.
    Recorded,
    /// Ignored: the step is recorded with this status (built or failed), which a resolution
    /// does not rewrite.
    Ignored {
        /// The step's status.
        status: String,
    },
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome<'a> {
    /// The outputs are valid.
    Built {
        /// The output paths.
        outputs: &'a [String],
    },
    /// The step failed for good.
    Failed {
        /// Why, in words.
        reason: &'a str,
        /// What made it fail.
        cause: &'a FailureCause,
    },
    /// The attempt failed transiently (the worker went away, …): the step is retried.
    Lost {
        /// Why, in words.
        reason: &'a str,
        /// What made it fail.
        cause: &'a FailureCause,
    },
    /// Nobody wanted the step any more.
    Cancelled,
}

impl AttemptOutcome<'_> {
    fn as_str(&self) -> &'static str {
        match self {
            AttemptOutcome::Built { .. } => "built",
            AttemptOutcome::Failed { .. } => "failed",
            AttemptOutcome::Lost { .. } => "lost",
            AttemptOutcome::Cancelled => "cancelled",
        }
    }

    /// The reason and the cause's columns (`cause`, `failed_input`), when it failed.
    fn failure(&self) -> (Option<&str>, Option<&'static str>, Option<&str>) {
        match self {
            AttemptOutcome::Failed { reason, cause } | AttemptOutcome::Lost { reason, cause } => {
                let (name, input) = cause_columns(cause);
                (Some(reason), Some(name), input)
            }
            AttemptOutcome::Built { .. } | AttemptOutcome::Cancelled => (None, None, None),
        }
    }
}

/// A cause as the history stores it: its name, and the failed input of a dependency.
fn cause_columns(cause: &FailureCause) -> (&'static str, Option<&str>) {
    match cause {
        FailureCause::Build => ("build", None),
        FailureCause::Dependency(input) => ("dependency", Some(input.as_str())),
        FailureCause::Infrastructure => ("infrastructure", None),
        FailureCause::OutOfMemory { .. } => ("out-of-memory", None),
    }
}

/// One step as recorded, with its attempts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepRecord {
    /// The derivation.
    pub drv: String,
    /// Its platform.
    pub system: String,
    /// `demanded`, `built`, `failed` or `resolved`.
    pub status: String,
    /// Output paths, when built.
    pub outputs: Vec<String>,
    /// Why it failed, when it did.
    pub error: Option<String>,
    /// What made it fail (`build`, `dependency` or `infrastructure`), when it did.
    pub cause: Option<String>,
    /// The failed input, when `cause` is `dependency`.
    pub failed_input: Option<String>,
    /// Seconds since the epoch when it was first demanded.
    pub first_demanded: i64,
    /// Every attempt, oldest first.
    pub attempts: Vec<AttemptRecord>,
    /// The derivation this step was resolved to, if it was.
    pub resolved_to: Option<String>,
    /// The original steps that were resolved to this one.
    pub resolved_from: Vec<String>,
    /// The realisations (`sha256:<hash modulo>!<output>`) recorded for its outputs.
    pub realisations: Vec<String>,
}

/// A recorded realisation of a content-addressed output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RealisationRecord {
    /// `sha256:<hash modulo>!<output>`.
    pub id: String,
    /// The output path.
    pub path: String,
    /// Its signatures (`name:base64`), sorted.
    pub signatures: Vec<String>,
}

/// What a build used, as its worker's control group for it measured it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BuildUsage {
    /// Peak memory in bytes, if the kernel keeps one.
    pub peak_memory: Option<i64>,
    /// CPU time, user and system, in milliseconds.
    pub cpu_ms: i64,
    /// Wall time in milliseconds.
    pub wall_ms: i64,
}

/// What a step's build is predicted to need, learned from earlier builds of its package.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Estimates {
    /// Peak memory in bytes.
    pub memory: Option<u64>,
    /// Wall time in milliseconds.
    pub duration_ms: Option<u64>,
}

/// One attempt to build a step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttemptRecord {
    /// The worker.
    pub worker: String,
    /// Seconds since the epoch.
    pub started: i64,
    /// Seconds since the epoch, when it ended.
    pub finished: Option<i64>,
    /// `built`, `failed`, `lost` or `cancelled`, when it ended.
    pub outcome: Option<String>,
    /// Why it ended so, if known.
    pub reason: Option<String>,
    /// What made it fail (`build`, `dependency` or `infrastructure`), if it did.
    pub cause: Option<String>,
    /// The failed input, when `cause` is `dependency`.
    pub failed_input: Option<String>,
    /// What the build used, if its worker measured it.
    pub usage: Option<BuildUsage>,
}

/// The open history database.
pub struct History {
    pub(crate) conn: Connection,
    path: PathBuf,
    /// The highest attempt id when this connection opened: attempts up to it that are still
    /// open were left by an earlier run.
    earlier_attempts: i64,
    /// The steps with attempts an earlier run left open, not closed since (a writing
    /// connection's, read when it opens): only their next attempt has any to close.
    left_open: HashSet<String>,
    /// The estimates read per package, until a build of the package is measured again: a
    /// frontend demands many steps of one package at once (generated DAGs name all theirs
    /// alike), and each read walks the package's steps.
    estimated: HashMap<String, Estimates>,
    /// A writing connection's checkpoints (none for a read-only one).
    checkpointer: Option<Checkpointer>,
}

/// Moves the committed pages of a history's write-ahead log into its database file, every
/// [`CHECKPOINT_EVERY`], from a thread and connection of its own: the connection that writes
/// only appends to the log (SQLite's automatic checkpoint, run by the committing connection,
/// was half of the planner's commit at thousands of steps per second). Checkpointing moves
/// only what is committed already: whether it has run or not, a killed process loses nothing
/// committed. Stops, after a last checkpoint, when dropped.
struct Checkpointer {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Open another connection to the history at `path` and checkpoint through it, emptying
    /// the log when it holds more than `most_log_pages`.
    fn start(path: &Path, most_log_pages: i64) -> Result<Checkpointer, HistoryError> {
        let err = |source| HistoryError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
        let (stop, stopped) = mpsc::channel::<()>();
        let log = path.display().to_string();
        let thread = std::thread::Builder::new()
            .name("history-checkpoint".to_owned())
            .spawn(move || loop {
                let last =
                    stopped.recv_timeout(CHECKPOINT_EVERY) != Err(mpsc::RecvTimeoutError::Timeout);
                if let Err(error) = checkpoint(&conn, most_log_pages) {
                    tracing::warn!(path = %log, %error, "cannot checkpoint the history's log");
                }
                if last {
                    break;
                }
            })
            .map_err(|source| HistoryError::Checkpointer {
                path: path.to_owned(),
                source,
            })?;
        Ok(Checkpointer {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

/// Copy the log's committed pages into the database without waiting for anyone; when the log
/// has grown past `most_log_pages`, wait for the writer's commit, copy the rest and empty the
/// log.
fn checkpoint(conn: &Connection, most_log_pages: i64) -> rusqlite::Result<()> {
    let log_pages: i64 = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))?;
    if log_pages > most_log_pages {
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    }
    Ok(())
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "History({})", self.path.display())
    }
}

/// Run `sql` with `params` through `conn`'s cache of prepared statements: the planner runs
/// the same few statements for every step.
fn execute_cached(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

pub(crate) fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The file's schema version, refused if newer than this nixspace knows.
fn schema_version(conn: &Connection, path: &Path) -> Result<i64, HistoryError> {
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(|source| HistoryError::Sqlite {
            path: path.to_owned(),
            source,
        })?;
    if version > MIGRATIONS.len() as i64 {
        return Err(HistoryError::TooNew {
            path: path.to_owned(),
            found: version,
            known: MIGRATIONS.len(),
        });
    }
    Ok(version)
}

impl History {
    /// Open (creating if needed) the history at `path` and bring its schema
    /// up to date.
    pub fn open(path: &Path) -> Result<History, HistoryError> {
        let err = |source| HistoryError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let mut conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
        // Off while migrating (a migration may rebuild a referenced table), on afterwards.
        conn.pragma_update(None, "foreign_keys", false)
            .map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        // In WAL mode, NORMAL still survives the process being killed at any moment (kill -9 of
        // `nixspace up`); only a power cut may lose the last commits. FULL would cost an fsync
        // per state change, which bounds how fast steps can be dispatched.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        // Commits only append to the log; the checkpointer moves them into the file.
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(err)?;
        let version = schema_version(&conn, path)?;
        for (i, migration) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
            let tx = conn.transaction().map_err(err)?;
            tx.execute_batch(migration).map_err(err)?;
            tx.pragma_update(None, "user_version", i as i64 + 1)
                .map_err(err)?;
            tx.commit().map_err(err)?;
        }
        conn.pragma_update(None, "foreign_keys", true)
            .map_err(err)?;
        let mut history = History::with(conn, path)?;
        // Every attempt open now was left by an earlier run.
        let open = history.open_attempts()?;
        history.left_open = open
            .into_iter()
            .map(|(drv, _)| drv.as_str().to_owned())
            .collect();
        history.checkpointer = Some(Checkpointer::start(path, MOST_LOG_PAGES)?);
        Ok(history)
    }

    /// Open the history at `path` for reading only, as `nixspace history` does beside a
    /// running `nixspace up`: nothing is created or migrated; a file of an older or newer
    /// schema version is refused.
    pub fn open_read_only(path: &Path) -> Result<History, HistoryError> {
        let err = |source| HistoryError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
        let version = schema_version(&conn, path)?;
        if version < MIGRATIONS.len() as i64 {
            return Err(HistoryError::TooOld {
                path: path.to_owned(),
                found: version,
                known: MIGRATIONS.len(),
            });
        }
        History::with(conn, path)
    }

    fn with(conn: Connection, path: &Path) -> Result<History, HistoryError> {
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        let earlier_attempts = conn
            .query_row("SELECT coalesce(max(id), 0) FROM attempts", [], |r| {
                r.get(0)
            })
            .map_err(|source| HistoryError::Sqlite {
                path: path.to_owned(),
                source,
            })?;
        Ok(History {
            conn,
            path: path.to_owned(),
            earlier_attempts,
            left_open: HashSet::new(),
            estimated: HashMap::new(),
            checkpointer: None,
        })
    }

    /// Start a batch: the changes recorded until [`History::end_batch`] go into one
    /// transaction (taking the write lock now, so a read in the batch never has to upgrade).
    /// Nothing while a batch is open (one whose commit failed stays open).
    pub fn begin_batch(&mut self) -> Result<(), HistoryError> {
        if !self.conn.is_autocommit() {
            return Ok(());
        }
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(|e| self.err(e))
    }

    /// Commit the open batch, if any.
    pub fn end_batch(&mut self) -> Result<(), HistoryError> {
        if self.conn.is_autocommit() {
            return Ok(());
        }
        self.conn.execute_batch("COMMIT").map_err(|e| self.err(e))
    }

    /// Run `f` in one transaction (a savepoint within an open batch), committed when it
    /// succeeds and rolled back when it fails. The savepoint's statements are prepared once
    /// (the planner runs this for every step it gives out and every step that ends).
    pub(crate) fn in_transaction<T>(
        &mut self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, HistoryError> {
        let conn = &self.conn;
        let done = execute_cached(conn, "SAVEPOINT change", []).and_then(|_| {
            let done = f(conn).and_then(|v| execute_cached(conn, "RELEASE change", []).map(|_| v));
            if done.is_err() {
                // Undo the change and end the savepoint; the error that matters is the first.
                let _ = conn.execute_batch("ROLLBACK TO change; RELEASE change");
            }
            done
        });
        done.map_err(|e| self.err(e))
    }

    pub(crate) fn err(&self, source: rusqlite::Error) -> HistoryError {
        HistoryError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// A step was demanded (again). A step demanded anew after it finished
    /// starts a new life: status back to `demanded`, attempts kept.
    pub fn demanded(&mut self, drv: &DrvPath, system: &str) -> Result<(), HistoryError> {
        execute_cached(
            &self.conn,
            "INSERT INTO steps (drv, system, first_demanded, status, package)
                     VALUES (?1, ?2, ?3, 'demanded', ?4)
                 ON CONFLICT(drv) DO UPDATE SET status = 'demanded', error = NULL, cause = NULL,
                     failed_input = NULL, finished = NULL
                 WHERE status = 'failed'",
            params![drv.as_str(), system, now(), package_of(drv)],
        )
        .map(|_| ())
        .map_err(|e| self.err(e))
    }

    /// The content-addressed step `from` was resolved to the derivation `to` (for `system`):
    /// the original is finished as `resolved`, the resolved step recorded as demanded, and the
    /// link between them, in one transaction. A step recorded as built or failed is not
    /// rewritten (a resolution names an original that nobody builds as itself): ignored.
    pub fn resolved(
        &mut self,
        from: &DrvPath,
        to: &DrvPath,
        system: &str,
    ) -> Result<Resolution, HistoryError> {
        let t = now();
        let path = self.path.clone();
        let err = |source| HistoryError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.savepoint().map_err(err)?;
        let status: Option<String> = tx
            .query_row(
                "SELECT status FROM steps WHERE drv = ?1",
                params![from.as_str()],
                |row| row.get(0),
            )
            .optional()
            .map_err(err)?;
        if let Some(status @ ("built" | "failed")) = status.as_deref() {
            return Ok(Resolution::Ignored {
                status: status.to_owned(),
            });
        }
        execute_cached(
            &tx,
            "INSERT INTO steps (drv, system, first_demanded, status, finished)
             VALUES (?1, ?2, ?3, 'resolved', ?3)
             ON CONFLICT(drv) DO UPDATE SET status = 'resolved', error = NULL, cause = NULL,
                 failed_input = NULL, finished = ?3",
            params![from.as_str(), system, t],
        )
        .map_err(err)?;
        execute_cached(&tx,
            "INSERT INTO steps (drv, system, first_demanded, status) VALUES (?1, ?2, ?3, 'demanded')
             ON CONFLICT(drv) DO NOTHING",
            params![to.as_str(), system, t],
        )
        .map_err(err)?;
        execute_cached(
            &tx,
            "INSERT INTO resolutions (resolved_from, resolved_to, recorded) VALUES (?1, ?2, ?3)
             ON CONFLICT(resolved_from) DO UPDATE SET resolved_to = ?2, recorded = ?3",
            params![from.as_str(), to.as_str(), t],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(Resolution::Recorded)
    }

    /// Output `id` (`sha256:<hash modulo>!<output>`) was realised as `out_path`, signed with
    /// `signatures`. The signatures add to those recorded for the same path; a different path
    /// replaces the record (and its signatures). One transaction.
    pub fn realised(
        &mut self,
        id: &str,
        out_path: &str,
        signatures: &[String],
    ) -> Result<(), HistoryError> {
        let path = self.path.clone();
        let err = |source| HistoryError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.savepoint().map_err(err)?;
        let known: Option<(String, String)> = tx
            .query_row(
                "SELECT out_path, signatures FROM realisations WHERE id = ?1",
                params![id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(err)?;
        let mut merged: BTreeSet<&str> = signatures.iter().map(String::as_str).collect();
        if let Some((known_path, known_signatures)) = &known {
            if known_path == out_path {
                merged.extend(known_signatures.split_whitespace());
            }
        }
        let merged = merged.into_iter().collect::<Vec<_>>().join(" ");
        execute_cached(
            &tx,
            "INSERT INTO realisations (id, out_path, recorded, signatures) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(id) DO UPDATE SET out_path = ?2, signatures = ?4",
            params![id, out_path, now(), merged],
        )
        .map_err(err)?;
        tx.commit().map_err(err)
    }

    /// Forget the realisations naming `out_path` (an output no store has any more, built
    /// again): a restarted planner must not assert them again. One statement.
    pub fn forget_realisations_of(&mut self, out_path: &str) -> Result<(), HistoryError> {
        execute_cached(
            &self.conn,
            "DELETE FROM realisations WHERE out_path = ?1",
            params![out_path],
        )
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Every recorded realisation, by id.
    pub fn realisations(&self) -> Result<Vec<RealisationRecord>, HistoryError> {
        let mut query = self
            .conn
            .prepare("SELECT id, out_path, signatures FROM realisations ORDER BY id")
            .map_err(|e| self.err(e))?;
        let rows = query
            .query_map([], |r| {
                let signatures: String = r.get(2)?;
                Ok(RealisationRecord {
                    id: r.get(0)?,
                    path: r.get(1)?,
                    signatures: signatures.split_whitespace().map(str::to_owned).collect(),
                })
            })
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e));
        rows
    }

    /// `worker` started building `drv`; attempts an earlier run left open on `drv` are closed
    /// as interrupted. One transaction.
    pub fn attempt_started(
        &mut self,
        drv: &DrvPath,
        worker: &WorkerId,
    ) -> Result<(), HistoryError> {
        const START: &str = "INSERT INTO attempts (drv, worker, started) VALUES (?1, ?2, ?3)";
        let (t, earlier) = (now(), self.earlier_attempts);
        if !self.left_open.contains(drv.as_str()) {
            return execute_cached(&self.conn, START, params![drv.as_str(), worker.as_str(), t])
                .map(|_| ())
                .map_err(|e| self.err(e));
        }
        self.in_transaction(|tx| {
            execute_cached(
                tx,
                "UPDATE attempts SET finished = ?2, outcome = 'lost', reason = ?3,
                     cause = 'infrastructure'
                 WHERE drv = ?1 AND finished IS NULL AND id <= ?4",
                params![drv.as_str(), t, INTERRUPTED, earlier],
            )?;
            execute_cached(tx, START, params![drv.as_str(), worker.as_str(), t])?;
            Ok(())
        })?;
        self.left_open.remove(drv.as_str());
        Ok(())
    }

    /// An attempt on `drv` ended with `outcome`, reported by `worker` (`None` when the planner
    /// decided: a cancellation, a dependency that failed). Only `worker`'s open attempt takes
    /// the outcome (all of this run's, when `None`). When the step ends (built, failed or
    /// cancelled) the other open attempts end too: this run's as cancelled, an earlier run's
    /// as interrupted. A built or failed outcome also finishes the step. One transaction.
    pub fn attempt_ended(
        &mut self,
        drv: &DrvPath,
        worker: Option<&WorkerId>,
        outcome: AttemptOutcome<'_>,
    ) -> Result<(), HistoryError> {
        let t = now();
        let (reason, cause, failed_input) = outcome.failure();
        let drv = drv.as_str();
        let earlier = self.earlier_attempts;
        let step_ends = !matches!(outcome, AttemptOutcome::Lost { .. });
        let ended_by = match worker {
            Some(w) => format!("the step ended on {w}"),
            None => "the step ended".to_owned(),
        };
        self.in_transaction(|tx| {
            // The worker's open attempt (with no worker named, every attempt of this run)
            // takes the outcome; when the step ends, its other open attempts end too.
            // `mine!()` is written into the statement, not taken from a subquery: SQLite
            // would build a temporary table for the subquery on every call.
            macro_rules! mine {
                () => {
                    "(CASE WHEN ?7 IS NULL THEN id > ?8 ELSE worker = ?7 END)"
                };
            }
            execute_cached(
                tx,
                concat!(
                    "UPDATE attempts SET finished = ?2,
                         outcome = CASE WHEN ",
                    mine!(),
                    " THEN ?3 WHEN id <= ?8 THEN 'lost' ELSE 'cancelled' END,
                         reason = CASE WHEN ",
                    mine!(),
                    " THEN ?4 WHEN id <= ?8 THEN ?9 ELSE ?10 END,
                         cause = CASE WHEN ",
                    mine!(),
                    " THEN ?5 WHEN id <= ?8 THEN 'infrastructure' END,
                         failed_input = CASE WHEN ",
                    mine!(),
                    " THEN ?6 ELSE failed_input END
                     WHERE drv = ?1 AND finished IS NULL AND (",
                    mine!(),
                    " OR ?11)"
                ),
                params![
                    drv,
                    t,
                    outcome.as_str(),
                    reason,
                    cause,
                    failed_input,
                    worker.map(WorkerId::as_str),
                    earlier,
                    INTERRUPTED,
                    ended_by,
                    step_ends
                ],
            )?;
            match outcome {
                AttemptOutcome::Built { outputs } => {
                    let outputs = outputs.join(" ");
                    execute_cached(
                        tx,
                        "UPDATE steps SET status = 'built', outputs = ?2, error = NULL,
                             cause = NULL, failed_input = NULL, finished = ?3
                         WHERE drv = ?1",
                        params![drv, outputs, t],
                    )?;
                    // The originals resolved to it have its outputs. Looked up first (almost
                    // always none): an `IN (SELECT …)` would build a temporary table each time.
                    let originals = tx
                        .prepare_cached(
                            "SELECT resolved_from FROM resolutions WHERE resolved_to = ?1",
                        )?
                        .query_map([drv], |r| r.get::<_, String>(0))?
                        .collect::<rusqlite::Result<Vec<_>>>()?;
                    for original in originals {
                        execute_cached(
                            tx,
                            "UPDATE steps SET outputs = ?2 WHERE drv = ?1",
                            params![original, outputs],
                        )?;
                    }
                }
                AttemptOutcome::Failed { .. } => {
                    execute_cached(
                        tx,
                        "UPDATE steps SET status = 'failed', error = ?2, cause = ?3,
                             failed_input = ?4, finished = ?5
                         WHERE drv = ?1",
                        params![drv, reason, cause, failed_input, t],
                    )?;
                }
                AttemptOutcome::Lost { .. } | AttemptOutcome::Cancelled => {}
            }
            Ok(())
        })?;
        if step_ends {
            self.left_open.remove(drv);
        }
        Ok(())
    }

    /// What `worker`'s open attempt at `drv` used (recorded as its report arrives, before the
    /// attempt ends).
    pub fn attempt_usage(
        &mut self,
        drv: &DrvPath,
        worker: &WorkerId,
        usage: &BuildUsage,
    ) -> Result<(), HistoryError> {
        if let Some(package) = package_of(drv) {
            self.estimated.remove(package);
        }
        execute_cached(
            &self.conn,
            "UPDATE attempts SET peak_memory = ?3, cpu_ms = ?4, wall_ms = ?5
                 WHERE drv = ?1 AND worker = ?2 AND finished IS NULL",
            params![
                drv.as_str(),
                worker.as_str(),
                usage.peak_memory,
                usage.cpu_ms,
                usage.wall_ms
            ],
        )
        .map(|_| ())
        .map_err(|e| self.err(e))
    }

    /// `worker`'s open attempt at `drv` ended with its result discarded, for `reason`.
    pub fn attempt_rejected(
        &mut self,
        drv: &DrvPath,
        worker: &WorkerId,
        reason: &str,
    ) -> Result<(), HistoryError> {
        execute_cached(
            &self.conn,
            "UPDATE attempts SET finished = ?3, outcome = 'rejected', reason = ?4,
                     cause = 'infrastructure'
                 WHERE drv = ?1 AND worker = ?2 AND finished IS NULL",
            params![drv.as_str(), worker.as_str(), now(), reason],
        )
        .map(|_| ())
        .map_err(|e| self.err(e))
    }

    /// The attempts that never ended, as (drv, worker): what was being built when the
    /// coordinator stopped (or was killed).
    pub fn open_attempts(&self) -> Result<Vec<(DrvPath, WorkerId)>, HistoryError> {
        let mut open = self
            .conn
            .prepare("SELECT drv, worker FROM attempts WHERE outcome IS NULL ORDER BY id")
            .map_err(|e| self.err(e))?;
        let rows = open
            .query_map([], |r| {
                Ok((
                    DrvPath::from(r.get::<_, String>(0)?),
                    WorkerId::from(r.get::<_, String>(1)?),
                ))
            })
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e));
        rows
    }

    /// When the last attempt an earlier run of the planner recorded ended (seconds since the
    /// epoch): about when that run stopped. `None` when no attempt ended before this run.
    pub fn last_ended_before_this_run(&self) -> Result<Option<i64>, HistoryError> {
        self.conn
            .query_row(
                "SELECT max(finished) FROM attempts WHERE id <= ?1",
                params![self.earlier_attempts],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))
    }

    /// The worker that built `drv` and its outputs, if an earlier run of the planner recorded
    /// the step built by an attempt that ended at or after `since` (seconds since the epoch),
    /// and nothing has made it unbuilt since.
    pub fn built_by_an_earlier_run(
        &self,
        drv: &DrvPath,
        since: i64,
    ) -> Result<Option<(WorkerId, Vec<String>)>, HistoryError> {
        let built: Option<(String, Option<String>)> = self
            .conn
            .prepare_cached(
                "SELECT attempts.worker, steps.outputs FROM attempts JOIN steps USING (drv)
                 WHERE drv = ?1 AND steps.status = 'built' AND attempts.outcome = 'built'
                     AND attempts.finished >= ?2 AND attempts.id <= ?3
                 ORDER BY attempts.id DESC LIMIT 1",
            )
            .and_then(|mut query| {
                query
                    .query_row(params![drv.as_str(), since, self.earlier_attempts], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })
                    .optional()
            })
            .map_err(|e| self.err(e))?;
        Ok(built.map(|(worker, outputs)| {
            let outputs = outputs.unwrap_or_default();
            let outputs = outputs.split_whitespace().map(str::to_owned).collect();
            (WorkerId::from(worker), outputs)
        }))
    }

    /// What a build of `drv` is predicted to need, learned from its package's earlier builds
    /// (the package: its name without the version, see [`package_of`]): among the last
    /// [`ESTIMATE_WINDOW`] built attempts whose worker measured them, the highest peak memory
    /// and the mean wall time. Nothing when there is none.
    pub fn estimates(&mut self, drv: &DrvPath) -> Result<Estimates, HistoryError> {
        let Some(package) = package_of(drv) else {
            return Ok(Estimates::default());
        };
        if let Some(known) = self.estimated.get(package) {
            return Ok(*known);
        }
        let (peak, wall): (Option<i64>, Option<f64>) = self
            .conn
            .query_row(
                "SELECT MAX(peak_memory), AVG(wall_ms) FROM (
                     SELECT attempts.peak_memory, attempts.wall_ms
                     FROM attempts JOIN steps USING (drv)
                     WHERE steps.package = ?1 AND attempts.outcome = 'built'
                         AND attempts.wall_ms IS NOT NULL
                     ORDER BY attempts.id DESC LIMIT ?2)",
                params![package, ESTIMATE_WINDOW],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|e| self.err(e))?;
        let estimates = Estimates {
            memory: peak.and_then(|p| u64::try_from(p).ok()),
            duration_ms: wall.filter(|w| *w >= 0.0).map(|w| w.round() as u64),
        };
        if self.estimated.len() >= MAX_ESTIMATED {
            self.estimated.clear();
        }
        self.estimated.insert(package.to_owned(), estimates);
        Ok(estimates)
    }

    /// The output paths the history recorded for `drv`, built (or resolved to a derivation
    /// that was built), in output-name order.
    pub fn outputs(&self, drv: &DrvPath) -> Result<Option<Vec<String>>, HistoryError> {
        let outputs: Option<Option<String>> = self
            .conn
            .query_row(
                "SELECT outputs FROM steps WHERE drv = ?1 AND status IN ('built', 'resolved')",
                params![drv.as_str()],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(outputs
            .flatten()
            .map(|o| o.split_whitespace().map(str::to_owned).collect()))
    }

    /// The most recently demanded steps, newest first.
    pub fn recent(&self, limit: usize) -> Result<Vec<StepRecord>, HistoryError> {
        let mut steps = self
            .conn
            .prepare(
                "SELECT drv, system, status, outputs, error, first_demanded,
                        (SELECT resolved_to FROM resolutions WHERE resolved_from = drv),
                        cause, failed_input
                 FROM steps ORDER BY first_demanded DESC, drv LIMIT ?1",
            )
            .map_err(|e| self.err(e))?;
        let rows = steps
            .query_map(params![limit as i64], |r| {
                let outputs: Option<String> = r.get(3)?;
                Ok(StepRecord {
                    drv: r.get(0)?,
                    system: r.get(1)?,
                    status: r.get(2)?,
                    outputs: outputs
                        .map(|o| o.split_whitespace().map(str::to_owned).collect())
                        .unwrap_or_default(),
                    error: r.get(4)?,
                    cause: r.get(7)?,
                    failed_input: r.get(8)?,
                    first_demanded: r.get(5)?,
                    attempts: Vec::new(),
                    resolved_to: r.get(6)?,
                    resolved_from: Vec::new(),
                    realisations: Vec::new(),
                })
            })
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        let mut attempts = self
            .conn
            .prepare(
                "SELECT worker, started, finished, outcome, reason, cause, failed_input,
                        peak_memory, cpu_ms, wall_ms
                 FROM attempts WHERE drv = ?1 ORDER BY id",
            )
            .map_err(|e| self.err(e))?;
        let mut originals = self
            .conn
            .prepare("SELECT resolved_from FROM resolutions WHERE resolved_to = ?1 ORDER BY resolved_from")
            .map_err(|e| self.err(e))?;
        let mut realisations = self
            .conn
            .prepare("SELECT id FROM realisations WHERE out_path = ?1 ORDER BY id")
            .map_err(|e| self.err(e))?;
        let mut out = Vec::with_capacity(rows.len());
        for mut step in rows {
            for output in &step.outputs {
                let ids = realisations
                    .query_map(params![output], |r| r.get::<_, String>(0))
                    .map_err(|e| self.err(e))?
                    .collect::<Result<Vec<String>, _>>()
                    .map_err(|e| self.err(e))?;
                step.realisations.extend(ids);
            }
            step.resolved_from = originals
                .query_map(params![step.drv], |r| r.get(0))
                .map_err(|e| self.err(e))?
                .collect::<Result<Vec<String>, _>>()
                .map_err(|e| self.err(e))?;
            step.attempts = attempts
                .query_map(params![step.drv], |r| {
                    Ok(AttemptRecord {
                        worker: r.get(0)?,
                        started: r.get(1)?,
                        finished: r.get(2)?,
                        outcome: r.get(3)?,
                        reason: r.get(4)?,
                        cause: r.get(5)?,
                        failed_input: r.get(6)?,
                        usage: match (r.get(8)?, r.get(9)?) {
                            (Some(cpu_ms), Some(wall_ms)) => Some(BuildUsage {
                                peak_memory: r.get(7)?,
                                cpu_ms,
                                wall_ms,
                            }),
                            _ => None,
                        },
                    })
                })
                .map_err(|e| self.err(e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| self.err(e))?;
            out.push(step);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resolution_does_not_rewrite_a_built_step() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = History::open(&dir.path().join("history.sqlite")).unwrap();
        let (step, elsewhere) = (
            DrvPath::from("/nix/store/b.drv"),
            DrvPath::from("/nix/store/x.drv"),
        );
        h.demanded(&step, "x86_64-linux").unwrap();
        h.attempt_started(&step, &"w1".into()).unwrap();
        let outputs = vec!["/nix/store/out".to_owned()];
        h.attempt_ended(
            &step,
            Some(&"w1".into()),
            AttemptOutcome::Built { outputs: &outputs },
        )
        .unwrap();
        assert_eq!(
            h.resolved(&step, &elsewhere, "x86_64-linux").unwrap(),
            Resolution::Ignored {
                status: "built".to_owned()
            }
        );
        let steps = h.recent(10).unwrap();
        let recorded = steps.iter().find(|s| s.drv == step.as_str()).unwrap();
        assert_eq!(recorded.status, "built");
        assert!(recorded.resolved_to.is_none());
        // Positive control: an original nobody built is recorded as resolved.
        let original = DrvPath::from("/nix/store/o.drv");
        assert_eq!(
            h.resolved(&original, &elsewhere, "x86_64-linux").unwrap(),
            Resolution::Recorded
        );
    }

    #[test]
    fn a_resolved_step_links_to_its_resolution_and_gets_its_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.sqlite");
        let mut h = History::open(&path).unwrap();
        assert_eq!(
            h.resolved(
                &"/nix/store/s1.drv".into(),
                &"/nix/store/r.drv".into(),
                "x86_64-linux",
            )
            .unwrap(),
            Resolution::Recorded
        );
        // A second original with the same resolution shares the resolved step.
        h.resolved(
            &"/nix/store/s2.drv".into(),
            &"/nix/store/r.drv".into(),
            "x86_64-linux",
        )
        .unwrap();
        h.demanded(&"/nix/store/r.drv".into(), "x86_64-linux")
            .unwrap();
        h.attempt_started(&"/nix/store/r.drv".into(), &"w1".into())
            .unwrap();
        let outputs = vec!["/nix/store/out".to_owned()];
        h.attempt_ended(
            &"/nix/store/r.drv".into(),
            Some(&"w1".into()),
            AttemptOutcome::Built { outputs: &outputs },
        )
        .unwrap();
        drop(h);
        // Reopened (as after a restart): the links are intact, no duplicate rows.
        let h = History::open(&path).unwrap();
        let steps = h.recent(10).unwrap();
        assert_eq!(steps.len(), 3);
        let r = steps.iter().find(|s| s.drv == "/nix/store/r.drv").unwrap();
        assert_eq!(r.status, "built");
        assert_eq!(r.resolved_from, ["/nix/store/s1.drv", "/nix/store/s2.drv"]);
        for s in steps.iter().filter(|s| s.drv != "/nix/store/r.drv") {
            assert_eq!(s.status, "resolved");
            assert_eq!(s.resolved_to.as_deref(), Some("/nix/store/r.drv"));
            assert_eq!(s.outputs, outputs);
        }
    }

    #[test]
    fn an_original_resolved_anew_links_to_its_new_resolution() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = History::open(&dir.path().join("history.sqlite")).unwrap();
        let original = "/nix/store/s.drv".into();
        for to in ["/nix/store/r1.drv", "/nix/store/r2.drv"] {
            assert_eq!(
                h.resolved(&original, &to.into(), "x86_64-linux").unwrap(),
                Resolution::Recorded
            );
        }
        let steps = h.recent(10).unwrap();
        let s = steps.iter().find(|s| s.drv == "/nix/store/s.drv").unwrap();
        assert_eq!(s.status, "resolved");
        assert_eq!(s.resolved_to.as_deref(), Some("/nix/store/r2.drv"));
        let r2 = steps.iter().find(|s| s.drv == "/nix/store/r2.drv").unwrap();
        assert_eq!(r2.resolved_from, ["/nix/store/s.drv"]);
        let r1 = steps.iter().find(|s| s.drv == "/nix/store/r1.drv").unwrap();
        assert!(r1.resolved_from.is_empty());
    }

    #[test]
    fn a_version_1_file_is_migrated_with_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.sqlite");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO steps (drv, system, first_demanded, status) VALUES ('/nix/store/a.drv', 's', 1, 'built')",
                [],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO attempts (drv, worker, started) VALUES ('/nix/store/a.drv', 'w', 1)",
                [],
            )
            .unwrap();
        }
        let h = History::open(&path).unwrap();
        let steps = h.recent(10).unwrap();
        assert_eq!(steps.len(), 1);
        assert_eq!(steps[0].attempts.len(), 1);
        assert_eq!(steps[0].status, "built");
    }

    #[test]
    fn records_a_step_through_a_lost_worker_to_success() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.sqlite");
        let mut h = History::open(&path).unwrap();
        h.demanded(&"/nix/store/a.drv".into(), "x86_64-linux")
            .unwrap();
        h.attempt_started(&"/nix/store/a.drv".into(), &"w1".into())
            .unwrap();
        h.attempt_ended(
            &"/nix/store/a.drv".into(),
            Some(&"w1".into()),
            AttemptOutcome::Lost {
                reason: "w1 went away",
                cause: &FailureCause::Infrastructure,
            },
        )
        .unwrap();
        h.attempt_started(&"/nix/store/a.drv".into(), &"w2".into())
            .unwrap();
        let outputs = vec!["/nix/store/a".to_owned()];
        h.attempt_ended(
            &"/nix/store/a.drv".into(),
            Some(&"w2".into()),
            AttemptOutcome::Built { outputs: &outputs },
        )
        .unwrap();
        drop(h);
        // Reopening keeps everything and runs no migration twice.
        let h = History::open(&path).unwrap();
        let steps = h.recent(10).unwrap();
        assert_eq!(steps.len(), 1);
        let s = &steps[0];
        assert_eq!(s.status, "built");
        assert_eq!(s.outputs, outputs);
        let outcomes: Vec<_> = s
            .attempts
            .iter()
            .map(|a| (a.worker.as_str(), a.outcome.as_deref()))
            .collect();
        assert_eq!(outcomes, vec![("w1", Some("lost")), ("w2", Some("built"))]);
    }

    #[test]
    fn a_rejected_result_is_recorded_with_its_reason_beside_the_good_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = History::open(&dir.path().join("history.sqlite")).unwrap();
        let drv = DrvPath::from("/nix/store/a.drv");
        h.demanded(&drv, "x86_64-linux").unwrap();
        h.attempt_started(&drv, &"liar".into()).unwrap();
        h.attempt_rejected(&drv, &"liar".into(), "output out reported as /nix/store/x")
            .unwrap();
        // Closed already: a later end of the step's attempts does not touch it.
        h.attempt_ended(
            &drv,
            None,
            AttemptOutcome::Lost {
                reason: "retried",
                cause: &FailureCause::Infrastructure,
            },
        )
        .unwrap();
        h.attempt_started(&drv, &"honest".into()).unwrap();
        let outputs = vec!["/nix/store/a".to_owned()];
        h.attempt_ended(
            &drv,
            Some(&"honest".into()),
            AttemptOutcome::Built { outputs: &outputs },
        )
        .unwrap();
        let steps = h.recent(10).unwrap();
        let attempts: Vec<_> = steps[0]
            .attempts
            .iter()
            .map(|a| (a.worker.as_str(), a.outcome.as_deref(), a.reason.as_deref()))
            .collect();
        assert_eq!(
            attempts,
            vec![
                (
                    "liar",
                    Some("rejected"),
                    Some("output out reported as /nix/store/x")
                ),
                ("honest", Some("built"), None),
            ]
        );
        assert_eq!(steps[0].status, "built");
    }

    #[test]
    fn a_failed_step_demanded_again_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = History::open(&dir.path().join("h.sqlite")).unwrap();
        h.demanded(&"/nix/store/b.drv".into(), "x86_64-linux")
            .unwrap();
        h.attempt_ended(
            &"/nix/store/b.drv".into(),
            None,
            AttemptOutcome::Failed {
                reason: "dependency failed",
                cause: &FailureCause::Dependency("/nix/store/a.drv".into()),
            },
        )
        .unwrap();
        let s = &h.recent(1).unwrap()[0];
        assert_eq!(s.status, "failed");
        assert_eq!(
            (s.cause.as_deref(), s.failed_input.as_deref()),
            (Some("dependency"), Some("/nix/store/a.drv"))
        );
        h.demanded(&"/nix/store/b.drv".into(), "x86_64-linux")
            .unwrap();
        let s = &h.recent(1).unwrap()[0];
        assert_eq!((s.status.as_str(), s.error.as_deref()), ("demanded", None));
        assert_eq!(s.cause, None);
    }

    #[test]
    fn memory_and_duration_are_estimated_from_the_last_builds_of_the_same_package() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = History::open(&dir.path().join("h.sqlite")).unwrap();
        let build = |h: &mut History, drv: &str, peak: Option<i64>, wall_ms: i64| {
            let (drv, worker) = (DrvPath::from(drv), WorkerId::from("w1"));
            h.demanded(&drv, "x86_64-linux").unwrap();
            h.attempt_started(&drv, &worker).unwrap();
            let usage = BuildUsage {
                peak_memory: peak,
                cpu_ms: 1,
                wall_ms,
            };
            h.attempt_usage(&drv, &worker, &usage).unwrap();
            h.attempt_ended(&drv, Some(&worker), built(&[])).unwrap();
        };
        let next = DrvPath::from("/nix/store/00-hello-2.13.drv");
        assert_eq!(h.estimates(&next).unwrap(), Estimates::default());
        build(
            &mut h,
            "/nix/store/01-hello-2.10.drv",
            Some(300 << 20),
            1000,
        );
        build(
            &mut h,
            "/nix/store/02-hello-2.11.drv",
            Some(100 << 20),
            2000,
        );
        build(&mut h, "/nix/store/03-hello-2.12.drv", None, 3000);
        // Another package's builds do not count.
        build(
            &mut h,
            "/nix/store/04-hello-world-1.drv",
            Some(900 << 20),
            9000,
        );
        assert_eq!(
            h.estimates(&next).unwrap(),
            Estimates {
                memory: Some(300 << 20),
                duration_ms: Some(2000)
            }
        );
        // Only the last few builds count: older ones are forgotten.
        for i in 0..ESTIMATE_WINDOW {
            let drv = format!("/nix/store/1{i}-hello-3.{i}.drv");
            build(&mut h, &drv, Some(50 << 20), 500);
        }
        assert_eq!(
            h.estimates(&next).unwrap(),
            Estimates {
                memory: Some(50 << 20),
                duration_ms: Some(500)
            }
        );
    }

    #[test]
    fn a_file_that_is_not_a_database_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sqlite");
        std::fs::write(
            &path,
            b"this is not sqlite at all, not even close..........",
        )
        .unwrap();
        let e = History::open(&path).unwrap_err();
        assert!(e.to_string().contains("h.sqlite"), "{e}");
    }

    /// `(worker, outcome, reason)` of every attempt on the only recorded step.
    fn attempts(h: &History) -> Vec<(String, Option<String>, Option<String>)> {
        h.recent(1).unwrap()[0]
            .attempts
            .iter()
            .map(|a| (a.worker.clone(), a.outcome.clone(), a.reason.clone()))
            .collect()
    }

    fn built(outputs: &[String]) -> AttemptOutcome<'_> {
        AttemptOutcome::Built { outputs }
    }

    #[test]
    fn the_realisations_of_a_lost_path_are_forgotten_and_others_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sqlite");
        let mut h = History::open(&path).unwrap();
        h.realised("sha256:aa!out", "/nix/store/lost-base", &[])
            .unwrap();
        h.realised("sha256:bb!out", "/nix/store/kept-top", &[])
            .unwrap();
        h.forget_realisations_of("/nix/store/lost-base").unwrap();
        drop(h);
        // As a restarted planner reads them.
        let h = History::open(&path).unwrap();
        let ids: Vec<String> = h
            .realisations()
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, vec!["sha256:bb!out".to_owned()]);
    }

    #[test]
    fn a_step_built_by_the_run_before_is_found_and_one_built_by_this_run_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sqlite");
        let (before, later) = (
            DrvPath::from("/nix/store/a.drv"),
            DrvPath::from("/nix/store/b.drv"),
        );
        let outputs = vec!["/nix/store/a".to_owned()];
        let mut h = History::open(&path).unwrap();
        assert_eq!(h.last_ended_before_this_run().unwrap(), None);
        h.demanded(&before, "x86_64-linux").unwrap();
        h.attempt_started(&before, &"w1".into()).unwrap();
        h.attempt_ended(&before, Some(&"w1".into()), built(&outputs))
            .unwrap();
        drop(h); // The coordinator is killed.
        let mut h = History::open(&path).unwrap();
        let last = h
            .last_ended_before_this_run()
            .unwrap()
            .expect("a build ended");
        assert!((now() - last).abs() < 60, "{last}");
        assert_eq!(
            h.built_by_an_earlier_run(&before, last).unwrap(),
            Some((WorkerId::from("w1"), outputs.clone()))
        );
        // Not one that ended before `since`.
        assert_eq!(h.built_by_an_earlier_run(&before, last + 1).unwrap(), None);
        // Positive control beside it: a step this run built is not the run before's.
        h.demanded(&later, "x86_64-linux").unwrap();
        h.attempt_started(&later, &"w1".into()).unwrap();
        h.attempt_ended(&later, Some(&"w1".into()), built(&outputs))
            .unwrap();
        assert_eq!(h.built_by_an_earlier_run(&later, 0).unwrap(), None);
        assert_eq!(h.last_ended_before_this_run().unwrap(), Some(last));
    }

    #[test]
    fn an_attempt_left_by_a_crash_is_not_closed_by_another_workers_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sqlite");
        let drv = DrvPath::from("/nix/store/a.drv");
        let outputs = vec!["/nix/store/a".to_owned()];
        let mut h = History::open(&path).unwrap();
        h.demanded(&drv, "x86_64-linux").unwrap();
        h.attempt_started(&drv, &"w1".into()).unwrap();
        drop(h); // The coordinator is killed while w1 builds.
        let mut h = History::open(&path).unwrap();
        h.attempt_started(&drv, &"w2".into()).unwrap();
        // The next attempt closed it.
        assert_eq!(attempts(&h)[0].1.as_deref(), Some("lost"));
        h.attempt_ended(&drv, Some(&"w2".into()), built(&outputs))
            .unwrap();
        let recorded = attempts(&h);
        assert_eq!(recorded[0].0, "w1");
        assert_eq!(recorded[0].1.as_deref(), Some("lost"));
        assert_eq!(recorded[0].2.as_deref(), Some(INTERRUPTED));
        assert_eq!(recorded[1].0, "w2");
        assert_eq!(recorded[1].1.as_deref(), Some("built"));
    }

    #[test]
    fn a_change_that_fails_is_undone_and_the_next_one_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = History::open(&dir.path().join("h.sqlite")).unwrap();
        h.demanded(&DrvPath::from("a"), "x86_64-linux").unwrap();
        let count = |h: &History| -> i64 {
            h.conn
                .query_row("SELECT COUNT(*) FROM attempts", [], |r| r.get(0))
                .unwrap()
        };
        for batch in [false, true] {
            if batch {
                h.begin_batch().unwrap();
            }
            // A change whose second statement fails leaves nothing of its first.
            let failed = h.in_transaction(|tx| {
                execute_cached(
                    tx,
                    "INSERT INTO attempts (drv, worker, started) VALUES ('a', 'w', 0)",
                    [],
                )?;
                execute_cached(tx, "INSERT INTO no_such_table VALUES (1)", [])
            });
            assert!(failed.is_err());
            assert_eq!(count(&h), 0);
            // Positive control: the same change without the failing statement is kept.
            h.in_transaction(|tx| {
                execute_cached(
                    tx,
                    "INSERT INTO attempts (drv, worker, started) VALUES ('a', 'w', 0)",
                    [],
                )
            })
            .unwrap();
            h.end_batch().unwrap();
            assert!(h.conn.is_autocommit(), "a savepoint was left open");
            assert_eq!(count(&h), 1);
            h.conn.execute("DELETE FROM attempts", []).unwrap();
        }
    }

    #[test]
    fn a_worker_that_rejoins_closes_its_own_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sqlite");
        let drv = DrvPath::from("/nix/store/a.drv");
        let outputs = vec!["/nix/store/a".to_owned()];
        let mut h = History::open(&path).unwrap();
        h.demanded(&drv, "x86_64-linux").unwrap();
        h.attempt_started(&drv, &"w1".into()).unwrap();
        drop(h);
        let mut h = History::open(&path).unwrap();
        h.attempt_ended(&drv, Some(&"w1".into()), built(&outputs))
            .unwrap();
        assert_eq!(attempts(&h)[0].1.as_deref(), Some("built"));
    }

    #[test]
    fn a_duplicated_step_records_who_built_it_and_cancels_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = History::open(&dir.path().join("h.sqlite")).unwrap();
        let drv = DrvPath::from("/nix/store/a.drv");
        let outputs = vec!["/nix/store/a".to_owned()];
        h.demanded(&drv, "x86_64-linux").unwrap();
        h.attempt_started(&drv, &"slow".into()).unwrap();
        h.attempt_started(&drv, &"thief".into()).unwrap();
        // A transient failure of one worker ends only its attempt.
        h.attempt_ended(
            &drv,
            Some(&"thief".into()),
            AttemptOutcome::Lost {
                reason: "went away",
                cause: &FailureCause::Infrastructure,
            },
        )
        .unwrap();
        assert_eq!(attempts(&h)[0].1, None, "the slow worker still builds");
        h.attempt_started(&drv, &"thief".into()).unwrap();
        h.attempt_ended(&drv, Some(&"thief".into()), built(&outputs))
            .unwrap();
        let outcomes: Vec<_> = attempts(&h).into_iter().map(|a| (a.0, a.1)).collect();
        let o = |w: &str, o: &str| (w.to_owned(), Some(o.to_owned()));
        assert_eq!(
            outcomes,
            [
                o("slow", "cancelled"),
                o("thief", "lost"),
                o("thief", "built")
            ]
        );
    }

    #[test]
    fn a_locked_database_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sqlite");
        let mut h = History::open(&path).unwrap();
        let locker = Connection::open(&path).unwrap();
        locker.execute_batch("BEGIN IMMEDIATE").unwrap();
        // Positive control: while the lock is held, a writer that does not wait fails.
        let impatient = Connection::open(&path).unwrap();
        impatient.busy_timeout(Duration::ZERO).unwrap();
        let e = impatient.execute_batch("BEGIN IMMEDIATE").unwrap_err();
        assert!(e.to_string().contains("locked"), "{e}");
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            locker.execute_batch("COMMIT").unwrap();
        });
        // The history waits for the lock instead.
        h.demanded(&"/nix/store/a.drv".into(), "s").unwrap();
        release.join().unwrap();
    }

    #[test]
    fn commits_reach_the_database_file_through_the_checkpointer_not_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sqlite");
        let mut h = History::open(&path).unwrap();
        drop(h.checkpointer.take());
        let file_size = || std::fs::metadata(&path).unwrap().len();
        let before = file_size();
        // More pages than SQLite's automatic checkpoint would let the log hold (1,000): had
        // the writer checkpointed, the file would have grown.
        h.begin_batch().unwrap();
        for i in 0..40_000 {
            h.demanded(
                &format!("/nix/store/{i:032}-p-{i}.drv").as_str().into(),
                "s",
            )
            .unwrap();
        }
        h.end_batch().unwrap();
        let log_size = || {
            std::fs::metadata(path.with_extension("sqlite-wal"))
                .unwrap()
                .len()
        };
        assert!(log_size() > 1_000 * 4096, "{}", log_size());
        assert_eq!(file_size(), before, "the writer checkpointed");
        // The checkpointer copies the log into the file and, the log being longer than it
        // lets logs grow, empties it.
        let _checkpointer = Checkpointer::start(&path, 100).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while log_size() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(log_size(), 0, "not emptied");
        assert!(file_size() > before, "not checkpointed");
        drop(h);
        let steps: i64 = Connection::open(&path)
            .unwrap()
            .query_row("SELECT count(*) FROM steps", [], |r| r.get(0))
            .unwrap();
        assert_eq!(steps, 40_000);
    }

    #[test]
    fn reading_never_migrates_and_refuses_other_versions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sqlite");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        drop(conn);
        let version = |path: &Path| -> i64 {
            Connection::open(path)
                .unwrap()
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .unwrap()
        };
        let e = History::open_read_only(&path).unwrap_err();
        assert!(matches!(e, HistoryError::TooOld { found: 1, .. }), "{e}");
        assert!(e.to_string().contains("nixspace up"), "{e}");
        assert_eq!(version(&path), 1, "not migrated");
        // Positive control: opening to write migrates it, and then it reads.
        drop(History::open(&path).unwrap());
        assert_eq!(version(&path), MIGRATIONS.len() as i64);
        History::open_read_only(&path).unwrap().recent(1).unwrap();
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let e = History::open_read_only(&path).unwrap_err();
        assert!(matches!(e, HistoryError::TooNew { found: 99, .. }), "{e}");
        // A missing file is not created.
        let missing = dir.path().join("missing.sqlite");
        assert!(History::open_read_only(&missing).is_err());
        assert!(!missing.exists());
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sqlite");
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let e = History::open(&path).unwrap_err();
        assert!(matches!(e, HistoryError::TooNew { found: 99, .. }), "{e}");
    }
}
