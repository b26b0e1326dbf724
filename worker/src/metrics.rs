//! The worker's Prometheus metrics (`lockstep_worker_*`) on `/metrics`, and a sampler of the
//! GPUs through NVML (loaded at run time: on a machine without NVIDIA's driver the GPU metrics are
//! simply absent).

use std::time::Duration;

use prometheus::{
    Counter, Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntGauge, Opts,
    Registry, TextEncoder,
};

use crate::workload::pipeline::StageStats;

/// Every metric of the worker.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    /// Current optimizer step.
    pub step: IntGauge,
    /// Wall time of each optimizer step.
    pub step_seconds: Histogram,
    /// Optimizer steps the run will take.
    pub total_steps: IntGauge,
    /// Training samples per second (this rank).
    pub samples_per_second: Gauge,
    /// Training tokens per second (this rank; language models).
    pub tokens_per_second: Gauge,
    /// Last training loss.
    pub loss: Gauge,
    /// Last evaluation result (accuracy for the digits).
    pub eval_metric: Gauge,
    /// Last link-prediction scores of a temporal-graph workload, by `split` (val, test),
    /// `setting` (transductive, inductive) and `score` (ap, auc).
    pub link_prediction: GaugeVec,
    /// Wall time of each all-reduce.
    pub allreduce_seconds: Histogram,
    /// Bytes all-reduced.
    pub allreduce_bytes: IntCounter,
    /// Bus bandwidth of the last all-reduce (nccl-tests' definition).
    pub busbw: Gauge,
    /// Share of communication time hidden behind computation (0 to 1).
    pub comm_hidden_ratio: Gauge,
    /// Gradient communication time, summed over buckets.
    pub comm_seconds: Counter,
    /// Gradient communication time not hidden behind backward (the step waited for it).
    pub comm_exposed_seconds: Counter,
    /// GPU utilization (0 to 1), by GPU index.
    pub gpu_utilization: GaugeVec,
    /// GPU memory in use, by GPU index.
    pub gpu_memory_used: GaugeVec,
    /// GPU power draw, by GPU index.
    pub gpu_power: GaugeVec,
    /// GPU SM clock, by GPU index.
    pub gpu_sm_clock: GaugeVec,
    /// Share of the last step's forward-backward phase this rank's pipeline stage waited for a
    /// neighbouring stage (0 to 1): its bubble. 0 for jobs that are no pipeline.
    pub pipeline_bubble_ratio: Gauge,
    /// Time this rank's pipeline stage spent computing forwards and backwards.
    pub pipeline_busy_seconds: Counter,
    /// Time this rank's pipeline stage spent waiting for a neighbouring stage's activation or
    /// gradient.
    pub pipeline_idle_seconds: Counter,
    /// High-water mark of the activations alive at once on this rank's pipeline stage, over
    /// every step of the run.
    pub pipeline_activation_peak_bytes: Gauge,
    /// This rank's pipeline stage (0 for jobs that are no pipeline).
    pub pipeline_stage: IntGauge,
    names: Vec<String>,
}

impl Metrics {
    /// Sets [`Metrics::link_prediction`] from an evaluation's scores.
    pub fn observe_link(&self, r: &crate::workload::pres::LinkReport) {
        for (split, scores) in [("val", &r.val), ("test", &r.test)] {
            for (setting, ap, auc) in [
                ("transductive", scores.ap, scores.auc),
                ("inductive", scores.ap_inductive, scores.auc_inductive),
            ] {
                for (score, v) in [("ap", ap), ("auc", auc)] {
                    if v.is_finite() {
                        self.link_prediction
                            .with_label_values(&[split, setting, score])
                            .set(v);
                    }
                }
            }
        }
    }

