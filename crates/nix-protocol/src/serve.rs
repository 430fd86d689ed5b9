//! The serve protocol: what `nix-store --serve [--write]` speaks on stdin and stdout, the
//! remote side of Nix's legacy `ssh://` store (and of Hydra's queue runner), as Nix 2.8 has
//! it (protocol 2.7).
//!
//! Unlike the worker protocol there are no log frames: each command is a number followed by
//! its arguments, and its reply follows on the output at once (build logs go to the server's
//! stderr). The opening: the client sends [`SERVE_MAGIC_1`] and its version, the server
//! [`SERVE_MAGIC_2`] and its own; the major versions must be 2. Some fields exist only from a
//! minor version on (`ServeVersion::minor`): the build settings' `maxLogSize` from 2,
//! `buildRepeat`/`enforceDeterminism` and a build result's times from 3, path infos' hash,
//! content address and signatures from 4, `AddToStoreNar` from 5, a build result's built
//! outputs from 6, `keepFailed` from 7.
//!
//! Values share the worker protocol's encodings (u64, padded strings, sets of store paths):
//! the reader and writer are [`NixReader`] and [`NixWriter`], whose size limits bound every
//! read here. [`ServeRequest`] holds a command with its arguments; the replies have a type or
//! a function each. `ImportPaths` and `ExportPaths` carry `nix-store --export`'s format: per
//! path a `1`, the NAR, then an [`ExportTrailer`]; a `0` ends it.

use std::collections::{BTreeMap, BTreeSet};

use nixspace_nix_formats::derivation::BasicDerivation;
use nixspace_nix_formats::hash::HashAlgo;
use nixspace_nix_formats::store_path::StorePath;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, BufReader, BufWriter, Take};

use crate::build_result::{BuildResult, BuildStatus};
use crate::derivation::read_basic_derivation;
use crate::derived_path::DerivedPath;
use crate::path_info::{read_nar_hash, PathInfo, ValidPathInfo};
use crate::realisation::Realisation;
use crate::version::ProtocolVersion;
use crate::wire::{NixDeserialize, NixReader, NixSerialize, NixWriter, WireError};

/// What the client sends first.
pub const SERVE_MAGIC_1: u64 = 0x390c_9deb;
/// What the server answers with.
pub const SERVE_MAGIC_2: u64 = 0x5452_eecb;
/// What follows each NAR of `nix-store --export`'s format.
pub const EXPORT_MAGIC: u64 = 0x4558_494e;

/// A serve protocol version: major in the high byte (2 for every version Nix speaks), minor
/// in the low byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServeVersion(u64);

/// The version Nix 2.8 speaks, and so does nixspace: 2.7.
pub const SERVE_PROTOCOL_VERSION: ServeVersion = ServeVersion(2 << 8 | 7);

/// Minor versions from which fields exist.
mod since {
    /// The build settings' `maxLogSize`.
    pub const MAX_LOG_SIZE: u64 = 2;
    /// The build settings' `buildRepeat` and `enforceDeterminism`; a build result's times.
    pub const REPEAT_AND_TIMES: u64 = 3;
    /// A path info's NAR hash, content address and signatures.
    pub const PATH_INFO_HASH: u64 = 4;
    /// A build result's built outputs.
    pub const BUILT_OUTPUTS: u64 = 6;
    /// The build settings' `keepFailed`.
    pub const KEEP_FAILED: u64 = 7;
}

impl ServeVersion {
    /// The version sent on the wire as `v`.
    pub const fn from_wire(v: u64) -> ServeVersion {
        ServeVersion(v)
    }

    /// The value sent on the wire.
    pub const fn to_wire(self) -> u64 {
        self.0
    }

    /// The major version (2 for every version Nix speaks).
    pub const fn major(self) -> u64 {
        (self.0 & 0xff00) >> 8
    }

    /// The minor version.
    pub const fn minor(self) -> u64 {
        self.0 & 0xff
    }
}

impl std::fmt::Display for ServeVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major(), self.minor())
    }
}

/// The worker protocol version whose string forms the serve protocol's paths-with-outputs
/// take (`drv!out,dev`, a bare `.drv` meaning all its outputs).
const PATH_WITH_OUTPUTS_FORM: ProtocolVersion = ProtocolVersion::new(1, 29);

/// Why reading or writing the serve protocol failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Reading, writing or decoding a value failed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The peer's opening was not the serve protocol's.
    #[error("protocol mismatch: got {got:#x} instead of the serve protocol's magic number")]
    Magic {
        /// What was read.
        got: u64,
    },
    /// The peer speaks another major version.
    #[error("unsupported serve protocol version {0}")]
    Version(ServeVersion),
    /// A command number the protocol does not have.
    #[error("unknown serve command {0}")]
    UnknownCommand(u64),
    /// `AddToStoreNar` without a NAR size.
    #[error("narInfo is too old and missing the narSize field")]
    NoNarSize,
    /// The stream after `ImportPaths` is not `nix-store --export`'s format.
    #[error("input doesn't look like something created by 'nix-store --export'")]
    NotAnExport,
    /// A NAR in an export is not followed by the export's magic number.
    #[error("Nix archive cannot be imported; wrong format")]
    ExportMagic,
}

