//! The serve protocol's server: one `nix-store --serve [--write]` session on stdin and stdout
//! (what Nix's legacy `ssh://` store and Hydra's queue runner run on the remote side), over
//! the same backend as the worker protocol.
//!
//! The session is a client of a worker-protocol connection served in this process
//! ([`crate::server::serve_in_process`]: the translator's backend, trusted as a client on
//! stdin and stdout is), so builds (`BuildPaths`, `BuildDerivation`) go to the dataspace and
//! the rest to the store exactly as for `nix-daemon --stdio`. Each serve command becomes one
//! or a few worker operations; build logs go to stderr, where the legacy ssh store reads
//! them. As `nix-store --serve` does, the session refuses the commands that add to the store
//! or build unless `--write` was given, and ends at the first error (which says why, on
//! stderr, with exit status 1); a client that leaves during a build interrupts it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::pin::Pin;
use std::task::{Context, Poll};

use nixspace_nix_formats::derivation::Derivation;
use nixspace_nix_formats::hash::{Hash, HashAlgo, Hasher};
use nixspace_nix_formats::store_path::{StoreDir, StorePath};
use nixspace_nix_protocol::nar_copy::{copy_nar, NarCopyError};
use nixspace_nix_protocol::serve::{
    nar_body, raw_output, read_export_next, server_handshake, write_build_result, write_export_end,
    write_export_next, write_path_info, write_path_infos_end, BuildPathsReply, BuildSettings,
    ExportTrailer, ServeCommand, ServeError, ServeRequest, ServeVersion,
};
use nixspace_nix_protocol::stderr::{activity_type, result_type, Field};
use nixspace_nix_protocol::{
    BuildMode, BuildResult, BuildStatus, ClientConfig, ClientError, ClientSettings, DaemonClient,
    DaemonError, LogEvent, LogSink, NixReader, NixWriter, PathInfo, ValidPathInfo, WireError,
};
use tokio::io::{AsyncSeekExt, AsyncWrite};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use crate::client::{ClientStreams, ConnError, InputWatch};
use crate::server::Config;
use crate::{BoxRead, BoxWrite};

/// Nix's exit status for a failed build (`0x60` with the "build failure" bit), sent when a
/// `BuildPaths` failure has no status of its own that reads as a failure.
const BUILD_FAILED_STATUS: u64 = 0x64;

