//! The translator's socket server: one task per client connection.
//!
//! Per connection: connect the upstream store (offering our newest version), shake hands with
//! the client offering the upstream's version, and if the client settles on an older one,
//! reconnect the upstream at that version, so both sides of the proxy speak the same version
//! and replies can be relayed field by field. Then the op loop: build operations become
//! demands in the dataspace, every other modelled operation is proxied, and log frames from
//! the upstream are relayed as they arrive. An operation that cannot be decoded gets an error
//! frame and ends that connection only; the server keeps serving others.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nixspace_nix_formats::store_path::{StoreDir, StorePath};
use nixspace_nix_protocol::framed::{self, FramedError, FramedSource};
use nixspace_nix_protocol::handshake::{server_greeting, server_handshake, ServerHello};
use nixspace_nix_protocol::nar_copy::{copy_nar, relay_nar, NarCopyError};
use nixspace_nix_protocol::stderr::{activity_type, result_type, send_error, send_log, Field};
use nixspace_nix_protocol::{
    BuildMode, BuildResult, BuildStatus, ClientSettings, DaemonError, DerivedPath, HandshakeError,
    LogEvent, NixReader, NixSerialize, NixWriter, Request, StderrFrame, TrustedFlag, WireError,
};
use nixspace_space::Route;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};

use crate::dataspace::DataspaceBuild;
use crate::relay::{self, copy_reply, relay_logs, Upload};
use crate::steps::{self, StepEvent};
use crate::trust::{Peer, Refusal, SystemGroups, Trust, TrustConfig};
use crate::upstream::{Upstream, UpstreamError, UpstreamSpec};
use nixspace_nix_tools::DaemonPool;
use nixspace_transfer::StoreNode;

use crate::resolve::Resolver;
use crate::store_db::StoreDb;

/// An answer read from the store database.
enum DbAnswer {
    Valid(bool),
    Info(Option<Box<nixspace_nix_protocol::PathInfo>>),
}

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
    /// Who may connect and who is trusted.
    pub trust: TrustConfig,
    /// Connections to the upstream store for path transfers: workers with stores of their
    /// own fetch inputs from it, and results are copied back into it.
    pub transfers: DaemonPool,
    /// The upstream store's database, when it is the local store: `IsValidPath` and
    /// `QueryPathInfo` are answered from it instead of relayed.
    pub store_db: Option<Arc<StoreDb>>,
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

/// Accept clients on `listener` forever, one task each. Each peer's credentials decide, as
/// `config.trust` says, whether it may connect and whether it is trusted.
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
            let trust = admit(&stream, &config.trust, id).await;
            match handle(stream, &config, id, trust).await {
                Ok(()) => tracing::debug!(client = id, "disconnected"),
                Err(e) => {
                    tracing::warn!(client = id, error = %display_chain(&e), "connection closed")
                }
            }
        });
    }
}

/// Decide about the peer of `stream` (the user and group lookups run off the async threads).
async fn admit(stream: &UnixStream, trust: &TrustConfig, id: u64) -> Result<Trust, Refusal> {
    let unknown = || Refusal {
        user: "<unknown>".to_owned(),
    };
    let cred = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(client = id, error = %e, "cannot read the peer's credentials");
            return Err(unknown());
        }
    };
    let (uid, gid, pid) = (cred.uid(), cred.gid(), cred.pid());
    let trust = trust.clone();
    let decided = tokio::task::spawn_blocking(move || {
        let peer = Peer::lookup(uid, gid, pid);
        let decision = trust.decide(&peer, &SystemGroups);
        (peer, decision)
    })
    .await;
    let Ok((peer, decision)) = decided else {
        tracing::warn!(client = id, uid, "looking up the peer's user failed");
        return Err(unknown());
    };
    let pid = peer
        .pid
        .map_or_else(|| "<unknown>".to_owned(), |p| p.to_string());
    match &decision {
        Ok(t) => tracing::info!(
            client = id,
            %pid,
            user = %peer.user,
            trusted = (*t == Trust::Trusted),
            "accepted connection"
        ),
        Err(e) => tracing::warn!(client = id, %pid, error = %e, "refused connection"),
    }
    decision
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
    /// The client's last `SetOptions` (as passed upstream).
    settings: ClientSettings,
    /// How much the client is trusted.
    trust: Trust,
}

/// The Nix version string announced to a client that is refused before an upstream exists.
const OWN_VERSION: &str = concat!("nixspace ", env!("CARGO_PKG_VERSION"));

