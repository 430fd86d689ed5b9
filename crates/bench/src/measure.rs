//! Timing: running a benchmarked command to its end, and the statistics of a set of
//! timings.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::Command;

use crate::error::BenchError;

/// Run `cmd` to its end with its stdout discarded; how long it took.
pub(crate) async fn timed(cmd: &mut Command) -> Result<Duration, BenchError> {
    let start = Instant::now();
    succeeded(cmd.stdout(Stdio::null())).await?;
    Ok(start.elapsed())
}

/// Run `cmd` (stdin closed) to its end; what it printed, or an error with its stderr if it
/// failed.
pub(crate) async fn succeeded(cmd: &mut Command) -> Result<std::process::Output, BenchError> {
    let out = cmd.stdin(Stdio::null()).output().await?;
    if !out.status.success() {
        return Err(BenchError::CommandFailed {
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(out)
}

/// The median of `xs` (the upper one of an even count).
pub(crate) fn median(xs: &[Duration]) -> Duration {
    Stats::of(xs).median
}

/// Minimum, median and maximum of a set of timings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stats {
    pub(crate) min: Duration,
    pub(crate) median: Duration,
    pub(crate) max: Duration,
}

impl Stats {
    /// The statistics of `xs` (not empty).
    pub(crate) fn of(xs: &[Duration]) -> Stats {
        let mut v = xs.to_vec();
        v.sort();
        Stats {
            min: v[0],
            median: v[v.len() / 2],
            max: v[v.len() - 1],
        }
    }
}
