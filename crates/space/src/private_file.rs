//! Files only their owner may read or change (keys, route files, server configs): written whole
//! or not at all, and checked for owner and mode before they are believed.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Write `text` to `path` with mode 0600: into a temporary file beside it (0600 from its
/// creation), synced, renamed over `path`, and the directory synced, so that a reader sees
/// the old file or the new one, never half of one, and a crash keeps one of them.
pub fn write(path: &Path, text: &str) -> std::io::Result<()> {
    publish(path, text, |tmp, path| std::fs::rename(tmp, path))
}

/// Like [`write`], but only if `path` does not exist yet (an error of kind `AlreadyExists`
/// otherwise, leaving the existing file as it is): the file appears complete or not at all.
pub fn create_new(path: &Path, text: &str) -> std::io::Result<()> {
    publish(path, text, |tmp, path| std::fs::hard_link(tmp, path))
}

/// Write `text` to a fresh temporary file beside `path`, sync it, `place` it at `path`, then
/// remove the temporary name and sync the directory.
fn publish(
    path: &Path,
    text: &str,
    place: impl FnOnce(&Path, &Path) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = temporary_name(path);
    let placed = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(text.as_bytes())?;
            f.sync_all()
        })
        .and_then(|()| place(&tmp, path));
    // After a rename the temporary name is gone; after a link or a failure it is removed.
    let _ = std::fs::remove_file(&tmp);
    placed?;
    File::open(dir)?.sync_all()
}

/// `path` with `.<pid>.tmp` appended: distinct per process, beside `path`.
fn temporary_name(path: &Path) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    PathBuf::from(tmp)
}

/// A file or directory that someone other than its reader (or root) could have written.
#[derive(Debug, thiserror::Error)]
#[error(
    "refusing {path} (owner uid {owner}, mode {mode:04o}): {problem}; \
     it must be owned by you (uid {reader}) or root and not writable by group or others \
     (fix it with chown and `chmod go-w`, or remove it and let `nixspace up` write it again)"
)]
pub struct Untrusted {
    /// The file or directory.
    pub path: PathBuf,
    /// Its owner.
    pub owner: u32,
    /// Its permission bits.
    pub mode: u32,
    /// The reading user.
    pub reader: u32,
    /// What is wrong with it.
    pub problem: &'static str,
}

/// Why a file could not be checked or is not trusted.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// Its metadata could not be read.
    #[error("cannot inspect {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Someone else could have written it.
    #[error(transparent)]
    Untrusted(#[from] Untrusted),
}

/// Check, as ssh checks `authorized_keys`, that `path` and the directory holding it are owned
/// by the effective user or root and not writable by group or others (the directory may be
/// writable by all when its sticky bit is set, as `/tmp` is: then nobody else can replace the
/// file).
pub fn check_trusted(path: &Path) -> Result<(), CheckError> {
    let reader = rustix::process::geteuid().as_raw();
    check_one(path, reader, false)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    check_one(dir, reader, true)
}

fn check_one(path: &Path, reader: u32, is_dir: bool) -> Result<(), CheckError> {
    let meta = std::fs::metadata(path).map_err(|source| CheckError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.mode() & 0o7777;
    let problem = if meta.uid() != reader && meta.uid() != 0 {
        Some("it is owned by another user")
    } else if mode & 0o022 != 0 && !(is_dir && mode & 0o1000 != 0) {
        Some("it is writable by group or others")
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(problem) => Err(Untrusted {
            path: path.to_owned(),
            owner: meta.uid(),
            mode,
            reader,
            problem,
        }
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_file_writable_by_others_is_refused_with_its_owner_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("worker.route");
        write(&path, "x").unwrap();
        // Positive control: the file as written is trusted, and so is one others may read.
        check_trusted(&path).unwrap();
        chmod(&path, 0o644);
        check_trusted(&path).unwrap();
        for mode in [0o620, 0o602, 0o666] {
            chmod(&path, mode);
            let e = check_trusted(&path).unwrap_err().to_string();
            assert!(e.contains("writable by group or others"), "{e}");
            assert!(e.contains(&format!("mode {mode:04o}")), "{e}");
            assert!(e.contains(&path.display().to_string()), "{e}");
        }
    }

    #[test]
    fn a_directory_writable_by_others_is_refused_unless_sticky() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("worker.route");
        write(&path, "x").unwrap();
        chmod(dir.path(), 0o777);
        let e = check_trusted(&path).unwrap_err().to_string();
        assert!(e.contains(&dir.path().display().to_string()), "{e}");
        assert!(e.contains("mode 0777"), "{e}");
        // Positive control: the same directory with the sticky bit (like /tmp) is trusted.
        chmod(dir.path(), 0o1777);
        check_trusted(&path).unwrap();
    }

    #[test]
    fn a_file_owned_by_another_user_is_refused() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: changing a file's owner needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("worker.route");
        write(&path, "x").unwrap();
        // Positive control: owned by the reader (root), it is trusted.
        check_trusted(&path).unwrap();
        std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
        let e = check_trusted(&path).unwrap_err().to_string();
        assert!(e.contains("owned by another user"), "{e}");
        assert!(e.contains("owner uid 65534"), "{e}");
    }

    /// How many reads of `path` saw other than `len` bytes while `writer` ran.
    fn partial_reads(path: &Path, len: usize, writer: impl FnOnce()) -> usize {
        use std::sync::atomic::{AtomicBool, Ordering};
        let done = std::sync::Arc::new(AtomicBool::new(false));
        let reader = {
            let (path, done) = (path.to_owned(), done.clone());
            std::thread::spawn(move || {
                let mut partial = 0;
                while !done.load(Ordering::Relaxed) {
                    if std::fs::read(&path).is_ok_and(|bytes| bytes.len() != len) {
                        partial += 1;
                    }
                }
                partial
            })
        };
        writer();
        done.store(true, Ordering::Relaxed);
        reader.join().unwrap()
    }

    #[test]
    fn a_replaced_file_is_never_read_half_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let big = "k".repeat(1 << 20);
        std::fs::write(&path, &big).unwrap();
        // Positive control: a reader racing an in-place writer does see partial files.
        let seen = partial_reads(&path, big.len(), || {
            for _ in 0..200 {
                std::fs::write(&path, &big).unwrap();
            }
        });
        assert!(seen > 0, "the reader could not see a partial file");
        // The same reader racing `write` only ever sees a whole file.
        let seen = partial_reads(&path, big.len(), || {
            for _ in 0..200 {
                write(&path, &big).unwrap();
            }
        });
        assert_eq!(seen, 0, "partial files were read");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn create_new_keeps_an_existing_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        create_new(&path, "first").unwrap();
        let e = create_new(&path, "second").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "first");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }
}
