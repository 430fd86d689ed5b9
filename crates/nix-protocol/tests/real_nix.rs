//! Differential tests against Debian's real Nix 2.8 (`nix-daemon --stdio` children).
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;

use common::{full, make_tree, store_path, unique, NixEnv};
use nixspace_nix_formats::derivation::{Derivation, OutputFields};
use nixspace_nix_formats::hash::{Hash, HashAlgo};
use nixspace_nix_formats::store_path::{StoreDir, StorePath};
use nixspace_nix_protocol::version::{MIN_SUPPORTED, NIX_2_8};
use nixspace_nix_protocol::{
    BasicDerivation, BuildMode, BuildStatus, DaemonClient, DerivationOutput, DerivedPath, LogEvent,
    OutputSpec, PathInfo, ProtocolVersion, ValidPathInfo,
};

fn instantiate(env: &NixEnv, tag: &str) -> StorePath {
    let expr = format!(
        r#"derivation {{ name = "t-{tag}"; builder = "/bin/sh";
            args = ["-c" "echo hi-{tag}; echo x > $out"];
            system = builtins.currentSystem;
            src = builtins.toFile "src-{tag}" "data-{tag}"; }}"#
    );
    store_path(&env.run("nix-instantiate", &["-E", &expr]))
}

/// Converts `nix show-derivation` JSON into the `BasicDerivation` that `BuildDerivation`
/// sends.
fn basic_derivation(env: &NixEnv, drv: &StorePath) -> BasicDerivation {
    let name = drv.derivation_name().unwrap().to_owned();
    let drv = full(drv);
    let json: serde_json::Value =
        serde_json::from_str(&env.run("nix", &["show-derivation", &drv])).unwrap();
    let d = &json[drv.as_str()];
    let str_of = |v: &serde_json::Value| v.as_str().unwrap().to_owned();
    let bytes_of = |v: &serde_json::Value| str_of(v).into_bytes();
    let outputs = d["outputs"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(output, o)| {
            let fields = OutputFields {
                path: o.get("path").map(str_of).unwrap_or_default(),
                hash_algo: o.get("hashAlgo").map(str_of).unwrap_or_default(),
                hash: o.get("hash").map(str_of).unwrap_or_default(),
            };
            let parsed =
                DerivationOutput::from_fields(&StoreDir::default(), &name, output, &fields)
                    .unwrap();
            (output.clone(), parsed)
        })
        .collect();
    assert!(d["inputDrvs"].as_object().unwrap().is_empty());
    BasicDerivation {
        name,
        outputs,
        input_srcs: d["inputSrcs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| store_path(p.as_str().unwrap()))
            .collect(),
        system: str_of(&d["system"]),
        builder: bytes_of(&d["builder"]),
        args: d["args"].as_array().unwrap().iter().map(bytes_of).collect(),
        env: d["env"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone().into_bytes(), bytes_of(v)))
            .collect(),
    }
}

fn hex_hash(env: &NixEnv, nix_hash: &str) -> String {
    env.run("nix", &["hash", "to-base16", nix_hash])
}

async fn check_path_info(env: &NixEnv, version: ProtocolVersion) {
    let mut daemon = env.daemon();
    let (r, w) = (
        daemon.child.stdout.take().unwrap(),
        daemon.child.stdin.take().unwrap(),
    );
    let mut client = DaemonClient::handshake_with(r, w, version, &BTreeSet::new())
        .await
        .unwrap();
    assert_eq!(client.version(), version.min(NIX_2_8));
    client.set_options(&common::settings()).await.unwrap();

    let drv = instantiate(env, &unique("qpi"));
    let drv_s = full(&drv);
    let src = env.run("nix-store", &["-q", "--references", &drv_s]);
    let info: PathInfo = client.query_path_info(&drv).await.unwrap().unwrap();
    let expected_hash = hex_hash(env, &env.run("nix-store", &["-q", "--hash", &drv_s]));
    assert_eq!(info.nar_hash.algo(), HashAlgo::Sha256);
    assert_eq!(info.nar_hash.to_base16(), expected_hash);
    assert_eq!(
        info.nar_size,
        env.run("nix-store", &["-q", "--size", &drv_s])
            .parse::<u64>()
            .unwrap()
    );
    let refs: BTreeSet<StorePath> = src.lines().map(store_path).collect();
    assert_eq!(info.references, refs);
    assert_eq!(refs.len(), 1);
    assert!(info.ca.as_deref().unwrap().starts_with("text:sha256:"));
    assert!(info.registration_time > 0);

    assert!(client.is_valid_path(&drv).await.unwrap());
    let missing = store_path(&format!(
        "{}/00000000000000000000000000000000-missing",
        client.store_dir()
    ));
    assert!(!client.is_valid_path(&missing).await.unwrap());
    assert_eq!(client.query_path_info(&missing).await.unwrap(), None);
    let both: BTreeSet<StorePath> = [drv.clone(), missing.clone()].into();
    assert_eq!(
        client.query_valid_paths(&both, false).await.unwrap(),
        [drv.clone()].into()
    );
    // Still in step after several operations.
    assert!(client.is_valid_path(&drv).await.unwrap());
}

