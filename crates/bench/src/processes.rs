//! Child processes of this program for `nixspace demo` and the benchmarks: a scratch
//! directory, `nixspace up` and workers started in it as children, and stopping them again.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nixspace_space::Role;
use tokio::process::{Child, Command};

/// Why a child process or the scratch directory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The temporary directory could not be created.
    #[error("cannot create a temporary directory: {0}")]
    Scratch(#[source] std::io::Error),
    /// The path of the running program is unknown.
    #[error("cannot find this program's own path: {0}")]
    OwnPath(#[source] std::io::Error),
    /// A directory could not be created.
    #[error("cannot create {}: {source}", path.display())]
    Directory {
        /// The directory.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// A child process could not be started.
    #[error("cannot start {command}: {source}")]
    Spawn {
        /// The command line started (program and subcommand).
        command: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// A file a child writes once it is ready did not appear in time.
    #[error("{} did not appear within {limit:?}", path.display())]
    Timeout {
        /// The file waited for.
        path: PathBuf,
        /// How long it was waited for.
        limit: Duration,
    },
}

/// Child processes that are stopped (SIGTERM, then killed) when asked.
#[derive(Default)]
pub struct Children(Vec<Child>);

impl Children {
    /// Keep `child` to be stopped with the others (after every child started before it).
    pub fn push(&mut self, child: Child) {
        self.0.push(child);
    }

    /// The process id of the first child started (`nixspace up`, for [`spawn_space`]), while
    /// it runs.
    pub fn first_id(&self) -> Option<u32> {
        self.0.first().and_then(Child::id)
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

/// Kill the process group led by `child` (started with `process_group(0)`).
pub(crate) fn kill_group(child: &Child) {
    let pid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .and_then(rustix::process::Pid::from_raw);
    if let Some(pid) = pid {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
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
) -> Result<(), ProcessError> {
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
) -> Result<(), ProcessError> {
    children.push(
        Command::new(exe)
            .args(quiet)
            .args(["up", "--dir"])
            .arg(dir)
            .args(up_args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_error(format!("{} up", exe.display())))?,
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
) -> Result<(), ProcessError> {
    children.push(
        Command::new(exe)
            .args(quiet)
            .args(["worker", "--max-jobs", &jobs.to_string(), "--id", id])
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_error(format!("{} worker", exe.display())))?,
    );
    Ok(())
}

/// The error for `command` (a program and its subcommand, for the message) failing to start.
pub(crate) fn spawn_error(command: String) -> impl FnOnce(std::io::Error) -> ProcessError {
    move |source| ProcessError::Spawn { command, source }
}

/// What a demo or benchmark run needs: this program, a temporary directory (removed when
/// dropped) with `run/` for the dataspace, and the child processes it starts.
pub struct Scratch {
    /// This program, to start `up` and workers with.
    pub exe: PathBuf,
    /// The temporary directory.
    pub tmp: tempfile::TempDir,
    /// `<tmp>/run`: the dataspace's runtime directory.
    pub dir: PathBuf,
    /// The children started so far.
    pub children: Children,
}

impl Scratch {
    /// A fresh temporary directory named `<prefix>…`.
    pub fn new(prefix: &str) -> Result<Scratch, ProcessError> {
        let tmp = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .map_err(ProcessError::Scratch)?;
        Ok(Scratch {
            exe: std::env::current_exe().map_err(ProcessError::OwnPath)?,
            dir: tmp.path().join("run"),
            tmp,
            children: Children::default(),
        })
    }
}

impl Scratch {
    /// Run `measure` with this program, the temporary directory and the children it starts,
    /// then stop the children, whatever it returned; its result.
    pub(crate) async fn measure<T, E>(
        mut self,
        measure: impl AsyncFnOnce(&Path, &Path, &mut Children) -> Result<T, E>,
    ) -> Result<T, E> {
        let result = measure(&self.exe, self.tmp.path(), &mut self.children).await;
        self.children.stop().await;
        result
    }
}

/// Wait until `path` exists, failing after `limit`.
pub async fn wait_for_file(path: &Path, limit: Duration) -> Result<(), ProcessError> {
    let start = Instant::now();
    while !path.exists() {
        if start.elapsed() > limit {
            return Err(ProcessError::Timeout {
                path: path.to_owned(),
                limit,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
