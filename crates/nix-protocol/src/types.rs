//! The protocol's compound values, each readable and writable at every supported version:
//! path infos, build results, derived paths, realisations, the `BasicDerivation` that
//! `BuildDerivation` carries, build modes and the `SetOptions` settings.
//!
//! Store paths are `nixspace-nix-formats`' [`StorePath`], parsed and printed against the
//! reader's or writer's store directory; the NAR hash is its
//! [`Hash`](struct@Hash) (always SHA-256).
//! Other strings that Nix parses further (content addresses, output hash algorithms,
//! signatures) are kept as strings here.

use std::collections::{BTreeMap, BTreeSet};

use nixspace_nix_formats::hash::{Hash, HashAlgo, HashError};
use nixspace_nix_formats::store_path::{StoreDir, StorePath};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::version::{
    BUILD_RESULT_BUILT_OUTPUTS, BUILD_RESULT_CPU_TIMES, BUILD_RESULT_TIMES, DERIVED_PATH_STRINGS,
    PATH_INFO_ULTIMATE_SIGS_CA,
};
use crate::wire::{NixDeserialize, NixReader, NixSerialize, NixWriter, WireError};

/// Reads a NAR hash. Nix 2.8 sends 64 lowercase hex digits without a prefix and reads with
/// `Hash::parseAny(s, htSHA256)`, so any SHA-256 form is accepted (bare or `sha256:`-prefixed
/// base-16, nixbase32 or base-64, or SRI); another algorithm is an error.
async fn read_nar_hash<R: AsyncRead + Unpin>(r: &mut NixReader<R>) -> Result<Hash, WireError> {
    let s = r.read_string("narHash").await?;
    Hash::parse_any(&s, Some(HashAlgo::Sha256)).map_err(|source| WireError::Hash {
        what: "narHash",
        source,
    })
}

/// Writes a NAR hash as unprefixed base-16, as Nix does; it must be SHA-256, since the peer
/// reads the unprefixed digest as SHA-256.
async fn write_nar_hash<W: AsyncWrite + Unpin>(
    w: &mut NixWriter<W>,
    hash: &Hash,
) -> Result<(), WireError> {
    if hash.algo() != HashAlgo::Sha256 {
        return Err(WireError::Hash {
            what: "narHash",
            source: HashError::AlgoMismatch {
                text: hash.to_string(),
                expected: HashAlgo::Sha256,
            },
        });
    }
    w.write_str(&hash.to_base16(), "narHash").await
}

/// What the daemon knows about a valid path, without the path itself (the reply of
/// `QueryPathInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    /// The derivation that produced the path, if known.
    pub deriver: Option<StorePath>,
    /// The SHA-256 hash of the path's NAR serialisation (writing another algorithm is an
    /// error).
    pub nar_hash: Hash,
    /// The paths it references.
    pub references: BTreeSet<StorePath>,
    /// Seconds since the epoch at registration.
    pub registration_time: u64,
    /// The size of the NAR serialisation.
    pub nar_size: u64,
    /// Whether the path was built locally and is trusted without signatures.
    pub ultimate: bool,
    /// Signatures, `key-name:base64`.
    pub sigs: BTreeSet<String>,
    /// The rendered content address (`fixed:r:sha256:…`, `text:sha256:…`), if any.
    pub ca: Option<String>,
}

/// A path with its [`PathInfo`] (what `AddToStoreNar` and `AddMultipleToStore` send).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidPathInfo {
    /// The path.
    pub path: StorePath,
    /// What is known about it.
    pub info: PathInfo,
}

