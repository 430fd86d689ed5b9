//! The library's services as the commands start them: with `nixspace worker`'s defaults, and
//! telling the user on stderr what they do (shared by `worker`, `translate`, `up` and
//! `daemon`, so no command imports another).

use std::path::PathBuf;

use nixspace_space::{Route, SessionEvent};
use nixspace_translator::{TranslatorOptions, TranslatorService};
use nixspace_workers::{BuilderConfig, WorkerService};

/// A builder for this machine with the defaults of `nixspace worker`: named
/// `<hostname>-<pid>`, building for this machine's platform, one slot per CPU,
/// through a private `nix-daemon` of its own, offering the machine's memory and CPUs.
pub fn local_builder() -> BuilderConfig {
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    BuilderConfig {
        id: format!("{host}-{}", std::process::id()).into(),
        host,
        systems: vec![nixspace_nix_tools::current_system()],
        features: Vec::new(),
        max_jobs: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        hold: 0,
        speed: 1.0,
        daemon_socket: None,
        signing_key: None,
        signing_key_file: None,
        fetch_patience: nixspace_transfer::WANT_PATIENCE,
        stream_idle: nixspace_transfer::nar_stream::STREAM_IDLE,
        max_log_bytes: nixspace_workers::DEFAULT_MAX_LOG_BYTES,
        cgroups: build_cgroups(),
        memory_limit: None,
        memory: nixspace_workers::machine::total_memory().unwrap_or(0),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
    }
}

/// A control group per build where this machine lets this process make them; else builds
/// run unmeasured, as the log says.
fn build_cgroups() -> Option<nixspace_nix_tools::build_cgroup::BuildCgroups> {
    match nixspace_nix_tools::build_cgroup::BuildCgroups::detect() {
        Ok(cgroups) => Some(cgroups),
        Err(e) => {
            tracing::info!(error = %e, "builds run without control groups: no memory limits, no usage measured");
            None
        }
    }
}

/// Where a joined worker tells about its connections.
#[derive(Clone, Copy, Debug)]
pub enum Announce {
    /// On stderr, to the user who started it (`nixspace worker`).
    Stderr,
    /// In the log at info level, as part of a larger service (`nixspace daemon`, whose
    /// stderr is quiet like nix-daemon's).
    Log,
}

impl Announce {
    fn say(self, text: String) {
        match self {
            Announce::Stderr => eprintln!("nixspace: {text}"),
            Announce::Log => tracing::info!("{text}"),
        }
    }
}

/// Join the dataspace at `route` as the worker `config` describes, telling about its
/// connections as `announce` says (shared by `worker` and `daemon`).
pub fn join_worker(route: Route, config: BuilderConfig, announce: Announce) -> WorkerService {
    let name = config.id.clone();
    let summary = format!(
        "systems {}, features [{}], {} slots, speed {}, {} MiB of memory, {} CPUs",
        config.systems.join(","),
        config.features.join(","),
        config.max_jobs,
        config.speed,
        config.memory >> 20,
        config.cpus
    );
    WorkerService::join(route, config, move |event| {
        announce.say(match event {
            SessionEvent::Joined { connection: 1 } => format!("worker {name} joined ({summary})"),
            SessionEvent::Joined { .. } => format!("worker {name} rejoined the dataspace"),
            SessionEvent::Lost(why) => {
                format!("worker {name} lost the dataspace ({why}); reconnecting")
            }
            SessionEvent::Retrying { after, why } => {
                format!("worker {name}: {why}; retrying in {after:?}")
            }
        })
    })
}

/// Start a translator and tell the user how to reach it (shared by `translate`, `up
/// --translator` and `daemon`).
pub async fn start_translator(
    socket: PathBuf,
    options: TranslatorOptions,
) -> anyhow::Result<TranslatorService> {
    let upstream = options.upstream.to_string();
    let service = TranslatorService::start(socket, options).await?;
    let socket = service.socket().display();
    eprintln!(
        "nixspace: translating on {socket} (store operations: {upstream}); use NIX_REMOTE=unix://{socket}"
    );
    Ok(service)
}
