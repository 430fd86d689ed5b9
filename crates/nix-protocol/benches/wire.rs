//! Wire frame encode/decode rates at protocol 1.34 (Debian's Nix 2.8): a
//! `ValidPathInfo` with 20 references and a signature, and a build-log
//! `STDERR_NEXT` frame, each written to and read from memory.
//!
//! Run: `cargo bench -p nixspace-nix-protocol --bench wire`.

// A benchmark aborts on a broken setup.
// `criterion_main!` defines an undocumented `pub fn main`.
#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

use std::collections::BTreeSet;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nixspace_nix_formats::hash::{Hash, HashAlgo};
use nixspace_nix_formats::store_path::StorePath;
use nixspace_nix_protocol::version::NIX_2_8;
use nixspace_nix_protocol::PathInfo;
use nixspace_nix_protocol::{
    LogEvent, NixDeserialize, NixReader, NixSerialize, NixWriter, StderrFrame,
};

fn path(i: usize, name: &str) -> StorePath {
    let hash: String = (0..32)
        .map(|j| "0123456789abcdfghijklmnpqrsvwxyz".as_bytes()[(i * 7 + j) % 32] as char)
        .collect();
    StorePath::from_base_name(&format!("{hash}-{name}")).expect("store path")
}

fn path_info() -> PathInfo {
    PathInfo {
        deriver: Some(path(1, "hello-2.12.drv")),
        nar_hash: Hash::new(HashAlgo::Sha256, &[0xab; 32]).expect("sha256"),
        references: (0..20).map(|i| path(i + 2, &format!("dep-{i}"))).collect(),
        registration_time: 1_700_000_000,
        nar_size: 123_456,
        ultimate: false,
        sigs: BTreeSet::from([
            "cache.example.org-1:c2lnbmF0dXJlIGJ5dGVzIGhlcmUgZm9yIHRoZSBiZW5jaG1hcms=".to_owned(),
        ]),
        ca: None,
    }
}

fn encode<T: NixSerialize + Sync>(rt: &tokio::runtime::Runtime, v: &T) -> Vec<u8> {
    rt.block_on(async {
        let mut w = NixWriter::new(Vec::new(), NIX_2_8);
        w.write_value(v).await.expect("write");
        w.flush().await.expect("flush");
        w.into_inner()
    })
}

fn decode<T: NixDeserialize>(rt: &tokio::runtime::Runtime, bytes: &[u8]) -> T {
    rt.block_on(async {
        let mut r = NixReader::new(bytes, NIX_2_8);
        r.read_value::<T>().await.expect("read")
    })
}

fn bench_value<T: NixSerialize + NixDeserialize + Sync>(c: &mut Criterion, name: &str, v: T) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let bytes = encode(&rt, &v);
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode", |b| b.iter(|| encode(&rt, &v)));
    g.bench_function("decode", |b| b.iter(|| decode::<T>(&rt, &bytes)));
    g.finish();
}

fn wire_benches(c: &mut Criterion) {
    bench_value(c, "path_info", path_info());
    bench_value(
        c,
        "stderr_next",
        StderrFrame::Log(LogEvent::Message(
            "building '/nix/store/aaaa-hello.drv'... checking for gcc... yes".to_owned(),
        )),
    );
}

criterion_group!(benches, wire_benches);
criterion_main!(benches);
