//! Data parallelism with PyTorch DDP's semantics: every replica holds the whole model;
//! parameters start equal (broadcast from replica 0, or loaded from the same checkpoint by
//! every replica); each replica trains on its own part of the global batch; gradient buckets
//! (contiguous ranges of the flat gradient buffer, see [`super::sync`]) are averaged over the
//! data-parallel group as soon as backward has made them final, overlapping the rest of
//! backward; the optimizer waits for all of them. Gradient accumulation communicates only on the
//! last micro-step (`no_sync` on the others).

use std::path::{Path, PathBuf};

use lockstep_api::config::WorkerConfig;
use lockstep_api::contract::ExitCode;
use lockstep_engine::Backend;
use lockstep_engine::optim::Adam;

use super::sync::{GradSync, SyncStats};
use super::task::{self, Task};
use super::{Evaluation, HostComm, StepReport, StepSettings, Workload};
use crate::checkpoint;
use crate::data::Sampler;
use crate::error::WorkError;
use crate::topology::Topology;

/// The DDP workload on backend `B`, averaging gradients over communicator `C`'s group.
pub struct Ddp<B: Backend, C> {
    be: B,
    task: Box<dyn Task<B>>,
    sync: Box<dyn GradSync<B, C>>,
    always_sync: bool,
    adam: Adam<B>,
    sampler: Sampler,
    model: String,
    num_params: usize,
    decay_ranges: Vec<(usize, usize, bool)>,
    batch: usize,
    accum: usize,
    seed: u64,
    settings: StepSettings,
    writer: checkpoint::Background,
    init_from: Option<PathBuf>,
}

impl<B: Backend, C: HostComm> Ddp<B, C> {
    /// DDP of the task `cfg` names, on `be`; `always_sync` runs the gradient transport even on
    /// one replica (see [`super::build`]).
    pub fn new(
        be: B,
        sync: Box<dyn GradSync<B, C>>,
        always_sync: bool,
        cfg: &WorkerConfig,
        topo: &Topology<C>,
    ) -> Result<Self, WorkError>
    where
        B: 'static,
    {
        if topo.layout.pipeline_stages() > 1 {
            return Err(WorkError::config(
                "workload Ddp trains the whole model on every rank: set \
                 spec.parallelism.pipelineStages to 1, or use workload Pipeline",
            ));
        }
        let t = &cfg.training;
        let batch = t.batch_size.unwrap_or(32).max(1) as usize;
        let eval_batch = t.eval_batch_size.map_or(batch, |b| b.max(1) as usize);
        let accum = t.ddp.grad_accumulation_steps.max(1) as usize;
        let seed = t.seed as u64;
        let mut task = task::build(&be, cfg, batch, eval_batch)?;
        let sampler = Sampler::new(
            task.samples(),
            batch,
            topo.data_parallel_degree(),
            accum,
            seed,
        )
        .map_err(WorkError::config)?;
        let num_params = task.net().num_params();
        let decay_ranges = task.net().decay_ranges();
        let adam = Adam::new(&be, num_params)?;
        Ok(Self {
            model: task.describe(),
            task,
            sync,
            always_sync,
            adam,
            sampler,
            num_params,
            decay_ranges,
            batch,
            accum,
            seed,
            settings: StepSettings::new(t),
            writer: checkpoint::Background::default(),
            init_from: t.init_from.as_ref().map(PathBuf::from),
            be,
        })
    }
}

impl<B: Backend, C: HostComm> Workload<C> for Ddp<B, C> {
    fn describe(&self) -> String {
        self.model.clone()
    }

    fn num_params(&self) -> usize {
        self.num_params
    }

    fn steps_per_epoch(&self) -> u64 {
        self.sampler.steps_per_epoch()
    }

    fn init(&mut self, topo: &mut Topology<C>) -> Result<(), WorkError> {
        // Every replica starts from replica 0's parameters, as DDP does: drawn from the seed, or
        // read from spec.training.initFrom (by replica 0 alone).
        let mut p = match &self.init_from {
            Some(path) if topo.replica == 0 => {
                let tensors = self.task.tensors();
                let gpt = self.task.gpt();
                crate::hf::initial_weights(
                    path,
                    &crate::hf::Target {
                        tensors: &tensors,
                        len: self.num_params,
                        model: &self.model,
                        gpt: gpt.as_ref(),
                    },
                )?
            }
            Some(_) => vec![0.0; self.num_params],
            None => self.task.net().init(self.seed),
        };
        topo.data_parallel.broadcast(&mut p, 0)?;
        self.be.upload(self.task.net().buffers().0, &p)?;
        Ok(())
    }

