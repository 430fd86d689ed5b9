//! Hash algorithms and hash texts as Nix prints and parses them.
//!
//! A [`Hash`](struct@Hash) is an algorithm plus its digest bytes. Nix writes hashes in
//! four encodings (base-16, nixbase32, base-64, and SRI, which is base-64
//! with an `algo-` prefix), optionally prefixed by `algo:`. [`Hash::parse_any`]
//! accepts every form Nix accepts; [`Hash::to_base16`], [`Hash::to_nixbase32`],
//! [`Hash::to_base64`] and [`Hash::to_sri`] print them.
//!
//! This module computes digests of in-memory bytes only ([`Hash::digest`],
//! [`Hasher`]); hashing files or NAR serialisations is up to the caller
//! (see [`crate::nar`]).

use std::fmt;
use std::str::FromStr;

use data_encoding::{BASE64, HEXLOWER_PERMISSIVE};
use md5::Md5;
use sha1::Sha1;
use sha2::{Digest, Sha256, Sha512};
use thiserror::Error;

use crate::nixbase32;

/// A hash algorithm Nix supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HashAlgo {
    /// MD5 (16 bytes).
    Md5,
    /// SHA-1 (20 bytes).
    Sha1,
    /// SHA-256 (32 bytes).
    Sha256,
    /// SHA-512 (64 bytes).
    Sha512,
}

impl HashAlgo {
    /// All algorithms, in Nix's order.
    pub const ALL: [HashAlgo; 4] = [
        HashAlgo::Md5,
        HashAlgo::Sha1,
        HashAlgo::Sha256,
        HashAlgo::Sha512,
    ];

    /// The name Nix uses (`md5`, `sha1`, `sha256`, `sha512`).
    pub const fn name(self) -> &'static str {
        match self {
            HashAlgo::Md5 => "md5",
            HashAlgo::Sha1 => "sha1",
            HashAlgo::Sha256 => "sha256",
            HashAlgo::Sha512 => "sha512",
        }
    }

    /// Digest size in bytes.
    pub const fn digest_len(self) -> usize {
        match self {
            HashAlgo::Md5 => 16,
            HashAlgo::Sha1 => 20,
            HashAlgo::Sha256 => 32,
            HashAlgo::Sha512 => 64,
        }
    }

    /// Length of the base-16 text of a digest.
    pub const fn base16_len(self) -> usize {
        self.digest_len() * 2
    }

    /// Length of the nixbase32 text of a digest.
    pub const fn nixbase32_len(self) -> usize {
        nixbase32::encoded_len(self.digest_len())
    }

    /// Length of the (padded) base-64 text of a digest.
    pub const fn base64_len(self) -> usize {
        self.digest_len().div_ceil(3) * 4
    }
}

impl fmt::Display for HashAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for HashAlgo {
    type Err = HashError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HashAlgo::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| HashError::UnknownAlgo(s.to_owned()))
    }
}

/// Why a hash text or digest was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HashError {
    /// The algorithm name is not one of `md5`, `sha1`, `sha256`, `sha512`.
    #[error("unknown hash algorithm '{0}'")]
    UnknownAlgo(String),
    /// The text has no `algo:`/`algo-` prefix and no algorithm was given.
    #[error("hash '{0}' does not include a type, nor is the type known from context")]
    MissingAlgo(String),
    /// The prefix names a different algorithm than the one expected.
    #[error("hash '{text}' should have type '{expected}'")]
    AlgoMismatch {
        /// The text that was parsed.
        text: String,
        /// The algorithm the caller expected.
        expected: HashAlgo,
    },
    /// The digest text length fits no encoding of this algorithm.
    #[error("hash '{text}' has wrong length for hash type '{algo}'")]
    WrongLength {
        /// The digest text (without prefix).
        text: String,
        /// The algorithm.
        algo: HashAlgo,
    },
    /// The text is not valid base-16.
    #[error("invalid base-16 hash '{0}'")]
    InvalidBase16(String),
    /// The text is not valid nixbase32.
    #[error("invalid base-32 hash '{text}': {source}")]
    InvalidBase32 {
        /// The digest text.
        text: String,
        /// What was wrong with it.
        #[source]
        source: nixbase32::DecodeError,
    },
    /// The text is not valid base-64 for this algorithm.
    #[error("invalid base-64 hash '{0}'")]
    InvalidBase64(String),
    /// An SRI hash (`algo-base64`) was expected.
    #[error("hash '{0}' is not SRI")]
    NotSri(String),
    /// A digest of the wrong size was given for this algorithm.
    #[error("{algo} digest must be {expected} bytes, got {actual}")]
    WrongDigestSize {
        /// The algorithm.
        algo: HashAlgo,
        /// Its digest size.
        expected: usize,
        /// The size given.
        actual: usize,
    },
}

