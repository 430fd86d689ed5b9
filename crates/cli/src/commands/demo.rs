//! `nixspace demo`: a whole dataspace on this machine, building a bundled example.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use nixspace_bench::processes::{spawn_space, Children, Scratch};
use tokio::process::Command;

/// The bundled example (examples/demo/default.nix).
const DEMO_NIX: &str = include_str!("../../../../examples/demo/default.nix");

/// Run a complete nixspace on this machine and build a small example.
///
/// Starts `nixspace up` in a fresh runtime directory, attaches `--workers`
/// `nixspace worker` processes, builds the bundled example (a chain with a
/// fan-out, fresh derivations every run) with `nixspace build`, prints the
/// result and stops everything. Needs a working local Nix.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Number of worker processes.
    #[arg(long, default_value_t = 2, value_name = "N")]
    workers: u32,

    /// Build this Nix file instead of the bundled example.
    #[arg(long, value_name = "FILE.nix")]
    file: Option<PathBuf>,
}

/// Run `nixspace demo`.
pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let Scratch {
        exe,
        tmp,
        dir,
        mut children,
    } = Scratch::new("nixspace-demo-")?;
    // Keep the demo's output to the build's own progress unless asked otherwise.
    let quiet: &[&str] = if std::env::var_os("RUST_LOG").is_some() {
        &[]
    } else {
        &["--log-level", "warn"]
    };
    let result = demo(&exe, quiet, &dir, tmp.path(), &args, &mut children).await;
    children.stop().await;
    result
}

async fn demo(
    exe: &Path,
    quiet: &[&str],
    dir: &Path,
    tmp: &Path,
    args: &DemoArgs,
    children: &mut Children,
) -> anyhow::Result<ExitCode> {
    eprintln!("demo: starting a dataspace in {}", dir.display());
    let state = tmp.join("state");
    let up_args = ["--state-dir", state.to_str().unwrap_or("state")];
    spawn_space(exe, quiet, dir, args.workers, 2, &up_args, children).await?;
    let file = match &args.file {
        Some(f) => f.clone(),
        None => {
            let nonce = format!("{:?}", std::time::SystemTime::now());
            let text = DEMO_NIX.replace("nonce ? \"\"", &format!("nonce ? \"{nonce}\""));
            let f = tmp.join("demo.nix");
            std::fs::write(&f, text)?;
            f
        }
    };
    eprintln!("demo: building {}", file.display());
    let status = Command::new(exe)
        .arg("build")
        // The demo leaves no `result` link in the directory it is run from.
        .arg("--no-out-link")
        .arg("--dir")
        .arg(dir)
        .arg(&file)
        .status()
        .await?;
    if status.success() {
        eprintln!("demo: done; the paths above are in your Nix store");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("demo: the build failed ({status})");
        Ok(ExitCode::FAILURE)
    }
}
