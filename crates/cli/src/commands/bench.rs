//! `nixspace bench`: the benchmarks of the `nixspace-bench` crate, run inside this binary
//! (they start `up`, `worker`, `build` and `translate` as children of it).

use std::process::ExitCode;

pub use nixspace_bench::BenchArgs;

/// Run `nixspace bench`.
pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    Ok(nixspace_bench::run(args).await?)
}
