//! The build logs of a session's steps: kept as the workers relay them, and handed to the local
//! store when the step ends, built or failed, where `nix log` and `nix-store -l` read them.
//!
//! A worker with a store of its own keeps the log there; the frontend's store only learns it
//! through the `<log drv worker line>` messages. [`StepLogs`] keeps one log per attempt (a
//! step and the worker granted it): at most [`MAX_STORED_LOG_BYTES`], the first
//! [`IN_MEMORY_BYTES`] in memory and the rest in an unnamed temporary file, so a build of
//! thousands of steps holds little in memory. [`store`] sends a finished log with the worker
//! protocol's `AddBuildLog`: the local Nix daemon writes it as `DRV.bz2` under its log
//! directory, as Nix 2.8's `LocalStore::addBuildLog` does, and keeps a log it already has (a
//! worker sharing the store: its daemon wrote one while building).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Seek, Write};

use nixspace_nix_tools::{local_store, DaemonPool, StepError};
use nixspace_protocol::{DrvPath, WorkerId};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The most of one attempt's log kept, as the workers' default cap (`worker --max-log-bytes`):
/// past it the log ends with one notice line.
pub const MAX_STORED_LOG_BYTES: u64 = 10 << 20;

/// How much of one attempt's log is kept in memory before it moves to a temporary file.
pub const IN_MEMORY_BYTES: usize = 16 << 10;

