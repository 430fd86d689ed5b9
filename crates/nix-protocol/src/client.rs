//! [`DaemonClient`]: a worker-protocol client over any `AsyncRead`/`AsyncWrite` pair — a
//! unix socket ([`DaemonClient::connect`]) or a child's stdio ([`DaemonClient::from_child`],
//! for `nix-daemon --stdio`).
//!
//! Errors are classified: [`ClientError::Daemon`] (the daemon refused the operation with
//! `STDERR_ERROR`) and requests that cannot be encoded at the negotiated version leave the
//! connection usable; every other error may have left the stream out of step, so the client
//! poisons itself and refuses further operations with [`ClientError::Poisoned`].
//!
//! The client's store directory (default `/nix/store`, see [`ClientConfig`]) is fixed at
//! construction: store paths in requests are printed with it and store paths in replies must be
//! inside it.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};

use nixspace_nix_formats::derivation::BasicDerivation;
use nixspace_nix_formats::store_path::{StoreDir, StorePath};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::build_mode::BuildMode;
use crate::build_result::BuildResult;
use crate::client_settings::ClientSettings;
use crate::derived_path::DerivedPath;
use crate::framed::{self, FramedError};
use crate::handshake::{self, HandshakeError, HandshakeInfo};
use crate::nar_copy::{self, NarCopyError};
use crate::ops::Request;
use crate::path_info::{PathInfo, ValidPathInfo};
use crate::realisation::Realisation;
use crate::stderr::{DaemonError, DiscardLogs, LogSink, StderrFrame};
use crate::version::{
    ProtocolVersion, ADD_TO_STORE_NAR_FRAMED, MAX_SUPPORTED, QUERY_PATH_INFO_VALID_FLAG,
    REGISTER_DRV_OUTPUT_JSON,
};
use crate::wire::{NixDeserialize, NixReader, NixWriter, WireError};

/// How long an upload may take to send its last frame once the daemon has answered.
const UPLOAD_SETTLE: std::time::Duration = std::time::Duration::from_millis(200);

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting to the socket failed.
    #[error("cannot connect to the Nix daemon at {path}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The child process was not started with piped stdin and stdout.
    #[error("the child's stdin and stdout must be piped")]
    ChildStdio,
    /// The handshake failed.
    #[error("handshake with the Nix daemon failed")]
    Handshake(#[from] HandshakeError),
    /// The daemon reported an error for this operation; the connection remains usable.
    #[error("the Nix daemon reported an error: {0}")]
    Daemon(#[from] DaemonError),
    /// A request could not be encoded at the negotiated version; nothing was sent.
    #[error("request cannot be sent at the negotiated protocol version")]
    Unencodable(#[source] WireError),
    /// Reading, writing or decoding the connection failed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// Reading the caller's data source failed.
    #[error("reading the data to send for {what} failed")]
    Source {
        /// The operation.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The daemon asked for more data than the caller's source held.
    #[error("the daemon wanted more data than the source held")]
    SourceExhausted,
    /// Writing to the caller's sink failed.
    #[error("writing the received data for {what} failed")]
    Sink {
        /// The operation.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The NAR the daemon sent is not a NAR.
    #[error("the daemon sent a malformed NAR: {0}")]
    MalformedNar(&'static str),
    /// An earlier error left the connection unusable.
    #[error("the connection is unusable after an earlier protocol error")]
    Poisoned,
}

impl ClientError {
    /// Whether the connection is still in step after this error.
    pub fn is_recoverable(&self) -> bool {
        matches!(self, ClientError::Daemon(_) | ClientError::Unencodable(_))
    }
}

impl From<NarCopyError> for ClientError {
    fn from(e: NarCopyError) -> Self {
        match e {
            NarCopyError::Wire(w) => ClientError::Wire(w),
            NarCopyError::Sink(source) => ClientError::Sink {
                what: "NarFromPath",
                source,
            },
            NarCopyError::Malformed(m) => ClientError::MalformedNar(m),
        }
    }
}

/// How a [`DaemonClient`] connects: what it offers in the handshake, and the daemon's store
/// directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// The newest version to offer (default [`MAX_SUPPORTED`]).
    pub version: ProtocolVersion,
    /// The features to offer (default none).
    pub features: BTreeSet<String>,
    /// The daemon's store directory (default `/nix/store`): store paths are printed into it
    /// and parsed from it.
    pub store_dir: StoreDir,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            version: MAX_SUPPORTED,
            features: BTreeSet::new(),
            store_dir: StoreDir::default(),
        }
    }
}

/// A connection to a Nix daemon.
pub struct DaemonClient<R, W: AsyncWrite> {
    reader: NixReader<R>,
    writer: NixWriter<W>,
    info: HandshakeInfo,
    logs: Box<dyn LogSink + Send>,
    poisoned: bool,
}

impl<R, W: AsyncWrite> std::fmt::Debug for DaemonClient<R, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonClient")
            .field("info", &self.info)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

impl DaemonClient<OwnedReadHalf, OwnedWriteHalf> {
    /// Connects to a daemon socket and runs the handshake with the default [`ClientConfig`].
    pub async fn connect(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        Self::connect_with(path, &ClientConfig::default()).await
    }

    /// Connects to a daemon socket and runs the handshake with `config`.
    pub async fn connect_with(
        path: impl AsRef<Path>,
        config: &ClientConfig,
    ) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.to_owned(),
                source,
            })?;
        let (r, w) = stream.into_split();
        Self::handshake_with_config(r, w, config).await
    }
}

