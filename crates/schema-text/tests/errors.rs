//! Bad schema text gives located errors, never panics.
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use nixspace_schema_text::{bundle_from_dir, parse_schema, parse_schema_named, Error};

/// Parses `text` as `foo.prs` and returns the error rendered as `foo.prs:L:C: message`.
fn error(text: &str) -> String {
    match parse_schema_named("foo.prs", text) {
        Ok(v) => panic!("expected an error for {text:?}, got {v:?}"),
        Err(e) => {
            assert!(e.location().is_some(), "no location in {e}");
            e.to_string()
        }
    }
}

/// Asserts that `text` fails at `line:column` with a message containing `fragment`.
fn check(text: &str, line: usize, column: usize, fragment: &str) {
    let e = error(text);
    let prefix = format!("foo.prs:{line}:{column}: ");
    assert!(
        e.starts_with(&prefix) && e.contains(fragment),
        "for {text:?}\n  expected {prefix}...{fragment}...\n  got      {e}"
    );
}

#[test]
fn name_without_pattern() {
    check(
        "version 1 .\n\nFoo = <foo @name> .",
        3,
        12,
        "expected a pattern after `@name`",
    );
    check(
        "version 1 .\nFoo = <foo> / @name .",
        2,
        15,
        "expected a pattern after `@name`",
    );
    check(
        "version 1 .\nFoo = @a int / @b / int .",
        2,
        16,
        "expected a pattern after `@b`",
    );
    check(
        "version 1 .\nFoo = [int @n ...] .",
        2,
        12,
        "expected a pattern after `@n`",
    );
}

#[test]
fn unbalanced_brackets() {
    check(
        "version 1 .\nFoo = <foo [bar> .",
        2,
        16,
        "expected `]` to close `[` at foo.prs:2:12",
    );
    check(
        "version 1 .\nFoo = <foo\n  bar .\n",
        2,
        7,
        "`<` is never closed",
    );
    check("version 1 .\nFoo = {a: int .", 2, 7, "`{` is never closed");
    check("version 1 .\nFoo = foo] .", 2, 10, "`]` closes nothing");
    check("version 1 .\nFoo = <> .", 2, 8, "a record needs a label");
}

#[test]
fn missing_dot() {
    check("version 1 .\nA = <a>\nB = <b> .", 3, 1, "missing `.`");
    check(
        "version 1 .\nA = <a> .\nB = <b>\n",
        3,
        1,
        "definition of `B` is not terminated by `.`",
    );
    check("version 1\nA = <a> .", 1, 1, "expected `version 1 .`");
    check(
        "version 1 .\nA = Bar.\n",
        2,
        5,
        "`Bar.` is read as one symbol",
    );
    check(
        "version 1 .\nA = Bar. B = <b> .",
        2,
        5,
        "`Bar.` is read as one symbol",
    );
    check(
        "version 1 .\nA = <a Bar.> .",
        2,
        8,
        "`Bar.` is not a valid reference (a `.` ending",
    );
}

#[test]
fn bad_clauses() {
    check("A = <a> .", 1, 1, "missing `version 1 .`");
    check("version 2 .", 1, 9, "only `version 1`");
    check("version 1 .\nversion 1 .", 2, 1, "duplicate `version`");
    check(
        "version 1 .\nembeddedType 3 .",
        2,
        14,
        "expected `#f` or a reference",
    );
    check(
        "version 1 .\nA = <a> .\nA = <b> .",
        3,
        1,
        "`A` is defined twice",
    );
    check("version 1 .\nfoo bar .", 2, 1, "expected a definition");
    check(
        "version 1 .\n<a> = int .",
        2,
        1,
        "a definition name must be a symbol",
    );
    check("version 1 .\nA = .", 2, 3, "expected a pattern after `=`");
}

#[test]
fn bad_patterns() {
    check(
        "version 1 .\nA = Missing .",
        2,
        5,
        "`Missing` is not defined in this schema",
    );
    check(
        "version 1 .\nA = int / string .",
        2,
        5,
        "cannot infer a name",
    );
    check(
        "version 1 .\nA = <a> / <a> .",
        2,
        11,
        "two alternatives are named `a`",
    );
    check(
        "version 1 .\nA = <a> / .",
        2,
        9,
        "expected a pattern after `/`",
    );
    check(
        "version 1 .\nA = / <a> .",
        2,
        5,
        "`/` needs at least two alternatives",
    );
    check(
        "version 1 .\nA = <a> / <b> & <c> .",
        2,
        15,
        "cannot mix `/` and `&`",
    );
    check(
        "version 1 .\nA = <a @x <b>> .",
        2,
        8,
        "`@x` names a compound pattern",
    );
    check("version 1 .\nA = <a @x @y int> .", 2, 11, "only one name");
    check(
        "version 1 .\nA = <a @x-y int> .",
        2,
        8,
        "`x-y` is not a valid name",
    );
    check(
        "version 1 .\nA = #{int string} .",
        2,
        5,
        "exactly one pattern",
    );
    check(
        "version 1 .\nA = [...] .",
        2,
        6,
        "`...` must follow the pattern it repeats",
    );
    check(
        "version 1 .\nA = [=a ... =b] .",
        2,
        9,
        "`...` may only follow the last",
    );
    check(
        "version 1 .\nA = <a <b> ...> .",
        2,
        8,
        "the pattern before `...` must be a simple",
    );
    check(
        "version 1 .\nA = {a: int ...: int} .",
        2,
        18,
        "expected `...:...`",
    );
    check(
        "version 1 .\nA = {a: <b>} .",
        2,
        9,
        "must be a simple pattern",
    );
    check("version 1 .\nA = #:<b> .", 2, 7, "must be a simple pattern");
    check(
        "version 1 .\nA = <a / b> .",
        2,
        8,
        "`/` separates alternatives only at the top level",
    );
    check("version 1 .\nA = <<lit> #:x> .", 2, 12, "embedded values");
    check("version 1 .\nA = <<rec> a> .", 2, 5, "exactly two patterns");
    check(
        "version 1 .\nA = @x int .",
        2,
        5,
        "`@x` cannot name a whole definition",
    );
    check(
        "version 1 .\nA = <a> <b> .",
        2,
        9,
        "unexpected value after a complete pattern",
    );
}

