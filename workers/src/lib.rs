//! Worker actors.
//!
//! [`builder`] joins a dataspace as a build worker: it announces what it can
//! build, claims ready steps while it has free slots, builds the ones it is
//! assigned with the local Nix, streams their logs and asserts the outcome.
//! [`detached`] keeps those builds running across losses of the dataspace.
//! [`service`] runs a builder that stays joined to a dataspace. [`machine`] reads what the
//! machine offers its builds.

pub mod builder;
mod ca_substitutes;
pub mod detached;
pub mod machine;
pub mod service;

pub use builder::{start, BuilderConfig, DrainDone, Event};
pub use detached::{Builds, DEFAULT_MAX_LOG_BYTES};
pub use service::WorkerService;
