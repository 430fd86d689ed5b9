//! The nixspace translator: serves the Nix worker protocol on a unix socket so that unmodified
//! Nix clients (`NIX_REMOTE=unix:///path nix-build …`) build on a nixspace dataspace.
//!
//! - [`server`]: the socket server; per connection a handshake, then an op loop.
//!   Store operations are proxied to an upstream `nix-daemon` ([`upstream`]), build operations
//!   become demands in the dataspace ([`dataspace`]).
//! - [`trust`]: who may connect and who is trusted (`allowed-users`, `trusted-users`).
//! - [`relay`]: the shapes of proxied operations' uploads and replies.
//! - [`realisation`]: the output realisations that build results carry.
//! - [`phase`]: debug-level timing of a frontend's phases.
//! - [`steps`]: closure → steps → demands, and the outcome observers, shared with
//!   `nixspace build`.

pub mod dataspace;
pub mod phase;
pub mod realisation;
pub mod relay;
pub mod resolve;
pub mod server;
pub mod steps;
pub mod store_db;
pub mod trust;
pub mod upstream;

pub use server::{serve, Config};
pub use trust::TrustConfig;
pub use upstream::UpstreamSpec;