    /// A registry whose metrics all carry the `job` and `rank` labels.
    pub fn new(job: &str, rank: u32) -> Self {
        let registry = Registry::new_custom(
            None,
            Some(
                [
                    ("job_name".to_string(), job.to_string()),
                    ("rank".to_string(), rank.to_string()),
                ]
                .into(),
            ),
        )
        .expect("valid labels");
        /// The registry, and the names registered in it so far.
        struct Reg<'a> {
            registry: &'a Registry,
            names: std::cell::RefCell<Vec<String>>,
        }
        let r = &Reg {
            registry: &registry,
            names: std::cell::RefCell::default(),
        };
        fn reg<M: prometheus::core::Collector + Clone + 'static>(r: &Reg<'_>, m: M) -> M {
            r.names
                .borrow_mut()
                .extend(m.desc().iter().map(|d| d.fq_name.clone()));
            r.registry
                .register(Box::new(m.clone()))
                .expect("unique metric");
            m
        }
        let buckets = prometheus::exponential_buckets(0.0005, 2.0, 18).expect("buckets");
        let gpu = |name: &str, help: &str| {
            reg(
                r,
                GaugeVec::new(Opts::new(name, help), &["gpu"]).expect("valid gauge"),
            )
        };
        Self {
            step: reg(
                r,
                IntGauge::new("lockstep_worker_step", "Current optimizer step.").expect("gauge"),
            ),
            total_steps: reg(
                r,
                IntGauge::new(
                    "lockstep_worker_total_steps",
                    "Optimizer steps the run will take.",
                )
                .expect("gauge"),
            ),
            step_seconds: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "lockstep_worker_step_seconds",
                        "Wall time of each optimizer step.",
                    )
                    .buckets(buckets.clone()),
                )
                .expect("histogram"),
            ),
            samples_per_second: reg(
                r,
                Gauge::new(
                    "lockstep_worker_samples_per_second",
                    "Training samples per second on this rank.",
                )
                .expect("gauge"),
            ),
            tokens_per_second: reg(
                r,
                Gauge::new(
                    "lockstep_worker_tokens_per_second",
                    "Training tokens per second on this rank.",
                )
                .expect("gauge"),
            ),
            loss: reg(
                r,
                Gauge::new("lockstep_worker_loss", "Last training loss.").expect("gauge"),
            ),
            eval_metric: reg(
                r,
                Gauge::new(
                    "lockstep_worker_eval_metric",
                    "Last evaluation result (accuracy, validation loss or average precision).",
                )
                .expect("gauge"),
            ),
            link_prediction: reg(
                r,
                GaugeVec::new(
                    Opts::new(
                        "lockstep_worker_link_prediction",
                        "Last link-prediction scores (average precision, ROC-AUC) of a \
                         temporal-graph workload.",
                    ),
                    &["split", "setting", "score"],
                )
                .expect("gauge"),
            ),
            allreduce_seconds: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "lockstep_worker_allreduce_seconds",
                        "Wall time of each all-reduce.",
                    )
                    .buckets(buckets),
                )
                .expect("histogram"),
            ),
            allreduce_bytes: reg(
                r,
                IntCounter::new(
                    "lockstep_worker_allreduce_bytes_total",
                    "Bytes all-reduced.",
                )
                .expect("counter"),
            ),
            busbw: reg(
                r,
                Gauge::new(
                    "lockstep_worker_allreduce_busbw_bytes_per_second",
                    "Bus bandwidth of the last all-reduce (algorithm bandwidth x 2(n-1)/n).",
                )
                .expect("gauge"),
            ),
            comm_hidden_ratio: reg(
                r,
                Gauge::new(
                    "lockstep_worker_comm_hidden_ratio",
                    "Share of communication time hidden behind computation (0 to 1).",
                )
                .expect("gauge"),
            ),
            comm_seconds: reg(
                r,
                Counter::new(
                    "lockstep_worker_comm_seconds_total",
                    "Gradient all-reduce time, summed over buckets.",
                )
                .expect("counter"),
            ),
            comm_exposed_seconds: reg(
                r,
                Counter::new(
                    "lockstep_worker_comm_exposed_seconds_total",
                    "Gradient all-reduce time the step waited for after backward (not overlapped).",
                )
                .expect("counter"),
            ),
            gpu_utilization: gpu(
                "lockstep_worker_gpu_utilization_ratio",
                "GPU utilization (0 to 1).",
            ),
            gpu_memory_used: gpu(
                "lockstep_worker_gpu_memory_used_bytes",
                "GPU memory in use.",
            ),
            gpu_power: gpu("lockstep_worker_gpu_power_watts", "GPU power draw."),
            gpu_sm_clock: gpu("lockstep_worker_gpu_sm_clock_hertz", "GPU SM clock."),
            pipeline_bubble_ratio: reg(
                r,
                Gauge::new(
                    "lockstep_worker_pipeline_bubble_ratio",
                    "Share of the last step's forward-backward phase this pipeline stage waited \
                     for a neighbouring stage (0 to 1), up to its own last compute.",
                )
                .expect("gauge"),
            ),
            pipeline_busy_seconds: reg(
                r,
                Counter::new(
                    "lockstep_worker_pipeline_busy_seconds_total",
                    "Time this pipeline stage spent computing forwards and backwards.",
                )
                .expect("counter"),
            ),
            pipeline_idle_seconds: reg(
                r,
                Counter::new(
                    "lockstep_worker_pipeline_idle_seconds_total",
                    "Time this pipeline stage spent waiting for a neighbouring stage.",
                )
                .expect("counter"),
            ),
            pipeline_activation_peak_bytes: reg(
                r,
                Gauge::new(
                    "lockstep_worker_pipeline_activation_peak_bytes",
                    "Most bytes of micro-batch activations alive at once on this pipeline \
                     stage, over the run.",
                )
                .expect("gauge"),
            ),
            pipeline_stage: reg(
                r,
                IntGauge::new(
                    "lockstep_worker_pipeline_stage",
                    "This rank's pipeline stage.",
                )
                .expect("gauge"),
            ),
            names: r.names.take(),
            registry,
        }
    }

    /// The name of every metric registered (dashboards and alert rules may use only these).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Records one all-reduce of `bytes` over `ranks` ranks that took `seconds`.
    pub fn observe_allreduce(&self, bytes: usize, ranks: usize, seconds: f64) {
        self.allreduce_seconds.observe(seconds);
        self.allreduce_bytes.inc_by(bytes as u64);
        if seconds > 0.0 {
            self.busbw
                .set(bytes as f64 / seconds * crate::comm::bus_factor("all_reduce", ranks));
        }
    }

    /// Records what a pipeline stage measured in one step: the bubble of that step, its busy
    /// and idle time added to the totals, the activation peak kept at its highest.
    pub fn observe_pipeline(&self, s: &StageStats) {
        self.pipeline_stage.set(i64::from(s.stage));
        self.pipeline_bubble_ratio.set(s.bubble_ratio());
        self.pipeline_busy_seconds.inc_by(s.busy.as_secs_f64());
        self.pipeline_idle_seconds.inc_by(s.idle.as_secs_f64());
        let peak = s.peak_activation_bytes as f64;
        if peak > self.pipeline_activation_peak_bytes.get() {
            self.pipeline_activation_peak_bytes.set(peak);
        }
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to a Vec cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }

    /// Serves `/metrics` (and `/healthz`) on `listener` until the process exits.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        use axum::routing::get;
        let app = axum::Router::new()
            .route(
                "/metrics",
                get(move || {
                    let m = self.clone();
                    async move { ([("content-type", "text/plain; version=0.0.4")], m.render()) }
                }),
            )
            .route("/healthz", get(|| async { "ok" }));
        axum::serve(listener, app).await
    }

    /// Samples every GPU through NVML every `every`, on a thread of its own. Returns false (and
    /// samples nothing) when NVML cannot be loaded, as on a machine without NVIDIA's driver.
    pub fn sample_gpus(&self, every: Duration) -> bool {
        let nvml = match nvml_wrapper::Nvml::init() {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "NVML not available: no GPU metrics");
                return false;
            }
        };
        let m = self.clone();
        std::thread::Builder::new()
            .name("lockstep-nvml".into())
            .spawn(move || {
                loop {
                    m.sample_once(&nvml);
                    std::thread::sleep(every);
                }
            })
            .is_ok()
    }

    /// One sample of every GPU NVML sees.
    pub fn sample_once(&self, nvml: &nvml_wrapper::Nvml) {
        let count = nvml.device_count().unwrap_or(0);
        for i in 0..count {
            let Ok(d) = nvml.device_by_index(i) else {
                continue;
            };
            let l = i.to_string();
            if let Ok(u) = d.utilization_rates() {
                self.gpu_utilization
                    .with_label_values(&[&l])
                    .set(f64::from(u.gpu) / 100.0);
            }
            if let Ok(mem) = d.memory_info() {
                self.gpu_memory_used
                    .with_label_values(&[&l])
                    .set(mem.used as f64);
            }
            if let Ok(mw) = d.power_usage() {
                self.gpu_power
                    .with_label_values(&[&l])
                    .set(f64::from(mw) / 1000.0);
            }
            if let Ok(mhz) = d.clock_info(nvml_wrapper::enum_wrappers::device::Clock::SM) {
                self.gpu_sm_clock
                    .with_label_values(&[&l])
                    .set(f64::from(mhz) * 1e6);
            }
        }
    }
}

