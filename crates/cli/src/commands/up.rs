//! `nixspace up`: host a dataspace with its planner.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use nixspace_coordinator::{CoordinatorOptions, ExternalPlanner, HostedCoordinator, JobsOptions};
use nixspace_nix_formats::signature::PublicKey;
use nixspace_planner::metrics::Metrics;
use nixspace_planner::{PlannerConfig, StealPolicy};
use nixspace_space::{external, limits, log_budget, HostConfig, Role, Route, SessionEvent};

/// Host a dataspace (embedded; nothing else to install) with its planner.
///
/// Listens on a unix socket (and optionally TCP), guarded by a gatekeeper.
/// Writes `worker.route` and `submit.route` (mode 0600) into the runtime
/// directory: they carry the capabilities workers and frontends need.
/// On first start it also makes `worker.key` (mode 0600) beside `worker.route`: the Nix
/// signing key workers joining with that route sign what they build with. Every store in the
/// dataspace is told to trust its public key, those of the `worker-NAME.key` files
/// `nixspace route worker` made in the runtime directory, and `--trusted-public-key`s.
/// With `--external`, joins a syndicate-server instead (see `nixspace
/// server-config`). Runs until Ctrl-C or SIGTERM.
#[derive(Args, Debug)]
pub struct UpArgs {
    /// Runtime directory for the socket, keys and route files.
    /// Default: $XDG_RUNTIME_DIR/nixspace or /tmp/nixspace-<uid>.
    #[arg(long, env = "NIXSPACE_DIR", value_name = "DIR")]
    dir: Option<PathBuf>,

    /// Do not host a dataspace: run the planner (and `--translator`) as a
    /// client of the syndicate-server set up by `nixspace server-config` in
    /// the runtime directory, joining with its `planner.route` and rejoining
    /// with back-off while the server is away.
    #[arg(long, conflicts_with_all = ["socket", "tcp"])]
    external: bool,

    /// Unix socket path. Default: <dir>/nixspace.sock.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,

    /// Also listen on TCP, e.g. 10.0.0.1:7420 (port 0 picks a free port).
    /// Route files then list it too, for workers on other machines, with the
    /// host's Noise public key: clients open an encrypted session that
    /// authenticates the host before they send the capability.
    #[arg(long, value_name = "ADDR")]
    tcp: Option<SocketAddr>,

    /// Let capabilities and builds cross TCP in clear: route files without
    /// the Noise key, and refs accepted outside a Noise session on any
    /// address (without this flag, only on loopback). Anyone on the path can
    /// then copy the capability and read or change what crosses.
    #[arg(long, requires = "tcp")]
    insecure_tcp: bool,

    /// Directory for state kept across restarts (the build history,
    /// `history.sqlite`). Default: $XDG_STATE_HOME/nixspace or
    /// ~/.local/state/nixspace.
    #[arg(long, env = "NIXSPACE_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// Serve Prometheus metrics on this address (GET /metrics), e.g.
    /// 127.0.0.1:9420: queue sizes, running steps, builds done/failed,
    /// dispatch latency, retries, steals, workers.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,

    /// Serve a live web view of the farm on this address, e.g. 127.0.0.1:8080 (use 0 for
    /// any free port): workers and their steps, each frontend's progress, the queue,
    /// unschedulable steps, steals, transfers, rejected results, and any step's build log
    /// as it grows. Read-only; anyone who can reach the address sees what the dataspace
    /// holds, so keep it on loopback or behind an authenticating proxy.
    #[arg(long, value_name = "ADDR")]
    http: Option<SocketAddr>,

    /// How many times a step is tried when its worker goes away.
    #[arg(long, default_value_t = nixspace_planner::DEFAULT_MAX_ATTEMPTS, value_name = "N")]
    max_attempts: u32,

    /// Delay before retrying a step whose worker went away, in seconds;
    /// doubles with every attempt.
    #[arg(long, default_value_t = nixspace_planner::DEFAULT_RETRY_BACKOFF.as_secs_f64(), value_name = "SECONDS")]
    retry_backoff: f64,

    /// Work stealing: an idle worker at least this many times faster (by
    /// `worker --speed`) than the one building a step may duplicate it; the
    /// first to finish wins and the other build is stopped.
    #[arg(long, default_value_t = StealPolicy::default().ratio, value_name = "RATIO")]
    steal_ratio: f64,

    /// Work stealing: how long a step must have been running, in seconds,
    /// before a faster worker may duplicate it.
    #[arg(long, default_value_t = StealPolicy::default().after.as_secs_f64(), value_name = "SECONDS")]
    steal_after: f64,

