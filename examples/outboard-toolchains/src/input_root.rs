//! The store paths an input root's symlinks point into.
//!
//! Symlinks are read, never followed: the store they point into is usually not the one
//! this process sees (it is being filled). Relative targets are resolved lexically from the
//! link's directory, and a target inside a store object (`<store>/<hash>-<name>/bin/cc`)
//! counts as that store object.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use nixspace_nix_formats::store_path::{StoreDir, StorePathError};

/// Why an input root could not be read.
#[derive(Debug, thiserror::Error)]
pub enum InputRootError {
    /// The root or something under it could not be read.
    #[error("cannot read {0}: {1}")]
    Unreadable(PathBuf, std::io::Error),
    /// The root is not a directory.
    #[error("input root {0} is not a directory")]
    NotADirectory(PathBuf),
    /// A symlink points into the store directory, but not at a store path.
    #[error("symlink {link} points to {target}, which is not a store path: {reason}")]
    NotAStorePath {
        /// The symlink.
        link: PathBuf,
        /// Where it points (resolved).
        target: String,
        /// What is wrong with it.
        reason: StorePathError,
    },
}

/// The store paths (printed) that symlinks anywhere under `root` point into.
pub fn store_targets(
    root: &Path,
    store_dir: &StoreDir,
) -> Result<BTreeSet<String>, InputRootError> {
    let unreadable = |p: &Path| {
        let p = p.to_owned();
        move |e| InputRootError::Unreadable(p, e)
    };
    if !std::fs::metadata(root).map_err(unreadable(root))?.is_dir() {
        return Err(InputRootError::NotADirectory(root.to_owned()));
    }
    let mut targets = BTreeSet::new();
    let mut directories = vec![root.to_owned()];
    while let Some(dir) = directories.pop() {
        for entry in std::fs::read_dir(&dir).map_err(unreadable(&dir))? {
            let path = entry.map_err(unreadable(&dir))?.path();
            let kind = std::fs::symlink_metadata(&path).map_err(unreadable(&path))?;
            if kind.is_dir() {
                directories.push(path);
            } else if kind.is_symlink() {
                let target = std::fs::read_link(&path).map_err(unreadable(&path))?;
                if let Some(store_path) = store_object(&dir.join(target), store_dir, &path)? {
                    targets.insert(store_path);
                }
            }
        }
    }
    Ok(targets)
}

/// The store object `target` (an absolute path, possibly with `.` and `..`) lies in, if it is
/// inside `store_dir`.
fn store_object(
    target: &Path,
    store_dir: &StoreDir,
    link: &Path,
) -> Result<Option<String>, InputRootError> {
    let normal = normalise(target);
    let text = normal.to_string_lossy();
    match store_dir.parse_with_subpath(&text) {
        Ok((path, _)) => Ok(Some(store_dir.print(&path))),
        Err(StorePathError::NotInStore { .. }) => Ok(None),
        Err(reason) => Err(InputRootError::NotAStorePath {
            link: link.to_owned(),
            target: text.into_owned(),
            reason,
        }),
    }
}

/// `path` with `.` and `..` resolved without looking at the file system.
fn normalise(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const TOOL: &str = "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-tool";
    const LIB: &str = "/nix/store/0vkw1m51q34dr64z5i87dy99an4hfmyg-lib";

    #[test]
    fn symlinks_anywhere_count_as_their_store_objects() {
        let root = tempfile::tempdir().unwrap();
        let deep = root.path().join("a/b");
        std::fs::create_dir_all(&deep).unwrap();
        symlink(format!("{TOOL}/bin/tool"), root.path().join("tool")).unwrap();
        symlink(format!("{TOOL}/share"), deep.join("share")).unwrap();
        // Relative, climbing out of the input root.
        let up = "../".repeat(deep.components().count());
        symlink(format!("{up}{}", &LIB[1..]), deep.join("lib")).unwrap();
        // Not into the store: ignored, and so are plain files.
        symlink("/bin/sh", root.path().join("sh")).unwrap();
        std::fs::write(root.path().join("input.c"), "int main;").unwrap();
        let found = store_targets(root.path(), &StoreDir::default()).unwrap();
        assert_eq!(found, [TOOL.to_owned(), LIB.to_owned()].into());
    }

    #[test]
    fn a_link_into_the_store_to_no_store_path_is_an_error() {
        let root = tempfile::tempdir().unwrap();
        symlink("/nix/store/not-a-hash", root.path().join("bad")).unwrap();
        let err = store_targets(root.path(), &StoreDir::default()).unwrap_err();
        assert!(err.to_string().contains("not a store path"), "{err}");
        assert!(err.to_string().contains("bad"), "{err}");
    }

    #[test]
    fn a_missing_or_plain_file_root_is_an_error() {
        let root = tempfile::tempdir().unwrap();
        let missing = root.path().join("missing");
        let err = store_targets(&missing, &StoreDir::default()).unwrap_err();
        assert!(err.to_string().starts_with("cannot read"), "{err}");
        let file = root.path().join("file");
        std::fs::write(&file, "").unwrap();
        let err = store_targets(&file, &StoreDir::default()).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
    }
}
