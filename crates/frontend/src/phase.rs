//! Timing the phases of a frontend's work, for `--log-level debug`.
//!
//! A [`PhaseClock`] logs one debug event per finished phase with the phase's own duration
//! and the time since the clock started, so the fixed cost of a build (evaluate, plan,
//! join, copy back, …) can be read off its log.

use std::time::{Duration, Instant};

/// Times consecutive phases of one piece of work.
#[derive(Debug, Clone)]
pub struct PhaseClock {
    /// What is being timed, in every event (`build`, `plan`, …).
    work: &'static str,
    started: Instant,
    last: Instant,
}

impl PhaseClock {
    /// A clock for `work`, starting now.
    pub fn start(work: &'static str) -> PhaseClock {
        let now = Instant::now();
        PhaseClock {
            work,
            started: now,
            last: now,
        }
    }

    /// Log that `phase` ended now; the next phase starts now. Returns the phase's duration.
    pub fn end(&mut self, phase: &'static str) -> Duration {
        let now = Instant::now();
        let took = now - self.last;
        self.last = now;
        tracing::debug!(
            work = self.work,
            phase,
            took_ms = millis(took),
            since_start_ms = millis(now - self.started),
            "phase done"
        );
        took
    }
}

/// A duration in milliseconds with microsecond resolution, for log fields.
fn millis(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_timed_one_after_the_other() {
        let mut clock = PhaseClock::start("test");
        std::thread::sleep(Duration::from_millis(20));
        let first = clock.end("first");
        let second = clock.end("second");
        assert!(first >= Duration::from_millis(20), "{first:?}");
        assert!(second < first, "{second:?} vs {first:?}");
    }
}
