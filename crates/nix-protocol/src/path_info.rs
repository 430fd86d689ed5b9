//! Path infos: what the daemon knows about a valid path ([`PathInfo`], the reply of
//! `QueryPathInfo`) and a path together with it ([`ValidPathInfo`], what `AddToStoreNar` and
//! `AddMultipleToStore` send). The NAR hash is `nixspace-nix-formats`' [`Hash`](struct@Hash),
//! always SHA-256; signatures and the content address stay strings.

use std::collections::BTreeSet;

use nixspace_nix_formats::hash::{Hash, HashAlgo, HashError};
use nixspace_nix_formats::store_path::StorePath;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::version::PATH_INFO_ULTIMATE_SIGS_CA;
use crate::wire::{NixDeserialize, NixReader, NixSerialize, NixWriter, WireError};

/// Reads a NAR hash. Nix 2.8 sends 64 lowercase hex digits without a prefix and reads with
/// `Hash::parseAny(s, htSHA256)`, so any SHA-256 form is accepted (bare or `sha256:`-prefixed
/// base-16, nixbase32 or base-64, or SRI); another algorithm is an error.
pub(crate) async fn read_nar_hash<R: AsyncRead + Unpin>(
    r: &mut NixReader<R>,
) -> Result<Hash, WireError> {
    let s = r.read_string("narHash").await?;
    Hash::parse_any(&s, Some(HashAlgo::Sha256)).map_err(|source| WireError::Hash {
        what: "narHash",
        source,
    })
}

/// Writes a NAR hash as unprefixed base-16, as Nix does; it must be SHA-256, since the peer
/// reads the unprefixed digest as SHA-256.
async fn write_nar_hash<W: AsyncWrite + Unpin>(
    w: &mut NixWriter<W>,
    hash: &Hash,
) -> Result<(), WireError> {
    if hash.algo() != HashAlgo::Sha256 {
        return Err(WireError::Hash {
            what: "narHash",
            source: HashError::AlgoMismatch {
                text: hash.to_string(),
                expected: HashAlgo::Sha256,
            },
        });
    }
    w.write_str(&hash.to_base16(), "narHash").await
}

/// What the daemon knows about a valid path, without the path itself (the reply of
/// `QueryPathInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    /// The derivation that produced the path, if known.
    pub deriver: Option<StorePath>,
    /// The SHA-256 hash of the path's NAR serialisation (writing another algorithm is an
    /// error).
    pub nar_hash: Hash,
    /// The paths it references.
    pub references: BTreeSet<StorePath>,
    /// Seconds since the epoch at registration.
    pub registration_time: u64,
    /// The size of the NAR serialisation.
    pub nar_size: u64,
    /// Whether the path was built locally and is trusted without signatures.
    pub ultimate: bool,
    /// Signatures, `key-name:base64`.
    pub sigs: BTreeSet<String>,
    /// The rendered content address (`fixed:r:sha256:…`, `text:sha256:…`), if any.
    pub ca: Option<String>,
}

/// A path with its [`PathInfo`] (what `AddToStoreNar` and `AddMultipleToStore` send).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidPathInfo {
    /// The path.
    pub path: StorePath,
    /// What is known about it.
    pub info: PathInfo,
}

impl PathInfo {
    /// Reads the fields in their wire order; `ultimate`, `sigs` and `ca` only if
    /// `with_trust` (the worker protocol from 1.16; the serve protocol's `AddToStoreNar`).
    pub(crate) async fn read_fields<R: AsyncRead + Unpin>(
        r: &mut NixReader<R>,
        with_trust: bool,
    ) -> Result<Self, WireError> {
        let deriver = r.read_opt_store_path("deriver").await?;
        let nar_hash = read_nar_hash(r).await?;
        let references = r.read_store_path_set("references").await?;
        let registration_time = r.read_u64("registrationTime").await?;
        let nar_size = r.read_u64("narSize").await?;
        let (mut ultimate, mut sigs, mut ca) = (false, BTreeSet::new(), None);
        if with_trust {
            ultimate = r.read_bool("ultimate").await?;
            sigs = r.read_string_set("sigs").await?;
            ca = Some(r.read_string("ca").await?).filter(|s| !s.is_empty());
        }
        Ok(Self {
            deriver,
            nar_hash,
            references,
            registration_time,
            nar_size,
            ultimate,
            sigs,
            ca,
        })
    }

