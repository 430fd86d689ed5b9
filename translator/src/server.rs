//! The translator's socket server: one task per client connection.
//!
//! Per connection: connect the upstream store (offering our newest version), shake hands with
//! the client offering the upstream's version, and if the client settles on an older one,
//! reconnect the upstream at that version, so both sides of the proxy speak the same version
//! and replies can be relayed field by field. Then the op loop: build operations become
//! demands in the dataspace, every other modelled operation is proxied, and log frames from
//! the upstream are relayed as they arrive. An operation that cannot be decoded gets an error
//! frame and ends that connection only; the server keeps serving others.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nixspace_nix_formats::store_path::{StoreDir, StorePath};
use nixspace_nix_protocol::framed::{self, FramedError, FramedSource};
use nixspace_nix_protocol::handshake::{server_handshake, ServerHello};
use nixspace_nix_protocol::nar_copy::{relay_nar, NarCopyError};
use nixspace_nix_protocol::stderr::{activity_type, result_type, send_error, send_log, Field};
use nixspace_nix_protocol::version::{ADD_TO_STORE_NAR_FRAMED, QUERY_PATH_INFO_VALID_FLAG};
use nixspace_nix_protocol::{
    BuildMode, BuildResult, BuildStatus, ClientSettings, DaemonError, DerivedPath, HandshakeError,
    LogEvent, NixDeserialize, NixReader, NixSerialize, NixWriter, Opcode, PathInfo, Request,
    StderrFrame, ValidPathInfo, WireError,
};
use nixspace_space::Route;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};

use crate::dataspace::DataspaceBuild;
use crate::steps::{self, StepEvent};
use crate::upstream::{Upstream, UpstreamError, UpstreamSpec};

/// What the translator serves with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where store operations go.
    pub upstream: UpstreamSpec,
    /// The dataspace builds go to (a submit route).
    pub route: Route,
    /// How long a step may stay unschedulable before its build fails.
    pub patience: Duration,
    /// Priority of the demands.
    pub priority: i64,
    /// The store directory (`/nix/store` unless NIX_STORE_DIR says otherwise).
    pub store_dir: StoreDir,
}

