//! Nix's ed25519 signatures of store paths, as Nix 2.8 makes and checks them
//! (`libstore/crypto.cc`, `ValidPathInfo::fingerprint`).
//!
//! * Keys are text `name:base64`: a secret key holds 64 bytes (libsodium's
//!   layout: the 32-byte seed, then the public key), a public key 32 bytes.
//!   `nix-store --generate-binary-cache-key name sk pk` writes such files
//!   (without a trailing newline; surrounding whitespace is ignored here).
//! * A signature is text `name:base64` of the 64-byte ed25519 signature,
//!   where `name` is the signing key's name. Verification looks the key up
//!   by that name.
//! * What is signed is the path's [`fingerprint`]:
//!   `1;<store path>;<NAR hash as algo:nixbase32>;<NAR size>;<references>`,
//!   where the store path and the references are full paths and the
//!   references are sorted and joined with `,` (an empty set gives nothing
//!   after the last `;`). A NAR size of 0 means "unknown" and has no
//!   fingerprint.
//!
//! ed25519 is deterministic, so [`sign`] gives the same text as Nix for the
//! same key and path. Verification uses ed25519-dalek's `verify_strict`
//! (canonical `S`, no small-order key or `R`), which matches what libsodium
//! accepts for every signature a real signer makes.
//!
//! Differences from Nix, all on malformed input: a signature whose base-64
//! does not decode to 64 bytes is simply not valid here (Nix throws), and
//! base-64 must be canonical (Nix ignores newlines and everything after the
//! first `=`). [`SecretKey`] does not wipe its memory on drop.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use data_encoding::{BASE64, BASE64_NOPAD};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use thiserror::Error;

use crate::hash::Hash;
use crate::narinfo::NarInfo;
use crate::store_path::{ContentAddress, StoreDir, StorePath};

/// Bytes in a secret key (seed and public key).
pub const SECRET_KEY_LEN: usize = 64;
/// Bytes in a public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Bytes in a signature.
pub const SIGNATURE_LEN: usize = 64;

/// Why a key or signature text was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyError {
    /// The text is not `name:base64` with a non-empty name and data.
    #[error("{what} is corrupt: expected 'name:base64'")]
    Corrupt {
        /// `secret key`, `public key` or `signature`.
        what: &'static str,
    },
    /// The data is not canonical base-64.
    #[error("{what} '{name}' is not valid base-64")]
    InvalidBase64 {
        /// `secret key`, `public key` or `signature`.
        what: &'static str,
        /// The key name.
        name: String,
    },
    /// The data has the wrong length.
    #[error("{what} '{name}' has {actual} bytes, expected {expected}")]
    WrongLength {
        /// `secret key`, `public key` or `signature`.
        what: &'static str,
        /// The key name.
        name: String,
        /// The expected length.
        expected: usize,
        /// The decoded length.
        actual: usize,
    },
    /// The bytes are not a valid ed25519 key (a public key that is not a
    /// curve point, or a secret key whose public half does not match its
    /// seed).
    #[error("{what} '{name}' is not a valid ed25519 key")]
    InvalidKey {
        /// `secret key` or `public key`.
        what: &'static str,
        /// The key name.
        name: String,
    },
    /// A key name for a new key is empty or holds `:` or white space.
    #[error("invalid key name '{0}': it must be non-empty, without ':' or white space")]
    InvalidName(String),
}

/// Why signatures could not be checked, or none was valid.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SignatureError {
    /// The NAR size is 0 (unknown), so there is no fingerprint.
    #[error("cannot calculate fingerprint of path '{0}' because its size is not known")]
    UnknownNarSize(String),
    /// No signature was made by a trusted key and valid.
    #[error("path '{path}' has no valid signature by a trusted key ({sigs} signature(s) present)")]
    NoValidSignature {
        /// The full store path.
        path: String,
        /// How many signatures it carries.
        sigs: usize,
    },
}

