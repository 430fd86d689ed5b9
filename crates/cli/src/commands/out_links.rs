//! `nixspace build`'s out-links, named and made as `nix-build` names and makes them: the
//! first root's at the out-link path (`result`), each further derivation's at
//! `<path>-2`, `<path>-3`… in the order evaluated, with `-<output>` added for an output other
//! than `out`; each is an indirect garbage collector root.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use nixspace_nix_tools::{add_perm_root, DaemonPool, GcRootError};

/// One link to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutLink {
    /// Where the link goes.
    pub link: PathBuf,
    /// The derivation whose output it points to.
    pub drv: String,
    /// The output's name.
    pub output: String,
}

/// The links for `selected` (derivation, output), in evaluation order, under `base`: one
/// prefix per distinct derivation, as `nix-build` counts them.
pub fn out_links(base: &Path, selected: &[(String, String)]) -> Vec<OutLink> {
    let mut prefixes: BTreeMap<&str, String> = BTreeMap::new();
    let base = base.to_string_lossy();
    selected
        .iter()
        .map(|(drv, output)| {
            let count = prefixes.len();
            let prefix = prefixes.entry(drv).or_insert_with(|| match count {
                0 => base.to_string(),
                n => format!("{base}-{}", n + 1),
            });
            let link = match output.as_str() {
                "out" => prefix.clone(),
                other => format!("{prefix}-{other}"),
            };
            OutLink {
                link: PathBuf::from(link),
                drv: drv.clone(),
                output: output.clone(),
            }
        })
        .collect()
}

/// Make each link point to `path`, registered as a root with the store of `pool`.
pub async fn make(pool: &DaemonPool, links: &[(OutLink, String)]) -> Result<(), GcRootError> {
    for (link, path) in links {
        add_perm_root(pool, path, &link.link).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(selected: &[(&str, &str)]) -> Vec<String> {
        let selected: Vec<(String, String)> = selected
            .iter()
            .map(|(d, o)| (d.to_string(), o.to_string()))
            .collect();
        out_links(Path::new("result"), &selected)
            .into_iter()
            .map(|l| l.link.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn links_are_named_as_nix_build_names_them() {
        assert_eq!(names(&[("a.drv", "out")]), ["result"]);
        assert_eq!(
            names(&[("a.drv", "out"), ("b.drv", "out"), ("c.drv", "dev")]),
            ["result", "result-2", "result-3-dev"]
        );
        // Two outputs of one derivation share its prefix.
        assert_eq!(
            names(&[("a.drv", "dev"), ("a.drv", "out"), ("b.drv", "lib")]),
            ["result-dev", "result", "result-2-lib"]
        );
    }
}
