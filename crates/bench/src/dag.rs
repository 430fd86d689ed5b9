//! `nixspace bench dag`: the same generated DAGs built by `nix-build` (local store, through
//! `nix-daemon`, with an ssh-ng remote builder) and by nixspace (local workers, a worker on
//! a store of its own over TCP, the translator), timed over several runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use crate::error::BenchError;
use crate::measure::{median, timed, Stats};
use crate::plot;
use crate::processes::{Children, Scratch};
use crate::rig::{Capacity, Column, Rig};
use crate::shapes::{Dag, Shape};

/// Generated DAGs of trivial derivations built each way, min/median/max over --runs.
///
/// For each shape and size, every run builds a fresh copy (a new nonce) of the same DAG
/// with each column in turn: (a) `nix-build --max-jobs K` on the local store (K = WORKERS
/// × JOBS), (a') the same through a private `nix-daemon`, (b) `nix-build --max-jobs 0` on
/// a store of its own with an `ssh-ng://` builder of K jobs (a private sshd on 127.0.0.1;
/// needs openssh-server), (c) `nixspace build` with WORKERS local workers of JOBS slots,
/// (c') `nixspace build` with one worker of K slots on a store of its own joined over TCP,
/// (d) `nix-build` through the translator of (c)'s dataspace, (e) the client of (b) with
/// (c)'s dataspace as its ssh-ng builder (`remote-program=nixspace translate`). Prints one
/// table per shape
/// with ratios to (a), the goals, and the dispatch latency of (c).
#[derive(Args, Debug)]
pub struct DagArgs {
    /// DAG shapes (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "chain,fanout,layered")]
    shapes: Vec<Shape>,
    /// Sizes: derivations per DAG, plus one root (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "100")]
    nodes: Vec<usize>,
    /// Steps per layer of the layered shape.
    #[arg(long, default_value_t = 10)]
    width: usize,
    /// Seed of the layered shape's random edges.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Local nixspace worker processes.
    #[arg(long, default_value_t = 2)]
    workers: u32,
    /// Slots per local worker; every column gets WORKERS × JOBS jobs in total.
    #[arg(long, default_value_t = 2)]
    jobs: u32,
    /// Repetitions of each measurement.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// What to measure (comma-separated). `ssh` costs ~0.3 s per derivation.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "local,daemon,nixspace,own-store,translator"
    )]
    columns: Vec<Column>,
    /// Write SVG plots of time per derivation against size, one per shape, into DIR.
    #[arg(long, value_name = "DIR")]
    plot: Option<PathBuf>,
}

/// The times of every run, by shape, size and column.
type Results = BTreeMap<(Shape, usize), BTreeMap<Column, Vec<Duration>>>;

