//! Reading schema text as a sequence of positioned Preserves values.
//!
//! The token-level [`preserves::Reader`] API of the `preserves` crate's text reader does the
//! lexing; this module assembles the tokens into a small tree that remembers the byte offset
//! of every value and annotation, so that later stages can report line and column.

use preserves::boundary as B;
use preserves::reader::NextToken;
use preserves::{
    Atom, BinarySource, BytesBinarySource, CompoundClass, IOValue, Map, Reader, Set, TextReader,
    ValueClass,
};

use crate::error::Error;
use crate::source::Source;

/// One value read from the schema text, with its annotations and position.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    /// Byte offset of the value itself (after its annotations).
    pub(crate) pos: usize,
    /// The annotations written before the value (`@x`, `# comment`, ...), in order.
    pub(crate) annotations: Vec<Annotation>,
    /// The value.
    pub(crate) kind: Kind,
}

/// An annotation and the byte offset of the `@` or `#` that introduced it.
#[derive(Debug, Clone)]
pub(crate) struct Annotation {
    pub(crate) pos: usize,
    pub(crate) value: Node,
}

/// The shape of a [`Node`].
#[derive(Debug, Clone)]
pub(crate) enum Kind {
    /// A symbol, kept as text because schema syntax is mostly made of symbols.
    Symbol(String),
    /// Any other atom: boolean, number, string or byte string.
    Atom(IOValue),
    /// A record; the label is the first element.
    Record(Vec<Node>),
    /// A sequence `[...]`.
    Sequence(Vec<Node>),
    /// A set `#{...}`.
    Set(Vec<Node>),
    /// A dictionary `{k: v ...}`, in source order.
    Dictionary(Vec<(Node, Node)>),
    /// An embedded value `#:v`.
    Embedded(Box<Node>),
}

impl Node {
    /// The symbol text if this node is a symbol (annotations are ignored).
    pub(crate) fn symbol(&self) -> Option<&str> {
        match &self.kind {
            Kind::Symbol(s) => Some(s),
            _ => None,
        }
    }

    /// True if this node is the symbol `s`.
    pub(crate) fn is_symbol(&self, s: &str) -> bool {
        self.symbol() == Some(s)
    }

    /// The symbol annotations of this node (`@name`), with the position of each `@`.
    pub(crate) fn names(&self) -> impl Iterator<Item = (&str, usize)> {
        self.annotations
            .iter()
            .filter_map(|a| a.value.symbol().map(|s| (s, a.pos)))
    }

    /// The plain Preserves value of this node, without annotations.
    pub(crate) fn to_value(&self, src: &Source<'_>) -> Result<IOValue, Error> {
        Ok(match &self.kind {
            Kind::Symbol(s) => IOValue::symbol(s.clone()),
            Kind::Atom(v) => v.clone(),
            Kind::Record(items) => match items.split_first() {
                Some((label, fields)) => {
                    IOValue::record(label.to_value(src)?, values_of(fields, src)?)
                }
                None => return Err(src.error(self.pos, "a record needs a label")),
            },
            Kind::Sequence(items) => IOValue::new(values_of(items, src)?),
            Kind::Set(items) => {
                let mut set = Set::new();
                for item in items {
                    if !set.insert(item.to_value(src)?) {
                        return Err(src.error(item.pos, "duplicate set element"));
                    }
                }
                IOValue::new(set)
            }
            Kind::Dictionary(entries) => {
                let mut map = Map::new();
                for (k, v) in entries {
                    if map.insert(k.to_value(src)?, v.to_value(src)?).is_some() {
                        return Err(src.error(k.pos, "duplicate dictionary key"));
                    }
                }
                IOValue::new(map)
            }
            Kind::Embedded(_) => {
                return Err(src.error(
                    self.pos,
                    "embedded values (`#:...`) cannot appear in literal values",
                ))
            }
        })
    }
}

fn values_of(items: &[Node], src: &Source<'_>) -> Result<Vec<IOValue>, Error> {
    items.iter().map(|n| n.to_value(src)).collect()
}

