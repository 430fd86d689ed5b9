//! The benchmarks behind `nixspace bench`: nixspace measured against what users run today.
//! One module per benchmark (`dag`, `planner`, `dataspace`, `dispatch`, `queries`, `cache`,
//! `remote`, `nar`, `resources`), the
//! setups they compare (`rig`, `ssh`; a private `nix-daemon` from `nixspace-nix-tools`), generated inputs (`shapes`), plots
//! (`plot`), a delaying TCP proxy (`delay`), timing (`measure`), the `/metrics` histograms (`metrics`) and what stops a
//! benchmark (`error`). `processes` holds
//! the child processes of this program (a dataspace and its workers in a scratch directory),
//! shared with `nixspace demo`. The benchmarks start `up`, `worker`, `build` and `translate`
//! as children of the running program, so they run inside the `nixspace` binary.

mod cache;
mod dag;
mod dataspace;
mod delay;
mod dispatch;
mod error;
mod measure;
mod metrics;
mod nar;
mod planner;
mod plot;
pub mod processes;
mod queries;
mod remote;
mod resident;
mod resources;
mod rig;
mod shapes;
mod ssh;

use std::process::ExitCode;

use clap::{Args, Subcommand};

pub use error::BenchError;

/// Measure nixspace against what users run today.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchCommand,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    Dag(dag::DagArgs),
    Cache(cache::CacheArgs),
    Planner(planner::PlannerArgs),
    Dataspace(dataspace::DataspaceArgs),
    Dispatch(dispatch::DispatchArgs),
    Queries(queries::QueriesArgs),
    Remote(remote::RemoteArgs),
    Nar(nar::NarArgs),
    Resources(resources::ResourcesArgs),
}

/// Run the benchmark `args` names.
pub async fn run(args: BenchArgs) -> Result<ExitCode, BenchError> {
    match args.what {
        BenchCommand::Dag(a) => dag::run(a).await,
        BenchCommand::Cache(a) => cache::run(a).await,
        BenchCommand::Planner(a) => planner::run(a).await,
        BenchCommand::Dataspace(a) => dataspace::run(a).await,
        BenchCommand::Dispatch(a) => dispatch::run(a).await,
        BenchCommand::Queries(a) => queries::run(a).await,
        BenchCommand::Remote(a) => remote::run(a).await,
        BenchCommand::Nar(a) => nar::run(a).await,
        BenchCommand::Resources(a) => resources::run(a).await,
    }
}
