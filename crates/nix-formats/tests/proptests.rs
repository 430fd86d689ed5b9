//! Property tests: nixbase32, hashes, ATerm and NAR round trips, and
//! parsers that reject garbage without panicking.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use nixspace_nix_formats::nar::{self, NarError, NarVisitor, NarWriter, ParseLimits};
use nixspace_nix_formats::{
    nixbase32, Derivation, DerivationOutput, FileIngestionMethod, Hash, HashAlgo, StoreDir,
    StorePath,
};
use proptest::prelude::*;

fn store_dir() -> impl Strategy<Value = StoreDir> {
    prop_oneof![
        Just(StoreDir::default()),
        "(/[a-z]{1,6}){1,3}".prop_map(|s| StoreDir::new(&s).unwrap()),
    ]
}

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9+._?=-]{1,20}"
}

fn store_path() -> impl Strategy<Value = StorePath> {
    (any::<[u8; 20]>(), name()).prop_map(|(d, n)| StorePath::new(d, &n).unwrap())
}

fn drv_path() -> impl Strategy<Value = StorePath> {
    (any::<[u8; 20]>(), name()).prop_map(|(d, n)| StorePath::new(d, &format!("{n}.drv")).unwrap())
}

fn algo() -> impl Strategy<Value = HashAlgo> {
    prop::sample::select(HashAlgo::ALL.to_vec())
}

fn method() -> impl Strategy<Value = FileIngestionMethod> {
    prop_oneof![
        Just(FileIngestionMethod::Flat),
        Just(FileIngestionMethod::Recursive)
    ]
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..40),
        ".{0,20}".prop_map(String::into_bytes),
        prop::collection::vec(prop::sample::select(b"\"\\\n\r\tab$ ".to_vec()), 0..20),
    ]
}

/// Output names and outputs of one kind, as Nix allows them together.
fn outputs(
    dir: StoreDir,
    drv_name: String,
) -> impl Strategy<Value = BTreeMap<String, DerivationOutput>> {
    let names = prop::collection::btree_set("[a-z]{1,8}", 1..4);
    prop_oneof![
        (names.clone(), store_path()).prop_map(|(ns, p)| ns
            .into_iter()
            .map(|n| (n, DerivationOutput::InputAddressed(p.clone())))
            .collect()),
        names.clone().prop_map(|ns| ns
            .into_iter()
            .map(|n| (n, DerivationOutput::Deferred))
            .collect()),
        (names.clone(), method(), algo()).prop_map(|(ns, method, algo)| ns
            .into_iter()
            .map(|n| (n, DerivationOutput::CaFloating { method, algo }))
            .collect()),
        (names, method(), algo()).prop_map(|(ns, method, algo)| ns
            .into_iter()
            .map(|n| (n, DerivationOutput::Impure { method, algo }))
            .collect()),
        (method(), algo(), any::<[u8; 8]>()).prop_map(move |(m, a, seed)| {
            let h = Hash::digest(a, seed);
            BTreeMap::from([(
                "out".to_owned(),
                DerivationOutput::ca_fixed(&dir, &drv_name, "out", m, h).unwrap(),
            )])
        }),
    ]
}

fn derivation() -> impl Strategy<Value = (StoreDir, Derivation)> {
    (store_dir(), name()).prop_flat_map(|(dir, drv_name)| {
        (
            Just(dir.clone()),
            Just(drv_name.clone()),
            outputs(dir, drv_name),
            prop::collection::btree_map(
                drv_path(),
                prop::collection::btree_set("[a-z]{1,8}", 1..3),
                0..3,
            ),
            prop::collection::btree_set(store_path(), 0..3),
            "[a-z0-9_-]{0,16}",
            bytes(),
            prop::collection::vec(bytes(), 0..4),
            prop::collection::btree_map(bytes(), bytes(), 0..6),
        )
            .prop_map(
                |(dir, name, outputs, input_drvs, input_srcs, system, builder, args, env)| {
                    (
                        dir,
                        Derivation {
                            name,
                            outputs,
                            input_drvs,
                            input_srcs,
                            system,
                            builder,
                            args,
                            env,
                        },
                    )
                },
            )
    })
}

