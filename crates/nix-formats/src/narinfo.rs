//! The `.narinfo` text format of Nix binary caches, as Nix 2.8 reads and
//! writes it (`NarInfo` in `libstore/nar-info.cc`).
//!
//! A narinfo describes one store path in a cache: where its (compressed)
//! NAR lives, the hash and size of that file and of the NAR itself, its
//! references, deriver, signatures and content address. It is a list of
//! `Key: value` lines, each ending in `\n`:
//!
//! ```text
//! StorePath: /nix/store/970x0qcwwvlpdzs2v286r8jsqk2pyb3x-c
//! URL: nar/0rq9lii3gnlhkh13gpq24qghbhjiqj51ja4hqqjf4c909bvnkv8x.nar.xz
//! Compression: xz
//! FileHash: sha256:0rq9lii3gnlhkh13gpq24qghbhjiqj51ja4hqqjf4c909bvnkv8x
//! FileSize: 244
//! NarHash: sha256:17wkanvrz9vhs8fxvkshqrymf1j6196fl1mc7sjk1ns836j4vdkm
//! NarSize: 280
//! References: 970x0qcwwvlpdzs2v286r8jsqk2pyb3x-c j80qrs6pk07pk59mxkjfvpcccjh6va0z-a.txt
//! Deriver: j37cmpj4jkgd4ihmbpsz0k50hjr2p7qv-c.drv
//! Sig: cache.example.org-1:aKxil4w6…ZZDA==
//! ```
//!
//! [`NarInfo::parse`] and [`NarInfo::to_text`] round-trip every narinfo Nix
//! writes byte for byte. Where the format leaves room, this module decides:
//!
//! * **Strictness.** Every line must be `Key: value\n` (a non-empty key, a
//!   colon, one space); the last line must end in a newline (Nix requires
//!   that too). `StorePath`, `URL`, `NarHash` and `NarSize` are required;
//!   `URL` must not be empty and `NarSize` not 0, as in Nix. A known field
//!   given twice is an error (except `Sig`, which repeats). Numbers are
//!   plain decimal digits. Errors name the 1-based line and the field.
//! * **Unknown keys** are kept, in order, in [`NarInfo::unknown`], and
//!   printed after the known fields. Nix ignores them; keeping them lets a
//!   proxy pass a newer cache's fields through. They are not covered by any
//!   signature, so never trust them.
//! * **Optional fields Nix always writes.** `Compression`, `FileHash` and
//!   `FileSize` are optional here and printed only when present, so a
//!   narinfo without them round-trips too. A missing or empty `Compression`
//!   means `bzip2` to Nix: see [`NarInfo::compression`]. `References` is
//!   always printed (possibly as `References: ` with nothing after the
//!   space), like Nix does.
//! * **Normalised forms.** Hashes are printed as `algo:nixbase32` (Nix
//!   accepts any prefixed or SRI form on input), references and signatures
//!   in sorted order without duplicates (Nix keeps both as sets), an empty
//!   `System` is absent, and `Deriver: unknown-deriver` (written by old
//!   tools) means no deriver. Nix writes all of these in normal form
//!   already.
//!
//! The store directory is a [`StoreDir`] argument: `StorePath` is a full
//! path, while references and the deriver are base names.

use std::collections::BTreeSet;

use thiserror::Error;

use crate::hash::{Hash, HashError};
use crate::store_path::{ContentAddress, StoreDir, StorePath, StorePathError};

/// The compression Nix assumes when a narinfo has no `Compression` field.
pub const DEFAULT_COMPRESSION: &str = "bzip2";

/// The `Deriver` value old tools wrote for "no deriver".
pub const UNKNOWN_DERIVER: &str = "unknown-deriver";

