//! Derivation parse/print rate on a realistic `.drv` (20 input derivations,
//! 5 sources, 60 environment variables, three outputs).
//!
//! Run: `cargo bench -p nixspace-nix-formats --bench derivation`.

// A benchmark aborts on a broken setup; the crate's no-expect rule is for library code.
// `criterion_main!` defines an undocumented `pub fn main`.
#![allow(clippy::expect_used, missing_docs)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nixspace_nix_formats::derivation::Derivation;
use nixspace_nix_formats::store_path::{StoreDir, StorePath};

fn path(store: &StoreDir, seed: u8, name: &str) -> String {
    let digest = [seed; 20];
    store.print(&StorePath::new(digest, name).expect("valid store path"))
}

/// A canonical ATerm derivation (entries sorted, as Nix writes them).
fn sample(store: &StoreDir) -> String {
    let outputs: Vec<String> = ["dev", "doc", "out"]
        .iter()
        .enumerate()
        .map(|(i, o)| {
            format!(
                "(\"{o}\",\"{}\",\"\",\"\")",
                path(store, 100 + i as u8, &format!("pkg-1.0-{o}"))
            )
        })
        .collect();
    let mut inputs: Vec<String> = (0..20)
        .map(|i| {
            format!(
                "(\"{}\",[\"out\"])",
                path(store, i, &format!("dep{i:02}.drv"))
            )
        })
        .collect();
    inputs.sort();
    let mut srcs: Vec<String> = (0..5)
        .map(|i| format!("\"{}\"", path(store, 50 + i, &format!("src{i}"))))
        .collect();
    srcs.sort();
    let mut env: Vec<String> = (0..60)
        .map(|i| {
            format!("(\"VAR_{i:02}\",\"value number {i} with \\\"quotes\\\" and \\n newlines\")")
        })
        .collect();
    env.sort();
    format!(
        "Derive([{}],[{}],[{}],\"x86_64-linux\",\"/bin/sh\",[\"-c\",\"echo hello > $out\"],[{}])",
        outputs.join(","),
        inputs.join(","),
        srcs.join(","),
        env.join(",")
    )
}

fn derivation_benches(c: &mut Criterion) {
    let store = StoreDir::default();
    let text = sample(&store);
    let drv = Derivation::parse(&store, "pkg-1.0", text.as_bytes()).expect("sample parses");
    assert_eq!(drv.to_aterm(&store), text.as_bytes(), "sample is canonical");

    let mut g = c.benchmark_group("derivation");
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse", |b| {
        b.iter(|| Derivation::parse(&store, "pkg-1.0", text.as_bytes()).expect("parse"))
    });
    g.bench_function("print", |b| b.iter(|| drv.to_aterm(&store)));
    g.finish();
}

criterion_group!(benches, derivation_benches);
criterion_main!(benches);
