//! `nixspace bench`: measure nixspace against what users run today. One module per
//! benchmark (`dag`, `planner`, `dataspace`; `dispatch` and `queries` live beside this file), sharing the
//! timing and reporting helpers below.

mod dag;
mod dataspace;
mod planner;
mod plot;
mod rig;
mod shapes;
mod ssh;

use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use tokio::process::Command;

/// Measure nixspace against what users run today.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchCommand,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    Dag(dag::DagArgs),
    Planner(planner::PlannerArgs),
    Dataspace(dataspace::DataspaceArgs),
    Dispatch(super::bench_dispatch::DispatchArgs),
    Queries(super::bench_queries::QueriesArgs),
}

/// Run `nixspace bench`.
pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    match args.what {
        BenchCommand::Dag(a) => dag::run(a).await,
        BenchCommand::Planner(a) => planner::run(a).await,
        BenchCommand::Dataspace(a) => dataspace::run(a).await,
        BenchCommand::Dispatch(a) => super::bench_dispatch::run(a).await,
        BenchCommand::Queries(a) => super::bench_queries::run(a).await,
    }
}

/// Run `cmd` to its end with its stdout discarded; how long it took.
async fn timed(cmd: &mut Command) -> anyhow::Result<Duration> {
    let start = Instant::now();
    succeeded(cmd.stdout(Stdio::null())).await?;
    Ok(start.elapsed())
}

/// Run `cmd` (stdin closed) to its end; what it printed, or an error with its stderr if it
/// failed.
pub(super) async fn succeeded(cmd: &mut Command) -> anyhow::Result<std::process::Output> {
    let out = cmd.stdin(Stdio::null()).output().await?;
    if !out.status.success() {
        anyhow::bail!(
            "benchmark command failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// The median of `xs` (the upper one of an even count).
pub(super) fn median(xs: &[Duration]) -> Duration {
    Stats::of(xs).median
}

/// Minimum, median and maximum of a set of timings.
#[derive(Debug, Clone, Copy)]
struct Stats {
    min: Duration,
    median: Duration,
    max: Duration,
}

impl Stats {
    /// The statistics of `xs` (not empty).
    fn of(xs: &[Duration]) -> Stats {
        let mut v = xs.to_vec();
        v.sort();
        Stats {
            min: v[0],
            median: v[v.len() / 2],
            max: v[v.len() - 1],
        }
    }
}

/// The cumulative buckets (upper bound, count) of the histogram `name` served by a
/// `/metrics` endpoint at `addr`.
async fn fetch_histogram(addr: &str, name: &str) -> anyhow::Result<Vec<(f64, u64)>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
        .await?;
    let mut text = String::new();
    s.read_to_string(&mut text).await?;
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix("_bucket{le=\""))
        .filter_map(|l| {
            let (le, count) = l.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect())
}

/// The upper bound of the bucket holding quantile `q`.
fn quantile(buckets: &[(f64, u64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total == 0 {
        return None;
    }
    let want = (q * total as f64).ceil() as u64;
    buckets.iter().find(|(_, c)| *c >= want).map(|(le, _)| *le)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_cumulative_buckets() {
        let b = [(0.001, 50), (0.002, 98), (0.004, 100), (f64::INFINITY, 100)];
        assert_eq!(quantile(&b, 0.5), Some(0.001));
        assert_eq!(quantile(&b, 0.99), Some(0.004));
        assert_eq!(quantile(&[(f64::INFINITY, 0)], 0.5), None);
    }
}
