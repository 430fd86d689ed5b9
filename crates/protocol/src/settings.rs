//! [`BuildSettings`]: how a step's build runs, as a client asked (Nix's `SetOptions` and build
//! mode), typed on our side of the wire (`BuildSettings` in `schemas/build.prs`).
//!
//! A frontend puts them in each demand's step info, the planner merges the demands of one step
//! ([`BuildSettings::stricter`]) and hands the result to the worker with the assignment, and the
//! worker applies them to its daemon connection.

use crate::build;

/// How Nix treats a step's existing outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum BuildMode {
    /// Build what is missing.
    #[default]
    Normal,
    /// Rebuild and compare with the valid outputs (`--check`).
    Check,
    /// Rebuild and replace the valid outputs (`--repair`).
    Repair,
}

/// The settings a step's build runs with. The default changes nothing: the worker's own Nix
/// configuration applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BuildSettings {
    /// The build mode.
    pub mode: BuildMode,
    /// `max-silent-time`: seconds a builder may print nothing; 0 for no limit.
    pub max_silent_time: u64,
    /// `timeout` (`build-timeout`): seconds a build may run; 0 for no limit.
    pub timeout: u64,
    /// `keep-failed`: keep the build directory of a failed build.
    pub keep_failed: bool,
    /// `auto-optimise-store`: hard-link identical files of the outputs in the store.
    pub optimise: bool,
}

impl BuildSettings {
    /// Whether these settings change nothing.
    pub fn is_default(&self) -> bool {
        *self == BuildSettings::default()
    }

    /// The stricter of two demands' settings: the smallest non-zero limits, `keep_failed` and
    /// `optimise` if either asks, and the mode furthest from normal (repair over check).
    pub fn stricter(self, other: BuildSettings) -> BuildSettings {
        let limit = |a: u64, b: u64| match (a, b) {
            (0, x) | (x, 0) => x,
            (a, b) => a.min(b),
        };
        BuildSettings {
            mode: self.mode.max(other.mode),
            max_silent_time: limit(self.max_silent_time, other.max_silent_time),
            timeout: limit(self.timeout, other.timeout),
            keep_failed: self.keep_failed || other.keep_failed,
            optimise: self.optimise || other.optimise,
        }
    }

    /// The settings as the dataspace carries them.
    pub fn to_wire(&self) -> build::BuildSettings {
        let seconds = |s: u64| i64::try_from(s).unwrap_or(i64::MAX).into();
        build::BuildSettings {
            mode: match self.mode {
                BuildMode::Normal => build::BuildMode::Normal,
                BuildMode::Check => build::BuildMode::Check,
                BuildMode::Repair => build::BuildMode::Repair,
            },
            max_silent_time: seconds(self.max_silent_time),
            timeout: seconds(self.timeout),
            keep_failed: self.keep_failed,
            optimise: self.optimise,
        }
    }

    /// The settings a record carries (negative limits count as none).
    pub fn from_wire(settings: &build::BuildSettings) -> BuildSettings {
        let seconds = |s| u64::try_from(i64::try_from(s).unwrap_or(0)).unwrap_or(0);
        BuildSettings {
            mode: match settings.mode {
                build::BuildMode::Normal => BuildMode::Normal,
                build::BuildMode::Check => BuildMode::Check,
                build::BuildMode::Repair => BuildMode::Repair,
            },
            max_silent_time: seconds(&settings.max_silent_time),
            timeout: seconds(&settings.timeout),
            keep_failed: settings.keep_failed,
            optimise: settings.optimise,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stricter_settings_win() {
        let a = BuildSettings {
            max_silent_time: 10,
            timeout: 0,
            ..BuildSettings::default()
        };
        let b = BuildSettings {
            mode: BuildMode::Check,
            max_silent_time: 3,
            timeout: 60,
            keep_failed: true,
            optimise: false,
        };
        let merged = a.stricter(b);
        assert_eq!(merged.mode, BuildMode::Check);
        assert_eq!((merged.max_silent_time, merged.timeout), (3, 60));
        assert!(merged.keep_failed && !merged.optimise);
        let repair = BuildSettings {
            mode: BuildMode::Repair,
            ..BuildSettings::default()
        };
        assert_eq!(b.stricter(repair).mode, BuildMode::Repair);
        assert_eq!(BuildSettings::from_wire(&merged.to_wire()), merged);
    }
}
