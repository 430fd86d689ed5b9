//! Store derivations: the ATerm `.drv` format, hashing modulo, output paths
//! and resolution, following Nix 2.8.
//!
//! [`Derivation::parse`] reads the `Derive(...)` text that Nix writes into
//! `.drv` files and [`Derivation::to_aterm`] prints it. The parser is
//! deliberately *canonical*: it accepts exactly the texts the printer can
//! produce (sorted, duplicate-free maps and sets, only the escapes `\\ \" \n
//! \r \t`, no raw newline, carriage return or tab inside escaped strings, one
//! comma between list items, nothing after the closing parenthesis). So a
//! successful parse always prints back to the identical bytes, which keeps
//! the `.drv` store path stable. Nix's own parser is more lenient; everything
//! Nix itself writes is canonical.
//!
//! Builder, arguments and environment are byte strings (`Vec<u8>`), because
//! Nix strings need not be UTF-8. System, output names and paths are text.
//! The same model serves the worker protocol: `BuildDerivation` carries a
//! [`BasicDerivation`], and each output travels as the three
//! [`OutputFields`] the `.drv` text holds
//! ([`DerivationOutput::to_fields`], [`DerivationOutput::from_fields`]).
//!
//! Hashing modulo ([`Derivation::hash_modulo`]) needs the hashes of input
//! derivations; callers pass a lookup closure, so this module never reads a
//! store. It does not check that input paths exist, nor that an
//! input-addressed output path matches the derivation (use
//! [`Derivation::compute_input_addressed_outputs`] on a copy for that).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use thiserror::Error;

use crate::hash::{Hash, HashAlgo, HashError};
use crate::store_path::{
    output_path_name, FileIngestionMethod, StoreDir, StorePath, StorePathError, DRV_EXTENSION,
};

/// Why a derivation could not be parsed, classified or hashed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DerivationError {
    /// A fixed piece of syntax was expected.
    #[error("expected '{expected}' at byte {position}")]
    Expected {
        /// The expected text.
        expected: &'static str,
        /// Byte offset in the input.
        position: usize,
    },
    /// A string literal has no closing quote.
    #[error("unterminated string starting at byte {position}")]
    UnterminatedString {
        /// Byte offset of the opening quote.
        position: usize,
    },
    /// An escape other than `\\ \" \n \r \t`.
    #[error("non-canonical escape '\\{}' at byte {position}", char::from(*byte))]
    NonCanonicalEscape {
        /// The byte after the backslash.
        byte: u8,
        /// Byte offset of the backslash.
        position: usize,
    },
    /// A raw newline, carriage return or tab inside an escaped string (Nix
    /// always writes these escaped).
    #[error("raw control byte 0x{byte:02x} inside a string at byte {position}")]
    RawControlByte {
        /// The byte.
        byte: u8,
        /// Its offset.
        position: usize,
    },
    /// A backslash inside a field Nix writes without escaping (output names,
    /// paths, hash fields, system), so the text is ambiguous.
    #[error("backslash in an unescaped field at byte {position}")]
    BackslashInUnescapedField {
        /// Its offset.
        position: usize,
    },
    /// A text field is not valid UTF-8.
    #[error("{field} at byte {position} is not valid UTF-8")]
    NotUtf8 {
        /// Which field.
        field: &'static str,
        /// Offset of the string.
        position: usize,
    },
    /// Input continues after the final `)`.
    #[error("trailing data after the derivation at byte {position}")]
    TrailingData {
        /// Offset of the first extra byte.
        position: usize,
    },
    /// Map keys or set members are not strictly increasing.
    #[error("{what} not sorted or duplicated at byte {position}")]
    NotSorted {
        /// Which collection.
        what: &'static str,
        /// Offset of the offending entry.
        position: usize,
    },
    /// A path does not parse as a store path in this store.
    #[error("bad store path at byte {position}: {source}")]
    BadStorePath {
        /// Offset of the string.
        position: usize,
        /// Why.
        #[source]
        source: StorePathError,
    },
    /// An output's path field (in a derivation not read from ATerm text) is not a store path
    /// of this store.
    #[error("output '{output}' has a bad path: {source}")]
    BadOutputPath {
        /// Output name.
        output: String,
        /// Why.
        #[source]
        source: StorePathError,
    },
    /// An output's hash algorithm field is not a known algorithm.
    #[error("output '{output}' has a bad hash algorithm: {source}")]
    BadHashAlgo {
        /// Output name.
        output: String,
        /// Why.
        #[source]
        source: HashError,
    },
    /// An output's hash field does not parse, or is not lower-case base-16.
    #[error("output '{output}' has a bad hash '{text}'")]
    BadOutputHash {
        /// Output name.
        output: String,
        /// The field.
        text: String,
    },
    /// A floating, impure or deferred output has a path, or an output with
    /// a hash has none.
    #[error("output '{output}' has an unexpected path field '{path}'")]
    UnexpectedOutputPath {
        /// Output name.
        output: String,
        /// The path field.
        path: String,
    },
    /// A fixed output's recorded path differs from the one its hash gives.
    #[error("fixed output '{output}' has path '{found}', but its hash gives '{expected}'")]
    FixedOutputPathMismatch {
        /// Output name.
        output: String,
        /// The computed path.
        expected: String,
        /// The recorded path.
        found: String,
    },
    /// The derivation has no outputs.
    #[error("derivation must have at least one output")]
    NoOutputs,
    /// Outputs of different kinds are mixed.
    #[error("can't mix derivation output types")]
    MixedOutputTypes,
    /// More than one fixed output.
    #[error("only one fixed output is allowed")]
    MultipleFixedOutputs,
    /// The single fixed output is not named `out`.
    #[error("single fixed output must be named \"out\", not '{0}'")]
    FixedOutputNotNamedOut(String),
    /// Floating outputs use different hash algorithms.
    #[error("all floating outputs must use the same hash type")]
    FloatingHashAlgoMismatch,
    /// The lookup closure does not know an input derivation.
    #[error("hash of input derivation '{0}' is unknown")]
    UnknownInputDerivation(StorePath),
    /// An input derivation has no such output.
    #[error("input derivation '{drv}' has no output '{output}'")]
    MissingInputOutput {
        /// The input derivation.
        drv: StorePath,
        /// The output name.
        output: String,
    },
    /// A hash modulo lacks an entry for one of the derivation's outputs.
    #[error("no hash modulo for output '{0}'")]
    MissingOutputHash(String),
    /// Output paths can only be computed this way for input-addressed
    /// derivations.
    #[error("derivation '{0}' is not input-addressed")]
    NotInputAddressed(String),
    /// A `.drv` path was expected.
    #[error("'{0}' is not a derivation path (no .drv suffix)")]
    NotADerivationPath(StorePath),
    /// The text is a derivation, but its text path is another than the one it was given
    /// for.
    #[error("the text given for {expected} is the derivation {actual}")]
    NotItsText {
        /// The path it was given for (its base name).
        expected: String,
        /// The path its text has (its base name).
        actual: String,
    },
    /// Computing a store path failed (e.g. invalid derivation name).
    #[error(transparent)]
    StorePath(#[from] StorePathError),
}

