//! Hosting and joining a nixspace dataspace.
//!
//! A dataspace is reached through a gatekeeper: a client connects to one of
//! the host's transports (a unix socket, optionally TCP on loopback) and
//! resolves a sturdy ref (a capability) to get the dataspace itself. The host
//! writes one *route file* per role (`submit` for frontends, `worker` for
//! workers); holding the file is holding the capability, so route files are
//! created with mode 0600 in a 0700 directory.
//!
//! This crate knows nothing about Nix: it moves capabilities, not builds.

pub mod connection;
pub mod dead_peer;
pub mod doorman;
pub mod external;
pub mod framing;
pub mod host;
pub mod join;
pub mod keys;
pub mod limits;
pub mod log_budget;
pub mod paced;
pub mod peer_gone;
pub mod policy;
pub mod private_file;
pub mod route;
pub mod runtime_dir;

pub use host::{HostConfig, HostedSpace};
pub use join::{Backoff, JoinError, SessionEvent};
pub use limits::Limits;
pub use route::{Role, Route, RouteError, Transport};