/// Splits `name:data` at the first `:`; both parts must be non-empty.
fn split(text: &str, what: &'static str) -> Result<(String, Vec<u8>), KeyError> {
    let corrupt = || KeyError::Corrupt { what };
    let (name, data) = text.split_once(':').ok_or_else(corrupt)?;
    if name.is_empty() || data.is_empty() {
        return Err(corrupt());
    }
    let bytes = BASE64_NOPAD
        .decode(data.trim_end_matches('=').as_bytes())
        .map_err(|_| KeyError::InvalidBase64 {
            what,
            name: name.to_owned(),
        })?;
    Ok((name.to_owned(), bytes))
}

/// Converts decoded bytes to a fixed-size array.
fn sized<const N: usize>(
    name: &str,
    bytes: &[u8],
    what: &'static str,
) -> Result<[u8; N], KeyError> {
    bytes.try_into().map_err(|_| KeyError::WrongLength {
        what,
        name: name.to_owned(),
        expected: N,
        actual: bytes.len(),
    })
}

/// Checks the name of a key being created.
fn check_name(name: &str) -> Result<(), KeyError> {
    if name.is_empty() || name.contains(':') || name.chars().any(char::is_whitespace) {
        return Err(KeyError::InvalidName(name.to_owned()));
    }
    Ok(())
}

/// A named ed25519 secret key (Nix's `SecretKey`).
#[derive(Clone)]
pub struct SecretKey {
    name: String,
    key: SigningKey,
}

impl SecretKey {
    /// Parses `name:base64` of the 64-byte secret key, as in a key file
    /// written by `nix-store --generate-binary-cache-key`. Surrounding white
    /// space (a final newline) is ignored.
    pub fn parse(text: &str) -> Result<SecretKey, KeyError> {
        const WHAT: &str = "secret key";
        let (name, bytes) = split(text.trim(), WHAT)?;
        let bytes = sized::<SECRET_KEY_LEN>(&name, &bytes, WHAT)?;
        let key = SigningKey::from_keypair_bytes(&bytes).map_err(|_| KeyError::InvalidKey {
            what: WHAT,
            name: name.clone(),
        })?;
        Ok(SecretKey { name, key })
    }

    /// A key from a 32-byte random seed, which the caller supplies (this
    /// crate has no random source). The name must be non-empty, without `:`
    /// or white space.
    pub fn from_seed(name: &str, seed: &[u8; 32]) -> Result<SecretKey, KeyError> {
        check_name(name)?;
        Ok(SecretKey {
            name: name.to_owned(),
            key: SigningKey::from_bytes(seed),
        })
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The matching public key, with the same name.
    pub fn to_public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// The key file text, `name:base64` (no newline), as Nix writes it.
    pub fn to_text(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            BASE64.encode(&self.key.to_keypair_bytes())
        )
    }

    /// Signs `data` (Nix's `SecretKey::signDetached`).
    pub fn sign(&self, data: &[u8]) -> Signature {
        Signature {
            key_name: self.name.clone(),
            bytes: self.key.sign(data).to_bytes(),
        }
    }
}

/// Shows the name only, never the key.
impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({}:<redacted>)", self.name)
    }
}

/// A named ed25519 public key (Nix's `PublicKey`).
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: VerifyingKey,
}

impl PublicKey {
    /// Parses `name:base64` of the 32-byte public key, as in
    /// `trusted-public-keys` or a file written by
    /// `nix-store --generate-binary-cache-key`. Surrounding white space (a
    /// final newline) is ignored.
    pub fn parse(text: &str) -> Result<PublicKey, KeyError> {
        const WHAT: &str = "public key";
        let (name, bytes) = split(text.trim(), WHAT)?;
        let bytes = sized::<PUBLIC_KEY_LEN>(&name, &bytes, WHAT)?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::InvalidKey {
            what: WHAT,
            name: name.clone(),
        })?;
        Ok(PublicKey { name, key })
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether `sig` is this key's valid signature of `data`. The
    /// signature's key name must be this key's name.
    pub fn verify(&self, data: &[u8], sig: &Signature) -> bool {
        sig.key_name == self.name
            && self
                .key
                .verify_strict(data, &ed25519_dalek::Signature::from_bytes(&sig.bytes))
                .is_ok()
    }
}

