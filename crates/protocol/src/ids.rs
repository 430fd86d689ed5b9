//! Names that travel in the vocabulary's string fields, typed on our side of the wire.
//!
//! A record's `drv` or `worker` field is a plain string in the schema; each participant turns
//! it into a [`DrvPath`] or a [`WorkerId`] once, where it reads the record, and back when it
//! writes one. Neither type checks what it holds: a derivation path from the dataspace is
//! whatever a participant asserted, and whoever reads a file by it must parse it as a store
//! path first. Both share their text among their clones: a step's path is kept in many of the
//! planner's tables at once.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(Arc<str>);

        impl $name {
            /// The name as the wire carries it.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> $name {
                $name(s.into())
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> $name {
                $name(s.into())
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0.as_ref().to_owned()
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                &*self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                &*self.0 == *other
            }
        }
    };
}

name_type!(
    /// The store path of a derivation (`/nix/store/…-name.drv`): the key of a build step.
    DrvPath
);

name_type!(
    /// A worker's id, as it announces itself in `<worker …>` and names itself in its records.
    WorkerId
);

impl DrvPath {
    /// The part after the hash (`hello-2.12.drv`), for short display: see [`short_name`].
    pub fn short_name(&self) -> &str {
        short_name(&self.0)
    }
}

/// The short, readable name of a store path: `/nix/store/<hash>-hello.drv` → `hello.drv`; the
/// whole base name if it has no 32-character hash part.
pub fn short_name(path: &str) -> &str {
    let base = path.rsplit('/').next().unwrap_or(path);
    match base.split_once('-') {
        Some((hash, name)) if hash.len() == 32 => name,
        _ => base,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn names_compare_and_look_up_as_their_strings() {
        let drv = DrvPath::from("/nix/store/7rjj86a15146cq4nsd2q3v4n7ks1hkgn-hello.drv");
        assert_eq!(drv, "/nix/store/7rjj86a15146cq4nsd2q3v4n7ks1hkgn-hello.drv");
        assert_eq!(drv.short_name(), "hello.drv");
        let mut by_drv = BTreeMap::new();
        by_drv.insert(drv.clone(), 1);
        assert_eq!(by_drv.get(drv.as_str()), Some(&1));
        assert_eq!(WorkerId::from("w1").to_string(), "w1");
        assert_eq!(DrvPath::from("plain").short_name(), "plain");
    }
}