/// Why a step's log could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum BuildLogError {
    /// The step's name is not a derivation in the local store.
    #[error("'{0}' is not a derivation in the local store")]
    NotADerivation(String),
    /// The temporary file holding the log could not be written or read.
    #[error("cannot keep the build log in a temporary file: {0}")]
    Spill(#[source] io::Error),
    /// The local daemon refused the log or could not be reached.
    #[error("the local Nix daemon did not take the build log: {0}")]
    Daemon(#[source] StepError),
}

/// The log of one attempt at a step, as its worker relayed it: lines ended by newlines.
#[derive(Debug, Default)]
pub struct StepLog {
    /// Bytes kept so far (memory and file).
    kept: u64,
    /// The part not yet in the file.
    memory: Vec<u8>,
    /// Where the log went once it outgrew [`IN_MEMORY_BYTES`].
    spill: Option<File>,
    /// The cap was reached and noted.
    truncated: bool,
    /// Writing the temporary file failed: the log is lost.
    broken: Option<io::Error>,
}

impl StepLog {
    /// Append `line` and its newline, within the cap.
    fn push(&mut self, line: &str) {
        if self.truncated || self.broken.is_some() {
            return;
        }
        let len = line.len() as u64 + 1;
        if self.kept + len > MAX_STORED_LOG_BYTES {
            self.truncated = true;
            let notice = format!(
                "nixspace: log truncated after {} bytes (kept at most {MAX_STORED_LOG_BYTES})\n",
                self.kept
            );
            self.append(notice.as_bytes());
            return;
        }
        self.append(line.as_bytes());
        self.append(b"\n");
    }

    fn append(&mut self, bytes: &[u8]) {
        self.kept += bytes.len() as u64;
        if self.memory.len() + bytes.len() > IN_MEMORY_BYTES {
            if let Err(e) = self.spill_memory() {
                self.broken = Some(e);
                self.memory = Vec::new();
                return;
            }
        }
        self.memory.extend_from_slice(bytes);
    }

    /// Move what memory holds to the temporary file (made on first use).
    fn spill_memory(&mut self) -> io::Result<()> {
        let file = match &mut self.spill {
            Some(file) => file,
            None => self.spill.insert(tempfile::tempfile()?),
        };
        file.write_all(&self.memory)?;
        self.memory.clear();
        Ok(())
    }

    /// The whole log, to read from its start.
    fn into_reader(mut self) -> Result<Box<dyn AsyncRead + Unpin + Send>, BuildLogError> {
        if let Some(e) = self.broken {
            return Err(BuildLogError::Spill(e));
        }
        match self.spill.take() {
            None => Ok(Box::new(io::Cursor::new(self.memory))),
            Some(mut file) => {
                file.rewind().map_err(BuildLogError::Spill)?;
                let file = tokio::fs::File::from_std(file);
                Ok(Box::new(file.chain(io::Cursor::new(self.memory))))
            }
        }
    }
}

/// The logs of the attempts a session follows, by step and worker (a stolen step has two).
#[derive(Debug, Default)]
pub struct StepLogs {
    logs: BTreeMap<(DrvPath, WorkerId), StepLog>,
}

impl StepLogs {
    /// `worker` was granted `drv`: a new attempt, whose log starts empty.
    pub fn started(&mut self, drv: &DrvPath, worker: &WorkerId) {
        self.logs
            .insert((drv.clone(), worker.clone()), StepLog::default());
    }

    /// A line `worker` relayed for `drv`, kept if the session follows that attempt.
    pub fn line(&mut self, drv: &DrvPath, worker: &WorkerId, line: &str) {
        if let Some(log) = self.logs.get_mut(&(drv.clone(), worker.clone())) {
            log.push(line);
        }
    }

    /// `drv` ended as `worker` reported: that attempt's log, if the session followed it; the
    /// logs of its other attempts are dropped.
    pub fn ended(&mut self, drv: &DrvPath, worker: Option<&WorkerId>) -> Option<StepLog> {
        let ours: Vec<(DrvPath, WorkerId)> = self
            .logs
            .range((drv.clone(), WorkerId::from(""))..)
            .take_while(|((d, _), _)| d == drv)
            .map(|(k, _)| k.clone())
            .collect();
        let mut kept = None;
        for key in ours {
            let log = self.logs.remove(&key);
            if Some(&key.1) == worker {
                kept = log;
            }
        }
        kept
    }
}

/// Hand `log` to the local store as the build log of `drv` (`AddBuildLog`), on a connection of
/// `pool`; nothing when the local log directory has a log of `drv` already (the daemon would
/// keep that one: a worker sharing the store wrote it), so no daemon is started for it.
pub async fn store(pool: &DaemonPool, drv: &DrvPath, log: StepLog) -> Result<(), BuildLogError> {
    let path = pool
        .store_dir()
        .parse(drv.as_str())
        .ok()
        .filter(|p| p.is_derivation())
        .ok_or_else(|| BuildLogError::NotADerivation(drv.to_string()))?;
    let kept = local_store::build_log_file(&local_store::log_dir(), &path.to_string());
    if tokio::fs::try_exists(&kept).await.unwrap_or(false) {
        return Ok(());
    }
    let mut reader = log.into_reader()?;
    let mut lease = pool.lease().await.map_err(BuildLogError::Daemon)?;
    match lease.client().add_build_log(&path, &mut reader).await {
        Ok(()) => {
            lease.release();
            Ok(())
        }
        Err(e) => Err(BuildLogError::Daemon(lease.failed(e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(log: StepLog) -> Vec<u8> {
        let mut out = Vec::new();
        log.into_reader()
            .unwrap()
            .read_to_end(&mut out)
            .await
            .unwrap();
        out
    }

    fn names() -> (DrvPath, WorkerId, WorkerId) {
        (
            DrvPath::from("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x.drv"),
            WorkerId::from("w1"),
            WorkerId::from("w2"),
        )
    }

    #[tokio::test]
    async fn a_short_log_is_its_lines_each_with_a_newline() {
        let (drv, w1, _) = names();
        let mut logs = StepLogs::default();
        logs.started(&drv, &w1);
        logs.line(&drv, &w1, "one");
        logs.line(&drv, &w1, "");
        logs.line(&drv, &w1, "three");
        let log = logs.ended(&drv, Some(&w1)).unwrap();
        assert!(log.spill.is_none());
        assert_eq!(read_all(log).await, b"one\n\nthree\n");
        assert!(logs.logs.is_empty());
    }

    #[tokio::test]
    async fn a_long_log_moves_to_a_file_and_memory_stays_small() {
        let (drv, w1, _) = names();
        let mut logs = StepLogs::default();
        logs.started(&drv, &w1);
        let line = "x".repeat(999);
        let mut expected = Vec::new();
        for _ in 0..1000 {
            logs.line(&drv, &w1, &line);
            expected.extend_from_slice(line.as_bytes());
            expected.push(b'\n');
            let log = &logs.logs[&(drv.clone(), w1.clone())];
            assert!(log.memory.len() <= IN_MEMORY_BYTES);
        }
        let log = logs.ended(&drv, Some(&w1)).unwrap();
        assert!(log.spill.is_some());
        assert_eq!(read_all(log).await, expected);
    }

    #[tokio::test]
    async fn a_log_past_the_cap_ends_with_one_notice() {
        let (drv, w1, _) = names();
        let mut logs = StepLogs::default();
        logs.started(&drv, &w1);
        let line = "y".repeat((1 << 20) - 1);
        // Positive control: ten lines of 1 MiB with newlines fit exactly.
        for _ in 0..10 {
            logs.line(&drv, &w1, &line);
        }
        assert!(!logs.logs[&(drv.clone(), w1.clone())].truncated);
        logs.line(&drv, &w1, "one more");
        logs.line(&drv, &w1, "and another");
        let text = read_all(logs.ended(&drv, Some(&w1)).unwrap()).await;
        let notice = "nixspace: log truncated after 10485760 bytes (kept at most 10485760)\n";
        assert_eq!(
            text.len() as u64,
            MAX_STORED_LOG_BYTES + notice.len() as u64
        );
        assert!(text.ends_with(notice.as_bytes()));
    }

    #[tokio::test]
    async fn only_the_attempt_that_ended_the_step_counts() {
        let (drv, w1, w2) = names();
        let other = DrvPath::from("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxly-y.drv");
        let mut logs = StepLogs::default();
        // A line for an attempt not followed is not kept.
        logs.line(&drv, &w1, "before");
        logs.started(&drv, &w1);
        logs.started(&drv, &w2);
        logs.started(&other, &w1);
        logs.line(&drv, &w1, "by w1");
        logs.line(&drv, &w2, "by w2");
        logs.line(&other, &w1, "other");
        // A new attempt by the same worker starts over.
        logs.started(&drv, &w1);
        logs.line(&drv, &w1, "again by w1");
        let log = logs.ended(&drv, Some(&w1)).unwrap();
        assert_eq!(read_all(log).await, b"again by w1\n");
        // The step's other attempts went with it, the other step's stays.
        assert_eq!(logs.logs.len(), 1);
        assert!(logs.ended(&drv, Some(&w2)).is_none());
        // A step that ended without a worker (a failed input) has no log.
        assert!(logs.ended(&other, None).is_none());
        assert!(logs.logs.is_empty());
    }
}
