//! Nix binary caches as one [`PathSource`]: directories in the layout `nix copy --to
//! file://DIR` writes and HTTP(S) caches in the same layout (`<hash part>.narinfo` files, the
//! NARs they name, uncompressed or compressed with xz, zstd, bzip2 or brotli, and the
//! realisations of content-addressed derivation outputs, `realisations/<id>.doi`). Several
//! caches are asked in the order of their `nix-cache-info` priority. With trusted keys
//! configured, only paths whose narinfo, and realisations that carry a valid signature by one
//! of them are offered. The narinfo, NAR and realisation logic is one for both kinds of cache:
//! only where the bytes come from ([`CacheFiles`]) differs.

use std::io::{self, BufReader, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use nixspace_nix_formats::narinfo::NarInfo;
use nixspace_nix_formats::signature::{
    check_narinfo_signatures, is_realisation_signed, PublicKeys,
};
use nixspace_nix_formats::store_path::StoreDir;
use nixspace_nix_protocol::Realisation;
use nixspace_protocol::store;
use reqwest::Url;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::http_cache::{self, HttpFiles};
use crate::nar_stream::NarSender;
use crate::source::{
    is_hash_part, BoxFuture, OfferedRealisation, PathSource, SourceError, MAX_REALISATION_FILE,
};

/// Bytes read from the cache per write into the stream.
const READ_CHUNK: usize = 64 * 1024;

/// The most bytes a narinfo (or `nix-cache-info`) may have.
pub const MAX_NARINFO: u64 = 256 * 1024;

/// The priority of a cache whose `nix-cache-info` names none (Nix's default).
pub const DEFAULT_PRIORITY: u32 = 50;

/// Bytes a compressed NAR may have beyond its NAR size when its narinfo gives no file size
/// (what compressing incompressible data adds, with room to spare).
const COMPRESSION_SLACK: u64 = 1024 * 1024;

/// Why a binary cache cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CacheOpenError {
    /// The location is neither a directory nor an `http(s)://` or `file://` URL.
    #[error("{0}: not a binary cache directory nor an http(s):// URL")]
    Location(String),
    /// The HTTP client cannot be made.
    #[error("HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    /// The cache's `nix-cache-info` cannot be read.
    #[error(transparent)]
    Info(#[from] SourceError),
    /// The cache holds paths of another store directory.
    #[error("{cache} holds paths of {theirs}, not {ours}")]
    StoreDir {
        /// The cache.
        cache: String,
        /// The store directory its `nix-cache-info` names.
        theirs: String,
        /// This store's.
        ours: String,
    },
}

/// Where a binary cache's files are read from.
#[derive(Debug, Clone)]
pub enum CacheFiles {
    /// A local directory.
    Dir(PathBuf),
    /// An HTTP(S) server.
    Http(HttpFiles),
}

impl CacheFiles {
    /// The cache at `location`: an `http://` or `https://` URL, a `file://` URL or a
    /// directory; HTTP caches use `client`.
    pub fn at(location: &str, client: &reqwest::Client) -> Result<CacheFiles, CacheOpenError> {
        if location.starts_with("http://") || location.starts_with("https://") {
            let url =
                Url::parse(location).map_err(|_| CacheOpenError::Location(location.to_owned()))?;
            return Ok(CacheFiles::Http(HttpFiles::new(url, client.clone())));
        }
        let dir = PathBuf::from(location.strip_prefix("file://").unwrap_or(location));
        if dir.is_dir() {
            Ok(CacheFiles::Dir(dir))
        } else {
            Err(CacheOpenError::Location(location.to_owned()))
        }
    }

    /// Where the file `name` is, to name it in errors.
    fn name(&self, name: &str) -> String {
        match self {
            CacheFiles::Dir(dir) => dir.join(name).display().to_string(),
            CacheFiles::Http(http) => format!("{}{name}", http.base()),
        }
    }

    /// The whole file `name` (relative, checked), if the cache has it; over `limit` bytes
    /// is an error.
    async fn read_small(&self, name: &str, limit: u64) -> Result<Option<Vec<u8>>, SourceError> {
        match self {
            CacheFiles::Dir(dir) => {
                let file = dir.join(name);
                let read_error = |source| SourceError::Read {
                    file: file.display().to_string(),
                    source,
                };
                let mut bytes = Vec::new();
                let opened = match tokio::fs::File::open(&file).await {
                    Ok(opened) => opened,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(read_error(e)),
                };
                opened
                    .take(limit + 1)
                    .read_to_end(&mut bytes)
                    .await
                    .map_err(read_error)?;
                if bytes.len() as u64 > limit {
                    return Err(SourceError::TooLarge {
                        file: file.display().to_string(),
                        limit,
                    });
                }
                Ok(Some(bytes))
            }
            CacheFiles::Http(http) => http.read_small(name, limit).await,
        }
    }

    /// A blocking reader of the file `name` (relative, checked), of at most `limit` bytes.
    async fn open(&self, name: &str, limit: u64) -> Result<Box<dyn Read + Send>, SourceError> {
        match self {
            CacheFiles::Dir(dir) => {
                let file = dir.join(name);
                let opened = std::fs::File::open(&file).map_err(|source| SourceError::Read {
                    file: file.display().to_string(),
                    source,
                })?;
                Ok(Box::new(BufReader::new(opened).take(limit)))
            }
            CacheFiles::Http(http) => Ok(Box::new(http.open(name, limit).await?)),
        }
    }
}

/// What a cache's `nix-cache-info` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheInfo {
    /// The store directory of its paths, if it names one.
    pub store_dir: Option<String>,
    /// Its priority: caches with lower numbers are asked first.
    pub priority: u32,
    /// Whether it wants to be asked about many paths at once.
    pub want_mass_query: bool,
}