impl DaemonClient<ChildStdout, ChildStdin> {
    /// Takes the piped stdin/stdout of a `nix-daemon --stdio` child and runs the handshake
    /// with the default [`ClientConfig`].
    pub async fn from_child(child: &mut Child) -> Result<Self, ClientError> {
        Self::from_child_with(child, &ClientConfig::default()).await
    }

    /// Takes the piped stdin/stdout of a `nix-daemon --stdio` child and runs the handshake
    /// with `config`.
    pub async fn from_child_with(
        child: &mut Child,
        config: &ClientConfig,
    ) -> Result<Self, ClientError> {
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(ClientError::ChildStdio);
        };
        Self::handshake_with_config(stdout, stdin, config).await
    }
}

impl<R, W> DaemonClient<R, W>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    /// Runs the handshake with the default [`ClientConfig`]: offering [`MAX_SUPPORTED`] and
    /// no features, for the store `/nix/store`.
    pub async fn handshake(read: R, write: W) -> Result<Self, ClientError> {
        Self::handshake_with_config(read, write, &ClientConfig::default()).await
    }

    /// Runs the handshake offering `version` and `features`, for the store `/nix/store`.
    pub async fn handshake_with(
        read: R,
        write: W,
        version: ProtocolVersion,
        features: &BTreeSet<String>,
    ) -> Result<Self, ClientError> {
        let config = ClientConfig {
            version,
            features: features.clone(),
            ..ClientConfig::default()
        };
        Self::handshake_with_config(read, write, &config).await
    }

    /// Runs the handshake as `config` says.
    pub async fn handshake_with_config(
        read: R,
        write: W,
        config: &ClientConfig,
    ) -> Result<Self, ClientError> {
        let version = config.version;
        let mut reader = NixReader::new(read, version).with_store_dir(config.store_dir.clone());
        let mut writer = NixWriter::new(write, version).with_store_dir(config.store_dir.clone());
        let mut logs: Box<dyn LogSink + Send> = Box::new(DiscardLogs);
        let info = handshake::client_handshake(
            &mut reader,
            &mut writer,
            version,
            &config.features,
            &mut *logs,
        )
        .await?;
        Ok(Self {
            reader,
            writer,
            info,
            logs,
            poisoned: false,
        })
    }

    /// What the handshake established.
    pub fn info(&self) -> &HandshakeInfo {
        &self.info
    }

    /// The negotiated version.
    pub fn version(&self) -> ProtocolVersion {
        self.info.version
    }

    /// The daemon's store directory, as configured at construction.
    pub fn store_dir(&self) -> &StoreDir {
        self.writer.store_dir()
    }

    /// Sets where log frames of operations without their own log callback go (default:
    /// discarded).
    pub fn set_log_sink(&mut self, logs: Box<dyn LogSink + Send>) {
        self.logs = logs;
    }

    fn track<T>(&mut self, res: Result<T, ClientError>) -> Result<T, ClientError> {
        if let Err(e) = &res {
            if !e.is_recoverable() {
                self.poisoned = true;
            }
        }
        res
    }

    /// Encodes `req` completely before sending anything, so that an unencodable request
    /// leaves the connection untouched.
    async fn send(&mut self, req: &Request) -> Result<(), ClientError> {
        if self.poisoned {
            return Err(ClientError::Poisoned);
        }
        let mut scratch = NixWriter::new(Vec::new(), self.writer.version())
            .with_store_dir(self.writer.store_dir().clone());
        req.write(&mut scratch)
            .await
            .map_err(ClientError::Unencodable)?;
        scratch.flush().await.map_err(ClientError::Unencodable)?;
        let bytes = scratch.into_inner();
        self.writer.write_raw(&bytes, "request").await?;
        self.writer.flush().await?;
        Ok(())
    }

    /// Reads stderr frames until `LAST`, answering `READ` from `source` if given.
    async fn process_stderr<L>(
        reader: &mut NixReader<R>,
        writer: &mut NixWriter<W>,
        logs: &mut L,
        mut source: Option<&mut (dyn AsyncRead + Unpin + Send)>,
    ) -> Result<(), ClientError>
    where
        L: LogSink + ?Sized + Send,
    {
        loop {
            match StderrFrame::read_from(reader).await? {
                StderrFrame::Log(event) => logs.log(event),
                StderrFrame::Last => return Ok(()),
                StderrFrame::Error(e) => return Err(ClientError::Daemon(e)),
                StderrFrame::Read(len) => {
                    let Some(src) = source.as_deref_mut() else {
                        return Err(WireError::UnexpectedStderrFrame { tag: "STDERR_READ" }.into());
                    };
                    let want = len.min(reader.limits().max_bytes).min(1 << 20) as usize;
                    let mut buf = vec![0u8; want];
                    let n = src
                        .read(&mut buf)
                        .await
                        .map_err(|source| ClientError::Source {
                            what: "AddToStoreNar",
                            source,
                        })?;
                    if n == 0 && want > 0 {
                        return Err(ClientError::SourceExhausted);
                    }
                    writer.write_bytes(&buf[..n], "read reply").await?;
                    writer.flush().await?;
                }
                StderrFrame::Write(_) => {
                    return Err(WireError::UnexpectedStderrFrame {
                        tag: "STDERR_WRITE",
                    }
                    .into())
                }
            }
        }
    }

    /// Sends `req` and processes stderr with the client's own log sink.
    async fn simple(&mut self, req: &Request) -> Result<(), ClientError> {
        self.send(req).await?;
        Self::process_stderr(&mut self.reader, &mut self.writer, &mut *self.logs, None).await
    }

    /// `SetOptions`.
    pub async fn set_options(&mut self, settings: &ClientSettings) -> Result<(), ClientError> {
        let res = self.simple(&Request::SetOptions(settings.clone())).await;
        self.track(res)
    }

    /// `AddTextToStore`: adds a text file (e.g. a `.drv`) named `suffix` with `references`;
    /// returns its store path.
    pub async fn add_text_to_store(
        &mut self,
        suffix: &str,
        text: &[u8],
        references: &BTreeSet<StorePath>,
    ) -> Result<StorePath, ClientError> {
        let res = async {
            self.simple(&Request::AddTextToStore {
                suffix: suffix.to_owned(),
                text: text.to_vec(),
                references: references.clone(),
            })
            .await?;
            Ok(self.reader.read_store_path("AddTextToStore reply").await?)
        }
        .await;
        self.track(res)
    }

    /// `RegisterDrvOutput`: records that the output `realisation.id` of a derivation was
    /// realised as `realisation.out_path` (which must be valid in the store).
    pub async fn register_drv_output(
        &mut self,
        realisation: &Realisation,
    ) -> Result<(), ClientError> {
        if self.poisoned {
            return Err(ClientError::Poisoned);
        }
        let res = self
            .simple(&Request::RegisterDrvOutput(realisation.clone()))
            .await;
        self.track(res)
    }

    /// `AddTempRoot`: keeps `path` from the garbage collector while this connection lasts.
    pub async fn add_temp_root(&mut self, path: &StorePath) -> Result<(), ClientError> {
        let res = async {
            self.simple(&Request::AddTempRoot(path.clone())).await?;
            self.reader.read_u64("AddTempRoot reply").await?;
            Ok(())
        }
        .await;
        self.track(res)
    }

    /// `AddSignatures`: adds `sigs` (`name:base64`) to the valid path `path`.
    pub async fn add_signatures(
        &mut self,
        path: &StorePath,
        sigs: &[String],
    ) -> Result<(), ClientError> {
        let res = async {
            let req = Request::AddSignatures {
                path: path.clone(),
                sigs: sigs.to_vec(),
            };
            self.simple(&req).await?;
            self.reader.read_u64("AddSignatures reply").await?;
            Ok(())
        }
        .await;
        self.track(res)
    }

    /// `QueryRealisation`: the realisation of output `id` (`sha256:<hex>!<output>`), if the
    /// store has one. Before protocol 1.31 the daemon sends only the output path.
    pub async fn query_realisation(
        &mut self,
        id: &str,
    ) -> Result<Option<Realisation>, ClientError> {
        let res = async {
            self.simple(&Request::QueryRealisation(id.to_owned()))
                .await?;
            if self.reader.version() >= REGISTER_DRV_OUTPUT_JSON {
                let count = self.reader.read_u64("QueryRealisation count").await?;
                let mut found = None;
                for _ in 0..count {
                    found = Some(Realisation::read_from(&mut self.reader).await?);
                }
                return Ok(found);
            }
            let paths = self
                .reader
                .read_store_path_set("QueryRealisation reply")
                .await?;
            Ok(paths.into_iter().next().map(|p| Realisation {
                dependent_realisations: BTreeMap::new(),
                id: id.to_owned(),
                out_path: p.to_string(),
                signatures: BTreeSet::new(),
            }))
        }
        .await;
        self.track(res)
    }

    /// `AddIndirectRoot`: registers `link` (an absolute path of a symlink into the store) as
    /// an indirect garbage collector root, as `nix-build`'s out-links are.
    pub async fn add_indirect_root(&mut self, link: &str) -> Result<(), ClientError> {
        let res = async {
            self.simple(&Request::AddIndirectRoot(link.to_owned()))
                .await?;
            self.reader.read_u64("AddIndirectRoot reply").await?;
            Ok(())
        }
        .await;
        self.track(res)
    }

    /// `QuerySubstitutablePaths`: which of `paths` the store's substituters can provide.
    pub async fn query_substitutable_paths(
        &mut self,
        paths: &BTreeSet<StorePath>,
    ) -> Result<BTreeSet<StorePath>, ClientError> {
        let res = async {
            self.simple(&Request::QuerySubstitutablePaths(paths.clone()))
                .await?;
            Ok(self
                .reader
                .read_store_path_set("QuerySubstitutablePaths reply")
                .await?)
        }
        .await;
        self.track(res)
    }

    /// `QuerySubstitutablePathInfos`: which of `paths` the store's substituters can provide,
    /// each given with its content address if it has one (so a substituter with another store
    /// directory can be asked for it). Unlike `QuerySubstitutablePaths`, this asks every
    /// substituter, not only those that want mass queries (a `file://` cache does not), as
    /// Nix's own planning (`queryMissing`) does.
    pub async fn query_substitutable_path_infos(
        &mut self,
        paths: &BTreeMap<StorePath, Option<String>>,
    ) -> Result<BTreeSet<StorePath>, ClientError> {
        let res = async {
            self.simple(&Request::QuerySubstitutablePathInfos(paths.clone()))
                .await?;
            let count = self
                .reader
                .read_u64("QuerySubstitutablePathInfos count")
                .await?;
            let mut offered = BTreeSet::new();
            for _ in 0..count {
                offered.insert(self.reader.read_store_path("substitutable path").await?);
                self.reader.read_string("substitutable deriver").await?;
                self.reader
                    .read_store_path_set("substitutable references")
                    .await?;
                self.reader.read_u64("substitutable download size").await?;
                self.reader.read_u64("substitutable NAR size").await?;
            }
            Ok(offered)
        }
        .await;
        self.track(res)
    }

    /// `QueryPathFromHashPart`: the valid path (printed) whose hash part is `hash_part`, if
    /// any.
    pub async fn query_path_from_hash_part(
        &mut self,
        hash_part: &str,
    ) -> Result<Option<String>, ClientError> {
        let res = async {
            self.simple(&Request::QueryPathFromHashPart(hash_part.to_owned()))
                .await?;
            let path = self
                .reader
                .read_string("QueryPathFromHashPart reply")
                .await?;
            Ok(Some(path).filter(|p| !p.is_empty()))
        }
        .await;
        self.track(res)
    }

    /// `IsValidPath`.
    pub async fn is_valid_path(&mut self, path: &StorePath) -> Result<bool, ClientError> {
        let res = async {
            self.simple(&Request::IsValidPath(path.clone())).await?;
            Ok(self.reader.read_bool("IsValidPath reply").await?)
        }
        .await;
        self.track(res)
    }

    /// `QueryValidPaths`: which of `paths` are valid (substituting first if `substitute`).
    pub async fn query_valid_paths(
        &mut self,
        paths: &BTreeSet<StorePath>,
        substitute: bool,
    ) -> Result<BTreeSet<StorePath>, ClientError> {
        let res = async {
            self.simple(&Request::QueryValidPaths {
                paths: paths.clone(),
                substitute,
            })
            .await?;
            Ok(self
                .reader
                .read_store_path_set("QueryValidPaths reply")
                .await?)
        }
        .await;
        self.track(res)
    }

    /// `QueryPathInfo`: `None` if the path is not valid.
    pub async fn query_path_info(
        &mut self,
        path: &StorePath,
    ) -> Result<Option<PathInfo>, ClientError> {
        let res = async {
            self.simple(&Request::QueryPathInfo(path.clone())).await?;
            if self.reader.version() >= QUERY_PATH_INFO_VALID_FLAG
                && !self.reader.read_bool("QueryPathInfo valid").await?
            {
                return Ok(None);
            }
            Ok(Some(PathInfo::read_from(&mut self.reader).await?))
        }
        .await;
        self.track(res)
    }

    /// `NarFromPath`: streams the path's NAR into `out`; returns its size.
    pub async fn nar_from_path<O>(
        &mut self,
        path: &StorePath,
        out: &mut O,
    ) -> Result<u64, ClientError>
    where
        O: AsyncWrite + Unpin + Send + ?Sized,
    {
        let res = async {
            self.simple(&Request::NarFromPath(path.clone())).await?;
            Ok(nar_copy::copy_nar(&mut self.reader, out).await?)
        }
        .await;
        self.track(res)
    }

    /// `AddToStoreNar`: adds `info.path` from the NAR read from `nar` (framed from 1.23,
    /// pulled through `STDERR_READ` before). Log frames go to the client's log sink.
    pub async fn add_to_store_nar<S>(
        &mut self,
        info: &ValidPathInfo,
        nar: &mut S,
        repair: bool,
        dont_check_sigs: bool,
    ) -> Result<(), ClientError>
    where
        S: AsyncRead + Unpin + Send,
    {
        let res = async {
            self.send(&Request::AddToStoreNar {
                info: info.clone(),
                repair,
                dont_check_sigs,
            })
            .await?;
            let (reader, writer, logs) = (&mut self.reader, &mut self.writer, &mut self.logs);
            if writer.version() < ADD_TO_STORE_NAR_FRAMED {
                return Self::process_stderr(reader, writer, &mut **logs, Some(nar)).await;
            }
            self.upload_framed("AddToStoreNar", nar).await
        }
        .await;
        self.track(res)
    }

    /// `AddBuildLog` (protocol 1.32, Nix 2.4): stores `log` as the build log of the derivation
    /// `drv`, where `nix log` and `nix-store -l` read it. Nix's local store keeps a log it
    /// already has (it writes `DRV.bz2` only when that file is missing); only a trusted client
    /// may add logs.
    pub async fn add_build_log<S>(
        &mut self,
        drv: &StorePath,
        log: &mut S,
    ) -> Result<(), ClientError>
    where
        S: AsyncRead + Unpin + Send,
    {
        let res = async {
            self.send(&Request::AddBuildLog(drv.clone())).await?;
            self.upload_framed("AddBuildLog", log).await?;
            self.reader.read_u64("AddBuildLog reply").await?;
            Ok(())
        }
        .await;
        self.track(res)
    }

    /// Sends `source` as a framed stream after a request for `what`, reading the daemon's
    /// stderr frames meanwhile (it may log, or refuse, while it reads) until `STDERR_LAST`.
    async fn upload_framed<S>(
        &mut self,
        what: &'static str,
        source: &mut S,
    ) -> Result<(), ClientError>
    where
        S: AsyncRead + Unpin + Send,
    {
        let (reader, writer, logs) = (&mut self.reader, &mut self.writer, &mut self.logs);
        let write = async {
            framed::write_framed(writer, source)
                .await
                .map_err(|e| match e {
                    FramedError::Source(source) => ClientError::Source { what, source },
                    FramedError::Wire(w) => ClientError::Wire(w),
                })
        };
        let read = async {
            loop {
                match StderrFrame::read_from(reader).await? {
                    StderrFrame::Log(event) => logs.log(event),
                    StderrFrame::Last => return Ok(()),
                    StderrFrame::Error(e) => return Err(ClientError::Daemon(e)),
                    StderrFrame::Read(_) => {
                        return Err(WireError::UnexpectedStderrFrame { tag: "STDERR_READ" }.into())
                    }
                    StderrFrame::Write(_) => {
                        return Err(WireError::UnexpectedStderrFrame {
                            tag: "STDERR_WRITE",
                        }
                        .into())
                    }
                }
            }
        };
        tokio::pin!(write, read);
        tokio::select! {
            // A failed source (e.g. a NAR that did not check out) ends the upload midway:
            // the daemon would wait for the rest forever, so do not wait for its answer.
            // The stream is out of step now, and the error says so (not recoverable).
            written = &mut write => {
                written?;
                read.await
            }
            answered = &mut read => match answered {
                Ok(()) => write.await.map(|_| ()),
                // The daemon refused the upload: in step if our last frame is out, else
                // the daemon gave up midway and the stream is out of step.
                Err(e) => match tokio::time::timeout(UPLOAD_SETTLE, &mut write).await {
                    Ok(Ok(_)) => Err(e),
                    _ => Err(ClientError::Wire(WireError::io(
                        what,
                        io::Error::other(e.to_string()),
                    ))),
                },
            },
        }
    }

    /// `BuildDerivation`: builds `drv` (named by `drv_path`), passing log frames to `logs`.
    pub async fn build_derivation<L>(
        &mut self,
        drv_path: &StorePath,
        drv: &BasicDerivation,
        mode: BuildMode,
        logs: &mut L,
    ) -> Result<BuildResult, ClientError>
    where
        L: LogSink + Send + ?Sized,
    {
        let res = async {
            self.send(&Request::BuildDerivation {
                drv_path: drv_path.clone(),
                drv: drv.clone(),
                mode,
            })
            .await?;
            Self::process_stderr(&mut self.reader, &mut self.writer, logs, None).await?;
            Ok(BuildResult::read_from(&mut self.reader).await?)
        }
        .await;
        self.track(res)
    }

    /// `BuildPaths`: builds or substitutes `paths`, passing log frames to `logs`.
    pub async fn build_paths<L>(
        &mut self,
        paths: &[DerivedPath],
        mode: BuildMode,
        logs: &mut L,
    ) -> Result<(), ClientError>
    where
        L: LogSink + Send + ?Sized,
    {
        let res = async {
            self.send(&Request::BuildPaths {
                paths: paths.to_vec(),
                mode,
            })
            .await?;
            Self::process_stderr(&mut self.reader, &mut self.writer, logs, None).await?;
            self.reader.read_u64("BuildPaths reply").await?;
            Ok(())
        }
        .await;
        self.track(res)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::{server_handshake, ServerHello};
    use crate::stderr::write_last;
    use crate::version::NIX_2_8;
    use nixspace_nix_formats::store_path::StorePathError;
    use tokio::io::{DuplexStream, ReadHalf, WriteHalf};
    use tokio::task::JoinHandle;

    type Client = DaemonClient<ReadHalf<DuplexStream>, WriteHalf<DuplexStream>>;

    /// A client with `config` against a one-request server that reads store paths in
    /// `read_dir`, writes them in `write_dir`, and answers `QueryValidPaths` with the paths it
    /// was asked about (which it also returns).
    async fn against_server(
        config: ClientConfig,
        read_dir: StoreDir,
        write_dir: StoreDir,
    ) -> (Client, JoinHandle<Result<BTreeSet<StorePath>, WireError>>) {
        let (c, s) = tokio::io::duplex(4096);
        let (cr, cw) = tokio::io::split(c);
        let (sr, sw) = tokio::io::split(s);
        let server = tokio::spawn(async move {
            let mut r = NixReader::new(sr, NIX_2_8).with_store_dir(read_dir);
            let mut w = NixWriter::new(sw, NIX_2_8).with_store_dir(write_dir);
            let hello = ServerHello {
                version: NIX_2_8,
                nix_version: "2.8.0".into(),
                trusted: None,
                features: BTreeSet::new(),
            };
            server_handshake(&mut r, &mut w, &hello).await.unwrap();
            let Some(Request::QueryValidPaths { paths, .. }) = Request::read(&mut r).await? else {
                panic!("expected QueryValidPaths");
            };
            write_last(&mut w).await?;
            w.write_store_paths(&paths, "reply").await?;
            w.flush().await?;
            Ok(paths)
        });
        let client = DaemonClient::handshake_with_config(cr, cw, &config)
            .await
            .unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn the_store_dir_is_fixed_at_construction() {
        let p = StorePath::from_base_name("7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x").unwrap();
        let paths = BTreeSet::from([p]);
        let tmp = StoreDir::new("/tmp/s/store").unwrap();
        let config = ClientConfig {
            store_dir: tmp.clone(),
            ..ClientConfig::default()
        };

        // Requests are printed, and replies parsed, in the configured store.
        let (mut client, server) = against_server(config, tmp.clone(), tmp.clone()).await;
        assert_eq!(client.store_dir(), &tmp);
        assert_eq!(
            client.query_valid_paths(&paths, false).await.unwrap(),
            paths
        );
        assert_eq!(server.await.unwrap().unwrap(), paths);

        // A default client prints /nix/store paths, which a server in another store refuses.
        let (mut client, server) =
            against_server(ClientConfig::default(), tmp.clone(), tmp.clone()).await;
        assert_eq!(client.store_dir(), &StoreDir::default());
        assert!(client.query_valid_paths(&paths, false).await.is_err());
        assert!(matches!(
            server.await.unwrap(),
            Err(WireError::StorePath {
                what: "paths",
                source: StorePathError::NotInStore { .. }
            })
        ));

        // ... and refuses replies naming paths outside its store.
        let (mut client, server) =
            against_server(ClientConfig::default(), StoreDir::default(), tmp).await;
        let err = client.query_valid_paths(&paths, false).await.unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Wire(WireError::StorePath {
                    what: "QueryValidPaths reply",
                    source: StorePathError::NotInStore { .. }
                })
            ),
            "{err:?}"
        );
        assert_eq!(server.await.unwrap().unwrap(), paths);
    }

    /// A server at `version` that takes one `AddBuildLog` and returns the path and the log.
    async fn build_log_server(
        version: ProtocolVersion,
    ) -> (Client, JoinHandle<Result<(StorePath, Vec<u8>), WireError>>) {
        let (c, s) = tokio::io::duplex(4096);
        let (cr, cw) = tokio::io::split(c);
        let (sr, sw) = tokio::io::split(s);
        let server = tokio::spawn(async move {
            let mut r = NixReader::new(sr, version);
            let mut w = NixWriter::new(sw, version);
            let hello = ServerHello {
                version,
                nix_version: "2.8.0".into(),
                trusted: None,
                features: BTreeSet::new(),
            };
            server_handshake(&mut r, &mut w, &hello).await.unwrap();
            let Some(Request::AddBuildLog(path)) = Request::read(&mut r).await? else {
                panic!("expected AddBuildLog");
            };
            let mut log = Vec::new();
            tokio::io::copy(&mut framed::FramedSource::new(&mut r), &mut log)
                .await
                .unwrap();
            write_last(&mut w).await?;
            w.write_u64(1, "reply").await?;
            w.flush().await?;
            Ok((path, log))
        });
        let config = ClientConfig {
            version,
            ..ClientConfig::default()
        };
        let client = DaemonClient::handshake_with_config(cr, cw, &config)
            .await
            .unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn a_build_log_goes_to_the_daemon_as_a_framed_stream() {
        let drv = StorePath::from_base_name("7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x.drv").unwrap();
        // More than one frame, and not a whole number of them.
        let log: Vec<u8> = (0..3 * framed::CHUNK_SIZE + 17)
            .map(|i| b"line\n"[i % 5])
            .collect();
        let (mut client, server) = build_log_server(NIX_2_8).await;
        client
            .add_build_log(&drv, &mut log.as_slice())
            .await
            .unwrap();
        assert_eq!(server.await.unwrap().unwrap(), (drv.clone(), log.clone()));

        // Before 1.32 the operation does not exist: nothing is sent, the client stays usable.
        let (mut client, server) = build_log_server(ProtocolVersion::new(1, 31)).await;
        let err = client
            .add_build_log(&drv, &mut log.as_slice())
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Unencodable(_)), "{err:?}");
        assert!(err.is_recoverable());
        server.abort();
    }
}
