//! The schedule's types to and from the vocabulary's records (`schemas/build.prs`): the one
//! place where the planner turns what it reads from the dataspace into its own types, and
//! back where it asserts.

use std::sync::Arc;

use nixspace_protocol::{build, BuildSettings, DrvPath, WorkerId};
use preserves::ValueImpl;
use preserves_schema::Parse;
use syndicate::actor::AnyValue;

use crate::history::BuildUsage;
use crate::schedule::{FailureCause, FailureKind, StepDerivation, StepInfo};

/// A step as the schedule keeps it, with `system` for the wire's platform (a copy shared with
/// other steps'), its derivation from where `derivation` says.
pub(crate) fn step_from_wire(
    info: build::StepInfo,
    system: Arc<str>,
    derivation: StepDerivation,
) -> StepInfo {
    StepInfo {
        system,
        features: info.features,
        input_drvs: info.input_drvs.into_iter().map(DrvPath::from).collect(),
        settings: BuildSettings::from_wire(&info.settings),
        outputs: info.outputs,
        memory: u64::try_from(&info.memory).ok().filter(|m| *m > 0),
        duration_ms: None,
        derivation,
    }
}

/// The most realisation signatures the planner keeps per id.
pub(crate) const MAX_SIGNATURES: usize = 16;

/// The longest id, path or signature of a realisation the planner takes, in bytes.
const MAX_REALISATION_FIELD: usize = 1024;

/// The usage a worker's `report-built` carries (a list of none or one): one record of the
/// vocabulary's shape with values in range (a peak of at least -1, times not negative),
/// else none.
pub(crate) fn usage_from_wire(usage: &AnyValue) -> Option<BuildUsage> {
    if !usage.is_sequence() || usage.len() != 1 {
        return None;
    }
    let parsed = build::BuildUsage::parse(&usage.index(0)).ok()?;
    let peak = i64::try_from(&parsed.peak_memory).ok()?;
    let cpu_ms = i64::try_from(&parsed.cpu_millis).ok()?;
    let wall_ms = i64::try_from(&parsed.wall_millis).ok()?;
    (peak >= -1 && cpu_ms >= 0 && wall_ms >= 0).then_some(BuildUsage {
        peak_memory: (peak >= 0).then_some(peak),
        cpu_ms,
        wall_ms,
    })
}

/// The realisations of a worker's `report-built` that the planner considers: records of the
/// vocabulary's shape, at most one per output (`outputs`), each field at most
/// [`MAX_REALISATION_FIELD`] bytes and at most [`MAX_SIGNATURES`] signatures; the rest is
/// dropped with a warning.
pub(crate) fn realisations_from_wire(
    realisations: &AnyValue,
    outputs: usize,
) -> Vec<build::Realisation> {
    if !realisations.is_sequence() {
        tracing::warn!("ignoring realisations that are not a sequence");
        return Vec::new();
    }
    let short = |s: &str| s.len() <= MAX_REALISATION_FIELD;
    let taken: Vec<build::Realisation> = realisations
        .iter()
        .take(outputs)
        .filter_map(|v| build::Realisation::parse(&v).ok())
        .filter(|r| {
            short(&r.id)
                && short(&r.path)
                && r.signatures.len() <= MAX_SIGNATURES
                && <[String]>::iter(&r.signatures).all(|s| short(s))
        })
        .collect();
    if taken.len() < realisations.len() {
        tracing::warn!(
            reported = realisations.len(),
            taken = taken.len(),
            outputs,
            "ignoring realisations past one per output, malformed or too long"
        );
    }
    taken
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
        build::FailureCause::OutOfMemory { limit } => FailureCause::OutOfMemory {
            limit: u64::try_from(&limit).ok()?,
        },
    })
}

/// A failure's cause as the dataspace carries it.
pub(crate) fn cause_to_wire(cause: FailureCause) -> build::FailureCause {
    match cause {
        FailureCause::Build => build::FailureCause::Build,
        FailureCause::Dependency(drv) => build::FailureCause::Dependency { drv: drv.into() },
        FailureCause::Infrastructure => build::FailureCause::Infrastructure,
        FailureCause::OutOfMemory { limit } => build::FailureCause::OutOfMemory {
            limit: limit.into(),
        },
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
            FailureCause::OutOfMemory { limit: 64 << 20 },
        ] {
            let value: AnyValue = cause_to_wire(cause.clone()).unparse();
            assert_eq!(cause_from_wire(&value), Some(cause));
        }
        assert_eq!(cause_from_wire(&AnyValue::symbol("bogus")), None);
    }

    #[test]
    fn a_report_carries_at_most_one_bounded_realisation_per_output() {
        let realisation = |id: &str, path: &str| build::Realisation {
            id: id.to_owned(),
            path: path.to_owned(),
            signatures: vec!["k:sig".to_owned()],
        };
        let long = "x".repeat(MAX_REALISATION_FIELD + 1);
        let report: AnyValue = build::ReportBuilt {
            drv: "/nix/store/d.drv".to_owned(),
            worker: "w".to_owned(),
            outputs: vec![],
            realisations: vec![
                realisation("sha256:00!out", &long),
                realisation("sha256:00!out", "/nix/store/a"),
                realisation("sha256:00!dev", "/nix/store/b"),
            ],
            usage: vec![],
        }
        .unparse();
        let reported = report.index(3);
        assert_eq!(usage_from_wire(&report.index(4)), None);
        let taken = realisations_from_wire(&reported, 2);
        // The first is too long, the third is past the two outputs.
        assert_eq!(taken, vec![realisation("sha256:00!out", "/nix/store/a")]);
        // Positive control: within the bounds, all are taken.
        assert_eq!(realisations_from_wire(&reported, 3).len(), 2);
        assert!(realisations_from_wire(&AnyValue::new("no"), 3).is_empty());
    }

    #[test]
    fn a_usage_is_taken_only_whole_and_in_range() {
        let usage = |peak: i64, cpu: i64, wall: i64| -> AnyValue {
            AnyValue::new(vec![build::BuildUsage {
                peak_memory: peak.into(),
                cpu_millis: cpu.into(),
                wall_millis: wall.into(),
            }
            .unparse()])
        };
        assert_eq!(
            usage_from_wire(&usage(4096, 20, 30)),
            Some(BuildUsage {
                peak_memory: Some(4096),
                cpu_ms: 20,
                wall_ms: 30
            })
        );
        assert_eq!(
            usage_from_wire(&usage(-1, 0, 0)).map(|u| u.peak_memory),
            Some(None)
        );
        assert_eq!(usage_from_wire(&usage(-2, 0, 0)), None);
        assert_eq!(usage_from_wire(&usage(0, -1, 0)), None);
        assert_eq!(usage_from_wire(&AnyValue::symbol("usage")), None);
    }
}
