//! Where the local store keeps its state, and telling a store wiped and made anew from the one
//! that was there: Nix's own tests (and people) remove a store's state directory while
//! daemons run, and what was opened on the old one must not answer for the new one.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The local store's state directory: `NIX_STATE_DIR`, or `/nix/var/nix`.
pub fn state_dir() -> PathBuf {
    std::env::var_os("NIX_STATE_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from("/nix/var/nix"), PathBuf::from)
}

/// The local store's log directory: `NIX_LOG_DIR`, or `/nix/var/log/nix`.
pub fn log_dir() -> PathBuf {
    std::env::var_os("NIX_LOG_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from("/nix/var/log/nix"), PathBuf::from)
}

/// Where a store whose log directory is `log_dir` keeps the build log of the derivation whose
/// store path's base name is `drv_name` (`HASH-NAME.drv`), as Nix 2.8's `addBuildLog` writes it:
/// `drvs/`, the first two characters, the rest with `.bz2`.
pub fn build_log_file(log_dir: &Path, drv_name: &str) -> PathBuf {
    let (head, rest) = drv_name.split_at(drv_name.len().min(2));
    log_dir.join("drvs").join(head).join(format!("{rest}.bz2"))
}

/// The database of the store whose state directory is `state_dir`.
pub fn db_path(state_dir: &Path) -> PathBuf {
    state_dir.join("db/db.sqlite")
}

/// Which file `path` is (device and inode), if it exists: a file removed and created anew is
/// another file.
pub fn file_identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_logs_are_where_nix_writes_them() {
        assert_eq!(
            build_log_file(Path::new("/nix/var/log/nix"), "7h7qgvs4-x.drv"),
            Path::new("/nix/var/log/nix/drvs/7h/7qgvs4-x.drv.bz2")
        );
    }

    #[test]
    fn a_file_made_anew_is_another_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        assert_eq!(file_identity(&path), None);
        std::fs::write(&path, "a").unwrap();
        let first = file_identity(&path).unwrap();
        // Keep the first file's inode in use, so the new file cannot get it back.
        let _old = std::fs::File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "b").unwrap();
        assert_ne!(file_identity(&path), Some(first));
    }
}
