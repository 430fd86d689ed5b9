//! A store fetching from a peer that lies, against the real Nix: the peer (an in-process
//! [`PathSource`] served on an in-process dataspace) claims path-infos whose references form
//! cycles or very long chains, and the fetching store must fail promptly with the reason
//! instead of waiting on itself or recursing once per reference. Self-references, which Nix
//! allows, still fetch (the positive control). It also serves paths unsigned, signed by a key
//! the fetching store does not trust, or with a signature of another path-info, and
//! content-addressed paths whose content does not match: each is refused with the reason and
//! another holder's good copy is taken; a content-addressed path without signatures is
//! accepted, as Nix accepts it.
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use nixspace_nix_formats::hash::Hash;
use nixspace_nix_formats::nar::NarWriter;
use nixspace_nix_formats::signature::{fingerprint, PublicKeys, SecretKey};
use nixspace_nix_formats::store_path::{ContentAddress, StoreDir, StorePath};
use nixspace_nix_tools::{DaemonPool, PoolConfig};
use nixspace_protocol::store;
use nixspace_test_support::unique;
use nixspace_transfer::nar_stream::NarSender;
use nixspace_transfer::source::{serve, BoxFuture, PathSource, Role, SourceError};
use nixspace_transfer::{ClosureLimits, CopyError, FetchError, StoreNode, Timeouts, Untrusted};
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

/// The key the fetching store trusts (besides its Nix configuration's).
fn trusted_key() -> SecretKey {
    SecretKey::from_seed("lying-peers-trusted-1", &[7; 32]).unwrap()
}

/// A key nobody trusts.
fn untrusted_key() -> SecretKey {
    SecretKey::from_seed("lying-peers-other-1", &[9; 32]).unwrap()
}

/// The NAR of one regular file holding `contents`.
fn nar_of(contents: &[u8]) -> Vec<u8> {
    let mut writer = NarWriter::new(Vec::new()).unwrap();
    writer
        .regular(false, contents.len() as u64, &mut &contents[..])
        .unwrap();
    writer.finish().unwrap().0
}

/// `key`'s signature of `info` as the path-info of `path` (printed).
fn signature(key: &SecretKey, path: &str, info: &store::PathInfo) -> String {
    let dir = StoreDir::default();
    let references: Vec<StorePath> = info
        .references
        .iter()
        .map(|r| dir.parse(r).unwrap())
        .collect();
    let fp = fingerprint(
        &dir,
        &dir.parse(path).unwrap(),
        &Hash::parse_any(&info.nar_hash, None).unwrap(),
        u64::try_from(i64::try_from(&info.nar_size).unwrap()).unwrap(),
        &references,
    )
    .unwrap();
    key.sign(fp.as_bytes()).to_string()
}

/// What the lying peer claims about one path, and the NAR it sends for it.
struct Claim {
    info: store::PathInfo,
    nar: Vec<u8>,
}

/// A peer claiming whatever it was given, for paths no store has; it answers wants after
/// `delay` and counts the NARs it was asked for.
#[derive(Default)]
struct Liar {
    claims: HashMap<String, Claim>,
    delay: Duration,
    nars_sent: std::sync::atomic::AtomicUsize,
}

impl Liar {
    /// Claim `path` (printed) with `references`, signed by the trusted key; its NAR is one
    /// file holding `path` itself (so a self-reference is a real one).
    fn claim(&mut self, path: &str, references: &[&str]) {
        self.claim_signed(path, references, &[&trusted_key()]);
    }

    /// Like [`Liar::claim`], signed by `keys`.
    fn claim_signed(&mut self, path: &str, references: &[&str], keys: &[&SecretKey]) {
        let nar = nar_of(path.as_bytes());
        let mut info = store::PathInfo {
            nar_hash: Hash::sha256(&nar).to_prefixed_base16(),
            nar_size: (nar.len() as i64).into(),
            references: references.iter().map(|r| (*r).to_owned()).collect(),
            deriver: String::new(),
            ca: String::new(),
            signatures: Vec::new(),
        };
        info.signatures = keys.iter().map(|k| signature(k, path, &info)).collect();
        self.claims.insert(path.to_owned(), Claim { info, nar });
    }
}

