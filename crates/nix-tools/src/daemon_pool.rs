//! Building derivations through the Nix worker protocol, over a pool of
//! long-lived daemon connections.
//!
//! Each connection goes to the pool's own private `nix-daemon` on the local store
//! ([`PrivateDaemon`], started with the first connection; each connection is a fork of it)
//! or to a running daemon's socket; it is handshaken once, then reused for queries and
//! transfers; a connection that built something is retired (below). A step costs two
//! protocol round trips instead of three `nix-store` processes. Connections send no `SetOptions`, so the
//! daemon keeps the settings of its own configuration (`cores`,
//! `max-silent-time`, …), as `nix-store --realise` did, except before a build whose
//! [`BuildSettings`] ask for something (a time limit, `keep-failed`, …): that build's
//! connection gets them ([`crate::daemon_options`]) and is retired after the build anyway.
//!
//! Nix roots what a connection built or added (temporary GC roots) for as long as that
//! connection lasts. A worker's connections last as long as the worker, so a connection that
//! built or added a path is retired ([`Lease::retire`]) once the operation is over: its daemon
//! exits and the paths can be collected, as they can once a `nix-daemon` client has gone. A
//! new connection costs the daemon a fork, not a program start.
//!
//! A build whose future is dropped (a withdrawn step) leaves its connection in
//! the middle of an operation: that connection is never reused: it is closed, which the
//! daemon takes as an interruption (it kills the builder).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nixspace_nix_formats::derivation::{
    BasicDerivation, Derivation, DerivationError, DerivationOutput,
};
use nixspace_nix_formats::store_path::{StoreDir, StorePath, StorePathError};
use nixspace_nix_protocol::{
    BuildResult, BuildStatus, ClientConfig, ClientError, DaemonClient, LogEvent, Realisation,
};
use nixspace_protocol::BuildSettings;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::build_activity::{BuildEvents, BuildLog};
use crate::build_cgroup::{BuildCgroup, BuildCgroups, BuildUsage, MIB};
use crate::daemon_options::{nix_build_mode, DaemonDefaults};
use crate::private_daemon::{PrivateDaemon, PrivateDaemonError};
use crate::NixError;

/// How long opening a connection (start, handshake, options) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The read half of a pooled connection.
pub type Reader = Box<dyn AsyncRead + Unpin + Send>;
/// The write half of a pooled connection.
pub type Writer = Box<dyn AsyncWrite + Unpin + Send>;
/// A client of one pooled daemon connection.
pub type Client = DaemonClient<Reader, Writer>;

/// Which daemon a pool talks to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DaemonTarget {
    /// The pool's own private `nix-daemon` on the local store (`NIX_REMOTE=local`, otherwise
    /// the caller's environment), started with the first connection and again if it died: the
    /// real `nix-daemon` on `PATH`, never nixspace itself.
    #[default]
    Private,
    /// A running daemon listening on this unix socket.
    Socket(PathBuf),
}

/// What a [`DaemonPool`] connects to and how.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// At most this many connections (and so builds) at once.
    pub max_connections: usize,
    /// The daemon.
    pub target: DaemonTarget,
    /// System features the private daemon is told it has
    /// (`extra-system-features`); a daemon behind a socket must declare them
    /// in its own configuration.
    pub features: Vec<String>,
    /// Secret key files the private daemon signs every path it builds with
    /// (`extra-secret-key-files`, as Nix signs outputs when it registers them); a daemon
    /// behind a socket signs as its own configuration says.
    pub secret_key_files: Vec<PathBuf>,
    /// The store directory (`NIX_STORE_DIR`, or `/nix/store`).
    pub store_dir: StoreDir,
    /// Where each build of the private daemon gets a control group of its own, measured
    /// (and limited to `memory_limit`); `None`: builds run unmeasured. A daemon behind a
    /// socket runs builds as its own configuration says.
    pub cgroups: Option<BuildCgroups>,
    /// The most memory, in bytes, one build may use (with `cgroups`).
    pub memory_limit: Option<u64>,
}

impl PoolConfig {
    /// Up to `max_connections` connections to a private daemon on the local store, no extra
    /// features, the store directory from `NIX_STORE_DIR` or the default.
    pub fn new(max_connections: usize) -> PoolConfig {
        let store_dir = std::env::var("NIX_STORE_DIR")
            .ok()
            .and_then(|d| StoreDir::new(&d).ok())
            .unwrap_or_default();
        PoolConfig {
            max_connections: max_connections.max(1),
            target: DaemonTarget::Private,
            features: Vec::new(),
            secret_key_files: Vec::new(),
            store_dir,
            cgroups: None,
            memory_limit: None,
        }
    }
}

