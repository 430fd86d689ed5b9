//! A NAR as a stream of dataspace messages: the sending side as an [`AsyncWrite`], the
//! receiving side as an [`AsyncRead`] that checks size and hash before it ends.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use nixspace_nix_formats::hash::{Hash, Hasher};
use nixspace_protocol::store::NarReply;
use syndicate::actor::{Account, Cap, FacetRef};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

/// Bytes per `<nar-chunk>` message.
pub const CHUNK: usize = 64 * 1024;

/// Writes a NAR as `<nar-chunk>` messages to `sink`, sent from `facet`.
pub struct NarSender {
    facet: FacetRef,
    account: Arc<Account>,
    sink: Arc<Cap>,
    buf: Vec<u8>,
}

impl NarSender {
    /// A sender to `sink`, sending from `facet`.
    pub fn new(facet: FacetRef, sink: Arc<Cap>) -> NarSender {
        NarSender {
            facet,
            account: Account::new(Some(syndicate::actor::AnyValue::symbol("nar-send")), None),
            sink,
            buf: Vec::with_capacity(CHUNK),
        }
    }

    /// Send one reply; false if the facet is gone (the request was withdrawn).
    fn send(&self, reply: &NarReply) -> bool {
        self.facet.activate(&self.account, None, |t| {
            self.sink.message(t, reply);
            Ok(())
        })
    }

    fn send_buffered(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        if self.send(&NarReply::Chunk { data }) {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the NAR request was withdrawn",
            ))
        }
    }

    /// Send what is buffered, then the end of the stream.
    pub fn finish(mut self) -> io::Result<()> {
        self.send_buffered()?;
        self.send(&NarReply::End);
        Ok(())
    }

    /// Tell the receiver the stream failed.
    pub fn fail(self, reason: String) {
        self.send(&NarReply::Error { reason });
    }
}

impl AsyncWrite for NarSender {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let room = CHUNK - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.send_buffered()?;
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Reads a NAR from the replies arriving on a channel. Ends (EOF) only after `<nar-end>`
/// and only if exactly `size` bytes hashing to `hash` arrived; any other ending is an error,
/// so whoever consumes the stream never sees a complete but wrong NAR.
pub struct NarReceiver {
    replies: mpsc::UnboundedReceiver<NarReply>,
    pending: Vec<u8>,
    offset: usize,
    hasher: Option<Hasher>,
    received: u64,
    expected: (Hash, u64),
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    ended: bool,
}

impl NarReceiver {
    /// A receiver expecting a NAR of `size` bytes hashing to `hash`, failing if no reply
    /// arrives for `idle`.
    pub fn new(
        replies: mpsc::UnboundedReceiver<NarReply>,
        hash: Hash,
        size: u64,
        idle: Duration,
    ) -> NarReceiver {
        NarReceiver {
            replies,
            pending: Vec::new(),
            offset: 0,
            hasher: Some(Hasher::new(hash.algo())),
            received: 0,
            expected: (hash, size),
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            ended: false,
        }
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    fn check_end(&mut self) -> io::Result<()> {
        let (hash, size) = &self.expected;
        if self.received != *size {
            return Err(invalid(format!(
                "NAR size mismatch: expected {size} bytes, got {}",
                self.received
            )));
        }
        let got = self
            .hasher
            .take()
            .map(Hasher::finish)
            .ok_or_else(|| invalid("NAR stream ended twice".to_owned()))?;
        if &got != hash {
            return Err(invalid(format!(
                "NAR hash mismatch: expected {}, got {}",
                hash.to_prefixed_nixbase32(),
                got.to_prefixed_nixbase32()
            )));
        }
        Ok(())
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

impl AsyncRead for NarReceiver {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.offset < this.pending.len() {
                let n = out.remaining().min(this.pending.len() - this.offset);
                out.put_slice(&this.pending[this.offset..this.offset + n]);
                this.offset += n;
                return Poll::Ready(Ok(()));
            }
            if this.ended {
                return Poll::Ready(Ok(()));
            }
            match this.replies.poll_recv(cx) {
                Poll::Ready(Some(NarReply::Chunk { data })) => {
                    this.received += data.len() as u64;
                    if this.received > this.expected.1 {
                        return Poll::Ready(Err(invalid(format!(
                            "NAR larger than the announced {} bytes",
                            this.expected.1
                        ))));
                    }
                    if let Some(h) = this.hasher.as_mut() {
                        h.update(&data);
                    }
                    this.pending = data;
                    this.offset = 0;
                    let deadline = tokio::time::Instant::now() + this.idle;
                    this.timer.as_mut().reset(deadline);
                }
                Poll::Ready(Some(NarReply::End)) => {
                    this.check_end()?;
                    this.ended = true;
                }
                Poll::Ready(Some(NarReply::Error { reason })) => {
                    return Poll::Ready(Err(io::Error::other(format!(
                        "the sending store failed: {reason}"
                    ))))
                }
                Poll::Ready(None) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the transfer was interrupted",
                    )))
                }
                Poll::Pending => {
                    return match this.timer.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("no NAR data for {:?}", this.idle),
                        ))),
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn receiver(nar: &[u8], replies: Vec<NarReply>) -> NarReceiver {
        let (tx, rx) = mpsc::unbounded_channel();
        for r in replies {
            tx.send(r).unwrap();
        }
        NarReceiver::new(
            rx,
            Hash::sha256(nar),
            nar.len() as u64,
            Duration::from_millis(200),
        )
    }

    fn chunk(data: &[u8]) -> NarReply {
        NarReply::Chunk {
            data: data.to_vec(),
        }
    }

    #[tokio::test]
    async fn a_whole_nar_reads_through() {
        let mut r = receiver(b"abcdef", vec![chunk(b"abc"), chunk(b"def"), NarReply::End]);
        let mut out = Vec::new();
        r.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"abcdef");
    }

    #[tokio::test]
    async fn a_corrupted_nar_never_ends_cleanly() {
        let mut r = receiver(b"abcdef", vec![chunk(b"abc"), chunk(b"deX"), NarReply::End]);
        let err = r.read_to_end(&mut Vec::new()).await.unwrap_err();
        assert!(err.to_string().contains("hash mismatch"), "{err}");
    }

    #[tokio::test]
    async fn short_long_failed_cut_and_silent_streams_are_errors() {
        let cases = [
            (vec![chunk(b"abc"), NarReply::End], "size mismatch"),
            (vec![chunk(b"abcdefg")], "larger"),
            (
                vec![NarReply::Error {
                    reason: "gone".into(),
                }],
                "gone",
            ),
        ];
        for (replies, expect) in cases {
            let err = receiver(b"abcdef", replies)
                .read_to_end(&mut Vec::new())
                .await
                .unwrap_err();
            assert!(err.to_string().contains(expect), "{err}");
        }
        // The sender vanished: the channel closed.
        let (tx, rx) = mpsc::unbounded_channel();
        drop(tx);
        let mut r = NarReceiver::new(rx, Hash::sha256(b""), 0, Duration::from_secs(5));
        let err = r.read_to_end(&mut Vec::new()).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        // The sender is silent.
        let (_tx, rx) = mpsc::unbounded_channel();
        let mut r = NarReceiver::new(rx, Hash::sha256(b""), 0, Duration::from_millis(50));
        let err = r.read_to_end(&mut Vec::new()).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