impl NixDeserialize for PathInfo {
    async fn read_from<R: AsyncRead + Unpin + Send>(
        r: &mut NixReader<R>,
    ) -> Result<Self, WireError> {
        let deriver = r.read_opt_store_path("deriver").await?;
        let nar_hash = read_nar_hash(r).await?;
        let references = r.read_store_path_set("references").await?;
        let registration_time = r.read_u64("registrationTime").await?;
        let nar_size = r.read_u64("narSize").await?;
        let (mut ultimate, mut sigs, mut ca) = (false, BTreeSet::new(), None);
        if r.version() >= PATH_INFO_ULTIMATE_SIGS_CA {
            ultimate = r.read_bool("ultimate").await?;
            sigs = r.read_string_set("sigs").await?;
            ca = Some(r.read_string("ca").await?).filter(|s| !s.is_empty());
        }
        Ok(Self {
            deriver,
            nar_hash,
            references,
            registration_time,
            nar_size,
            ultimate,
            sigs,
            ca,
        })
    }
}

impl NixSerialize for PathInfo {
    async fn write_to<W: AsyncWrite + Unpin + Send>(
        &self,
        w: &mut NixWriter<W>,
    ) -> Result<(), WireError> {
        w.write_opt_store_path(self.deriver.as_ref(), "deriver")
            .await?;
        write_nar_hash(w, &self.nar_hash).await?;
        w.write_store_paths(&self.references, "references").await?;
        w.write_u64(self.registration_time, "registrationTime")
            .await?;
        w.write_u64(self.nar_size, "narSize").await?;
        if w.version() >= PATH_INFO_ULTIMATE_SIGS_CA {
            w.write_bool(self.ultimate, "ultimate").await?;
            w.write_strings(&self.sigs, "sigs").await?;
            w.write_str(self.ca.as_deref().unwrap_or(""), "ca").await?;
        }
        Ok(())
    }
}

impl NixDeserialize for ValidPathInfo {
    async fn read_from<R: AsyncRead + Unpin + Send>(
        r: &mut NixReader<R>,
    ) -> Result<Self, WireError> {
        let path = r.read_store_path("path").await?;
        let info = PathInfo::read_from(r).await?;
        Ok(Self { path, info })
    }
}

impl NixSerialize for ValidPathInfo {
    async fn write_to<W: AsyncWrite + Unpin + Send>(
        &self,
        w: &mut NixWriter<W>,
    ) -> Result<(), WireError> {
        w.write_store_path(&self.path, "path").await?;
        self.info.write_to(w).await
    }
}

/// How a build request treats existing outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u64)]
pub enum BuildMode {
    /// Build what is missing.
    #[default]
    Normal = 0,
    /// Rebuild and replace corrupted outputs (trusted users only).
    Repair = 1,
    /// Rebuild and compare with the existing outputs.
    Check = 2,
}

impl NixDeserialize for BuildMode {
    async fn read_from<R: AsyncRead + Unpin + Send>(
        r: &mut NixReader<R>,
    ) -> Result<Self, WireError> {
        match r.read_u64("buildMode").await? {
            0 => Ok(Self::Normal),
            1 => Ok(Self::Repair),
            2 => Ok(Self::Check),
            value => Err(WireError::InvalidValue {
                what: "buildMode",
                value,
            }),
        }
    }
}

impl NixSerialize for BuildMode {
    async fn write_to<W: AsyncWrite + Unpin + Send>(
        &self,
        w: &mut NixWriter<W>,
    ) -> Result<(), WireError> {
        w.write_u64(*self as u64, "buildMode").await
    }
}

/// A build's outcome, with Nix's numbering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
#[allow(missing_docs)]
pub enum BuildStatus {
    Built = 0,
    Substituted = 1,
    AlreadyValid = 2,
    PermanentFailure = 3,
    InputRejected = 4,
    OutputRejected = 5,
    TransientFailure = 6,
    CachedFailure = 7,
    TimedOut = 8,
    MiscFailure = 9,
    DependencyFailed = 10,
    LogLimitExceeded = 11,
    NotDeterministic = 12,
    ResolvesToAlreadyValid = 13,
    NoSubstituters = 14,
}

