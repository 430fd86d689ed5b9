//! How a whole build ended: every step's outcome, the failing steps' log tails, the steps no
//! worker could take, and the roots' outputs. Frontends render it their way (`nixspace build`
//! as lines on the terminal, the translator as Nix's build results); the facts and their
//! order (root causes first) are the same for both.

use std::collections::{BTreeMap, VecDeque};
use std::time::SystemTime;

use nixspace_protocol::DrvPath;

use crate::outcome::{Failure, StepOutcome};

/// How many log lines of each step's latest attempt a report keeps (Nix's default
/// `log-lines`).
pub const LOG_TAIL_LINES: usize = 10;

/// How a build ended.
#[derive(Debug, Clone)]
pub struct Report {
    /// The steps that ended, and how (a step missing here was still pending when the build
    /// gave up; a root missing here needed no build).
    pub outcomes: BTreeMap<DrvPath, StepOutcome>,
    /// The last [`LOG_TAIL_LINES`] log lines of each step's latest attempt.
    pub tails: BTreeMap<DrvPath, VecDeque<String>>,
    /// When the build gave up because steps stayed unschedulable: those steps, with the
    /// planner's reason. Empty otherwise.
    pub unschedulable: BTreeMap<DrvPath, String>,
    /// Each root's output paths: built by this build, or known (valid or realised) before.
    pub outputs: BTreeMap<DrvPath, Vec<String>>,
    /// The roots whose outputs became known by building them (content-addressed): output
    /// name → path.
    pub realised: BTreeMap<DrvPath, BTreeMap<String, String>>,
    /// When the build started.
    pub started: SystemTime,
    /// When it ended.
    pub stopped: SystemTime,
}

impl Default for Report {
    /// A report of nothing: no step, no output, both times at the epoch.
    fn default() -> Report {
        Report {
            outcomes: BTreeMap::new(),
            tails: BTreeMap::new(),
            unschedulable: BTreeMap::new(),
            outputs: BTreeMap::new(),
            realised: BTreeMap::new(),
            started: SystemTime::UNIX_EPOCH,
            stopped: SystemTime::UNIX_EPOCH,
        }
    }
}

impl Report {
    /// The failed steps, root causes first (failures not caused by another failure).
    pub fn failures(&self) -> Vec<(&DrvPath, &Failure)> {
        let mut failures: Vec<(&DrvPath, &Failure)> = self
            .outcomes
            .iter()
            .filter_map(|(drv, outcome)| match outcome {
                StepOutcome::Failed(f) => Some((drv, f)),
                StepOutcome::Built { .. } => None,
            })
            .collect();
        failures.sort_by_key(|(_, f)| f.cause.is_consequence());
        failures
    }

    /// The log tail of `drv`'s latest attempt, if it logged anything.
    pub fn tail(&self, drv: &DrvPath) -> Option<&VecDeque<String>> {
        self.tails.get(drv).filter(|t| !t.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::FailureCause;

    fn failed(reason: &str, cause: FailureCause) -> StepOutcome {
        StepOutcome::Failed(Failure {
            worker: None,
            reason: reason.to_owned(),
            cause,
        })
    }

    #[test]
    fn root_causes_come_first() {
        let base = DrvPath::from("/nix/store/b-base.drv");
        let mut report = Report::default();
        report.outcomes.insert(
            DrvPath::from("/nix/store/a-top.drv"),
            failed(
                "dependency b failed",
                FailureCause::Dependency(base.clone()),
            ),
        );
        report.outcomes.insert(
            DrvPath::from("/nix/store/0-sibling.drv"),
            failed("not built", FailureCause::Abandoned),
        );
        report
            .outcomes
            .insert(base.clone(), failed("exit code 3", FailureCause::Build));
        let order: Vec<&str> = report.failures().iter().map(|(d, _)| d.as_str()).collect();
        assert_eq!(order[0], base.as_str());
    }
}
