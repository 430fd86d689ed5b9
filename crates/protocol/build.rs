//! Compile `schemas/*.prs` into Rust: text → binary bundle (our converter) →
//! Rust types (the preserves-schema compiler with Syndicate's pattern plugin).

use std::path::PathBuf;

use preserves_schema::compiler::{
    compile, expand_inputs, CodeCollector, CompilerConfig, ExternalModule,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").ok_or("no CARGO_MANIFEST_DIR")?);
    let out = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("no OUT_DIR")?);
    let schemas = manifest.join("../../schemas");
    println!("cargo:rerun-if-changed={}", schemas.display());
    for entry in std::fs::read_dir(&schemas)? {
        println!("cargo:rerun-if-changed={}", entry?.path().display());
    }

    let bundle = out.join("nixspace.prb");
    nixspace_schema_text::write_bundle(&schemas, &bundle)?;

    let mut config = CompilerConfig::new("crate::schemas".to_owned());
    config
        .plugins
        .push(Box::new(syndicate_schema_plugin::PatternPlugin {
            syndicate_crate: "syndicate".to_owned(),
        }));
    config.add_external_module(ExternalModule::new(
        vec!["EntityRef".to_owned()],
        "syndicate::actor",
    ));
    let inputs = expand_inputs(&vec![bundle.to_string_lossy().into_owned()])?;
    config.load_schemas_and_bundles(&inputs, &vec![])?;
    compile(&config, &mut CodeCollector::files(out.join("src/schemas")))?;
    Ok(())
}
