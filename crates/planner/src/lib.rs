//! The planner: which steps are ready, who builds what, what failed.
//!
//! [`schedule`] is pure: [`Schedule`] is fed the events the planner observes
//! (demands, claims and outcomes) and answers with the [`Effect`]s to publish.
//! It decides readiness (all input steps built), grants one claim per step,
//! retries steps whose worker vanished, lets a faster idle worker duplicate a
//! long step of a slow one, and propagates permanent failures to dependents. It trusts its caller for one thing: a demanded step's inputs
//! that are *not* themselves demanded are already valid (frontends demand
//! every step whose outputs are missing).
//!
//! [`service`] is the actor that connects a [`Schedule`] to a dataspace.

pub mod demand_gate;
mod eta;
pub mod history;
pub mod job_history;
pub mod matching;
pub mod metrics;
pub mod resolution;
pub mod schedule;
pub mod service;
mod wire;

pub use schedule::{
    Effect, FailureCause, FailureKind, Resources, Schedule, StealPolicy, StepFailure, StepInfo,
    StepState, Urgency, WorkerOffer, DEFAULT_MAX_ATTEMPTS, DEFAULT_RETRY_BACKOFF,
};

/// After a restart, how long a step that was being built is kept for its worker (see
/// [`PlannerConfig::rejoin_grace`]).
pub const DEFAULT_REJOIN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);
pub use service::PlannerConfig;
