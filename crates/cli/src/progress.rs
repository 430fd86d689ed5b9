//! A build's progress for people: a progress bar on a terminal, plain lines otherwise (with
//! the ANSI colours of Nix's messages removed, as Nix does when its output is not a terminal).

use std::collections::BTreeMap;
use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use nixspace_frontend::Progress;
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
        Terminal { bar, print_logs }
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
    pub fn show(&self, progress: &Progress, done: usize, running: &BTreeMap<DrvPath, WorkerId>) {
        match progress {
            Progress::Started { drv, worker } => {
                self.line(&format!("building {} on {worker}", drv.short_name()))
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
        if let Some(bar) = &self.bar {
            bar.set_position(done as u64);
            let msg: Vec<String> = running
                .iter()
                .map(|(drv, w)| format!("{} on {w}", drv.short_name()))
                .collect();
            bar.set_message(if msg.is_empty() {
                "waiting for a worker".to_owned()
            } else {
                format!("building {}", msg.join(", "))
            });
        }
    }

    /// Remove the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
