//! Compiling one schema text: splitting it into `.`-terminated clauses and turning
//! `version`, `embeddedType` and `Name = ...` clauses into a metaschema `Schema` value.

use std::collections::BTreeSet;

use preserves::{IOValue, Map, ValueImpl};

use crate::error::Error;
use crate::pattern::{is_identifier, PatternCompiler, RefUse};
use crate::source::Source;
use crate::syntax::{read_nodes, Node};
use crate::values::{dict, rec, seq, sym};

/// The result of compiling one schema text.
pub(crate) struct CompiledSchema {
    /// The `<schema {...}>` value.
    pub(crate) value: IOValue,
    /// Names of the definitions, for resolving references from other modules.
    pub(crate) definitions: BTreeSet<String>,
    /// References to other modules, not yet checked.
    pub(crate) external_refs: Vec<RefUse>,
}

/// Compiles the schema text of `src`.
///
/// References to definitions of the same module (`Name`) are checked here; references to other
/// modules (`mod.Name`) are returned in [`CompiledSchema::external_refs`].
pub(crate) fn compile(src: &Source<'_>) -> Result<CompiledSchema, Error> {
    let nodes = read_nodes(src)?;
    let mut patterns = PatternCompiler::new(src);
    let mut version = None;
    let mut embedded_type = None;
    let mut definitions = Map::new();
    let mut names = BTreeSet::new();

    for clause in clauses(src, &nodes)? {
        let Some(first) = clause.first() else {
            continue;
        };
        if clause.get(1).is_some_and(|n| n.is_symbol("=")) {
            let name = definition_name(src, &patterns, first)?;
            if !names.insert(name.clone()) {
                return Err(src.error(first.pos, format!("`{name}` is defined twice")));
            }
            let definition = compile_definition(src, &mut patterns, &clause[1], &clause[2..])?;
            definitions.insert(sym(&name), definition);
        } else if first.is_symbol("version") {
            patterns.unnamed(first, "a `version` clause")?;
            if version.replace(first.pos).is_some() {
                return Err(src.error(first.pos, "duplicate `version` clause"));
            }
            match &clause[1..] {
                [v] if is_one(v) => {}
                [v] => return Err(src.error(v.pos, "unsupported schema version; only `version 1`")),
                _ => return Err(src.error(first.pos, "expected `version 1 .`")),
            }
        } else if first.is_symbol("embeddedType") {
            patterns.unnamed(first, "an `embeddedType` clause")?;
            if embedded_type.is_some() {
                return Err(src.error(first.pos, "duplicate `embeddedType` clause"));
            }
            embedded_type = Some(match &clause[1..] {
                [v] => embedded_type_name(src, &mut patterns, v)?,
                _ => {
                    return Err(src.error(
                        first.pos,
                        "expected `embeddedType #f .` or `embeddedType module.Name .`",
                    ))
                }
            });
        } else {
            return Err(src.error(
                first.pos,
                "expected a definition `Name = pattern .`, `version 1 .` or \
                 `embeddedType module.Name .`",
            ));
        }
    }

    if version.is_none() {
        return Err(src.error(0, "missing `version 1 .` clause"));
    }

    let mut external_refs = Vec::new();
    for r in std::mem::take(&mut patterns.refs) {
        if !r.module.is_empty() {
            external_refs.push(r);
        } else if !names.contains(&r.name) {
            return Err(src.error(r.pos, format!("`{}` is not defined in this schema", r.name)));
        }
    }

    let mut fields = Map::new();
    fields.insert(sym("version"), IOValue::new(1i64));
    fields.insert(
        sym("embeddedType"),
        embedded_type.unwrap_or_else(|| IOValue::new(false)),
    );
    fields.insert(sym("definitions"), dict(definitions));
    Ok(CompiledSchema {
        value: rec("schema", vec![dict(fields)]),
        definitions: names,
        external_refs,
    })
}

/// Splits the top-level values into clauses at `.` symbols. Every clause must end in `.`.
fn clauses<'n>(src: &Source<'_>, nodes: &'n [Node]) -> Result<Vec<&'n [Node]>, Error> {
    let mut result = Vec::new();
    let mut start = 0;
    for (i, node) in nodes.iter().enumerate() {
        if node.is_symbol(".") {
            if let Some((name, pos)) = node.names().next() {
                return Err(src.error(pos, format!("expected a pattern after `@{name}`")));
            }
            result.push(&nodes[start..i]);
            start = i + 1;
        }
    }
    if let Some(first) = nodes.get(start) {
        if let Some(last) = nodes.last().filter(|n| n.symbol().is_some_and(glued_dot)) {
            return Err(glued_dot_error(src, last));
        }
        let what = match (first.symbol(), nodes.get(start + 1)) {
            (Some(name), Some(eq)) if eq.is_symbol("=") => format!("definition of `{name}`"),
            _ => "clause".to_owned(),
        };
        return Err(src.error(first.pos, format!("this {what} is not terminated by `.`")));
    }
    Ok(result)
}

fn definition_name(
    src: &Source<'_>,
    patterns: &PatternCompiler<'_, '_>,
    node: &Node,
) -> Result<String, Error> {
    patterns.unnamed(node, "a definition name")?;
    match node.symbol() {
        Some(name) if is_identifier(name) => Ok(name.to_owned()),
        _ => Err(src.error(
            node.pos,
            "a definition name must be a symbol made of letters, digits and `_`",
        )),
    }
}

