//! `nixspace worker`: join a dataspace and build steps with the local Nix.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use nixspace_nix_formats::signature::SecretKey;
use nixspace_space::Role;

use super::JoinArgs;

/// Join a dataspace as a build worker.
///
/// Announces what this machine can build, pulls ready steps while it has free
/// slots, builds them with the local Nix (through a private `nix-daemon`,
/// a connection per build, after checking every input is valid), streams
/// their logs and reports outcomes.
/// On Ctrl-C or SIGTERM it drains: takes no new steps and leaves once its
/// running builds are finished; a second signal leaves at once (unfinished
/// steps go back to the queue).
#[derive(Args, Debug)]
pub struct WorkerArgs {
    #[command(flatten)]
    join: JoinArgs,

    /// Name of this worker in the dataspace. Default: <hostname>-<pid>.
    #[arg(long, value_name = "NAME")]
    id: Option<String>,

    /// Platforms to build for (repeat or comma-separate). Default: this machine's.
    #[arg(long = "system", value_delimiter = ',', value_name = "SYSTEM")]
    systems: Vec<String>,

    /// System features offered, e.g. kvm,big-parallel (repeat or comma-separate).
    #[arg(long = "features", value_delimiter = ',', value_name = "FEATURE")]
    features: Vec<String>,

    /// Steps built at once. Default: the number of CPUs.
    #[arg(long, value_name = "N")]
    max_jobs: Option<u32>,

    /// Steps held beyond --max-jobs: the planner may give the worker this many more, each
    /// started the moment one of its builds ends, with no round trip through the planner in
    /// between. Worth it for farms of many short steps (a few seconds or less); a held step
    /// waits here even if another worker frees a slot first. At most --max-jobs.
    #[arg(long, default_value_t = 0, value_name = "N")]
    hold: u32,

    /// Speed relative to a reference machine (used for work stealing).
    #[arg(long, default_value_t = 1.0, value_name = "FACTOR")]
    speed: f64,

    /// Build through the Nix daemon listening on this socket (e.g.
    /// /nix/var/nix/daemon-socket/socket). Default: a private `nix-daemon`
    /// of the worker's own on the local store.
    #[arg(long, value_name = "PATH")]
    daemon_socket: Option<PathBuf>,

    /// Build in a Nix store of this worker's own, kept in DIR: DIR/nix is
    /// mounted on /nix in a private mount namespace (needs root), so the
    /// worker behaves like a separate machine. Inputs it lacks are fetched
    /// from the other stores in the dataspace; what it builds is served to
    /// them.
    #[arg(long, value_name = "DIR", conflicts_with = "daemon_socket")]
    own_store: Option<PathBuf>,

    /// The most memory one build may use, e.g. 4G, 512M or a number of bytes. Each build
    /// runs in a control group of its own (cgroup v2 with the memory controller, else v1's
    /// memory and cpuacct hierarchies; needs root), which measures its peak memory and CPU
    /// time with or without a limit; a build over the limit is killed by the kernel and
    /// fails, saying so, to be tried again elsewhere. Not with --daemon-socket: that
    /// daemon's builds are its own.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, conflicts_with = "daemon_socket")]
    build_memory_limit: Option<u64>,

    /// The memory this worker offers its builds together, e.g. 16G: the planner gives it no
    /// more steps than their predicted memory fits in. Default: the machine's total memory
    /// (MemTotal), or with --build-memory-limit at most that limit times --max-jobs.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    memory: Option<u64>,

    /// The CPUs this worker offers its builds. Default: the CPUs this process may use.
    #[arg(long, value_name = "N")]
    cpus: Option<u32>,

    /// Sign what this worker builds with the secret key in FILE (`name:base64`,
    /// as written by `nix-store --generate-binary-cache-key`): its private
    /// `nix-daemon` signs every output as it registers it, and the realisations
    /// of content-addressed outputs are signed too. The signatures travel with
    /// the path-infos and realisations in the dataspace; other stores fetch an
    /// output only if they trust the key (or the output is content-addressed).
    /// Default: the key file beside the route file (`worker.key` beside
    /// `worker.route`, as `nixspace up` and `nixspace route worker` make them),
    /// if there is one.
    #[arg(long, value_name = "FILE")]
    signing_key: Option<PathBuf>,

    /// How long fetching an input waits for some store in the dataspace to
    /// have it, in seconds. After that the input is reported lost (the store
    /// that had it left) and the planner builds the step that made it again.
    #[arg(long, default_value_t = nixspace_transfer::WANT_PATIENCE.as_secs_f64(), value_name = "SECONDS")]
    fetch_patience: f64,

    /// Abandon a NAR stream to or from this worker's store that stalls for SECONDS: a
    /// receiver granting no credit, a sender sending no data.
    #[arg(long, default_value_t = nixspace_transfer::nar_stream::STREAM_IDLE.as_secs_f64(), value_name = "SECONDS")]
    stream_idle: f64,

    /// The most bytes of log one build sends to the dataspace; the rest is
    /// dropped, with a line saying the log was truncated.
    #[arg(long, default_value_t = nixspace_workers::DEFAULT_MAX_LOG_BYTES, value_name = "BYTES")]
    max_log_bytes: u64,
}

