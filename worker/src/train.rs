//! The training loop of the built-in workloads, on the engine (`crate::engine`).
//!
//! Built: `Ddp` with the `mlp` model on `Digits` and the `gpt` model on `Text`, on the CPU or,
//! when the job asks for GPUs and CUDA loads, on the GPU. DDP follows PyTorch: parameters are
//! broadcast from rank 0 (or loaded from the latest checkpoint by every rank); gradient buckets
//! are contiguous ranges of the flat gradient buffer, all-reduced (mean) as soon as backward has
//! made them final, on the communicator's thread (TCP) or a communication stream (NCCL); the
//! optimizer waits; gradient accumulation communicates only on the last micro-step. Pipeline
//! and PRES workloads are not built yet and exit with a configuration error.

use std::path::PathBuf;
use std::time::Instant;

use lockstep_api::config::WorkerConfig;
use lockstep_api::contract::ExitCode;
use lockstep_api::training::{DataKind, LrSchedule, Model, Optimizer, Workload};

use crate::checkpoint::{self, CheckpointError};
use crate::comm::{CommError, Communicator, ReduceOp};
use crate::data::{Digits, Sampler, Text};
use crate::ddp::{Buckets, GradSync, SyncStats, TcpSync};
use crate::metrics::Metrics;
use lockstep_engine::models::gpt::{Gpt, GptConfig};
use lockstep_engine::models::mlp::{Mlp, MlpConfig};
use lockstep_engine::optim::Adam;
use lockstep_engine::{Backend, EngineError, Net};

/// Why training stopped early: the exit code, a message, and the rank it blames if another.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct WorkError {
    /// The worker's exit code.
    pub code: ExitCode,
    /// What happened, in words a person can act on.
    pub message: String,
    /// The rank that caused it, when it is another rank (a lost peer).
    pub blame: Option<u32>,
}

impl WorkError {
    /// An error of this rank.
    pub fn new(code: ExitCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            blame: None,
        }
    }
}

impl From<CommError> for WorkError {
    fn from(e: CommError) -> Self {
        Self {
            code: ExitCode::Communication,
            blame: e.peer().map(|p| p as u32),
            message: e.to_string(),
        }
    }
}

impl From<EngineError> for WorkError {
    fn from(e: EngineError) -> Self {
        let code = match e {
            EngineError::Config(_) => ExitCode::Config,
            EngineError::Device { .. } => ExitCode::Internal,
        };
        Self::new(code, e.to_string())
    }
}

impl From<CheckpointError> for WorkError {
    fn from(e: CheckpointError) -> Self {
        let code = match e {
            CheckpointError::Refused { .. } => ExitCode::Checkpoint,
            // A full or unmounted volume: the job may succeed once it is fixed.
            CheckpointError::Io { .. } => ExitCode::Internal,
        };
        Self::new(code, e.to_string())
    }
}

/// What a finished run reports.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// Optimizer steps taken in all (including those before a resume).
    pub steps: u64,
    /// Training loss of the last step (mean over ranks).
    pub loss: f32,
    /// Accuracy on the held-out data (classifiers).
    pub eval_accuracy: Option<f32>,
    /// Loss on the held-out data (language models).
    pub val_loss: Option<f32>,
    /// The step this run resumed from, when it loaded a checkpoint.
    pub resumed_from: Option<u64>,
    /// Digest of the final parameters (equal on every rank).
    pub params_digest: u64,
    /// Seconds of training steps in this run (evaluation and checkpoints excluded).
    pub train_seconds: f64,
    /// Tokens trained on by this rank in this run.
    pub tokens: u64,
    /// Gradient communication of this run, summed over steps.
    pub comm: SyncStats,
}

/// What the runtime hands the training loop besides the config and the communicator.
pub struct RunInputs<'a> {
    /// Where checkpoints are read and written (none: no checkpoints).
    pub checkpoint_dir: Option<PathBuf>,
    /// Rank 0's NCCL id from the rendezvous (empty: no NCCL).
    pub nccl_id: Vec<u8>,
    /// Called after every optimizer step with the number of steps done.
    pub on_step: &'a dyn Fn(u64),
}

