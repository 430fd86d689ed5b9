//! The Nix worker (daemon) protocol, as spoken over `nix-daemon`'s unix socket or
//! `nix-daemon --stdio`: the wire codec, the handshake, the stderr (logging) frames, the
//! request and reply types, and a small client.
//!
//! Layering, bottom up:
//! - [`version`]: [`ProtocolVersion`] and every version threshold the crate consults.
//! - [`wire`]: [`NixReader`]/[`NixWriter`], which carry the negotiated version, the size
//!   limits and the store directory, and read/write the primitive encodings (u64, bool, padded
//!   bytes, lists, maps) and store paths.
//! - [`types`], [`stderr`], [`ops`], [`framed`], [`handshake`]: the protocol's vocabulary,
//!   each with read and write implementations so both the client and the server side can use
//!   them.
//! - [`client`]: [`DaemonClient`], a client over any `AsyncRead`/`AsyncWrite` pair.
//!
//! Store paths and hashes are `nixspace-nix-formats`' types:
//! [`StorePath`](nixspace_nix_formats::store_path::StorePath) (a base name, printed and parsed
//! on the wire with the reader's or writer's
//! [`StoreDir`](nixspace_nix_formats::store_path::StoreDir)) and
//! [`Hash`](nixspace_nix_formats::hash::Hash).
//!
//! The crate depends on tokio's I/O traits only; it knows nothing of syndicate.

pub mod client;
pub mod framed;
pub mod handshake;
pub mod nar_copy;
pub mod ops;
pub mod stderr;
pub mod types;
pub mod version;
pub mod wire;

pub use client::{ClientConfig, ClientError, DaemonClient};
pub use handshake::{HandshakeError, HandshakeInfo, TrustedFlag};
pub use ops::{Opcode, Request, UnknownOpcode};
pub use stderr::{DaemonError, LogEvent, LogSink, StderrFrame};
pub use types::{
    BasicDerivation, BuildMode, BuildResult, BuildStatus, ClientSettings, DerivationOutput,
    DerivedPath, OutputSpec, PathInfo, Realisation, ValidPathInfo,
};
pub use version::{ProtocolVersion, VersionError};
pub use wire::{Limits, NixDeserialize, NixReader, NixSerialize, NixWriter, WireError};
