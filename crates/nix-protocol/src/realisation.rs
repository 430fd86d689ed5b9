//! [`Realisation`]: the recorded output of a derivation (for content-addressed ones, where
//! the path is known only after the build). On the wire it is a JSON string.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::wire::{NixDeserialize, NixReader, NixSerialize, NixWriter, WireError};

/// The output of a content-addressed (or any) derivation, as recorded by Nix. On the wire it
/// is a JSON string (in build results from 1.28, in `QueryRealisation` from 1.31); the JSON
/// keys are printed in Nix's (sorted) order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Realisation {
    /// Realisations this one depends on: `DrvOutput` id to store path.
    #[serde(rename = "dependentRealisations", default)]
    pub dependent_realisations: BTreeMap<String, String>,
    /// `sha256:<hex>!<output name>`.
    pub id: String,
    /// The output path (Nix 2.8 prints the base name, without the store directory).
    #[serde(rename = "outPath")]
    pub out_path: String,
    /// Signatures.
    #[serde(default)]
    pub signatures: BTreeSet<String>,
}

impl NixDeserialize for Realisation {
    async fn read_from<R: AsyncRead + Unpin + Send>(
        r: &mut NixReader<R>,
    ) -> Result<Self, WireError> {
        let s = r.read_string("realisation").await?;
        serde_json::from_str(&s).map_err(|source| WireError::Json {
            what: "realisation",
            source,
        })
    }
}

impl NixSerialize for Realisation {
    async fn write_to<W: AsyncWrite + Unpin + Send>(
        &self,
        w: &mut NixWriter<W>,
    ) -> Result<(), WireError> {
        let s = serde_json::to_string(self).map_err(|source| WireError::Json {
            what: "realisation",
            source,
        })?;
        w.write_str(&s, "realisation").await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn realisation_json_matches_nix_key_order() {
        let r = Realisation {
            dependent_realisations: BTreeMap::new(),
            id: "sha256:00!out".into(),
            out_path: "x".into(),
            signatures: BTreeSet::new(),
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"dependentRealisations":{},"id":"sha256:00!out","outPath":"x","signatures":[]}"#
        );
    }
}
