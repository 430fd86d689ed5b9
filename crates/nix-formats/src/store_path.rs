//! Store directories, store paths, and the rules that compute store paths.
//!
//! A [`StorePath`] is the base name of a store object, `<hash>-<name>`: a
//! 20-byte digest printed in nixbase32 (32 characters) and a name of at most
//! 211 characters from `[A-Za-z0-9+-._?=]`. It holds no store directory: a
//! [`StoreDir`] value prints and parses full paths, and every path computation
//! takes one, because the store directory is part of the hashed fingerprint.
//!
//! The computations follow Nix 2.8 (`Store::makeStorePath` and friends):
//!
//! * fingerprint `"<type>:sha256:<base16 inner hash>:<store dir>:<name>"`,
//!   SHA-256 of it folded to 20 bytes with [`compress_hash`];
//! * `<type>` is `text[:ref…]`, `source[:ref…][:self]` or `output:<id>`,
//!   references being full printed store paths in sorted order.
//!
//! This module does not check that a path exists or is valid in any store.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use crate::hash::{compress_hash, Hash, HashAlgo, HashError};
use crate::nixbase32;

/// Length in bytes of a store path digest.
pub const DIGEST_LEN: usize = 20;
/// Length of the nixbase32 hash part of a store path base name.
pub const HASH_PART_LEN: usize = 32;
/// Longest name Nix accepts in a store path.
pub const MAX_NAME_LEN: usize = 211;
/// File name extension of derivations.
pub const DRV_EXTENSION: &str = ".drv";

/// Why a store path, name or store directory was rejected, or a path could
/// not be computed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StorePathError {
    /// The base name is shorter than a hash part plus `-` plus one character.
    #[error("'{0}' is too short to be a valid store path")]
    TooShort(String),
    /// The hash part holds a character outside nixbase32.
    #[error("store path '{path}' contains illegal base-32 character {character:?} at position {position}")]
    InvalidHashChar {
        /// The base name.
        path: String,
        /// The offending character.
        character: char,
        /// Its byte offset in the base name.
        position: usize,
    },
    /// The character after the hash part is not `-`.
    #[error("store path '{0}' has no '-' after its hash part")]
    MissingDash(String),
    /// The name is empty.
    #[error("store path name is empty")]
    EmptyName,
    /// The name is longer than [`MAX_NAME_LEN`].
    #[error("store path name '{name}' is {len} bytes long, more than 211")]
    NameTooLong {
        /// The name.
        name: String,
        /// Its length in bytes.
        len: usize,
    },
    /// The name holds a character Nix does not allow.
    #[error(
        "store path name '{name}' contains illegal character {character:?} at position {position}"
    )]
    InvalidNameChar {
        /// The name.
        name: String,
        /// The offending character.
        character: char,
        /// Its byte offset in the name.
        position: usize,
    },
    /// A full path is not directly inside the store directory.
    #[error("path '{path}' is not in the Nix store '{store_dir}'")]
    NotInStore {
        /// The path.
        path: String,
        /// The store directory.
        store_dir: String,
    },
    /// A store directory must be absolute, with no trailing `/`, `.` or
    /// `..` components, and not `/` itself.
    #[error(
        "invalid store directory '{0}': it must be an absolute, canonical path other than '/'"
    )]
    InvalidStoreDir(String),
    /// Text paths are always SHA-256.
    #[error("text store paths need a sha256 hash, got {0}")]
    TextHashNotSha256(HashAlgo),
    /// Only recursive SHA-256 fixed-output paths may have references.
    #[error("fixed-output path '{0}' can only have references when it is recursive sha256")]
    FixedOutputWithReferences(String),
    /// A content-address text was malformed.
    #[error("invalid content address '{text}': {reason}")]
    InvalidContentAddress {
        /// The text.
        text: String,
        /// What was wrong.
        reason: &'static str,
    },
    /// A hash inside a content address was malformed.
    #[error("invalid hash in content address: {0}")]
    Hash(#[from] HashError),
}

/// Checks a store path name against Nix 2.8's rules.
pub fn validate_name(name: &str) -> Result<(), StorePathError> {
    if name.is_empty() {
        return Err(StorePathError::EmptyName);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(StorePathError::NameTooLong {
            name: name.to_owned(),
            len: name.len(),
        });
    }
    for (position, character) in name.char_indices() {
        let ok = character.is_ascii_alphanumeric() || "+-._?=".contains(character);
        if !ok {
            return Err(StorePathError::InvalidNameChar {
                name: name.to_owned(),
                character,
                position,
            });
        }
    }
    Ok(())
}

