//! The operator's Prometheus metrics and its `/metrics`, `/healthz` and `/readyz` endpoints.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `lockstep_operator_reconcile_total` | counter | |
//! | `lockstep_operator_reconcile_errors_total` | counter | `category` |
//! | `lockstep_operator_reconcile_duration_seconds` | histogram | |
//! | `lockstep_jobs` | gauge | `phase` |
//! | `lockstep_job_restarts_total` | counter | `reason` |
//! | `lockstep_job_time_to_all_running_seconds` | histogram | |
//! | `lockstep_gang_queue_length` | gauge | |
//! | `lockstep_gang_oldest_wait_seconds` | gauge | |
//! | `lockstep_gang_admission_wait_seconds` | histogram | |
//! | `lockstep_gang_admission_decision_seconds` | histogram | |

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use lockstep_api::status::Phase;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// The operator's metrics, registered in their own registry.
pub struct Metrics {
    registry: Registry,
    /// Reconcile passes.
    pub reconciles: IntCounter,
    /// Failed reconcile passes by error category.
    pub errors: IntCounterVec,
    /// Duration of a reconcile pass.
    pub duration: Histogram,
    jobs: IntGaugeVec,
    /// Gang restarts by the first failure's reason (`Requested` for a requested restart).
    pub restarts: IntCounterVec,
    /// Seconds from a job's creation (or a gang restart) until every rank runs.
    pub time_to_all_running: Histogram,
    /// Gangs waiting for Builtin admission, after the latest admission cycle.
    pub gang_queue_length: IntGauge,
    /// Seconds the longest-waiting gang of the queue has waited, after the latest cycle.
    pub gang_oldest_wait_seconds: IntGauge,
    /// Seconds a gang waited from entering the queue until it was admitted.
    pub gang_wait_seconds: Histogram,
    /// Seconds one admission cycle (snapshot, queue, placement) took.
    pub gang_decision_seconds: Histogram,
    phases: Mutex<HashMap<String, Phase>>,
    ready: AtomicBool,
    names: Vec<String>,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let reconciles = IntCounter::new(
            "lockstep_operator_reconcile_total",
            "Reconcile passes of ParallelJobs.",
        )
        .expect("valid metric");
        let errors = IntCounterVec::new(
            Opts::new(
                "lockstep_operator_reconcile_errors_total",
                "Failed reconcile passes, by error category.",
            ),
            &["category"],
        )
        .expect("valid metric");
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "lockstep_operator_reconcile_duration_seconds",
                "Duration of one reconcile pass.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )
        .expect("valid metric");
        let jobs = IntGaugeVec::new(
            Opts::new("lockstep_jobs", "ParallelJobs by phase."),
            &["phase"],
        )
        .expect("valid metric");
        let restarts = IntCounterVec::new(
            Opts::new(
                "lockstep_job_restarts_total",
                "Gang restarts, by the reason of the first failure (Requested: asked for by annotation).",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let time_to_all_running = Histogram::with_opts(
            HistogramOpts::new(
                "lockstep_job_time_to_all_running_seconds",
                "Seconds from a job's creation, or a gang restart, until every rank runs.",
            )
            .buckets(vec![
                0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
            ]),
        )
        .expect("valid metric");
        let gang_queue_length = IntGauge::new(
            "lockstep_gang_queue_length",
            "Gangs waiting for admission (Builtin policy) after the latest admission cycle.",
        )
        .expect("valid metric");
        let gang_oldest_wait_seconds = IntGauge::new(
            "lockstep_gang_oldest_wait_seconds",
            "Seconds the longest-waiting gang has waited for admission (Builtin policy), after \
             the latest admission cycle; 0 when none waits.",
        )
        .expect("valid metric");
        let gang_wait_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "lockstep_gang_admission_wait_seconds",
                "Seconds a gang waited in the admission queue before it was admitted.",
            )
            .buckets(vec![
                0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0,
            ]),
        )
        .expect("valid metric");
        let gang_decision_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "lockstep_gang_admission_decision_seconds",
                "Seconds one admission decision took (snapshot of the cluster, queue, placement).",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
            ]),
        )
        .expect("valid metric");
        let mut names = Vec::new();
        for c in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(gang_queue_length.clone()),
            Box::new(gang_oldest_wait_seconds.clone()),
            Box::new(gang_wait_seconds.clone()),
            Box::new(gang_decision_seconds.clone()),
            Box::new(errors.clone()),
            Box::new(duration.clone()),
            Box::new(jobs.clone()),
            Box::new(restarts.clone()),
            Box::new(time_to_all_running.clone()),
        ] {
            names.extend(c.desc().iter().map(|d| d.fq_name.clone()));
            registry.register(c).expect("metric names are unique");
        }
        for p in Phase::ALL {
            jobs.with_label_values(&[p.as_str()]).set(0);
        }
        Self {
            registry,
            reconciles,
            errors,
            duration,
            jobs,
            restarts,
            time_to_all_running,
            gang_queue_length,
            gang_oldest_wait_seconds,
            gang_wait_seconds,
            gang_decision_seconds,
            phases: Mutex::new(HashMap::new()),
            ready: AtomicBool::new(false),
            names,
        }
    }

    /// Records the phase of a job (`None`: the job is gone) and updates `lockstep_jobs`.
    pub fn set_phase(&self, job: &str, phase: Option<Phase>) {
        let mut phases = self.phases.lock().unwrap_or_else(|e| e.into_inner());
        match phase {
            Some(p) => phases.insert(job.to_string(), p),
            None => phases.remove(job),
        };
        for p in Phase::ALL {
            let n = phases.values().filter(|v| **v == p).count();
            self.jobs
                .with_label_values(&[p.as_str()])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// The name of every metric registered (dashboards and alert rules may use only these).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Marks the operator ready (its controller is running).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the process ends.
    pub async fn serve(
        self: std::sync::Arc<Self>,
        listener: tokio::net::TcpListener,
    ) -> std::io::Result<()> {
        use axum::{Router, http::StatusCode, routing::get};
        let m = self.clone();
        let r = self;
        let app = Router::new()
            .route("/metrics", get(move || async move { m.render() }))
            .route("/healthz", get(|| async { "ok" }))
            .route(
                "/readyz",
                get(move || async move {
                    if r.ready.load(Ordering::Relaxed) {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                    }
                }),
            );
        axum::serve(listener, app).await
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_by_phase_follow_the_jobs() {
        let m = Metrics::new();
        m.set_phase("a", Some(Phase::Running));
        m.set_phase("b", Some(Phase::Running));
        m.set_phase("a", Some(Phase::Succeeded));
        let text = m.render();
        assert!(
            text.contains("lockstep_jobs{phase=\"Running\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("lockstep_jobs{phase=\"Succeeded\"} 1"),
            "{text}"
        );
        m.set_phase("b", None);
        assert!(m.render().contains("lockstep_jobs{phase=\"Running\"} 0"));
        for name in [
            "lockstep_operator_reconcile_total",
            "lockstep_operator_reconcile_duration_seconds",
            "lockstep_job_time_to_all_running_seconds",
        ] {
            assert!(text.contains(name), "{name} missing");
        }
    }
}
