//! The coordinator's cap on the build log one connection sends per step.
//!
//! A worker caps its own log (`worker --max-log-bytes`), but anything holding a worker
//! capability can ignore that and send `<log drv worker line>` messages without end, which
//! every frontend following the step receives. [`LogBudget`] counts, for one connection, the
//! bytes of log sent per step (`drv`); past the cap the first line over is replaced by a
//! notice and the rest are dropped.
//!
//! A step's count lasts one build of it: it is forgotten when the connection reports the
//! step built or failed (a worker logs a step while it builds it, then reports). Memory stays
//! bounded: at most [`MAX_TRACKED_STEPS`] steps are counted at once, and a step logged past
//! that bound makes the step logged least recently be forgotten (a build stopped without a
//! report, because its assignment was withdrawn, logs no more). The cap therefore stops a
//! runaway build log, not a connection set on flooding (it can report, or log as many other
//! steps, to start a step's count again): what bounds that is the connection's flow control
//! and each frontend's own cap on the log it keeps per step.

use std::collections::{BTreeMap, HashMap};

/// The default cap on the log bytes per step and connection: above the worker's own default
/// (10 MiB), so a well-behaved worker's own truncation notice still gets through.
pub const DEFAULT_MAX_LOG_BYTES_PER_STEP: u64 = 16 << 20;

/// How many steps one connection's log is counted for at once.
pub const MAX_TRACKED_STEPS: usize = 1024;

/// What to do with one log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the cap: pass it on.
    Pass,
    /// The first line over the cap: pass a notice on instead, saying the log was cut after
    /// `after` bytes.
    Truncate {
        /// The bytes of the step's log passed on before.
        after: u64,
    },
    /// Past the cap: drop it.
    Drop,
}

/// One step's log so far.
#[derive(Debug)]
struct StepLog {
    /// Bytes of log (one more per line, for the newline) sent so far.
    bytes: u64,
    /// When it was last logged, in [`LogBudget::clock`] ticks (its key in `by_recency`).
    last: u64,
}

/// Log bytes per step for one connection (see the module docs).
#[derive(Debug)]
pub struct LogBudget {
    /// Bytes per step passed on at most; 0 means no cap.
    max: u64,
    steps: HashMap<String, StepLog>,
    /// The counted steps by when they were last logged, least recent first.
    by_recency: BTreeMap<u64, String>,
    /// Ticks once per line counted.
    clock: u64,
}

impl LogBudget {
    /// A budget of `max` bytes per step (0: no cap).
    pub fn new(max: u64) -> LogBudget {
        LogBudget {
            max,
            steps: HashMap::new(),
            by_recency: BTreeMap::new(),
            clock: 0,
        }
    }

    /// The cap in bytes per step (0: none).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The connection reported `drv` built or failed: its next build is counted afresh.
    pub fn ended(&mut self, drv: &str) {
        if let Some(step) = self.steps.remove(drv) {
            self.by_recency.remove(&step.last);
        }
    }

    /// Count a line of `len` bytes (without its newline) of `drv`'s log.
    pub fn admit(&mut self, drv: &str, len: usize) -> Verdict {
        if self.max == 0 {
            return Verdict::Pass;
        }
        self.clock += 1;
        let now = self.clock;
        let step = match self.steps.get_mut(drv) {
            Some(step) => {
                self.by_recency.remove(&step.last);
                step
            }
            None => {
                if self.steps.len() >= MAX_TRACKED_STEPS {
                    if let Some((_, oldest)) = self.by_recency.pop_first() {
                        self.steps.remove(&oldest);
                    }
                }
                self.steps
                    .entry(drv.to_owned())
                    .or_insert(StepLog { bytes: 0, last: 0 })
            }
        };
        step.last = now;
        self.by_recency.insert(now, drv.to_owned());
        let before = step.bytes;
        step.bytes = before.saturating_add(len as u64 + 1);
        if step.bytes <= self.max {
            Verdict::Pass
        } else if before <= self.max {
            Verdict::Truncate { after: before }
        } else {
            Verdict::Drop
        }
    }

    /// How many steps are counted now.
    pub fn tracked(&self) -> usize {
        self.steps.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_pass_up_to_the_cap_then_one_notice_then_nothing() {
        let mut budget = LogBudget::new(10);
        assert_eq!(budget.admit("a", 4), Verdict::Pass);
        assert_eq!(budget.admit("a", 4), Verdict::Pass);
        assert_eq!(budget.admit("a", 4), Verdict::Truncate { after: 10 });
        assert_eq!(budget.admit("a", 0), Verdict::Drop);
        // Other steps have their own budget.
        assert_eq!(budget.admit("b", 9), Verdict::Pass);
        assert_eq!(budget.admit("b", 100), Verdict::Truncate { after: 10 });
    }

    #[test]
    fn a_zero_cap_passes_everything() {
        let mut budget = LogBudget::new(0);
        for _ in 0..1000 {
            assert_eq!(budget.admit("a", 1 << 20), Verdict::Pass);
        }
        assert_eq!(budget.tracked(), 0);
    }

    #[test]
    fn a_reported_step_is_counted_afresh() {
        let mut budget = LogBudget::new(10);
        assert_eq!(budget.admit("a", 20), Verdict::Truncate { after: 0 });
        assert_eq!(budget.admit("a", 1), Verdict::Drop);
        budget.ended("a");
        assert_eq!(budget.tracked(), 0);
        // Built again, it has its whole budget again.
        assert_eq!(budget.admit("a", 8), Verdict::Pass);
        // Reporting a step never logged changes nothing.
        budget.ended("never-logged");
        assert_eq!(budget.tracked(), 1);
    }

    #[test]
    fn past_the_bound_the_step_logged_least_recently_is_forgotten() {
        let mut budget = LogBudget::new(10);
        for i in 0..MAX_TRACKED_STEPS {
            assert_eq!(budget.admit(&format!("s{i}"), 9), Verdict::Pass);
        }
        // s0 logs again: s1 is now the least recent.
        assert_eq!(budget.admit("s0", 100), Verdict::Truncate { after: 10 });
        assert_eq!(budget.admit("one-more", 1), Verdict::Pass);
        assert_eq!(budget.tracked(), MAX_TRACKED_STEPS);
        // s0 is still counted (over its cap); s1 was forgotten and starts again.
        assert_eq!(budget.admit("s0", 1), Verdict::Drop);
        assert_eq!(budget.admit("s1", 9), Verdict::Pass);
        assert_eq!(budget.tracked(), MAX_TRACKED_STEPS);
    }
}
