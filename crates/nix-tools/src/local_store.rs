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
