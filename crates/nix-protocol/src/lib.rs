//! The Nix worker (daemon) protocol, as spoken over `nix-daemon`'s unix socket or
//! `nix-daemon --stdio`: the wire codec, the handshake, the stderr (logging) frames, the
//! request and reply types, and a small client.
//!
//! Layering, bottom up:
//! - [`version`]: [`ProtocolVersion`] and every version threshold the crate consults.
//! - [`wire`]: [`NixReader`]/[`NixWriter`], which carry the negotiated version, the size
//!   limits and the store directory, and read/write the primitive encodings (u64, bool, padded
//!   bytes, lists, maps) and store paths.
//! - the protocol's values, one module per subject: [`path_info`], [`build_mode`],
//!   [`build_result`], [`realisation`], [`derived_path`], [`derivation`] (the
//!   `BuildDerivation` derivation, which is `nixspace-nix-formats`' model) and
//!   [`client_settings`];
//! - [`stderr`], [`ops`], [`framed`], [`handshake`]: frames, requests, framed streams and the
//!   connection's opening.
//!
//!   Each has read and write implementations so both the client and the server side can use
//!   them.
//! - [`client`]: [`DaemonClient`], a client over any `AsyncRead`/`AsyncWrite` pair.
//! - [`serve`]: the serve protocol of `nix-store --serve` (Nix's legacy `ssh://` store), which
//!   shares the encodings of [`wire`] and some values above (no log frames: replies follow
//!   each command at once).
//!
//! Store paths and hashes are `nixspace-nix-formats`' types:
//! [`StorePath`](nixspace_nix_formats::store_path::StorePath) (a base name, printed and parsed
//! on the wire with the reader's or writer's
//! [`StoreDir`](nixspace_nix_formats::store_path::StoreDir)) and
//! [`Hash`](nixspace_nix_formats::hash::Hash).
//!
//! The crate depends on tokio's I/O traits only; it knows nothing of syndicate.

pub mod build_mode;
pub mod build_result;
pub mod client;
pub mod client_settings;
pub mod derivation;
pub mod derived_path;
pub mod framed;
pub mod handshake;
pub mod nar_copy;
pub mod ops;
pub mod path_info;
pub mod realisation;
pub mod serve;
pub mod stderr;
pub mod version;
pub mod wire;

pub use build_mode::BuildMode;
pub use build_result::{BuildResult, BuildStatus};
pub use client::{ClientConfig, ClientError, DaemonClient};
pub use client_settings::ClientSettings;
pub use derivation::read_basic_derivation;
pub use derived_path::{DerivedPath, OutputSpec};
pub use handshake::{HandshakeError, HandshakeInfo, TrustedFlag};
pub use nixspace_nix_formats::derivation::{BasicDerivation, DerivationOutput};
pub use ops::{Opcode, Request, UnknownOpcode};
pub use path_info::{PathInfo, ValidPathInfo};
pub use realisation::Realisation;
pub use stderr::{DaemonError, LogEvent, LogSink, StderrFrame};
pub use version::{ProtocolVersion, VersionError};
pub use wire::{Limits, NixDeserialize, NixReader, NixSerialize, NixWriter, WireError};
