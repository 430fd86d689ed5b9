//! NAR serialisation against the real Nix 2.8: our NAR of a tree is
//! byte-identical to `nix-store --dump`, our hash equals `nix-hash`, and
//! unpacking Nix's NAR reproduces the tree.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use common::Nix;
use nixspace_nix_formats::nar::{self, NarError};
use nixspace_nix_formats::{Hash, HashAlgo};

/// A tree with every kind of node and awkward names and sizes.
fn make_tree(root: &Path) {
    let f = |p: &str, data: &[u8], exec: bool| {
        let path = root.join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, data).unwrap();
        let mode = if exec { 0o755 } else { 0o644 };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    std::fs::create_dir_all(root).unwrap();
    f("a", b"hello\n", false);
    f("B", b"upper case sorts first", false);
    f("a-b", b"", false);
    f("a.b", b"12345678", true);
    f("bin/tool", b"#!/bin/sh\necho hi\n", true);
    f("deep/er/still/file", &[0u8, 1, 2, 255], false);
    f("ünïcödé name", "ünïcödé".as_bytes(), false);
    f("with space", b"x", false);
    let big: Vec<u8> = (0..200_003u32).map(|i| (i % 251) as u8).collect();
    f("big", &big, false);
    std::fs::create_dir_all(root.join("empty-dir")).unwrap();
    std::fs::create_dir_all(root.join("deep/empty")).unwrap();
    symlink("a", root.join("link-rel")).unwrap();
    symlink("/nonexistent/absolute", root.join("link-abs")).unwrap();
    symlink("../..", root.join("deep/er/up")).unwrap();
}

fn dump_with_nix(nix: &Nix, path: &Path) -> Vec<u8> {
    nix.run("nix-store", &["--dump", path.to_str().unwrap()])
        .stdout
}

fn ours(path: &Path) -> (Vec<u8>, nar::NarSummary) {
    let mut out = Vec::new();
    let s = nar::fs::dump_path(path, &mut out).unwrap();
    (out, s)
}

fn roots(nix: &Nix) -> Vec<PathBuf> {
    let tree = nix.dir().join("tree");
    make_tree(&tree);
    let file = nix.write("single-file", "just a file");
    let exe = nix.write("single-exe", "#!/bin/sh\n");
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o700)).unwrap();
    let link = nix.dir().join("single-link");
    symlink("tree/a", &link).unwrap();
    let empty = nix.dir().join("empty-root");
    std::fs::create_dir(&empty).unwrap();
    vec![tree, file, exe, link, empty]
}

#[test]
fn dump_matches_nix_store_dump() {
    let nix = Nix::private();
    for root in roots(&nix) {
        let theirs = dump_with_nix(&nix, &root);
        let (mine, summary) = ours(&root);
        assert_eq!(mine, theirs, "{}", root.display());
        assert_eq!(summary.size, theirs.len() as u64);
        assert_eq!(summary.sha256, Hash::sha256(&theirs));
        let h = nix.stdout(
            "nix-hash",
            &["--type", "sha256", "--base32", root.to_str().unwrap()],
        );
        assert_eq!(summary.sha256.to_nixbase32(), h, "{}", root.display());
        let h = nix.stdout("nix-hash", &["--type", "sha512", root.to_str().unwrap()]);
        let mut hasher = nixspace_nix_formats::hash::Hasher::new(HashAlgo::Sha512);
        nar::fs::dump_path(&root, &mut hasher).unwrap();
        assert_eq!(hasher.finish().to_base16(), h);
    }
}

#[test]
fn unpacking_nix_dumps_reproduces_the_tree() {
    let nix = Nix::private();
    for (i, root) in roots(&nix).into_iter().enumerate() {
        let theirs = dump_with_nix(&nix, &root);
        let target = nix.dir().join(format!("restored-{i}"));
        let summary = nar::fs::restore_path(&theirs[..], &target).unwrap();
        assert_eq!(summary.sha256, Hash::sha256(&theirs));
        // Nix dumps our unpacked tree to the same bytes.
        assert_eq!(dump_with_nix(&nix, &target), theirs, "{}", root.display());
    }
}

#[test]
fn nix_restores_our_nar() {
    let nix = Nix::private();
    let tree = nix.dir().join("tree");
    make_tree(&tree);
    let (mine, _) = ours(&tree);
    let target = nix.dir().join("by-nix");
    let mut child = nix
        .command("nix-store")
        .args(["--restore", target.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("nix-store must be installed (apt-get install nix-bin)");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(&mine).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(ours(&target).0, mine);
}

#[test]
fn hostile_nars_never_escape_the_target() {
    let nix = Nix::private();
    let s = |out: &mut Vec<u8>, b: &[u8]| {
        out.extend_from_slice(&(b.len() as u64).to_le_bytes());
        out.extend_from_slice(b);
        out.resize(out.len() + (8 - b.len() % 8) % 8, 0);
    };
    let dir_with = |name: &[u8], node: &[&[u8]]| {
        let mut out = Vec::new();
        for t in [
            &b"nix-archive-1"[..],
            b"(",
            b"type",
            b"directory",
            b"entry",
            b"(",
            b"name",
        ] {
            s(&mut out, t);
        }
        s(&mut out, name);
        s(&mut out, b"node");
        for t in node {
            s(&mut out, t);
        }
        for t in [&b")"[..], b")"] {
            s(&mut out, t);
        }
        out
    };
    let file: &[&[u8]] = &[b"(", b"type", b"symlink", b"target", b"/etc/passwd", b")"];
    for name in [&b".."[..], b".", b"../x", b"a/b", b"", b"x\0y"] {
        let target = nix.dir().join("t");
        let err = nar::fs::restore_path(&dir_with(name, file)[..], &target).unwrap_err();
        assert!(
            matches!(err, NarError::InvalidName { .. }),
            "{name:?}: {err}"
        );
        // Only the (empty) target directory was created.
        assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);
        std::fs::remove_dir(&target).unwrap();
    }
    assert!(std::fs::read_dir(nix.dir()).unwrap().all(|e| {
        let n = e.unwrap().file_name();
        n == "conf" || n == "t" || n == "x"
    }));
}
