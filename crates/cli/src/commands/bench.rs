//! `nixspace bench dag`: build the same generated DAG with `nix-build` and
//! with nixspace on this machine, and time the planner on a large DAG.

use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use nixspace_planner::{Schedule, StepInfo, Urgency, WorkerOffer};
use tokio::process::Command;

use super::demo::{spawn_space, Children, Scratch};

/// Measure nixspace against what users run today.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchCommand,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    Dag(DagArgs),
    Dispatch(super::bench_dispatch::DispatchArgs),
    Queries(super::bench_queries::QueriesArgs),
}

/// A layered DAG of trivial derivations: `nix-build` vs `nixspace build`.
///
/// Each run generates fresh derivations (a new nonce) so nothing is cached.
/// (a) `nix-build --max-jobs WORKERS×JOBS` on the local store, (a') the same
/// through a `nix-daemon` socket (a private daemon on this store), (b)
/// `nixspace build` with WORKERS local worker processes of JOBS slots each
/// (started once, before the runs). Prints min/median/max wall time over --runs, the
/// dispatch latency (ready → granted) from the planner's histogram, and the
/// time the pure planner takes for a --planner-nodes DAG.
#[derive(Args, Debug)]
struct DagArgs {
    /// Derivations in the DAG (plus one root).
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Derivations per layer; each depends on two of the layer below.
    #[arg(long, default_value_t = 10)]
    width: usize,
    /// nixspace worker processes.
    #[arg(long, default_value_t = 2)]
    workers: u32,
    /// Slots per worker (nix-build gets workers × jobs).
    #[arg(long, default_value_t = 2)]
    jobs: u32,
    /// Repetitions of each measurement.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Size of the DAG for the planner-only measurement.
    #[arg(long, default_value_t = 10_000)]
    planner_nodes: usize,
}

/// Run `nixspace bench`.
pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    match args.what {
        BenchCommand::Dag(a) => dag(a).await,
        BenchCommand::Dispatch(a) => super::bench_dispatch::run(a).await,
        BenchCommand::Queries(a) => super::bench_queries::run(a).await,
    }
}

/// Nix text for a layered DAG of `nodes` steps, `width` per layer, plus a root.
pub fn layered_dag_nix(nodes: usize, width: usize, nonce: &str) -> String {
    let width = width.clamp(1, nodes.max(1));
    let layers = nodes.div_ceil(width).max(1);
    format!(
        r#"let
  nonce = "{nonce}";
  mk = name: deps: derivation {{
    inherit name nonce deps;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "echo ${{name}} > $out" ];
  }};
  width = {width};
  layer = prev: n: builtins.genList (i: mk "n${{toString n}}-${{toString i}}"
    (if prev == [ ] then [ ] else [ (builtins.elemAt prev i) (builtins.elemAt prev (if i + 1 == width then 0 else i + 1)) ])) width;
  all = builtins.foldl' (acc: n: acc ++ [ (layer (if acc == [ ] then [ ] else builtins.elemAt acc (n - 1)) n) ]) [ ] (builtins.genList (n: n) {layers});
in mk "root" (builtins.elemAt all ({layers} - 1))
"#
    )
}

async fn dag(args: DagArgs) -> anyhow::Result<ExitCode> {
    if args.runs == 0 || args.nodes == 0 || args.width == 0 || args.workers == 0 || args.jobs == 0 {
        anyhow::bail!("--nodes, --width, --workers, --jobs and --runs must be at least 1");
    }
    let Scratch {
        exe,
        tmp,
        dir,
        mut children,
    } = Scratch::new("nixspace-bench-")?;
    let result = dag_runs(&args, &exe, &dir, tmp.path(), &mut children).await;
    children.stop().await;
    result
}