impl PathSource for Liar {
    fn path_info<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Option<store::PathInfo>> {
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            self.claims.get(path).map(|c| c.info.clone())
        })
    }

    fn write_nar<'a>(
        &'a self,
        path: &'a str,
        out: &'a mut NarSender,
    ) -> BoxFuture<'a, Result<u64, SourceError>> {
        Box::pin(async move {
            self.nars_sent
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
    victim_of_all(vec![("liar", Arc::new(liar))], node).await
}

/// Like [`victim_of`], with each of `holders` serving its claims under its name.
async fn victim_of_all(holders: Vec<(&'static str, Arc<Liar>)>, node: StoreNode) -> StoreNode {
    setup();
    let (tx, rx) = tokio::sync::oneshot::channel();
    Actor::top(None, move |t| {
        let ds = Dataspace::new(t, None);
        let _keep = t.prevent_inert_check();
        for (name, holder) in holders {
            serve(t, &ds, name, holder, Role::Peer, Duration::from_secs(5));
        }
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
    let node = StoreNode::with_limits(
        "victim",
        DaemonPool::new(PoolConfig::new(2)),
        Timeouts {
            want,
            stream_idle: Duration::from_secs(5),
        },
        limits,
    );
    node.trust_keys(&PublicKeys::from_iter([trusted_key().to_public()]));
    node
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

/// The reasons `error` gives for refusing `holder`'s copy as untrusted.
fn untrusted_by<'a>(error: &'a FetchError, holder: &str) -> Vec<&'a Untrusted> {
    match error {
        FetchError::Failed { reasons, .. } => reasons
            .iter()
            .filter(|(h, _)| h == holder)
            .filter_map(|(_, reason)| match reason {
                CopyError::Untrusted(u) => Some(u),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// A liar serving `path` as `lie` makes it, and an honest holder serving it signed by the
/// trusted key (answering a little later, so that the liar is tried first): the liar's copy
/// alone is refused with the reason, nothing of it streamed; with the honest holder there
/// the path is fetched from it.
async fn refused_then_fetched_from_the_honest_holder(label: &str, lie: impl Fn(&mut Liar, &str)) {
    let p = fresh_paths(label, 1);
    let mut liar = Liar::default();
    lie(&mut liar, &p[0]);
    let liar = Arc::new(liar);
    let victim = victim_of_all(
        vec![("liar", Arc::clone(&liar))],
        node(Duration::from_secs(5)),
    )
    .await;
    let error = ensure_promptly(&victim, &p).await.unwrap_err();
    let refused = untrusted_by(&error, "liar");
    assert_eq!(refused.len(), 1, "{error}");
    assert!(
        error
            .to_string()
            .contains("not signed by a trusted key (trusted: lying-peers-trusted-1"),
        "{error}"
    );
    assert_eq!(victim.missing(&p).await.unwrap().len(), 1);
    assert_eq!(liar.nars_sent.load(std::sync::atomic::Ordering::Relaxed), 0);
    // The positive control: the same liar, and an honest holder.
    let mut honest = Liar {
        delay: Duration::from_millis(300),
        ..Liar::default()
    };
    honest.claim(&p[0], &[]);
    let victim = victim_of_all(
        vec![("liar", Arc::clone(&liar)), ("honest", Arc::new(honest))],
        node(Duration::from_secs(5)),
    )
    .await;
    let fetched = ensure_promptly(&victim, &p).await;
    let missing = victim.missing(&p).await.unwrap();
    delete(&p);
    fetched.unwrap();
    assert!(missing.is_empty(), "{missing:?}");
    assert_eq!(liar.nars_sent.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsigned_path_is_refused_and_a_signed_copy_taken_from_another_holder() {
    refused_then_fetched_from_the_honest_holder("unsigned", |liar, path| {
        liar.claim_signed(path, &[], &[]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_signed_by_an_untrusted_key_is_refused_and_a_signed_copy_taken_from_another_holder()
{
    refused_then_fetched_from_the_honest_holder("untrusted-key", |liar, path| {
        liar.claim_signed(path, &[], &[&untrusted_key()]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signature_of_another_path_info_is_refused_and_a_signed_copy_taken_from_another_holder() {
    refused_then_fetched_from_the_honest_holder("other-info", |liar, path| {
        // Signed by the trusted key, but over a NAR size the claim does not have.
        liar.claim(path, &[]);
        let claim = liar.claims.get_mut(path).unwrap();
        let mut signed = claim.info.clone();
        signed.nar_size = (i64::try_from(&signed.nar_size).unwrap() + 1).into();
        claim.info.signatures = vec![signature(&trusted_key(), path, &signed)];
    })
    .await;
}

/// A text-addressed path holding `contents`, claimed unsigned, with `served` as its NAR's
/// file.
fn claim_text_addressed(liar: &mut Liar, label: &str, contents: &[u8], served: &[u8]) -> String {
    let dir = StoreDir::default();
    let hash = Hash::sha256(contents);
    let name = unique(label);
    let path = dir.print(
        &dir.make_text_path(&name, &hash, &Default::default())
            .unwrap(),
    );
    let nar = nar_of(served);
    let info = store::PathInfo {
        nar_hash: Hash::sha256(&nar).to_prefixed_base16(),
        nar_size: (nar.len() as i64).into(),
        references: Vec::new(),
        deriver: String::new(),
        ca: ContentAddress::Text(hash).to_string(),
        signatures: Vec::new(),
    };
    liar.claims.insert(path.clone(), Claim { info, nar });
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_addressed_path_is_taken_unsigned_unless_its_content_does_not_match() {
    // Its content is not what its address says (the NAR hash is the served NAR's, so only the
    // content address can tell).
    let mut liar = Liar::default();
    let lie = claim_text_addressed(&mut liar, "ca-lie", b"what the address says", b"other");
    let victim = victim_of(liar, node(Duration::from_secs(5))).await;
    let error = ensure_promptly(&victim, std::slice::from_ref(&lie))
        .await
        .unwrap_err();
    let missing = victim.missing(std::slice::from_ref(&lie)).await.unwrap();
    delete(std::slice::from_ref(&lie));
    assert!(
        copy_errors(&error)
            .iter()
            .any(|e| matches!(e, CopyError::Store(_))),
        "{error}"
    );
    // Nix's own words (`LocalStore::addToStore`).
    assert!(error.to_string().contains("ca hash mismatch"), "{error}");
    assert_eq!(missing.len(), 1, "{error}");
    // The positive control: a content-addressed path whose content matches, unsigned.
    let mut liar = Liar::default();
    let good = claim_text_addressed(&mut liar, "ca-good", b"contents", b"contents");
    let victim = victim_of(liar, node(Duration::from_secs(5))).await;
    let fetched = ensure_promptly(&victim, std::slice::from_ref(&good)).await;
    let missing = victim.missing(std::slice::from_ref(&good)).await.unwrap();
    delete(std::slice::from_ref(&good));
    fetched.unwrap();
    assert!(missing.is_empty(), "{missing:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_address_that_does_not_give_the_path_is_refused() {
    let mut liar = Liar::default();
    let path = claim_text_addressed(&mut liar, "ca-wrong", b"contents", b"contents");
    liar.claims.get_mut(&path).unwrap().info.ca =
        ContentAddress::Text(Hash::sha256(b"something else")).to_string();
    let node = victim_of(liar, node(Duration::from_secs(5))).await;
    let error = ensure_promptly(&node, std::slice::from_ref(&path))
        .await
        .unwrap_err();
    assert!(
        untrusted_by(&error, "liar")
            .iter()
            .any(|u| matches!(u, Untrusted::WrongContentAddress { .. })),
        "{error}"
    );
}
