//! Pipeline parallelism over the GPT: each stage holds model parts (one, or `chunksPerStage`
//! with the interleaved schedule; chunk `c` of stage `s` is part `c * p + s`), and runs its
//! plan from [`crate::pipeline::plan`] literally, one action after the other: forwards and
//! backwards (whole, or split into the input-gradient and weight-gradient passes for ZB-H1) on
//! the engine's micro-batch slots, activations and their gradients sent to the neighbouring
//! stages and received from them through a [`StageLink`] (TCP through the host, or NCCL device
//! to device), then the gradient sync and the optimizer step. The tensors stay in backend
//! buffers, from a pool reused step after step.
//!
//! - Data: every replica's stages see the same micro-batches (the sampler's `(step, micro,
//!   replica)`, as DDP with `m` accumulation steps of `batchSize / m`), so a 1-stage GPipe or
//!   1F1B pipeline is DDP with gradient accumulation, bit for bit (ZB-H1 and two chunks on one
//!   stage add the tied embedding's two halves in another order).
//! - Gradients: a stage's gradients are averaged over its data-parallel group with the DDP
//!   buckets, which start during each chunk's last backward (or last weight-gradient pass,
//!   ZB-H1), as DDP's do; each chunk's buckets are tagged with the chunk, so the interleaved
//!   schedule's chunks, whose last backwards come at different times, overlap theirs too.
//!   The token embedding is tied: the first and last stages each hold a copy, and
//!   add up their two gradients before the optimizer, as Megatron does, so the copies stay
//!   equal. Global-norm clipping takes the norm over every stage (the tied copy counted once).
//! - Checkpoints: each stage's first replica writes its shard ([`checkpoint::shard_name`]) in
//!   the background; a step counts once every shard is on disk, and old shards go only then;
//!   at the end rank 0 waits until it sees every shard of the last save (shared storage).
//! - Measured per step: each stage's busy time (compute) and idle time (waiting for a
//!   neighbour), their ratio (the bubble), and the peak of live micro-batches' activations. A
//!   stage measures up to its own last compute: the time a stage that finishes early waits for
//!   the others (the last stage in 1F1B) is not in its figure, so the stages' bubbles differ
//!   and their mean is below the formula's share of the step; `bench pipeline` puts the stages
//!   on one time line for that figure.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lockstep_api::config::WorkerConfig;
use lockstep_api::contract::ExitCode;
use lockstep_api::training::{DataKind, Model};
use lockstep_engine::models::gpt::{Gpt, GptConfig, Input, PartLayout, PartSpec, Pass};
use lockstep_engine::optim::{Adam, clip_scale};
use lockstep_engine::{Backend, Net};

use super::link::StageLink;
use super::sync::{Buckets, GradSync, SyncStats};
use super::{Evaluation, HostComm, Metric, StepReport, StepSettings, Workload};
use crate::checkpoint;
use crate::comm::ReduceOp;
use crate::data::{Sampler, Text};
use crate::error::WorkError;
use crate::pipeline::{Action, PipelineSchedule, partition, plan};
use crate::topology::Topology;

/// What the pipeline measured on this rank in one step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StageStats {
    /// This rank's stage.
    pub stage: u32,
    /// Time spent computing forwards and backwards.
    pub busy: Duration,
    /// Time spent waiting for a neighbouring stage's activation or gradient.
    pub idle: Duration,
    /// Most micro-batches whose activations were alive at once.
    pub peak_micro_batches: usize,
    /// Bytes of those activations.
    pub peak_activation_bytes: usize,
    /// Time in forwards (F).
    pub forward: Duration,
    /// Time in whole backwards (B + W).
    pub backward: Duration,
    /// Time in input-gradient passes (B, split backward).
    pub backward_input: Duration,
    /// Time in weight-gradient passes (W, split backward).
    pub backward_weight: Duration,
    /// When the stage started its plan and when it ended its last forward or backward (to put
    /// stages of one process on one time line).
    pub phase: Option<(Instant, Instant)>,
}

impl StageStats {
    /// Share of the step's forward-backward phase the stage spent waiting: its bubble.
    pub fn bubble_ratio(&self) -> f64 {
        let total = (self.busy + self.idle).as_secs_f64();
        if total == 0.0 {
            0.0
        } else {
            self.idle.as_secs_f64() / total
        }
    }
}

/// How long rank 0 waits, at the end, for the other stages' shards of the last save.
const SHARDS_WAIT: Duration = Duration::from_secs(60);

/// Activations an evaluation keeps in flight to the next stage at most.
const MAX_EVAL_SENDS: usize = 8;

/// An error for a plan that does not fit the executor (a bug, not the job's fault).
fn broken(what: String) -> WorkError {
    WorkError::new(ExitCode::Internal, format!("pipeline plan: {what}"))
}