    /// After a restart, how long, in seconds, a step that was being built is
    /// kept for its worker to rejoin and report it before another worker may
    /// take it.
    #[arg(long, default_value_t = nixspace_planner::DEFAULT_REJOIN_GRACE.as_secs_f64(), value_name = "SECONDS")]
    rejoin_grace: f64,

    /// Also serve the Nix daemon protocol on this unix socket (as
    /// `nixspace translate --socket PATH` would, in this process): unmodified
    /// Nix clients build on this dataspace with NIX_REMOTE=unix://PATH.
    #[arg(long, value_name = "PATH")]
    translator: Option<PathBuf>,

    /// The --translator socket's mode, in octal (e.g. 660). Default: 600, or 666 when run as
    /// root.
    #[arg(long, value_name = "MODE", value_parser = super::parse_mode, requires = "translator")]
    translator_socket_mode: Option<u32>,

    /// The most demands one frontend may hold at once; further demands are refused (never
    /// scheduled) and the frontend is told so (it fails with that reason). With the embedded
    /// dataspace the cap is per client connection, enforced by the host, and a `demands`
    /// record (a frontend sends a few hundred steps in one) that would go past it is refused
    /// whole. With `--external` the connections are the server's: the planner caps demands
    /// per requester name instead, so a client asserting demands under many names is not
    /// caught there.
    #[arg(long, default_value_t = limits::DEFAULT_MAX_DEMANDS, value_name = "N")]
    max_demands_per_client: usize,

    /// The most submitted jobs (`nixspace submit`) kept pending at once; a submission past it
    /// is refused with the reason, until some end or are cancelled.
    #[arg(long, default_value_t = nixspace_coordinator::DEFAULT_MAX_PENDING_JOBS, value_name = "N")]
    max_pending_jobs: usize,

    /// The most bytes of build log (lines plus newlines) one client connection, normally a
    /// worker, may send per build of a step (the count starts afresh once it reports the step
    /// built or failed). Past it the coordinator passes on one line saying it truncated the
    /// log and drops the rest of that build's log. 0: no cap. The default is
    /// above `worker --max-log-bytes`'s, so a worker's own truncation notice gets through.
    /// Embedded dataspace only: with `--external` the connections are the server's.
    #[arg(long, default_value_t = log_budget::DEFAULT_MAX_LOG_BYTES_PER_STEP,
          value_name = "BYTES", conflicts_with = "external")]
    max_log_bytes_per_step: u64,

    /// The largest packet a connection may send before it resolved a capability (a capability
    /// request is under 1 KiB). A longer one, or one whose declared length says it will be
    /// longer, closes the connection before it is buffered. Embedded dataspace only.
    #[arg(long, default_value_t = limits::DEFAULT_MAX_UNAUTHENTICATED_PACKET_BYTES,
          value_name = "BYTES", conflicts_with = "external")]
    max_unauthenticated_packet_bytes: usize,

    /// The largest packet a connection may send once it resolved a capability (a frontend
    /// sends all its demands in one; NAR chunks are 64 KiB). Embedded dataspace only.
    #[arg(long, default_value_t = limits::DEFAULT_MAX_PACKET_BYTES, value_name = "BYTES",
          conflicts_with = "external")]
    max_packet_bytes: usize,

    /// The most bytes queued for one connection whose peer does not read them; past it the
    /// connection is closed. Embedded dataspace only.
    #[arg(long, default_value_t = limits::DEFAULT_MAX_QUEUED_BYTES, value_name = "BYTES",
          conflicts_with = "external")]
    max_queued_bytes: usize,

    /// Seconds a connection has to resolve a capability; one that has not by then is closed.
    /// Embedded dataspace only.
    #[arg(long, default_value_t = limits::DEFAULT_RESOLVE_TIMEOUT.as_secs_f64(),
          value_name = "SECONDS", conflicts_with = "external")]
    resolve_timeout: f64,

    /// A public key (`name:base64`, as `nix-store --generate-binary-cache-key` writes it)
    /// whose signatures every store in the dataspace trusts, besides its own Nix
    /// configuration's `trusted-public-keys` and the worker keys in the runtime directory.
    /// Give it for a worker signing with a key of its own (`worker --signing-key`). Repeat
    /// for several.
    #[arg(long = "trusted-public-key", value_name = "KEY")]
    trusted_public_keys: Vec<String>,
}

