//! Reading the head of one HTTP/1.1 request, within a size and a time limit, and writing the
//! head of the response, for nixspace's small HTTP endpoints (metrics, binary cache, web
//! view): one request per connection.

use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The largest request head accepted.
const MAX_REQUEST: usize = 8 * 1024;

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A request's method, path (both empty if its first line has none) and headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `HEAD`, …
    pub method: String,
    /// The path asked for, as sent.
    pub path: String,
    /// The header fields, names in lower case, values trimmed, in the order sent.
    pub headers: Vec<(String, String)>,
}

impl Request {
    /// The value of the first header field named `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Read the head of the request on `stream` (up to its blank line), within the limits.
pub async fn read_request(stream: &mut TcpStream) -> std::io::Result<Request> {
    let head = tokio::time::timeout(REQUEST_TIMEOUT, read_head(stream))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request too slow"))??;
    let mut lines = head.lines();
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split_whitespace();
    let headers = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Request {
        method: parts.next().unwrap_or_default().to_owned(),
        path: parts.next().unwrap_or_default().to_owned(),
        headers,
    })
}

/// The head of a response to the one request of a connection, closed after it: `status`
/// (`200 OK`, …), `content_type`, the body's `length` when it is known (none for a stream
/// that ends with the connection) and `extra` header lines (each ending in `\r\n`).
pub fn response_head(status: &str, content_type: &str, length: Option<u64>, extra: &str) -> String {
    let length = length.map_or(String::new(), |l| format!("Content-Length: {l}\r\n"));
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n{length}{extra}Connection: close\r\n\r\n"
    )
}

/// Read up to the blank line that ends an HTTP request head.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_REQUEST {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}
