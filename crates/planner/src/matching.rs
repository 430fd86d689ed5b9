//! Which workers may build which steps.

/// Why a worker cannot take a step, or `None` when it can. A step for system
/// `builtin` runs anywhere; every required feature must be offered.
pub fn mismatch(
    worker_systems: &[String],
    worker_features: &[String],
    system: &str,
    features: &[String],
) -> Option<Mismatch> {
    if system != "builtin" && !worker_systems.iter().any(|s| s == system) {
        return Some(Mismatch::System(system.to_owned()));
    }
    let missing: Vec<String> = features
        .iter()
        .filter(|f| !worker_features.contains(f))
        .cloned()
        .collect();
    if missing.is_empty() {
        None
    } else {
        Some(Mismatch::Features(system.to_owned(), missing))
    }
}

/// What a worker lacks for a step.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mismatch {
    /// It does not build for the step's system.
    System(String),
    /// It builds for the system but lacks these features.
    Features(String, Vec<String>),
}

/// The explanation for a step that no worker can take, from what the
/// closest workers lack (`mismatches` is one entry per connected worker).
pub fn unschedulable_reason(mismatches: &[Mismatch], system: &str) -> String {
    if mismatches.is_empty() {
        return format!("no worker is connected (the step needs system {system})");
    }
    let lacking_features: Vec<&Vec<String>> = mismatches
        .iter()
        .filter_map(|m| match m {
            Mismatch::Features(_, f) => Some(f),
            Mismatch::System(_) => None,
        })
        .collect();
    match lacking_features.iter().min_by_key(|f| f.len()) {
        None => format!("no worker offers system {system}"),
        Some(features) => format!(
            "no worker for system {system} offers the required features: {}",
            features.join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(xs: &[&str]) -> Vec<String> {
        xs.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn matches_system_builtin_and_features() {
        let sys = v(&["x86_64-linux"]);
        assert_eq!(mismatch(&sys, &[], "x86_64-linux", &[]), None);
        assert_eq!(mismatch(&sys, &[], "builtin", &[]), None);
        assert_eq!(
            mismatch(&sys, &[], "aarch64-linux", &[]),
            Some(Mismatch::System("aarch64-linux".into()))
        );
        assert_eq!(
            mismatch(&sys, &v(&["kvm"]), "x86_64-linux", &v(&["kvm", "big"])),
            Some(Mismatch::Features("x86_64-linux".into(), v(&["big"])))
        );
    }

    #[test]
    fn reasons_name_what_is_missing() {
        assert_eq!(
            unschedulable_reason(&[Mismatch::System("aarch64-linux".into())], "aarch64-linux"),
            "no worker offers system aarch64-linux"
        );
        let r = unschedulable_reason(
            &[
                Mismatch::System("x".into()),
                Mismatch::Features("x86_64-linux".into(), v(&["big", "kvm"])),
                Mismatch::Features("x86_64-linux".into(), v(&["big"])),
            ],
            "x86_64-linux",
        );
        assert_eq!(
            r,
            "no worker for system x86_64-linux offers the required features: big"
        );
        assert!(unschedulable_reason(&[], "x86_64-linux").contains("no worker is connected"));
    }
}
