//! Steps the planner resolves: a demand whose step has inputs with outputs known only once
//! built (floating content-addressed outputs, or deferred ones) carries the step's derivation.
//! The planner checks that the text is the step's (its text path is the demanded path: nobody
//! can make another derivation pass as it), and once every input is built, resolves it (Nix's
//! `tryResolve`: inputs replaced by the paths they were built at) into the derivation that is
//! built in its place. Pure code over the text and the inputs' outputs.

use std::collections::BTreeMap;
use std::sync::Arc;

use nixspace_nix_formats::derivation::{Derivation, DerivationError};
use nixspace_nix_formats::store_path::{StoreDir, StorePathError};
use nixspace_protocol::{expected_outputs, DrvPath};

/// The largest derivation text a demand may carry, in bytes.
pub const MAX_DERIVATION_TEXT: usize = 4 << 20;

/// Why a step's derivation is not taken, or cannot be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolutionError {
    /// The text is larger than [`MAX_DERIVATION_TEXT`].
    #[error("the derivation sent for {drv} is {size} bytes, over the {MAX_DERIVATION_TEXT} taken")]
    TooLarge {
        /// The step.
        drv: DrvPath,
        /// The text's size.
        size: usize,
    },
    /// The step's path is not a derivation's store path.
    #[error("{drv} is not a derivation's store path: {source}")]
    Path {
        /// The step.
        drv: DrvPath,
        /// Why.
        source: StorePathError,
    },
    /// The text is not a derivation, or not the step's.
    #[error("the derivation sent for {drv} is not taken: {source}")]
    Parse {
        /// The step.
        drv: DrvPath,
        /// Why.
        source: Box<DerivationError>,
    },
    /// An input's output is not known (its step is not built, or has no such output).
    #[error("cannot resolve: output {output} of input {input} is not built")]
    Unbuilt {
        /// The input derivation.
        input: String,
        /// The output.
        output: String,
    },
    /// Nix's resolution rules refused the derivation.
    #[error("cannot resolve: {0}")]
    Derivation(Box<DerivationError>),
}

/// A demanded step's derivation, checked to be the step's.
#[derive(Debug)]
pub struct ToResolve {
    store_dir: StoreDir,
    derivation: Derivation,
}

/// A step resolved: the derivation built in its place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The resolved derivation's path.
    pub to: DrvPath,
    /// Its ATerm text, as the worker that builds it writes it.
    pub text: Arc<Vec<u8>>,
    /// Its outputs in output-name order, as a demand lists them (`name=path`, the path empty
    /// for a floating output).
    pub outputs: Vec<String>,
}

impl From<DerivationError> for ResolutionError {
    fn from(e: DerivationError) -> ResolutionError {
        ResolutionError::Derivation(Box::new(e))
    }
}

impl ToResolve {
    /// Take `text` as step `drv`'s derivation, if it is: at most [`MAX_DERIVATION_TEXT`]
    /// bytes, a derivation, and one whose text path is `drv` (in `drv`'s store directory; see
    /// [`Derivation::parse_checked`]).
    pub fn check(drv: &DrvPath, text: &[u8]) -> Result<ToResolve, ResolutionError> {
        if text.len() > MAX_DERIVATION_TEXT {
            return Err(ResolutionError::TooLarge {
                drv: drv.clone(),
                size: text.len(),
            });
        }
        let path_error = |source| ResolutionError::Path {
            drv: drv.clone(),
            source,
        };
        let dir = std::path::Path::new(drv.as_str())
            .parent()
            .and_then(|d| d.to_str())
            .unwrap_or_default();
        let store_dir = StoreDir::new(dir).map_err(path_error)?;
        let path = store_dir.parse(drv.as_str()).map_err(path_error)?;
        let derivation = Derivation::parse_checked(&store_dir, &path, text).map_err(|source| {
            ResolutionError::Parse {
                drv: drv.clone(),
                source: Box::new(source),
            }
        })?;
        Ok(ToResolve {
            store_dir,
            derivation,
        })
    }

    /// Resolve it with the outputs of its inputs: `built(input)` gives an input step's
    /// output paths by output name, if it is built.
    pub fn resolve(
        &self,
        mut built: impl FnMut(&DrvPath) -> Option<BTreeMap<String, String>>,
    ) -> Result<Resolved, ResolutionError> {
        let store = &self.store_dir;
        let mut unbuilt = None;
        let basic = self.derivation.try_resolve(store, |input, output| {
            let path = built(&DrvPath::from(store.print(input)))
                .and_then(|outputs| outputs.get(output).cloned())
                .and_then(|p| store.parse(&p).ok());
            if path.is_none() && unbuilt.is_none() {
                unbuilt = Some((store.print(input), output.to_owned()));
            }
            path
        })?;
        let Some(basic) = basic else {
            let (input, output) = unbuilt.unwrap_or_default();
            return Err(ResolutionError::Unbuilt { input, output });
        };
        let resolved = Derivation::from(basic);
        let to = resolved.drv_path(store)?;
        let outputs = resolved
            .outputs
            .iter()
            .map(|(name, output)| {
                expected_outputs::entry(name, output.path().map(|p| store.print(p)).as_deref())
            })
            .collect();
        Ok(Resolved {
            to: DrvPath::from(store.print(&to)),
            text: Arc::new(resolved.to_aterm(store)),
            outputs,
        })
    }
}

