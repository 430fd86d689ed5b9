//! File system side of NAR: dumping a path into a NAR and unpacking a NAR
//! into a new directory tree (Unix only).
//!
//! [`dump_path`] walks a tree with `symlink_metadata` (it never follows
//! symlinks), sorts directory entries bytewise, and marks a regular file
//! executable when its owner-execute bit is set, as Nix does.
//!
//! [`restore_path`] creates the target itself (it must not exist) and only
//! ever creates new entries (`create_new`) inside directories it created.
//! Entry names are validated by the parser and each name appears once per
//! directory, so nothing is written through a symlink or outside the target.
//! Ownership, timestamps and permissions other than the execute bits are
//! not restored.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{parse, NarError, NarSummary, NarVisitor, NarWriter, ParseLimits};

/// Writes the NAR of `path` to `out`, returning its SHA-256 and size.
pub fn dump_path<W: Write>(path: &Path, out: W) -> Result<NarSummary, NarError> {
    let mut w = NarWriter::new(out)?;
    dump_node(path, &mut w)?;
    let (_, summary) = w.finish()?;
    Ok(summary)
}

/// The SHA-256 and size of the NAR of `path` (what `nix-hash --type sha256`
/// prints for a directory).
pub fn hash_path(path: &Path) -> Result<NarSummary, NarError> {
    dump_path(path, io::sink())
}

fn dump_node<W: Write>(path: &Path, w: &mut NarWriter<W>) -> Result<(), NarError> {
    let meta = fs::symlink_metadata(path)
        .map_err(|e| NarError::io(format!("reading metadata of '{}'", path.display()), e))?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = fs::read_link(path)
            .map_err(|e| NarError::io(format!("reading link '{}'", path.display()), e))?;
        w.symlink(target.as_os_str().as_bytes())
    } else if ft.is_file() {
        let mut f = File::open(path)
            .map_err(|e| NarError::io(format!("opening '{}'", path.display()), e))?;
        let executable = meta.permissions().mode() & 0o100 != 0;
        w.regular(executable, meta.len(), &mut f)
    } else if ft.is_dir() {
        let mut names = Vec::new();
        let entries = fs::read_dir(path)
            .map_err(|e| NarError::io(format!("listing '{}'", path.display()), e))?;
        for entry in entries {
            let entry =
                entry.map_err(|e| NarError::io(format!("listing '{}'", path.display()), e))?;
            names.push(entry.file_name().into_vec());
        }
        names.sort();
        w.start_directory()?;
        for name in names {
            w.entry(&name)?;
            dump_node(&path.join(std::ffi::OsStr::from_bytes(&name)), w)?;
        }
        w.end_directory()
    } else {
        Err(NarError::UnsupportedFileType(path.to_owned()))
    }
}

/// Unpacks the NAR read from `input` into `target`, which must not exist,
/// and checks that the input ends with the NAR. Returns the NAR's SHA-256
/// and size.
pub fn restore_path<R: Read>(mut input: R, target: &Path) -> Result<NarSummary, NarError> {
    if fs::symlink_metadata(target).is_ok() {
        return Err(NarError::TargetExists(target.to_owned()));
    }
    let mut v = Restorer {
        root: target.to_owned(),
    };
    let summary = parse(&mut input, &mut v, ParseLimits::default())?;
    let mut probe = [0u8; 1];
    loop {
        match input.read(&mut probe) {
            Ok(0) => return Ok(summary),
            Ok(_) => return Err(NarError::TrailingData),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(NarError::io("reading NAR", e)),
        }
    }
}

struct Restorer {
    root: PathBuf,
}

impl Restorer {
    fn path(&self, components: &[Vec<u8>]) -> PathBuf {
        let mut p = self.root.clone();
        for c in components {
            p.push(std::ffi::OsStr::from_bytes(c));
        }
        p
    }
}

impl NarVisitor for Restorer {
    fn directory(&mut self, path: &[Vec<u8>]) -> Result<(), NarError> {
        let p = self.path(path);
        fs::create_dir(&p)
            .map_err(|e| NarError::io(format!("creating directory '{}'", p.display()), e))
    }

    fn regular(
        &mut self,
        path: &[Vec<u8>],
        executable: bool,
        _size: u64,
        contents: &mut dyn Read,
    ) -> Result<(), NarError> {
        let p = self.path(path);
        let mode = if executable { 0o755 } else { 0o644 };
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&p)
            .map_err(|e| NarError::io(format!("creating '{}'", p.display()), e))?;
        io::copy(contents, &mut f)
            .map_err(|e| NarError::io(format!("writing '{}'", p.display()), e))?;
        Ok(())
    }

    fn symlink(&mut self, path: &[Vec<u8>], target: &[u8]) -> Result<(), NarError> {
        let p = self.path(path);
        std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), &p)
            .map_err(|e| NarError::io(format!("creating symlink '{}'", p.display()), e))
    }
}