/// The public keys every store in the dataspace is told to trust: those of the signing keys
/// in `dir` (`worker.key` and `trusted.key`, made now if missing, and `worker-NAME.key`) and
/// `flags`.
fn trusted_keys(dir: &std::path::Path, flags: &[String]) -> anyhow::Result<Vec<String>> {
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    for (role, name) in [(Role::Worker, "worker"), (Role::Trusted, "translator")] {
        let key = nixspace_space::route::signing_key_beside(&role.route_file(dir));
        crate::signing_keys::load_or_create(&key, &format!("{host}-nixspace-{name}-1"))?;
    }
    let mut keys: Vec<String> = crate::signing_keys::dataspace_public_keys(dir)
        .iter()
        .map(ToString::to_string)
        .collect();
    for flag in flags {
        let key = PublicKey::parse(flag)
            .map_err(|e| anyhow::anyhow!("--trusted-public-key {flag:?}: {e}"))?;
        keys.push(key.to_string());
    }
    keys.dedup();
    Ok(keys)
}

/// Run `nixspace up`.
pub async fn run(args: UpArgs) -> anyhow::Result<ExitCode> {
    let dir = args
        .dir
        .unwrap_or_else(nixspace_space::runtime_dir::default_runtime_dir);
    let socket = args.socket.unwrap_or_else(|| dir.join("nixspace.sock"));
    let state_dir = args
        .state_dir
        .unwrap_or_else(nixspace_space::runtime_dir::default_state_dir);
    let history = super::open_history(&state_dir, true)?;
    let metrics_listener = listen(args.metrics, "metrics").await?;
    let web_listener = listen(args.http, "the web view").await?;
    let submit_route_file = Role::Submit.route_file(&dir);
    let trusted_route_file = Role::Trusted.route_file(&dir);
    if !(args.steal_ratio.is_finite() && args.steal_ratio >= 1.0) {
        anyhow::bail!("--steal-ratio must be at least 1, got {}", args.steal_ratio);
    }
    let seconds = |flag: &str, value: f64| {
        std::time::Duration::try_from_secs_f64(value)
            .map_err(|e| anyhow::anyhow!("--{flag} {value}: {e}"))
    };
    let planner = PlannerConfig {
        max_attempts: args.max_attempts,
        retry_backoff: seconds("retry-backoff", args.retry_backoff)?,
        steal: StealPolicy {
            ratio: args.steal_ratio,
            after: seconds("steal-after", args.steal_after)?,
        },
        rejoin_grace: seconds("rejoin-grace", args.rejoin_grace)?,
        // The embedded host caps demands per connection, before the planner sees them.
        max_demands_per_requester: args.external.then_some(args.max_demands_per_client),
    };
    let metrics = Arc::new(Metrics::default());
    let trusted_keys = trusted_keys(&dir, &args.trusted_public_keys)?;
    let vouching_key = crate::signing_keys::vouching_key(&Role::Trusted.route_file(&dir));
    eprintln!(
        "nixspace: stores in the dataspace trust signatures by {}",
        trusted_keys.join(" ")
    );
    let (submit, vouches, session, hosted) = if args.external {
        let planner_route = read_route(&external::planner_route_file(&dir))?;
        // A configuration written before the trusted capability existed has no trusted
        // route: the translator then builds no inline derivation.
        let trusted = Role::Trusted.route_file(&dir);
        let submit = match trusted.exists() {
            true => read_route(&trusted)?,
            false => read_route(&Role::Submit.route_file(&dir))?,
        };
        let vouches = trusted.exists();
        for t in &planner_route.transports {
            eprintln!("nixspace: joining the external dataspace at {t}");
        }
        let planner = ExternalPlanner {
            planner,
            metrics: Arc::clone(&metrics),
            // Opened (and migrated) above; each connection's planner reopens it.
            history: super::history_path(&state_dir),
            trusted_keys,
            jobs: Some((
                submit.clone(),
                jobs_options(&state_dir, args.max_pending_jobs),
            )),
        };
        drop(history);
        let session = tokio::spawn(planner.stay_joined(planner_route, |event| match event {
            SessionEvent::Joined { connection } => {
                eprintln!(
                    "nixspace: planner joined the external dataspace (connection {connection})"
                )
            }
            SessionEvent::Lost(why) => {
                eprintln!("nixspace: planner lost the external dataspace ({why}); rejoining")
            }
            SessionEvent::Retrying { after, why } => {
                eprintln!("nixspace: planner: {why}; retrying in {after:?}")
            }
        }));
        (submit, vouches, Some(session), None)
    } else {
        let space = HostedCoordinator::start(CoordinatorOptions {
            host: HostConfig {
                dir,
                socket: socket.clone(),
                tcp: args.tcp,
                insecure_tcp: args.insecure_tcp,
                limits: nixspace_space::Limits {
                    max_demands: args.max_demands_per_client,
                    max_log_bytes_per_step: args.max_log_bytes_per_step,
                    max_unauthenticated_packet_bytes: args.max_unauthenticated_packet_bytes,
                    max_packet_bytes: args.max_packet_bytes,
                    max_queued_bytes: args.max_queued_bytes,
                    resolve_timeout: seconds("resolve-timeout", args.resolve_timeout)?,
                },
            },
            history: Some(history),
            planner,
            metrics: Arc::clone(&metrics),
            trusted_keys,
            jobs: Some(jobs_options(&state_dir, args.max_pending_jobs)),
        })
        .await?;
        for t in &space.transports {
            eprintln!("nixspace: listening on {t}");
        }
        for (_, f) in space.routes.values() {
            eprintln!("nixspace: wrote {}", f.display());
        }
        (
            space.route(Role::Trusted)?,
            true,
            None,
            Some((space, socket)),
        )
    };
    if let Some(listener) = metrics_listener {
        if let Ok(addr) = listener.local_addr() {
            eprintln!("nixspace: metrics on http://{addr}/metrics");
        }
        tokio::spawn(crate::metrics_http::serve(listener, metrics));
    }
    if let Some(listener) = web_listener {
        let route = Route::read(&submit_route_file)?;
        if let Ok(addr) = listener.local_addr() {
            eprintln!("nixspace: web view on http://{addr}/");
        }
        let history = super::history_path(&state_dir);
        // Holders of the submit or trusted capability may cancel jobs from the page.
        let mut cancellers = vec![route.clone()];
        cancellers.extend(
            trusted_route_file
                .exists()
                .then(|| Route::read(&trusted_route_file))
                .transpose()?,
        );
        tokio::spawn(crate::web::serve(listener, route, history, cancellers));
    }
    let mut translator = match args.translator {
        Some(path) => {
            // The translator in `up` vouches for its trusted clients' inline derivations.
            let mut options = nixspace_translator::TranslatorOptions::new(submit);
            options.vouches = vouches;
            options.vouching_key = vouches.then_some(vouching_key).flatten();
            options.socket_mode = args.translator_socket_mode;
            Some(crate::services::start_translator(path, options).await?)
        }
        None => None,
    };
    let what = if session.is_some() {
        "planner running on the external dataspace"
    } else {
        "dataspace up"
    };
    eprintln!("nixspace: {what}; start workers with `nixspace worker`, build with `nixspace build FILE.nix`; Ctrl-C stops");
    let translator_failed = async {
        match translator.as_mut() {
            Some(t) => anyhow::Error::from(t.failed().await),
            None => std::future::pending().await,
        }
    };
    let planner_gave_up = async {
        match session {
            Some(s) => match s.await {
                Ok(end) => anyhow::anyhow!("the planner cannot join the external dataspace: {end}"),
                Err(e) => anyhow::anyhow!("the planner session ended: {e}"),
            },
            None => std::future::pending().await,
        }
    };
    let result = tokio::select! {
        r = super::shutdown_signal() => r.map_err(anyhow::Error::from),
        e = translator_failed => Err(e),
        e = planner_gave_up => Err(e),
    };
    eprintln!("nixspace: shutting down");
    drop(translator);
    if let Some((space, socket)) = hosted {
        drop(space);
        let _ = std::fs::remove_file(socket);
    }
    result.map(|()| ExitCode::SUCCESS)
}

/// A listener on `addr`, if given, to serve `what` on.
async fn listen(
    addr: Option<SocketAddr>,
    what: &str,
) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    let Some(addr) = addr else { return Ok(None) };
    tokio::net::TcpListener::bind(addr)
        .await
        .map(Some)
        .map_err(|e| anyhow::anyhow!("cannot serve {what} on {addr}: {e}"))
}

/// Where `up` keeps jobs: in the build history of `state_dir`, their roots in its `jobs`;
/// at most `max_pending` at once.
fn jobs_options(state_dir: &std::path::Path, max_pending: usize) -> JobsOptions {
    JobsOptions {
        history: super::history_path(state_dir),
        roots: state_dir.join("jobs"),
        max_pending,
    }
}

/// Read a route file written by `nixspace server-config`.
fn read_route(path: &std::path::Path) -> anyhow::Result<Route> {
    Route::read(path).map_err(|e| {
        anyhow::anyhow!(
            "{e}\n  hint: `nixspace up --external` joins the syndicate-server set up by \
             `nixspace server-config --dir DIR`; pass the same --dir"
        )
    })
}
