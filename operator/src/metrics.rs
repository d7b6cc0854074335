//! Prometheus metrics of the operator: reconcile counts, errors and latency, jobs by phase,
//! worker failures, time to Running, recoveries and leadership.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use petl_crds::{FailureAction, Phase};

/// Log target of one debug line per reconcile with its exact duration (`RUST_LOG=warn,petl_operator::timing=debug`).
pub const TIMING_TARGET: &str = "petl_operator::timing";

/// [`crate::Error::metric_label`] of a reconcile whose API request failed.
const API_REQUEST_FAILED: &str = "finalizererror(applyfailed(kubeerror))";

/// Label of error counters: the error variant (see [`crate::Error::metric_label`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Lower-cased error variant.
    pub error: String,
}

/// Label of the jobs gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// Pending, Running, Recovering, Suspended, Succeeded or Failed.
    pub phase: String,
}

/// Label of the worker-failure counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// The failure-policy action that classified the failure: Count, Ignore or FailJob.
    pub action: String,
}

/// Label of the report-poll counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PollLabels {
    /// `ok`, or why no report came: `timeout`, `unreachable`, `status`, `body`.
    pub result: String,
}

/// All operator metrics, registered once in [`Metrics::registry`].
pub struct Metrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    /// Reconciles started.
    pub reconciles: Counter,
    /// Reconciles that returned an error, by error.
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    /// Wall time of one reconcile.
    pub reconcile_duration: Histogram,
    /// PetlJobs this operator has seen, by phase.
    pub jobs: Family<PhaseLabels, Gauge>,
    /// Worker failures (failed, deleted or evicted pods), by failure-policy action.
    pub worker_failures: Family<FailureLabels, Counter>,
    /// Worker pods created (first starts, resumes and replacements).
    pub pods_created: Counter,
    /// From PetlJob creation to every worker Ready the first time.
    pub time_to_running: Histogram,
    /// Recoveries finished (lost ranks replaced and every worker Ready again).
    pub recoveries: Counter,
    /// From the first lost rank being noticed to every worker Ready again.
    pub recovery_duration: Histogram,
    /// 1 while this replica holds the leader Lease (or runs without leader election).
    pub leader: Gauge,
    /// Polls of rank 0's report, by result.
    pub report_polls: Family<PollLabels, Counter>,
    /// Wall time of one poll of rank 0's report.
    pub report_poll_duration: Histogram,
    phases: Mutex<HashMap<String, Phase>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Create and register every metric under the `petl_operator` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("petl_operator");
        let reconciles = Counter::default();
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        // The error of almost every failed reconcile (an API request failed), at zero from the
        // start: the registry leaves out families without series, and a rate over a series that
        // does not exist yet shows "no data" where it should show 0.
        let _ = reconcile_errors.get_or_create(&ErrorLabels {
            error: API_REQUEST_FAILED.into(),
        });
        // 1 ms to ~9 s in steps of 1.2x: p50/p99 read off the buckets within 20%.
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 1.2, 51));
        let jobs = Family::<PhaseLabels, Gauge>::default();
        let worker_failures = Family::<FailureLabels, Counter>::default();
        let pods_created = Counter::default();
        let time_to_running = Histogram::new(exponential_buckets(0.5, 2.0, 16));
        let recoveries = Counter::default();
        let recovery_duration = Histogram::new(exponential_buckets(0.1, 2.0, 16));
        let leader = Gauge::default();
        let report_polls = Family::<PollLabels, Counter>::default();
        // Likewise the successful polls, before the first job runs.
        let _ = report_polls.get_or_create(&PollLabels {
            result: "ok".into(),
        });
        // 1 ms to ~4 s (the poll's timeout is 2 s).
        let report_poll_duration = Histogram::new(exponential_buckets(0.001, 2.0, 13));

        registry.register(
            "reconciles",
            "PetlJob reconciles started",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "PetlJob reconciles that failed, by error",
            reconcile_errors.clone(),
        );
        registry.register_with_unit(
            "reconcile_duration",
            "Wall time of one PetlJob reconcile",
            prometheus_client::registry::Unit::Seconds,
            reconcile_duration.clone(),
        );
        registry.register("jobs", "PetlJobs by phase", jobs.clone());
        registry.register(
            "worker_failures",
            "Worker pod failures by failure-policy action",
            worker_failures.clone(),
        );
        registry.register("pods_created", "Worker pods created", pods_created.clone());
        registry.register_with_unit(
            "time_to_running",
            "From PetlJob creation to all workers Ready the first time",
            prometheus_client::registry::Unit::Seconds,
            time_to_running.clone(),
        );
        registry.register(
            "recoveries",
            "Recoveries finished (lost ranks replaced, all workers Ready again)",
            recoveries.clone(),
        );
        registry.register_with_unit(
            "recovery_duration",
            "From a lost rank noticed to all workers Ready again",
            prometheus_client::registry::Unit::Seconds,
            recovery_duration.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica is the leader",
            leader.clone(),
        );

        registry.register(
            "report_polls",
            "Polls of rank 0's /report, by result (ok, timeout, unreachable, status, body)",
            report_polls.clone(),
        );
        registry.register_with_unit(
            "report_poll_duration",
            "Wall time of one poll of rank 0's /report",
            prometheus_client::registry::Unit::Seconds,
            report_poll_duration.clone(),
        );

        Self {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            jobs,
            worker_failures,
            pods_created,
            time_to_running,
            recoveries,
            recovery_duration,
            leader,
            report_polls,
            report_poll_duration,
            phases: Mutex::new(HashMap::new()),
        }
    }

    /// Count a reconcile and time it until the returned guard drops.
    pub fn count_and_measure(&self) -> ReconcileTimer<'_> {
        self.reconciles.inc();
        ReconcileTimer {
            metrics: self,
            start: Instant::now(),
        }
    }

    /// Count a failed reconcile.
    pub fn reconcile_failed(&self, error: &crate::Error) {
        self.reconcile_errors
            .get_or_create(&ErrorLabels {
                error: error.metric_label(),
            })
            .inc();
    }

    /// Count a worker failure by its failure-policy action.
    pub fn worker_failed(&self, action: FailureAction) {
        let action = format!("{action:?}");
        self.worker_failures
            .get_or_create(&FailureLabels { action })
            .inc();
    }

    /// Count one poll of rank 0's report: `failure` is the error's label, `None` for a report.
    pub fn report_polled(&self, failure: Option<&str>, took: std::time::Duration) {
        let result = failure.unwrap_or("ok").to_string();
        self.report_polls
            .get_or_create(&PollLabels { result })
            .inc();
        self.report_poll_duration.observe(took.as_secs_f64());
    }

    /// Record the phase of job `uid`, moving it between the per-phase gauges.
    pub fn set_phase(&self, uid: &str, phase: Phase) {
        let mut phases = self.phases.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = phases.insert(uid.to_string(), phase) {
            if old == phase {
                return;
            }
            self.gauge(old).dec();
        }
        self.gauge(phase).inc();
    }

    /// Forget job `uid` (it was deleted).
    pub fn forget_job(&self, uid: &str) {
        let mut phases = self.phases.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = phases.remove(uid) {
            self.gauge(old).dec();
        }
    }

    fn gauge(&self, phase: Phase) -> Gauge {
        self.jobs
            .get_or_create(&PhaseLabels {
                phase: phase.as_str().into(),
            })
            .clone()
    }

    /// The registry in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// Observes the reconcile duration when dropped, so every return path is timed.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        let seconds = self.start.elapsed().as_secs_f64();
        self.metrics.reconcile_duration.observe(seconds);
        // The exact duration, for quantiles finer than the buckets (the operator bench reads it).
        tracing::debug!(target: TIMING_TARGET, seconds, "reconcile finished");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_gauge_moves_a_job_between_phases() {
        let m = Metrics::new();
        m.set_phase("a", Phase::Pending);
        m.set_phase("b", Phase::Pending);
        m.set_phase("a", Phase::Running);
        m.set_phase("a", Phase::Running);
        let text = m.encode();
        assert!(
            text.contains("petl_operator_jobs{phase=\"Pending\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("petl_operator_jobs{phase=\"Running\"} 1"),
            "{text}"
        );
        m.forget_job("a");
        assert!(
            m.encode()
                .contains("petl_operator_jobs{phase=\"Running\"} 0")
        );
    }

    #[test]
    fn reconcile_errors_are_labelled_by_variant() {
        let m = Metrics::new();
        let err = crate::Error::IllegalJob {
            field: "spec.workers.image",
            message: "unset".into(),
        };
        m.reconcile_failed(&err);
        let text = m.encode();
        assert!(
            text.contains("petl_operator_reconcile_errors_total{error=\"illegaljob\"} 1"),
            "{text}"
        );
        // The failed API request's series is there, at zero, before any such failure.
        assert!(
            text.contains(&format!(
                "petl_operator_reconcile_errors_total{{error=\"{API_REQUEST_FAILED}\"}} 0"
            )),
            "{text}"
        );
        let api =
            crate::Error::FinalizerError(Box::new(kube::runtime::finalizer::Error::ApplyFailed(
                crate::Error::KubeError(kube::Error::LinesCodecMaxLineLengthExceeded),
            )));
        assert_eq!(api.metric_label(), API_REQUEST_FAILED);
    }

    #[test]
    fn report_polls_are_counted_by_result_and_timed() {
        let m = Metrics::new();
        m.report_polled(None, std::time::Duration::from_millis(3));
        m.report_polled(Some("timeout"), std::time::Duration::from_secs(2));
        let text = m.encode();
        assert!(
            text.contains("petl_operator_report_polls_total{result=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("petl_operator_report_polls_total{result=\"timeout\"} 1"),
            "{text}"
        );
        assert!(text.contains("petl_operator_report_poll_duration_seconds_count 2"));
    }

    #[test]
    fn timer_observes_one_duration_per_reconcile() {
        let m = Metrics::new();
        drop(m.count_and_measure());
        drop(m.count_and_measure());
        assert!(
            m.encode()
                .contains("petl_operator_reconcile_duration_seconds_count 2")
        );
        assert!(m.encode().contains("petl_operator_reconciles_total 2"));
    }
}
