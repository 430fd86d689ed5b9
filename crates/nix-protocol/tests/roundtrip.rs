//! Property tests: every wire type survives write → read at 1.21, 1.34 and 1.38, the
//! encoding is a multiple of 8 bytes, and the reader consumes it exactly (no trailing bytes).
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::io::Cursor;

use nixspace_nix_formats::hash::{Hash, HashAlgo};
use nixspace_nix_formats::store_path::{FileIngestionMethod, StoreDir, StorePath};
use nixspace_nix_protocol::stderr::Field;
use nixspace_nix_protocol::version::{
    BUILD_PATHS_WITH_RESULTS, BUILD_RESULT_BUILT_OUTPUTS, BUILD_RESULT_CPU_TIMES,
    BUILD_RESULT_TIMES, DERIVED_PATH_STRINGS, MAX_SUPPORTED, MIN_SUPPORTED, NIX_2_8,
    QUERY_VALID_PATHS_SUBSTITUTE, STRUCTURED_ERRORS,
};
use nixspace_nix_protocol::{
    read_basic_derivation, BasicDerivation, BuildMode, BuildResult, BuildStatus, ClientSettings,
    DaemonError, DerivationOutput, DerivedPath, LogEvent, NixDeserialize, NixReader, NixSerialize,
    NixWriter, OutputSpec, PathInfo, ProtocolVersion, Realisation, Request, StderrFrame,
    ValidPathInfo,
};
use proptest::prelude::*;

/// Lists, sets, maps, bytes, an integer and a boolean, in that order.
type Primitives = (
    Vec<String>,
    BTreeSet<String>,
    BTreeMap<String, String>,
    Vec<u8>,
    u64,
    bool,
);

const VERSIONS: [ProtocolVersion; 3] = [MIN_SUPPORTED, NIX_2_8, MAX_SUPPORTED];

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

fn encode<T: NixSerialize + Sync>(v: &T, version: ProtocolVersion, dir: &StoreDir) -> Vec<u8> {
    block_on(async {
        let mut w = NixWriter::new(Vec::new(), version).with_store_dir(dir.clone());
        v.write_to(&mut w).await.unwrap();
        w.flush().await.unwrap();
        w.into_inner()
    })
}

/// A store directory other than `/nix/store`.
fn other_store_dir() -> StoreDir {
    StoreDir::new("/tmp/nixspace-test/store").unwrap()
}

fn round_trip<T>(v: &T, version: ProtocolVersion) -> T
where
    T: NixSerialize + NixDeserialize + Sync + Debug,
{
    round_trip_in(v, version, &StoreDir::default())
}

/// [`round_trip`] with reader and writer in store directory `dir`.
fn round_trip_in<T>(v: &T, version: ProtocolVersion, dir: &StoreDir) -> T
where
    T: NixSerialize + NixDeserialize + Sync + Debug,
{
    let bytes = encode(v, version, dir);
    assert_eq!(bytes.len() % 8, 0, "not padded: {v:?}");
    block_on(async {
        let mut r = NixReader::new(Cursor::new(bytes), version).with_store_dir(dir.clone());
        let out = T::read_from(&mut r).await.unwrap();
        assert_eq!(
            r.try_read_u64("trailing").await.unwrap(),
            None,
            "trailing bytes"
        );
        out
    })
}

fn request_round_trip(req: &Request, version: ProtocolVersion) -> Request {
    let bytes = block_on(async {
        let mut w = NixWriter::new(Vec::new(), version);
        req.write(&mut w).await.unwrap();
        w.flush().await.unwrap();
        w.into_inner()
    });
    assert_eq!(bytes.len() % 8, 0);
    block_on(async {
        let mut r = NixReader::new(Cursor::new(bytes), version);
        let out = Request::read(&mut r).await.unwrap().unwrap();
        assert_eq!(Request::read(&mut r).await.unwrap(), None, "trailing bytes");
        out
    })
}

fn store_path() -> impl Strategy<Value = StorePath> {
    (
        "[0-9a-df-np-sv-z]{32}",
        "[a-zA-Z0-9+._?=-]{1,24}",
        any::<bool>(),
    )
        .prop_map(|(h, n, drv)| {
            let suffix = if drv { ".drv" } else { "" };
            StorePath::from_base_name(&format!("{h}-{n}{suffix}")).unwrap()
        })
}

fn text() -> impl Strategy<Value = String> {
    "\\PC{0,24}"
}