/// Why a client connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The upstream store could not be reached.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The client's handshake failed.
    #[error("client handshake failed")]
    Handshake(#[from] HandshakeError),
    /// Reading or writing a connection failed, or the client sent something malformed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The client sent an operation that cannot be skipped.
    #[error("unsupported operation {0}; its arguments cannot be skipped")]
    Unsupported(String),
    /// The client sent bytes while an operation was running.
    #[error("the client sent data in the middle of an operation")]
    Desync,
    /// Streaming a NAR failed.
    #[error("relaying a NAR failed")]
    Nar(#[from] NarCopyError),
    /// Relaying a framed stream failed.
    #[error("relaying a framed stream failed")]
    Framed(#[from] FramedError),
    /// A socket operation failed.
    #[error("socket error")]
    Io(#[from] std::io::Error),
}

/// Accept clients on `listener` forever, one task each.
pub async fn serve(listener: UnixListener, config: Arc<Config>) -> std::io::Result<()> {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and friends: wait a little rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let config = Arc::clone(&config);
        tokio::spawn(async move {
            tracing::debug!(client = id, "connected");
            match handle(stream, &config, id).await {
                Ok(()) => tracing::debug!(client = id, "disconnected"),
                Err(e) => {
                    tracing::warn!(client = id, error = %display_chain(&e), "connection closed")
                }
            }
        });
    }
}

fn display_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

type ClientReader = NixReader<OwnedReadHalf>;
type ClientWriter = NixWriter<OwnedWriteHalf>;

struct Conn<'a> {
    id: u64,
    config: &'a Config,
    cr: ClientReader,
    cw: ClientWriter,
    up: Upstream,
    /// A second handle on the client socket, to notice it closing during a build.
    watch: UnixStream,
    /// The client's last `SetOptions`.
    settings: ClientSettings,
}

async fn handle(stream: UnixStream, config: &Config, id: u64) -> Result<(), ConnError> {
    let std_stream = stream.into_std()?;
    let watch = UnixStream::from_std(std_stream.try_clone()?)?;
    let stream = UnixStream::from_std(std_stream)?;
    let (r, w) = stream.into_split();
    let ours = nixspace_nix_protocol::version::MAX_SUPPORTED;
    let mut up = Upstream::connect(&config.upstream, ours, &config.store_dir).await?;
    let mut cr = NixReader::new(r, ours).with_store_dir(config.store_dir.clone());
    let mut cw = NixWriter::new(w, ours).with_store_dir(config.store_dir.clone());
    let hello = ServerHello {
        version: up.info.version,
        nix_version: up
            .info
            .daemon_nix_version
            .clone()
            .unwrap_or_else(|| "nixspace".to_owned()),
        trusted: up.info.trusted,
        features: up.info.features.clone(),
    };
    let info = server_handshake(&mut cr, &mut cw, &hello).await?;
    if info.version != up.info.version {
        up = Upstream::connect(&config.upstream, info.version, &config.store_dir).await?;
    }
    tracing::debug!(client = id, version = %info.version, "handshake done");
    let mut conn = Conn {
        id,
        config,
        cr,
        cw,
        up,
        watch,
        settings: ClientSettings::default(),
    };
    conn.op_loop().await
}

fn not_supported(what: &str) -> DaemonError {
    DaemonError::new(format!(
        "operation {what} is not supported by nixspace translator"
    ))
}

impl Conn<'_> {
    async fn op_loop(&mut self) -> Result<(), ConnError> {
        loop {
            let req = match Request::read(&mut self.cr).await {
                Ok(None) => return Ok(()),
                Ok(Some(r)) => r,
                Err(WireError::UnknownOpcode(n)) => {
                    let what = n.0.to_string();
                    let _ = send_error(&mut self.cw, &not_supported(&what)).await;
                    return Err(ConnError::Unsupported(what));
                }
                Err(WireError::UnsupportedOp(op)) => {
                    let what = format!("{op:?} ({})", op as u64);
                    let _ = send_error(&mut self.cw, &not_supported(&what)).await;
                    return Err(ConnError::Unsupported(what));
                }
                Err(e) => {
                    let _ = send_error(
                        &mut self.cw,
                        &DaemonError::new(format!("nixspace translator: malformed request: {e}")),
                    )
                    .await;
                    return Err(e.into());
                }
            };
            tracing::trace!(client = self.id, op = ?req.opcode(), "request");
            match req {
                Request::BuildPaths { paths, mode } => self.build_paths(paths, mode, false).await?,
                Request::BuildPathsWithResults { paths, mode } => {
                    self.build_paths(paths, mode, true).await?
                }
                Request::BuildDerivation { drv_path, mode, .. } => {
                    self.build_derivation(drv_path, mode).await?
                }
                Request::SetOptions(settings) => {
                    tracing::debug!(client = self.id, ?settings, "client settings");
                    self.settings = settings.clone();
                    self.proxy(Request::SetOptions(settings)).await?
                }
                other => self.proxy(other).await?,
            }
        }
    }

    /// Send `req` upstream and relay its log frames until `LAST` or `ERROR`, which are
    /// returned, not relayed. `STDERR_READ` is answered from the client when `pull` is set.
    async fn call(
        &mut self,
        req: &Request,
        pull: bool,
    ) -> Result<Result<(), DaemonError>, ConnError> {
        req.write(&mut self.up.writer).await?;
        self.up.writer.flush().await?;
        self.relay_logs(pull).await
    }

    async fn relay_logs(&mut self, pull: bool) -> Result<Result<(), DaemonError>, ConnError> {
        let pull = if pull {
            Some((&mut self.cr, &mut self.up.writer))
        } else {
            None
        };
        relay_logs(&mut self.up.reader, &mut self.cw, pull).await
    }

    /// Proxy a store operation: request, any data stream, log frames, reply.
    async fn proxy(&mut self, req: Request) -> Result<(), ConnError> {
        let op = req.opcode();
        let framed = match &req {
            Request::AddToStore { .. } | Request::AddMultipleToStore { .. } => true,
            Request::AddToStoreNar { .. } => self.cr.version() >= ADD_TO_STORE_NAR_FRAMED,
            _ => false,
        };
        let outcome = if framed {
            req.write(&mut self.up.writer).await?;
            self.up.writer.flush().await?;
            // The daemon may log while it reads: relay both directions at once.
            let copy = async {
                let mut source = FramedSource::new(&mut self.cr);
                let res = framed::write_framed(&mut self.up.writer, &mut source).await;
                res.map(|_| ())
            };
            let logs = relay_logs(
                &mut self.up.reader,
                &mut self.cw,
                None::<(&mut ClientReader, &mut ClientWriter)>,
            );
            let (copied, outcome) = tokio::join!(copy, logs);
            copied?;
            outcome?
        } else {
            self.call(&req, matches!(req, Request::AddToStoreNar { .. }))
                .await?
        };
        if let Err(e) = outcome {
            send_error(&mut self.cw, &e).await?;
            return Ok(());
        }
        StderrFrame::Last.write_to(&mut self.cw).await?;
        let (r, w) = (&mut self.up.reader, &mut self.cw);
        match op {
            Opcode::SetOptions | Opcode::AddToStoreNar | Opcode::AddMultipleToStore => {}
            Opcode::IsValidPath
            | Opcode::AddTempRoot
            | Opcode::AddIndirectRoot
            | Opcode::EnsurePath
            | Opcode::SyncWithGC
            | Opcode::OptimiseStore
            | Opcode::VerifyStore
            | Opcode::AddSignatures
            | Opcode::BuildPaths => copy_u64(r, w).await?,
            Opcode::AddTextToStore | Opcode::QueryPathFromHashPart | Opcode::AddPermRoot => {
                copy_bytes(r, w).await?
            }
            Opcode::QueryValidPaths
            | Opcode::QueryReferrers
            | Opcode::QueryValidDerivers
            | Opcode::QuerySubstitutablePaths
            | Opcode::QueryAllValidPaths
            | Opcode::QueryRealisation => copy_list(r, w).await?,
            Opcode::QueryDerivationOutputMap | Opcode::FindRoots => copy_pairs(r, w).await?,
            Opcode::QueryMissing => {
                for _ in 0..3 {
                    copy_list(r, w).await?;
                }
                copy_u64(r, w).await?;
                copy_u64(r, w).await?;
            }
            Opcode::QueryPathInfo => {
                let valid = if r.version() >= QUERY_PATH_INFO_VALID_FLAG {
                    let valid = r.read_bool("QueryPathInfo valid").await?;
                    w.write_bool(valid, "QueryPathInfo valid").await?;
                    valid
                } else {
                    true
                };
                if valid {
                    let info = PathInfo::read_from(r).await?;
                    info.write_to(w).await?;
                }
            }
            Opcode::AddToStore => {
                let info = ValidPathInfo::read_from(r).await?;
                info.write_to(w).await?;
            }
            Opcode::NarFromPath => {
                relay_nar(r, w).await?;
            }
            other => {
                // Every request this crate decodes has a reply shape above.
                return Err(ConnError::Unsupported(format!("{other:?} reply")));
            }
        }
        self.cw.flush().await?;
        Ok(())
    }
}