/// Field names, in the order Nix prints them.
pub mod field {
    /// `StorePath`: the full store path (required).
    pub const STORE_PATH: &str = "StorePath";
    /// `URL`: where the NAR file is, relative to the cache (required).
    pub const URL: &str = "URL";
    /// `Compression`: the NAR file's compression (`xz`, `zstd`, `none`, …).
    pub const COMPRESSION: &str = "Compression";
    /// `FileHash`: the hash of the (compressed) NAR file.
    pub const FILE_HASH: &str = "FileHash";
    /// `FileSize`: the size of the (compressed) NAR file.
    pub const FILE_SIZE: &str = "FileSize";
    /// `NarHash`: the hash of the uncompressed NAR (required).
    pub const NAR_HASH: &str = "NarHash";
    /// `NarSize`: the size of the uncompressed NAR (required, not 0).
    pub const NAR_SIZE: &str = "NarSize";
    /// `References`: space-separated base names.
    pub const REFERENCES: &str = "References";
    /// `Deriver`: the base name of the deriver.
    pub const DERIVER: &str = "Deriver";
    /// `System`: the system the path was built for.
    pub const SYSTEM: &str = "System";
    /// `Sig`: one signature, `keyname:base64` (repeatable).
    pub const SIG: &str = "Sig";
    /// `CA`: the content address.
    pub const CA: &str = "CA";

    /// All fields this module knows.
    pub const KNOWN: [&str; 12] = [
        STORE_PATH,
        URL,
        COMPRESSION,
        FILE_HASH,
        FILE_SIZE,
        NAR_HASH,
        NAR_SIZE,
        REFERENCES,
        DERIVER,
        SYSTEM,
        SIG,
        CA,
    ];
}

/// Why a narinfo text was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NarInfoError {
    /// A line is not of the form `Key: value\n`.
    #[error("narinfo line {line}: {kind}")]
    Syntax {
        /// The 1-based line number.
        line: usize,
        /// What is wrong with the line.
        kind: SyntaxError,
    },
    /// A known field has a bad value or appears twice.
    #[error("narinfo line {line}, field '{field}': {kind}")]
    Field {
        /// The 1-based line number.
        line: usize,
        /// The field name.
        field: &'static str,
        /// What is wrong with the value.
        kind: FieldError,
    },
    /// A required field is missing.
    #[error("narinfo has no '{0}' field")]
    Missing(&'static str),
}

impl NarInfoError {
    /// The 1-based line the error is on, if it is about one line.
    pub fn line(&self) -> Option<usize> {
        match self {
            NarInfoError::Syntax { line, .. } | NarInfoError::Field { line, .. } => Some(*line),
            NarInfoError::Missing(_) => None,
        }
    }
}

/// A malformed narinfo line.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SyntaxError {
    /// The text is not UTF-8 (only from [`NarInfo::parse_bytes`]).
    #[error("invalid UTF-8")]
    InvalidUtf8,
    /// The last line does not end in a newline.
    #[error("no newline at the end of the line")]
    NoNewline,
    /// The line has no `: ` after its key (this includes empty lines).
    #[error("expected 'Key: value'")]
    NoSeparator,
    /// The line starts with `:`.
    #[error("empty key")]
    EmptyKey,
}

/// A bad value of a known narinfo field.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FieldError {
    /// A field other than `Sig` appears a second time.
    #[error("duplicate field")]
    Duplicate,
    /// `URL` is empty.
    #[error("must not be empty")]
    Empty,
    /// `NarSize` is 0 (Nix treats that as unknown and rejects it).
    #[error("must not be 0")]
    Zero,
    /// A size is not a decimal `u64`.
    #[error("invalid number '{0}'")]
    InvalidNumber(String),
    /// A hash field is not a prefixed (`algo:` or SRI) hash.
    #[error(transparent)]
    Hash(#[from] HashError),
    /// A store path (full or base name) or a content address is invalid.
    #[error(transparent)]
    StorePath(#[from] StorePathError),
}

/// A parsed `.narinfo` file.
///
/// Fields are public; [`NarInfo::to_text`] expects text fields (`url`,
/// `compression`, `system`, signatures, unknown keys and values) to hold no
/// newline, and unknown keys to be non-empty, without `:`, and not one of
/// [`field::KNOWN`]; otherwise the printed text does not parse back to the
/// same value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    /// The store path described (`StorePath`, printed in full).
    pub store_path: StorePath,
    /// Where the NAR file is, usually relative to the cache (`URL`).
    pub url: String,
    /// The NAR file's compression (`Compression`), as written; `None` if
    /// absent or empty. See [`NarInfo::compression`].
    pub compression: Option<String>,
    /// The hash of the NAR file (`FileHash`).
    pub file_hash: Option<Hash>,
    /// The size of the NAR file in bytes (`FileSize`).
    pub file_size: Option<u64>,
    /// The hash of the uncompressed NAR (`NarHash`).
    pub nar_hash: Hash,
    /// The size of the uncompressed NAR in bytes (`NarSize`), never 0 in a
    /// parsed narinfo.
    pub nar_size: u64,
    /// The references (`References`), possibly including the path itself.
    pub references: BTreeSet<StorePath>,
    /// The deriver (`Deriver`).
    pub deriver: Option<StorePath>,
    /// The system (`System`); never `Some("")` in a parsed narinfo.
    pub system: Option<String>,
    /// The signatures (`Sig` lines), unverified: see [`crate::signature`].
    pub sigs: BTreeSet<String>,
    /// The content address (`CA`).
    pub ca: Option<ContentAddress>,
    /// Lines with keys this module does not know, in input order. Nix ignores
    /// them, and no signature covers them.
    pub unknown: Vec<(String, String)>,
}