/// One output of a derivation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DerivationOutput {
    /// Path known in advance, computed from the derivation hash modulo.
    InputAddressed(StorePath),
    /// Fixed-output: the content hash is known in advance. `path` is the
    /// path the hash gives (kept so printing needs no recomputation; see
    /// [`DerivationOutput::ca_fixed`]).
    CaFixed {
        /// Flat or recursive.
        method: FileIngestionMethod,
        /// The expected content hash.
        hash: Hash,
        /// The output path the hash gives.
        path: StorePath,
    },
    /// Floating content-addressed: the path is known after the build.
    CaFloating {
        /// Flat or recursive.
        method: FileIngestionMethod,
        /// Hash algorithm of the content address.
        algo: HashAlgo,
    },
    /// Input-addressed, but the path depends on floating outputs of inputs
    /// and is known only after resolution.
    Deferred,
    /// Impure (experimental in Nix 2.8).
    Impure {
        /// Flat or recursive.
        method: FileIngestionMethod,
        /// Hash algorithm.
        algo: HashAlgo,
    },
}

impl DerivationOutput {
    /// A fixed output, computing its path as Nix does.
    pub fn ca_fixed(
        store_dir: &StoreDir,
        drv_name: &str,
        output: &str,
        method: FileIngestionMethod,
        hash: Hash,
    ) -> Result<DerivationOutput, StorePathError> {
        let path = store_dir.make_fixed_output_path(
            method,
            &hash,
            &output_path_name(drv_name, output),
            &BTreeSet::new(),
            false,
        )?;
        Ok(DerivationOutput::CaFixed { method, hash, path })
    }

    /// The path if it is known before building.
    pub fn path(&self) -> Option<&StorePath> {
        match self {
            DerivationOutput::InputAddressed(p) => Some(p),
            DerivationOutput::CaFixed { path, .. } => Some(path),
            _ => None,
        }
    }

    /// The three fields Nix writes for this output, in a `.drv` file and on the wire
    /// alike.
    pub fn to_fields(&self, store_dir: &StoreDir) -> OutputFields {
        let (path, hash_algo, hash) = match self {
            DerivationOutput::InputAddressed(p) => {
                (store_dir.print(p), String::new(), String::new())
            }
            DerivationOutput::CaFixed { method, hash, path } => (
                store_dir.print(path),
                format!("{}{}", method.prefix(), hash.algo()),
                hash.to_base16(),
            ),
            DerivationOutput::CaFloating { method, algo } => (
                String::new(),
                format!("{}{}", method.prefix(), algo),
                String::new(),
            ),
            DerivationOutput::Deferred => (String::new(), String::new(), String::new()),
            DerivationOutput::Impure { method, algo } => (
                String::new(),
                format!("{}{}", method.prefix(), algo),
                "impure".to_owned(),
            ),
        };
        OutputFields {
            path,
            hash_algo,
            hash,
        }
    }

    /// The output `output` of the derivation named `drv_name`, from the three fields Nix
    /// writes (Nix's `parseDerivationOutput`, canonical forms only: a fixed output's hash in
    /// lower-case base-16, and its path the one the hash gives). A path that is not a store
    /// path of `store_dir` is [`DerivationError::BadOutputPath`].
    pub fn from_fields(
        store_dir: &StoreDir,
        drv_name: &str,
        output: &str,
        fields: &OutputFields,
    ) -> Result<DerivationOutput, DerivationError> {
        classify_output(store_dir, drv_name, output, fields, |source| {
            DerivationError::BadOutputPath {
                output: output.to_owned(),
                source,
            }
        })
    }
}

/// The three text fields of a derivation output as Nix writes them: in a `.drv` file
/// (`("out","/nix/store/…","r:sha256","")`) and in `BuildDerivation`'s derivation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OutputFields {
    /// The output path, empty when it is not known before the build.
    pub path: String,
    /// `[r:]<algo>` for content-addressed and impure outputs, else empty.
    pub hash_algo: String,
    /// A fixed output's hash in base-16, `impure` for an impure output, else empty.
    pub hash: String,
}

/// [`DerivationOutput::from_fields`], with the error for a bad path chosen by the caller
/// (the ATerm parser reports its byte position).
fn classify_output(
    store_dir: &StoreDir,
    drv_name: &str,
    name: &str,
    fields: &OutputFields,
    bad_path: impl Fn(StorePathError) -> DerivationError,
) -> Result<DerivationOutput, DerivationError> {
    let OutputFields {
        path,
        hash_algo: algo,
        hash,
    } = fields;
    let parse_path = |p: &str| store_dir.parse(p).map_err(&bad_path);
    let unexpected_path = || DerivationError::UnexpectedOutputPath {
        output: name.to_owned(),
        path: path.clone(),
    };
    let bad_hash = || DerivationError::BadOutputHash {
        output: name.to_owned(),
        text: hash.clone(),
    };
    if algo.is_empty() {
        if !hash.is_empty() {
            return Err(bad_hash());
        }
        return Ok(if path.is_empty() {
            DerivationOutput::Deferred
        } else {
            DerivationOutput::InputAddressed(parse_path(path)?)
        });
    }
    let (method, algo_name) = match algo.strip_prefix("r:") {
        Some(a) => (FileIngestionMethod::Recursive, a),
        None => (FileIngestionMethod::Flat, algo.as_str()),
    };
    let algo: HashAlgo = algo_name
        .parse()
        .map_err(|source| DerivationError::BadHashAlgo {
            output: name.to_owned(),
            source,
        })?;
    if hash == "impure" || hash.is_empty() {
        if !path.is_empty() {
            return Err(unexpected_path());
        }
        return Ok(if hash.is_empty() {
            DerivationOutput::CaFloating { method, algo }
        } else {
            DerivationOutput::Impure { method, algo }
        });
    }
    let h = Hash::parse_unprefixed(hash, algo).map_err(|_| bad_hash())?;
    if h.to_base16() != *hash {
        return Err(bad_hash());
    }
    let found = parse_path(path)?;
    let expected = DerivationOutput::ca_fixed(store_dir, drv_name, name, method, h)?;
    if expected.path() != Some(&found) {
        return Err(DerivationError::FixedOutputPathMismatch {
            output: name.to_owned(),
            expected: expected
                .path()
                .map(|p| store_dir.print(p))
                .unwrap_or_default(),
            found: path.clone(),
        });
    }
    Ok(expected)
}

/// What kind of derivation this is, from its outputs (Nix's
/// `DerivationType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DerivationType {
    /// All outputs input-addressed with known paths.
    InputAddressed,
    /// All outputs input-addressed but deferred.
    DeferredInputAddressed,
    /// A single fixed output named `out`.
    CaFixed,
    /// Floating content-addressed outputs.
    CaFloating,
    /// Impure outputs.
    Impure,
}

