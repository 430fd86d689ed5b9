//! Source text handling: preparing the bytes for the Preserves reader and turning byte
//! offsets back into line/column [`Location`]s.

use crate::error::{Error, Location};

/// A schema source text together with its origin, able to locate byte offsets.
pub(crate) struct Source<'a> {
    origin: &'a str,
    text: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> Source<'a> {
    /// Wraps `text`, which came from `origin` (a path or a placeholder such as `<input>`).
    pub(crate) fn new(origin: &'a str, text: &'a str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(
            text.bytes()
                .enumerate()
                .filter(|(_, b)| *b == b'\n')
                .map(|(i, _)| i + 1),
        );
        Source {
            origin,
            text,
            line_starts,
        }
    }

    /// The bytes handed to the Preserves text reader.
    ///
    /// Byte offsets are preserved: `;` line comments (accepted for compatibility with older
    /// schema files; current Preserves reserves `;`) are blanked out with spaces, and a final
    /// newline is appended so that a `# comment` on the last line is terminated.
    pub(crate) fn reader_bytes(&self) -> Vec<u8> {
        let mut out = self.text.as_bytes().to_vec();
        blank_semicolon_comments(&mut out);
        out.push(b'\n');
        out
    }

    /// The line/column location of byte offset `pos` (clamped to the text).
    pub(crate) fn locate(&self, pos: usize) -> Location {
        let bytes = self.text.as_bytes();
        let pos = pos.min(bytes.len());
        let line_index = self.line_starts.partition_point(|&start| start <= pos) - 1;
        let line_start = self.line_starts.get(line_index).copied().unwrap_or(0);
        // Count characters: every byte that does not continue a UTF-8 sequence.
        let column = bytes
            .get(line_start..pos)
            .map(|s| s.iter().filter(|b| (**b & 0xc0) != 0x80).count())
            .unwrap_or(0);
        Location {
            origin: self.origin.to_owned(),
            line: line_index + 1,
            column: column + 1,
        }
    }

    /// A schema error located at byte offset `pos`.
    pub(crate) fn error(&self, pos: usize, message: impl Into<String>) -> Error {
        Error::Schema {
            location: self.locate(pos),
            message: message.into(),
        }
    }
}

/// Replaces every `;`-to-end-of-line comment in `bytes` by spaces, leaving strings, quoted
/// symbols and `#` comments alone.
fn blank_semicolon_comments(bytes: &mut [u8]) {
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            quote @ (b'"' | b'\'') => i = skip_quoted(bytes, i + 1, quote),
            b'#' => match bytes.get(i + 1) {
                Some(b' ' | b'\t' | b'\r' | b'\n' | b'!') => i = line_end(bytes, i),
                _ => i += 1,
            },
            b';' => {
                let end = line_end(bytes, i);
                bytes[i..end].fill(b' ');
                i = end;
            }
            _ => i += 1,
        }
    }
}

/// The index just past the closing `quote` of a quoted item whose body starts at `i`.
fn skip_quoted(bytes: &[u8], mut i: usize, quote: u8) -> usize {
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b if b == quote => return i + 1,
            _ => i += 1,
        }
    }
    bytes.len()
}

/// The index of the end of the line containing `i` (the `\r`/`\n`, or the end of input).
fn line_end(bytes: &[u8], i: usize) -> usize {
    bytes[i..]
        .iter()
        .position(|b| matches!(b, b'\n' | b'\r'))
        .map_or(bytes.len(), |p| i + p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn semicolon_comments_are_blanked_but_not_in_strings() {
        let src = Source::new("t", "a ; c \"x\"\n\"b;c\" # d; 'e\n'f;g' ;h");
        let bytes = src.reader_bytes();
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            "a        \n\"b;c\" # d; 'e\n'f;g'   \n"
        );
    }

    #[test]
    fn locations_are_one_based_and_count_characters() {
        let src = Source::new("t", "ab\nçd x\n");
        assert_eq!(src.locate(0).to_string(), "t:1:1");
        assert_eq!(src.locate(3).to_string(), "t:2:1");
        assert_eq!(src.locate(6).to_string(), "t:2:3");
        assert_eq!(src.locate(1000).to_string(), "t:3:1");
    }
}