/// The learning rate of `step` (0-based) of `total`: linear warmup, then constant or cosine.
pub fn lr_at(c: &Optimizer, total: u64, step: u64) -> f64 {
    let warm = c.warmup_steps.max(0) as u64;
    if step < warm {
        return c.learning_rate * (step + 1) as f64 / warm as f64;
    }
    match c.schedule {
        LrSchedule::Constant => c.learning_rate,
        LrSchedule::Cosine => {
            let span = total.saturating_sub(warm).max(1) as f64;
            let p = ((step - warm) as f64 / span).min(1.0);
            c.min_learning_rate
                + 0.5
                    * (c.learning_rate - c.min_learning_rate)
                    * (1.0 + (std::f64::consts::PI * p).cos())
        }
    }
}

/// A model with its data: what the loop trains.
pub trait Task<B: Backend> {
    /// The model's description (checkpoints refuse another).
    fn describe(&self) -> String;
    /// Training samples per epoch.
    fn samples(&self) -> usize;
    /// Tokens per sample (0 when the model has no tokens).
    fn tokens_per_sample(&self) -> usize;
    /// Name of the evaluation result ("eval_accuracy", "val_loss").
    fn eval_name(&self) -> &'static str;
    /// The model.
    fn net(&mut self) -> &mut dyn Net<B>;
    /// Forward and backward of the samples `idx` of `epoch`, gradients scaled by `scale` and
    /// accumulated; `ready(grads, from)` as gradients at `from..` become final. Returns the
    /// mean loss.
    fn micro_step(
        &mut self,
        be: &B,
        idx: &[usize],
        epoch: u64,
        scale: f32,
        ready: &mut dyn FnMut(&mut B::Buf, usize),
    ) -> Result<f32, WorkError>;
    /// The evaluation result on held-out data, over at most `max_batches` batches.
    fn evaluate(&mut self, be: &B, max_batches: Option<usize>) -> Result<f32, WorkError>;
}

/// The MLP on the digits.
struct DigitsTask<B: Backend> {
    data: Digits,
    train_rows: Vec<usize>,
    model: Mlp<B>,
    eval_batch: usize,
    x: Vec<f32>,
    y: Vec<i32>,
}

impl<B: Backend> Task<B> for DigitsTask<B> {
    fn describe(&self) -> String {
        let sizes: Vec<String> = self
            .model
            .config
            .sizes()
            .iter()
            .map(ToString::to_string)
            .collect();
        format!("mlp {}", sizes.join("-"))
    }
    fn samples(&self) -> usize {
        self.train_rows.len()
    }
    fn tokens_per_sample(&self) -> usize {
        0
    }
    fn eval_name(&self) -> &'static str {
        "eval_accuracy"
    }
    fn net(&mut self) -> &mut dyn Net<B> {
        &mut self.model
    }
    fn micro_step(
        &mut self,
        be: &B,
        idx: &[usize],
        _epoch: u64,
        scale: f32,
        ready: &mut dyn FnMut(&mut B::Buf, usize),
    ) -> Result<f32, WorkError> {
        const F: usize = Digits::FEATURES;
        self.x.clear();
        self.y.clear();
        for &i in idx.iter().map(|&s| &self.train_rows[s]) {
            self.x.extend_from_slice(&self.data.x[i * F..(i + 1) * F]);
            self.y.push(i32::from(self.data.y[i]));
        }
        let b = idx.len();
        self.model
            .forward(be, &self.x, Some(&self.y), b, Some(scale / b as f32))?;
        self.model.backward(be, ready)?;
        Ok(self.model.mean_loss(be)?)
    }
    fn evaluate(&mut self, be: &B, max_batches: Option<usize>) -> Result<f32, WorkError> {
        const F: usize = Digits::FEATURES;
        let rows = self.data.test_rows();
        let mut correct = 0usize;
        let mut seen = 0usize;
        let k = Digits::CLASSES;
        for chunk in rows
            .chunks(self.eval_batch)
            .take(max_batches.unwrap_or(usize::MAX))
        {
            let x: Vec<f32> = chunk
                .iter()
                .flat_map(|&i| self.data.x[i * F..(i + 1) * F].iter().copied())
                .collect();
            self.model.forward(be, &x, None, chunk.len(), None)?;
            let logits = self.model.logits(be)?;
            for (row, &i) in logits.chunks(k).zip(chunk) {
                let best = row
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map_or(0, |(c, _)| c);
                correct += usize::from(best == usize::from(self.data.y[i]));
            }
            seen += chunk.len();
        }
        Ok(correct as f32 / seen.max(1) as f32)
    }
}

