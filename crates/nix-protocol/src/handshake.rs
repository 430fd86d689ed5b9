//! The connection handshake, client and server side.
//!
//! The exchange (every number a u64; checked against Nix 2.8's `remote-store.cc` and
//! `daemon.cc` and against the split handshake of Nix ≥ 2.24):
//!
//! 1. client → `0x6e697863` (`WORKER_MAGIC_1`);
//! 2. daemon → `0x6478696f` (`WORKER_MAGIC_2`), then its protocol version;
//! 3. client → its protocol version; both sides now use `min(client, daemon)`;
//! 4. from 1.38: client → its feature set (string list), daemon → its feature set; the
//!    connection's features are the intersection;
//! 5. client → obsolete CPU affinity (from 1.14: 0, or 1 followed by a CPU number), then
//!    obsolete "reserve space" (from 1.11: 0);
//! 6. daemon → its Nix version string (from 1.33), then whether it trusts the client (from
//!    1.35: 0 unknown, 1 trusted, 2 not trusted);
//! 7. daemon → stderr frames ending in `STDERR_LAST` (or `STDERR_ERROR` to refuse).
//!
//! After that the client sends operations; the first is usually `SetOptions`.

use std::collections::BTreeSet;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::stderr::{self, DaemonError, LogSink};
use crate::version::{
    ProtocolVersion, VersionError, CPU_AFFINITY, DAEMON_NIX_VERSION, FEATURE_EXCHANGE,
    RESERVE_SPACE, TRUSTED_FLAG,
};
use crate::wire::{NixReader, NixWriter, WireError};

/// The client's greeting.
pub const WORKER_MAGIC_1: u64 = 0x6e69_7863;
/// The daemon's greeting.
pub const WORKER_MAGIC_2: u64 = 0x6478_696f;

/// Whether the daemon trusts the client (sent from 1.35).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrustedFlag {
    /// The client is a trusted user.
    Trusted,
    /// The client is not trusted.
    NotTrusted,
}

/// What the handshake established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeInfo {
    /// The negotiated version.
    pub version: ProtocolVersion,
    /// The peer's version as it announced it.
    pub peer_version: ProtocolVersion,
    /// The daemon's Nix version (from 1.33).
    pub daemon_nix_version: Option<String>,
    /// Whether the daemon trusts the client (from 1.35; `None` if unknown).
    pub trusted: Option<TrustedFlag>,
    /// The features both sides support (from 1.38).
    pub features: BTreeSet<String>,
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The peer's greeting was not the expected magic number.
    #[error("protocol mismatch: expected magic {expected:#x}, got {got:#x}")]
    BadMagic {
        /// The expected number.
        expected: u64,
        /// What arrived.
        got: u64,
    },
    /// No common version.
    #[error(transparent)]
    Version(#[from] VersionError),
    /// Reading or writing failed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The daemon refused the connection.
    #[error("the daemon refused the connection: {0}")]
    Refused(DaemonError),
}

/// Runs the client side of the handshake on a fresh connection, offering `ours` and
/// `features`. Log frames the daemon sends before `STDERR_LAST` go to `logs`. On success the
/// reader and writer carry the negotiated version.
pub async fn client_handshake<R, W, L>(
    r: &mut NixReader<R>,
    w: &mut NixWriter<W>,
    ours: ProtocolVersion,
    features: &BTreeSet<String>,
    logs: &mut L,
) -> Result<HandshakeInfo, HandshakeError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    L: LogSink + ?Sized,
{
    w.write_u64(WORKER_MAGIC_1, "client magic").await?;
    w.flush().await?;
    let magic = r.read_u64("daemon magic").await?;
    if magic != WORKER_MAGIC_2 {
        return Err(HandshakeError::BadMagic {
            expected: WORKER_MAGIC_2,
            got: magic,
        });
    }
    let peer_version = ProtocolVersion::from_wire(r.read_u64("daemon version").await?);
    let version = ProtocolVersion::negotiate(ours, peer_version)?;
    r.set_version(version);
    w.set_version(version);
    w.write_u64(ours.to_wire(), "client version").await?;

    let mut common = BTreeSet::new();
    if version >= FEATURE_EXCHANGE {
        w.write_strings(features, "client features").await?;
        w.flush().await?;
        let theirs = r.read_string_set("daemon features").await?;
        common = features.intersection(&theirs).cloned().collect();
    }
    if version >= CPU_AFFINITY {
        w.write_u64(0, "cpu affinity").await?;
    }
    if version >= RESERVE_SPACE {
        w.write_u64(0, "reserve space").await?;
    }
    w.flush().await?;

    let daemon_nix_version = if version >= DAEMON_NIX_VERSION {
        Some(r.read_string("daemon Nix version").await?)
    } else {
        None
    };
    let trusted = if version >= TRUSTED_FLAG {
        match r.read_u64("trusted flag").await? {
            0 => None,
            1 => Some(TrustedFlag::Trusted),
            2 => Some(TrustedFlag::NotTrusted),
            value => {
                return Err(WireError::InvalidValue {
                    what: "trusted flag",
                    value,
                }
                .into())
            }
        }
    } else {
        None
    };
    stderr::read_until_last(r, logs)
        .await?
        .map_err(HandshakeError::Refused)?;
    Ok(HandshakeInfo {
        version,
        peer_version,
        daemon_nix_version,
        trusted,
        features: common,
    })
}

