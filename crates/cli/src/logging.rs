//! Logging setup: `--log-level` wins over `RUST_LOG`; the default is `info`, or `warn` for a
//! process whose stderr is not its own (`daemon --stdio`: an ssh-ng client shows it to its user).

use tracing_subscriber::EnvFilter;

/// Install the global tracing subscriber, writing to stderr, with `default` as the filter when
/// neither `level` nor `RUST_LOG` gives one.
pub fn init(level: Option<&str>, default: &str) -> anyhow::Result<()> {
    let filter = match level {
        Some(l) => {
            EnvFilter::try_new(l).map_err(|e| anyhow::anyhow!("invalid --log-level {l:?}: {e}"))?
        }
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default)),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install logger: {e}"))
}
