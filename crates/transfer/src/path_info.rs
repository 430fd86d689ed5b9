//! A path's registration data, between the Nix protocol's form and the dataspace's.

use nixspace_nix_formats::hash::{Hash, HashAlgo, HashError};
use nixspace_nix_formats::store_path::{StoreDir, StorePath, StorePathError};
use nixspace_nix_protocol::{PathInfo, ValidPathInfo};
use nixspace_protocol::store;

/// At most this many signatures are taken from another participant's path info (Nix adds one
/// per signing key; a path rarely has more than a few).
pub const MAX_SIGNATURES: usize = 64;

/// At most this many bytes in one signature (`name:base64` of 64 bytes is under 200 for any
/// reasonable key name).
pub const MAX_SIGNATURE_LEN: usize = 1024;

/// A field of another participant's path info that does not hold what it must.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathInfoError {
    /// The NAR hash is not a SHA-256 hash.
    #[error("bad NAR hash {text:?}: {source}")]
    NarHash {
        /// The field.
        text: String,
        /// Why.
        #[source]
        source: HashError,
    },
    /// The NAR size is negative or too large.
    #[error("bad NAR size {0}")]
    NarSize(String),
    /// A reference is not a store path of this store.
    #[error("bad reference {path}: {source}")]
    Reference {
        /// The field.
        path: String,
        /// Why.
        #[source]
        source: StorePathError,
    },
    /// More signatures than [`MAX_SIGNATURES`], or one longer than [`MAX_SIGNATURE_LEN`].
    #[error("too many or too long signatures ({count}, the longest {longest} bytes; at most {MAX_SIGNATURES} of {MAX_SIGNATURE_LEN})")]
    Signatures {
        /// How many there were.
        count: usize,
        /// The longest's length.
        longest: usize,
    },
    /// The deriver is not a store path of this store.
    #[error("bad deriver {path}: {source}")]
    Deriver {
        /// The field.
        path: String,
        /// Why.
        #[source]
        source: StorePathError,
    },
}

/// The dataspace form of what the daemon told about a path.
pub fn to_wire(store_dir: &StoreDir, info: &PathInfo) -> store::PathInfo {
    store::PathInfo {
        nar_hash: info.nar_hash.to_prefixed_base16(),
        nar_size: (info.nar_size as i64).into(),
        references: info.references.iter().map(|r| store_dir.print(r)).collect(),
        deriver: info
            .deriver
            .as_ref()
            .map(|d| store_dir.print(d))
            .unwrap_or_default(),
        ca: info.ca.clone().unwrap_or_default(),
        signatures: info.sigs.iter().cloned().collect(),
    }
}

/// What a copy of `path` is registered with, from the dataspace form; an error naming the
/// field if one is malformed (it came from another participant).
pub fn from_wire(
    store_dir: &StoreDir,
    path: &StorePath,
    info: &store::PathInfo,
) -> Result<ValidPathInfo, PathInfoError> {
    let nar_hash = Hash::parse_any(&info.nar_hash, Some(HashAlgo::Sha256)).map_err(|source| {
        PathInfoError::NarHash {
            text: info.nar_hash.clone(),
            source,
        }
    })?;
    let nar_size = i64::try_from(&info.nar_size)
        .ok()
        .and_then(|n| u64::try_from(n).ok())
        .ok_or_else(|| PathInfoError::NarSize(info.nar_size.to_string()))?;
    let references = info
        .references
        .iter()
        .map(|r| {
            store_dir
                .parse(r)
                .map_err(|source| PathInfoError::Reference {
                    path: r.clone(),
                    source,
                })
        })
        .collect::<Result<_, _>>()?;
    let longest = info.signatures.iter().map(String::len).max().unwrap_or(0);
    if info.signatures.len() > MAX_SIGNATURES || longest > MAX_SIGNATURE_LEN {
        return Err(PathInfoError::Signatures {
            count: info.signatures.len(),
            longest,
        });
    }
    let deriver = match info.deriver.as_str() {
        "" => None,
        d => Some(
            store_dir
                .parse(d)
                .map_err(|source| PathInfoError::Deriver {
                    path: d.to_owned(),
                    source,
                })?,
        ),
    };
    Ok(ValidPathInfo {
        path: path.clone(),
        info: PathInfo {
            deriver,
            nar_hash,
            references,
            registration_time: 0,
            nar_size,
            ultimate: false,
            sigs: info.signatures.iter().cloned().collect(),
            ca: Some(info.ca.clone()).filter(|c| !c.is_empty()),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_info_survives_the_round_trip() {
        let dir = StoreDir::default();
        let path = dir
            .parse("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello")
            .unwrap();
        let reference = dir
            .parse("/nix/store/0vkw1m51q34dr64z5i87dy99an4hfmyg-dep")
            .unwrap();
        let info = PathInfo {
            deriver: None,
            nar_hash: Hash::sha256(b"nar"),
            references: [reference].into(),
            registration_time: 0,
            nar_size: 120,
            ultimate: false,
            sigs: ["k1:c2lnbmF0dXJl".to_owned()].into(),
            ca: Some("fixed:r:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s".into()),
        };
        let back = from_wire(&dir, &path, &to_wire(&dir, &info)).unwrap();
        assert_eq!(back.info, info);
    }

    #[test]
    fn malformed_fields_are_refused_with_the_reason() {
        let dir = StoreDir::default();
        let path = dir
            .parse("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello")
            .unwrap();
        let mut wire = to_wire(
            &dir,
            &PathInfo {
                deriver: None,
                nar_hash: Hash::sha256(b"nar"),
                references: Default::default(),
                registration_time: 0,
                nar_size: 1,
                ultimate: false,
                sigs: Default::default(),
                ca: None,
            },
        );
        wire.nar_size = (-1).into();
        assert!(from_wire(&dir, &path, &wire)
            .unwrap_err()
            .to_string()
            .contains("size"));
        wire.nar_size = 1.into();
        wire.references = vec!["/etc/passwd".into()];
        assert!(from_wire(&dir, &path, &wire)
            .unwrap_err()
            .to_string()
            .contains("reference"));
        wire.references = vec![];
        wire.signatures = vec!["k:x".repeat(MAX_SIGNATURE_LEN)];
        assert!(from_wire(&dir, &path, &wire)
            .unwrap_err()
            .to_string()
            .contains("signatures"));
        wire.signatures = vec!["k:x".into(); MAX_SIGNATURES + 1];
        assert!(from_wire(&dir, &path, &wire)
            .unwrap_err()
            .to_string()
            .contains("signatures"));
        wire.signatures = vec!["k:x".into(); MAX_SIGNATURES];
        assert!(from_wire(&dir, &path, &wire).is_ok());
        wire.nar_hash = "md5:00".into();
        assert!(from_wire(&dir, &path, &wire)
            .unwrap_err()
            .to_string()
            .contains("hash"));
    }
}
