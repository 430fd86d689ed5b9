//! The recent log lines of each step, for the web view: a bounded tail per step, kept for a
//! bounded number of steps (the oldest forgotten first), and each new line passed on to the
//! pages following that step.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use tokio::sync::broadcast;

/// Steps whose lines are kept; past it the step heard of first is forgotten.
const MAX_STEPS: usize = 256;

/// Bytes of lines kept per step (the newest).
const MAX_BYTES_PER_STEP: usize = 64 * 1024;

/// Longest line kept; longer ones are cut there.
const MAX_LINE: usize = 4 * 1024;

/// What each line kept costs besides its bytes, so that empty lines are bounded too.
const LINE_COST: usize = 32;

/// The longest step name kept, or taken from a page's query; lines of steps with longer names
/// (not store paths) are dropped.
pub(super) const MAX_DRV: usize = 512;

/// Lines a page following a step may fall behind by before it misses some.
const FOLLOW_BACKLOG: usize = 512;

/// The recent lines of every step heard of, bounded (see the constants).
#[derive(Default)]
pub struct StepLogs {
    inner: Mutex<Steps>,
}

#[derive(Default)]
struct Steps {
    logs: HashMap<String, StepLog>,
    /// The steps in the order they were first heard of.
    order: VecDeque<String>,
}

struct StepLog {
    lines: VecDeque<String>,
    bytes: usize,
    live: broadcast::Sender<String>,
}

impl StepLog {
    fn new() -> StepLog {
        StepLog {
            lines: VecDeque::new(),
            bytes: 0,
            live: broadcast::channel(FOLLOW_BACKLOG).0,
        }
    }
}

impl Steps {
    /// The log of `drv`, made (and the oldest forgotten past [`MAX_STEPS`]) if new.
    fn log(&mut self, drv: &str) -> &mut StepLog {
        if !self.logs.contains_key(drv) {
            while self.order.len() >= MAX_STEPS {
                if let Some(old) = self.order.pop_front() {
                    self.logs.remove(&old);
                }
            }
            self.order.push_back(drv.to_owned());
        }
        self.logs.entry(drv.to_owned()).or_insert_with(StepLog::new)
    }
}

impl StepLogs {
    /// Keep `line`, a line of `drv`'s build log, and pass it to the pages following it.
    pub fn push(&self, drv: &str, line: &str) {
        if drv.len() > MAX_DRV {
            return;
        }
        let mut line = line.to_owned();
        if line.len() > MAX_LINE {
            let mut end = MAX_LINE;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            line.truncate(end);
        }
        let Ok(mut steps) = self.inner.lock() else {
            return;
        };
        let log = steps.log(drv);
        log.bytes += line.len() + LINE_COST;
        log.lines.push_back(line.clone());
        while log.bytes > MAX_BYTES_PER_STEP {
            match log.lines.pop_front() {
                Some(old) => log.bytes -= old.len() + LINE_COST,
                None => break,
            }
        }
        // Nobody following is not an error.
        let _ = log.live.send(line);
    }

    /// The lines of `drv` kept so far, and the lines to come.
    pub fn follow(&self, drv: &str) -> (Vec<String>, broadcast::Receiver<String>) {
        let mut steps = match self.inner.lock() {
            Ok(steps) => steps,
            Err(poisoned) => poisoned.into_inner(),
        };
        let log = steps.log(drv);
        (log.lines.iter().cloned().collect(), log.live.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_keeps_its_newest_lines_within_its_bound() {
        let logs = StepLogs::default();
        let line = "x".repeat(1000);
        for i in 0..200 {
            logs.push("a.drv", &format!("{i} {line}"));
        }
        let (kept, _) = logs.follow("a.drv");
        assert!(kept.iter().map(|l| l.len() + LINE_COST).sum::<usize>() <= MAX_BYTES_PER_STEP);
        assert!(kept.last().is_some_and(|l| l.starts_with("199 ")));
        assert!(kept.len() < 200, "some lines were dropped");
    }

    #[test]
    fn the_oldest_step_is_forgotten_past_the_bound_and_a_long_line_is_cut() {
        let logs = StepLogs::default();
        logs.push("first.drv", &"y".repeat(10 * MAX_LINE));
        assert_eq!(logs.follow("first.drv").0[0].len(), MAX_LINE);
        for i in 0..MAX_STEPS {
            logs.push(&format!("{i}.drv"), "line");
        }
        assert!(logs.follow("first.drv").0.is_empty(), "forgotten");
        assert_eq!(logs.follow(&format!("{}.drv", MAX_STEPS - 1)).0, ["line"]);
    }

    #[test]
    fn empty_lines_and_overlong_step_names_are_bounded_too() {
        let logs = StepLogs::default();
        for _ in 0..100_000 {
            logs.push("a.drv", "");
        }
        assert!(logs.follow("a.drv").0.len() <= MAX_BYTES_PER_STEP / LINE_COST);
        let long = format!("/{}.drv", "n".repeat(MAX_DRV));
        logs.push(&long, "dropped");
        logs.push("b.drv", "kept");
        assert!(logs.follow(&long).0.is_empty());
        assert_eq!(logs.follow("b.drv").0, ["kept"]);
    }

    #[test]
    fn a_follower_gets_the_lines_pushed_after_it_started() {
        let logs = StepLogs::default();
        logs.push("a.drv", "before");
        let (kept, mut live) = logs.follow("a.drv");
        logs.push("a.drv", "after");
        assert_eq!(kept, ["before"]);
        assert_eq!(live.try_recv().ok().as_deref(), Some("after"));
    }
}
