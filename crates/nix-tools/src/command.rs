//! Running one Nix command and collecting its output.

use std::process::Stdio;

/// A Nix command could not be run or failed.
#[derive(Debug, thiserror::Error)]
pub enum NixError {
    /// The program could not be started.
    #[error(
        "cannot run {program}: {source} (is Nix installed? on Debian: apt-get install nix-bin)"
    )]
    Spawn {
        /// The program name.
        program: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The program exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// The exit status.
        status: std::process::ExitStatus,
        /// The last lines of its stderr.
        stderr: String,
    },
    /// A derivation could not be read or parsed.
    #[error("cannot read derivation {path}: {detail}")]
    Derivation {
        /// The `.drv` path.
        path: String,
        /// What was wrong.
        detail: String,
    },
    /// The store could not answer a query.
    #[error("cannot query the store: {0}")]
    Store(String),
    /// The program printed something we could not understand.
    #[error("unexpected output from `{command}`: {detail}")]
    Output {
        /// The command line.
        command: String,
        /// What was wrong.
        detail: String,
    },
}

/// Run `program args…`, returning stdout; stderr is kept for errors only.
pub(crate) async fn run(program: &str, args: &[String]) -> Result<String, NixError> {
    let output = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| NixError::Spawn {
            program: program.to_owned(),
            source,
        })?;
    let command = command_line(program, args);
    tracing::debug!(%command, status = %output.status, "ran");
    if !output.status.success() {
        return Err(NixError::Failed {
            command,
            status: output.status,
            stderr: tail(&String::from_utf8_lossy(&output.stderr), 10),
        });
    }
    String::from_utf8(output.stdout).map_err(|_| NixError::Output {
        command,
        detail: "output is not UTF-8".to_owned(),
    })
}

/// A command line for messages, shortened when it names many paths.
fn command_line(program: &str, args: &[String]) -> String {
    let mut s = program.to_owned();
    for a in args.iter().take(6) {
        s.push(' ');
        s.push_str(a);
    }
    if args.len() > 6 {
        s.push_str(&format!(" … ({} more)", args.len() - 6));
    }
    s
}

/// The last `n` non-empty lines of `text`, joined by newlines.
pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
