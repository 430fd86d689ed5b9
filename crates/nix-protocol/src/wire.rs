//! The primitive wire encodings and the [`NixReader`]/[`NixWriter`] wrappers that carry a
//! connection's negotiated version and size limits.
//!
//! Encodings (all little-endian):
//! - integers: one u64;
//! - booleans: a u64 that must be 0 or 1 when read;
//! - byte strings: a u64 length, the bytes, then zero bytes up to a multiple of 8 (non-zero
//!   padding is an error when read);
//! - lists and sets: a u64 count, then the elements; maps: a u64 count, then key/value pairs.
//!
//! Every length or count read from the wire is checked against [`Limits`] *before* anything is
//! allocated, and byte strings are read incrementally, so a hostile length prefix costs nothing.
//! [`NixReader::try_read_u64`] tells a clean end of stream at an operation boundary ("the
//! client left") apart from a truncated message.
//!
//! Store paths are the one kind of string this layer interprets: on the wire they are full
//! paths, so each reader and writer also carries the connection's [`StoreDir`] (default
//! `/nix/store`, see [`NixReader::with_store_dir`]). [`NixReader::read_store_path`] parses
//! against it into a [`StorePath`] base name, and [`NixWriter::write_store_path`] prints with
//! it. Other strings that carry meaning (hashes, JSON, derivation outputs) are validated by the
//! types that hold them ([`crate::path_info`], [`crate::realisation`], [`crate::derivation`]).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io;

use nixspace_nix_formats::derivation::DerivationError;
use nixspace_nix_formats::hash::HashError;
use nixspace_nix_formats::store_path::{StoreDir, StorePath, StorePathError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};

use crate::ops::UnknownOpcode;
use crate::version::ProtocolVersion;

/// Size limits applied while reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The longest byte string accepted (default 64 MiB; derivation environments can be large).
    pub max_bytes: u64,
    /// The most elements accepted in one list, set or map (default 2^20).
    pub max_collection: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: 64 << 20,
            max_collection: 1 << 20,
        }
    }
}