impl NarInfo {
    /// A narinfo with the required fields and nothing else.
    pub fn new(store_path: StorePath, url: String, nar_hash: Hash, nar_size: u64) -> NarInfo {
        NarInfo {
            store_path,
            url,
            compression: None,
            file_hash: None,
            file_size: None,
            nar_hash,
            nar_size,
            references: BTreeSet::new(),
            deriver: None,
            system: None,
            sigs: BTreeSet::new(),
            ca: None,
            unknown: Vec::new(),
        }
    }

    /// The file name of this narinfo in a cache: `<hash part>.narinfo`.
    pub fn file_name(&self) -> String {
        format!("{}.narinfo", self.store_path.hash_part())
    }

    /// The compression to use: the `Compression` field, or
    /// [`DEFAULT_COMPRESSION`] (`bzip2`) when there is none, as in Nix.
    pub fn compression(&self) -> &str {
        self.compression.as_deref().unwrap_or(DEFAULT_COMPRESSION)
    }

    /// Whether the content address, if any, really produces this store path
    /// (Nix's `ValidPathInfo::isContentAddressed`). Nix trusts such paths
    /// without signatures. A self-reference is allowed only for fixed
    /// (`fixed:`) addresses.
    pub fn is_content_addressed(&self, store_dir: &StoreDir) -> bool {
        self.ca.as_ref().is_some_and(|ca| {
            crate::signature::is_content_addressed(
                store_dir,
                &self.store_path,
                ca,
                &self.references,
            )
        })
    }

    /// Parses bytes, as read from a cache, with [`NarInfo::parse`]. Bytes
    /// that are not UTF-8 give a syntax error on the line they are on.
    ///
    /// The caller bounds the size: a narinfo of a path with many references
    /// can be tens of kilobytes, so a limit of a few megabytes is generous.
    pub fn parse_bytes(store_dir: &StoreDir, bytes: &[u8]) -> Result<NarInfo, NarInfoError> {
        match std::str::from_utf8(bytes) {
            Ok(text) => NarInfo::parse(store_dir, text),
            Err(e) => {
                let before = bytes.get(..e.valid_up_to()).unwrap_or_default();
                let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
                Err(NarInfoError::Syntax {
                    line,
                    kind: SyntaxError::InvalidUtf8,
                })
            }
        }
    }

    /// Parses a narinfo text whose `StorePath` lies in `store_dir`. See the
    /// [module documentation](self) for the rules.
    pub fn parse(store_dir: &StoreDir, text: &str) -> Result<NarInfo, NarInfoError> {
        let mut b = Builder::default();
        let mut rest = text;
        let mut line = 0;
        while !rest.is_empty() {
            line += 1;
            let syntax = |kind| NarInfoError::Syntax { line, kind };
            let (this, next) = rest
                .split_once('\n')
                .ok_or_else(|| syntax(SyntaxError::NoNewline))?;
            rest = next;
            let (key, value) = this
                .split_once(':')
                .ok_or_else(|| syntax(SyntaxError::NoSeparator))?;
            let value = value
                .strip_prefix(' ')
                .ok_or_else(|| syntax(SyntaxError::NoSeparator))?;
            if key.is_empty() {
                return Err(syntax(SyntaxError::EmptyKey));
            }
            b.field(store_dir, line, key, value)?;
        }
        b.finish()
    }