impl BuildStatus {
    /// All statuses, in wire order.
    pub const ALL: [BuildStatus; 15] = [
        Self::Built,
        Self::Substituted,
        Self::AlreadyValid,
        Self::PermanentFailure,
        Self::InputRejected,
        Self::OutputRejected,
        Self::TransientFailure,
        Self::CachedFailure,
        Self::TimedOut,
        Self::MiscFailure,
        Self::DependencyFailed,
        Self::LogLimitExceeded,
        Self::NotDeterministic,
        Self::ResolvesToAlreadyValid,
        Self::NoSubstituters,
    ];

    /// Whether the outputs are valid afterwards.
    pub fn is_success(self) -> bool {
        matches!(
            self,
            Self::Built | Self::Substituted | Self::AlreadyValid | Self::ResolvesToAlreadyValid
        )
    }
}

impl TryFrom<u64> for BuildStatus {
    type Error = WireError;
    fn try_from(value: u64) -> Result<Self, WireError> {
        usize::try_from(value)
            .ok()
            .and_then(|i| Self::ALL.get(i).copied())
            .ok_or(WireError::InvalidValue {
                what: "build status",
                value,
            })
    }
}

/// The result of `BuildDerivation` (and, keyed by path, of `BuildPathsWithResults`).
/// Fields that the negotiated version does not carry read as their defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildResult {
    /// The outcome.
    pub status: BuildStatus,
    /// The error message (empty on success).
    pub error_msg: String,
    /// How many times the derivation was built (from 1.29).
    pub times_built: u64,
    /// Whether a `--check` build differed (from 1.29).
    pub is_non_deterministic: bool,
    /// Build start, seconds since the epoch (from 1.29).
    pub start_time: u64,
    /// Build end, seconds since the epoch (from 1.29).
    pub stop_time: u64,
    /// User CPU time in microseconds, if measured (from 1.37).
    pub cpu_user: Option<u64>,
    /// System CPU time in microseconds, if measured (from 1.37).
    pub cpu_system: Option<u64>,
    /// Realisations of the built outputs keyed by `sha256:<hex>!<output>` (from 1.28).
    pub built_outputs: BTreeMap<String, Realisation>,
}

impl BuildResult {
    /// A result with the given status and every other field empty.
    pub fn new(status: BuildStatus) -> Self {
        Self {
            status,
            error_msg: String::new(),
            times_built: 0,
            is_non_deterministic: false,
            start_time: 0,
            stop_time: 0,
            cpu_user: None,
            cpu_system: None,
            built_outputs: BTreeMap::new(),
        }
    }
}

async fn read_opt_micros<R: AsyncRead + Unpin>(
    r: &mut NixReader<R>,
    what: &'static str,
) -> Result<Option<u64>, WireError> {
    match r.read_u64(what).await? {
        0 => Ok(None),
        1 => Ok(Some(r.read_u64(what).await?)),
        value => Err(WireError::InvalidValue { what, value }),
    }
}

async fn write_opt_micros<W: AsyncWrite + Unpin>(
    w: &mut NixWriter<W>,
    v: Option<u64>,
    what: &'static str,
) -> Result<(), WireError> {
    match v {
        None => w.write_u64(0, what).await,
        Some(us) => {
            w.write_u64(1, what).await?;
            w.write_u64(us, what).await
        }
    }
}

impl NixDeserialize for BuildResult {
    async fn read_from<R: AsyncRead + Unpin + Send>(
        r: &mut NixReader<R>,
    ) -> Result<Self, WireError> {
        let status = BuildStatus::try_from(r.read_u64("build status").await?)?;
        let mut res = BuildResult::new(status);
        res.error_msg = r.read_string_lossy("errorMsg").await?;
        if r.version() >= BUILD_RESULT_TIMES {
            res.times_built = r.read_u64("timesBuilt").await?;
            res.is_non_deterministic = r.read_bool("isNonDeterministic").await?;
            res.start_time = r.read_u64("startTime").await?;
            res.stop_time = r.read_u64("stopTime").await?;
        }
        if r.version() >= BUILD_RESULT_CPU_TIMES {
            res.cpu_user = read_opt_micros(r, "cpuUser").await?;
            res.cpu_system = read_opt_micros(r, "cpuSystem").await?;
        }
        if r.version() >= BUILD_RESULT_BUILT_OUTPUTS {
            let n = r.read_count("builtOutputs").await?;
            for _ in 0..n {
                let id = r.read_string("builtOutputs id").await?;
                let realisation = Realisation::read_from(r).await?;
                res.built_outputs.insert(id, realisation);
            }
        }
        Ok(res)
    }
}

