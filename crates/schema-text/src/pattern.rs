//! Compiling single patterns: one schema-text value (a [`Node`]) into the metaschema's
//! `Pattern`, `NamedPattern`, `NamedSimplePattern` and `NamedAlternative` values.

use preserves::{IOValue, Map, ValueImpl};

use crate::error::Error;
use crate::source::Source;
use crate::syntax::{Kind, Node};
use crate::values::{dict, rec, reference, seq, string, sym};

/// A compiled pattern, remembering whether it is a `SimplePattern` or a `CompoundPattern`.
pub(crate) enum Pattern {
    Simple(IOValue),
    Compound(IOValue),
}

impl Pattern {
    fn into_value(self) -> IOValue {
        match self {
            Pattern::Simple(v) | Pattern::Compound(v) => v,
        }
    }
}

/// A reference (`mod.Name` or `Name`) met while compiling, kept for later resolution checks.
#[derive(Debug, Clone)]
pub(crate) struct RefUse {
    pub(crate) module: Vec<String>,
    pub(crate) name: String,
    pub(crate) pos: usize,
}

/// Compiles patterns of one schema text, collecting the references it meets.
pub(crate) struct PatternCompiler<'a, 's> {
    src: &'a Source<'s>,
    pub(crate) refs: Vec<RefUse>,
}

/// The built-in atom kinds: schema word and metaschema `AtomKind`.
const ATOM_KINDS: [(&str, &str); 6] = [
    ("bool", "Boolean"),
    ("double", "Double"),
    ("int", "SignedInteger"),
    ("string", "String"),
    ("bytes", "ByteString"),
    ("symbol", "Symbol"),
];

/// True if `s` can serve as a definition or binding name.
pub(crate) fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_alphabetic() || c == '_')
        && chars.all(|c| c.is_alphanumeric() || c == '_')
}

impl<'a, 's> PatternCompiler<'a, 's> {
    pub(crate) fn new(src: &'a Source<'s>) -> Self {
        PatternCompiler {
            src,
            refs: Vec::new(),
        }
    }

    /// The explicit `@name` of `node`, if any, with the offset of its `@`.
    pub(crate) fn name_of(&self, node: &Node) -> Result<Option<(String, usize)>, Error> {
        let mut names = node.names();
        let Some((name, pos)) = names.next() else {
            return Ok(None);
        };
        if let Some((other, other_pos)) = names.next() {
            return Err(self.src.error(
                other_pos,
                format!("a pattern can have only one name, but has `@{name}` and `@{other}`"),
            ));
        }
        if !is_identifier(name) {
            return Err(self.src.error(
                pos,
                format!("`{name}` is not a valid name (use letters, digits and `_`)"),
            ));
        }
        Ok(Some((name.to_owned(), pos)))
    }

    /// Fails if `node` carries an `@name`, which would be silently meaningless at `place`.
    pub(crate) fn unnamed(&self, node: &Node, place: &str) -> Result<(), Error> {
        match node.names().next() {
            Some((name, pos)) => Err(self
                .src
                .error(pos, format!("`@{name}` cannot name {place}"))),
            None => Ok(()),
        }
    }

    /// A `NamedAlternative` `["name" pattern]` of an `or` definition, plus its name and the
    /// offset to blame for a duplicate name.
    pub(crate) fn alternative(&mut self, node: &Node) -> Result<(String, usize, IOValue), Error> {
        let explicit = self.name_of(node)?;
        let pattern = self.pattern(node)?.into_value();
        let (name, pos) = match explicit {
            Some(named) => named,
            None => match infer_alternative_name(&pattern) {
                Some(name) => (name, node.pos),
                None => {
                    return Err(self.src.error(
                        node.pos,
                        "cannot infer a name for this alternative; name it with `@name`",
                    ))
                }
            },
        };
        let value = seq(vec![string(&name), pattern]);
        Ok((name, pos, value))
    }