/// Relay log frames from the upstream to the client until `LAST` or `ERROR` (returned, not
/// relayed). `STDERR_READ` is passed to the client and its answer back upstream when `pull`
/// holds the client's reader and the upstream's writer.
async fn relay_logs<R, W, CR, UW>(
    up: &mut NixReader<R>,
    client: &mut NixWriter<W>,
    mut pull: Option<(&mut NixReader<CR>, &mut NixWriter<UW>)>,
) -> Result<Result<(), DaemonError>, ConnError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    CR: AsyncRead + Unpin + Send,
    UW: AsyncWrite + Unpin + Send,
{
    loop {
        match StderrFrame::read_from(up).await? {
            StderrFrame::Last => return Ok(Ok(())),
            StderrFrame::Error(e) => return Ok(Err(e)),
            StderrFrame::Read(n) => {
                let Some((cr, uw)) = pull.as_mut() else {
                    return Err(WireError::UnexpectedStderrFrame { tag: "STDERR_READ" }.into());
                };
                StderrFrame::Read(n).write_to(client).await?;
                client.flush().await?;
                let data = cr.read_bytes("STDERR_READ answer").await?;
                uw.write_bytes(&data, "STDERR_READ answer").await?;
                uw.flush().await?;
            }
            frame => {
                frame.write_to(client).await?;
                client.flush().await?;
            }
        }
    }
}

