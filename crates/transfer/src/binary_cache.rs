//! A Nix binary cache directory (the `file://` layout `nix copy --to file://DIR` writes:
//! `<hash part>.narinfo` files and the NARs they name, uncompressed or xz-compressed) as a
//! [`PathSource`], with the realisations of content-addressed derivation outputs it holds
//! (`realisations/<id>.doi`). With trusted keys configured, only paths whose narinfo, and
//! realisations that carry a valid signature by one of them are offered.

use std::io::{BufReader, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use nixspace_nix_formats::narinfo::NarInfo;
use nixspace_nix_formats::signature::{
    check_narinfo_signatures, is_realisation_signed, PublicKeys,
};
use nixspace_nix_formats::store_path::StoreDir;
use nixspace_nix_protocol::Realisation;
use nixspace_protocol::store;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::nar_stream::NarSender;
use crate::source::{BoxFuture, OfferedRealisation, PathSource, SourceError, MAX_REALISATION_FILE};

/// Bytes read from the cache per write into the stream.
const READ_CHUNK: usize = 64 * 1024;

/// A binary cache directory.
#[derive(Debug, Clone)]
pub struct BinaryCache {
    dir: PathBuf,
    store_dir: StoreDir,
    trusted: Option<Arc<PublicKeys>>,
}

impl BinaryCache {
    /// The cache in `dir` for paths of `store_dir`; with `trusted` keys, unsigned or wrongly
    /// signed paths are not offered.
    pub fn new(dir: PathBuf, store_dir: StoreDir, trusted: Option<PublicKeys>) -> BinaryCache {
        BinaryCache {
            dir,
            store_dir,
            trusted: trusted.map(Arc::new),
        }
    }

    /// The narinfo of `path`, if the cache has one that describes it (and it is trusted).
    async fn narinfo(&self, path: &str) -> Result<NarInfo, SourceError> {
        let parsed = self
            .store_dir
            .parse(path)
            .map_err(|source| SourceError::BadPath {
                path: path.to_owned(),
                source,
            })?;
        let file = self.dir.join(format!("{}.narinfo", parsed.hash_part()));
        let bytes = match tokio::fs::read(&file).await {
            Ok(bytes) => bytes,
            Err(source) => return Err(SourceError::Read { file, source }),
        };
        let info = match NarInfo::parse_bytes(&self.store_dir, &bytes) {
            Ok(info) => info,
            Err(source) => return Err(SourceError::NarInfo { file, source }),
        };
        if info.store_path != parsed {
            return Err(SourceError::OtherPath(file));
        }
        if let Some(keys) = &self.trusted {
            if let Err(source) = check_narinfo_signatures(&self.store_dir, &info, keys) {
                return Err(SourceError::Signature { file, source });
            }
        }
        Ok(info)
    }

    /// The realisation of output `id` in `realisations/<id>.doi`, if the cache has one that
    /// names that output and a path of this store (and it is trusted).
    async fn realisation_file(&self, id: &str) -> Result<OfferedRealisation, SourceError> {
        if !is_output_id(id) {
            return Err(SourceError::BadOutputId(id.to_owned()));
        }
        let file = self.dir.join("realisations").join(format!("{id}.doi"));
        let read_error = |source| SourceError::Read {
            file: file.clone(),
            source,
        };
        let mut bytes = Vec::new();
        tokio::fs::File::open(&file)
            .await
            .map_err(read_error)?
            .take(MAX_REALISATION_FILE + 1)
            .read_to_end(&mut bytes)
            .await
            .map_err(read_error)?;
        if bytes.len() as u64 > MAX_REALISATION_FILE {
            return Err(SourceError::RealisationTooLarge(file));
        }
        let invalid = |reason: String| SourceError::Realisation {
            file: file.clone(),
            reason,
        };
        let realisation: Realisation =
            serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
        if realisation.id != id {
            return Err(invalid(format!(
                "it is the realisation of {}",
                realisation.id
            )));
        }
        let path = self
            .store_dir
            .parse(&format!("{}/{}", self.store_dir, realisation.out_path))
            .map_err(|e| invalid(e.to_string()))?;
        if let Some(keys) = &self.trusted {
            let signed = is_realisation_signed(
                keys,
                id,
                &realisation.out_path,
                &realisation.dependent_realisations,
                &realisation.signatures,
            );
            if !signed {
                return Err(SourceError::RealisationNotSigned(file));
            }
        }
        Ok(OfferedRealisation {
            path: self.store_dir.print(&path),
            signatures: realisation.signatures.into_iter().collect(),
        })
    }
}

/// Whether `id` is a derivation output's id as Nix names it, `sha256:<64 hex digits>!<output
/// name>` (so it is also a safe file name).
fn is_output_id(id: &str) -> bool {
    let Some((hash, output)) = id
        .strip_prefix("sha256:")
        .and_then(|rest| rest.split_once('!'))
    else {
        return false;
    };
    hash.len() == 64
        && hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && !output.is_empty()
        && output.len() <= 211
        && !output.starts_with('.')
        && output
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-._?=".contains(&b))
}

impl PathSource for BinaryCache {
    fn path_info<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Option<store::PathInfo>> {
        Box::pin(async move {
            let info = match self.narinfo(path).await {
                Ok(info) => info,
                Err(reason) => {
                    tracing::debug!(%path, reason = %reason, "not offered from the binary cache");
                    return None;
                }
            };
            Some(store::PathInfo {
                nar_hash: info.nar_hash.to_prefixed_base16(),
                nar_size: (info.nar_size as i64).into(),
                references: info
                    .references
                    .iter()
                    .map(|r| self.store_dir.print(r))
                    .collect(),
                deriver: info
                    .deriver
                    .as_ref()
                    .map(|d| self.store_dir.print(d))
                    .unwrap_or_default(),
                ca: info.ca.as_ref().map(|c| c.to_string()).unwrap_or_default(),
                signatures: info.sigs.iter().cloned().collect(),
            })
        })
    }

    fn realisation<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Option<OfferedRealisation>> {
        Box::pin(async move {
            match self.realisation_file(id).await {
                Ok(offered) => Some(offered),
                Err(reason) => {
                    tracing::debug!(%id, reason = %reason, "realisation not offered from the binary cache");
                    None
                }
            }
        })
    }

    fn write_nar<'a>(
        &'a self,
        path: &'a str,
        out: &'a mut NarSender,
    ) -> BoxFuture<'a, Result<u64, SourceError>> {
        Box::pin(async move {
            let info = self.narinfo(path).await?;
            if info.url.contains("..") || info.url.starts_with('/') {
                return Err(SourceError::UrlOutsideCache(info.url));
            }
            let file = self.dir.join(&info.url);
            let compression = info.compression().to_owned();
            // Decompress on a blocking thread, handing chunks to this task.
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
            let reader = tokio::task::spawn_blocking(move || -> Result<(), SourceError> {
                let read_error = |source| SourceError::Read {
                    file: file.clone(),
                    source,
                };
                let mut f = std::fs::File::open(&file).map_err(read_error)?;
                let mut sink = ChunkWriter(tx);
                match compression.as_str() {
                    "none" => {
                        let mut buf = vec![0u8; READ_CHUNK];
                        loop {
                            let n = f.read(&mut buf).map_err(read_error)?;
                            if n == 0 {
                                return Ok(());
                            }
                            sink.write_all(&buf[..n]).map_err(SourceError::Stream)?;
                        }
                    }
                    "xz" => lzma_rs::xz_decompress(&mut BufReader::new(f), &mut sink).map_err(
                        |source| SourceError::Decompress {
                            file: file.clone(),
                            source,
                        },
                    ),
                    other => Err(SourceError::Compression(other.to_owned())),
                }
            });
            let mut size = 0u64;
            while let Some(chunk) = rx.recv().await {
                size += chunk.len() as u64;
                out.write_all(&chunk).await.map_err(SourceError::Stream)?;
            }
            reader.await.map_err(SourceError::Task)??;
            Ok(size)
        })
    }
}