/// The base name of a store object: a 20-byte digest and a name.
///
/// Ordering follows the printed base name, which is how Nix sorts store
/// paths (and therefore how `.drv` files list them).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StorePath {
    // Field order matters for the derived `Ord`: printed hash, then name.
    hash_part: [u8; HASH_PART_LEN],
    name: String,
    digest: [u8; DIGEST_LEN],
}

impl StorePath {
    /// Builds a store path from a digest and a name, validating the name.
    pub fn new(digest: [u8; DIGEST_LEN], name: &str) -> Result<StorePath, StorePathError> {
        validate_name(name)?;
        let text = nixbase32::encode(&digest);
        let mut hash_part = [0u8; HASH_PART_LEN];
        hash_part.copy_from_slice(text.as_bytes());
        Ok(StorePath {
            hash_part,
            name: name.to_owned(),
            digest,
        })
    }

    /// Parses a base name `<hash>-<name>` (no store directory).
    pub fn from_base_name(base: &str) -> Result<StorePath, StorePathError> {
        let bytes = base.as_bytes();
        if bytes.len() < HASH_PART_LEN + 2 {
            return Err(StorePathError::TooShort(base.to_owned()));
        }
        let (hash_bytes, rest) = bytes.split_at(HASH_PART_LEN);
        let mut hash_part = [0u8; HASH_PART_LEN];
        hash_part.copy_from_slice(hash_bytes);
        let mut digest = [0u8; DIGEST_LEN];
        nixbase32::decode_into(&hash_part, &mut digest).map_err(|e| match e {
            nixbase32::DecodeError::InvalidCharacter { position, .. } => {
                StorePathError::InvalidHashChar {
                    path: base.to_owned(),
                    // Report the whole character, even if it is not ASCII.
                    character: base
                        .get(position..)
                        .and_then(|s| s.chars().next())
                        .unwrap_or(char::REPLACEMENT_CHARACTER),
                    position,
                }
            }
            // 32 characters always decode to exactly 20 bytes.
            _ => StorePathError::TooShort(base.to_owned()),
        })?;
        if rest[0] != b'-' {
            return Err(StorePathError::MissingDash(base.to_owned()));
        }
        let name = base.get(HASH_PART_LEN + 1..).unwrap_or_default();
        validate_name(name)?;
        Ok(StorePath {
            hash_part,
            name: name.to_owned(),
            digest,
        })
    }

    /// The 20-byte digest.
    pub fn digest(&self) -> &[u8; DIGEST_LEN] {
        &self.digest
    }

    /// The nixbase32 hash part (32 characters).
    pub fn hash_part(&self) -> &str {
        // Always ASCII: built from the nixbase32 alphabet.
        std::str::from_utf8(&self.hash_part).unwrap_or_default()
    }

    /// The name after the `-`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the name ends in `.drv`.
    pub fn is_derivation(&self) -> bool {
        self.name.ends_with(DRV_EXTENSION)
    }

    /// The derivation name of a `.drv` path (its name without `.drv`), or
    /// `None` if this is not a derivation path.
    pub fn derivation_name(&self) -> Option<&str> {
        self.name.strip_suffix(DRV_EXTENSION)
    }
}

/// Prints the base name `<hash>-<name>`.
impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.hash_part(), self.name)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({self})")
    }
}

/// Parses a base name with [`StorePath::from_base_name`].
impl FromStr for StorePath {
    type Err = StorePathError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StorePath::from_base_name(s)
    }
}

/// How file contents are hashed for a content address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FileIngestionMethod {
    /// The hash of a single regular file's bytes.
    Flat,
    /// The hash of the NAR serialisation of a file system tree.
    Recursive,
}

impl FileIngestionMethod {
    /// The prefix Nix writes before an algorithm name: `""` or `"r:"`.
    pub const fn prefix(self) -> &'static str {
        match self {
            FileIngestionMethod::Flat => "",
            FileIngestionMethod::Recursive => "r:",
        }
    }
}

/// A content address, as stored in path info (`ca` field).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ContentAddress {
    /// `text:sha256:…`: a text file added with `addTextToStore`.
    Text(Hash),
    /// `fixed:[r:]algo:…`: a fixed-output path.
    Fixed(FileIngestionMethod, Hash),
}