    /// Prints the narinfo as Nix does (`NarInfo::to_string`), with the
    /// optional fields that are present, then the unknown lines.
    pub fn to_text(&self, store_dir: &StoreDir) -> String {
        let mut out = String::new();
        let mut line = |key: &str, value: &str| {
            out.push_str(key);
            out.push_str(": ");
            out.push_str(value);
            out.push('\n');
        };
        line(field::STORE_PATH, &store_dir.print(&self.store_path));
        line(field::URL, &self.url);
        if let Some(c) = &self.compression {
            line(field::COMPRESSION, c);
        }
        if let Some(h) = &self.file_hash {
            line(field::FILE_HASH, &h.to_prefixed_nixbase32());
        }
        if let Some(s) = self.file_size {
            line(field::FILE_SIZE, &s.to_string());
        }
        line(field::NAR_HASH, &self.nar_hash.to_prefixed_nixbase32());
        line(field::NAR_SIZE, &self.nar_size.to_string());
        let refs: Vec<String> = self.references.iter().map(ToString::to_string).collect();
        line(field::REFERENCES, &refs.join(" "));
        if let Some(d) = &self.deriver {
            line(field::DERIVER, &d.to_string());
        }
        if let Some(s) = &self.system {
            line(field::SYSTEM, s);
        }
        for sig in &self.sigs {
            line(field::SIG, sig);
        }
        if let Some(ca) = &self.ca {
            line(field::CA, &ca.to_string());
        }
        for (k, v) in &self.unknown {
            line(k, v);
        }
        out
    }
}

/// Collects fields while parsing, remembering which were seen.
#[derive(Default)]
struct Builder {
    store_path: Option<StorePath>,
    url: Option<String>,
    compression: Option<Option<String>>,
    file_hash: Option<Hash>,
    file_size: Option<u64>,
    nar_hash: Option<Hash>,
    nar_size: Option<u64>,
    references: Option<BTreeSet<StorePath>>,
    deriver: Option<Option<StorePath>>,
    system: Option<Option<String>>,
    sigs: BTreeSet<String>,
    ca: Option<ContentAddress>,
    unknown: Vec<(String, String)>,
}

/// Stores `value` in `slot`, failing if the field was already seen.
fn set_once<T>(slot: &mut Option<T>, value: T) -> Result<(), FieldError> {
    if slot.is_some() {
        return Err(FieldError::Duplicate);
    }
    *slot = Some(value);
    Ok(())
}

/// A decimal `u64` of plain ASCII digits (no sign, no spaces).
fn parse_number(value: &str) -> Result<u64, FieldError> {
    let invalid = || FieldError::InvalidNumber(value.to_owned());
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    value.parse().map_err(|_| invalid())
}

impl Builder {
    fn field(
        &mut self,
        store_dir: &StoreDir,
        line: usize,
        key: &str,
        value: &str,
    ) -> Result<(), NarInfoError> {
        let Some(&name) = field::KNOWN.iter().find(|&&k| k == key) else {
            self.unknown.push((key.to_owned(), value.to_owned()));
            return Ok(());
        };
        self.known(store_dir, name, value)
            .map_err(|kind| NarInfoError::Field {
                line,
                field: name,
                kind,
            })
    }

    fn known(&mut self, store_dir: &StoreDir, name: &str, value: &str) -> Result<(), FieldError> {
        let non_empty = || (!value.is_empty()).then(|| value.to_owned());
        match name {
            field::STORE_PATH => set_once(&mut self.store_path, store_dir.parse(value)?),
            field::URL => {
                if value.is_empty() {
                    return Err(FieldError::Empty);
                }
                set_once(&mut self.url, value.to_owned())
            }
            field::COMPRESSION => set_once(&mut self.compression, non_empty()),
            field::FILE_HASH => set_once(&mut self.file_hash, Hash::parse_prefixed(value)?),
            field::FILE_SIZE => set_once(&mut self.file_size, parse_number(value)?),
            field::NAR_HASH => set_once(&mut self.nar_hash, Hash::parse_prefixed(value)?),
            field::NAR_SIZE => {
                let n = parse_number(value)?;
                if n == 0 {
                    return Err(FieldError::Zero);
                }
                set_once(&mut self.nar_size, n)
            }
            field::REFERENCES => {
                let refs = value
                    .split(' ')
                    .filter(|r| !r.is_empty())
                    .map(StorePath::from_base_name)
                    .collect::<Result<BTreeSet<_>, _>>()?;
                set_once(&mut self.references, refs)
            }
            field::DERIVER => {
                let deriver = if value == UNKNOWN_DERIVER {
                    None
                } else {
                    Some(StorePath::from_base_name(value)?)
                };
                set_once(&mut self.deriver, deriver)
            }
            field::SYSTEM => set_once(&mut self.system, non_empty()),
            field::SIG => {
                self.sigs.insert(value.to_owned());
                Ok(())
            }
            field::CA => set_once(&mut self.ca, ContentAddress::parse(value)?),
            // `name` comes from `field::KNOWN`, all handled above.
            _ => Ok(()),
        }
    }

