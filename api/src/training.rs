//! `spec.training`: what the built-in worker trains and how. Every field maps one to one onto the
//! worker's config ([`crate::config::WorkerConfig`]).

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What the built-in worker trains, or `Command` to run the pod template's own command.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self == oldSelf").message("spec.training is immutable: delete the job and create it again to train something else"))]
#[x_kube(validation = Rule::new("self.workload == 'Command' || (has(self.model) && has(self.data))").message("spec.training.model and spec.training.data are required for a built-in workload (Ddp, Pipeline, Pres)").field_path(".model"))]
#[x_kube(validation = Rule::new("self.workload != 'Pres' || (has(self.model) && has(self.model.tgn))").message("spec.training.workload Pres needs spec.training.model.tgn").field_path(".model"))]
#[x_kube(validation = Rule::new("!has(self.model) || !has(self.model.tgn) || self.workload == 'Pres'").message("spec.training.model.tgn trains only with workload Pres (set pres.predictionCorrection false for plain TGN)").field_path(".workload"))]
#[x_kube(validation = Rule::new("self.workload != 'Pres' || !has(self.data) || self.data.kind == 'TemporalGraph'").message("spec.training.workload Pres needs spec.training.data.kind TemporalGraph").field_path(".data.kind"))]
#[x_kube(validation = Rule::new("self.workload in ['Command', 'Pres'] || has(self.batchSize)").message("spec.training.batchSize is required for workloads Ddp and Pipeline").field_path(".batchSize"))]
#[x_kube(validation = Rule::new("self.workload == 'Command' || has(self.maxSteps) != has(self.epochs)").message("spec.training: set exactly one of maxSteps and epochs").field_path(".maxSteps"))]
#[x_kube(validation = Rule::new("!has(self.initFrom) || self.workload in ['Ddp', 'Pipeline']").message("spec.training.initFrom starts workloads Ddp and Pipeline only: remove it, or use one of them").field_path(".initFrom"))]
#[x_kube(validation = Rule::new("self.workload != 'Pipeline' || !has(self.batchSize) || self.batchSize % self.pipeline.microBatches == 0").message("spec.training.batchSize must be a multiple of spec.training.pipeline.microBatches").field_path(".pipeline.microBatches"))]
#[serde(rename_all = "camelCase")]
pub struct Training {
    /// Ddp (data-parallel), Pipeline (pipeline-parallel: GPipe, 1F1B, interleaved 1F1B or
    /// zero-bubble ZB-H1), Pres (memory-based dynamic GNN with PRES) or Command (the template's
    /// own command under the env contract).
    pub workload: Workload,

    /// The model to train (built-in workloads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<Model>,

    /// The data set (built-in workloads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Data>,

    /// Optimizer, learning-rate schedule and gradient clipping.
    #[serde(default)]
    pub optimizer: Optimizer,

    /// Samples per rank per micro-step (Ddp) or per rank per step, split into micro-batches
    /// (Pipeline). The global batch is batchSize x dataParallel x gradAccumulationSteps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1048576))]
    pub batch_size: Option<i32>,

    /// Samples per rank per evaluation batch (defaults to batchSize).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1048576))]
    pub eval_batch_size: Option<i32>,

    /// Optimizer steps to train for (exclusive with epochs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_steps: Option<i64>,

    /// Passes over the training data (exclusive with maxSteps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub epochs: Option<i32>,

    /// Seed of parameter initialisation, data shuffling and sampling; same seed, same run.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub seed: i64,

    /// Numeric precision of the computation: Fp32, Tf32 (FP32 storage, TF32 tensor-core GEMMs
    /// on GPUs) or Bf16 (mixed precision with FP32 master weights).
    #[serde(default)]
    pub precision: Precision,

    /// Data-parallel settings.
    #[serde(default)]
    pub ddp: Ddp,

    /// Pipeline-parallel settings (workload Pipeline).
    #[serde(default)]
    pub pipeline: Pipeline,

    /// PRES settings (workload Pres).
    #[serde(default)]
    pub pres: Pres,

    /// Checkpointing.
    #[serde(default)]
    pub checkpoint: Checkpoint,