/// Whether a hash modulo can be used to compute output paths now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DrvHashKind {
    /// Output paths follow from the hash.
    Regular,
    /// The derivation (or an input) is floating or impure: paths are known
    /// only after resolution.
    Deferred,
}

/// The hash modulo of a derivation, per output (Nix's `DrvHash`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DrvHash {
    /// Hash per output name.
    pub hashes: BTreeMap<String, Hash>,
    /// Regular or deferred.
    pub kind: DrvHashKind,
}

impl DrvHash {
    /// The ids Nix gives the derivation's outputs (its `DrvOutput`s), by output name:
    /// `<algorithm>:<hash in base 16>!<output>`, the keys of realisations.
    pub fn output_ids(&self) -> BTreeMap<String, String> {
        self.hashes
            .iter()
            .map(|(name, hash)| {
                (
                    name.clone(),
                    format!("{}:{}!{name}", hash.algo(), hash.to_base16()),
                )
            })
            .collect()
    }
}

/// The content of a derivation without its input derivations (Nix's
/// `BasicDerivation`): what a resolved derivation is, and what is sent to
/// remote builders.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BasicDerivation {
    /// The derivation name (the `.drv` name without `.drv`).
    pub name: String,
    /// Outputs by name.
    pub outputs: BTreeMap<String, DerivationOutput>,
    /// Input sources (and, once resolved, realised input outputs).
    pub input_srcs: BTreeSet<StorePath>,
    /// Platform, e.g. `x86_64-linux`.
    pub system: String,
    /// Builder program.
    pub builder: Vec<u8>,
    /// Builder arguments.
    pub args: Vec<Vec<u8>>,
    /// Environment.
    pub env: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// A store derivation as written in a `.drv` file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Derivation {
    /// The derivation name (the `.drv` name without `.drv`).
    pub name: String,
    /// Outputs by name.
    pub outputs: BTreeMap<String, DerivationOutput>,
    /// Input derivations with the output names used from each.
    pub input_drvs: BTreeMap<StorePath, BTreeSet<String>>,
    /// Input sources.
    pub input_srcs: BTreeSet<StorePath>,
    /// Platform, e.g. `x86_64-linux`.
    pub system: String,
    /// Builder program.
    pub builder: Vec<u8>,
    /// Builder arguments.
    pub args: Vec<Vec<u8>>,
    /// Environment.
    pub env: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl From<BasicDerivation> for Derivation {
    /// A derivation with no input derivations.
    fn from(b: BasicDerivation) -> Derivation {
        Derivation {
            name: b.name,
            outputs: b.outputs,
            input_drvs: BTreeMap::new(),
            input_srcs: b.input_srcs,
            system: b.system,
            builder: b.builder,
            args: b.args,
            env: b.env,
        }
    }
}

impl BasicDerivation {
    /// A basic derivation of `drv`, dropping its input derivations.
    pub fn from_derivation(drv: &Derivation) -> BasicDerivation {
        BasicDerivation {
            name: drv.name.clone(),
            outputs: drv.outputs.clone(),
            input_srcs: drv.input_srcs.clone(),
            system: drv.system.clone(),
            builder: drv.builder.clone(),
            args: drv.args.clone(),
            env: drv.env.clone(),
        }
    }

    /// The ATerm text of this derivation with an empty input derivation
    /// list.
    pub fn to_aterm(&self, store_dir: &StoreDir) -> Vec<u8> {
        Derivation::from(self.clone()).to_aterm(store_dir)
    }
}

/// `/<nixbase32 sha256("nix-output:<output>")>`: the placeholder for an
/// output of the derivation itself (`builtins.placeholder`), used in the
/// environment of floating content-addressed derivations.
pub fn hash_placeholder(output: &str) -> String {
    format!(
        "/{}",
        Hash::sha256(format!("nix-output:{output}")).to_nixbase32()
    )
}

/// The placeholder a downstream derivation uses for output `output` of the
/// not-yet-built input derivation `drv_path`:
/// `/<nixbase32 sha256("nix-upstream-output:<hash part>:<output path name>")>`.
pub fn downstream_placeholder(drv_path: &StorePath, output: &str) -> String {
    // Nix strips the last four characters without checking for ".drv".
    let name = drv_path.name();
    let drv_name = name
        .get(..name.len().saturating_sub(DRV_EXTENSION.len()))
        .unwrap_or("");
    let clear = format!(
        "nix-upstream-output:{}:{}",
        drv_path.hash_part(),
        output_path_name(drv_name, output)
    );
    format!("/{}", Hash::sha256(clear).to_nixbase32())
}

/// The store path of a floating content-addressed output once built:
/// `makeFixedOutputPath(method, hash, <drv name>[-<output>], refs, self)`.
pub fn floating_output_path(
    store_dir: &StoreDir,
    drv_name: &str,
    output: &str,
    method: FileIngestionMethod,
    content_hash: &Hash,
    references: &BTreeSet<StorePath>,
    has_self_reference: bool,
) -> Result<StorePath, StorePathError> {
    store_dir.make_fixed_output_path(
        method,
        content_hash,
        &output_path_name(drv_name, output),
        references,
        has_self_reference,
    )
}

/// Replaces every occurrence of each key of `rewrites` (in key order) by its
/// value, as Nix's `rewriteStrings` does: after a replacement the search
/// resumes at the start of the replacement. Where that would loop forever in
/// Nix, we differ: an empty key is ignored, and after replacing a key by a
/// value that contains it, the search resumes after the replacement.
pub fn rewrite_strings(s: &[u8], rewrites: &BTreeMap<Vec<u8>, Vec<u8>>) -> Vec<u8> {
    let mut s = s.to_vec();
    for (from, to) in rewrites {
        if from == to || from.is_empty() {
            continue;
        }
        let rescans = find(to, from, 0).is_none();
        let mut j = 0;
        while let Some(k) = find(&s, from, j) {
            s.splice(k..k + from.len(), to.iter().copied());
            j = if rescans { k } else { k + to.len() };
        }
    }
    s
}

/// First occurrence of `needle` in `hay` at or after `from`.
fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if from > hay.len() {
        return None;
    }
    if needle.is_empty() {
        return Some(from);
    }
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

impl Derivation {
    /// Parses the `.drv` text of a derivation named `name` (its `.drv` file
    /// name without `.drv`). Fixed outputs' recorded paths are checked
    /// against their hashes.
    pub fn parse(
        store_dir: &StoreDir,
        name: &str,
        text: &[u8],
    ) -> Result<Derivation, DerivationError> {
        let mut p = Parser {
            input: text,
            pos: 0,
            store_dir,
        };
        let drv = p.derivation(name)?;
        if p.pos != text.len() {
            return Err(DerivationError::TrailingData { position: p.pos });
        }
        Ok(drv)
    }

    /// Parses the contents of the `.drv` file at `drv_path`, taking the
    /// derivation name from the path.
    pub fn parse_at(
        store_dir: &StoreDir,
        drv_path: &StorePath,
        text: &[u8],
    ) -> Result<Derivation, DerivationError> {
        let name = drv_path
            .derivation_name()
            .ok_or_else(|| DerivationError::NotADerivationPath(drv_path.clone()))?;
        Derivation::parse(store_dir, name, text)
    }

