//! Evaluating a Nix file into derivations with the local `nix-instantiate`, taking the
//! arguments `nix-build` takes (`-A`, `--arg`, `--argstr`, `-I`) and reading back which
//! derivation and output each selected value stands for ([`instantiate`]), or the named jobs
//! of a release expression as Hydra finds them ([`evaluate_jobs`]).

use std::path::PathBuf;

use crate::command::{run, NixError};

/// A value passed to the function a Nix file evaluates to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FunctionArg {
    /// `--arg NAME EXPR`: a Nix expression.
    Expr {
        /// The argument's name.
        name: String,
        /// The expression.
        expr: String,
    },
    /// `--argstr NAME VALUE`: a string.
    Str {
        /// The argument's name.
        name: String,
        /// The string.
        value: String,
    },
}

/// What to evaluate: a file, the attributes to select, the function's arguments and extra
/// search path entries, as `nix-build` takes them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Evaluation {
    /// The Nix file (or directory holding `default.nix`).
    pub file: PathBuf,
    /// `-A` paths; none selects the file's value itself.
    pub attrs: Vec<String>,
    /// `--arg` and `--argstr`, in order.
    pub args: Vec<FunctionArg>,
    /// `-I` entries (`PATH` or `name=PATH`), in order.
    pub search_path: Vec<String>,
}

impl Evaluation {
    /// The `nix-instantiate` command line for this evaluation.
    fn command_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for entry in &self.search_path {
            args.extend(["-I".to_owned(), entry.clone()]);
        }
        for arg in &self.args {
            let (flag, name, value) = match arg {
                FunctionArg::Expr { name, expr } => ("--arg", name, expr),
                FunctionArg::Str { name, value } => ("--argstr", name, value),
            };
            args.extend([flag.to_owned(), name.clone(), value.clone()]);
        }
        for attr in &self.attrs {
            args.extend(["-A".to_owned(), attr.clone()]);
        }
        args.push(self.file.to_string_lossy().into_owned());
        args
    }
}

/// One derivation `nix-instantiate` printed, and the output the selected value stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instantiated {
    /// The `.drv` path.
    pub drv: String,
    /// The output (`out` unless the value selected another, such as `pkg.dev`).
    pub output: String,
}

impl Instantiated {
    /// Read one line of `nix-instantiate`'s output: `DRV` or `DRV!OUTPUT`.
    fn parse(line: &str) -> Instantiated {
        match line.split_once('!') {
            Some((drv, output)) => Instantiated {
                drv: drv.to_owned(),
                output: output.to_owned(),
            },
            None => Instantiated {
                drv: line.to_owned(),
                output: "out".to_owned(),
            },
        }
    }
}

/// Evaluate `evaluation` into its derivations, in the order `nix-instantiate` prints them
/// (one per selected value).
pub async fn instantiate(evaluation: &Evaluation) -> Result<Vec<Instantiated>, NixError> {
    let out = run("nix-instantiate", &evaluation.command_args()).await?;
    Ok(out
        .lines()
        .filter(|l| !l.is_empty())
        .map(Instantiated::parse)
        .collect())
}

/// A job of a release expression: its attribute path and its derivation (`None`: evaluating
/// it threw, as `builtins.tryEval` catches, or it is neither a derivation, an attribute set
/// nor null).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct EvaluatedJob {
    /// The attribute path (`tests.unit`).
    pub name: String,
    /// The `.drv` path, written to the store.
    pub drv: Option<String>,
}

/// The walk over a release expression, as hydra-eval-jobs walks it: a derivation is a job;
/// an attribute set that is not a derivation is recursed into, all of its attributes (not only
/// those of sets marked `recurseForDerivations`), in lexicographic order, skipping names with
/// a dot or a space; `null` is nothing; anything else, or a value whose evaluation throws, is
/// a job in error. Applied to the file's value (called with the `--arg`s when it is a
/// function) after the `-A` selections. `nix-instantiate --eval` calls the walk's function
/// only when it is given an argument: it always gets [`WALK_MARKER`].
const JOBS_WALK: &str = r#"
{ ... }@given:
let
  args = builtins.removeAttrs given [ "MARKER" ];
  file = import FILE;
  called = if builtins.isFunction file
    then file (if builtins.functionArgs file == { } then args
               else builtins.intersectAttrs (builtins.functionArgs file) args)
    else file;
  broken = path: [ { name = path; drv = null; } ];
  join = path: n: if path == "" then n else "${path}.${n}";
  walk = path: v:
    if v == null then [ ]
    else if builtins.isAttrs v && (v.type or null) == "derivation" then
      let d = builtins.tryEval v.drvPath; in
      [ { name = if path == "" then v.name or "job" else path; drv = if d.success then d.value else null; } ]
    else if builtins.isAttrs v then
      builtins.concatLists (map
        (n: let c = builtins.tryEval v.${n}; in if c.success then walk (join path n) c.value else broken (join path n))
        (builtins.filter (n: builtins.match ".*[. ].*" n == null) (builtins.attrNames v)))
    else broken path;
  select = path: builtins.foldl' (v: n: v.${n}) called path;