fn path_info() -> impl Strategy<Value = PathInfo> {
    (
        proptest::option::of(store_path()),
        any::<[u8; 32]>(),
        proptest::collection::btree_set(store_path(), 0..4),
        any::<u64>(),
        any::<u64>(),
        any::<bool>(),
        proptest::collection::btree_set(text(), 0..3),
        proptest::option::of("[a-z]{1,8}:[a-z0-9:]{1,40}"),
    )
        .prop_map(
            |(deriver, h, references, rt, ns, ultimate, sigs, ca)| PathInfo {
                deriver,
                nar_hash: Hash::new(HashAlgo::Sha256, &h).unwrap(),
                references,
                registration_time: rt,
                nar_size: ns,
                ultimate,
                sigs,
                ca,
            },
        )
}

fn realisation() -> impl Strategy<Value = Realisation> {
    (
        proptest::collection::btree_map(text(), text(), 0..3),
        text(),
        text(),
        proptest::collection::btree_set(text(), 0..3),
    )
        .prop_map(|(d, id, out_path, signatures)| Realisation {
            dependent_realisations: d,
            id,
            out_path,
            signatures,
        })
}

fn build_result() -> impl Strategy<Value = BuildResult> {
    (
        proptest::sample::select(BuildStatus::ALL.to_vec()),
        text(),
        (any::<u64>(), any::<bool>(), any::<u64>(), any::<u64>()),
        (
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u64>()),
        ),
        proptest::collection::btree_map(text(), realisation(), 0..3),
    )
        .prop_map(
            |(status, msg, (tb, nd, st, sp), (cu, cs), outs)| BuildResult {
                status,
                error_msg: msg,
                times_built: tb,
                is_non_deterministic: nd,
                start_time: st,
                stop_time: sp,
                cpu_user: cu,
                cpu_system: cs,
                built_outputs: outs,
            },
        )
}

/// What a build result looks like after a trip at `v`: fields the version lacks are reset.
fn build_result_at(mut r: BuildResult, v: ProtocolVersion) -> BuildResult {
    if v < BUILD_RESULT_TIMES {
        r.times_built = 0;
        r.is_non_deterministic = false;
        r.start_time = 0;
        r.stop_time = 0;
    }
    if v < BUILD_RESULT_CPU_TIMES {
        r.cpu_user = None;
        r.cpu_system = None;
    }
    if v < BUILD_RESULT_BUILT_OUTPUTS {
        r.built_outputs.clear();
    }
    r
}

fn output_name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9_-]{0,8}"
}

fn derived_path() -> impl Strategy<Value = DerivedPath> {
    prop_oneof![
        store_path().prop_map(DerivedPath::Opaque),
        (
            store_path(),
            proptest::option::of(proptest::collection::btree_set(output_name(), 1..4))
        )
            .prop_map(|(p, outs)| DerivedPath::Built {
                drv_path: StorePath::from_base_name(&format!("{p}.drv")).unwrap(),
                outputs: outs.map_or(OutputSpec::All, OutputSpec::Names),
            }),
    ]
}

/// Whether `p` can be expressed at `v` (opaque `.drv` paths need 1.30).
fn expressible(p: &DerivedPath, v: ProtocolVersion) -> bool {
    !matches!(p, DerivedPath::Opaque(s) if s.is_derivation() && v < DERIVED_PATH_STRINGS)
}

fn hash_algo() -> impl Strategy<Value = HashAlgo> {
    prop::sample::select(HashAlgo::ALL.to_vec())
}

fn method() -> impl Strategy<Value = FileIngestionMethod> {
    prop_oneof![
        Just(FileIngestionMethod::Flat),
        Just(FileIngestionMethod::Recursive)
    ]
}

/// Outputs of every kind (the wire does not check that they go together); a fixed output's
/// path is the one its hash gives for derivation `drv_name` in `dir`.
fn derivation_output(
    dir: StoreDir,
    drv_name: String,
    output: String,
) -> impl Strategy<Value = DerivationOutput> {
    prop_oneof![
        store_path().prop_map(DerivationOutput::InputAddressed),
        Just(DerivationOutput::Deferred),
        (method(), hash_algo())
            .prop_map(|(method, algo)| DerivationOutput::CaFloating { method, algo }),
        (method(), hash_algo())
            .prop_map(|(method, algo)| DerivationOutput::Impure { method, algo }),
        (method(), hash_algo(), any::<[u8; 8]>()).prop_map(move |(m, a, seed)| {
            DerivationOutput::ca_fixed(&dir, &drv_name, &output, m, Hash::digest(a, seed)).unwrap()
        }),
    ]
}