    /// Parses `text` as the `.drv` file at `drv_path`, from anyone: only if it is that
    /// derivation's text (its text path, computed over it with its inputs as references, is
    /// `drv_path`), so nobody can make another derivation pass as it.
    pub fn parse_checked(
        store_dir: &StoreDir,
        drv_path: &StorePath,
        text: &[u8],
    ) -> Result<Derivation, DerivationError> {
        let drv = Derivation::parse_at(store_dir, drv_path, text)?;
        let actual = drv.drv_path(store_dir)?;
        if actual != *drv_path {
            return Err(DerivationError::NotItsText {
                expected: drv_path.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok(drv)
    }

    /// The ATerm text, exactly as Nix writes it into the `.drv` file.
    pub fn to_aterm(&self, store_dir: &StoreDir) -> Vec<u8> {
        self.unparse(store_dir, false, None)
    }

    /// Nix's `unparse`: with `mask_outputs`, output paths and the
    /// environment variables named after outputs are blanked; with
    /// `actual_inputs`, the input derivation list is replaced by those
    /// (already sorted) string keys.
    fn unparse(
        &self,
        store_dir: &StoreDir,
        mask_outputs: bool,
        actual_inputs: Option<&BTreeMap<String, BTreeSet<String>>>,
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(1024);
        out.extend_from_slice(b"Derive([");
        for (i, (name, output)) in self.outputs.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            let mut fields = output.to_fields(store_dir);
            if mask_outputs {
                fields.path.clear();
            }
            out.push(b'(');
            unquoted(&mut out, name.as_bytes());
            for f in [fields.path, fields.hash_algo, fields.hash] {
                out.push(b',');
                unquoted(&mut out, f.as_bytes());
            }
            out.push(b')');
        }
        out.extend_from_slice(b"],[");
        let mut first = true;
        let mut input = |out: &mut Vec<u8>, key: &[u8], outputs: &BTreeSet<String>| {
            if !first {
                out.push(b',');
            }
            first = false;
            out.push(b'(');
            unquoted(out, key);
            out.extend_from_slice(b",[");
            for (i, o) in outputs.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                unquoted(out, o.as_bytes());
            }
            out.extend_from_slice(b"])");
        };
        match actual_inputs {
            Some(inputs) => {
                for (key, outputs) in inputs {
                    input(&mut out, key.as_bytes(), outputs);
                }
            }
            None => {
                for (path, outputs) in &self.input_drvs {
                    input(&mut out, store_dir.print(path).as_bytes(), outputs);
                }
            }
        }
        out.extend_from_slice(b"],[");
        for (i, p) in self.input_srcs.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            unquoted(&mut out, store_dir.print(p).as_bytes());
        }
        out.extend_from_slice(b"],");
        unquoted(&mut out, self.system.as_bytes());
        out.push(b',');
        escaped(&mut out, &self.builder);
        out.extend_from_slice(b",[");
        for (i, a) in self.args.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            escaped(&mut out, a);
        }
        out.extend_from_slice(b"],[");
        for (i, (k, v)) in self.env.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.push(b'(');
            escaped(&mut out, k);
            out.push(b',');
            let masked =
                mask_outputs && std::str::from_utf8(k).is_ok_and(|k| self.outputs.contains_key(k));
            escaped(&mut out, if masked { b"" } else { v });
            out.push(b')');
        }
        out.extend_from_slice(b"])");
        out
    }

    /// The store path of the `.drv` file: a text path over the ATerm with
    /// the input sources and input derivations as references.
    pub fn drv_path(&self, store_dir: &StoreDir) -> Result<StorePath, DerivationError> {
        let mut refs = self.input_srcs.clone();
        refs.extend(self.input_drvs.keys().cloned());
        Ok(store_dir.compute_text_path(
            &format!("{}{DRV_EXTENSION}", self.name),
            &self.to_aterm(store_dir),
            &refs,
        )?)
    }

    /// Looks up an environment variable by name, as text if it is UTF-8.
    pub fn env_str(&self, key: &str) -> Option<&str> {
        self.env
            .get(key.as_bytes())
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Classifies the derivation from its outputs, with Nix's errors for
    /// inconsistent combinations.
    pub fn derivation_type(&self) -> Result<DerivationType, DerivationError> {
        derivation_type(&self.outputs)
    }

    /// Nix's `hashDerivationModulo`.
    ///
    /// `lookup` returns the hash modulo of an input derivation, computed
    /// with `mask_outputs = false` (callers usually memoise these). Output
    /// paths are computed from the result with `mask_outputs = true`.
    pub fn hash_modulo(
        &self,
        store_dir: &StoreDir,
        mask_outputs: bool,
        mut lookup: impl FnMut(&StorePath) -> Option<DrvHash>,
    ) -> Result<DrvHash, DerivationError> {
        let kind = match self.derivation_type()? {
            DerivationType::CaFixed => {
                let mut hashes = BTreeMap::new();
                for (name, output) in &self.outputs {
                    if let DerivationOutput::CaFixed { method, hash, path } = output {
                        let text = format!(
                            "fixed:out:{}{}:{}:{}",
                            method.prefix(),
                            hash.algo(),
                            hash.to_base16(),
                            store_dir.print(path)
                        );
                        hashes.insert(name.clone(), Hash::sha256(text));
                    }
                }
                return Ok(DrvHash {
                    hashes,
                    kind: DrvHashKind::Regular,
                });
            }
            DerivationType::Impure => {
                let h = Hash::sha256(b"impure");
                let hashes = self
                    .outputs
                    .keys()
                    .map(|k| (k.clone(), h.clone()))
                    .collect();
                return Ok(DrvHash {
                    hashes,
                    kind: DrvHashKind::Deferred,
                });
            }
            DerivationType::CaFloating => DrvHashKind::Deferred,
            DerivationType::InputAddressed | DerivationType::DeferredInputAddressed => {
                DrvHashKind::Regular
            }
        };
        let mut kind = kind;
        let mut inputs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (drv_path, outputs) in &self.input_drvs {
            let res = lookup(drv_path)
                .ok_or_else(|| DerivationError::UnknownInputDerivation(drv_path.clone()))?;
            if res.kind == DrvHashKind::Deferred {
                kind = DrvHashKind::Deferred;
            }
            for output in outputs {
                let h =
                    res.hashes
                        .get(output)
                        .ok_or_else(|| DerivationError::MissingInputOutput {
                            drv: drv_path.clone(),
                            output: output.clone(),
                        })?;
                inputs
                    .entry(h.to_base16())
                    .or_default()
                    .insert(output.clone());
            }
        }
        let h = Hash::sha256(self.unparse(store_dir, mask_outputs, Some(&inputs)));
        let hashes = self
            .outputs
            .keys()
            .map(|k| (k.clone(), h.clone()))
            .collect();
        Ok(DrvHash { hashes, kind })
    }

    /// Computes input-addressed output paths the way `derivationStrict`
    /// does: every output is first made deferred with an empty environment
    /// variable; if the masked hash modulo is regular, each output gets
    /// `makeOutputPath(output, hash, name)` and its environment variable is
    /// set to that path. Otherwise the outputs stay deferred. Returns the
    /// kind. Errors if the derivation is content-addressed or impure.
    pub fn compute_input_addressed_outputs(
        &mut self,
        store_dir: &StoreDir,
        lookup: impl FnMut(&StorePath) -> Option<DrvHash>,
    ) -> Result<DrvHashKind, DerivationError> {
        match self.derivation_type()? {
            DerivationType::InputAddressed | DerivationType::DeferredInputAddressed => {}
            _ => return Err(DerivationError::NotInputAddressed(self.name.clone())),
        }
        for (name, output) in self.outputs.iter_mut() {
            *output = DerivationOutput::Deferred;
            self.env.insert(name.as_bytes().to_vec(), Vec::new());
        }
        let h = self.hash_modulo(store_dir, true, lookup)?;
        if h.kind == DrvHashKind::Regular {
            self.fill_deferred_outputs(store_dir, &h)?;
        }
        Ok(h.kind)
    }

    /// Replaces each deferred output with its input-addressed path from `h`
    /// and sets its environment variable.
    fn fill_deferred_outputs(
        &mut self,
        store_dir: &StoreDir,
        h: &DrvHash,
    ) -> Result<(), DerivationError> {
        for (name, output) in self.outputs.iter_mut() {
            if *output != DerivationOutput::Deferred {
                continue;
            }
            let hash = h
                .hashes
                .get(name)
                .ok_or_else(|| DerivationError::MissingOutputHash(name.clone()))?;
            let path = store_dir.make_output_path(name, hash, &self.name)?;
            self.env.insert(
                name.as_bytes().to_vec(),
                store_dir.print(&path).into_bytes(),
            );
            *output = DerivationOutput::InputAddressed(path);
        }
        Ok(())
    }

    /// Nix 2.8's `Derivation::tryResolve`: replaces every input derivation
    /// output by its realised path. `lookup(drv, output)` gives the realised
    /// path; if any is missing, returns `Ok(None)`. Each realised path is
    /// added to the input sources, the downstream placeholder of each input
    /// output is rewritten to its path in builder, arguments and environment
    /// (names and values), and deferred outputs get their input-addressed
    /// paths from the resolved derivation's masked hash.
    pub fn try_resolve(
        &self,
        store_dir: &StoreDir,
        lookup: impl FnMut(&StorePath, &str) -> Option<StorePath>,
    ) -> Result<Option<BasicDerivation>, DerivationError> {
        let mut drv = self.resolve_some(store_dir, lookup, |_| None);
        if !drv.input_drvs.is_empty() {
            return Ok(None);
        }
        let h = drv.hash_modulo(store_dir, true, |_| None)?;
        drv.fill_deferred_outputs(store_dir, &h)?;
        Ok(Some(BasicDerivation::from_derivation(&drv)))
    }

    /// Resolve what is known, rename the rest: each input derivation whose
    /// used outputs `lookup` all knows is replaced as [`Derivation::try_resolve`]
    /// replaces it (its paths become input sources, its downstream
    /// placeholders those paths); every other one stays an input derivation,
    /// under the path `rename` gives it (if any), its downstream placeholders
    /// rewritten to the new path's. Outputs are left as they are. Resolving
    /// the result with the renamed inputs' outputs gives what resolving
    /// `self` with all of them gives.
    pub fn resolve_some(
        &self,
        store_dir: &StoreDir,
        mut lookup: impl FnMut(&StorePath, &str) -> Option<StorePath>,
        mut rename: impl FnMut(&StorePath) -> Option<StorePath>,
    ) -> Derivation {
        let mut resolved = self.clone();
        resolved.input_drvs = BTreeMap::new();
        let mut rewrites: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for (drv, outputs) in &self.input_drvs {
            let known: Option<Vec<(&String, StorePath)>> =
                outputs.iter().map(|o| Some((o, lookup(drv, o)?))).collect();
            match known {
                Some(known) => {
                    for (output, actual) in known {
                        rewrites
                            .entry(downstream_placeholder(drv, output).into_bytes())
                            .or_insert_with(|| store_dir.print(&actual).into_bytes());
                        resolved.input_srcs.insert(actual);
                    }
                }
                None => {
                    let to = rename(drv).unwrap_or_else(|| drv.clone());
                    if to != *drv {
                        for output in outputs {
                            rewrites
                                .entry(downstream_placeholder(drv, output).into_bytes())
                                .or_insert_with(|| {
                                    downstream_placeholder(&to, output).into_bytes()
                                });
                        }
                    }
                    resolved
                        .input_drvs
                        .entry(to)
                        .or_default()
                        .extend(outputs.iter().cloned());
                }
            }
        }
        resolved.builder = rewrite_strings(&resolved.builder, &rewrites);
        for arg in resolved.args.iter_mut() {
            *arg = rewrite_strings(arg, &rewrites);
        }
        let mut env = BTreeMap::new();
        for (k, v) in &resolved.env {
            // On a name collision the first (in original order) wins.
            env.entry(rewrite_strings(k, &rewrites))
                .or_insert_with(|| rewrite_strings(v, &rewrites));
        }
        resolved.env = env;
        resolved
    }
}

