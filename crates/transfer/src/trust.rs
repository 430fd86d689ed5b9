//! Whether a path another store offers may be added to this one: as Nix trusts paths
//! (`ValidPathInfo::checkSignatures`, `isContentAddressed`, `require-sigs`), a path is added
//! only with a signature by a key this store trusts, or with a content address that gives
//! its path (the daemon then checks the content against it as it adds the path).
//!
//! The trusted keys are the store's Nix configuration's (`trusted-public-keys`, and the public
//! halves of `secret-key-files`, as Nix's `getPublicKeys`), keys given by whoever runs the
//! store (flags), and keys the coordinator announces in the dataspace (`<trusted-keys …>`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LockResult, Mutex, MutexGuard};

use nixspace_nix_formats::signature::{
    fingerprint, is_content_addressed, is_realisation_signed, valid_signers, PublicKey, PublicKeys,
    SecretKey,
};
use nixspace_nix_formats::store_path::{ContentAddress, StoreDir};
use nixspace_nix_protocol::ValidPathInfo;
use nixspace_nix_tools::nix_conf::NixConf;
use nixspace_protocol::on_retraction;
use syndicate::actor::{Activation, Cap};
use syndicate::enclose;
use syndicate_macros::during;

/// At most this many keys are taken from one `<trusted-keys …>` record.
pub const MAX_ANNOUNCED_KEYS: usize = 256;

/// Why a path offered by another store is not added here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Untrusted {
    /// No signature by a trusted key, and no content address.
    #[error("not signed by a trusted key (trusted: {}; {sigs} signature(s) present)", names(.trusted))]
    NotSigned {
        /// The names of the keys this store trusts.
        trusted: Vec<String>,
        /// How many signatures the path carried.
        sigs: usize,
    },
    /// No signature by a trusted key, and a content address that does not give the path.
    #[error(
        "not signed by a trusted key (trusted: {}; {sigs} signature(s) present), \
         and its content address {ca:?} does not give its path",
        names(.trusted)
    )]
    WrongContentAddress {
        /// The names of the keys this store trusts.
        trusted: Vec<String>,
        /// How many signatures the path carried.
        sigs: usize,
        /// The claimed content address.
        ca: String,
    },
}

/// `k1, k2`, or `none`.
fn names(trusted: &[String]) -> String {
    if trusted.is_empty() {
        "none".to_owned()
    } else {
        trusted.join(", ")
    }
}

/// Why a path may be added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Trusted {
    /// Signed by these trusted keys: the daemon is told not to check signatures again (it
    /// may not know the keys announced in the dataspace).
    Signed(Vec<String>),
    /// Its content address gives its path: the daemon checks signatures itself, which for
    /// such a path means checking its content against the address.
    ContentAddressed,
    /// The store's owner set `require-sigs = false`: every path is trusted, as in Nix.
    NotRequired,
}

impl Trusted {
    /// Whether the daemon adding the path should skip its own signature check.
    pub(crate) fn dont_check_sigs(&self) -> bool {
        !matches!(self, Trusted::ContentAddressed)
    }
}

/// A [`TrustPolicy`] shared by a store's tasks, following the keys the coordinator announces
/// in the dataspace.
pub(crate) struct SharedTrust {
    policy: Mutex<TrustPolicy>,
    /// Numbers the `<trusted-keys …>` records seen, to forget each when it is withdrawn.
    announcements: AtomicU64,
}

impl SharedTrust {
    /// Sharing `policy`.
    pub(crate) fn new(policy: TrustPolicy) -> Arc<SharedTrust> {
        Arc::new(SharedTrust {
            policy: Mutex::new(policy),
            announcements: AtomicU64::new(0),
        })
    }

    /// The policy, locked.
    pub(crate) fn lock(&self) -> LockResult<MutexGuard<'_, TrustPolicy>> {
        self.policy.lock()
    }

    /// From the current facet, trust the keys `<trusted-keys …>` records on `ds` announce
    /// while they are asserted (only the coordinator may assert them: the roles' caveats
    /// refuse them).
    pub(crate) fn follow_announcements(self: &Arc<Self>, t: &mut Activation, ds: &Arc<Cap>) {
        let trust = self;
        enclose!((trust) during!(t, ds, <trusted-keys $keys: Vec<String>>, |t: &mut Activation| {
            let id = trust.announcements.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut policy) = trust.lock() {
                policy.announce(id, &keys);
            }
            tracing::debug!(keys = keys.len(), "trusting the keys the coordinator announced");
            on_retraction(t, enclose!((trust) move |_t| {
                if let Ok(mut policy) = trust.lock() {
                    policy.withdraw(id);
                }
                Ok(())
            }));
            Ok(())
        }));
    }
}