proptest! {
    #[test]
    fn nixbase32_round_trips(data in prop::collection::vec(any::<u8>(), 0..80)) {
        let text = nixbase32::encode(&data);
        prop_assert_eq!(text.len(), nixbase32::encoded_len(data.len()));
        prop_assert_eq!(nixbase32::decode(text.as_bytes()).unwrap(), data);
    }

    #[test]
    fn nixbase32_decode_is_canonical(text in "[0-9a-df-np-sv-z]{0,60}") {
        // Whatever decodes must encode back to the same text.
        if let Ok(bytes) = nixbase32::decode(text.as_bytes()) {
            prop_assert_eq!(nixbase32::encode(&bytes), text);
        }
    }

    #[test]
    fn nixbase32_rejects_garbage_without_panicking(text in prop::collection::vec(any::<u8>(), 0..60)) {
        let _ = nixbase32::decode(&text);
    }

    #[test]
    fn hashes_round_trip(a in algo(), data in prop::collection::vec(any::<u8>(), 0..64)) {
        let h = Hash::digest(a, &data);
        for text in [h.to_sri(), h.to_prefixed_base16(), h.to_prefixed_nixbase32(), format!("{a}:{}", h.to_base64())] {
            prop_assert_eq!(&Hash::parse_prefixed(&text).unwrap(), &h);
        }
        prop_assert_eq!(&Hash::parse_any(&h.to_nixbase32(), Some(a)).unwrap(), &h);
    }

    #[test]
    fn store_paths_round_trip(dir in store_dir(), p in store_path()) {
        prop_assert_eq!(&dir.parse(&dir.print(&p)).unwrap(), &p);
        prop_assert_eq!(&p.to_string().parse::<StorePath>().unwrap(), &p);
    }

    #[test]
    fn aterm_round_trips((dir, drv) in derivation()) {
        let text = drv.to_aterm(&dir);
        let back = Derivation::parse(&dir, &drv.name, &text).unwrap();
        prop_assert_eq!(&back, &drv);
        prop_assert_eq!(back.to_aterm(&dir), text);
    }

    #[test]
    fn aterm_parser_survives_mutations((dir, drv) in derivation(), pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut text = drv.to_aterm(&dir);
        let i = pos.index(text.len());
        text[i] = byte;
        // Either rejected, or accepted and then printed back identically.
        if let Ok(d) = Derivation::parse(&dir, &drv.name, &text) {
            prop_assert_eq!(d.to_aterm(&dir), text);
        }
    }

    #[test]
    fn nar_round_trips(tree in tree_strategy()) {
        let mut w = NarWriter::new(Vec::new()).unwrap();
        write_tree(&mut w, &tree);
        let (bytes, summary) = w.finish().unwrap();
        let mut r = Rebuild::default();
        let got = nar::parse(&bytes[..], &mut r, ParseLimits::default()).unwrap();
        prop_assert_eq!(got, summary);
        prop_assert_eq!(r.events, events(&tree, &mut Vec::new()));
    }

    #[test]
    fn nar_parser_survives_mutations(tree in tree_strategy(), pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut w = NarWriter::new(Vec::new()).unwrap();
        write_tree(&mut w, &tree);
        let (mut bytes, _) = w.finish().unwrap();
        let i = pos.index(bytes.len());
        bytes[i] = byte;
        let _ = nar::parse(&bytes[..], &mut Rebuild::default(), ParseLimits::default());
    }
}

#[derive(Debug, Clone)]
enum Tree {
    File(bool, Vec<u8>),
    Link(Vec<u8>),
    Dir(BTreeMap<Vec<u8>, Tree>),
}

fn entry_name() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 1..12).prop_filter("valid NAR name", |n| {
        n != b"." && n != b".." && !n.contains(&b'/') && !n.contains(&0)
    })
}

fn tree_strategy() -> impl Strategy<Value = Tree> {
    let leaf = prop_oneof![
        (any::<bool>(), prop::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(x, c)| Tree::File(x, c)),
        prop::collection::vec(1u8..=255, 1..20).prop_map(Tree::Link),
    ];
    leaf.prop_recursive(4, 32, 5, |inner| {
        prop::collection::btree_map(entry_name(), inner, 0..5).prop_map(Tree::Dir)
    })
}

fn write_tree(w: &mut NarWriter<Vec<u8>>, t: &Tree) {
    match t {
        Tree::File(x, c) => w.regular(*x, c.len() as u64, &mut &c[..]).unwrap(),
        Tree::Link(target) => w.symlink(target).unwrap(),
        Tree::Dir(entries) => {
            w.start_directory().unwrap();
            for (n, child) in entries {
                w.entry(n).unwrap();
                write_tree(w, child);
            }
            w.end_directory().unwrap();
        }
    }
}

fn events(t: &Tree, path: &mut Vec<Vec<u8>>) -> Vec<String> {
    match t {
        Tree::File(x, c) => vec![format!("F {path:?} {x} {c:?}")],
        Tree::Link(target) => vec![format!("L {path:?} {target:?}")],
        Tree::Dir(entries) => {
            let mut out = vec![format!("D {path:?}")];
            for (n, child) in entries {
                path.push(n.clone());
                out.extend(events(child, path));
                path.pop();
            }
            out
        }
    }
}

#[derive(Default)]
struct Rebuild {
    events: Vec<String>,
}

impl NarVisitor for Rebuild {
    fn directory(&mut self, path: &[Vec<u8>]) -> Result<(), NarError> {
        self.events.push(format!("D {path:?}"));
        Ok(())
    }
    fn regular(
        &mut self,
        path: &[Vec<u8>],
        executable: bool,
        _size: u64,
        contents: &mut dyn std::io::Read,
    ) -> Result<(), NarError> {
        let mut c = Vec::new();
        contents.read_to_end(&mut c).map_err(|e| NarError::Io {
            what: "test".into(),
            source: e,
        })?;
        self.events.push(format!("F {path:?} {executable} {c:?}"));
        Ok(())
    }
    fn symlink(&mut self, path: &[Vec<u8>], target: &[u8]) -> Result<(), NarError> {
        self.events.push(format!("L {path:?} {target:?}"));
        Ok(())
    }
}

