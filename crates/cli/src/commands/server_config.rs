//! `nixspace server-config`: set up a standalone syndicate-server as the dataspace.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use nixspace_space::external::{self, CONFIG_FILE};
use nixspace_space::Transport;

/// Write a syndicate-server configuration and the route files that open it,
/// for scale-out: the dataspace then lives in `syndicate-server` (install it
/// with `cargo install syndicate-server`), `nixspace up --external` runs the
/// planner as its client, and workers and `nixspace build` join with the
/// route files as usual.
///
/// Writes into DIR: `keys` (kept if present, so handed-out route files stay
/// valid), `syndicate-server.pr` (listeners, the dataspace, and one sturdy ref
/// per capability: `planner` unrestricted, `worker` and `submit` confined to
/// their own records), and `planner.route`, `worker.route`, `submit.route`.
#[derive(Args, Debug)]
#[command(group = clap::ArgGroup::new("listen").required(true).multiple(true))]
pub struct ServerConfigArgs {
    /// Directory for the configuration, keys and route files.
    /// Default: $XDG_RUNTIME_DIR/nixspace or /tmp/nixspace-<uid>.
    #[arg(long, env = "NIXSPACE_DIR", value_name = "DIR")]
    dir: Option<PathBuf>,

    /// The server listens on this TCP address, e.g. 127.0.0.1:7420 (a fixed
    /// port; route files name this address, so use one clients can reach).
    #[arg(long, value_name = "ADDR", group = "listen")]
    tcp: Option<SocketAddr>,

    /// The server listens on this unix socket.
    #[arg(long, value_name = "PATH", group = "listen")]
    socket: Option<PathBuf>,
}

/// Run `nixspace server-config`.
pub async fn run(args: ServerConfigArgs) -> anyhow::Result<ExitCode> {
    let dir = args
        .dir
        .unwrap_or_else(nixspace_space::runtime_dir::default_runtime_dir);
    let listen: Vec<Transport> = args
        .socket
        .map(Transport::Unix)
        .into_iter()
        .chain(
            args.tcp
                .map(|addr| Transport::Tcp(addr.ip().to_string(), addr.port())),
        )
        .collect();
    let written = external::write(&dir, &listen)?;
    eprintln!("nixspace: wrote {}", written.config.display());
    for route in &written.routes {
        eprintln!("nixspace: wrote {}", route.display());
    }
    eprintln!(
        "nixspace: start the server with `syndicate-server --no-banner -c {}`, then \
         `nixspace up --external --dir {}`",
        dir.join(CONFIG_FILE).display(),
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}
