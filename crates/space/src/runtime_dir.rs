//! Where nixspace keeps its socket, route files and state by default.

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

/// The default directory for state kept across restarts (the build history):
/// `$XDG_STATE_HOME/nixspace`, else `$HOME/.local/state/nixspace`, else the
/// runtime directory.
pub fn default_state_dir() -> PathBuf {
    let from = |var: &str| {
        std::env::var_os(var)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    from("XDG_STATE_HOME")
        .map(|d| d.join("nixspace"))
        .or_else(|| from("HOME").map(|h| h.join(".local/state/nixspace")))
        .unwrap_or_else(default_runtime_dir)
}
