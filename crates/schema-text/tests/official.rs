//! Compare our output with the official binary schemas shipped inside the `syndicate` and
//! `preserves-schema` crate sources.
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use nixspace_schema_text::{bundle_from_dir, bundle_value_from_dir, encode, parse_schema_file};
use preserves::{IOValue, ValueImpl};

/// The entries of a dictionary value, keyed by their text form for readable reports.
fn entries(v: &IOValue) -> BTreeMap<String, IOValue> {
    v.entries()
        .map(|(k, v)| (format!("{:?}", IOValue::from(k)), IOValue::from(v)))
        .collect()
}

/// The single field (the dictionary) of `<label {...}>`.
fn record_dict(v: &IOValue, label: &str) -> IOValue {
    let r = v
        .collect_simple_record(label, Some(1))
        .unwrap_or_else(|| panic!("not <{label} {{...}}>: {v:?}"));
    IOValue::from(r[0].clone())
}

/// Compares two `<schema {...}>` values, naming the first differing definition.
fn compare_schema(module: &str, ours: &IOValue, theirs: &IOValue) {
    if ours == theirs {
        return;
    }
    let (ours, theirs) = (record_dict(ours, "schema"), record_dict(theirs, "schema"));
    let (ours, theirs) = (entries(&ours), entries(&theirs));
    for key in ["version", "embeddedType"] {
        assert_eq!(ours.get(key), theirs.get(key), "{module}: `{key}` differs");
    }
    let (ours, theirs) = (
        entries(&ours["definitions"]),
        entries(&theirs["definitions"]),
    );
    for (name, expected) in &theirs {
        match ours.get(name) {
            None => panic!("{module}: definition {name} missing from our output"),
            Some(got) => assert!(
                got == expected,
                "{module}: definition {name} differs\n ours:   {got:?}\n theirs: {expected:?}"
            ),
        }
    }
    for name in ours.keys() {
        assert!(
            theirs.contains_key(name),
            "{module}: extra definition {name}"
        );
    }
    panic!("{module}: schemas differ in an unidentified way");
}

#[test]
fn syndicate_protocol_bundle_matches_official() {
    let protocols = common::crate_dir("syndicate").join("protocols");
    let ours = bundle_value_from_dir(&protocols.join("schemas")).expect("compile schemas");
    let theirs = common::read_bin(&protocols.join("schema-bundle.bin"));

    let (ours_modules, theirs_modules) = (
        entries(&record_dict(&ours, "bundle")),
        entries(&record_dict(&theirs, "bundle")),
    );
    assert_eq!(
        theirs_modules.len(),
        16,
        "the official bundle has 16 modules"
    );
    assert_eq!(
        ours_modules.keys().collect::<Vec<_>>(),
        theirs_modules.keys().collect::<Vec<_>>(),
        "module paths differ"
    );
    for (module, expected) in &theirs_modules {
        compare_schema(module, &ours_modules[module], expected);
    }
    assert!(ours == theirs, "bundles differ as values");
}

#[test]
fn syndicate_protocol_bundle_is_byte_identical() {
    let protocols = common::crate_dir("syndicate").join("protocols");
    let ours = bundle_from_dir(&protocols.join("schemas")).expect("compile schemas");
    let theirs = std::fs::read(protocols.join("schema-bundle.bin")).expect("read official");
    assert!(
        ours == theirs,
        "bundles are equal as values but not as bytes"
    );
}

fn check_single(dir: &Path, stem: &str) {
    let ours = parse_schema_file(&dir.join(format!("{stem}.prs"))).expect("compile schema");
    let bin = dir.join(format!("{stem}.bin"));
    let theirs = common::read_bin(&bin);
    compare_schema(stem, &ours, &theirs);
    let bytes = encode(&ours).expect("encode");
    assert!(
        bytes == std::fs::read(&bin).expect("read official"),
        "{stem}: equal as values but not as bytes"
    );
}

#[test]
fn metaschema_matches_official() {
    check_single(&common::crate_dir("preserves-schema"), "schema");
}

#[test]
fn host_schema_matches_official() {
    check_single(&common::crate_dir("preserves-schema"), "host");
}

/// The comparison helper names the first differing definition.
#[test]
#[should_panic(expected = "schema: definition Definition differs")]
fn comparison_reports_first_differing_definition() {
    let dir = common::crate_dir("preserves-schema");
    let ours = parse_schema_file(&dir.join("schema.prs")).expect("compile schema");
    compare_schema("schema", &ours, &common::read_bin(&dir.join("host.bin")));
}
