//! `nixspace bench queries`: the cost of the translator for store queries. A private
//! `nix-daemon` serves a socket; a `nixspace translate` child serves the same (local) store in
//! its default configuration. Over one connection to each, the same `IsValidPath` and
//! `QueryPathInfo` calls are timed directly against the daemon and through the translator.

use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use nixspace_nix_formats::store_path::{StoreDir, StorePath};
use nixspace_nix_protocol::DaemonClient;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::process::Command;

use crate::error::BenchError;
use crate::measure::{median, succeeded};
use crate::processes::{spawn_space, wait_for_file, Children, Scratch};
use nixspace_nix_tools::private_daemon::PrivateDaemon;

/// Store queries directly against `nix-daemon` and through the translator.
///
/// Starts a private `nix-daemon` (NIX_REMOTE=local, its own socket and process group), a
/// dataspace and a `nixspace translate` on the same local store (default upstream). Over one connection to
/// each, issues OPS `IsValidPath` and then OPS `QueryPathInfo` calls, alternating a valid
/// and an invalid path, per run. Prints min/median/max per OPS calls and the ratio of the
/// medians (translator / direct).
#[derive(Args, Debug)]
pub struct QueriesArgs {
    /// Calls per operation and run.
    #[arg(long, default_value_t = 10_000)]
    ops: usize,
    /// Repetitions.
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

type Client = DaemonClient<OwnedReadHalf, OwnedWriteHalf>;

/// Run `nixspace bench queries`.
pub async fn run(args: QueriesArgs) -> Result<ExitCode, BenchError> {
    if args.ops == 0 || args.runs == 0 {
        return Err(BenchError::Arguments("--ops and --runs must be at least 1"));
    }
    let Scratch {
        exe,
        tmp,
        mut children,
        ..
    } = Scratch::new("nixspace-bench-")?;
    let daemon = PrivateDaemon::start_in(&tmp.path().join("daemon"), &[]).await?;
    let result = measure(&args, &exe, tmp.path(), &daemon, &mut children).await;
    children.stop().await;
    drop(daemon);
    result
}

async fn measure(
    args: &QueriesArgs,
    exe: &Path,
    tmp: &Path,
    daemon: &PrivateDaemon,
    children: &mut Children,
) -> Result<ExitCode, BenchError> {
    let quiet = ["--log-level", "warn"];
    let dir = tmp.join("run");
    let state = tmp.join("state");
    let up_args = ["--state-dir", state.to_str().unwrap_or("state")];
    spawn_space(exe, &quiet, &dir, 0, 0, &up_args, children).await?;
    let socket = tmp.join("translator.sock");
    children.push(
        Command::new(exe)
            .args(quiet)
            .args(["translate", "--dir"])
            .arg(&dir)
            .arg("--socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()?,
    );
    wait_for_file(&socket, Duration::from_secs(15)).await?;

    let valid = valid_path(tmp, daemon.socket()).await?;
    let invalid = StorePath::from_base_name("00000000000000000000000000000000-nixspace-missing")?;
    let paths = [valid, invalid];
    let connect = |s: &Path| {
        let s = s.to_owned();
        async move {
            DaemonClient::connect(&s)
                .await
                .map_err(|source| BenchError::Connect {
                    socket: s,
                    source: Box::new(source),
                })
        }
    };
    let mut direct = connect(daemon.socket()).await?;
    let mut via = connect(&socket).await?;

    let mut times = [[Vec::new(), Vec::new()], [Vec::new(), Vec::new()]];
    for run in 0..args.runs {
        for (op, row) in times.iter_mut().enumerate() {
            // Alternate who goes first, so neither side always meets a warmer cache.
            let order: [(usize, &mut Client); 2] = if run % 2 == 0 {
                [(0, &mut direct), (1, &mut via)]
            } else {
                [(1, &mut via), (0, &mut direct)]
            };
            for (side, client) in order {
                row[side].push(timed_calls(client, op, &paths, args.ops).await?);
            }
        }
        eprintln!("bench: run {} of {} done", run + 1, args.runs);
    }

    println!(
        "nixspace bench queries: {} calls per operation and run (valid and invalid path alternating), one connection each, {} runs",
        args.ops, args.runs
    );
    println!(
        "{:<36} {:>10} {:>10} {:>10} {:>10}",
        "", "min", "median", "max", "per call"
    );
    for (op, row) in times.iter_mut().enumerate() {
        let name = OPS[op];
        for (side, xs) in row.iter_mut().enumerate() {
            let who = if side == 0 {
                "direct"
            } else {
                "via translator"
            };
            print_row(&format!("{name} {who}"), xs, args.ops);
        }
        let ratio = median(&row[1]).as_secs_f64() / median(&row[0]).as_secs_f64();
        println!(
            "{:<36} {:>10} {:>9.2}x",
            format!("{name} ratio translator / direct"),
            "",
            ratio
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The operations measured, by index.
const OPS: [&str; 2] = ["IsValidPath", "QueryPathInfo"];

/// Time `n` calls of operation `op` on `client`, alternating the valid path `paths[0]` and
/// the invalid `paths[1]`; every answer is checked.
async fn timed_calls(
    client: &mut Client,
    op: usize,
    paths: &[StorePath; 2],
    n: usize,
) -> Result<Duration, BenchError> {
    let start = Instant::now();
    for i in 0..n {
        let path = &paths[i % 2];
        let valid = if op == 0 {
            client.is_valid_path(path).await?
        } else {
            client.query_path_info(path).await?.is_some()
        };
        if valid != (i % 2 == 0) {
            return Err(BenchError::WrongAnswer {
                op: OPS[op],
                path: path.to_string(),
                valid,
            });
        }
    }
    Ok(start.elapsed())
}

/// A path valid in the daemon's store: a small file added with `nix-store --add`.
async fn valid_path(tmp: &Path, socket: &Path) -> Result<StorePath, BenchError> {
    let file = tmp.join("nixspace-bench-queries");
    std::fs::write(&file, "a path for nixspace bench queries\n")?;
    let out = succeeded(
        Command::new("nix-store")
            .arg("--add")
            .arg(&file)
            .env("NIX_REMOTE", format!("unix://{}", socket.display())),
    )
    .await?;
    let printed = String::from_utf8_lossy(&out.stdout);
    Ok(StoreDir::default().parse(printed.trim())?)
}

fn print_row(name: &str, xs: &mut [Duration], ops: usize) {
    xs.sort();
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
    let mid = xs[xs.len() / 2];
    println!(
        "{name:<36} {:>10} {:>10} {:>10} {:>7.1} µs",
        ms(xs[0]),
        ms(mid),
        ms(xs[xs.len() - 1]),
        mid.as_secs_f64() * 1e6 / ops as f64
    );
}