/// The server's side of the opening: read the client's magic number, answer with ours and
/// [`SERVE_PROTOCOL_VERSION`], then read the client's version.
pub async fn server_handshake<R, W>(
    r: &mut NixReader<R>,
    w: &mut NixWriter<W>,
) -> Result<ServeVersion, ServeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let got = r.read_u64("serve magic").await?;
    if got != SERVE_MAGIC_1 {
        return Err(ServeError::Magic { got });
    }
    w.write_u64(SERVE_MAGIC_2, "serve magic").await?;
    w.write_u64(SERVE_PROTOCOL_VERSION.to_wire(), "serve version")
        .await?;
    w.flush().await?;
    Ok(ServeVersion::from_wire(
        r.read_u64("client serve version").await?,
    ))
}

/// The client's side of the opening, as Nix's legacy ssh store does it: send our magic
/// number and `version`, read the server's, and refuse a major version other than 2. The
/// server's version.
pub async fn client_handshake<R, W>(
    r: &mut NixReader<R>,
    w: &mut NixWriter<W>,
    version: ServeVersion,
) -> Result<ServeVersion, ServeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    w.write_u64(SERVE_MAGIC_1, "serve magic").await?;
    w.write_u64(version.to_wire(), "client serve version")
        .await?;
    w.flush().await?;
    let got = r.read_u64("serve magic").await?;
    if got != SERVE_MAGIC_2 {
        return Err(ServeError::Magic { got });
    }
    let theirs = ServeVersion::from_wire(r.read_u64("serve version").await?);
    if theirs.major() != 2 {
        return Err(ServeError::Version(theirs));
    }
    Ok(theirs)
}

/// The serve protocol's commands, with their numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
#[allow(missing_docs)]
pub enum ServeCommand {
    QueryValidPaths = 1,
    QueryPathInfos = 2,
    DumpStorePath = 3,
    ImportPaths = 4,
    ExportPaths = 5,
    BuildPaths = 6,
    QueryClosure = 7,
    BuildDerivation = 8,
    AddToStoreNar = 9,
}

impl ServeCommand {
    /// The command numbered `n`.
    pub fn from_wire(n: u64) -> Result<ServeCommand, ServeError> {
        use ServeCommand::*;
        Ok(match n {
            1 => QueryValidPaths,
            2 => QueryPathInfos,
            3 => DumpStorePath,
            4 => ImportPaths,
            5 => ExportPaths,
            6 => BuildPaths,
            7 => QueryClosure,
            8 => BuildDerivation,
            9 => AddToStoreNar,
            _ => return Err(ServeError::UnknownCommand(n)),
        })
    }

    /// Why `nix-store --serve` without `--write` refuses the command, if it does (it adds
    /// to the store or builds); Nix refuses before reading the arguments.
    pub fn refused_without_write(self) -> Option<&'static str> {
        match self {
            ServeCommand::ImportPaths | ServeCommand::AddToStoreNar => {
                Some("importing paths is not allowed")
            }
            ServeCommand::BuildPaths | ServeCommand::BuildDerivation => {
                Some("building paths is not allowed")
            }
            _ => None,
        }
    }

    /// Reads the next command's number: `None` if the client closed the stream instead.
    pub async fn read<R: AsyncRead + Unpin>(
        r: &mut NixReader<R>,
    ) -> Result<Option<ServeCommand>, ServeError> {
        match r.try_read_u64("serve command").await? {
            None => Ok(None),
            Some(n) => ServeCommand::from_wire(n).map(Some),
        }
    }
}

/// The settings sent before a build (`BuildPaths`, `BuildDerivation`); the fields a minor
/// version lacks are not sent and read as zero.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildSettings {
    /// `max-silent-time`, seconds.
    pub max_silent_time: u64,
    /// `timeout`, seconds.
    pub build_timeout: u64,
    /// `max-log-size`, bytes (from 2).
    pub max_log_size: u64,
    /// `repeat` (from 3).
    pub build_repeat: u64,
    /// `enforce-determinism` (from 3).
    pub enforce_determinism: bool,
    /// `keep-failed` (from 7).
    pub keep_failed: bool,
}

impl BuildSettings {
    /// Reads the settings as a client of `version` sends them.
    pub async fn read<R: AsyncRead + Unpin>(
        r: &mut NixReader<R>,
        version: ServeVersion,
    ) -> Result<BuildSettings, ServeError> {
        let mut s = BuildSettings {
            max_silent_time: r.read_u64("maxSilentTime").await?,
            build_timeout: r.read_u64("buildTimeout").await?,
            ..BuildSettings::default()
        };
        if version.minor() >= since::MAX_LOG_SIZE {
            s.max_log_size = r.read_u64("maxLogSize").await?;
        }
        if version.minor() >= since::REPEAT_AND_TIMES {
            s.build_repeat = r.read_u64("buildRepeat").await?;
            s.enforce_determinism = r.read_bool("enforceDeterminism").await?;
        }
        if version.minor() >= since::KEEP_FAILED {
            s.keep_failed = r.read_bool("keepFailed").await?;
        }
        Ok(s)
    }

    /// Writes the settings for a server of `version`.
    pub async fn write<W: AsyncWrite + Unpin>(
        &self,
        w: &mut NixWriter<W>,
        version: ServeVersion,
    ) -> Result<(), ServeError> {
        w.write_u64(self.max_silent_time, "maxSilentTime").await?;
        w.write_u64(self.build_timeout, "buildTimeout").await?;
        if version.minor() >= since::MAX_LOG_SIZE {
            w.write_u64(self.max_log_size, "maxLogSize").await?;
        }
        if version.minor() >= since::REPEAT_AND_TIMES {
            w.write_u64(self.build_repeat, "buildRepeat").await?;
            w.write_bool(self.enforce_determinism, "enforceDeterminism")
                .await?;
        }
        if version.minor() >= since::KEEP_FAILED {
            w.write_bool(self.keep_failed, "keepFailed").await?;
        }
        Ok(())
    }
}