fn embedded_type_name(
    src: &Source<'_>,
    patterns: &mut PatternCompiler<'_, '_>,
    node: &Node,
) -> Result<IOValue, Error> {
    patterns.unnamed(node, "an embedded type")?;
    match node.symbol() {
        Some(s) => patterns.reference(s, node.pos),
        None if node.to_value(src)?.as_boolean() == Some(false) => Ok(IOValue::new(false)),
        None => Err(src.error(
            node.pos,
            "expected `#f` or a reference `module.Name` after `embeddedType`",
        )),
    }
}

fn is_one(node: &Node) -> bool {
    match &node.kind {
        crate::syntax::Kind::Atom(v) => matches!(v.as_i64(), Some(Ok(1))),
        _ => false,
    }
}

/// Compiles the body of `Name = body .`: alternatives separated by `/`, intersected patterns
/// separated by `&`, or a single pattern. `equals` is the `=` node, for error positions.
fn compile_definition(
    src: &Source<'_>,
    patterns: &mut PatternCompiler<'_, '_>,
    equals: &Node,
    body: &[Node],
) -> Result<IOValue, Error> {
    let has = |s: &str| body.iter().any(|n| n.is_symbol(s));
    match (has("/"), has("&")) {
        (true, true) => {
            let amp = body.iter().find(|n| n.is_symbol("&")).unwrap_or(equals);
            Err(src.error(
                amp.pos,
                "cannot mix `/` and `&` in one definition; define a separate name for one side",
            ))
        }
        (true, false) => {
            let pieces = split(src, equals, body, "/")?;
            let mut seen = BTreeSet::new();
            let mut alternatives = Vec::with_capacity(pieces.len());
            for piece in pieces {
                let (name, pos, alternative) = patterns.alternative(piece)?;
                if !seen.insert(name.clone()) {
                    return Err(src.error(pos, format!("two alternatives are named `{name}`")));
                }
                alternatives.push(alternative);
            }
            Ok(rec("or", vec![seq(alternatives)]))
        }
        (false, true) => {
            let pieces = split(src, equals, body, "&")?;
            let mut conjuncts = Vec::with_capacity(pieces.len());
            for piece in pieces {
                conjuncts.push(patterns.named_pattern(piece)?);
            }
            Ok(rec("and", vec![seq(conjuncts)]))
        }
        (false, false) => {
            let pattern = single(src, equals, body, "after `=`")?;
            patterns.unnamed(pattern, "a whole definition")?;
            Ok(match patterns.pattern(pattern)? {
                crate::pattern::Pattern::Simple(p) | crate::pattern::Pattern::Compound(p) => p,
            })
        }
    }
}

/// Splits `body` at `separator` (a leading separator is allowed) into single patterns; at
/// least two are required.
fn split<'n>(
    src: &Source<'_>,
    equals: &Node,
    body: &'n [Node],
    separator: &str,
) -> Result<Vec<&'n Node>, Error> {
    for node in body.iter().filter(|n| n.is_symbol(separator)) {
        check_separator(src, node)?;
    }
    let mut pieces = Vec::new();
    let mut rest = body;
    let mut previous = equals;
    if let Some(first) = rest.first().filter(|n| n.is_symbol(separator)) {
        previous = first;
        rest = &rest[1..];
    }
    loop {
        let end = rest
            .iter()
            .position(|n| n.is_symbol(separator))
            .unwrap_or(rest.len());
        let context = format!("after `{}`", previous.symbol().unwrap_or("="));
        pieces.push(single(src, previous, &rest[..end], &context)?);
        match rest.get(end) {
            Some(sep) => {
                previous = sep;
                rest = &rest[end + 1..];
            }
            None => break,
        }
    }
    if pieces.len() < 2 {
        let what = if separator == "/" {
            "alternatives"
        } else {
            "patterns to intersect"
        };
        let first = body
            .iter()
            .find(|n| n.is_symbol(separator))
            .unwrap_or(equals);
        return Err(src.error(
            first.pos,
            format!("`{separator}` needs at least two {what}"),
        ));
    }
    Ok(pieces)
}

/// A separator must not carry a `@name` (which was meant for the following pattern).
fn check_separator(src: &Source<'_>, node: &Node) -> Result<(), Error> {
    match node.names().next() {
        Some((name, pos)) => Err(src.error(pos, format!("expected a pattern after `@{name}`"))),
        None => Ok(()),
    }
}

/// Exactly one pattern in `nodes`, which follow `previous`.
fn single<'n>(
    src: &Source<'_>,
    previous: &Node,
    nodes: &'n [Node],
    context: &str,
) -> Result<&'n Node, Error> {
    match nodes {
        [one] => Ok(one),
        [] => Err(src.error(previous.pos, format!("expected a pattern {context}"))),
        [first, _, ..] if first.symbol().is_some_and(glued_dot) => Err(glued_dot_error(src, first)),
        [_, extra, ..] => Err(src.error(
            extra.pos,
            "unexpected value after a complete pattern (missing `.`, `/` or `&`?)",
        )),
    }
}

/// True for a symbol such as `Name.` whose final `.` was probably meant to end a clause.
fn glued_dot(s: &str) -> bool {
    s.len() > 1 && s.ends_with('.') && s != "..."
}

fn glued_dot_error(src: &Source<'_>, node: &Node) -> Error {
    src.error(
        node.pos,
        format!(
            "`{}` is read as one symbol; put whitespace before the `.` that ends the clause",
            node.symbol().unwrap_or_default()
        ),
    )
}
