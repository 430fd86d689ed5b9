//! A frontend [`Report`] in Nix's terms: a `BuildResult` per root and the error a client
//! prints, in Nix's own words when the worker relayed them (so the client shows the error
//! line it would show with `nix-daemon`, and the log's tail).

use std::collections::{BTreeMap, VecDeque};
use std::time::SystemTime;

use nixspace_frontend::{Failure, Report, StepOutcome};
use nixspace_nix_formats::store_path::{StoreDir, StorePath};
use nixspace_nix_protocol::{BuildResult, BuildStatus, OutputSpec, Realisation};
use nixspace_protocol::DrvPath;

/// How a failed step is described to the client: in Nix's own words when the worker relays
/// them, else which worker failed and why.
fn describe(drv: &DrvPath, failure: &Failure, tail: Option<&VecDeque<String>>) -> String {
    if failure.reason.starts_with(&format!("builder for '{drv}'")) {
        let mut msg = failure.reason.trim_end_matches(';').to_owned();
        if let Some(tail) = tail {
            msg.push_str(&format!(";\nlast {} log lines:", tail.len()));
            for line in tail {
                msg.push_str(&format!("\n> {line}"));
            }
        }
        msg
    } else {
        match &failure.worker {
            None => format!("build of '{drv}' failed: {}", failure.reason),
            Some(worker) => format!(
                "build of '{drv}' failed on worker {worker}: {}",
                failure.reason
            ),
        }
    }
}

/// The error a client is told when the build did not succeed: the first root cause, and how
/// many more steps failed. `None` if nothing failed.
pub fn error_message(report: &Report) -> Option<String> {
    if let Some((drv, reason)) = report.unschedulable.iter().next() {
        return Some(format!(
            "build of '{drv}' cannot start: no connected nixspace worker can take it ({reason})"
        ));
    }
    let failures = report.failures();
    let (drv, failure) = failures.first()?;
    let mut msg = describe(drv, failure, report.tail(drv));
    if failures.len() > 1 {
        let sep = if msg.contains('\n') { '\n' } else { ' ' };
        msg.push_str(&format!(
            "{sep}({} more step(s) failed)",
            failures.len() - 1
        ));
    }
    Some(msg)
}

/// Seconds since the epoch, as build results carry times.
fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The result for one root.
pub fn result_for(report: &Report, drv: &DrvPath) -> BuildResult {
    let mut res = match report.outcomes.get(drv) {
        None => BuildResult::new(BuildStatus::AlreadyValid),
        Some(StepOutcome::Built { .. }) => BuildResult::new(BuildStatus::Built),
        Some(StepOutcome::Failed(failure)) => {
            let status = if failure.cause.is_consequence() {
                BuildStatus::DependencyFailed
            } else {
                BuildStatus::PermanentFailure
            };
            let mut r = BuildResult::new(status);
            r.error_msg = describe(drv, failure, report.tail(drv));
            r
        }
    };
    if report.outcomes.contains_key(drv) {
        res.times_built = 1;
        res.start_time = epoch_secs(report.started);
        res.stop_time = epoch_secs(report.stopped);
    }
    res
}

/// The realisations of the `wanted` outputs of a built derivation, as nix-daemon reports
/// only the outputs asked for (empty, with a warning, if they cannot be computed: the client
/// then falls back to querying the outputs).
pub async fn built_outputs(
    store_dir: &StoreDir,
    drv: &StorePath,
    wanted: &OutputSpec,
    realised: BTreeMap<String, String>,
) -> BTreeMap<String, Realisation> {
    let (dir, path) = (store_dir.clone(), drv.clone());
    let computed = tokio::task::spawn_blocking(move || {
        nixspace_frontend::realisation::built_outputs(&dir, &path, &realised)
    })
    .await;
    match computed {
        Ok(Ok(mut r)) => {
            r.retain(|id, _| is_wanted(wanted, id));
            r
        }
        Ok(Err(e)) => {
            tracing::warn!(drv = %drv, error = %crate::error_chain(&e), "no realisations for the build result");
            BTreeMap::new()
        }
        Err(e) => {
            tracing::warn!(drv = %drv, error = %e, "no realisations for the build result");
            BTreeMap::new()
        }
    }
}

/// Whether the output of the `DrvOutput` id `id` (`sha256:…!name`) is one of `wanted`.
fn is_wanted(wanted: &OutputSpec, id: &str) -> bool {
    match wanted {
        OutputSpec::All => true,
        OutputSpec::Names(names) => id
            .rsplit_once('!')
            .is_some_and(|(_, name)| names.contains(name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixspace_frontend::FailureCause;
    use nixspace_protocol::WorkerId;

    fn failed(worker: Option<&str>, reason: &str, cause: FailureCause) -> StepOutcome {
        StepOutcome::Failed(Failure {
            worker: worker.map(WorkerId::from),
            reason: reason.to_owned(),
            cause,
        })
    }

    #[test]
    fn root_causes_are_reported_first() {
        let mut report = Report::default();
        let (top, base) = (
            DrvPath::from("/nix/store/a-top.drv"),
            DrvPath::from("/nix/store/b-base.drv"),
        );
        report.outcomes.insert(
            top.clone(),
            failed(
                None,
                "dependency /nix/store/b-base.drv failed",
                FailureCause::Dependency(base.clone()),
            ),
        );
        report.outcomes.insert(
            base.clone(),
            failed(Some("w1"), "exit code 3", FailureCause::Build),
        );
        assert_eq!(
            error_message(&report).unwrap(),
            "build of '/nix/store/b-base.drv' failed on worker w1: exit code 3 (1 more step(s) failed)"
        );
        assert_eq!(
            result_for(&report, &top).status,
            BuildStatus::DependencyFailed
        );
        assert_eq!(
            result_for(&report, &DrvPath::from("/nix/store/c-other.drv")).status,
            BuildStatus::AlreadyValid
        );
    }

    #[test]
    fn nix_builder_failures_keep_nix_words_and_the_log_tail() {
        let drv = DrvPath::from("/nix/store/b-base.drv");
        let mut report = Report::default();
        report.outcomes.insert(
            drv.clone(),
            failed(
                Some("w1"),
                &format!("builder for '{drv}' failed with exit code 3;"),
                FailureCause::Build,
            ),
        );
        let tail: VecDeque<String> = (2..12).map(|i| format!("line {i}")).collect();
        report.tails.insert(drv.clone(), tail);
        let msg = error_message(&report).unwrap();
        let mut lines = msg.lines();
        assert_eq!(
            lines.next(),
            Some("builder for '/nix/store/b-base.drv' failed with exit code 3;")
        );
        assert_eq!(lines.next(), Some("last 10 log lines:"));
        assert_eq!(lines.next(), Some("> line 2"));
        assert_eq!(lines.last(), Some("> line 11"));
        assert_eq!(result_for(&report, &drv).error_msg, msg);
    }

    #[test]
    fn only_the_wanted_outputs_are_reported() {
        let names = OutputSpec::Names(["first".to_owned()].into());
        assert!(is_wanted(&names, "sha256:abc!first"));
        assert!(!is_wanted(&names, "sha256:abc!second"));
        assert!(is_wanted(&OutputSpec::All, "sha256:abc!second"));
    }
}
