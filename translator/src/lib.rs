//! The nixspace translator: serves the Nix worker protocol on a unix socket (or to one client
//! on stdin and stdout, as `nix-daemon --stdio`) so that unmodified Nix clients
//! (`NIX_REMOTE=unix:///path nix-build …`) build on a nixspace dataspace.
//!
//! A request goes down these layers and never back up:
//! - [`server`]: the socket or stdin and stdout, admission ([`trust`]), the handshake and the
//!   op loop;
//! - [`backend`]: the [`DaemonBackend`] trait, one method per operation;
//! - [`builds`]: the translator's backend: build operations run a frontend build session
//!   (`nixspace-frontend`), whose report [`build_result`] puts in Nix's terms; queries the
//!   store's database can answer are answered from it;
//! - [`passthrough`]: every other operation relayed to the upstream store ([`upstream`]),
//!   shaped by [`relay`], granting untrusted clients what `nix-daemon` would;
//! - [`client`]: the client's streams and the connection's error type.
//!
//! [`serve`] serves the serve protocol (`nix-store --serve`, Nix's legacy `ssh://` store) on
//! stdin and stdout as a client of the same layers, through a connection in this process.

pub mod backend;
pub mod build_result;
pub mod builds;
pub mod client;
pub mod passthrough;
pub mod relay;
pub mod serve;
pub mod server;
pub mod service;
pub mod trust;
pub mod upstream;

pub use backend::DaemonBackend;
pub use server::{serve, Config};
pub use service::{serve_legacy_stdio, serve_stdio, TranslatorOptions, TranslatorService};
pub use trust::TrustConfig;
pub use upstream::UpstreamSpec;

/// A byte stream read from a peer (a client or the upstream), whatever carries it.
pub type BoxRead = Box<dyn tokio::io::AsyncRead + Send + Unpin>;
/// A byte stream written to a peer (a client or the upstream), whatever carries it.
pub type BoxWrite = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;

/// An error with its sources, `: `-separated, for logs.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