/// Reads all top-level values of `src`.
pub(crate) fn read_nodes(src: &Source<'_>) -> Result<Vec<Node>, Error> {
    let bytes = src.reader_bytes();
    let mut reader = NodeReader {
        src,
        bytes: &bytes,
        text: BytesBinarySource::new(&bytes).into_text(),
    };
    let mut nodes = Vec::new();
    loop {
        match reader.next()? {
            Next::Value(node) => nodes.push(node),
            Next::Eof => return Ok(nodes),
            Next::Close(pos) => {
                return Err(src.error(
                    pos,
                    format!(
                        "unbalanced brackets: `{}` closes nothing",
                        char_at(&bytes, pos)
                    ),
                ))
            }
        }
    }
}

/// What the reader found next.
enum Next {
    Value(Node),
    /// A closing bracket at this offset.
    Close(usize),
    Eof,
}

struct NodeReader<'a, 'src> {
    src: &'a Source<'src>,
    bytes: &'a [u8],
    text: TextReader<'a, BytesBinarySource<'a>>,
}

impl NodeReader<'_, '_> {
    /// Byte offset where the next token starts (skipping whitespace and commas).
    fn next_pos(&mut self) -> usize {
        let mut pos = self.text.source.input_position().unwrap_or(0);
        while let Some(b' ' | b'\t' | b'\r' | b'\n' | b',') = self.bytes.get(pos) {
            pos += 1;
        }
        pos
    }

    /// Converts an error of the Preserves reader; `start` is where the current token began.
    fn convert(&self, e: preserves::Error, start: usize) -> Error {
        match e {
            preserves::Error::Io(e) => self.src.error(start, format!("read error: {e}")),
            e if e.is_eof() => self.src.error(
                start,
                "unexpected end of input (unterminated string or quoted symbol?)",
            ),
            preserves::Error::SyntaxError { position, detail } => {
                let message = match detail {
                    preserves::SyntaxError::Message(m) => m,
                    other => format!("{other:?}"),
                };
                self.src.error(position.unwrap_or(start), message)
            }
        }
    }

    /// Reads the next value with its annotations.
    ///
    /// `# comment`s that annotate nothing (at the end of the input or before a closing
    /// bracket) are dropped; any other dangling annotation is an error.
    fn next(&mut self) -> Result<Next, Error> {
        let mut annotations: Vec<Annotation> = Vec::new();
        loop {
            let pos = self.next_pos();
            let token = self.text.peek_class().map_err(|e| self.convert(e, pos))?;
            match token {
                None | Some(NextToken::End) if annotations.iter().any(|a| !self.is_comment(a)) => {
                    return Err(self.after_annotation_error(&annotations))
                }
                None => return Ok(Next::Eof),
                Some(NextToken::End) => return Ok(Next::Close(pos)),
                Some(NextToken::Annotation) => {
                    self.text
                        .open_annotation()
                        .map_err(|e| self.convert(e, pos))?;
                    let value = match self.next()? {
                        Next::Value(v) => v,
                        Next::Eof | Next::Close(_) => {
                            return Err(self.src.error(pos, "expected a value after `@`"))
                        }
                    };
                    self.text
                        .close_annotation()
                        .map_err(|e| self.convert(e, pos))?;
                    annotations.push(Annotation { pos, value });
                }
                Some(NextToken::Value(class)) => {
                    let kind = self.value(class, pos)?;
                    return Ok(Next::Value(Node {
                        pos,
                        annotations,
                        kind,
                    }));
                }
            }
        }
    }

    /// True if `annotation` was written as a `#` comment rather than with `@`.
    fn is_comment(&self, annotation: &Annotation) -> bool {
        self.bytes.get(annotation.pos) == Some(&b'#')
    }

    fn after_annotation_error(&self, annotations: &[Annotation]) -> Error {
        let Some(last) = annotations.iter().rev().find(|a| !self.is_comment(a)) else {
            return self.src.error(0, "expected a value after annotation");
        };
        match last.value.symbol() {
            Some(name) => self
                .src
                .error(last.pos, format!("expected a pattern after `@{name}`")),
            None => self
                .src
                .error(last.pos, "expected a value after annotation"),
        }
    }