/// Why a serve session ended before the client closed it.
#[derive(Debug, thiserror::Error)]
pub enum ServeSessionError {
    /// The client's stream broke or was not the serve protocol.
    #[error(transparent)]
    Protocol(#[from] ServeError),
    /// A command that needs `--write`.
    #[error("{0}")]
    NotAllowed(&'static str),
    /// The store refused an operation (an invalid path, a failed addition): its message.
    #[error("{0}")]
    Store(String),
    /// The connection to the store broke.
    #[error("the store connection failed")]
    StoreConnection(#[source] Box<ClientError>),
    /// The store's server in this process stopped.
    #[error("serving the store failed")]
    Server(#[source] Box<ConnError>),
    /// A path's contents no longer match its registered hash: it is not exported.
    #[error("hash of path '{path}' has changed from '{registered}' to '{actual}'!")]
    HashChanged {
        /// The path.
        path: String,
        /// The hash in the store's database.
        registered: String,
        /// The hash of its contents.
        actual: String,
    },
    /// The references of the paths to export form a cycle.
    #[error("cycle detected in the references of '{0}'")]
    Cycle(String),
    /// A closure larger than the reader's collection limit.
    #[error("the closure has more than {0} paths")]
    ClosureTooLarge(u64),
    /// A NAR in an import is not a NAR.
    #[error("importing a NAR failed")]
    Import(#[source] NarCopyError),
    /// A derivation whose outputs the closure was asked for could not be read.
    #[error("cannot read derivation '{path}': {why}")]
    Derivation {
        /// The `.drv` path.
        path: String,
        /// Why.
        why: String,
    },
    /// The client left during a build.
    #[error("the client left during a build")]
    ClientLeft,
    /// Reading or writing a stream or a spool file failed.
    #[error("I/O error")]
    Io(#[from] std::io::Error),
}

impl From<WireError> for ServeSessionError {
    fn from(e: WireError) -> Self {
        ServeSessionError::Protocol(e.into())
    }
}

impl From<ClientError> for ServeSessionError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Daemon(e) => ServeSessionError::Store(e.message),
            e => ServeSessionError::StoreConnection(Box::new(e)),
        }
    }
}

/// Serve one serve-protocol session on this process's stdin and stdout with `config`,
/// refusing the commands that add to the store or build unless `write_allowed`.
pub async fn serve_legacy_stdio(
    config: &Config,
    write_allowed: bool,
) -> Result<(), ServeSessionError> {
    let ClientStreams {
        input,
        output,
        watch,
    } = ClientStreams::stdio()?;
    let ours = nixspace_nix_protocol::version::MAX_SUPPORTED;
    let mut r = NixReader::new(input, ours).with_store_dir(config.store_dir.clone());
    let mut w = NixWriter::new(output, ours).with_store_dir(config.store_dir.clone());
    let version = server_handshake(&mut r, &mut w).await?;
    tracing::debug!(%version, write_allowed, "serve protocol session");
    let (here, there) = UnixStream::pair()?;
    let server = crate::server::serve_in_process(there, config);
    let session = async {
        let (read, write) = here.into_split();
        let client = ClientConfig {
            store_dir: config.store_dir.clone(),
            ..ClientConfig::default()
        };
        let store = DaemonClient::handshake_with_config(read, write, &client).await?;
        let mut session = Session {
            r,
            w,
            version,
            write_allowed,
            store,
            watch,
        };
        session.run().await
    };
    tokio::select! {
        ended = session => ended,
        stopped = server => Err(ServeSessionError::Server(Box::new(match stopped {
            Ok(()) => ConnError::ClientLeft,
            Err(e) => e,
        }))),
    }
}

/// One session: the client's streams and the store connection.
struct Session {
    r: NixReader<BoxRead>,
    w: NixWriter<BoxWrite>,
    version: ServeVersion,
    write_allowed: bool,
    store: DaemonClient<OwnedReadHalf, OwnedWriteHalf>,
    watch: InputWatch,
}

impl Session {
    /// Serve commands until the client closes the stream.
    async fn run(&mut self) -> Result<(), ServeSessionError> {
        while let Some(command) = ServeCommand::read(&mut self.r).await? {
            if let Some(why) = command.refused_without_write() {
                if !self.write_allowed {
                    return Err(ServeSessionError::NotAllowed(why));
                }
            }
            let request = ServeRequest::read_args(command, &mut self.r, self.version).await?;
            tracing::trace!(?command, "serve command");
            self.serve(request).await?;
            self.w.flush().await?;
        }
        Ok(())
    }

    async fn serve(&mut self, request: ServeRequest) -> Result<(), ServeSessionError> {
        match request {
            ServeRequest::QueryValidPaths {
                lock,
                substitute,
                paths,
            } => {
                if lock && self.write_allowed {
                    for path in &paths {
                        self.store.add_temp_root(path).await?;
                    }
                }
                let substitute = substitute && self.write_allowed;
                let valid = self.store.query_valid_paths(&paths, substitute).await?;
                self.w.write_store_paths(&valid, "valid paths").await?;
            }
            ServeRequest::QueryPathInfos(paths) => {
                for path in &paths {
                    if let Some(info) = self.store.query_path_info(path).await? {
                        write_path_info(&mut self.w, self.version, path, &info).await?;
                    }
                }
                write_path_infos_end(&mut self.w).await?;
            }
            ServeRequest::DumpStorePath(path) => {
                self.store
                    .nar_from_path(&path, raw_output(&mut self.w))
                    .await?;
            }
            ServeRequest::ImportPaths => {
                self.import_paths().await?;
                self.w.write_u64(1, "ImportPaths reply").await?;
            }
            ServeRequest::ExportPaths(paths) => self.export_paths(&paths).await?,
            ServeRequest::BuildPaths { paths, settings } => {
                self.store.set_options(&client_settings(&settings)).await?;
                let (watch, mut logs) = (&self.watch, LogToStderr);
                let built = tokio::select! {
                    built = self.store.build_paths(&paths, BuildMode::Normal, &mut logs) => built,
                    _ = watch.interrupted() => return Err(ServeSessionError::ClientLeft),
                };
                let reply = match built {
                    Ok(()) => BuildPathsReply::Success,
                    Err(ClientError::Daemon(e)) => failed_build(&e),
                    Err(e) => return Err(e.into()),
                };
                reply.write(&mut self.w).await?;
            }
            ServeRequest::BuildDerivation {
                drv_path,
                drv,
                settings,
            } => {
                self.store.set_options(&client_settings(&settings)).await?;
                let (watch, mut logs) = (&self.watch, LogToStderr);
                let built = tokio::select! {
                    built = self.store.build_derivation(&drv_path, &drv, BuildMode::Normal, &mut logs) => built,
                    _ = watch.interrupted() => return Err(ServeSessionError::ClientLeft),
                };
                let result = match built {
                    Ok(result) => result,
                    Err(ClientError::Daemon(e)) => {
                        let mut result = BuildResult::new(BuildStatus::MiscFailure);
                        result.error_msg = e.message;
                        result
                    }
                    Err(e) => return Err(e.into()),
                };
                write_build_result(&mut self.w, self.version, &result).await?;
            }
            ServeRequest::QueryClosure {
                include_outputs,
                paths,
            } => {
                let closure = self.closure(paths, include_outputs).await?;
                self.w.write_store_paths(&closure, "closure").await?;
            }
            ServeRequest::AddToStoreNar(info) => {
                let mut nar = nar_body(&mut self.r, info.info.nar_size);
                // As `nix-store --serve`: signatures are not checked.
                let added = self
                    .store
                    .add_to_store_nar(&info, &mut nar, false, true)
                    .await;
                // Whatever the store took, the rest of the NAR is the client's to send.
                tokio::io::copy(&mut nar, &mut tokio::io::sink()).await?;
                added?;
                self.w.write_u64(1, "AddToStoreNar reply").await?;
            }
        }
        Ok(())
    }

    /// Add each path of the export the client sends: its NAR is spooled to an unnamed
    /// temporary file while hashed, then added with the hash and size found.
    async fn import_paths(&mut self) -> Result<(), ServeSessionError> {
        while read_export_next(&mut self.r).await? {
            let spool = tokio::fs::File::from_std(tempfile::tempfile()?);
            let mut hashing = Hashing::new(spool);
            copy_nar(&mut self.r, &mut hashing)
                .await
                .map_err(ServeSessionError::Import)?;
            let (mut spool, nar_hash, nar_size) = hashing.finish();
            let trailer = ExportTrailer::read(&mut self.r).await?;
            spool.rewind().await?;
            let info = ValidPathInfo {
                path: trailer.path,
                info: PathInfo {
                    deriver: trailer.deriver,
                    nar_hash,
                    references: trailer.references,
                    registration_time: 0,
                    nar_size,
                    ultimate: false,
                    sigs: BTreeSet::new(),
                    ca: None,
                },
            };
            self.store
                .add_to_store_nar(&info, &mut spool, false, true)
                .await?;
        }
        Ok(())
    }

    /// Send the export of `paths`, references first, each NAR checked against its
    /// registered hash as it streams (a mismatch ends the session, as in Nix).
    async fn export_paths(&mut self, paths: &BTreeSet<StorePath>) -> Result<(), ServeSessionError> {
        let mut infos = BTreeMap::new();
        for path in paths {
            infos.insert(path.clone(), self.valid_info(path).await?);
        }
        let store_dir = self.w.store_dir().clone();
        for path in references_first(&infos, &store_dir)? {
            let info = &infos[path];
            write_export_next(&mut self.w).await?;
            let mut hashing = Hashing::new(raw_output(&mut self.w));
            self.store.nar_from_path(path, &mut hashing).await?;
            let (_, actual, _) = hashing.finish();
            if actual != info.nar_hash {
                return Err(ServeSessionError::HashChanged {
                    path: store_dir.print(path),
                    registered: info.nar_hash.to_prefixed_nixbase32(),
                    actual: actual.to_prefixed_nixbase32(),
                });
            }
            ExportTrailer {
                path: path.clone(),
                references: info.references.clone(),
                deriver: info.deriver.clone(),
            }
            .write(&mut self.w)
            .await?;
        }
        write_export_end(&mut self.w).await?;
        Ok(())
    }

    /// The path's info; an invalid path is an error, in Nix's words.
    async fn valid_info(&mut self, path: &StorePath) -> Result<PathInfo, ServeSessionError> {
        match self.store.query_path_info(path).await? {
            Some(info) => Ok(info),
            None => Err(ServeSessionError::Store(format!(
                "path '{}' is not valid",
                self.w.store_dir().print(path)
            ))),
        }
    }

    /// The closure of `paths` under references, with the valid outputs of the derivations
    /// in it if `include_outputs` (as Nix's `computeFSClosure`), walked without recursion and
    /// at most the reader's collection limit large.
    async fn closure(
        &mut self,
        paths: BTreeSet<StorePath>,
        include_outputs: bool,
    ) -> Result<BTreeSet<StorePath>, ServeSessionError> {
        let limit = self.r.limits().max_collection;
        let mut closure = BTreeSet::new();
        let mut pending: Vec<StorePath> = paths.into_iter().collect();
        while let Some(path) = pending.pop() {
            if closure.contains(&path) {
                continue;
            }
            let info = self.valid_info(&path).await?;
            if include_outputs && path.is_derivation() {
                for output in self.derivation_outputs(&path)? {
                    if self.store.is_valid_path(&output).await? {
                        pending.push(output);
                    }
                }
            }
            pending.extend(info.references);
            closure.insert(path);
            if closure.len() as u64 > limit {
                return Err(ServeSessionError::ClosureTooLarge(limit));
            }
        }
        Ok(closure)
    }

    /// The output paths the derivation `drv` (in the store) names before it is built.
    fn derivation_outputs(&self, drv: &StorePath) -> Result<Vec<StorePath>, ServeSessionError> {
        let store_dir = self.w.store_dir();
        let file = store_dir.print(drv);
        let failed = |why: String| ServeSessionError::Derivation {
            path: file.clone(),
            why,
        };
        let text = std::fs::read(&file).map_err(|e| failed(e.to_string()))?;
        let parsed =
            Derivation::parse_at(store_dir, drv, &text).map_err(|e| failed(e.to_string()))?;
        Ok(parsed
            .outputs
            .values()
            .filter_map(|o| o.path().cloned())
            .collect())
    }
}

/// The settings a serve client's build settings come to on the worker protocol (no
/// substitutes, as `nix-store --serve` builds).
fn client_settings(settings: &BuildSettings) -> ClientSettings {
    let mut overrides = BTreeMap::new();
    if settings.build_timeout != 0 {
        overrides.insert("timeout".to_owned(), settings.build_timeout.to_string());
    }
    if settings.max_log_size != 0 {
        overrides.insert("max-log-size".to_owned(), settings.max_log_size.to_string());
    }
    ClientSettings {
        keep_failed: settings.keep_failed,
        max_silent_time: settings.max_silent_time,
        use_substitutes: false,
        overrides,
        ..ClientSettings::default()
    }
}

/// The `BuildPaths` reply for a build the store reports failed: its status, unless that
/// status would read as a success to the client (a worker-protocol error carries 1 from
/// 1.26 on), and then Nix's status for a failed build.
fn failed_build(e: &DaemonError) -> BuildPathsReply {
    let reads_as_success = BuildStatus::try_from(e.exit_status).is_ok_and(BuildStatus::is_success);
    BuildPathsReply::Failure {
        status: if reads_as_success || e.exit_status == 0 {
            BUILD_FAILED_STATUS
        } else {
            e.exit_status
        },
        message: e.message.clone(),
    }
}

/// Build log lines, messages and the builds' names go to stderr, where the legacy ssh store reads the remote
/// side's log.
struct LogToStderr;

impl LogSink for LogToStderr {
    fn log(&mut self, event: LogEvent) {
        let line = match event {
            LogEvent::Message(text) => text,
            // "building '…' on nixspace worker …"
            LogEvent::StartActivity {
                activity_type: activity_type::BUILD,
                text,
                ..
            } => text,
            LogEvent::Result {
                result_type: result_type::BUILD_LOG_LINE,
                fields,
                ..
            } => match fields.into_iter().next() {
                Some(Field::String(line)) => line,
                _ => return,
            },
            _ => return,
        };
        // Nothing to do if stderr is gone: the client left, and the session notices.
        let _ = writeln!(std::io::stderr().lock(), "{line}");
    }
}

/// `paths` ordered as `nix-store --export` orders them: a depth-first walk over the
/// references within the set, from each path in order, each path after its references
/// (without recursion).
fn references_first<'a>(
    infos: &'a BTreeMap<StorePath, PathInfo>,
    store_dir: &StoreDir,
) -> Result<Vec<&'a StorePath>, ServeSessionError> {
    let children = |path: &'a StorePath| -> Vec<&'a StorePath> {
        // Reversed, so that popping takes them in order.
        infos[path]
            .references
            .iter()
            .rev()
            .filter_map(|r| infos.get_key_value(r).map(|(k, _)| k))
            .filter(|r| *r != path)
            .collect()
    };
    let mut sorted = Vec::with_capacity(infos.len());
    let mut visited = BTreeSet::new();
    let mut parents = BTreeSet::new();
    for root in infos.keys() {
        if !visited.insert(root) {
            continue;
        }
        parents.insert(root);
        let mut stack = vec![(root, children(root))];
        while let Some((path, pending)) = stack.last_mut() {
            let path = *path;
            match pending.pop() {
                Some(child) if parents.contains(child) => {
                    return Err(ServeSessionError::Cycle(store_dir.print(child)))
                }
                Some(child) => {
                    if visited.insert(child) {
                        parents.insert(child);
                        stack.push((child, children(child)));
                    }
                }
                None => {
                    sorted.push(path);
                    parents.remove(path);
                    stack.pop();
                }
            }
        }
    }
    Ok(sorted)
}

/// A writer that hashes (SHA-256) and counts what passes through it.
struct Hashing<W> {
    inner: W,
    hasher: Hasher,
    size: u64,
}

impl<W> Hashing<W> {
    fn new(inner: W) -> Hashing<W> {
        Hashing {
            inner,
            hasher: Hasher::new(HashAlgo::Sha256),
            size: 0,
        }
    }

