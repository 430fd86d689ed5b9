//! Helpers for building the Preserves values of the schema metaschema.

use preserves::{IOValue, Map};

/// The symbol `s`.
pub(crate) fn sym(s: &str) -> IOValue {
    IOValue::symbol(s.to_owned())
}

/// The string `s`.
pub(crate) fn string(s: &str) -> IOValue {
    IOValue::new(s.to_owned())
}

/// The record `<label fields...>` with a symbol label.
pub(crate) fn rec(label: &str, fields: Vec<IOValue>) -> IOValue {
    IOValue::record(sym(label), fields)
}

/// The sequence `[items...]`.
pub(crate) fn seq(items: Vec<IOValue>) -> IOValue {
    IOValue::new(items)
}

/// The dictionary `{entries...}`.
pub(crate) fn dict(entries: Map<IOValue, IOValue>) -> IOValue {
    IOValue::new(entries)
}

/// A module path `[a b c]` as a sequence of symbols.
pub(crate) fn module_path<S: AsRef<str>>(parts: &[S]) -> IOValue {
    seq(parts.iter().map(|p| sym(p.as_ref())).collect())
}

/// The reference `<ref [module...] name>`.
pub(crate) fn reference<S: AsRef<str>>(module: &[S], name: &str) -> IOValue {
    rec("ref", vec![module_path(module), sym(name)])
}
