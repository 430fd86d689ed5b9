//! Fuzzing the worker-protocol decoders, both sides: what a daemon reads
//! from a client (`Request::read`) and what a client reads from a daemon
//! (the handshake, stderr frames and replies, through [`DaemonClient`]).
//! Inputs are arbitrary bytes and mutations of valid conversations; every
//! decoder must answer with a value or an error, never panic, never wait
//! for bytes that cannot come (the inputs end), and what decodes must
//! encode back to the same value.
//!
//! Quick by default; `NIXSPACE_FUZZ_LONG=1` runs hundreds of thousands of
//! inputs per target (see `docs/RELIABILITY.md`). `tests/corpus/nix-request/`
//! and `tests/corpus/nix-reply/` are replayed every run.
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::io::Cursor;
use std::time::Duration;

use nixspace_nix_formats::store_path::StorePath;
use nixspace_nix_protocol::handshake::{server_handshake, ServerHello};
use nixspace_nix_protocol::version::NIX_2_8;
use nixspace_nix_protocol::{
    ClientSettings, DaemonClient, LogEvent, NixDeserialize, NixReader, NixSerialize, NixWriter,
    Request, StderrFrame,
};
use nixspace_test_support::fuzz;
use proptest::prelude::*;

/// No decoder may take longer than this on an input that is all in memory.
const LIMIT: Duration = Duration::from_secs(5);

fn u64s(ns: &[u64]) -> Vec<u8> {
    ns.iter().flat_map(|n| n.to_le_bytes()).collect()
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
        .block_on(f)
}

fn path(name: &str) -> StorePath {
    StorePath::new([7; 20], name).unwrap()
}

async fn encoded_request(req: &Request) -> Vec<u8> {
    let mut w = NixWriter::new(Vec::new(), NIX_2_8);
    req.write(&mut w).await.unwrap();
    w.flush().await.unwrap();
    w.into_inner()
}

async fn encoded<T: NixSerialize + Sync>(v: &T) -> Vec<u8> {
    let mut w = NixWriter::new(Vec::new(), NIX_2_8);
    v.write_to(&mut w).await.unwrap();
    w.flush().await.unwrap();
    w.into_inner()
}

/// Valid client requests, each on its own.
fn request_seeds() -> Vec<Vec<u8>> {
    block_on(async {
        let requests = [
            Request::SetOptions(ClientSettings::default()),
            Request::IsValidPath(path("a")),
            Request::QueryValidPaths {
                paths: BTreeSet::from([path("a"), path("b")]),
                substitute: false,
            },
            Request::QueryPathInfo(path("c")),
            Request::NarFromPath(path("d")),
        ];
        let mut seeds = Vec::new();
        for r in &requests {
            seeds.push(encoded_request(r).await);
        }
        seeds
    })
}

/// A daemon's side of a conversation: handshake, then the replies to
/// `IsValidPath` (with a log line) and `QueryValidPaths`.
fn daemon_stream() -> Vec<u8> {
    block_on(async {
        let hello = ServerHello {
            version: NIX_2_8,
            nix_version: "2.8.0".into(),
            trusted: None,
            features: BTreeSet::new(),
        };
        let client = u64s(&[0x6e69_7863, 0x122, 0, 0]);
        let mut w = NixWriter::new(Vec::new(), NIX_2_8);
        server_handshake(
            &mut NixReader::new(Cursor::new(client), NIX_2_8),
            &mut w,
            &hello,
        )
        .await
        .unwrap();
        w.flush().await.unwrap();
        let mut out = w.into_inner();
        out.extend(encoded(&StderrFrame::Log(LogEvent::Message("checking".into()))).await);
        out.extend(encoded(&StderrFrame::Last).await);
        out.extend(u64s(&[1]));
        out.extend(encoded(&StderrFrame::Last).await);
        // A set of one store path: count, then the length-prefixed, padded string.
        let printed = format!("/nix/store/{}", path("a"));
        out.extend(u64s(&[1, printed.len() as u64]));
        out.extend(printed.as_bytes());
        out.resize(out.len() + (8 - printed.len() % 8) % 8, 0);
        out
    })
}