/// The pipeline workload on backend `B`, over communicator `C`.
pub struct Pipeline<B: Backend, C> {
    be: B,
    config: GptConfig,
    parts: Vec<Gpt<B>>,
    adams: Vec<Adam<B>>,
    plan: Vec<Action>,
    stages: usize,
    stage: usize,
    micro: usize,
    micro_batch: usize,
    eval_batch: usize,
    data: Text,
    t: usize,
    seed: u64,
    windows: Option<(u64, Vec<usize>)>,
    sampler: Sampler,
    sync: Box<dyn GradSync<B, C>>,
    link: Box<dyn StageLink<B, C>>,
    /// Every stage's channels (sending stage, receiving stage), in order: what the link connects.
    channels: Vec<(u32, u32)>,
    /// Buffers of one micro-batch's activations (or their gradient), reused from step to step.
    pool: Vec<B::Buf>,
    always_sync: bool,
    tied: Option<C>,
    grouped: bool,
    model: String,
    settings: StepSettings,
    writer: checkpoint::Background,
    /// The last save: (folder, step).
    last_saved: Option<(PathBuf, u64)>,
    /// spec.training.initFrom.
    init_from: Option<PathBuf>,
}

impl<B: Backend, C: HostComm> Pipeline<B, C> {
    /// The pipeline `cfg` asks for, on `be`, for this rank's stage of `topo`.
    pub fn new(
        be: B,
        sync: Box<dyn GradSync<B, C>>,
        link: Box<dyn StageLink<B, C>>,
        always_sync: bool,
        cfg: &WorkerConfig,
        topo: &Topology<C>,
    ) -> Result<Self, WorkError> {
        let t = &cfg.training;
        let pp = &t.pipeline;
        let g = match (t.model.as_ref(), t.data.as_ref().map(|d| d.kind)) {
            (Some(Model::Gpt(g)), Some(DataKind::Text)) => g,
            _ => {
                return Err(WorkError::config(
                    "workload Pipeline trains spec.training.model.gpt on data of kind Text",
                ));
            }
        };
        let stages = topo.layout.pipeline_stages() as usize;
        let stage = topo.stage as usize;
        let chunks = pp.chunks_per_stage.max(1) as usize;
        let micro = pp.micro_batches.max(1) as usize;
        let batch = t.batch_size.unwrap_or(32).max(1) as usize;
        if !batch.is_multiple_of(micro) {
            return Err(WorkError::config(format!(
                "spec.training.batchSize {batch} is not a multiple of \
                 spec.training.pipeline.microBatches {micro}"
            )));
        }
        let micro_batch = batch / micro;
        let eval_batch = t.eval_batch_size.map_or(batch, |b| b.max(1) as usize);
        let path = t.data.as_ref().map(|d| d.path.clone()).unwrap_or_default();
        let (data, config) = super::task::gpt_on_text(g, &path)?;
        let t_len = config.max_seq;
        let n_parts = stages * chunks;
        let cuts = match &pp.layers_per_part {
            Some(counts) => {
                partition::from_counts(&config, n_parts, counts).map_err(WorkError::config)?
            }
            None => partition::balance(&config, n_parts).ok_or_else(|| {
                WorkError::config(format!(
                    "spec.training.model.gpt.layers {} is fewer than the pipeline's {n_parts} \
                     model parts (pipelineStages x chunksPerStage): every part needs a block",
                    config.layers
                ))
            })?,
        };
        let plans = plan(pp.schedule, stages as u32, micro as u32, chunks as u32)
            .map_err(|e| WorkError::config(format!("spec.training.pipeline: {e}")))?;
        let my_plan = plans[stage].clone();
        let mut channels: Vec<(u32, u32)> = plans
            .iter()
            .enumerate()
            .flat_map(|(s, actions)| {
                actions
                    .iter()
                    .filter_map(move |a| crate::pipeline::channels::channel(s as u32, a))
            })
            .collect();
        channels.sort_unstable();
        channels.dedup();
        let split = pp.schedule == PipelineSchedule::ZeroBubble;
        let mut parts = Vec::with_capacity(chunks);
        let mut adams = Vec::with_capacity(chunks);
        for c in 0..chunks {
            let k = c * stages + stage;
            let spec = PartSpec {
                layers: cuts[k].clone(),
                embed: k == 0,
                head: k + 1 == n_parts,
            };
            let layout = PartLayout::new(config, spec.clone())?;
            let zeros = vec![0.0; layout.len()];
            let slots = peak_live(&my_plan, c as u32).max(1);
            // Evaluation runs micro-batches of the same size through slot 0.
            let part = Gpt::part(&be, config, spec, &zeros, micro_batch, t_len, slots, split)?;
            adams.push(Adam::new(&be, layout.len())?);
            parts.push(part);
        }
        let cut_text: Vec<String> = cuts
            .iter()
            .map(|r| format!("{}..{}", r.start, r.end))
            .collect();
        let model = format!(
            "gpt layers={} heads={} embed={} context={} vocab={} pipeline stage {stage} of \
             {stages}, blocks [{}]",
            config.layers,
            config.heads,
            config.channels,
            config.max_seq,
            config.vocab,
            cut_text.join(" ")
        );
        let sampler = Sampler::new(
            data.windows_per_epoch(t_len),
            micro_batch,
            topo.data_parallel_degree(),
            micro,
            t.seed as u64,
        )
        .map_err(WorkError::config)?;
        Ok(Self {
            be,
            config,
            parts,
            adams,
            plan: my_plan,
            stages,
            stage,
            micro,
            micro_batch,
            eval_batch,
            data,
            t: t_len,
            seed: t.seed as u64,
            windows: None,
            sampler,
            sync,
            link,
            channels,
            pool: Vec::new(),
            always_sync,
            tied: None,
            grouped: false,
            model,
            settings: StepSettings::new(t),
            writer: checkpoint::Background::default(),
            last_saved: None,
            init_from: t.init_from.as_ref().map(PathBuf::from),
        })
    }

