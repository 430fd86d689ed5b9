//! A Nix store of one's own on a machine that has one already: a private mount namespace
//! in which `DIR/nix` is mounted on `/nix`. Store paths keep their real names, and nothing
//! built or fetched there is visible outside, as if the process ran on another host.

use std::path::{Path, PathBuf};

use rustix::mount::{mount_bind, mount_change, MountPropagationFlags};
use rustix::thread::{unshare_unsafe, UnshareFlags};

/// Why a store of one's own could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OwnStoreError {
    /// Mount namespaces need root.
    #[error(
        "a store of its own needs root: it mounts {0}/nix on /nix in a private mount namespace"
    )]
    NotRoot(PathBuf),
    /// A step of the setup failed.
    #[error("{what}: {source}")]
    Setup {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// `nix-store --init` did not succeed.
    #[error("nix-store --init failed in {0} ({1})")]
    Init(PathBuf, std::process::ExitStatus),
}

fn setup(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> OwnStoreError {
    move |source| OwnStoreError::Setup {
        what: what.into(),
        source,
    }
}

/// Move this process into a new mount namespace with `dir/nix` on `/nix` (created as needed).
/// Must run before any thread is started: threads started earlier stay outside.
pub fn enter(dir: &Path) -> Result<(), OwnStoreError> {
    if !rustix::process::geteuid().is_root() {
        return Err(OwnStoreError::NotRoot(dir.to_owned()));
    }
    let nix = std::path::absolute(dir)
        .map_err(setup(format!("store directory {}", dir.display())))?
        .join("nix");
    for sub in ["store", "var/nix/db", "var/nix/gcroots", "var/log/nix"] {
        let d = nix.join(sub);
        std::fs::create_dir_all(&d).map_err(setup(format!("cannot create {}", d.display())))?;
    }
    std::fs::create_dir_all("/nix").map_err(setup("cannot create /nix"))?;
    // SAFETY: the caller runs this before the async runtime (or any other thread) exists, so
    // no other thread shares this process's mount namespace or file descriptor table.
    unsafe { unshare_unsafe(UnshareFlags::NEWNS) }
        .map_err(|e| setup("cannot create a private mount namespace")(e.into()))?;
    // Mounts made here must not propagate back to the machine's namespace.
    mount_change(
        "/",
        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
    )
    .map_err(|e| setup("cannot make the mount namespace private")(e.into()))?;
    mount_bind(&nix, "/nix")
        .map_err(|e| setup(format!("cannot mount {} on /nix", nix.display()))(e.into()))?;
    // Create the store's database now, once: daemons started at the same moment on a store
    // without one would race to create it.
    let init = std::process::Command::new("nix-store")
        .arg("--init")
        .env("NIX_REMOTE", "local")
        .status()
        .map_err(setup("cannot run nix-store --init (is Nix installed?)"))?;
    if !init.success() {
        return Err(OwnStoreError::Init(nix, init));
    }
    tracing::info!(store = %nix.display(), "using a store of its own, mounted on /nix");
    Ok(())
}
