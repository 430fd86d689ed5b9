//! Build results: a build's [`BuildStatus`] in Nix's numbering, and the [`BuildResult`] that
//! `BuildDerivation` and `BuildPathsWithResults` answer with, whose fields grow with the
//! protocol version (times from 1.29, built outputs from 1.28, CPU times from 1.37).

use std::collections::BTreeMap;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::realisation::Realisation;
use crate::version::{BUILD_RESULT_BUILT_OUTPUTS, BUILD_RESULT_CPU_TIMES, BUILD_RESULT_TIMES};
use crate::wire::{NixDeserialize, NixReader, NixSerialize, NixWriter, WireError};

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_build_status_is_an_error() {
        assert!(BuildStatus::try_from(15).is_err());
        assert_eq!(
            BuildStatus::try_from(13).unwrap(),
            BuildStatus::ResolvesToAlreadyValid
        );
    }
}