/// The GPT on a text.
struct TextTask<B: Backend> {
    data: Text,
    model: Gpt<B>,
    t: usize,
    seed: u64,
    eval_batch: usize,
    windows: Option<(u64, Vec<usize>)>,
    x: Vec<i32>,
    y: Vec<i32>,
}

impl<B: Backend> Task<B> for TextTask<B> {
    fn describe(&self) -> String {
        let c = &self.model.config;
        format!(
            "gpt layers={} heads={} embed={} context={} vocab={}",
            c.layers, c.heads, c.channels, c.max_seq, c.vocab
        )
    }
    fn samples(&self) -> usize {
        self.data.windows_per_epoch(self.t)
    }
    fn tokens_per_sample(&self) -> usize {
        self.t
    }
    fn eval_name(&self) -> &'static str {
        "val_loss"
    }
    fn net(&mut self) -> &mut dyn Net<B> {
        &mut self.model
    }
    fn micro_step(
        &mut self,
        be: &B,
        idx: &[usize],
        epoch: u64,
        scale: f32,
        ready: &mut dyn FnMut(&mut B::Buf, usize),
    ) -> Result<f32, WorkError> {
        if self.windows.as_ref().is_none_or(|(e, _)| *e != epoch) {
            self.windows = Some((epoch, self.data.windows(self.t, self.seed, epoch)));
        }
        let windows = &self.windows.as_ref().expect("set above").1;
        let starts: Vec<usize> = idx.iter().map(|&i| windows[i]).collect();
        self.data.batch(&starts, self.t, &mut self.x, &mut self.y);
        let (b, t) = (starts.len(), self.t);
        self.model.forward(
            be,
            &self.x,
            Some(&self.y),
            b,
            t,
            Some(scale / (b * t) as f32),
        )?;
        self.model.backward(be, ready)?;
        Ok(self.model.mean_loss(be)?)
    }
    fn evaluate(&mut self, be: &B, max_batches: Option<usize>) -> Result<f32, WorkError> {
        let starts = self.data.val_windows(self.t);
        let (mut sum, mut n) = (0.0f64, 0usize);
        for chunk in starts
            .chunks(self.eval_batch)
            .take(max_batches.unwrap_or(usize::MAX))
        {
            self.data.batch(chunk, self.t, &mut self.x, &mut self.y);
            self.model
                .forward(be, &self.x, Some(&self.y), chunk.len(), self.t, None)?;
            sum += f64::from(self.model.mean_loss(be)?) * chunk.len() as f64;
            n += chunk.len();
        }
        Ok((sum / n.max(1) as f64) as f32)
    }
}

fn config_error(m: impl Into<String>) -> WorkError {
    WorkError::new(ExitCode::Config, m)
}