/// Byte strings, UTF-8 or not.
fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..40),
        text().prop_map(String::into_bytes),
    ]
}

/// A derivation named like a store path, its outputs' paths in `dir`.
fn basic_derivation(dir: StoreDir) -> impl Strategy<Value = BasicDerivation> {
    (
        "[a-zA-Z0-9+._?=-]{1,20}",
        proptest::collection::btree_set(output_name(), 0..3),
    )
        .prop_flat_map(move |(name, output_names)| {
            let outputs: Vec<_> = output_names
                .into_iter()
                .map(|o| {
                    (
                        Just(o.clone()),
                        derivation_output(dir.clone(), name.clone(), o),
                    )
                })
                .collect();
            (
                Just(name),
                outputs,
                proptest::collection::btree_set(store_path(), 0..3),
                text(),
                bytes(),
                proptest::collection::vec(bytes(), 0..4),
                proptest::collection::btree_map(bytes(), bytes(), 0..4),
            )
        })
        .prop_map(
            |(name, outputs, input_srcs, system, builder, args, env)| BasicDerivation {
                name,
                outputs: outputs.into_iter().collect(),
                input_srcs,
                system,
                builder,
                args,
                env,
            },
        )
}

/// The `.drv` path that names `drv` on the wire.
fn drv_path_of(drv: &BasicDerivation) -> StorePath {
    StorePath::new([7; 20], &format!("{}.drv", drv.name)).unwrap()
}

/// [`round_trip_in`] for a derivation, which is read with the `.drv` path that names it.
fn derivation_round_trip_in(
    drv: &BasicDerivation,
    version: ProtocolVersion,
    dir: &StoreDir,
) -> BasicDerivation {
    let bytes = encode(drv, version, dir);
    assert_eq!(bytes.len() % 8, 0, "not padded: {drv:?}");
    block_on(async {
        let mut r = NixReader::new(Cursor::new(bytes), version).with_store_dir(dir.clone());
        let out = read_basic_derivation(&mut r, &drv_path_of(drv))
            .await
            .unwrap();
        assert_eq!(
            r.try_read_u64("trailing").await.unwrap(),
            None,
            "trailing bytes"
        );
        out
    })
}

fn client_settings() -> impl Strategy<Value = ClientSettings> {
    (
        (any::<bool>(), any::<bool>(), any::<bool>(), 0..8u64),
        (any::<u64>(), any::<u64>(), any::<bool>(), 0..8u64),
        (any::<u64>(), any::<bool>(), any::<u64>(), any::<bool>()),
        proptest::collection::btree_map(text(), text(), 0..4),
    )
        .prop_map(
            |((kf, kg, tf, v), (mj, ms, ubh, bv), (lt, pbt, bc, us), o)| ClientSettings {
                keep_failed: kf,
                keep_going: kg,
                try_fallback: tf,
                verbosity: v,
                max_build_jobs: mj,
                max_silent_time: ms,
                use_build_hook: ubh,
                build_verbosity: bv,
                log_type: lt,
                print_build_trace: pbt,
                build_cores: bc,
                use_substitutes: us,
                overrides: o,
            },
        )
}

fn build_mode() -> impl Strategy<Value = BuildMode> {
    proptest::sample::select(vec![BuildMode::Normal, BuildMode::Repair, BuildMode::Check])
}

fn field() -> impl Strategy<Value = Field> {
    prop_oneof![
        any::<u64>().prop_map(Field::Int),
        text().prop_map(Field::String)
    ]
}

fn daemon_error() -> impl Strategy<Value = DaemonError> {
    (
        0..8u64,
        text(),
        text(),
        proptest::collection::vec(text(), 0..3),
        any::<u64>(),
    )
        .prop_map(|(level, name, message, traces, exit_status)| DaemonError {
            level,
            name,
            message,
            traces,
            exit_status,
        })
}

fn daemon_error_at(mut e: DaemonError, v: ProtocolVersion) -> DaemonError {
    if v < STRUCTURED_ERRORS {
        e.level = 0;
        e.name = "Error".into();
        e.traces.clear();
    } else {
        e.exit_status = 1;
    }
    e
}