/// A digest together with its algorithm.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hash {
    algo: HashAlgo,
    digest: Vec<u8>,
}

impl Hash {
    /// Wraps a digest, checking its size against the algorithm.
    pub fn new(algo: HashAlgo, digest: &[u8]) -> Result<Hash, HashError> {
        if digest.len() != algo.digest_len() {
            return Err(HashError::WrongDigestSize {
                algo,
                expected: algo.digest_len(),
                actual: digest.len(),
            });
        }
        Ok(Hash {
            algo,
            digest: digest.to_vec(),
        })
    }

    /// Hashes `data` with `algo`.
    pub fn digest(algo: HashAlgo, data: impl AsRef<[u8]>) -> Hash {
        let mut h = Hasher::new(algo);
        h.update(data.as_ref());
        h.finish()
    }

    /// SHA-256 of `data` (the hash Nix uses for paths and derivations).
    pub fn sha256(data: impl AsRef<[u8]>) -> Hash {
        Hash::digest(HashAlgo::Sha256, data)
    }

    /// The algorithm.
    pub fn algo(&self) -> HashAlgo {
        self.algo
    }

    /// The digest bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.digest
    }

    /// Lower-case base-16, without prefix.
    pub fn to_base16(&self) -> String {
        data_encoding::HEXLOWER.encode(&self.digest)
    }

    /// nixbase32, without prefix.
    pub fn to_nixbase32(&self) -> String {
        nixbase32::encode(&self.digest)
    }

    /// Padded base-64, without prefix.
    pub fn to_base64(&self) -> String {
        BASE64.encode(&self.digest)
    }

    /// SRI form: `algo-base64`.
    pub fn to_sri(&self) -> String {
        format!("{}-{}", self.algo, self.to_base64())
    }

    /// `algo:base16` (Nix's `to_string(Base16, true)`).
    pub fn to_prefixed_base16(&self) -> String {
        format!("{}:{}", self.algo, self.to_base16())
    }

    /// `algo:nixbase32` (Nix's `to_string(Base32, true)`).
    pub fn to_prefixed_nixbase32(&self) -> String {
        format!("{}:{}", self.algo, self.to_nixbase32())
    }

    /// Parses a hash in any form Nix accepts: `algo:digest`, `algo-base64`
    /// (SRI) or a bare digest when `expected` gives the algorithm. A bare or
    /// `algo:` digest may be base-16, nixbase32 or base-64, told apart by
    /// length. If both the text and `expected` name an algorithm, they must
    /// agree.
    pub fn parse_any(text: &str, expected: Option<HashAlgo>) -> Result<Hash, HashError> {
        let (prefix, rest, sri) = split_prefix(text);
        let parsed = prefix.map(str::parse::<HashAlgo>).transpose()?;
        let algo = match (parsed, expected) {
            (None, None) => return Err(HashError::MissingAlgo(text.to_owned())),
            (Some(p), Some(e)) if p != e => {
                return Err(HashError::AlgoMismatch {
                    text: text.to_owned(),
                    expected: e,
                })
            }
            (Some(a), _) | (None, Some(a)) => a,
        };
        Hash::parse_digest(rest, algo, sri)
    }

    /// Parses a hash that must carry its algorithm (`algo:…` or `algo-…`).
    pub fn parse_prefixed(text: &str) -> Result<Hash, HashError> {
        Hash::parse_any(text, None)
    }

    /// Parses an SRI hash (`algo-base64`).
    pub fn parse_sri(text: &str) -> Result<Hash, HashError> {
        let (algo, rest) = text
            .split_once('-')
            .ok_or_else(|| HashError::NotSri(text.to_owned()))?;
        Hash::parse_digest(rest, algo.parse()?, true)
    }

    /// Parses a bare digest (base-16, nixbase32 or base-64 by length) of a
    /// known algorithm, as found in a `.drv` file's output hash field.
    pub fn parse_unprefixed(text: &str, algo: HashAlgo) -> Result<Hash, HashError> {
        Hash::parse_digest(text, algo, false)
    }

    fn parse_digest(text: &str, algo: HashAlgo, sri: bool) -> Result<Hash, HashError> {
        let bytes = text.as_bytes();
        let digest = if !sri && bytes.len() == algo.base16_len() {
            HEXLOWER_PERMISSIVE
                .decode(bytes)
                .map_err(|_| HashError::InvalidBase16(text.to_owned()))?
        } else if !sri && bytes.len() == algo.nixbase32_len() {
            nixbase32::decode(bytes).map_err(|source| HashError::InvalidBase32 {
                text: text.to_owned(),
                source,
            })?
        } else if sri || bytes.len() == algo.base64_len() {
            let d = BASE64
                .decode(bytes)
                .map_err(|_| HashError::InvalidBase64(text.to_owned()))?;
            if d.len() != algo.digest_len() {
                return Err(HashError::InvalidBase64(text.to_owned()));
            }
            d
        } else {
            return Err(HashError::WrongLength {
                text: text.to_owned(),
                algo,
            });
        };
        Ok(Hash { algo, digest })
    }
}