/// Runs the job's workload on this rank.
pub fn run<C: Communicator<Buffer = [f32], Owned = Vec<f32>>>(
    cfg: &WorkerConfig,
    comm: &mut C,
    metrics: &Metrics,
    inputs: &RunInputs<'_>,
) -> Result<Summary, WorkError> {
    #[cfg(feature = "cuda")]
    if cfg.parallelism.gpus_per_worker > 0 {
        if lockstep_engine::cuda::available() {
            return run_cuda(cfg, comm, metrics, inputs);
        }
        tracing::warn!(
            gpus_per_worker = cfg.parallelism.gpus_per_worker,
            "the job asks for GPUs, but CUDA (libcuda, libcublas, libnvrtc) cannot be loaded \
             here: training on the CPU"
        );
    }
    if !inputs.nccl_id.is_empty() {
        // Rank 0 chose NCCL, so the other ranks are joining its communicator: training on the
        // CPU here would leave them waiting. Failing aborts the whole gang, naming this rank.
        return Err(WorkError::new(
            ExitCode::Communication,
            "rank 0 chose NCCL, but this rank cannot load CUDA (libcuda, libcublas, libnvrtc) \
             or was built without the cuda feature",
        ));
    }
    let be = lockstep_engine::cpu::Cpu;
    tracing::info!(backend = %be.name(), "training on the CPU");
    let mut sync = TcpSync::default();
    dispatch(&be, &mut sync, false, cfg, comm, metrics, inputs)
}

#[cfg(feature = "cuda")]
fn run_cuda<C: Communicator<Buffer = [f32], Owned = Vec<f32>>>(
    cfg: &WorkerConfig,
    comm: &mut C,
    metrics: &Metrics,
    inputs: &RunInputs<'_>,
) -> Result<Summary, WorkError> {
    let internal = |e: String| WorkError::new(ExitCode::Internal, e);
    let devices = cudarc::driver::CudaContext::device_count()
        .map_err(|e| internal(format!("cannot count CUDA devices: {e:?}")))?;
    if devices <= 0 {
        return Err(internal("CUDA loads but no device is visible".into()));
    }
    // One GPU per pod (device 0); ranks of one machine (local mode) take them in turn.
    let device = comm.rank() % devices as usize;
    let tf32 = cfg.training.precision != lockstep_api::training::Precision::Fp32;
    if cfg.training.precision == lockstep_api::training::Precision::Bf16 {
        tracing::warn!(
            "precision Bf16 is not built yet: training in FP32 with TF32 GEMMs (the closest)"
        );
    }
    let be = lockstep_engine::cuda::Cuda::new(device, tf32)?;
    tracing::info!(backend = %be.name(), device, "training on the GPU");
    if inputs.nccl_id.is_empty() {
        tracing::info!("no NCCL id from rank 0: gradients are averaged over TCP");
        let mut sync = TcpSync::default();
        return dispatch(&be, &mut sync, false, cfg, comm, metrics, inputs);
    }
    let stream = be
        .context()
        .new_stream()
        .map_err(|e| internal(format!("cannot create the communication stream: {e:?}")))?;
    let nccl =
        crate::comm::nccl::NcclComm::new(stream, comm.rank(), comm.world_size(), &inputs.nccl_id)?;
    tracing::info!("gradient buckets are averaged with NCCL on a communication stream");
    let mut sync = crate::ddp::NcclSync::new(nccl);
    dispatch(&be, &mut sync, true, cfg, comm, metrics, inputs)
}

