//! Helpers shared by nixspace's tests that run the real Nix (Debian's
//! `nix-bin`): one private configuration fit for a root CI box, and unique
//! names so tests sharing `/nix/store` never collide; `fuzz`: budgets, mutations
//! and the regression corpus of the fuzz tests.
//!
//! With the `e2e` feature, the harness of the end-to-end tests (`tests/` at the
//! repository root, the test program of the `nixspace` package): `space`, a
//! nixspace of real processes on this machine; `process`, the children a test
//! runs; `nix_files`, the Nix expressions tests build; `dataspace`, in-process
//! and raw clients of a dataspace; `proxy`, a TCP proxy that cuts connections;
//! `syndicate_server`, a nixspace on a standalone `syndicate-server`; `hosts`, hosts of
//! their own (network namespaces) joined by a switch that delays packets; `http_files`, a
//! small HTTP server of a directory's files (binary caches over HTTP).
// Test code only: a setup step that fails is a failed test, with the reason in its panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod fuzz;

#[cfg(feature = "e2e")]
pub mod browser;
#[cfg(feature = "e2e")]
pub mod dataspace;
#[cfg(feature = "e2e")]
pub mod hosts;
#[cfg(feature = "e2e")]
pub mod http_files;
#[cfg(feature = "e2e")]
pub mod nix_files;
#[cfg(feature = "e2e")]
pub mod process;
#[cfg(feature = "e2e")]
pub mod proxy;
#[cfg(feature = "e2e")]
pub mod space;
#[cfg(feature = "e2e")]
pub mod syndicate_server;

#[cfg(feature = "e2e")]
pub use nix_files::*;
#[cfg(feature = "e2e")]
pub use process::*;
#[cfg(feature = "e2e")]
pub use space::{http_get, nixspace_bin, repo_root, Space};

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// The `nix.conf` every test gives Nix: no build users, no sandbox, no
/// binary caches (no network here), `nix-command` and `ca-derivations` on.
pub const NIX_CONF: &str = "build-users-group =\nsandbox = false\n\
experimental-features = nix-command ca-derivations\nsubstituters =\n";

/// Write [`NIX_CONF`] as `dir/nix.conf`, creating `dir`; point
/// `NIX_CONF_DIR` at `dir` to use it.
pub fn write_nix_conf(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("nix.conf"), NIX_CONF)
}

/// Write `dir/ssh`, an `ssh` that runs the remote command (its last argument) here, as sshd
/// would run it on the remote machine: with `dir` first on PATH, Nix's `ssh://` and
/// `ssh-ng://` stores work on one machine. Creates `dir`; returns it.
pub fn fake_ssh(dir: &Path) -> std::io::Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    let ssh = dir.join("ssh");
    std::fs::write(
        &ssh,
        "#!/bin/sh\nfor last; do :; done\nexec /bin/sh -c \"$last\"\n",
    )?;
    std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o755))?;
    Ok(dir.to_owned())
}

/// A name unique to this process and call: `<prefix>-<pid>-<nanos>-<n>`.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_the_config_is_written() {
        assert_ne!(unique("x"), unique("x"));
        let dir = std::env::temp_dir().join(unique("conf"));
        write_nix_conf(&dir).unwrap();
        let text = std::fs::read_to_string(dir.join("nix.conf")).unwrap();
        assert!(text.contains("build-users-group =\n"));
        assert!(text.contains("substituters =\n"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
