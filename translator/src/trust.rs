//! Who may connect, and whom the translator trusts: decided like `nix-daemon` does.
//!
//! The settings come from the Nix configuration (`$NIX_CONF_DIR/nix.conf`, its includes, then
//! `NIX_CONFIG`), read by `nixspace-nix-tools`' [`NixConf`]:
//!
//! - `allowed-users` (default `*`): who may connect at all;
//! - `trusted-users` (default `root`): who acts with the daemon's full trust (and may connect
//!   even when not in `allowed-users`);
//! - `build-users-group` (default `nixbld` for root, empty otherwise): members of this group as
//!   their primary group (build processes) may never connect;
//! - `substituters` and `trusted-substituters`: the only substituters an untrusted client may
//!   choose.
//!
//! Entries are user names, `@group` names (the peer's primary group, or a group that lists the
//! user as a member) or `*`. The translator's upstream trusts the translator fully, so for an
//! untrusted client the translator itself withholds what `nix-daemon` would withhold
//! ([`TrustConfig::filter_overrides`] and the checks in [`crate::server`]).

use std::collections::{BTreeMap, BTreeSet};

use nixspace_nix_tools::nix_conf::{NixConf, NixConfError};

/// The trust settings read from the Nix configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustConfig {
    /// `allowed-users`.
    pub allowed_users: Vec<String>,
    /// `trusted-users`.
    pub trusted_users: Vec<String>,
    /// `build-users-group` (empty: none).
    pub build_users_group: String,
    /// `substituters` (with `extra-substituters`), as configured here; empty if not set.
    pub substituters: Vec<String>,
    /// `trusted-substituters`.
    pub trusted_substituters: Vec<String>,
}

impl Default for TrustConfig {
    /// Nix's defaults (the substituter lists are left empty: a client's choice of substituters
    /// is only honoured for untrusted clients when this configuration names them).
    fn default() -> Self {
        TrustConfig {
            allowed_users: vec!["*".to_owned()],
            trusted_users: vec!["root".to_owned()],
            build_users_group: if rustix::process::geteuid().is_root() {
                "nixbld".to_owned()
            } else {
                String::new()
            },
            substituters: Vec::new(),
            trusted_substituters: Vec::new(),
        }
    }
}

/// How much a connected client is trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// In `trusted-users`: acts with the upstream daemon's full trust.
    Trusted,
    /// Allowed, but not trusted.
    Untrusted,
}

/// A refused connection; the message is `nix-daemon`'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("user '{user}' is not allowed to connect to the Nix daemon")]
pub struct Refusal {
    /// The peer's user name (or uid).
    pub user: String,
}

/// The process on the other end of a unix connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its user id.
    pub uid: u32,
    /// Its (effective, primary) group id.
    pub gid: u32,
    /// Its process id, when the kernel tells.
    pub pid: Option<i32>,
    /// Its user name (the uid in decimal when the user is unknown).
    pub user: String,
    /// Its group name (the gid in decimal when the group is unknown).
    pub group: String,
}

impl Peer {
    /// The peer with these credentials, its names looked up in the system's user and group
    /// databases (this may block: call it off the async threads).
    pub fn lookup(uid: u32, gid: u32, pid: Option<i32>) -> Peer {
        Peer {
            uid,
            gid,
            pid,
            user: system::user_name(uid).unwrap_or_else(|| uid.to_string()),
            group: system::group_name(gid).unwrap_or_else(|| gid.to_string()),
        }
    }
}

/// Group membership, as `@group` entries need it.
pub trait Groups {
    /// The users a group lists as its members (empty for an unknown group).
    fn members(&self, group: &str) -> Vec<String>;
}

/// The system's group database (NSS).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemGroups;

impl Groups for SystemGroups {
    fn members(&self, group: &str) -> Vec<String> {
        system::group_members(group).unwrap_or_default()
    }
}