/// A command with its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServeRequest {
    /// Which of `paths` are valid; `lock` adds temporary roots for them and `substitute`
    /// substitutes them first (both only with `--write`). Reply: a set of store paths.
    QueryValidPaths {
        /// Add temporary roots.
        lock: bool,
        /// Substitute first.
        substitute: bool,
        /// The paths.
        paths: BTreeSet<StorePath>,
    },
    /// The infos of the valid ones of these paths. Reply: [`write_path_info`] per valid
    /// path, then [`write_path_infos_end`].
    QueryPathInfos(BTreeSet<StorePath>),
    /// The path's NAR. Reply: the NAR.
    DumpStorePath(StorePath),
    /// Add the paths of the export that follows. Reply: 1.
    ImportPaths,
    /// The export of these paths (references first). Reply: the export.
    ExportPaths(BTreeSet<StorePath>),
    /// Build or substitute `paths`. Reply: a [`BuildPathsReply`].
    BuildPaths {
        /// What to build.
        paths: Vec<DerivedPath>,
        /// How.
        settings: BuildSettings,
    },
    /// The closure of `paths` (with the outputs of derivations in it if
    /// `include_outputs`). Reply: a set of store paths.
    QueryClosure {
        /// Include derivations' outputs.
        include_outputs: bool,
        /// The paths.
        paths: BTreeSet<StorePath>,
    },
    /// Build one derivation, sent whole. Reply: [`write_build_result`].
    BuildDerivation {
        /// Its `.drv` path.
        drv_path: StorePath,
        /// The derivation.
        drv: BasicDerivation,
        /// How.
        settings: BuildSettings,
    },
    /// Add a path whose NAR (`info.info.nar_size` bytes, see [`nar_body`]) follows.
    /// Reply: 1.
    AddToStoreNar(ValidPathInfo),
}

impl ServeRequest {
    /// The request's command.
    pub fn command(&self) -> ServeCommand {
        match self {
            ServeRequest::QueryValidPaths { .. } => ServeCommand::QueryValidPaths,
            ServeRequest::QueryPathInfos(_) => ServeCommand::QueryPathInfos,
            ServeRequest::DumpStorePath(_) => ServeCommand::DumpStorePath,
            ServeRequest::ImportPaths => ServeCommand::ImportPaths,
            ServeRequest::ExportPaths(_) => ServeCommand::ExportPaths,
            ServeRequest::BuildPaths { .. } => ServeCommand::BuildPaths,
            ServeRequest::QueryClosure { .. } => ServeCommand::QueryClosure,
            ServeRequest::BuildDerivation { .. } => ServeCommand::BuildDerivation,
            ServeRequest::AddToStoreNar(_) => ServeCommand::AddToStoreNar,
        }
    }

    /// Reads the arguments of `command` (whose number was read) from a client of `version`.
    pub async fn read_args<R: AsyncRead + Unpin>(
        command: ServeCommand,
        r: &mut NixReader<R>,
        version: ServeVersion,
    ) -> Result<ServeRequest, ServeError> {
        Ok(match command {
            ServeCommand::QueryValidPaths => ServeRequest::QueryValidPaths {
                lock: r.read_bool("lock").await?,
                substitute: r.read_bool("substitute").await?,
                paths: r.read_store_path_set("paths").await?,
            },
            ServeCommand::QueryPathInfos => {
                ServeRequest::QueryPathInfos(r.read_store_path_set("paths").await?)
            }
            ServeCommand::DumpStorePath => {
                ServeRequest::DumpStorePath(r.read_store_path("path").await?)
            }
            ServeCommand::ImportPaths => ServeRequest::ImportPaths,
            ServeCommand::ExportPaths => {
                // Obsolete (it once asked for signing).
                r.read_u64("sign").await?;
                ServeRequest::ExportPaths(r.read_store_path_set("paths").await?)
            }
            ServeCommand::BuildPaths => {
                let n = r.read_count("paths").await?;
                let mut paths = Vec::new();
                for _ in 0..n {
                    let s = r.read_string("path with outputs").await?;
                    paths.push(DerivedPath::parse_wire(
                        &s,
                        r.store_dir(),
                        PATH_WITH_OUTPUTS_FORM,
                    )?);
                }
                ServeRequest::BuildPaths {
                    paths,
                    settings: BuildSettings::read(r, version).await?,
                }
            }
            ServeCommand::QueryClosure => ServeRequest::QueryClosure {
                include_outputs: r.read_bool("includeOutputs").await?,
                paths: r.read_store_path_set("paths").await?,
            },
            ServeCommand::BuildDerivation => {
                let drv_path = r.read_store_path("drvPath").await?;
                let drv = read_basic_derivation(r, &drv_path).await?;
                ServeRequest::BuildDerivation {
                    drv_path,
                    drv,
                    settings: BuildSettings::read(r, version).await?,
                }
            }
            ServeCommand::AddToStoreNar => {
                let path = r.read_store_path("path").await?;
                let info = PathInfo::read_fields(r, true).await?;
                if info.nar_size == 0 {
                    return Err(ServeError::NoNarSize);
                }
                ServeRequest::AddToStoreNar(ValidPathInfo { path, info })
            }
        })
    }

