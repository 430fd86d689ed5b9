//! `nixspace history`: past steps and their attempts, from the planner's database.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::progress::short_name;

/// Show recently demanded steps, their outcome and every attempt.
///
/// Reads the build history that `nixspace up` keeps in its state directory
/// (`history.sqlite`): for each step its status (demanded, built, failed, resolved),
/// outputs or error, and each attempt with its worker and how it ended
/// (built, failed, lost, cancelled).
#[derive(Args, Debug)]
pub struct HistoryArgs {
    /// State directory of the dataspace (as given to `nixspace up`).
    #[arg(long, env = "NIXSPACE_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// How many steps to show, newest first.
    #[arg(long, default_value_t = 20)]
    limit: usize,

    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Run `nixspace history`.
pub async fn run(args: HistoryArgs) -> anyhow::Result<ExitCode> {
    let state_dir = args
        .state_dir
        .unwrap_or_else(nixspace_space::runtime_dir::default_state_dir);
    let history = super::open_history(&state_dir, false)?;
    let steps = history.recent(args.limit)?;
    if args.json {
        println!("{}", serde_json::to_string(&steps)?);
        return Ok(ExitCode::SUCCESS);
    }
    if steps.is_empty() {
        println!("no steps recorded yet");
    }
    for step in &steps {
        let detail = match (&step.error, step.outputs.is_empty()) {
            (Some(e), _) => format!(": {e}"),
            (None, false) => format!(" → {}", step.outputs.join(" ")),
            (None, true) => String::new(),
        };
        println!(
            "{} [{}] {}{detail}",
            short_name(&step.drv),
            step.system,
            step.status
        );
        for a in &step.attempts {
            let outcome = a.outcome.as_deref().unwrap_or("running");
            let took = a
                .finished
                .map(|f| format!(" after {}s", f - a.started))
                .unwrap_or_default();
            let reason = a
                .reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default();
            println!("  on {}: {outcome}{took}{reason}", a.worker);
        }
        if let Some(to) = &step.resolved_to {
            println!("  resolved to {to}");
        }
        for from in &step.resolved_from {
            println!("  resolved from {from}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
