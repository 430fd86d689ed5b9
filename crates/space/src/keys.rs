//! The secret keys behind sturdy refs: one per capability name (the ref's
//! oid), kept in a file (mode 0600) so that refs stay valid across restarts.
//!
//! The file holds a Preserves dictionary `{ name: #x"hex" … }`. It is created
//! with fresh random keys on first use and only read afterwards.
//!
//! A host listening on TCP also keeps a [`NoiseKey`]: the X25519 key pair its
//! connections' Noise sessions authenticate it with, in a file of the same form.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use noise_protocol::{U8Array, DH};
use noise_rust_crypto::X25519;
use preserves::NoEmbeddedDomainCodec;
use preserves_schema::Unparse;
use rand::RngCore;
use syndicate::actor::AnyValue;
use syndicate::schemas::gatekeeper;
use syndicate::schemas::noise;
use syndicate::schemas::sturdy::{SturdyDescriptionDetail, SturdyRef};

use crate::doorman::KeyRing;

/// Failures reading or creating a key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A filesystem problem.
    #[error("{what} {path}: {source}")]
    Io {
        /// What we were doing.
        what: &'static str,
        /// The key file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file exists but does not hold a key for every name.
    #[error("key file {0} is malformed or lacks a key; delete it to mint new capabilities")]
    Malformed(PathBuf),
}

/// Secret keys by capability name.
pub struct Keys(BTreeMap<String, Vec<u8>>);

impl Keys {
    /// Read the keys of `names` from `path`, or create the file with fresh
    /// random keys if it does not exist.
    pub fn load_or_create(path: &Path, names: &[&str]) -> Result<Keys, KeyError> {
        match Keys::read(path, names) {
            Err(KeyError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                let keys = Keys(
                    names
                        .iter()
                        .map(|name| {
                            let mut key = vec![0u8; 32];
                            rand::thread_rng().fill_bytes(&mut key);
                            ((*name).to_owned(), key)
                        })
                        .collect(),
                );
                keys.create(path, names)
            }
            read => read,
        }
    }

    /// The keys of `names` from `<dir>/keys`, and the key of `later` from `<dir>/keys-<later>`
    /// (a file of its own), each file created on first use. A capability added later keeps
    /// its key in a file of its own, so key files made before it existed stay valid.
    pub fn load_with(dir: &Path, names: &[&str], later: &str) -> Result<Keys, KeyError> {
        let mut keys = Keys::load_or_create(&dir.join("keys"), names)?;
        let own = Keys::load_or_create(&dir.join(format!("keys-{later}")), &[later])?;
        keys.0.extend(own.0);
        Ok(keys)
    }