/// Errors of the wire codec. `what` names the field being read or written.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// An I/O error from the underlying stream.
    #[error("I/O error on {what}")]
    Io {
        /// The field being read or written.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The stream ended in the middle of a message.
    #[error("unexpected end of stream while reading {what}")]
    UnexpectedEof {
        /// The field being read.
        what: &'static str,
    },
    /// A byte string longer than the limit.
    #[error("{what}: length {len} exceeds the limit of {limit} bytes")]
    TooLong {
        /// The field being read.
        what: &'static str,
        /// The length announced on the wire.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// A list, set or map with more elements than the limit.
    #[error("{what}: {count} elements exceed the limit of {limit}")]
    TooMany {
        /// The field being read.
        what: &'static str,
        /// The count announced on the wire.
        count: u64,
        /// The limit.
        limit: u64,
    },
    /// Padding after a byte string was not all zero.
    #[error("non-zero padding after {what}")]
    BadPadding {
        /// The field being read.
        what: &'static str,
    },
    /// A string that must be UTF-8 was not.
    #[error("{what} is not valid UTF-8")]
    InvalidUtf8 {
        /// The field being read.
        what: &'static str,
    },
    /// A boolean other than 0 or 1.
    #[error("{what}: expected a boolean (0 or 1), got {value}")]
    InvalidBool {
        /// The field being read.
        what: &'static str,
        /// The value on the wire.
        value: u64,
    },
    /// A number outside the values defined for the field.
    #[error("{what}: invalid value {value}")]
    InvalidValue {
        /// The field being read.
        what: &'static str,
        /// The value on the wire.
        value: u64,
    },
    /// A string outside the syntax defined for the field.
    #[error("{what}: invalid value {value:?}")]
    InvalidString {
        /// The field being read.
        what: &'static str,
        /// The offending string.
        value: String,
    },
    /// A store path that failed validation, or that is not directly inside the connection's
    /// store directory ([`StorePathError::NotInStore`]).
    #[error("{what}: invalid store path")]
    StorePath {
        /// The field being read.
        what: &'static str,
        /// Why it is invalid.
        #[source]
        source: StorePathError,
    },
    /// A hash that failed to parse, or that has the wrong algorithm for the field (reading or
    /// writing; the NAR hash must be SHA-256).
    #[error("{what}: invalid hash")]
    Hash {
        /// The field being read or written.
        what: &'static str,
        /// Why it is invalid.
        #[source]
        source: HashError,
    },
    /// A derivation (or one of its outputs) that `nixspace-nix-formats` rejects.
    #[error("{what}: invalid derivation")]
    Derivation {
        /// The field being read.
        what: &'static str,
        /// Why it is invalid.
        #[source]
        source: DerivationError,
    },
    /// A JSON document (realisations) that failed to parse or print.
    #[error("{what}: invalid JSON")]
    Json {
        /// The field being read or written.
        what: &'static str,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// An opcode this crate does not know.
    #[error(transparent)]
    UnknownOpcode(#[from] UnknownOpcode),
    /// A known operation whose request body this crate does not decode (the connection
    /// cannot continue: the body's length is unknown).
    #[error("operation {0:?} is not supported by nixspace")]
    UnsupportedOp(crate::ops::Opcode),
    /// A stderr frame tag this crate does not know.
    #[error("unknown stderr frame tag {0:#x}")]
    UnknownStderrFrame(u64),
    /// A stderr frame that the current context cannot handle (e.g. `STDERR_READ` when no
    /// source was given).
    #[error("unexpected {tag} frame from the daemon")]
    UnexpectedStderrFrame {
        /// The frame's name.
        tag: &'static str,
    },
    /// A value that cannot be expressed at the negotiated version.
    #[error("{what} cannot be sent at protocol {version}")]
    NotAtThisVersion {
        /// What was to be written.
        what: &'static str,
        /// The negotiated version.
        version: ProtocolVersion,
    },
}

impl WireError {
    pub(crate) fn io(what: &'static str, source: io::Error) -> Self {
        if source.kind() == io::ErrorKind::UnexpectedEof {
            WireError::UnexpectedEof { what }
        } else {
            WireError::Io { what, source }
        }
    }
}

/// A value that can be read from the wire. Implementations consult the reader's version.
pub trait NixDeserialize: Sized {
    /// Reads one value.
    fn read_from<R: AsyncRead + Unpin + Send>(
        r: &mut NixReader<R>,
    ) -> impl Future<Output = Result<Self, WireError>> + Send;
}

/// A value that can be written to the wire. Implementations consult the writer's version.
pub trait NixSerialize {
    /// Writes one value (into the writer's buffer; call [`NixWriter::flush`] to send).
    fn write_to<W: AsyncWrite + Unpin + Send>(
        &self,
        w: &mut NixWriter<W>,
    ) -> impl Future<Output = Result<(), WireError>> + Send;
}

/// The number of zero bytes that follow a byte string of `len` bytes.
pub const fn padding_len(len: u64) -> usize {
    ((8 - (len % 8)) % 8) as usize
}

/// What the elements of lists and maps are read as: byte strings, or text that must be UTF-8.
trait WireText: Sized {
    /// The element from the bytes read for field `what`.
    fn from_wire(bytes: Vec<u8>, what: &'static str) -> Result<Self, WireError>;
}

impl WireText for Vec<u8> {
    fn from_wire(bytes: Vec<u8>, _what: &'static str) -> Result<Self, WireError> {
        Ok(bytes)
    }
}

impl WireText for String {
    fn from_wire(bytes: Vec<u8>, what: &'static str) -> Result<Self, WireError> {
        String::from_utf8(bytes).map_err(|_| WireError::InvalidUtf8 { what })
    }
}

/// A buffered reader for one direction of a connection, carrying its negotiated version, its
/// limits and the store directory that store paths are parsed against.
#[derive(Debug)]
pub struct NixReader<R> {
    inner: BufReader<R>,
    version: ProtocolVersion,
    limits: Limits,
    store_dir: StoreDir,
}

impl<R: AsyncRead + Unpin> NixReader<R> {
    /// Wraps a stream whose version is already known (for tests and for servers that
    /// negotiated elsewhere). [`crate::handshake`] sets the negotiated version on real
    /// connections. The store directory is `/nix/store` until
    /// [`NixReader::with_store_dir`] replaces it.
    pub fn new(inner: R, version: ProtocolVersion) -> Self {
        Self {
            inner: BufReader::new(inner),
            version,
            limits: Limits::default(),
            store_dir: StoreDir::default(),
        }
    }

    /// Replaces the limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Replaces the store directory that store paths read from the wire must be in.
    pub fn with_store_dir(mut self, store_dir: StoreDir) -> Self {
        self.store_dir = store_dir;
        self
    }

    /// The store directory store paths are parsed against.
    pub fn store_dir(&self) -> &StoreDir {
        &self.store_dir
    }

    /// The negotiated protocol version.
    pub fn version(&self) -> ProtocolVersion {
        self.version
    }

    pub(crate) fn set_version(&mut self, version: ProtocolVersion) {
        self.version = version;
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Unwraps the stream; bytes already buffered are lost.
    pub fn into_inner(self) -> R {
        self.inner.into_inner()
    }

    pub(crate) fn buffered(&mut self) -> &mut BufReader<R> {
        &mut self.inner
    }

    /// Reads a u64, or `None` if the stream ends cleanly before its first byte (the peer
    /// closed the connection between operations). A partial u64 is an error.
    pub async fn try_read_u64(&mut self, what: &'static str) -> Result<Option<u64>, WireError> {
        let mut buf = [0u8; 8];
        let mut filled = 0;
        while filled < 8 {
            let n = self
                .inner
                .read(&mut buf[filled..])
                .await
                .map_err(|e| WireError::io(what, e))?;
            if n == 0 {
                return if filled == 0 {
                    Ok(None)
                } else {
                    Err(WireError::UnexpectedEof { what })
                };
            }
            filled += n;
        }
        Ok(Some(u64::from_le_bytes(buf)))
    }

    /// Reads a u64.
    pub async fn read_u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        self.inner
            .read_u64_le()
            .await
            .map_err(|e| WireError::io(what, e))
    }

    /// Reads a boolean (0 or 1).
    pub async fn read_bool(&mut self, what: &'static str) -> Result<bool, WireError> {
        match self.read_u64(what).await? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(WireError::InvalidBool { what, value }),
        }
    }

    /// Reads exactly `buf.len()` raw bytes (no length prefix, no padding).
    pub async fn read_raw(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), WireError> {
        self.inner
            .read_exact(buf)
            .await
            .map(|_| ())
            .map_err(|e| WireError::io(what, e))
    }

    /// Reads and checks the zero padding after a byte string of `len` bytes.
    pub async fn read_padding(&mut self, len: u64, what: &'static str) -> Result<(), WireError> {
        let n = padding_len(len);
        if n > 0 {
            let mut pad = [0u8; 8];
            self.read_raw(&mut pad[..n], what).await?;
            if pad[..n].iter().any(|b| *b != 0) {
                return Err(WireError::BadPadding { what });
            }
        }
        Ok(())
    }

    /// Reads a byte string no longer than [`Limits::max_bytes`].
    pub async fn read_bytes(&mut self, what: &'static str) -> Result<Vec<u8>, WireError> {
        let limit = self.limits.max_bytes;
        self.read_bytes_limited(what, limit).await
    }

    /// Reads a byte string no longer than `limit`. The length is checked before any
    /// allocation, and the buffer grows only as bytes actually arrive.
    pub async fn read_bytes_limited(
        &mut self,
        what: &'static str,
        limit: u64,
    ) -> Result<Vec<u8>, WireError> {
        let len = self.read_u64(what).await?;
        if len > limit {
            return Err(WireError::TooLong { what, len, limit });
        }
        let mut out = Vec::with_capacity(len.min(64 * 1024) as usize);
        (&mut self.inner)
            .take(len)
            .read_to_end(&mut out)
            .await
            .map_err(|e| WireError::io(what, e))?;
        if out.len() as u64 != len {
            return Err(WireError::UnexpectedEof { what });
        }
        self.read_padding(len, what).await?;
        Ok(out)
    }

    /// Reads a UTF-8 string.
    pub async fn read_string(&mut self, what: &'static str) -> Result<String, WireError> {
        let bytes = self.read_bytes(what).await?;
        String::from_wire(bytes, what)
    }

    /// Reads a string, replacing invalid UTF-8 (for log text, which builders may fill with
    /// arbitrary bytes).
    pub async fn read_string_lossy(&mut self, what: &'static str) -> Result<String, WireError> {
        let bytes = self.read_bytes(what).await?;
        Ok(match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// Reads a collection count no larger than [`Limits::max_collection`].
    pub async fn read_count(&mut self, what: &'static str) -> Result<u64, WireError> {
        let count = self.read_u64(what).await?;
        let limit = self.limits.max_collection;
        if count > limit {
            return Err(WireError::TooMany { what, count, limit });
        }
        Ok(count)
    }

    /// Reads a list of strings.
    pub async fn read_strings(&mut self, what: &'static str) -> Result<Vec<String>, WireError> {
        self.read_list(what).await
    }

    /// Reads a list of byte strings (no UTF-8 required).
    pub async fn read_byte_strings(
        &mut self,
        what: &'static str,
    ) -> Result<Vec<Vec<u8>>, WireError> {
        self.read_list(what).await
    }

    async fn read_list<T: WireText>(&mut self, what: &'static str) -> Result<Vec<T>, WireError> {
        let n = self.read_count(what).await?;
        let mut out = Vec::with_capacity(n.min(1024) as usize);
        for _ in 0..n {
            out.push(T::from_wire(self.read_bytes(what).await?, what)?);
        }
        Ok(out)
    }

    /// Reads a set of strings (duplicates collapse, as in Nix).
    pub async fn read_string_set(
        &mut self,
        what: &'static str,
    ) -> Result<BTreeSet<String>, WireError> {
        let n = self.read_count(what).await?;
        let mut out = BTreeSet::new();
        for _ in 0..n {
            out.insert(self.read_string(what).await?);
        }
        Ok(out)
    }

    /// Reads a string-to-string map (a later duplicate key wins, as in Nix).
    pub async fn read_string_map(
        &mut self,
        what: &'static str,
    ) -> Result<BTreeMap<String, String>, WireError> {
        self.read_map(what).await
    }

    /// Reads a map of byte strings (no UTF-8 required; a later duplicate key wins, as in Nix).
    pub async fn read_byte_map(
        &mut self,
        what: &'static str,
    ) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, WireError> {
        self.read_map(what).await
    }

    async fn read_map<T: WireText + Ord>(
        &mut self,
        what: &'static str,
    ) -> Result<BTreeMap<T, T>, WireError> {
        let n = self.read_count(what).await?;
        let mut out = BTreeMap::new();
        for _ in 0..n {
            let k = T::from_wire(self.read_bytes(what).await?, what)?;
            let v = T::from_wire(self.read_bytes(what).await?, what)?;
            out.insert(k, v);
        }
        Ok(out)
    }

    /// Parses a full store path against the reader's store directory.
    fn parse_store_path(&self, s: &str, what: &'static str) -> Result<StorePath, WireError> {
        self.store_dir
            .parse(s)
            .map_err(|source| WireError::StorePath { what, source })
    }

    /// Reads a full store path, which must be directly inside the reader's store directory.
    pub async fn read_store_path(&mut self, what: &'static str) -> Result<StorePath, WireError> {
        let s = self.read_string(what).await?;
        self.parse_store_path(&s, what)
    }

    /// Reads an optional store path (the empty string means none).
    pub async fn read_opt_store_path(
        &mut self,
        what: &'static str,
    ) -> Result<Option<StorePath>, WireError> {
        let s = self.read_string(what).await?;
        if s.is_empty() {
            return Ok(None);
        }
        self.parse_store_path(&s, what).map(Some)
    }

    /// Reads a set of store paths (duplicates collapse, as in Nix).
    pub async fn read_store_path_set(
        &mut self,
        what: &'static str,
    ) -> Result<BTreeSet<StorePath>, WireError> {
        let n = self.read_count(what).await?;
        let mut out = BTreeSet::new();
        for _ in 0..n {
            out.insert(self.read_store_path(what).await?);
        }
        Ok(out)
    }

    /// Reads any [`NixDeserialize`] value.
    pub async fn read_value<T: NixDeserialize>(&mut self) -> Result<T, WireError>
    where
        R: Send,
    {
        T::read_from(self).await
    }
}

/// A buffered writer for one direction of a connection, carrying its negotiated version and
/// the store directory that store paths are printed with. Writes go into a buffer;
/// [`NixWriter::flush`] sends them.
#[derive(Debug)]
pub struct NixWriter<W: AsyncWrite> {
    inner: BufWriter<W>,
    version: ProtocolVersion,
    store_dir: StoreDir,
}

impl<W: AsyncWrite + Unpin> NixWriter<W> {
    /// Wraps a stream whose version is already known. The store directory is `/nix/store`
    /// until [`NixWriter::with_store_dir`] replaces it.
    pub fn new(inner: W, version: ProtocolVersion) -> Self {
        Self {
            inner: BufWriter::new(inner),
            version,
            store_dir: StoreDir::default(),
        }
    }

    /// Replaces the store directory that store paths are printed with.
    pub fn with_store_dir(mut self, store_dir: StoreDir) -> Self {
        self.store_dir = store_dir;
        self
    }

    /// The store directory store paths are printed with.
    pub fn store_dir(&self) -> &StoreDir {
        &self.store_dir
    }

    /// The negotiated protocol version.
    pub fn version(&self) -> ProtocolVersion {
        self.version
    }

    pub(crate) fn set_version(&mut self, version: ProtocolVersion) {
        self.version = version;
    }

    /// Unwraps the stream; call [`NixWriter::flush`] first or buffered bytes are lost.
    pub fn into_inner(self) -> W {
        self.inner.into_inner()
    }

    pub(crate) fn buffered(&mut self) -> &mut BufWriter<W> {
        &mut self.inner
    }

    /// Sends everything buffered.
    pub async fn flush(&mut self) -> Result<(), WireError> {
        self.inner
            .flush()
            .await
            .map_err(|e| WireError::io("flush", e))
    }

    /// Writes a u64.
    pub async fn write_u64(&mut self, v: u64, what: &'static str) -> Result<(), WireError> {
        self.inner
            .write_u64_le(v)
            .await
            .map_err(|e| WireError::io(what, e))
    }

    /// Writes a boolean as 0 or 1.
    pub async fn write_bool(&mut self, v: bool, what: &'static str) -> Result<(), WireError> {
        self.write_u64(u64::from(v), what).await
    }

    /// Writes raw bytes (no length, no padding).
    pub async fn write_raw(&mut self, bytes: &[u8], what: &'static str) -> Result<(), WireError> {
        self.inner
            .write_all(bytes)
            .await
            .map_err(|e| WireError::io(what, e))
    }

    /// Writes a byte string: length, bytes, zero padding.
    pub async fn write_bytes(&mut self, bytes: &[u8], what: &'static str) -> Result<(), WireError> {
        self.write_u64(bytes.len() as u64, what).await?;
        self.write_raw(bytes, what).await?;
        let pad = padding_len(bytes.len() as u64);
        self.write_raw(&[0u8; 8][..pad], what).await
    }

    /// Writes a string.
    pub async fn write_str(&mut self, s: &str, what: &'static str) -> Result<(), WireError> {
        self.write_bytes(s.as_bytes(), what).await
    }

    /// Writes a list or set of strings (or byte strings).
    pub async fn write_strings<I, S>(
        &mut self,
        items: I,
        what: &'static str,
    ) -> Result<(), WireError>
    where
        I: IntoIterator<Item = S>,
        I::IntoIter: ExactSizeIterator,
        S: AsRef<[u8]>,
    {
        let items = items.into_iter();
        self.write_u64(items.len() as u64, what).await?;
        for s in items {
            self.write_bytes(s.as_ref(), what).await?;
        }
        Ok(())
    }

    /// Writes a map of strings (or byte strings).
    pub async fn write_string_map<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        &mut self,
        map: &BTreeMap<K, V>,
        what: &'static str,
    ) -> Result<(), WireError> {
        self.write_u64(map.len() as u64, what).await?;
        for (k, v) in map {
            self.write_bytes(k.as_ref(), what).await?;
            self.write_bytes(v.as_ref(), what).await?;
        }
        Ok(())
    }

    /// Writes a store path as a full path in the writer's store directory.
    pub async fn write_store_path(
        &mut self,
        p: &StorePath,
        what: &'static str,
    ) -> Result<(), WireError> {
        let s = self.store_dir.print(p);
        self.write_str(&s, what).await
    }

    /// Writes an optional store path (none as the empty string).
    pub async fn write_opt_store_path(
        &mut self,
        p: Option<&StorePath>,
        what: &'static str,
    ) -> Result<(), WireError> {
        match p {
            Some(p) => self.write_store_path(p, what).await,
            None => self.write_str("", what).await,
        }
    }

    /// Writes a list or set of store paths, in iteration order.
    pub async fn write_store_paths<'a, I>(
        &mut self,
        paths: I,
        what: &'static str,
    ) -> Result<(), WireError>
    where
        I: IntoIterator<Item = &'a StorePath>,
        I::IntoIter: ExactSizeIterator,
    {
        let paths = paths.into_iter();
        self.write_u64(paths.len() as u64, what).await?;
        for p in paths {
            self.write_store_path(p, what).await?;
        }
        Ok(())
    }

    /// Writes any [`NixSerialize`] value.
    pub async fn write_value<T: NixSerialize + Sync>(&mut self, v: &T) -> Result<(), WireError>
    where
        W: Send,
    {
        v.write_to(self).await
    }
}

impl NixDeserialize for StorePath {
    async fn read_from<R: AsyncRead + Unpin + Send>(
        r: &mut NixReader<R>,
    ) -> Result<Self, WireError> {
        r.read_store_path("store path").await
    }
}

impl NixSerialize for StorePath {
    async fn write_to<W: AsyncWrite + Unpin + Send>(
        &self,
        w: &mut NixWriter<W>,
    ) -> Result<(), WireError> {
        w.write_store_path(self, "store path").await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::NIX_2_8;

    fn reader(bytes: Vec<u8>) -> NixReader<io::Cursor<Vec<u8>>> {
        NixReader::new(io::Cursor::new(bytes), NIX_2_8)
    }

    #[tokio::test]
    async fn strings_are_padded_to_eight() {
        let mut w = NixWriter::new(Vec::new(), NIX_2_8);
        w.write_str("2.8.0", "s").await.unwrap();
        w.flush().await.unwrap();
        let bytes = w.into_inner();
        assert_eq!(bytes, b"\x05\0\0\0\0\0\0\x002.8.0\0\0\0");
        let mut r = reader(bytes);
        assert_eq!(r.read_string("s").await.unwrap(), "2.8.0");
        assert!(r.try_read_u64("end").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn huge_length_errors_before_allocating() {
        let mut r = reader((1u64 << 60).to_le_bytes().to_vec());
        assert!(matches!(
            r.read_bytes("s").await,
            Err(WireError::TooLong { len, .. }) if len == 1 << 60
        ));
        let mut r = reader((1u64 << 60).to_le_bytes().to_vec());
        assert!(matches!(
            r.read_strings("l").await,
            Err(WireError::TooMany { .. })
        ));
    }

    #[tokio::test]
    async fn non_zero_padding_is_rejected() {
        let mut bytes = 1u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"a\0\0\0\0\0\x01\0");
        assert!(matches!(
            reader(bytes).read_bytes("s").await,
            Err(WireError::BadPadding { .. })
        ));
    }

    #[tokio::test]
    async fn clean_eof_is_not_a_truncation() {
        assert!(reader(vec![]).try_read_u64("op").await.unwrap().is_none());
        assert!(matches!(
            reader(vec![1, 2, 3]).try_read_u64("op").await,
            Err(WireError::UnexpectedEof { .. })
        ));
        let mut bytes = 10u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"short");
        assert!(matches!(
            reader(bytes).read_bytes("s").await,
            Err(WireError::UnexpectedEof { .. })
        ));
    }

    const P: &str = "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12.drv";

    fn strings(ss: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        for s in ss {
            out.extend((s.len() as u64).to_le_bytes());
            out.extend(s.as_bytes());
            out.extend(&[0u8; 8][..padding_len(s.len() as u64)]);
        }
        out
    }

    #[tokio::test]
    async fn store_paths_are_parsed_against_the_store_dir() {
        let p = reader(strings(&[P])).read_store_path("p").await.unwrap();
        assert_eq!(p.hash_part(), "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz");
        assert_eq!(p.name(), "hello-2.12.drv");
        assert!(p.is_derivation());

        let tmp = StoreDir::new("/tmp/s").unwrap();
        let other = "/tmp/s/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x";
        let mut r = reader(strings(&[other])).with_store_dir(tmp.clone());
        assert_eq!(r.store_dir(), &tmp);
        let q = r.read_store_path("p").await.unwrap();
        assert_eq!(q.to_string(), "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x");
        // The same path is not in the default store.
        assert!(matches!(
            reader(strings(&[other])).read_store_path("p").await,
            Err(WireError::StorePath {
                what: "p",
                source: StorePathError::NotInStore { .. }
            })
        ));

        let mut w = NixWriter::new(Vec::new(), NIX_2_8).with_store_dir(tmp.clone());
        w.write_store_path(&q, "p").await.unwrap();
        w.write_opt_store_path(None, "o").await.unwrap();
        w.write_store_paths([&q, &p], "s").await.unwrap();
        w.flush().await.unwrap();
        let mut r = reader(w.into_inner()).with_store_dir(tmp);
        assert_eq!(r.read_store_path("p").await.unwrap(), q);
        assert_eq!(r.read_opt_store_path("o").await.unwrap(), None);
        assert_eq!(
            r.read_store_path_set("s").await.unwrap(),
            BTreeSet::from([p, q])
        );
        assert!(r.try_read_u64("end").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn bad_store_paths_are_rejected_by_field() {
        for bad in [
            "",
            "nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x",
            "/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x",
            "/nix/store/short-x",
            "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxle-x",
            "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz_x",
            "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-a b",
            "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-",
            "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-x/sub",
        ] {
            let res = reader(strings(&[bad])).read_store_path("deriver").await;
            assert!(
                matches!(
                    res,
                    Err(WireError::StorePath {
                        what: "deriver",
                        ..
                    })
                ),
                "{bad}: {res:?}"
            );
        }
        let err = reader(strings(&["/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxle-x"]))
            .read_opt_store_path("deriver")
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            WireError::StorePath {
                what: "deriver",
                source: StorePathError::InvalidHashChar { character: 'e', .. }
            }
        ));
    }

    #[tokio::test]
    async fn booleans_are_strict() {
        assert!(matches!(
            reader(2u64.to_le_bytes().to_vec()).read_bool("b").await,
            Err(WireError::InvalidBool { value: 2, .. })
        ));
    }
}
