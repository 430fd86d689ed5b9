//! Copies one NAR from a connection to a sink, finding its end by following the NAR grammar.
//!
//! `NarFromPath` sends the NAR after `STDERR_LAST` without a length or framing, so the only
//! way to know where it ends is to parse it. This module tracks the structure just enough for
//! that: tokens are byte strings, `(` and `)` nest, and the strings after `contents`,
//! `target`, `name`, `type` and `executable` are values (file contents are streamed, never
//! buffered). It re-emits every byte it reads, so the output is the NAR exactly as sent. It
//! does not validate entry order, names or node types: `nixspace-nix-formats` owns that.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::wire::{padding_len, NixReader, NixWriter, WireError};

/// The longest non-contents token accepted (names are ≤ 255 bytes, symlink targets ≤ 4096).
const MAX_TOKEN: u64 = 64 * 1024;

/// Why copying a NAR failed.
#[derive(Debug, thiserror::Error)]
pub enum NarCopyError {
    /// Reading from the connection failed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// Writing to the sink failed.
    #[error("writing the NAR to the sink failed")]
    Sink(#[source] std::io::Error),
    /// The bytes are not a NAR.
    #[error("malformed NAR: {0}")]
    Malformed(&'static str),
}

struct Copier<'a, R, O: ?Sized> {
    r: &'a mut NixReader<R>,
    out: &'a mut O,
    written: u64,
}

impl<R: AsyncRead + Unpin, O: AsyncWrite + Unpin + ?Sized> Copier<'_, R, O> {
    async fn emit(&mut self, bytes: &[u8]) -> Result<(), NarCopyError> {
        self.out
            .write_all(bytes)
            .await
            .map_err(NarCopyError::Sink)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    async fn token(&mut self) -> Result<Vec<u8>, NarCopyError> {
        let tok = self.r.read_bytes_limited("NAR token", MAX_TOKEN).await?;
        self.emit(&(tok.len() as u64).to_le_bytes()).await?;
        self.emit(&tok).await?;
        self.emit(&[0u8; 8][..padding_len(tok.len() as u64)])
            .await?;
        Ok(tok)
    }

    async fn contents(&mut self) -> Result<(), NarCopyError> {
        let len = self.r.read_u64("NAR contents length").await?;
        self.emit(&len.to_le_bytes()).await?;
        let mut buf = vec![0u8; (len.min(64 * 1024)) as usize];
        let mut remaining = len;
        while remaining > 0 {
            let want = remaining.min(buf.len() as u64) as usize;
            let n = self
                .r
                .buffered()
                .read(&mut buf[..want])
                .await
                .map_err(|e| WireError::io("NAR contents", e))?;
            if n == 0 {
                return Err(WireError::UnexpectedEof {
                    what: "NAR contents",
                }
                .into());
            }
            self.emit(&buf[..n]).await?;
            remaining -= n as u64;
        }
        self.r.read_padding(len, "NAR contents").await?;
        self.emit(&[0u8; 8][..padding_len(len)]).await
    }

    async fn expect(&mut self, want: &[u8], what: &'static str) -> Result<(), NarCopyError> {
        if self.token().await? == want {
            Ok(())
        } else {
            Err(NarCopyError::Malformed(what))
        }
    }
}

/// Copies one NAR from `r` to `out`; returns the number of bytes copied.
pub async fn copy_nar<R, O>(r: &mut NixReader<R>, out: &mut O) -> Result<u64, NarCopyError>
where
    R: AsyncRead + Unpin,
    O: AsyncWrite + Unpin + ?Sized,
{
    let mut c = Copier { r, out, written: 0 };
    c.expect(b"nix-archive-1", "missing magic").await?;
    c.expect(b"(", "expected '(' after the magic").await?;
    let mut depth = 1u64;
    while depth > 0 {
        let tok = c.token().await?;
        match tok.as_slice() {
            b"(" => depth += 1,
            b")" => depth -= 1,
            b"contents" => c.contents().await?,
            b"target" | b"name" | b"type" | b"executable" => {
                c.token().await?;
            }
            b"entry" | b"node" => {}
            _ => return Err(NarCopyError::Malformed("unknown token")),
        }
    }
    c.out.flush().await.map_err(NarCopyError::Sink)?;
    Ok(c.written)
}

/// Relays one NAR from `r` to the writer `w` (a proxy's other connection) without buffering
/// it whole; returns the number of bytes copied. The writer is flushed.
pub async fn relay_nar<R, W>(
    r: &mut NixReader<R>,
    w: &mut NixWriter<W>,
) -> Result<u64, NarCopyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    copy_nar(r, w.buffered()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::NIX_2_8;

    async fn nar(tokens: &[&[u8]]) -> Vec<u8> {
        let mut w = NixWriter::new(Vec::new(), NIX_2_8);
        for t in tokens {
            w.write_bytes(t, "t").await.unwrap();
        }
        w.flush().await.unwrap();
        w.into_inner()
    }

    #[tokio::test]
    async fn copies_exactly_one_nar() {
        let mut bytes = nar(&[
            b"nix-archive-1",
            b"(",
            b"type",
            b"directory",
            b"entry",
            b"(",
            b"name",
            b"(",
            b"node",
            b"(",
            b"type",
            b"regular",
            b"contents",
            b")(",
            b")",
            b")",
            b")",
        ])
        .await;
        let nar_len = bytes.len();
        bytes.extend_from_slice(&7u64.to_le_bytes());
        let mut r = NixReader::new(std::io::Cursor::new(bytes.clone()), NIX_2_8);
        let mut out = Vec::new();
        assert_eq!(copy_nar(&mut r, &mut out).await.unwrap(), nar_len as u64);
        assert_eq!(out, bytes[..nar_len]);
        assert_eq!(r.read_u64("after").await.unwrap(), 7);
    }

    #[tokio::test]
    async fn rejects_garbage() {
        let bytes = nar(&[b"nix-archive-1", b"(", b"bogus"]).await;
        let mut r = NixReader::new(std::io::Cursor::new(bytes), NIX_2_8);
        assert!(matches!(
            copy_nar(&mut r, &mut Vec::new()).await,
            Err(NarCopyError::Malformed(_))
        ));
        let bytes = nar(&[b"not-a-nar"]).await;
        let mut r = NixReader::new(std::io::Cursor::new(bytes), NIX_2_8);
        assert!(copy_nar(&mut r, &mut Vec::new()).await.is_err());
    }
}
