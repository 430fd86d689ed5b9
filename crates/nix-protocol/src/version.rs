//! Worker-protocol versions: the [`ProtocolVersion`] value, the supported range, negotiation,
//! and a named constant for every version threshold this crate consults.
//!
//! A version travels on the wire as one u64: `major << 8 | minor`. Nix releases and the
//! protocol version they speak (read from each release's `PROTOCOL_VERSION`):
//!
//! | Nix | protocol |
//! |---|---|
//! | 2.0 | 1.20 |
//! | 2.1 – 2.3 | 1.21 |
//! | 2.4 – 2.6 | 1.32 |
//! | 2.7 | 1.33 |
//! | 2.8 – 2.14 (Debian's `nix-bin` is 2.8) | 1.34 |
//! | 2.15 – 2.19 | 1.35 |
//! | 2.20 – 2.23 | 1.37 |
//! | 2.24 – 2.31 | 1.38 |
//!
//! Minors 1.22 to 1.31 never shipped in a release on their own: they were development steps
//! between Nix 2.3 and 2.4, so their constants name Nix 2.4 as the first release.
//!
//! Version checks compare whole versions (`reader.version() >= STRUCTURED_ERRORS`), never the
//! minor number alone. Call sites never pass versions: the negotiated version lives inside
//! [`crate::NixReader`] and [`crate::NixWriter`].

use std::fmt;

/// A worker-protocol version. Ordered by major, then minor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProtocolVersion {
    major: u8,
    minor: u8,
}

impl ProtocolVersion {
    /// A version from its parts.
    pub const fn new(major: u8, minor: u8) -> Self {
        Self { major, minor }
    }

    /// The major number (always 1 for every Nix so far).
    pub const fn major(self) -> u8 {
        self.major
    }

    /// The minor number. Prefer comparing whole versions against the constants below.
    pub const fn minor(self) -> u8 {
        self.minor
    }

    /// Decodes the wire form `major << 8 | minor`; bits above the lower 16 are ignored, as Nix
    /// does.
    pub const fn from_wire(v: u64) -> Self {
        Self {
            major: ((v >> 8) & 0xff) as u8,
            minor: (v & 0xff) as u8,
        }
    }

    /// The wire form `major << 8 | minor`.
    pub const fn to_wire(self) -> u64 {
        ((self.major as u64) << 8) | self.minor as u64
    }

    /// Negotiates the version of a connection: `min(ours, theirs)`, after checking that the
    /// peer speaks major version 1 and that the result is at least [`MIN_SUPPORTED`].
    pub fn negotiate(ours: Self, theirs: Self) -> Result<Self, VersionError> {
        if theirs.major != ours.major {
            return Err(VersionError::WrongMajor { theirs, ours });
        }
        let v = ours.min(theirs);
        if v < MIN_SUPPORTED {
            return Err(VersionError::TooOld {
                theirs,
                min: MIN_SUPPORTED,
            });
        }
        Ok(v)
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Why two peers could not agree on a protocol version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    /// The peer speaks another major version.
    #[error("peer speaks protocol {theirs}, but nixspace speaks major version {}", ours.major())]
    WrongMajor {
        /// The peer's version.
        theirs: ProtocolVersion,
        /// Ours.
        ours: ProtocolVersion,
    },
    /// The peer is older than the oldest version we support.
    #[error(
        "peer speaks protocol {theirs}, older than the oldest supported version {min} (Nix 2.1)"
    )]
    TooOld {
        /// The peer's version.
        theirs: ProtocolVersion,
        /// The oldest version we accept.
        min: ProtocolVersion,
    },
}

/// The oldest version we negotiate (Nix 2.1).
pub const MIN_SUPPORTED: ProtocolVersion = ProtocolVersion::new(1, 21);
/// The newest version we negotiate (Nix 2.24).
pub const MAX_SUPPORTED: ProtocolVersion = ProtocolVersion::new(1, 38);
/// The version Debian's Nix 2.8 speaks.
pub const NIX_2_8: ProtocolVersion = ProtocolVersion::new(1, 34);