impl CacheInfo {
    /// Parse `nix-cache-info` text (`Key: value` lines; unknown keys and malformed lines
    /// are ignored, as Nix does).
    pub fn parse(text: &str) -> CacheInfo {
        let mut info = CacheInfo {
            store_dir: None,
            priority: DEFAULT_PRIORITY,
            want_mass_query: false,
        };
        for line in text.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match key.trim() {
                "StoreDir" => info.store_dir = Some(value.to_owned()),
                "Priority" => info.priority = value.parse().unwrap_or(DEFAULT_PRIORITY),
                "WantMassQuery" => info.want_mass_query = value == "1",
                _ => {}
            }
        }
        info
    }
}

/// One binary cache.
#[derive(Debug, Clone)]
pub struct BinaryCache {
    files: CacheFiles,
    store_dir: StoreDir,
    trusted: Option<Arc<PublicKeys>>,
    info: CacheInfo,
}

impl BinaryCache {
    /// The cache in `dir` for paths of `store_dir`; with `trusted` keys, unsigned or wrongly
    /// signed paths are not offered.
    pub fn new(dir: PathBuf, store_dir: StoreDir, trusted: Option<PublicKeys>) -> BinaryCache {
        BinaryCache {
            files: CacheFiles::Dir(dir),
            store_dir,
            trusted: trusted.map(Arc::new),
            info: CacheInfo::parse(""),
        }
    }

    /// The cache whose files are `files`, after reading its `nix-cache-info` (a cache without
    /// one has the default priority): refused if it holds paths of another store directory.
    pub async fn open(
        files: CacheFiles,
        store_dir: StoreDir,
        trusted: Option<Arc<PublicKeys>>,
    ) -> Result<BinaryCache, CacheOpenError> {
        let text = files.read_small("nix-cache-info", MAX_NARINFO).await?;
        let info = CacheInfo::parse(&String::from_utf8_lossy(&text.unwrap_or_default()));
        if let Some(theirs) = &info.store_dir {
            if *theirs != store_dir.to_string() {
                return Err(CacheOpenError::StoreDir {
                    cache: files.name(""),
                    theirs: theirs.clone(),
                    ours: store_dir.to_string(),
                });
            }
        }
        Ok(BinaryCache {
            files,
            store_dir,
            trusted,
            info,
        })
    }

