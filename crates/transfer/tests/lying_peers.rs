//! A store fetching from a peer that lies about references, against the real Nix: the peer
//! (an in-process [`PathSource`] served on an in-process dataspace) claims path-infos whose
//! references form cycles or very long chains, and the fetching store must fail promptly with
//! the reason instead of waiting on itself or recursing once per reference. Self-references,
//! which Nix allows, still fetch (the positive control).
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use nixspace_nix_formats::hash::Hash;
use nixspace_nix_formats::nar::NarWriter;
use nixspace_nix_formats::store_path::{StoreDir, StorePath};
use nixspace_nix_tools::{DaemonPool, PoolConfig};
use nixspace_protocol::store;
use nixspace_test_support::unique;
use nixspace_transfer::nar_stream::NarSender;
use nixspace_transfer::source::{serve, BoxFuture, PathSource, Role, SourceError};
use nixspace_transfer::{ClosureLimits, CopyError, FetchError, StoreNode, Timeouts};
use syndicate::actor::Actor;
use syndicate::dataspace::Dataspace;
use tokio::io::AsyncWriteExt;

/// Longer than any of these fetches takes when it does not hang.
const PROMPTLY: Duration = Duration::from_secs(20);

/// Points Nix (the pool's private daemon inherits the environment) at a private config, once.
fn setup() {
    static CONF: OnceLock<tempfile::TempDir> = OnceLock::new();
    CONF.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        nixspace_test_support::write_nix_conf(dir.path()).unwrap();
        std::env::set_var("NIX_CONF_DIR", dir.path());
        std::env::set_var("NIX_REMOTE", "local");
        dir
    });
}

/// What the lying peer claims about one path, and the NAR it sends for it.
struct Claim {
    info: store::PathInfo,
    nar: Vec<u8>,
}

/// A peer claiming whatever it was given, for paths no store has.
#[derive(Default)]
struct Liar {
    claims: HashMap<String, Claim>,
}

impl Liar {
    /// Claim `path` (printed) with `references`; its NAR is one file holding `path` itself
    /// (so a self-reference is a real one).
    fn claim(&mut self, path: &str, references: &[&str]) {
        let contents = path.as_bytes();
        let mut writer = NarWriter::new(Vec::new()).unwrap();
        writer
            .regular(false, contents.len() as u64, &mut &contents[..])
            .unwrap();
        let (nar, _) = writer.finish().unwrap();
        let info = store::PathInfo {
            nar_hash: Hash::sha256(&nar).to_prefixed_base16(),
            nar_size: (nar.len() as i64).into(),
            references: references.iter().map(|r| (*r).to_owned()).collect(),
            deriver: String::new(),
            ca: String::new(),
        };
        self.claims.insert(path.to_owned(), Claim { info, nar });
    }
}

impl PathSource for Liar {
    fn path_info<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Option<store::PathInfo>> {
        Box::pin(async move { self.claims.get(path).map(|c| c.info.clone()) })
    }

    fn write_nar<'a>(
        &'a self,
        path: &'a str,
        out: &'a mut NarSender,
    ) -> BoxFuture<'a, Result<u64, SourceError>> {
        Box::pin(async move {
            let nar = &self.claims[path].nar;
            out.write_all(nar).await.map_err(SourceError::Stream)?;
            Ok(nar.len() as u64)
        })
    }
}

/// `count` fresh store paths that no store has (`/nix/store/<hash>-<label>-<i>`).
fn fresh_paths(label: &str, count: usize) -> Vec<String> {
    let tag = unique(label);
    (0..count)
        .map(|i| {
            let digest = Hash::sha256(format!("{tag}-{i}"));
            let path = StorePath::new(
                digest.as_bytes()[..20].try_into().unwrap(),
                &format!("{label}-{i}"),
            )
            .unwrap();
            StoreDir::default().print(&path)
        })
        .collect()
}

/// A store node named `victim` on the local store, attached to an in-process dataspace where
/// `liar` serves its claims as the store `liar`.
async fn victim_of(liar: Liar, node: StoreNode) -> StoreNode {
    setup();
    let (tx, rx) = tokio::sync::oneshot::channel();
    Actor::top(None, move |t| {
        let ds = Dataspace::new(t, None);
        let _keep = t.prevent_inert_check();
        serve(
            t,
            &ds,
            "liar",
            Arc::new(liar),
            Role::Peer,
            Duration::from_secs(5),
        );
        let _ = tx.send(ds);
        Ok(())
    });
    let ds = rx.await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let attached = node.clone();
    Actor::top(None, move |t| {
        let _keep = t.prevent_inert_check();
        attached.attach(t, ds);
        let _ = tx.send(());
        Ok(())
    });
    rx.await.unwrap();
    node
}

/// A store node on a fresh pool to the local store, waiting `want` for answers.
fn node(want: Duration) -> StoreNode {
    node_within(want, ClosureLimits::default())
}

/// Like [`node`], taking at most `limits` of a claimed closure.
fn node_within(want: Duration, limits: ClosureLimits) -> StoreNode {
    setup();
    StoreNode::with_limits(
        "victim",
        DaemonPool::new(PoolConfig::new(2)),
        Timeouts {
            want,
            stream_idle: Duration::from_secs(5),
        },
        limits,
    )
}