    /// Weights to start from instead of the seed's initialisation (fine-tuning), when the job
    /// has no checkpoint of its own to resume: a Hugging Face GPT-2 directory (`config.json` and
    /// `model.safetensors`, as `save_pretrained` and `lockstep-worker export` write it; its
    /// config must match spec.training.model.gpt) or a Lockstep checkpoint file. Only the
    /// weights are taken: the optimizer starts afresh at step 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub init_from: Option<String>,

    /// Periodic evaluation on held-out data.
    #[serde(default)]
    pub evaluation: Evaluation,
}

/// What kind of training the worker runs.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Workload {
    /// Data-parallel training with bucketed gradient all-reduce overlapped with backward.
    Ddp,
    /// Pipeline-parallel training (GPipe, 1F1B, interleaved 1F1B or zero-bubble ZB-H1),
    /// data-parallel across replicas.
    Pipeline,
    /// Memory-based dynamic-GNN training (TGN) with PRES prediction-correction.
    Pres,
    /// The pod template's own command, with the env contract (MASTER_ADDR, RANK, ...) set.
    Command,
}

/// The model, exactly one of `mlp`, `gpt` and `tgn`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub enum Model {
    /// A multi-layer perceptron classifier.
    Mlp(Mlp),
    /// A decoder-only transformer language model (GPT-2 style, pre-LayerNorm).
    Gpt(Gpt),
    /// A Temporal Graph Network for link prediction.
    Tgn(Tgn),
}

/// A multi-layer perceptron classifier; input and output sizes come from the data.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Mlp {
    /// Widths of the hidden layers, input side first.
    #[serde(default = "default_mlp_hidden")]
    #[schemars(length(max = 64), inner(range(min = 1, max = 1048576)))]
    pub hidden_sizes: Vec<i32>,
}

fn default_mlp_hidden() -> Vec<i32> {
    vec![32]
}

/// A GPT-2-style decoder-only transformer.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.embedDim % self.heads == 0").message("spec.training.model.gpt.embedDim must be a multiple of heads").field_path(".embedDim"))]
#[serde(rename_all = "camelCase")]
pub struct Gpt {
    /// Number of transformer blocks.
    #[schemars(range(min = 1, max = 1024))]
    pub layers: i32,
    /// Attention heads per block.
    #[schemars(range(min = 1, max = 1024))]
    pub heads: i32,
    /// Width of the residual stream.
    #[schemars(range(min = 1, max = 65536))]
    pub embed_dim: i32,
    /// Longest sequence (context window), in tokens.
    #[schemars(range(min = 1, max = 1048576))]
    pub context_length: i32,
    /// Vocabulary size; defaults to the data's (65 characters for tinyshakespeare).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 1048576))]
    pub vocab_size: Option<i32>,
}

/// A Temporal Graph Network (Rossi et al. 2020): per-node memory updated by a GRU from event
/// messages, one graph-attention embedding layer, an MLP link predictor.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Tgn {
    /// Width of each node's memory.
    #[serde(default = "default_tgn_memory")]
    #[schemars(range(min = 1, max = 65536))]
    pub memory_dim: i32,
    /// Width of the time encoding.
    #[serde(default = "default_tgn_time")]
    #[schemars(range(min = 1, max = 65536))]
    pub time_dim: i32,
    /// Width of the node embeddings.
    #[serde(default = "default_tgn_embedding")]
    #[schemars(range(min = 1, max = 65536))]
    pub embedding_dim: i32,
    /// Most recent temporal neighbours attended to.
    #[serde(default = "default_tgn_neighbors")]
    #[schemars(range(min = 1, max = 1024))]
    pub neighbors: i32,
    /// Attention heads of the embedding layer.
    #[serde(default = "default_tgn_heads")]
    #[schemars(range(min = 1, max = 64))]
    pub heads: i32,
    /// The memory model: Tgn (GRU memory, graph attention) or Jodie (RNN memory, time
    /// projection; embeddingDim, neighbors and heads do not apply).
    #[serde(default)]
    pub memory_model: MemoryModel,
}

/// The memory model of a temporal graph network.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MemoryModel {
    /// TGN: a GRU memory updater and one graph-attention layer over temporal neighbours.
    #[default]
    Tgn,
    /// JODIE as a TGN variant: a tanh RNN memory updater and the time-projection embedding.
    Jodie,
}