/// Why a step did not produce its outputs.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// Some inputs are not valid in the store (this store lacks them; another
    /// may have them): transient.
    #[error("inputs not valid: {}", .0.join(" "))]
    InputsMissing(Vec<String>),
    /// The step names no derivation of this store: permanent.
    #[error("{path}: {source}")]
    BadDerivationPath {
        /// The path given.
        path: String,
        /// Why it is not a store path here.
        #[source]
        source: StorePathError,
    },
    /// A `.drv` file exists but cannot be read: transient.
    #[error("cannot read derivation {path}: {source}")]
    ReadDerivation {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A `.drv` file does not parse: permanent.
    #[error("cannot parse derivation {path}: {source}")]
    ParseDerivation {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: Box<DerivationError>,
    },
    /// Reading the derivations on the blocking pool did not finish: transient.
    #[error("reading the derivation failed: {0}")]
    ReadTask(#[source] tokio::task::JoinError),
    /// An input's output has no path before it is built: permanent.
    #[error(
        "output '{output}' of {drv} has no path known before it is built \
         (floating content-addressed inputs are not supported yet)"
    )]
    FloatingInput {
        /// The input derivation.
        drv: String,
        /// Its output.
        output: String,
    },
    /// Nix built the derivation and the build failed: permanent unless Nix calls the failure
    /// transient.
    #[error("{message}")]
    Build {
        /// Nix's status.
        status: BuildStatus,
        /// Nix's message without its log tail (or the status).
        message: String,
    },
    /// The build succeeded but Nix did not say where an output went: transient.
    #[error("the Nix daemon built {drv} but did not report output '{output}'")]
    OutputNotReported {
        /// The derivation.
        drv: String,
        /// The output.
        output: String,
    },
    /// The kernel killed the build for going over its memory limit on this worker:
    /// transient (a worker with more memory may build it).
    #[error("killed for going over the memory limit of {} MiB per build (Nix: {message})", .limit / MIB)]
    OutOfMemory {
        /// The limit, in bytes.
        limit: u64,
        /// Nix's message.
        message: String,
    },
    /// The daemon or the connection failed: transient.
    #[error("Nix daemon: {}", error_chain(.0))]
    Daemon(Box<ClientError>),
    /// The private `nix-daemon` could not be started (there may be none but nixspace
    /// itself): transient (another machine may have one).
    #[error(transparent)]
    PrivateDaemon(#[from] PrivateDaemonError),
    /// The daemon's socket does not accept a connection: transient.
    #[error("cannot connect to the Nix daemon at {}: {source}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Opening a connection took longer than [`CONNECT_TIMEOUT`]: transient.
    #[error("the Nix daemon did not answer within {CONNECT_TIMEOUT:?}")]
    ConnectTimeout,
    /// The pool is closed: transient.
    #[error("the daemon pool is closed")]
    PoolClosed,
    /// The local Nix's configuration, which a build's settings go over, could not be read:
    /// transient.
    #[error("cannot read the Nix configuration for the build's settings: {0}")]
    Configuration(#[source] NixError),
}

impl StepError {
    /// Whether trying again (here or elsewhere) cannot help.
    pub fn is_permanent(&self) -> bool {
        match self {
            StepError::BadDerivationPath { .. }
            | StepError::ParseDerivation { .. }
            | StepError::FloatingInput { .. } => true,
            StepError::Build { status, .. } => *status != BuildStatus::TransientFailure,
            _ => false,
        }
    }
}

/// A pool of connections to the Nix daemon, opened on demand and reused.
#[derive(Clone)]
pub struct DaemonPool {
    inner: Arc<Inner>,
}

struct Inner {
    config: PoolConfig,
    idle: Mutex<Vec<Connection>>,
    slots: Arc<Semaphore>,
    opened: AtomicU64,
    /// The private daemon, once started ([`DaemonTarget::Private`]).
    daemon: tokio::sync::Mutex<Option<PrivateDaemon>>,
    /// The local Nix's configuration, once a build's settings needed it.
    defaults: tokio::sync::OnceCell<DaemonDefaults>,
    /// Held while a connection to the private daemon opens, when its serving process is
    /// looked for.
    opening: tokio::sync::Mutex<()>,
}

impl Inner {
    /// The socket to connect to: the target's, or the private daemon's (started if it is
    /// not running).
    async fn socket(&self) -> Result<PathBuf, StepError> {
        if let DaemonTarget::Socket(path) = &self.config.target {
            return Ok(path.clone());
        }
        let mut daemon = self.daemon.lock().await;
        if let Some(running) = daemon.as_mut() {
            if running.is_running() {
                return Ok(running.socket().to_owned());
            }
            tracing::warn!(socket = %running.socket().display(), "the private nix-daemon stopped; starting it again");
        }
        let started = PrivateDaemon::start(&daemon_options(&self.config)).await?;
        let socket = started.socket().to_owned();
        *daemon = Some(started);
        Ok(socket)
    }
}

impl Inner {
    /// The private daemon's process, if it is running.
    async fn daemon_pid(&self) -> Option<u32> {
        self.daemon
            .lock()
            .await
            .as_ref()
            .and_then(PrivateDaemon::pid)
    }
}

impl std::fmt::Debug for DaemonPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonPool")
            .field("config", &self.inner.config)
            .field("opened", &self.opened())
            .finish_non_exhaustive()
    }
}