impl WorkerArgs {
    /// The directory of the worker's own store, if it has one.
    pub fn own_store(&self) -> Option<&std::path::Path> {
        self.own_store.as_deref()
    }
}

/// Run `nixspace worker`.
pub async fn run(args: WorkerArgs) -> anyhow::Result<ExitCode> {
    if !(args.speed.is_finite() && args.speed > 0.0) {
        anyhow::bail!("--speed must be a positive number, got {}", args.speed);
    }
    let mut config = crate::services::local_builder();
    if let Some(id) = args.id {
        config.id = id.into();
    }
    if !args.systems.is_empty() {
        config.systems = args.systems;
    }
    config.features = args.features;
    match args.max_jobs {
        Some(0) => anyhow::bail!("--max-jobs must be at least 1"),
        Some(n) => config.max_jobs = n,
        None => {}
    }
    if args.hold > config.max_jobs {
        anyhow::bail!(
            "--hold {} is more than --max-jobs {}: a worker holds at most as many steps as it builds",
            args.hold,
            config.max_jobs
        );
    }
    config.hold = args.hold;
    config.speed = args.speed;
    config.daemon_socket = args.daemon_socket;
    config.fetch_patience = std::time::Duration::try_from_secs_f64(args.fetch_patience)
        .map_err(|e| anyhow::anyhow!("--fetch-patience {}: {e}", args.fetch_patience))?;
    config.stream_idle = std::time::Duration::try_from_secs_f64(args.stream_idle)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "--stream-idle must be a positive number of seconds, got {}",
                args.stream_idle
            )
        })?;
    if let Some(file) = &args.signing_key {
        let text = std::fs::read_to_string(file)
            .map_err(|e| anyhow::anyhow!("cannot read --signing-key {}: {e}", file.display()))?;
        let key = SecretKey::parse(&text)
            .map_err(|e| anyhow::anyhow!("--signing-key {}: {e}", file.display()))?;
        config.signing_key = Some(key);
        config.signing_key_file = Some(absolute(file)?);
    } else {
        let beside = nixspace_space::route::signing_key_beside(&args.join.route_file(Role::Worker));
        match crate::signing_keys::load(&beside)? {
            Some(key) => {
                config.signing_key = Some(key);
                config.signing_key_file = Some(absolute(&beside)?);
            }
            None => tracing::warn!(
                file = %beside.display(),
                "no signing key beside the route file: other stores take only the content-addressed outputs this worker builds"
            ),
        }
    }
    if let Some(key) = &config.signing_key {
        eprintln!(
            "nixspace: worker signs what it builds with the key {}",
            key.to_public()
        );
    }
    config.max_log_bytes = args.max_log_bytes;
    if config.daemon_socket.is_some() {
        config.cgroups = None;
    }
    if let Some(limit) = args.build_memory_limit {
        if config.cgroups.is_none() {
            anyhow::bail!(
                "--build-memory-limit needs a control group per build, and this machine lets \
                 this process make none (root, with cgroup v2's memory controller or v1's memory \
                 and cpuacct hierarchies mounted)"
            );
        }
        config.memory_limit = Some(limit);
        let all_slots = limit.saturating_mul(config.max_jobs.into());
        config.memory = match config.memory {
            0 => all_slots,
            total => total.min(all_slots),
        };
    }
    if let Some(memory) = args.memory {
        config.memory = memory;
    }
    match args.cpus {
        Some(0) => anyhow::bail!("--cpus must be at least 1"),
        Some(n) => config.cpus = n,
        None => {}
    }
    let route = args.join.route(Role::Worker)?;
    let mut worker = crate::services::join_worker(route, config, crate::services::Announce::Stderr);
    let id = worker.id.clone();
    tokio::select! {
        r = super::shutdown_signal() => r?,
        e = worker.ended() => anyhow::bail!("worker {id} cannot join the dataspace: {e}"),
    }
    // Leave gracefully: finish the running builds, take nothing new.
    let drained = worker.drain();
    eprintln!(
        "nixspace: worker {id} draining: finishing its running builds (signal again to leave now)"
    );
    tokio::select! {
        _ = drained => {
            eprintln!("nixspace: worker {id} left after finishing its builds");
            Ok(ExitCode::SUCCESS)
        }
        r = super::shutdown_signal() => {
            r?;
            eprintln!("nixspace: worker {id} leaving now; its unfinished steps return to the queue");
            Ok(ExitCode::SUCCESS)
        }
        e = worker.ended() => anyhow::bail!("worker {id} cannot join the dataspace: {e}"),
    }
}

/// `file` as an absolute path (the private `nix-daemon` is told it, and runs elsewhere).
fn absolute(file: &std::path::Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))
}

/// A size in bytes: a number, optionally followed by K, M, G or T (powers of 1024).
fn parse_size(text: &str) -> Result<u64, String> {
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, ""),
    };
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(format!("{text:?}: not a size (e.g. 4G, 512M, 1048576)")),
    };
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?}: not a size (e.g. 4G, 512M, 1048576)"))?;
    number
        .checked_mul(1 << shift)
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{text:?}: out of range"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_are_read_in_powers_of_1024() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4g"), Ok(4 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        for bad in ["", "M", "4X", "-1G", "0", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
