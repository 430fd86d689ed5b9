//! A Nix binary cache directory (the `file://` layout `nix copy --to file://DIR` writes:
//! `<hash part>.narinfo` files and the NARs they name, uncompressed or xz-compressed) as a
//! [`PathSource`]. With trusted keys configured, only paths whose narinfo carries a valid
//! signature by one of them are offered.

use std::io::{BufReader, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use nixspace_nix_formats::narinfo::NarInfo;
use nixspace_nix_formats::signature::{check_narinfo_signatures, PublicKeys};
use nixspace_nix_formats::store_path::StoreDir;
use nixspace_protocol::store;
use tokio::io::AsyncWriteExt;

use crate::nar_stream::NarSender;
use crate::source::{BoxFuture, PathSource, SourceError};

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
