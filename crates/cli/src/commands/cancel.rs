//! `nixspace cancel`: withdraw a submitted job.

use std::process::ExitCode;

use clap::Args;
use nixspace_space::Role;

use super::JoinArgs;
use crate::ask::cancel_job;

/// Cancel a job `nixspace submit` handed to the coordinator.
///
/// Joins the dataspace with the submit capability (only its holders may cancel) and asks the
/// coordinator to cancel job ID: it withdraws the job's demands, so the steps no other demand
/// needs stop, even while building, and records the job as cancelled. Exits 1 with the
/// coordinator's reason when the job is unknown or has ended already.
#[derive(Args, Debug)]
pub struct CancelArgs {
    #[command(flatten)]
    join: JoinArgs,

    /// The job's number, as `nixspace submit` printed it.
    #[arg(value_name = "ID")]
    id: i64,
}

/// Run `nixspace cancel`.
pub async fn run(args: CancelArgs) -> anyhow::Result<ExitCode> {
    let route = args.join.route(Role::Submit)?;
    let id = args.id;
    let outcome = cancel_job(&route, id).await?;
    if outcome == "cancelled" {
        eprintln!("nixspace: job {id} cancelled; its demands are withdrawn");
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("nixspace: cannot cancel job {id}: {outcome}");
    Ok(ExitCode::FAILURE)
}
