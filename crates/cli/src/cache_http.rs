//! The binary cache HTTP endpoint of `nixspace cache serve`: `/nix-cache-info`,
//! `/<hash part>.narinfo` and `/nar/<hash part>-<NAR hash>.nar`, answered from whichever store
//! of the dataspace has the path, each narinfo signed with the cache's key. NARs are sent
//! uncompressed, streamed from the store as they arrive (never held whole). `GET` and `HEAD`,
//! one request per connection, at most [`MAX_CONNECTIONS`] at once; what no store has is 404.

use std::sync::Arc;
use std::time::Duration;

use nixspace_nix_formats::narinfo::NarInfo;
use nixspace_nix_formats::signature::SecretKey;
use nixspace_nix_formats::store_path::{ContentAddress, StoreDir};
use nixspace_transfer::dataspace_store::{DataspaceStore, Found};
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::http_request::{read_request, response_head};

/// The most requests answered at once; further connections wait to be accepted.
pub const MAX_CONNECTIONS: usize = 64;

/// A binary cache of the dataspace's stores.
pub struct StoresCache {
    /// The dataspace's stores.
    pub stores: Arc<DataspaceStore>,
    /// The store directory of the paths served.
    pub store_dir: StoreDir,
    /// The key narinfos are signed with, if any.
    pub key: Option<SecretKey>,
    /// The priority `nix-cache-info` announces.
    pub priority: u32,
    /// How long to wait for some store to say it has a path.
    pub patience: Duration,
}

/// What a request is answered with.
enum Answer {
    /// 200 with a small body.
    Text(&'static str, String),
    /// 200 with the NAR of a path, streamed.
    Nar(Box<Found>),
    /// 404.
    NotFound,
    /// 405.
    BadMethod,
}

impl StoresCache {
    /// Serve on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let cache = Arc::clone(&self);
                    tokio::spawn(async move {
                        let _slot = slot;
                        if let Err(error) = cache.answer(stream).await {
                            tracing::debug!(%peer, %error, "binary cache request failed");
                        }
                    });
                }
                Err(error) => tracing::warn!(%error, "binary cache: accept failed"),
            }
        }
    }

    /// Answer the one request on `stream`.
    async fn answer(&self, mut stream: TcpStream) -> std::io::Result<()> {
        let request = read_request(&mut stream).await?;
        let head_only = request.method == "HEAD";
        let answer = if head_only || request.method == "GET" {
            self.answer_for(&request.path).await
        } else {
            Answer::BadMethod
        };
        let mut out = BufWriter::new(&mut stream);
        match answer {
            Answer::Text(content_type, body) => {
                write_head(&mut out, "200 OK", content_type, body.len() as u64).await?;
                if !head_only {
                    out.write_all(body.as_bytes()).await?;
                }
            }
            Answer::Nar(found) => {
                let size = found.info.info.nar_size;
                write_head(&mut out, "200 OK", "application/x-nix-nar", size).await?;
                if !head_only {
                    out.flush().await?;
                    let mut nar = self.stores.nar(&found).map_err(std::io::Error::other)?;
                    // A NAR that fails its size or hash check ends in an error here: the
                    // connection closes short of the length announced, and the client
                    // discards what it got.
                    let sent = tokio::io::copy(&mut nar, &mut out).await?;
                    tracing::debug!(path = %found.printed, from = %found.holder, sent, "served a NAR");
                }
            }
            Answer::NotFound => write_head(&mut out, "404 Not Found", "text/plain", 0).await?,
            Answer::BadMethod => {
                write_head(&mut out, "405 Method Not Allowed", "text/plain", 0).await?
            }
        }
        out.flush().await?;
        stream.shutdown().await
    }

    /// What `path` is answered with.
    async fn answer_for(&self, path: &str) -> Answer {
        if path == "/nix-cache-info" {
            let info = format!(
                "StoreDir: {}\nWantMassQuery: 1\nPriority: {}\n",
                self.store_dir, self.priority
            );
            return Answer::Text("text/x-nix-cache-info", info);
        }
        if let Some(hash_part) = path
            .strip_prefix('/')
            .and_then(|p| p.strip_suffix(".narinfo"))
        {
            return match self.find(hash_part).await {
                Some(found) => Answer::Text("text/x-nix-narinfo", self.narinfo(&found)),
                None => Answer::NotFound,
            };
        }
        if let Some((hash_part, nar_hash)) = path
            .strip_prefix("/nar/")
            .and_then(|p| p.strip_suffix(".nar"))
            .and_then(|p| p.split_once('-'))
        {
            // The path's NAR as the narinfo described it: a store holding another (a build
            // that is not reproducible) does not answer for it.
            return match self.find(hash_part).await {
                Some(found) if found.info.info.nar_hash.to_nixbase32() == nar_hash => {
                    Answer::Nar(Box::new(found))
                }
                _ => Answer::NotFound,
            };
        }
        Answer::NotFound
    }

    /// The path of `hash_part` some store has, if any answers in time.
    async fn find(&self, hash_part: &str) -> Option<Found> {
        match self.stores.find(hash_part, self.patience).await {
            Ok(found) => found,
            Err(error) => {
                tracing::warn!(%hash_part, %error, "cannot ask the dataspace's stores");
                None
            }
        }
    }

    /// The narinfo of `found`: its NAR uncompressed, signed with the cache's key.
    fn narinfo(&self, found: &Found) -> String {
        let info = &found.info.info;
        let path = &found.info.path;
        let url = format!(
            "nar/{}-{}.nar",
            path.hash_part(),
            info.nar_hash.to_nixbase32()
        );
        let mut narinfo = NarInfo::new(path.clone(), url, info.nar_hash.clone(), info.nar_size);
        narinfo.compression = Some("none".to_owned());
        narinfo.file_hash = Some(info.nar_hash.clone());
        narinfo.file_size = Some(info.nar_size);
        narinfo.references = info.references.clone();
        narinfo.deriver = info.deriver.clone();
        narinfo.sigs = info.sigs.clone();
        narinfo.ca = info
            .ca
            .as_deref()
            .and_then(|ca| ContentAddress::parse(ca).ok());
        if let Some(key) = &self.key {
            if let Err(error) = narinfo.sign(&self.store_dir, key) {
                tracing::warn!(path = %found.printed, %error, "cannot sign a narinfo");
            }
        }
        narinfo.to_text(&self.store_dir)
    }
}

/// Write a response head announcing `length` bytes of `content_type`.
async fn write_head(
    out: &mut BufWriter<&mut TcpStream>,
    status: &str,
    content_type: &str,
    length: u64,
) -> std::io::Result<()> {
    let head = response_head(status, content_type, Some(length), "");
    out.write_all(head.as_bytes()).await
}
