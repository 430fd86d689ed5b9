//! Bundles we produce are accepted by the `preserves-schema` compiler.
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use preserves::Map;
use preserves_schema::compiler::types::Purpose;
use preserves_schema::compiler::{
    compile, load_schema_or_bundle_bin, CodeCollector, CodeModuleCollector, CompilerConfig,
    ExternalModule,
};
use preserves_schema::gen::schema::Schema;

fn load(bytes: &[u8]) -> Map<Vec<String>, Schema> {
    let mut modules = Map::new();
    let was_schema =
        load_schema_or_bundle_bin(&mut modules, "unused", bytes).expect("loader accepts it");
    assert!(!was_schema, "expected a bundle, not a single schema");
    modules
}

#[test]
fn syndicate_bundle_loads_like_the_official_one() {
    let protocols = common::crate_dir("syndicate").join("protocols");
    let ours = nixspace_schema_text::bundle_from_dir(&protocols.join("schemas")).expect("compile");
    let theirs = std::fs::read(protocols.join("schema-bundle.bin")).expect("read official");
    let (ours, theirs) = (load(&ours), load(&theirs));
    assert_eq!(ours.len(), 16);
    assert_eq!(ours, theirs);
}

const FEATURES: &str = r#"
version 1 .
embeddedType EntityRef.Cap .   ; an old-style comment

# Every pattern form of the text syntax.
Everything = <everything
    @flag bool @ratio double @count int @label string @blob bytes @tag symbol @whatever any
    @fixed =fixed @zero 0 @text "text" @handle #:any
    @list [int ...] @bag #{string} @table {symbol: Thing ...:...}
    [@first int @second string]
    [=pair @head int @tail string ...]
    { x: int y: int "z": @z int }
    @other other.Thing
    @rest any ...> .
Thing = @red =red / <green> / @blue <<rec> =blue [@shade int]> / Literal / @literal <<lit> 7> .
Literal = <<lit> "seven"> .
Both = { a: int } & @b BeeField .
BeeField = @present { b: int } / @absent {} .
"#;

const OTHER: &str = "version 1 .\nThing = <thing @value int> .\n";

#[test]
fn feature_schema_round_trips_and_generates_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("features.prs"), FEATURES).expect("write");
    std::fs::write(dir.path().join("other.prs"), OTHER).expect("write");
    let out = dir.path().join("out/bundle.prb");
    std::fs::create_dir_all(out.parent().expect("parent")).expect("mkdir");
    nixspace_schema_text::write_bundle(dir.path(), &out).expect("write bundle");
    let bytes = std::fs::read(&out).expect("read bundle");
    let modules = load(&bytes);
    let features = &modules[&vec!["features".to_owned()]];
    let names: Vec<&str> = features.definitions.0.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ["BeeField", "Both", "Everything", "Literal", "Thing"]
    );

    // The Rust code generator accepts every definition.
    let mut config = CompilerConfig::new("crate::schemas".to_owned());
    for (path, schema) in modules {
        config.bundle.insert(path, (schema, Purpose::Codegen));
    }
    config.add_external_module(ExternalModule::new(
        vec!["EntityRef".to_owned()],
        "crate::entity_ref",
    ));
    let mut generated = Vec::<(Option<Vec<String>>, String)>::new();
    let mut collect = |module: Option<&Vec<String>>, code: &str| {
        generated.push((module.cloned(), code.to_owned()));
        Ok(())
    };
    let mut collector = CodeCollector {
        emit_mod_declarations: false,
        collect_module: CodeModuleCollector::Custom {
            collect_output: &mut collect,
        },
    };
    compile(&config, &mut collector).expect("code generation");
    let code: String = generated.iter().map(|(_, c)| c.as_str()).collect();
    assert!(code.contains("pub struct Everything"), "{code}");
    assert!(code.contains("pub enum Thing"), "{code}");

    // Writing the same bundle again leaves the file alone.
    let modified = std::fs::metadata(&out)
        .and_then(|m| m.modified())
        .expect("mtime");
    nixspace_schema_text::write_bundle(dir.path(), &out).expect("write bundle again");
    let again = std::fs::metadata(&out)
        .and_then(|m| m.modified())
        .expect("mtime");
    assert_eq!(modified, again);
}
