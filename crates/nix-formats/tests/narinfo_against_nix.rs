//! Binary-cache narinfos and signatures against the real Nix 2.8.
//!
//! One private store gets a few paths with references (a `nix-store --add`
//! file, a `builtins.toFile` text that refers to it, and a derivation output
//! that refers to both and to itself), signed with two keys from
//! `nix-store --generate-binary-cache-key` and copied to a `file://` cache.
//! Then: every narinfo Nix wrote parses and prints back byte-identical; our
//! fingerprints verify Nix's signatures and tampering breaks them; our
//! signatures equal Nix's for the same key, and Nix accepts a cache signed
//! by us with a key Nix never saw.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};

use common::Nix;
use nixspace_nix_formats::narinfo::{NarInfoError, SyntaxError};
use nixspace_nix_formats::signature::{
    check_narinfo_signatures, sign, verify, PublicKeys, SecretKey, SignatureError,
};
use nixspace_nix_formats::{Hash, NarInfo, StoreDir, StorePath};

/// The fixture: a private store, its paths, keys and a signed cache.
struct Fixture {
    nix: Nix,
    /// `nix-store --add` of a file: no references, `fixed:r:` CA.
    added: String,
    /// `builtins.toFile` referring to `added`: `text:` CA.
    text: String,
    /// Derivation output referring to `added`, `text` and itself.
    built: String,
    cache: PathBuf,
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

impl Fixture {
    fn new() -> Fixture {
        let nix = Nix::private();
        let sk1 = nix.dir().join("sk1");
        let pk1 = nix.dir().join("pk1");
        let sk2 = nix.dir().join("sk2");
        let pk2 = nix.dir().join("pk2");
        for (name, sk, pk) in [("cache-1", &sk1, &pk1), ("other.example.org-2", &sk2, &pk2)] {
            nix.run(
                "nix-store",
                &[
                    "--generate-binary-cache-key",
                    name,
                    sk.to_str().unwrap(),
                    pk.to_str().unwrap(),
                ],
            );
        }

        let file = nix.write("hello.txt", "hello\n");
        let added = nix.stdout("nix-store", &["--add", file.to_str().unwrap()]);
        let text = nix.stdout(
            "nix-instantiate",
            &[
                "--eval",
                "--read-write-mode",
                "-E",
                &format!("builtins.toFile \"refs.txt\" \"see ${{builtins.storePath {added}}}\""),
            ],
        );
        let text = text.trim_matches('"').to_owned();
        let expr = nix.write(
            "drv.nix",
            format!(
                "let a = builtins.storePath {added}; b = builtins.storePath {text}; in\n\
                 derivation {{ name = \"built\"; system = builtins.currentSystem;\n\
                   builder = \"/bin/sh\"; inherit a b;\n\
                   args = [\"-c\" \"echo $a $b > $out; echo $out >> $out\"]; }}\n"
            ),
        );
        let built = nix.stdout("nix-build", &["--no-out-link", expr.to_str().unwrap()]);
        let refs = nix.stdout("nix-store", &["--query", "--references", &built]);
        assert_eq!(refs.lines().count(), 3, "{refs}");

        for sk in [&sk1, &sk2] {
            nix.run(
                "nix",
                &[
                    "--extra-experimental-features",
                    "nix-command",
                    "store",
                    "sign",
                    "--key-file",
                    sk.to_str().unwrap(),
                    "--recursive",
                    &built,
                ],
            );
        }
        let cache = nix.dir().join("cache");
        copy_to_cache(&nix, &cache, &built);
        Fixture {
            nix,
            added,
            text,
            built,
            cache,
        }
    }

    fn key(&self, file: &str) -> String {
        read(&self.nix.dir().join(file))
    }

    fn narinfo_path(&self, full_path: &str) -> PathBuf {
        let p = self.nix.store_dir.parse(full_path).unwrap();
        self.cache.join(format!("{}.narinfo", p.hash_part()))
    }

    fn narinfo(&self, full_path: &str) -> NarInfo {
        let text = read(&self.narinfo_path(full_path));
        NarInfo::parse(&self.nix.store_dir, &text).unwrap()
    }