#[test]
fn lexical_errors() {
    check("version 1 .\nA = #y .", 2, 7, "Invalid # syntax");
    check(
        "version 1 .\nA = \"abc .\n",
        2,
        5,
        "unexpected end of input",
    );
    check(
        "version 1 .\nA = {a int} .",
        2,
        8,
        "expected `:` after a dictionary key",
    );
}

#[test]
fn comments_are_accepted() {
    let text = "version 1 .\nA = { a: int # trailing comment in a dictionary\n } .\nB = <b @x int # and in a record\n > .";
    parse_schema(text).expect("comments before closing brackets are fine");
    check(
        "version 1 .\nA = <a @x # comment\n> .",
        2,
        8,
        "expected a pattern after `@x`",
    );
    let text = "; old-style comment with \"quote\n# new-style comment; it's fine\nversion 1 .\nA = <a @x int> . ; trailing\n# last line without newline";
    parse_schema(text).expect("comments are fine");
}

#[test]
fn default_origin_is_input() {
    let e = parse_schema("version 1 .\nA = B .").unwrap_err();
    assert_eq!(
        e.to_string(),
        "<input>:2:5: `B` is not defined in this schema"
    );
}

#[test]
fn cross_module_reference_errors_name_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("a.prs"), "version 1 .\nA = <a> .\n").expect("write");
    std::fs::write(
        dir.path().join("b.prs"),
        "version 1 .\nB = <b\n  @x a.Nope> .\n",
    )
    .expect("write");
    let e = bundle_from_dir(dir.path()).unwrap_err();
    let path = dir.path().join("b.prs");
    assert_eq!(
        e.to_string(),
        format!(
            "{}:3:6: `Nope` is not defined in module `a`",
            path.display()
        )
    );
}

#[test]
fn directory_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(matches!(
        bundle_from_dir(dir.path()),
        Err(Error::NoSchemas(_))
    ));
    std::fs::write(dir.path().join("bad-name.prs"), "version 1 .\n").expect("write");
    assert!(matches!(
        bundle_from_dir(dir.path()),
        Err(Error::ModuleName { .. })
    ));
    assert!(matches!(
        bundle_from_dir(&dir.path().join("absent")),
        Err(Error::Io { .. })
    ));
}

/// Every prefix and every single-character deletion of real schemas must give `Ok` or a
/// located error, never a panic.
#[test]
fn mangled_schemas_never_panic() {
    let schemas = common::crate_dir("syndicate").join("protocols/schemas");
    for file in ["sturdy.prs", "http.prs"] {
        let text = std::fs::read_to_string(schemas.join(file)).expect("read schema");
        let boundaries: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
        for &cut in &boundaries {
            if let Err(e) = parse_schema(&text[..cut]) {
                assert!(e.location().is_some(), "{file} prefix {cut}: {e}");
            }
            let end = text[cut..]
                .chars()
                .next()
                .map_or(cut, |c| cut + c.len_utf8());
            let mangled = format!("{}{}", &text[..cut], &text[end..]);
            if let Err(e) = parse_schema(&mangled) {
                assert!(e.location().is_some(), "{file} deletion at {cut}: {e}");
            }
        }
    }
}

/// Unnamed non-literal fields are rejected (the Rust code generator would panic on them).
#[test]
fn unnamed_fields() {
    let cases: &[(&str, usize, usize)] = &[
        ("version 1 .\nA = <a int> .", 2, 8),
        ("version 1 .\nA = [@x int string ...] .", 2, 13),
        ("version 1 .\nA = {1: int} .", 2, 9),
        ("version 1 .\nA = <a> & B .\nB = <b> .", 2, 11),
    ];
    for (text, line, column) in cases {
        check(text, *line, *column, "this field needs a name");
    }
    parse_schema("version 1 .\nA = <a 1 =b \"c\" {d: 2} [3 4]> .").expect("literals need no name");
}
