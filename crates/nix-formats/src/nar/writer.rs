//! Streaming NAR writer.

use std::io::{self, Read, Write};

use super::{padding, validate_entry_name, NarError, NarSummary, MAGIC};
use crate::hash::{HashAlgo, Hasher};

/// A [`Write`] that hashes and counts what passes through.
struct Counting<W> {
    inner: W,
    hasher: Hasher,
    size: u64,
}

impl<W: Write> Counting<W> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), NarError> {
        self.inner
            .write_all(bytes)
            .map_err(|e| NarError::io("writing NAR", e))?;
        self.hasher.update(bytes);
        self.size += bytes.len() as u64;
        Ok(())
    }

    fn str(&mut self, s: &[u8]) -> Result<(), NarError> {
        self.put(&(s.len() as u64).to_le_bytes())?;
        self.put(s)?;
        self.put(&[0u8; 8][..padding(s.len() as u64)])
    }
}

/// Writes a NAR from a sequence of calls describing the tree in order.
///
/// Start with [`NarWriter::new`], describe exactly one root node with
/// [`regular`](NarWriter::regular), [`symlink`](NarWriter::symlink) or
/// [`start_directory`](NarWriter::start_directory); inside a directory,
/// call [`entry`](NarWriter::entry) with strictly increasing names, each
/// followed by one node, then [`end_directory`](NarWriter::end_directory).
/// [`finish`](NarWriter::finish) returns the writer with the NAR's SHA-256
/// and size.
pub struct NarWriter<W> {
    out: Counting<W>,
    /// Last entry name of each open directory.
    dirs: Vec<Option<Vec<u8>>>,
    /// Whether the next call must describe a node.
    expect_node: bool,
    /// Whether the root node is complete.
    done: bool,
}

impl<W: Write> NarWriter<W> {
    /// Starts a NAR, writing the magic.
    pub fn new(inner: W) -> Result<NarWriter<W>, NarError> {
        let mut out = Counting {
            inner,
            hasher: Hasher::new(HashAlgo::Sha256),
            size: 0,
        };
        out.str(MAGIC)?;
        Ok(NarWriter {
            out,
            dirs: Vec::new(),
            expect_node: true,
            done: false,
        })
    }

    fn begin_node(&mut self, ty: &[u8]) -> Result<(), NarError> {
        if !self.expect_node || self.done {
            return Err(NarError::WriterState("a node is not expected here"));
        }
        self.expect_node = false;
        self.out.str(b"(")?;
        self.out.str(b"type")?;
        self.out.str(ty)
    }

    /// Closes a node, and the directory entry holding it if any.
    fn end_node(&mut self) -> Result<(), NarError> {
        self.out.str(b")")?;
        if self.dirs.is_empty() {
            self.done = true;
            Ok(())
        } else {
            self.out.str(b")")
        }
    }

    /// A regular file of `size` bytes read from `contents`, which must
    /// yield exactly that many bytes.
    pub fn regular(
        &mut self,
        executable: bool,
        size: u64,
        contents: &mut impl Read,
    ) -> Result<(), NarError> {
        self.begin_node(b"regular")?;
        if executable {
            self.out.str(b"executable")?;
            self.out.str(b"")?;
        }
        self.out.str(b"contents")?;
        self.out.put(&size.to_le_bytes())?;
        let mut left = size;
        let mut buf = vec![0u8; 64 * 1024];
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = match contents.read(&mut buf[..want]) {
                Ok(0) => {
                    return Err(NarError::ContentsLength {
                        declared: size,
                        actual: size - left,
                    })
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(NarError::io("reading file contents", e)),
            };
            self.out.put(&buf[..n])?;
            left -= n as u64;
        }
        let mut probe = [0u8; 1];
        loop {
            match contents.read(&mut probe) {
                Ok(0) => break,
                Ok(_) => {
                    return Err(NarError::ContentsLength {
                        declared: size,
                        actual: size + 1,
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(NarError::io("reading file contents", e)),
            }
        }
        self.out.put(&[0u8; 8][..padding(size)])?;
        self.end_node()
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, target: &[u8]) -> Result<(), NarError> {
        self.begin_node(b"symlink")?;
        self.out.str(b"target")?;
        self.out.str(target)?;
        self.end_node()
    }

    /// Opens a directory node.
    pub fn start_directory(&mut self) -> Result<(), NarError> {
        self.begin_node(b"directory")?;
        self.dirs.push(None);
        Ok(())
    }

    /// Starts an entry of the innermost open directory; the next call must
    /// describe its node. Names must be valid and strictly increasing.
    pub fn entry(&mut self, name: &[u8]) -> Result<(), NarError> {
        if self.expect_node {
            return Err(NarError::WriterState("an entry needs a node first"));
        }
        let Some(last) = self.dirs.last_mut() else {
            return Err(NarError::WriterState("an entry outside a directory"));
        };
        validate_entry_name(name)?;
        if let Some(prev) = last {
            if prev.as_slice() >= name {
                return Err(NarError::UnsortedEntries {
                    previous: super::lossy(prev),
                    name: super::lossy(name),
                });
            }
        }
        *last = Some(name.to_vec());
        self.out.str(b"entry")?;
        self.out.str(b"(")?;
        self.out.str(b"name")?;
        self.out.str(name)?;
        self.out.str(b"node")?;
        self.expect_node = true;
        Ok(())
    }

    /// Closes the innermost open directory.
    pub fn end_directory(&mut self) -> Result<(), NarError> {
        if self.expect_node {
            return Err(NarError::WriterState("an entry needs a node first"));
        }
        if self.dirs.pop().is_none() {
            return Err(NarError::WriterState("no open directory"));
        }
        self.end_node()
    }

    /// Ends the NAR, returning the inner writer, the SHA-256 and the size.
    pub fn finish(mut self) -> Result<(W, NarSummary), NarError> {
        if !self.done {
            return Err(NarError::WriterState("the root node is incomplete"));
        }
        self.out
            .inner
            .flush()
            .map_err(|e| NarError::io("flushing NAR", e))?;
        let summary = NarSummary {
            sha256: self.out.hasher.finish(),
            size: self.out.size,
        };
        Ok((self.out.inner, summary))
    }
}