impl NixSerialize for BuildResult {
    async fn write_to<W: AsyncWrite + Unpin + Send>(
        &self,
        w: &mut NixWriter<W>,
    ) -> Result<(), WireError> {
        w.write_u64(self.status as u64, "build status").await?;
        w.write_str(&self.error_msg, "errorMsg").await?;
        if w.version() >= BUILD_RESULT_TIMES {
            w.write_u64(self.times_built, "timesBuilt").await?;
            w.write_bool(self.is_non_deterministic, "isNonDeterministic")
                .await?;
            w.write_u64(self.start_time, "startTime").await?;
            w.write_u64(self.stop_time, "stopTime").await?;
        }
        if w.version() >= BUILD_RESULT_CPU_TIMES {
            write_opt_micros(w, self.cpu_user, "cpuUser").await?;
            write_opt_micros(w, self.cpu_system, "cpuSystem").await?;
        }
        if w.version() >= BUILD_RESULT_BUILT_OUTPUTS {
            w.write_u64(self.built_outputs.len() as u64, "builtOutputs")
                .await?;
            for (id, realisation) in &self.built_outputs {
                w.write_str(id, "builtOutputs id").await?;
                realisation.write_to(w).await?;
            }
        }
        Ok(())
    }
}

/// The output of a content-addressed (or any) derivation, as recorded by Nix. On the wire it
/// is a JSON string (in build results from 1.28, in `QueryRealisation` from 1.31); the JSON
/// keys are printed in Nix's (sorted) order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Realisation {
    /// Realisations this one depends on: `DrvOutput` id to store path.
    #[serde(rename = "dependentRealisations", default)]
    pub dependent_realisations: BTreeMap<String, String>,
    /// `sha256:<hex>!<output name>`.
    pub id: String,
    /// The output path (Nix 2.8 prints the base name, without the store directory).
    #[serde(rename = "outPath")]
    pub out_path: String,
    /// Signatures.
    #[serde(default)]
    pub signatures: BTreeSet<String>,
}

impl NixDeserialize for Realisation {
    async fn read_from<R: AsyncRead + Unpin + Send>(
        r: &mut NixReader<R>,
    ) -> Result<Self, WireError> {
        let s = r.read_string("realisation").await?;
        serde_json::from_str(&s).map_err(|source| WireError::Json {
            what: "realisation",
            source,
        })
    }
}

impl NixSerialize for Realisation {
    async fn write_to<W: AsyncWrite + Unpin + Send>(
        &self,
        w: &mut NixWriter<W>,
    ) -> Result<(), WireError> {
        let s = serde_json::to_string(self).map_err(|source| WireError::Json {
            what: "realisation",
            source,
        })?;
        w.write_str(&s, "realisation").await
    }
}

/// Which outputs of a derivation a request wants.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OutputSpec {
    /// Every output (`drv!*`).
    All,
    /// The named outputs (`drv!out,dev`); never empty.
    Names(BTreeSet<String>),
}

/// Something to build or make valid: an existing path, or outputs of a derivation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DerivedPath {
    /// A store path that must be valid (substituted if need be).
    Opaque(StorePath),
    /// Outputs of a derivation that must be built or substituted.
    Built {
        /// The `.drv` path.
        drv_path: StorePath,
        /// The wanted outputs.
        outputs: OutputSpec,
    },
}

fn valid_output_name(s: &str) -> bool {
    !s.is_empty() && !s.contains([',', '!', '*'])
}

