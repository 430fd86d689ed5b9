//! `nixspace bench remote`: the per-derivation cost of a remote builder at a given
//! round-trip time: a nixspace worker on a store of its own joined over Noise TCP, against
//! this machine as an `ssh-ng://` builder (a private sshd), each behind the same delaying
//! proxy ([`crate::delay`]).

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use nixspace_space::route::signing_key_beside;
use nixspace_space::{Role, Route, Transport};
use tokio::process::Command;

use crate::delay::DelayProxy;
use crate::error::BenchError;
use crate::measure::timed;
use crate::processes::{spawn_up, spawn_worker, Children, Scratch};
use crate::shapes::{Dag, Shape};
use crate::ssh::SshBuilder;

/// A chain of trivial derivations built on a remote builder at each round-trip time.
///
/// For each RTT, a fresh chain (a new nonce) is built by (1) `nixspace build` with one
/// worker of one slot on a store of its own, joined over Noise TCP through a proxy that
/// delays each direction by RTT/2, and (2) `nix-build --max-jobs 0` on a store of its own
/// with an `ssh-ng://` builder (a private sshd on 127.0.0.1, needs openssh-server and root)
/// reached through the same kind of proxy. Prints the wall time and the time per derivation
/// of each. A chain builds one step at a time, so the per-derivation time is what one
/// remote step costs.
#[derive(Args, Debug)]
pub struct RemoteArgs {
    /// Derivations in the chain (plus one root).
    #[arg(long, default_value_t = 20)]
    nodes: usize,
    /// Round-trip times in milliseconds (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "0,10,50")]
    rtt: Vec<u64>,
    /// Leave out the ssh-ng builder (it costs ~0.3 s per derivation and more per RTT).
    #[arg(long)]
    no_ssh: bool,
}

/// The log level of the benchmarks' children.
pub(crate) const QUIET: [&str; 2] = ["--log-level", "warn"];