fn derivation_type(
    outputs: &BTreeMap<String, DerivationOutput>,
) -> Result<DerivationType, DerivationError> {
    let (mut ia, mut fixed, mut floating, mut deferred, mut impure) = (0, 0, 0, 0, 0);
    let mut floating_algo = None;
    let mut fixed_name = None;
    for (name, o) in outputs {
        match o {
            DerivationOutput::InputAddressed(_) => ia += 1,
            DerivationOutput::CaFixed { .. } => {
                fixed += 1;
                fixed_name.get_or_insert(name);
            }
            DerivationOutput::CaFloating { algo, .. } => {
                floating += 1;
                if *floating_algo.get_or_insert(*algo) != *algo {
                    return Err(DerivationError::FloatingHashAlgoMismatch);
                }
            }
            DerivationOutput::Deferred => deferred += 1,
            DerivationOutput::Impure { .. } => impure += 1,
        }
    }
    let total = outputs.len();
    if total == 0 {
        return Err(DerivationError::NoOutputs);
    }
    if ia == total {
        Ok(DerivationType::InputAddressed)
    } else if fixed == total {
        if fixed > 1 {
            return Err(DerivationError::MultipleFixedOutputs);
        }
        match fixed_name {
            Some(n) if n != "out" => Err(DerivationError::FixedOutputNotNamedOut(n.clone())),
            _ => Ok(DerivationType::CaFixed),
        }
    } else if floating == total {
        Ok(DerivationType::CaFloating)
    } else if deferred == total {
        Ok(DerivationType::DeferredInputAddressed)
    } else if impure == total {
        Ok(DerivationType::Impure)
    } else {
        Err(DerivationError::MixedOutputTypes)
    }
}

