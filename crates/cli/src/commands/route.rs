//! `nixspace route`: capabilities narrowed for one participant.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use nixspace_space::policy::identity_caveats;
use nixspace_space::{Role, Route};

use super::JoinArgs;

/// Write route files narrowed to one participant.
#[derive(Args, Debug)]
pub struct RouteArgs {
    #[command(subcommand)]
    what: RouteCommand,
}

#[derive(Subcommand, Debug)]
enum RouteCommand {
    /// Write a route for one named worker: the worker capability narrowed so
    /// that its holder can act only as worker NAME (announce itself, offer,
    /// claim, report outcomes and logs, and serve or fetch store paths under
    /// that name). Give each machine its own and start it with
    /// `nixspace worker --id NAME --route FILE`; anything it asserts as
    /// another worker is refused and logged by `nixspace up`. Runs wherever
    /// the worker route is: narrowing needs no key, and cannot be undone.
    Worker(WorkerRouteArgs),
}

#[derive(Args, Debug)]
struct WorkerRouteArgs {
    /// The worker's name (its `--id`).
    name: String,

    /// Where to write the route (mode 0600). Default: <dir>/worker-NAME.route.
    #[arg(long, short, value_name = "FILE")]
    output: Option<PathBuf>,

    #[command(flatten)]
    join: JoinArgs,
}

/// Run `nixspace route`.
pub async fn run(args: RouteArgs) -> anyhow::Result<ExitCode> {
    match args.what {
        RouteCommand::Worker(a) => worker(a),
    }
}

fn worker(args: WorkerRouteArgs) -> anyhow::Result<ExitCode> {
    let name = args.name.trim();
    if name.is_empty() || name.chars().any(|c| c.is_control() || c == '/') {
        anyhow::bail!(
            "a worker name must be non-empty, without control characters or '/': {name:?}"
        );
    }
    let route = args.join.route(Role::Worker)?;
    let sturdy_ref = route
        .sturdy_ref
        .attenuate(&identity_caveats(name))
        .map_err(|e| anyhow::anyhow!("cannot narrow the worker capability: {e:?}"))?;
    let narrowed = Route {
        transports: route.transports,
        sturdy_ref,
    };
    let output = args
        .output
        .unwrap_or_else(|| args.join.dir().join(format!("worker-{name}.route")));
    narrowed.write(&output)?;
    eprintln!(
        "nixspace: wrote {}: start the worker with `nixspace worker --id {name} --route {}`",
        output.display(),
        output.display()
    );
    Ok(ExitCode::SUCCESS)
}