    fn n_parts(&self) -> usize {
        self.stages * self.parts.len()
    }

    /// Model part of local chunk `c`.
    fn part_of(&self, c: usize) -> usize {
        c * self.stages + self.stage
    }

    /// Splits off the communicator of the two stages that hold the tied embedding (every rank
    /// of the pipeline takes part, once), and connects the link to the neighbouring stages.
    fn groups(&mut self, topo: &mut Topology<C>) -> Result<(), WorkError> {
        if self.grouped {
            return Ok(());
        }
        self.link
            .connect(&self.be, &mut topo.pipeline, self.stage, &self.channels)?;
        if self.stages > 1 {
            let ends = self.stage == 0 || self.stage + 1 == self.stages;
            let comm = topo.pipeline.split(u32::from(ends), topo.stage)?;
            if ends {
                self.tied = Some(comm);
            }
        }
        self.grouped = true;
        Ok(())
    }

    /// Token ids and targets of micro-batch `micro` of `step` for `replica`.
    fn micro_batch(&mut self, step: u64, micro: usize, replica: usize) -> (Vec<i32>, Vec<i32>) {
        let epoch = self.sampler.epoch_of(step);
        if self.windows.as_ref().is_none_or(|(e, _)| *e != epoch) {
            self.windows = Some((epoch, self.data.windows(self.t, self.seed, epoch)));
        }
        let windows = &self.windows.as_ref().expect("set above").1;
        let starts: Vec<usize> = self
            .sampler
            .indices(step, micro, replica)
            .iter()
            .map(|&i| windows[i])
            .collect();
        let (mut x, mut y) = (Vec::new(), Vec::new());
        self.data.batch(&starts, self.t, &mut x, &mut y);
        (x, y)
    }

    /// Averages every part's gradients over the data-parallel group (finishing the buckets
    /// started during backward), then adds up the tied embedding's two copies.
    fn sync_grads(
        &mut self,
        topo: &mut Topology<C>,
        started: &mut [Option<Buckets>],
    ) -> Result<SyncStats, WorkError> {
        let be = &self.be;
        let dp = &mut topo.data_parallel;
        let mut stats = SyncStats::default();
        if dp.world_size() > 1 || self.always_sync {
            // Each chunk's last buckets, then each chunk's wait (its buckets tagged with it).
            for (c, part) in self.parts.iter_mut().enumerate() {
                let n = part.num_params();
                let mut buckets = started[c]
                    .take()
                    .unwrap_or_else(|| self.settings.buckets(n, false));
                let (_, g) = part.buffers();
                for r in buckets.flush() {
                    self.sync.start(be, dp, g, c, r)?;
                }
            }
            // Every chunk's wait, even after an error, so that no bucket is left in flight.
            let mut failed = None;
            for (c, part) in self.parts.iter_mut().enumerate() {
                let (_, g) = part.buffers();
                match self.sync.finish(be, dp, g, c) {
                    Ok(s) => {
                        stats.bytes += s.bytes;
                        stats.buckets += s.buckets;
                        stats.comm += s.comm;
                        stats.exposed += s.exposed;
                    }
                    Err(e) => {
                        failed.get_or_insert(e);
                    }
                }
            }
            if let Some(e) = failed {
                return Err(e);
            }
        }
        let wte = self.config.padded_vocab * self.config.channels;
        let last = self.parts.len() - 1;
        if self.stages == 1 && last > 0 {
            // Both copies on this rank (one stage of several chunks).
            let a = be.download(&self.parts[0].params.grads, 0, wte)?;
            let b = be.download(&self.parts[last].params.grads, 0, wte)?;
            let sum: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
            be.upload_at(&mut self.parts[0].params.grads, 0, &sum)?;
            be.upload_at(&mut self.parts[last].params.grads, 0, &sum)?;
        } else if let Some(tied) = self.tied.as_mut() {
            let c = if self.stage == 0 { 0 } else { last };
            let mut g = be.download(&self.parts[c].params.grads, 0, wte)?;
            tied.all_reduce(&mut g, ReduceOp::Sum)?;
            be.upload_at(&mut self.parts[c].params.grads, 0, &g)?;
        }
        Ok(stats)
    }

