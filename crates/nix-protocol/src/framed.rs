//! Framed streams: data sent as length-prefixed chunks and terminated by an empty chunk.
//! `AddToStoreNar` (from 1.23) and `AddMultipleToStore` send their payload this way, so the
//! receiver knows where it ends without parsing it.
//!
//! Each chunk is a u64 length followed by that many raw bytes, *without* padding; a chunk of
//! length 0 ends the stream. [`FramedSource`] reads such a stream as an `AsyncRead`,
//! [`FramedSink`] writes one as an `AsyncWrite`, and [`write_framed`] copies any reader into
//! one. All three stream: memory use is bounded by one chunk, never by the payload.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter, ReadBuf,
};

use crate::wire::{NixReader, NixWriter, WireError};

/// The chunk size [`FramedSink`] and [`write_framed`] use.
pub const CHUNK_SIZE: usize = 32 * 1024;

#[derive(Debug)]
enum SourceState {
    Header { buf: [u8; 8], filled: usize },
    Data { remaining: u64 },
    Done,
}

/// Reads a framed stream from a connection as a plain `AsyncRead`; end of file is the
/// terminating empty chunk. A stream that ends before that is an `UnexpectedEof` error.
#[derive(Debug)]
pub struct FramedSource<'a, R> {
    inner: &'a mut BufReader<R>,
    state: SourceState,
}

impl<'a, R: AsyncRead + Unpin> FramedSource<'a, R> {
    /// Starts reading a framed stream at the reader's current position.
    pub fn new(reader: &'a mut NixReader<R>) -> Self {
        Self {
            inner: reader.buffered(),
            state: SourceState::Header {
                buf: [0; 8],
                filled: 0,
            },
        }
    }

    /// Whether the terminating chunk has been read.
    pub fn is_done(&self) -> bool {
        matches!(self.state, SourceState::Done)
    }

    /// Reads and discards the rest of the stream, so the connection stays in step when the
    /// consumer stops early. Returns the number of bytes discarded.
    pub async fn drain(&mut self) -> io::Result<u64> {
        tokio::io::copy(self, &mut tokio::io::sink()).await
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for FramedSource<'_, R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                SourceState::Done => return Poll::Ready(Ok(())),
                SourceState::Header { buf, filled } => {
                    let mut rb = ReadBuf::new(&mut buf[*filled..]);
                    ready!(Pin::new(&mut *this.inner).poll_read(cx, &mut rb))?;
                    let n = rb.filled().len();
                    if n == 0 {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "framed stream ended before its terminating chunk",
                        )));
                    }
                    *filled += n;
                    if *filled == 8 {
                        let len = u64::from_le_bytes(*buf);
                        this.state = if len == 0 {
                            SourceState::Done
                        } else {
                            SourceState::Data { remaining: len }
                        };
                    }
                }
                SourceState::Data { remaining } => {
                    if out.remaining() == 0 {
                        return Poll::Ready(Ok(()));
                    }
                    let want = (*remaining).min(out.remaining() as u64) as usize;
                    let dst = out.initialize_unfilled_to(want);
                    let mut rb = ReadBuf::new(dst);
                    ready!(Pin::new(&mut *this.inner).poll_read(cx, &mut rb))?;
                    let n = rb.filled().len();
                    if n == 0 {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "framed stream ended inside a chunk",
                        )));
                    }
                    out.advance(n);
                    *remaining -= n as u64;
                    if *remaining == 0 {
                        this.state = SourceState::Header {
                            buf: [0; 8],
                            filled: 0,
                        };
                    }
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

/// Writes a framed stream into a connection as a plain `AsyncWrite`. Data is cut into chunks
/// of at most [`CHUNK_SIZE`]; `flush` emits the pending partial chunk. Call
/// [`FramedSink::finish`] to write the terminating empty chunk; dropping the sink without it
/// leaves the stream unterminated.
#[derive(Debug)]
pub struct FramedSink<'a, W: AsyncWrite> {
    inner: &'a mut BufWriter<W>,
    buf: Vec<u8>,
    pending: Vec<u8>,
    pending_off: usize,
}

impl<'a, W: AsyncWrite + Unpin> FramedSink<'a, W> {
    /// Starts a framed stream at the writer's current position.
    pub fn new(writer: &'a mut NixWriter<W>) -> Self {
        Self {
            inner: writer.buffered(),
            buf: Vec::with_capacity(CHUNK_SIZE),
            pending: Vec::new(),
            pending_off: 0,
        }
    }