/// Splits `algo:` or `algo-` off the front, as Nix does: a `:` anywhere wins
/// over a `-`.
fn split_prefix(text: &str) -> (Option<&str>, &str, bool) {
    if let Some((algo, rest)) = text.split_once(':') {
        (Some(algo), rest, false)
    } else if let Some((algo, rest)) = text.split_once('-') {
        (Some(algo), rest, true)
    } else {
        (None, text, false)
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.to_prefixed_nixbase32())
    }
}

/// Prints `algo:nixbase32`, Nix's usual form.
impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_prefixed_nixbase32())
    }
}

/// Parses with [`Hash::parse_prefixed`].
impl FromStr for Hash {
    type Err = HashError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Hash::parse_prefixed(s)
    }
}

/// Folds a digest into `size` bytes by XOR-ing byte `i` into position
/// `i % size`, as Nix does to shorten SHA-256 to a 20-byte store path digest.
/// A `size` of 0 gives an empty result.
pub fn compress_hash(digest: &[u8], size: usize) -> Vec<u8> {
    let mut out = vec![0u8; size];
    if size == 0 {
        return out;
    }
    for (i, b) in digest.iter().enumerate() {
        out[i % size] ^= b;
    }
    out
}

/// An incremental hasher for any [`HashAlgo`].
#[derive(Clone)]
pub struct Hasher {
    inner: HasherInner,
}

#[derive(Clone)]
enum HasherInner {
    Md5(Md5),
    Sha1(Sha1),
    Sha256(Sha256),
    Sha512(Sha512),
}

impl Hasher {
    /// A fresh hasher for `algo`.
    pub fn new(algo: HashAlgo) -> Hasher {
        let inner = match algo {
            HashAlgo::Md5 => HasherInner::Md5(Md5::new()),
            HashAlgo::Sha1 => HasherInner::Sha1(Sha1::new()),
            HashAlgo::Sha256 => HasherInner::Sha256(Sha256::new()),
            HashAlgo::Sha512 => HasherInner::Sha512(Sha512::new()),
        };
        Hasher { inner }
    }

    /// The algorithm.
    pub fn algo(&self) -> HashAlgo {
        match self.inner {
            HasherInner::Md5(_) => HashAlgo::Md5,
            HasherInner::Sha1(_) => HashAlgo::Sha1,
            HasherInner::Sha256(_) => HashAlgo::Sha256,
            HasherInner::Sha512(_) => HashAlgo::Sha512,
        }
    }

    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        match &mut self.inner {
            HasherInner::Md5(h) => h.update(data),
            HasherInner::Sha1(h) => h.update(data),
            HasherInner::Sha256(h) => h.update(data),
            HasherInner::Sha512(h) => h.update(data),
        }
    }

    /// Finishes and returns the hash.
    pub fn finish(self) -> Hash {
        let algo = self.algo();
        let digest = match self.inner {
            HasherInner::Md5(h) => h.finalize().to_vec(),
            HasherInner::Sha1(h) => h.finalize().to_vec(),
            HasherInner::Sha256(h) => h.finalize().to_vec(),
            HasherInner::Sha512(h) => h.finalize().to_vec(),
        };
        Hash { algo, digest }
    }
}

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hasher")
            .field("algo", &self.algo())
            .finish()
    }
}

