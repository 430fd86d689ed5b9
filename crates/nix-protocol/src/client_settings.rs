//! [`ClientSettings`]: the settings a client sends with `SetOptions`.

use std::collections::BTreeMap;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::wire::{NixDeserialize, NixReader, NixSerialize, NixWriter, WireError};

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
