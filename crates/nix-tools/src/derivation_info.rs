//! What `nix show-derivation -r` says about a derivation closure.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::command::{command_line, run, NixError};

/// The facts about one derivation that scheduling needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DerivationInfo {
    /// The platform it builds on.
    pub system: String,
    /// Its `requiredSystemFeatures`.
    pub features: Vec<String>,
    /// The derivations it depends on.
    pub input_drvs: Vec<String>,
    /// Output name → path (`None` for floating content-addressed outputs).
    pub outputs: BTreeMap<String, Option<String>>,
}

#[derive(Deserialize)]
struct RawDerivation {
    system: String,
    #[serde(rename = "inputDrvs", default)]
    input_drvs: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    outputs: BTreeMap<String, RawOutput>,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct RawOutput {
    path: Option<String>,
}

/// Every derivation in the closure of `drvs`, keyed by `.drv` path.
pub async fn show_derivations(
    drvs: &[String],
) -> Result<BTreeMap<String, DerivationInfo>, NixError> {
    let mut args = vec![
        "--extra-experimental-features".to_owned(),
        "nix-command".to_owned(),
        "show-derivation".to_owned(),
        "--recursive".to_owned(),
    ];
    args.extend(drvs.iter().cloned());
    let json = run("nix", &args).await?;
    let raw: BTreeMap<String, RawDerivation> =
        serde_json::from_str(&json).map_err(|e| NixError::Output {
            command: command_line("nix", &args),
            detail: e.to_string(),
        })?;
    Ok(raw
        .into_iter()
        .map(|(path, d)| {
            let features = d
                .env
                .get("requiredSystemFeatures")
                .map(|f| f.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default();
            let info = DerivationInfo {
                system: d.system,
                features,
                input_drvs: d.input_drvs.into_keys().collect(),
                outputs: d.outputs.into_iter().map(|(n, o)| (n, o.path)).collect(),
            };
            (path, info)
        })
        .collect())
}
