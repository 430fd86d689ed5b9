//! Worker actors.
//!
//! [`builder`] joins a dataspace as a build worker: it announces what it can
//! build and how many at once, builds the steps the planner gives it with the local Nix,
//! streams their logs and reports the outcome.
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