/// Run `nixspace bench dag`.
pub async fn run(mut args: DagArgs) -> Result<ExitCode, BenchError> {
    if args.runs == 0 || args.width == 0 || args.workers == 0 || args.jobs == 0 {
        return Err(BenchError::Arguments(
            "--width, --workers, --jobs and --runs must be at least 1",
        ));
    }
    if args.nodes.is_empty() || args.nodes.contains(&0) {
        return Err(BenchError::Arguments(
            "--nodes must list sizes of at least 1",
        ));
    }
    if args.shapes.is_empty() || args.columns.is_empty() {
        return Err(BenchError::Arguments(
            "--shapes and --columns must name at least one each",
        ));
    }
    args.columns.sort();
    args.columns.dedup();
    let result = Scratch::new("nixspace-bench-")?
        .measure(async |exe, tmp, children| measure(&args, exe, tmp, children).await)
        .await;
    let (results, histogram) = result?;
    report(&args, &results);
    print_dispatch_latency(&histogram);
    if let Some(dir) = &args.plot {
        for &shape in &args.shapes {
            let file = dir.join(format!("bench-dag-{}.svg", shape.name()));
            plot_shape(&file, shape, &args, &results)?;
            println!("wrote {}", file.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Every run's times, and the dispatch histogram of the local dataspace (empty without one).
async fn measure(
    args: &DagArgs,
    exe: &Path,
    tmp: &Path,
    children: &mut Children,
) -> Result<(Results, Vec<(f64, u64)>), BenchError> {
    let capacity = Capacity {
        workers: args.workers,
        jobs: args.jobs,
    };
    let rig = Rig::start(&args.columns, capacity, exe, tmp, children).await?;
    // Unique across invocations: /nix/store keeps what earlier benchmarks built.
    let epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let mut results = Results::new();
    for &shape in &args.shapes {
        for &nodes in &args.nodes {
            let dag = Dag::generate(shape, nodes, args.width, args.seed);
            let times = results.entry((shape, nodes)).or_default();
            for run in 0..args.runs {
                for &column in &args.columns {
                    let nonce = format!("{epoch}-{}-{nodes}-{column:?}-{run}", shape.name());
                    let file = tmp.join(format!("{nonce}.nix"));
                    std::fs::write(&file, dag.nix(&nonce))?;
                    let took = timed(&mut rig.command(column, &file)?).await.map_err(|e| {
                        BenchError::Column {
                            column: column.label(),
                            source: Box::new(e),
                        }
                    })?;
                    times.entry(column).or_default().push(took);
                }
                eprintln!(
                    "bench: {} {nodes}: run {} of {} done",
                    shape.name(),
                    run + 1,
                    args.runs
                );
            }
        }
    }
    let histogram = match &rig.metrics {
        Some(addr) => crate::metrics::fetch_histogram(addr, "nixspace_dispatch_seconds").await?,
        None => Vec::new(),
    };
    Ok((results, histogram))
}

fn report(args: &DagArgs, results: &Results) {
    println!(
        "nixspace bench dag: {} runs each; K = {} jobs ({} workers × {} slots); layered width {}, seed {}",
        args.runs,
        args.workers * args.jobs,
        args.workers,
        args.jobs,
        args.width,
        args.seed
    );
    for &shape in &args.shapes {
        println!("\nshape {}", shape.name());
        println!(
            "{:>6} {:<36} {:>9} {:>9} {:>9} {:>10} {:>8}",
            "N", "", "min", "median", "max", "per drv", "vs (a)"
        );
        for &nodes in &args.nodes {
            let Some(times) = results.get(&(shape, nodes)) else {
                continue;
            };
            let base = times.get(&Column::Local).map(|t| median(t));
            for (column, t) in times {
                let s = Stats::of(t);
                let ratio = base.map_or("-".to_owned(), |b| {
                    format!("{:.2}x", s.median.as_secs_f64() / b.as_secs_f64())
                });
                println!(
                    "{nodes:>6} {:<36} {:>8.3}s {:>8.3}s {:>8.3}s {:>7.1} ms {ratio:>8}",
                    column.label(),
                    s.min.as_secs_f64(),
                    s.median.as_secs_f64(),
                    s.max.as_secs_f64(),
                    per_drv_ms(s.median, nodes)
                );
            }
            print_goals(nodes, times);
        }
    }
}

/// The goals for one shape and size, where the columns they compare were measured.
fn print_goals(nodes: usize, times: &BTreeMap<Column, Vec<Duration>>) {
    let m = |c: Column| times.get(&c).map(|t| median(t).as_secs_f64());
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    if let (Some(ours), Some(local)) = (m(Column::Nixspace), m(Column::Local)) {
        let r = ours / local;
        println!(
            "{:>6} goal (c) ≤ 1.2x (a): {r:.2}x, {}",
            "",
            verdict(r <= 1.2)
        );
    }
    if let (Some(ours), Some(daemon)) = (m(Column::Nixspace), m(Column::Daemon)) {
        let r = ours / daemon;
        println!("{:>6} goal (c) ≤ (a'): {r:.2}x, {}", "", verdict(r <= 1.0));
    }
    // Per derivation, against (b): (ours, ssh, ratio) where both were measured.
    let against_ssh = |c: Column| {
        let (ssh, ours) = (m(Column::Ssh)?, m(c)?);
        let per_drv = |t: f64| t * 1e3 / (nodes + 1) as f64;
        Some((per_drv(ours), per_drv(ssh), ssh / ours))
    };
    if let Some((ours, ssh, r)) = against_ssh(Column::SshNixspace) {
        println!(
            "{:>6} (e) ssh-ng builder = nixspace vs (b) plain ssh-ng: {r:.2}x ({ours:.1} vs {ssh:.1} ms per derivation)",
            ""
        );
    }
    if let Some((own, ssh, r)) = against_ssh(Column::OwnStore) {
        println!(
            "{:>6} goal (c') ≥ 15x faster per derivation than (b): {r:.1}x ({own:.1} vs {ssh:.1} ms), {}",
            "",
            verdict(r >= 15.0)
        );
    }
}

fn per_drv_ms(d: Duration, nodes: usize) -> f64 {
    d.as_secs_f64() * 1e3 / (nodes + 1) as f64
}

fn plot_shape(
    file: &Path,
    shape: Shape,
    args: &DagArgs,
    results: &Results,
) -> Result<(), BenchError> {
    let series: Vec<plot::Series> = args
        .columns
        .iter()
        .map(|&column| plot::Series {
            name: column.label().to_owned(),
            points: args
                .nodes
                .iter()
                .filter_map(|&n| {
                    let t = results.get(&(shape, n))?.get(&column)?;
                    Some((n as f64, per_drv_ms(median(t), n)))
                })
                .collect(),
        })
        .collect();
    plot::lines(
        file,
        &plot::Chart {
            title: format!(
                "bench dag, {} shape: median time per derivation ({} runs, K = {})",
                shape.name(),
                args.runs,
                args.workers * args.jobs
            ),
            x: "derivations (N)",
            y: "ms per derivation",
        },
        &series,
    )
}

/// The dispatch latency (ready → granted) of the local dataspace over every run, from its
/// metrics histogram.
fn print_dispatch_latency(histogram: &[(f64, u64)]) {
    if histogram.is_empty() {
        return;
    }
    // The last bucket is unbounded: name the largest finite bound instead.
    let bound = |q: f64| {
        let le = crate::metrics::quantile(histogram, q)?;
        let top = histogram
            .iter()
            .map(|b| b.0)
            .filter(|b| b.is_finite())
            .fold(0.0, f64::max);
        Some(if le.is_finite() {
            format!("≤ {:.3} ms", le * 1e3)
        } else {
            format!("> {:.3} ms", top * 1e3)
        })
    };
    match (bound(0.5), bound(0.99)) {
        (Some(p50), Some(p99)) => println!(
            "dispatch latency of (c)/(d), ready → granted, all runs: p50 {p50}, p99 {p99} (histogram bucket bounds)"
        ),
        _ => println!("dispatch latency: no samples"),
    }
}