/// The value of the sample `name` (without labels) in a Prometheus text exposition.
pub fn scrape_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const PIPELINE: [&str; 5] = [
        "lockstep_worker_pipeline_bubble_ratio",
        "lockstep_worker_pipeline_busy_seconds_total",
        "lockstep_worker_pipeline_idle_seconds_total",
        "lockstep_worker_pipeline_activation_peak_bytes",
        "lockstep_worker_pipeline_stage",
    ];

    #[test]
    fn every_metric_is_named_once_with_the_worker_prefix() {
        let m = Metrics::new("job", 3);
        let names = m.names();
        assert!(
            names.iter().all(|n| n.starts_with("lockstep_worker_")),
            "{names:?}"
        );
        let unique: std::collections::BTreeSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "{names:?}");
        for n in PIPELINE
            .iter()
            .chain(&["lockstep_worker_step", "lockstep_worker_comm_hidden_ratio"])
        {
            assert!(names.iter().any(|x| x == n), "{n} is not registered");
        }
    }

    #[test]
    fn a_link_prediction_report_sets_each_split_setting_and_score_and_skips_undefined_ones() {
        use crate::workload::pres::{LinkReport, LinkScores};
        let m = Metrics::new("job", 0);
        let scores = |ap, inductive| LinkScores {
            ap,
            auc: ap - 0.01,
            ap_inductive: inductive,
            auc_inductive: inductive,
            inductive_events: 0,
        };
        m.observe_link(&LinkReport {
            val: scores(0.8, f64::NAN),
            test: scores(0.75, 0.7),
        });
        let text = m.render();
        let line = |labels: &str| {
            text.lines()
                .find(|l| l.starts_with(&format!("lockstep_worker_link_prediction{{{labels}")))
                .and_then(|l| l.rsplit(' ').next())
                .map(|v| v.parse::<f64>().expect("a value"))
        };
        assert_eq!(
            line("score=\"ap\",setting=\"transductive\",split=\"val\""),
            Some(0.8)
        );
        assert_eq!(
            line("score=\"auc\",setting=\"transductive\",split=\"test\""),
            Some(0.74)
        );
        assert_eq!(
            line("score=\"ap\",setting=\"inductive\",split=\"test\""),
            Some(0.7)
        );
        assert_eq!(
            line("score=\"ap\",setting=\"inductive\",split=\"val\""),
            None,
            "{text}"
        );
    }

    #[test]
    fn the_pipeline_metrics_stay_at_zero_until_a_stage_reports() {
        let text = Metrics::new("job", 0).render();
        for n in PIPELINE {
            assert_eq!(scrape_value(&text, n), Some(0.0), "{n} in\n{text}");
        }
    }

    #[test]
    fn a_stage_report_sets_the_bubble_adds_the_times_and_keeps_the_highest_peak() {
        let m = Metrics::new("job", 5);
        let stats = |busy_ms, idle_ms, peak| StageStats {
            stage: 2,
            busy: Duration::from_millis(busy_ms),
            idle: Duration::from_millis(idle_ms),
            peak_micro_batches: 2,
            peak_activation_bytes: peak,
            ..StageStats::default()
        };
        m.observe_pipeline(&stats(750, 250, 4096));
        m.observe_pipeline(&stats(900, 100, 1024));
        let text = m.render();
        let get = |n| scrape_value(&text, n).unwrap_or_else(|| panic!("{n} in\n{text}"));
        assert!((get("lockstep_worker_pipeline_bubble_ratio") - 0.1).abs() < 1e-9);
        assert!((get("lockstep_worker_pipeline_busy_seconds_total") - 1.65).abs() < 1e-9);
        assert!((get("lockstep_worker_pipeline_idle_seconds_total") - 0.35).abs() < 1e-9);
        assert_eq!(
            get("lockstep_worker_pipeline_activation_peak_bytes"),
            4096.0
        );
        assert_eq!(get("lockstep_worker_pipeline_stage"), 2.0);
        // The labels, in whatever order the registry writes them.
        let line = text
            .lines()
            .find(|l| l.starts_with("lockstep_worker_pipeline_stage{"))
            .unwrap_or_else(|| panic!("no stage line in\n{text}"));
        assert!(
            line.contains(r#"job_name="job""#)
                && line.contains(r#"rank="5""#)
                && line.ends_with(" 2"),
            "{line}"
        );
    }
}
