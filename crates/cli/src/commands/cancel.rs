//! `nixspace cancel`: withdraw a submitted job.

use std::process::ExitCode;

use clap::Args;
use nixspace_protocol::build;
use nixspace_space::Role;
use syndicate::actor::Activation;
use syndicate_macros::during;

use super::JoinArgs;
use crate::ask::ask;

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
    let request = build::CancelJob { job: id.into() };
    let outcome = ask(&route, request, move |t: &mut Activation, ds, reply| {
        during!(t, ds, <job-cancelled $job: i64 $outcome: String>, |_t: &mut Activation| {
            if job == id {
                reply.give(outcome.clone());
            }
            Ok(())
        });
        Ok(())
    })
    .await?;
    if outcome == "cancelled" {
        eprintln!("nixspace: job {id} cancelled; its demands are withdrawn");
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("nixspace: cannot cancel job {id}: {outcome}");
    Ok(ExitCode::FAILURE)
}