fn stderr_frame() -> impl Strategy<Value = StderrFrame> {
    prop_oneof![
        text().prop_map(|m| StderrFrame::Log(LogEvent::Message(m))),
        (
            any::<u64>(),
            0..8u64,
            any::<u64>(),
            text(),
            proptest::collection::vec(field(), 0..4),
            any::<u64>()
        )
            .prop_map(|(id, level, activity_type, text, fields, parent)| {
                StderrFrame::Log(LogEvent::StartActivity {
                    id,
                    level,
                    activity_type,
                    text,
                    fields,
                    parent,
                })
            }),
        any::<u64>().prop_map(|id| StderrFrame::Log(LogEvent::StopActivity { id })),
        (
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(field(), 0..4)
        )
            .prop_map(
                |(id, result_type, fields)| StderrFrame::Log(LogEvent::Result {
                    id,
                    result_type,
                    fields
                })
            ),
        any::<u64>().prop_map(StderrFrame::Read),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(StderrFrame::Write),
        Just(StderrFrame::Last),
        daemon_error().prop_map(StderrFrame::Error),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        client_settings().prop_map(Request::SetOptions),
        store_path().prop_map(Request::IsValidPath),
        (
            proptest::collection::btree_set(store_path(), 0..4),
            any::<bool>()
        )
            .prop_map(|(paths, substitute)| Request::QueryValidPaths { paths, substitute }),
        store_path().prop_map(Request::QueryPathInfo),
        store_path().prop_map(Request::NarFromPath),
        (store_path(), path_info(), any::<bool>(), any::<bool>()).prop_map(
            |(path, info, repair, dont_check_sigs)| Request::AddToStoreNar {
                info: ValidPathInfo { path, info },
                repair,
                dont_check_sigs,
            }
        ),
        (any::<bool>(), any::<bool>()).prop_map(|(repair, dont_check_sigs)| {
            Request::AddMultipleToStore {
                repair,
                dont_check_sigs,
            }
        }),
        (basic_derivation(StoreDir::default()), build_mode()).prop_map(|(drv, mode)| {
            Request::BuildDerivation {
                drv_path: drv_path_of(&drv),
                drv,
                mode,
            }
        }),
        (
            proptest::collection::vec(derived_path(), 0..4),
            build_mode()
        )
            .prop_map(|(paths, mode)| Request::BuildPaths { paths, mode }),
        (
            proptest::collection::vec(derived_path(), 0..4),
            build_mode()
        )
            .prop_map(|(paths, mode)| Request::BuildPathsWithResults { paths, mode }),
        store_path().prop_map(Request::EnsurePath),
        store_path().prop_map(Request::AddTempRoot),
        Just(Request::QueryAllValidPaths),
    ]
}