    /// Reads the next request (`None` if the client closed the stream), as a server that
    /// refuses nothing does; a server that refuses some commands reads the
    /// [`ServeCommand`] first and then [`ServeRequest::read_args`].
    pub async fn read<R: AsyncRead + Unpin>(
        r: &mut NixReader<R>,
        version: ServeVersion,
    ) -> Result<Option<ServeRequest>, ServeError> {
        match ServeCommand::read(r).await? {
            None => Ok(None),
            Some(c) => ServeRequest::read_args(c, r, version).await.map(Some),
        }
    }

    /// Writes the request as a client does for a server of `version` (the data that follows
    /// `ImportPaths` and `AddToStoreNar` is the caller's to send).
    pub async fn write<W: AsyncWrite + Unpin + Send>(
        &self,
        w: &mut NixWriter<W>,
        version: ServeVersion,
    ) -> Result<(), ServeError> {
        w.write_u64(self.command() as u64, "serve command").await?;
        match self {
            ServeRequest::QueryValidPaths {
                lock,
                substitute,
                paths,
            } => {
                w.write_bool(*lock, "lock").await?;
                w.write_bool(*substitute, "substitute").await?;
                w.write_store_paths(paths, "paths").await?;
            }
            ServeRequest::QueryPathInfos(paths) => w.write_store_paths(paths, "paths").await?,
            ServeRequest::DumpStorePath(path) => w.write_store_path(path, "path").await?,
            ServeRequest::ImportPaths => {}
            ServeRequest::ExportPaths(paths) => {
                w.write_u64(0, "sign").await?;
                w.write_store_paths(paths, "paths").await?;
            }
            ServeRequest::BuildPaths { paths, settings } => {
                let mut strings = Vec::with_capacity(paths.len());
                for p in paths {
                    strings.push(p.to_wire_string(w.store_dir(), PATH_WITH_OUTPUTS_FORM)?);
                }
                w.write_strings(&strings, "paths").await?;
                settings.write(w, version).await?;
            }
            ServeRequest::QueryClosure {
                include_outputs,
                paths,
            } => {
                w.write_bool(*include_outputs, "includeOutputs").await?;
                w.write_store_paths(paths, "paths").await?;
            }
            ServeRequest::BuildDerivation {
                drv_path,
                drv,
                settings,
            } => {
                w.write_store_path(drv_path, "drvPath").await?;
                drv.write_to(w).await?;
                settings.write(w, version).await?;
            }
            ServeRequest::AddToStoreNar(ValidPathInfo { path, info }) => {
                w.write_store_path(path, "path").await?;
                info.write_fields(w, true).await?;
            }
        }
        Ok(())
    }
}

/// The NAR that follows `AddToStoreNar`: the next `len` bytes of `r`, unframed.
pub fn nar_body<R: AsyncRead + Unpin>(r: &mut NixReader<R>, len: u64) -> Take<&mut BufReader<R>> {
    r.buffered().take(len)
}

/// Where a reply's unframed data (a NAR, an export) is written: `w`'s buffered stream.
pub fn raw_output<W: AsyncWrite + Unpin>(w: &mut NixWriter<W>) -> &mut BufWriter<W> {
    w.buffered()
}

/// Writes one entry of the reply to `QueryPathInfos` for a client of `version`.
pub async fn write_path_info<W: AsyncWrite + Unpin>(
    w: &mut NixWriter<W>,
    version: ServeVersion,
    path: &StorePath,
    info: &PathInfo,
) -> Result<(), ServeError> {
    w.write_store_path(path, "path").await?;
    w.write_opt_store_path(info.deriver.as_ref(), "deriver")
        .await?;
    w.write_store_paths(&info.references, "references").await?;
    // The download size: the NAR's, uncompressed.
    w.write_u64(info.nar_size, "downloadSize").await?;
    w.write_u64(info.nar_size, "narSize").await?;
    if version.minor() >= since::PATH_INFO_HASH {
        w.write_str(&info.nar_hash.to_prefixed_nixbase32(), "narHash")
            .await?;
        w.write_str(info.ca.as_deref().unwrap_or(""), "ca").await?;
        w.write_strings(&info.sigs, "sigs").await?;
    }
    Ok(())
}

/// Ends the reply to `QueryPathInfos`.
pub async fn write_path_infos_end<W: AsyncWrite + Unpin>(
    w: &mut NixWriter<W>,
) -> Result<(), ServeError> {
    Ok(w.write_str("", "path").await?)
}

