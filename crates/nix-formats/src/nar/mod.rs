//! The NAR ("Nix ARchive") serialisation of file system trees.
//!
//! A NAR is a sequence of length-prefixed strings (little-endian `u64`
//! length, the bytes, zero padding to a multiple of 8):
//!
//! ```text
//! nar       = "nix-archive-1" node
//! node      = "(" "type" ( regular | symlink | directory ) ")"
//! regular   = "regular" [ "executable" "" ] "contents" <bytes>
//! symlink   = "symlink" "target" <target>
//! directory = "directory" { "entry" "(" "name" <name> "node" node ")" }
//! ```
//!
//! Directory entries are strictly sorted by name (bytewise), and names are
//! never empty, `.`, `..`, nor contain `/` or NUL. [`NarWriter`] produces
//! NARs from a sequence of calls and refuses anything that breaks these
//! rules; [`parse`] streams a NAR into a [`NarVisitor`] and rejects bad
//! magic, bad tokens, non-zero padding, unsorted or duplicate entries,
//! invalid names, oversized strings and truncation. Both compute the SHA-256
//! and size of the NAR bytes while streaming.
//!
//! This module never touches the file system; [`fs`] walks a directory
//! into a NAR and unpacks a NAR into a new directory.

mod reader;
mod writer;

#[cfg(unix)]
pub mod fs;

use std::io;

use thiserror::Error;

use crate::hash::Hash;

pub use reader::{parse, NarVisitor, ParseLimits};
pub use writer::NarWriter;

/// The magic string that opens every NAR.
pub const MAGIC: &[u8] = b"nix-archive-1";

/// SHA-256 and size of a whole NAR, as in path info (`narHash`, `narSize`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NarSummary {
    /// SHA-256 of the NAR bytes.
    pub sha256: Hash,
    /// Number of NAR bytes.
    pub size: u64,
}

/// Why a NAR could not be written, read or unpacked.
#[derive(Debug, Error)]
pub enum NarError {
    /// The stream does not start with `nix-archive-1`.
    #[error("not a NAR: bad magic")]
    BadMagic,
    /// The stream ended inside the NAR.
    #[error("NAR is truncated")]
    Truncated,
    /// A different token was found where a fixed one is required.
    #[error("expected NAR token '{expected}', found '{found}'")]
    UnexpectedToken {
        /// The token expected.
        expected: &'static str,
        /// What was found (lossily decoded, shortened).
        found: String,
    },
    /// The node type is not `regular`, `symlink` or `directory`.
    #[error("unknown NAR node type '{0}'")]
    UnknownNodeType(String),
    /// A string is longer than its limit.
    #[error("NAR {what} is {len} bytes long, more than the limit of {max}")]
    TooLong {
        /// Which string.
        what: &'static str,
        /// Its declared length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// Padding after a string is not zero.
    #[error("NAR padding is not zero")]
    NonZeroPadding,
    /// A directory entry name is not allowed.
    #[error("invalid NAR entry name '{name}': {reason}")]
    InvalidName {
        /// The name (lossily decoded).
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// Directory entries are not in strictly increasing order.
    #[error("NAR directory entries not sorted: '{name}' follows '{previous}'")]
    UnsortedEntries {
        /// The previous name.
        previous: String,
        /// The name that should have come first, or equals it.
        name: String,
    },
    /// Directory nesting is deeper than the limit.
    #[error("NAR directories nested deeper than {0}")]
    TooDeep(usize),
    /// The input continues after the NAR.
    #[error("trailing data after the NAR")]
    TrailingData,
    /// A writer call came in the wrong state (e.g. two root nodes, an entry
    /// outside a directory).
    #[error("NAR writer misuse: {0}")]
    WriterState(&'static str),
    /// The contents reader ended early or ran long.
    #[error("regular file contents: declared {declared} bytes, got {actual}")]
    ContentsLength {
        /// The size passed to the writer.
        declared: u64,
        /// What the reader produced (at least).
        actual: u64,
    },
    /// A file system object cannot be put in a NAR (socket, device, fifo).
    #[error("cannot archive '{0}': not a regular file, directory or symlink")]
    UnsupportedFileType(std::path::PathBuf),
    /// Unpacking: the target exists already.
    #[error("cannot unpack into '{0}': it already exists")]
    TargetExists(std::path::PathBuf),
    /// An I/O error, with what was being done.
    #[error("{what}: {source}")]
    Io {
        /// What failed, with the path if any.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

impl NarError {
    fn io(what: impl Into<String>, source: io::Error) -> NarError {
        NarError::Io {
            what: what.into(),
            source,
        }
    }
}

/// Checks a directory entry name: not empty, `.`, `..`, and no `/` or NUL.
pub fn validate_entry_name(name: &[u8]) -> Result<(), NarError> {
    let reason = if name.is_empty() {
        "empty"
    } else if name == b"." || name == b".." {
        "'.' and '..' are not allowed"
    } else if name.contains(&b'/') {
        "contains '/'"
    } else if name.contains(&0) {
        "contains NUL"
    } else {
        return Ok(());
    };
    Err(NarError::InvalidName {
        name: lossy(name),
        reason,
    })
}

/// Lossy, shortened text for error messages.
fn lossy(bytes: &[u8]) -> String {
    let mut s = String::from_utf8_lossy(&bytes[..bytes.len().min(256)]).into_owned();
    if bytes.len() > 256 {
        s.push('…');
    }
    s
}

/// Number of zero bytes after a string of `len` bytes.
fn padding(len: u64) -> usize {
    ((8 - len % 8) % 8) as usize
}

#[cfg(test)]
mod tests;
