//! What `bench dag` compares, and the processes each comparison needs: a private
//! `nix-daemon`, a private `sshd` as an ssh-ng builder, a dataspace with local workers (and
//! the translator), and a dataspace with one worker on a store of its own joined over TCP.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use nixspace_space::route::signing_key_beside;
use nixspace_space::{Role, Route};
use tokio::process::Command;

use crate::error::BenchError;
use crate::processes::{spawn_up, spawn_worker, wait_for_file, Children};
use crate::ssh::SshBuilder;
use nixspace_nix_tools::private_daemon::PrivateDaemon;

/// One way of building the DAG.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum Column {
    /// (a) `nix-build --max-jobs K` on the local store, no daemon.
    Local,
    /// (a') the same through a private `nix-daemon` socket on the same store.
    Daemon,
    /// (b) `nix-build --max-jobs 0` on a store of its own with this machine as an
    /// `ssh-ng://` builder of K jobs (a private sshd on 127.0.0.1).
    Ssh,
    /// (c) `nixspace build` with WORKERS local workers of JOBS slots (the local store).
    Nixspace,
    /// (c') `nixspace build` with one worker of K slots on a store of its own (its own
    /// mount namespace) joined over TCP.
    OwnStore,
    /// (d) `nix-build --store unix://<translator>`: the translator of a dataspace with the
    /// local workers of (c).
    Translator,
    /// (e) the client of (b) with the same sshd as its `ssh-ng://` builder, whose sessions
    /// run `nixspace translate --stdio` on (c)'s dataspace: the whole dataspace as one
    /// builder of K jobs.
    SshNixspace,
}

impl Column {
    /// The row label in the tables and the plots' legends.
    pub fn label(self) -> &'static str {
        match self {
            Column::Local => "(a) nix-build local",
            Column::Daemon => "(a') nix-build via nix-daemon",
            Column::Ssh => "(b) nix-build, ssh-ng builder",
            Column::Nixspace => "(c) nixspace build",
            Column::OwnStore => "(c') nixspace, own-store worker/TCP",
            Column::Translator => "(d) nix-build via translator",
            Column::SshNixspace => "(e) ssh-ng builder = nixspace",
        }
    }
}

/// How many workers and slots the columns get.
#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    /// Local nixspace worker processes.
    pub workers: u32,
    /// Slots per local worker.
    pub jobs: u32,
}

impl Capacity {
    /// K: the jobs every column gets in total.
    pub fn total(self) -> u32 {
        self.workers * self.jobs
    }
}

/// The running processes behind the selected columns.
pub struct Rig {
    exe: PathBuf,
    capacity: Capacity,
    daemon: Option<PrivateDaemon>,
    ssh: Option<SshBuilder>,
    /// The runtime directory of the dataspace with local workers.
    local_space: PathBuf,
    translator: PathBuf,
    /// The runtime directory of the dataspace whose worker has a store of its own.
    own_space: PathBuf,
    /// Where the local dataspace serves its metrics, if it runs.
    pub metrics: Option<String>,
}