    /// AdamW on every part, with the gradient norm taken over the whole pipeline.
    fn optimize(&mut self, topo: &mut Topology<C>, lr: f32) -> Result<(), WorkError> {
        let be = &self.be;
        let norm = if self.settings.clip > 0.0 {
            let wte = self.config.padded_vocab * self.config.channels;
            let n_parts = self.n_parts();
            let mut local = 0.0f64;
            for (c, part) in self.parts.iter().enumerate() {
                let k = c * self.stages + self.stage;
                let len = part.num_params();
                // The head's copy of the tied embedding is counted on the first part.
                let from = if k + 1 == n_parts && n_parts > 1 {
                    wte
                } else {
                    0
                };
                local += be.sum_squares(&part.params.grads, from, len - from)?;
            }
            if self.stages > 1 {
                let mut x = [local as f32];
                topo.pipeline.all_reduce(&mut x, ReduceOp::Sum)?;
                local = f64::from(x[0]);
            }
            Some(local.sqrt() as f32)
        } else {
            None
        };
        let scale = clip_scale(norm, self.settings.clip);
        for (part, adam) in self.parts.iter_mut().zip(&mut self.adams) {
            let ranges = part.decay_ranges();
            let (p, g) = part.buffers();
            adam.apply(
                be,
                p,
                g,
                &ranges,
                lr,
                self.settings.betas,
                self.settings.eps,
                self.settings.weight_decay,
                scale,
            )?;
        }
        Ok(())
    }

