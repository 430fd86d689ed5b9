//! Streaming NAR parser.

use std::io::{self, Read};

use super::{lossy, padding, validate_entry_name, NarError, NarSummary, MAGIC};
use crate::hash::{HashAlgo, Hasher};

/// Receives the nodes of a NAR in order, as [`parse`] reads them.
///
/// `path` holds the entry names from the root down to the node (empty for
/// the root). Names are already validated, and a directory is always
/// reported before its entries.
pub trait NarVisitor {
    /// A directory; its entries follow.
    fn directory(&mut self, path: &[Vec<u8>]) -> Result<(), NarError>;
    /// A regular file of `size` bytes. `contents` yields them; whatever the
    /// visitor does not read is skipped (and still hashed).
    fn regular(
        &mut self,
        path: &[Vec<u8>],
        executable: bool,
        size: u64,
        contents: &mut dyn Read,
    ) -> Result<(), NarError>;
    /// A symbolic link.
    fn symlink(&mut self, path: &[Vec<u8>], target: &[u8]) -> Result<(), NarError>;
}

/// Bounds on what [`parse`] accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseLimits {
    /// Longest entry name (Linux allows 255).
    pub max_name_len: u64,
    /// Longest symlink target (Linux `PATH_MAX` is 4096 with the NUL).
    pub max_target_len: u64,
    /// Deepest directory nesting.
    pub max_depth: usize,
}

impl Default for ParseLimits {
    fn default() -> Self {
        ParseLimits {
            max_name_len: 255,
            max_target_len: 4095,
            max_depth: 1024,
        }
    }
}

/// A reader that hashes and counts what it reads and turns EOF into
/// [`NarError::Truncated`].
struct Source<R> {
    inner: R,
    hasher: Hasher,
    size: u64,
}

impl<R: Read> Source<R> {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), NarError> {
        match self.inner.read_exact(buf) {
            Ok(()) => {
                self.hasher.update(buf);
                self.size += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(NarError::Truncated),
            Err(e) => Err(NarError::io("reading NAR", e)),
        }
    }

    fn u64(&mut self) -> Result<u64, NarError> {
        let mut b = [0u8; 8];
        self.fill(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn pad(&mut self, len: u64) -> Result<(), NarError> {
        let mut b = [0u8; 8];
        let n = padding(len);
        self.fill(&mut b[..n])?;
        if b[..n].iter().any(|&x| x != 0) {
            return Err(NarError::NonZeroPadding);
        }
        Ok(())
    }

    /// Reads a string of at most `max` bytes.
    fn string(&mut self, what: &'static str, max: u64) -> Result<Vec<u8>, NarError> {
        let len = self.u64()?;
        if len > max {
            return Err(NarError::TooLong { what, len, max });
        }
        // `len <= max`, and every `max` we use fits in memory.
        let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
        self.fill(&mut buf)?;
        self.pad(len)?;
        Ok(buf)
    }

    /// Reads a token of at most 16 bytes (all NAR keywords are shorter).
    fn token(&mut self) -> Result<Vec<u8>, NarError> {
        let len = self.u64()?;
        if len > 16 {
            return Err(NarError::UnexpectedToken {
                expected: "a NAR keyword",
                found: format!("a string of {len} bytes"),
            });
        }
        let mut buf = vec![0u8; len as usize];
        self.fill(&mut buf)?;
        self.pad(len)?;
        Ok(buf)
    }

    fn expect(&mut self, expected: &'static str) -> Result<(), NarError> {
        let t = self.token()?;
        if t != expected.as_bytes() {
            return Err(NarError::UnexpectedToken {
                expected,
                found: lossy(&t),
            });
        }
        Ok(())
    }
}

/// The contents of one regular file, read through the hashing source.
struct Contents<'a, R> {
    src: &'a mut Source<R>,
    left: u64,
}

impl<R: Read> Read for Contents<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let n = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let got = self.src.inner.read(&mut buf[..n])?;
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "NAR ends inside file contents",
            ));
        }
        self.src.hasher.update(&buf[..got]);
        self.src.size += got as u64;
        self.left -= got as u64;
        Ok(got)
    }
}