    fn all_narinfos(&self) -> Vec<(PathBuf, String)> {
        let mut v: Vec<(PathBuf, String)> = std::fs::read_dir(&self.cache)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "narinfo"))
            .map(|p| {
                let t = read(&p);
                (p, t)
            })
            .collect();
        v.sort();
        v
    }
}

fn copy_to_cache(nix: &Nix, cache: &Path, path: &str) {
    nix.run(
        "nix",
        &[
            "--extra-experimental-features",
            "nix-command",
            "copy",
            "--to",
            &format!("file://{}", cache.display()),
            path,
        ],
    );
}

/// The store directory the cache declares in `nix-cache-info`.
fn cache_store_dir(cache: &Path) -> StoreDir {
    let info = read(&cache.join("nix-cache-info"));
    let dir = info
        .lines()
        .find_map(|l| l.strip_prefix("StoreDir: "))
        .expect("nix-cache-info has StoreDir");
    StoreDir::new(dir).unwrap()
}

#[test]
fn nix_written_narinfos_round_trip_and_verify() {
    let f = Fixture::new();
    let dir = cache_store_dir(&f.cache);
    assert_eq!(dir, f.nix.store_dir);
    let infos = f.all_narinfos();
    assert_eq!(infos.len(), 3, "{infos:?}");
    let keys = PublicKeys::parse(&format!("{} {}", f.key("pk1"), f.key("pk2"))).unwrap();
    for (file, text) in &infos {
        let n = NarInfo::parse(&dir, text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert_eq!(n.to_text(&dir), *text, "{}", file.display());
        assert_eq!(file.file_name().unwrap().to_str().unwrap(), n.file_name());
        assert_eq!(n.unknown, vec![]);
        assert!(n.url.starts_with("nar/"), "{}", n.url);
        // Both keys signed every path, so each signature verifies.
        assert_eq!(n.sigs.len(), 2, "{text}");
        let fp = n.fingerprint(&dir).unwrap();
        for sig in &n.sigs {
            assert!(verify(&keys, &fp, sig), "{sig} over {fp}");
        }
        assert_eq!(
            check_narinfo_signatures(&dir, &n, &keys).unwrap(),
            ["cache-1", "other.example.org-2"]
        );
        let only2 = PublicKeys::parse(&f.key("pk2")).unwrap();
        assert_eq!(
            check_narinfo_signatures(&dir, &n, &only2).unwrap(),
            ["other.example.org-2"]
        );
    }

    let added = f.narinfo(&f.added);
    assert!(added.references.is_empty());
    assert!(f.narinfo_path(&f.added).exists());
    assert!(read(&f.narinfo_path(&f.added)).contains("\nReferences: \n"));
    assert!(added.is_content_addressed(&dir));
    let text = f.narinfo(&f.text);
    assert_eq!(text.references.len(), 1);
    assert!(text.is_content_addressed(&dir));
    let built = f.narinfo(&f.built);
    assert_eq!(built.references.len(), 3);
    assert!(built.references.contains(&built.store_path));
    assert!(built.deriver.as_ref().is_some_and(StorePath::is_derivation));
    assert!(built.ca.is_none());
    assert!(!built.is_content_addressed(&dir));
}

#[test]
fn tampering_breaks_nix_signatures() {
    let f = Fixture::new();
    let dir = &f.nix.store_dir;
    let keys = PublicKeys::parse(&format!("{}\n{}\n", f.key("pk1"), f.key("pk2"))).unwrap();
    for path in [&f.added, &f.text, &f.built] {
        let good = f.narinfo(path);
        assert!(check_narinfo_signatures(dir, &good, &keys).is_ok());
        let broken = |n: &NarInfo, what: &str| {
            let r = check_narinfo_signatures(dir, n, &keys);
            assert!(
                matches!(r, Err(SignatureError::NoValidSignature { sigs: 2, .. })),
                "{what} of {path}: {r:?}"
            );
        };
        let mut n = good.clone();
        n.nar_hash = Hash::sha256("something else");
        broken(&n, "NarHash");
        let mut n = good.clone();
        n.nar_size += 1;
        broken(&n, "NarSize");
        let mut n = good.clone();
        n.references.insert(dir.parse(&f.built).unwrap());
        if n.references != good.references {
            broken(&n, "added reference");
        }
        if let Some(first) = good.references.iter().next() {
            let mut n = good.clone();
            n.references.remove(first);
            broken(&n, "dropped reference");
        }
        let mut n = good.clone();
        n.store_path = dir.parse(&f.added).unwrap();
        if n.store_path != good.store_path {
            broken(&n, "StorePath");
        }
        // Fields outside the fingerprint do not matter.
        let mut n = good.clone();
        n.url = "nar/elsewhere.nar".into();
        n.file_size = Some(1);
        n.deriver = None;
        n.unknown.push(("Extra".into(), "x".into()));
        assert!(check_narinfo_signatures(dir, &n, &keys).is_ok());
        // An untrusted key verifies nothing.
        let stranger = SecretKey::from_seed("cache-1", &[9; 32]).unwrap();
        let strangers: PublicKeys = [stranger.to_public()].into_iter().collect();
        assert!(check_narinfo_signatures(dir, &good, &strangers).is_err());
    }
}

#[test]
fn our_signatures_equal_nix_signatures() {
    let f = Fixture::new();
    let dir = &f.nix.store_dir;
    for (sk_file, name) in [("sk1", "cache-1"), ("sk2", "other.example.org-2")] {
        let sk = SecretKey::parse(&f.key(sk_file)).unwrap();
        assert_eq!(sk.name(), name);
        assert_eq!(sk.to_text(), f.key(sk_file));
        let pk_file = sk_file.replace("sk", "pk");
        assert_eq!(sk.to_public().to_string(), f.key(&pk_file));
        for path in [&f.added, &f.text, &f.built] {
            let n = f.narinfo(path);
            let ours = sign(&sk, &n.fingerprint(dir).unwrap());
            assert!(n.sigs.contains(&ours), "{ours} not in {:?}", n.sigs);
            let mut unsigned = n.clone();
            unsigned.sigs.clear();
            unsigned.sign(dir, &sk).unwrap();
            assert!(unsigned.sigs.is_subset(&n.sigs));
        }
    }
}

/// Runs `nix store verify` on `path` in `cache`, trusting only `pk`.
fn nix_verify(nix: &Nix, cache: &Path, pk: &str, path: &str) -> (bool, String) {
    let out = nix
        .command("nix")
        .args([
            "--extra-experimental-features",
            "nix-command",
            "store",
            "verify",
            "--store",
            &format!("file://{}", cache.display()),
            "--sigs-needed",
            "1",
            "--trusted-public-keys",
            pk,
            path,
        ])
        .output()
        .expect("these tests need the real Nix (Debian: apt-get install nix-bin)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Copies the cache directory (narinfos, NARs and `nix-cache-info`).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

#[test]
fn nix_accepts_our_signatures() {
    let f = Fixture::new();
    let dir = &f.nix.store_dir;
    // A key Nix has never seen, and a cache whose narinfos carry only our
    // signatures, printed by us.
    let ours = SecretKey::from_seed("nixspace-test-1", &[42; 32]).unwrap();
    let our_pk = ours.to_public().to_string();
    let resign = |cache: &Path, key: Option<&SecretKey>| {
        copy_dir(&f.cache, cache);
        for path in [&f.added, &f.text, &f.built] {
            let mut n = f.narinfo(path);
            n.sigs.clear();
            if let Some(k) = key {
                n.sign(dir, k).unwrap();
            }
            std::fs::write(cache.join(n.file_name()), n.to_text(dir)).unwrap();
        }
    };
    let signed = f.nix.dir().join("cache-ours");
    resign(&signed, Some(&ours));
    let (ok, err) = nix_verify(&f.nix, &signed, &our_pk, &f.built);
    assert!(ok, "Nix rejected our signature: {err}");

    // Controls: without signatures, or trusting another key, the
    // input-addressed path is untrusted (content-addressed ones would pass
    // regardless, so only `built` is checked).
    let unsigned = f.nix.dir().join("cache-unsigned");
    resign(&unsigned, None);
    let (ok, err) = nix_verify(&f.nix, &unsigned, &our_pk, &f.built);
    assert!(!ok && err.contains("untrusted"), "{err}");
    let (ok, err) = nix_verify(&f.nix, &signed, &f.key("pk1"), &f.built);
    assert!(!ok && err.contains("untrusted"), "{err}");

    // Nix's own signature, made by us from Nix's secret key file.
    let sk1 = SecretKey::parse(&f.key("sk1")).unwrap();
    let with_nix_key = f.nix.dir().join("cache-sk1");
    resign(&with_nix_key, Some(&sk1));
    let (ok, err) = nix_verify(&f.nix, &with_nix_key, &f.key("pk1"), &f.built);
    assert!(ok, "Nix rejected our signature with its own key: {err}");
}

#[test]
fn corrupted_nix_narinfos_report_the_line() {
    let f = Fixture::new();
    let dir = &f.nix.store_dir;
    for (file, text) in f.all_narinfos() {
        let lines: Vec<&str> = text.lines().collect();
        let join = |ls: &[String]| ls.iter().map(|l| format!("{l}\n")).collect::<String>();
        for (i, line) in lines.iter().enumerate() {
            let number = i + 1;
            let mut ls: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
            // No space after the colon.
            ls[i] = line.replacen(": ", ":", 1);
            let e = NarInfo::parse(dir, &join(&ls)).unwrap_err();
            assert_eq!(
                e,
                NarInfoError::Syntax {
                    line: number,
                    kind: SyntaxError::NoSeparator
                },
                "{}",
                file.display()
            );
            // A duplicated line: an error on the copy, except for `Sig`.
            let mut ls: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
            ls.insert(i + 1, (*line).to_owned());
            let r = NarInfo::parse(dir, &join(&ls));
            if line.starts_with("Sig: ") {
                assert_eq!(r.unwrap().to_text(dir), text);
            } else {
                let e = r.unwrap_err();
                assert_eq!(e.line(), Some(number + 1), "{e}");
                assert!(e.to_string().contains("duplicate field"), "{e}");
            }
        }
        // Bad values on their own lines.
        for (key, bad) in [
            ("NarSize", "NarSize: many"),
            ("NarSize", "NarSize: 0"),
            ("FileSize", "FileSize: -1"),
            ("NarHash", "NarHash: sha256:tooshort"),
            ("FileHash", "FileHash: md7:abc"),
            ("References", "References: not-a-store-path"),
            ("Deriver", "Deriver: x"),
            (
                "StorePath",
                "StorePath: /elsewhere/0rq9lii3gnlhkh13gpq24qghbhjiqj51-x",
            ),
            ("URL", "URL: "),
        ] {
            let Some(i) = lines
                .iter()
                .position(|l| l.starts_with(&format!("{key}: ")))
            else {
                // Only the derivation output has a deriver.
                assert_eq!(key, "Deriver", "{text}");
                continue;
            };
            let mut ls: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
            ls[i] = bad.to_owned();
            let e = NarInfo::parse(dir, &join(&ls)).unwrap_err();
            match &e {
                NarInfoError::Field { line, field, .. } => {
                    assert_eq!((*line, *field), (i + 1, key), "{e}")
                }
                other => panic!("{bad}: {other:?}"),
            }
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!("narinfo line {}, field '{key}'", i + 1)),
                "{msg}"
            );
        }
        // Missing final newline, and a missing required field.
        let e = NarInfo::parse(dir, text.trim_end_matches('\n')).unwrap_err();
        assert_eq!(
            e,
            NarInfoError::Syntax {
                line: lines.len(),
                kind: SyntaxError::NoNewline
            }
        );
        let without_url: String = text
            .lines()
            .filter(|l| !l.starts_with("URL: "))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            NarInfo::parse(dir, &without_url).unwrap_err(),
            NarInfoError::Missing("URL")
        );
    }
}