    /// Runs this stage's plan for `step`.
    fn run_plan(
        &mut self,
        topo: &mut Topology<C>,
        step: u64,
        lr: f32,
    ) -> Result<(StepReport, StageStats), WorkError> {
        let (p, s) = (self.stages, self.stage);
        let n_parts = self.n_parts();
        let chunks = self.parts.len();
        let replica = topo.replica as usize;
        let (mb, t, c) = (self.micro_batch, self.t, self.config.channels);
        // As DDP's accumulation computes it, so that one stage is DDP bit for bit.
        let scale = (1.0 / self.micro as f32) / (mb * t) as f32;
        let sync_grads = topo.data_parallel.world_size() > 1 || self.always_sync;
        let overlap = sync_grads && self.settings.overlap;
        // The index of each chunk's last gradient-producing action: its buckets start there.
        let mut last_grad = vec![usize::MAX; chunks];
        for (i, a) in self.plan.iter().enumerate() {
            if let Action::Backward { chunk, .. } | Action::BackwardWeight { chunk, .. } = *a {
                last_grad[chunk as usize] = i;
            }
        }
        for part in &mut self.parts {
            part.zero_grad(&self.be)?;
        }
        let mut slot_of: Vec<HashMap<u32, usize>> = vec![HashMap::new(); chunks];
        let mut free: Vec<Vec<usize>> = self
            .parts
            .iter()
            .map(|part| (0..part.slots()).rev().collect())
            .collect();
        // Activations and gradients in backend buffers of one micro-batch each (`n` values):
        // received, or made here for a later chunk of this stage (`acts`, `grads`), or waiting
        // for their send (`out_acts`, `out_grads`).
        let n = mb * t * c;
        let mut pool = std::mem::take(&mut self.pool);
        let mut acts: HashMap<(u32, u32), B::Buf> = HashMap::new();
        let mut grads: HashMap<(u32, u32), B::Buf> = HashMap::new();
        let mut out_acts: HashMap<(u32, u32), B::Buf> = HashMap::new();
        let mut out_grads: HashMap<(u32, u32), B::Buf> = HashMap::new();
        let mut started: Vec<Option<Buckets>> = (0..chunks).map(|_| None).collect();
        let mut stats = StageStats {
            stage: s as u32,
            ..StageStats::default()
        };
        let (mut live, mut live_bytes) = (0usize, 0usize);
        let mut comm = SyncStats::default();
        let (mut loss_sum, mut losses) = (0.0f32, 0usize);
        let plan = self.plan.clone();
        let phase_start = Instant::now();
        let mut phase_end = phase_start;
        let missing = |what: &str, micro: u32, chunk: u32| {
            broken(format!(
                "stage {s}: no {what} for micro-batch {micro} of chunk {chunk}"
            ))
        };
        for (i, action) in plan.iter().enumerate() {
            match *action {
                Action::RecvActivation { from, micro, chunk }
                | Action::RecvGrad { from, micro, chunk } => {
                    let mut buf = buffer(&self.be, &mut pool, n)?;
                    let t0 = Instant::now();
                    self.link
                        .recv(&self.be, &mut topo.pipeline, &mut buf, n, from as usize)?;
                    stats.idle += t0.elapsed();
                    let into = if matches!(action, Action::RecvGrad { .. }) {
                        &mut grads
                    } else {
                        &mut acts
                    };
                    into.insert((micro, chunk), buf);
                }
                Action::SendActivation { to, micro, chunk }
                | Action::SendGrad { to, micro, chunk } => {
                    let (from, what) = if matches!(action, Action::SendGrad { .. }) {
                        (&mut out_grads, "gradient to send")
                    } else {
                        (&mut out_acts, "activation to send")
                    };
                    let buf = from
                        .remove(&(micro, chunk))
                        .ok_or_else(|| missing(what, micro, chunk))?;
                    let free = self
                        .link
                        .send(&self.be, &mut topo.pipeline, buf, n, to as usize)?;
                    pool.extend(free);
                }
                Action::Forward { micro, chunk } => {
                    let k = self.part_of(chunk as usize);
                    let (x, y) = if k == 0 || k + 1 == n_parts {
                        self.micro_batch(step, micro as usize, replica)
                    } else {
                        (Vec::new(), Vec::new())
                    };
                    let t0 = Instant::now();
                    let slot = free[chunk as usize]
                        .pop()
                        .ok_or_else(|| missing("free activation slot", micro, chunk))?;
                    slot_of[chunk as usize].insert(micro, slot);
                    let part = &mut self.parts[chunk as usize];
                    let input = if k == 0 {
                        Input::Ids(&x)
                    } else {
                        let received = acts
                            .remove(&(micro, chunk))
                            .ok_or_else(|| missing("input activation", micro, chunk))?;
                        self.be.copy(part.input_mut(slot), 0, &received, 0, n)?;
                        pool.push(received);
                        Input::Staged
                    };
                    let targets = (k + 1 == n_parts).then_some(&y[..]);
                    part.forward_slot(&self.be, slot, input, targets, mb, t, Some(scale))?;
                    live += 1;
                    live_bytes += part.slot_bytes();
                    stats.peak_micro_batches = stats.peak_micro_batches.max(live);
                    stats.peak_activation_bytes = stats.peak_activation_bytes.max(live_bytes);
                    if k + 1 == n_parts {
                        loss_sum += part.mean_loss_slot(&self.be, slot)?;
                        losses += 1;
                    } else {
                        let mut out = buffer(&self.be, &mut pool, n)?;
                        self.be.copy(&mut out, 0, part.output_buf(slot), 0, n)?;
                        match home(k + 1, p) {
                            (st, next) if st == s => {
                                acts.insert((micro, next as u32), out);
                            }
                            _ => {
                                out_acts.insert((micro, chunk), out);
                            }
                        }
                    }
                    stats.forward += t0.elapsed();
                    stats.busy += t0.elapsed();
                    phase_end = Instant::now();
                }
                Action::Backward { micro, chunk } | Action::BackwardInput { micro, chunk } => {
                    let whole = matches!(action, Action::Backward { .. });
                    let k = self.part_of(chunk as usize);
                    let slot = *slot_of[chunk as usize]
                        .get(&micro)
                        .ok_or_else(|| missing("forward", micro, chunk))?;
                    let t0 = Instant::now();
                    let pass = if whole { Pass::Full } else { Pass::Input };
                    let be = &self.be;
                    let part = &mut self.parts[chunk as usize];
                    let n_params = part.num_params();
                    // The output's gradient: the loss's on the head part, else received or
                    // made by this stage's later chunk, copied where the backward takes it.
                    if k + 1 < n_parts {
                        let dout = grads
                            .remove(&(micro, chunk))
                            .ok_or_else(|| missing("output gradient", micro, chunk))?;
                        be.copy(part.dout_mut(), 0, &dout, 0, n)?;
                        pool.push(dout);
                    }
                    if overlap && whole && last_grad[chunk as usize] == i {
                        let b = self.settings.buckets(n_params, true);
                        let (sync, dp) = (self.sync.as_mut(), &mut topo.data_parallel);
                        started[chunk as usize] =
                            Some(overlapped(be, sync, dp, chunk as usize, b, |ready| {
                                part.backward_slot(be, slot, pass, ready)
                            })?);
                    } else {
                        part.backward_slot(be, slot, pass, &mut |_, _| {})?;
                    }
                    if k > 0 {
                        let mut g = buffer(be, &mut pool, n)?;
                        be.copy(&mut g, 0, part.input_grad_buf(), 0, n)?;
                        match home(k - 1, p) {
                            (st, prev) if st == s => {
                                grads.insert((micro, prev as u32), g);
                            }
                            _ => {
                                out_grads.insert((micro, chunk), g);
                            }
                        }
                    }
                    if whole {
                        slot_of[chunk as usize].remove(&micro);
                        free[chunk as usize].push(slot);
                        live -= 1;
                        live_bytes -= part.slot_bytes();
                        stats.backward += t0.elapsed();
                    } else {
                        stats.backward_input += t0.elapsed();
                    }
                    stats.busy += t0.elapsed();
                    phase_end = Instant::now();
                }
                Action::BackwardWeight { micro, chunk } => {
                    let slot = slot_of[chunk as usize]
                        .remove(&micro)
                        .ok_or_else(|| missing("input-gradient pass", micro, chunk))?;
                    let t0 = Instant::now();
                    let be = &self.be;
                    let part = &mut self.parts[chunk as usize];
                    if overlap && last_grad[chunk as usize] == i {
                        // The last weight-gradient pass makes the chunk's gradients final.
                        let n = part.num_params();
                        let b = self.settings.buckets(n, true);
                        let (sync, dp) = (self.sync.as_mut(), &mut topo.data_parallel);
                        started[chunk as usize] =
                            Some(overlapped(be, sync, dp, chunk as usize, b, |ready| {
                                part.backward_weight(be, slot, ready)
                            })?);
                    } else {
                        part.backward_weight(be, slot, &mut |_, _| {})?;
                    }
                    free[chunk as usize].push(slot);
                    live -= 1;
                    live_bytes -= part.slot_bytes();
                    stats.backward_weight += t0.elapsed();
                    stats.busy += t0.elapsed();
                    phase_end = Instant::now();
                }
                Action::GradSync => {
                    comm = self.sync_grads(topo, &mut started)?;
                }
                Action::OptimizerStep => self.optimize(topo, lr)?,
            }
        }
        pool.extend(self.link.finish(&self.be, &mut topo.pipeline)?);
        // What a failed step leaves in the maps is dropped; the rest is reused.
        self.pool = pool;
        stats.phase = Some((phase_start, phase_end));
        let samples = (self.micro_batch * self.micro) as u64;
        let report = StepReport {
            loss: (losses > 0).then(|| loss_sum / losses as f32),
            samples,
            tokens: samples * self.t as u64,
            comm,
            pipeline: Some(stats),
        };
        Ok((report, stats))
    }

