//! A worker's own Nix store on a machine that has one already: a private mount namespace
//! in which `DIR/nix` is mounted on `/nix`. Store paths keep their real names, and nothing
//! the worker builds or fetches is visible outside, as if it ran on another host.

use std::path::Path;

use anyhow::Context;
use rustix::mount::{mount_bind, mount_change, MountPropagationFlags};
use rustix::thread::{unshare_unsafe, UnshareFlags};

/// Move this process into a new mount namespace with `dir/nix` on `/nix` (created as needed).
/// Must run before any thread is started: threads started earlier stay outside.
pub fn enter(dir: &Path) -> anyhow::Result<()> {
    if !rustix::process::geteuid().is_root() {
        anyhow::bail!(
            "--own-store needs root: it mounts {}/nix on /nix in a private mount namespace",
            dir.display()
        );
    }
    let nix = std::path::absolute(dir)
        .with_context(|| format!("--own-store {}", dir.display()))?
        .join("nix");
    for sub in ["store", "var/nix/db", "var/nix/gcroots", "var/log/nix"] {
        let d = nix.join(sub);
        std::fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    std::fs::create_dir_all("/nix").context("cannot create /nix")?;
    // SAFETY: called from `main` before the async runtime (or any other thread) exists, so
    // no other thread shares this process's mount namespace or file descriptor table.
    unsafe { unshare_unsafe(UnshareFlags::NEWNS) }
        .context("cannot create a private mount namespace")?;
    // Mounts made here must not propagate back to the machine's namespace.
    mount_change(
        "/",
        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
    )
    .context("cannot make the mount namespace private")?;
    mount_bind(&nix, "/nix").with_context(|| format!("cannot mount {} on /nix", nix.display()))?;
    // Create the store's database now, once: daemons started at the same moment on a store
    // without one would race to create it.
    let init = std::process::Command::new("nix-store")
        .arg("--init")
        .env("NIX_REMOTE", "local")
        .status()
        .context("cannot run nix-store --init (is Nix installed?)")?;
    if !init.success() {
        anyhow::bail!("nix-store --init failed in {} ({init})", nix.display());
    }
    tracing::info!(store = %nix.display(), "using a store of its own, mounted on /nix");
    Ok(())
}
