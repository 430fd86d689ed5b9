//! A validated store-path string, plus its wire helpers (single, optional, set).
//!
//! This is a deliberately small stand-in for `nixspace-nix-formats`' store-path type, which is
//! still being written: it checks the *shape* of a printed store path (an absolute directory,
//! then `<32 nixbase32 chars>-<name>`), not that the directory is the store directory in use.
//! The store directory is not hard-coded anywhere, so temporary stores work; a caller that
//! needs "is this in *my* store" checks [`StorePath::store_dir`] itself.

use std::collections::BTreeSet;
use std::fmt;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::wire::{NixDeserialize, NixReader, NixSerialize, NixWriter, WireError};

/// nixbase32's alphabet (no e, o, u, t).
const NIX32_CHARS: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
/// The length of a store path's hash part.
pub const HASH_PART_LEN: usize = 32;
/// The longest name Nix accepts.
pub const MAX_NAME_LEN: usize = 211;

/// Why a string is not a store path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorePathError {
    /// Not an absolute path with a directory part.
    #[error("{0:?} is not an absolute path inside a store directory")]
    NotAbsolute(String),
    /// The base name is too short to hold a hash part, a dash and a name.
    #[error("{0:?}: base name too short")]
    TooShort(String),
    /// The hash part holds a character outside nixbase32.
    #[error("{0:?}: hash part is not nixbase32")]
    InvalidHash(String),
    /// No dash after the hash part.
    #[error("{0:?}: missing '-' after the hash part")]
    MissingDash(String),
    /// The name is empty, too long, or holds a forbidden character.
    #[error("{0:?}: invalid name")]
    InvalidName(String),
}

/// A printed store path, e.g. `/nix/store/<hash>-hello-2.12`, checked for shape.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StorePath(String);

impl StorePath {
    /// Validates a printed store path.
    pub fn parse(s: &str) -> Result<Self, StorePathError> {
        let slash = s
            .rfind('/')
            .filter(|i| *i > 0 && s.starts_with('/'))
            .ok_or_else(|| StorePathError::NotAbsolute(s.to_owned()))?;
        let base = &s[slash + 1..];
        if base.len() < HASH_PART_LEN + 2 {
            return Err(StorePathError::TooShort(s.to_owned()));
        }
        let (hash, rest) = base.split_at(HASH_PART_LEN);
        if !hash.bytes().all(|b| NIX32_CHARS.contains(&b)) {
            return Err(StorePathError::InvalidHash(s.to_owned()));
        }
        let name = rest
            .strip_prefix('-')
            .ok_or_else(|| StorePathError::MissingDash(s.to_owned()))?;
        let name_ok = !name.is_empty()
            && name.len() <= MAX_NAME_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-._?=".contains(&b));
        if !name_ok {
            return Err(StorePathError::InvalidName(s.to_owned()));
        }
        Ok(Self(s.to_owned()))
    }

    /// The printed path.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The directory holding the path (the store directory), without a trailing slash.
    pub fn store_dir(&self) -> &str {
        self.0.rsplit_once('/').map(|(d, _)| d).unwrap_or("")
    }

    /// `<hash>-<name>`.
    pub fn base_name(&self) -> &str {
        self.0.rsplit_once('/').map(|(_, b)| b).unwrap_or("")
    }

    /// The 32-character hash part.
    pub fn hash_part(&self) -> &str {
        self.base_name().get(..HASH_PART_LEN).unwrap_or("")
    }

    /// The name after the dash.
    pub fn name(&self) -> &str {
        self.base_name().get(HASH_PART_LEN + 1..).unwrap_or("")
    }

    /// Whether the name ends in `.drv`.
    pub fn is_derivation(&self) -> bool {
        self.0.ends_with(".drv")
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for StorePath {
    type Err = StorePathError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl AsRef<str> for StorePath {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl<R: AsyncRead + Unpin> NixReader<R> {
    /// Reads a store path.
    pub async fn read_store_path(&mut self, what: &'static str) -> Result<StorePath, WireError> {
        let s = self.read_string(what).await?;
        StorePath::parse(&s).map_err(|source| WireError::StorePath { what, source })
    }

    /// Reads an optional store path (the empty string means none).
    pub async fn read_opt_store_path(
        &mut self,
        what: &'static str,
    ) -> Result<Option<StorePath>, WireError> {
        let s = self.read_string(what).await?;
        if s.is_empty() {
            return Ok(None);
        }
        StorePath::parse(&s)
            .map(Some)
            .map_err(|source| WireError::StorePath { what, source })
    }

    /// Reads a set of store paths.
    pub async fn read_store_path_set(
        &mut self,
        what: &'static str,
    ) -> Result<BTreeSet<StorePath>, WireError> {
        let n = self.read_count(what).await?;
        let mut out = BTreeSet::new();
        for _ in 0..n {
            out.insert(self.read_store_path(what).await?);
        }
        Ok(out)
    }
}

impl<W: AsyncWrite + Unpin> NixWriter<W> {
    /// Writes an optional store path (none as the empty string).
    pub async fn write_opt_store_path(
        &mut self,
        p: Option<&StorePath>,
        what: &'static str,
    ) -> Result<(), WireError> {
        self.write_str(p.map(StorePath::as_str).unwrap_or(""), what)
            .await
    }
}

impl NixDeserialize for StorePath {
    async fn read_from<R: AsyncRead + Unpin + Send>(
        r: &mut NixReader<R>,
    ) -> Result<Self, WireError> {
        r.read_store_path("store path").await
    }
}

impl NixSerialize for StorePath {
    async fn write_to<W: AsyncWrite + Unpin + Send>(
        &self,
        w: &mut NixWriter<W>,
    ) -> Result<(), WireError> {
        w.write_str(&self.0, "store path").await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12.drv";

    #[test]
    fn parses_and_splits() {
        let p = StorePath::parse(P).unwrap();
        assert_eq!(p.store_dir(), "/nix/store");
        assert_eq!(p.hash_part(), "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz");
        assert_eq!(p.name(), "hello-2.12.drv");
        assert!(p.is_derivation());
        assert!(StorePath::parse("/tmp/s/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x").is_ok());
    }

    #[test]
    fn rejects_bad_shapes() {
        for bad in [
            "",
            "nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x",
            "/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x",
            "/nix/store/short-x",
            "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxle-x",
            "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz_x",
            "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-a b",
            "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-",
        ] {
            assert!(StorePath::parse(bad).is_err(), "{bad}");
        }
    }
}