/// Reads one NAR from `input`, reporting its nodes to `visitor`, and
/// returns its SHA-256 and size. Stops right after the NAR: bytes that
/// follow are left unread.
pub fn parse<R: Read>(
    input: R,
    visitor: &mut dyn NarVisitor,
    limits: ParseLimits,
) -> Result<NarSummary, NarError> {
    let mut src = Source {
        inner: input,
        hasher: Hasher::new(HashAlgo::Sha256),
        size: 0,
    };
    let magic = src.u64().map_err(|e| match e {
        NarError::Truncated => NarError::BadMagic,
        e => e,
    })?;
    if magic != MAGIC.len() as u64 {
        return Err(NarError::BadMagic);
    }
    let mut m = [0u8; 16];
    src.fill(&mut m[..MAGIC.len()]).map_err(|e| match e {
        NarError::Truncated => NarError::BadMagic,
        e => e,
    })?;
    if &m[..MAGIC.len()] != MAGIC {
        return Err(NarError::BadMagic);
    }
    src.pad(MAGIC.len() as u64)?;

    // Path of the current node, and the last entry name of each open
    // directory (parallel to `path` plus one for the innermost directory).
    let mut path: Vec<Vec<u8>> = Vec::new();
    let mut last_names: Vec<Option<Vec<u8>>> = Vec::new();
    'node: loop {
        src.expect("(")?;
        src.expect("type")?;
        let ty = src.token()?;
        match ty.as_slice() {
            b"regular" => {
                let mut t = src.token()?;
                let executable = t == b"executable";
                if executable {
                    src.expect("")?;
                    t = src.token()?;
                }
                if t != b"contents" {
                    return Err(NarError::UnexpectedToken {
                        expected: "contents",
                        found: lossy(&t),
                    });
                }
                let size = src.u64()?;
                let mut contents = Contents {
                    src: &mut src,
                    left: size,
                };
                let res = visitor.regular(&path, executable, size, &mut contents);
                // Skip what the visitor left, so hashing and framing stay right.
                let drained = io::copy(&mut contents, &mut io::sink());
                let left = contents.left;
                map_contents_eof(res)?;
                map_contents_eof(
                    drained
                        .map(drop)
                        .map_err(|e| NarError::io("reading NAR", e)),
                )?;
                if left != 0 {
                    return Err(NarError::Truncated);
                }
                src.pad(size)?;
                src.expect(")")?;
            }
            b"symlink" => {
                src.expect("target")?;
                let target = src.string("symlink target", limits.max_target_len)?;
                visitor.symlink(&path, &target)?;
                src.expect(")")?;
            }
            b"directory" => {
                if last_names.len() >= limits.max_depth {
                    return Err(NarError::TooDeep(limits.max_depth));
                }
                visitor.directory(&path)?;
                last_names.push(None);
            }
            other => return Err(NarError::UnknownNodeType(lossy(other))),
        }
        // A leaf is complete, or a directory was opened: read entries of
        // the innermost open directory until the next node starts.
        let mut node_complete = ty != b"directory";
        loop {
            if node_complete {
                if last_names.is_empty() {
                    break 'node;
                }
                if path.len() == last_names.len() {
                    // The completed node was an entry of the innermost dir.
                    src.expect(")")?;
                    path.pop();
                }
            }
            node_complete = false;
            let t = src.token()?;
            match t.as_slice() {
                b")" => {
                    last_names.pop();
                    node_complete = true;
                }
                b"entry" => {
                    src.expect("(")?;
                    src.expect("name")?;
                    let name = src.string("entry name", limits.max_name_len)?;
                    validate_entry_name(&name)?;
                    let Some(last) = last_names.last_mut() else {
                        return Err(NarError::UnexpectedToken {
                            expected: "entry",
                            found: "end of NAR".into(),
                        });
                    };
                    if let Some(prev) = last {
                        if prev.as_slice() >= name.as_slice() {
                            return Err(NarError::UnsortedEntries {
                                previous: lossy(prev),
                                name: lossy(&name),
                            });
                        }
                    }
                    *last = Some(name.clone());
                    src.expect("node")?;
                    path.push(name);
                    continue 'node;
                }
                _ => {
                    return Err(NarError::UnexpectedToken {
                        expected: "entry' or ')",
                        found: lossy(&t),
                    })
                }
            }
        }
    }
    Ok(NarSummary {
        sha256: src.hasher.finish(),
        size: src.size,
    })
}

/// Turns an unexpected EOF inside file contents into [`NarError::Truncated`].
fn map_contents_eof(r: Result<(), NarError>) -> Result<(), NarError> {
    match r {
        Err(NarError::Io { source, .. }) if source.kind() == io::ErrorKind::UnexpectedEof => {
            Err(NarError::Truncated)
        }
        other => other,
    }
}