impl std::io::Write for Hasher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_SHA256_HEX: &str =
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn prints_all_forms() {
        let h = Hash::sha256(b"");
        assert_eq!(h.to_base16(), EMPTY_SHA256_HEX);
        assert_eq!(
            h.to_nixbase32(),
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
        assert_eq!(
            h.to_sri(),
            "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
        assert_eq!(h.to_string(), format!("sha256:{}", h.to_nixbase32()));
        assert_eq!(h.to_prefixed_base16(), format!("sha256:{EMPTY_SHA256_HEX}"));
    }

    #[test]
    fn parses_all_forms() {
        let h = Hash::sha256(b"");
        for text in [
            format!("sha256:{EMPTY_SHA256_HEX}"),
            format!("sha256:{}", EMPTY_SHA256_HEX.to_uppercase()),
            h.to_prefixed_nixbase32(),
            format!("sha256:{}", h.to_base64()),
            h.to_sri(),
        ] {
            assert_eq!(Hash::parse_prefixed(&text).unwrap(), h, "{text}");
        }
        assert_eq!(
            Hash::parse_any(EMPTY_SHA256_HEX, Some(HashAlgo::Sha256)).unwrap(),
            h
        );
        assert_eq!(Hash::parse_sri(&h.to_sri()).unwrap(), h);
        assert_eq!(
            Hash::parse_unprefixed(&h.to_nixbase32(), HashAlgo::Sha256).unwrap(),
            h
        );
    }

    #[test]
    fn other_algorithms() {
        assert_eq!(
            Hash::digest(HashAlgo::Md5, b"").to_base16(),
            "d41d8cd98f00b204e9800998ecf8427e"
        );
        assert_eq!(
            Hash::digest(HashAlgo::Sha1, b"").to_base16(),
            "da39a3ee5e6b4b0d3255bfef95601890afd80709"
        );
        let h = Hash::digest(HashAlgo::Sha512, b"abc");
        assert_eq!(h.as_bytes().len(), 64);
        for text in [
            h.to_sri(),
            h.to_prefixed_base16(),
            h.to_prefixed_nixbase32(),
        ] {
            assert_eq!(text.parse::<Hash>().unwrap(), h);
        }
    }

    #[test]
    fn error_cases() {
        assert_eq!(
            Hash::parse_prefixed("sha3:abcd"),
            Err(HashError::UnknownAlgo("sha3".into()))
        );
        assert!(matches!(
            Hash::parse_any(EMPTY_SHA256_HEX, None),
            Err(HashError::MissingAlgo(_))
        ));
        assert!(matches!(
            Hash::parse_any(&format!("sha256:{EMPTY_SHA256_HEX}"), Some(HashAlgo::Sha1)),
            Err(HashError::AlgoMismatch {
                expected: HashAlgo::Sha1,
                ..
            })
        ));
        assert!(matches!(
            Hash::parse_prefixed("sha256:abc"),
            Err(HashError::WrongLength {
                algo: HashAlgo::Sha256,
                ..
            })
        ));
        let bad16 = format!("sha256:{}", "g".repeat(64));
        assert!(matches!(
            Hash::parse_prefixed(&bad16),
            Err(HashError::InvalidBase16(_))
        ));
        let bad32 = format!("sha256:{}", "e".repeat(52));
        assert!(matches!(
            Hash::parse_prefixed(&bad32),
            Err(HashError::InvalidBase32 { .. })
        ));
        assert!(matches!(
            Hash::parse_prefixed("sha256-AAAA"),
            Err(HashError::InvalidBase64(_))
        ));
        assert!(matches!(
            Hash::parse_prefixed(&format!("sha256:{}", "!".repeat(44))),
            Err(HashError::InvalidBase64(_))
        ));
        assert!(matches!(
            Hash::parse_sri("sha256"),
            Err(HashError::NotSri(_))
        ));
        assert_eq!(
            Hash::new(HashAlgo::Sha1, &[0; 3]),
            Err(HashError::WrongDigestSize {
                algo: HashAlgo::Sha1,
                expected: 20,
                actual: 3
            })
        );
    }

    #[test]
    fn compress() {
        assert_eq!(compress_hash(&[1, 2, 3, 4, 5], 2), vec![1 ^ 3 ^ 5, 2 ^ 4]);
        assert_eq!(compress_hash(&[1, 2], 4), vec![1, 2, 0, 0]);
        assert!(compress_hash(&[1, 2], 0).is_empty());
    }

    #[test]
    fn incremental_equals_oneshot() {
        let mut h = Hasher::new(HashAlgo::Sha256);
        h.update(b"hello ");
        h.update(b"world");
        assert_eq!(h.finish(), Hash::sha256(b"hello world"));
    }
}