    /// What the cache's `nix-cache-info` says.
    pub fn info(&self) -> &CacheInfo {
        &self.info
    }

    /// Where the cache is.
    pub fn location(&self) -> String {
        self.files.name("")
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
        self.narinfo_of(parsed.hash_part()).await
    }

    /// The narinfo `<hash_part>.narinfo` (`hash_part` checked by [`is_hash_part`]), if the
    /// cache has one that describes a path of that hash part (and it is trusted).
    async fn narinfo_of(&self, hash_part: &str) -> Result<NarInfo, SourceError> {
        let name = format!("{hash_part}.narinfo");
        let file = self.files.name(&name);
        let Some(bytes) = self.files.read_small(&name, MAX_NARINFO).await? else {
            return Err(SourceError::NotInCache(file));
        };
        let info = match NarInfo::parse_bytes(&self.store_dir, &bytes) {
            Ok(info) => info,
            Err(source) => return Err(SourceError::NarInfo { file, source }),
        };
        if info.store_path.hash_part() != hash_part {
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
        let name = format!("realisations/{id}.doi");
        let file = self.files.name(&name);
        let Some(bytes) = self.files.read_small(&name, MAX_REALISATION_FILE).await? else {
            return Err(SourceError::NotInCache(file));
        };
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

    /// `info` as the dataspace's path-info record.
    fn to_wire(&self, info: &NarInfo) -> store::PathInfo {
        store::PathInfo {
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
        }
    }

    /// Write the NAR `info` names into `out`, decompressed (at most its NAR size); its size.
    async fn send_nar(&self, info: NarInfo, out: &mut NarSender) -> Result<u64, SourceError> {
        if info.url.contains("..") || info.url.starts_with('/') || info.url.contains("://") {
            return Err(SourceError::UrlOutsideCache(info.url));
        }
        let file = self.files.name(&info.url);
        let compression = info.compression().to_owned();
        let limit = info
            .file_size
            .unwrap_or(info.nar_size.saturating_add(COMPRESSION_SLACK));
        let input = self.files.open(&info.url, limit).await?;
        // Decompress on a blocking thread, handing chunks to this task.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        let nar_size = info.nar_size;
        let reader = tokio::task::spawn_blocking(move || -> Result<(), SourceError> {
            let mut sink = ChunkWriter { tx, left: nar_size };
            decompress(&compression, input, &mut sink).map_err(|source| {
                if source.kind() == io::ErrorKind::BrokenPipe {
                    SourceError::Stream(source)
                } else {
                    SourceError::Decompress { file, source }
                }
            })
        });
        let mut size = 0u64;
        while let Some(chunk) = rx.recv().await {
            size += chunk.len() as u64;
            out.write_all(&chunk).await.map_err(SourceError::Stream)?;
        }
        reader.await.map_err(SourceError::Task)??;
        Ok(size)
    }
}

/// Copy `input`, compressed with `compression` as a narinfo names it, into `out`
/// decompressed.
fn decompress(
    compression: &str,
    input: Box<dyn Read + Send>,
    out: &mut impl Write,
) -> io::Result<()> {
    match compression {
        "none" => {
            let mut input = input;
            let mut buf = vec![0u8; READ_CHUNK];
            loop {
                let n = input.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                out.write_all(&buf[..n])?;
            }
        }
        "xz" => lzma_rs::xz_decompress(&mut BufReader::new(input), out).map_err(|e| match e {
            lzma_rs::error::Error::IoError(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
        }),
        "zstd" => zstd::stream::copy_decode(input, out),
        "bzip2" => io::copy(&mut bzip2::read::BzDecoder::new(input), out).map(drop),
        "br" => io::copy(&mut brotli::Decompressor::new(input, READ_CHUNK), out).map(drop),
        other => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("compression {other:?} is not supported (none, xz, zstd, bzip2 or br)"),
        )),
    }
}

/// Several binary caches as one source, asked in the order of their priority (then as
/// given): a path is offered, and its NAR sent, from the first that has it.
#[derive(Debug, Clone)]
pub struct BinaryCaches {
    caches: Vec<BinaryCache>,
}

impl BinaryCaches {
    /// The caches at `locations` (see [`CacheFiles::at`]) for paths of `store_dir`, HTTP ones
    /// sharing one client; with `trusted` keys, unsigned or wrongly signed paths are not
    /// offered.
    pub async fn open(
        locations: &[String],
        store_dir: StoreDir,
        trusted: Option<PublicKeys>,
    ) -> Result<BinaryCaches, CacheOpenError> {
        let client = http_cache::client().map_err(CacheOpenError::Client)?;
        let trusted = trusted.map(Arc::new);
        let mut caches = Vec::with_capacity(locations.len());
        for location in locations {
            let files = CacheFiles::at(location, &client)?;
            caches.push(BinaryCache::open(files, store_dir.clone(), trusted.clone()).await?);
        }
        caches.sort_by_key(|c| c.info.priority);
        Ok(BinaryCaches { caches })
    }