#[tokio::test]
async fn handshake_negotiates_nix_2_8() {
    let env = NixEnv::new();
    let mut daemon = env.daemon();
    let mut client = daemon.client().await;
    let info = client.info().clone();
    assert_eq!(info.version, NIX_2_8);
    assert_eq!(info.peer_version, NIX_2_8);
    assert_eq!(info.daemon_nix_version.as_deref(), Some("2.8.0"));
    assert_eq!(info.trusted, None);
    client.set_options(&common::settings()).await.unwrap();
}

#[tokio::test]
async fn path_queries_match_nix_store_at_1_34() {
    check_path_info(&NixEnv::new(), NIX_2_8).await;
}

#[tokio::test]
async fn path_queries_match_nix_store_at_1_21() {
    check_path_info(&NixEnv::new(), MIN_SUPPORTED).await;
}

#[tokio::test]
async fn nar_from_path_matches_nix_store_dump() {
    let env = NixEnv::new();
    let tree = make_tree(env.conf_dir(), &unique("nar"));
    let path = store_path(&env.run("nix-store", &["--add", tree.to_str().unwrap()]));
    let expected = env.run_bytes("nix-store", &["--dump", &full(&path)]);
    let mut daemon = env.daemon();
    let mut client = daemon.client().await;
    client.set_options(&common::settings()).await.unwrap();
    let mut got = Vec::new();
    let n = client.nar_from_path(&path, &mut got).await.unwrap();
    assert_eq!(n as usize, expected.len());
    assert!(got == expected, "NAR differs from nix-store --dump");
    // The connection is still in step after the unframed NAR.
    assert!(client.is_valid_path(&path).await.unwrap());
    let mut again = Vec::new();
    client.nar_from_path(&path, &mut again).await.unwrap();
    assert!(again == expected);
}

async fn add_to_store_nar(version: ProtocolVersion) {
    let env = NixEnv::new();
    let name = unique("add");
    let tree = make_tree(env.conf_dir(), &name);
    let tree_s = tree.to_str().unwrap();
    let nar = env.run_bytes("nix-store", &["--dump", tree_s]);
    let hex = env.run("nix-hash", &["--type", "sha256", tree_s]);
    let nix32 = env.run("nix-hash", &["--type", "sha256", "--base32", tree_s]);
    let path = store_path(&env.run(
        "nix-store",
        &["--print-fixed-path", "--recursive", "sha256", &hex, &name],
    ));
    let info = ValidPathInfo {
        path: path.clone(),
        info: PathInfo {
            deriver: None,
            nar_hash: Hash::parse_unprefixed(&hex, HashAlgo::Sha256).unwrap(),
            references: BTreeSet::new(),
            registration_time: 0,
            nar_size: nar.len() as u64,
            ultimate: false,
            sigs: BTreeSet::new(),
            ca: Some(format!("fixed:r:sha256:{nix32}")),
        },
    };

    let mut daemon = env.daemon();
    let (r, w) = (
        daemon.child.stdout.take().unwrap(),
        daemon.child.stdin.take().unwrap(),
    );
    let mut client = DaemonClient::handshake_with(r, w, version, &BTreeSet::new())
        .await
        .unwrap();
    client.set_options(&common::settings()).await.unwrap();
    assert!(!client.is_valid_path(&path).await.unwrap());
    client
        .add_to_store_nar(&info, &mut nar.as_slice(), false, true)
        .await
        .unwrap();
    assert!(client.is_valid_path(&path).await.unwrap());
    let stored = client.query_path_info(&path).await.unwrap().unwrap();
    assert_eq!(stored.nar_hash, info.info.nar_hash);
    assert_eq!(stored.ca, info.info.ca);
    assert!(env.run_bytes("nix-store", &["--dump", &full(&path)]) == nar);

    // A wrong hash is refused by the daemon, and the connection survives.
    let mut bad = info.clone();
    bad.path = store_path(&env.run(
        "nix-store",
        &[
            "--print-fixed-path",
            "--recursive",
            "sha256",
            &hex,
            &unique("bad"),
        ],
    ));
    bad.info.nar_hash = Hash::new(HashAlgo::Sha256, &[7; 32]).unwrap();
    let err = client
        .add_to_store_nar(&bad, &mut nar.as_slice(), false, true)
        .await
        .unwrap_err();
    assert!(err.is_recoverable(), "{err:?}");
    assert!(client.is_valid_path(&path).await.unwrap());
}

