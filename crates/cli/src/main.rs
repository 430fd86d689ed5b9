//! `nixspace`: Nix builds over a Syndicate dataspace.
//!
//! Exit codes: 0 success, 1 a build or command failed, 2 bad usage (clap),
//! 130 interrupted.
//!
//! Invoked under the file name `nix-daemon`, it takes nix-daemon's command line instead
//! ([`nix_daemon_cli`]); under the name `nix-store`, only `nix-store --serve [--write]`
//! ([`nix_store_cli`]).

mod ask;
mod cache_http;
mod commands;
mod http_request;
mod large_blocks;
mod logging;
mod metrics_http;
mod nix_daemon_cli;
mod nix_store_cli;
mod observe;
mod progress;
mod services;
mod signing_keys;
mod snapshot;
mod web;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nix_daemon_cli::NixDaemonInvocation;

/// Nix builds over a Syndicate dataspace.
///
/// Start a dataspace with `nixspace up`, attach builders with `nixspace worker`
/// (on this or other machines), then build with `nixspace build FILE.nix`.
/// Route files written by `up` carry the capabilities: hand `worker.route` to
/// builders and `submit.route` to people who submit builds.
#[derive(Parser)]
#[command(name = "nixspace", version, propagate_version = true)]
struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a RUST_LOG-style
    /// directive list). RUST_LOG is used when this is not given.
    #[arg(long, global = true, value_name = "FILTER")]
    log_level: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Up(commands::up::UpArgs),
    Worker(commands::worker::WorkerArgs),
    Build(commands::build::BuildArgs),
    Status(commands::status::StatusArgs),
    History(commands::history::HistoryArgs),
    Submit(commands::submit::SubmitArgs),
    Jobs(commands::jobs::JobsArgs),
    Cancel(commands::cancel::CancelArgs),
    Bench(commands::bench::BenchArgs),
    Demo(commands::demo::DemoArgs),
    Translate(commands::translate::TranslateArgs),
    Daemon(commands::daemon::DaemonArgs),
    Substitute(commands::substitute::SubstituteArgs),
    Cache(commands::cache::CacheArgs),
    Route(commands::route::RouteArgs),
    ServerConfig(commands::server_config::ServerConfigArgs),
}

/// The process's async runtime, one thread per core. Each Syndicate actor is a tokio task,
/// and tokio runs a task woken by another next on the waker's thread (its "LIFO slot", which
/// the other threads cannot steal): the dataspace, the connections and the planner wake each
/// other for every step, so they all ran on one thread, 97% busy, while the other idled.
/// Without the slot they spread over every core (`nixspace bench dispatch`: a third more
/// steps per second). The switch needs `--cfg tokio_unstable` (`.cargo/config.toml`).
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    builder.build()
}

fn main() -> ExitCode {
    let cli = match nix_daemon_cli::invocation().or_else(nix_store_cli::invocation) {
        None => Cli::parse(),
        Some(NixDaemonInvocation::Serve(args)) => Cli {
            log_level: None,
            command: Command::Daemon(args),
        },
        Some(NixDaemonInvocation::Exit(code)) => return code,
    };
    // `nix-daemon --stdio` says nothing on stderr unless something is wrong: an ssh-ng client
    // prints the remote side's stderr to its user.
    let default_level = match &cli.command {
        Command::Daemon(a) if a.stdio() => "warn",
        _ => "info",
    };
    if let Err(e) = logging::init(cli.log_level.as_deref(), default_level) {
        eprintln!("nixspace: {e:#}");
        return ExitCode::from(2);
    }
    // Process-wide setup that must happen while this is the only thread.
    if let Command::Worker(a) = &cli.command {
        if let Some(dir) = a.own_store() {
            if let Err(e) = nixspace_nix_tools::own_store::enter(dir) {
                eprintln!("nixspace: error: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    }
    if matches!(cli.command, Command::Daemon(_)) {
        // Everything this daemon runs (nix-store, nix-instantiate, its private nix-daemons) must
        // use the local store, never a daemon socket (which could be this one), as Nix's own
        // daemon does. Set before any thread exists.
        std::env::set_var("NIX_REMOTE", "local");
    }
    let runtime = match runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nixspace: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Up(a) => {
                large_blocks::give_back_large_blocks();
                commands::up::run(a).await
            }
            Command::Worker(a) => commands::worker::run(a).await,
            Command::Build(a) => commands::build::run(a).await,
            Command::Status(a) => commands::status::run(a).await,
            Command::History(a) => commands::history::run(a).await,
            Command::Submit(a) => commands::submit::run(a).await,
            Command::Jobs(a) => commands::jobs::run(a).await,
            Command::Cancel(a) => commands::cancel::run(a).await,
            Command::Bench(a) => commands::bench::run(a).await,
            Command::Demo(a) => commands::demo::run(a).await,
            Command::Translate(a) => commands::translate::run(a).await,
            Command::Daemon(a) => commands::daemon::run(a).await,
            Command::Substitute(a) => commands::substitute::run(a).await,
            Command::Cache(a) => commands::cache::run(a).await,
            Command::Route(a) => commands::route::run(a).await,
            Command::ServerConfig(a) => commands::server_config::run(a).await,
        }
    });
    // Relay tasks may still be draining; do not wait for them.
    runtime.shutdown_background();
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nixspace: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