impl ContentAddress {
    /// Parses `text:sha256:<hash>` or `fixed:[r:]<algo>:<hash>`.
    pub fn parse(text: &str) -> Result<ContentAddress, StorePathError> {
        let bad = |reason| StorePathError::InvalidContentAddress {
            text: text.to_owned(),
            reason,
        };
        if let Some(rest) = text.strip_prefix("text:") {
            let hash = Hash::parse_prefixed(rest)?;
            if hash.algo() != HashAlgo::Sha256 {
                return Err(StorePathError::TextHashNotSha256(hash.algo()));
            }
            Ok(ContentAddress::Text(hash))
        } else if let Some(rest) = text.strip_prefix("fixed:") {
            let (method, rest) = match rest.strip_prefix("r:") {
                Some(r) => (FileIngestionMethod::Recursive, r),
                None => (FileIngestionMethod::Flat, rest),
            };
            Ok(ContentAddress::Fixed(method, Hash::parse_prefixed(rest)?))
        } else {
            Err(bad("expected 'text:' or 'fixed:' prefix"))
        }
    }
}

/// Prints `text:sha256:<nixbase32>` or `fixed:[r:]<algo>:<nixbase32>`.
impl fmt::Display for ContentAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ContentAddress::Text(h) => write!(f, "text:{h}"),
            ContentAddress::Fixed(m, h) => write!(f, "fixed:{}{h}", m.prefix()),
        }
    }
}

/// A store directory such as `/nix/store`, as a value.
///
/// Invariant: absolute, no trailing `/`, no empty, `.` or `..` components,
/// and not `/` itself.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StoreDir(String);

impl Default for StoreDir {
    /// `/nix/store`.
    fn default() -> Self {
        StoreDir("/nix/store".to_owned())
    }
}

impl fmt::Display for StoreDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for StoreDir {
    type Err = StorePathError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StoreDir::new(s)
    }
}

