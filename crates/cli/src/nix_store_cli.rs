//! nixspace under the name `nix-store`: only `nix-store --serve [--write]`, what Nix's legacy
//! `ssh://` store (and Hydra) runs on the remote side when `remote-program` is left at its
//! default.
//!
//! Installed as `bin/nix-store` in a directory of its own (a symlink to the `nixspace`
//! binary), first on the `PATH` sshd gives the store's user, nixspace answers the serve
//! protocol as `nixspace daemon --serve [--write]` does. `--version` prints what the real
//! `nix-store` prints and `--help` what this is; any other operation or option is refused,
//! with exit status 1, saying that the real `nix-store` serves it.

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;

use crate::commands::daemon::DaemonArgs;
use crate::nix_daemon_cli::{print_real_version, NixDaemonInvocation};

/// The program name of Nix's store tool.
const NIX_STORE: &str = "nix-store";

/// When this process was invoked under the file name `nix-store`: the serve session its
/// command line asks for, with `--version`, `--help` and refusals already answered.
pub fn invocation() -> Option<NixDaemonInvocation> {
    let mut args = std::env::args_os();
    let program = args.next()?;
    if Path::new(&program).file_name()? != NIX_STORE {
        return None;
    }
    Some(match parse(args) {
        Ok(Parsed::Serve { write }) => {
            NixDaemonInvocation::Serve(DaemonArgs::nix_store_serve(write))
        }
        Ok(Parsed::Version) => NixDaemonInvocation::Exit(print_real_version(NIX_STORE)),
        Ok(Parsed::Help) => {
            print!("{}", help());
            NixDaemonInvocation::Exit(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: {e}");
            NixDaemonInvocation::Exit(ExitCode::FAILURE)
        }
    })
}

/// What a `nix-store` command line asks of nixspace.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// A serve session, with `--write` or not.
    Serve {
        /// Whether the commands that add paths or build are allowed.
        write: bool,
    },
    /// Print the real `nix-store`'s version.
    Version,
    /// Print the help.
    Help,
}

/// A `nix-store` command line nixspace does not serve.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum Refused {
    /// Something other than `--serve`, `--write`, `--version` or `--help`.
    #[error("'{0}': nixspace installed as {NIX_STORE} serves only '{NIX_STORE} --serve [--write]'; run the real {NIX_STORE} for anything else")]
    NotServed(String),
    /// No operation.
    #[error("no operation specified")]
    NoOperation,
}

/// Parse `nix-store`'s arguments (without the program name); `--version` and `--help` act at
/// once, as in Nix.
fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Parsed, Refused> {
    let (mut serve, mut write) = (false, false);
    for arg in args {
        match arg.to_str() {
            Some("--serve") => serve = true,
            Some("--write") => write = true,
            Some("--version") => return Ok(Parsed::Version),
            Some("--help") => return Ok(Parsed::Help),
            _ => return Err(Refused::NotServed(arg.to_string_lossy().into_owned())),
        }
    }
    if serve {
        Ok(Parsed::Serve { write })
    } else {
        Err(Refused::NoOperation)
    }
}

/// What `nix-store --help` says.
fn help() -> String {
    format!(
        "\
{NIX_STORE} (nixspace {version}): nixspace installed as Nix's nix-store, for one use: the
remote side of Nix's legacy ssh:// store, which runs `{NIX_STORE} --serve --write`. It serves
the serve protocol on stdin and stdout like nix-store, but builds on a private nixspace
dataspace with a local worker; store operations go to the local store.

Usage: {NIX_STORE} --serve [--write]
       {NIX_STORE} --version | --help

  --serve    serve one session on stdin and stdout, then exit
  --write    allow adding paths and building
  --version  print the real nix-store's version
  --help     print this help

This is `nixspace daemon --serve` (see `nixspace daemon --help`); RUST_LOG sets its log level.
",
        version = env!("CARGO_PKG_VERSION")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(args: &[&str]) -> Result<Parsed, Refused> {
        parse(args.iter().map(OsString::from))
    }

    #[test]
    fn serve_with_or_without_write_is_served() {
        assert_eq!(parsed(&["--serve"]), Ok(Parsed::Serve { write: false }));
        assert_eq!(
            parsed(&["--serve", "--write"]),
            Ok(Parsed::Serve { write: true })
        );
        assert_eq!(parsed(&["--version", "--bogus"]), Ok(Parsed::Version));
        assert_eq!(parsed(&["--serve", "--help"]), Ok(Parsed::Help));
    }

    #[test]
    fn anything_else_is_refused() {
        assert_eq!(parsed(&[]), Err(Refused::NoOperation));
        assert_eq!(parsed(&["--write"]), Err(Refused::NoOperation));
        for args in [&["--serve", "--store", "x"][..], &["-qR", "/nix/store/x"]] {
            assert!(
                matches!(parsed(args), Err(Refused::NotServed(_))),
                "{args:?}"
            );
        }
    }
}