    /// Reads one value of the given class whose first token is at `pos`.
    fn value(&mut self, class: ValueClass, pos: usize) -> Result<Kind, Error> {
        match class {
            ValueClass::Atomic(_) => {
                let atom = self.text.next_atom().map_err(|e| self.convert(e, pos))?;
                Ok(match atom {
                    Atom::Symbol(s) => Kind::Symbol(s.into_owned()),
                    Atom::Boolean(b) => Kind::Atom(IOValue::new(b)),
                    Atom::Double(d) => Kind::Atom(IOValue::new(d)),
                    Atom::SignedInteger(i) => Kind::Atom(IOValue::new(i.into_owned())),
                    Atom::String(s) => Kind::Atom(IOValue::new(s.into_owned())),
                    Atom::ByteString(b) => Kind::Atom(IOValue::bytes(b.into_owned())),
                })
            }
            ValueClass::Embedded => {
                self.text
                    .open_embedded()
                    .map_err(|e| self.convert(e, pos))?;
                let inner = self.required(pos, "expected a value after `#:`")?;
                self.text
                    .close_embedded()
                    .map_err(|e| self.convert(e, pos))?;
                Ok(Kind::Embedded(Box::new(inner)))
            }
            ValueClass::Compound(CompoundClass::Record) => {
                self.text.open_record().map_err(|e| self.convert(e, pos))?;
                let mut b = B::start(B::Item::RecordLabel);
                self.text.boundary(&b).map_err(|e| self.convert(e, pos))?;
                let label = self.required(pos, "a record needs a label: `<label ...>`")?;
                let mut items = vec![label];
                while !self.close(&mut b, B::Item::RecordField, pos, b'>')? {
                    if let Some(item) = self.optional(pos)? {
                        items.push(item);
                    }
                }
                Ok(Kind::Record(items))
            }
            ValueClass::Compound(CompoundClass::Sequence) => {
                self.text
                    .open_sequence()
                    .map_err(|e| self.convert(e, pos))?;
                Ok(Kind::Sequence(self.items(
                    pos,
                    B::Item::SequenceValue,
                    b']',
                )?))
            }
            ValueClass::Compound(CompoundClass::Set) => {
                self.text.open_set().map_err(|e| self.convert(e, pos))?;
                Ok(Kind::Set(self.items(pos, B::Item::SetValue, b'}')?))
            }
            ValueClass::Compound(CompoundClass::Dictionary) => {
                self.text
                    .open_dictionary()
                    .map_err(|e| self.convert(e, pos))?;
                let mut b = B::Type::default();
                let mut entries = Vec::new();
                while !self.close(&mut b, B::Item::DictionaryKey, pos, b'}')? {
                    let Some(key) = self.optional(pos)? else {
                        continue;
                    };
                    b.shift(Some(B::Item::DictionaryValue));
                    let colon = self.next_pos();
                    self.text.boundary(&b).map_err(|e| {
                        if e.is_eof() {
                            self.unclosed(pos)
                        } else {
                            self.src.error(colon, "expected `:` after a dictionary key")
                        }
                    })?;
                    let value = self.required(colon, "expected a value after `:`")?;
                    entries.push((key, value));
                }
                Ok(Kind::Dictionary(entries))
            }
        }
    }

    /// Reads the elements of a sequence or set opened at `open`.
    fn items(&mut self, open: usize, item: B::Item, closer: u8) -> Result<Vec<Node>, Error> {
        let mut b = B::Type::default();
        let mut items = Vec::new();
        while !self.close(&mut b, item.clone(), open, closer)? {
            if let Some(value) = self.optional(open)? {
                items.push(value);
            }
        }
        Ok(items)
    }

