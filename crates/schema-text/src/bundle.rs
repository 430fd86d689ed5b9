//! Assembling compiled schemas into a `<bundle {...}>` and encoding it as binary Preserves.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use preserves::{IOValue, Map};

use crate::error::Error;
use crate::schema::{compile, CompiledSchema};
use crate::source::Source;
use crate::values::{dict, module_path, rec};

/// The `*.prs` files directly inside `dir`, sorted by file name.
pub fn schema_files(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let io = |source| Error::Io {
        path: dir.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if path.extension().is_some_and(|e| e == "prs") && path.is_file() {
            files.push(path);
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

/// The module name of a schema file: its stem, which must be a usable symbol.
fn module_name(path: &Path) -> Result<String, Error> {
    let bad = |reason: &str| Error::ModuleName {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| bad("the file name is not valid UTF-8"))?;
    if !crate::pattern::is_identifier(stem) {
        return Err(bad(
            "the file stem must be made of letters, digits and `_` (no `.` or `-`)",
        ));
    }
    Ok(stem.to_owned())
}

/// Compiles every `*.prs` file of `dir` into the value `<bundle {[module]: schema ...}>`.
///
/// References into another module of the bundle are checked; references to modules outside
/// the bundle (such as `EntityRef.Cap`) are left to the code generator.
pub fn bundle_value_from_dir(dir: &Path) -> Result<IOValue, Error> {
    let files = schema_files(dir)?;
    if files.is_empty() {
        return Err(Error::NoSchemas(dir.to_owned()));
    }
    let mut compiled: BTreeMap<String, (PathBuf, String, CompiledSchema)> = BTreeMap::new();
    for path in files {
        let module = module_name(&path)?;
        let text = fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let origin = path.display().to_string();
        let schema = compile(&Source::new(&origin, &text))?;
        compiled.insert(module, (path, text, schema));
    }
    check_cross_module_refs(&compiled)?;
    let mut modules = Map::new();
    for (module, (_, _, schema)) in compiled {
        modules.insert(module_path(&[module]), schema.value);
    }
    Ok(rec("bundle", vec![dict(modules)]))
}

fn check_cross_module_refs(
    compiled: &BTreeMap<String, (PathBuf, String, CompiledSchema)>,
) -> Result<(), Error> {
    let known: BTreeMap<&str, &BTreeSet<String>> = compiled
        .iter()
        .map(|(m, (_, _, s))| (m.as_str(), &s.definitions))
        .collect();
    for (path, text, schema) in compiled.values() {
        for r in &schema.external_refs {
            let [module] = &r.module[..] else { continue };
            if let Some(defs) = known.get(module.as_str()) {
                if !defs.contains(&r.name) {
                    let origin = path.display().to_string();
                    return Err(Source::new(&origin, text).error(
                        r.pos,
                        format!("`{}` is not defined in module `{module}`", r.name),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Encodes a schema or bundle value as canonical binary Preserves (no annotations, sorted
/// dictionaries), the format of `.prb`/`.bin` schema files.
pub fn encode(value: &IOValue) -> Result<Vec<u8>, Error> {
    preserves::write_iovalue_packed(value, false).map_err(Error::Encode)
}
