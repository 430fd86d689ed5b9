//! Fuzzing the NAR reader and unpacker: arbitrary bytes, mutated valid NARs
//! and NARs with hostile entry names. Nothing panics, bad input is an error,
//! and unpacking never writes outside its target directory.
//!
//! Quick by default; `NIXSPACE_FUZZ_LONG=1` runs over a million inputs (see
//! `docs/RELIABILITY.md`). `tests/corpus/nar/` is replayed every run: files
//! named `bad-*` must be refused, `good-*` accepted.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use nixspace_nix_formats::nar::{self, NarError, NarWriter};
use nixspace_test_support::fuzz::{self, mutate, mutation};
use proptest::prelude::*;

/// A tree to write as a NAR.
#[derive(Debug, Clone)]
enum Tree {
    File(bool, Vec<u8>),
    Link(Vec<u8>),
    Dir(Vec<(Vec<u8>, Tree)>),
}

/// A raw NAR string: length, bytes, zero padding.
fn put(out: &mut Vec<u8>, s: &[u8]) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s);
    out.resize(out.len() + (8 - s.len() % 8) % 8, 0);
}

/// Encode `tree` by hand, without [`NarWriter`]'s checks, so entries may
/// carry any name in any order.
fn encode_raw(tree: &Tree, out: &mut Vec<u8>) {
    put(out, b"(");
    put(out, b"type");
    match tree {
        Tree::File(exec, contents) => {
            put(out, b"regular");
            if *exec {
                put(out, b"executable");
                put(out, b"");
            }
            put(out, b"contents");
            put(out, contents);
        }
        Tree::Link(target) => {
            put(out, b"symlink");
            put(out, b"target");
            put(out, target);
        }
        Tree::Dir(entries) => {
            put(out, b"directory");
            for (name, node) in entries {
                put(out, b"entry");
                put(out, b"(");
                put(out, b"name");
                put(out, name);
                put(out, b"node");
                encode_raw(node, out);
                put(out, b")");
            }
        }
    }
    put(out, b")");
}

fn raw_nar(tree: &Tree) -> Vec<u8> {
    let mut out = Vec::new();
    put(&mut out, nar::MAGIC);
    encode_raw(tree, &mut out);
    out
}

/// Write a well-formed tree with [`NarWriter`] (entries sorted, names valid).
fn write_valid(tree: &Tree, w: &mut NarWriter<Vec<u8>>) -> Result<(), NarError> {
    match tree {
        Tree::File(exec, contents) => w.regular(*exec, contents.len() as u64, &mut &contents[..]),
        Tree::Link(target) => w.symlink(target),
        Tree::Dir(entries) => {
            w.start_directory()?;
            let mut sorted = entries.clone();
            sorted.sort_by(|a, b| a.0.cmp(&b.0));
            sorted.dedup_by(|a, b| a.0 == b.0);
            for (name, node) in &sorted {
                w.entry(name)?;
                write_valid(node, w)?;
            }
            w.end_directory()
        }
    }
}

fn valid_nar(tree: &Tree) -> Vec<u8> {
    let mut w = NarWriter::new(Vec::new()).unwrap();
    write_valid(tree, &mut w).unwrap();
    w.finish().unwrap().0
}

fn good_name() -> impl Strategy<Value = Vec<u8>> {
    "[a-zA-Z0-9._+-]{1,12}"
        .prop_filter("not . or ..", |s| s != "." && s != "..")
        .prop_map(String::into_bytes)
}

/// Names a NAR must never carry.
fn hostile_name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"..".to_vec()),
        Just(b".".to_vec()),
        Just(Vec::new()),
        Just(b"/".to_vec()),
        Just(b"../escaped".to_vec()),
        Just(b"/tmp/escaped".to_vec()),
        Just(b"a/../../escaped".to_vec()),
        Just(b"nul\0byte".to_vec()),
        (good_name(), good_name()).prop_map(|(a, b)| [a, b"/".to_vec(), b].concat()),
        good_name().prop_map(|a| [a, vec![0]].concat()),
    ]
}

fn tree(names: BoxedStrategy<Vec<u8>>) -> impl Strategy<Value = Tree> {
    let leaf = prop_oneof![
        (any::<bool>(), prop::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(x, c)| Tree::File(x, c)),
        prop_oneof![
            Just(b"../../outside".to_vec()),
            Just(b"/etc/passwd".to_vec()),
            good_name()
        ]
        .prop_map(Tree::Link),
    ];
    leaf.prop_recursive(4, 24, 5, move |inner| {
        prop::collection::vec((names.clone(), inner), 0..5).prop_map(Tree::Dir)
    })
}

/// A tree with one hostile name somewhere in a directory.
fn hostile_tree() -> impl Strategy<Value = Tree> {
    (
        prop::collection::vec(good_name(), 0..4),
        hostile_name(),
        tree(good_name().boxed()),
    )
        .prop_map(|(dirs, bad, node)| {
            let mut t = Tree::Dir(vec![(bad, node)]);
            for d in dirs.into_iter().rev() {
                t = Tree::Dir(vec![(d, t)]);
            }
            t
        })
}

/// What unpacking left in the sandbox, outside the target: must be nothing.
fn escaped(sandbox: &Path, target: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(sandbox)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p != target)
        .collect()
}

/// Every path under `root` (not following symlinks) lies inside `root`.
fn all_inside(root: &Path) -> bool {
    let Ok(meta) = std::fs::symlink_metadata(root) else {
        return true;
    };
    if !meta.is_dir() {
        return true;
    }
    std::fs::read_dir(root).unwrap().flatten().all(|e| {
        let p = e.path();
        p.starts_with(root) && all_inside(&p)
    })
}