/// Reads the reply to `QueryPathInfos` from a server of `version`: the valid paths' infos
/// (at most the reader's collection limit). A version without NAR hashes reads an empty
/// SHA-256 hash.
pub async fn read_path_infos<R: AsyncRead + Unpin>(
    r: &mut NixReader<R>,
    version: ServeVersion,
) -> Result<Vec<ValidPathInfo>, ServeError> {
    let mut infos = Vec::new();
    loop {
        let path = r.read_string("path").await?;
        if path.is_empty() {
            return Ok(infos);
        }
        if infos.len() as u64 >= r.limits().max_collection {
            return Err(WireError::TooMany {
                what: "path infos",
                count: infos.len() as u64 + 1,
                limit: r.limits().max_collection,
            }
            .into());
        }
        let path = r
            .store_dir()
            .parse(&path)
            .map_err(|source| WireError::StorePath {
                what: "path",
                source,
            })?;
        let deriver = r.read_opt_store_path("deriver").await?;
        let references = r.read_store_path_set("references").await?;
        r.read_u64("downloadSize").await?;
        let nar_size = r.read_u64("narSize").await?;
        let mut info = PathInfo {
            deriver,
            nar_hash: nixspace_nix_formats::hash::Hash::digest(HashAlgo::Sha256, b""),
            references,
            registration_time: 0,
            nar_size,
            ultimate: false,
            sigs: BTreeSet::new(),
            ca: None,
        };
        if version.minor() >= since::PATH_INFO_HASH {
            info.nar_hash = read_nar_hash(r).await?;
            info.ca = Some(r.read_string("ca").await?).filter(|s| !s.is_empty());
            info.sigs = r.read_string_set("sigs").await?;
        }
        infos.push(ValidPathInfo { path, info });
    }
}

/// The reply to `BuildPaths`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildPathsReply {
    /// Everything was built or substituted (sent as 0).
    Success,
    /// The build failed: Nix's exit status for it, and the message.
    Failure {
        /// The status (not 0, 1, 2 or 13, which read as success).
        status: u64,
        /// Why.
        message: String,
    },
}

impl BuildPathsReply {
    /// Writes the reply.
    pub async fn write<W: AsyncWrite + Unpin>(
        &self,
        w: &mut NixWriter<W>,
    ) -> Result<(), ServeError> {
        match self {
            BuildPathsReply::Success => w.write_u64(0, "status").await?,
            BuildPathsReply::Failure { status, message } => {
                w.write_u64(*status, "status").await?;
                w.write_str(message, "errorMsg").await?;
            }
        }
        Ok(())
    }

    /// Reads the reply as Nix's client does: a status that is a successful build status
    /// has no message.
    pub async fn read<R: AsyncRead + Unpin>(r: &mut NixReader<R>) -> Result<Self, ServeError> {
        let status = r.read_u64("status").await?;
        if BuildStatus::try_from(status).is_ok_and(BuildStatus::is_success) {
            return Ok(BuildPathsReply::Success);
        }
        Ok(BuildPathsReply::Failure {
            status,
            message: r.read_string("errorMsg").await?,
        })
    }
}

/// Writes the reply to `BuildDerivation` for a client of `version`. (Nix 2.8's server gates
/// the built outputs on a comparison that is always true, so it sends them to clients older
/// than 2.6 too, which do not read them; this sends them from 2.6 on, as clients read them.)
pub async fn write_build_result<W: AsyncWrite + Unpin + Send>(
    w: &mut NixWriter<W>,
    version: ServeVersion,
    result: &BuildResult,
) -> Result<(), ServeError> {
    w.write_u64(result.status as u64, "status").await?;
    w.write_str(&result.error_msg, "errorMsg").await?;
    if version.minor() >= since::REPEAT_AND_TIMES {
        w.write_u64(result.times_built, "timesBuilt").await?;
        w.write_bool(result.is_non_deterministic, "isNonDeterministic")
            .await?;
        w.write_u64(result.start_time, "startTime").await?;
        w.write_u64(result.stop_time, "stopTime").await?;
    }
    if version.minor() >= since::BUILT_OUTPUTS {
        w.write_u64(result.built_outputs.len() as u64, "builtOutputs")
            .await?;
        for (id, realisation) in &result.built_outputs {
            w.write_str(id, "DrvOutput").await?;
            realisation.write_to(w).await?;
        }
    }
    Ok(())
}

/// Reads the reply to `BuildDerivation` from a server of `version`.
pub async fn read_build_result<R: AsyncRead + Unpin + Send>(
    r: &mut NixReader<R>,
    version: ServeVersion,
) -> Result<BuildResult, ServeError> {
    let status = BuildStatus::try_from(r.read_u64("status").await?)?;
    let mut result = BuildResult::new(status);
    result.error_msg = r.read_string("errorMsg").await?;
    if version.minor() >= since::REPEAT_AND_TIMES {
        result.times_built = r.read_u64("timesBuilt").await?;
        result.is_non_deterministic = r.read_bool("isNonDeterministic").await?;
        result.start_time = r.read_u64("startTime").await?;
        result.stop_time = r.read_u64("stopTime").await?;
    }
    if version.minor() >= since::BUILT_OUTPUTS {
        let n = r.read_count("builtOutputs").await?;
        let mut outputs = BTreeMap::new();
        for _ in 0..n {
            let id = r.read_string("DrvOutput").await?;
            outputs.insert(id, Realisation::read_from(r).await?);
        }
        result.built_outputs = outputs;
    }
    Ok(result)
}

/// Writes the `1` that says a path follows in an export.
pub async fn write_export_next<W: AsyncWrite + Unpin>(
    w: &mut NixWriter<W>,
) -> Result<(), ServeError> {
    Ok(w.write_u64(1, "export item").await?)
}

/// Writes the `0` that ends an export.
pub async fn write_export_end<W: AsyncWrite + Unpin>(
    w: &mut NixWriter<W>,
) -> Result<(), ServeError> {
    Ok(w.write_u64(0, "export item").await?)
}

/// Reads whether another path follows in an export (`1`) or it ended (`0`).
pub async fn read_export_next<R: AsyncRead + Unpin>(
    r: &mut NixReader<R>,
) -> Result<bool, ServeError> {
    match r.read_u64("export item").await? {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(ServeError::NotAnExport),
    }
}