/// Prints `name:base64`.
impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, BASE64.encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// A parsed signature: the signing key's name and 64 bytes.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Signature {
    key_name: String,
    bytes: [u8; SIGNATURE_LEN],
}

impl Signature {
    /// Parses `name:base64` of a 64-byte signature (a narinfo `Sig` value).
    pub fn parse(text: &str) -> Result<Signature, KeyError> {
        const WHAT: &str = "signature";
        let (key_name, bytes) = split(text, WHAT)?;
        let bytes = sized::<SIGNATURE_LEN>(&key_name, &bytes, WHAT)?;
        Ok(Signature { key_name, bytes })
    }

    /// The name of the key that made it.
    pub fn key_name(&self) -> &str {
        &self.key_name
    }

    /// The signature bytes.
    pub fn as_bytes(&self) -> &[u8; SIGNATURE_LEN] {
        &self.bytes
    }
}

/// Prints `name:base64`, the form Nix stores.
impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.key_name, BASE64.encode(&self.bytes))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({self})")
    }
}

/// Trusted public keys by name (Nix's `PublicKeys`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublicKeys {
    keys: BTreeMap<String, PublicKey>,
}

impl PublicKeys {
    /// No keys.
    pub fn new() -> PublicKeys {
        PublicKeys::default()
    }

    /// Parses a white-space separated list of `name:base64` keys, like the
    /// `trusted-public-keys` setting.
    pub fn parse(text: &str) -> Result<PublicKeys, KeyError> {
        let mut keys = PublicKeys::new();
        for k in text.split_whitespace() {
            keys.insert(PublicKey::parse(k)?);
        }
        Ok(keys)
    }

    /// Adds a key; as in Nix, the first key of a name wins. Returns whether
    /// it was added.
    pub fn insert(&mut self, key: PublicKey) -> bool {
        if self.keys.contains_key(&key.name) {
            return false;
        }
        self.keys.insert(key.name.clone(), key);
        true
    }

    /// The key of this name.
    pub fn get(&self, name: &str) -> Option<&PublicKey> {
        self.keys.get(name)
    }

    /// How many keys there are.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The keys, by name.
    pub fn iter(&self) -> impl Iterator<Item = &PublicKey> {
        self.keys.values()
    }
}

impl FromIterator<PublicKey> for PublicKeys {
    fn from_iter<I: IntoIterator<Item = PublicKey>>(iter: I) -> Self {
        let mut keys = PublicKeys::new();
        for k in iter {
            keys.insert(k);
        }
        keys
    }
}

/// The text Nix signs for a store path (`ValidPathInfo::fingerprint`):
/// `1;<path>;<nar_hash as algo:nixbase32>;<nar_size>;<refs>`, with full
/// paths and the references sorted and joined with `,`.
pub fn fingerprint<'a>(
    store_dir: &StoreDir,
    path: &StorePath,
    nar_hash: &Hash,
    nar_size: u64,
    references: impl IntoIterator<Item = &'a StorePath>,
) -> Result<String, SignatureError> {
    if nar_size == 0 {
        return Err(SignatureError::UnknownNarSize(store_dir.print(path)));
    }
    let refs: BTreeSet<String> = references.into_iter().map(|r| store_dir.print(r)).collect();
    Ok(format!(
        "1;{};{};{};{}",
        store_dir.print(path),
        nar_hash.to_prefixed_nixbase32(),
        nar_size,
        refs.into_iter().collect::<Vec<_>>().join(",")
    ))
}

