//! Build progress for people: a progress bar on a terminal, plain lines otherwise.

use std::collections::BTreeMap;
use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The short, readable name of a store path: `/nix/store/<hash>-hello.drv` → `hello.drv`.
pub fn short_name(path: &str) -> &str {
    let base = path.rsplit('/').next().unwrap_or(path);
    match base.split_once('-') {
        Some((hash, name)) if hash.len() == 32 => name,
        _ => base,
    }
}

/// Progress of one `nixspace build`.
pub struct Progress {
    bar: Option<ProgressBar>,
    print_logs: bool,
}

impl Progress {
    /// Start showing progress over `total` steps.
    pub fn new(total: usize, print_logs: bool) -> Progress {
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
        Progress { bar, print_logs }
    }

    /// Report an event on its own line.
    pub fn event(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    /// A build log line; shown only with `--print-build-logs`.
    pub fn log_line(&self, drv: &str, line: &str) {
        if self.print_logs {
            self.event(&format!(
                "{}> {line}",
                short_name(drv).trim_end_matches(".drv")
            ));
        }
    }

    /// Update the counters and the list of running steps.
    pub fn update(&self, done: usize, running: &BTreeMap<String, String>) {
        if let Some(bar) = &self.bar {
            bar.set_position(done as u64);
            let msg: Vec<String> = running
                .iter()
                .map(|(drv, w)| format!("{} on {w}", short_name(drv)))
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

#[cfg(test)]
mod tests {
    use super::short_name;

    #[test]
    fn short_names() {
        assert_eq!(
            short_name("/nix/store/zg8vrsrkg804f0zla7260m7xa0zl6nx2-a.drv"),
            "a.drv"
        );
        assert_eq!(short_name("weird"), "weird");
    }
}
