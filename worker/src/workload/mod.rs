//! What the trainer trains: a [`Workload`] is one way of computing an optimizer step over the
//! gang (data-parallel today; pipeline-parallel and PRES later), with its model, data,
//! optimizer state and checkpoints. The trainer (`crate::trainer`) drives any of them through
//! this trait and never names one; [`build`] is the one place that maps the job's
//! `spec.training.workload` onto an implementation.
//!
//! Adding a workload: implement [`Workload`] in a new file of this folder and add its arm to the
//! match on the job's workload below [`build`].
//!
//! - [`ddp`]: data parallelism with PyTorch DDP's semantics, over [`task`]'s model and data.
//! - [`pipeline`]: pipeline parallelism over the GPT (GPipe, 1F1B, interleaved, ZB-H1), composed
//!   with data parallelism; [`link`] moves its tensors between stages (TCP, or NCCL on GPUs).
//! - [`pres`]: memory-based dynamic-GNN training (TGN, JODIE) with PRES on a temporal graph,
//!   single rank or data parallel.
//! - [`sync`]: the gradient buckets and their transports, shared by every workload that averages
//!   gradients over a data-parallel group.

pub mod ddp;
pub mod link;
pub mod pipeline;
pub mod pres;
pub mod sync;
pub mod task;

use std::path::{Path, PathBuf};

use lockstep_api::config::WorkerConfig;
use lockstep_api::training::{Model, Training, Workload as Kind};
use lockstep_engine::Backend;

use crate::comm::Communicator;
use crate::device::Device;
use crate::error::WorkError;
use crate::topology::Topology;
use sync::{GradSync, SyncStats, TcpSync};

/// The communicators workloads run on: host buffers of f32 (the TCP ring; NCCL's device
/// buffers are reached through the gradient sync's transport, see [`sync`]).
pub trait HostComm: Communicator<Buffer = [f32], Owned = Vec<f32>> {}
impl<C: Communicator<Buffer = [f32], Owned = Vec<f32>>> HostComm for C {}

/// The job's gradient-bucket and AdamW settings, as every workload that averages gradients and
/// steps AdamW uses them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepSettings {
    /// Cap of the first bucket (bytes).
    pub first_bucket_bytes: usize,
    /// Cap of the other buckets (bytes).
    pub bucket_bytes: usize,
    /// Whether buckets start during backward.
    pub overlap: bool,
    /// AdamW's betas.
    pub betas: (f32, f32),
    /// AdamW's epsilon.
    pub eps: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    /// Global-norm clipping threshold (0: none).
    pub clip: f32,
}

impl StepSettings {
    /// The settings `t` gives.
    pub fn new(t: &Training) -> Self {
        let mb = |v: f64| (v * 1024.0 * 1024.0) as usize;
        let opt = &t.optimizer;
        Self {
            first_bucket_bytes: mb(t.ddp.first_bucket_cap_mb),
            bucket_bytes: mb(t.ddp.bucket_cap_mb),
            overlap: t.ddp.overlap,
            betas: (opt.beta1 as f32, opt.beta2 as f32),
            eps: opt.epsilon as f32,
            weight_decay: opt.weight_decay as f32,
            clip: opt.grad_clip_norm as f32,
        }
    }

    /// Buckets over `n` gradients with these caps; with `overlap`, started as backward makes
    /// them final.
    pub fn buckets(&self, n: usize, overlap: bool) -> sync::Buckets {
        sync::Buckets::new(n, self.first_bucket_bytes, self.bucket_bytes, overlap)
    }
}

/// What one optimizer step did on this rank.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepReport {
    /// Mean loss over this rank's micro-batches, when this rank computes a loss (every rank in
    /// data parallelism; only the last stage of a pipeline).
    pub loss: Option<f32>,
    /// Training samples this rank's data-parallel replica consumed in the step.
    pub samples: u64,
    /// Tokens among those samples (0 when the model has no tokens).
    pub tokens: u64,
    /// This rank's gradient communication in the step.
    pub comm: SyncStats,
    /// What the pipeline measured on this rank (pipeline workloads).
    pub pipeline: Option<pipeline::StageStats>,
}

/// What an evaluation measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// Share of held-out samples classified correctly (higher is better).
    Accuracy,
    /// Mean loss on held-out data (lower is better).
    Loss,
    /// Average precision of link prediction on the validation events (higher is better).
    AveragePrecision,
}

impl Metric {
    /// The name logs use ("eval_accuracy", "val_loss").
    pub fn name(self) -> &'static str {
        match self {
            Metric::Accuracy => "eval_accuracy",
            Metric::Loss => "val_loss",
            Metric::AveragePrecision => "val_ap",
        }
    }
}

/// One evaluation on held-out data.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Evaluation {
    /// What was measured.
    pub metric: Metric,
    /// Its value.
    pub value: f32,
    /// Every link-prediction score (temporal-graph workloads).
    pub link: Option<pres::LinkReport>,
}