/// A sandbox directory shared by a test's cases; each case unpacks into a
/// fresh `target` inside `sandbox/case` and everything else must stay empty.
struct Sandbox {
    dir: tempfile::TempDir,
    n: std::cell::Cell<u64>,
}

impl Sandbox {
    fn new() -> Sandbox {
        Sandbox {
            dir: tempfile::tempdir().unwrap(),
            n: std::cell::Cell::new(0),
        }
    }

    /// Parse and unpack `bytes`; assert nothing escaped. The unpack result.
    fn check(&self, bytes: &[u8]) -> Result<(), String> {
        self.n.set(self.n.get() + 1);
        let case = self.dir.path().join(format!("case-{}", self.n.get()));
        std::fs::create_dir(&case).unwrap();
        let target = case.join("out");
        let result = nar::fs::restore_path(bytes, &target).map_err(|e| e.to_string());
        let outside = escaped(&case, &target);
        assert!(
            outside.is_empty(),
            "unpacking wrote outside its target: {outside:?}"
        );
        assert!(all_inside(&target));
        make_writable(&case);
        std::fs::remove_dir_all(&case).unwrap();
        result.map(|_| ())
    }
}

/// Unpacked directories may be read-only in principle: make them removable.
fn make_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if let Ok(m) = std::fs::symlink_metadata(&p) {
            if m.is_dir() {
                let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755));
                make_writable(&p);
            }
        }
    }
}

#[test]
fn arbitrary_bytes_are_refused_without_harm() {
    let sandbox = Sandbox::new();
    let magic = raw_nar(&Tree::File(false, vec![]))[..24].to_vec();
    let input = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        prop::collection::vec(any::<u8>(), 0..512).prop_map(move |b| [magic.clone(), b].concat()),
    ];
    fuzz::runner(1000, 250_000)
        .run(&input, |bytes| {
            let _ = sandbox.check(&bytes);
            Ok(())
        })
        .unwrap();
}

#[test]
fn mutated_valid_nars_never_escape() {
    let sandbox = Sandbox::new();
    let input = (
        tree(good_name().boxed()),
        prop::collection::vec(mutation(), 0..4),
    );
    fuzz::runner(1000, 250_000)
        .run(&input, |(tree, mutations)| {
            let valid = valid_nar(&tree);
            if mutations.is_empty() {
                prop_assert!(sandbox.check(&valid).is_ok(), "a valid NAR was refused");
            } else {
                let _ = sandbox.check(&mutate(valid, &mutations));
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn hostile_entry_names_are_refused_and_write_nothing_outside() {
    let sandbox = Sandbox::new();
    fuzz::runner(500, 100_000)
        .run(&hostile_tree(), |tree| {
            let bytes = raw_nar(&tree);
            let result = sandbox.check(&bytes);
            prop_assert!(result.is_err(), "accepted a hostile name: {tree:?}");
            Ok(())
        })
        .unwrap();
}

#[test]
fn the_corpus_replays() {
    let files = fuzz::corpus("nar");
    assert!(
        !files.is_empty(),
        "no corpus in {}",
        fuzz::corpus_dir("nar").display()
    );
    let sandbox = Sandbox::new();
    for (name, bytes) in files {
        let result = sandbox.check(&bytes);
        if name.starts_with("bad-") {
            assert!(result.is_err(), "{name} was accepted");
        } else if name.starts_with("good-") {
            assert!(result.is_ok(), "{name} was refused: {result:?}");
        }
    }
}

/// Writes the corpus seeds (run with `--ignored` after changing them).
#[test]
#[ignore = "regenerates tests/corpus/nar"]
fn write_corpus_seeds() {
    let dir = fuzz::corpus_dir("nar");
    std::fs::create_dir_all(&dir).unwrap();
    let file = |c: &[u8]| Tree::File(false, c.to_vec());
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("good-file.nar", raw_nar(&file(b"hello\n"))),
        (
            "good-tree.nar",
            raw_nar(&Tree::Dir(vec![
                (b"a".to_vec(), file(b"x")),
                (b"b".to_vec(), Tree::Link(b"../../outside".to_vec())),
            ])),
        ),
        (
            "bad-dotdot.nar",
            raw_nar(&Tree::Dir(vec![(b"..".to_vec(), file(b"x"))])),
        ),
        (
            "bad-dot.nar",
            raw_nar(&Tree::Dir(vec![(b".".to_vec(), file(b"x"))])),
        ),
        (
            "bad-empty-name.nar",
            raw_nar(&Tree::Dir(vec![(vec![], file(b"x"))])),
        ),
        (
            "bad-slash.nar",
            raw_nar(&Tree::Dir(vec![(b"../escaped".to_vec(), file(b"x"))])),
        ),
        (
            "bad-absolute.nar",
            raw_nar(&Tree::Dir(vec![(b"/tmp/escaped".to_vec(), file(b"x"))])),
        ),
        (
            "bad-nul.nar",
            raw_nar(&Tree::Dir(vec![(b"a\0b".to_vec(), file(b"x"))])),
        ),
        (
            "bad-duplicate.nar",
            raw_nar(&Tree::Dir(vec![
                (b"a".to_vec(), file(b"1")),
                (b"a".to_vec(), file(b"2")),
            ])),
        ),
        (
            "bad-unsorted.nar",
            raw_nar(&Tree::Dir(vec![
                (b"b".to_vec(), file(b"1")),
                (b"a".to_vec(), file(b"2")),
            ])),
        ),
        ("bad-truncated.nar", raw_nar(&file(b"hello"))[..60].to_vec()),
        ("bad-huge-length.nar", {
            let mut b = raw_nar(&file(b"hello"));
            let at = b.len() - 32;
            b[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
            b
        }),
        ("bad-empty.nar", Vec::new()),
    ];
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}
