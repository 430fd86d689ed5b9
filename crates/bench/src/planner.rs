//! `nixspace bench planner`: the pure schedule (no dataspace, no Nix) on large generated
//! DAGs: how long demanding every step and then granting and finishing each takes, and how
//! much memory the schedule needs at its peak. Each measurement runs in a fresh child
//! process, so its peak resident set is the planner's alone.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use nixspace_planner::{Effect, Schedule, StepInfo, Urgency, WorkerOffer};
use nixspace_protocol::{DrvPath, WorkerId};
use tokio::process::Command;

use crate::error::BenchError;
use crate::measure::{succeeded, Stats};
use crate::plot;
use crate::resident::Process;
use crate::shapes::{Dag, Shape};

/// The planner alone on DAGs of --nodes steps: time and peak memory.
///
/// Every step is demanded (with its inputs and depth), then the ready steps are granted to
/// one worker and reported built until none is left. Prints min/median/max of the time and
/// the peak resident-set growth over --runs, each run in a fresh process.
#[derive(Args, Debug)]
pub struct PlannerArgs {
    /// Sizes (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    nodes: Vec<usize>,
    /// The DAG's shape.
    #[arg(long, default_value = "layered")]
    shape: Shape,
    /// Steps per layer of the layered shape.
    #[arg(long, default_value_t = 100)]
    width: usize,
    /// Repetitions.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Write an SVG of time and memory against size into DIR (bench-planner.svg).
    #[arg(long, value_name = "DIR")]
    plot: Option<PathBuf>,
    /// Measure once in this process and print `<nanoseconds> <bytes> <steps>` (used by the
    /// parent process for each run).
    #[arg(long, hide = true)]
    one: bool,
}

/// One measurement: time, peak resident-set growth, steps built.
#[derive(Debug, Clone, Copy)]
struct Sample {
    time: Duration,
    bytes: u64,
}

/// Run `nixspace bench planner`.
pub async fn run(args: PlannerArgs) -> Result<ExitCode, BenchError> {
    if args.runs == 0 || args.width == 0 || args.nodes.is_empty() || args.nodes.contains(&0) {
        return Err(BenchError::Arguments(
            "--nodes, --width and --runs must be at least 1",
        ));
    }
    if args.one {
        let dag = Dag::generate(args.shape, args.nodes[0], args.width, 1);
        let base = Process::Own.resident_peak_reset()?;
        let (time, built) = planner_time(&dag);
        let peak = Process::Own.peak_resident()?;
        println!("{} {} {built}", time.as_nanos(), peak.saturating_sub(base));
        return Ok(ExitCode::SUCCESS);
    }
    let exe = std::env::current_exe()?;
    println!(
        "nixspace bench planner: {} DAGs (width {}), {} runs, each in a fresh process",
        args.shape.name(),
        args.width,
        args.runs
    );
    println!(
        "{:>8} {:>10} {:>10} {:>10} {:>12} {:>14}",
        "nodes", "min", "median", "max", "per step", "peak RSS +"
    );
    let mut rows = Vec::new();
    for &nodes in &args.nodes {
        let mut samples = Vec::new();
        for _ in 0..args.runs {
            samples.push(measure_in_child(&exe, &args, nodes).await?);
        }
        let t = Stats::of(&samples.iter().map(|s| s.time).collect::<Vec<_>>());
        let bytes = samples.iter().map(|s| s.bytes).max().unwrap_or(0);
        println!(
            "{nodes:>8} {:>8.1}ms {:>8.1}ms {:>8.1}ms {:>9.2} µs {:>11.1} MiB",
            t.min.as_secs_f64() * 1e3,
            t.median.as_secs_f64() * 1e3,
            t.max.as_secs_f64() * 1e3,
            t.median.as_secs_f64() * 1e6 / nodes as f64,
            bytes as f64 / (1 << 20) as f64
        );
        rows.push((
            nodes as f64,
            t.median.as_secs_f64() * 1e3,
            bytes as f64 / (1 << 20) as f64,
        ));
    }
    println!("(peak RSS +: the largest growth of the resident set over the runs)");
    if let Some(dir) = &args.plot {
        let file = dir.join("bench-planner.svg");
        let series = [
            plot::Series {
                name: "median time (ms)".into(),
                points: rows.iter().map(|r| (r.0, r.1)).collect(),
            },
            plot::Series {
                name: "peak memory growth (MiB)".into(),
                points: rows.iter().map(|r| (r.0, r.2)).collect(),
            },
        ];
        let chart = plot::Chart {
            title: format!("planner alone, {} DAG: time and memory", args.shape.name()),
            x: "steps (N)",
            y: "ms / MiB",
        };
        plot::lines(&file, &chart, &series)?;
        println!("wrote {}", file.display());
    }
    Ok(ExitCode::SUCCESS)
}

