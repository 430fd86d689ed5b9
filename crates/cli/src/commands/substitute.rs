//! `nixspace substitute`: serve Nix binary caches (directories and HTTP(S) caches) to a
//! dataspace.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use nixspace_space::{Backoff, Role};
use nixspace_transfer::binary_cache::BinaryCaches;
use nixspace_transfer::nar_stream::STREAM_IDLE;
use nixspace_transfer::source::{self, PathSource};
use syndicate::actor::Activation;

use super::JoinArgs;

/// Serve Nix binary caches to the dataspace as a substituter.
///
/// Each CACHE is a directory (or `file://` URL) in the layout `nix copy --to file://DIR`
/// writes (`*.narinfo` and the NARs they name, uncompressed or compressed with xz, zstd,
/// bzip2 or brotli), or an `http://` or `https://` URL of a cache in the same layout (as
/// `nix copy --to` and Nix's substituters read them). Several caches are asked in the order
/// of the priority their `nix-cache-info` gives (then as given); "not found" answers of HTTP
/// caches are believed for an hour. Workers ask substituters for a step's outputs before
/// building it and fetch them from here (checking size and hash) when the cache has them.
/// For a floating content-addressed step, whose output paths only a realisation names, they
/// ask for the realisations the cache holds (`realisations/<id>.doi`, which `nix copy` writes
/// with the paths) and believe one only if it is signed by a key their store trusts.
/// With --trusted-public-key, only paths and realisations signed by one of the keys are
/// offered.
#[derive(Args, Debug)]
pub struct SubstituteArgs {
    #[command(flatten)]
    join: JoinArgs,

    /// The binary caches: directories, `file://`, `http://` or `https://` URLs.
    #[arg(value_name = "CACHE", required = true)]
    caches: Vec<String>,

    /// Offer only paths whose narinfo is signed by this key (`name:base64`, as in nix.conf's
    /// trusted-public-keys); repeat for several.
    #[arg(long = "trusted-public-key", value_name = "KEY")]
    trusted: Vec<String>,

    /// Name of this substituter in the dataspace. Default: cache-<pid>.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
}

/// Run `nixspace substitute`.
pub async fn run(args: SubstituteArgs) -> anyhow::Result<ExitCode> {
    let trusted = if args.trusted.is_empty() {
        None
    } else {
        Some(super::parse_public_keys(&args.trusted)?)
    };
    let store_dir = super::store_dir_from_env();
    let caches = BinaryCaches::open(&args.caches, store_dir, trusted).await?;
    let shown = caches
        .caches()
        .iter()
        .map(|c| {
            format!(
                "{} (priority {}{})",
                c.location(),
                c.info().priority,
                if c.info().want_mass_query {
                    ", mass queries"
                } else {
                    ""
                }
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let cache: Arc<dyn PathSource> = Arc::new(caches);
    let name = args
        .name
        .unwrap_or_else(|| format!("cache-{}", std::process::id()));
    let route = args.join.route(Role::Worker)?;
    let body = {
        let name = name.clone();
        move |t: &mut Activation, ds| {
            source::serve(
                t,
                &ds,
                &name,
                Arc::clone(&cache),
                source::Role::Substituter,
                STREAM_IDLE,
            );
            Ok(())
        }
    };
    let session = nixspace_space::join::stay_joined(&route, Backoff::default(), body, |event| {
        super::report_session("substituter", &name, &shown, event)
    });
    tokio::select! {
        r = super::shutdown_signal() => {
            r?;
            Ok(ExitCode::SUCCESS)
        }
        e = session => anyhow::bail!("the substituter cannot join the dataspace: {e}"),
    }
}