async fn handle(
    stream: UnixStream,
    config: &Config,
    id: u64,
    trust: Result<Trust, Refusal>,
) -> Result<(), ConnError> {
    let std_stream = stream.into_std()?;
    let watch = UnixStream::from_std(std_stream.try_clone()?)?;
    let stream = UnixStream::from_std(std_stream)?;
    let (r, w) = stream.into_split();
    let ours = nixspace_nix_protocol::version::MAX_SUPPORTED;
    let mut cr = NixReader::new(r, ours).with_store_dir(config.store_dir.clone());
    let mut cw = NixWriter::new(w, ours).with_store_dir(config.store_dir.clone());
    let trust = match trust {
        Ok(t) => t,
        Err(refusal) => {
            // Like nix-daemon, but the client learns why: the handshake ends in an error.
            let hello = ServerHello {
                version: ours,
                nix_version: OWN_VERSION.to_owned(),
                trusted: Some(TrustedFlag::NotTrusted),
                features: BTreeSet::new(),
            };
            server_greeting(&mut cr, &mut cw, &hello).await?;
            send_error(&mut cw, &DaemonError::new(refusal.to_string())).await?;
            return Ok(());
        }
    };
    let mut up = Upstream::connect(&config.upstream, ours, &config.store_dir).await?;
    let hello = ServerHello {
        version: up.info.version,
        nix_version: up
            .info
            .daemon_nix_version
            .clone()
            .unwrap_or_else(|| OWN_VERSION.to_owned()),
        // Like nix-daemon: trusted only if the upstream trusts us too.
        trusted: match trust {
            Trust::Trusted => up.info.trusted,
            Trust::Untrusted => Some(TrustedFlag::NotTrusted),
        },
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
        trust,
    };
    conn.op_loop().await
}

fn not_supported(what: &str) -> DaemonError {
    DaemonError::new(format!(
        "operation {what} is not supported by nixspace translator"
    ))
}

/// Why `nix-daemon` refuses `req` from an untrusted client, if it does.
fn refused_when_untrusted(req: &Request) -> Option<&'static str> {
    match req {
        Request::VerifyStore { repair: true, .. } => Some("you are not privileged to repair paths"),
        Request::AddPermRoot { .. } => Some("you are not privileged to create perm roots"),
        Request::AddBuildLog(_) => Some("you are not privileged to add logs"),
        _ => None,
    }
}

