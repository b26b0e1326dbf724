//! The step loop, written once for every workload: resume from the newest checkpoint (or
//! start fresh), then optimizer steps with the learning-rate schedule, the mean loss over the
//! gang, evaluation and checkpoint cadence, and the metrics. It drives a
//! [`Workload`](crate::workload::Workload) and never names one.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lockstep_api::config::WorkerConfig;
use lockstep_api::contract::ExitCode;
use lockstep_api::layout::Layout;
use lockstep_api::training::{LrSchedule as Schedule, Optimizer};
use lockstep_engine::optim::{Decay, LrSchedule};

use crate::checkpoint;
use crate::comm::ReduceOp;
use crate::device;
use crate::error::WorkError;
use crate::metrics::Metrics;
use crate::topology::Topology;
use crate::workload::pipeline::StageStats;
use crate::workload::sync::SyncStats;
use crate::workload::{self, HostComm, Metric, Workload};

/// What a finished run reports.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// Optimizer steps taken in all (including those before a resume).
    pub steps: u64,
    /// Training loss of the last step (mean over the ranks that compute one).
    pub loss: f32,
    /// Accuracy on the held-out data (classifiers).
    pub eval_accuracy: Option<f32>,
    /// Loss on the held-out data (language models).
    pub val_loss: Option<f32>,
    /// The step this run resumed from, when it loaded a checkpoint.
    pub resumed_from: Option<u64>,
    /// Digest of this rank's final parameters (equal on the ranks that hold the same ones).
    pub params_digest: u64,
    /// Seconds of training steps in this run (evaluation and checkpoints excluded).
    pub train_seconds: f64,
    /// Tokens trained on by this rank in this run.
    pub tokens: u64,
    /// Gradient communication of this run, summed over steps.
    pub comm: SyncStats,
}

/// What the runtime hands the trainer besides the config and the communicator.
pub struct RunInputs<'a> {
    /// Where checkpoints are read and written (none: no checkpoints).
    pub checkpoint_dir: Option<PathBuf>,
    /// Rank 0's NCCL id from the rendezvous (empty: no NCCL).
    pub nccl_id: Vec<u8>,
    /// Called after every optimizer step with the number of steps done.
    pub on_step: &'a dyn Fn(u64),
    /// Set when this rank is asked to stop (SIGTERM). The gang agrees on it in the all-reduce
    /// that ends every step, so every rank stops after the same step; a checkpoint of that step
    /// is written first when there is a checkpoint directory, and the run ends with
    /// `Terminated`.
    pub stop: &'a AtomicBool,
}

/// The learning-rate schedule of the job's optimizer `o` over `total` steps.
pub fn schedule(o: &Optimizer, total: u64) -> LrSchedule {
    LrSchedule {
        peak: o.learning_rate,
        min: o.min_learning_rate,
        warmup_steps: o.warmup_steps.max(0) as u64,
        decay: match o.schedule {
            Schedule::Constant => Decay::Constant,
            Schedule::Cosine => Decay::Cosine,
        },
        total_steps: total,
    }
}

/// Trains the job `cfg` describes as this rank of the gang `world` connects.
pub fn run<C: HostComm + 'static>(
    cfg: &WorkerConfig,
    world: C,
    metrics: &Metrics,
    inputs: &RunInputs<'_>,
) -> Result<Summary, WorkError> {
    let p = &cfg.parallelism;
    let layout = Layout::new(
        p.data_parallel.max(0) as u32,
        p.pipeline_stages.max(0) as u32,
    )
    .map_err(|e| WorkError::config(format!("spec.parallelism: {e}")))?;
    let mut topo = Topology::new(layout, world)?;
    let device = device::open(cfg, &topo, &inputs.nccl_id)?;
    let mut work = workload::build(cfg, device, &topo)?;
    train(cfg, &mut topo, work.as_mut(), metrics, inputs)
}

/// Bytes in a MiB.
const MIB: f64 = (1u64 << 20) as f64;