impl DerivedPath {
    /// The wire form at `version`, with paths printed in `store_dir`: from 1.30 `path`,
    /// `drv!*` or `drv!a,b`; before that the "path with outputs" form, where all outputs are
    /// the bare `.drv` path and an opaque `.drv` cannot be expressed. Writing a
    /// [`DerivedPath`] to a [`NixWriter`] uses the writer's version and store directory.
    pub fn to_wire_string(
        &self,
        store_dir: &StoreDir,
        version: crate::version::ProtocolVersion,
    ) -> Result<String, WireError> {
        let new_form = version >= DERIVED_PATH_STRINGS;
        Ok(match self {
            DerivedPath::Opaque(p) if !new_form && p.is_derivation() => {
                return Err(WireError::NotAtThisVersion {
                    what: "an opaque .drv path",
                    version,
                })
            }
            DerivedPath::Opaque(p) => store_dir.print(p),
            DerivedPath::Built {
                drv_path,
                outputs: OutputSpec::All,
            } if new_form => format!("{}!*", store_dir.print(drv_path)),
            DerivedPath::Built {
                drv_path,
                outputs: OutputSpec::All,
            } => store_dir.print(drv_path),
            DerivedPath::Built {
                drv_path,
                outputs: OutputSpec::Names(names),
            } => {
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                format!("{}!{}", store_dir.print(drv_path), names.join(","))
            }
        })
    }

    /// Parses the wire form at `version`, with paths in `store_dir` (see
    /// [`DerivedPath::to_wire_string`]).
    pub fn parse_wire(
        s: &str,
        store_dir: &StoreDir,
        version: crate::version::ProtocolVersion,
    ) -> Result<Self, WireError> {
        let invalid = || WireError::InvalidString {
            what: "derived path",
            value: s.to_owned(),
        };
        let path = |p: &str| {
            store_dir.parse(p).map_err(|source| WireError::StorePath {
                what: "derived path",
                source,
            })
        };
        match s.split_once('!') {
            None if version < DERIVED_PATH_STRINGS && s.ends_with(".drv") => {
                Ok(DerivedPath::Built {
                    drv_path: path(s)?,
                    outputs: OutputSpec::All,
                })
            }
            None => Ok(DerivedPath::Opaque(path(s)?)),
            Some((drv, "*")) if version >= DERIVED_PATH_STRINGS => Ok(DerivedPath::Built {
                drv_path: path(drv)?,
                outputs: OutputSpec::All,
            }),
            Some((drv, outs)) => {
                let names: BTreeSet<String> = outs.split(',').map(str::to_owned).collect();
                if !names.iter().all(|n| valid_output_name(n)) {
                    return Err(invalid());
                }
                Ok(DerivedPath::Built {
                    drv_path: path(drv)?,
                    outputs: OutputSpec::Names(names),
                })
            }
        }
    }
}

impl NixDeserialize for DerivedPath {
    async fn read_from<R: AsyncRead + Unpin + Send>(
        r: &mut NixReader<R>,
    ) -> Result<Self, WireError> {
        let s = r.read_string("derived path").await?;
        DerivedPath::parse_wire(&s, r.store_dir(), r.version())
    }
}

impl NixSerialize for DerivedPath {
    async fn write_to<W: AsyncWrite + Unpin + Send>(
        &self,
        w: &mut NixWriter<W>,
    ) -> Result<(), WireError> {
        let s = self.to_wire_string(w.store_dir(), w.version())?;
        w.write_str(&s, "derived path").await
    }
}

/// One output of a [`BasicDerivation`], as the three strings Nix sends: the path (empty for
/// floating or deferred outputs), the hash algorithm (`r:sha256`, `sha256`, … or empty) and
/// the expected hash in hex (fixed outputs only, `impure` for impure ones).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DerivationOutput {
    /// The output path, if known.
    pub path: Option<StorePath>,
    /// The method and hash algorithm, empty for input-addressed outputs.
    pub hash_algo: String,
    /// The fixed hash, empty unless fixed-output.
    pub hash: String,
}