/// Decode one request; if it decodes, it must encode back to the same value.
fn check_request(bytes: &[u8]) -> Result<(), TestCaseError> {
    block_on(async {
        let read = async {
            let mut r = NixReader::new(Cursor::new(bytes.to_vec()), NIX_2_8);
            Request::read(&mut r).await
        };
        let decoded = tokio::time::timeout(LIMIT, read)
            .await
            .map_err(|_| TestCaseError::fail("Request::read did not finish"))?;
        if let Ok(Some(req)) = decoded {
            let again = encoded_request(&req).await;
            let mut r = NixReader::new(Cursor::new(again), NIX_2_8);
            let back = Request::read(&mut r).await;
            prop_assert!(
                matches!(&back, Ok(Some(b)) if *b == req),
                "{req:?} → {back:?}"
            );
        }
        Ok(())
    })
}

/// Play a daemon that sends `bytes`: the client must finish with a result
/// or an error for every step.
fn check_client(bytes: &[u8]) -> Result<(), TestCaseError> {
    block_on(async {
        let conversation = async {
            let Ok(mut client) =
                DaemonClient::handshake(Cursor::new(bytes.to_vec()), Vec::new()).await
            else {
                return;
            };
            let _ = client.is_valid_path(&path("a")).await;
            let _ = client
                .query_valid_paths(&BTreeSet::from([path("a")]), false)
                .await;
        };
        tokio::time::timeout(LIMIT, conversation)
            .await
            .map_err(|_| TestCaseError::fail("the client did not finish"))?;
        // Frames and replies on their own.
        let mut r = NixReader::new(Cursor::new(bytes.to_vec()), NIX_2_8);
        let _ = tokio::time::timeout(LIMIT, StderrFrame::read_from(&mut r)).await;
        Ok(())
    })
}

#[test]
fn requests_decode_or_fail_cleanly() {
    let input = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        prop::collection::vec(0u64..50, 0..16).prop_map(|w| u64s(&w)),
        fuzz::mutated(request_seeds()),
    ];
    fuzz::runner(2000, 300_000)
        .run(&input, |bytes| check_request(&bytes))
        .unwrap();
}

#[test]
fn daemon_replies_are_read_or_refused_cleanly() {
    let input = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        fuzz::mutated(vec![daemon_stream()]),
    ];
    fuzz::runner(2000, 300_000)
        .run(&input, |bytes| check_client(&bytes))
        .unwrap();
}

#[test]
fn the_corpus_replays() {
    let requests = fuzz::corpus("nix-request");
    let replies = fuzz::corpus("nix-reply");
    assert!(!requests.is_empty() && !replies.is_empty(), "no corpus");
    for (name, bytes) in requests {
        check_request(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for (name, bytes) in replies {
        check_client(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

/// Writes the corpus seeds (run with `--ignored` after changing them).
#[test]
#[ignore = "regenerates tests/corpus/nix-request and nix-reply"]
fn write_corpus_seeds() {
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = fuzz::corpus_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    for (i, seed) in request_seeds().iter().enumerate() {
        write("nix-request", &format!("valid-{i}.bin"), seed);
    }
    write("nix-request", "huge-string.bin", &u64s(&[1, 1 << 60]));
    write("nix-request", "huge-set.bin", &u64s(&[31, 1 << 60]));
    write("nix-request", "unknown-op.bin", &u64s(&[9999]));
    let stream = daemon_stream();
    write("nix-reply", "valid.bin", &stream);
    write("nix-reply", "truncated.bin", &stream[..stream.len() / 2]);
    write(
        "nix-reply",
        "huge-write-frame.bin",
        &u64s(&[0x6478_696f, 0x122, 0x6461_7416, 1 << 60]),
    );
}