impl DaemonPool {
    /// A pool with no connection yet.
    pub fn new(config: PoolConfig) -> DaemonPool {
        let slots = Arc::new(Semaphore::new(config.max_connections.max(1)));
        DaemonPool {
            inner: Arc::new(Inner {
                config,
                idle: Mutex::new(Vec::new()),
                slots,
                opened: AtomicU64::new(0),
                daemon: tokio::sync::Mutex::new(None),
                defaults: tokio::sync::OnceCell::new(),
                opening: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// The socket the pool connects to: its target's, or its private daemon's (started if it
    /// is not running), for connections of the caller's own.
    pub async fn socket(&self) -> Result<PathBuf, StepError> {
        self.inner.socket().await
    }

    /// How many connections the pool has opened so far.
    pub fn opened(&self) -> u64 {
        self.inner.opened.load(Ordering::Relaxed)
    }

    /// Build the derivation at `drv` (a `.drv` store path) with
    /// `BuildDerivation` in `settings`' mode, once its inputs are valid, the connection set
    /// to `settings` first (unless they change nothing); call `on_log` for each log line and
    /// activity event of the build as it arrives. Returns the output paths (by output name) and the realisations of the
    /// floating content-addressed outputs.
    ///
    /// Dropping the returned future interrupts the build.
    pub async fn build(
        &self,
        drv: &str,
        settings: &BuildSettings,
        on_log: impl FnMut(BuildLog) + Send,
    ) -> Result<BuiltStep, StepError> {
        let step = Step::load(self.store_dir().clone(), drv.to_owned()).await?;
        self.build_step(step, settings, on_log).await
    }

    /// Build `basic`, a derivation a client sent inline, under the path `drv` it named it by
    /// (not in the store: Nix's daemon builds it as it is, for a trusted client), as
    /// [`DaemonPool::build`] builds a stored one; its input sources must be valid.
    pub async fn build_inline(
        &self,
        drv: StorePath,
        basic: BasicDerivation,
        settings: &BuildSettings,
        on_log: impl FnMut(BuildLog) + Send,
    ) -> Result<BuiltStep, StepError> {
        let step = Step {
            drv_path: drv,
            closure: basic.input_srcs.clone(),
            basic,
        };
        self.build_step(step, settings, on_log).await
    }

    async fn build_step(
        &self,
        step: Step,
        settings: &BuildSettings,
        mut on_log: impl FnMut(BuildLog) + Send,
    ) -> Result<BuiltStep, StepError> {
        let store = &self.inner.config.store_dir;
        let options = match settings.is_default() {
            true => None,
            false => Some(self.defaults().await?.with(settings)),
        };
        let mut lease = self.lease().await?;
        let valid = match lease.client().query_valid_paths(&step.closure, false).await {
            Ok(valid) => valid,
            // A reused connection may have died while idle: try a fresh one.
            Err(e) if !e.is_recoverable() && lease.reused => {
                tracing::debug!(error = %e, "idle daemon connection failed; reconnecting");
                lease.close();
                lease = self.lease_new().await?;
                lease
                    .client()
                    .query_valid_paths(&step.closure, false)
                    .await
                    .map_err(|e| lease.failed(e))?
            }
            Err(e) => return Err(lease.failed(e)),
        };
        let missing: Vec<String> = step
            .closure
            .difference(&valid)
            .map(|p| store.print(p))
            .collect();
        if !missing.is_empty() {
            lease.release();
            return Err(StepError::InputsMissing(missing));
        }
        if let Some(options) = &options {
            // The connection is retired after the build: its settings go with it.
            if let Err(e) = lease.client().set_options(options).await {
                return Err(lease.failed(e));
            }
        }
        let server = lease.conn.as_ref().and_then(|c| c.server);
        let group = self.build_group(&step.drv_path, server);
        let mut events = BuildEvents::default();
        let mut logs = |event: LogEvent| events.sort(event, &mut on_log);
        let mode = nix_build_mode(settings.mode);
        let result = lease
            .client()
            .build_derivation(&step.drv_path, &step.basic, mode, &mut logs)
            .await;
        // The daemon now holds temporary roots on the derivation and its outputs: they go
        // with its connection, so that the worker's store can be collected as Nix's is once a
        // client has gone.
        let result = match result {
            Ok(result) => result,
            Err(e) if e.is_recoverable() => {
                lease.retire();
                return Err(StepError::Daemon(Box::new(e)));
            }
            Err(e) => return Err(lease.failed(e)),
        };
        lease.retire();
        let usage = group.as_ref().map(BuildCgroup::usage);
        match (step.outputs(store, result), usage) {
            (Ok(built), usage) => Ok(BuiltStep { usage, ..built }),
            (Err(StepError::Build { message, .. }), Some(usage)) if usage.oom_killed => {
                Err(StepError::OutOfMemory {
                    limit: self.inner.config.memory_limit.unwrap_or_default(),
                    message,
                })
            }
            (Err(e), _) => Err(e),
        }
    }

    /// A control group for the build of `drv` by the private daemon's process `server`
    /// (serving the build's connection), moved into it; `None` without cgroups or that
    /// process (or if the group cannot be made: the build runs unmeasured).
    fn build_group(&self, drv: &StorePath, server: Option<u32>) -> Option<BuildCgroup> {
        let config = &self.inner.config;
        let (Some(cgroups), Some(server)) = (&config.cgroups, server) else {
            return None;
        };
        let group = cgroups
            .start(&drv.to_string(), config.memory_limit)
            .and_then(|group| group.enter(server).map(|()| group));
        match group {
            Ok(group) => Some(group),
            Err(e) => {
                tracing::warn!(%drv, error = %e, "cannot make the build's control group; building unmeasured");
                None
            }
        }
    }

    /// The local Nix's configuration, read once.
    async fn defaults(&self) -> Result<&DaemonDefaults, StepError> {
        self.inner
            .defaults
            .get_or_try_init(DaemonDefaults::load)
            .await
            .map_err(StepError::Configuration)
    }

    /// The store directory the pool's daemons use.
    pub fn store_dir(&self) -> &StoreDir {
        &self.inner.config.store_dir
    }

    /// A connection for any store operation: an idle one, or a new one if none is idle.
    /// Hand it back with [`Lease::release`] when the operation finished cleanly.
    pub async fn lease(&self) -> Result<Lease, StepError> {
        let permit = self.permit().await?;
        let idle = match self.inner.idle.lock() {
            Ok(mut idle) => idle.pop(),
            Err(_) => None,
        };
        match idle.filter(|conn| !conn.outlived_its_store()) {
            Some(conn) => Ok(Lease {
                conn: Some(conn),
                inner: Arc::clone(&self.inner),
                reused: true,
                _permit: Some(permit),
            }),
            None => self.open(permit).await,
        }
    }

    /// A new connection outside the pool's limit, never reused: for temporary GC roots its
    /// holder needs for as long as it keeps the lease (Nix keeps a connection's roots until it
    /// ends); dropping the lease closes the connection and the roots go.
    pub async fn lease_for_roots(&self) -> Result<Lease, StepError> {
        let conn = Connection::open(&self.inner).await?;
        self.inner.opened.fetch_add(1, Ordering::Relaxed);
        Ok(Lease {
            conn: Some(conn),
            inner: Arc::clone(&self.inner),
            reused: false,
            _permit: None,
        })
    }

    /// A new connection.
    async fn lease_new(&self) -> Result<Lease, StepError> {
        let permit = self.permit().await?;
        self.open(permit).await
    }

    async fn permit(&self) -> Result<OwnedSemaphorePermit, StepError> {
        Arc::clone(&self.inner.slots)
            .acquire_owned()
            .await
            .map_err(|_| StepError::PoolClosed)
    }

    async fn open(&self, permit: OwnedSemaphorePermit) -> Result<Lease, StepError> {
        let conn = Connection::open(&self.inner).await?;
        self.inner.opened.fetch_add(1, Ordering::Relaxed);
        Ok(Lease {
            conn: Some(conn),
            inner: Arc::clone(&self.inner),
            reused: false,
            _permit: Some(permit),
        })
    }
}

/// One connection in use. Returned to the pool by [`Lease::release`];
/// dropped any other way (the operation was abandoned midway) its
/// connection is interrupted and closed.
pub struct Lease {
    conn: Option<Connection>,
    inner: Arc<Inner>,
    reused: bool,
    // Dropped after `conn` went back to the idle list; none for a lease outside the limit.
    _permit: Option<OwnedSemaphorePermit>,
}

impl Lease {
    /// The daemon client of this connection.
    // `conn` is only taken when the lease is released or dropped, which consumes its use.
    #[allow(clippy::expect_used)]
    pub fn client(&mut self) -> &mut Client {
        &mut self
            .conn
            .as_mut()
            .expect("a lease holds its connection until released")
            .client
    }

    /// The operation finished with the connection in step: keep it (a lease for roots keeps
    /// its connection until dropped).
    pub fn release(&mut self) {
        if self._permit.is_none() {
            return;
        }
        if let Some(conn) = self.conn.take() {
            if let Ok(mut idle) = self.inner.idle.lock() {
                idle.push(conn);
            }
        }
    }

    /// The operation finished with the connection in step, but its daemon holds temporary GC
    /// roots (Nix roots what a build or an added path touched for the rest of the connection)
    /// that nothing needs any more: close the connection, so the daemon's process serving it
    /// exits and its roots go.
    pub fn retire(&mut self) {
        self.conn = None;
    }

    /// Close the connection: it is out of step, and the daemon may still be building; closing
    /// interrupts it.
    fn close(&mut self) {
        self.conn = None;
    }

    /// An operation failed: keep the connection if it is still in step.
    pub fn failed(&mut self, e: ClientError) -> StepError {
        if e.is_recoverable() {
            self.release();
        } else {
            self.close();
        }
        StepError::Daemon(Box::new(e))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.close();
    }
}

/// A handshaken connection.
struct Connection {
    client: Client,
    /// For the private daemon: the local store's database file when the connection opened
    /// the store (the daemon's process serving it keeps that one open).
    store_db: Option<(u64, u64)>,
    /// For the private daemon, with build cgroups: the daemon's process serving the
    /// connection (where its builds run).
    server: Option<u32>,
}

/// The local store's database file.
fn local_db() -> PathBuf {
    crate::local_store::db_path(&crate::local_store::state_dir())
}

impl Connection {
    /// Whether the store this connection's daemon opened was wiped since (its state directory
    /// removed and made anew): it would answer for a store that is gone.
    fn outlived_its_store(&self) -> bool {
        self.store_db.is_some() && crate::local_store::file_identity(&local_db()) != self.store_db
    }

    async fn open(inner: &Inner) -> Result<Connection, StepError> {
        match tokio::time::timeout(CONNECT_TIMEOUT, Connection::open_now(inner)).await {
            Ok(conn) => conn,
            Err(_) => Err(StepError::ConnectTimeout),
        }
    }

    async fn open_now(inner: &Inner) -> Result<Connection, StepError> {
        let config = &inner.config;
        let client_config = ClientConfig {
            store_dir: config.store_dir.clone(),
            ..ClientConfig::default()
        };
        let store_db = match config.target {
            DaemonTarget::Private => crate::local_store::file_identity(&local_db()),
            DaemonTarget::Socket(_) => None,
        };
        let path = inner.socket().await?;
        // Which of the private daemon's processes serves the new connection: the child it
        // forked for it, found by opening one connection at a time (nothing else connects
        // to a private daemon).
        let watched = match (&config.target, &config.cgroups) {
            (DaemonTarget::Private, Some(_)) => inner.daemon_pid().await,
            _ => None,
        };
        let _one_at_a_time = match watched {
            Some(_) => Some(inner.opening.lock().await),
            None => None,
        };
        let before = watched.map(children_of).unwrap_or_default();
        let stream = crate::daemon_socket::connect(&path)
            .await
            .map_err(|source| StepError::Connect { path, source })?;
        let (r, w) = stream.into_split();
        let (r, w): (Reader, Writer) = (Box::new(r), Box::new(w));
        let client = DaemonClient::handshake_with_config(r, w, &client_config)
            .await
            .map_err(|e| StepError::Daemon(Box::new(e)))?;
        let server = watched.and_then(|daemon| {
            let mut new = children_of(daemon)
                .into_iter()
                .filter(|c| !before.contains(c));
            match (new.next(), new.next()) {
                (Some(server), None) => Some(server),
                _ => None,
            }
        });
        tracing::debug!(target = ?config.target, ?server, "opened a Nix daemon connection");
        Ok(Connection {
            client,
            store_db,
            server,
        })
    }
}

/// The processes `pid` forked that are running (`/proc/<pid>/task/*/children`).
fn children_of(pid: u32) -> BTreeSet<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return BTreeSet::new();
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// `extra-system-features "a b"` as a daemon's `--option`, or nothing for no features.
///
/// A command-line option, not a `SetOptions` override: Nix's local store
/// takes its `system-features` from the settings when it is opened, before
/// any client can change them.
/// The private daemon's `--option`s: the pool's system features and signing keys.
fn daemon_options(config: &PoolConfig) -> Vec<(String, String)> {
    let mut options = Vec::new();
    if !config.features.is_empty() {
        options.push((
            "extra-system-features".to_owned(),
            config.features.join(" "),
        ));
    }
    if !config.secret_key_files.is_empty() {
        let files: Vec<String> = config
            .secret_key_files
            .iter()
            .map(|f| f.display().to_string())
            .collect();
        options.push(("extra-secret-key-files".to_owned(), files.join(" ")));
    }
    options
}

/// What a successful build produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltStep {
    /// The output paths, in output-name order.
    pub outputs: Vec<String>,
    /// Nix's realisations of the outputs whose paths were not known before the build
    /// (floating content-addressed ones), as the daemon reported and registered them.
    pub realisations: Vec<Realisation>,
    /// What the build used, where it ran in a control group of its own.
    pub usage: Option<BuildUsage>,
}

/// One derivation, ready to send.
struct Step {
    drv_path: StorePath,
    /// The derivation as `BuildDerivation` sends it: no input derivations, their used
    /// outputs among the input sources (as Nix does).
    basic: BasicDerivation,
    /// Everything the build reads: input sources and used input outputs.
    closure: BTreeSet<StorePath>,
}

impl Step {
    /// Read and parse `drv` and its input derivations (small files, in one trip to the
    /// blocking pool). A derivation missing here is reported as a missing input.
    async fn load(store: StoreDir, drv: String) -> Result<Step, StepError> {
        tokio::task::spawn_blocking(move || Step::read(&store, &drv))
            .await
            .map_err(StepError::ReadTask)?
    }

    fn read(store: &StoreDir, drv: &str) -> Result<Step, StepError> {
        let drv_path = store
            .parse(drv)
            .map_err(|source| StepError::BadDerivationPath {
                path: drv.to_owned(),
                source,
            })?;
        let derivation = read_derivation(store, &drv_path)?;
        let mut closure = derivation.input_srcs.clone();
        for (input, names) in &derivation.input_drvs {
            let input_drv = read_derivation(store, input)?;
            for name in names {
                let path = input_drv.outputs.get(name).and_then(DerivationOutput::path);
                let Some(path) = path else {
                    return Err(StepError::FloatingInput {
                        drv: store.print(input),
                        output: name.clone(),
                    });
                };
                closure.insert(path.clone());
            }
        }
        let mut basic = BasicDerivation::from_derivation(&derivation);
        basic.input_srcs = closure.clone();
        Ok(Step {
            drv_path,
            basic,
            closure,
        })
    }

    /// The output paths of a finished build and the realisations of its floating outputs,
    /// or why it failed.
    fn outputs(&self, store: &StoreDir, result: BuildResult) -> Result<BuiltStep, StepError> {
        if !result.status.is_success() {
            let message = error_text(&result.error_msg);
            let message = if message.is_empty() {
                format!("build failed ({:?})", result.status)
            } else {
                message
            };
            return Err(StepError::Build {
                status: result.status,
                message,
            });
        }
        let mut built = BuiltStep {
            outputs: Vec::new(),
            realisations: Vec::new(),
            usage: None,
        };
        for (name, output) in &self.basic.outputs {
            let path = match output.path() {
                Some(path) => store.print(path),
                None => {
                    let suffix = format!("!{name}");
                    let realised = result
                        .built_outputs
                        .iter()
                        .find(|(id, _)| id.ends_with(&suffix))
                        .map(|(_, r)| r);
                    let Some(realisation) = realised else {
                        return Err(StepError::OutputNotReported {
                            drv: store.print(&self.drv_path),
                            output: name.clone(),
                        });
                    };
                    built.realisations.push(realisation.clone());
                    let p = realisation.out_path.as_str();
                    if p.starts_with('/') {
                        p.to_owned()
                    } else {
                        format!("{store}/{p}")
                    }
                }
            };
            built.outputs.push(path);
        }
        Ok(built)
    }
}

fn read_derivation(store: &StoreDir, path: &StorePath) -> Result<Derivation, StepError> {
    let file = store.print(path);
    let bytes = std::fs::read(&file).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => StepError::InputsMissing(vec![file.clone()]),
        _ => StepError::ReadDerivation {
            path: file.clone(),
            source,
        },
    })?;
    Derivation::parse_at(store, path, &bytes).map_err(|source| StepError::ParseDerivation {
        path: file,
        source: Box::new(source),
    })
}

/// A Nix error message as the step's failure reason: without colours, a leading `error: `,
/// blank lines around it, or the log tail Nix appends to a builder's failure (`;` then
/// `last N log lines:` and the lines; whoever shows the failure has the log). The lines
/// before the tail stay: some messages list paths there (a disallowed reference's).
fn error_text(message: &str) -> String {
    let plain = strip_ansi(message);
    let mut lines: Vec<&str> = plain
        .lines()
        .map(str::trim_end)
        .skip_while(|l| l.trim().is_empty())
        .take_while(|l| !is_log_tail_heading(l))
        .collect();
    while lines.last().is_some_and(|l| l.trim().is_empty()) {
        lines.pop();
    }
    if let Some(first) = lines.first_mut() {
        *first = first.trim_start().trim_start_matches("error: ");
    }
    let text = lines.join("\n");
    text.trim_end_matches(';').to_owned()
}

/// Whether `line` is the heading of the log tail in a builder's failure (`last 10 log lines:`).
fn is_log_tail_heading(line: &str) -> bool {
    line.trim()
        .strip_prefix("last ")
        .and_then(|rest| rest.strip_suffix(" log lines:"))
        .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
}

/// `text` without ANSI escape sequences (`ESC [ … letter`).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.clone().next() == Some('[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// An error with its causes, `a: b: c`.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_texts_lose_colours_and_log_tails() {
        let msg =
            "builder for '\u{1b}[35;1m/nix/store/x-a.drv\u{1b}[0m' failed with exit code 3;\n\
                   last 10 log lines:\n> boom";
        assert_eq!(
            error_text(msg),
            "builder for '/nix/store/x-a.drv' failed with exit code 3"
        );
        assert_eq!(error_text("\n  error: nope\n"), "nope");
        assert_eq!(error_text("\u{1b}[31;1merror:\u{1b}[0m nope"), "nope");
        assert_eq!(strip_ansi("a\u{1b}[1mb\u{1b}[0m"), "ab");
    }

    #[test]
    fn error_texts_keep_the_lines_nix_lists() {
        let msg = "output '\u{1b}[35;1m/nix/store/x-a\u{1b}[0m' is not allowed to refer to the \
                   following paths:\n  /nix/store/y-dep1\n  /nix/store/z-dep2\n";
        assert_eq!(
            error_text(msg),
            "output '/nix/store/x-a' is not allowed to refer to the following paths:\n  \
             /nix/store/y-dep1\n  /nix/store/z-dep2"
        );
    }

    #[test]
    fn only_failures_nothing_can_fix_are_permanent() {
        let build = |status| StepError::Build {
            status,
            message: "x".into(),
        };
        assert!(build(BuildStatus::PermanentFailure).is_permanent());
        assert!(!build(BuildStatus::TransientFailure).is_permanent());
        assert!(!StepError::ConnectTimeout.is_permanent());
        assert!(!StepError::InputsMissing(vec!["/nix/store/x".into()]).is_permanent());
    }
}