/// What follows a path's NAR in an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportTrailer {
    /// The path.
    pub path: StorePath,
    /// Its references.
    pub references: BTreeSet<StorePath>,
    /// The derivation that made it, if known.
    pub deriver: Option<StorePath>,
}

impl ExportTrailer {
    /// Writes the trailer (with no signature, as Nix writes it).
    pub async fn write<W: AsyncWrite + Unpin>(
        &self,
        w: &mut NixWriter<W>,
    ) -> Result<(), ServeError> {
        w.write_u64(EXPORT_MAGIC, "export magic").await?;
        w.write_store_path(&self.path, "path").await?;
        w.write_store_paths(&self.references, "references").await?;
        w.write_opt_store_path(self.deriver.as_ref(), "deriver")
            .await?;
        w.write_u64(0, "legacy signature").await?;
        Ok(())
    }

    /// Reads a trailer; a legacy signature in it is read and dropped, as Nix does.
    pub async fn read<R: AsyncRead + Unpin>(r: &mut NixReader<R>) -> Result<Self, ServeError> {
        if r.read_u64("export magic").await? != EXPORT_MAGIC {
            return Err(ServeError::ExportMagic);
        }
        let trailer = ExportTrailer {
            path: r.read_store_path("path").await?,
            references: r.read_store_path_set("references").await?,
            deriver: r.read_opt_store_path("deriver").await?,
        };
        if r.read_u64("legacy signature").await? == 1 {
            r.read_string("legacy signature").await?;
        }
        Ok(trailer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::NIX_2_8;
    use nixspace_nix_formats::derivation::DerivationOutput;
    use nixspace_nix_formats::hash::Hash;

    /// Versions whose gates differ: before `maxLogSize`, before times, before hashes, before
    /// built outputs, before `keepFailed`, and Nix 2.8's.
    const VERSIONS: [ServeVersion; 6] = [
        ServeVersion(0x200),
        ServeVersion(0x202),
        ServeVersion(0x203),
        ServeVersion(0x205),
        ServeVersion(0x206),
        SERVE_PROTOCOL_VERSION,
    ];

    fn path(name: &str) -> StorePath {
        StorePath::from_base_name(&format!("7rjj86a15146cq4nsd2q3v4n7ks1hkgn-{name}")).unwrap()
    }

    fn writer() -> NixWriter<Vec<u8>> {
        NixWriter::new(Vec::new(), NIX_2_8)
    }

    /// The bytes written, with a sentinel after them, to read back.
    async fn reader_of(mut w: NixWriter<Vec<u8>>) -> NixReader<std::io::Cursor<Vec<u8>>> {
        w.write_u64(0xfeed, "sentinel").await.unwrap();
        w.flush().await.unwrap();
        NixReader::new(std::io::Cursor::new(w.into_inner()), NIX_2_8)
    }

    /// Everything was read, and nothing more.
    async fn at_sentinel(r: &mut NixReader<std::io::Cursor<Vec<u8>>>) {
        assert_eq!(r.read_u64("sentinel").await.unwrap(), 0xfeed);
    }

    fn settings() -> BuildSettings {
        BuildSettings {
            max_silent_time: 5,
            build_timeout: 7,
            max_log_size: 11,
            build_repeat: 1,
            enforce_determinism: true,
            keep_failed: true,
        }
    }

    /// What a client of `version` can send of [`settings`].
    fn settings_at(version: ServeVersion) -> BuildSettings {
        let mut s = settings();
        if version.minor() < 2 {
            s.max_log_size = 0;
        }
        if version.minor() < 3 {
            (s.build_repeat, s.enforce_determinism) = (0, false);
        }
        if version.minor() < 7 {
            s.keep_failed = false;
        }
        s
    }

    fn drv() -> BasicDerivation {
        BasicDerivation {
            name: "x".to_owned(),
            outputs: BTreeMap::from([(
                "out".to_owned(),
                DerivationOutput::InputAddressed(path("x")),
            )]),
            input_srcs: [path("src")].into(),
            system: "x86_64-linux".to_owned(),
            builder: b"/bin/sh".to_vec(),
            args: vec![b"-c".to_vec(), b"echo".to_vec()],
            env: BTreeMap::from([(b"out".to_vec(), b"/nix/store/x".to_vec())]),
        }
    }

    fn info() -> PathInfo {
        PathInfo {
            deriver: Some(path("x.drv")),
            nar_hash: Hash::sha256(b"nar"),
            references: [path("a"), path("b")].into(),
            registration_time: 1_700_000_000,
            nar_size: 4242,
            ultimate: true,
            sigs: ["k:c2ln".to_owned()].into(),
            ca: Some("fixed:r:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s".into()),
        }
    }

    fn requests(version: ServeVersion) -> Vec<ServeRequest> {
        let paths: BTreeSet<StorePath> = [path("a"), path("b")].into();
        vec![
            ServeRequest::QueryValidPaths {
                lock: true,
                substitute: false,
                paths: paths.clone(),
            },
            ServeRequest::QueryPathInfos(paths.clone()),
            ServeRequest::DumpStorePath(path("a")),
            ServeRequest::ImportPaths,
            ServeRequest::ExportPaths(paths.clone()),
            ServeRequest::BuildPaths {
                paths: vec![
                    DerivedPath::Opaque(path("a")),
                    DerivedPath::Built {
                        drv_path: path("x.drv"),
                        outputs: crate::OutputSpec::All,
                    },
                    DerivedPath::Built {
                        drv_path: path("y.drv"),
                        outputs: crate::OutputSpec::Names(["dev".into(), "out".into()].into()),
                    },
                ],
                settings: settings_at(version),
            },
            ServeRequest::QueryClosure {
                include_outputs: true,
                paths,
            },
            ServeRequest::BuildDerivation {
                drv_path: path("x.drv"),
                drv: drv(),
                settings: settings_at(version),
            },
            ServeRequest::AddToStoreNar(ValidPathInfo {
                path: path("a"),
                info: info(),
            }),
        ]
    }

    #[tokio::test]
    async fn every_request_round_trips_at_every_gate() {
        for version in VERSIONS {
            for req in requests(version) {
                let mut w = writer();
                req.write(&mut w, version).await.unwrap();
                let mut r = reader_of(w).await;
                let back = ServeRequest::read(&mut r, version).await.unwrap().unwrap();
                assert_eq!(back, req, "at {version}");
                at_sentinel(&mut r).await;
            }
        }
    }

    #[tokio::test]
    async fn build_settings_follow_the_version_gates() {
        let lengths = [(0x200, 2), (0x202, 3), (0x206, 5), (0x207, 6)];
        for (v, fields) in lengths {
            let mut w = writer();
            settings()
                .write(&mut w, ServeVersion::from_wire(v))
                .await
                .unwrap();
            w.flush().await.unwrap();
            assert_eq!(w.into_inner().len(), fields * 8, "at {v:#x}");
        }
    }

    #[tokio::test]
    async fn build_paths_sends_paths_with_outputs() {
        let req = ServeRequest::BuildPaths {
            paths: vec![DerivedPath::Built {
                drv_path: path("x.drv"),
                outputs: crate::OutputSpec::All,
            }],
            settings: BuildSettings::default(),
        };
        let mut w = writer();
        req.write(&mut w, SERVE_PROTOCOL_VERSION).await.unwrap();
        w.flush().await.unwrap();
        let bytes = w.into_inner();
        // A bare `.drv` path means all its outputs (never `drv!*`, which Nix 2.8 rejects).
        let wanted = format!("/nix/store/{}", path("x.drv"));
        assert!(bytes.windows(wanted.len()).any(|w| w == wanted.as_bytes()));
        assert!(!bytes.windows(2).any(|w| w == b"!*"));
    }

    #[tokio::test]
    async fn path_infos_round_trip_with_and_without_hashes() {
        for version in VERSIONS {
            let mut w = writer();
            write_path_info(&mut w, version, &path("a"), &info())
                .await
                .unwrap();
            write_path_infos_end(&mut w).await.unwrap();
            let mut r = reader_of(w).await;
            let back = read_path_infos(&mut r, version).await.unwrap();
            at_sentinel(&mut r).await;
            let mut want = info();
            want.registration_time = 0;
            want.ultimate = false;
            if version.minor() < 4 {
                (want.nar_hash, want.ca, want.sigs) =
                    (Hash::digest(HashAlgo::Sha256, b""), None, BTreeSet::new());
            }
            assert_eq!(
                back,
                vec![ValidPathInfo {
                    path: path("a"),
                    info: want
                }]
            );
        }
    }

    #[tokio::test]
    async fn path_info_hashes_are_prefixed_nixbase32() {
        let mut w = writer();
        write_path_info(&mut w, SERVE_PROTOCOL_VERSION, &path("a"), &info())
            .await
            .unwrap();
        w.flush().await.unwrap();
        let hash = info().nar_hash.to_prefixed_nixbase32();
        assert!(hash.starts_with("sha256:"));
        let bytes = w.into_inner();
        assert!(bytes.windows(hash.len()).any(|w| w == hash.as_bytes()));
    }

    #[tokio::test]
    async fn too_many_path_infos_are_refused() {
        let mut w = writer();
        for name in ["a", "b", "c"] {
            write_path_info(&mut w, SERVE_PROTOCOL_VERSION, &path(name), &info())
                .await
                .unwrap();
        }
        write_path_infos_end(&mut w).await.unwrap();
        w.flush().await.unwrap();
        let bytes = w.into_inner();
        let limited = |max_collection| {
            NixReader::new(std::io::Cursor::new(bytes.clone()), NIX_2_8).with_limits(
                crate::Limits {
                    max_collection,
                    ..crate::Limits::default()
                },
            )
        };
        // The positive control: a limit that fits reads all three.
        let all = read_path_infos(&mut limited(3), SERVE_PROTOCOL_VERSION).await;
        assert_eq!(all.unwrap().len(), 3);
        let refused = read_path_infos(&mut limited(2), SERVE_PROTOCOL_VERSION).await;
        assert!(matches!(
            refused,
            Err(ServeError::Wire(WireError::TooMany { .. }))
        ));
    }

    #[tokio::test]
    async fn build_results_round_trip_at_every_gate() {
        let mut full = BuildResult::new(BuildStatus::Built);
        full.times_built = 1;
        full.start_time = 10;
        full.stop_time = 12;
        full.built_outputs.insert(
            "sha256:00!out".into(),
            Realisation {
                dependent_realisations: BTreeMap::new(),
                id: "sha256:00!out".into(),
                out_path: path("x").to_string(),
                signatures: BTreeSet::new(),
            },
        );
        for version in VERSIONS {
            let mut w = writer();
            write_build_result(&mut w, version, &full).await.unwrap();
            let mut r = reader_of(w).await;
            let back = read_build_result(&mut r, version).await.unwrap();
            at_sentinel(&mut r).await;
            let mut want = full.clone();
            if version.minor() < 3 {
                (want.times_built, want.start_time, want.stop_time) = (0, 0, 0);
            }
            if version.minor() < 6 {
                want.built_outputs.clear();
            }
            assert_eq!(back, want, "at {version}");
        }
    }

    #[tokio::test]
    async fn build_paths_replies_carry_a_message_only_on_failure() {
        for reply in [
            BuildPathsReply::Success,
            BuildPathsReply::Failure {
                status: 100,
                message: "build of x failed".into(),
            },
        ] {
            let mut w = writer();
            reply.write(&mut w).await.unwrap();
            let mut r = reader_of(w).await;
            assert_eq!(BuildPathsReply::read(&mut r).await.unwrap(), reply);
            at_sentinel(&mut r).await;
        }
    }

    #[tokio::test]
    async fn export_trailers_round_trip_and_drop_a_legacy_signature() {
        let trailer = ExportTrailer {
            path: path("a"),
            references: [path("b")].into(),
            deriver: None,
        };
        let mut w = writer();
        write_export_next(&mut w).await.unwrap();
        trailer.write(&mut w).await.unwrap();
        write_export_end(&mut w).await.unwrap();
        let mut r = reader_of(w).await;
        assert!(read_export_next(&mut r).await.unwrap());
        assert_eq!(ExportTrailer::read(&mut r).await.unwrap(), trailer);
        assert!(!read_export_next(&mut r).await.unwrap());
        at_sentinel(&mut r).await;

        // A trailer with a signature (as Nix before 2.0 wrote them).
        let mut w = writer();
        w.write_u64(EXPORT_MAGIC, "magic").await.unwrap();
        w.write_store_path(&path("a"), "path").await.unwrap();
        w.write_store_paths(&trailer.references, "refs")
            .await
            .unwrap();
        w.write_str("", "deriver").await.unwrap();
        w.write_u64(1, "sig").await.unwrap();
        w.write_str("sig", "sig").await.unwrap();
        let mut r = reader_of(w).await;
        assert_eq!(ExportTrailer::read(&mut r).await.unwrap(), trailer);
        at_sentinel(&mut r).await;

        let mut w = writer();
        w.write_u64(2, "item").await.unwrap();
        w.write_u64(EXPORT_MAGIC + 1, "magic").await.unwrap();
        let mut r = reader_of(w).await;
        assert!(matches!(
            read_export_next(&mut r).await,
            Err(ServeError::NotAnExport)
        ));
        assert!(matches!(
            ExportTrailer::read(&mut r).await,
            Err(ServeError::ExportMagic)
        ));
    }

    #[tokio::test]
    async fn handshake_both_sides() {
        let (c, s) = tokio::io::duplex(1024);
        let (cr, cw) = tokio::io::split(c);
        let (sr, sw) = tokio::io::split(s);
        let server = tokio::spawn(async move {
            let mut r = NixReader::new(sr, NIX_2_8);
            let mut w = NixWriter::new(sw, NIX_2_8);
            server_handshake(&mut r, &mut w).await.unwrap()
        });
        let mut r = NixReader::new(cr, NIX_2_8);
        let mut w = NixWriter::new(cw, NIX_2_8);
        let theirs = client_handshake(&mut r, &mut w, ServeVersion::from_wire(0x205))
            .await
            .unwrap();
        assert_eq!(theirs, SERVE_PROTOCOL_VERSION);
        assert_eq!(server.await.unwrap(), ServeVersion::from_wire(0x205));
    }

    #[tokio::test]
    async fn a_worker_protocol_client_is_refused_at_the_magic_number() {
        let mut w = writer();
        w.write_u64(0x6e69_7863, "worker magic").await.unwrap();
        let mut r = reader_of(w).await;
        let mut out = writer();
        let refused = server_handshake(&mut r, &mut out).await;
        assert!(matches!(
            refused,
            Err(ServeError::Magic { got: 0x6e69_7863 })
        ));
        // Nothing was answered.
        out.flush().await.unwrap();
        assert!(out.into_inner().is_empty());
    }

    #[test]
    fn commands_are_numbered_as_in_nix_and_write_commands_are_named() {
        for n in 1..=9 {
            assert_eq!(ServeCommand::from_wire(n).unwrap() as u64, n);
        }
        assert!(matches!(
            ServeCommand::from_wire(10),
            Err(ServeError::UnknownCommand(10))
        ));
        let refused: Vec<u64> = (1..=9)
            .filter(|n| {
                ServeCommand::from_wire(*n)
                    .unwrap()
                    .refused_without_write()
                    .is_some()
            })
            .collect();
        assert_eq!(refused, [4, 6, 8, 9]);
    }

    #[tokio::test]
    async fn add_to_store_nar_without_a_nar_size_is_refused() {
        let mut info = ValidPathInfo {
            path: path("a"),
            info: info(),
        };
        info.info.nar_size = 0;
        let mut w = writer();
        ServeRequest::AddToStoreNar(info)
            .write(&mut w, SERVE_PROTOCOL_VERSION)
            .await
            .unwrap();
        let mut r = reader_of(w).await;
        let read = ServeRequest::read(&mut r, SERVE_PROTOCOL_VERSION).await;
        assert!(matches!(read, Err(ServeError::NoNarSize)));
    }
}