fn default_tgn_memory() -> i32 {
    172
}
fn default_tgn_time() -> i32 {
    100
}
fn default_tgn_embedding() -> i32 {
    100
}
fn default_tgn_neighbors() -> i32 {
    10
}
fn default_tgn_heads() -> i32 {
    2
}

/// A data set on the worker's file system.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Data {
    /// Digits (CSV of 64 pixels and a label; every fifth row held out), Text (a UTF-8 file trained on
    /// as characters; last 10% held out) or TemporalGraph (timestamped edges, `src dst t` lines
    /// or JODIE CSV; chronological 70/15/15 split).
    pub kind: DataKind,
    /// Path of the file inside the worker (`.gz` is decompressed).
    #[schemars(length(min = 1, max = 4096))]
    pub path: String,
}

/// The kind of a data set, which decides its loader and split.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataKind {
    /// 8x8 hand-written digits, 64 pixel columns then the label.
    Digits,
    /// Plain text, modelled character by character.
    Text,
    /// Timestamped edges of a temporal graph.
    TemporalGraph,
}

/// AdamW with a warmup then cosine learning-rate schedule and gradient clipping.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.minLearningRate <= self.learningRate").message("spec.training.optimizer.minLearningRate must not exceed learningRate").field_path(".minLearningRate"))]
#[serde(rename_all = "camelCase")]
pub struct Optimizer {
    /// Peak learning rate (reached after the warmup).
    #[serde(default = "default_lr")]
    #[schemars(range(min = 0.0, max = 10.0))]
    pub learning_rate: f64,
    /// Learning rate at the end of the cosine decay.
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 10.0))]
    pub min_learning_rate: f64,
    /// Adam's beta1 (first-moment decay).
    #[serde(default = "default_beta1")]
    #[schemars(range(min = 0.0, max = 0.999999))]
    pub beta1: f64,
    /// Adam's beta2 (second-moment decay).
    #[serde(default = "default_beta2")]
    #[schemars(range(min = 0.0, max = 0.999999))]
    pub beta2: f64,
    /// Adam's epsilon.
    #[serde(default = "default_eps")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub epsilon: f64,
    /// Decoupled weight decay (applied to weight matrices, not to biases, norms and embeddings).
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 10.0))]
    pub weight_decay: f64,
    /// Steps of linear warmup from 0 to learningRate.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub warmup_steps: i64,
    /// Schedule after the warmup: Cosine (decay to minLearningRate at the last step) or Constant.
    #[serde(default)]
    pub schedule: LrSchedule,
    /// Clip the global gradient L2 norm to this value; 0 disables clipping.
    #[serde(default)]
    #[schemars(range(min = 0.0))]
    pub grad_clip_norm: f64,
}

fn default_lr() -> f64 {
    1e-3
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}

impl Default for Optimizer {
    fn default() -> Self {
        Self {
            learning_rate: default_lr(),
            min_learning_rate: 0.0,
            beta1: default_beta1(),
            beta2: default_beta2(),
            epsilon: default_eps(),
            weight_decay: 0.0,
            warmup_steps: 0,
            schedule: LrSchedule::default(),
            grad_clip_norm: 0.0,
        }
    }
}

/// Learning-rate schedule after the warmup.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LrSchedule {
    /// Cosine decay from learningRate to minLearningRate over the remaining steps.
    #[default]
    Cosine,
    /// learningRate throughout.
    Constant,
}

/// Numeric precision.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    /// IEEE single precision everywhere.
    #[default]
    Fp32,
    /// FP32 storage, TF32 tensor-core GEMMs on GPUs (FP32 on CPUs).
    Tf32,
    /// bfloat16 on GPUs: activations stored in bf16 and GEMMs on bf16 operands with FP32
    /// sums, with FP32 master weights, gradients and optimizer state (FP32 on CPUs).
    Bf16,
}

