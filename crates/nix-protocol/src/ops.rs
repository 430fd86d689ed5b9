//! Operation numbers and request bodies.
//!
//! [`Opcode`] lists every operation number Nix has assigned (including obsolete and removed
//! ones, so that a server can name what it refuses). [`Request`] models the bodies of the
//! operations this crate's client sends; [`Request::read`] lets a server decode them and
//! [`Request::write`] is what the client uses, so both sides share one codec. Data that
//! follows a request body (the NAR of `AddToStoreNar`, the framed stream of
//! `AddMultipleToStore`) is not part of the request: see [`crate::framed`].

use std::collections::{BTreeMap, BTreeSet};

use nixspace_nix_formats::store_path::StorePath;
use tokio::io::{AsyncRead, AsyncWrite};

use nixspace_nix_formats::derivation::BasicDerivation;

use crate::build_mode::BuildMode;
use crate::client_settings::ClientSettings;
use crate::derivation::read_basic_derivation;
use crate::derived_path::DerivedPath;
use crate::path_info::ValidPathInfo;
use crate::realisation::Realisation;
use crate::version::{
    ProtocolVersion, ADD_BUILD_LOG, ADD_MULTIPLE_TO_STORE, ADD_TO_STORE_FRAMED,
    BUILD_PATHS_WITH_RESULTS, QUERY_VALID_PATHS_SUBSTITUTE, REGISTER_DRV_OUTPUT_JSON,
    SUBSTITUTABLE_INFOS_CA,
};
use crate::wire::{NixDeserialize, NixReader, NixSerialize, NixWriter, WireError};

/// A number read where an opcode was expected that names no Nix operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown worker operation {0}")]
pub struct UnknownOpcode(pub u64);

