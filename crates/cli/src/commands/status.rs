//! `nixspace status`: what the dataspace holds right now.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use nixspace_protocol::build;
use nixspace_space::Role;
use syndicate::actor::Activation;
use syndicate::enclose;
use syndicate_macros::on_message;

use super::JoinArgs;
use crate::observe::{observe, Observed};

/// Show workers, demands, the queue and unschedulable steps.
///
/// Joins the dataspace with the submit capability, reads what is asserted
/// there and prints it: each worker (systems, features, slots used/total,
/// speed, memory and CPUs, current steps), each frontend's demands (steps built,
/// running, queued, waiting for inputs, failed) and the planner's estimate of
/// its time to completion, ready steps per system, steps no
/// worker can take with the reason, and the most recent workers' results the
/// planner discarded (outputs other than the step's) with the reason.
#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    join: JoinArgs,

    /// Print JSON instead of tables (one object; with --watch, one per line).
    #[arg(long)]
    json: bool,

    /// Keep printing every SECONDS until interrupted.
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
    watch: Option<f64>,
}

/// Run `nixspace status`.
pub async fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let interval = match args.watch {
        Some(s) => {
            Some(Duration::try_from_secs_f64(s).map_err(|e| anyhow::anyhow!("--watch {s}: {e}"))?)
        }
        None => None,
    };
    let route = args.join.route(Role::Submit)?;
    let observed = Observed::default();
    let (tx, synced) = tokio::sync::oneshot::channel();
    let actor = nixspace_space::join::join(
        &route,
        enclose!((observed) move |t: &mut Activation, ds| {
            observe(t, &ds, &observed);
            // The relay cannot forward a Syndicate sync: send ourselves a
            // probe instead. When it comes back, the dataspace has sent us
            // every assertion our observers matched.
            let id = format!("status-{}", std::process::id());
            let mut tx = Some(tx);
            enclose!((id) on_message!(t, ds, <probe $echo: String>, |_t: &mut Activation| {
                if echo == id {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(())
            }));
            ds.message(t, &build::Probe { id });
            Ok(())
        }),
    )
    .await?;
    synced
        .await
        .map_err(|_| anyhow::anyhow!("the dataspace closed the connection"))?;
    tokio::pin!(actor);
    loop {
        let text = {
            let s = observed
                .snapshot
                .lock()
                .map_err(|_| anyhow::anyhow!("status state poisoned"))?;
            if args.json {
                serde_json::to_string(&s.report())?
            } else {
                s.report().to_string()
            }
        };
        println!("{text}");
        let Some(interval) = interval else {
            return Ok(ExitCode::SUCCESS);
        };
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            r = super::shutdown_signal() => { r?; return Ok(ExitCode::SUCCESS); }
            end = &mut actor => {
                anyhow::bail!("lost the dataspace: {}", nixspace_space::join::describe_end(end))
            }
        }
    }
}