async fn measure_in_child(
    exe: &std::path::Path,
    args: &PlannerArgs,
    nodes: usize,
) -> Result<Sample, BenchError> {
    let out = succeeded(
        Command::new(exe)
            .args(["bench", "planner", "--one", "--nodes", &nodes.to_string()])
            .args([
                "--shape",
                args.shape.name(),
                "--width",
                &args.width.to_string(),
            ]),
    )
    .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    let unexpected = || BenchError::Measurement {
        text: text.clone().into_owned(),
        nodes,
    };
    let fields: Vec<u64> = text
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|_| unexpected())?;
    match fields.as_slice() {
        [nanos, bytes, built] if *built == nodes as u64 + 1 => Ok(Sample {
            time: Duration::from_nanos(*nanos),
            bytes: *bytes,
        }),
        _ => Err(unexpected()),
    }
}

/// The planner's pure schedule on `dag` (and its root): demand every step, dispatching after
/// each change as the planner does, then report each assigned step built (four slots of one
/// worker) until nothing is left. Returns the time taken and how many steps were built.
pub fn planner_time(dag: &Dag) -> (Duration, usize) {
    let name = |i: usize| DrvPath::from(format!("/nix/store/{i:032}-n.drv"));
    let worker = WorkerId::from("w");
    let root = name(dag.steps.len());
    let start = Instant::now();
    let mut s = Schedule::default();
    let system = nixspace_nix_tools::current_system();
    s.worker_joined(
        &worker,
        WorkerOffer {
            systems: vec![system.clone()],
            features: vec![],
            speed: 1.0,
            max_jobs: SLOTS,
            hold: 0,
            resources: Default::default(),
        },
    );
    s.offer(&worker, SLOTS.into());
    let mut assigned = Vec::new();
    let system: std::sync::Arc<str> = system.into();
    let step = |inputs: &[usize]| StepInfo {
        system: system.clone(),
        features: vec![],
        input_drvs: inputs.iter().map(|&d| name(d)).collect(),
        settings: Default::default(),
        outputs: vec![],
        memory: None,
        duration_ms: None,
        derivation: Default::default(),
    };
    let depths = dag.depths();
    for (i, inputs) in dag.steps.iter().enumerate() {
        let urgency = Urgency {
            priority: 0,
            depth: depths[i] + 1,
        };
        let effects = s.demand(&name(i), step(inputs), urgency);
        apply(&mut s, effects, &mut assigned);
    }
    let urgency = Urgency {
        priority: 0,
        depth: 1,
    };
    let effects = s.demand(&root, step(&dag.sinks()), urgency);
    apply(&mut s, effects, &mut assigned);
    let mut built = 0;
    while let Some(drv) = assigned.pop() {
        let effects = s.built(&drv, &worker, vec![]);
        apply(&mut s, effects, &mut assigned);
        built += 1;
    }
    (start.elapsed(), built)
}

/// Dispatch after `effects` as the planner does, noting the steps assigned.
fn apply(s: &mut Schedule, mut effects: Vec<Effect>, assigned: &mut Vec<DrvPath>) {
    s.dispatch(&mut effects);
    assigned.extend(effects.into_iter().filter_map(|e| match e {
        Effect::Assign { drv, .. } => Some(drv),
        _ => None,
    }));
}

/// The simulated worker's build slots.
const SLOTS: u32 = 4;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_planner_builds_every_step_and_the_root() {
        for shape in [Shape::Chain, Shape::Fanout, Shape::Layered] {
            let dag = Dag::generate(shape, 1000, 10, 3);
            assert_eq!(planner_time(&dag).1, 1001, "{shape:?}");
        }
    }
}
