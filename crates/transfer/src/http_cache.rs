//! The files of a binary cache served over HTTP(S): fetched with one client shared by every
//! cache (so connections are reused), at most [`MAX_REQUESTS`] at once per cache, each response
//! bounded in size and time, and "not found" answers remembered for
//! [`NEGATIVE_TTL`] (Nix's `narinfo-cache-negative-ttl`).

use std::collections::HashMap;
use std::io::{self, Read};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::{Client, StatusCode, Url};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::source::SourceError;

/// How long a cache's "not found" for a file is believed (Nix's default
/// `narinfo-cache-negative-ttl`).
pub const NEGATIVE_TTL: Duration = Duration::from_secs(3600);

/// The most "not found" answers remembered per cache (past it, the oldest half is forgotten).
const MAX_NEGATIVE: usize = 65_536;

/// The most requests in flight to one cache at once (NAR bodies included).
pub const MAX_REQUESTS: usize = 16;

/// How long connecting to a cache may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a small file (narinfo, realisation, `nix-cache-info`) may take in all.
const SMALL_FILE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a NAR's body may go without sending anything.
const BODY_IDLE: Duration = Duration::from_secs(60);

/// Chunks of a NAR body buffered between the download and its decompression.
const BODY_CHUNKS: usize = 4;

/// The client every HTTP cache shares.
pub fn client() -> Result<Client, reqwest::Error> {
    Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .user_agent(concat!("nixspace/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// One HTTP(S) binary cache's files.
#[derive(Debug, Clone)]
pub struct HttpFiles {
    base: Url,
    client: Client,
    requests: Arc<Semaphore>,
    /// Files found missing, with when that was learnt.
    missing: Arc<Mutex<HashMap<String, Instant>>>,
}

impl HttpFiles {
    /// The cache at `base` (its trailing slash optional), fetched with `client`.
    pub fn new(mut base: Url, client: Client) -> HttpFiles {
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        HttpFiles {
            base,
            client,
            requests: Arc::new(Semaphore::new(MAX_REQUESTS)),
            missing: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The cache's URL.
    pub fn base(&self) -> &Url {
        &self.base
    }

    /// The URL of the cache's file `name` (relative, checked by the caller).
    fn url(&self, name: &str) -> Result<Url, SourceError> {
        self.base
            .join(name)
            .map_err(|_| SourceError::UrlOutsideCache(name.to_owned()))
    }

    /// Whether `name` was found missing less than [`NEGATIVE_TTL`] ago.
    fn known_missing(&self, name: &str) -> bool {
        let Ok(mut missing) = self.missing.lock() else {
            return false;
        };
        match missing.get(name) {
            Some(when) if when.elapsed() < NEGATIVE_TTL => true,
            Some(_) => {
                missing.remove(name);
                false
            }
            None => false,
        }
    }

    /// Remember that `name` is missing.
    fn remember_missing(&self, name: &str) {
        let Ok(mut missing) = self.missing.lock() else {
            return;
        };
        if missing.len() >= MAX_NEGATIVE {
            let mut ages: Vec<Instant> = missing.values().copied().collect();
            ages.sort_unstable();
            let cut = ages[ages.len() / 2];
            missing.retain(|_, when| *when > cut);
        }
        missing.insert(name.to_owned(), Instant::now());
    }

    /// Send a GET for `name`, holding one of the cache's request permits: the response if it
    /// is there, `None` if the cache says it is not (404 or 403, remembered).
    async fn get(
        &self,
        name: &str,
    ) -> Result<Option<(reqwest::Response, OwnedSemaphorePermit)>, SourceError> {
        if self.known_missing(name) {
            return Ok(None);
        }
        let url = self.url(name)?;
        let permit = Arc::clone(&self.requests)
            .acquire_owned()
            .await
            .map_err(|_| SourceError::Http {
                url: url.to_string(),
                reason: "the cache is closed".to_owned(),
            })?;
        let response = self
            .client
            .get(url.clone())
            .send()
            .await
            .map_err(|e| http_error(&url, &e))?;
        match response.status() {
            StatusCode::OK => Ok(Some((response, permit))),
            StatusCode::NOT_FOUND | StatusCode::FORBIDDEN => {
                self.remember_missing(name);
                Ok(None)
            }
            status => Err(SourceError::Http {
                url: url.to_string(),
                reason: format!("answered {status}"),
            }),
        }
    }

    /// The whole file `name`, if the cache has it, refused past `limit` bytes.
    pub async fn read_small(&self, name: &str, limit: u64) -> Result<Option<Vec<u8>>, SourceError> {
        let url = self.url(name)?.to_string();
        let read = async {
            let Some((mut response, _permit)) = self.get(name).await? else {
                return Ok(None);
            };
            if response.content_length().is_some_and(|l| l > limit) {
                return Err(SourceError::TooLarge {
                    file: url.clone(),
                    limit,
                });
            }
            let mut bytes = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(|e| http_error(&url, &e))? {
                if (bytes.len() + chunk.len()) as u64 > limit {
                    return Err(SourceError::TooLarge {
                        file: url.clone(),
                        limit,
                    });
                }
                bytes.extend_from_slice(&chunk);
            }
            Ok(Some(bytes))
        };
        tokio::time::timeout(SMALL_FILE_TIMEOUT, read)
            .await
            .map_err(|_| SourceError::Http {
                url: url.clone(),
                reason: format!("no complete answer in {SMALL_FILE_TIMEOUT:?}"),
            })?
    }

    /// A blocking reader of the file `name`'s body, downloaded by a task of the current
    /// runtime: fails past `limit` bytes or when nothing arrives for a minute.
    pub async fn open(&self, name: &str, limit: u64) -> Result<BodyReader, SourceError> {
        let url = self.url(name)?.to_string();
        let Some((mut response, permit)) = self.get(name).await? else {
            return Err(SourceError::Http {
                url,
                reason: "not found".to_owned(),
            });
        };
        let (tx, rx) = mpsc::channel(BODY_CHUNKS);
        tokio::spawn(async move {
            let _permit = permit;
            let mut total = 0u64;
            loop {
                let item = match tokio::time::timeout(BODY_IDLE, response.chunk()).await {
                    Ok(Ok(Some(chunk))) => {
                        total += chunk.len() as u64;
                        if total > limit {
                            Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!("{url}: over {limit} bytes"),
                            ))
                        } else {
                            Ok(chunk)
                        }
                    }
                    Ok(Ok(None)) => return,
                    Ok(Err(e)) => Err(io::Error::other(format!("{url}: {e}"))),
                    Err(_) => Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("{url}: nothing received for {BODY_IDLE:?}"),
                    )),
                };
                let failed = item.is_err();
                // The reader gone (it failed or was dropped): stop downloading.
                if tx.send(item).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(BodyReader {
            chunks: rx,
            current: Bytes::new(),
        })
    }
}

/// `error` fetching `url`, as a [`SourceError`].
fn http_error(url: &impl std::fmt::Display, error: &reqwest::Error) -> SourceError {
    SourceError::Http {
        url: url.to_string(),
        reason: error.to_string(),
    }
}

/// Reads a body a download task hands over in chunks; for blocking threads only. Ends
/// (EOF) only when the download ended well: a failed one ends in its error.
pub struct BodyReader {
    chunks: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.chunks.blocking_recv() {
                Some(chunk) => self.current = chunk?,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server answering `GET /NAME` with the body `files` gives NAME, else 404, one request
    /// per connection; its URL and how many requests it got.
    async fn server(files: Vec<(&'static str, Vec<u8>)>) -> (Url, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = Url::parse(&format!("http://{}/", listener.local_addr().unwrap())).unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&count);
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, Ordering::SeqCst);
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = stream.read(&mut buf).await.unwrap();
                    head.extend_from_slice(&buf[..n]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let path = head.split_whitespace().nth(1).unwrap().to_owned();
                let body = files.iter().find(|(n, _)| format!("/{n}") == path);
                let response = match body {
                    Some((_, body)) => {
                        let mut r = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        )
                        .into_bytes();
                        r.extend_from_slice(body);
                        r
                    }
                    None => {
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .to_vec()
                    }
                };
                stream.write_all(&response).await.unwrap();
                stream.shutdown().await.unwrap();
            }
        });
        (url, count)
    }

    #[tokio::test]
    async fn responses_are_bounded_and_404s_asked_once() {
        let (url, count) = server(vec![
            ("small", b"12345".to_vec()),
            ("large", vec![b'x'; 1000]),
        ])
        .await;
        let files = HttpFiles::new(url, client().unwrap());
        // Within the bound: read, and read again from the server every time.
        for asked in 1..=2 {
            assert_eq!(
                files.read_small("small", 5).await.unwrap(),
                Some(b"12345".to_vec())
            );
            assert_eq!(count.load(Ordering::SeqCst), asked);
        }
        // Past it: refused, whole or streamed.
        assert!(matches!(
            files.read_small("large", 999).await,
            Err(SourceError::TooLarge { limit: 999, .. })
        ));
        let mut body = Vec::new();
        let mut reader = files.open("large", 999).await.unwrap();
        let read = tokio::task::spawn_blocking(move || reader.read_to_end(&mut body))
            .await
            .unwrap();
        assert_eq!(read.unwrap_err().kind(), io::ErrorKind::InvalidData);
        let mut whole = Vec::new();
        let mut reader = files.open("large", 1000).await.unwrap();
        let read =
            tokio::task::spawn_blocking(move || reader.read_to_end(&mut whole).map(|_| whole))
                .await
                .unwrap();
        assert_eq!(read.unwrap().len(), 1000);
        // A missing file is asked for once, then remembered.
        let before = count.load(Ordering::SeqCst);
        assert_eq!(files.read_small("missing", 5).await.unwrap(), None);
        assert_eq!(files.read_small("missing", 5).await.unwrap(), None);
        assert_eq!(count.load(Ordering::SeqCst), before + 1);
    }

    #[test]
    fn missing_files_are_remembered_within_the_bound() {
        let files = HttpFiles::new(
            Url::parse("http://127.0.0.1:1/cache").unwrap(),
            client().unwrap(),
        );
        assert_eq!(files.base().as_str(), "http://127.0.0.1:1/cache/");
        assert_eq!(
            files.url("nar/x.nar").unwrap().as_str(),
            "http://127.0.0.1:1/cache/nar/x.nar"
        );
        assert!(!files.known_missing("a.narinfo"));
        files.remember_missing("a.narinfo");
        assert!(files.known_missing("a.narinfo"));
        for i in 0..MAX_NEGATIVE + 10 {
            files.remember_missing(&format!("{i}.narinfo"));
        }
        let remembered = files.missing.lock().unwrap().len();
        assert!(remembered <= MAX_NEGATIVE, "{remembered}");
        assert!(files.known_missing(&format!("{}.narinfo", MAX_NEGATIVE + 9)));
    }
}