/// A blocking writer handing its data to an async task in chunks.
struct ChunkWriter(tokio::sync::mpsc::Sender<Vec<u8>>);

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(data.to_vec())
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "receiver gone"))?;
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixspace_nix_formats::signature::{realisation_fingerprint, sign, SecretKey};

    const ID: &str = "sha256:5662b097423a35d15c8b79c9ec29ae9ee73f665bf1bc919a507c6ffaa046481a!out";
    const OUT: &str = "jnpmh6wd5kpqhhdwy1d8jzq11yzbysk0-ca";

    #[test]
    fn only_derivation_output_ids_name_realisation_files() {
        assert!(is_output_id(ID));
        assert!(is_output_id(&ID.replace("!out", "!dev-1.2_x")));
        for bad in [
            ID.replace("!out", "!../../etc/passwd"),
            ID.replace("!out", "!.hidden"),
            ID.replace("!out", "!"),
            ID.replace("sha256:", "sha1:"),
            ID.replace("5662", "56G2"),
            ID.replace("5662", "562"),
            "out".to_owned(),
        ] {
            assert!(!is_output_id(&bad), "{bad}");
        }
    }

    fn write_realisation(dir: &std::path::Path, id: &str, text: &str) {
        std::fs::create_dir_all(dir.join("realisations")).unwrap();
        std::fs::write(dir.join("realisations").join(format!("{id}.doi")), text).unwrap();
    }

    #[tokio::test]
    async fn a_realisation_is_offered_as_the_cache_holds_it_and_only_if_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::from_seed("cache-1", &[3; 32]).unwrap();
        let fingerprint = realisation_fingerprint(ID, OUT, &Default::default());
        let signature = sign(&key, &fingerprint);
        write_realisation(
            dir.path(),
            ID,
            &format!(
                r#"{{"dependentRealisations":{{}},"id":"{ID}","outPath":"{OUT}","signatures":["{signature}"]}}"#
            ),
        );
        let open = BinaryCache::new(dir.path().to_owned(), StoreDir::default(), None);
        let offered = open.realisation_file(ID).await.unwrap();
        assert_eq!(offered.path, format!("/nix/store/{OUT}"));
        assert_eq!(offered.signatures, [signature]);
        let trusting = |k: &SecretKey| {
            let mut keys = PublicKeys::new();
            keys.insert(k.to_public());
            BinaryCache::new(dir.path().to_owned(), StoreDir::default(), Some(keys))
        };
        assert!(trusting(&key).realisation_file(ID).await.is_ok());
        let other = SecretKey::from_seed("other-1", &[4; 32]).unwrap();
        assert!(matches!(
            trusting(&other).realisation_file(ID).await,
            Err(SourceError::RealisationNotSigned(_))
        ));
        // A file naming another output, an oversized one, and an id that is no file name.
        let other_id = ID.replace("!out", "!dev");
        write_realisation(
            dir.path(),
            &other_id,
            &format!(r#"{{"id":"{ID}","outPath":"{OUT}","signatures":[]}}"#),
        );
        assert!(matches!(
            open.realisation_file(&other_id).await,
            Err(SourceError::Realisation { .. })
        ));
        let big_id = ID.replace("!out", "!big");
        write_realisation(
            dir.path(),
            &big_id,
            &" ".repeat(MAX_REALISATION_FILE as usize + 1),
        );
        assert!(matches!(
            open.realisation_file(&big_id).await,
            Err(SourceError::RealisationTooLarge(_))
        ));
        assert!(matches!(
            open.realisation_file("sha256:../x!out").await,
            Err(SourceError::BadOutputId(_))
        ));
    }
}