macro_rules! opcodes {
    ($( $(#[$doc:meta])* $name:ident = $num:literal, )*) => {
        /// A worker-protocol operation, numbered as in Nix's `worker-protocol.hh`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u64)]
        pub enum Opcode {
            $( $(#[$doc])* $name = $num, )*
        }

        impl TryFrom<u64> for Opcode {
            type Error = UnknownOpcode;
            fn try_from(n: u64) -> Result<Self, UnknownOpcode> {
                match n {
                    $( $num => Ok(Opcode::$name), )*
                    other => Err(UnknownOpcode(other)),
                }
            }
        }

        impl Opcode {
            /// Every opcode, in numeric order.
            pub const ALL: &'static [Opcode] = &[$( Opcode::$name, )*];
        }
    };
}

opcodes! {
    /// Is a path valid? path → bool.
    IsValidPath = 1,
    /// Obsolete (removed in later Nix).
    HasSubstitutes = 3,
    /// Obsolete.
    QueryPathHash = 4,
    /// Obsolete.
    QueryReferences = 5,
    /// Paths referring to a path.
    QueryReferrers = 6,
    /// Add a path from a dump (content-addressed).
    AddToStore = 7,
    /// Obsolete since 1.25 (use AddToStore).
    AddTextToStore = 8,
    /// Build derived paths.
    BuildPaths = 9,
    /// Make a path valid (substitute it).
    EnsurePath = 10,
    /// Add a temporary GC root.
    AddTempRoot = 11,
    /// Add an indirect GC root.
    AddIndirectRoot = 12,
    /// Obsolete no-op.
    SyncWithGC = 13,
    /// List GC roots.
    FindRoots = 14,
    /// Obsolete.
    ExportPath = 16,
    /// Obsolete.
    QueryDeriver = 18,
    /// Send client settings.
    SetOptions = 19,
    /// Run the garbage collector.
    CollectGarbage = 20,
    /// Substitutable path info (single).
    QuerySubstitutablePathInfo = 21,
    /// Obsolete.
    QueryDerivationOutputs = 22,
    /// All valid paths.
    QueryAllValidPaths = 23,
    /// Obsolete.
    QueryFailedPaths = 24,
    /// Obsolete.
    ClearFailedPaths = 25,
    /// Path info of a path.
    QueryPathInfo = 26,
    /// Obsolete.
    ImportPaths = 27,
    /// Obsolete.
    QueryDerivationOutputNames = 28,
    /// Find a path by its hash part.
    QueryPathFromHashPart = 29,
    /// Substitutable path infos (many).
    QuerySubstitutablePathInfos = 30,
    /// Which of these paths are valid.
    QueryValidPaths = 31,
    /// Which of these paths are substitutable.
    QuerySubstitutablePaths = 32,
    /// Valid derivers of a path.
    QueryValidDerivers = 33,
    /// Deduplicate the store.
    OptimiseStore = 34,
    /// Verify the store.
    VerifyStore = 35,
    /// Build a derivation sent inline.
    BuildDerivation = 36,
    /// Add signatures to a path.
    AddSignatures = 37,
    /// Dump a path as a NAR.
    NarFromPath = 38,
    /// Add a path from a NAR with its path info.
    AddToStoreNar = 39,
    /// What would be built/substituted.
    QueryMissing = 40,
    /// Output paths of a derivation.
    QueryDerivationOutputMap = 41,
    /// Register a realisation.
    RegisterDrvOutput = 42,
    /// Look up a realisation.
    QueryRealisation = 43,
    /// Add many paths from one framed stream (1.32).
    AddMultipleToStore = 44,
    /// Upload a build log.
    AddBuildLog = 45,
    /// Build derived paths, returning results (1.34).
    BuildPathsWithResults = 46,
    /// Add a permanent GC root (newer Nix).
    AddPermRoot = 47,
}

/// A decoded request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `SetOptions`.
    SetOptions(ClientSettings),
    /// `IsValidPath`.
    IsValidPath(StorePath),
    /// `QueryValidPaths` (`substitute` is on the wire from 1.27).
    QueryValidPaths {
        /// The paths to check.
        paths: BTreeSet<StorePath>,
        /// Whether the daemon may substitute missing ones.
        substitute: bool,
    },
    /// `QueryPathInfo`.
    QueryPathInfo(StorePath),
    /// `NarFromPath`; the reply NAR follows `STDERR_LAST` unframed.
    NarFromPath(StorePath),
    /// `AddToStoreNar`; the NAR follows (framed from 1.23, pulled by `STDERR_READ` before).
    AddToStoreNar {
        /// The path and its info.
        info: ValidPathInfo,
        /// Repair an existing path.
        repair: bool,
        /// Skip signature checks (trusted clients only).
        dont_check_sigs: bool,
    },
    /// `AddMultipleToStore` (1.32); a framed stream follows.
    AddMultipleToStore {
        /// Repair existing paths.
        repair: bool,
        /// Skip signature checks.
        dont_check_sigs: bool,
    },
    /// `BuildDerivation`.
    BuildDerivation {
        /// The `.drv` path (names the derivation).
        drv_path: StorePath,
        /// The derivation.
        drv: BasicDerivation,
        /// The build mode.
        mode: BuildMode,
    },
    /// `BuildPaths`.
    BuildPaths {
        /// What to build.
        paths: Vec<DerivedPath>,
        /// The build mode.
        mode: BuildMode,
    },
    /// `BuildPathsWithResults` (1.34).
    BuildPathsWithResults {
        /// What to build.
        paths: Vec<DerivedPath>,
        /// The build mode.
        mode: BuildMode,
    },
    /// `EnsurePath`.
    EnsurePath(StorePath),
    /// `AddTempRoot`.
    AddTempRoot(StorePath),
    /// `QueryAllValidPaths`.
    QueryAllValidPaths,
    /// `AddToStore` in its 1.25+ form; the dump follows as a framed stream.
    AddToStore {
        /// The name of the new path.
        name: String,
        /// The content-address method and hash algorithm (`text:sha256`, `fixed:r:sha256`…).
        cam_str: String,
        /// Its references.
        references: BTreeSet<StorePath>,
        /// Repair an existing path.
        repair: bool,
    },
    /// `AddTextToStore` (obsolete since 1.25, still served).
    AddTextToStore {
        /// The name of the new path.
        suffix: String,
        /// The file's contents.
        text: Vec<u8>,
        /// Its references.
        references: BTreeSet<StorePath>,
    },
    /// `QueryMissing`: what would be built, substituted or is unknown.
    QueryMissing(Vec<DerivedPath>),
    /// `QueryDerivationOutputMap`: the output paths of a derivation.
    QueryDerivationOutputMap(StorePath),
    /// `AddIndirectRoot`: a filesystem path (a symlink into the store) to register.
    AddIndirectRoot(String),
    /// `AddPermRoot` (newer Nix).
    AddPermRoot {
        /// The path to protect.
        path: StorePath,
        /// Where the root symlink goes.
        gc_root: String,
    },
    /// `QueryReferrers`.
    QueryReferrers(StorePath),
    /// `QueryValidDerivers`.
    QueryValidDerivers(StorePath),
    /// `QuerySubstitutablePaths`.
    QuerySubstitutablePaths(BTreeSet<StorePath>),
    /// `QueryPathFromHashPart`.
    QueryPathFromHashPart(String),
    /// `SyncWithGC` (a no-op in current Nix).
    SyncWithGC,
    /// `FindRoots`.
    FindRoots,
    /// `OptimiseStore`.
    OptimiseStore,
    /// `VerifyStore`.
    VerifyStore {
        /// Check the contents against their hashes.
        check_contents: bool,
        /// Repair what is broken.
        repair: bool,
    },
    /// `AddSignatures`.
    AddSignatures {
        /// The path.
        path: StorePath,
        /// The signatures to add.
        sigs: Vec<String>,
    },
    /// `QueryRealisation`: a `DrvOutput` id (`sha256:<hex>!<output>`).
    QueryRealisation(String),
    /// `RegisterDrvOutput`: a realisation to record (before 1.31 only its id and path travel).
    RegisterDrvOutput(Realisation),
    /// `AddToStore` in its pre-1.25 form; a NAR follows, unframed.
    AddToStoreLegacy {
        /// The name of the new path.
        name: String,
        /// Obsolete: false makes the daemon hash recursively with SHA-256 whatever follows.
        fixed: bool,
        /// Hash the NAR (true) or the single regular file inside it (false).
        recursive: bool,
        /// The hash algorithm (`sha256`…).
        hash_algo: String,
    },
    /// `QuerySubstitutablePathInfo`: what a substituter knows about one path.
    QuerySubstitutablePathInfo(StorePath),
    /// `QuerySubstitutablePathInfos`: paths with their content addresses (sent from 1.22;
    /// before that only the paths travel and every address reads as `None`).
    QuerySubstitutablePathInfos(BTreeMap<StorePath, Option<String>>),
    /// `CollectGarbage`.
    CollectGarbage {
        /// Nix's `GCAction`: 0 return live, 1 return dead, 2 delete dead, 3 delete specific.
        action: u64,
        /// The paths for action 3.
        paths_to_delete: BTreeSet<StorePath>,
        /// Ignore liveness (Nix always refuses this over the daemon protocol).
        ignore_liveness: bool,
        /// Stop after freeing this many bytes (0: no limit).
        max_freed: u64,
    },
    /// `AddBuildLog` (1.32): the log of a derivation follows as a framed stream.
    AddBuildLog(StorePath),
}

fn require(
    version: ProtocolVersion,
    needed: ProtocolVersion,
    what: &'static str,
) -> Result<(), WireError> {
    if version < needed {
        Err(WireError::NotAtThisVersion { what, version })
    } else {
        Ok(())
    }
}

async fn read_derived_paths<R: AsyncRead + Unpin + Send>(
    r: &mut NixReader<R>,
) -> Result<Vec<DerivedPath>, WireError> {
    let n = r.read_count("derived paths").await?;
    let mut out = Vec::with_capacity(n.min(1024) as usize);
    for _ in 0..n {
        out.push(DerivedPath::read_from(r).await?);
    }
    Ok(out)
}

async fn write_derived_paths<W: AsyncWrite + Unpin + Send>(
    w: &mut NixWriter<W>,
    paths: &[DerivedPath],
) -> Result<(), WireError> {
    w.write_u64(paths.len() as u64, "derived paths").await?;
    for p in paths {
        p.write_to(w).await?;
    }
    Ok(())
}

impl Request {
    /// The operation this request belongs to.
    pub fn opcode(&self) -> Opcode {
        match self {
            Request::SetOptions(_) => Opcode::SetOptions,
            Request::IsValidPath(_) => Opcode::IsValidPath,
            Request::QueryValidPaths { .. } => Opcode::QueryValidPaths,
            Request::QueryPathInfo(_) => Opcode::QueryPathInfo,
            Request::NarFromPath(_) => Opcode::NarFromPath,
            Request::AddToStoreNar { .. } => Opcode::AddToStoreNar,
            Request::AddMultipleToStore { .. } => Opcode::AddMultipleToStore,
            Request::BuildDerivation { .. } => Opcode::BuildDerivation,
            Request::BuildPaths { .. } => Opcode::BuildPaths,
            Request::BuildPathsWithResults { .. } => Opcode::BuildPathsWithResults,
            Request::EnsurePath(_) => Opcode::EnsurePath,
            Request::AddTempRoot(_) => Opcode::AddTempRoot,
            Request::QueryAllValidPaths => Opcode::QueryAllValidPaths,
            Request::AddToStore { .. } => Opcode::AddToStore,
            Request::AddTextToStore { .. } => Opcode::AddTextToStore,
            Request::QueryMissing(_) => Opcode::QueryMissing,
            Request::QueryDerivationOutputMap(_) => Opcode::QueryDerivationOutputMap,
            Request::AddIndirectRoot(_) => Opcode::AddIndirectRoot,
            Request::AddPermRoot { .. } => Opcode::AddPermRoot,
            Request::QueryReferrers(_) => Opcode::QueryReferrers,
            Request::QueryValidDerivers(_) => Opcode::QueryValidDerivers,
            Request::QuerySubstitutablePaths(_) => Opcode::QuerySubstitutablePaths,
            Request::QueryPathFromHashPart(_) => Opcode::QueryPathFromHashPart,
            Request::SyncWithGC => Opcode::SyncWithGC,
            Request::FindRoots => Opcode::FindRoots,
            Request::OptimiseStore => Opcode::OptimiseStore,
            Request::VerifyStore { .. } => Opcode::VerifyStore,
            Request::AddSignatures { .. } => Opcode::AddSignatures,
            Request::QueryRealisation(_) => Opcode::QueryRealisation,
            Request::RegisterDrvOutput(_) => Opcode::RegisterDrvOutput,
            Request::AddToStoreLegacy { .. } => Opcode::AddToStore,
            Request::QuerySubstitutablePathInfo(_) => Opcode::QuerySubstitutablePathInfo,
            Request::QuerySubstitutablePathInfos(_) => Opcode::QuerySubstitutablePathInfos,
            Request::CollectGarbage { .. } => Opcode::CollectGarbage,
            Request::AddBuildLog(_) => Opcode::AddBuildLog,
        }
    }

    /// Reads the next request (opcode and body). `Ok(None)` means the client closed the
    /// connection cleanly between operations. A known opcode without a modelled body gives
    /// [`WireError::UnsupportedOp`]; the connection cannot continue after that.
    pub async fn read<R: AsyncRead + Unpin + Send>(
        r: &mut NixReader<R>,
    ) -> Result<Option<Request>, WireError> {
        let Some(n) = r.try_read_u64("opcode").await? else {
            return Ok(None);
        };
        let op = Opcode::try_from(n)?;
        let v = r.version();
        Ok(Some(match op {
            Opcode::SetOptions => Request::SetOptions(ClientSettings::read_from(r).await?),
            Opcode::IsValidPath => Request::IsValidPath(r.read_store_path("path").await?),
            Opcode::QueryValidPaths => {
                let paths = r.read_store_path_set("paths").await?;
                let substitute = if v >= QUERY_VALID_PATHS_SUBSTITUTE {
                    r.read_bool("substitute").await?
                } else {
                    false
                };
                Request::QueryValidPaths { paths, substitute }
            }
            Opcode::QueryPathInfo => Request::QueryPathInfo(r.read_store_path("path").await?),
            Opcode::NarFromPath => Request::NarFromPath(r.read_store_path("path").await?),
            Opcode::AddToStoreNar => Request::AddToStoreNar {
                info: ValidPathInfo::read_from(r).await?,
                repair: r.read_bool("repair").await?,
                dont_check_sigs: r.read_bool("dontCheckSigs").await?,
            },
            Opcode::AddMultipleToStore => {
                require(v, ADD_MULTIPLE_TO_STORE, "AddMultipleToStore")?;
                Request::AddMultipleToStore {
                    repair: r.read_bool("repair").await?,
                    dont_check_sigs: r.read_bool("dontCheckSigs").await?,
                }
            }
            Opcode::BuildDerivation => {
                let drv_path = r.read_store_path("drvPath").await?;
                Request::BuildDerivation {
                    drv: read_basic_derivation(r, &drv_path).await?,
                    drv_path,
                    mode: BuildMode::read_from(r).await?,
                }
            }
            Opcode::BuildPaths => Request::BuildPaths {
                paths: read_derived_paths(r).await?,
                mode: BuildMode::read_from(r).await?,
            },
            Opcode::BuildPathsWithResults => {
                require(v, BUILD_PATHS_WITH_RESULTS, "BuildPathsWithResults")?;
                Request::BuildPathsWithResults {
                    paths: read_derived_paths(r).await?,
                    mode: BuildMode::read_from(r).await?,
                }
            }
            Opcode::EnsurePath => Request::EnsurePath(r.read_store_path("path").await?),
            Opcode::AddTempRoot => Request::AddTempRoot(r.read_store_path("path").await?),
            Opcode::QueryAllValidPaths => Request::QueryAllValidPaths,
            Opcode::AddToStore if v >= ADD_TO_STORE_FRAMED => Request::AddToStore {
                name: r.read_string("name").await?,
                cam_str: r.read_string("camStr").await?,
                references: r.read_store_path_set("references").await?,
                repair: r.read_bool("repair").await?,
            },
            Opcode::AddToStore => Request::AddToStoreLegacy {
                name: r.read_string("baseName").await?,
                fixed: r.read_bool("fixed").await?,
                recursive: r.read_bool("recursive").await?,
                hash_algo: r.read_string("hashAlgo").await?,
            },
            Opcode::QuerySubstitutablePathInfo => {
                Request::QuerySubstitutablePathInfo(r.read_store_path("path").await?)
            }
            Opcode::QuerySubstitutablePathInfos if v >= SUBSTITUTABLE_INFOS_CA => {
                let n = r.read_count("paths").await?;
                let mut paths = BTreeMap::new();
                for _ in 0..n {
                    let path = r.read_store_path("path").await?;
                    let ca = r.read_string("ca").await?;
                    paths.insert(path, Some(ca).filter(|c| !c.is_empty()));
                }
                Request::QuerySubstitutablePathInfos(paths)
            }
            Opcode::QuerySubstitutablePathInfos => Request::QuerySubstitutablePathInfos(
                r.read_store_path_set("paths")
                    .await?
                    .into_iter()
                    .map(|p| (p, None))
                    .collect(),
            ),
            Opcode::CollectGarbage => {
                let req = Request::CollectGarbage {
                    action: r.read_u64("action").await?,
                    paths_to_delete: r.read_store_path_set("pathsToDelete").await?,
                    ignore_liveness: r.read_bool("ignoreLiveness").await?,
                    max_freed: r.read_u64("maxFreed").await?,
                };
                for _ in 0..3 {
                    r.read_u64("obsolete GC field").await?;
                }
                req
            }
            Opcode::AddBuildLog => {
                require(v, ADD_BUILD_LOG, "AddBuildLog")?;
                // The base name, without the store directory.
                let name = r.read_string("drvPath").await?;
                let path =
                    StorePath::from_base_name(&name).map_err(|source| WireError::StorePath {
                        what: "drvPath",
                        source,
                    })?;
                Request::AddBuildLog(path)
            }
            Opcode::AddTextToStore => Request::AddTextToStore {
                suffix: r.read_string("suffix").await?,
                text: r.read_bytes("text").await?,
                references: r.read_store_path_set("references").await?,
            },
            Opcode::QueryMissing => Request::QueryMissing(read_derived_paths(r).await?),
            Opcode::QueryDerivationOutputMap => {
                Request::QueryDerivationOutputMap(r.read_store_path("path").await?)
            }
            Opcode::AddIndirectRoot => Request::AddIndirectRoot(r.read_string("path").await?),
            Opcode::AddPermRoot => Request::AddPermRoot {
                path: r.read_store_path("path").await?,
                gc_root: r.read_string("gcRoot").await?,
            },
            Opcode::QueryReferrers => Request::QueryReferrers(r.read_store_path("path").await?),
            Opcode::QueryValidDerivers => {
                Request::QueryValidDerivers(r.read_store_path("path").await?)
            }
            Opcode::QuerySubstitutablePaths => {
                Request::QuerySubstitutablePaths(r.read_store_path_set("paths").await?)
            }
            Opcode::QueryPathFromHashPart => {
                Request::QueryPathFromHashPart(r.read_string("hashPart").await?)
            }
            Opcode::SyncWithGC => Request::SyncWithGC,
            Opcode::FindRoots => Request::FindRoots,
            Opcode::OptimiseStore => Request::OptimiseStore,
            Opcode::VerifyStore => Request::VerifyStore {
                check_contents: r.read_bool("checkContents").await?,
                repair: r.read_bool("repair").await?,
            },
            Opcode::AddSignatures => Request::AddSignatures {
                path: r.read_store_path("path").await?,
                sigs: r.read_strings("sigs").await?,
            },
            Opcode::QueryRealisation => Request::QueryRealisation(r.read_string("outputId").await?),
            Opcode::RegisterDrvOutput if v >= REGISTER_DRV_OUTPUT_JSON => {
                Request::RegisterDrvOutput(Realisation::read_from(r).await?)
            }
            Opcode::RegisterDrvOutput => Request::RegisterDrvOutput(Realisation {
                dependent_realisations: BTreeMap::new(),
                id: r.read_string("outputId").await?,
                out_path: r.read_string("outputPath").await?,
                signatures: BTreeSet::new(),
            }),
            other => return Err(WireError::UnsupportedOp(other)),
        }))
    }

    /// Writes the opcode and the body (into the writer's buffer).
    pub async fn write<W: AsyncWrite + Unpin + Send>(
        &self,
        w: &mut NixWriter<W>,
    ) -> Result<(), WireError> {
        let v = w.version();
        match self {
            Request::AddMultipleToStore { .. } => {
                require(v, ADD_MULTIPLE_TO_STORE, "AddMultipleToStore")?
            }
            Request::BuildPathsWithResults { .. } => {
                require(v, BUILD_PATHS_WITH_RESULTS, "BuildPathsWithResults")?
            }
            Request::AddToStore { .. } => require(v, ADD_TO_STORE_FRAMED, "AddToStore")?,
            Request::AddToStoreLegacy { .. } if v >= ADD_TO_STORE_FRAMED => {
                return Err(WireError::NotAtThisVersion {
                    what: "AddToStore in its pre-1.25 form",
                    version: v,
                })
            }
            Request::AddBuildLog(_) => require(v, ADD_BUILD_LOG, "AddBuildLog")?,
            _ => {}
        }
        w.write_u64(self.opcode() as u64, "opcode").await?;
        match self {
            Request::SetOptions(s) => s.write_to(w).await,
            Request::IsValidPath(p)
            | Request::QueryPathInfo(p)
            | Request::NarFromPath(p)
            | Request::EnsurePath(p)
            | Request::AddTempRoot(p)
            | Request::QueryDerivationOutputMap(p)
            | Request::QueryReferrers(p)
            | Request::QueryValidDerivers(p)
            | Request::QuerySubstitutablePathInfo(p) => w.write_store_path(p, "path").await,
            Request::QueryValidPaths { paths, substitute } => {
                w.write_store_paths(paths, "paths").await?;
                if v >= QUERY_VALID_PATHS_SUBSTITUTE {
                    w.write_bool(*substitute, "substitute").await?;
                }
                Ok(())
            }
            Request::AddToStoreNar {
                info,
                repair,
                dont_check_sigs,
            } => {
                info.write_to(w).await?;
                w.write_bool(*repair, "repair").await?;
                w.write_bool(*dont_check_sigs, "dontCheckSigs").await
            }
            Request::AddMultipleToStore {
                repair,
                dont_check_sigs,
            } => {
                w.write_bool(*repair, "repair").await?;
                w.write_bool(*dont_check_sigs, "dontCheckSigs").await
            }
            Request::BuildDerivation {
                drv_path,
                drv,
                mode,
            } => {
                w.write_store_path(drv_path, "drvPath").await?;
                drv.write_to(w).await?;
                mode.write_to(w).await
            }
            Request::BuildPaths { paths, mode }
            | Request::BuildPathsWithResults { paths, mode } => {
                write_derived_paths(w, paths).await?;
                mode.write_to(w).await
            }
            Request::QueryAllValidPaths
            | Request::SyncWithGC
            | Request::FindRoots
            | Request::OptimiseStore => Ok(()),
            Request::AddToStore {
                name,
                cam_str,
                references,
                repair,
            } => {
                w.write_str(name, "name").await?;
                w.write_str(cam_str, "camStr").await?;
                w.write_store_paths(references, "references").await?;
                w.write_bool(*repair, "repair").await
            }
            Request::AddTextToStore {
                suffix,
                text,
                references,
            } => {
                w.write_str(suffix, "suffix").await?;
                w.write_bytes(text, "text").await?;
                w.write_store_paths(references, "references").await
            }
            Request::QueryMissing(paths) => write_derived_paths(w, paths).await,
            Request::AddIndirectRoot(path) => w.write_str(path, "path").await,
            Request::AddPermRoot { path, gc_root } => {
                w.write_store_path(path, "path").await?;
                w.write_str(gc_root, "gcRoot").await
            }
            Request::QuerySubstitutablePaths(paths) => w.write_store_paths(paths, "paths").await,
            Request::QueryPathFromHashPart(s) => w.write_str(s, "hashPart").await,
            Request::QueryRealisation(s) => w.write_str(s, "outputId").await,
            Request::RegisterDrvOutput(r) if w.version() >= REGISTER_DRV_OUTPUT_JSON => {
                r.write_to(w).await
            }
            Request::RegisterDrvOutput(r) => {
                w.write_str(&r.id, "outputId").await?;
                w.write_str(&r.out_path, "outputPath").await
            }
            Request::VerifyStore {
                check_contents,
                repair,
            } => {
                w.write_bool(*check_contents, "checkContents").await?;
                w.write_bool(*repair, "repair").await
            }
            Request::AddSignatures { path, sigs } => {
                w.write_store_path(path, "path").await?;
                w.write_strings(sigs, "sigs").await
            }
            Request::AddToStoreLegacy {
                name,
                fixed,
                recursive,
                hash_algo,
            } => {
                w.write_str(name, "baseName").await?;
                w.write_bool(*fixed, "fixed").await?;
                w.write_bool(*recursive, "recursive").await?;
                w.write_str(hash_algo, "hashAlgo").await
            }
            Request::QuerySubstitutablePathInfos(paths) if v >= SUBSTITUTABLE_INFOS_CA => {
                w.write_u64(paths.len() as u64, "paths").await?;
                for (path, ca) in paths {
                    w.write_store_path(path, "path").await?;
                    w.write_str(ca.as_deref().unwrap_or(""), "ca").await?;
                }
                Ok(())
            }
            Request::QuerySubstitutablePathInfos(paths) => {
                w.write_store_paths(paths.keys(), "paths").await
            }
            Request::CollectGarbage {
                action,
                paths_to_delete,
                ignore_liveness,
                max_freed,
            } => {
                w.write_u64(*action, "action").await?;
                w.write_store_paths(paths_to_delete, "pathsToDelete")
                    .await?;
                w.write_bool(*ignore_liveness, "ignoreLiveness").await?;
                w.write_u64(*max_freed, "maxFreed").await?;
                for _ in 0..3 {
                    w.write_u64(0, "obsolete GC field").await?;
                }
                Ok(())
            }
            Request::AddBuildLog(path) => w.write_str(&path.to_string(), "drvPath").await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opcodes_round_trip_and_unknown_numbers_are_named() {
        for op in Opcode::ALL {
            assert_eq!(Opcode::try_from(*op as u64), Ok(*op));
        }
        assert_eq!(Opcode::AddMultipleToStore as u64, 44);
        let err = Opcode::try_from(2).unwrap_err();
        assert_eq!(err.to_string(), "unknown worker operation 2");
        assert!(Opcode::try_from(u64::MAX).is_err());
    }
}

#[cfg(test)]
mod round_trip {
    use super::*;
    use crate::derived_path::OutputSpec;
    use crate::version::NIX_2_8;

    fn path(name: &str) -> StorePath {
        StorePath::from_base_name(&format!("7rjj86a15146cq4nsd2q3v4n7ks1hkgn-{name}")).unwrap()
    }

    async fn round_trip(req: Request) {
        round_trip_at(req, NIX_2_8).await
    }

    async fn round_trip_at(req: Request, version: ProtocolVersion) {
        let mut w = NixWriter::new(Vec::new(), version);
        req.write(&mut w).await.unwrap();
        w.write_u64(0xfeed, "sentinel").await.unwrap();
        w.flush().await.unwrap();
        let mut r = NixReader::new(std::io::Cursor::new(w.into_inner()), version);
        let back = Request::read(&mut r).await.unwrap().unwrap();
        assert_eq!(back, req);
        // The body was consumed exactly.
        assert_eq!(r.read_u64("sentinel").await.unwrap(), 0xfeed);
    }

    #[tokio::test]
    async fn new_requests_round_trip() {
        let refs: BTreeSet<StorePath> = [path("a"), path("b")].into();
        for req in [
            Request::AddToStore {
                name: "x.drv".into(),
                cam_str: "text:sha256".into(),
                references: refs.clone(),
                repair: false,
            },
            Request::AddTextToStore {
                suffix: "x.drv".into(),
                text: b"Derive(...)".to_vec(),
                references: refs.clone(),
            },
            Request::QueryMissing(vec![
                DerivedPath::Opaque(path("a")),
                DerivedPath::Built {
                    drv_path: path("x.drv"),
                    outputs: OutputSpec::All,
                },
            ]),
            Request::QueryDerivationOutputMap(path("x.drv")),
            Request::AddIndirectRoot("/tmp/result".into()),
            Request::AddPermRoot {
                path: path("a"),
                gc_root: "/tmp/r".into(),
            },
            Request::QueryReferrers(path("a")),
            Request::QueryValidDerivers(path("a")),
            Request::QuerySubstitutablePaths(refs.clone()),
            Request::QueryPathFromHashPart("7rjj86a15146cq4nsd2q3v4n7ks1hkgn".into()),
            Request::SyncWithGC,
            Request::FindRoots,
            Request::OptimiseStore,
            Request::VerifyStore {
                check_contents: true,
                repair: false,
            },
            Request::AddSignatures {
                path: path("a"),
                sigs: vec!["k:sig".into()],
            },
            Request::QueryRealisation("sha256:00!out".into()),
            Request::RegisterDrvOutput(Realisation {
                dependent_realisations: BTreeMap::new(),
                id: "sha256:00!out".into(),
                out_path: "7rjj86a15146cq4nsd2q3v4n7ks1hkgn-a".into(),
                signatures: BTreeSet::new(),
            }),
            Request::QuerySubstitutablePathInfo(path("a")),
            Request::QuerySubstitutablePathInfos(
                [
                    (path("a"), None),
                    (path("b"), Some("fixed:r:sha256:00".into())),
                ]
                .into(),
            ),
            Request::CollectGarbage {
                action: 3,
                paths_to_delete: refs.clone(),
                ignore_liveness: false,
                max_freed: 1 << 20,
            },
            Request::AddBuildLog(path("x.drv")),
        ] {
            round_trip(req).await;
        }
    }

    #[tokio::test]
    async fn version_dependent_forms_round_trip() {
        let old = ProtocolVersion::new(1, 21);
        let legacy = Request::AddToStoreLegacy {
            name: "x".into(),
            fixed: true,
            recursive: false,
            hash_algo: "sha256".into(),
        };
        round_trip_at(legacy.clone(), old).await;
        // At 1.21 substitutable infos travel without content addresses.
        let infos = Request::QuerySubstitutablePathInfos([(path("a"), None)].into());
        round_trip_at(infos, old).await;
        let mut w = NixWriter::new(Vec::new(), NIX_2_8);
        assert!(matches!(
            legacy.write(&mut w).await,
            Err(WireError::NotAtThisVersion { .. })
        ));
        let mut w = NixWriter::new(Vec::new(), old);
        assert!(matches!(
            Request::AddBuildLog(path("x.drv")).write(&mut w).await,
            Err(WireError::NotAtThisVersion { .. })
        ));
    }

    #[tokio::test]
    async fn build_logs_name_a_base_name() {
        let mut w = NixWriter::new(Vec::new(), NIX_2_8);
        Request::AddBuildLog(path("x.drv"))
            .write(&mut w)
            .await
            .unwrap();
        w.flush().await.unwrap();
        let bytes = w.into_inner();
        let name = "7rjj86a15146cq4nsd2q3v4n7ks1hkgn-x.drv";
        assert_eq!(&bytes[8..16], &(name.len() as u64).to_le_bytes());
        assert_eq!(&bytes[16..16 + name.len()], name.as_bytes());
        // A full path is not a base name.
        let mut w = NixWriter::new(Vec::new(), NIX_2_8);
        w.write_u64(Opcode::AddBuildLog as u64, "op").await.unwrap();
        w.write_str(&format!("/nix/store/{name}"), "p")
            .await
            .unwrap();
        w.flush().await.unwrap();
        let mut r = NixReader::new(std::io::Cursor::new(w.into_inner()), NIX_2_8);
        assert!(matches!(
            Request::read(&mut r).await,
            Err(WireError::StorePath { .. })
        ));
    }

    #[tokio::test]
    async fn old_add_to_store_is_refused_at_old_versions() {
        let req = Request::AddToStore {
            name: "x".into(),
            cam_str: "text:sha256".into(),
            references: BTreeSet::new(),
            repair: false,
        };
        let mut w = NixWriter::new(Vec::new(), crate::version::MIN_SUPPORTED);
        assert!(matches!(
            req.write(&mut w).await,
            Err(WireError::NotAtThisVersion { .. })
        ));
    }
}