/// One measured build: RTT, setup, time.
type Row = (u64, &'static str, Duration);

/// Run `nixspace bench remote`.
pub async fn run(args: RemoteArgs) -> Result<ExitCode, BenchError> {
    if args.nodes == 0 || args.rtt.is_empty() {
        return Err(BenchError::Arguments(
            "--nodes must be at least 1 and --rtt must list a round-trip time",
        ));
    }
    let result = Scratch::new("nixspace-bench-remote-")?
        .measure(async |exe, tmp, children| measure(&args, exe, tmp, children).await)
        .await;
    report(&args, &result?);
    Ok(ExitCode::SUCCESS)
}

async fn measure(
    args: &RemoteArgs,
    exe: &Path,
    tmp: &Path,
    children: &mut Children,
) -> Result<Vec<Row>, BenchError> {
    let epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let dag = Dag::generate(Shape::Chain, args.nodes, 1, 1);
    let ssh = SshBuilder::start_unless(args.no_ssh, &tmp.join("ssh")).await?;
    let mut rows = Vec::new();
    for &rtt_ms in &args.rtt {
        let rtt = Duration::from_millis(rtt_ms);
        let (dir, proxy) = remote_worker(exe, tmp, &rtt_ms.to_string(), rtt, &[], children).await?;
        let file = chain_file(tmp, &dag, &format!("{epoch}-nixspace-{rtt_ms}"))?;
        let mut build = nixspace_build(exe, &dir, &file);
        rows.push((rtt_ms, "nixspace worker", timed(&mut build).await?));
        drop(proxy);
        if let Some(ssh) = &ssh {
            let proxy = DelayProxy::start(ssh.address(), rtt).await?;
            let file = chain_file(tmp, &dag, &format!("{epoch}-ssh-{rtt_ms}"))?;
            let mut build = ssh.nix_build(&file, 1, None, Some(proxy.addr().port()))?;
            rows.push((rtt_ms, "ssh-ng builder", timed(&mut build).await?));
        }
        eprintln!("bench remote: {rtt_ms} ms done");
    }
    Ok(rows)
}

/// A dataspace of its own in `<tmp>/run-LABEL` (`up --tcp 127.0.0.1:0` and `up_args`) and
/// one worker of one slot on a store of its own (`<tmp>/store-LABEL`) joined to it through a
/// proxy delaying its TCP by `rtt`. Returns the dataspace's directory and the proxy, which
/// runs while it lives.
pub(crate) async fn remote_worker(
    exe: &Path,
    tmp: &Path,
    label: &str,
    rtt: Duration,
    up_args: &[&str],
    children: &mut Children,
) -> Result<(std::path::PathBuf, DelayProxy), BenchError> {
    let dir = tmp.join(format!("run-{label}"));
    let state = tmp.join(format!("state-{label}"));
    let state = state.to_string_lossy();
    let mut up = vec!["--tcp", "127.0.0.1:0", "--state-dir", &state];
    up.extend_from_slice(up_args);
    spawn_up(exe, &QUIET, &dir, &up, children).await?;
    let (route, proxy) = delayed_worker_route(&dir, rtt).await?;
    let store = tmp.join(format!("store-{label}"));
    let join = [
        OsStr::new("--route"),
        route.as_os_str(),
        OsStr::new("--own-store"),
        store.as_os_str(),
    ];
    spawn_worker(exe, &QUIET, &format!("remote-{label}"), 1, &join, children)?;
    Ok((dir, proxy))
}

/// `nixspace build --no-out-link` of `target` (a Nix file or a `.drv`) on the dataspace in
/// `dir`.
pub(crate) fn nixspace_build(exe: &Path, dir: &Path, target: &Path) -> Command {
    let mut build = Command::new(exe);
    build
        .args(QUIET)
        .args(["build", "--no-out-link", "--dir"])
        .arg(dir)
        .arg(target);
    build
}

/// The chain's Nix expression with `nonce`, written under `tmp`.
fn chain_file(tmp: &Path, dag: &Dag, nonce: &str) -> Result<std::path::PathBuf, BenchError> {
    let file = tmp.join(format!("{nonce}.nix"));
    std::fs::write(&file, dag.nix(nonce))?;
    Ok(file)
}

/// Write `<dir>/worker-delayed.route`: the worker route of the dataspace in `dir` pointed at a
/// proxy delaying its TCP transport by `rtt`, with the worker's signing key beside it. The
/// proxy runs while the returned value lives.
async fn delayed_worker_route(
    dir: &Path,
    rtt: Duration,
) -> Result<(std::path::PathBuf, DelayProxy), BenchError> {
    let worker_route = Role::Worker.route_file(dir);
    let route = Route::read(&worker_route)?;
    let target = route
        .transports
        .iter()
        .find_map(|t| match t {
            Transport::Tcp(host, port) => format!("{host}:{port}").parse::<SocketAddr>().ok(),
            Transport::Unix(_) => None,
        })
        .ok_or_else(|| BenchError::NoTcp(dir.to_owned()))?;
    let proxy = DelayProxy::start(target, rtt).await?;
    let path = dir.join("worker-delayed.route");
    route
        .with_transports(vec![Transport::Tcp(
            "127.0.0.1".to_owned(),
            proxy.addr().port(),
        )])
        .write(&path)?;
    std::fs::copy(signing_key_beside(&worker_route), signing_key_beside(&path))?;
    Ok((path, proxy))
}

fn report(args: &RemoteArgs, rows: &[Row]) {
    println!(
        "nixspace bench remote: a chain of {} derivations (+ root), one build slot",
        args.nodes
    );
    println!(
        "{:>7} {:<18} {:>9} {:>10}",
        "RTT", "setup", "total", "per drv"
    );
    let steps = (args.nodes + 1) as f64;
    for (rtt, setup, took) in rows {
        println!(
            "{:>4} ms {setup:<18} {:>8.2}s {:>7.1} ms",
            rtt,
            took.as_secs_f64(),
            took.as_secs_f64() * 1000.0 / steps
        );
    }
}