in
  if SELECTIONS == [ ] then walk "" called
  else builtins.concatLists (map (p: walk (builtins.concatStringsSep "." p) (select p)) SELECTIONS)
"#;

/// The argument the walk always gets, left out of the file's.
const WALK_MARKER: &str = "__nixspaceJobsWalk";

/// `text` as a Nix string literal.
fn nix_string(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for c in text.chars() {
        match c {
            '\\' | '"' | '$' => {
                quoted.push('\\');
                quoted.push(c);
            }
            '\n' => quoted.push_str("\\n"),
            _ => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

/// Evaluate `evaluation`'s file as a release expression: the derivations of every job (see
/// [`JOBS_WALK`]) are written to the store, and the jobs returned in walk order. Each `-A`
/// selects a part of the file's value (dots separate attribute names) whose jobs are named
/// under it.
pub async fn evaluate_jobs(evaluation: &Evaluation) -> Result<Vec<EvaluatedJob>, NixError> {
    let file = std::path::absolute(&evaluation.file).map_err(|e| NixError::Output {
        command: "nix-instantiate --eval".to_owned(),
        detail: format!("{}: {e}", evaluation.file.display()),
    })?;
    let selections: Vec<String> = evaluation
        .attrs
        .iter()
        .map(|a| {
            let names: Vec<String> = a.split('.').map(nix_string).collect();
            format!("[ {} ]", names.join(" "))
        })
        .collect();
    let walk = JOBS_WALK
        .replace("MARKER", WALK_MARKER)
        .replace("FILE", &nix_string(&file.to_string_lossy()))
        .replace("SELECTIONS", &format!("[ {} ]", selections.join(" ")));
    let dir = tempfile::tempdir().map_err(|e| NixError::Output {
        command: "nix-instantiate --eval".to_owned(),
        detail: format!("cannot make a temporary directory: {e}"),
    })?;
    let walker = dir.path().join("jobs.nix");
    std::fs::write(&walker, walk).map_err(|e| NixError::Output {
        command: "nix-instantiate --eval".to_owned(),
        detail: format!("cannot write {}: {e}", walker.display()),
    })?;
    let mut args = evaluation.args.clone();
    args.push(FunctionArg::Expr {
        name: WALK_MARKER.to_owned(),
        expr: "true".to_owned(),
    });
    let wrapped = Evaluation {
        file: walker,
        attrs: Vec::new(),
        args,
        search_path: evaluation.search_path.clone(),
    };
    // Read-write: the walk writes each job's `.drv` into the store.
    let mut args = vec![
        "--eval".to_owned(),
        "--strict".to_owned(),
        "--json".to_owned(),
        "--read-write-mode".to_owned(),
    ];
    args.extend(wrapped.command_args());
    let out = run("nix-instantiate", &args).await?;
    serde_json::from_str(&out).map_err(|e| NixError::Output {
        command: "nix-instantiate --eval --json".to_owned(),
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_passes_every_argument_before_the_file() {
        let evaluation = Evaluation {
            file: PathBuf::from("f.nix"),
            attrs: vec!["a".into(), "b.dev".into()],
            args: vec![
                FunctionArg::Expr {
                    name: "n".into(),
                    expr: "3".into(),
                },
                FunctionArg::Str {
                    name: "name".into(),
                    value: "x y".into(),
                },
            ],
            search_path: vec!["foo=/dir".into(), "/other".into()],
        };
        assert_eq!(
            evaluation.command_args(),
            [
                "-I", "foo=/dir", "-I", "/other", "--arg", "n", "3", "--argstr", "name", "x y",
                "-A", "a", "-A", "b.dev", "f.nix"
            ]
        );
    }

    #[test]
    fn nix_strings_escape_what_nix_would_interpolate() {
        assert_eq!(nix_string(r#"a"b\c${d}"#), r#""a\"b\\c\${d}""#);
    }

    #[test]
    fn a_selected_output_follows_the_derivation() {
        assert_eq!(
            Instantiated::parse("/nix/store/x-a.drv!dev"),
            Instantiated {
                drv: "/nix/store/x-a.drv".into(),
                output: "dev".into()
            }
        );
        assert_eq!(Instantiated::parse("/nix/store/x-a.drv").output, "out");
    }
}