/// The keys a store trusts, and whether it requires signatures at all.
#[derive(Debug, Clone)]
pub(crate) struct TrustPolicy {
    /// From the store's Nix configuration and its owner's flags.
    configured: PublicKeys,
    /// Announced in the dataspace, by assertion.
    announced: HashMap<u64, Vec<PublicKey>>,
    require_sigs: bool,
}

impl TrustPolicy {
    /// The keys of the local Nix configuration (`trusted-public-keys`, the public halves of
    /// `secret-key-files`) and its `require-sigs`; a key that does not parse is skipped with a
    /// warning, as is a configuration that cannot be read (then no key is trusted).
    pub(crate) fn from_nix_conf() -> TrustPolicy {
        let mut policy = TrustPolicy {
            configured: PublicKeys::new(),
            announced: HashMap::new(),
            require_sigs: true,
        };
        let conf = match NixConf::load() {
            Ok(conf) => conf,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the Nix configuration: no key is trusted for fetched paths");
                return policy;
            }
        };
        policy.require_sigs = conf.value("require-sigs", "true") != "false";
        for text in conf.list("trusted-public-keys", &[]) {
            match PublicKey::parse(&text) {
                Ok(key) => {
                    policy.configured.insert(key);
                }
                Err(e) => tracing::warn!(key = %text, error = %e, "ignoring a trusted public key"),
            }
        }
        for file in conf.list("secret-key-files", &[]) {
            match std::fs::read_to_string(&file)
                .map_err(|e| e.to_string())
                .and_then(|text| SecretKey::parse(&text).map_err(|e| e.to_string()))
            {
                Ok(secret) => {
                    policy.configured.insert(secret.to_public());
                }
                Err(e) => tracing::warn!(%file, error = %e, "ignoring a secret key file"),
            }
        }
        policy
    }

    /// Require signatures (or a content address) whatever the configuration says.
    pub(crate) fn requiring_signatures(mut self) -> TrustPolicy {
        self.require_sigs = true;
        self
    }

    /// Trust `keys` too.
    pub(crate) fn add(&mut self, keys: &PublicKeys) {
        for key in keys.iter() {
            self.configured.insert(key.clone());
        }
    }

    /// Trust the keys of an announcement (`id` names it, to withdraw it), at most
    /// [`MAX_ANNOUNCED_KEYS`]; those that do not parse are skipped with a warning.
    pub(crate) fn announce(&mut self, id: u64, texts: &[String]) {
        let keys = texts
            .iter()
            .take(MAX_ANNOUNCED_KEYS)
            .filter_map(|text| match PublicKey::parse(text) {
                Ok(key) => Some(key),
                Err(e) => {
                    tracing::warn!(key = %text, error = %e, "ignoring an announced trusted key");
                    None
                }
            })
            .collect();
        self.announced.insert(id, keys);
    }

    /// Stop trusting the keys of announcement `id` (unless trusted otherwise).
    pub(crate) fn withdraw(&mut self, id: u64) {
        self.announced.remove(&id);
    }

    /// Every key trusted now.
    pub(crate) fn keys(&self) -> PublicKeys {
        let mut keys = self.configured.clone();
        for key in self.announced.values().flatten() {
            keys.insert(key.clone());
        }
        keys
    }

    /// Whether a realisation of output `id` as `out_path` (a store path's base name, as Nix
    /// signs it) with `signatures` may be believed here: one of them by a trusted key, or
    /// signatures not required (Nix's `require-sigs = false`). A realisation has no content
    /// address to stand in for a signature: nothing else ties the output to the path.
    pub(crate) fn trusts_realisation(
        &self,
        id: &str,
        out_path: &str,
        signatures: &[String],
    ) -> bool {
        if !self.require_sigs {
            return true;
        }
        is_realisation_signed(&self.keys(), id, out_path, &BTreeMap::new(), signatures)
    }

    /// Whether `info` may be added to the store of `store_dir`, and on what grounds.
    pub(crate) fn check(
        &self,
        store_dir: &StoreDir,
        info: &ValidPathInfo,
    ) -> Result<Trusted, Untrusted> {
        if !self.require_sigs {
            return Ok(Trusted::NotRequired);
        }
        let keys = self.keys();
        let sigs = info.info.sigs.len();
        let signed = fingerprint(
            store_dir,
            &info.path,
            &info.info.nar_hash,
            info.info.nar_size,
            &info.info.references,
        )
        .and_then(|fp| valid_signers(store_dir, &info.path, &fp, &info.info.sigs, &keys));
        if let Ok(signers) = signed {
            return Ok(Trusted::Signed(signers));
        }
        let trusted = keys.iter().map(|k| k.name().to_owned()).collect();
        let Some(ca) = &info.info.ca else {
            return Err(Untrusted::NotSigned { trusted, sigs });
        };
        let gives_path = ContentAddress::parse(ca).is_ok_and(|parsed| {
            is_content_addressed(store_dir, &info.path, &parsed, &info.info.references)
        });
        if gives_path {
            Ok(Trusted::ContentAddressed)
        } else {
            Err(Untrusted::WrongContentAddress {
                trusted,
                sigs,
                ca: ca.clone(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixspace_nix_formats::hash::Hash;
    use nixspace_nix_protocol::PathInfo;

    fn policy(keys: &[&PublicKey]) -> TrustPolicy {
        TrustPolicy {
            configured: keys.iter().map(|k| (*k).clone()).collect(),
            announced: HashMap::new(),
            require_sigs: true,
        }
    }

    #[test]
    fn a_realisation_is_believed_only_with_a_trusted_signature() {
        let secret = SecretKey::from_seed("k1", &[1; 32]).unwrap();
        let other = SecretKey::from_seed("k2", &[2; 32]).unwrap();
        let id = "sha256:5662b097423a35d15c8b79c9ec29ae9ee73f665bf1bc919a507c6ffaa046481a!out";
        let out = "jnpmh6wd5kpqhhdwy1d8jzq11yzbysk0-ca";
        let fingerprint =
            nixspace_nix_formats::signature::realisation_fingerprint(id, out, &BTreeMap::new());
        let signed = vec![nixspace_nix_formats::signature::sign(&secret, &fingerprint)];
        let trusting = policy(&[&secret.to_public()]);
        assert!(trusting.trusts_realisation(id, out, &signed));
        // The same signature for another path, or by an untrusted key, is not believed.
        assert!(!trusting.trusts_realisation(id, "00000000000000000000000000000000-ca", &signed));
        assert!(!policy(&[&other.to_public()]).trusts_realisation(id, out, &signed));
        assert!(!trusting.trusts_realisation(id, out, &[]));
        let mut unrequired = policy(&[]);
        unrequired.require_sigs = false;
        assert!(unrequired.trusts_realisation(id, out, &[]));
    }

    fn info() -> ValidPathInfo {
        let dir = StoreDir::default();
        ValidPathInfo {
            path: dir
                .parse("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello")
                .unwrap(),
            info: PathInfo {
                deriver: None,
                nar_hash: Hash::sha256(b"nar"),
                references: Default::default(),
                registration_time: 0,
                nar_size: 120,
                ultimate: false,
                sigs: Default::default(),
                ca: None,
            },
        }
    }

    fn signed_by(secret: &SecretKey) -> ValidPathInfo {
        let dir = StoreDir::default();
        let mut info = info();
        let fp = fingerprint(
            &dir,
            &info.path,
            &info.info.nar_hash,
            info.info.nar_size,
            &info.info.references,
        )
        .unwrap();
        info.info
            .sigs
            .insert(secret.sign(fp.as_bytes()).to_string());
        info
    }

    #[test]
    fn only_a_signature_by_a_trusted_key_of_this_path_info_is_trusted() {
        let dir = StoreDir::default();
        let good = SecretKey::from_seed("good-1", &[1; 32]).unwrap();
        let other = SecretKey::from_seed("other-1", &[2; 32]).unwrap();
        let trusting = policy(&[&good.to_public()]);
        assert_eq!(
            trusting.check(&dir, &signed_by(&good)),
            Ok(Trusted::Signed(vec!["good-1".into()]))
        );
        let refused = trusting.check(&dir, &signed_by(&other)).unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("not signed by a trusted key (trusted: good-1; 1 signature(s)"),
            "{refused}"
        );
        // The signature of another path-info does not carry over.
        let mut changed = signed_by(&good);
        changed.info.nar_size += 1;
        assert!(trusting.check(&dir, &changed).is_err());
        // An announced key is trusted until it is withdrawn.
        let mut announced = policy(&[]);
        announced.announce(7, &[other.to_public().to_string()]);
        assert!(announced.check(&dir, &signed_by(&other)).is_ok());
        announced.withdraw(7);
        assert!(announced.check(&dir, &signed_by(&other)).is_err());
    }

    #[test]
    fn a_content_address_is_trusted_only_if_it_gives_the_path() {
        let dir = StoreDir::default();
        let ca = ContentAddress::parse(
            "fixed:r:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s",
        )
        .unwrap();
        let path = dir
            .make_path_from_ca("hello", &ca, &Default::default(), false)
            .unwrap();
        let mut info = info();
        info.path = path;
        info.info.ca = Some(ca.to_string());
        assert_eq!(
            policy(&[]).check(&dir, &info),
            Ok(Trusted::ContentAddressed)
        );
        info.info.ca =
            Some("fixed:r:sha256:0000000000000000000000000000000000000000000000000000".to_owned());
        assert!(matches!(
            policy(&[]).check(&dir, &info),
            Err(Untrusted::WrongContentAddress { .. })
        ));
    }
}