/// The output paths of derivation `drv` by output name, from the paths alone: an output's
/// path is named after the derivation, with `-<output>` for outputs other than `out`.
pub fn outputs_by_name(drv: &DrvPath, paths: &[String]) -> BTreeMap<String, String> {
    let name = drv.as_str().rsplit('/').next().unwrap_or_default();
    let name = name.split_once('-').map_or(name, |(_, n)| n);
    let name = name.strip_suffix(".drv").unwrap_or(name);
    paths
        .iter()
        .filter_map(|p| {
            let base = p.rsplit('/').next()?;
            let path_name = base.split_once('-')?.1;
            let output = match path_name.strip_prefix(name)? {
                "" => "out",
                rest => rest.strip_prefix('-')?,
            };
            Some((output.to_owned(), p.clone()))
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const STORE: &str = "/nix/store";

    /// A floating content-addressed derivation `name` using output `out` of each of `inputs`
    /// (in its builder's arguments, by their downstream placeholders), and its path.
    pub(crate) fn ca(name: &str, inputs: &[&DrvPath]) -> (DrvPath, Vec<u8>) {
        let store = StoreDir::new(STORE).unwrap();
        let mut text = String::from("Derive([(\"out\",\"\",\"r:sha256\",\"\")],[");
        let inputs: Vec<String> = inputs.iter().map(|i| i.to_string()).collect();
        let mut sorted = inputs.clone();
        sorted.sort();
        text.push_str(
            &sorted
                .iter()
                .map(|i| format!("(\"{i}\",[\"out\"])"))
                .collect::<Vec<_>>()
                .join(","),
        );
        let args: Vec<String> = inputs
            .iter()
            .map(|i| {
                let p = store.parse(i).unwrap();
                format!(
                    "\"{}\"",
                    nixspace_nix_formats::derivation::downstream_placeholder(&p, "out")
                )
            })
            .collect();
        text.push_str(&format!(
            "],[],\"x86_64-linux\",\"/bin/sh\",[{}],[(\"out\",\"{}\")])",
            args.join(","),
            nixspace_nix_formats::derivation::hash_placeholder("out")
        ));
        let drv = Derivation::parse(&store, name, text.as_bytes()).unwrap();
        let path = store.print(&drv.drv_path(&store).unwrap());
        (DrvPath::from(path), drv.to_aterm(&store))
    }

    #[test]
    fn a_step_is_resolved_with_its_inputs_outputs() {
        let (a, _) = ca("a", &[]);
        let (b, text) = ca("b", &[&a]);
        let step = ToResolve::check(&b, &text).unwrap();
        let out = format!("{STORE}/00000000000000000000000000000000-a");
        let unbuilt = step.resolve(|_| None).unwrap_err();
        assert!(
            matches!(unbuilt, ResolutionError::Unbuilt { .. }),
            "{unbuilt}"
        );
        let resolved = step
            .resolve(|d| (*d == a).then(|| BTreeMap::from([("out".into(), out.clone())])))
            .unwrap();
        let text = String::from_utf8(resolved.text.to_vec()).unwrap();
        assert!(text.contains(&format!("[\"{out}\"]")), "{text}");
        assert!(!text.contains(a.as_str()), "{text}");
        assert_eq!(resolved.outputs, ["out="]);
        // The same inputs' outputs give the same derivation.
        let again = step
            .resolve(|d| (*d == a).then(|| BTreeMap::from([("out".into(), out.clone())])))
            .unwrap();
        assert_eq!(again, resolved);
    }

    #[test]
    fn outputs_are_named_from_their_paths() {
        let drv = DrvPath::from("/nix/store/00000000000000000000000000000000-foo-1.0.drv");
        let paths = [
            "/nix/store/11111111111111111111111111111111-foo-1.0".to_owned(),
            "/nix/store/22222222222222222222222222222222-foo-1.0-dev".to_owned(),
            "/nix/store/33333333333333333333333333333333-bar".to_owned(),
        ];
        assert_eq!(
            outputs_by_name(&drv, &paths),
            BTreeMap::from([
                ("out".to_owned(), paths[0].clone()),
                ("dev".to_owned(), paths[1].clone()),
            ])
        );
    }

    #[test]
    fn only_the_steps_own_text_is_taken() {
        let (a, a_text) = ca("a", &[]);
        let (b, b_text) = ca("b", &[&a]);
        // Positive control: each text is its own step's.
        assert!(ToResolve::check(&a, &a_text).is_ok());
        assert!(ToResolve::check(&b, &b_text).is_ok());
        let other = ToResolve::check(&b, &a_text).unwrap_err();
        assert!(matches!(other, ResolutionError::Parse { .. }), "{other}");
        // Another derivation of the same name.
        let (_, lookalike) = ca("b", &[]);
        let wrong = ToResolve::check(&b, &lookalike).unwrap_err();
        assert!(
            matches!(
                wrong,
                ResolutionError::Parse { ref source, .. }
                    if matches!(**source, DerivationError::NotItsText { .. })
            ),
            "{wrong}"
        );
        assert!(matches!(
            ToResolve::check(&b, b"not a derivation").unwrap_err(),
            ResolutionError::Parse { .. }
        ));
        let huge = vec![b' '; MAX_DERIVATION_TEXT + 1];
        assert!(matches!(
            ToResolve::check(&b, &huge).unwrap_err(),
            ResolutionError::TooLarge { .. }
        ));
    }
}
