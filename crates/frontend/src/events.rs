//! What the dataspace says about steps, as events for a frontend.
//!
//! [`observe`] turns `unschedulable`, `built`, `failed`, `assigned`, `demands-refused`, `log`
//! and `build-activity` into [`StepEvent`]s for the caller's [`Handler`], converting the
//! records' strings into typed names (and activity events into Nix's, within their bounds)
//! once, here. Every step is reported: handlers keep their own.

use std::sync::Arc;

use nixspace_nix_protocol::LogEvent;
use nixspace_nix_tools::build_activity;
use nixspace_protocol::{build, on_retraction, DrvPath, WorkerId};
use preserves_schema::Parse;
use syndicate::actor::{Activation, ActorResult, Cap};
use syndicate::enclose;
use syndicate_macros::{during, on_message};

use crate::outcome::{Failure, FailureCause};

/// Something the dataspace said about a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StepEvent {
    /// No connected worker can take the step.
    Unschedulable {
        /// The step.
        drv: DrvPath,
        /// The planner's reason.
        reason: String,
    },
    /// The step is no longer unschedulable.
    Schedulable {
        /// The step.
        drv: DrvPath,
    },
    /// The step's outputs are valid.
    Built {
        /// The step.
        drv: DrvPath,
        /// The worker that built it (empty: none, the step stands for another one built).
        worker: WorkerId,
        /// Its output paths.
        outputs: Vec<String>,
    },
    /// The step failed for good.
    Failed {
        /// The step.
        drv: DrvPath,
        /// Who reported what.
        failure: Failure,
    },
    /// A worker was granted the step.
    Assigned {
        /// The step.
        drv: DrvPath,
        /// The worker.
        worker: WorkerId,
    },
    /// The assignment was withdrawn.
    Unassigned {
        /// The step.
        drv: DrvPath,
    },
    /// The coordinator refused demands of the frontend named `requester` (too many).
    Refused {
        /// The frontend.
        requester: String,
        /// The coordinator's reason.
        reason: String,
    },
    /// One line of a step's build log.
    Log {
        /// The step.
        drv: DrvPath,
        /// The worker building it.
        worker: WorkerId,
        /// The line (no newline).
        line: String,
    },
    /// One of Nix's activity events of a step's build (see [`build_activity`]).
    Activity {
        /// The step.
        drv: DrvPath,
        /// The worker building it.
        worker: WorkerId,
        /// The event: activity 0 is the step's build activity.
        event: LogEvent,
    },
}

impl StepEvent {
    /// The step the event is about (none for a refusal).
    pub(crate) fn drv(&self) -> Option<&DrvPath> {
        match self {
            StepEvent::Unschedulable { drv, .. }
            | StepEvent::Schedulable { drv }
            | StepEvent::Built { drv, .. }
            | StepEvent::Failed { drv, .. }
            | StepEvent::Assigned { drv, .. }
            | StepEvent::Unassigned { drv }
            | StepEvent::Log { drv, .. }
            | StepEvent::Activity { drv, .. } => Some(drv),
            StepEvent::Refused { .. } => None,
        }
    }

    /// The same event about step `step` instead.
    pub(crate) fn about(mut self, step: DrvPath) -> StepEvent {
        match &mut self {
            StepEvent::Unschedulable { drv, .. }
            | StepEvent::Schedulable { drv }
            | StepEvent::Built { drv, .. }
            | StepEvent::Failed { drv, .. }
            | StepEvent::Assigned { drv, .. }
            | StepEvent::Unassigned { drv }
            | StepEvent::Log { drv, .. }
            | StepEvent::Activity { drv, .. } => *drv = step,
            StepEvent::Refused { .. } => {}
        }
        self
    }
}

/// A receiver of [`StepEvent`]s, called inside the actor's turns.
pub(crate) type Handler = Arc<dyn Fn(&mut Activation, StepEvent) -> ActorResult + Send + Sync>;

/// The failure a `<failed …>` record reports.
pub(crate) fn failure_of(worker: &str, reason: &str, cause: build::FailureCause) -> Failure {
    let cause = match cause {
        build::FailureCause::Build => FailureCause::Build,
        build::FailureCause::Dependency { drv } => FailureCause::Dependency(DrvPath::from(drv)),
        build::FailureCause::Infrastructure => FailureCause::Infrastructure,
        build::FailureCause::OutOfMemory { limit } => FailureCause::OutOfMemory {
            limit: u64::try_from(&limit).unwrap_or(0),
        },
    };
    Failure {
        worker: (!worker.is_empty()).then(|| WorkerId::from(worker)),
        reason: reason.to_owned(),
        cause,
    }
}

/// Register observers on `ds` that pass every step event to `handler`.
pub(crate) fn observe(t: &mut Activation, ds: &Arc<Cap>, handler: Handler) {
    enclose!((handler) during!(t, ds, <unschedulable $drv: String $reason: String>,
    |t: &mut Activation| {
        let drv = DrvPath::from(drv);
        handler(t, StepEvent::Unschedulable { drv: drv.clone(), reason: reason.clone() })?;
        on_retraction(t, enclose!((handler) move |t| handler(t, StepEvent::Schedulable { drv })));
        Ok(())
    }));
    enclose!((handler) during!(t, ds, <built $drv: String $worker: String $outputs: Vec<String>>,
    |t: &mut Activation| {
        let (drv, worker) = (DrvPath::from(drv), WorkerId::from(worker));
        handler(t, StepEvent::Built { drv, worker, outputs: outputs.clone() })
    }));
    // Only final failures: a worker's transient failure is retried by the planner, which
    // asserts its own (permanent) copy when it gives up.
    enclose!((handler) during!(t, ds, <failed $drv: String $worker: String $reason: String $kind $cause>,
    |t: &mut Activation| {
        let (Ok(build::FailureKind::Permanent), Ok(cause)) =
            (build::FailureKind::parse(&kind), build::FailureCause::parse(&cause))
        else {
            return Ok(());
        };
        handler(t, StepEvent::Failed { drv: DrvPath::from(drv), failure: failure_of(&worker, &reason, cause) })
    }));
    enclose!((handler) during!(t, ds, <assigned $drv: String $worker: String _ _>,
    |t: &mut Activation| {
        let drv = DrvPath::from(drv);
        handler(t, StepEvent::Assigned { drv: drv.clone(), worker: WorkerId::from(worker) })?;
        on_retraction(t, enclose!((handler) move |t| handler(t, StepEvent::Unassigned { drv })));
        Ok(())
    }));
    enclose!((handler) during!(t, ds, <demands-refused $requester: String $reason: String>,
    |t: &mut Activation| {
        handler(t, StepEvent::Refused { requester: requester.clone(), reason: reason.clone() })
    }));
    enclose!((handler) on_message!(t, ds, <log $drv: String $worker: String $line: String>,
    |t: &mut Activation| {
        handler(t, StepEvent::Log { drv: DrvPath::from(drv), worker: WorkerId::from(worker), line: line.clone() })
    }));
    enclose!((handler) on_message!(t, ds, <build-activity $drv: String $worker: String $event>,
    |t: &mut Activation| {
        let event = build::ActivityEvent::parse(&event)
            .map_err(|e| e.to_string())
            .and_then(|e| build_activity::from_record(&e).map_err(|e| e.to_string()));
        match event {
            Ok(event) => handler(t, StepEvent::Activity { drv: DrvPath::from(drv), worker: WorkerId::from(worker), event }),
            Err(error) => {
                tracing::debug!(%drv, %worker, %error, "ignoring an activity event out of bounds");
                Ok(())
            }
        }
    }));
}
