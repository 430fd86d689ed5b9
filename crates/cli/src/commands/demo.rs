//! `nixspace demo`: a whole dataspace on this machine, building a bundled example.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use nixspace_space::Role;
use tokio::process::{Child, Command};

/// The bundled example (examples/demo/default.nix).
const DEMO_NIX: &str = include_str!("../../../../examples/demo/default.nix");

/// Run a complete nixspace on this machine and build a small example.
///
/// Starts `nixspace up` in a fresh runtime directory, attaches `--workers`
/// `nixspace worker` processes, builds the bundled example (a chain with a
/// fan-out, fresh derivations every run) with `nixspace build`, prints the
/// result and stops everything. Needs a working local Nix.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Number of worker processes.
    #[arg(long, default_value_t = 2, value_name = "N")]
    workers: u32,

    /// Build this Nix file instead of the bundled example.
    #[arg(long, value_name = "FILE.nix")]
    file: Option<PathBuf>,
}

/// Child processes that are stopped (SIGTERM, then killed) when asked.
#[derive(Default)]
pub struct Children(Vec<Child>);

impl Children {
    /// Keep `child` to be stopped with the others (after every child started before it).
    pub fn push(&mut self, child: Child) {
        self.0.push(child);
    }

    /// Stop the children, last started first (workers before the dataspace).
    pub async fn stop(&mut self) {
        while let Some(mut child) = self.0.pop() {
            if let Some(pid) = child
                .id()
                .and_then(|p| rustix::process::Pid::from_raw(p as i32))
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            if tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }
}

/// Start `nixspace up` in `dir` (with `up_args`) and `workers` workers of
/// `jobs` slots each, as child processes of `exe`; return once the
/// dataspace's route files exist.
pub async fn spawn_space(
    exe: &Path,
    quiet: &[&str],
    dir: &Path,
    workers: u32,
    jobs: u32,
    up_args: &[&str],
    children: &mut Children,
) -> anyhow::Result<()> {
    spawn_up(exe, quiet, dir, up_args, children).await?;
    for i in 1..=workers {
        let id = format!("local-worker-{i}");
        spawn_worker(
            exe,
            quiet,
            &id,
            jobs,
            &[OsStr::new("--dir"), dir.as_os_str()],
            children,
        )?;
    }
    Ok(())
}

/// Start `nixspace up` in `dir` (with `up_args`) as a child process of `exe`; return once
/// the dataspace's route files exist.
pub async fn spawn_up(
    exe: &Path,
    quiet: &[&str],
    dir: &Path,
    up_args: &[&str],
    children: &mut Children,
) -> anyhow::Result<()> {
    children.0.push(
        Command::new(exe)
            .args(quiet)
            .args(["up", "--dir"])
            .arg(dir)
            .args(up_args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()?,
    );
    wait_for_file(&Role::Worker.route_file(dir), Duration::from_secs(15)).await
}

/// Start `nixspace worker` named `id` with `jobs` slots and `args` (where to join, store
/// options) as a child process of `exe`.
pub fn spawn_worker(
    exe: &Path,
    quiet: &[&str],
    id: &str,
    jobs: u32,
    args: &[&OsStr],
    children: &mut Children,
) -> anyhow::Result<()> {
    children.0.push(
        Command::new(exe)
            .args(quiet)
            .args(["worker", "--max-jobs", &jobs.to_string(), "--id", id])
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()?,
    );
    Ok(())
}

/// What a demo or benchmark run needs: this program, a temporary directory (removed when
/// dropped) with `run/` for the dataspace, and the child processes it starts.
pub struct Scratch {
    /// This program, to start `up` and workers with.
    pub exe: std::path::PathBuf,
    /// The temporary directory.
    pub tmp: tempfile::TempDir,
    /// `<tmp>/run`: the dataspace's runtime directory.
    pub dir: std::path::PathBuf,
    /// The children started so far.
    pub children: Children,
}

impl Scratch {
    /// A fresh temporary directory named `<prefix>…`.
    pub fn new(prefix: &str) -> anyhow::Result<Scratch> {
        let tmp = tempfile::Builder::new().prefix(prefix).tempdir()?;
        Ok(Scratch {
            exe: std::env::current_exe()?,
            dir: tmp.path().join("run"),
            tmp,
            children: Children::default(),
        })
    }
}

/// Run `nixspace demo`.
pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let Scratch {
        exe,
        tmp,
        dir,
        mut children,
    } = Scratch::new("nixspace-demo-")?;
    // Keep the demo's output to the build's own progress unless asked otherwise.
    let quiet: &[&str] = if std::env::var_os("RUST_LOG").is_some() {
        &[]
    } else {
        &["--log-level", "warn"]
    };
    let result = demo(&exe, quiet, &dir, tmp.path(), &args, &mut children).await;
    children.stop().await;
    result
}

async fn demo(
    exe: &Path,
    quiet: &[&str],
    dir: &Path,
    tmp: &Path,
    args: &DemoArgs,
    children: &mut Children,
) -> anyhow::Result<ExitCode> {
    eprintln!("demo: starting a dataspace in {}", dir.display());
    let state = tmp.join("state");
    let up_args = ["--state-dir", state.to_str().unwrap_or("state")];
    spawn_space(exe, quiet, dir, args.workers, 2, &up_args, children).await?;
    let file = match &args.file {
        Some(f) => f.clone(),
        None => {
            let nonce = format!("{:?}", std::time::SystemTime::now());
            let text = DEMO_NIX.replace("nonce ? \"\"", &format!("nonce ? \"{nonce}\""));
            let f = tmp.join("demo.nix");
            std::fs::write(&f, text)?;
            f
        }
    };
    eprintln!("demo: building {}", file.display());
    let status = Command::new(exe)
        .arg("build")
        .arg("--dir")
        .arg(dir)
        .arg(&file)
        .status()
        .await?;
    if status.success() {
        eprintln!("demo: done; the paths above are in your Nix store");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("demo: the build failed ({status})");
        Ok(ExitCode::FAILURE)
    }
}

/// Wait until `path` exists, failing after `limit`.
pub async fn wait_for_file(path: &Path, limit: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    while !path.exists() {
        if start.elapsed() > limit {
            anyhow::bail!("{} did not appear within {limit:?}", path.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
