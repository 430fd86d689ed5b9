//! The frontend of a nixspace build: what `nixspace build`, the translator and `nixspace
//! daemon` share to have derivations built on a dataspace.
//!
//! - [`session`]: one build, from root derivations to a [`Report`]: plan, demand, follow
//!   (across dataspace restarts), copy the outputs here, register realisations; it yields
//!   typed [`Progress`] that each frontend renders its own way.
//! - [`plan`]: which derivations of the roots' closure must be built, and what is
//!   substituted instead; [`walk`] is its top-down walk.
//! - [`demands`]: the demands of the steps, inputs first, with their depths.
//! - [`resolve`]: content-addressed steps resolved as their inputs are realised.
//! - [`realisation`]: output ids and the realisations of built outputs.
//! - [`report`] and [`outcome`]: how the build and each step ended.
//! - [`post_build`]: what happens after each step is built (signatures, the post-build hook).
//! - [`build_log`]: each step's log as the worker relayed it, stored locally when it ends.
//! - [`store_db`]: validity and path info read from the local store's database.
//! - [`phase`]: debug-level timing of a build's phases.

pub mod build_log;
pub mod demands;
mod events;
pub mod outcome;
pub mod phase;
pub mod plan;
pub mod post_build;
pub mod realisation;
pub mod repair;
pub mod report;
pub mod resolve;
pub mod session;
pub mod store_db;
pub mod walk;

pub use outcome::{Failure, FailureCause, StepOutcome};
pub use post_build::PostBuild;
pub use report::Report;
pub use session::{BuildSession, InlineDerivation, Progress, SessionConfig, SessionError};
pub use store_db::StoreDb;
