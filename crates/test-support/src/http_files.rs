//! A small HTTP server serving the files of a directory (a binary cache `nix copy` wrote),
//! one thread per connection, one request per connection: `GET` and `HEAD`, 404 for what is
//! not there. It records the paths asked for, so a test can tell that a cache was read.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A running file server; it stops with the test process.
pub struct FileServer {
    addr: String,
    requests: Arc<Mutex<Vec<String>>>,
}

impl FileServer {
    /// Serve the files under `dir` on a free port of 127.0.0.1.
    pub fn start(dir: &Path) -> FileServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (dir, log) = (dir.to_owned(), Arc::clone(&requests));
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (dir, log) = (dir.clone(), Arc::clone(&log));
                std::thread::spawn(move || answer(stream, &dir, &log));
            }
        });
        FileServer { addr, requests }
    }

    /// The server's URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The paths asked for so far, in order.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

/// Answer one request on `stream` from `dir`.
fn answer(mut stream: TcpStream, dir: &Path, log: &Mutex<Vec<String>>) {
    let mut line = String::new();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    if reader.read_line(&mut line).is_err() {
        return;
    }
    // Skip the rest of the head.
    loop {
        let mut header = String::new();
        match reader.read_line(&mut header) {
            Ok(n) if n > 2 => {}
            _ => break,
        }
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    log.lock().unwrap().push(path.to_owned());
    let file: Option<PathBuf> = path
        .strip_prefix('/')
        .filter(|p| !p.split('/').any(|c| c == ".." || c.is_empty()))
        .map(|p| dir.join(p));
    let _ = match file.and_then(|f| std::fs::read(f).ok()) {
        Some(body) => {
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            stream
                .write_all(head.as_bytes())
                .and_then(|()| match method {
                    "HEAD" => Ok(()),
                    _ => stream.write_all(&body),
                })
        }
        None => stream
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
    };
}