async fn dag_runs(
    args: &DagArgs,
    exe: &Path,
    dir: &Path,
    tmp: &Path,
    children: &mut Children,
) -> anyhow::Result<ExitCode> {
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let quiet = ["--log-level", "warn"];
    let state = tmp.join("state");
    let up_args = [
        "--metrics",
        &metrics,
        "--state-dir",
        state.to_str().unwrap_or("state"),
    ];
    spawn_space(
        exe,
        &quiet,
        dir,
        args.workers,
        args.jobs,
        &up_args,
        children,
    )
    .await?;
    let total_jobs = (args.workers * args.jobs).to_string();
    let daemon = super::bench_queries::PrivateDaemon::start(&tmp.join("daemon")).await?;
    let daemon_store = format!("unix://{}", daemon.socket.display());
    let mut nix_times = Vec::new();
    let mut daemon_times = Vec::new();
    let mut ours = Vec::new();
    for run in 0..args.runs {
        // A fresh DAG (its own nonce) for each measurement, so nothing is built already.
        let fresh = |what: &str| -> anyhow::Result<std::path::PathBuf> {
            let file = tmp.join(format!("{what}-{run}.nix"));
            let nonce = format!("{what}-{}-{run}", std::process::id());
            std::fs::write(&file, layered_dag_nix(args.nodes, args.width, &nonce))?;
            Ok(file)
        };
        let nix_build = ["--no-out-link", "--quiet", "--max-jobs", &total_jobs];
        nix_times.push(timed(Command::new("nix-build").arg(fresh("nix")?).args(nix_build)).await?);
        daemon_times.push(
            timed(
                Command::new("nix-build")
                    .arg(fresh("daemon")?)
                    .args(nix_build)
                    .args(["--store", &daemon_store]),
            )
            .await?,
        );
        ours.push(
            timed(
                Command::new(exe)
                    .args(quiet)
                    .arg("build")
                    .arg("--dir")
                    .arg(dir)
                    .arg(fresh("ns")?),
            )
            .await?,
        );
        eprintln!("bench: run {} of {} done", run + 1, args.runs);
    }
    let (planner, planned) = planner_time(args.planner_nodes, args.width.max(100));
    let histogram = fetch_metrics(&metrics).await.unwrap_or_default();
    println!(
        "nixspace bench dag: {} nodes + root (width {}), {} workers × {} jobs, {} runs",
        args.nodes, args.width, args.workers, args.jobs, args.runs
    );
    println!("{:<34} {:>9} {:>9} {:>9}", "", "min", "median", "max");
    print_row(
        &format!("nix-build --max-jobs {total_jobs}"),
        &mut nix_times,
    );
    print_row(
        &format!("nix-build via nix-daemon, {total_jobs} jobs"),
        &mut daemon_times,
    );
    print_row("nixspace build", &mut ours);
    let ratio = median(&ours).as_secs_f64() / median(&nix_times).as_secs_f64();
    println!(
        "{:<34} {:>9} {:>8.2}x",
        "ratio nixspace / nix-build", "", ratio
    );
    let ratio = median(&ours).as_secs_f64() / median(&daemon_times).as_secs_f64();
    println!(
        "{:<34} {:>9} {:>8.2}x",
        "ratio nixspace / via nix-daemon", "", ratio
    );
    println!(
        "per derivation (median): nix-build {:.1} ms, nixspace {:.1} ms",
        median(&nix_times).as_secs_f64() * 1000.0 / (args.nodes + 1) as f64,
        median(&ours).as_secs_f64() * 1000.0 / (args.nodes + 1) as f64
    );
    match (quantile(&histogram, 0.5), quantile(&histogram, 0.99)) {
        (Some(p50), Some(p99)) => println!(
            "dispatch latency ready → granted, all runs: p50 ≤ {}, p99 ≤ {} (histogram bucket bounds)",
            ms(p50),
            ms(p99)
        ),
        _ => println!("dispatch latency: no samples"),
    }
    println!(
        "planner alone, {planned}-node layered DAG (demand all, then grant and finish every step): {}",
        ms(planner.as_secs_f64())
    );
    Ok(ExitCode::SUCCESS)
}

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
    let mut v = xs.to_vec();
    v.sort();
    v[v.len() / 2]
}

fn print_row(name: &str, xs: &mut [Duration]) {
    xs.sort();
    let s = |d: Duration| format!("{:.3}s", d.as_secs_f64());
    println!(
        "{name:<34} {:>9} {:>9} {:>9}",
        s(xs[0]),
        s(xs[xs.len() / 2]),
        s(xs[xs.len() - 1])
    );
}

fn ms(seconds: f64) -> String {
    format!("{:.3} ms", seconds * 1000.0)
}

/// The planner's pure schedule on a layered DAG: demand every step, then
/// repeatedly grant a ready step and report it built. Returns the time taken
/// and how many steps were built.
pub fn planner_time(nodes: usize, width: usize) -> (Duration, usize) {
    let name = |layer: usize, i: usize| format!("/nix/store/{layer:08}{i:024}-n.drv");
    let layers = nodes.div_ceil(width).max(1);
    let start = Instant::now();
    let mut s = Schedule::default();
    let system = nixspace_nix_tools::current_system();
    s.worker_joined(
        "w",
        WorkerOffer {
            systems: vec![system.clone()],
            features: vec![],
            speed: 1.0,
        },
    );
    let mut ready = Vec::new();
    let collect = |effects: Vec<nixspace_planner::Effect>, ready: &mut Vec<String>| {
        for e in effects {
            if let nixspace_planner::Effect::Ready(drv, _, _) = e {
                ready.push(drv);
            }
        }
    };
    for layer in 0..layers {
        for i in 0..width {
            let inputs = if layer == 0 {
                vec![]
            } else {
                vec![name(layer - 1, i), name(layer - 1, (i + 1) % width)]
            };
            let info = StepInfo {
                system: system.clone(),
                features: vec![],
                input_drvs: inputs,
            };
            let urgency = Urgency {
                priority: 0,
                depth: (layers - layer) as u64,
            };
            collect(s.demand(&name(layer, i), info, urgency), &mut ready);
        }
    }
    let mut built = 0;
    while let Some(drv) = ready.pop() {
        s.claim(&drv, "w");
        collect(s.built(&drv, "w", vec![]), &mut ready);
        built += 1;
    }
    (start.elapsed(), built)
}

/// The dispatch histogram's cumulative buckets (upper bound, count).
async fn fetch_metrics(addr: &str) -> anyhow::Result<Vec<(f64, u64)>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
        .await?;
    let mut text = String::new();
    s.read_to_string(&mut text).await?;
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix("nixspace_dispatch_seconds_bucket{le=\""))
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

    #[test]
    fn the_planner_builds_every_step_of_a_layered_dag() {
        assert_eq!(planner_time(1000, 10).1, 1000);
        assert_eq!(planner_time(95, 10).1, 100, "the last layer is full width");
    }
}
