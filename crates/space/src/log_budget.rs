//! The coordinator's cap on the build log one connection sends per step.
//!
//! A worker caps its own log (`worker --max-log-bytes`), but anything holding a worker
//! capability can ignore that and send `<log drv worker line>` messages without end, which
//! every frontend following the step receives. [`LogBudget`] counts, for one connection, the
//! bytes of log sent per step (`drv`); past the cap the first line over is replaced by a
//! notice and the rest are dropped.
//!
//! Memory stays bounded: a step's counter is forgotten when the connection's last `<claim>`
//! on it goes (a worker logs only steps it claimed and holds the claim while it builds), and
//! at most [`MAX_UNCLAIMED_STEPS`] steps the connection does not claim are counted at once;
//! lines of further unclaimed steps are dropped.

use std::collections::HashMap;

/// The default cap on the log bytes per step and connection: above the worker's own default
/// (10 MiB), so a well-behaved worker's own truncation notice still gets through.
pub const DEFAULT_MAX_LOG_BYTES_PER_STEP: u64 = 16 << 20;

/// How many steps a connection may log without claiming them, counted at once.
pub const MAX_UNCLAIMED_STEPS: usize = 64;

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
    /// A step neither claimed nor counted while [`MAX_UNCLAIMED_STEPS`] others are: drop it.
    Untracked,
}

/// One step's log so far.
#[derive(Debug, Default)]
struct StepLog {
    /// Bytes of log (one more per line, for the newline) sent so far.
    bytes: u64,
    /// The connection's live claims on the step.
    claims: usize,
}

/// Log bytes per step for one connection (see the module docs).
#[derive(Debug)]
pub struct LogBudget {
    /// Bytes per step passed on at most; 0 means no cap.
    max: u64,
    steps: HashMap<String, StepLog>,
    /// How many of `steps` have no claim.
    unclaimed: usize,
}

impl LogBudget {
    /// A budget of `max` bytes per step (0: no cap).
    pub fn new(max: u64) -> LogBudget {
        LogBudget {
            max,
            steps: HashMap::new(),
            unclaimed: 0,
        }
    }

    /// The cap in bytes per step (0: none).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The connection claimed `drv`.
    pub fn claimed(&mut self, drv: &str) {
        let step = self.steps.entry(drv.to_owned()).or_insert_with(|| {
            // Counted as unclaimed until the line below.
            self.unclaimed += 1;
            StepLog::default()
        });
        if step.claims == 0 {
            self.unclaimed -= 1;
        }
        step.claims += 1;
    }

    /// One of the connection's claims on `drv` went; with the last one the step's counter
    /// is forgotten.
    pub fn released(&mut self, drv: &str) {
        if let Some(step) = self.steps.get_mut(drv) {
            step.claims = step.claims.saturating_sub(1);
            if step.claims == 0 {
                self.steps.remove(drv);
            }
        }
    }

    /// Count a line of `len` bytes (without its newline) of `drv`'s log.
    pub fn admit(&mut self, drv: &str, len: usize) -> Verdict {
        if self.max == 0 {
            return Verdict::Pass;
        }
        let step = match self.steps.get_mut(drv) {
            Some(step) => step,
            None if self.unclaimed >= MAX_UNCLAIMED_STEPS => return Verdict::Untracked,
            None => {
                self.unclaimed += 1;
                self.steps.entry(drv.to_owned()).or_default()
            }
        };
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
    fn a_step_is_forgotten_with_its_last_claim() {
        let mut budget = LogBudget::new(10);
        budget.claimed("a");
        budget.claimed("a");
        assert_eq!(budget.admit("a", 20), Verdict::Truncate { after: 0 });
        budget.released("a");
        assert_eq!(budget.admit("a", 1), Verdict::Drop);
        budget.released("a");
        assert_eq!(budget.tracked(), 0);
        // Claimed anew (built again), it has its whole budget again.
        budget.claimed("a");
        assert_eq!(budget.admit("a", 8), Verdict::Pass);
    }

    #[test]
    fn unclaimed_steps_are_counted_up_to_a_bound() {
        let mut budget = LogBudget::new(10);
        for i in 0..MAX_UNCLAIMED_STEPS {
            assert_eq!(budget.admit(&format!("s{i}"), 1), Verdict::Pass);
        }
        assert_eq!(budget.admit("one-more", 1), Verdict::Untracked);
        assert_eq!(budget.tracked(), MAX_UNCLAIMED_STEPS);
        // Claimed steps are always counted, and claiming a counted step frees a place.
        budget.claimed("claimed");
        assert_eq!(budget.admit("claimed", 1), Verdict::Pass);
        budget.claimed("s0");
        assert_eq!(budget.admit("one-more", 1), Verdict::Pass);
        assert_eq!(budget.admit("another", 1), Verdict::Untracked);
        budget.released("s0");
        budget.released("claimed");
        assert_eq!(budget.tracked(), MAX_UNCLAIMED_STEPS);
    }
}