    /// The caches, in the order they are asked.
    pub fn caches(&self) -> &[BinaryCache] {
        &self.caches
    }

    /// The first cache's narinfo of `path`, with the cache.
    async fn narinfo(&self, path: &str) -> Result<(&BinaryCache, NarInfo), SourceError> {
        let mut reason = SourceError::NotInCache(path.to_owned());
        for cache in &self.caches {
            match cache.narinfo(path).await {
                Ok(info) => return Ok((cache, info)),
                Err(e) => {
                    tracing::debug!(%path, cache = %cache.location(), reason = %e, "not offered from this binary cache");
                    reason = e;
                }
            }
        }
        Err(reason)
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

impl PathSource for BinaryCaches {
    fn path_info<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Option<store::PathInfo>> {
        Box::pin(async move {
            let (cache, info) = self.narinfo(path).await.ok()?;
            Some(cache.to_wire(&info))
        })
    }

    fn realisation<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Option<OfferedRealisation>> {
        Box::pin(async move {
            for cache in &self.caches {
                match cache.realisation_file(id).await {
                    Ok(offered) => return Some(offered),
                    Err(reason) => {
                        tracing::debug!(%id, cache = %cache.location(), reason = %reason, "realisation not offered from this binary cache");
                    }
                }
            }
            None
        })
    }

    fn path_of_hash_part<'a>(&'a self, hash_part: &'a str) -> BoxFuture<'a, Option<String>> {
        Box::pin(async move {
            if !is_hash_part(hash_part) {
                return None;
            }
            for cache in &self.caches {
                if let Ok(info) = cache.narinfo_of(hash_part).await {
                    return Some(cache.store_dir.print(&info.store_path));
                }
            }
            None
        })
    }

    fn write_nar<'a>(
        &'a self,
        path: &'a str,
        out: &'a mut NarSender,
    ) -> BoxFuture<'a, Result<u64, SourceError>> {
        Box::pin(async move {
            let (cache, info) = self.narinfo(path).await?;
            cache.send_nar(info, out).await
        })
    }
}

/// A blocking writer handing its data to an async task in chunks, refusing more than `left`
/// bytes in all.
struct ChunkWriter {
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    left: u64,
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.len() as u64 > self.left {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the NAR is larger than its narinfo says",
            ));
        }
        self.left -= data.len() as u64;
        self.tx
            .blocking_send(data.to_vec())
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "receiver gone"))?;
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixspace_nix_formats::signature::{realisation_fingerprint, sign, SecretKey};

    const ID: &str = "sha256:5662b097423a35d15c8b79c9ec29ae9ee73f665bf1bc919a507c6ffaa046481a!out";
    const OUT: &str = "jnpmh6wd5kpqhhdwy1d8jzq11yzbysk0-ca";

    /// `data` compressed as a narinfo's `compression` names it.
    fn compressed(compression: &str, data: &[u8]) -> Vec<u8> {
        match compression {
            "none" => data.to_vec(),
            "xz" => {
                let mut out = Vec::new();
                lzma_rs::xz_compress(&mut &data[..], &mut out).unwrap();
                out
            }
            "zstd" => zstd::encode_all(data, 3).unwrap(),
            "bzip2" => {
                let mut w = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
                w.write_all(data).unwrap();
                w.finish().unwrap()
            }
            "br" => {
                let mut w = brotli::CompressorWriter::new(Vec::new(), 4096, 5, 22);
                w.write_all(data).unwrap();
                w.into_inner()
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn nars_are_decompressed_in_every_compression_and_bounded_by_their_size() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        for compression in ["none", "xz", "zstd", "bzip2", "br"] {
            let input = compressed(compression, &data);
            let mut out = Vec::new();
            decompress(
                compression,
                Box::new(std::io::Cursor::new(input.clone())),
                &mut out,
            )
            .unwrap();
            assert_eq!(out, data, "{compression}");
            // One byte fewer than the data: the sink refuses the rest.
            let (tx, mut rx) = tokio::sync::mpsc::channel(1 << 20);
            let mut sink = ChunkWriter {
                tx,
                left: data.len() as u64 - 1,
            };
            let refused = decompress(
                compression,
                Box::new(std::io::Cursor::new(input)),
                &mut sink,
            )
            .unwrap_err();
            assert_eq!(refused.kind(), io::ErrorKind::InvalidData, "{compression}");
            rx.close();
        }
        let unknown = decompress("lz4", Box::new(std::io::empty()), &mut Vec::new()).unwrap_err();
        assert_eq!(unknown.kind(), io::ErrorKind::Unsupported);
    }

    #[tokio::test]
    async fn caches_are_asked_in_priority_order_and_another_store_dir_is_refused() {
        let store_dir = StoreDir::default();
        let path = "/nix/store/970x0qcwwvlpdzs2v286r8jsqk2pyb3x-c";
        let parsed = store_dir.parse(path).unwrap();
        let cache = |priority: &str, nar_size: u64| {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(
                dir.path().join("nix-cache-info"),
                format!("StoreDir: /nix/store\nPriority: {priority}\n"),
            )
            .unwrap();
            let info = NarInfo::new(
                parsed.clone(),
                "nar/x.nar".to_owned(),
                nixspace_nix_formats::hash::Hash::sha256(b"x"),
                nar_size,
            );
            std::fs::write(
                dir.path().join(format!("{}.narinfo", parsed.hash_part())),
                info.to_text(&store_dir),
            )
            .unwrap();
            dir
        };
        let (late, early) = (cache("60", 1), cache("10", 2));
        let locations = [late.path(), early.path()]
            .map(|d| format!("file://{}", d.display()))
            .to_vec();
        let caches = BinaryCaches::open(&locations, store_dir.clone(), None)
            .await
            .unwrap();
        let offered = caches.path_info(path).await.unwrap();
        assert_eq!(offered.nar_size, 2.into(), "from the cache of priority 10");
        assert_eq!(
            caches
                .path_of_hash_part(parsed.hash_part())
                .await
                .as_deref(),
            Some(path)
        );
        assert_eq!(caches.path_of_hash_part("../../etc/passwd").await, None);
        // The control above opened a cache of /nix/store; one of another store is refused.
        std::fs::write(
            early.path().join("nix-cache-info"),
            "StoreDir: /other/store\n",
        )
        .unwrap();
        assert!(matches!(
            BinaryCaches::open(&locations, store_dir, None).await,
            Err(CacheOpenError::StoreDir { .. })
        ));
    }

    #[test]
    fn nix_cache_info_gives_priority_and_mass_query() {
        let info = CacheInfo::parse("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n");
        assert_eq!(
            info,
            CacheInfo {
                store_dir: Some("/nix/store".to_owned()),
                priority: 40,
                want_mass_query: true,
            }
        );
        let default = CacheInfo::parse("garbage\nPriority: x\n");
        assert_eq!(default.priority, DEFAULT_PRIORITY);
        assert!(!default.want_mass_query);
        assert_eq!(default.store_dir, None);
    }

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
            Err(SourceError::TooLarge { .. })
        ));
        assert!(matches!(
            open.realisation_file("sha256:../x!out").await,
            Err(SourceError::BadOutputId(_))
        ));
    }
}