/// `x` rounded to 3 decimals, as logs show it.
fn round3(x: f64) -> f64 {
    (x * 1e3).round() / 1e3
}

/// Splits a step number into two floats that survive a broadcast exactly.
fn step_to_floats(step: u64) -> [f32; 2] {
    [(step >> 24) as f32, (step & 0xff_ffff) as f32]
}

fn step_from_floats(v: [f32; 2]) -> u64 {
    ((v[0] as u64) << 24) | v[1] as u64
}

/// The step loop over `work`.
pub fn train<C: HostComm>(
    cfg: &WorkerConfig,
    topo: &mut Topology<C>,
    work: &mut dyn Workload<C>,
    metrics: &Metrics,
    inputs: &RunInputs<'_>,
) -> Result<Summary, WorkError> {
    let t = &cfg.training;
    let rank = topo.rank;
    let total = match (t.max_steps, t.epochs) {
        (Some(s), _) => s.max(1) as u64,
        (None, Some(e)) => e.max(1) as u64 * work.steps_per_epoch(),
        (None, None) => work.steps_per_epoch(),
    };
    metrics.total_steps.set(total as i64);
    let lr = schedule(&t.optimizer, total);

    // Resume from the newest checkpoint rank 0 sees, or start fresh. Rank 0 writes them: it
    // finds an unwritable directory now, not at the first save (the last step, by default).
    let dir = inputs.checkpoint_dir.clone();
    if rank == 0
        && let Some(d) = &dir
    {
        checkpoint::ensure_writable(d)?;
    }
    // Rank 0 lists the complete checkpoints, newest first; every rank loads the one it names.
    // When a rank refuses it as damaged (a checksum that fails: a crash or a bad disk while it
    // was written), the gang sets it aside and tries the one before; with none before, or when
    // it holds another model, every rank fails with the reason.
    let shape = work.checkpoint_shape();
    let mut candidates: Vec<(u64, PathBuf)> = Vec::new();
    if rank == 0
        && let Some(d) = &dir
    {
        checkpoint::remove_leftovers(d)?;
        candidates = checkpoint::list(d, shape)?;
        // An unfinished save after the newest whole step is set aside, so that saving that
        // step again cannot be completed by it.
        let newest = candidates.last().map_or(0, |n| n.0);
        checkpoint::set_aside_newer(d, newest, shape)?;
        candidates.reverse();
    }
    let resumed_from = loop {
        let mut latest = [0.0f32; 2];
        if let Some((step, _)) = candidates.first() {
            latest = step_to_floats(*step);
        }
        topo.world.broadcast(&mut latest, 0)?;
        let resume = step_from_floats(latest);
        let Some(d) = dir.as_ref().filter(|_| resume > 0) else {
            work.init(topo)?;
            break None;
        };
        let loaded = work.load(topo, d, resume);
        // [ranks that refused it, of which for another reason than damage (another model)].
        let mut refused = match &loaded {
            Ok(()) => [0.0f32, 0.0],
            Err(e) if e.message.contains(checkpoint::CORRUPT) => [1.0, 0.0],
            Err(_) => [1.0, 1.0],
        };
        topo.world.all_reduce(&mut refused, ReduceOp::Sum)?;
        if refused[0] == 0.0 {
            if rank == 0 {
                let path = candidates.first().map(|c| c.1.display().to_string());
                tracing::info!(step = resume, path, "resumed from a checkpoint");
            }
            break Some(resume);
        }
        let mut older = [0.0f32];
        if rank == 0 && candidates.len() > 1 && refused[1] == 0.0 {
            tracing::warn!(
                step = resume,
                refused_by = refused[0],
                "the newest checkpoint is refused: setting it aside (.corrupt) and resuming from \
                 the one before"
            );
            checkpoint::set_aside(d, resume, shape, "corrupt")?;
            candidates.remove(0);
            older[0] = 1.0;
        }
        topo.world.broadcast(&mut older, 0)?;
        if older[0] == 0.0 {
            return Err(loaded.err().unwrap_or_else(|| {
                WorkError::new(
                    ExitCode::Checkpoint,
                    format!(
                        "rank {rank}: another rank refused the checkpoint of step {resume} in {} \
                         (its log says why)",
                        d.display()
                    ),
                )
            }));
        }
    };
    let start = resumed_from.unwrap_or(0);
    let max_batches = t.evaluation.max_batches.map(|m| m.max(1) as usize);
    // Fine-tuning: what the imported weights score before the first step (the loss training
    // goes on from, which transformers computes too).
    if let (None, Some(from)) = (resumed_from, &t.init_from) {
        let v = work.evaluate(topo, max_batches)?;
        if rank == 0 {
            tracing::info!(
                step = 0,
                init_from = %from,
                "imported weights: {} = {:.6}",
                v.metric.name(),
                v.value
            );
        }
    }
    let eval_every = t.evaluation.every_steps.map(|e| e.max(1) as u64);
    let ckpt_every = t.checkpoint.every_steps.map(|e| e.max(1) as u64);
    let keep = t.checkpoint.keep.max(1) as usize;
    let replicas = topo.data_parallel_degree();
    tracing::info!(
        rank,
        world = topo.layout.world_size(),
        stage = topo.stage,
        replica = topo.replica,
        data_parallel_ranks = ?topo.data_parallel_ranks(),
        pipeline_ranks = ?topo.pipeline_ranks(),
        model = %work.describe(),
        params = work.num_params(),
        steps = total,
        start,
        steps_per_epoch = work.steps_per_epoch(),
        // Samples per step and replica: a temporal batch's events for workload Pres.
        batch = match t.workload {
            lockstep_api::training::Workload::Pres => t.pres.temporal_batch.max(1),
            _ => t.batch_size.unwrap_or(32).max(1),
        },
        accum = t.ddp.grad_accumulation_steps.max(1),
        "training"
    );
    let (mut loss_mean, mut eval) = (f32::NAN, None);
    let (mut train_seconds, mut tokens, mut comm_total) = (0.0f64, 0u64, SyncStats::default());
    // A pipeline stage's busy and idle time since the last evaluation line, and its highest
    // activation peak so far (what that line shows).
    let (mut busy, mut idle, mut peak_bytes) = (Duration::ZERO, Duration::ZERO, 0usize);
    for step in start..total {
        let started = Instant::now();
        let lr = lr.at(step) as f32;
        let report = work.step(topo, step, lr)?;
        // The mean loss over the ranks that compute one, and whether any rank was asked to stop
        // (a tiny all-reduce over the whole gang that doubles as a liveness check).
        let stop = if inputs.stop.load(Ordering::Relaxed) {
            1.0
        } else {
            0.0
        };
        let mut l = match report.loss {
            Some(v) => [v, 1.0, stop],
            None => [0.0, 0.0, stop],
        };
        topo.world.all_reduce(&mut l, ReduceOp::Sum)?;
        let stopping = l[2] > 0.0;
        // Times the reciprocal, as the all-reduce's Avg does, so that the figure is the same.
        loss_mean = l[0] * (1.0 / l[1]);
        if !loss_mean.is_finite() {
            return Err(WorkError::new(
                ExitCode::Diverged,
                format!(
                    "the loss became {loss_mean} at step {step}: lower \
                     spec.training.optimizer.learningRate"
                ),
            ));
        }
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        let stats = report.comm;
        train_seconds += secs;
        tokens += report.tokens;
        comm_total.bytes += stats.bytes;
        comm_total.buckets += stats.buckets;
        comm_total.comm += stats.comm;
        comm_total.exposed += stats.exposed;
        metrics.step.set(step as i64 + 1);
        metrics.step_seconds.observe(secs);
        metrics.loss.set(f64::from(loss_mean));
        metrics.samples_per_second.set(report.samples as f64 / secs);
        metrics.tokens_per_second.set(report.tokens as f64 / secs);
        if stats.buckets > 0 {
            metrics.observe_allreduce(stats.bytes, replicas, stats.comm.as_secs_f64());
            metrics.comm_seconds.inc_by(stats.comm.as_secs_f64());
            metrics
                .comm_exposed_seconds
                .inc_by(stats.exposed.as_secs_f64());
            metrics.comm_hidden_ratio.set(stats.overlap_ratio());
        }
        if let Some(ps) = &report.pipeline {
            metrics.observe_pipeline(ps);
            busy += ps.busy;
            idle += ps.idle;
            peak_bytes = peak_bytes.max(ps.peak_activation_bytes);
        }
        let done = step + 1 == total;
        if eval_every.is_some_and(|e| (step + 1) % e == 0) || done {
            let v = work.evaluate(topo, max_batches)?;
            eval = Some(v);
            metrics.eval_metric.set(f64::from(v.value));
            if let Some(link) = &v.link {
                metrics.observe_link(link);
            }
            // Pipelines: every rank shows its stage's bubble over the steps since the last
            // evaluation, and its activation peak.
            let pipeline = report.pipeline.map(|ps| {
                let bubble = StageStats { busy, idle, ..ps }.bubble_ratio();
                (busy, idle) = (Duration::ZERO, Duration::ZERO);
                (ps.stage, round3(bubble), round3(peak_bytes as f64 / MIB))
            });
            match pipeline {
                None if rank == 0 => {
                    tracing::info!(
                        step = step + 1,
                        loss = loss_mean,
                        lr,
                        step_ms = secs * 1e3,
                        comm_ms = stats.comm.as_secs_f64() * 1e3,
                        exposed_ms = stats.exposed.as_secs_f64() * 1e3,
                        "{} = {:.4}",
                        v.metric.name(),
                        v.value
                    );
                }
                None => {}
                Some((stage, bubble, peak_act_mib)) if rank == 0 => {
                    tracing::info!(
                        step = step + 1,
                        loss = loss_mean,
                        lr,
                        step_ms = secs * 1e3,
                        comm_ms = stats.comm.as_secs_f64() * 1e3,
                        exposed_ms = stats.exposed.as_secs_f64() * 1e3,
                        stage,
                        bubble,
                        peak_act_mib,
                        "{} = {:.4}",
                        v.metric.name(),
                        v.value
                    );
                }
                Some((stage, bubble, peak_act_mib)) => {
                    tracing::info!(
                        step = step + 1,
                        rank,
                        stage,
                        bubble,
                        peak_act_mib,
                        "pipeline stage"
                    );
                }
            }
        }
        // A stop writes a checkpoint of this step, as the last step does (every rank calls save,
        // as on the cadence: the workload decides which ranks write).
        if let Some(d) = &dir
            && (done || ckpt_every.is_some_and(|e| (step + 1) % e == 0) || stopping)
        {
            if let Some(path) = work.save(topo, d, step + 1, keep)? {
                tracing::info!(path = %path.display(), "checkpoint written");
            }
            // The last step's and a stop's checkpoint are on disk before the rank ends.
            if (done || stopping)
                && let Some(path) = work.flush(topo)?
            {
                tracing::info!(path = %path.display(), "checkpoint written");
            }
        }
        (inputs.on_step)(step + 1);
        if stopping && !done {
            let saved = match &dir {
                Some(d) => format!("a checkpoint of step {} is in {}", step + 1, d.display()),
                None => "the job keeps no checkpoints".into(),
            };
            // The lowest rank that received SIGTERM: the others name it, so that the operator
            // reports the rank whose pod was stopped, not whichever rank exited first.
            let world = topo.layout.world_size();
            let mine = inputs.stop.load(Ordering::Relaxed);
            let mut who = [if mine { (world - rank) as f32 } else { 0.0 }];
            topo.world.all_reduce(&mut who, ReduceOp::Max)?;
            let by = world - who[0] as u32;
            let stopped = if mine || who[0] == 0.0 {
                "stopped by SIGTERM".to_string()
            } else {
                lockstep_api::contract::aborted::stopped_for(by)
            };
            return Err(WorkError::new(
                ExitCode::Terminated,
                format!("{stopped} after step {} of {total}: {saved}", step + 1),
            ));
        }
    }
    let (eval_accuracy, val_loss) = match eval {
        Some(e) if e.metric == Metric::Loss => (None, Some(e.value)),
        Some(e) => (Some(e.value), None),
        None => (None, None),
    };
    Ok(Summary {
        steps: total,
        loss: loss_mean,
        eval_accuracy,
        val_loss,
        resumed_from,
        params_digest: work.params_digest()?,
        train_seconds,
        tokens,
        comm: comm_total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_job_schedule_maps_onto_the_engine_schedule() {
        let mut o = Optimizer {
            learning_rate: 1.0,
            min_learning_rate: 0.1,
            warmup_steps: 10,
            schedule: Schedule::Cosine,
            ..Optimizer::default()
        };
        let s = schedule(&o, 110);
        assert_eq!(
            (s.decay, s.warmup_steps, s.total_steps),
            (Decay::Cosine, 10, 110)
        );
        assert!((s.at(0) - 0.1).abs() < 1e-12);
        assert!((s.at(60) - 0.55).abs() < 1e-12);
        o.schedule = Schedule::Constant;
        assert!((schedule(&o, 110).at(60) - 1.0).abs() < 1e-12);
    }

    use std::path::Path;
    use std::sync::{Arc, Mutex};

    use crate::comm::tcp::{TcpComm, TcpOptions};
    use crate::workload::{Evaluation, StepReport};

    /// A workload whose steps report the pipeline stats it is given, one per step (none: a DDP
    /// job).
    struct Stub(Vec<Option<StageStats>>);

    impl<C> Workload<C> for Stub {
        fn describe(&self) -> String {
            "stub".into()
        }
        fn num_params(&self) -> usize {
            1
        }
        fn steps_per_epoch(&self) -> u64 {
            self.0.len() as u64
        }
        fn init(&mut self, _: &mut Topology<C>) -> Result<(), WorkError> {
            Ok(())
        }
        fn load(&mut self, _: &mut Topology<C>, _: &Path, _: u64) -> Result<(), WorkError> {
            Ok(())
        }
        fn step(
            &mut self,
            _: &mut Topology<C>,
            step: u64,
            _: f32,
        ) -> Result<StepReport, WorkError> {
            Ok(StepReport {
                loss: Some(1.0),
                samples: 4,
                pipeline: self.0[step as usize],
                ..StepReport::default()
            })
        }
        fn evaluate(
            &mut self,
            _: &mut Topology<C>,
            _: Option<usize>,
        ) -> Result<Evaluation, WorkError> {
            Ok(Evaluation {
                metric: Metric::Loss,
                value: 0.5,
                link: None,
            })
        }
        fn save(
            &mut self,
            _: &mut Topology<C>,
            _: &Path,
            _: u64,
            _: usize,
        ) -> Result<Option<PathBuf>, WorkError> {
            Ok(None)
        }
        fn params_digest(&mut self) -> Result<u64, WorkError> {
            Ok(0)
        }
    }

    /// A log written into memory.
    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Log {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("log").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Trains `work` as the only rank of a gang, evaluating every 2 steps; returns its metrics
    /// and log.
    fn train_alone(work: &mut Stub) -> (String, String) {
        let yaml = format!(
            r#"apiVersion: lockstep.dev/v1alpha1
kind: ParallelJob
metadata: {{name: stub}}
spec:
  parallelism: {{dataParallel: 1}}
  training:
    workload: Ddp
    model: {{mlp: {{hiddenSizes: [4]}}}}
    data: {{kind: Digits, path: data/digits.csv.gz}}
    optimizer: {{learningRate: 0.1}}
    maxSteps: {}
    evaluation: {{everySteps: 2}}
  template:
    spec:
      containers: [{{name: worker, image: lockstep/worker:0.1.0}}]
"#,
            work.0.len()
        );
        let job = lockstep_api::manifest::parse_job(&yaml).expect("valid job");
        let cfg = WorkerConfig::from_job(&job).expect("config");
        let comm = TcpComm::local_gang(1, TcpOptions::default())
            .expect("gang")
            .remove(0);
        let mut topo = Topology::new(Layout::new(1, 1).expect("layout"), comm).expect("topology");
        let metrics = Metrics::new("stub", 0);
        let inputs = RunInputs {
            checkpoint_dir: None,
            nccl_id: Vec::new(),
            on_step: &|_| {},
            stop: &AtomicBool::new(false),
        };
        let log = Log::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            train(&cfg, &mut topo, work, &metrics, &inputs).expect("trains")
        });
        let log = String::from_utf8(log.0.lock().expect("log").clone()).expect("utf-8");
        (metrics.render(), log)
    }

    fn stage(busy_ms: u64, idle_ms: u64, peak: usize) -> Option<StageStats> {
        Some(StageStats {
            stage: 1,
            busy: Duration::from_millis(busy_ms),
            idle: Duration::from_millis(idle_ms),
            peak_micro_batches: 2,
            peak_activation_bytes: peak,
            ..StageStats::default()
        })
    }

    #[test]
    fn a_pipeline_steps_stats_become_the_metrics_and_the_evaluation_line() {
        let mib = 1 << 20;
        let mut work = Stub(vec![
            stage(300, 100, 2 * mib),
            stage(500, 100, 3 * mib),
            stage(600, 400, mib),
        ]);
        let (text, log) = train_alone(&mut work);
        let get = |n| crate::metrics::scrape_value(&text, n).unwrap_or_else(|| panic!("{n}"));
        // The last step's bubble, the times summed, the highest peak.
        assert!((get("lockstep_worker_pipeline_bubble_ratio") - 0.4).abs() < 1e-9);
        assert!((get("lockstep_worker_pipeline_busy_seconds_total") - 1.4).abs() < 1e-9);
        assert!((get("lockstep_worker_pipeline_idle_seconds_total") - 0.6).abs() < 1e-9);
        assert_eq!(
            get("lockstep_worker_pipeline_activation_peak_bytes"),
            3.0 * mib as f64
        );
        assert_eq!(get("lockstep_worker_pipeline_stage"), 1.0);
        // Evaluations after steps 2 and 3: the bubble over the steps since the last one.
        let evals: Vec<&str> = log.lines().filter(|l| l.contains("val_loss =")).collect();
        assert_eq!(evals.len(), 2, "{log}");
        let field = |line: &str, key: &str| -> Option<f64> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
        };
        for (line, bubble) in evals.iter().zip([0.2, 0.4]) {
            assert_eq!(field(line, "stage"), Some(1.0), "{line}");
            assert_eq!(field(line, "bubble"), Some(bubble), "{line}");
            assert_eq!(field(line, "peak_act_mib"), Some(3.0), "{line}");
        }
    }

    #[test]
    fn a_ddp_job_leaves_the_pipeline_metrics_at_zero_and_its_log_as_it_was() {
        let mut work = Stub(vec![None; 3]);
        let (text, log) = train_alone(&mut work);
        for n in [
            "lockstep_worker_pipeline_bubble_ratio",
            "lockstep_worker_pipeline_busy_seconds_total",
            "lockstep_worker_pipeline_idle_seconds_total",
            "lockstep_worker_pipeline_activation_peak_bytes",
            "lockstep_worker_pipeline_stage",
        ] {
            assert_eq!(crate::metrics::scrape_value(&text, n), Some(0.0), "{n}");
        }
        let evals: Vec<&str> = log.lines().filter(|l| l.contains("val_loss =")).collect();
        assert_eq!(evals.len(), 2, "{log}");
        for line in evals {
            for absent in ["stage=", "bubble=", "peak_act_mib="] {
                assert!(!line.contains(absent), "{line}");
            }
            assert!(line.contains("exposed_ms="), "{line}");
        }
    }

    #[test]
    fn step_numbers_survive_the_float_broadcast() {
        for s in [0, 1, 500, (1 << 24) + 3, 123_456_789_012] {
            assert_eq!(step_from_floats(step_to_floats(s)), s);
        }
    }
}
