//! `nixspace bench resources`: memory-hungry and CPU-bound steps on two workers of different
//! sizes, built with memory admission (the hungry steps state their need), without it (slot
//! only: nothing stated, nothing learned), and by `nix-build`: the makespan of each, and the
//! builds killed for memory.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use tokio::process::Command;

use crate::error::BenchError;
use crate::measure::{succeeded, timed};
use crate::processes::{spawn_up, spawn_worker, Children, Scratch};

/// Memory-hungry and CPU-bound steps on a big and a small worker.
///
/// The DAG: `--hungry` steps each holding `--hold` MiB for a second, `--cpu` steps each
/// counting in a shell loop for about a second, and a root over all of them. The workers, in
/// a dataspace of their own per setup: `big` (2 slots, 1 GiB offered) and `small` (2 slots,
/// each build limited to half of `--hold`, `--speed 2` so the planner prefers it). Setups:
/// (1) slot only: the steps state nothing and nothing is learned, so hungry steps go to the
/// small worker, are killed there and tried again on the big one; (2) admission: the hungry
/// steps state `requiredMemory`, so they go only to the big one; (3) `nix-build --max-jobs 4`
/// on the local store, no limits. Prints each makespan and the builds killed for memory
/// (from the dataspace's history).
#[derive(Args, Debug)]
pub struct ResourcesArgs {
    /// Memory-hungry steps.
    #[arg(long, default_value_t = 4)]
    hungry: usize,
    /// CPU-bound steps.
    #[arg(long, default_value_t = 4)]
    cpu: usize,
    /// MiB each hungry step holds.
    #[arg(long, default_value_t = 256)]
    hold: u64,
}