/// Whether `user` (primary group `group`) matches an entry of `list`.
fn matches_user(user: &str, group: &str, list: &[String], groups: &impl Groups) -> bool {
    list.iter().any(|entry| match entry.strip_prefix('@') {
        None => entry == "*" || entry == user,
        Some(g) => g == group || groups.members(g).iter().any(|m| m == user),
    })
}

/// Client settings an untrusted client may still set (as `nix-daemon` allows; clients send
/// the canonical names, the old aliases are accepted too).
const UNRESTRICTED_SETTINGS: &[&str] = &[
    "timeout",
    "build-timeout",
    "max-silent-time",
    "build-max-silent-time",
    "poll-interval",
    "connect-timeout",
];

/// Settings that name substituters: an untrusted client may pick among the trusted ones.
const SUBSTITUTER_SETTINGS: &[&str] = &[
    "substituters",
    "binary-caches",
    "extra-substituters",
    "extra-binary-caches",
];

impl TrustConfig {
    /// The trust settings of the Nix configuration (see [`NixConf::load`]), Nix's defaults
    /// where it sets none.
    pub fn load() -> Result<TrustConfig, NixConfError> {
        Ok(TrustConfig::default().with_conf(&NixConf::load()?))
    }

    /// These settings, changed by what `conf` sets (`extra-` settings append to them).
    pub fn with_conf(self, conf: &NixConf) -> TrustConfig {
        TrustConfig {
            allowed_users: conf.list("allowed-users", &self.allowed_users),
            trusted_users: conf.list("trusted-users", &self.trusted_users),
            build_users_group: conf.value("build-users-group", &self.build_users_group),
            substituters: conf.list("substituters", &self.substituters),
            trusted_substituters: conf.list("trusted-substituters", &self.trusted_substituters),
        }
    }

    /// Decide about a connecting peer, as `nix-daemon` does: trusted users are trusted;
    /// others must be allowed; members of the build users group are always refused.
    pub fn decide(&self, peer: &Peer, groups: &impl Groups) -> Result<Trust, Refusal> {
        let refuse = || Refusal {
            user: peer.user.clone(),
        };
        let trusted = matches_user(&peer.user, &peer.group, &self.trusted_users, groups);
        if !self.build_users_group.is_empty() && peer.group == self.build_users_group {
            return Err(refuse());
        }
        if trusted {
            Ok(Trust::Trusted)
        } else if matches_user(&peer.user, &peer.group, &self.allowed_users, groups) {
            Ok(Trust::Untrusted)
        } else {
            Err(refuse())
        }
    }

    /// The `SetOptions` overrides of an untrusted client that may reach the (fully trusting)
    /// upstream, and a warning for each one withheld, worded like `nix-daemon`'s.
    pub fn filter_overrides(
        &self,
        overrides: &BTreeMap<String, String>,
    ) -> (BTreeMap<String, String>, Vec<String>) {
        let mut kept = BTreeMap::new();
        let mut warnings = Vec::new();
        for (name, value) in overrides {
            let name = name.as_str();
            if matches!(
                name,
                "ssh-auth-sock" | "experimental-features" | "extra-experimental-features"
            ) {
                // Obsolete, or never taken from a client.
                continue;
            }
            if UNRESTRICTED_SETTINGS.contains(&name) || (name == "builders" && value.is_empty()) {
                kept.insert(name.to_owned(), value.clone());
            } else if SUBSTITUTER_SETTINGS.contains(&name) {
                let trusted: BTreeSet<&str> = self
                    .substituters
                    .iter()
                    .chain(&self.trusted_substituters)
                    .map(|s| s.trim_end_matches('/'))
                    .collect();
                let mut chosen = Vec::new();
                for s in value.split_whitespace() {
                    if trusted.contains(s.trim_end_matches('/')) {
                        chosen.push(s);
                    } else {
                        warnings.push(format!(
                            "ignoring untrusted substituter '{s}', you are not a trusted user"
                        ));
                    }
                }
                kept.insert(name.to_owned(), chosen.join(" "));
            } else {
                warnings.push(format!(
                    "ignoring the client-specified setting '{name}', because it is a restricted \
                     setting and you are not a trusted user"
                ));
            }
        }
        (kept, warnings)
    }
}

