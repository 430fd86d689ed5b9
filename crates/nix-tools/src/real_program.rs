//! Finding the real Nix programs on `PATH`, never this process's own executable.
//!
//! `nixspace` can be installed as a package's `bin/nix-daemon` (it then answers as
//! `nix-daemon`), and that directory is usually first on `PATH`: whatever nixspace runs as
//! `nix-daemon` (the translator's private upstream, the worker's daemon pool) would start
//! nixspace again. [`real_program`] takes the first program of the name on `PATH` that is not
//! the same file as [`std::env::current_exe`] (compared by device and inode, so symlinks and
//! hard links count as the same file).

use std::ffi::{OsStr, OsString};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The program name of Nix's daemon.
pub const NIX_DAEMON: &str = "nix-daemon";

/// No program of that name other than this one.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot find the real `{program}`: {} (is Nix installed? on Debian: apt-get install nix-bin)",
    self.what_was_found()
)]
pub struct ProgramNotFound {
    /// The program's name (or path, as given).
    pub program: PathBuf,
    /// The `PATH` searched (unless the program was given as a path).
    pub search_path: OsString,
    /// This process's own executable, when it could be read.
    pub own: Option<PathBuf>,
}

impl ProgramNotFound {
    fn what_was_found(&self) -> String {
        let own = self.own.as_ref().map_or_else(
            || "this program".to_owned(),
            |p| format!("this program, {}", p.display()),
        );
        if has_directory(&self.program) {
            format!("{} is {own}", self.program.display())
        } else {
            format!(
                "no `{}` on PATH={} other than {own}",
                self.program.display(),
                self.search_path.to_string_lossy()
            )
        }
    }
}

/// The real `nix-daemon`: the first on `PATH` that is not this program.
pub fn real_nix_daemon() -> Result<PathBuf, ProgramNotFound> {
    real_program(Path::new(NIX_DAEMON))
}

/// The first executable named `program` on `PATH` that is not this process's own executable;
/// a `program` with a directory part is taken as it is, unless it is this executable.
pub fn real_program(program: &Path) -> Result<PathBuf, ProgramNotFound> {
    let own_path = std::env::current_exe().ok();
    let own = own_path.as_deref().and_then(FileId::of);
    let search_path = std::env::var_os("PATH").unwrap_or_default();
    let found = if has_directory(program) {
        let is_own = own.is_some() && FileId::of(program) == own;
        (!is_own).then(|| program.to_owned())
    } else {
        search(program.as_os_str(), &search_path, own)
    };
    found.ok_or(ProgramNotFound {
        program: program.to_owned(),
        search_path,
        own: own_path,
    })
}

/// Whether `program` names a file by path rather than by a name to look up.
fn has_directory(program: &Path) -> bool {
    program.as_os_str().as_encoded_bytes().contains(&b'/')
}

/// The first executable file `name` in the directories of `search_path` that is not `skip`.
fn search(name: &OsStr, search_path: &OsStr, skip: Option<FileId>) -> Option<PathBuf> {
    std::env::split_paths(search_path)
        // An empty entry means the current directory, as the shell and execvp take it.
        .map(|dir| {
            if dir.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                dir
            }
        })
        .map(|dir| dir.join(name))
        .find(|candidate| {
            let Ok(meta) = std::fs::metadata(candidate) else {
                return false;
            };
            let executable = meta.is_file() && meta.permissions().mode() & 0o111 != 0;
            executable && Some(FileId::from(&meta)) != skip
        })
}

/// A file's identity: its device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    /// The file `path` names, following symlinks.
    fn of(path: &Path) -> Option<FileId> {
        std::fs::metadata(path).ok().map(|m| FileId::from(&m))
    }
}

impl From<&std::fs::Metadata> for FileId {
    fn from(meta: &std::fs::Metadata) -> FileId {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn executable(path: &Path) {
        std::fs::write(path, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn the_first_program_on_path_that_is_not_this_one_is_taken() {
        let tmp = tempfile::tempdir().unwrap();
        let (own_dir, link_dir, real_dir) = (
            tmp.path().join("own"),
            tmp.path().join("pkg"),
            tmp.path().join("real"),
        );
        for d in [&own_dir, &link_dir, &real_dir] {
            std::fs::create_dir(d).unwrap();
        }
        let own = own_dir.join("nixspace");
        executable(&own);
        std::os::unix::fs::symlink(&own, link_dir.join("nix-daemon")).unwrap();
        executable(&real_dir.join("nix-daemon"));
        let own_id = FileId::of(&own);
        let path = std::env::join_paths([&link_dir, &real_dir]).unwrap();
        assert_eq!(
            search(OsStr::new("nix-daemon"), &path, own_id),
            Some(real_dir.join("nix-daemon"))
        );
        // Without the real one, nothing; without a program to skip, the first.
        let only_own = std::env::join_paths([&link_dir]).unwrap();
        assert_eq!(search(OsStr::new("nix-daemon"), &only_own, own_id), None);
        assert_eq!(
            search(OsStr::new("nix-daemon"), &path, None),
            Some(link_dir.join("nix-daemon"))
        );
    }

    #[test]
    fn files_that_are_not_executable_are_passed_over() {
        let tmp = tempfile::tempdir().unwrap();
        let plain = tmp.path().join("a");
        std::fs::create_dir(&plain).unwrap();
        std::fs::write(plain.join("nix-daemon"), "").unwrap();
        std::fs::create_dir_all(tmp.path().join("b/nix-daemon")).unwrap();
        let path = std::env::join_paths([plain, tmp.path().join("b")]).unwrap();
        assert_eq!(search(OsStr::new("nix-daemon"), &path, None), None);
    }

    #[test]
    fn the_error_names_the_path_searched() {
        let e = ProgramNotFound {
            program: PathBuf::from("nix-daemon"),
            search_path: OsString::from("/pkg/bin"),
            own: Some(PathBuf::from("/opt/nixspace")),
        };
        assert_eq!(
            e.to_string(),
            "cannot find the real `nix-daemon`: no `nix-daemon` on PATH=/pkg/bin other than \
             this program, /opt/nixspace (is Nix installed? on Debian: apt-get install nix-bin)"
        );
    }
}
