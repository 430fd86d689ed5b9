//! A joining client's writer that takes a peer gone as the end of the session, not as an
//! error.
//!
//! When the dataspace's host closes a connection (it shuts down, or ends a process that
//! hosted it and joined it too), the client's relay may still have a packet to write: the
//! write fails with a broken pipe or a reset connection, and the relay would log that as an
//! error although nothing went wrong. [`PeerGoneWriter`] discards what is written after
//! that; the relay ends when its reading side sees the connection closed, as it does when
//! the host goes away between two writes.

use std::io::{ErrorKind, Result};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;

/// Wraps a connection's writing half (see the module docs).
pub struct PeerGoneWriter<W> {
    inner: W,
    /// Set once a write found the peer gone: everything after is discarded.
    gone: bool,
}

impl<W> PeerGoneWriter<W> {
    /// Wrap `inner`.
    pub fn new(inner: W) -> Self {
        PeerGoneWriter { inner, gone: false }
    }
}

/// Whether `kind` says the other end of the connection has gone.
fn peer_gone(kind: ErrorKind) -> bool {
    matches!(kind, ErrorKind::BrokenPipe | ErrorKind::ConnectionReset)
}

impl<W: AsyncWrite + Unpin> PeerGoneWriter<W> {
    /// The outcome of an operation on the inner writer, with a peer gone taken as `done`.
    fn settle<T>(&mut self, polled: Poll<Result<T>>, done: T) -> Poll<Result<T>> {
        match polled {
            Poll::Ready(Err(e)) if peer_gone(e.kind()) => {
                tracing::debug!(error = %e, "the dataspace's end of the connection is gone");
                self.gone = true;
                Poll::Ready(Ok(done))
            }
            other => other,
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for PeerGoneWriter<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<Result<usize>> {
        if self.gone {
            return Poll::Ready(Ok(buf.len()));
        }
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.settle(polled, buf.len())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        if self.gone {
            return Poll::Ready(Ok(()));
        }
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.settle(polled, ())
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        if self.gone {
            return Poll::Ready(Ok(()));
        }
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.settle(polled, ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn writes_after_the_peer_closed_are_discarded_and_other_errors_still_fail() {
        let (ours, theirs) = tokio::net::UnixStream::pair().expect("socket pair");
        let (_read, write) = ours.into_split();
        drop(theirs);
        // Without the wrapper the write fails (the positive control).
        let (ours2, theirs2) = tokio::net::UnixStream::pair().expect("socket pair");
        let (_read2, mut bare) = ours2.into_split();
        drop(theirs2);
        let failed = bare.write_all(b"packet").await.expect_err("a broken pipe");
        assert_eq!(failed.kind(), ErrorKind::BrokenPipe);
        let mut wrapped = PeerGoneWriter::new(write);
        for _ in 0..3 {
            wrapped.write_all(b"packet").await.expect("discarded");
        }
        wrapped.flush().await.expect("flushed");
        assert!(wrapped.gone);
        // Anything else is still an error.
        assert!(!peer_gone(ErrorKind::PermissionDenied));
    }
}