/// One setup's result: its label, makespan, and builds killed for memory (none counted for
/// `nix-build`).
type Row = (&'static str, Duration, Option<usize>);

/// Run `nixspace bench resources`.
pub async fn run(args: ResourcesArgs) -> Result<ExitCode, BenchError> {
    if args.hungry + args.cpu == 0 || args.hold < 2 {
        return Err(BenchError::Arguments(
            "--hungry and --cpu must add up to at least 1, and --hold must be at least 2",
        ));
    }
    let result = Scratch::new("nixspace-bench-resources-")?
        .measure(async |exe, tmp, children| measure(&args, exe, tmp, children).await)
        .await;
    report(&args, &result?);
    Ok(ExitCode::SUCCESS)
}

async fn measure(
    args: &ResourcesArgs,
    exe: &Path,
    tmp: &Path,
    children: &mut Children,
) -> Result<Vec<Row>, BenchError> {
    let epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let mut rows = Vec::new();
    for (label, stated) in [
        ("(1) nixspace, slot only", false),
        ("(2) nixspace, admission", true),
    ] {
        let name = if stated { "admission" } else { "slots" };
        let file = dag_file(args, tmp, &format!("{epoch}-{name}"), stated)?;
        let (makespan, kills) = nixspace(args, exe, &tmp.join(name), &file, children).await?;
        rows.push((label, makespan, Some(kills)));
        eprintln!("bench resources: {label} done");
    }
    let file = dag_file(args, tmp, &format!("{epoch}-nix-build"), false)?;
    let mut build = Command::new("nix-build");
    build
        .arg(&file)
        .args(["--no-out-link", "--quiet", "--max-jobs", "4"]);
    rows.push(("(3) nix-build --max-jobs 4", timed(&mut build).await?, None));
    Ok(rows)
}

/// Build `file` in a fresh dataspace in `dir` with the big and the small worker; the makespan
/// and how many builds were killed for memory.
async fn nixspace(
    args: &ResourcesArgs,
    exe: &Path,
    dir: &Path,
    file: &Path,
    children: &mut Children,
) -> Result<(Duration, usize), BenchError> {
    let quiet = ["--log-level", "warn"];
    let run = dir.join("run");
    let state = dir.join("state");
    let state_arg = state.as_os_str();
    spawn_up(
        exe,
        &quiet,
        &run,
        &["--state-dir", &state.to_string_lossy()],
        children,
    )
    .await?;
    let join = [OsStr::new("--dir"), run.as_os_str()];
    let big = [OsStr::new("--memory"), OsStr::new("1G")];
    let limit = format!("{}M", args.hold / 2);
    let small = [
        OsStr::new("--build-memory-limit"),
        OsStr::new(&limit),
        OsStr::new("--speed"),
        OsStr::new("2"),
    ];
    let big_args: Vec<&OsStr> = join.iter().chain(big.iter()).copied().collect();
    let small_args: Vec<&OsStr> = join.iter().chain(small.iter()).copied().collect();
    spawn_worker(exe, &quiet, "big", 2, &big_args, children)?;
    spawn_worker(exe, &quiet, "small", 2, &small_args, children)?;
    // Both workers present before the build: the first steps go where the planner sends them,
    // not to whichever worker joined first.
    wait_for_workers(exe, &run, &["\"id\":\"big\"", "\"id\":\"small\""]).await?;
    let mut build = Command::new(exe);
    build
        .args(quiet)
        .args([
            "build",
            "--no-out-link",
            "--wait-for-workers",
            "30",
            "--dir",
        ])
        .arg(&run)
        .arg(file);
    let makespan = timed(&mut build).await?;
    let mut history = Command::new(exe);
    history
        .args(quiet)
        .args(["history", "--json", "--limit", "100000", "--state-dir"])
        .arg(state_arg);
    let out = succeeded(&mut history).await?;
    let kills = String::from_utf8_lossy(&out.stdout)
        .matches("\"out-of-memory\"")
        .count();
    children.stop().await;
    Ok((makespan, kills))
}

/// Wait until `nixspace status --json` of the dataspace in `run` shows every one of `ids`
/// (JSON fragments naming workers), for at most 30 s.
async fn wait_for_workers(exe: &Path, run: &Path, ids: &[&str]) -> Result<(), BenchError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut status = Command::new(exe);
        status
            .args(["--log-level", "warn", "status", "--json", "--dir"])
            .arg(run);
        let out = succeeded(&mut status).await?;
        let text = String::from_utf8_lossy(&out.stdout);
        if ids.iter().all(|id| text.contains(id)) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(BenchError::Setup("the workers did not join within 30 s"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Write the DAG's Nix file (a fresh `nonce`); the hungry steps state their need (their hold
/// and 64 MiB for the shell and the daemon) when `stated`.
fn dag_file(
    args: &ResourcesArgs,
    tmp: &Path,
    nonce: &str,
    stated: bool,
) -> Result<PathBuf, BenchError> {
    let need = match stated {
        true => format!("requiredMemory = {};", args.hold + 64),
        false => String::new(),
    };
    let text = format!(
        r#"let
  nonce = "{nonce}";
  step = name: script: extra: derivation ({{
    inherit name nonce;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
  }} // extra);
  hungry = i: step "hungry-${{toString i}}"
    "{{ /usr/bin/head -c {bytes} /dev/zero; /bin/sleep 1; }} | /usr/bin/tail -n 1 > /dev/null && echo > $out"
    {{ {need} }};
  cpu = i: step "cpu-${{toString i}}"
    "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done; echo > $out" {{ }};
  parts = builtins.genList hungry {hungry} ++ builtins.genList cpu {cpu};
in step "resources-root" "echo $parts > $out" {{ inherit parts; }}
"#,
        bytes = args.hold << 20,
        hungry = args.hungry,
        cpu = args.cpu,
    );
    let file = tmp.join(format!("{nonce}.nix"));
    std::fs::write(&file, text)?;
    Ok(file)
}

fn report(args: &ResourcesArgs, rows: &[Row]) {
    println!(
        "{} steps holding {} MiB, {} CPU-bound steps; workers big (2 slots, 1 GiB) and small \
         (2 slots, {} MiB per build, speed 2)",
        args.hungry,
        args.hold,
        args.cpu,
        args.hold / 2
    );
    println!(
        "{:<30} {:>10} {:>16}",
        "setup", "makespan", "killed for memory"
    );
    for (label, makespan, kills) in rows {
        let kills = kills.map_or("-".to_owned(), |k| k.to_string());
        println!("{label:<30} {:>9.2}s {kills:>16}", makespan.as_secs_f64());
    }
}
