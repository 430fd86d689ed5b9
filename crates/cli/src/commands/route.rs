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
    /// Also makes the worker's own Nix signing key beside the route
    /// (`worker-NAME.key`, mode 0600; kept if it exists): copy it with the
    /// route, and the worker signs what it builds with it. `nixspace up` trusts
    /// the `worker-NAME.key` files in its runtime directory when it starts;
    /// otherwise give it the printed public key with `--trusted-public-key`.
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
        sturdy_ref,
        ..route
    };
    let output = args
        .output
        .unwrap_or_else(|| args.join.dir().join(format!("worker-{name}.route")));
    narrowed.write(&output)?;
    let key_file = nixspace_space::route::signing_key_beside(&output);
    let key = crate::signing_keys::load_or_create(&key_file, &format!("nixspace-worker-{name}-1"))?;
    eprintln!(
        "nixspace: wrote {} and {}: copy both to the worker and start it with \
         `nixspace worker --id {name} --route {}`",
        output.display(),
        key_file.display(),
        output.display()
    );
    eprintln!(
        "nixspace: the worker signs with {}; `nixspace up` trusts it from its next start in \
         {}, or now when given `--trusted-public-key {}`",
        key.to_public(),
        args.join.dir().display(),
        key.to_public()
    );
    Ok(ExitCode::SUCCESS)
}