#[tokio::test]
async fn add_to_store_nar_framed_at_1_34() {
    add_to_store_nar(NIX_2_8).await;
}

#[tokio::test]
async fn add_to_store_nar_tunnelled_at_1_21() {
    add_to_store_nar(MIN_SUPPORTED).await;
}

async fn build_derivation(version: ProtocolVersion) {
    let env = NixEnv::new();
    let tag = unique("build");
    let drv = instantiate(&env, &tag);
    let basic = basic_derivation(&env, &drv);
    let out = basic.outputs["out"].path().cloned().unwrap();

    let mut daemon = env.daemon();
    let (r, w) = (
        daemon.child.stdout.take().unwrap(),
        daemon.child.stdin.take().unwrap(),
    );
    let mut client = DaemonClient::handshake_with(r, w, version, &BTreeSet::new())
        .await
        .unwrap();
    client.set_options(&common::settings()).await.unwrap();
    let mut events = Vec::new();
    let mut logs = |e: LogEvent| events.push(e);
    let result = client
        .build_derivation(&drv, &basic, BuildMode::Normal, &mut logs)
        .await
        .unwrap();
    assert_eq!(result.status, BuildStatus::Built, "{result:?}");
    assert!(result.error_msg.is_empty());
    let want = format!("hi-{tag}");
    assert!(
        events.iter().any(|e| match e {
            LogEvent::Message(m) => m.contains(&want),
            other => other.build_log_line() == Some(want.as_str()),
        }),
        "no log line {want:?} in {events:?}"
    );
    if version >= NIX_2_8 {
        assert_eq!(result.times_built, 1);
        assert!(result.stop_time >= result.start_time && result.start_time > 0);
        let (id, real) = result.built_outputs.iter().next().unwrap();
        assert!(id.ends_with("!out"), "{id}");
        assert_eq!(real.out_path, out.to_string());
    }
    assert!(client.is_valid_path(&out).await.unwrap());

    // A failing build is a BuildResult, not a protocol error.
    let mut failing = basic.clone();
    failing.args = vec![b"-c".to_vec(), b"exit 3".to_vec()];
    let result = client
        .build_derivation(&drv, &failing, BuildMode::Check, &mut |_| {})
        .await;
    match result {
        Ok(r) => assert!(!r.status.is_success(), "{r:?}"),
        Err(e) => assert!(e.is_recoverable(), "{e:?}"),
    }
    assert!(client.is_valid_path(&out).await.unwrap());
}

#[tokio::test]
async fn build_derivation_streams_logs_at_1_34() {
    build_derivation(NIX_2_8).await;
}

#[tokio::test]
async fn build_derivation_at_1_21() {
    build_derivation(MIN_SUPPORTED).await;
}