/// `ensure(paths)`, failing the test if it has not finished within [`PROMPTLY`].
async fn ensure_promptly(node: &StoreNode, paths: &[String]) -> Result<(), FetchError> {
    tokio::time::timeout(PROMPTLY, node.ensure(paths))
        .await
        .unwrap_or_else(|_| panic!("fetching {paths:?} still waits after {PROMPTLY:?}"))
}

/// The reasons a failed fetch gives, each store's and its references', innermost last.
fn copy_errors(error: &FetchError) -> Vec<&CopyError> {
    let mut found = Vec::new();
    let mut next = Some(error);
    while let Some(FetchError::Failed { reasons, .. }) = next {
        next = None;
        for (_, reason) in reasons {
            found.push(reason);
            if let CopyError::References(inner) = reason {
                next = Some(inner);
            }
        }
    }
    found
}

/// Whether `error` says the claimed references form a cycle.
fn is_cycle(error: &FetchError) -> bool {
    copy_errors(error)
        .iter()
        .any(|e| matches!(e, CopyError::ReferenceCycle(_)))
}

/// Remove `paths` from the local store again (best effort: the store is shared).
fn delete(paths: &[String]) {
    let _ = Command::new("nix-store")
        .arg("--delete")
        .args(paths)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimed_two_cycle_fails_promptly_with_the_reason() {
    let p = fresh_paths("two-cycle", 2);
    let mut liar = Liar::default();
    liar.claim(&p[0], &[&p[1]]);
    liar.claim(&p[1], &[&p[0]]);
    let node = victim_of(liar, node(Duration::from_secs(30))).await;
    let error = ensure_promptly(&node, &p[..1]).await.unwrap_err();
    assert!(is_cycle(&error), "{error}");
    assert_eq!(node.missing(&p).await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimed_three_cycle_fails_promptly_with_the_reason() {
    let p = fresh_paths("three-cycle", 3);
    let mut liar = Liar::default();
    liar.claim(&p[0], &[&p[1]]);
    liar.claim(&p[1], &[&p[2]]);
    liar.claim(&p[2], &[&p[0]]);
    let node = victim_of(liar, node(Duration::from_secs(30))).await;
    let error = ensure_promptly(&node, &p[..1]).await.unwrap_err();
    assert!(is_cycle(&error), "{error}");
    assert_eq!(node.missing(&p).await.unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_fetches_each_holding_one_end_of_a_cycle_both_fail_promptly() {
    let p = fresh_paths("held-cycle", 2);
    let mut liar = Liar::default();
    liar.claim(&p[0], &[&p[1]]);
    liar.claim(&p[1], &[&p[0]]);
    let node = victim_of(liar, node(Duration::from_secs(30))).await;
    let (a, b) = tokio::join!(
        ensure_promptly(&node, &p[..1]),
        ensure_promptly(&node, &p[1..])
    );
    for error in [a.unwrap_err(), b.unwrap_err()] {
        assert!(is_cycle(&error), "{error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_references_still_fetch_in_dependency_order() {
    // p0 refers to itself and p1, p1 to p2, p2 to itself.
    let p = fresh_paths("self-ref", 3);
    let mut liar = Liar::default();
    liar.claim(&p[0], &[&p[0], &p[1]]);
    liar.claim(&p[1], &[&p[2]]);
    liar.claim(&p[2], &[&p[2]]);
    let node = victim_of(liar, node(Duration::from_secs(30))).await;
    let fetched = ensure_promptly(&node, &p[..1]).await;
    let missing = node.missing(&p).await.unwrap();
    delete(&p);
    fetched.unwrap();
    assert!(missing.is_empty(), "{missing:?}");
    assert_eq!(node.fetched().0, 3);
}

/// A chain of `length` claimed paths, each referring to the next.
fn claimed_chain(label: &str, length: usize) -> (Vec<String>, Liar) {
    let p = fresh_paths(label, length);
    let mut liar = Liar::default();
    for (i, path) in p.iter().enumerate() {
        let next: Vec<&str> = p.get(i + 1).map(String::as_str).into_iter().collect();
        liar.claim(path, &next);
    }
    (p, liar)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimed_chain_of_10000_references_fails_with_the_bound_without_overflowing() {
    // Before the worklist, this chain overflowed the stack (one nested fetch per reference).
    let (p, liar) = claimed_chain("long-chain", 10_000);
    let limits = ClosureLimits {
        paths: 9_000,
        ..ClosureLimits::default()
    };
    let node = victim_of(liar, node_within(Duration::from_secs(30), limits)).await;
    let error = tokio::time::timeout(Duration::from_secs(120), node.ensure(&p[..1]))
        .await
        .expect("the claimed chain is refused within 2 minutes")
        .unwrap_err();
    assert!(
        copy_errors(&error)
            .iter()
            .any(|e| matches!(e, CopyError::TooLarge(_))),
        "{error}"
    );
    // Nothing of it was added: the bound is found before any NAR moves.
    assert_eq!(node.fetched(), (0, 0));
    // The same store takes a chain within the bound (the positive control).
    let (short, liar) = claimed_chain("short-chain", 20);
    let node = victim_of(liar, node_within(Duration::from_secs(30), limits)).await;
    let fetched = ensure_promptly(&node, &short[..1]).await;
    let missing = node.missing(&short).await.unwrap();
    delete(&short);
    fetched.unwrap();
    assert!(missing.is_empty(), "{missing:?}");
}