async fn copy_u64<R, W>(r: &mut NixReader<R>, w: &mut NixWriter<W>) -> Result<(), WireError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let v = r.read_u64("reply").await?;
    w.write_u64(v, "reply").await
}

async fn copy_bytes<R, W>(r: &mut NixReader<R>, w: &mut NixWriter<W>) -> Result<(), WireError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let v = r.read_bytes("reply").await?;
    w.write_bytes(&v, "reply").await
}

async fn copy_list<R, W>(r: &mut NixReader<R>, w: &mut NixWriter<W>) -> Result<(), WireError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let n = r.read_count("reply list").await?;
    w.write_u64(n, "reply list").await?;
    for _ in 0..n {
        copy_bytes(r, w).await?;
    }
    Ok(())
}

async fn copy_pairs<R, W>(r: &mut NixReader<R>, w: &mut NixWriter<W>) -> Result<(), WireError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let n = r.read_count("reply map").await?;
    w.write_u64(n, "reply map").await?;
    for _ in 0..n {
        copy_bytes(r, w).await?;
        copy_bytes(r, w).await?;
    }
    Ok(())
}

/// How one demanded step ended.
#[derive(Debug, Clone)]
enum Outcome {
    Built,
    Failed { worker: String, reason: String },
}

/// How a whole dataspace build ended.
#[derive(Debug, Default)]
struct Report {
    outcomes: BTreeMap<String, Outcome>,
    start: u64,
    stop: u64,
}

impl Report {
    fn failures(&self) -> Vec<(&String, &String, &String)> {
        let mut f: Vec<_> = self
            .outcomes
            .iter()
            .filter_map(|(d, o)| match o {
                Outcome::Failed { worker, reason } => Some((d, worker, reason)),
                Outcome::Built => None,
            })
            .collect();
        // Root causes first.
        f.sort_by_key(|(_, _, r)| r.starts_with("dependency "));
        f
    }

    fn error_message(&self) -> Option<String> {
        let failures = self.failures();
        let (drv, worker, reason) = failures.first()?;
        let at = if worker.is_empty() {
            String::new()
        } else {
            format!(" on worker {worker}")
        };
        let more = match failures.len() {
            1 => String::new(),
            n => format!(" ({} more step(s) failed)", n - 1),
        };
        Some(format!("build of '{drv}' failed{at}: {reason}{more}"))
    }

    /// The result for one root.
    fn result_for(&self, drv: &str) -> BuildResult {
        let mut res = match self.outcomes.get(drv) {
            None => BuildResult::new(BuildStatus::AlreadyValid),
            Some(Outcome::Built) => BuildResult::new(BuildStatus::Built),
            Some(Outcome::Failed { reason, worker }) => {
                let status = if reason.starts_with("dependency ") {
                    BuildStatus::DependencyFailed
                } else {
                    BuildStatus::PermanentFailure
                };
                let mut r = BuildResult::new(status);
                r.error_msg = if worker.is_empty() {
                    format!("build of '{drv}' failed: {reason}")
                } else {
                    format!("build of '{drv}' failed on worker {worker}: {reason}")
                };
                r
            }
        };
        if self.outcomes.contains_key(drv) {
            res.times_built = 1;
            res.start_time = self.start;
            res.stop_time = self.stop;
        }
        res
    }
}

