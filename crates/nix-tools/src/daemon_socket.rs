//! Connecting to a Nix daemon's socket as Nix's own clients do. `nix-daemon` listens with a
//! backlog of 5: Nix's clients connect blocking, so the sixth concurrent one waits until the
//! daemon accepts; a non-blocking connect (tokio's) fails with `EAGAIN` instead. [`connect`]
//! tries again while the backlog is full.

use std::path::Path;
use std::time::Duration;

use tokio::net::UnixStream;

/// How long to wait before trying again while the daemon's backlog is full.
const BACKLOG_RETRY: Duration = Duration::from_millis(5);

/// A connection to the daemon socket at `path`, waiting while its listen backlog is full (as
/// a blocking connect waits); other errors are returned at once.
pub async fn connect(path: &Path) -> std::io::Result<UnixStream> {
    loop {
        match UnixStream::connect(path).await {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                tokio::time::sleep(BACKLOG_RETRY).await;
            }
            result => return result,
        }
    }
}