/// `req` as an untrusted client may send it upstream: signature checks are never skipped and
/// no path is claimed as built locally (`ultimate`).
fn restricted(req: Request) -> Request {
    match req {
        Request::AddToStoreNar {
            mut info, repair, ..
        } => {
            info.info.ultimate = false;
            Request::AddToStoreNar {
                info,
                repair,
                dont_check_sigs: false,
            }
        }
        Request::AddMultipleToStore { repair, .. } => Request::AddMultipleToStore {
            repair,
            dont_check_sigs: false,
        },
        other => other,
    }
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
                    // The stored derivation is built, never the client's inline copy, so an
                    // untrusted client can build nothing it could not build with BuildPaths.
                    self.build_derivation(drv_path, mode).await?
                }
                Request::SetOptions(settings) => self.set_options(settings).await?,
                Request::EnsurePath(path) => self.ensure_path(path).await?,
                req @ (Request::IsValidPath(_) | Request::QueryPathInfo(_)) => {
                    self.answer_from_db(req).await?
                }
                other if self.trust == Trust::Untrusted => match refused_when_untrusted(&other) {
                    Some(why) => self.refuse(&other, why).await?,
                    None => self.proxy(restricted(other)).await?,
                },
                other => self.proxy(other).await?,
            }
        }
    }

    /// Answer `req` with an error, first consuming whatever data follows it.
    async fn refuse(&mut self, req: &Request, why: &str) -> Result<(), ConnError> {
        tracing::info!(client = self.id, op = ?req.opcode(), why, "refused an operation");
        match relay::upload_of(req, self.cr.version()) {
            Some(Upload::Framed) => {
                FramedSource::new(&mut self.cr).drain().await?;
            }
            Some(Upload::Nar) => {
                copy_nar(&mut self.cr, &mut tokio::io::sink()).await?;
            }
            // Nothing is pulled from a client that is refused at once.
            Some(Upload::Pulled) | None => {}
        }
        send_error(&mut self.cw, &DaemonError::new(why)).await?;
        Ok(())
    }

    /// `SetOptions`: an untrusted client's restricted settings are withheld from the
    /// upstream, with a warning each, as `nix-daemon` does.
    async fn set_options(&mut self, mut settings: ClientSettings) -> Result<(), ConnError> {
        tracing::debug!(client = self.id, ?settings, "client settings");
        if self.trust == Trust::Untrusted {
            let (kept, warnings) = self.config.trust.filter_overrides(&settings.overrides);
            for w in warnings {
                tracing::debug!(client = self.id, "{w}");
                self.log(format!("warning: {w}\n")).await?;
            }
            settings.overrides = kept;
        }
        self.settings = settings.clone();
        self.proxy(Request::SetOptions(settings)).await
    }

    /// `EnsurePath`: a missing output of a derivation in the store is built on the dataspace
    /// (like `BuildPaths`); anything else (valid, or only substitutable) is the upstream's.
    async fn ensure_path(&mut self, path: StorePath) -> Result<(), ConnError> {
        let valid = match self
            .call(&Request::IsValidPath(path.clone()), false)
            .await?
        {
            Ok(()) => self.up.reader.read_bool("IsValidPath reply").await?,
            Err(e) => return Ok(send_error(&mut self.cw, &e).await?),
        };
        let derivers = if valid {
            BTreeSet::new()
        } else {
            match self
                .call(&Request::QueryValidDerivers(path.clone()), false)
                .await?
            {
                Ok(()) => self.up.reader.read_store_path_set("derivers").await?,
                Err(e) => return Ok(send_error(&mut self.cw, &e).await?),
            }
        };
        let Some(drv) = derivers.first() else {
            return self.proxy(Request::EnsurePath(path)).await;
        };
        let drv = self.config.store_dir.print(drv);
        tracing::info!(client = self.id, path = %path, %drv, "EnsurePath builds a derivation output");
        let failure = match self.build_on_dataspace(std::slice::from_ref(&drv)).await? {
            Ok(report) => report.error_message().map(DaemonError::new),
            Err(e) => Some(e),
        };
        if let Some(e) = failure {
            return Ok(send_error(&mut self.cw, &e).await?);
        }
        StderrFrame::Last.write_to(&mut self.cw).await?;
        self.cw.write_u64(1, "EnsurePath reply").await?;
        self.cw.flush().await?;
        Ok(())
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
        let pull = if pull {
            Some((&mut self.cr, &mut self.up.writer))
        } else {
            None
        };
        relay_logs(&mut self.up.reader, &mut self.cw, pull).await
    }

    /// Answer `IsValidPath` or `QueryPathInfo` from the store database if there is one (and the
    /// answer is one the negotiated version can carry), else relay it.
    async fn answer_from_db(&mut self, req: Request) -> Result<(), ConnError> {
        let Some(db) = self.config.store_db.clone() else {
            return self.proxy(req).await;
        };
        let answer = match &req {
            Request::IsValidPath(p) => db.is_valid(p).map(DbAnswer::Valid),
            Request::QueryPathInfo(p)
                if self.cw.version()
                    >= nixspace_nix_protocol::version::QUERY_PATH_INFO_VALID_FLAG =>
            {
                db.path_info(p).map(|i| DbAnswer::Info(i.map(Box::new)))
            }
            _ => return self.proxy(req).await,
        };
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(client = self.id, error = %e, "relaying a query instead");
                return self.proxy(req).await;
            }
        };
        StderrFrame::Last.write_to(&mut self.cw).await?;
        match answer {
            DbAnswer::Valid(valid) => self.cw.write_bool(valid, "IsValidPath reply").await?,
            DbAnswer::Info(None) => self.cw.write_bool(false, "QueryPathInfo reply").await?,
            DbAnswer::Info(Some(info)) => {
                self.cw.write_bool(true, "QueryPathInfo reply").await?;
                info.write_to(&mut self.cw).await?;
            }
        }
        self.cw.flush().await?;
        Ok(())
    }

    /// Proxy a store operation: request, any data that follows it, log frames, reply.
    async fn proxy(&mut self, req: Request) -> Result<(), ConnError> {
        let Some(reply) = relay::reply_of(&req) else {
            let op = req.opcode();
            send_error(
                &mut self.cw,
                &not_supported(&format!("{op:?} ({})", op as u64)),
            )
            .await?;
            return Ok(());
        };
        let outcome = match relay::upload_of(&req, self.cr.version()) {
            None => self.call(&req, false).await?,
            Some(Upload::Pulled) => self.call(&req, true).await?,
            Some(kind) => {
                req.write(&mut self.up.writer).await?;
                self.up.writer.flush().await?;
                // The daemon may log while it reads: relay both directions at once.
                let (cr, uw) = (&mut self.cr, &mut self.up.writer);
                let copy = async move {
                    if kind == Upload::Nar {
                        relay_nar(cr, uw).await.map(|_| ())?;
                    } else {
                        let mut source = FramedSource::new(cr);
                        framed::write_framed(uw, &mut source).await?;
                    }
                    Ok::<(), ConnError>(())
                };
                let logs = relay_logs(
                    &mut self.up.reader,
                    &mut self.cw,
                    None::<(&mut ClientReader, &mut ClientWriter)>,
                );
                let (copied, outcome) = tokio::join!(copy, logs);
                copied?;
                outcome?
            }
        };
        if let Err(e) = outcome {
            send_error(&mut self.cw, &e).await?;
            return Ok(());
        }
        StderrFrame::Last.write_to(&mut self.cw).await?;
        let censor = self.trust == Trust::Untrusted;
        copy_reply(reply, &mut self.up.reader, &mut self.cw, censor).await?;
        self.cw.flush().await?;
        Ok(())
    }
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
    /// Output paths by name of the roots whose outputs became known by building them.
    realised: BTreeMap<String, BTreeMap<String, String>>,
    /// The last [`LOG_TAIL`] log lines of each step's latest attempt.
    tails: BTreeMap<String, VecDeque<String>>,
    start: u64,
    stop: u64,
}