/// A derivation without its input derivations, as `BuildDerivation` sends it. The name comes
/// from the `.drv` path sent alongside, so it is not part of this value.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BasicDerivation {
    /// Outputs by name.
    pub outputs: BTreeMap<String, DerivationOutput>,
    /// Input sources (including input derivations' outputs, after resolution).
    pub input_srcs: BTreeSet<StorePath>,
    /// The system, e.g. `x86_64-linux`.
    pub platform: String,
    /// The builder executable.
    pub builder: String,
    /// The builder's arguments.
    pub args: Vec<String>,
    /// The builder's environment.
    pub env: BTreeMap<String, String>,
}

impl NixDeserialize for BasicDerivation {
    async fn read_from<R: AsyncRead + Unpin + Send>(
        r: &mut NixReader<R>,
    ) -> Result<Self, WireError> {
        let mut drv = BasicDerivation::default();
        let n = r.read_count("outputs").await?;
        for _ in 0..n {
            let name = r.read_string("output name").await?;
            let path = r.read_opt_store_path("output path").await?;
            let hash_algo = r.read_string("output hashAlgo").await?;
            let hash = r.read_string("output hash").await?;
            drv.outputs.insert(
                name,
                DerivationOutput {
                    path,
                    hash_algo,
                    hash,
                },
            );
        }
        drv.input_srcs = r.read_store_path_set("inputSrcs").await?;
        drv.platform = r.read_string("platform").await?;
        drv.builder = r.read_string("builder").await?;
        drv.args = r.read_strings("args").await?;
        drv.env = r.read_string_map("env").await?;
        Ok(drv)
    }
}

impl NixSerialize for BasicDerivation {
    async fn write_to<W: AsyncWrite + Unpin + Send>(
        &self,
        w: &mut NixWriter<W>,
    ) -> Result<(), WireError> {
        w.write_u64(self.outputs.len() as u64, "outputs").await?;
        for (name, out) in &self.outputs {
            w.write_str(name, "output name").await?;
            w.write_opt_store_path(out.path.as_ref(), "output path")
                .await?;
            w.write_str(&out.hash_algo, "output hashAlgo").await?;
            w.write_str(&out.hash, "output hash").await?;
        }
        w.write_store_paths(&self.input_srcs, "inputSrcs").await?;
        w.write_str(&self.platform, "platform").await?;
        w.write_str(&self.builder, "builder").await?;
        w.write_strings(&self.args, "args").await?;
        w.write_string_map(&self.env, "env").await
    }
}

/// The settings a client sends with `SetOptions`. Verbosities use Nix's levels (0 error …
/// 7 vomit). `use_build_hook`, `log_type` and `print_build_trace` are obsolete and ignored
/// by the daemon but still on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSettings {
    /// Keep failed build directories.
    pub keep_failed: bool,
    /// Keep building other derivations after a failure.
    pub keep_going: bool,
    /// Build from source when substitution fails.
    pub try_fallback: bool,
    /// The client's verbosity.
    pub verbosity: u64,
    /// `max-jobs`.
    pub max_build_jobs: u64,
    /// `max-silent-time`, seconds.
    pub max_silent_time: u64,
    /// Obsolete; Nix sends true.
    pub use_build_hook: bool,
    /// 0 (error) when build logs should be shown, 7 (vomit) otherwise.
    pub build_verbosity: u64,
    /// Obsolete; 0.
    pub log_type: u64,
    /// Obsolete; false.
    pub print_build_trace: bool,
    /// `cores`.
    pub build_cores: u64,
    /// `substitute`.
    pub use_substitutes: bool,
    /// Further settings by name (the daemon applies only those it allows).
    pub overrides: BTreeMap<String, String>,
}

