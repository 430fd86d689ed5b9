//! Evaluating a Nix file into derivations with the local `nix-instantiate`, taking the
//! arguments `nix-build` takes (`-A`, `--arg`, `--argstr`, `-I`) and reading back which
//! derivation and output each selected value stands for.

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