/// How many log lines of a failed step the error repeats (Nix's default `log-lines`).
const LOG_TAIL: usize = 10;

/// How a failed step is described to the client: in Nix's own words when the worker relays
/// them (so the client shows the error line it would show with nix-daemon, and the log's
/// tail), else which worker failed and why.
fn describe(drv: &str, worker: &str, reason: &str, tail: Option<&VecDeque<String>>) -> String {
    if reason.starts_with(&format!("builder for '{drv}'")) {
        let mut msg = reason.trim_end_matches(';').to_owned();
        if let Some(tail) = tail.filter(|t| !t.is_empty()) {
            msg.push_str(&format!(";\nlast {} log lines:", tail.len()));
            for line in tail {
                msg.push_str(&format!("\n> {line}"));
            }
        }
        msg
    } else if worker.is_empty() {
        format!("build of '{drv}' failed: {reason}")
    } else {
        format!("build of '{drv}' failed on worker {worker}: {reason}")
    }
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
        let mut msg = describe(drv, worker, reason, self.tails.get(*drv));
        if failures.len() > 1 {
            let sep = if msg.contains('\n') { '\n' } else { ' ' };
            msg.push_str(&format!(
                "{sep}({} more step(s) failed)",
                failures.len() - 1
            ));
        }
        Some(msg)
    }

    /// Remember a log line of `drv`'s build.
    fn log_line(&mut self, drv: &str, line: &str) {
        let tail = self.tails.entry(drv.to_owned()).or_default();
        if tail.len() == LOG_TAIL {
            tail.pop_front();
        }
        tail.push_back(line.to_owned());
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
                r.error_msg = describe(drv, worker, reason, self.tails.get(drv));
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
    realised: BTreeMap<String, String>,
) -> BTreeMap<String, nixspace_nix_protocol::Realisation> {
    let (dir, path) = (store_dir.clone(), drv.clone());
    match tokio::task::spawn_blocking(move || {
        crate::realisation::built_outputs(&dir, &path, &realised)
    })
    .await
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
                            let printed = store_dir.print(drv_path);
                            let realised =
                                report.realised.get(&printed).cloned().unwrap_or_default();
                            res.built_outputs = built_outputs(&store_dir, drv_path, realised).await;
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
        let db = self.config.store_db.as_deref();
        let plan = match steps::plan(roots, &self.config.transfers, db).await {
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
        let store = StoreNode::new(requester.clone(), self.config.transfers.clone());
        let resolver = match Resolver::new(
            &plan,
            self.config.store_dir.clone(),
            self.config.transfers.clone(),
            &requester,
            self.config.priority,
        )
        .await
        {
            Ok(r) => r,
            Err(e) => return Ok(Err(DaemonError::new(format!("nixspace translator: {e}")))),
        };
        let mut build = match DataspaceBuild::start(
            &self.config.route,
            &steps,
            &requester,
            self.config.priority,
            &store,
            &resolver,
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
        // The outputs of the roots, to be valid upstream before the client hears of them.
        let mut root_outputs = Vec::new();
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
                            report.log_line(&drv, &line);
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
                            // A new attempt: its log is the one that counts.
                            report.tails.remove(&drv);
                            self.start_activity(&mut activities, &drv, &worker).await?;
                        }
                        StepEvent::Built { drv, outputs } if wanted.contains(&drv) => {
                            self.stop_activity(&mut activities, &drv).await?;
                            if roots.contains(&drv) && !report.outcomes.contains_key(&drv) {
                                root_outputs.extend(outputs);
                            }
                            report.outcomes.entry(drv).or_insert(Outcome::Built);
                        }
                        StepEvent::Failed { drv, worker, reason, .. } if wanted.contains(&drv) => {
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
                    // A client killed with output unread resets the connection instead of
                    // closing it: it left all the same.
                    let read = match self.watch.try_read(&mut probe) {
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(0),
                        read => read,
                    };
                    match read {
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
        if report.failures().is_empty() {
            if let Err(e) = store.ensure(&root_outputs).await {
                build.stop();
                return Ok(Err(DaemonError::new(format!(
                    "nixspace translator: cannot copy the outputs into the store: {e}"
                ))));
            }
            if let Err(e) = resolver.register_realisations().await {
                build.stop();
                return Ok(Err(DaemonError::new(format!(
                    "nixspace translator: cannot register the realisations: {e}"
                ))));
            }
            for root in roots {
                let realised = resolver.realised(root);
                if !realised.is_empty() {
                    report.realised.insert(root.clone(), realised);
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
    fn nix_builder_failures_keep_nix_words_and_the_log_tail() {
        let drv = "/nix/store/b-base.drv";
        let mut report = Report::default();
        report.outcomes.insert(
            drv.into(),
            Outcome::Failed {
                worker: "w1".into(),
                reason: format!("builder for '{drv}' failed with exit code 3;"),
            },
        );
        for i in 0..12 {
            report.log_line(drv, &format!("line {i}"));
        }
        let msg = report.error_message().unwrap();
        let mut lines = msg.lines();
        assert_eq!(
            lines.next(),
            Some("builder for '/nix/store/b-base.drv' failed with exit code 3;")
        );
        assert_eq!(lines.next(), Some("last 10 log lines:"));
        assert_eq!(lines.next(), Some("> line 2"));
        assert_eq!(lines.last(), Some("> line 11"));
        assert_eq!(report.result_for(drv).error_msg, msg);
    }

    #[test]
    fn untrusted_clients_never_skip_signature_checks() {
        assert_eq!(
            restricted(Request::AddMultipleToStore {
                repair: true,
                dont_check_sigs: true,
            }),
            Request::AddMultipleToStore {
                repair: true,
                dont_check_sigs: false,
            }
        );
        let path = StorePath::from_base_name("7rjj86a15146cq4nsd2q3v4n7ks1hkgn-a").unwrap();
        let info = nixspace_nix_protocol::ValidPathInfo {
            path: path.clone(),
            info: nixspace_nix_protocol::PathInfo {
                deriver: None,
                nar_hash: nixspace_nix_formats::hash::Hash::digest(
                    nixspace_nix_formats::hash::HashAlgo::Sha256,
                    b"nar",
                ),
                references: BTreeSet::new(),
                registration_time: 0,
                nar_size: 3,
                ultimate: true,
                sigs: BTreeSet::new(),
                ca: None,
            },
        };
        let Request::AddToStoreNar {
            info,
            dont_check_sigs,
            ..
        } = restricted(Request::AddToStoreNar {
            info,
            repair: false,
            dont_check_sigs: true,
        })
        else {
            panic!("not an AddToStoreNar");
        };
        assert!(!dont_check_sigs);
        assert!(!info.info.ultimate);
        assert_eq!(
            refused_when_untrusted(&Request::AddBuildLog(path.clone())),
            Some("you are not privileged to add logs")
        );
        assert_eq!(
            refused_when_untrusted(&Request::VerifyStore {
                check_contents: true,
                repair: false,
            }),
            None
        );
        assert_eq!(refused_when_untrusted(&Request::IsValidPath(path)), None);
    }

    #[test]
    fn unsupported_operations_are_named() {
        assert_eq!(
            not_supported("CollectGarbage (20)").message,
            "operation CollectGarbage (20) is not supported by nixspace translator"
        );
    }
}