    fn poll_drain_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.pending_off < self.pending.len() {
            let n = ready!(
                Pin::new(&mut *self.inner).poll_write(cx, &self.pending[self.pending_off..])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending_off += n;
        }
        self.pending.clear();
        self.pending_off = 0;
        Poll::Ready(Ok(()))
    }

    /// Moves the buffered data into `pending` as one chunk. Only call with `pending` empty.
    fn emit_chunk(&mut self) {
        if !self.buf.is_empty() {
            self.pending
                .extend_from_slice(&(self.buf.len() as u64).to_le_bytes());
            self.pending.append(&mut self.buf);
        }
    }

    /// Emits the last partial chunk and the terminating empty chunk, and flushes.
    pub async fn finish(mut self) -> io::Result<()> {
        self.flush().await?;
        self.inner.write_all(&0u64.to_le_bytes()).await?;
        self.inner.flush().await
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for FramedSink<'_, W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_drain_pending(cx))?;
        if this.buf.len() >= CHUNK_SIZE {
            this.emit_chunk();
            ready!(this.poll_drain_pending(cx))?;
        }
        let n = (CHUNK_SIZE - this.buf.len()).min(data.len());
        this.buf.extend_from_slice(&data[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain_pending(cx))?;
        this.emit_chunk();
        ready!(this.poll_drain_pending(cx))?;
        Pin::new(&mut *this.inner).poll_flush(cx)
    }

    /// Flushes; does not terminate the stream or shut the connection down.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_flush(cx)
    }
}

/// Why [`write_framed`] failed.
#[derive(Debug, thiserror::Error)]
pub enum FramedError {
    /// Reading the source failed.
    #[error("reading the data to send failed")]
    Source(#[source] io::Error),
    /// Writing to the connection failed.
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// Copies `source` into `w` as a framed stream, terminates it and flushes. Returns the number
/// of payload bytes.
pub async fn write_framed<W, S>(w: &mut NixWriter<W>, source: &mut S) -> Result<u64, FramedError>
where
    W: AsyncWrite + Unpin,
    S: AsyncRead + Unpin + ?Sized,
{
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut total = 0u64;
    loop {
        let n = source.read(&mut buf).await.map_err(FramedError::Source)?;
        if n == 0 {
            break;
        }
        w.write_u64(n as u64, "frame length").await?;
        w.write_raw(&buf[..n], "frame data").await?;
        total += n as u64;
    }
    w.write_u64(0, "frame terminator").await?;
    w.flush().await?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::NIX_2_8;

    #[tokio::test]
    async fn sink_and_source_round_trip_large_data() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut w = NixWriter::new(Vec::new(), NIX_2_8);
        let mut sink = FramedSink::new(&mut w);
        sink.write_all(&data[..1000]).await.unwrap();
        sink.flush().await.unwrap();
        sink.write_all(&data[1000..]).await.unwrap();
        sink.finish().await.unwrap();
        w.write_u64(42, "trailer").await.unwrap();
        w.flush().await.unwrap();
        let bytes = w.into_inner();
        let mut r = NixReader::new(io::Cursor::new(bytes), NIX_2_8);
        let mut got = Vec::new();
        let mut src = FramedSource::new(&mut r);
        src.read_to_end(&mut got).await.unwrap();
        assert!(src.is_done());
        assert_eq!(got, data);
        assert_eq!(r.read_u64("trailer").await.unwrap(), 42);
    }

    #[tokio::test]
    async fn write_framed_matches_layout() {
        let mut w = NixWriter::new(Vec::new(), NIX_2_8);
        let n = write_framed(&mut w, &mut &b"abc"[..]).await.unwrap();
        assert_eq!(n, 3);
        let bytes = w.into_inner();
        assert_eq!(bytes, b"\x03\0\0\0\0\0\0\0abc\0\0\0\0\0\0\0\0");
    }

    #[tokio::test]
    async fn truncated_stream_is_an_error() {
        let mut bytes = 10u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"abc");
        let mut r = NixReader::new(io::Cursor::new(bytes), NIX_2_8);
        let mut got = Vec::new();
        let err = FramedSource::new(&mut r)
            .read_to_end(&mut got)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        // A missing terminator is an error too.
        let mut bytes = 3u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"abc");
        let mut r = NixReader::new(io::Cursor::new(bytes), NIX_2_8);
        assert!(FramedSource::new(&mut r).drain().await.is_err());
    }
}