/// A way of training: what an optimizer step, an evaluation and a checkpoint are. Every rank of
/// the gang calls the same methods in the same order (they may communicate).
pub trait Workload<C> {
    /// The model, as logs name it and checkpoints record it (a checkpoint of another is
    /// refused).
    fn describe(&self) -> String;
    /// Number of parameters this rank trains.
    fn num_params(&self) -> usize;
    /// Optimizer steps in one pass over the training data.
    fn steps_per_epoch(&self) -> u64;
    /// Starts from fresh parameters (the same on every replica).
    fn init(&mut self, topo: &mut Topology<C>) -> Result<(), WorkError>;
    /// Resumes from the checkpoint of `step` in `dir`.
    fn load(&mut self, topo: &mut Topology<C>, dir: &Path, step: u64) -> Result<(), WorkError>;
    /// One optimizer step (0-based `step`) at learning rate `lr`.
    fn step(&mut self, topo: &mut Topology<C>, step: u64, lr: f32)
    -> Result<StepReport, WorkError>;
    /// Evaluates on held-out data, over at most `max_batches` batches.
    fn evaluate(
        &mut self,
        topo: &mut Topology<C>,
        max_batches: Option<usize>,
    ) -> Result<Evaluation, WorkError>;
    /// Starts writing the state after `step` steps into `dir`, keeping the newest `keep` (the
    /// state is copied at once; the file is written in the background); returns the file of an
    /// earlier save this rank has now finished writing.
    fn save(
        &mut self,
        topo: &mut Topology<C>,
        dir: &Path,
        step: u64,
        keep: usize,
    ) -> Result<Option<PathBuf>, WorkError>;
    /// A digest of this rank's parameters (equal on the ranks that hold the same ones).
    fn params_digest(&mut self) -> Result<u64, WorkError>;
    /// Waits until the saves started so far are written (every rank calls it, at the end and
    /// before a stop); returns the file this rank wrote last. By default a workload's saves are
    /// written when `save` returns, and there is nothing to wait for.
    fn flush(&mut self, _topo: &mut Topology<C>) -> Result<Option<PathBuf>, WorkError> {
        Ok(None)
    }
    /// The checkpoint files this workload writes and reads: whole-model files by default.
    fn checkpoint_shape(&self) -> crate::checkpoint::Shape {
        None
    }
}

/// The workload `cfg` asks for, on `device`.
pub fn build<C: HostComm + 'static>(
    cfg: &WorkerConfig,
    device: Device,
    topo: &Topology<C>,
) -> Result<Box<dyn Workload<C>>, WorkError> {
    match device {
        Device::Cpu(be) => on(
            be,
            Box::new(TcpSync::default()),
            Box::new(link::TcpLink::default()),
            false,
            cfg,
            topo,
        ),
        #[cfg(feature = "cuda")]
        Device::Cuda { backend, nccl } => match nccl {
            None => on(
                backend,
                Box::new(TcpSync::default()),
                Box::new(link::TcpLink::default()),
                false,
                cfg,
                topo,
            ),
            Some(nccl) => on(
                backend,
                Box::new(sync::NcclSync::new(nccl)),
                Box::new(link::NcclLink::default()),
                true,
                cfg,
                topo,
            ),
        },
    }
}

/// The workload on a backend, gradient transport and pipeline link; `always_sync` when the
/// transport must run even on one replica (NCCL: the gang chose it, every rank joins every
/// collective).
fn on<B: Backend + 'static, C: HostComm + 'static>(
    be: B,
    sync: Box<dyn GradSync<B, C>>,
    link: Box<dyn link::StageLink<B, C>>,
    always_sync: bool,
    cfg: &WorkerConfig,
    topo: &Topology<C>,
) -> Result<Box<dyn Workload<C>>, WorkError> {
    let t = &cfg.training;
    match t.workload {
        Kind::Ddp => Ok(Box::new(ddp::Ddp::new(be, sync, always_sync, cfg, topo)?)),
        Kind::Pipeline => Ok(Box::new(pipeline::Pipeline::new(
            be,
            sync,
            link,
            always_sync,
            cfg,
            topo,
        )?)),
        Kind::Pres => Ok(Box::new(pres::Pres::new(be, sync, always_sync, cfg, topo)?)),
        Kind::Command => Err(not_built(t)),
    }
}

/// The error for a workload, model and data this worker does not train yet.
pub(crate) fn not_built(t: &Training) -> WorkError {
    let model = match t.model.as_ref() {
        Some(Model::Mlp(_)) => "mlp",
        Some(Model::Gpt(_)) => "gpt",
        Some(Model::Tgn(_)) => "tgn",
        None => "none",
    };
    WorkError::config(format!(
        "workload {:?} with model {model} and data {:?} is not built yet: this worker trains Ddp \
         with mlp on Digits and gpt on Text",
        t.workload,
        t.data.as_ref().map(|d| d.kind)
    ))
}
