//! One module per subcommand: its clap arguments and its `run`.

pub mod bench;
pub mod build;
pub mod cache;
pub mod cancel;
pub mod daemon;
pub mod demo;
pub mod history;
pub mod jobs;
pub mod out_links;
pub mod route;
pub mod server_config;
pub mod status;
pub mod submit;
pub mod substitute;
pub mod translate;
pub mod up;
pub mod worker;

use std::path::PathBuf;

use clap::Args;
use nixspace_nix_formats::signature::{PublicKey, PublicKeys};
use nixspace_nix_formats::store_path::StoreDir;
use nixspace_nix_tools::{Evaluation, FunctionArg};
use nixspace_space::{Role, Route, SessionEvent};

/// Where to find the dataspace: shared by the commands that join one.
#[derive(Args, Debug, Clone)]
pub struct JoinArgs {
    /// Route file naming the dataspace and the capability to present
    /// (written by `nixspace up`). Default: <dir>/worker.route or
    /// <dir>/submit.route, depending on the command.
    #[arg(long, env = "NIXSPACE_ROUTE", value_name = "FILE")]
    pub route: Option<PathBuf>,

    /// Runtime directory of the dataspace, used to find the default route
    /// file. Default: $XDG_RUNTIME_DIR/nixspace or /tmp/nixspace-<uid>.
    #[arg(long, env = "NIXSPACE_DIR", value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

impl JoinArgs {
    /// The route file for `role`: `--route`, or the default in the runtime directory.
    pub fn route_file(&self, role: Role) -> PathBuf {
        match &self.route {
            Some(p) => p.clone(),
            None => role.route_file(&self.dir()),
        }
    }

    /// Read the route for `role`.
    pub fn route(&self, role: Role) -> anyhow::Result<Route> {
        let path = self.route_file(role);
        Route::read(&path).map_err(|e| {
            anyhow::anyhow!("{e}\n  hint: start a dataspace with `nixspace up`, or pass --route")
        })
    }

    /// The runtime directory.
    pub fn dir(&self) -> PathBuf {
        self.dir
            .clone()
            .unwrap_or_else(nixspace_space::runtime_dir::default_runtime_dir)
    }
}

/// What to evaluate a Nix file with, as `nix-build` takes it: shared by `build` and `submit`.
#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// Attribute of the file to take (like nix-build -A): for `build`, a root
    /// to build; for `submit`, the part of the release expression whose jobs
    /// to submit. Repeatable.
    #[arg(short = 'A', long = "attr", value_name = "ATTR")]
    pub attrs: Vec<String>,

    /// Pass the Nix expression EXPR as argument NAME to the function the file
    /// evaluates to (like nix-build --arg); repeatable.
    #[arg(long = "arg", num_args = 2, value_names = ["NAME", "EXPR"], action = clap::ArgAction::Append)]
    pub arg: Vec<String>,

    /// Pass the string VALUE as argument NAME to the function the file
    /// evaluates to (like nix-build --argstr); repeatable.
    #[arg(long = "argstr", num_args = 2, value_names = ["NAME", "VALUE"], action = clap::ArgAction::Append)]
    pub argstr: Vec<String>,

    /// Add PATH, or NAME=PATH for `<NAME>`, to the Nix search path for the
    /// evaluation (like nix-build -I); repeatable, earlier entries first.
    #[arg(short = 'I', value_name = "PATH|NAME=PATH")]
    pub include: Vec<String>,
}

impl EvalArgs {
    /// The evaluation of `file` with these arguments.
    pub fn evaluation(&self, file: &std::path::Path) -> Evaluation {
        let pairs = |values: &[String]| -> Vec<(String, String)> {
            values
                .chunks_exact(2)
                .map(|c| (c[0].clone(), c[1].clone()))
                .collect()
        };
        let mut args: Vec<FunctionArg> = pairs(&self.arg)
            .into_iter()
            .map(|(name, expr)| FunctionArg::Expr { name, expr })
            .collect();
        args.extend(
            pairs(&self.argstr)
                .into_iter()
                .map(|(name, value)| FunctionArg::Str { name, value }),
        );
        Evaluation {
            file: file.to_owned(),
            attrs: self.attrs.clone(),
            args,
            search_path: self.include.clone(),
        }
    }
}

/// Parse a file mode given in octal (`600`, `0660`), at most `777`.
pub fn parse_mode(text: &str) -> Result<u32, String> {
    u32::from_str_radix(text, 8)
        .ok()
        .filter(|mode| *mode <= 0o777)
        .ok_or_else(|| format!("{text:?} is not an octal mode such as 600 or 666"))
}

/// Tell on standard error how the session of a serving participant (`what` `name`, e.g.
/// `substituter cache-1`) goes: `serving …` once it first joined, then rejoins, losses and
/// retries.
pub fn report_session(what: &str, name: &str, serving: &str, event: SessionEvent) {
    match event {
        SessionEvent::Joined { connection: 1 } => {
            eprintln!("nixspace: {what} {name} serving {serving}")
        }
        SessionEvent::Joined { .. } => eprintln!("nixspace: {what} {name} rejoined"),
        SessionEvent::Lost(why) => {
            eprintln!("nixspace: {what} {name} lost the dataspace ({why}); reconnecting")
        }
        SessionEvent::Retrying { after, why } => {
            eprintln!("nixspace: {what} {name}: {why}; retrying in {after:?}")
        }
    }
}

/// The public keys `texts` give (`name:base64` each, as `--trusted-public-key` takes them).
pub fn parse_public_keys(texts: &[String]) -> anyhow::Result<PublicKeys> {
    let mut keys = PublicKeys::new();
    for k in texts {
        keys.insert(
            PublicKey::parse(k).map_err(|e| anyhow::anyhow!("--trusted-public-key {k}: {e}"))?,
        );
    }
    Ok(keys)
}

/// The store directory `NIX_STORE_DIR` names, else `/nix/store`.
pub fn store_dir_from_env() -> StoreDir {
    std::env::var("NIX_STORE_DIR")
        .ok()
        .and_then(|d| StoreDir::new(&d).ok())
        .unwrap_or_default()
}

/// Wait for Ctrl-C or SIGTERM.
pub async fn shutdown_signal() -> std::io::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r,
        _ = term.recv() => Ok(()),
    }
}

/// The build history database in `state_dir`.
pub fn history_path(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("history.sqlite")
}

/// Open the build history in `state_dir`: to record (creating the directory and migrating the
/// file) when `create`, else only to read it.
pub fn open_history(
    state_dir: &std::path::Path,
    create: bool,
) -> anyhow::Result<nixspace_planner::history::History> {
    let path = history_path(state_dir);
    if create {
        std::fs::create_dir_all(state_dir).map_err(|e| {
            anyhow::anyhow!("cannot create state directory {}: {e}", state_dir.display())
        })?;
    } else if !path.exists() {
        anyhow::bail!(
            "no build history at {} (has `nixspace up` run with this --state-dir?)",
            path.display()
        );
    }
    let history = if create {
        nixspace_planner::history::History::open(&path)?
    } else {
        // Read beside a running `up`: nothing written, nothing migrated.
        nixspace_planner::history::History::open_read_only(&path)?
    };
    Ok(history)
}