    /// A `NamedPattern`: `<named n simple>` if `node` has a `@name`, else the bare pattern.
    pub(crate) fn named_pattern(&mut self, node: &Node) -> Result<IOValue, Error> {
        match self.name_of(node)? {
            Some((name, pos)) => match self.pattern(node)? {
                Pattern::Simple(p) => Ok(rec("named", vec![sym(&name), p])),
                Pattern::Compound(_) => Err(self.src.error(
                    pos,
                    format!(
                        "`@{name}` names a compound pattern; only simple patterns \
                         (atoms, references, `[p ...]`, `#{{p}}`, `{{k: v ...:...}}`, \
                         `#:p`, literals) can be named"
                    ),
                )),
            },
            None => match self.pattern(node)? {
                Pattern::Simple(p) => {
                    self.require_literal(&p, node.pos)?;
                    Ok(p)
                }
                Pattern::Compound(p) => Ok(p),
            },
        }
    }

    /// A `NamedSimplePattern` for dictionary values: named by `@name`, else by the key when the
    /// key is a symbol.
    fn dict_entry(&mut self, key: &Node, value: &Node) -> Result<IOValue, Error> {
        let name = match self.name_of(value)? {
            Some((name, _)) => Some(name),
            None => key.symbol().map(str::to_owned),
        };
        let pattern = self.simple_of(value, "a dictionary pattern value")?;
        Ok(match name {
            Some(name) => rec("named", vec![sym(&name), pattern]),
            None => {
                self.require_literal(&pattern, value.pos)?;
                pattern
            }
        })
    }

    /// Fails unless the unnamed simple pattern `p` (a field of a compound pattern) is a
    /// literal.
    ///
    /// The metaschema allows anonymous fields of any kind, but the Rust code generator of
    /// `preserves-schema` cannot rebuild a value from an unnamed non-literal field (it panics),
    /// so they are rejected here with a location instead.
    fn require_literal(&self, p: &IOValue, pos: usize) -> Result<(), Error> {
        if p.is_simple_record("lit", Some(1)) {
            Ok(())
        } else {
            Err(self.unnamed_field(pos))
        }
    }

    fn unnamed_field(&self, pos: usize) -> Error {
        self.src.error(
            pos,
            "this field needs a name (`@name pattern`): only literal fields may be unnamed",
        )
    }

    /// A `SimplePattern`; fails on compound patterns and on `@name`s.
    fn simple(&mut self, node: &Node, place: &str) -> Result<IOValue, Error> {
        self.unnamed(node, place)?;
        self.simple_of(node, place)
    }

    /// A `SimplePattern`, leaving any `@name` of `node` to the caller.
    fn simple_of(&mut self, node: &Node, place: &str) -> Result<IOValue, Error> {
        match self.pattern(node)? {
            Pattern::Simple(p) => Ok(p),
            Pattern::Compound(_) => Err(self.src.error(
                node.pos,
                format!("{place} must be a simple pattern, not a record, tuple or dictionary"),
            )),
        }
    }

    /// Any pattern. Annotations on `node` itself are left to the caller.
    pub(crate) fn pattern(&mut self, node: &Node) -> Result<Pattern, Error> {
        match &node.kind {
            Kind::Symbol(s) => self.symbol_pattern(s, node.pos).map(Pattern::Simple),
            Kind::Atom(v) => Ok(Pattern::Simple(rec("lit", vec![v.clone()]))),
            Kind::Embedded(inner) => {
                let interface = self.simple(inner, "the pattern after `#:`")?;
                Ok(Pattern::Simple(rec("embedded", vec![interface])))
            }
            Kind::Record(items) => self.record_pattern(items, node.pos),
            Kind::Sequence(items) => {
                if let [element, dots] = &items[..] {
                    if self.is_ellipsis(dots)? {
                        let element = self.simple(element, "the element pattern of `[p ...]`")?;
                        return Ok(Pattern::Simple(rec("seqof", vec![element])));
                    }
                }
                self.tuple(items).map(Pattern::Compound)
            }
            Kind::Set(items) => match &items[..] {
                [element] => {
                    let element = self.simple(element, "the element pattern of `#{p}`")?;
                    Ok(Pattern::Simple(rec("setof", vec![element])))
                }
                _ => Err(self.src.error(
                    node.pos,
                    "a set pattern `#{p}` must contain exactly one pattern",
                )),
            },
            Kind::Dictionary(entries) => self.dictionary_pattern(entries),
        }
    }