/// The text Nix signs for a realisation (`Realisation::fingerprint`): its JSON
/// without the signatures, keys in order, no spaces:
/// `{"dependentRealisations":{…},"id":"sha256:<hex>!<output>","outPath":"<base name>"}`.
/// `out_path` and the values of `dependent` are store path base names.
pub fn realisation_fingerprint(
    id: &str,
    out_path: &str,
    dependent: &BTreeMap<String, String>,
) -> String {
    let dependent: Vec<String> = dependent
        .iter()
        .map(|(k, v)| format!("{}:{}", json_string(k), json_string(v)))
        .collect();
    format!(
        "{{\"dependentRealisations\":{{{}}},\"id\":{},\"outPath\":{}}}",
        dependent.join(","),
        json_string(id),
        json_string(out_path)
    )
}

/// `text` as a JSON string, escaped as Nix's JSON writer escapes it.
fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Signs a fingerprint, giving the `name:base64` text of a `Sig` line.
pub fn sign(secret: &SecretKey, fingerprint: &str) -> String {
    secret.sign(fingerprint.as_bytes()).to_string()
}

/// Whether `sig` (`name:base64`) is a valid signature of `fingerprint` by
/// the key of that name in `keys` (Nix's `verifyDetached`). A malformed
/// signature or an unknown key name is not valid.
pub fn verify(keys: &PublicKeys, fingerprint: &str, sig: &str) -> bool {
    let Ok(sig) = Signature::parse(sig) else {
        return false;
    };
    keys.get(sig.key_name())
        .is_some_and(|k| k.verify(fingerprint.as_bytes(), &sig))
}

/// Whether one of `signatures` is a valid signature by a key in `keys` of the realisation
/// of output `id` as `out_path` (a base name) with `dependent` realisations.
pub fn is_realisation_signed<'a>(
    keys: &PublicKeys,
    id: &str,
    out_path: &str,
    dependent: &BTreeMap<String, String>,
    signatures: impl IntoIterator<Item = &'a String>,
) -> bool {
    let fingerprint = realisation_fingerprint(id, out_path, dependent);
    signatures
        .into_iter()
        .any(|sig| verify(keys, &fingerprint, sig))
}

/// Checks a narinfo's `Sig` lines against trusted keys. Returns the names of
/// the keys with a valid signature (at least one, sorted, each once), or
/// [`SignatureError::NoValidSignature`].
///
/// Like Nix's `checkSignatures`, this counts valid signatures; Nix also
/// accepts a path without any when it is content-addressed, which
/// [`NarInfo::is_content_addressed`] tells: that choice is the caller's.
pub fn check_narinfo_signatures(
    store_dir: &StoreDir,
    narinfo: &NarInfo,
    keys: &PublicKeys,
) -> Result<Vec<String>, SignatureError> {
    let fp = narinfo.fingerprint(store_dir)?;
    valid_signers(store_dir, &narinfo.store_path, &fp, &narinfo.sigs, keys)
}

/// The names of the keys in `keys` with a valid signature of `fingerprint` among `sigs`
/// (at least one, sorted, each once), or [`SignatureError::NoValidSignature`] for `path`.
pub fn valid_signers<'a>(
    store_dir: &StoreDir,
    path: &StorePath,
    fingerprint: &str,
    sigs: impl IntoIterator<Item = &'a String>,
    keys: &PublicKeys,
) -> Result<Vec<String>, SignatureError> {
    let mut count = 0;
    let valid: BTreeSet<String> = sigs
        .into_iter()
        .inspect(|_| count += 1)
        .filter(|s| verify(keys, fingerprint, s))
        .filter_map(|s| s.split_once(':').map(|(name, _)| name.to_owned()))
        .collect();
    if valid.is_empty() {
        return Err(SignatureError::NoValidSignature {
            path: store_dir.print(path),
            sigs: count,
        });
    }
    Ok(valid.into_iter().collect())
}