/// A `.drv` that Nix itself wrote with a non-UTF-8 environment value (from
/// `builtins.readFile`), read with `nixspace-nix-formats` and sent with `BuildDerivation`: the
/// builder sees the value byte for byte.
#[tokio::test]
async fn build_derivation_carries_non_utf8_environment_values() {
    let env = NixEnv::new();
    let tag = unique("bytes");
    let value = [b"a\xff\xfe\"b\n".as_slice(), tag.as_bytes()].concat();
    let file = env.conf_dir().join("value");
    std::fs::write(&file, &value).unwrap();
    let expr = format!(
        r#"derivation {{ name = "t-{tag}"; builder = "/bin/sh";
            args = ["-c" "printf %s \"$v\" > $out"];
            system = builtins.currentSystem;
            v = builtins.readFile {}; }}"#,
        file.display()
    );
    let drv = store_path(&env.run("nix-instantiate", &["-E", &expr]));
    let text = std::fs::read(full(&drv)).unwrap();
    let parsed = Derivation::parse_at(&StoreDir::default(), &drv, &text).unwrap();
    assert_eq!(parsed.env[b"v".as_slice()], value);
    let basic = BasicDerivation::from_derivation(&parsed);
    let out = basic.outputs["out"].path().cloned().unwrap();

    let mut daemon = env.daemon();
    let mut client = daemon.client().await;
    client.set_options(&common::settings()).await.unwrap();
    let result = client
        .build_derivation(&drv, &basic, BuildMode::Normal, &mut |_| {})
        .await
        .unwrap();
    assert_eq!(result.status, BuildStatus::Built, "{result:?}");
    assert_eq!(std::fs::read(full(&out)).unwrap(), value);
}

#[tokio::test]
async fn build_paths_builds_all_outputs() {
    let env = NixEnv::new();
    let tag = unique("bp");
    let drv = instantiate(&env, &tag);
    let out = basic_derivation(&env, &drv).outputs["out"]
        .path()
        .cloned()
        .unwrap();
    let mut daemon = env.daemon();
    let mut client = daemon.client().await;
    client.set_options(&common::settings()).await.unwrap();
    let mut lines = Vec::new();
    client
        .build_paths(
            &[DerivedPath::Built {
                drv_path: drv.clone(),
                outputs: OutputSpec::All,
            }],
            BuildMode::Normal,
            &mut |e: LogEvent| {
                if let Some(l) = e.build_log_line() {
                    lines.push(l.to_owned())
                }
            },
        )
        .await
        .unwrap();
    assert!(lines.contains(&format!("hi-{tag}")), "{lines:?}");
    assert!(client.is_valid_path(&out).await.unwrap());
    // Building a missing path is a daemon error; the session continues.
    let missing = DerivedPath::Opaque(store_path(&format!(
        "{}/00000000000000000000000000000000-nope",
        client.store_dir()
    )));
    let err = client
        .build_paths(&[missing], BuildMode::Normal, &mut |_| {})
        .await
        .unwrap_err();
    assert!(err.is_recoverable(), "{err:?}");
    assert!(client.is_valid_path(&out).await.unwrap());
}

#[tokio::test]
async fn connects_to_a_daemon_socket() {
    let env = NixEnv::new();
    let daemon = env.socket_daemon();
    let mut client = DaemonClient::connect(&daemon.socket).await.unwrap();
    assert_eq!(client.version(), NIX_2_8);
    client.set_options(&common::settings()).await.unwrap();
    let drv = instantiate(&env, &unique("sock"));
    assert!(client.is_valid_path(&drv).await.unwrap());
    assert!(client.query_path_info(&drv).await.unwrap().is_some());
}

#[tokio::test]
async fn add_build_log_is_what_nix_store_l_prints_and_is_never_replaced() {
    let env = NixEnv::new();
    let drv = instantiate(&env, &unique("log"));
    let full_drv = full(&drv);
    // Positive control: no log yet, and `nix-store -l` says so.
    let before = env
        .cmd("nix-store")
        .args(["-l", &full_drv])
        .output()
        .unwrap();
    assert!(!before.status.success());

    let mut daemon = env.daemon();
    let mut client = daemon.client().await;
    client.set_options(&common::settings()).await.unwrap();
    let log = "first line\nsecond line\n";
    client
        .add_build_log(&drv, &mut log.as_bytes())
        .await
        .unwrap();
    assert_eq!(
        env.run_bytes("nix-store", &["-l", &full_drv]),
        log.as_bytes()
    );
    // Where Nix 2.8 keeps it: bzip2-compressed, under the first two letters of the name.
    let base = full_drv.rsplit('/').next().unwrap();
    let file = format!("/nix/var/log/nix/drvs/{}/{}.bz2", &base[..2], &base[2..]);
    assert!(std::path::Path::new(&file).exists(), "{file}");

    // A second log for the same derivation leaves the first in place, as Nix does.
    client
        .add_build_log(&drv, &mut "another\n".as_bytes())
        .await
        .unwrap();
    assert_eq!(
        env.run_bytes("nix-store", &["-l", &full_drv]),
        log.as_bytes()
    );
}