    /// The writer, the hash and the size of what was written.
    fn finish(self) -> (W, Hash, u64) {
        (self.inner, self.hasher.finish(), self.size)
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Hashing<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let written = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &written {
            this.hasher.update(&buf[..*n]);
            this.size += *n as u64;
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(name: &str) -> StorePath {
        StorePath::from_base_name(&format!("7rjj86a15146cq4nsd2q3v4n7ks1hkgn-{name}")).unwrap()
    }

    fn info(references: &[&str]) -> PathInfo {
        PathInfo {
            deriver: None,
            nar_hash: Hash::sha256(b""),
            references: references.iter().map(|r| path(r)).collect(),
            registration_time: 0,
            nar_size: 0,
            ultimate: false,
            sigs: BTreeSet::new(),
            ca: None,
        }
    }

    #[test]
    fn exports_put_references_first_and_ignore_paths_outside_the_set() {
        // c → b → a, c → a, b → itself, a → outside (not exported).
        let infos = BTreeMap::from([
            (path("a"), info(&["outside"])),
            (path("b"), info(&["a", "b"])),
            (path("c"), info(&["a", "b"])),
        ]);
        let order = references_first(&infos, &StoreDir::default()).unwrap();
        assert_eq!(order, [&path("a"), &path("b"), &path("c")]);
    }

    #[test]
    fn a_cycle_in_an_export_is_refused() {
        // The positive control: the same paths without the back edge sort.
        let acyclic = BTreeMap::from([(path("a"), info(&[])), (path("b"), info(&["a"]))]);
        assert!(references_first(&acyclic, &StoreDir::default()).is_ok());
        let cyclic = BTreeMap::from([(path("a"), info(&["b"])), (path("b"), info(&["a"]))]);
        assert!(matches!(
            references_first(&cyclic, &StoreDir::default()),
            Err(ServeSessionError::Cycle(_))
        ));
    }

    #[test]
    fn a_failed_build_never_reads_as_a_success() {
        let mut e = DaemonError::new("build of x failed");
        for (status, sent) in [
            (1, BUILD_FAILED_STATUS),
            (0, BUILD_FAILED_STATUS),
            (101, 101),
        ] {
            e.exit_status = status;
            assert_eq!(
                failed_build(&e),
                BuildPathsReply::Failure {
                    status: sent,
                    message: "build of x failed".into()
                }
            );
        }
    }
}
