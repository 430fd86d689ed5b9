//! The schedule's types to and from the vocabulary's records (`schemas/build.prs`): the one
//! place where the planner turns what it reads from the dataspace into its own types, and
//! back where it asserts.

use nixspace_protocol::{build, BuildSettings, DrvPath, WorkerId};
use preserves_schema::Parse;
use syndicate::actor::AnyValue;

use crate::schedule::{FailureCause, FailureKind, StepInfo};

/// A step as the dataspace carries it.
pub(crate) fn step_to_wire(info: &StepInfo) -> build::StepInfo {
    build::StepInfo {
        system: info.system.clone(),
        features: info.features.clone(),
        input_drvs: info.input_drvs.iter().map(|d| d.to_string()).collect(),
        settings: info.settings.to_wire(),
    }
}

/// A step as the schedule keeps it.
pub(crate) fn step_from_wire(info: build::StepInfo) -> StepInfo {
    StepInfo {
        system: info.system,
        features: info.features,
        input_drvs: info.input_drvs.into_iter().map(DrvPath::from).collect(),
        settings: BuildSettings::from_wire(&info.settings),
    }
}

/// The worker a `failed` record names: none when the planner decided (an empty name).
pub(crate) fn worker_from_wire(worker: &str) -> Option<WorkerId> {
    (!worker.is_empty()).then(|| WorkerId::from(worker))
}

/// The kind of a `failed` record, if it is one. Or-types have no dataspace pattern of their
/// own: observers capture the field and parse it here.
pub(crate) fn kind_from_wire(kind: &AnyValue) -> Option<FailureKind> {
    match build::FailureKind::parse(kind).ok()? {
        build::FailureKind::Transient => Some(FailureKind::Transient),
        build::FailureKind::Permanent => Some(FailureKind::Permanent),
    }
}

/// The cause of a `failed` record, if it is one.
pub(crate) fn cause_from_wire(cause: &AnyValue) -> Option<FailureCause> {
    Some(match build::FailureCause::parse(cause).ok()? {
        build::FailureCause::Build => FailureCause::Build,
        build::FailureCause::Dependency { drv } => FailureCause::Dependency(drv.into()),
        build::FailureCause::Infrastructure => FailureCause::Infrastructure,
    })
}

/// A failure's cause as the dataspace carries it.
pub(crate) fn cause_to_wire(cause: FailureCause) -> build::FailureCause {
    match cause {
        FailureCause::Build => build::FailureCause::Build,
        FailureCause::Dependency(drv) => build::FailureCause::Dependency { drv: drv.into() },
        FailureCause::Infrastructure => build::FailureCause::Infrastructure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use preserves_schema::Unparse;

    #[test]
    fn causes_travel_both_ways() {
        for cause in [
            FailureCause::Build,
            FailureCause::Dependency("/nix/store/a.drv".into()),
            FailureCause::Infrastructure,
        ] {
            let value: AnyValue = cause_to_wire(cause.clone()).unparse();
            assert_eq!(cause_from_wire(&value), Some(cause));
        }
        assert_eq!(cause_from_wire(&AnyValue::symbol("bogus")), None);
    }
}