/// Data-parallel settings (PyTorch DDP semantics).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Ddp {
    /// Cap of a gradient bucket, in MiB; buckets are filled in reverse layer order.
    #[serde(default = "default_bucket_cap")]
    #[schemars(range(min = 0.001, max = 4096.0))]
    #[serde(rename = "bucketCapMB")]
    pub bucket_cap_mb: f64,
    /// Cap of the first (last-layer) bucket, smaller so communication starts early.
    #[serde(default = "default_first_bucket_cap")]
    #[schemars(range(min = 0.001, max = 4096.0))]
    #[serde(rename = "firstBucketCapMB")]
    pub first_bucket_cap_mb: f64,
    /// All-reduce each bucket as soon as backward has produced it, overlapping the rest of
    /// backward; false reduces everything after backward.
    #[serde(default = "yes")]
    pub overlap: bool,
    /// Micro-steps accumulated per optimizer step; the all-reduce runs only on the last.
    #[serde(default = "default_accum")]
    #[schemars(range(min = 1, max = 65536))]
    pub grad_accumulation_steps: i32,
}

fn default_bucket_cap() -> f64 {
    25.0
}
fn default_first_bucket_cap() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn default_accum() -> i32 {
    1
}

impl Default for Ddp {
    fn default() -> Self {
        Self {
            bucket_cap_mb: default_bucket_cap(),
            first_bucket_cap_mb: default_first_bucket_cap(),
            overlap: true,
            grad_accumulation_steps: default_accum(),
        }
    }
}

/// Pipeline-parallel settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.schedule == 'Interleaved' ? self.chunksPerStage >= 2 : self.chunksPerStage == 1").message("spec.training.pipeline.chunksPerStage must be at least 2 for the Interleaved schedule and 1 for GPipe, OneFOneB and ZeroBubble").field_path(".chunksPerStage"))]
#[serde(rename_all = "camelCase")]
pub struct Pipeline {
    /// GPipe (all forwards, then all backwards), OneFOneB (PipeDream-Flush: at most as many
    /// micro-batches alive as stages), Interleaved (1F1B over several model chunks per stage) or
    /// ZeroBubble (ZB-H1: 1F1B with weight-gradient passes delayed into the bubble).
    #[serde(default)]
    pub schedule: PipelineSchedule,
    /// Micro-batches per step. With GPipe and OneFOneB the stages idle for
    /// (stages-1)/(microBatches+stages-1) of the step; Interleaved divides that idle time by
    /// chunksPerStage (and needs microBatches to be a multiple of stages); ZeroBubble cuts it to
    /// about a third.
    #[serde(default = "default_micro_batches")]
    #[schemars(range(min = 1, max = 65536))]
    pub micro_batches: i32,
    /// Model chunks per stage (Interleaved only).
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 64))]
    pub chunks_per_stage: i32,
    /// Transformer blocks of each model part, in model order (pipelineStages x
    /// chunksPerStage entries, at least 1 each, adding up to the model's layers; part
    /// c x pipelineStages + s is chunk c of stage s). The first part also holds the embeddings,
    /// the last the final norm and the head. Default: the cut that makes the largest part, in
    /// parameters, as small as possible.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub layers_per_part: Option<Vec<i32>>,
}

fn default_micro_batches() -> i32 {
    8
}
fn one() -> i32 {
    1
}

impl Default for Pipeline {
    fn default() -> Self {
        Self {
            schedule: PipelineSchedule::default(),
            micro_batches: default_micro_batches(),
            chunks_per_stage: 1,
            layers_per_part: None,
        }
    }
}

/// Pipeline schedule.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PipelineSchedule {
    /// All forwards, then all backwards.
    GPipe,
    /// One forward, one backward after a warm-up (PipeDream-Flush).
    #[default]
    OneFOneB,
    /// 1F1B over several model chunks per stage (Megatron): chunk c of stage s holds model part
    /// c x stages + s, which divides the bubble by the number of chunks at the cost of more
    /// communication; microBatches must be a multiple of stages.
    Interleaved,
    /// ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024): 1F1B with each backward
    /// split into its input-gradient and weight-gradient passes, the weight-gradient passes
    /// delayed into the bubble; 1F1B's activation memory and about a third of its bubble.
    ZeroBubble,
}