/// Appends `"s"` without escaping (Nix's `printUnquotedString`).
fn unquoted(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    out.extend_from_slice(s);
    out.push(b'"');
}

/// Appends `"s"` escaping `" \ \n \r \t` (Nix's `printString`).
fn escaped(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    for &c in s {
        match c {
            b'"' | b'\\' => out.extend_from_slice(&[b'\\', c]),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => out.push(c),
        }
    }
    out.push(b'"');
}

struct Parser<'a> {
    input: &'a [u8],
    pos: usize,
    store_dir: &'a StoreDir,
}

impl<'a> Parser<'a> {
    fn expect(&mut self, lit: &'static str) -> Result<(), DerivationError> {
        if self.input[self.pos..].starts_with(lit.as_bytes()) {
            self.pos += lit.len();
            Ok(())
        } else {
            Err(DerivationError::Expected {
                expected: lit,
                position: self.pos,
            })
        }
    }

    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }

    /// Parses `[item,item,…]`, calling `item` for each element.
    fn list(
        &mut self,
        mut item: impl FnMut(&mut Self) -> Result<(), DerivationError>,
    ) -> Result<(), DerivationError> {
        self.expect("[")?;
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            item(self)?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => {
                    return Err(DerivationError::Expected {
                        expected: "',' or ']'",
                        position: self.pos,
                    })
                }
            }
        }
    }

    /// A string Nix writes with `printString`.
    fn escaped(&mut self) -> Result<Vec<u8>, DerivationError> {
        let start = self.pos;
        self.expect("\"")?;
        let mut out = Vec::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(DerivationError::UnterminatedString { position: start });
            };
            match c {
                b'"' => {
                    self.pos += 1;
                    return Ok(out);
                }
                b'\\' => {
                    let Some(e) = self.input.get(self.pos + 1).copied() else {
                        return Err(DerivationError::UnterminatedString { position: start });
                    };
                    out.push(match e {
                        b'"' | b'\\' => e,
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        _ => {
                            return Err(DerivationError::NonCanonicalEscape {
                                byte: e,
                                position: self.pos,
                            })
                        }
                    });
                    self.pos += 2;
                }
                b'\n' | b'\r' | b'\t' => {
                    return Err(DerivationError::RawControlByte {
                        byte: c,
                        position: self.pos,
                    })
                }
                _ => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
    }

    /// A string Nix writes with `printUnquotedString`, as UTF-8 text.
    fn unquoted(&mut self, field: &'static str) -> Result<&'a str, DerivationError> {
        let start = self.pos;
        self.expect("\"")?;
        let rest = &self.input[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'"')
            .ok_or(DerivationError::UnterminatedString { position: start })?;
        let bytes = &rest[..end];
        if let Some(b) = bytes.iter().position(|&b| b == b'\\') {
            return Err(DerivationError::BackslashInUnescapedField {
                position: self.pos + b,
            });
        }
        self.pos += end + 1;
        std::str::from_utf8(bytes).map_err(|_| DerivationError::NotUtf8 {
            field,
            position: start,
        })
    }

    fn store_path(&mut self, field: &'static str) -> Result<StorePath, DerivationError> {
        let position = self.pos;
        let s = self.unquoted(field)?;
        self.store_dir
            .parse(s)
            .map_err(|source| DerivationError::BadStorePath { position, source })
    }

    fn output(&mut self, drv_name: &str) -> Result<(String, DerivationOutput), DerivationError> {
        self.expect("(")?;
        let name = self.unquoted("output name")?.to_owned();
        self.expect(",")?;
        let path_pos = self.pos;
        let path = self.unquoted("output path")?.to_owned();
        self.expect(",")?;
        let hash_algo = self.unquoted("output hash algorithm")?.to_owned();
        self.expect(",")?;
        let hash = self.unquoted("output hash")?.to_owned();
        self.expect(")")?;
        let fields = OutputFields {
            path,
            hash_algo,
            hash,
        };
        let output = classify_output(self.store_dir, drv_name, &name, &fields, |source| {
            DerivationError::BadStorePath {
                position: path_pos,
                source,
            }
        })?;
        Ok((name, output))
    }

    fn derivation(&mut self, name: &str) -> Result<Derivation, DerivationError> {
        self.expect("Derive(")?;
        let mut outputs = BTreeMap::new();
        self.list(|p| {
            let position = p.pos;
            let (k, v) = p.output(name)?;
            insert_sorted(&mut outputs, k, v, "outputs", position)
        })?;
        self.expect(",")?;
        let mut input_drvs = BTreeMap::new();
        self.list(|p| {
            let position = p.pos;
            p.expect("(")?;
            let path = p.store_path("input derivation")?;
            p.expect(",")?;
            let mut names = BTreeSet::new();
            p.list(|p| {
                let position = p.pos;
                let n = p.unquoted("input output name")?.to_owned();
                insert_sorted_set(&mut names, n, "input derivation outputs", position)
            })?;
            p.expect(")")?;
            insert_sorted(&mut input_drvs, path, names, "input derivations", position)
        })?;
        self.expect(",")?;
        let mut input_srcs = BTreeSet::new();
        self.list(|p| {
            let position = p.pos;
            let path = p.store_path("input source")?;
            insert_sorted_set(&mut input_srcs, path, "input sources", position)
        })?;
        self.expect(",")?;
        let system = self.unquoted("system")?.to_owned();
        self.expect(",")?;
        let builder = self.escaped()?;
        self.expect(",")?;
        let mut args = Vec::new();
        self.list(|p| {
            args.push(p.escaped()?);
            Ok(())
        })?;
        self.expect(",")?;
        let mut env = BTreeMap::new();
        self.list(|p| {
            let position = p.pos;
            p.expect("(")?;
            let k = p.escaped()?;
            p.expect(",")?;
            let v = p.escaped()?;
            p.expect(")")?;
            insert_sorted(&mut env, k, v, "environment", position)
        })?;
        self.expect(")")?;
        Ok(Derivation {
            name: name.to_owned(),
            outputs,
            input_drvs,
            input_srcs,
            system,
            builder,
            args,
            env,
        })
    }
}

fn insert_sorted<K: Ord, V>(
    map: &mut BTreeMap<K, V>,
    k: K,
    v: V,
    what: &'static str,
    position: usize,
) -> Result<(), DerivationError> {
    if map.last_key_value().is_some_and(|(last, _)| *last >= k) {
        return Err(DerivationError::NotSorted { what, position });
    }
    map.insert(k, v);
    Ok(())
}

fn insert_sorted_set<K: Ord>(
    set: &mut BTreeSet<K>,
    k: K,
    what: &'static str,
    position: usize,
) -> Result<(), DerivationError> {
    if set.last().is_some_and(|last| *last >= k) {
        return Err(DerivationError::NotSorted { what, position });
    }
    set.insert(k);
    Ok(())
}