    /// Read the keys of `names` from `path`.
    fn read(path: &Path, names: &[&str]) -> Result<Keys, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
            what: "cannot read key file",
            path: path.to_owned(),
            source,
        })?;
        Keys::parse(&text, names).ok_or(KeyError::Malformed(path.to_owned()))
    }

    fn parse(text: &str, names: &[&str]) -> Option<Keys> {
        let v: AnyValue = preserves::read_text(text, false, &mut NoEmbeddedDomainCodec).ok()?;
        let mut keys = BTreeMap::new();
        for name in names {
            let key = v.get(&AnyValue::symbol((*name).to_owned()))?;
            keys.insert((*name).to_owned(), key.as_bytestring()?.into_owned());
        }
        Some(Keys(keys))
    }

    /// Create the key file (0600), complete or not at all (see [`crate::private_file::create_new`]):
    /// a crash never leaves a key file that differs from the route files written after it.
    /// If another process created it meanwhile, its keys are read instead.
    fn create(self, path: &Path, names: &[&str]) -> Result<Keys, KeyError> {
        let mut text = String::from("{");
        for (name, key) in &self.0 {
            let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
            text.push_str(&format!(" {name}: #x\"{hex}\""));
        }
        text.push_str(" }\n");
        match crate::private_file::create_new(path, &text) {
            Ok(()) => Ok(self),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Keys::read(path, names),
            Err(source) => Err(KeyError::Io {
                what: "cannot create key file",
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// The key of `name` (empty if `name` was not asked for when loading).
    pub fn key(&self, name: &str) -> &[u8] {
        self.0.get(name).map(Vec::as_slice).unwrap_or_default()
    }

    /// What a gatekeeper binds for `name`: a sturdy `ref` with oid `"name"`
    /// (a string) and its key.
    pub fn description(&self, name: &str) -> gatekeeper::Description {
        gatekeeper::Description {
            step_type: "ref".to_owned(),
            detail: SturdyDescriptionDetail {
                oid: AnyValue::new(name.to_owned()),
                key: self.key(name).to_vec(),
            }
            .unparse(),
        }
    }

    /// The sturdy ref that opens what is bound to `name`'s [`Keys::description`].
    pub fn sturdy_ref(&self, name: &str) -> SturdyRef {
        SturdyRef::mint(AnyValue::new(name.to_owned()), self.key(name))
    }

    /// Every key by name, for a [`crate::doorman::Doorman`].
    pub fn ring(&self) -> KeyRing {
        Arc::new(self.0.clone())
    }
}

/// The name of the Noise secret key in its key file.
const NOISE_SECRET: &str = "noise-secret";

/// The service selector of a host's Noise binding: what a client names in its `noise` step.
pub fn noise_service() -> AnyValue {
    AnyValue::symbol("nixspace")
}

/// A host's Noise key pair (X25519, for Syndicate's default `Noise_NK_25519_ChaChaPoly_BLAKE2s`:
/// the server authenticated by this key, the client anonymous).
pub struct NoiseKey {
    secret: Vec<u8>,
    public: Vec<u8>,
}

impl NoiseKey {
    /// Read the key pair's secret from `path`, or create the file (0600, complete or not at all)
    /// with a fresh one; the public key is derived from it.
    pub fn load_or_create(path: &Path) -> Result<NoiseKey, KeyError> {
        let keys = Keys::load_or_create(path, &[NOISE_SECRET])?;
        let secret = keys.key(NOISE_SECRET);
        if secret.len() != <X25519 as DH>::Key::len() {
            return Err(KeyError::Malformed(path.to_owned()));
        }
        let public = X25519::pubkey(&<X25519 as DH>::Key::from_slice(secret));
        Ok(NoiseKey {
            secret: secret.to_vec(),
            public: public.as_slice().to_vec(),
        })
    }

    /// The public key clients pin in their route files.
    pub fn public(&self) -> &[u8] {
        &self.public
    }

    /// The `noise` path step a client resolves to reach this host's sessions.
    pub fn spec(&self) -> noise::NoiseSpec {
        noise::NoiseSpec {
            service: noise::ServiceSelector(noise_service()),
            key: self.public.clone(),
            protocol: noise::NoiseProtocol::Absent,
            pre_shared_keys: noise::NoisePreSharedKeys::Absent,
        }
    }

    /// What a gatekeeper binds to serve Noise sessions with this key pair.
    pub fn description(&self) -> gatekeeper::Description {
        gatekeeper::Description {
            step_type: "noise".to_owned(),
            detail: noise::NoiseServiceSpec {
                base: self.spec(),
                secret_key: noise::SecretKeyField::Present {
                    secret_key: self.secret.clone(),
                },
            }
            .unparse(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_created_once_then_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let first = Keys::load_or_create(&path, &["a", "b"]).unwrap();
        assert_eq!(first.key("a").len(), 32);
        assert_ne!(first.key("a"), first.key("b"));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = Keys::load_or_create(&path, &["a", "b"]).unwrap();
        assert_eq!(again.key("a"), first.key("a"));
        assert_eq!(again.key("b"), first.key("b"));
    }

    /// What a reader spinning on `path` reads first while `create` makes it.
    fn first_read_while(path: &Path, create: impl FnOnce()) -> String {
        let reader = {
            let path = path.to_owned();
            std::thread::spawn(move || loop {
                if let Ok(text) = std::fs::read_to_string(&path) {
                    return text;
                }
            })
        };
        create();
        reader.join().unwrap()
    }

    #[test]
    fn a_reader_never_sees_a_key_file_half_written() {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().unwrap();
        let whole = |text: &str| Keys::parse(text, &["a", "b"]).is_some();
        // Positive control: the same reader racing a file created then written in place
        // (as keys were written before) reads it unfinished.
        let unfinished = (0..300).any(|round| {
            let path = dir.path().join(format!("in-place{round}"));
            let text = first_read_while(&path, || {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .unwrap();
                std::thread::yield_now();
                f.write_all(b"{ a: #x\"00\" b: #x\"01\" }\n").unwrap();
            });
            !whole(&text)
        });
        assert!(unfinished, "the reader never saw an unfinished file");
        for round in 0..300 {
            let path = dir.path().join(format!("keys{round}"));
            let text = first_read_while(&path, || {
                Keys::load_or_create(&path, &["a", "b"]).unwrap();
            });
            assert!(whole(&text), "round {round}: read {text:?}");
        }
        // No temporary file is left beside them.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn the_noise_key_is_created_once_and_its_public_half_derived() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("noise-key");
        let first = NoiseKey::load_or_create(&path).unwrap();
        assert_eq!(first.public().len(), 32);
        assert_ne!(first.public(), first.secret.as_slice());
        let again = NoiseKey::load_or_create(&path).unwrap();
        assert_eq!(again.public(), first.public());
        let other = NoiseKey::load_or_create(&dir.path().join("other")).unwrap();
        assert_ne!(other.public(), first.public());
    }

    #[test]
    fn a_later_capability_keeps_its_key_beside_an_older_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let old = Keys::load_or_create(&dir.path().join("keys"), &["a"]).unwrap();
        let keys = Keys::load_with(dir.path(), &["a"], "b").unwrap();
        assert_eq!(keys.key("a"), old.key("a"));
        assert_eq!(keys.key("b").len(), 32);
        let again = Keys::load_with(dir.path(), &["a"], "b").unwrap();
        assert_eq!(again.key("b"), keys.key("b"));
    }

    #[test]
    fn a_file_without_every_key_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        Keys::load_or_create(&path, &["a"]).unwrap();
        let e = Keys::load_or_create(&path, &["a", "b"])
            .err()
            .expect("lacks b");
        assert!(matches!(e, KeyError::Malformed(_)), "{e}");
    }
}
