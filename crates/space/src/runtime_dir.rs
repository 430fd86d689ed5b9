//! Where a dataspace keeps its socket and route files by default.

use std::path::PathBuf;

/// The default directory for sockets and route files:
/// `$XDG_RUNTIME_DIR/nixspace`, or `/tmp/nixspace-<uid>` when that is unset.
pub fn default_runtime_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("nixspace"),
        _ => PathBuf::from(format!(
            "/tmp/nixspace-{}",
            rustix::process::getuid().as_raw()
        )),
    }
}