impl Rig {
    /// Start what `columns` need under `tmp`; dataspaces and workers are pushed on
    /// `children`.
    pub async fn start(
        columns: &[Column],
        capacity: Capacity,
        exe: &Path,
        tmp: &Path,
        children: &mut Children,
    ) -> Result<Rig, BenchError> {
        let quiet = ["--log-level", "warn"];
        let has = |c: Column| columns.contains(&c);
        let state = |name: &str| tmp.join(name).to_string_lossy().into_owned();
        let mut rig = Rig {
            exe: exe.to_owned(),
            capacity,
            daemon: None,
            ssh: None,
            local_space: tmp.join("run"),
            translator: tmp.join("translator.sock"),
            own_space: tmp.join("run-own"),
            metrics: None,
        };
        if has(Column::Daemon) {
            rig.daemon = Some(PrivateDaemon::start_in(&tmp.join("daemon"), &[]).await?);
        }
        if has(Column::Ssh) || has(Column::SshNixspace) {
            rig.ssh = Some(SshBuilder::start(&tmp.join("ssh")).await?);
        }
        if has(Column::Nixspace) || has(Column::Translator) || has(Column::SshNixspace) {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let metrics = format!("127.0.0.1:{port}");
            let mut up = vec!["--metrics".to_owned(), metrics.clone()];
            up.extend(["--state-dir".to_owned(), state("state")]);
            if has(Column::Translator) {
                up.extend([
                    "--translator".to_owned(),
                    rig.translator.to_string_lossy().into_owned(),
                ]);
            }
            let up: Vec<&str> = up.iter().map(String::as_str).collect();
            spawn_up(exe, &quiet, &rig.local_space, &up, children).await?;
            let join = [OsStr::new("--dir"), rig.local_space.as_os_str()];
            for i in 1..=capacity.workers {
                let id = format!("local-worker-{i}");
                spawn_worker(exe, &quiet, &id, capacity.jobs, &join, children)?;
            }
            if has(Column::Translator) {
                let limit = std::time::Duration::from_secs(15);
                wait_for_file(&rig.translator, limit).await?;
            }
            rig.metrics = Some(metrics);
        }
        if has(Column::OwnStore) {
            let up = ["--tcp", "127.0.0.1:0", "--state-dir", &state("state-own")];
            spawn_up(exe, &quiet, &rig.own_space, &up, children).await?;
            let route = tcp_only_route(&rig.own_space)?;
            let store = tmp.join("own-store");
            let join = [
                OsStr::new("--route"),
                route.as_os_str(),
                OsStr::new("--own-store"),
                store.as_os_str(),
            ];
            spawn_worker(exe, &quiet, "own-store", capacity.total(), &join, children)?;
        }
        Ok(rig)
    }

    /// The command that builds `file` (a DAG's Nix expression) the way of `column`.
    pub fn command(&self, column: Column, file: &Path) -> Result<Command, BenchError> {
        let total = self.capacity.total().to_string();
        let nix_build = |store: Option<&Path>| {
            let mut cmd = Command::new("nix-build");
            cmd.arg(file)
                .args(["--no-out-link", "--quiet", "--max-jobs", &total]);
            if let Some(socket) = store {
                cmd.arg("--store")
                    .arg(format!("unix://{}", socket.display()));
            }
            cmd
        };
        let nixspace_build = |dir: &Path| {
            let mut cmd = Command::new(&self.exe);
            // No out-link, as the compared nix-build makes none.
            cmd.args(["--log-level", "warn", "build", "--no-out-link", "--dir"])
                .arg(dir)
                .arg(file);
            cmd
        };
        let missing = || BenchError::NotStarted(column);
        Ok(match column {
            Column::Local => nix_build(None),
            Column::Daemon => nix_build(Some(self.daemon.as_ref().ok_or_else(missing)?.socket())),
            Column::Ssh => self.ssh.as_ref().ok_or_else(missing)?.nix_build(
                file,
                self.capacity.total(),
                None,
                None,
            )?,
            Column::SshNixspace => {
                // Nix appends ` --stdio`; the spaces are percent-encoded in the store URI.
                let program = format!(
                    "{}%20translate%20--log-level%20warn%20--dir%20{}",
                    self.exe.display(),
                    self.local_space.display()
                );
                self.ssh.as_ref().ok_or_else(missing)?.nix_build(
                    file,
                    self.capacity.total(),
                    Some(&program),
                    None,
                )?
            }
            Column::Nixspace => nixspace_build(&self.local_space),
            Column::OwnStore => nixspace_build(&self.own_space),
            Column::Translator => nix_build(Some(&self.translator)),
        })
    }
}

/// Write `<dir>/worker-tcp.route`: the worker route of the dataspace in `dir` with its TCP
/// transports only, so a worker joining with it comes in over TCP as from another host; the
/// worker's signing key goes with it (`worker-tcp.key`, a copy of `worker.key`), as it would
/// to another host, so what the worker builds is trusted.
fn tcp_only_route(dir: &Path) -> Result<PathBuf, BenchError> {
    let worker_route = Role::Worker.route_file(dir);
    let route = Route::read(&worker_route)?.tcp_only();
    if route.transports.is_empty() {
        return Err(BenchError::NoTcp(dir.to_owned()));
    }
    let path = dir.join("worker-tcp.route");
    route.write(&path)?;
    std::fs::copy(signing_key_beside(&worker_route), signing_key_beside(&path))?;
    Ok(path)
}