impl fmt::Display for DerivationType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DerivationType::InputAddressed => "input-addressed",
            DerivationType::DeferredInputAddressed => "deferred input-addressed",
            DerivationType::CaFixed => "fixed-output",
            DerivationType::CaFloating => "floating content-addressed",
            DerivationType::Impure => "impure",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written by `nix-instantiate` (Nix 2.8) with store dir `/tmp/nfx/s/store`.
    const A: &str = r#"Derive([("out","/tmp/nfx/s/store/6xh0imr7n3xw0idh4rmf6fj085vd2y90-a","","")],[],[],"x86_64-linux","/bin/sh",["-c","echo hi > $out"],[("builder","/bin/sh"),("name","a"),("out","/tmp/nfx/s/store/6xh0imr7n3xw0idh4rmf6fj085vd2y90-a"),("system","x86_64-linux")])"#;
    const A_PATH: &str = "14qrx94p9s512qalpr26gss36w2v8hyi-a.drv";
    const F: &str = r#"Derive([("out","/tmp/nfx/s/store/a91pdhp1hm1x7hygd0iv1apqa4xxs6sd-f","sha256","2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881")],[],[],"x86_64-linux","/bin/sh",["-c","printf x > $out"],[("builder","/bin/sh"),("name","f"),("out","/tmp/nfx/s/store/a91pdhp1hm1x7hygd0iv1apqa4xxs6sd-f"),("outputHash","2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"),("outputHashAlgo","sha256"),("outputHashMode","flat"),("system","x86_64-linux")])"#;
    const CA: &str = r#"Derive([("out","","r:sha256","")],[("/tmp/nfx/s/store/14qrx94p9s512qalpr26gss36w2v8hyi-a.drv",["out"])],[],"x86_64-linux","/bin/sh",["-c","mkdir $out; echo /tmp/nfx/s/store/6xh0imr7n3xw0idh4rmf6fj085vd2y90-a > $out/x"],[("builder","/bin/sh"),("name","ca"),("out","/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"),("outputHashAlgo","sha256"),("outputHashMode","recursive"),("system","x86_64-linux")])"#;
    const CA_PATH: &str = "925j1v50v99vgjpjsq2zsv19m88brll1-ca.drv";

    fn dir() -> StoreDir {
        StoreDir::new("/tmp/nfx/s/store").unwrap()
    }

    fn parse(name: &str, text: &str) -> Result<Derivation, DerivationError> {
        Derivation::parse(&dir(), name, text.as_bytes())
    }

    #[test]
    fn round_trips_and_paths() {
        for (name, text, path) in [("a", A, A_PATH), ("ca", CA, CA_PATH)] {
            let drv = parse(name, text).unwrap();
            assert_eq!(drv.to_aterm(&dir()), text.as_bytes());
            assert_eq!(drv.drv_path(&dir()).unwrap().to_string(), path);
        }
        let f = parse("f", F).unwrap();
        assert_eq!(f.to_aterm(&dir()), F.as_bytes());
        assert_eq!(f.derivation_type().unwrap(), DerivationType::CaFixed);
    }

    #[test]
    fn computes_input_addressed_outputs() {
        let drv = parse("a", A).unwrap();
        let mut fresh = drv.clone();
        let kind = fresh
            .compute_input_addressed_outputs(&dir(), |_| None)
            .unwrap();
        assert_eq!(kind, DrvHashKind::Regular);
        assert_eq!(fresh, drv);
    }

    #[test]
    fn hash_modulo_needs_inputs() {
        let ca = parse("ca", CA).unwrap();
        let a_path: StorePath = A_PATH.parse().unwrap();
        assert_eq!(
            ca.hash_modulo(&dir(), true, |_| None),
            Err(DerivationError::UnknownInputDerivation(a_path.clone()))
        );
        let a = parse("a", A).unwrap();
        let a_hash = a.hash_modulo(&dir(), false, |_| None).unwrap();
        let h = ca
            .hash_modulo(&dir(), true, |p| (*p == a_path).then(|| a_hash.clone()))
            .unwrap();
        assert_eq!(h.kind, DrvHashKind::Deferred);
        let mut no_out = a_hash.clone();
        no_out.hashes.clear();
        assert!(matches!(
            ca.hash_modulo(&dir(), true, |_| Some(no_out.clone())),
            Err(DerivationError::MissingInputOutput { .. })
        ));
        assert!(matches!(
            ca.clone().compute_input_addressed_outputs(&dir(), |_| None),
            Err(DerivationError::NotInputAddressed(_))
        ));
    }

    #[test]
    fn placeholders() {
        assert_eq!(
            hash_placeholder("out"),
            "/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"
        );
        // From a `.drv` Nix wrote that refers to `${ca}` (output `out`).
        let ca_path: StorePath = CA_PATH.parse().unwrap();
        assert_eq!(
            downstream_placeholder(&ca_path, "out"),
            "/07jk4nafhs5czs3vzf06vyk9c250fskm036ki2akrhs9qkxac3cf"
        );
    }

    #[test]
    fn resolves() {
        let ca = parse("ca", CA).unwrap();
        let a_out: StorePath = "6xh0imr7n3xw0idh4rmf6fj085vd2y90-a".parse().unwrap();
        assert_eq!(ca.try_resolve(&dir(), |_, _| None).unwrap(), None);
        let r = ca
            .try_resolve(&dir(), |_, o| (o == "out").then(|| a_out.clone()))
            .unwrap()
            .unwrap();
        assert_eq!(r.input_srcs, BTreeSet::from([a_out]));
        assert!(r
            .to_aterm(&dir())
            .starts_with(b"Derive([(\"out\",\"\",\"r:sha256\",\"\")],[],["));
    }

    #[test]
    fn rewrites_like_nix() {
        let map = |pairs: &[(&str, &str)]| -> BTreeMap<Vec<u8>, Vec<u8>> {
            pairs
                .iter()
                .map(|(a, b)| (a.as_bytes().to_vec(), b.as_bytes().to_vec()))
                .collect()
        };
        assert_eq!(rewrite_strings(b"xaay", &map(&[("a", "b")])), b"xbby");
        // Nix rescans from the start of the replacement.
        assert_eq!(rewrite_strings(b"abb", &map(&[("ab", "a")])), b"a");
        assert_eq!(rewrite_strings(b"abbb", &map(&[("ab", "ca")])), b"ccca");
        // Would loop forever in Nix; we stop.
        assert_eq!(rewrite_strings(b"a", &map(&[("a", "aa")])), b"aa");
        assert_eq!(rewrite_strings(b"ab", &map(&[("", "x")])), b"ab");
        // Keys apply in sorted order.
        assert_eq!(rewrite_strings(b"a", &map(&[("b", "c"), ("a", "b")])), b"c");
    }

    #[test]
    fn escapes() {
        let mut drv = parse("a", A).unwrap();
        drv.env
            .insert(b"k\"\\\n\r\t".to_vec(), "ü \x01 \\n".as_bytes().to_vec());
        drv.args.push(vec![0xff, b'"']);
        let text = drv.to_aterm(&dir());
        let s = String::from_utf8_lossy(&text);
        assert!(s.contains(r#"("k\"\\\n\r\t","ü "#), "{s}");
        assert_eq!(Derivation::parse(&dir(), "a", &text).unwrap(), drv);
    }

    fn err(text: &str) -> DerivationError {
        parse("a", text).unwrap_err()
    }

    #[test]
    fn syntax_errors() {
        assert_eq!(
            err("Derivex"),
            DerivationError::Expected {
                expected: "Derive(",
                position: 0
            }
        );
        assert!(matches!(
            err(&format!("{A} ")),
            DerivationError::TrailingData { .. }
        ));
        assert!(matches!(
            err(&A.replace("\"-c\",\"echo", "\"-c\" \"echo")),
            DerivationError::Expected {
                expected: "',' or ']'",
                ..
            }
        ));
        assert!(matches!(
            err(&A[..A.len() - 10]),
            DerivationError::UnterminatedString { .. } | DerivationError::Expected { .. }
        ));
        assert!(matches!(
            err(&A.replace("echo hi", "echo\\x hi")),
            DerivationError::NonCanonicalEscape { byte: b'x', .. }
        ));
        assert!(matches!(
            err(&A.replace("echo hi", "echo\nhi")),
            DerivationError::RawControlByte { byte: b'\n', .. }
        ));
        assert!(matches!(
            err(&A.replace("x86_64-linux\",\"/bin", "x86\\_64-linux\",\"/bin")),
            DerivationError::BackslashInUnescapedField { .. }
        ));
        let bad_utf8 = [&A.as_bytes()[..8], b"(\"\xff\"", &A.as_bytes()[14..]].concat();
        assert!(matches!(
            Derivation::parse(&dir(), "a", &bad_utf8),
            Err(DerivationError::NotUtf8 { .. }) | Err(DerivationError::Expected { .. })
        ));
    }

    #[test]
    fn canonical_order_errors() {
        let swapped = A.replace(
            r#"("builder","/bin/sh"),("name","a")"#,
            r#"("name","a"),("builder","/bin/sh")"#,
        );
        assert!(matches!(
            err(&swapped),
            DerivationError::NotSorted {
                what: "environment",
                ..
            }
        ));
        let dup = A.replace(r#"("name","a")"#, r#"("name","a"),("name","a")"#);
        assert!(matches!(err(&dup), DerivationError::NotSorted { .. }));
        let dup_out = A.replace("[(\"out\"", "[(\"out\",\"\",\"\",\"\"),(\"out\"");
        assert!(matches!(
            err(&dup_out),
            DerivationError::NotSorted {
                what: "outputs",
                ..
            }
        ));
    }

    #[test]
    fn output_errors() {
        assert!(matches!(
            err(&A.replace("/tmp/nfx/s/store/6xh", "/nix/store/6xh")),
            DerivationError::BadStorePath { .. }
        ));
        let f = |from: &str, to: &str| parse("f", &F.replacen(from, to, 1)).unwrap_err();
        assert!(matches!(
            f("\"sha256\",", "\"sha257\","),
            DerivationError::BadHashAlgo { .. }
        ));
        assert!(matches!(
            f("2d711642", "2D711642"),
            DerivationError::BadOutputHash { .. }
        ));
        assert!(matches!(
            f("2d711642", "3d711642"),
            DerivationError::FixedOutputPathMismatch { .. }
        ));
        let ca = |from: &str, to: &str| parse("ca", &CA.replacen(from, to, 1)).unwrap_err();
        assert!(matches!(
            ca("(\"out\",\"\",\"r:sha256\"", "(\"out\",\"/x\",\"r:sha256\""),
            DerivationError::UnexpectedOutputPath { .. }
        ));
        assert!(matches!(
            err(&A.replace("a\",\"\",\"\")", "a\",\"\",\"h\")")),
            DerivationError::BadOutputHash { .. }
        ));
        assert!(matches!(
            Derivation::parse_at(
                &dir(),
                &"6xh0imr7n3xw0idh4rmf6fj085vd2y90-a".parse().unwrap(),
                A.as_bytes()
            ),
            Err(DerivationError::NotADerivationPath(_))
        ));
    }

    #[test]
    fn output_fields_round_trip_and_name_a_bad_path() {
        for (name, text) in [("a", A), ("f", F), ("ca", CA)] {
            for (output, o) in parse(name, text).unwrap().outputs {
                let fields = o.to_fields(&dir());
                assert_eq!(
                    DerivationOutput::from_fields(&dir(), name, &output, &fields),
                    Ok(o)
                );
            }
        }
        let fields = OutputFields {
            path: "/nix/store/6xh0imr7n3xw0idh4rmf6fj085vd2y90-a".to_owned(),
            ..OutputFields::default()
        };
        assert!(matches!(
            DerivationOutput::from_fields(&dir(), "a", "out", &fields),
            Err(DerivationError::BadOutputPath { .. })
        ));
    }

    #[test]
    fn type_errors() {
        let a = parse("a", A).unwrap();
        let f = parse("f", F).unwrap();
        let mut d = a.clone();
        d.outputs.clear();
        assert_eq!(d.derivation_type(), Err(DerivationError::NoOutputs));
        d.outputs = a.outputs.clone();
        d.outputs.insert("dev".into(), DerivationOutput::Deferred);
        assert_eq!(d.derivation_type(), Err(DerivationError::MixedOutputTypes));
        let fixed = f.outputs["out"].clone();
        d.outputs = BTreeMap::from([("a".into(), fixed.clone()), ("out".into(), fixed.clone())]);
        assert_eq!(
            d.derivation_type(),
            Err(DerivationError::MultipleFixedOutputs)
        );
        d.outputs = BTreeMap::from([("bin".into(), fixed)]);
        assert_eq!(
            d.derivation_type(),
            Err(DerivationError::FixedOutputNotNamedOut("bin".into()))
        );
        let float = |algo| DerivationOutput::CaFloating {
            method: FileIngestionMethod::Recursive,
            algo,
        };
        d.outputs = BTreeMap::from([
            ("a".into(), float(HashAlgo::Sha256)),
            ("b".into(), float(HashAlgo::Sha1)),
        ]);
        assert_eq!(
            d.derivation_type(),
            Err(DerivationError::FloatingHashAlgoMismatch)
        );
        d.outputs = BTreeMap::from([(
            "out".into(),
            DerivationOutput::Impure {
                method: FileIngestionMethod::Recursive,
                algo: HashAlgo::Sha256,
            },
        )]);
        assert_eq!(d.derivation_type(), Ok(DerivationType::Impure));
        let h = d.hash_modulo(&dir(), true, |_| None).unwrap();
        assert_eq!(h.kind, DrvHashKind::Deferred);
        assert_eq!(h.hashes["out"], Hash::sha256(b"impure"));
        let text = d.to_aterm(&dir());
        assert!(String::from_utf8_lossy(&text).contains(r#"("out","","r:sha256","impure")"#));
        assert_eq!(Derivation::parse(&dir(), "a", &text).unwrap(), d);
    }
}
