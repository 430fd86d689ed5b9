//! A release expression's jobs as `evaluate_jobs` finds them with the real `nix-instantiate`:
//! Hydra's walk (every nested set, names with a dot or a space skipped, `null` no job,
//! throwing values in error), the `--arg`s of a function, and `-A` selections.
// The workspace denies unwrap and expect outside tests; clippy counts only `#[test]`
// functions as tests, not the helpers of a test crate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use nixspace_nix_tools::{evaluate_jobs, EvaluatedJob, Evaluation, FunctionArg};
use nixspace_test_support::unique;

/// A release expression: a function of `prefix` and `extra` whose jobs are `sh` steps.
fn release(dir: &Path) -> std::path::PathBuf {
    let file = dir.join("release.nix");
    std::fs::write(
        &file,
        format!(
            r#"{{ prefix, extra ? "none" }}:
let sh = name: derivation {{
  name = "${{prefix}}-${{name}}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo {} ${{extra}} > $out" ];
}}; in {{
  top = sh "top";
  nested = {{ deeper = {{ leaf = sh "leaf"; }}; nothing = null; }};
  "with.dot" = sh "dot";
  "with space" = sh "space";
  broken = throw "no";
  number = 3;
}}"#,
            unique("jobs")
        ),
    )
    .unwrap();
    file
}

fn names(jobs: &[EvaluatedJob]) -> Vec<(&str, bool)> {
    jobs.iter()
        .map(|j| (j.name.as_str(), j.drv.is_some()))
        .collect()
}

#[tokio::test]
async fn jobs_are_found_as_hydra_walks_a_release_expression() {
    let conf = tempfile::tempdir().unwrap();
    nixspace_test_support::write_nix_conf(conf.path()).unwrap();
    std::env::set_var("NIX_CONF_DIR", conf.path());
    let dir = tempfile::tempdir().unwrap();
    let evaluation = Evaluation {
        file: release(dir.path()),
        attrs: Vec::new(),
        args: vec![FunctionArg::Str {
            name: "prefix".into(),
            value: "p".into(),
        }],
        search_path: Vec::new(),
    };
    let jobs = evaluate_jobs(&evaluation).await.unwrap();
    assert_eq!(
        names(&jobs),
        [
            ("broken", false),
            ("nested.deeper.leaf", true),
            ("number", false),
            ("top", true)
        ]
    );
    // Each job's derivation is written to the store, named as the function's argument says.
    let leaf = jobs[1].drv.as_deref().unwrap();
    assert!(leaf.ends_with("-p-leaf.drv"), "{leaf}");
    assert!(Path::new(leaf).exists());

    // `-A` selects a part, whose jobs are named under it.
    let selected = Evaluation {
        attrs: vec!["nested.deeper".into()],
        ..evaluation.clone()
    };
    let jobs = evaluate_jobs(&selected).await.unwrap();
    assert_eq!(names(&jobs), [("nested.deeper.leaf", true)]);

    // A function's missing argument fails the evaluation with Nix's message.
    let unapplied = Evaluation {
        args: Vec::new(),
        ..evaluation
    };
    let error = evaluate_jobs(&unapplied).await.unwrap_err().to_string();
    assert!(error.contains("prefix"), "{error}");
}
