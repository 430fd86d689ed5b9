//! The local Nix: its command-line tools, its daemon, and derivations read
//! from the store.
//!
//! [`nix_conf`] reads the Nix configuration (`nix.conf`, its includes and `NIX_CONFIG`) as
//! Nix does.
//!
//! The `nix-daemon` that nixspace starts is the real one ([`real_nix_daemon`]): never this
//! process's own executable, which may be installed as `nix-daemon`.
//!
//! [`instantiate`] evaluates a Nix file with `nix-build`'s arguments; [`add_perm_root`]
//! makes an out-link a garbage collector root as `nix-build` does.
//!
//! Commands run a real Nix program (`nix-instantiate`) found on
//! `PATH`, with the caller's environment, so `NIX_REMOTE`, `NIX_CONF_DIR` and
//! friends apply as they would to a user's own commands; failures carry the
//! command and the tail of its stderr. Derivation closures are read directly
//! from the store with our own parser ([`read_closure`]). Builds go through
//! the Nix worker protocol over reused daemon connections ([`DaemonPool`]); [`build_activity`]
//! keeps the log lines and activities of a build from what its daemon sends.

pub mod build_activity;
pub mod build_cgroup;
mod command;
mod daemon_options;
mod daemon_pool;
pub mod daemon_socket;
mod derivation_info;
mod gc_root;
mod instantiate;
pub mod local_store;
pub mod nix_conf;
pub mod own_store;
pub mod private_daemon;
mod real_program;

pub use build_activity::BuildLog;
pub use command::NixError;
pub use daemon_pool::{
    strip_ansi, BuiltStep, DaemonPool, DaemonTarget, Lease, PoolConfig, StepError,
};
pub use derivation_info::{read_closure, DerivationInfo};
pub use gc_root::{add_perm_root, GcRootError};
pub use instantiate::{
    evaluate_jobs, instantiate, EvaluatedJob, Evaluation, FunctionArg, Instantiated,
};
pub use nix_conf::{NixConf, NixConfError};
pub use real_program::{real_nix_daemon, real_program, ProgramNotFound, NIX_DAEMON};

use command::run;

/// The system features the local Nix's store has: `system-features` (from its configuration,
/// or Nix's defaults for this machine) as `nix show-config` reports them, plus
/// `ca-derivations` and `recursive-nix` when those experimental features are enabled, as
/// Nix's store adds them.
pub async fn system_features() -> Result<Vec<String>, NixError> {
    Ok(store_features(&show_config().await?))
}

/// The local Nix's settings as `nix show-config` prints them (`name = value` lines).
async fn show_config() -> Result<String, NixError> {
    let args = [
        "--extra-experimental-features",
        "nix-command",
        "show-config",
    ];
    run("nix", &args.map(str::to_owned)).await
}

/// The value of setting `name` in `nix show-config`'s output.
fn shown_setting<'a>(show_config: &'a str, name: &str) -> Option<&'a str> {
    let prefix = format!("{name} = ");
    show_config
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
}

/// The store's system features from `nix show-config`'s output.
fn store_features(show_config: &str) -> Vec<String> {
    let setting = |name: &str| -> Vec<String> {
        shown_setting(show_config, name)
            .map(|value| value.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default()
    };
    let mut features = setting("system-features");
    let experimental = setting("experimental-features");
    for implied in ["ca-derivations", "recursive-nix"] {
        if experimental.iter().any(|f| f == implied) && !features.iter().any(|f| f == implied) {
            features.push(implied.to_owned());
        }
    }
    features
}

/// The platform of this machine in Nix's spelling, e.g. `x86_64-linux`.
pub fn current_system() -> String {
    format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS)
}

#[cfg(test)]
mod tests {
    use super::store_features;

    #[test]
    fn experimental_features_add_the_store_features_nix_adds() {
        let shown = "experimental-features = nix-command recursive-nix\nkeep-going = false\nsystem-features = benchmark big-parallel\n";
        assert_eq!(
            store_features(shown),
            ["benchmark", "big-parallel", "recursive-nix"]
        );
        assert_eq!(store_features("system-features = kvm\n"), ["kvm"]);
    }
}