    /// The named tensors of the stage's parts, one after the other in its flat state.
    fn tensors(&self) -> Vec<lockstep_engine::models::names::Named> {
        let mut at = 0;
        let mut out = Vec::new();
        for part in &self.parts {
            out.extend(part.layout.tensors().into_iter().map(|mut t| {
                t.offset += at;
                t
            }));
            at += part.num_params();
        }
        out
    }

    /// Writes the parts' state as one vector each of parameters, first and second moments.
    fn state(&self, step: u64) -> Result<checkpoint::State, WorkError> {
        let (mut params, mut m, mut v) = (Vec::new(), Vec::new(), Vec::new());
        for (part, adam) in self.parts.iter().zip(&self.adams) {
            let n = part.num_params();
            params.extend(self.be.download(&part.params.values, 0, n)?);
            m.extend(self.be.download(&adam.m, 0, n)?);
            v.extend(self.be.download(&adam.v, 0, n)?);
        }
        Ok(checkpoint::State {
            step,
            adam_t: self.adams[0].t,
            seed: self.seed,
            model: self.model.clone(),
            tensors: self.tensors(),
            meta: super::task::text_meta(&self.config, &self.data),
            params,
            m,
            v,
            blobs: Default::default(),
        })
    }
}

/// Runs a backward `pass` with a callback that starts the data-parallel buckets as the pass
/// makes gradients final (as DDP does); returns the buckets to finish.
fn overlapped<B: Backend, C>(
    be: &B,
    sync: &mut dyn GradSync<B, C>,
    dp: &mut C,
    tag: usize,
    mut buckets: Buckets,
    pass: impl FnOnce(&mut dyn FnMut(&mut B::Buf, usize)) -> lockstep_engine::Result<()>,
) -> Result<Buckets, WorkError> {
    let mut failed = None;
    pass(&mut |g, from| {
        if failed.is_some() {
            return;
        }
        for r in buckets.ready(from) {
            if let Err(e) = sync.start(be, dp, g, tag, r) {
                failed = Some(e);
                return;
            }
        }
    })?;
    match failed {
        Some(e) => Err(e),
        None => Ok(buckets),
    }
}