/// PRES settings (Su, Zou, Wu, ICLR 2024).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Pres {
    /// Events per temporal batch.
    #[serde(default = "default_temporal_batch")]
    #[schemars(range(min = 1, max = 1048576))]
    pub temporal_batch: i32,
    /// Predict each updated node's memory from its mean observed transition and correct the
    /// computed memory towards it (PRES); false trains plain TGN or JODIE.
    #[serde(default = "yes")]
    pub prediction_correction: bool,
    /// Weight of the predicted memory in the correction s = gamma * predicted + (1 - gamma) *
    /// computed.
    #[serde(default = "default_gamma")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub gamma: f64,
    /// Weight of the memory-coherence term beta * (1 - cos(s_new, s_old)) in the loss.
    #[serde(default = "default_coherence")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub coherence_weight: f64,
}

fn default_temporal_batch() -> i32 {
    200
}
fn default_gamma() -> f64 {
    0.9
}
fn default_coherence() -> f64 {
    0.1
}

impl Default for Pres {
    fn default() -> Self {
        Self {
            temporal_batch: default_temporal_batch(),
            prediction_correction: true,
            gamma: default_gamma(),
            coherence_weight: default_coherence(),
        }
    }
}

/// Checkpointing. Rank 0 writes, every rank loads; a gang restart resumes from the newest one.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Checkpoint {
    /// Write a checkpoint every this many steps (and always at the end); unset writes only at
    /// the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub every_steps: Option<i64>,
    /// Checkpoints kept; older ones are deleted after a newer one is safely written.
    #[serde(default = "default_keep")]
    #[schemars(range(min = 1, max = 1000))]
    pub keep: i32,
    /// Directory of the checkpoints inside the worker; mount shared storage there so a restarted
    /// gang finds them. Each job keeps its files in a folder of its own, `<path>/<job>/<uid>`, so
    /// that jobs sharing the storage (or a new job of an old one's name) never read or delete each
    /// other's.
    #[serde(default = "default_checkpoint_path")]
    #[schemars(length(min = 1, max = 4096))]
    pub path: String,
}

fn default_keep() -> i32 {
    3
}
fn default_checkpoint_path() -> String {
    crate::contract::paths::CHECKPOINT_DIR.to_string()
}

impl Default for Checkpoint {
    fn default() -> Self {
        Self {
            every_steps: None,
            keep: default_keep(),
            path: default_checkpoint_path(),
        }
    }
}

/// Periodic evaluation on held-out data (digits accuracy, GPT validation loss, TGN average
/// precision).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Evaluation {
    /// Evaluate every this many steps (and at the end); unset evaluates only at the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub every_steps: Option<i64>,
    /// Evaluation batches per evaluation; unset uses the whole held-out set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_batches: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::PipelineSchedule;
    use crate::manifest::yaml_to_value;
    use crate::validation::validate;

    /// The pipeline example with its schedule and chunks per stage replaced.
    fn pipeline_job(schedule: &str, chunks: i32) -> serde_json::Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/pipeline-gpt.yaml");
        let text = std::fs::read_to_string(path).unwrap();
        let mut job = yaml_to_value(&text).unwrap();
        job["spec"]["training"]["pipeline"]["schedule"] = schedule.into();
        job["spec"]["training"]["pipeline"]["chunksPerStage"] = chunks.into();
        job
    }

    #[test]
    fn every_schedule_takes_its_chunks_per_stage_and_no_other() {
        for (schedule, good, bad) in [
            ("GPipe", 1, 2),
            ("OneFOneB", 1, 2),
            ("Interleaved", 2, 1),
            ("ZeroBubble", 1, 2),
        ] {
            let job = validate(&pipeline_job(schedule, good), None)
                .unwrap_or_else(|e| panic!("{schedule} with {good} chunks: {e:?}"));
            let parsed: PipelineSchedule = serde_json::from_value(schedule.into()).unwrap();
            assert_eq!(job.spec.training.pipeline.schedule, parsed);
            let errors = validate(&pipeline_job(schedule, bad), None)
                .expect_err(&format!("{schedule} with {bad} chunks is accepted"));
            assert!(
                errors
                    .iter()
                    .any(|e| e.field == "spec.training.pipeline.chunksPerStage"),
                "{schedule}: {errors:?}"
            );
        }
    }
}
