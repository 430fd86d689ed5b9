//! The outputs a step must produce (`StepInfo`'s `outputs`), and whether a reported outcome
//! names exactly them: the planner checks workers' reports, frontends the planner's `built`.
//!
//! A demand carries its step's outputs in output-name order, one `name=path` each, with an
//! empty path for an output whose path is known only once built (a floating
//! content-addressed output). A worker reports its output paths in the same order. The
//! planner believes a report only when it names exactly those outputs: a known path must be
//! the one the derivation gives, an unknown one must at least be a path of the output's name
//! in the step's store directory.

use crate::DrvPath;

/// Why a worker's reported outputs are not the step's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnexpectedOutputs {
    /// Not as many outputs as the step has.
    #[error("reported {reported} outputs, the step has {expected}")]
    Count {
        /// How many the step has.
        expected: usize,
        /// How many the report names.
        reported: usize,
    },
    /// A known output's path differs.
    #[error("output {name} reported as {reported}, the derivation gives {expected}")]
    Path {
        /// The output's name.
        name: String,
        /// The derivation's path for it.
        expected: String,
        /// The reported path.
        reported: String,
    },
    /// A floating output's path is not a path of that output in the step's store.
    #[error("output {name} reported as {reported}, not a store path named {wanted} in {store}")]
    Floating {
        /// The output's name.
        name: String,
        /// The reported path.
        reported: String,
        /// The name its path must have.
        wanted: String,
        /// The step's store directory.
        store: String,
    },
    /// The demand's own list is not `name=path` entries.
    #[error("the step's expected output {0:?} is not name=path")]
    Malformed(String),
}

/// One `name=path` entry (`path` empty when unknown), as a demand carries it.
pub fn entry(name: &str, path: Option<&str>) -> String {
    format!("{name}={}", path.unwrap_or_default())
}

/// Whether `reported` (output paths in output-name order) is exactly what `expected` (the
/// step's `name=path` entries, in the same order) allows for step `drv`.
pub fn check(
    drv: &DrvPath,
    expected: &[String],
    reported: &[String],
) -> Result<(), UnexpectedOutputs> {
    if expected.len() != reported.len() {
        return Err(UnexpectedOutputs::Count {
            expected: expected.len(),
            reported: reported.len(),
        });
    }
    for (entry, reported) in expected.iter().zip(reported) {
        let (name, path) = entry
            .split_once('=')
            .ok_or_else(|| UnexpectedOutputs::Malformed(entry.clone()))?;
        if !path.is_empty() {
            if path != reported {
                return Err(UnexpectedOutputs::Path {
                    name: name.to_owned(),
                    expected: path.to_owned(),
                    reported: reported.clone(),
                });
            }
            continue;
        }
        let (store, wanted) = floating_name(drv.as_str(), name);
        if !is_floating_path(reported, &store, &wanted) {
            return Err(UnexpectedOutputs::Floating {
                name: name.to_owned(),
                reported: reported.clone(),
                wanted,
                store,
            });
        }
    }
    Ok(())
}

/// The store directory of `drv` and the name Nix gives its output `output`: the
/// derivation's name for `out`, `<name>-<output>` for the others.
fn floating_name(drv: &str, output: &str) -> (String, String) {
    let (store, base) = drv.rsplit_once('/').unwrap_or(("", drv));
    let name = base
        .split_once('-')
        .map_or(base, |(_, name)| name)
        .trim_end_matches(".drv");
    let wanted = if output == "out" {
        name.to_owned()
    } else {
        format!("{name}-{output}")
    };
    (store.to_owned(), wanted)
}

/// Whether `path` is `<store>/<32 nixbase32 characters>-<wanted>`.
fn is_floating_path(path: &str, store: &str, wanted: &str) -> bool {
    const NIXBASE32: &str = "0123456789abcdfghijklmnpqrsvwxyz";
    let Some(base) = path
        .strip_prefix(store)
        .and_then(|rest| rest.strip_prefix('/'))
    else {
        return false;
    };
    match base.split_once('-') {
        Some((hash, name)) => {
            hash.len() == 32 && hash.chars().all(|c| NIXBASE32.contains(c)) && name == wanted
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRV: &str = "/nix/store/00000000000000000000000000000000-hello.drv";
    const OUT: &str = "/nix/store/11111111111111111111111111111111-hello";
    const DEV: &str = "/nix/store/22222222222222222222222222222222-hello-dev";

    fn outputs(entries: &[(&str, Option<&str>)]) -> Vec<String> {
        entries.iter().map(|(n, p)| entry(n, *p)).collect()
    }

    #[test]
    fn the_derivations_outputs_are_accepted() {
        let expected = outputs(&[("dev", Some(DEV)), ("out", Some(OUT))]);
        let reported = [DEV.to_owned(), OUT.to_owned()];
        assert_eq!(check(&DRV.into(), &expected, &reported), Ok(()));
    }

    #[test]
    fn other_paths_or_counts_are_rejected() {
        let expected = outputs(&[("dev", Some(DEV)), ("out", Some(OUT))]);
        let forged = "/nix/store/33333333333333333333333333333333-hello".to_owned();
        assert!(matches!(
            check(&DRV.into(), &expected, &[DEV.to_owned(), forged]),
            Err(UnexpectedOutputs::Path { name, .. }) if name == "out"
        ));
        assert!(matches!(
            check(&DRV.into(), &expected, &[OUT.to_owned()]),
            Err(UnexpectedOutputs::Count {
                expected: 2,
                reported: 1
            })
        ));
        // Swapped: each position is one output.
        assert!(check(&DRV.into(), &expected, &[OUT.to_owned(), DEV.to_owned()]).is_err());
        assert!(matches!(
            check(&DRV.into(), &["out".to_owned()], &[OUT.to_owned()]),
            Err(UnexpectedOutputs::Malformed(_))
        ));
    }

    #[test]
    fn a_floating_output_must_be_a_path_of_its_name_in_the_store() {
        let expected = outputs(&[("dev", None), ("out", None)]);
        assert_eq!(
            check(&DRV.into(), &expected, &[DEV.to_owned(), OUT.to_owned()]),
            Ok(())
        );
        for wrong in [
            "/nix/store/11111111111111111111111111111111-other",
            "/elsewhere/11111111111111111111111111111111-hello",
            "/nix/store/1111-hello",
            "/nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-hello",
            "/nix/store/sub/11111111111111111111111111111111-hello",
        ] {
            assert!(
                check(&DRV.into(), &expected, &[DEV.to_owned(), wrong.to_owned()]).is_err(),
                "{wrong}"
            );
        }
    }
}