/// Lookups in the system's user and group databases (through the C library, so NSS sources
/// such as LDAP count as they do for `nix-daemon`).
mod system {
    use std::ffi::{CStr, CString};

    /// Call a reentrant `get*_r` function with a growing buffer; `Err(errno)` asks for
    /// another try when it is `ERANGE`.
    fn with_buffer<T>(mut call: impl FnMut(&mut [libc::c_char]) -> Result<T, i32>) -> Option<T> {
        let mut size = 1024usize;
        loop {
            let mut buf = vec![0 as libc::c_char; size];
            match call(&mut buf) {
                Ok(v) => return Some(v),
                Err(libc::ERANGE) if size < (1 << 22) => size *= 4,
                Err(_) => return None,
            }
        }
    }

    /// Owned text of a C string the C library returned.
    ///
    /// # Safety
    /// `p` must be null or point to a NUL-terminated string that lives for the call.
    unsafe fn text(p: *const libc::c_char) -> Option<String> {
        if p.is_null() {
            None
        } else {
            Some(CStr::from_ptr(p).to_string_lossy().into_owned())
        }
    }

    /// The name of user `uid`.
    pub fn user_name(uid: u32) -> Option<String> {
        with_buffer(|buf| {
            // SAFETY: `passwd` is plain data; the C library fills it, pointing into `buf`,
            // which outlives the reads below.
            let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
            let mut found: *mut libc::passwd = std::ptr::null_mut();
            // SAFETY: every pointer is valid for the call and `buf.len()` is its size.
            let rc =
                unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut found) };
            match rc {
                0 if found.is_null() => Ok(None),
                // SAFETY: on success `pw_name` is a NUL-terminated string inside `buf`.
                0 => Ok(unsafe { text(pwd.pw_name) }),
                e => Err(e),
            }
        })
        .flatten()
    }

    /// Look up a group by id or name and extract something from it.
    fn with_group<T>(by: Result<u32, &CStr>, extract: impl Fn(&libc::group) -> T) -> Option<T> {
        with_buffer(|buf| {
            // SAFETY: `group` is plain data; the C library fills it, pointing into `buf`.
            let mut grp: libc::group = unsafe { std::mem::zeroed() };
            let mut found: *mut libc::group = std::ptr::null_mut();
            // SAFETY: every pointer is valid for the call and `buf.len()` is its size.
            let rc = unsafe {
                match by {
                    Ok(gid) => {
                        libc::getgrgid_r(gid, &mut grp, buf.as_mut_ptr(), buf.len(), &mut found)
                    }
                    Err(name) => libc::getgrnam_r(
                        name.as_ptr(),
                        &mut grp,
                        buf.as_mut_ptr(),
                        buf.len(),
                        &mut found,
                    ),
                }
            };
            match rc {
                0 if found.is_null() => Ok(None),
                0 => Ok(Some(extract(&grp))),
                e => Err(e),
            }
        })
        .flatten()
    }

    /// The name of group `gid`.
    pub fn group_name(gid: u32) -> Option<String> {
        // SAFETY: `gr_name` is a NUL-terminated string inside the lookup's buffer.
        with_group(Ok(gid), |g| unsafe { text(g.gr_name) }).flatten()
    }

    /// The members a group lists.
    pub fn group_members(name: &str) -> Option<Vec<String>> {
        let name = CString::new(name).ok()?;
        with_group(Err(&name), |g| {
            let mut members = Vec::new();
            let mut p = g.gr_mem;
            // SAFETY: `gr_mem` is a null-terminated array of NUL-terminated strings inside the
            // lookup's buffer.
            unsafe {
                while !p.is_null() && !(*p).is_null() {
                    members.extend(text(*p));
                    p = p.add(1);
                }
            }
            members
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FakeGroups;
    impl Groups for FakeGroups {
        fn members(&self, group: &str) -> Vec<String> {
            match group {
                "wheel" => vec!["alice".to_owned()],
                _ => Vec::new(),
            }
        }
    }

    fn peer(user: &str, group: &str) -> Peer {
        Peer {
            uid: 1000,
            gid: 1000,
            pid: None,
            user: user.to_owned(),
            group: group.to_owned(),
        }
    }

    fn conf(text: &str) -> TrustConfig {
        let mut nix_conf = NixConf::default();
        nix_conf
            .apply_text(text, "test", std::path::Path::new("/nonexistent"))
            .unwrap();
        TrustConfig {
            build_users_group: "nixbld".into(),
            ..TrustConfig::default()
        }
        .with_conf(&nix_conf)
    }

    #[test]
    fn nix_defaults_allow_everyone_and_trust_root() {
        let c = conf("");
        assert_eq!(
            c.decide(&peer("root", "root"), &FakeGroups),
            Ok(Trust::Trusted)
        );
        assert_eq!(
            c.decide(&peer("bob", "users"), &FakeGroups),
            Ok(Trust::Untrusted)
        );
        // Build users never connect.
        assert_eq!(
            c.decide(&peer("nixbld1", "nixbld"), &FakeGroups)
                .unwrap_err()
                .to_string(),
            "user 'nixbld1' is not allowed to connect to the Nix daemon"
        );
    }

    #[test]
    fn users_groups_and_wildcards() {
        let c = conf(
            "# comment\nallowed-users = carol @wheel # trailing\n\ntrusted-users = @admins\n\
             extra-trusted-users = dave\nsandbox = false\n",
        );
        assert_eq!(c.allowed_users, ["carol", "@wheel"]);
        assert_eq!(c.trusted_users, ["@admins", "dave"]);
        let d = |u, g| c.decide(&peer(u, g), &FakeGroups);
        assert_eq!(d("carol", "users"), Ok(Trust::Untrusted));
        // Member of @wheel by the group's member list, or by primary group.
        assert_eq!(d("alice", "users"), Ok(Trust::Untrusted));
        assert_eq!(d("erin", "wheel"), Ok(Trust::Untrusted));
        // Trusted users may connect without being allowed.
        assert_eq!(d("dave", "users"), Ok(Trust::Trusted));
        assert_eq!(d("frank", "admins"), Ok(Trust::Trusted));
        assert!(d("bob", "users").is_err());
        // root is no longer trusted, nor allowed.
        assert_eq!(
            d("root", "root").unwrap_err(),
            Refusal {
                user: "root".into()
            }
        );
        let open = conf("allowed-users = *\ntrusted-users =\n");
        assert_eq!(
            open.decide(&peer("root", "root"), &FakeGroups),
            Ok(Trust::Untrusted)
        );
    }

    #[test]
    fn untrusted_overrides_are_filtered_like_nix_daemon() {
        let c = conf("substituters = http://a\ntrusted-substituters = http://b/\n");
        let overrides: BTreeMap<String, String> = [
            ("sandbox", "false"),
            ("build-timeout", "10"),
            ("max-silent-time", "5"),
            ("builders", ""),
            ("experimental-features", "nix-command"),
            ("substituters", "http://a/ http://b http://evil"),
            ("post-build-hook", "/tmp/x"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let (kept, warnings) = c.filter_overrides(&overrides);
        let kept: Vec<(&str, &str)> = kept.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            kept,
            [
                ("build-timeout", "10"),
                ("builders", ""),
                ("max-silent-time", "5"),
                ("substituters", "http://a/ http://b"),
            ]
        );
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        assert!(warnings[0].contains("'post-build-hook'"), "{warnings:?}");
        assert!(warnings[1].contains("'sandbox'"), "{warnings:?}");
        assert!(warnings[2].contains("'http://evil'"), "{warnings:?}");
    }

    #[test]
    fn the_system_databases_know_root() {
        let p = Peer::lookup(0, 0, None);
        assert_eq!(p.user, "root");
        assert_eq!(p.group, "root");
        let unknown = Peer::lookup(4_000_000_000, 4_000_000_000, None);
        assert_eq!(unknown.user, "4000000000");
        assert!(SystemGroups.members("no-such-group-here").is_empty());
    }
}