    fn symbol_pattern(&mut self, s: &str, pos: usize) -> Result<IOValue, Error> {
        if s == "any" {
            return Ok(sym("any"));
        }
        if let Some((_, kind)) = ATOM_KINDS.iter().find(|(word, _)| *word == s) {
            return Ok(rec("atom", vec![sym(kind)]));
        }
        if let Some(literal) = s.strip_prefix('=') {
            if !literal.is_empty() {
                return Ok(rec("lit", vec![sym(literal)]));
            }
        }
        let message = match s {
            "=" => "`=` must be followed directly by a symbol (`=name`) or start a definition",
            "/" => "`/` separates alternatives only at the top level of a definition",
            "&" => "`&` separates intersected patterns only at the top level of a definition",
            "." => "`.` ends a definition and cannot appear inside a pattern",
            "..." => "`...` may only follow the last pattern of a sequence or record",
            _ => return self.reference(s, pos),
        };
        Err(self.src.error(pos, message))
    }

    /// A reference `Name` or `module.path.Name`.
    pub(crate) fn reference(&mut self, s: &str, pos: usize) -> Result<IOValue, Error> {
        let mut parts: Vec<String> = s.split('.').map(str::to_owned).collect();
        if parts.as_slice().iter().any(|p| p.is_empty()) {
            let hint = if s.ends_with('.') {
                " (a `.` ending a definition needs whitespace before it)"
            } else {
                ""
            };
            return Err(self
                .src
                .error(pos, format!("`{s}` is not a valid reference{hint}")));
        }
        let name = parts.pop().unwrap_or_default();
        if !is_identifier(&name) {
            return Err(self
                .src
                .error(pos, format!("`{s}` is not a valid pattern or reference")));
        }
        let value = reference(&parts, &name);
        self.refs.push(RefUse {
            module: parts,
            name,
            pos,
        });
        Ok(value)
    }

    /// True if `node` is `...`; fails if that `...` carries a name.
    fn is_ellipsis(&self, node: &Node) -> Result<bool, Error> {
        if !node.is_symbol("...") {
            return Ok(false);
        }
        if let Some((name, pos)) = node.names().next() {
            return Err(self
                .src
                .error(pos, format!("expected a pattern after `@{name}`")));
        }
        Ok(true)
    }

    fn record_pattern(&mut self, items: &[Node], pos: usize) -> Result<Pattern, Error> {
        let (label, fields) = items
            .split_first()
            .ok_or_else(|| self.src.error(pos, "a record needs a label"))?;
        if let Kind::Record(inner) = &label.kind {
            if let [keyword] = &inner[..] {
                if keyword.is_symbol("lit") {
                    return match fields {
                        [value] => Ok(Pattern::Simple(rec("lit", vec![value.to_value(self.src)?]))),
                        _ => Err(self
                            .src
                            .error(pos, "`<<lit> value>` takes exactly one value")),
                    };
                }
                if keyword.is_symbol("rec") {
                    return match fields {
                        [label, fields] => {
                            let label = self.named_pattern(label)?;
                            let fields = self.named_pattern(fields)?;
                            Ok(Pattern::Compound(rec("rec", vec![label, fields])))
                        }
                        _ => Err(self
                            .src
                            .error(pos, "`<<rec> label fields>` takes exactly two patterns")),
                    };
                }
            }
        }
        self.unnamed(label, "a record label")?;
        let label = rec("lit", vec![label.to_value(self.src)?]);
        let fields = self.tuple(fields)?;
        Ok(Pattern::Compound(rec("rec", vec![label, fields])))
    }

