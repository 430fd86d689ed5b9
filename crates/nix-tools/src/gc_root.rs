//! Out-links as `nix-build` makes them: a symlink to a store path, registered with the
//! store's daemon as an indirect garbage collector root (Nix 2.8's
//! `LocalFSStore::addPermRoot`), so `nix-store --gc` keeps the path while the link exists and
//! `nix-store --gc --print-roots` lists the link.

use std::path::{Path, PathBuf};

use crate::daemon_pool::{DaemonPool, StepError};

/// Why an out-link could not be made.
#[derive(Debug, thiserror::Error)]
pub enum GcRootError {
    /// Something that is not a link into the store is in the way (Nix refuses to clobber it).
    #[error("cannot create symlink '{0}'; already exists")]
    InTheWay(PathBuf),
    /// The link is inside the store.
    #[error("creating a garbage collector root ({0}) in the Nix store is forbidden")]
    InStore(PathBuf),
    /// The symlink could not be written.
    #[error("cannot create symlink '{link}': {source}")]
    Link {
        /// The link.
        link: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The daemon did not register the root.
    #[error("cannot register {link} as a garbage collector root: {source}")]
    Register {
        /// The link.
        link: PathBuf,
        /// The daemon's answer.
        source: StepError,
    },
}

/// Make `link` (relative to the current directory if not absolute) a symlink to `target`,
/// a store path, and register it as an indirect root with the store of `pool`. An existing
/// link into the store is replaced. Returns the absolute link.
pub async fn add_perm_root(
    pool: &DaemonPool,
    target: &str,
    link: &Path,
) -> Result<PathBuf, GcRootError> {
    let link = std::path::absolute(link).map_err(|source| GcRootError::Link {
        link: link.to_owned(),
        source,
    })?;
    let store = pool.store_dir();
    if link.starts_with(store.as_str()) {
        return Err(GcRootError::InStore(link));
    }
    if let Ok(meta) = std::fs::symlink_metadata(&link) {
        let into_store = meta.file_type().is_symlink()
            && std::fs::read_link(&link).is_ok_and(|to| to.starts_with(store.as_str()));
        if !into_store {
            return Err(GcRootError::InTheWay(link));
        }
    }
    replace_symlink(target, &link).map_err(|source| GcRootError::Link {
        link: link.clone(),
        source,
    })?;
    let register = async {
        let mut lease = pool.lease().await?;
        match lease
            .client()
            .add_indirect_root(&link.to_string_lossy())
            .await
        {
            Ok(()) => {
                lease.release();
                Ok(())
            }
            Err(e) => Err(lease.failed(e)),
        }
    };
    register.await.map_err(|source| GcRootError::Register {
        link: link.clone(),
        source,
    })?;
    Ok(link)
}

/// Point `link` at `target`, atomically replacing what is there (a new link renamed over it).
fn replace_symlink(target: &str, link: &Path) -> std::io::Result<()> {
    let name = link
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = link.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&temporary);
    std::os::unix::fs::symlink(target, &temporary)?;
    std::fs::rename(&temporary, link)
}
