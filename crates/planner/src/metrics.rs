//! The planner's Prometheus metrics.
//!
//! Updated by the planner actor as it publishes effects; rendered in the
//! Prometheus text format by [`Metrics::render`] (served by `nixspace up
//! --metrics`).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Every metric the planner keeps.
pub struct Metrics {
    registry: Registry,
    /// Steps ready and unclaimed.
    pub ready: Gauge,
    /// Steps being built.
    pub running: Gauge,
    /// Ready steps no connected worker can take.
    pub unschedulable: Gauge,
    /// Connected workers.
    pub workers: Gauge,
    /// Steps built.
    pub built: Counter,
    /// Steps that failed for good.
    pub failed: Counter,
    /// Transient failures scheduled for a retry.
    pub retries: Counter,
    /// Steps granted to a second, faster worker.
    pub steals: Counter,
    /// Built steps built again because no store had their outputs any more.
    pub rebuilds: Counter,
    /// Workers' results discarded because their outputs were not the step's.
    pub rejected_results: Counter,
    /// Realisations reported with another path than the one recorded for their id (ignored).
    pub realisation_conflicts: Counter,
    /// Seconds from a step becoming ready to a worker being granted it.
    pub dispatch_seconds: Histogram,
    /// Each frontend's estimated time to completion, in seconds.
    eta_seconds: Family<RequesterLabel, Gauge<f64, AtomicU64>>,
}

/// The label of a per-frontend metric.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequesterLabel {
    requester: String,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("nixspace");
        let metrics = Metrics {
            ready: Gauge::default(),
            running: Gauge::default(),
            unschedulable: Gauge::default(),
            workers: Gauge::default(),
            built: Counter::default(),
            failed: Counter::default(),
            retries: Counter::default(),
            steals: Counter::default(),
            rebuilds: Counter::default(),
            rejected_results: Counter::default(),
            realisation_conflicts: Counter::default(),
            // 50 µs to ~1.6 s.
            dispatch_seconds: Histogram::new(exponential_buckets(0.00005, 2.0, 16)),
            eta_seconds: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "steps_ready",
            "Steps ready and not yet claimed",
            metrics.ready.clone(),
        );
        registry.register(
            "steps_running",
            "Steps being built",
            metrics.running.clone(),
        );
        registry.register(
            "steps_unschedulable",
            "Ready steps that no connected worker can take",
            metrics.unschedulable.clone(),
        );
        registry.register("workers", "Connected workers", metrics.workers.clone());
        registry.register("steps_built", "Steps built", metrics.built.clone());
        registry.register(
            "steps_failed",
            "Steps that failed for good",
            metrics.failed.clone(),
        );
        registry.register(
            "step_retries",
            "Transient failures (worker lost) scheduled for a retry",
            metrics.retries.clone(),
        );
        registry.register(
            "steals",
            "Steps duplicated on a faster worker",
            metrics.steals.clone(),
        );
        registry.register(
            "rebuilds",
            "Built steps built again because the only store with their outputs left",
            metrics.rebuilds.clone(),
        );
        registry.register(
            "rejected_results",
            "Workers' results discarded because their outputs were not the step's",
            metrics.rejected_results.clone(),
        );
        registry.register(
            "realisation_conflicts",
            "Realisations reported with another path than the one recorded for their id",
            metrics.realisation_conflicts.clone(),
        );
        registry.register(
            "dispatch_seconds",
            "Time from a step becoming ready to a worker being granted it",
            metrics.dispatch_seconds.clone(),
        );
        registry.register(
            "eta_seconds",
            "Each frontend's estimated time to completion (learned durations)",
            metrics.eta_seconds.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }
}

impl Metrics {
    /// Set `requester`'s estimated time to completion.
    pub(crate) fn set_eta(&self, requester: &str, millis: u64) {
        let label = RequesterLabel {
            requester: requester.to_owned(),
        };
        self.eta_seconds
            .get_or_create(&label)
            .set(millis as f64 / 1000.0);
    }

    /// Forget `requester`'s estimate (it demands nothing any more).
    pub(crate) fn forget_eta(&self, requester: &str) {
        self.eta_seconds.remove(&RequesterLabel {
            requester: requester.to_owned(),
        });
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric_with_its_prefix() {
        let m = Metrics::default();
        m.built.inc();
        m.dispatch_seconds.observe(0.001);
        m.set_eta("build-1", 1500);
        m.set_eta("gone", 1);
        m.forget_eta("gone");
        let text = m.render();
        for name in [
            "nixspace_steps_ready",
            "nixspace_steps_running",
            "nixspace_steps_unschedulable",
            "nixspace_workers",
            "nixspace_steps_built_total 1",
            "nixspace_steps_failed_total",
            "nixspace_step_retries_total",
            "nixspace_steals_total",
            "nixspace_rebuilds_total",
            "nixspace_rejected_results_total",
            "nixspace_realisation_conflicts_total",
            "nixspace_dispatch_seconds_count 1",
            "nixspace_eta_seconds{requester=\"build-1\"} 1.5",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        assert!(!text.contains("gone"), "{text}");
    }
}
