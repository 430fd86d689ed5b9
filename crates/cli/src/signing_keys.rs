//! The Nix signing keys of workers, kept beside their route files: `nixspace up` makes one for
//! its shared worker route (`worker.key` beside `worker.route`), `nixspace route worker NAME`
//! one per named worker (`worker-NAME.key`). A worker signs what it builds with the key beside
//! the route file it joined with. The trusted route comes with one too (`trusted.key`), which a
//! translator holding that route signs its trusted clients' inputs with as it serves them.
//! `up` tells every store in the dataspace to trust the public halves. The files hold Nix's secret key text (`name:base64`, as
//! `nix-store --generate-binary-cache-key` writes it), mode 0600, written atomically.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use nixspace_nix_formats::signature::{PublicKey, SecretKey};
use rand::RngCore;

/// The key in `path`, or a new one named `name` (any `:` or white space replaced) written
/// there if there is none.
pub fn load_or_create(path: &Path, name: &str) -> anyhow::Result<SecretKey> {
    match std::fs::read_to_string(path) {
        Ok(text) => SecretKey::parse(&text)
            .with_context(|| format!("signing key file {} is malformed", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let name: String = name
                .chars()
                .map(|c| {
                    if c == ':' || c.is_whitespace() {
                        '_'
                    } else {
                        c
                    }
                })
                .collect();
            let mut seed = [0u8; 32];
            rand::thread_rng().fill_bytes(&mut seed);
            let key = SecretKey::from_seed(&name, &seed)?;
            write_atomically(path, key.to_text().as_bytes())?;
            Ok(key)
        }
        Err(e) => {
            Err(e).with_context(|| format!("cannot read signing key file {}", path.display()))
        }
    }
}

/// The key in `path`, if there is a file.
pub fn load(path: &Path) -> anyhow::Result<Option<SecretKey>> {
    match std::fs::read_to_string(path) {
        Ok(text) => SecretKey::parse(&text)
            .map(Some)
            .with_context(|| format!("signing key file {} is malformed", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => {
            Err(e).with_context(|| format!("cannot read signing key file {}", path.display()))
        }
    }
}

/// The key beside `trusted_route`, which a translator holding that route vouches for its
/// trusted clients' inputs with; none (said once in the log) if there is no such file or it
/// cannot be read.
pub fn vouching_key(trusted_route: &Path) -> Option<Arc<SecretKey>> {
    let file = nixspace_space::route::signing_key_beside(trusted_route);
    match load(&file) {
        Ok(Some(key)) => Some(Arc::new(key)),
        Ok(None) => {
            tracing::info!(file = %file.display(), "no key beside the trusted route: workers with stores of their own take only clients' signed or content-addressed inputs");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "workers with stores of their own take only clients' signed or content-addressed inputs");
            None
        }
    }
}

/// The public keys of the signing keys in `dir` (`trusted.key`, `worker.key`,
/// `worker-*.key`), in file name order; a file that does not parse is skipped with a warning.
pub fn dataspace_public_keys(dir: &Path) -> Vec<PublicKey> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "key")
                && p.file_stem()
                    .and_then(|s| s.to_str())
                    .is_some_and(|s| s == "trusted" || s == "worker" || s.starts_with("worker-"))
        })
        .collect();
    files.sort();
    files
        .iter()
        .filter_map(|f| match load(f) {
            Ok(key) => key.map(|k| k.to_public()),
            Err(e) => {
                tracing::warn!(file = %f.display(), error = %e, "ignoring a signing key file");
                None
            }
        })
        .collect()
}

/// Write `bytes` to `path` (mode 0600) through a temporary file in the same directory,
/// synced, then renamed over it: a crash leaves the old file or the new one, never a part.
fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let temporary = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("key"),
        std::process::id()
    ));
    let written = (|| -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written.with_context(|| format!("cannot write signing key file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_made_once_private_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = nixspace_space::route::signing_key_beside(&dir.path().join("worker.route"));
        assert_eq!(file, dir.path().join("worker.key"));
        let made = load_or_create(&file, "host: a-1").unwrap();
        assert_eq!(made.name(), "host__a-1");
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = load_or_create(&file, "other").unwrap();
        assert_eq!(again.to_text(), made.to_text());
        load_or_create(&dir.path().join("worker-w2.key"), "w2").unwrap();
        load_or_create(&dir.path().join("trusted.key"), "translator").unwrap();
        std::fs::write(dir.path().join("submit.key"), made.to_text()).unwrap();
        let names: Vec<String> = dataspace_public_keys(dir.path())
            .iter()
            .map(|k| k.name().to_owned())
            .collect();
        assert_eq!(names, ["translator", "w2", "host__a-1"]);
    }
}