    /// Writes the fields as [`PathInfo::read_fields`] reads them.
    pub(crate) async fn write_fields<W: AsyncWrite + Unpin>(
        &self,
        w: &mut NixWriter<W>,
        with_trust: bool,
    ) -> Result<(), WireError> {
        w.write_opt_store_path(self.deriver.as_ref(), "deriver")
            .await?;
        write_nar_hash(w, &self.nar_hash).await?;
        w.write_store_paths(&self.references, "references").await?;
        w.write_u64(self.registration_time, "registrationTime")
            .await?;
        w.write_u64(self.nar_size, "narSize").await?;
        if with_trust {
            w.write_bool(self.ultimate, "ultimate").await?;
            w.write_strings(&self.sigs, "sigs").await?;
            w.write_str(self.ca.as_deref().unwrap_or(""), "ca").await?;
        }
        Ok(())
    }
}

impl NixDeserialize for PathInfo {
    async fn read_from<R: AsyncRead + Unpin + Send>(
        r: &mut NixReader<R>,
    ) -> Result<Self, WireError> {
        let with_trust = r.version() >= PATH_INFO_ULTIMATE_SIGS_CA;
        Self::read_fields(r, with_trust).await
    }
}

impl NixSerialize for PathInfo {
    async fn write_to<W: AsyncWrite + Unpin + Send>(
        &self,
        w: &mut NixWriter<W>,
    ) -> Result<(), WireError> {
        let with_trust = w.version() >= PATH_INFO_ULTIMATE_SIGS_CA;
        self.write_fields(w, with_trust).await
    }
}

impl NixDeserialize for ValidPathInfo {
    async fn read_from<R: AsyncRead + Unpin + Send>(
        r: &mut NixReader<R>,
    ) -> Result<Self, WireError> {
        let path = r.read_store_path("path").await?;
        let info = PathInfo::read_from(r).await?;
        Ok(Self { path, info })
    }
}

impl NixSerialize for ValidPathInfo {
    async fn write_to<W: AsyncWrite + Unpin + Send>(
        &self,
        w: &mut NixWriter<W>,
    ) -> Result<(), WireError> {
        w.write_store_path(&self.path, "path").await?;
        self.info.write_to(w).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::NIX_2_8;

    fn wire_string(s: &str) -> NixReader<std::io::Cursor<Vec<u8>>> {
        let mut bytes = (s.len() as u64).to_le_bytes().to_vec();
        bytes.extend(s.as_bytes());
        bytes.extend(&[0u8; 8][..crate::wire::padding_len(s.len() as u64)]);
        NixReader::new(std::io::Cursor::new(bytes), NIX_2_8)
    }

    #[tokio::test]
    async fn nar_hash_wire_forms() {
        let h = Hash::new(HashAlgo::Sha256, &[0xab; 32]).unwrap();
        let mut w = NixWriter::new(Vec::new(), NIX_2_8);
        write_nar_hash(&mut w, &h).await.unwrap();
        w.flush().await.unwrap();
        let bytes = w.into_inner();
        // Unprefixed base-16, as Nix 2.8 writes it.
        assert_eq!(&bytes[..8], &64u64.to_le_bytes());
        assert_eq!(&bytes[8..], "ab".repeat(32).as_bytes());
        let mut r = NixReader::new(std::io::Cursor::new(bytes), NIX_2_8);
        assert_eq!(read_nar_hash(&mut r).await.unwrap(), h);
        for form in [
            h.to_prefixed_base16(),
            h.to_prefixed_nixbase32(),
            h.to_sri(),
        ] {
            assert_eq!(read_nar_hash(&mut wire_string(&form)).await.unwrap(), h);
        }
        for bad in ["abc".to_owned(), "g".repeat(64), String::new()] {
            assert!(
                matches!(
                    read_nar_hash(&mut wire_string(&bad)).await,
                    Err(WireError::Hash {
                        what: "narHash",
                        ..
                    })
                ),
                "{bad:?}"
            );
        }
        let md5 = Hash::digest(HashAlgo::Md5, b"x");
        assert!(matches!(
            read_nar_hash(&mut wire_string(&md5.to_prefixed_base16())).await,
            Err(WireError::Hash {
                source: HashError::AlgoMismatch { .. },
                ..
            })
        ));
        let mut w = NixWriter::new(Vec::new(), NIX_2_8);
        assert!(matches!(
            write_nar_hash(&mut w, &md5).await,
            Err(WireError::Hash {
                what: "narHash",
                source: HashError::AlgoMismatch {
                    expected: HashAlgo::Sha256,
                    ..
                }
            })
        ));
    }
}
