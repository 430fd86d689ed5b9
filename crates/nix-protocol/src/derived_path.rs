//! Derived paths: what `BuildPaths` and friends ask for, an existing path
//! ([`DerivedPath::Opaque`]) or outputs of a derivation ([`DerivedPath::Built`] with an
//! [`OutputSpec`]). Their wire form is a string whose syntax changed at 1.30.

use std::collections::BTreeSet;

use nixspace_nix_formats::store_path::{StoreDir, StorePath};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::version::{ProtocolVersion, DERIVED_PATH_STRINGS};
use crate::wire::{NixDeserialize, NixReader, NixSerialize, NixWriter, WireError};

/// Which outputs of a derivation a request wants.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OutputSpec {
    /// Every output (`drv!*`).
    All,
    /// The named outputs (`drv!out,dev`); never empty.
    Names(BTreeSet<String>),
}

/// Something to build or make valid: an existing path, or outputs of a derivation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DerivedPath {
    /// A store path that must be valid (substituted if need be).
    Opaque(StorePath),
    /// Outputs of a derivation that must be built or substituted.
    Built {
        /// The `.drv` path.
        drv_path: StorePath,
        /// The wanted outputs.
        outputs: OutputSpec,
    },
}

fn valid_output_name(s: &str) -> bool {
    !s.is_empty() && !s.contains([',', '!', '*'])
}

impl DerivedPath {
    /// The wire form at `version`, with paths printed in `store_dir`: from 1.30 `path`,
    /// `drv!*` or `drv!a,b`; before that the "path with outputs" form, where all outputs are
    /// the bare `.drv` path and an opaque `.drv` cannot be expressed. Writing a
    /// [`DerivedPath`] to a [`NixWriter`] uses the writer's version and store directory.
    pub fn to_wire_string(
        &self,
        store_dir: &StoreDir,
        version: ProtocolVersion,
    ) -> Result<String, WireError> {
        let new_form = version >= DERIVED_PATH_STRINGS;
        Ok(match self {
            DerivedPath::Opaque(p) if !new_form && p.is_derivation() => {
                return Err(WireError::NotAtThisVersion {
                    what: "an opaque .drv path",
                    version,
                })
            }
            DerivedPath::Opaque(p) => store_dir.print(p),
            DerivedPath::Built {
                drv_path,
                outputs: OutputSpec::All,
            } if new_form => format!("{}!*", store_dir.print(drv_path)),
            DerivedPath::Built {
                drv_path,
                outputs: OutputSpec::All,
            } => store_dir.print(drv_path),
            DerivedPath::Built {
                drv_path,
                outputs: OutputSpec::Names(names),
            } => {
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                format!("{}!{}", store_dir.print(drv_path), names.join(","))
            }
        })
    }

    /// Parses the wire form at `version`, with paths in `store_dir` (see
    /// [`DerivedPath::to_wire_string`]).
    pub fn parse_wire(
        s: &str,
        store_dir: &StoreDir,
        version: ProtocolVersion,
    ) -> Result<Self, WireError> {
        let invalid = || WireError::InvalidString {
            what: "derived path",
            value: s.to_owned(),
        };
        let path = |p: &str| {
            store_dir.parse(p).map_err(|source| WireError::StorePath {
                what: "derived path",
                source,
            })
        };
        match s.split_once('!') {
            None if version < DERIVED_PATH_STRINGS && s.ends_with(".drv") => {
                Ok(DerivedPath::Built {
                    drv_path: path(s)?,
                    outputs: OutputSpec::All,
                })
            }
            None => Ok(DerivedPath::Opaque(path(s)?)),
            Some((drv, "*")) if version >= DERIVED_PATH_STRINGS => Ok(DerivedPath::Built {
                drv_path: path(drv)?,
                outputs: OutputSpec::All,
            }),
            Some((drv, outs)) => {
                let names: BTreeSet<String> = outs.split(',').map(str::to_owned).collect();
                if !names.iter().all(|n| valid_output_name(n)) {
                    return Err(invalid());
                }
                Ok(DerivedPath::Built {
                    drv_path: path(drv)?,
                    outputs: OutputSpec::Names(names),
                })
            }
        }
    }
}

impl NixDeserialize for DerivedPath {
    async fn read_from<R: AsyncRead + Unpin + Send>(
        r: &mut NixReader<R>,
    ) -> Result<Self, WireError> {
        let s = r.read_string("derived path").await?;
        DerivedPath::parse_wire(&s, r.store_dir(), r.version())
    }
}

impl NixSerialize for DerivedPath {
    async fn write_to<W: AsyncWrite + Unpin + Send>(
        &self,
        w: &mut NixWriter<W>,
    ) -> Result<(), WireError> {
        let s = self.to_wire_string(w.store_dir(), w.version())?;
        w.write_str(&s, "derived path").await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::{MIN_SUPPORTED, NIX_2_8};
    use nixspace_nix_formats::store_path::StorePathError;

    const DRV: &str = "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello.drv";

    #[test]
    fn derived_path_forms() {
        let dir = StoreDir::default();
        let drv = dir.parse(DRV).unwrap();
        let all = DerivedPath::Built {
            drv_path: drv.clone(),
            outputs: OutputSpec::All,
        };
        assert_eq!(
            all.to_wire_string(&dir, NIX_2_8).unwrap(),
            format!("{DRV}!*")
        );
        assert_eq!(all.to_wire_string(&dir, MIN_SUPPORTED).unwrap(), DRV);
        assert_eq!(
            DerivedPath::parse_wire(DRV, &dir, MIN_SUPPORTED).unwrap(),
            all
        );
        assert_eq!(
            DerivedPath::parse_wire(&format!("{DRV}!*"), &dir, NIX_2_8).unwrap(),
            all
        );
        let opaque = DerivedPath::Opaque(drv);
        assert_eq!(DerivedPath::parse_wire(DRV, &dir, NIX_2_8).unwrap(), opaque);
        assert!(opaque
            .to_wire_string(&dir, ProtocolVersion::new(1, 29))
            .is_err());
        let outs = DerivedPath::parse_wire(&format!("{DRV}!out,dev"), &dir, NIX_2_8).unwrap();
        assert_eq!(
            outs.to_wire_string(&dir, MIN_SUPPORTED).unwrap(),
            format!("{DRV}!dev,out")
        );
        assert!(DerivedPath::parse_wire(&format!("{DRV}!"), &dir, NIX_2_8).is_err());
        assert!(DerivedPath::parse_wire(&format!("{DRV}!a,,b"), &dir, NIX_2_8).is_err());
        // Paths are printed and parsed in the given store directory.
        let tmp = StoreDir::new("/tmp/store").unwrap();
        let moved = all.to_wire_string(&tmp, NIX_2_8).unwrap();
        assert_eq!(
            moved,
            "/tmp/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello.drv!*"
        );
        assert_eq!(DerivedPath::parse_wire(&moved, &tmp, NIX_2_8).unwrap(), all);
        assert!(matches!(
            DerivedPath::parse_wire(&moved, &dir, NIX_2_8),
            Err(WireError::StorePath {
                what: "derived path",
                source: StorePathError::NotInStore { .. }
            })
        ));
    }
}