// ---- narinfo and signatures ----

use nixspace_nix_formats::narinfo::field;
use nixspace_nix_formats::signature::{check_narinfo_signatures, PublicKeys, SecretKey};
use nixspace_nix_formats::store_path::ContentAddress;
use nixspace_nix_formats::NarInfo;

fn hash() -> impl Strategy<Value = Hash> {
    (algo(), prop::collection::vec(any::<u8>(), 0..16)).prop_map(|(a, d)| Hash::digest(a, d))
}

fn content_address() -> impl Strategy<Value = ContentAddress> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..16)
            .prop_map(|d| ContentAddress::Text(Hash::sha256(d))),
        (method(), hash()).prop_map(|(m, h)| ContentAddress::Fixed(m, h)),
    ]
}

/// Text without newlines; `non_empty` for fields where empty means absent.
fn line_text(non_empty: bool) -> impl Strategy<Value = String> {
    let min = usize::from(non_empty);
    prop::collection::vec(
        prop_oneof![Just(' '), Just(':'), Just('é'), any::<char>()],
        min..12,
    )
    .prop_map(|cs| cs.into_iter().filter(|&c| c != '\n').collect::<String>())
    .prop_filter("non-empty", move |s| !non_empty || !s.is_empty())
}

fn unknown_line() -> impl Strategy<Value = (String, String)> {
    ("[A-Za-z][A-Za-z0-9-]{0,10}", line_text(false))
        .prop_filter("unknown key", |(k, _)| !field::KNOWN.contains(&k.as_str()))
}

fn narinfo() -> impl Strategy<Value = (StoreDir, NarInfo)> {
    (
        store_dir(),
        (
            store_path(),
            line_text(true),
            prop::option::of("[a-z0-9]{1,6}"),
            prop::option::of(hash()),
        ),
        (prop::option::of(any::<u64>()), hash(), 1..=u64::MAX),
        prop::collection::btree_set(store_path(), 0..5),
        (
            prop::option::of(drv_path()),
            prop::option::of(line_text(true)),
        ),
        prop::collection::btree_set(line_text(false), 0..3),
        prop::option::of(content_address()),
        prop::collection::vec(unknown_line(), 0..3),
    )
        .prop_map(
            |(
                dir,
                (path, url, compression, file_hash),
                (file_size, nar_hash, nar_size),
                references,
                (deriver, system),
                sigs,
                ca,
                unknown,
            )| {
                let mut n = NarInfo::new(path, url, nar_hash, nar_size);
                n.compression = compression;
                n.file_hash = file_hash;
                n.file_size = file_size;
                n.references = references;
                n.deriver = deriver;
                n.system = system;
                n.sigs = sigs;
                n.ca = ca;
                n.unknown = unknown;
                (dir, n)
            },
        )
}

proptest! {
    #[test]
    fn narinfo_round_trips((dir, n) in narinfo()) {
        let text = n.to_text(&dir);
        let back = NarInfo::parse(&dir, &text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(&back, &n);
        prop_assert_eq!(back.to_text(&dir), text);
    }

    #[test]
    fn narinfo_parser_survives_mutations((dir, n) in narinfo(), pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = n.to_text(&dir).into_bytes();
        let i = pos.index(bytes.len());
        bytes[i] = byte;
        if let Ok(m) = NarInfo::parse_bytes(&dir, &bytes) {
            // Whatever parses prints to a text that parses to the same value.
            prop_assert_eq!(NarInfo::parse(&dir, &m.to_text(&dir)).unwrap(), m);
        }
    }

    #[test]
    fn narinfo_parser_rejects_garbage_without_panicking(dir in store_dir(), text in ".{0,200}") {
        let _ = NarInfo::parse(&dir, &text);
    }

    #[test]
    fn signatures_verify_and_tampering_fails((dir, mut n) in narinfo(), seed in any::<[u8; 32]>(), extra in store_path()) {
        let sk = SecretKey::from_seed("prop-key-1", &seed).unwrap();
        let keys: PublicKeys = [sk.to_public()].into_iter().collect();
        n.sign(&dir, &sk).unwrap();
        prop_assert_eq!(check_narinfo_signatures(&dir, &n, &keys).unwrap(), vec!["prop-key-1".to_owned()]);
        // Signed narinfos round-trip with their signatures intact.
        let back = NarInfo::parse(&dir, &n.to_text(&dir)).unwrap();
        prop_assert!(check_narinfo_signatures(&dir, &back, &keys).is_ok());
        let mut t = n.clone();
        t.nar_size = t.nar_size.wrapping_add(1).max(1);
        prop_assert!(check_narinfo_signatures(&dir, &t, &keys).is_err());
        let mut t = n.clone();
        if t.references.insert(extra) {
            prop_assert!(check_narinfo_signatures(&dir, &t, &keys).is_err());
        }
    }
}
