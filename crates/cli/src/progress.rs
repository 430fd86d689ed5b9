//! A build's progress for people: a progress bar on a terminal, plain lines otherwise (with
//! the ANSI colours of Nix's messages removed, as Nix does when its output is not a terminal).
//! The bar names the steps being built, where, and the phase each is in (from the builder's
//! `setPhase`, as Nix's own progress bar shows it).

use std::collections::BTreeMap;
use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use nixspace_frontend::Progress;
use nixspace_nix_protocol::stderr::{result_type, Field};
use nixspace_nix_protocol::LogEvent;
use nixspace_nix_tools::strip_ansi;
use nixspace_protocol::{DrvPath, WorkerId};

pub use nixspace_protocol::ids::short_name;

/// Print `line` on stderr, without colours unless stderr is a terminal.
pub fn print_line(line: &str) {
    if std::io::stderr().is_terminal() {
        eprintln!("{line}");
    } else {
        eprintln!("{}", strip_ansi(line));
    }
}

/// Shows one `nixspace build`'s progress on stderr.
pub struct Terminal {
    bar: Option<ProgressBar>,
    print_logs: bool,
    /// The phase each step being built is in, as its builder last said.
    phases: BTreeMap<DrvPath, String>,
}

impl Terminal {
    /// Start showing progress over `total` steps.
    pub fn new(total: usize, print_logs: bool) -> Terminal {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar =
                ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps  {wide_msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
            bar
        });
        Terminal {
            bar,
            print_logs,
            phases: BTreeMap::new(),
        }
    }

    /// A line of its own, above the bar.
    pub fn line(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => print_line(line),
        }
    }

    /// Show one piece of progress; `done` steps of the total have ended, `running` are
    /// being built.
    pub fn show(
        &mut self,
        progress: &Progress,
        done: usize,
        running: &BTreeMap<DrvPath, WorkerId>,
    ) {
        match progress {
            Progress::Started { drv, worker } => {
                self.phases.remove(drv);
                self.line(&format!("building {} on {worker}", drv.short_name()))
            }
            Progress::Activity { drv, event, .. } => {
                if let Some(phase) = phase_of(event) {
                    self.phases.insert(drv.clone(), phase.to_owned());
                }
            }
            Progress::Built { drv, .. } => self.line(&format!("built {}", drv.short_name())),
            Progress::Failed { drv, failure } => {
                self.line(&format!("failed {}: {}", drv.short_name(), failure.reason))
            }
            Progress::Waiting { drv, reason } => self.line(&format!(
                "waiting for a worker for {}: {reason}",
                drv.short_name()
            )),
            Progress::Log { drv, line, .. } if self.print_logs => self.line(&format!(
                "{}> {line}",
                drv.short_name().trim_end_matches(".drv")
            )),
            Progress::PostBuildHook { drv, hook } => self.line(&format!(
                "running post-build-hook '{hook}' for {}",
                drv.short_name()
            )),
            Progress::PostBuildLog { drv, line } => self.line(&format!(
                "{} (post-build-hook)> {line}",
                drv.short_name().trim_end_matches(".drv")
            )),
            Progress::Lost { why } => self.line(&format!(
                "nixspace: lost the dataspace ({why}); reconnecting"
            )),
            Progress::Retrying { after, why } => {
                self.line(&format!("nixspace: {why}; retrying in {after:?}"))
            }
            Progress::Rejoined => {
                self.line("nixspace: rejoined the dataspace; demands asserted again")
            }
            Progress::Log { .. } | Progress::Stopped { .. } | Progress::Schedulable { .. } => {}
        }
        self.phases.retain(|drv, _| running.contains_key(drv));
        if let Some(bar) = &self.bar {
            bar.set_position(done as u64);
            bar.set_message(running_message(running, &self.phases));
        }
    }

    /// Remove the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// The phase a `resultSetPhase` result of the build activity names.
fn phase_of(event: &LogEvent) -> Option<&str> {
    match event {
        LogEvent::Result {
            id: 0,
            result_type: result_type::SET_PHASE,
            fields,
        } => match fields.first() {
            Some(Field::String(phase)) => Some(phase),
            _ => None,
        },
        _ => None,
    }
}

/// The bar's message: each step being built, where, and in which phase.
fn running_message(
    running: &BTreeMap<DrvPath, WorkerId>,
    phases: &BTreeMap<DrvPath, String>,
) -> String {
    if running.is_empty() {
        return "waiting for a worker".to_owned();
    }
    let steps: Vec<String> = running
        .iter()
        .map(|(drv, w)| match phases.get(drv) {
            Some(phase) => format!("{} on {w} ({phase})", drv.short_name()),
            None => format!("{} on {w}", drv.short_name()),
        })
        .collect();
    format!("building {}", steps.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_names_each_running_steps_worker_and_phase() {
        let (a, b) = (
            DrvPath::from("/nix/store/aaaa-a.drv"),
            DrvPath::from("/nix/store/bbbb-b.drv"),
        );
        let running = BTreeMap::from([
            (a.clone(), WorkerId::from("w1")),
            (b.clone(), WorkerId::from("w2")),
        ]);
        let set_phase = |id, phase: &str| LogEvent::Result {
            id,
            result_type: result_type::SET_PHASE,
            fields: vec![Field::String(phase.to_owned())],
        };
        assert_eq!(phase_of(&set_phase(0, "buildPhase")), Some("buildPhase"));
        // A result of an activity under the build is not the build's phase.
        assert_eq!(phase_of(&set_phase(7, "other")), None);
        let phases = BTreeMap::from([(a, "buildPhase".to_owned())]);
        assert_eq!(
            running_message(&running, &phases),
            format!(
                "building {} on w1 (buildPhase), {} on w2",
                short_name("/nix/store/aaaa-a.drv"),
                short_name("/nix/store/bbbb-b.drv")
            )
        );
        assert_eq!(
            running_message(&BTreeMap::new(), &phases),
            "waiting for a worker"
        );
    }
}