impl Default for ClientSettings {
    fn default() -> Self {
        Self {
            keep_failed: false,
            keep_going: false,
            try_fallback: false,
            verbosity: 0,
            max_build_jobs: 1,
            max_silent_time: 0,
            use_build_hook: true,
            build_verbosity: 0,
            log_type: 0,
            print_build_trace: false,
            build_cores: 0,
            use_substitutes: true,
            overrides: BTreeMap::new(),
        }
    }
}

impl NixDeserialize for ClientSettings {
    async fn read_from<R: AsyncRead + Unpin + Send>(
        r: &mut NixReader<R>,
    ) -> Result<Self, WireError> {
        Ok(Self {
            keep_failed: r.read_bool("keepFailed").await?,
            keep_going: r.read_bool("keepGoing").await?,
            try_fallback: r.read_bool("tryFallback").await?,
            verbosity: r.read_u64("verbosity").await?,
            max_build_jobs: r.read_u64("maxBuildJobs").await?,
            max_silent_time: r.read_u64("maxSilentTime").await?,
            use_build_hook: r.read_bool("useBuildHook").await?,
            build_verbosity: r.read_u64("buildVerbosity").await?,
            log_type: r.read_u64("logType").await?,
            print_build_trace: r.read_bool("printBuildTrace").await?,
            build_cores: r.read_u64("buildCores").await?,
            use_substitutes: r.read_bool("useSubstitutes").await?,
            overrides: r.read_string_map("overrides").await?,
        })
    }
}