/// Whether the content address `ca` with `references` really gives `path` (Nix's
/// `ValidPathInfo::isContentAddressed`): Nix trusts such paths without signatures, and checks
/// their content against `ca` as it adds them. A self-reference is allowed only for fixed
/// (`fixed:`) addresses.
pub fn is_content_addressed(
    store_dir: &StoreDir,
    path: &StorePath,
    ca: &ContentAddress,
    references: &BTreeSet<StorePath>,
) -> bool {
    let name = path.name();
    let computed = match ca {
        ContentAddress::Text(_) => store_dir.make_path_from_ca(name, ca, references, false),
        ContentAddress::Fixed(..) => {
            let mut refs = references.clone();
            let has_self = refs.remove(path);
            store_dir.make_path_from_ca(name, ca, &refs, has_self)
        }
    };
    computed.is_ok_and(|p| &p == path)
}

impl NarInfo {
    /// The [`fingerprint`] of this path: what its signatures sign.
    pub fn fingerprint(&self, store_dir: &StoreDir) -> Result<String, SignatureError> {
        fingerprint(
            store_dir,
            &self.store_path,
            &self.nar_hash,
            self.nar_size,
            &self.references,
        )
    }

    /// Signs this path with `secret` and adds the signature to
    /// [`NarInfo::sigs`] (Nix's `ValidPathInfo::sign`).
    pub fn sign(&mut self, store_dir: &StoreDir, secret: &SecretKey) -> Result<(), SignatureError> {
        let fp = self.fingerprint(store_dir)?;
        self.sigs.insert(sign(secret, &fp));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Generated by `nix-store --generate-binary-cache-key test-key-1 sk pk`
    // (Nix 2.8); the signature is Nix's for the path in `info()`.
    const SK: &str = "test-key-1:RSliGBNLkAkRTyUPLmAUrdit5k1649a+VedKoNQwGEAcqbh6H3EhwDYHhh6Bz+YU139syabiNP2WSN70nexrHQ==";
    const PK: &str = "test-key-1:HKm4eh9xIcA2B4Yegc/mFNd/bMmm4jT9lkje9J3sax0=";
    const NIX_SIG: &str = "test-key-1:aKxil4w6y4ifP9EoJ4vaaWS4QoAvD69TlEXA6JQ4Qdaz23ejn/Ryv3Gawi60YN5ffuh/5YuiV3IUrKPkrKZZDA==";

    fn dir() -> StoreDir {
        StoreDir::new("/tmp/nx/s/store").unwrap()
    }

    fn info() -> NarInfo {
        let text = "StorePath: /tmp/nx/s/store/970x0qcwwvlpdzs2v286r8jsqk2pyb3x-c\n\
            URL: nar/0rq9lii3gnlhkh13gpq24qghbhjiqj51ja4hqqjf4c909bvnkv8x.nar.xz\n\
            NarHash: sha256:17wkanvrz9vhs8fxvkshqrymf1j6196fl1mc7sjk1ns836j4vdkm\n\
            NarSize: 280\n\
            References: 970x0qcwwvlpdzs2v286r8jsqk2pyb3x-c j80qrs6pk07pk59mxkjfvpcccjh6va0z-a.txt ycsq6aw5f08zj5a3afyg9b5c98zjihc6-b.txt\n\
            Deriver: j37cmpj4jkgd4ihmbpsz0k50hjr2p7qv-c.drv\n";
        let mut n = NarInfo::parse(&dir(), text).unwrap();
        n.sigs.insert(NIX_SIG.to_owned());
        n
    }

    fn keys() -> PublicKeys {
        PublicKeys::parse(PK).unwrap()
    }

    /// A realisation Nix 2.8 signed (`secret-key-files`, `nix realisation info --json`).
    #[test]
    fn realisation_fingerprint_is_what_nix_signs() -> Result<(), KeyError> {
        let key = PublicKey::parse("test-key-1:qd1wAbrkUMGezCViMlr4UYwJ/5Fhvv9dRTfIXC7BejM=")?;
        let keys: PublicKeys = [key].into_iter().collect();
        let fp = realisation_fingerprint(
            "sha256:e3c9e2facc4aab0479ddb2fdc261672c53d788538fe68752726497d3d1561f5d!out",
            "jqmhlr2slvrl71svxjjr8bxjzc13v469-sigtest-ca",
            &BTreeMap::new(),
        );
        let sig = "test-key-1:Gx5i0iRA+EShTwRQzJ/N+HNbuCK7eW++GBta1M/YcJ9qBetn7lb4u3R8xqtPOj3pd5EAjfwc7f9qdSmvdyAXBA==";
        assert!(verify(&keys, &fp, sig), "{fp}");
        assert!(!verify(&keys, &fp.replace("!out", "!dev"), sig));
        Ok(())
    }

    #[test]
    fn realisation_fingerprint_escapes_and_orders_dependents() {
        let deps: BTreeMap<String, String> = [
            ("sha256:bb!out".to_owned(), "b-x".to_owned()),
            ("sha256:aa!out".to_owned(), "a\"q".to_owned()),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            realisation_fingerprint("sha256:cc!out", "c-x", &deps),
            r#"{"dependentRealisations":{"sha256:aa!out":"a\"q","sha256:bb!out":"b-x"},"id":"sha256:cc!out","outPath":"c-x"}"#
        );
    }

    #[test]
    fn fingerprint_format() {
        assert_eq!(
            info().fingerprint(&dir()).unwrap(),
            "1;/tmp/nx/s/store/970x0qcwwvlpdzs2v286r8jsqk2pyb3x-c;\
             sha256:17wkanvrz9vhs8fxvkshqrymf1j6196fl1mc7sjk1ns836j4vdkm;280;\
             /tmp/nx/s/store/970x0qcwwvlpdzs2v286r8jsqk2pyb3x-c,\
             /tmp/nx/s/store/j80qrs6pk07pk59mxkjfvpcccjh6va0z-a.txt,\
             /tmp/nx/s/store/ycsq6aw5f08zj5a3afyg9b5c98zjihc6-b.txt"
        );
        let mut n = info();
        n.references.clear();
        assert!(n.fingerprint(&dir()).unwrap().ends_with(";280;"));
        n.nar_size = 0;
        assert!(matches!(
            n.fingerprint(&dir()),
            Err(SignatureError::UnknownNarSize(_))
        ));
    }

    #[test]
    fn keys_round_trip_and_match() {
        let sk = SecretKey::parse(SK).unwrap();
        assert_eq!(sk.to_text(), SK);
        assert_eq!(sk.name(), "test-key-1");
        assert_eq!(sk.to_public().to_string(), PK);
        assert!(!format!("{sk:?}").contains("RSli"));
        // A key file with a trailing newline, and unpadded base-64.
        assert_eq!(SecretKey::parse(&format!("{SK}\n")).unwrap().to_text(), SK);
        assert_eq!(
            PublicKey::parse(PK.trim_end_matches('='))
                .unwrap()
                .to_string(),
            PK
        );
    }

    #[test]
    fn our_signature_equals_nix() {
        let sk = SecretKey::parse(SK).unwrap();
        let fp = info().fingerprint(&dir()).unwrap();
        assert_eq!(sign(&sk, &fp), NIX_SIG);
        let mut n = info();
        n.sigs.clear();
        n.sign(&dir(), &sk).unwrap();
        assert_eq!(n.sigs.iter().next().map(String::as_str), Some(NIX_SIG));
    }

    #[test]
    fn verify_accepts_and_rejects() {
        let n = info();
        assert_eq!(
            check_narinfo_signatures(&dir(), &n, &keys()).unwrap(),
            ["test-key-1"]
        );
        let fp = n.fingerprint(&dir()).unwrap();
        assert!(verify(&keys(), &fp, NIX_SIG));
        assert!(!verify(&keys(), &fp.replace(";280;", ";281;"), NIX_SIG));
        assert!(!verify(&PublicKeys::new(), &fp, NIX_SIG));
        assert!(!verify(&keys(), &fp, "test-key-1:AAAA"));
        assert!(!verify(&keys(), &fp, "garbage"));
        assert!(!verify(&keys(), &fp, &format!("{NIX_SIG} ")));
        let parsed = Signature::parse(NIX_SIG).unwrap();
        assert_eq!(parsed.key_name(), "test-key-1");
        assert_eq!(parsed.to_string(), NIX_SIG);
        // Same key bytes under another name: the name must match.
        let renamed = PublicKeys::parse(&PK.replace("test-key-1", "other")).unwrap();
        assert!(!verify(&renamed, &fp, NIX_SIG));
        let renamed_sig = NIX_SIG.replace("test-key-1", "other");
        assert!(verify(&renamed, &fp, &renamed_sig));

        let mut tampered = info();
        tampered.nar_size += 1;
        assert!(matches!(
            check_narinfo_signatures(&dir(), &tampered, &keys()),
            Err(SignatureError::NoValidSignature { sigs: 1, .. })
        ));
        let mut tampered = info();
        tampered.references.pop_first();
        assert!(check_narinfo_signatures(&dir(), &tampered, &keys()).is_err());
        // The store directory is part of the fingerprint.
        assert!(check_narinfo_signatures(&StoreDir::default(), &n, &keys()).is_err());
    }

    #[test]
    fn generated_keys() {
        let sk = SecretKey::from_seed("mine", &[7; 32]).unwrap();
        let again = SecretKey::parse(&sk.to_text()).unwrap();
        assert_eq!(again.to_text(), sk.to_text());
        let mut n = info();
        n.sigs.clear();
        n.sign(&dir(), &sk).unwrap();
        let keys: PublicKeys = [sk.to_public()].into_iter().collect();
        assert_eq!(
            check_narinfo_signatures(&dir(), &n, &keys).unwrap(),
            ["mine"]
        );
        for bad in ["", "a:b", "a b", "with\ttab"] {
            assert!(matches!(
                SecretKey::from_seed(bad, &[0; 32]),
                Err(KeyError::InvalidName(_))
            ));
        }
    }

    #[test]
    fn malformed_keys() {
        let corrupt = |r: Result<PublicKey, KeyError>| matches!(r, Err(KeyError::Corrupt { .. }));
        assert!(corrupt(PublicKey::parse("nocolon")));
        assert!(corrupt(PublicKey::parse(":AAAA")));
        assert!(corrupt(PublicKey::parse("name:")));
        assert!(matches!(
            PublicKey::parse("n:!!!!"),
            Err(KeyError::InvalidBase64 { .. })
        ));
        assert!(matches!(
            PublicKey::parse("n:AAAA"),
            Err(KeyError::WrongLength {
                expected: 32,
                actual: 3,
                ..
            })
        ));
        // The secret key's public half must match its seed.
        let mut bytes = SecretKey::parse(SK).unwrap().key.to_keypair_bytes();
        bytes[40] ^= 1;
        assert!(matches!(
            SecretKey::parse(&format!("k:{}", BASE64.encode(&bytes))),
            Err(KeyError::InvalidKey { .. })
        ));
        // A public key given as a secret key.
        assert!(matches!(
            SecretKey::parse(PK),
            Err(KeyError::WrongLength { expected: 64, .. })
        ));
        // First key of a name wins.
        let other = SecretKey::from_seed("test-key-1", &[1; 32])
            .unwrap()
            .to_public();
        let mut keys = keys();
        assert!(!keys.insert(other));
        assert_eq!(keys.len(), 1);
        assert_eq!(keys.get("test-key-1").unwrap().to_string(), PK);
    }
}