    /// Reads the next element of the compound opened at `open`: `None` if only dropped
    /// comments stood before the closing bracket (which the next `close` then consumes).
    fn optional(&mut self, open: usize) -> Result<Option<Node>, Error> {
        match self.next()? {
            Next::Value(v) => Ok(Some(v)),
            Next::Close(_) => Ok(None),
            Next::Eof => Err(self.unclosed(open)),
        }
    }

    /// Reads a value that must be present; `context` is used when a closing bracket or the
    /// end of input comes instead.
    fn required(&mut self, open: usize, context: &str) -> Result<Node, Error> {
        match self.next()? {
            Next::Value(v) => Ok(v),
            Next::Close(pos) => Err(self.src.error(pos, context)),
            Next::Eof => Err(self.unclosed(open)),
        }
    }

    /// Checks for the end of the compound opened at `open`; true if it was closed.
    fn close(
        &mut self,
        b: &mut B::Type,
        item: B::Item,
        open: usize,
        closer: u8,
    ) -> Result<bool, Error> {
        let pos = self.next_pos();
        match self.text.close_compound(b, &item) {
            Ok(false) => Ok(false),
            Ok(true) => {
                let found = self
                    .text
                    .source
                    .input_position()
                    .and_then(|p| p.checked_sub(1))
                    .and_then(|p| self.bytes.get(p).map(|b| (p, *b)));
                match found {
                    Some((p, c @ (b'>' | b']' | b'}'))) if c != closer => Err(self.src.error(
                        p,
                        format!(
                            "unbalanced brackets: expected `{}` to close `{}` at {}, found `{}`",
                            closer as char,
                            opener(self.bytes, open),
                            self.src.locate(open),
                            c as char
                        ),
                    )),
                    _ => Ok(true),
                }
            }
            Err(e) if e.is_eof() => Err(self.unclosed(open)),
            Err(e) => Err(self.convert(e, pos)),
        }
    }

    fn unclosed(&self, open: usize) -> Error {
        self.src.error(
            open,
            format!(
                "unbalanced brackets: `{}` is never closed",
                opener(self.bytes, open)
            ),
        )
    }
}

/// The opening bracket text at `pos` (`<`, `[`, `{` or `#{`, `#:`).
fn opener(bytes: &[u8], pos: usize) -> &'static str {
    match (bytes.get(pos), bytes.get(pos + 1)) {
        (Some(b'<'), _) => "<",
        (Some(b'['), _) => "[",
        (Some(b'{'), _) => "{",
        (Some(b'#'), Some(b'{')) => "#{",
        (Some(b'#'), Some(b':')) => "#:",
        _ => "bracket",
    }
}

fn char_at(bytes: &[u8], pos: usize) -> char {
    bytes.get(pos).map_or('?', |b| *b as char)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<Vec<Node>, Error> {
        read_nodes(&Source::new("t", text))
    }

    #[test]
    fn positions_and_annotations() {
        let nodes = read("a\n  @x <b [c, d]> .").unwrap();
        assert_eq!(nodes.len(), 3);
        assert_eq!(nodes[1].pos, 7);
        assert_eq!(nodes[1].names().collect::<Vec<_>>(), vec![("x", 4)]);
        let Kind::Record(items) = &nodes[1].kind else {
            panic!("not a record")
        };
        let Kind::Sequence(seq) = &items[1].kind else {
            panic!("not a sequence")
        };
        assert_eq!(seq[1].pos, 14);
        assert!(nodes[2].is_symbol("."));
    }

    #[test]
    fn bracket_errors() {
        let e = read("x = <a [b>").unwrap_err();
        assert_eq!(e.location().unwrap().column, 10, "{e}");
        let e = read("x = <a\n  b").unwrap_err();
        assert_eq!(
            e.to_string(),
            "t:1:5: unbalanced brackets: `<` is never closed"
        );
        let e = read("x ]").unwrap_err();
        assert_eq!(
            e.to_string(),
            "t:1:3: unbalanced brackets: `]` closes nothing"
        );
        let e = read("x = <a @b>").unwrap_err();
        assert_eq!(e.to_string(), "t:1:8: expected a pattern after `@b`");
    }
}