fn dispatch<B: Backend, C: Communicator<Buffer = [f32], Owned = Vec<f32>>>(
    be: &B,
    sync: &mut dyn GradSync<B, C>,
    always_sync: bool,
    cfg: &WorkerConfig,
    comm: &mut C,
    metrics: &Metrics,
    inputs: &RunInputs<'_>,
) -> Result<Summary, WorkError> {
    let t = &cfg.training;
    let batch = t.batch_size.unwrap_or(32).max(1) as usize;
    let eval_batch = t.eval_batch_size.map_or(batch, |b| b.max(1) as usize);
    let path = t.data.as_ref().map(|d| d.path.clone()).unwrap_or_default();
    let model_name = match t.model.as_ref() {
        Some(Model::Mlp(_)) => "mlp",
        Some(Model::Gpt(_)) => "gpt",
        Some(Model::Tgn(_)) => "tgn",
        None => "none",
    };
    let not_built = || {
        config_error(format!(
            "workload {:?} with model {model_name} and data {:?} is not built yet: this worker \
             trains Ddp with mlp on Digits and gpt on Text",
            t.workload,
            t.data.as_ref().map(|d| d.kind)
        ))
    };
    if t.workload != Workload::Ddp {
        return Err(not_built());
    }
    match (t.model.as_ref(), t.data.as_ref().map(|d| d.kind)) {
        (Some(Model::Mlp(mlp)), Some(DataKind::Digits)) => {
            let data = Digits::load(&path)?;
            let mut sizes = vec![Digits::FEATURES];
            sizes.extend(mlp.hidden_sizes.iter().map(|&h| h.max(1) as usize));
            sizes.push(Digits::CLASSES);
            let config = MlpConfig::new(sizes)?;
            let init = vec![0.0; config.num_params()];
            let model = Mlp::new(be, config, &init, batch.max(eval_batch))?;
            let mut task = DigitsTask {
                train_rows: data.train_rows(),
                data,
                model,
                eval_batch,
                x: Vec::new(),
                y: Vec::new(),
            };
            train(be, sync, always_sync, &mut task, cfg, comm, metrics, inputs)
        }
        (Some(Model::Gpt(g)), Some(DataKind::Text)) => {
            let data = Text::load(&path)?;
            let vocab = match g.vocab_size {
                Some(v) if (v as usize) < data.vocab.len() => {
                    return Err(config_error(format!(
                        "spec.training.model.gpt.vocabSize {v} is smaller than the {} distinct \
                         characters of {path}",
                        data.vocab.len()
                    )));
                }
                Some(v) => v as usize,
                None => data.vocab.len(),
            };
            let t_len = g.context_length.max(1) as usize;
            let config = GptConfig::new(
                g.layers.max(0) as usize,
                g.heads.max(0) as usize,
                g.embed_dim.max(0) as usize,
                t_len,
                vocab,
            )
            .map_err(|e| config_error(format!("spec.training.model.gpt: {e}")))?;
            let init = vec![0.0; config.num_params()];
            let model = Gpt::new(be, config, &init, batch.max(eval_batch), t_len)?;
            let mut task = TextTask {
                data,
                model,
                t: t_len,
                seed: t.seed as u64,
                eval_batch,
                windows: None,
                x: Vec::new(),
                y: Vec::new(),
            };
            train(be, sync, always_sync, &mut task, cfg, comm, metrics, inputs)
        }
        _ => Err(not_built()),
    }
}

/// Splits a step number into two floats that survive a broadcast exactly.
fn step_to_floats(step: u64) -> [f32; 2] {
    [(step >> 24) as f32, (step & 0xff_ffff) as f32]
}

fn step_from_floats(v: [f32; 2]) -> u64 {
    ((v[0] as u64) << 24) | v[1] as u64
}

