//! Malformed input: every case returns an error and nothing panics or allocates
//! unboundedly.
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::io::Cursor;

use nixspace_nix_formats::store_path::StorePath;
use nixspace_nix_protocol::handshake::{client_handshake, server_handshake, ServerHello};
use nixspace_nix_protocol::stderr::DiscardLogs;
use nixspace_nix_protocol::version::{MAX_SUPPORTED, NIX_2_8};
use nixspace_nix_protocol::{
    read_basic_derivation, BuildResult, ClientSettings, DaemonClient, HandshakeError,
    NixDeserialize, NixReader, NixSerialize, NixWriter, PathInfo, ProtocolVersion, Request,
    StderrFrame, UnknownOpcode, VersionError, WireError,
};
use proptest::prelude::*;

fn reader(bytes: Vec<u8>) -> NixReader<Cursor<Vec<u8>>> {
    NixReader::new(Cursor::new(bytes), NIX_2_8)
}

/// The `.drv` path a derivation read from garbage is named by.
fn drv_path() -> StorePath {
    StorePath::from_base_name("7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-garbage.drv").unwrap()
}

fn u64s(ns: &[u64]) -> Vec<u8> {
    ns.iter().flat_map(|n| n.to_le_bytes()).collect()
}

#[tokio::test]
async fn huge_lengths_are_refused_before_allocation() {
    let huge = 1u64 << 60;
    assert!(matches!(
        reader(u64s(&[huge])).read_string("s").await,
        Err(WireError::TooLong { len, .. }) if len == huge
    ));
    // A derivation claiming 2^60 outputs, a path info with 2^60 references.
    assert!(matches!(
        read_basic_derivation(&mut reader(u64s(&[huge])), &drv_path()).await,
        Err(WireError::TooMany { .. })
    ));
    let mut bytes = u64s(&[0]); // deriver ""
    bytes.extend(u64s(&[64]));
    bytes.extend([b'a'; 64]);
    bytes.extend(u64s(&[huge]));
    assert!(matches!(
        PathInfo::read_from(&mut reader(bytes)).await,
        Err(WireError::TooMany { .. })
    ));
    // A stderr WRITE frame with a 2^60 payload.
    assert!(matches!(
        StderrFrame::read_from(&mut reader(u64s(&[0x6461_7416, huge]))).await,
        Err(WireError::TooLong { .. })
    ));
}

#[tokio::test]
async fn bad_padding_is_refused() {
    let mut bytes = u64s(&[3]);
    bytes.extend(b"abc\0\0\0\0x");
    assert!(matches!(
        reader(bytes).read_string("s").await,
        Err(WireError::BadPadding { .. })
    ));
}

#[tokio::test]
async fn unknown_opcode_is_named() {
    let err = Request::read(&mut reader(u64s(&[2]))).await.unwrap_err();
    assert!(matches!(err, WireError::UnknownOpcode(UnknownOpcode(2))));
    assert_eq!(err.to_string(), "unknown worker operation 2");
    let err = Request::read(&mut reader(u64s(&[9999]))).await.unwrap_err();
    assert!(err.to_string().contains("9999"));
    // A known but unmodelled operation is refused by name.
    let err = Request::read(&mut reader(u64s(&[24]))).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "operation QueryFailedPaths is not supported by nixspace"
    );
    // Clean EOF at an op boundary is "client left", not an error.
    assert_eq!(Request::read(&mut reader(vec![])).await.unwrap(), None);
}

#[tokio::test]
async fn bad_magic_is_refused_on_both_sides() {
    let hello = ServerHello {
        version: NIX_2_8,
        nix_version: "x".into(),
        trusted: None,
        features: BTreeSet::new(),
    };
    let mut w = NixWriter::new(Vec::new(), NIX_2_8);
    assert!(matches!(
        server_handshake(&mut reader(u64s(&[0x1234])), &mut w, &hello).await,
        Err(HandshakeError::BadMagic { got: 0x1234, .. })
    ));
    let mut w = NixWriter::new(Vec::new(), NIX_2_8);
    let res = client_handshake(
        &mut reader(u64s(&[0x6e69_7863, 0x122])),
        &mut w,
        MAX_SUPPORTED,
        &BTreeSet::new(),
        &mut DiscardLogs,
    )
    .await;
    assert!(matches!(res, Err(HandshakeError::BadMagic { .. })));
    // Through the client API, as against a peer that is not a daemon.
    let res =
        DaemonClient::handshake(Cursor::new(b"HTTP/1.1 400 Bad\r\n".to_vec()), Vec::new()).await;
    assert!(res.is_err());
}

#[tokio::test]
async fn old_daemons_are_refused_with_their_version() {
    let mut w = NixWriter::new(Vec::new(), NIX_2_8);
    let res = client_handshake(
        &mut reader(u64s(&[0x6478_696f, 0x114])),
        &mut w,
        MAX_SUPPORTED,
        &BTreeSet::new(),
        &mut DiscardLogs,
    )
    .await;
    match res {
        Err(HandshakeError::Version(VersionError::TooOld { theirs, .. })) => {
            assert_eq!(theirs, ProtocolVersion::new(1, 20))
        }
        other => panic!("{other:?}"),
    }
}

async fn encoded<T: NixSerialize + Sync>(v: &T) -> Vec<u8> {
    let mut w = NixWriter::new(Vec::new(), NIX_2_8);
    v.write_to(&mut w).await.unwrap();
    w.flush().await.unwrap();
    w.into_inner()
}

#[tokio::test]
async fn every_truncation_is_an_error() {
    let frame = StderrFrame::Log(nixspace_nix_protocol::LogEvent::StartActivity {
        id: 1,
        level: 3,
        activity_type: 105,
        text: "building".into(),
        fields: vec![nixspace_nix_protocol::stderr::Field::String("x".into())],
        parent: 0,
    });
    let bytes = encoded(&frame).await;
    for cut in 0..bytes.len() {
        assert!(
            StderrFrame::read_from(&mut reader(bytes[..cut].to_vec()))
                .await
                .is_err(),
            "frame cut at {cut}"
        );
    }
    let req = Request::SetOptions(ClientSettings::default());
    let mut w = NixWriter::new(Vec::new(), NIX_2_8);
    req.write(&mut w).await.unwrap();
    w.flush().await.unwrap();
    let bytes = w.into_inner();
    for cut in 1..bytes.len() {
        assert!(
            Request::read(&mut reader(bytes[..cut].to_vec()))
                .await
                .is_err(),
            "request cut at {cut}"
        );
    }
    let result = encoded(&BuildResult::new(nixspace_nix_protocol::BuildStatus::Built)).await;
    for cut in 0..result.len() {
        assert!(BuildResult::read_from(&mut reader(result[..cut].to_vec()))
            .await
            .is_err());
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Garbage never panics any decoder (errors are fine).
    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256),
                            words in proptest::collection::vec(0u64..70, 0..32)) {
        let mut mixed = u64s(&words);
        mixed.extend(&bytes);
        for input in [bytes.clone(), mixed] {
            block_on(async {
                let _ = StderrFrame::read_from(&mut reader(input.clone())).await;
                let _ = Request::read(&mut reader(input.clone())).await;
                let _ = BuildResult::read_from(&mut reader(input.clone())).await;
                let _ = read_basic_derivation(&mut reader(input.clone()), &drv_path()).await;
                let _ = PathInfo::read_from(&mut reader(input.clone())).await;
            });
        }
    }
}