    fn finish(self) -> Result<NarInfo, NarInfoError> {
        Ok(NarInfo {
            store_path: self
                .store_path
                .ok_or(NarInfoError::Missing(field::STORE_PATH))?,
            url: self.url.ok_or(NarInfoError::Missing(field::URL))?,
            compression: self.compression.flatten(),
            file_hash: self.file_hash,
            file_size: self.file_size,
            nar_hash: self
                .nar_hash
                .ok_or(NarInfoError::Missing(field::NAR_HASH))?,
            nar_size: self
                .nar_size
                .ok_or(NarInfoError::Missing(field::NAR_SIZE))?,
            references: self.references.unwrap_or_default(),
            deriver: self.deriver.flatten(),
            system: self.system.flatten(),
            sigs: self.sigs,
            ca: self.ca,
            unknown: self.unknown,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "j80qrs6pk07pk59mxkjfvpcccjh6va0z-a.txt";
    const B: &str = "ycsq6aw5f08zj5a3afyg9b5c98zjihc6-b.txt";
    const C: &str = "970x0qcwwvlpdzs2v286r8jsqk2pyb3x-c";

    /// Written by Nix 2.8 (`nix copy --to file://…` of a signed path).
    fn nix_written() -> String {
        format!(
            "StorePath: /nix/store/{C}\n\
             URL: nar/0rq9lii3gnlhkh13gpq24qghbhjiqj51ja4hqqjf4c909bvnkv8x.nar.xz\n\
             Compression: xz\n\
             FileHash: sha256:0rq9lii3gnlhkh13gpq24qghbhjiqj51ja4hqqjf4c909bvnkv8x\n\
             FileSize: 244\n\
             NarHash: sha256:17wkanvrz9vhs8fxvkshqrymf1j6196fl1mc7sjk1ns836j4vdkm\n\
             NarSize: 280\n\
             References: {C} {A} {B}\n\
             Deriver: j37cmpj4jkgd4ihmbpsz0k50hjr2p7qv-c.drv\n\
             System: x86_64-linux\n\
             Sig: test-key-1:aKxil4w6y4ifP9EoJ4vaaWS4QoAvD69TlEXA6JQ4Qdaz23ejn/Ryv3Gawi60YN5ffuh/5YuiV3IUrKPkrKZZDA==\n\
             Sig: z-other:aKxil4w6y4ifP9EoJ4vaaWS4QoAvD69TlEXA6JQ4Qdaz23ejn/Ryv3Gawi60YN5ffuh/5YuiV3IUrKPkrKZZDA==\n"
        )
    }

    fn dir() -> StoreDir {
        StoreDir::default()
    }

    #[test]
    fn parses_every_field_and_prints_back() {
        let text = nix_written();
        let n = NarInfo::parse(&dir(), &text).unwrap();
        assert_eq!(n.store_path.to_string(), C);
        assert_eq!(n.compression(), "xz");
        assert_eq!(n.file_size, Some(244));
        assert_eq!(n.nar_size, 280);
        assert_eq!(n.references.len(), 3);
        assert!(n.references.contains(&n.store_path));
        assert_eq!(
            n.deriver.as_ref().map(ToString::to_string).as_deref(),
            Some("j37cmpj4jkgd4ihmbpsz0k50hjr2p7qv-c.drv")
        );
        assert_eq!(n.system.as_deref(), Some("x86_64-linux"));
        assert_eq!(n.sigs.len(), 2);
        assert_eq!(n.ca, None);
        assert!(n.unknown.is_empty());
        assert_eq!(n.file_name(), format!("{}.narinfo", &C[..32]));
        assert_eq!(n.to_text(&dir()), text);
    }

    #[test]
    fn empty_references_and_ca() {
        let text = format!(
            "StorePath: /nix/store/{B}\n\
             URL: nar/x.nar\n\
             Compression: none\n\
             NarHash: sha256:10b1bswld75am7jlkk266wnzqa69shd6hywa11lv8b72rjy2rqd8\n\
             NarSize: 176\n\
             References: \n\
             CA: text:sha256:1d3av9rfw7hdk70ff1ysvj885dzyh2sn4gp20shjddkn79v3px76\n"
        );
        let n = NarInfo::parse(&dir(), &text).unwrap();
        assert!(n.references.is_empty());
        assert!(matches!(n.ca, Some(ContentAddress::Text(_))));
        assert_eq!(n.file_hash, None);
        assert_eq!(n.to_text(&dir()), text);
    }

    #[test]
    fn minimal_narinfo_and_defaults() {
        let text = format!(
            "StorePath: /nix/store/{A}\nURL: a\n\
             NarHash: sha256-SGVsbG8sIFdvcmxkIQAAAAAAAAAAAAAAAAAAAAAAAAA=\nNarSize: 1\n"
        );
        let n = NarInfo::parse(&dir(), &text).unwrap();
        assert_eq!(n.compression, None);
        assert_eq!(n.compression(), "bzip2");
        assert!(n.references.is_empty());
        // SRI input, nixbase32 output; `References` is always printed.
        let printed = n.to_text(&dir());
        assert!(printed.contains("\nNarHash: sha256:"));
        assert!(printed.ends_with("NarSize: 1\nReferences: \n"));
        assert_eq!(NarInfo::parse(&dir(), &printed).unwrap(), n);
    }

    #[test]
    fn unknown_keys_are_kept_and_printed_last() {
        let text = format!(
            "X-Future: one: two\nStorePath: /nix/store/{A}\nURL: a\n\
             NarHash: sha256:10b1bswld75am7jlkk266wnzqa69shd6hywa11lv8b72rjy2rqd8\n\
             NarSize: 5\nEmpty: \n"
        );
        let n = NarInfo::parse(&dir(), &text).unwrap();
        assert_eq!(
            n.unknown,
            vec![
                ("X-Future".to_owned(), "one: two".to_owned()),
                ("Empty".to_owned(), String::new())
            ]
        );
        assert!(n
            .to_text(&dir())
            .ends_with("References: \nX-Future: one: two\nEmpty: \n"));
    }

    #[test]
    fn normalisations() {
        let text = format!(
            "StorePath: /nix/store/{A}\nURL: a\n\
             NarHash: sha256:10b1bswld75am7jlkk266wnzqa69shd6hywa11lv8b72rjy2rqd8\n\
             NarSize: 5\nReferences:  {B}  {A} \nDeriver: unknown-deriver\nSystem: \n\
             Compression: \nSig: b:x\nSig: a:y\nSig: b:x\n"
        );
        let n = NarInfo::parse(&dir(), &text).unwrap();
        assert_eq!(n.references.len(), 2);
        assert_eq!(n.deriver, None);
        assert_eq!(n.system, None);
        assert_eq!(n.compression, None);
        assert_eq!(
            n.sigs.iter().map(String::as_str).collect::<Vec<_>>(),
            ["a:y", "b:x"]
        );
        assert!(n
            .to_text(&dir())
            .ends_with(&format!("References: {A} {B}\nSig: a:y\nSig: b:x\n")));
    }

    fn err(text: &str) -> NarInfoError {
        NarInfo::parse(&dir(), text).unwrap_err()
    }

    fn good_lines() -> Vec<String> {
        vec![
            format!("StorePath: /nix/store/{A}"),
            "URL: a".to_owned(),
            "NarHash: sha256:10b1bswld75am7jlkk266wnzqa69shd6hywa11lv8b72rjy2rqd8".to_owned(),
            "NarSize: 5".to_owned(),
        ]
    }

    /// The good narinfo with line `at` (0-based) replaced or inserted.
    fn with_line(at: usize, line: &str, replace: bool) -> String {
        let mut lines = good_lines();
        if replace {
            lines[at] = line.to_owned();
        } else {
            lines.insert(at, line.to_owned());
        }
        lines.iter().map(|l| format!("{l}\n")).collect()
    }

    #[test]
    fn errors_name_line_and_field() {
        let field_err = |e: NarInfoError| match e {
            NarInfoError::Field { line, field, kind } => (line, field, kind),
            other => panic!("expected a field error, got {other:?}"),
        };
        let (line, field, kind) = field_err(err(&with_line(3, "NarSize: 0", true)));
        assert_eq!((line, field, kind), (4, "NarSize", FieldError::Zero));
        let (line, field, kind) = field_err(err(&with_line(3, "NarSize: +5", true)));
        assert_eq!(
            (line, field, kind),
            (4, "NarSize", FieldError::InvalidNumber("+5".into()))
        );
        let (line, field, _) = field_err(err(&with_line(2, "NarHash: 10b1bswld75am7", true)));
        assert_eq!((line, field), (3, "NarHash"));
        let (line, field, kind) = field_err(err(&with_line(4, "URL: b", false)));
        assert_eq!((line, field, kind), (5, "URL", FieldError::Duplicate));
        let (line, field, kind) = field_err(err(&with_line(1, "URL: ", true)));
        assert_eq!((line, field, kind), (2, "URL", FieldError::Empty));
        let (line, field, _) = field_err(err(&with_line(0, "StorePath: /elsewhere/x", true)));
        assert_eq!((line, field), (1, "StorePath"));
        let (line, field, _) = field_err(err(&with_line(4, "References: nothash", false)));
        assert_eq!((line, field), (5, "References"));
        let (line, field, _) = field_err(err(&with_line(4, "CA: nope", false)));
        assert_eq!((line, field), (5, "CA"));
        let (line, field, _) =
            field_err(err(&with_line(4, "FileSize: 99999999999999999999", false)));
        assert_eq!((line, field), (5, "FileSize"));

        let e = err(&with_line(2, "NarHash: sha256:x", true));
        assert_eq!(e.line(), Some(3));
        assert!(
            e.to_string()
                .starts_with("narinfo line 3, field 'NarHash': "),
            "{e}"
        );
    }

    #[test]
    fn syntax_errors() {
        let syn = |e: NarInfoError| match e {
            NarInfoError::Syntax { line, kind } => (line, kind),
            other => panic!("expected a syntax error, got {other:?}"),
        };
        assert_eq!(
            syn(err(&with_line(2, "", false))),
            (3, SyntaxError::NoSeparator)
        );
        assert_eq!(
            syn(err(&with_line(2, "URL:b", false))),
            (3, SyntaxError::NoSeparator)
        );
        assert_eq!(
            syn(err(&with_line(2, "no colon", false))),
            (3, SyntaxError::NoSeparator)
        );
        assert_eq!(
            syn(err(&with_line(1, ": x", false))),
            (2, SyntaxError::EmptyKey)
        );
        let mut text = with_line(4, "Sig: k:x", false);
        text.pop();
        assert_eq!(syn(err(&text)), (5, SyntaxError::NoNewline));
        let mut bytes = with_line(1, "X: ok", false).into_bytes();
        bytes.extend_from_slice(b"Y: \xff\n");
        assert_eq!(
            syn(NarInfo::parse_bytes(&dir(), &bytes).unwrap_err()),
            (6, SyntaxError::InvalidUtf8)
        );
    }

    #[test]
    fn missing_required_fields() {
        for (i, name) in ["StorePath", "URL", "NarHash", "NarSize"]
            .iter()
            .enumerate()
        {
            let mut lines = good_lines();
            lines.remove(i);
            let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
            let e = err(&text);
            assert_eq!(e, NarInfoError::Missing(name));
            assert_eq!(e.line(), None);
        }
        assert_eq!(err(""), NarInfoError::Missing("StorePath"));
    }

    #[test]
    fn content_addressed_check() {
        let dir = dir();
        let hash = Hash::sha256("hello");
        let ca = ContentAddress::Text(hash.clone());
        let path = dir.make_text_path("t", &hash, &BTreeSet::new()).unwrap();
        let mut n = NarInfo::new(path, "u".into(), Hash::sha256("nar"), 1);
        assert!(!n.is_content_addressed(&dir));
        n.ca = Some(ca);
        assert!(n.is_content_addressed(&dir));
        n.references.insert(StorePath::from_base_name(A).unwrap());
        assert!(!n.is_content_addressed(&dir));
    }
}
