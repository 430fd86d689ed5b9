//! How a step ends, as a frontend sees it: built with its outputs, or failed with a typed
//! cause, so reports order root causes first and map failures to Nix's build statuses
//! without reading the reason's words.

use nixspace_protocol::{DrvPath, WorkerId};

/// Why a step was not built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureCause {
    /// The step's own build failed (its builder exited non-zero, or it could not be resolved).
    Build,
    /// An input step failed, so this one was never tried.
    Dependency(DrvPath),
    /// Nothing could build it: no worker, a refusal by the coordinator, a lost store.
    Infrastructure,
    /// Its build was killed for going over the memory one build may use on its worker
    /// (`limit` bytes), and no worker that allows more could build it.
    OutOfMemory {
        /// The limit it went over, in bytes.
        limit: u64,
    },
    /// Another step failed and the client did not ask to keep going (Nix's `--keep-going`
    /// off), so this one was abandoned.
    Abandoned,
}

impl FailureCause {
    /// Whether the failure is another step's fault (a dependency failed, or the build was
    /// abandoned after one did): root causes are the others.
    pub fn is_consequence(&self) -> bool {
        matches!(self, FailureCause::Dependency(_) | FailureCause::Abandoned)
    }
}

/// A step that failed for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The worker that reported it (`None` when the planner or this frontend decided).
    pub worker: Option<WorkerId>,
    /// Why, in words (Nix's own when the worker relays them).
    pub reason: String,
    /// Whose fault it is.
    pub cause: FailureCause,
}

/// How one demanded step ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepOutcome {
    /// Its outputs are valid (somewhere in the dataspace).
    Built {
        /// The output paths, in the derivation's output order.
        outputs: Vec<String>,
    },
    /// It will not be built.
    Failed(Failure),
}