/// What a request looks like after a trip at `v`, or `None` if it cannot be sent at `v`.
fn request_at(req: Request, v: ProtocolVersion) -> Option<Request> {
    Some(match req {
        Request::QueryValidPaths { paths, substitute } => Request::QueryValidPaths {
            paths,
            substitute: substitute && v >= QUERY_VALID_PATHS_SUBSTITUTE,
        },
        Request::AddMultipleToStore { .. }
            if v < nixspace_nix_protocol::version::ADD_MULTIPLE_TO_STORE =>
        {
            return None
        }
        Request::BuildPathsWithResults { .. } if v < BUILD_PATHS_WITH_RESULTS => return None,
        Request::BuildPaths { ref paths, .. }
        | Request::BuildPathsWithResults { ref paths, .. }
            if !paths.iter().all(|p| expressible(p, v)) =>
        {
            return None
        }
        other => other,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn path_info_round_trips(info in path_info(), path in store_path()) {
        for v in VERSIONS {
            prop_assert_eq!(&round_trip(&info, v), &info);
            let vpi = ValidPathInfo { path: path.clone(), info: info.clone() };
            prop_assert_eq!(&round_trip(&vpi, v), &vpi);
            prop_assert_eq!(round_trip_in(&vpi, v, &other_store_dir()), vpi);
        }
    }

    #[test]
    fn build_result_round_trips(r in build_result()) {
        for v in VERSIONS {
            prop_assert_eq!(round_trip(&r, v), build_result_at(r.clone(), v));
        }
    }

    #[test]
    fn derived_path_round_trips(p in derived_path()) {
        for v in VERSIONS {
            if expressible(&p, v) {
                prop_assert_eq!(&round_trip(&p, v), &p);
                prop_assert_eq!(&round_trip_in(&p, v, &other_store_dir()), &p);
            }
        }
    }

    #[test]
    fn realisation_round_trips(r in realisation()) {
        for v in VERSIONS {
            prop_assert_eq!(&round_trip(&r, v), &r);
        }
    }

    #[test]
    fn basic_derivation_round_trips(
        d in basic_derivation(StoreDir::default()),
        o in basic_derivation(other_store_dir()),
    ) {
        for v in VERSIONS {
            prop_assert_eq!(&derivation_round_trip_in(&d, v, &StoreDir::default()), &d);
            prop_assert_eq!(&derivation_round_trip_in(&o, v, &other_store_dir()), &o);
        }
    }

    #[test]
    fn client_settings_round_trip(s in client_settings(), m in build_mode()) {
        for v in VERSIONS {
            prop_assert_eq!(&round_trip(&s, v), &s);
            prop_assert_eq!(round_trip(&m, v), m);
        }
    }

    #[test]
    fn stderr_frames_round_trip(f in stderr_frame()) {
        for v in VERSIONS {
            let expected = match f.clone() {
                StderrFrame::Error(e) => StderrFrame::Error(daemon_error_at(e, v)),
                other => other,
            };
            prop_assert_eq!(round_trip(&f, v), expected);
        }
    }

    #[test]
    fn requests_round_trip(req in request()) {
        for v in VERSIONS {
            if let Some(expected) = request_at(req.clone(), v) {
                prop_assert_eq!(request_round_trip(&req, v), expected);
            }
        }
    }

    #[test]
    fn primitives_round_trip(
        strings in proptest::collection::vec(text(), 0..6),
        map in proptest::collection::btree_map(text(), text(), 0..6),
        bytes in proptest::collection::vec(any::<u8>(), 0..70),
        n in any::<u64>(),
        b in any::<bool>(),
    ) {
        for v in VERSIONS {
            let encoded = block_on(async {
                let mut w = NixWriter::new(Vec::new(), v);
                w.write_strings(&strings, "l").await.unwrap();
                w.write_strings(strings.iter().collect::<BTreeSet<_>>(), "s").await.unwrap();
                w.write_string_map(&map, "m").await.unwrap();
                w.write_bytes(&bytes, "b").await.unwrap();
                w.write_u64(n, "n").await.unwrap();
                w.write_bool(b, "b").await.unwrap();
                w.flush().await.unwrap();
                w.into_inner()
            });
            prop_assert_eq!(encoded.len() % 8, 0);
            let decoded = block_on(async {
                let mut r = NixReader::new(Cursor::new(encoded), v);
                let out = (
                    r.read_strings("l").await.unwrap(),
                    r.read_string_set("s").await.unwrap(),
                    r.read_string_map("m").await.unwrap(),
                    r.read_bytes("b").await.unwrap(),
                    r.read_u64("n").await.unwrap(),
                    r.read_bool("b").await.unwrap(),
                );
                assert_eq!(r.try_read_u64("trailing").await.unwrap(), None);
                out
            });
            let set: BTreeSet<String> = strings.iter().cloned().collect();
            let expected: Primitives =
                (strings.clone(), set, map.clone(), bytes.clone(), n, b);
            prop_assert_eq!(decoded, expected);
        }
    }
}

/// Nix allows any bytes in a derivation's builder, arguments and environment:
/// `BuildDerivation` carries a non-UTF-8 environment value through its encoding and back
/// unchanged, byte for byte on the wire.
#[test]
fn build_derivation_carries_non_utf8_environment_values() {
    let value = vec![0xff, 0xfe, b'\n', 0x80, b'"'];
    let drv = BasicDerivation {
        name: "bytes".to_owned(),
        outputs: BTreeMap::from([(
            "out".to_owned(),
            DerivationOutput::InputAddressed(
                StorePath::from_base_name("7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-bytes").unwrap(),
            ),
        )]),
        input_srcs: BTreeSet::new(),
        system: "x86_64-linux".to_owned(),
        builder: b"/bin/sh".to_vec(),
        args: vec![b"-c".to_vec(), vec![b'#', 0xc3]],
        env: BTreeMap::from([(b"v".to_vec(), value.clone()), (vec![0xe9], b"k".to_vec())]),
    };
    let request = Request::BuildDerivation {
        drv_path: drv_path_of(&drv),
        drv: drv.clone(),
        mode: BuildMode::Normal,
    };
    for v in VERSIONS {
        assert_eq!(request_round_trip(&request, v), request);
        assert_eq!(derivation_round_trip_in(&drv, v, &StoreDir::default()), drv);
    }
    let encoded = encode(&drv, NIX_2_8, &StoreDir::default());
    let mut field = (value.len() as u64).to_le_bytes().to_vec();
    field.extend(&value);
    assert!(
        encoded.windows(field.len()).any(|w| w == field),
        "the value is not on the wire as it is"
    );
}