impl NixSerialize for ClientSettings {
    async fn write_to<W: AsyncWrite + Unpin + Send>(
        &self,
        w: &mut NixWriter<W>,
    ) -> Result<(), WireError> {
        w.write_bool(self.keep_failed, "keepFailed").await?;
        w.write_bool(self.keep_going, "keepGoing").await?;
        w.write_bool(self.try_fallback, "tryFallback").await?;
        w.write_u64(self.verbosity, "verbosity").await?;
        w.write_u64(self.max_build_jobs, "maxBuildJobs").await?;
        w.write_u64(self.max_silent_time, "maxSilentTime").await?;
        w.write_bool(self.use_build_hook, "useBuildHook").await?;
        w.write_u64(self.build_verbosity, "buildVerbosity").await?;
        w.write_u64(self.log_type, "logType").await?;
        w.write_bool(self.print_build_trace, "printBuildTrace")
            .await?;
        w.write_u64(self.build_cores, "buildCores").await?;
        w.write_bool(self.use_substitutes, "useSubstitutes").await?;
        w.write_string_map(&self.overrides, "overrides").await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::{ProtocolVersion, MIN_SUPPORTED, NIX_2_8};
    use nixspace_nix_formats::store_path::StorePathError;

    const DRV: &str = "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello.drv";

    fn wire_string(s: &str) -> NixReader<std::io::Cursor<Vec<u8>>> {
        let mut bytes = (s.len() as u64).to_le_bytes().to_vec();
        bytes.extend(s.as_bytes());
        bytes.extend(&[0u8; 8][..crate::wire::padding_len(s.len() as u64)]);
        NixReader::new(std::io::Cursor::new(bytes), NIX_2_8)
    }

    #[tokio::test]
    async fn nar_hash_wire_forms() {
        let h = Hash::new(HashAlgo::Sha256, &[0xab; 32]).unwrap();
        let mut w = NixWriter::new(Vec::new(), NIX_2_8);
        write_nar_hash(&mut w, &h).await.unwrap();
        w.flush().await.unwrap();
        let bytes = w.into_inner();
        // Unprefixed base-16, as Nix 2.8 writes it.
        assert_eq!(&bytes[..8], &64u64.to_le_bytes());
        assert_eq!(&bytes[8..], "ab".repeat(32).as_bytes());
        let mut r = NixReader::new(std::io::Cursor::new(bytes), NIX_2_8);
        assert_eq!(read_nar_hash(&mut r).await.unwrap(), h);
        for form in [
            h.to_prefixed_base16(),
            h.to_prefixed_nixbase32(),
            h.to_sri(),
        ] {
            assert_eq!(read_nar_hash(&mut wire_string(&form)).await.unwrap(), h);
        }
        for bad in ["abc".to_owned(), "g".repeat(64), String::new()] {
            assert!(
                matches!(
                    read_nar_hash(&mut wire_string(&bad)).await,
                    Err(WireError::Hash {
                        what: "narHash",
                        ..
                    })
                ),
                "{bad:?}"
            );
        }
        let md5 = Hash::digest(HashAlgo::Md5, b"x");
        assert!(matches!(
            read_nar_hash(&mut wire_string(&md5.to_prefixed_base16())).await,
            Err(WireError::Hash {
                source: HashError::AlgoMismatch { .. },
                ..
            })
        ));
        let mut w = NixWriter::new(Vec::new(), NIX_2_8);
        assert!(matches!(
            write_nar_hash(&mut w, &md5).await,
            Err(WireError::Hash {
                what: "narHash",
                source: HashError::AlgoMismatch {
                    expected: HashAlgo::Sha256,
                    ..
                }
            })
        ));
    }

    #[test]
    fn derived_path_forms() {
        let dir = StoreDir::default();
        let drv = dir.parse(DRV).unwrap();
        let all = DerivedPath::Built {
            drv_path: drv.clone(),
            outputs: OutputSpec::All,
        };
        assert_eq!(
            all.to_wire_string(&dir, NIX_2_8).unwrap(),
            format!("{DRV}!*")
        );
        assert_eq!(all.to_wire_string(&dir, MIN_SUPPORTED).unwrap(), DRV);
        assert_eq!(
            DerivedPath::parse_wire(DRV, &dir, MIN_SUPPORTED).unwrap(),
            all
        );
        assert_eq!(
            DerivedPath::parse_wire(&format!("{DRV}!*"), &dir, NIX_2_8).unwrap(),
            all
        );
        let opaque = DerivedPath::Opaque(drv);
        assert_eq!(DerivedPath::parse_wire(DRV, &dir, NIX_2_8).unwrap(), opaque);
        assert!(opaque
            .to_wire_string(&dir, ProtocolVersion::new(1, 29))
            .is_err());
        let outs = DerivedPath::parse_wire(&format!("{DRV}!out,dev"), &dir, NIX_2_8).unwrap();
        assert_eq!(
            outs.to_wire_string(&dir, MIN_SUPPORTED).unwrap(),
            format!("{DRV}!dev,out")
        );
        assert!(DerivedPath::parse_wire(&format!("{DRV}!"), &dir, NIX_2_8).is_err());
        assert!(DerivedPath::parse_wire(&format!("{DRV}!a,,b"), &dir, NIX_2_8).is_err());
        // Paths are printed and parsed in the given store directory.
        let tmp = StoreDir::new("/tmp/store").unwrap();
        let moved = all.to_wire_string(&tmp, NIX_2_8).unwrap();
        assert_eq!(
            moved,
            "/tmp/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello.drv!*"
        );
        assert_eq!(DerivedPath::parse_wire(&moved, &tmp, NIX_2_8).unwrap(), all);
        assert!(matches!(
            DerivedPath::parse_wire(&moved, &dir, NIX_2_8),
            Err(WireError::StorePath {
                what: "derived path",
                source: StorePathError::NotInStore { .. }
            })
        ));
    }

    #[test]
    fn realisation_json_matches_nix_key_order() {
        let r = Realisation {
            dependent_realisations: BTreeMap::new(),
            id: "sha256:00!out".into(),
            out_path: "x".into(),
            signatures: BTreeSet::new(),
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"dependentRealisations":{},"id":"sha256:00!out","outPath":"x","signatures":[]}"#
        );
    }

    #[test]
    fn unknown_build_status_is_an_error() {
        assert!(BuildStatus::try_from(15).is_err());
        assert_eq!(
            BuildStatus::try_from(13).unwrap(),
            BuildStatus::ResolvesToAlreadyValid
        );
    }
}
