//! `nixspace worker`: join a dataspace and build steps with the local Nix.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use clap::Args;
use nixspace_space::Role;
use nixspace_space::{Backoff, SessionEvent};
use nixspace_workers::{BuilderConfig, DrainDone, Event};
use syndicate::actor::{Account, Activation, AnyValue};
use syndicate::enclose;

use super::JoinArgs;

/// Join a dataspace as a build worker.
///
/// Announces what this machine can build, pulls ready steps while it has free
/// slots, builds them with the local Nix (over reused `nix-daemon --stdio`
/// connections, one per slot, after checking every input is valid), streams
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

    /// Speed relative to a reference machine (used for work stealing).
    #[arg(long, default_value_t = 1.0, value_name = "FACTOR")]
    speed: f64,

    /// Build through the Nix daemon listening on this socket (e.g.
    /// /nix/var/nix/daemon-socket/socket). Default: private `nix-daemon
    /// --stdio` processes on the local store.
    #[arg(long, value_name = "PATH")]
    daemon_socket: Option<PathBuf>,

    /// Build in a Nix store of this worker's own, kept in DIR: DIR/nix is
    /// mounted on /nix in a private mount namespace (needs root), so the
    /// worker behaves like a separate machine. Inputs it lacks are fetched
    /// from the other stores in the dataspace; what it builds is served to
    /// them.
    #[arg(long, value_name = "DIR", conflicts_with = "daemon_socket")]
    own_store: Option<PathBuf>,
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
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    let config = BuilderConfig {
        id: args
            .id
            .unwrap_or_else(|| format!("{host}-{}", std::process::id())),
        host,
        systems: if args.systems.is_empty() {
            vec![nixspace_nix_tools::current_system()]
        } else {
            args.systems
        },
        features: args.features,
        max_jobs: match args.max_jobs {
            Some(0) => anyhow::bail!("--max-jobs must be at least 1"),
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        },
        speed: args.speed,
        daemon_socket: args.daemon_socket,
    };
    let route = args.join.route(Role::Worker)?;
    let id = config.id.clone();
    let summary = format!(
        "systems {}, features [{}], {} slots, speed {}",
        config.systems.join(","),
        config.features.join(","),
        config.max_jobs,
        config.speed
    );
    let handle = Arc::new(Mutex::new(None));
    let body = enclose!((handle) move |t: &mut Activation, ds| {
        let builder = nixspace_workers::start(t, ds, config)?;
        if let Ok(mut h) = handle.lock() {
            *h = Some((t.facet_ref(), builder));
        }
        Ok(())
    });
    // Keep the worker joined: rejoin (and re-announce) whenever the
    // dataspace restarts; only a refused capability ends it.
    let session =
        nixspace_space::join::stay_joined(&route, Backoff::default(), body, |event| match event {
            SessionEvent::Joined { connection: 1 } => {
                eprintln!("nixspace: worker {id} joined ({summary})")
            }
            SessionEvent::Joined { .. } => {
                eprintln!("nixspace: worker {id} rejoined the dataspace")
            }
            SessionEvent::Lost(why) => {
                eprintln!("nixspace: worker {id} lost the dataspace ({why}); reconnecting")
            }
            SessionEvent::Retrying { after, why } => {
                eprintln!("nixspace: worker {id}: {why}; retrying in {after:?}")
            }
        });
    tokio::pin!(session);
    tokio::select! {
        r = super::shutdown_signal() => r?,
        e = &mut session => anyhow::bail!("worker {id} cannot join the dataspace: {e}"),
    }
    // Leave gracefully: finish the running builds, take nothing new.
    let (done, drained) = DrainDone::new();
    let builder = handle.lock().ok().and_then(|mut h| h.take());
    if let Some((facet, builder)) = builder {
        let account = Account::new(Some(AnyValue::symbol("drain")), None);
        facet.activate(&account, None, |t| {
            t.message(&builder, Event::Drain(done));
            Ok(())
        });
    }
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
        e = session => anyhow::bail!("worker {id} cannot join the dataspace: {e}"),
    }
}