/// Nix 1.x (protocol 1.11): the client sends the obsolete "reserve space" flag in the handshake.
pub const RESERVE_SPACE: ProtocolVersion = ProtocolVersion::new(1, 11);
/// Nix 1.x (protocol 1.14): the client sends the obsolete CPU-affinity field in the handshake
/// (0, or 1 followed by a CPU number).
pub const CPU_AFFINITY: ProtocolVersion = ProtocolVersion::new(1, 14);
/// Nix 1.x (protocol 1.16): path infos carry `ultimate`, `sigs` and `ca`.
pub const PATH_INFO_ULTIMATE_SIGS_CA: ProtocolVersion = ProtocolVersion::new(1, 16);
/// Nix 1.x (protocol 1.17): `QueryPathInfo` answers with a validity flag instead of failing.
pub const QUERY_PATH_INFO_VALID_FLAG: ProtocolVersion = ProtocolVersion::new(1, 17);
/// Nix 2.1 (protocol 1.21): `AddToStoreNar` pulls its NAR through `STDERR_READ` requests.
pub const ADD_TO_STORE_NAR_TUNNEL: ProtocolVersion = ProtocolVersion::new(1, 21);
/// Nix 2.4 (protocol 1.23): `AddToStoreNar` sends its NAR as a framed stream.
pub const ADD_TO_STORE_NAR_FRAMED: ProtocolVersion = ProtocolVersion::new(1, 23);
/// Nix 2.4 (protocol 1.26): `STDERR_ERROR` carries a structured error instead of a message and
/// an exit status.
pub const STRUCTURED_ERRORS: ProtocolVersion = ProtocolVersion::new(1, 26);
/// Nix 2.4 (protocol 1.27): `QueryValidPaths` carries a "substitute" flag.
pub const QUERY_VALID_PATHS_SUBSTITUTE: ProtocolVersion = ProtocolVersion::new(1, 27);
/// Nix 2.4 (protocol 1.28): build results carry `builtOutputs` (realisations as JSON strings).
pub const BUILD_RESULT_BUILT_OUTPUTS: ProtocolVersion = ProtocolVersion::new(1, 28);
/// Nix 2.4 (protocol 1.29): build results carry `timesBuilt`, `isNonDeterministic`,
/// `startTime` and `stopTime`.
pub const BUILD_RESULT_TIMES: ProtocolVersion = ProtocolVersion::new(1, 29);
/// Nix 2.4 (protocol 1.30): derived paths travel as `drv!out1,out2` / `drv!*` strings instead
/// of the older `path!outs` form, and a bare `.drv` may be requested as an opaque path.
pub const DERIVED_PATH_STRINGS: ProtocolVersion = ProtocolVersion::new(1, 30);
/// Nix 2.0 (protocol 1.22): `QuerySubstitutablePathInfos` sends each path with its content
/// address (a map) instead of a plain set.
pub const SUBSTITUTABLE_INFOS_CA: ProtocolVersion = ProtocolVersion::new(1, 22);
/// Nix 2.4 (development step 1.25): `AddToStore` takes a name, a content-address method,
/// references and a framed dump.
pub const ADD_TO_STORE_FRAMED: ProtocolVersion = ProtocolVersion::new(1, 25);
/// Nix 2.4 (protocol 1.31): `RegisterDrvOutput` sends the whole realisation as JSON (before:
/// its id and path).
pub const REGISTER_DRV_OUTPUT_JSON: ProtocolVersion = ProtocolVersion::new(1, 31);
/// Nix 2.4 (protocol 1.32): the `AddMultipleToStore` operation exists.
pub const ADD_MULTIPLE_TO_STORE: ProtocolVersion = ProtocolVersion::new(1, 32);
/// Nix 2.4 (protocol 1.32): the `AddBuildLog` operation exists.
pub const ADD_BUILD_LOG: ProtocolVersion = ProtocolVersion::new(1, 32);
/// Nix 2.7 (protocol 1.33): the daemon sends its Nix version string in the handshake.
pub const DAEMON_NIX_VERSION: ProtocolVersion = ProtocolVersion::new(1, 33);
/// Nix 2.8 (protocol 1.34): the `BuildPathsWithResults` operation exists.
pub const BUILD_PATHS_WITH_RESULTS: ProtocolVersion = ProtocolVersion::new(1, 34);
/// Nix 2.15 (protocol 1.35): the daemon tells the client whether it trusts it.
pub const TRUSTED_FLAG: ProtocolVersion = ProtocolVersion::new(1, 35);
/// Nix 2.20 (protocol 1.37): build results carry optional `cpuUser` and `cpuSystem` times.
pub const BUILD_RESULT_CPU_TIMES: ProtocolVersion = ProtocolVersion::new(1, 37);
/// Nix 2.24 (protocol 1.38): both sides exchange feature-name sets right after the versions.
pub const FEATURE_EXCHANGE: ProtocolVersion = ProtocolVersion::new(1, 38);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_round_trips() {
        assert_eq!(NIX_2_8.to_wire(), 0x122);
        assert_eq!(ProtocolVersion::from_wire(0x122), NIX_2_8);
        assert_eq!(ProtocolVersion::from_wire(0x126).to_string(), "1.38");
    }

    #[test]
    fn ordering_is_by_major_then_minor() {
        assert!(ProtocolVersion::new(1, 38) > ProtocolVersion::new(1, 9));
        assert!(ProtocolVersion::new(2, 0) > ProtocolVersion::new(1, 255));
    }

    #[test]
    fn negotiation_takes_the_minimum() {
        assert_eq!(
            ProtocolVersion::negotiate(MAX_SUPPORTED, NIX_2_8),
            Ok(NIX_2_8)
        );
        assert_eq!(
            ProtocolVersion::negotiate(NIX_2_8, ProtocolVersion::new(1, 40)),
            Ok(NIX_2_8)
        );
    }

    #[test]
    fn negotiation_rejects_old_and_foreign_peers() {
        let err = ProtocolVersion::negotiate(MAX_SUPPORTED, ProtocolVersion::new(1, 20))
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some(
                "peer speaks protocol 1.20, older than the oldest supported version 1.21 (Nix 2.1)"
            )
        );
        assert!(matches!(
            ProtocolVersion::negotiate(MAX_SUPPORTED, ProtocolVersion::new(2, 0)),
            Err(VersionError::WrongMajor { .. })
        ));
    }
}