/// A buffer of `n` activations (the backend's activation storage: bf16 in bf16) from `pool`,
/// or a new one.
fn buffer<B: Backend>(be: &B, pool: &mut Vec<B::Buf>, n: usize) -> Result<B::Buf, WorkError> {
    match pool.pop() {
        Some(b) => Ok(b),
        None => Ok(be.activations(n)?),
    }
}

/// Where model part `k` of a pipeline of `p` stages lives: (stage, chunk).
fn home(k: usize, p: usize) -> (usize, usize) {
    (k % p, k / p)
}

/// Most micro-batches of `chunk` alive at once in `plan` (a forward makes one alive; its
/// whole backward or weight-gradient pass ends it).
pub fn peak_live(plan: &[Action], chunk: u32) -> usize {
    let (mut live, mut peak) = (0usize, 0usize);
    for a in plan {
        match *a {
            Action::Forward { chunk: c, .. } if c == chunk => {
                live += 1;
                peak = peak.max(live);
            }
            Action::Backward { chunk: c, .. } | Action::BackwardWeight { chunk: c, .. }
                if c == chunk =>
            {
                live = live.saturating_sub(1);
            }
            _ => {}
        }
    }
    peak
}

impl<B: Backend, C: HostComm> Workload<C> for Pipeline<B, C> {
    fn describe(&self) -> String {
        self.model.clone()
    }

    fn num_params(&self) -> usize {
        self.parts.iter().map(|p| p.num_params()).sum()
    }

    fn steps_per_epoch(&self) -> u64 {
        self.sampler.steps_per_epoch()
    }

    fn init(&mut self, topo: &mut Topology<C>) -> Result<(), WorkError> {
        self.groups(topo)?;
        // Every rank draws the whole model from the seed (or reads it from
        // spec.training.initFrom) and keeps its parts: the replicas, and the two copies of the
        // tied embedding, start equal.
        let whole = match &self.init_from {
            Some(path) => crate::hf::initial_weights(
                path,
                &crate::hf::Target {
                    tensors: &self.config.tensors(),
                    len: self.config.num_params(),
                    model: &self.model,
                    gpt: Some(&self.config),
                },
            )?,
            None => self.config.init(self.seed),
        };
        for part in &mut self.parts {
            let host = part.layout.gather(&whole);
            self.be.upload(part.buffers().0, &host)?;
        }
        Ok(())
    }

    fn load(&mut self, topo: &mut Topology<C>, dir: &Path, step: u64) -> Result<(), WorkError> {
        self.groups(topo)?;
        let path = dir.join(checkpoint::shard_name(
            step,
            self.stage as u32,
            self.stages as u32,
        ));
        let tensors = self.tensors();
        let state =
            checkpoint::load(&path, &self.model, &tensors, self.num_params()).map_err(|e| {
                WorkError::new(
                    ExitCode::Checkpoint,
                    format!(
                        "rank {} (stage {}): {e} (every rank reads its stage's shard of the step \
                     rank 0 chose: mount the same storage at {} on every worker)",
                        topo.rank,
                        self.stage,
                        dir.display()
                    ),
                )
            })?;
        let mut at = 0;
        for (part, adam) in self.parts.iter_mut().zip(&mut self.adams) {
            let n = part.num_params();
            let r = at..at + n;
            self.be.upload(part.buffers().0, &state.params[r.clone()])?;
            adam.restore(&self.be, &state.m[r.clone()], &state.v[r], state.adam_t)?;
            at += n;
        }
        Ok(())
    }

    fn step(
        &mut self,
        topo: &mut Topology<C>,
        step: u64,
        lr: f32,
    ) -> Result<StepReport, WorkError> {
        Ok(self.run_plan(topo, step, lr)?.0)
    }