impl StoreDir {
    /// Validates and wraps a store directory path.
    pub fn new(dir: &str) -> Result<StoreDir, StorePathError> {
        let invalid = || StorePathError::InvalidStoreDir(dir.to_owned());
        let rest = dir.strip_prefix('/').ok_or_else(invalid)?;
        if rest.is_empty()
            || rest
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(invalid());
        }
        Ok(StoreDir(dir.to_owned()))
    }

    /// The directory as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The full path `<dir>/<hash>-<name>`.
    pub fn print(&self, path: &StorePath) -> String {
        format!("{}/{}", self.0, path)
    }

    /// Parses a full path directly inside this store directory.
    pub fn parse(&self, path: &str) -> Result<StorePath, StorePathError> {
        let not_in_store = || StorePathError::NotInStore {
            path: path.to_owned(),
            store_dir: self.0.clone(),
        };
        let base = path
            .strip_prefix(self.0.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(not_in_store)?;
        if base.contains('/') {
            return Err(not_in_store());
        }
        StorePath::from_base_name(base)
    }

    /// Parses a path inside the store that may continue below the store
    /// object (`<dir>/<hash>-<name>/sub/path`), returning the store path and
    /// the remainder (empty or starting with `/`).
    pub fn parse_with_subpath<'a>(
        &self,
        path: &'a str,
    ) -> Result<(StorePath, &'a str), StorePathError> {
        let base_and_rest = path
            .strip_prefix(self.0.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| StorePathError::NotInStore {
                path: path.to_owned(),
                store_dir: self.0.clone(),
            })?;
        let split = base_and_rest.find('/').unwrap_or(base_and_rest.len());
        let (base, rest) = base_and_rest.split_at(split);
        Ok((StorePath::from_base_name(base)?, rest))
    }

    /// `makeStorePath`: the store path for `<ty>:sha256:<base16 inner>:<dir>:<name>`.
    ///
    /// `inner` is printed as `algo:base16`; Nix only ever passes SHA-256.
    pub fn make_store_path(
        &self,
        ty: &str,
        inner: &Hash,
        name: &str,
    ) -> Result<StorePath, StorePathError> {
        validate_name(name)?;
        let fingerprint = format!("{ty}:{}:{}:{name}", inner.to_prefixed_base16(), self.0);
        let digest = compress_hash(Hash::sha256(fingerprint).as_bytes(), DIGEST_LEN);
        let mut d = [0u8; DIGEST_LEN];
        d.copy_from_slice(&digest);
        StorePath::new(d, name)
    }

    /// The `<type>` part with references: `ty:<ref1>:<ref2>…[:self]`.
    pub fn make_type<'a>(
        &self,
        ty: &str,
        references: impl IntoIterator<Item = &'a StorePath>,
        has_self_reference: bool,
    ) -> String {
        let mut out = ty.to_owned();
        // Nix iterates a sorted set: sort and deduplicate here so callers
        // may pass any iterator.
        let refs: BTreeSet<&StorePath> = references.into_iter().collect();
        for r in refs {
            out.push(':');
            out.push_str(&self.print(r));
        }
        if has_self_reference {
            out.push_str(":self");
        }
        out
    }

    /// `makeOutputPath`: the path of output `output` of a derivation named
    /// `drv_name` whose (masked) derivation hash is `drv_hash`.
    pub fn make_output_path(
        &self,
        output: &str,
        drv_hash: &Hash,
        drv_name: &str,
    ) -> Result<StorePath, StorePathError> {
        self.make_store_path(
            &format!("output:{output}"),
            drv_hash,
            &output_path_name(drv_name, output),
        )
    }

    /// `makeFixedOutputPath`: the path of a fixed-output (content-addressed
    /// by `hash`) store object. Recursive SHA-256 uses the `source` type and
    /// may have references; every other combination uses
    /// `output:out` over `fixed:out:<r:><algo:base16>:` and must not.
    pub fn make_fixed_output_path(
        &self,
        method: FileIngestionMethod,
        hash: &Hash,
        name: &str,
        references: &BTreeSet<StorePath>,
        has_self_reference: bool,
    ) -> Result<StorePath, StorePathError> {
        if hash.algo() == HashAlgo::Sha256 && method == FileIngestionMethod::Recursive {
            let ty = self.make_type("source", references, has_self_reference);
            self.make_store_path(&ty, hash, name)
        } else {
            if !references.is_empty() || has_self_reference {
                return Err(StorePathError::FixedOutputWithReferences(name.to_owned()));
            }
            let inner = Hash::sha256(format!(
                "fixed:out:{}{}:",
                method.prefix(),
                hash.to_prefixed_base16()
            ));
            self.make_store_path("output:out", &inner, name)
        }
    }

    /// `makeTextPath`: the path of a text object whose contents hash (SHA-256)
    /// is `hash`, with `references`.
    pub fn make_text_path(
        &self,
        name: &str,
        hash: &Hash,
        references: &BTreeSet<StorePath>,
    ) -> Result<StorePath, StorePathError> {
        if hash.algo() != HashAlgo::Sha256 {
            return Err(StorePathError::TextHashNotSha256(hash.algo()));
        }
        let ty = self.make_type("text", references, false);
        self.make_store_path(&ty, hash, name)
    }

    /// `computeStorePathForText`: [`StoreDir::make_text_path`] over the
    /// SHA-256 of `contents`.
    pub fn compute_text_path(
        &self,
        name: &str,
        contents: &[u8],
        references: &BTreeSet<StorePath>,
    ) -> Result<StorePath, StorePathError> {
        self.make_text_path(name, &Hash::sha256(contents), references)
    }

    /// The store path of a content-addressed object.
    pub fn make_path_from_ca(
        &self,
        name: &str,
        ca: &ContentAddress,
        references: &BTreeSet<StorePath>,
        has_self_reference: bool,
    ) -> Result<StorePath, StorePathError> {
        match ca {
            ContentAddress::Text(h) => self.make_text_path(name, h, references),
            ContentAddress::Fixed(m, h) => {
                self.make_fixed_output_path(*m, h, name, references, has_self_reference)
            }
        }
    }
}

