//! Compile [Preserves schema](https://preserves.dev/preserves-schema.html) text (`.prs`)
//! into the binary schema bundles (`.prb`) read by the Rust `preserves-schema` compiler
//! (`preserves_schema::compiler::load_schema_or_bundle_bin`).
//!
//! The official `.prs` → `.prb` compiler (`preserves-schemac`) is not packaged for Rust, so
//! this crate reimplements the text syntax:
//!
//! * The text is read as a sequence of Preserves text values (via the `preserves` crate's
//!   text reader); `# ...` comments become annotations and are ignored, and `;` line comments
//!   are accepted too.
//! * Top-level values are split into clauses at `.` symbols: `version 1 .`,
//!   `embeddedType #f .` / `embeddedType module.Name .`, and `Name = body .`.
//! * A body is alternatives `p / p / ...` (leading `/` allowed), intersections `p & p & ...`,
//!   or one pattern. Alternatives are named by `@name`, or else after a record's symbol
//!   label, a reference's name, or a literal's text.
//! * Patterns: `any`, `bool` `double` `int` `string` `bytes` `symbol`, `=sym` and other
//!   literal atoms, references `Name` / `module.Name`, `#:p`, `[p ...]`, `#{p}`,
//!   `{k: v ...:...}`, `<label p ...>`, `<<rec> label fields>`, `<<lit> value>`,
//!   `[p q ...]` / `[p q r ...]`, and dictionaries `{key: p ...}` (entries named after symbol
//!   keys). `@name` binds simple patterns inside compound ones.
//!
//! Every error in schema text names the file, line and column. Beyond the metaschema's own
//! rules, fields of compound patterns must be named (`@name p`) unless they are literals,
//! because the Rust code generator of `preserves-schema` panics on unnamed non-literal fields;
//! references to definitions of the same schema, or of another module of the same bundle,
//! must resolve. `# comment`s with nothing after them (at the end of the file or before a
//! closing bracket) are ignored.
//!
//! ```
//! let schema = nixspace_schema_text::parse_schema("version 1 . Point = <point @x int @y int> .")?;
//! let bytes = nixspace_schema_text::encode(&schema)?;
//! assert_eq!(bytes[0], 0xb4); // a record
//! # Ok::<(), nixspace_schema_text::Error>(())
//! ```
//!
//! From a `build.rs`:
//!
//! ```no_run
//! # fn main() -> Result<(), nixspace_schema_text::Error> {
//! let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default());
//! for file in nixspace_schema_text::schema_files("schemas".as_ref())? {
//!     println!("cargo:rerun-if-changed={}", file.display());
//! }
//! nixspace_schema_text::write_bundle("schemas".as_ref(), &out.join("schemas.prb"))?;
//! # Ok(())
//! # }
//! ```

mod bundle;
mod error;
mod pattern;
mod schema;
mod source;
mod syntax;
mod values;

use std::fs;
use std::path::Path;

pub use bundle::{bundle_value_from_dir, encode, schema_files};
pub use error::{Error, Location};
pub use preserves::IOValue;

/// Compiles the text of one `.prs` schema into its `<schema {...}>` value.
///
/// Errors are located as `<input>:line:column`; use [`parse_schema_named`] to give the origin.
pub fn parse_schema(text: &str) -> Result<IOValue, Error> {
    parse_schema_named("<input>", text)
}

/// Like [`parse_schema`], reporting errors against `origin` (for example a file path).
pub fn parse_schema_named(origin: &str, text: &str) -> Result<IOValue, Error> {
    Ok(schema::compile(&source::Source::new(origin, text))?.value)
}

/// Reads and compiles one `.prs` file into its `<schema {...}>` value.
pub fn parse_schema_file(path: &Path) -> Result<IOValue, Error> {
    let text = fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })?;
    parse_schema_named(&path.display().to_string(), &text)
}

/// Compiles every `*.prs` file in `dir` (sorted by name; module path = the file stem as a
/// single symbol) into the binary encoding of `<bundle {[stem]: schema ...}>`.
pub fn bundle_from_dir(dir: &Path) -> Result<Vec<u8>, Error> {
    encode(&bundle_value_from_dir(dir)?)
}

/// Compiles the `*.prs` files of `dir` (see [`bundle_from_dir`]) and writes the bundle to
/// `out`. The file is left untouched when its content would not change, so that its
/// modification time stays stable for build systems.
pub fn write_bundle(dir: &Path, out: &Path) -> Result<(), Error> {
    let bytes = bundle_from_dir(dir)?;
    if fs::read(out).is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    fs::write(out, bytes).map_err(|source| Error::Io {
        path: out.to_owned(),
        source,
    })
}
