//! Connecting to a Nix daemon's socket as Nix's own clients do. `nix-daemon` listens with a
//! backlog of 5: Nix's clients connect blocking, so the sixth concurrent one waits until the
//! daemon accepts; a non-blocking connect (tokio's) fails with `EAGAIN` instead. [`connect`]
//! tries again while the backlog is full, and while the connection is refused (a daemon that
//! has just bound its socket may not be listening yet), for a bounded time.

use std::path::Path;
use std::time::{Duration, Instant};

use tokio::net::UnixStream;

/// How long to wait before trying again.
const RETRY_AFTER: Duration = Duration::from_millis(5);

/// How long a connection is tried again while the daemon refuses it or has no room for it.
const PATIENCE: Duration = Duration::from_secs(10);

/// A connection to the daemon socket at `path`, waiting while its listen backlog is full (as
/// a blocking connect waits) or it refuses connections, for up to 10 s; other errors are
/// returned at once.
pub async fn connect(path: &Path) -> std::io::Result<UnixStream> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match UnixStream::connect(path).await {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                tokio::time::sleep(RETRY_AFTER).await;
            }
            result => return result,
        }
    }
}
