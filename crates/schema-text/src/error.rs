//! Error type shared by every stage of the converter.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// A place in a schema source text: origin (usually a file path), 1-based line and column.
///
/// Columns count Unicode scalar values, not bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// Where the text came from: a file path, or `<input>` for [`crate::parse_schema`].
    pub origin: String,
    /// 1-based line number.
    pub line: usize,
    /// 1-based column number, in characters.
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.origin, self.line, self.column)
    }
}

/// Everything that can go wrong while converting schema text into a bundle.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The schema text is malformed or inconsistent; `location` points at the culprit.
    #[error("{location}: {message}")]
    Schema {
        /// Where the problem is.
        location: Location,
        /// What is wrong, in words.
        message: String,
    },
    /// Reading a directory or file, or writing the output, failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },
    /// The directory given to [`crate::bundle_from_dir`] holds no `*.prs` file.
    #[error("{}: no `*.prs` schema files found", .0.display())]
    NoSchemas(PathBuf),
    /// A `.prs` file name cannot serve as a module name.
    #[error("{}: unusable as a module name: {reason}", path.display())]
    ModuleName {
        /// The offending file.
        path: PathBuf,
        /// Why its stem is not a module name.
        reason: String,
    },
    /// Encoding the bundle as binary Preserves failed.
    #[error("encoding the schema bundle failed: {0}")]
    Encode(#[source] io::Error),
}

impl Error {
    /// The source location of a [`Error::Schema`] error, if this is one.
    pub fn location(&self) -> Option<&Location> {
        match self {
            Error::Schema { location, .. } => Some(location),
            _ => None,
        }
    }

    /// The bare message of a [`Error::Schema`] error (without the location prefix).
    pub fn message(&self) -> Option<&str> {
        match self {
            Error::Schema { message, .. } => Some(message),
            _ => None,
        }
    }
}