/// The realisations of a built derivation's outputs (empty, with a warning, if they cannot
/// be computed: the client then falls back to querying the outputs).
async fn built_outputs(
    store_dir: &StoreDir,
    drv: &StorePath,
) -> BTreeMap<String, nixspace_nix_protocol::Realisation> {
    let (dir, path) = (store_dir.clone(), drv.clone());
    match tokio::task::spawn_blocking(move || crate::realisation::built_outputs(&dir, &path)).await
    {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::warn!(drv = %drv, error = %display_chain(&e), "no realisations for the build result");
            BTreeMap::new()
        }
        Err(e) => {
            tracing::warn!(drv = %drv, error = %e, "no realisations for the build result");
            BTreeMap::new()
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Nix's `lvlInfo`: "building …" messages show at this verbosity and above.
const LVL_INFO: u64 = 3;

impl Conn<'_> {
    /// Whether the client wants builders' output (`-Q` turns it off).
    fn wants_build_logs(&self) -> bool {
        self.settings.build_verbosity <= self.settings.verbosity
    }

    /// Start the client-side activity of building `drv` (on `worker`, if known), replacing
    /// an earlier one (a retried step); returns its id.
    async fn start_activity(
        &mut self,
        activities: &mut BTreeMap<String, u64>,
        drv: &str,
        worker: &str,
    ) -> Result<u64, ConnError> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        self.stop_activity(activities, drv).await?;
        // Like Nix: the process id in the upper half keeps ids apart from the upstream's.
        let id = (u64::from(std::process::id()) << 32) | NEXT.fetch_add(1, Ordering::Relaxed);
        let text = if worker.is_empty() {
            format!("building '{drv}'")
        } else {
            format!("building '{drv}' on nixspace worker '{worker}'")
        };
        send_log(
            &mut self.cw,
            LogEvent::StartActivity {
                id,
                level: LVL_INFO,
                activity_type: activity_type::BUILD,
                text,
                fields: vec![
                    Field::String(drv.to_owned()),
                    Field::String(worker.to_owned()),
                    Field::Int(1),
                    Field::Int(1),
                ],
                parent: 0,
            },
        )
        .await?;
        activities.insert(drv.to_owned(), id);
        Ok(id)
    }

    async fn stop_activity(
        &mut self,
        activities: &mut BTreeMap<String, u64>,
        drv: &str,
    ) -> Result<(), ConnError> {
        if let Some(id) = activities.remove(drv) {
            send_log(&mut self.cw, LogEvent::StopActivity { id }).await?;
        }
        Ok(())
    }

    async fn log(&mut self, text: String) -> Result<(), ConnError> {
        send_log(&mut self.cw, LogEvent::Message(text)).await?;
        Ok(())
    }

    /// `BuildPaths` / `BuildPathsWithResults`: derivation outputs become demands; opaque
    /// paths must already be valid (or are made valid by the upstream).
    async fn build_paths(
        &mut self,
        paths: Vec<DerivedPath>,
        mode: BuildMode,
        with_results: bool,
    ) -> Result<(), ConnError> {
        if mode != BuildMode::Normal {
            send_error(
                &mut self.cw,
                &DaemonError::new(format!(
                    "build mode {mode:?} is not supported by nixspace translator"
                )),
            )
            .await?;
            return Ok(());
        }
        let store_dir = self.config.store_dir.clone();
        let mut roots = Vec::new();
        let mut opaque = Vec::new();
        for p in &paths {
            match p {
                DerivedPath::Built { drv_path, .. } => roots.push(store_dir.print(drv_path)),
                DerivedPath::Opaque(path) => opaque.push(DerivedPath::Opaque(path.clone())),
            }
        }
        if !opaque.is_empty() {
            // Substitution is the upstream's business.
            let req = Request::BuildPaths {
                paths: opaque,
                mode,
            };
            match self.call(&req, false).await? {
                Ok(()) => {
                    self.up.reader.read_u64("BuildPaths reply").await?;
                }
                Err(e) => {
                    send_error(&mut self.cw, &e).await?;
                    return Ok(());
                }
            }
        }
        let report = match self.build_on_dataspace(&roots).await? {
            Ok(r) => r,
            Err(e) => {
                send_error(&mut self.cw, &e).await?;
                return Ok(());
            }
        };
        if with_results {
            StderrFrame::Last.write_to(&mut self.cw).await?;
            self.cw.write_u64(paths.len() as u64, "results").await?;
            for p in &paths {
                p.write_to(&mut self.cw).await?;
                let res = match p {
                    DerivedPath::Built { drv_path, .. } => {
                        let mut res = report.result_for(&store_dir.print(drv_path));
                        if res.status.is_success() {
                            res.built_outputs = built_outputs(&store_dir, drv_path).await;
                        }
                        res
                    }
                    DerivedPath::Opaque(_) => BuildResult::new(BuildStatus::AlreadyValid),
                };
                res.write_to(&mut self.cw).await?;
            }
            self.cw.flush().await?;
        } else if let Some(msg) = report.error_message() {
            send_error(&mut self.cw, &DaemonError::new(msg)).await?;
        } else {
            StderrFrame::Last.write_to(&mut self.cw).await?;
            self.cw.write_u64(1, "BuildPaths reply").await?;
            self.cw.flush().await?;
        }
        Ok(())
    }

    /// `BuildDerivation`: the derivation must be in the store (it names the step).
    async fn build_derivation(
        &mut self,
        drv_path: StorePath,
        mode: BuildMode,
    ) -> Result<(), ConnError> {
        let drv = self.config.store_dir.print(&drv_path);
        let result = if mode != BuildMode::Normal {
            let mut r = BuildResult::new(BuildStatus::MiscFailure);
            r.error_msg = format!("build mode {mode:?} is not supported by nixspace translator");
            r
        } else {
            match self.build_on_dataspace(std::slice::from_ref(&drv)).await? {
                Ok(report) => report.result_for(&drv),
                Err(e) => {
                    let mut r = BuildResult::new(BuildStatus::MiscFailure);
                    r.error_msg = e.message;
                    r
                }
            }
        };
        StderrFrame::Last.write_to(&mut self.cw).await?;
        result.write_to(&mut self.cw).await?;
        self.cw.flush().await?;
        Ok(())
    }

    /// Demand the steps of `roots` and follow them to the end, relaying logs. The outer error
    /// ends the connection (the client left or the stream broke); the inner one is an
    /// error for the client.
    async fn build_on_dataspace(
        &mut self,
        roots: &[String],
    ) -> Result<Result<Report, DaemonError>, ConnError> {
        let start = now_secs();
        let plan = match steps::plan(roots).await {
            Ok(p) => p,
            Err(e) => {
                return Ok(Err(DaemonError::new(format!(
                    "nixspace translator: cannot read the derivations to build: {e}"
                ))))
            }
        };
        let steps = plan.steps();
        let mut report = Report {
            start,
            ..Report::default()
        };
        if steps.is_empty() {
            report.stop = now_secs();
            return Ok(Ok(report));
        }
        let requester = format!("nixspace-translator-{}-{}", std::process::id(), self.id);
        let mut build = match DataspaceBuild::start(
            &self.config.route,
            &steps,
            &requester,
            self.config.priority,
        )
        .await
        {
            Ok(b) => b,
            Err(e) => {
                return Ok(Err(DaemonError::new(format!(
                    "nixspace translator: cannot reach the dataspace: {e}"
                ))))
            }
        };
        tracing::info!(client = self.id, steps = steps.len(), "demanded");
        let wanted: BTreeSet<String> = steps.keys().cloned().collect();
        drop(steps);
        let mut unschedulable: BTreeMap<String, (String, Instant)> = BTreeMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut probe = [0u8; 1];
        let mut activities: BTreeMap<String, u64> = BTreeMap::new();
        while report.outcomes.len() < wanted.len() {
            tokio::select! {
                ev = build.next() => {
                    let Some(ev) = ev else {
                        return Ok(Err(DaemonError::new(
                            "nixspace translator: lost the dataspace before the build finished",
                        )));
                    };
                    match ev {
                        StepEvent::Log { drv, line, .. } if wanted.contains(&drv) => {
                            if self.wants_build_logs() {
                                self.log(format!("{line}\n")).await?;
                            } else {
                                // Not verbose: a result of the build activity, which the
                                // client shows or not (`nix build -L`).
                                let id = match activities.get(&drv) {
                                    Some(id) => *id,
                                    None => self.start_activity(&mut activities, &drv, "").await?,
                                };
                                send_log(&mut self.cw, LogEvent::Result {
                                    id,
                                    result_type: result_type::BUILD_LOG_LINE,
                                    fields: vec![Field::String(line)],
                                }).await?;
                            }
                        }
                        StepEvent::Assigned { drv, worker }
                            if wanted.contains(&drv) && !report.outcomes.contains_key(&drv) =>
                        {
                            self.start_activity(&mut activities, &drv, &worker).await?;
                        }
                        StepEvent::Built { drv, .. } if wanted.contains(&drv) => {
                            self.stop_activity(&mut activities, &drv).await?;
                            report.outcomes.entry(drv).or_insert(Outcome::Built);
                        }
                        StepEvent::Failed { drv, worker, reason } if wanted.contains(&drv) => {
                            self.stop_activity(&mut activities, &drv).await?;
                            report.outcomes.entry(drv).or_insert(Outcome::Failed { worker, reason });
                            if !self.settings.keep_going {
                                // Like Nix without --keep-going: stop at the first failure.
                                for d in &wanted {
                                    report.outcomes.entry(d.clone()).or_insert_with(|| Outcome::Failed {
                                        worker: String::new(),
                                        reason: "dependency or sibling failed; not built (keep-going is off)".to_owned(),
                                    });
                                }
                            }
                        }
                        StepEvent::Unschedulable { drv, reason } if wanted.contains(&drv) => {
                            self.log(format!("waiting for a nixspace worker able to build '{drv}': {reason}\n")).await?;
                            unschedulable.insert(drv, (reason, Instant::now()));
                        }
                        StepEvent::Schedulable { drv } => {
                            unschedulable.remove(&drv);
                        }
                        _ => {}
                    }
                }
                _ = tick.tick() => {
                    let patience = self.config.patience;
                    let stuck: Vec<(String, String)> = unschedulable
                        .iter()
                        .filter(|(d, (_, since))| since.elapsed() >= patience && !report.outcomes.contains_key(*d))
                        .map(|(d, (r, _))| (d.clone(), r.clone()))
                        .collect();
                    if let Some((drv, reason)) = stuck.into_iter().next() {
                        return Ok(Err(DaemonError::new(format!(
                            "build of '{drv}' cannot start: no connected nixspace worker can take it ({reason})"
                        ))));
                    }
                }
                readable = self.watch.readable() => {
                    readable?;
                    match self.watch.try_read(&mut probe) {
                        Ok(0) => {
                            tracing::info!(client = self.id, "client left during a build; demands withdrawn");
                            build.stop();
                            return Err(ConnError::Io(std::io::Error::new(
                                std::io::ErrorKind::ConnectionAborted,
                                "client left during a build",
                            )));
                        }
                        Ok(_) => {
                            build.stop();
                            return Err(ConnError::Desync);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        build.stop();
        for drv in activities.keys().cloned().collect::<Vec<_>>() {
            self.stop_activity(&mut activities, &drv).await?;
        }
        report.stop = now_secs();
        tracing::info!(
            client = self.id,
            failed = report.failures().len(),
            "build finished"
        );
        Ok(Ok(report))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_causes_are_reported_first() {
        let mut report = Report::default();
        report.outcomes.insert(
            "/nix/store/a-top.drv".into(),
            Outcome::Failed {
                worker: String::new(),
                reason: "dependency /nix/store/b-base.drv failed".into(),
            },
        );
        report.outcomes.insert(
            "/nix/store/b-base.drv".into(),
            Outcome::Failed {
                worker: "w1".into(),
                reason: "exit code 3".into(),
            },
        );
        let msg = report.error_message().unwrap();
        assert_eq!(
            msg,
            "build of '/nix/store/b-base.drv' failed on worker w1: exit code 3 (1 more step(s) failed)"
        );
        assert_eq!(
            report.result_for("/nix/store/a-top.drv").status,
            BuildStatus::DependencyFailed
        );
        assert_eq!(
            report.result_for("/nix/store/c-other.drv").status,
            BuildStatus::AlreadyValid
        );
    }

    #[test]
    fn unsupported_operations_are_named() {
        assert_eq!(
            not_supported("CollectGarbage (20)").message,
            "operation CollectGarbage (20) is not supported by nixspace translator"
        );
    }
}