/// The store path name of output `output` of derivation `drv_name`:
/// `drv_name` for `out`, `drv_name-output` otherwise.
pub fn output_path_name(drv_name: &str, output: &str) -> String {
    if output == "out" {
        drv_name.to_owned()
    } else {
        format!("{drv_name}-{output}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.10";

    #[test]
    fn parse_and_print() {
        let dir = StoreDir::default();
        let full = format!("/nix/store/{P}");
        let p = dir.parse(&full).unwrap();
        assert_eq!(p.name(), "hello-2.10");
        assert_eq!(p.hash_part(), "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz");
        assert_eq!(dir.print(&p), full);
        assert_eq!(p.to_string(), P);
        assert_eq!(StorePath::new(*p.digest(), p.name()).unwrap(), p);
        let sub = format!("{full}/bin/hello");
        let (q, rest) = dir.parse_with_subpath(&sub).unwrap();
        assert_eq!((q, rest), (p, "/bin/hello"));
    }

    #[test]
    fn ordering_follows_printed_form() {
        let a: StorePath = "00000000000000000000000000000001-b".parse().unwrap();
        let b: StorePath = "10000000000000000000000000000000-a".parse().unwrap();
        assert!(a < b);
        assert!(a.digest() > b.digest() || a.digest() != b.digest());
    }

    #[test]
    fn store_dir_rules() {
        assert_eq!(StoreDir::default().as_str(), "/nix/store");
        assert!(StoreDir::new("/tmp/s/store").is_ok());
        for bad in ["", "/", "relative", "/a/", "/a//b", "/a/./b", "/a/.."] {
            assert_eq!(
                StoreDir::new(bad),
                Err(StorePathError::InvalidStoreDir(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn path_errors() {
        let dir = StoreDir::default();
        assert!(matches!(
            dir.parse(&format!("/nix/store2/{P}")),
            Err(StorePathError::NotInStore { .. })
        ));
        assert!(matches!(
            dir.parse(&format!("/nix/store/{P}/bin")),
            Err(StorePathError::NotInStore { .. })
        ));
        assert!(matches!(
            StorePath::from_base_name("abc"),
            Err(StorePathError::TooShort(_))
        ));
        assert!(matches!(
            StorePath::from_base_name("7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-"),
            Err(StorePathError::TooShort(_))
        ));
        assert_eq!(
            StorePath::from_base_name("7h7qgvs4kgzsn8a6rb273saxyqh4jxle-x"),
            Err(StorePathError::InvalidHashChar {
                path: "7h7qgvs4kgzsn8a6rb273saxyqh4jxle-x".into(),
                character: 'e',
                position: 31
            })
        );
        assert!(matches!(
            StorePath::from_base_name("7h7qgvs4kgzsn8a6rb273saxyqh4jxlz_x"),
            Err(StorePathError::MissingDash(_))
        ));
        let err = StorePath::from_base_name("7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-a b").unwrap_err();
        assert_eq!(
            err,
            StorePathError::InvalidNameChar {
                name: "a b".into(),
                character: ' ',
                position: 1
            }
        );
        assert!(err.to_string().contains("' '"));
        assert!(err.to_string().contains("position 1"));
    }

    #[test]
    fn name_rules() {
        assert!(validate_name("a+-._?=Z9").is_ok());
        assert_eq!(validate_name(""), Err(StorePathError::EmptyName));
        assert!(matches!(
            validate_name(&"x".repeat(212)),
            Err(StorePathError::NameTooLong { len: 212, .. })
        ));
        assert!(validate_name(&"x".repeat(211)).is_ok());
        assert!(matches!(
            validate_name("hé"),
            Err(StorePathError::InvalidNameChar {
                character: 'é',
                position: 1,
                ..
            })
        ));
        assert!(matches!(
            validate_name("a/b"),
            Err(StorePathError::InvalidNameChar { character: '/', .. })
        ));
    }

    #[test]
    fn text_and_fixed_rules() {
        let dir = StoreDir::default();
        let none = BTreeSet::new();
        let md5 = Hash::digest(HashAlgo::Md5, b"x");
        assert_eq!(
            dir.make_text_path("t", &md5, &none),
            Err(StorePathError::TextHashNotSha256(HashAlgo::Md5))
        );
        let r: StorePath = P.parse().unwrap();
        let refs = BTreeSet::from([r]);
        assert!(matches!(
            dir.make_fixed_output_path(
                FileIngestionMethod::Flat,
                &Hash::sha256(b"x"),
                "f",
                &refs,
                false
            ),
            Err(StorePathError::FixedOutputWithReferences(_))
        ));
        assert!(dir
            .make_fixed_output_path(
                FileIngestionMethod::Recursive,
                &Hash::sha256(b"x"),
                "f",
                &refs,
                true
            )
            .is_ok());
        assert_eq!(
            dir.make_type("text", &refs, true),
            format!("text:/nix/store/{P}:self")
        );
    }

    #[test]
    fn content_address_round_trip() {
        let h = Hash::sha256(b"x");
        for ca in [
            ContentAddress::Text(h.clone()),
            ContentAddress::Fixed(FileIngestionMethod::Flat, h.clone()),
            ContentAddress::Fixed(FileIngestionMethod::Recursive, h.clone()),
        ] {
            assert_eq!(ContentAddress::parse(&ca.to_string()).unwrap(), ca);
        }
        assert!(matches!(
            ContentAddress::parse("nope:sha256:x"),
            Err(StorePathError::InvalidContentAddress { .. })
        ));
        assert!(matches!(
            ContentAddress::parse(&format!("text:{}", Hash::digest(HashAlgo::Sha1, b""))),
            Err(StorePathError::TextHashNotSha256(HashAlgo::Sha1))
        ));
        assert!(matches!(
            ContentAddress::parse("fixed:sha256:zz"),
            Err(StorePathError::Hash(_))
        ));
    }

    #[test]
    fn output_names() {
        assert_eq!(output_path_name("foo", "out"), "foo");
        assert_eq!(output_path_name("foo", "dev"), "foo-dev");
    }
}