/// What a server announces in the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerHello {
    /// The newest version the server speaks.
    pub version: ProtocolVersion,
    /// The Nix version string to report (sent from 1.33).
    pub nix_version: String,
    /// Whether the client is trusted (sent from 1.35).
    pub trusted: Option<TrustedFlag>,
    /// The features the server supports (exchanged from 1.38).
    pub features: BTreeSet<String>,
}

/// Runs the server side of the handshake, ending with `STDERR_LAST`. The returned
/// [`HandshakeInfo`] describes the client (`daemon_nix_version` and `trusted` echo the
/// hello). On success the reader and writer carry the negotiated version.
pub async fn server_handshake<R, W>(
    r: &mut NixReader<R>,
    w: &mut NixWriter<W>,
    hello: &ServerHello,
) -> Result<HandshakeInfo, HandshakeError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let info = server_greeting(r, w, hello).await?;
    stderr::write_last(w).await?;
    w.flush().await?;
    Ok(info)
}

/// Runs the server side of the handshake up to, not including, the final stderr frame, so
/// that the server can still refuse the client with an error frame
/// ([`stderr::send_error`]) instead of accepting it with `STDERR_LAST`.
pub async fn server_greeting<R, W>(
    r: &mut NixReader<R>,
    w: &mut NixWriter<W>,
    hello: &ServerHello,
) -> Result<HandshakeInfo, HandshakeError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let magic = r.read_u64("client magic").await?;
    if magic != WORKER_MAGIC_1 {
        return Err(HandshakeError::BadMagic {
            expected: WORKER_MAGIC_1,
            got: magic,
        });
    }
    w.write_u64(WORKER_MAGIC_2, "daemon magic").await?;
    w.write_u64(hello.version.to_wire(), "daemon version")
        .await?;
    w.flush().await?;
    let peer_version = ProtocolVersion::from_wire(r.read_u64("client version").await?);
    let version = ProtocolVersion::negotiate(hello.version, peer_version)?;
    r.set_version(version);
    w.set_version(version);

    let mut common = BTreeSet::new();
    if version >= FEATURE_EXCHANGE {
        let theirs = r.read_string_set("client features").await?;
        w.write_strings(&hello.features, "daemon features").await?;
        w.flush().await?;
        common = hello.features.intersection(&theirs).cloned().collect();
    }
    if version >= CPU_AFFINITY && r.read_u64("cpu affinity").await? != 0 {
        r.read_u64("cpu affinity cpu").await?;
    }
    if version >= RESERVE_SPACE {
        r.read_u64("reserve space").await?;
    }
    if version >= DAEMON_NIX_VERSION {
        w.write_str(&hello.nix_version, "daemon Nix version")
            .await?;
    }
    if version >= TRUSTED_FLAG {
        let flag = match hello.trusted {
            None => 0,
            Some(TrustedFlag::Trusted) => 1,
            Some(TrustedFlag::NotTrusted) => 2,
        };
        w.write_u64(flag, "trusted flag").await?;
    }
    Ok(HandshakeInfo {
        version,
        peer_version,
        daemon_nix_version: Some(hello.nix_version.clone())
            .filter(|_| version >= DAEMON_NIX_VERSION),
        trusted: hello.trusted.filter(|_| version >= TRUSTED_FLAG),
        features: common,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stderr::DiscardLogs;
    use crate::version::{MAX_SUPPORTED, MIN_SUPPORTED, NIX_2_8};

    async fn pair(
        client: ProtocolVersion,
        server: ProtocolVersion,
    ) -> (HandshakeInfo, HandshakeInfo) {
        let (c, s) = tokio::io::duplex(4096);
        let (cr, cw) = tokio::io::split(c);
        let (sr, sw) = tokio::io::split(s);
        let hello = ServerHello {
            version: server,
            nix_version: "2.8.0".into(),
            trusted: Some(TrustedFlag::Trusted),
            features: ["a".to_string(), "b".to_string()].into(),
        };
        let server = tokio::spawn(async move {
            let mut r = NixReader::new(sr, MIN_SUPPORTED);
            let mut w = NixWriter::new(sw, MIN_SUPPORTED);
            server_handshake(&mut r, &mut w, &hello).await.unwrap()
        });
        let mut r = NixReader::new(cr, MIN_SUPPORTED);
        let mut w = NixWriter::new(cw, MIN_SUPPORTED);
        let feats: BTreeSet<String> = ["b".to_string(), "c".to_string()].into();
        let ci = client_handshake(&mut r, &mut w, client, &feats, &mut DiscardLogs)
            .await
            .unwrap();
        assert_eq!(r.version(), ci.version);
        (ci, server.await.unwrap())
    }

    #[tokio::test]
    async fn versions_shape_the_exchange() {
        let (c, s) = pair(MAX_SUPPORTED, NIX_2_8).await;
        assert_eq!(c.version, NIX_2_8);
        assert_eq!(s.version, NIX_2_8);
        assert_eq!(c.daemon_nix_version.as_deref(), Some("2.8.0"));
        assert_eq!(c.trusted, None);
        assert!(c.features.is_empty());

        let (c, s) = pair(MAX_SUPPORTED, MAX_SUPPORTED).await;
        assert_eq!(c.trusted, Some(TrustedFlag::Trusted));
        assert_eq!(c.features, ["b".to_string()].into());
        assert_eq!(s.features, c.features);

        let (c, _) = pair(MIN_SUPPORTED, MAX_SUPPORTED).await;
        assert_eq!(c.version, MIN_SUPPORTED);
        assert_eq!(c.daemon_nix_version, None);
    }

    #[tokio::test]
    async fn a_server_can_refuse_after_the_greeting() {
        let (c, s) = tokio::io::duplex(4096);
        let (cr, cw) = tokio::io::split(c);
        let (sr, sw) = tokio::io::split(s);
        let hello = ServerHello {
            version: MAX_SUPPORTED,
            nix_version: "nixspace".into(),
            trusted: Some(TrustedFlag::NotTrusted),
            features: BTreeSet::new(),
        };
        let server = tokio::spawn(async move {
            let mut r = NixReader::new(sr, MIN_SUPPORTED);
            let mut w = NixWriter::new(sw, MIN_SUPPORTED);
            server_greeting(&mut r, &mut w, &hello).await.unwrap();
            stderr::send_error(&mut w, &DaemonError::new("go away"))
                .await
                .unwrap();
        });
        let mut r = NixReader::new(cr, MIN_SUPPORTED);
        let mut w = NixWriter::new(cw, MIN_SUPPORTED);
        let refused = client_handshake(
            &mut r,
            &mut w,
            MAX_SUPPORTED,
            &BTreeSet::new(),
            &mut DiscardLogs,
        )
        .await;
        server.await.unwrap();
        match refused {
            Err(HandshakeError::Refused(e)) => assert_eq!(e.message, "go away"),
            other => panic!("not refused: {other:?}"),
        }
    }

    #[tokio::test]
    async fn bad_magic_is_reported() {
        let mut r = NixReader::new(
            std::io::Cursor::new(0xdead_u64.to_le_bytes().to_vec()),
            NIX_2_8,
        );
        let mut w = NixWriter::new(Vec::new(), NIX_2_8);
        let hello = ServerHello {
            version: NIX_2_8,
            nix_version: String::new(),
            trusted: None,
            features: BTreeSet::new(),
        };
        assert!(matches!(
            server_handshake(&mut r, &mut w, &hello).await,
            Err(HandshakeError::BadMagic { got: 0xdead, .. })
        ));
    }
}
