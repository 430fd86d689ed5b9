//! The `SetOptions` a build with a client's settings sends its daemon connection.
//!
//! `SetOptions` sets every one of its fields (`cores`, `max-jobs`, `substitute`, …) on the
//! daemon's process serving the connection, so the fields a step's [`BuildSettings`] do not
//! name keep the values of the local Nix's own configuration (read once with
//! `nix show-config`, [`DaemonDefaults::load`]); the step's settings go over them: its
//! limits when it sets them, `keep-failed` when it asks, `timeout` and
//! `auto-optimise-store` as overrides (the private daemon trusts its worker).

use nixspace_nix_protocol::{BuildMode as NixBuildMode, ClientSettings};
use nixspace_protocol::{BuildMode, BuildSettings};

use crate::{show_config, shown_setting, NixError};

/// Nix's `lvlInfo`, the verbosity `nix-daemon` runs at when no client set one.
const LVL_INFO: u64 = 3;

/// The settings the local Nix's daemon has before any client changes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DaemonDefaults(ClientSettings);

impl DaemonDefaults {
    /// The local Nix's configuration, as `nix show-config` reports it.
    pub(crate) async fn load() -> Result<DaemonDefaults, NixError> {
        Ok(DaemonDefaults::from_shown(&show_config().await?))
    }

    /// The defaults from `nix show-config`'s output; Nix's own defaults for what it lacks.
    fn from_shown(shown: &str) -> DaemonDefaults {
        let defaults = ClientSettings::default();
        let flag = |name: &str, default: bool| match shown_setting(shown, name) {
            Some("true") => true,
            Some("false") => false,
            _ => default,
        };
        let number = |name: &str, default: u64| {
            shown_setting(shown, name)
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(default)
        };
        DaemonDefaults(ClientSettings {
            keep_failed: flag("keep-failed", defaults.keep_failed),
            keep_going: flag("keep-going", defaults.keep_going),
            try_fallback: flag("fallback", defaults.try_fallback),
            verbosity: LVL_INFO,
            max_build_jobs: number("max-jobs", defaults.max_build_jobs),
            max_silent_time: number("max-silent-time", defaults.max_silent_time),
            build_cores: number("cores", defaults.build_cores),
            use_substitutes: flag("substitute", defaults.use_substitutes),
            ..defaults
        })
    }

    /// The `SetOptions` of a build with `settings`.
    pub(crate) fn with(&self, settings: &BuildSettings) -> ClientSettings {
        let mut options = self.0.clone();
        options.keep_failed |= settings.keep_failed;
        if settings.max_silent_time != 0 {
            options.max_silent_time = settings.max_silent_time;
        }
        if settings.timeout != 0 {
            options
                .overrides
                .insert("timeout".to_owned(), settings.timeout.to_string());
        }
        if settings.optimise {
            options
                .overrides
                .insert("auto-optimise-store".to_owned(), "true".to_owned());
        }
        options
    }
}

/// A step's build mode as the worker protocol spells it.
pub(crate) fn nix_build_mode(mode: BuildMode) -> NixBuildMode {
    match mode {
        BuildMode::Normal => NixBuildMode::Normal,
        BuildMode::Check => NixBuildMode::Check,
        BuildMode::Repair => NixBuildMode::Repair,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_stays_where_the_step_sets_nothing() {
        let shown = "cores = 2\nmax-jobs = 4\nmax-silent-time = 30\nsubstitute = false\nkeep-failed = false\n";
        let defaults = DaemonDefaults::from_shown(shown);
        let plain = defaults.with(&BuildSettings::default());
        assert_eq!((plain.build_cores, plain.max_build_jobs), (2, 4));
        assert_eq!(plain.max_silent_time, 30);
        assert!(!plain.use_substitutes && !plain.keep_failed);
        assert!(plain.overrides.is_empty());
        let strict = defaults.with(&BuildSettings {
            mode: BuildMode::Check,
            max_silent_time: 1,
            timeout: 5,
            keep_failed: true,
            optimise: true,
        });
        assert_eq!(strict.max_silent_time, 1);
        assert!(strict.keep_failed);
        assert_eq!(
            strict.overrides.get("timeout").map(String::as_str),
            Some("5")
        );
        assert_eq!(
            strict
                .overrides
                .get("auto-optimise-store")
                .map(String::as_str),
            Some("true")
        );
        assert_eq!(strict.build_cores, 2);
    }
}
