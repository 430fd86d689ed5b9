//! `nixspace cache serve`: the dataspace's stores as one binary cache for plain Nix clients.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use nixspace_nix_formats::signature::SecretKey;
use nixspace_space::{Backoff, Role};
use nixspace_transfer::dataspace_store::DataspaceStore;
use nixspace_transfer::nar_stream::STREAM_IDLE;
use syndicate::actor::Activation;

use super::JoinArgs;
use crate::cache_http::StoresCache;

/// Binary caches of the dataspace.
#[derive(Args, Debug)]
pub struct CacheArgs {
    #[command(subcommand)]
    what: CacheCommand,
}

#[derive(Subcommand, Debug)]
enum CacheCommand {
    /// Serve the dataspace's stores as one binary cache over HTTP, for plain Nix clients
    /// (`substituters = http://ADDR`): `/<hash>.narinfo` and the NAR it names are answered
    /// from whichever store of the dataspace has the path (a worker's, a frontend's, a
    /// substituter's) if it is signed by a key trusted here (the local Nix configuration's
    /// trusted-public-keys, --trusted-public-key, the keys `nixspace up` announces) or
    /// content-addressed, the narinfo signed with --secret-key, the NAR uncompressed and
    /// streamed as the store sends it. A path no store says it has within --wait is 404.
    Serve(ServeArgs),
}

#[derive(Args, Debug)]
struct ServeArgs {
    #[command(flatten)]
    join: JoinArgs,

    /// The address to listen on (`127.0.0.1:8080`; port 0 picks a free one).
    #[arg(value_name = "ADDR")]
    addr: SocketAddr,

    /// Sign narinfos with this key (a file in Nix's format, as `nix-store
    /// --generate-binary-cache-key` writes). Without it, narinfos carry only the signatures
    /// the stores have.
    #[arg(long, value_name = "FILE")]
    secret_key: Option<PathBuf>,

    /// Serve paths signed by this key too (`name:base64`); repeat for several.
    #[arg(long = "trusted-public-key", value_name = "KEY")]
    trusted: Vec<String>,

    /// The priority `nix-cache-info` announces (lower is asked first; cache.nixos.org has 40).
    #[arg(long, default_value_t = 30)]
    priority: u32,

    /// How long to wait for some store to say it has a path, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 3.0)]
    wait: f64,

    /// Name of this reader in the dataspace. Default: cache-serve-<pid>.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
}

/// Run `nixspace cache`.
pub async fn run(args: CacheArgs) -> anyhow::Result<ExitCode> {
    match args.what {
        CacheCommand::Serve(args) => serve(args).await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let key = match &args.secret_key {
        Some(file) => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| anyhow::anyhow!("--secret-key {}: {e}", file.display()))?;
            Some(
                SecretKey::parse(&text)
                    .map_err(|e| anyhow::anyhow!("--secret-key {}: {e}", file.display()))?,
            )
        }
        None => None,
    };
    let patience = Duration::try_from_secs_f64(args.wait)
        .map_err(|e| anyhow::anyhow!("--wait {}: {e}", args.wait))?;
    let store_dir = super::store_dir_from_env();
    let name = args
        .name
        .unwrap_or_else(|| format!("cache-serve-{}", std::process::id()));
    let trusted = super::parse_public_keys(&args.trusted)?;
    let stores = Arc::new(DataspaceStore::new(
        name.clone(),
        store_dir.clone(),
        STREAM_IDLE,
        &trusted,
    ));
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.addr))?;
    let addr = listener.local_addr()?;
    let cache = Arc::new(StoresCache {
        stores: Arc::clone(&stores),
        store_dir,
        key,
        priority: args.priority,
        patience,
    });
    let server = tokio::spawn(cache.serve(listener));
    let route = args.join.route(Role::Worker)?;
    let body = move |t: &mut Activation, ds| {
        stores.attach(t, ds);
        Ok(())
    };
    let serving = format!("http://{addr}");
    let session = nixspace_space::join::stay_joined(&route, Backoff::default(), body, |event| {
        super::report_session("binary cache", &name, &serving, event)
    });
    let result = tokio::select! {
        r = super::shutdown_signal() => r.map(|()| ExitCode::SUCCESS).map_err(Into::into),
        e = session => Err(anyhow::anyhow!("the binary cache cannot join the dataspace: {e}")),
    };
    server.abort();
    result
}