#[allow(clippy::too_many_arguments)]
fn train<B: Backend, C: Communicator<Buffer = [f32], Owned = Vec<f32>>>(
    be: &B,
    sync: &mut dyn GradSync<B, C>,
    always_sync: bool,
    task: &mut dyn Task<B>,
    cfg: &WorkerConfig,
    comm: &mut C,
    metrics: &Metrics,
    inputs: &RunInputs<'_>,
) -> Result<Summary, WorkError> {
    let t = &cfg.training;
    let (rank, world) = (comm.rank(), comm.world_size());
    let batch = t.batch_size.unwrap_or(32).max(1) as usize;
    let accum = t.ddp.grad_accumulation_steps.max(1) as usize;
    let seed = t.seed as u64;
    let mut sampler =
        Sampler::new(task.samples(), batch, world, accum, seed).map_err(config_error)?;
    let total = match (t.max_steps, t.epochs) {
        (Some(s), _) => s.max(1) as u64,
        (None, Some(e)) => e.max(1) as u64 * sampler.steps_per_epoch(),
        (None, None) => sampler.steps_per_epoch(),
    };
    metrics.total_steps.set(total as i64);
    let n = task.net().num_params();
    let ranges = task.net().decay_ranges();
    let model = task.describe();
    let mut adam = Adam::new(be, n)?;

    // Resume from the newest checkpoint rank 0 sees, or start from rank 0's initialisation.
    let dir = inputs.checkpoint_dir.clone();
    let mut latest = [0.0f32; 2];
    if rank == 0
        && let Some(d) = &dir
        && let Some((step, _)) = checkpoint::list(d)?.last()
    {
        latest = step_to_floats(*step);
    }
    comm.broadcast(&mut latest, 0)?;
    let resume = step_from_floats(latest);
    let mut start = 0;
    let resumed_from = if resume > 0 {
        let d = dir.as_ref().expect("rank 0 found a checkpoint in it");
        let path = d.join(checkpoint::file_name(resume));
        let state = checkpoint::load(&path, &model, n).map_err(|e| {
            WorkError::new(
                ExitCode::Checkpoint,
                format!(
                    "rank {rank}: {e} (every rank reads the checkpoint rank 0 chose: mount the \
                 same storage at {} on every worker)",
                    d.display()
                ),
            )
        })?;
        if state.seed != seed {
            tracing::warn!(
                saved = state.seed,
                now = seed,
                "the checkpoint was written with another seed: data order differs from here on"
            );
        }
        let (p, _) = task.net().buffers();
        be.upload(p, &state.params)?;
        be.upload(&mut adam.m, &state.m)?;
        be.upload(&mut adam.v, &state.v)?;
        adam.t = state.adam_t;
        start = state.step;
        if rank == 0 {
            tracing::info!(step = start, path = %path.display(), "resumed from a checkpoint");
        }
        Some(start)
    } else {
        // Every rank starts from rank 0's parameters, as DDP does.
        let mut p = task.net().init(seed);
        comm.broadcast(&mut p, 0)?;
        be.upload(task.net().buffers().0, &p)?;
        None
    };
    let opt = &t.optimizer;
    let mb = |v: f64| (v * 1024.0 * 1024.0) as usize;
    let eval_every = t.evaluation.every_steps.map(|e| e.max(1) as u64);
    let ckpt_every = t.checkpoint.every_steps.map(|e| e.max(1) as u64);
    let keep = t.checkpoint.keep.max(1) as usize;
    let max_batches = t.evaluation.max_batches.map(|m| m.max(1) as usize);
    let sync_grads = world > 1 || always_sync;
    tracing::info!(
        rank,
        world,
        model = %model,
        params = n,
        steps = total,
        start,
        steps_per_epoch = sampler.steps_per_epoch(),
        batch,
        accum,
        "training"
    );
    let (mut loss_mean, mut eval) = (f32::NAN, None);
    let (mut train_seconds, mut tokens, mut comm_total) = (0.0f64, 0u64, SyncStats::default());
    for step in start..total {
        let started = Instant::now();
        let epoch = sampler.epoch_of(step);
        task.net().zero_grad(be)?;
        let mut loss_sum = 0.0f32;
        let mut stats = SyncStats::default();
        for micro in 0..accum {
            let idx = sampler.indices(step, micro, rank).to_vec();
            let last = micro + 1 == accum;
            let mut buckets = Buckets::new(
                n,
                mb(t.ddp.first_bucket_cap_mb),
                mb(t.ddp.bucket_cap_mb),
                t.ddp.overlap,
            );
            let mut failed = None;
            let loss = task.micro_step(be, &idx, epoch, 1.0 / accum as f32, &mut |g, from| {
                if !(last && sync_grads) || failed.is_some() {
                    return;
                }
                for r in buckets.ready(from) {
                    if let Err(e) = sync.start(be, comm, g, r) {
                        failed = Some(e);
                        return;
                    }
                }
            })?;
            if let Some(e) = failed {
                return Err(e);
            }
            loss_sum += loss;
            if last && sync_grads {
                let (_, g) = task.net().buffers();
                for r in buckets.flush() {
                    sync.start(be, comm, g, r)?;
                }
                stats = sync.finish(be, comm, g)?;
            }
        }
        let lr = lr_at(opt, total, step) as f32;
        let (p, g) = task.net().buffers();
        adam.step(
            be,
            p,
            g,
            &ranges,
            lr,
            (opt.beta1 as f32, opt.beta2 as f32),
            opt.epsilon as f32,
            opt.weight_decay as f32,
            opt.grad_clip_norm as f32,
        )?;
        // The mean loss over ranks (a tiny all-reduce that doubles as a liveness check).
        let mut l = [loss_sum / accum as f32];
        comm.all_reduce(&mut l, ReduceOp::Avg)?;
        loss_mean = l[0];
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
        train_seconds += secs;
        tokens += (batch * accum * task.tokens_per_sample()) as u64;
        comm_total.bytes += stats.bytes;
        comm_total.buckets += stats.buckets;
        comm_total.comm += stats.comm;
        comm_total.exposed += stats.exposed;
        metrics.step.set(step as i64 + 1);
        metrics.step_seconds.observe(secs);
        metrics.loss.set(f64::from(loss_mean));
        metrics
            .samples_per_second
            .set((batch * accum) as f64 / secs);
        metrics
            .tokens_per_second
            .set((batch * accum * task.tokens_per_sample()) as f64 / secs);
        if stats.buckets > 0 {
            metrics.observe_allreduce(stats.bytes, world, stats.comm.as_secs_f64());
            metrics.comm_seconds.inc_by(stats.comm.as_secs_f64());
            metrics
                .comm_exposed_seconds
                .inc_by(stats.exposed.as_secs_f64());
            metrics.comm_hidden_ratio.set(stats.overlap_ratio());
        }
        let done = step + 1 == total;
        if eval_every.is_some_and(|e| (step + 1) % e == 0) || done {
            let v = task.evaluate(be, max_batches)?;
            eval = Some(v);
            metrics.eval_metric.set(f64::from(v));
            if rank == 0 {
                tracing::info!(
                    step = step + 1,
                    loss = loss_mean,
                    lr,
                    step_ms = secs * 1e3,
                    comm_ms = stats.comm.as_secs_f64() * 1e3,
                    exposed_ms = stats.exposed.as_secs_f64() * 1e3,
                    "{} = {v:.4}",
                    task.eval_name()
                );
            }
        }
        if rank == 0
            && let Some(d) = &dir
            && (done || ckpt_every.is_some_and(|e| (step + 1) % e == 0))
        {
            let (p, _) = task.net().buffers();
            let state = checkpoint::State {
                step: step + 1,
                adam_t: adam.t,
                seed,
                model: model.clone(),
                params: be.download(p, 0, n)?,
                m: be.download(&adam.m, 0, n)?,
                v: be.download(&adam.v, 0, n)?,
            };
            let path = checkpoint::save(d, &state, keep)?;
            tracing::info!(step = step + 1, path = %path.display(), "checkpoint written");
        }
        (inputs.on_step)(step + 1);
    }
    let (p, _) = task.net().buffers();
    let params = be.download(p, 0, n)?;
    let (eval_accuracy, val_loss) = match task.eval_name() {
        "val_loss" => (None, eval),
        _ => (eval, None),
    };
    Ok(Summary {
        steps: total,
        loss: loss_mean,
        eval_accuracy,
        val_loss,
        resumed_from,
        params_digest: lockstep_api::config::fnv1a64(bytemuck::cast_slice(&params)),
        train_seconds,
        tokens,
        comm: comm_total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_schedule_warms_up_then_decays_to_the_minimum() {
        let cfg = Optimizer {
            learning_rate: 1.0,
            min_learning_rate: 0.1,
            warmup_steps: 10,
            schedule: LrSchedule::Cosine,
            ..Optimizer::default()
        };
        assert!((lr_at(&cfg, 110, 0) - 0.1).abs() < 1e-12);
        assert!((lr_at(&cfg, 110, 9) - 1.0).abs() < 1e-12);
        assert!((lr_at(&cfg, 110, 10) - 1.0).abs() < 1e-12);
        assert!((lr_at(&cfg, 110, 60) - 0.55).abs() < 1e-12);
        assert!((lr_at(&cfg, 110, 110) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn step_numbers_survive_the_float_broadcast() {
        for s in [0, 1, 500, (1 << 24) + 3, 123_456_789_012] {
            assert_eq!(step_from_floats(step_to_floats(s)), s);
        }
    }
}