    fn load(&mut self, topo: &mut Topology<C>, dir: &Path, step: u64) -> Result<(), WorkError> {
        let path = dir.join(checkpoint::file_name(step));
        let tensors = self.task.tensors();
        let state = checkpoint::load(&path, &self.model, &tensors, self.num_params).map_err(|e| {
            WorkError::new(
                ExitCode::Checkpoint,
                format!(
                    "rank {}: {e} (every rank reads the checkpoint rank 0 chose: mount the same \
                     storage at {} on every worker)",
                    topo.rank,
                    dir.display()
                ),
            )
        })?;
        if state.seed != self.seed {
            tracing::warn!(
                saved = state.seed,
                now = self.seed,
                "the checkpoint was written with another seed: data order differs from here on"
            );
        }
        let (p, _) = self.task.net().buffers();
        self.be.upload(p, &state.params)?;
        self.adam
            .restore(&self.be, &state.m, &state.v, state.adam_t)?;
        Ok(())
    }

    fn step(
        &mut self,
        topo: &mut Topology<C>,
        step: u64,
        lr: f32,
    ) -> Result<StepReport, WorkError> {
        let be = &self.be;
        let comm = &mut topo.data_parallel;
        let sync_grads = comm.world_size() > 1 || self.always_sync;
        let epoch = self.sampler.epoch_of(step);
        self.task.net().zero_grad(be)?;
        let mut loss_sum = 0.0f32;
        let mut stats = SyncStats::default();
        for micro in 0..self.accum {
            let idx = self
                .sampler
                .indices(step, micro, topo.replica as usize)
                .to_vec();
            let last = micro + 1 == self.accum;
            let mut buckets = self
                .settings
                .buckets(self.num_params, self.settings.overlap);
            let mut failed = None;
            let sync = &mut self.sync;
            let loss = self.task.micro_step(
                be,
                &idx,
                epoch,
                1.0 / self.accum as f32,
                &mut |g, from| {
                    if !(last && sync_grads) || failed.is_some() {
                        return;
                    }
                    for r in buckets.ready(from) {
                        if let Err(e) = sync.start(be, comm, g, 0, r) {
                            failed = Some(e);
                            return;
                        }
                    }
                },
            )?;
            if let Some(e) = failed {
                return Err(e);
            }
            loss_sum += loss;
            if last && sync_grads {
                let (_, g) = self.task.net().buffers();
                for r in buckets.flush() {
                    self.sync.start(be, comm, g, 0, r)?;
                }
                stats = self.sync.finish(be, comm, g, 0)?;
            }
        }
        let (p, g) = self.task.net().buffers();
        self.adam.step(
            be,
            p,
            g,
            &self.decay_ranges,
            lr,
            self.settings.betas,
            self.settings.eps,
            self.settings.weight_decay,
            self.settings.clip,
        )?;
        let samples = (self.batch * self.accum) as u64;
        Ok(StepReport {
            loss: Some(loss_sum / self.accum as f32),
            samples,
            tokens: samples * self.task.tokens_per_sample() as u64,
            comm: stats,
            pipeline: None,
        })
    }

    fn evaluate(
        &mut self,
        _topo: &mut Topology<C>,
        max_batches: Option<usize>,
    ) -> Result<Evaluation, WorkError> {
        Ok(Evaluation {
            metric: self.task.metric(),
            value: self.task.evaluate(&self.be, max_batches)?,
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
        // The replicas hold the same state: replica 0 writes it.
        if topo.replica != 0 {
            return Ok(None);
        }
        let n = self.num_params;
        let (tensors, meta) = (self.task.tensors(), self.task.checkpoint_meta());
        let (p, _) = self.task.net().buffers();
        let state = checkpoint::State {
            step,
            adam_t: self.adam.t,
            seed: self.seed,
            model: self.model.clone(),
            tensors,
            meta,
            params: self.be.download(p, 0, n)?,
            m: self.be.download(&self.adam.m, 0, n)?,
            v: self.be.download(&self.adam.v, 0, n)?,
            blobs: Default::default(),
        };
        let name = checkpoint::file_name(step);
        Ok(self.writer.start(dir, state, name, Some((keep, None)))?)
    }

    fn flush(&mut self, _topo: &mut Topology<C>) -> Result<Option<PathBuf>, WorkError> {
        Ok(self.writer.wait()?)
    }

    fn params_digest(&mut self) -> Result<u64, WorkError> {
        let n = self.num_params;
        let (p, _) = self.task.net().buffers();
        let params = self.be.download(p, 0, n)?;
        Ok(lockstep_api::config::fnv1a64(bytemuck::cast_slice(&params)))
    }
}
