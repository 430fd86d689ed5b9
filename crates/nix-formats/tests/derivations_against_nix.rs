//! Derivations written by the real Nix 2.8: our printer reproduces every
//! `.drv` byte for byte, and our output paths, `.drv` paths, placeholders,
//! hashes modulo and resolved derivations match Nix's.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use common::Nix;
use nixspace_nix_formats::derivation::{
    downstream_placeholder, floating_output_path, hash_placeholder, DerivationType,
};
use nixspace_nix_formats::nar;
use nixspace_nix_formats::store_path::output_path_name;
use nixspace_nix_formats::{
    Derivation, DerivationOutput, DrvHash, DrvHashKind, FileIngestionMethod, Hash, HashAlgo,
    StoreDir, StorePath,
};

const CORPUS: &str = r#"
{ binFile }:
let
  mk = attrs: derivation ({ system = "x86_64-linux"; builder = "/bin/sh"; } // attrs);
  a = mk { name = "a"; args = [ "-c" "echo a > $out" ]; };
  b = mk {
    name = "b";
    outputs = [ "out" "dev" "lib" ];
    args = [ "-c" "echo ${a} > $out; echo > $dev; echo > $lib" ];
  };
  c = mk { name = "c"; args = [ "-c" "echo ${b.dev} ${b.lib} ${a}" ]; deps = [ b a ]; };
  odd = mk {
    name = "odd-strings";
    args = [ "-c" "q\"uote" "back\\slash" "new\nline" "tab\there" "cr\rhere"
             "uni ünïcödé 🦀 ∀" "dollar $ {braces}" "" "\\\"\\n" ];
    "weird key \" \\ \n\t é" = "value\r\n";
    multi = ''
      line one
        "indented" \ back
      	tab
    '';
    ph = builtins.placeholder "out";
    empty = "";
    list = [ "x" 1 true null 2.5 ];
    src = ./src.txt;
    txt = builtins.toFile "t.txt" "hello ${builtins.toFile "u.txt" "inner"}";
    dep = c;
  };
  binary = mk { name = "binary"; bin = builtins.readFile binFile; args = [ (builtins.readFile binFile) ]; };
  fixedFlat = mk {
    name = "fixed-flat"; args = [ "-c" "printf x > $out" ];
    outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = builtins.hashString "sha256" "x";
  };
  fixedRec = mk {
    name = "fixed-rec"; args = [ "-c" "echo ${a}" ];
    outputHashMode = "recursive"; outputHashAlgo = "sha256";
    outputHash = "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";
  };
  fixedRecSha1 = mk {
    name = "fixed-rec-sha1"; outputHashMode = "recursive"; outputHashAlgo = "sha1";
    outputHash = builtins.hashString "sha1" "y";
  };
  fixedMd5 = mk {
    name = "fixed-md5"; outputHashAlgo = "md5"; outputHash = builtins.hashString "md5" "z";
  };
  fixedSha512 = mk {
    name = "fixed-sha512"; outputHash = builtins.hashString "sha512" "w"; outputHashAlgo = "sha512";
  };
  usesFixed = mk {
    name = "uses-fixed";
    args = [ "${fixedFlat}" "${fixedRec}" "${fixedRecSha1}" "${fixedMd5}" "${fixedSha512}" ];
  };
  ca = mk {
    name = "ca"; __contentAddressed = true;
    outputHashMode = "recursive"; outputHashAlgo = "sha256";
    args = [ "-c" "echo ${a} > $out" ];
  };
  caMulti = mk {
    name = "ca-multi"; __contentAddressed = true; outputs = [ "out" "doc" ];
    args = [ "-c" "echo ${ca} > $out; echo > $doc" ];
  };
  caFlat = mk {
    name = "ca-flat"; __contentAddressed = true;
    outputHashMode = "flat"; outputHashAlgo = "sha512";
    args = [ "-c" "echo ${fixedFlat} > $out" ];
  };
  deferred = mk {
    name = "deferred"; outputs = [ "out" "bin" ];
    args = [ "-c" "echo ${ca} ${caMulti.doc} ${caFlat} ${b.lib}" ];
  };
  deferred2 = mk { name = "deferred2"; args = [ "${deferred.bin}" "${c}" ]; };
in {
  inherit a b c odd binary fixedFlat fixedRec fixedRecSha1 fixedMd5 fixedSha512
    usesFixed ca caMulti caFlat deferred deferred2;
}
"#;

/// Instantiates the corpus into a private store.
fn instantiate(nix: &Nix) -> Vec<StorePath> {
    nix.write("src.txt", "a source file\n");
    nix.write("bin.dat", [0x80, 0xff, 0xfe, b'"', b'\\', b'\n', 0xc3]);
    let corpus = nix.write("corpus.nix", CORPUS);
    let bin = nix.dir().join("bin.dat");
    let out = nix.stdout(
        "nix-instantiate",
        &[
            corpus.to_str().unwrap(),
            "--arg",
            "binFile",
            bin.to_str().unwrap(),
        ],
    );
    out.lines()
        .map(|l| nix.store_dir.parse(l).unwrap())
        .collect()
}

fn read_drv(store: &StoreDir, file: &Path) -> (StorePath, Vec<u8>, Derivation) {
    let path = store.parse(file.to_str().unwrap()).unwrap();
    let bytes = std::fs::read(file).unwrap();
    let drv = Derivation::parse_at(store, &path, &bytes)
        .unwrap_or_else(|e| panic!("parsing {}: {e}", file.display()));
    (path, bytes, drv)
}

/// Hash modulo (unmasked) of every derivation, inputs first.
fn hashes_modulo(
    store: &StoreDir,
    drvs: &BTreeMap<StorePath, Derivation>,
) -> HashMap<StorePath, DrvHash> {
    fn go(
        store: &StoreDir,
        p: &StorePath,
        drvs: &BTreeMap<StorePath, Derivation>,
        memo: &mut HashMap<StorePath, DrvHash>,
    ) {
        if memo.contains_key(p) {
            return;
        }
        let d = &drvs[p];
        for input in d.input_drvs.keys() {
            go(store, input, drvs, memo);
        }
        let h = d
            .hash_modulo(store, false, |i| memo.get(i).cloned())
            .unwrap();
        memo.insert(p.clone(), h);
    }
    let mut memo = HashMap::new();
    for p in drvs.keys() {
        go(store, p, drvs, &mut memo);
    }
    memo
}

#[test]
fn corpus_round_trips_and_paths_match_nix() {
    let nix = Nix::private();
    let store = nix.store_dir.clone();
    let top = instantiate(&nix);
    assert!(top.len() >= 15, "{top:?}");

    let mut drvs = BTreeMap::new();
    for file in nix.drv_files() {
        let (path, bytes, drv) = read_drv(&store, &file);
        // Byte-exact printing.
        assert_eq!(
            String::from_utf8_lossy(&drv.to_aterm(&store)),
            String::from_utf8_lossy(&bytes),
            "{path}"
        );
        assert_eq!(drv.to_aterm(&store), bytes, "{path}");
        // The .drv path is the text path over those bytes with references.
        assert_eq!(drv.drv_path(&store).unwrap(), path);
        drvs.insert(path, drv);
    }
    for t in &top {
        assert!(drvs.contains_key(t), "{t} not found in the store");
    }

    let memo = hashes_modulo(&store, &drvs);
    let mut kinds = BTreeSet::new();
    for (path, drv) in &drvs {
        let ty = drv.derivation_type().unwrap();
        kinds.insert(format!("{ty}"));
        match ty {
            DerivationType::InputAddressed | DerivationType::DeferredInputAddressed => {
                // Recompute output paths from scratch as the evaluator does.
                let mut fresh = drv.clone();
                let kind = fresh
                    .compute_input_addressed_outputs(&store, |i| memo.get(i).cloned())
                    .unwrap();
                assert_eq!(&fresh, drv, "{path}");
                assert_eq!(
                    kind == DrvHashKind::Deferred,
                    ty == DerivationType::DeferredInputAddressed,
                    "{path}"
                );
            }
            DerivationType::CaFloating => {
                for name in drv.outputs.keys() {
                    assert_eq!(
                        drv.env_str(name),
                        Some(hash_placeholder(name).as_str()),
                        "{path}"
                    );
                }
            }
            DerivationType::CaFixed => {
                // The parser already checked the path against the hash.
                let out = drv.outputs["out"].path().unwrap();
                assert_eq!(drv.env_str("out"), Some(store.print(out).as_str()));
            }
            DerivationType::Impure => panic!("no impure derivations in the corpus"),
        }
        // Each input output appears in the text: as its path when known,
        // else as the downstream placeholder Nix computed.
        let text = String::from_utf8_lossy(&drv.to_aterm(&store)).into_owned();
        for (input, outputs) in &drv.input_drvs {
            for o in outputs {
                let want = match drvs[input].outputs[o].path() {
                    Some(p) => store.print(p),
                    None => downstream_placeholder(input, o),
                };
                assert!(text.contains(&want), "{path}: {want} ({input}!{o}) missing");
            }
        }
    }
    for k in [
        "input-addressed",
        "deferred input-addressed",
        "fixed-output",
        "floating content-addressed",
    ] {
        assert!(kinds.contains(k), "corpus lacks {k}: {kinds:?}");
    }

    // Compare with `nix show-derivation` (everything but the non-UTF-8 one).
    let paths: Vec<String> = drvs
        .iter()
        .filter(|(_, d)| d.name != "binary")
        .map(|(p, _)| store.print(p))
        .collect();
    let mut args = vec!["show-derivation"];
    args.extend(paths.iter().map(String::as_str));
    let json: serde_json::Value = serde_json::from_slice(&nix.run("nix", &args).stdout).unwrap();
    let mut checked = 0;
    for (p, v) in json.as_object().unwrap() {
        let drv = &drvs[&store.parse(p).unwrap()];
        let outputs = v["outputs"].as_object().unwrap();
        assert_eq!(
            outputs.keys().collect::<Vec<_>>(),
            drv.outputs.keys().collect::<Vec<_>>()
        );
        for (name, o) in outputs {
            let ours = &drv.outputs[name];
            assert_eq!(
                o.get("path").and_then(|x| x.as_str()),
                ours.path().map(|p| store.print(p)).as_deref(),
                "{p}!{name}"
            );
            let (algo, hash) = match ours {
                DerivationOutput::CaFixed { method, hash, .. } => (
                    Some(format!("{}{}", method.prefix(), hash.algo())),
                    Some(hash.to_base16()),
                ),
                DerivationOutput::CaFloating { method, algo } => {
                    (Some(format!("{}{algo}", method.prefix())), None)
                }
                _ => (None, None),
            };
            assert_eq!(
                o.get("hashAlgo").and_then(|x| x.as_str()),
                algo.as_deref(),
                "{p}!{name}"
            );
            assert_eq!(o.get("hash").and_then(|x| x.as_str()), hash.as_deref());
        }
        let env: BTreeMap<String, String> = serde_json::from_value(v["env"].clone()).unwrap();
        let ours: BTreeMap<String, String> = drv
            .env
            .iter()
            .map(|(k, v)| {
                (
                    String::from_utf8(k.clone()).unwrap(),
                    String::from_utf8(v.clone()).unwrap(),
                )
            })
            .collect();
        assert_eq!(env, ours, "{p}");
        checked += 1;
    }
    assert_eq!(checked, paths.len());
}

/// With the default `/nix/store` (read-only evaluation: nothing is
/// written), derivations we build from scratch get Nix's paths.
#[test]
fn from_scratch_in_default_store() {
    let nix = Nix::default_store();
    let expr = r#"
      let
        d = derivation { name = "scratch"; system = "x86_64-linux"; builder = "/bin/sh";
                         args = [ "-c" "echo \"hi\"" ]; outputs = [ "out" "dev" ]; extra = "x\ty"; };
        f = derivation { name = "scratch-fixed"; system = "x86_64-linux"; builder = "/bin/sh";
                         outputHashMode = "recursive"; outputHashAlgo = "sha1";
                         outputHash = builtins.hashString "sha1" "q"; };
      in { drv = d.drvPath; out = d.out.outPath; dev = d.dev.outPath;
           fdrv = f.drvPath; fout = f.outPath; }
    "#;
    let out = nix.stdout(
        "nix-instantiate",
        &[
            "--readonly-mode",
            "--eval",
            "--strict",
            "--json",
            "-E",
            expr,
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let store = StoreDir::default();

    let base_env = |name: &str| {
        let mut env: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for (k, val) in [
            ("builder", "/bin/sh"),
            ("name", name),
            ("system", "x86_64-linux"),
        ] {
            env.insert(k.into(), val.into());
        }
        env
    };
    let mut env = base_env("scratch");
    env.insert(b"extra".to_vec(), b"x\ty".to_vec());
    env.insert(b"outputs".to_vec(), b"out dev".to_vec());
    let mut d = Derivation {
        name: "scratch".into(),
        outputs: [
            ("out", DerivationOutput::Deferred),
            ("dev", DerivationOutput::Deferred),
        ]
        .into_iter()
        .map(|(k, o)| (k.to_owned(), o))
        .collect(),
        input_drvs: BTreeMap::new(),
        input_srcs: BTreeSet::new(),
        system: "x86_64-linux".into(),
        builder: b"/bin/sh".to_vec(),
        args: vec![b"-c".to_vec(), b"echo \"hi\"".to_vec()],
        env,
    };
    assert_eq!(
        d.compute_input_addressed_outputs(&store, |_| None).unwrap(),
        DrvHashKind::Regular
    );
    assert_eq!(store.print(&d.drv_path(&store).unwrap()), v["drv"]);
    assert_eq!(store.print(d.outputs["out"].path().unwrap()), v["out"]);
    assert_eq!(store.print(d.outputs["dev"].path().unwrap()), v["dev"]);

    let hash = Hash::digest(HashAlgo::Sha1, b"q");
    let mut env = base_env("scratch-fixed");
    env.insert(b"outputHash".to_vec(), hash.to_base16().into_bytes());
    env.insert(b"outputHashAlgo".to_vec(), b"sha1".to_vec());
    env.insert(b"outputHashMode".to_vec(), b"recursive".to_vec());
    let out = DerivationOutput::ca_fixed(
        &store,
        "scratch-fixed",
        "out",
        FileIngestionMethod::Recursive,
        hash,
    )
    .unwrap();
    env.insert(
        b"out".to_vec(),
        store.print(out.path().unwrap()).into_bytes(),
    );
    let f = Derivation {
        name: "scratch-fixed".into(),
        outputs: BTreeMap::from([("out".to_owned(), out)]),
        input_drvs: BTreeMap::new(),
        input_srcs: BTreeSet::new(),
        system: "x86_64-linux".into(),
        builder: b"/bin/sh".to_vec(),
        args: vec![],
        env,
    };
    assert_eq!(store.print(&f.drv_path(&store).unwrap()), v["fdrv"]);
    assert_eq!(store.print(f.outputs["out"].path().unwrap()), v["fout"]);
}

/// Text and fixed-output paths of things added to a store.
#[test]
fn added_paths_match_nix() {
    let nix = Nix::private();
    let store = nix.store_dir.clone();
    // builtins.toFile: text paths with references.
    let expr = r#"builtins.toFile "outer" "see ${builtins.toFile "inner" "hi\n"}""#;
    let outer = nix.stdout("nix-instantiate", &["--eval", "--json", "-E", expr]);
    let outer: String = serde_json::from_str(&outer).unwrap();
    let inner = store
        .compute_text_path("inner", b"hi\n", &BTreeSet::new())
        .unwrap();
    let want = store
        .compute_text_path(
            "outer",
            format!("see {}", store.print(&inner)).as_bytes(),
            &BTreeSet::from([inner.clone()]),
        )
        .unwrap();
    assert_eq!(store.print(&want), outer);

    // nix-store --add-fixed, flat and recursive, several algorithms.
    let file = nix.write("payload", "some bytes\n");
    let tree = nix.dir().join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("sub/f"), "x").unwrap();
    for algo in HashAlgo::ALL {
        for recursive in [false, true] {
            for path in [&file, &tree] {
                if !recursive && path == &tree {
                    continue;
                }
                let mut args = vec!["--add-fixed"];
                if recursive {
                    args.push("--recursive");
                }
                args.extend([algo.name(), path.to_str().unwrap()]);
                let got = nix.stdout("nix-store", &args);
                let (method, hash) = if recursive {
                    let mut h = nixspace_nix_formats::hash::Hasher::new(algo);
                    nar::fs::dump_path(path, &mut h).unwrap();
                    (FileIngestionMethod::Recursive, h.finish())
                } else {
                    (
                        FileIngestionMethod::Flat,
                        Hash::digest(algo, std::fs::read(path).unwrap()),
                    )
                };
                let name = path.file_name().unwrap().to_str().unwrap();
                let ours = store
                    .make_fixed_output_path(method, &hash, name, &BTreeSet::new(), false)
                    .unwrap();
                assert_eq!(store.print(&ours), got, "{algo} recursive={recursive}");
                // And the hash Nix reports for it.
                let h = nix.stdout(
                    "nix-hash",
                    &[
                        "--type",
                        algo.name(),
                        if recursive { "--base32" } else { "--flat" },
                        path.to_str().unwrap(),
                    ],
                );
                if recursive {
                    assert_eq!(hash.to_nixbase32(), h);
                } else {
                    assert_eq!(hash.to_base16(), h);
                }
            }
        }
    }
}

const BUILDABLE: &str = r#"
let
  mk = attrs: derivation ({ system = "x86_64-linux"; builder = "/bin/sh"; } // attrs);
  a = mk { name = "a"; args = [ "-c" "echo a > $out" ]; };
  fixed = mk {
    name = "f"; args = [ "-c" "printf x > $out" ];
    outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = builtins.hashString "sha256" "x";
  };
  ca = mk {
    name = "ca"; __contentAddressed = true; outputs = [ "out" "doc" ];
    args = [ "-c" "/bin/mkdir $out; echo ${a} > $out/x; /bin/ln -s x $out/l; echo doc > $doc" ];
  };
  ca2 = mk {
    name = "ca2"; __contentAddressed = true;
    args = [ "-c" "echo ${ca}/x ${fixed} > $out" ];
  };
  down = mk {
    name = "down"; outputs = [ "out" "dev" ];
    args = [ "-c" "echo ${ca2} ${ca.doc} > $out; echo ${fixed} > $dev" ];
    weird = "${ca2} \"q\" ${ca.doc}";
  };
in down
"#;

/// Builds a chain with floating CA derivations and checks our resolution,
/// realisation ids and CA output paths against what Nix did.
#[test]
fn resolution_and_ca_outputs_match_nix() {
    let nix = Nix::private();
    let store = nix.store_dir.clone();
    let file = nix.write("buildable.nix", BUILDABLE);
    let down = nix.stdout("nix-instantiate", &[file.to_str().unwrap()]);
    let out = nix.run("nix-store", &["--realise", &down]);
    let log = String::from_utf8_lossy(&out.stderr).into_owned();

    // "resolved derivation: 'X' -> 'Y'..."
    let mut resolved = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.strip_prefix("resolved derivation: '") {
            let (from, rest) = rest.split_once("' -> '").unwrap();
            let (to, _) = rest.split_once('\'').unwrap();
            resolved.push((store.parse(from).unwrap(), store.parse(to).unwrap()));
        }
    }
    assert!(resolved.len() >= 3, "{log}");

    let mut drvs = BTreeMap::new();
    for f in nix.drv_files() {
        let (p, _, d) = read_drv(&store, &f);
        drvs.insert(p, d);
    }
    let memo = hashes_modulo(&store, &drvs);

    // Realised outputs of every original derivation we can ask Nix about.
    let mut realised: HashMap<(StorePath, String), StorePath> = HashMap::new();
    for (p, d) in &drvs {
        for (o, out) in &d.outputs {
            if let Some(path) = out.path() {
                realised.insert((p.clone(), o.clone()), path.clone());
            }
        }
        if d.derivation_type().unwrap() != DerivationType::CaFloating {
            continue;
        }
        let info = nix.run("nix", &["realisation", "info", "--json", &store.print(p)]);
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        let masked = d
            .hash_modulo(&store, true, |i| memo.get(i).cloned())
            .unwrap();
        for r in info.as_array().unwrap() {
            let id = r["id"].as_str().unwrap();
            let (hash, output) = id.split_once('!').unwrap();
            // The realisation id is the masked hash modulo.
            assert_eq!(hash, masked.hashes[output].to_prefixed_base16(), "{p}");
            let out_path = StorePath::from_base_name(r["outPath"].as_str().unwrap()).unwrap();
            // The output path is the CA path over the NAR hash and references.
            let full = store.print(&out_path);
            let nar = nar::fs::hash_path(Path::new(&full)).unwrap();
            let refs: BTreeSet<StorePath> = nix
                .stdout("nix-store", &["-q", "--references", &full])
                .lines()
                .map(|l| store.parse(l).unwrap())
                .filter(|r| *r != out_path)
                .collect();
            let ours = floating_output_path(
                &store,
                &d.name,
                output,
                FileIngestionMethod::Recursive,
                &nar.sha256,
                &refs,
                false,
            )
            .unwrap();
            assert_eq!(ours, out_path, "{p}!{output}");
            assert_eq!(out_path.name(), output_path_name(&d.name, output));
            realised.insert((p.clone(), output.to_owned()), out_path);
        }
    }

    for (from, to) in &resolved {
        let ours = drvs[from]
            .try_resolve(&store, |d, o| {
                realised.get(&(d.clone(), o.to_owned())).cloned()
            })
            .unwrap()
            .unwrap_or_else(|| panic!("{from} did not resolve"));
        let ours = Derivation::from(ours);
        let theirs = std::fs::read(store.print(to)).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&ours.to_aterm(&store)),
            String::from_utf8_lossy(&theirs),
            "{from}"
        );
        assert_eq!(&ours.drv_path(&store).unwrap(), to);

        // Resolved in two goes, as a frontend and the planner do: what is known first (every
        // other input), the rest renamed to stand-ins; then the stand-ins' outputs. The result
        // is what Nix wrote.
        let drv = &drvs[from];
        let stand_in = |d: &StorePath| {
            store
                .compute_text_path(d.name(), b"a stand-in", &BTreeSet::new())
                .unwrap()
        };
        let known: BTreeSet<&StorePath> = drv.input_drvs.keys().step_by(2).collect();
        let lookup = |d: &StorePath, o: &str| realised.get(&(d.clone(), o.to_owned())).cloned();
        let partial = drv.resolve_some(
            &store,
            |d, o| known.contains(d).then(|| lookup(d, o)).flatten(),
            |d| Some(stand_in(d)),
        );
        assert_eq!(
            partial.input_drvs.len(),
            drv.input_drvs.len() - known.len(),
            "{from}"
        );
        let originals: BTreeMap<StorePath, StorePath> = drv
            .input_drvs
            .keys()
            .map(|d| (stand_in(d), d.clone()))
            .collect();
        let twice = partial
            .try_resolve(&store, |d, o| lookup(originals.get(d)?, o))
            .unwrap()
            .unwrap_or_else(|| panic!("{from} did not resolve in two goes"));
        assert_eq!(
            String::from_utf8_lossy(&Derivation::from(twice).to_aterm(&store)),
            String::from_utf8_lossy(&theirs),
            "{from}"
        );
    }
}
