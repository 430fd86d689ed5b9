//! nixspace under the name `nix-daemon`: nix-daemon's command line instead of nixspace's.
//!
//! Installed as a package's `bin/nix-daemon` (a symlink to the `nixspace` binary, or a copy
//! named so), nixspace is started as Nix starts its daemon: with no arguments (or the ignored
//! `--daemon`) it serves the daemon socket, with `--stdio` one client on stdin and stdout (what
//! an ssh-ng store runs on the remote side), both as `nixspace daemon` does. `--version`
//! prints what the real `nix-daemon` prints (tools read Nix's version from it), and anything
//! else is refused in Nix's words, with exit status 1. Arguments are taken in order, and
//! `--version` and `--help` act at once, as in Nix.

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;

use nixspace_nix_tools::{real_program, NIX_DAEMON};

use crate::commands::daemon::DaemonArgs;

/// What this process does when it was invoked as `nix-daemon`.
pub enum NixDaemonInvocation {
    /// Run `nixspace daemon` with these arguments.
    Serve(DaemonArgs),
    /// Nothing more: exit with this status (the version or the help was printed, or the
    /// command line was refused).
    Exit(ExitCode),
}

/// When this process was invoked under the file name `nix-daemon`: what its command line asks
/// for, with `--version`, `--help` and usage errors already answered.
pub fn invocation() -> Option<NixDaemonInvocation> {
    let mut args = std::env::args_os();
    let program = args.next()?;
    if Path::new(&program).file_name()? != NIX_DAEMON {
        return None;
    }
    Some(match parse(args) {
        Ok(Parsed::Serve { stdio }) => NixDaemonInvocation::Serve(DaemonArgs::nix_daemon(stdio)),
        Ok(Parsed::Version) => NixDaemonInvocation::Exit(print_real_version(NIX_DAEMON)),
        Ok(Parsed::Help) => {
            print!("{}", help());
            NixDaemonInvocation::Exit(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: {e}\nTry '{NIX_DAEMON} --help' for more information.");
            NixDaemonInvocation::Exit(ExitCode::FAILURE)
        }
    })
}

/// What a `nix-daemon` command line asks for.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// Serve: the socket, or (`--stdio`) one client on stdin and stdout.
    Serve {
        /// Whether to serve stdin and stdout.
        stdio: bool,
    },
    /// Print the version.
    Version,
    /// Print the help.
    Help,
}

/// A command line nix-daemon refuses, in Nix's words.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum UsageError {
    /// An option nix-daemon does not have.
    #[error("unrecognised flag '{0}'")]
    UnrecognisedFlag(String),
    /// An argument that is not an option.
    #[error("unexpected argument '{0}'")]
    UnexpectedArgument(String),
}

/// Parse nix-daemon's arguments (without the program name) as Nix 2.8 does.
fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Parsed, UsageError> {
    let mut stdio = false;
    for arg in args {
        match arg.to_str() {
            // Ignored by Nix too, for backwards compatibility.
            Some("--daemon") => {}
            Some("--stdio") => stdio = true,
            Some("--version") => return Ok(Parsed::Version),
            Some("--help") => return Ok(Parsed::Help),
            _ => {
                let shown = arg.to_string_lossy().into_owned();
                return Err(if shown.starts_with('-') {
                    UsageError::UnrecognisedFlag(shown)
                } else {
                    UsageError::UnexpectedArgument(shown)
                });
            }
        }
    }
    Ok(Parsed::Serve { stdio })
}

/// Print the real `program`'s `--version` (its output passes straight through: tools read
/// Nix's version from it); its exit status.
pub fn print_real_version(program: &str) -> ExitCode {
    let real = match real_program(Path::new(program)) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match std::process::Command::new(&real).arg("--version").status() {
        Ok(status) => status
            .code()
            .and_then(|c| u8::try_from(c).ok())
            .map_or(ExitCode::FAILURE, ExitCode::from),
        Err(e) => {
            eprintln!("error: cannot run {}: {e}", real.display());
            ExitCode::FAILURE
        }
    }
}

/// What `nix-daemon --help` says.
fn help() -> String {
    format!(
        "\
{NIX_DAEMON} (nixspace {version}): nixspace installed as Nix's daemon. It serves the Nix
daemon protocol like nix-daemon, but builds on a private nixspace dataspace with a local
worker; store operations go to the real nix-daemon on PATH (never this program).

Usage: {NIX_DAEMON} [--daemon] [--stdio]
       {NIX_DAEMON} --version | --help

  (no option), --daemon  serve NIX_DAEMON_SOCKET_PATH (default
                         $NIX_STATE_DIR/daemon-socket/socket) until SIGTERM
  --stdio                serve one client on stdin and stdout, then exit
  --version              print the real nix-daemon's version
  --help                 print this help

This is `nixspace daemon` (see `nixspace daemon --help`); RUST_LOG sets its log level.
",
        version = env!("CARGO_PKG_VERSION")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(args: &[&str]) -> Result<Parsed, UsageError> {
        parse(args.iter().map(OsString::from))
    }

    #[test]
    fn nix_daemons_command_line_is_taken_in_order() {
        assert_eq!(parsed(&[]), Ok(Parsed::Serve { stdio: false }));
        assert_eq!(parsed(&["--daemon"]), Ok(Parsed::Serve { stdio: false }));
        assert_eq!(
            parsed(&["--daemon", "--stdio"]),
            Ok(Parsed::Serve { stdio: true })
        );
        assert_eq!(parsed(&["--version", "--bogus"]), Ok(Parsed::Version));
        assert_eq!(parsed(&["--stdio", "--help"]), Ok(Parsed::Help));
    }

    #[test]
    fn other_arguments_are_refused_in_nixs_words() {
        assert_eq!(
            parsed(&["--bogus", "--version"]).map_err(|e| e.to_string()),
            Err("unrecognised flag '--bogus'".to_owned())
        );
        assert_eq!(
            parsed(&["extra"]).map_err(|e| e.to_string()),
            Err("unexpected argument 'extra'".to_owned())
        );
    }
}
