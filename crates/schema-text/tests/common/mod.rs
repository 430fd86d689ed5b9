//! Shared helpers: locating the sources of crates the workspace depends on.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// The source directory of the package `name`, found with `cargo metadata`.
pub fn crate_dir(name: &str) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(
        output.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("parse cargo metadata");
    let packages = metadata["packages"].as_array().expect("packages array");
    let manifest = packages
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["manifest_path"].as_str())
        .unwrap_or_else(|| panic!("package {name} not in cargo metadata"));
    PathBuf::from(manifest)
        .parent()
        .expect("manifest has a parent")
        .to_owned()
}

/// Decodes a binary Preserves file into a value.
pub fn read_bin(path: &std::path::Path) -> preserves::IOValue {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    preserves::read_iovalue_packed(&bytes, false).expect("decode binary preserves")
}