    fn evaluate(
        &mut self,
        topo: &mut Topology<C>,
        max_batches: Option<usize>,
    ) -> Result<Evaluation, WorkError> {
        // The windows DDP evaluates (max_batches batches of eval_batch), in micro-batches
        // passed through the parts in model order.
        let starts: Vec<usize> = self
            .data
            .val_windows(self.t)
            .chunks(self.eval_batch)
            .take(max_batches.unwrap_or(usize::MAX))
            .flatten()
            .copied()
            .collect();
        let (p, s, n_parts) = (self.stages, self.stage, self.n_parts());
        let (mut sum, mut count) = (0.0f64, 0usize);
        let (mut x, mut y) = (Vec::new(), Vec::new());
        let mut sends = std::collections::VecDeque::new();
        for chunk in starts.chunks(self.micro_batch) {
            let b = chunk.len();
            self.data.batch(chunk, self.t, &mut x, &mut y);
            let mut carried: Option<Vec<f32>> = None;
            for k in 0..n_parts {
                let (home, c) = home(k, p);
                if home != s {
                    carried = None;
                    continue;
                }
                let input = if k == 0 {
                    None
                } else {
                    match carried.take() {
                        Some(v) => Some(v),
                        None => {
                            let mut buf = vec![0.0f32; b * self.t * self.config.channels];
                            topo.pipeline.recv(&mut buf, (k - 1) % p)?;
                            Some(buf)
                        }
                    }
                };
                let part = &mut self.parts[c];
                let input = match &input {
                    None => Input::Ids(&x),
                    Some(v) => Input::Acts(v),
                };
                let targets = (k + 1 == n_parts).then_some(&y[..]);
                part.forward_slot(&self.be, 0, input, targets, b, self.t, None)?;
                if k + 1 == n_parts {
                    sum += f64::from(part.mean_loss_slot(&self.be, 0)?) * b as f64;
                    count += b;
                } else {
                    let out = part.output(&self.be, 0)?;
                    if (k + 1) % p == s {
                        carried = Some(out);
                    } else {
                        sends.push_back(topo.pipeline.send_async(out, (k + 1) % p));
                        // A bounded number in flight: the validation set can be large.
                        while sends.len() > MAX_EVAL_SENDS {
                            if let Some(oldest) = sends.pop_front() {
                                oldest.wait()?;
                            }
                        }
                    }
                }
            }
        }
        for pending in sends {
            pending.wait()?;
        }
        // The last stage computed the loss and sends it to the others on the point-to-point
        // channel (whose timeout allows for the whole evaluation, unlike a collective's).
        let last = (n_parts - 1) % p;
        let mut v = [(sum / count.max(1) as f64) as f32];
        if s == last {
            let done: Vec<_> = (0..p)
                .filter(|&o| o != s)
                .map(|o| topo.pipeline.send_async(v.to_vec(), o))
                .collect();
            for d in done {
                d.wait()?;
            }
        } else {
            topo.pipeline.recv(&mut v, last)?;
        }
        Ok(Evaluation {
            metric: Metric::Loss,
            value: v[0],
            link: None,
        })
    }

    fn save(
        &mut self,
        topo: &mut Topology<C>,
        dir: &Path,
        step: u64,
        keep: usize,
    ) -> Result<Option<PathBuf>, WorkError> {
        // Each stage's first replica writes the stage's shard in the background, then prunes:
        // pruning counts only steps whose every shard is on disk, so no rank waits for another.
        // By now the previous save's shards have long been written: rank 0 not seeing them all
        // means the stages do not share the storage (said now, failed at the end).
        if topo.rank == 0
            && let Some((prev_dir, prev)) = &self.last_saved
            && !checkpoint::list(prev_dir, self.checkpoint_shape())?
                .iter()
                .any(|c| c.0 == *prev)
        {
            tracing::warn!(
                step = prev,
                dir = %prev_dir.display(),
                "rank 0 does not see every stage's shard of the previous checkpoint yet: if the \
                 workers do not share this storage, no restart can resume from it"
            );
        }
        self.last_saved = Some((dir.to_path_buf(), step));
        if topo.replica != 0 {
            return Ok(None);
        }
        let name = checkpoint::shard_name(step, self.stage as u32, self.stages as u32);
        let shape = self.checkpoint_shape();
        Ok(self
            .writer
            .start(dir, self.state(step)?, name, Some((keep, shape)))?)
    }

    fn flush(&mut self, topo: &mut Topology<C>) -> Result<Option<PathBuf>, WorkError> {
        let written = self.writer.wait()?;
        let Some((dir, step)) = self.last_saved.take() else {
            return Ok(written);
        };
        // Rank 0 checks, on the file system alone (no collective a slow disk could time out),
        // that every stage's shard of the last save arrived where it reads them.
        if topo.rank == 0 {
            let shape = self.checkpoint_shape();
            let deadline = Instant::now() + SHARDS_WAIT;
            while !checkpoint::list(&dir, shape)?.iter().any(|c| c.0 == step) {
                if Instant::now() >= deadline {
                    return Err(WorkError::new(
                        ExitCode::Checkpoint,
                        format!(
                            "rank 0 does not find every stage's shard of step {step} in {} \
                             after {} s: the stages' shards must meet in one folder, so mount \
                             the same storage (a ReadWriteMany volume) at that path on every \
                             worker",
                            dir.display(),
                            SHARDS_WAIT.as_secs()
                        ),
                    ));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(written)
    }

    fn checkpoint_shape(&self) -> checkpoint::Shape {
        Some(self.stages as u32)
    }

    fn params_digest(&mut self) -> Result<u64, WorkError> {
        let mut all = Vec::new();
        for part in &self.parts {
            all.extend(
                self.be
                    .download(&part.params.values, 0, part.num_params())?,
            );
        }
        Ok(lockstep_api::config::fnv1a64(bytemuck::cast_slice(&all)))
    }
}