    /// `<tuple [...]>`, or `<tuplePrefix [...] <seqof p>>` when the items end in `p ...`.
    fn tuple(&mut self, items: &[Node]) -> Result<IOValue, Error> {
        let mut fixed = items;
        let mut variable = None;
        if let Some((last, rest)) = items.split_last() {
            if self.is_ellipsis(last)? {
                let (repeated, rest) = rest.split_last().ok_or_else(|| {
                    self.src
                        .error(last.pos, "`...` must follow the pattern it repeats")
                })?;
                fixed = rest;
                variable = Some(repeated);
            }
        }
        let mut fixed_patterns = Vec::with_capacity(fixed.len());
        for item in fixed {
            if self.is_ellipsis(item)? {
                return Err(self.src.error(
                    item.pos,
                    "`...` may only follow the last pattern of a sequence or record",
                ));
            }
            fixed_patterns.push(self.named_pattern(item)?);
        }
        let fixed = seq(fixed_patterns);
        match variable {
            None => Ok(rec("tuple", vec![fixed])),
            Some(repeated) => {
                let last_pos = repeated.pos;
                let name = self.name_of(repeated)?;
                let element = match self.pattern(repeated)? {
                    Pattern::Simple(p) => p,
                    Pattern::Compound(_) => {
                        return Err(self.src.error(
                            repeated.pos,
                            "the pattern before `...` must be a simple pattern",
                        ))
                    }
                };
                let repeated = rec("seqof", vec![element]);
                let variable = match name {
                    Some((name, _)) => rec("named", vec![sym(&name), repeated]),
                    None => return Err(self.unnamed_field(last_pos)),
                };
                Ok(rec("tuplePrefix", vec![fixed, variable]))
            }
        }
    }

    fn dictionary_pattern(&mut self, entries: &[(Node, Node)]) -> Result<Pattern, Error> {
        if let Some((dots, _)) = entries.iter().find(|(k, _)| k.is_symbol("...")) {
            return match entries {
                [(k, v), (d, dv)] | [(d, dv), (k, v)] if d.is_symbol("...") => {
                    if !dv.is_symbol("...") {
                        return Err(self
                            .src
                            .error(dv.pos, "expected `...:...` in a `{k: v ...:...}` pattern"));
                    }
                    let key = self.simple(k, "the key pattern of `{k: v ...:...}`")?;
                    let value = self.simple(v, "the value pattern of `{k: v ...:...}`")?;
                    Ok(Pattern::Simple(rec("dictof", vec![key, value])))
                }
                _ => Err(self.src.error(
                    dots.pos,
                    "`{k: v ...:...}` must contain exactly one `k: v` besides `...:...`",
                )),
            };
        }
        let mut map = Map::new();
        for (key, value) in entries {
            self.unnamed(key, "a dictionary key")?;
            let pattern = self.dict_entry(key, value)?;
            if map.insert(key.to_value(self.src)?, pattern).is_some() {
                return Err(self.src.error(key.pos, "duplicate dictionary key"));
            }
        }
        Ok(Pattern::Compound(rec("dict", vec![dict(map)])))
    }
}

/// The name an alternative gets when none is written: the label of a record with a symbol
/// label, the name of a reference, or the text of a literal symbol, string, boolean or
/// integer.
fn infer_alternative_name(pattern: &IOValue) -> Option<String> {
    let record = pattern.collect_record()?;
    let fields: Vec<_> = record.fields_iter().cloned().collect();
    let label = record._vec().first()?.as_symbol()?;
    match (&*label, &fields[..]) {
        ("rec", [label, _]) => {
            let lit = label.collect_simple_record("lit", Some(1))?;
            let value = lit.fields_iter().next()?;
            value.as_symbol().map(|s| s.into_owned())
        }
        ("ref", [_, name]) => name.as_symbol().map(|s| s.into_owned()),
        ("lit", [value]) => {
            if let Some(s) = value.as_symbol() {
                Some(s.into_owned())
            } else if let Some(s) = value.as_string() {
                Some(s.into_owned())
            } else if let Some(b) = value.as_boolean() {
                Some(b.to_string())
            } else {
                value.as_signed_integer().map(|i| i.to_string())
            }
        }
        _ => None,
    }
}
