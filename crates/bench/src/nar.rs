//! `nixspace bench nar`: NAR throughput to a remote store at a given round-trip time: a
//! path a worker on a store of its own fetches from the dataspace over Noise TCP, the same
//! over TCP in clear (`up --insecure-tcp`), and `nix copy --to ssh-ng://` of a path of the
//! same size, each behind the same delaying proxy ([`crate::delay`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use tokio::process::Command;

use crate::delay::DelayProxy;
use crate::error::BenchError;
use crate::measure::{succeeded, timed};
use crate::processes::{Children, Scratch};
use crate::remote::{nixspace_build, remote_worker};
use crate::ssh::SshBuilder;

/// The size of the small path each way is also measured with, to take out the fixed cost of
/// a build or a copy (connections, the step's own round trips).
const SMALL: u64 = 1;

/// Move a path of `--mib` MiB to a remote store at each round-trip time, three ways.
///
/// For each RTT, each way moves a fresh path (a new nonce) of `--mib` MiB and one of 1 byte:
/// (1) a nixspace worker of one slot on a store of its own, joined over Noise TCP through a
/// proxy delaying each direction by RTT/2, builds a derivation whose only input is the path
/// (instantiated beforehand, so the path is in this machine's store and the worker fetches
/// its NAR from the dataspace); (2) the same over TCP in clear (`up --insecure-tcp`);
/// (3) `nix copy --no-check-sigs --to ssh-ng://` of the path from a store of its own to this
/// machine through the same kind of proxy (a private sshd, needs openssh-server and root).
/// The throughput is the size difference over the time difference of the two paths, so what
/// a build or a copy costs whatever its size is left out. Needs the paths' size in free
/// space in the temporary directory and about three times it in /nix/store per RTT.
#[derive(Args, Debug)]
pub struct NarArgs {
    /// The size of the large path in MiB.
    #[arg(long, default_value_t = 128)]
    mib: u64,
    /// Round-trip times in milliseconds (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "0,50")]
    rtt: Vec<u64>,
    /// Leave out `nix copy` over ssh-ng.
    #[arg(long)]
    no_ssh: bool,
}

/// The three ways a path is moved.
#[derive(Debug, Clone, Copy)]
enum Way {
    Noise,
    Clear,
    SshNg,
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::Noise => "nixspace, Noise TCP",
            Way::Clear => "nixspace, TCP in clear",
            Way::SshNg => "nix copy, ssh-ng",
        }
    }
}

/// One measured way at one RTT: the time for the small path and for the large one.
struct Row {
    rtt_ms: u64,
    way: Way,
    small: Duration,
    large: Duration,
}

/// Run `nixspace bench nar`.
pub async fn run(args: NarArgs) -> Result<ExitCode, BenchError> {
    if args.mib == 0 || args.rtt.is_empty() {
        return Err(BenchError::Arguments(
            "--mib must be at least 1 and --rtt must list a round-trip time",
        ));
    }
    let Scratch { exe, tmp, .. } = Scratch::new("nixspace-bench-nar-")?;
    let result = measure(&args, &exe, tmp.path()).await;
    report(&args, &result?);
    Ok(ExitCode::SUCCESS)
}

async fn measure(args: &NarArgs, exe: &Path, tmp: &Path) -> Result<Vec<Row>, BenchError> {
    let large = args.mib << 20;
    let ssh = SshBuilder::start_unless(args.no_ssh, &tmp.join("ssh")).await?;
    let mut rows = Vec::new();
    for &rtt_ms in &args.rtt {
        let rtt = Duration::from_millis(rtt_ms);
        for (way, up_args) in [(Way::Noise, &[][..]), (Way::Clear, &["--insecure-tcp"][..])] {
            // This way's dataspace and worker, stopped once it is measured.
            let mut children = Children::default();
            let label = format!("{rtt_ms}-{way:?}");
            let (dir, proxy) = remote_worker(exe, tmp, &label, rtt, up_args, &mut children).await?;
            let mut times = [Duration::ZERO; 2];
            for (time, size) in times.iter_mut().zip([SMALL, large]) {
                let blob = blob(tmp, size)?;
                let drv = instantiate(tmp, &blob).await?;
                std::fs::remove_file(&blob)?;
                *time = timed(&mut nixspace_build(exe, &dir, Path::new(&drv))).await?;
            }
            children.stop().await;
            drop(proxy);
            rows.push(row(rtt_ms, way, times));
        }
        if let Some(ssh) = &ssh {
            let proxy = DelayProxy::start(ssh.address(), rtt).await?;
            let mut times = [Duration::ZERO; 2];
            for (time, size) in times.iter_mut().zip([SMALL, large]) {
                let blob = blob(tmp, size)?;
                let added = succeeded(&mut ssh.add_to_client_store(&blob)?).await?;
                std::fs::remove_file(&blob)?;
                let path = String::from_utf8_lossy(&added.stdout).trim().to_owned();
                *time = timed(&mut ssh.nix_copy_to(&path, Some(proxy.addr().port()))?).await?;
            }
            rows.push(row(rtt_ms, Way::SshNg, times));
        }
        eprintln!("bench nar: {rtt_ms} ms done");
    }
    Ok(rows)
}

fn row(rtt_ms: u64, way: Way, [small, large]: [Duration; 2]) -> Row {
    Row {
        rtt_ms,
        way,
        small,
        large,
    }
}

/// A file of `size` bytes under `tmp` whose contents no other run has: a fresh nonce, then
/// bytes that do not compress (a xorshift sequence seeded with it).
fn blob(tmp: &Path, size: u64) -> Result<PathBuf, BenchError> {
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let path = tmp.join(format!("blob-{nonce}"));
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path)?);
    let mut state = (nonce as u64) | 1;
    let mut left = size;
    let mut block = Vec::with_capacity(64 * 1024);
    while left > 0 {
        block.clear();
        while block.len() < block.capacity() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            block.extend_from_slice(&state.to_le_bytes());
        }
        let n = left.min(block.len() as u64);
        file.write_all(&block[..n as usize])?;
        left -= n;
    }
    file.flush()?;
    Ok(path)
}

/// Instantiate a derivation whose only input is `blob` (added to this machine's store as a
/// source path); its `.drv` path.
async fn instantiate(tmp: &Path, blob: &Path) -> Result<String, BenchError> {
    let name = blob
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let file = tmp.join(format!("{name}.nix"));
    std::fs::write(
        &file,
        format!(
            "derivation {{ name = \"nar-probe-{name}\"; system = builtins.currentSystem; \
             builder = \"/bin/sh\"; args = [ \"-c\" \"echo $blob > $out\" ]; blob = {}; }}\n",
            blob.display()
        ),
    )?;
    let out = succeeded(Command::new("nix-instantiate").arg(&file)).await?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn report(args: &NarArgs, rows: &[Row]) {
    println!(
        "nixspace bench nar: a {} MiB path to a remote store, against a 1 byte one",
        args.mib
    );
    println!(
        "{:>7} {:<24} {:>9} {:>9} {:>10}",
        "RTT", "way", "1 byte", "large", "MiB/s"
    );
    for r in rows {
        let extra = r.large.saturating_sub(r.small).as_secs_f64();
        let rate = match extra > 0.0 {
            true => format!("{:.1}", (args.mib as f64) / extra),
            false => "-".to_owned(),
        };
        println!(
            "{:>4} ms {:<24} {:>8.2}s {:>8.2}s {rate:>10}",
            r.rtt_ms,
            r.way.name(),
            r.small.as_secs_f64(),
            r.large.as_secs_f64()
        );
    }
}
