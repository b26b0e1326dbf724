//! Memory-based dynamic-GNN training (TGN or JODIE) on a temporal graph, with PRES (Su, Zou,
//! Wu, ICLR 2024), single rank or data parallel.
//!
//! The stream: the training events in temporal batches of `spec.training.pres.temporalBatch`,
//! one optimizer step per batch, the node memory reset at the start of each epoch (as TGN and
//! PyG do). For each batch, [`Stream`] (on the host) gathers what the engine's
//! [`Tgn`](lockstep_engine::models::tgn::Tgn) reads: the node memory, the pending message of
//! each node (its last event of an earlier batch: TGN's last-message aggregation), the
//! most-recent-k neighbours and PRES's per-node transition statistics. After the step, the
//! batch's endpoints commit their new memory, the statistics take the observed transitions
//! (`computed - old`, Welford's mean and variance), the batch's events become pending messages
//! and neighbours. So a batch never sees its own events (no leakage), and the memory module gets
//! gradients through the pending messages, as in TGN.
//!
//! Data parallel: every rank holds the whole stream state and model; the ranks split each
//! temporal batch into contiguous shares of events and compute their share's loss, gradients
//! are averaged as in DDP (the loss is scaled by the number of ranks so that the average is the
//! single-rank gradient), and each node's new memory is taken from the rank that holds the
//! node's last event of the batch: one all-reduce of those rows (zeros elsewhere) per batch.
//! Replicated memory is chosen over memory sharded by node id because a batch of a few hundred
//! events touches nodes all over the id space (sharding would need the same exchange, plus
//! another for the neighbours' memory) and the memory of these graphs is megabytes.
//!
//! Evaluation (link prediction with one random negative per event, seeded): the stream is
//! replayed from an empty memory over the training events with the current parameters, then the
//! validation events and the test events, in batches of 200; average precision and ROC-AUC are
//! computed per batch and averaged (the TGN protocol), over all events (transductive) and over
//! the events that touch a node no training event touches (inductive, in chunks of 200).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use lockstep_api::config::WorkerConfig;
use lockstep_api::contract::ExitCode;
use lockstep_api::training::{MemoryModel, Model};
use lockstep_engine::Backend;
use lockstep_engine::Net;
use lockstep_engine::models::tgn::{
    Correction, Embedding, Tgn, TgnBatch, TgnConfig, TgnOutput, Updater,
};
use lockstep_engine::optim::Adam;
use rand::{Rng, SeedableRng};

use super::sync::{GradSync, SyncStats};
use super::{Evaluation, HostComm, Metric, StepReport, StepSettings, Workload};
use crate::checkpoint;
use crate::comm::ReduceOp;
use crate::data::mix;
use crate::data::temporal::{Neighbor, Neighbors, TemporalGraph};
use crate::error::WorkError;
use crate::topology::Topology;

/// Events per evaluation batch (the TGN protocol's 200, whatever the training batch).
pub const EVAL_BATCH: usize = 200;

/// No pending message.
const NONE: u32 = u32::MAX;

/// The host half of the stream's state: everything a batch reads besides the parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct Stream {
    /// Node memory, `nodes x memory`.
    pub memory: Vec<f32>,
    /// Time of the last message applied to each node's memory.
    pub last_update: Vec<f64>,
    /// Each node's pending message: its last event of the last batch it was in (or none).
    pub pending: Vec<u32>,
    /// Most recent neighbours.
    pub neighbors: Neighbors,
    /// PRES: transitions observed per node.
    pub count: Vec<u32>,
    /// PRES: running mean of each node's transitions, `nodes x memory`.
    pub mean: Vec<f32>,
    /// PRES: running sum of squared deviations (variance = m2 / count), `nodes x memory`.
    pub m2: Vec<f32>,
}

impl Stream {
    fn new(nodes: usize, m: usize, k: usize) -> Self {
        Self {
            memory: vec![0.0; nodes * m],
            last_update: vec![0.0; nodes],
            pending: vec![NONE; nodes],
            neighbors: Neighbors::new(nodes, k),
            count: vec![0; nodes],
            mean: vec![0.0; nodes * m],
            m2: vec![0.0; nodes * m],
        }
    }

    /// The state as bytes (little-endian): a header naming the format and the sizes, then
    /// every array.
    pub fn to_bytes(&self) -> Vec<u8> {
        let (count, ring) = self.neighbors.to_parts();
        let nodes = self.pending.len();
        let k = ring.len().checked_div(nodes).unwrap_or(0);
        let mut out = Vec::new();
        out.extend_from_slice(STREAM_FORMAT);
        for n in [nodes, self.memory.len() / nodes.max(1), k] {
            out.extend((n as u64).to_le_bytes());
        }
        out.extend(self.memory.iter().flat_map(|x| x.to_le_bytes()));
        out.extend(self.last_update.iter().flat_map(|x| x.to_le_bytes()));
        out.extend(self.pending.iter().flat_map(|x| x.to_le_bytes()));
        out.extend(self.count.iter().flat_map(|x| x.to_le_bytes()));
        out.extend(self.mean.iter().flat_map(|x| x.to_le_bytes()));
        out.extend(self.m2.iter().flat_map(|x| x.to_le_bytes()));
        out.extend(count.iter().flat_map(|x| x.to_le_bytes()));
        for n in &ring {
            out.extend(n.node.to_le_bytes());
            out.extend(n.t.to_le_bytes());
            out.extend(n.event.to_le_bytes());
        }
        out
    }

    /// A state of `nodes` nodes, `m` memory channels and `k` neighbours over a stream of
    /// `events` events, from [`Stream::to_bytes`]; the error says what does not match.
    pub fn from_bytes(
        bytes: &[u8],
        nodes: usize,
        m: usize,
        k: usize,
        events: usize,
    ) -> Result<Self, String> {
        let short = || "it is cut short".to_string();
        let mut r = Reader(
            bytes
                .strip_prefix(STREAM_FORMAT)
                .ok_or("it is not a lockstep-stream/1 blob")?,
        );
        let sizes = [r.u64(), r.u64(), r.u64()];
        for ((what, got), want) in ["nodes", "memory channels", "neighbours"]
            .iter()
            .zip(sizes)
            .zip([nodes, m, k])
        {
            let got = got.ok_or_else(short)?;
            if got != want as u64 {
                return Err(format!("it holds {got} {what}, this job has {want}"));
            }
        }
        let memory = r.many(nodes * m, |r| r.f32()).ok_or_else(short)?;
        let last_update = r.many(nodes, |r| r.f64()).ok_or_else(short)?;
        let pending = r.many(nodes, |r| r.u32()).ok_or_else(short)?;
        let count = r.many(nodes, |r| r.u32()).ok_or_else(short)?;
        let mean = r.many(nodes * m, |r| r.f32()).ok_or_else(short)?;
        let m2 = r.many(nodes * m, |r| r.f32()).ok_or_else(short)?;
        let ncount = r.many(nodes, |r| r.u64()).ok_or_else(short)?;
        let ring = r
            .many(nodes * k, |r| {
                Some(Neighbor {
                    node: r.u32()?,
                    t: r.f64()?,
                    event: r.u32()?,
                })
            })
            .ok_or_else(short)?;
        if !r.0.is_empty() {
            return Err(format!("{} bytes follow its end", r.0.len()));
        }
        // Indices into the data: a stream of another data set of as many nodes is refused here,
        // not when a batch reads past the end.
        if let Some(p) = pending.iter().find(|&&p| p != NONE && p as usize >= events) {
            return Err(format!(
                "a pending message names event {p}, the data has {events}"
            ));
        }
        if let Some(n) = ring
            .iter()
            .find(|n| n.node as usize >= nodes || n.event as usize >= events)
        {
            return Err(format!(
                "a neighbour names node {} and event {}, the data has {nodes} nodes and {events} \
                 events",
                n.node, n.event
            ));
        }
        Ok(Self {
            memory,
            last_update,
            pending,
            neighbors: Neighbors::from_parts(k, ncount, ring).ok_or_else(short)?,
            count,
            mean,
            m2,
        })
    }

    fn reset(&mut self) {
        self.memory.iter_mut().for_each(|x| *x = 0.0);
        self.last_update.iter_mut().for_each(|x| *x = 0.0);
        self.pending.iter_mut().for_each(|x| *x = NONE);
        self.neighbors.reset();
        self.count.iter_mut().for_each(|x| *x = 0);
        self.mean.iter_mut().for_each(|x| *x = 0.0);
        self.m2.iter_mut().for_each(|x| *x = 0.0);
    }
}

/// The first bytes of [`Stream::to_bytes`].
const STREAM_FORMAT: &[u8] = b"lockstep-stream/1\n";

/// The checkpoint blob holding the stream.
pub const STREAM_BLOB: &str = "stream";

/// Little-endian values off the front of a byte slice.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }
    fn f32(&mut self) -> Option<f32> {
        self.take().map(f32::from_le_bytes)
    }
    fn f64(&mut self) -> Option<f64> {
        self.take().map(f64::from_le_bytes)
    }
    fn many<T>(&mut self, n: usize, f: impl Fn(&mut Self) -> Option<T>) -> Option<Vec<T>> {
        if self.0.len() < n {
            return None;
        }
        (0..n).map(|_| f(self)).collect()
    }
}

/// PRES as the job sets it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PresSettings {
    /// Prediction-correction on.
    pub correct: bool,
    /// The prediction's weight.
    pub gamma: f32,
    /// The coherence term's weight (0: off).
    pub beta: f32,
}

/// Link-prediction scores of one evaluation.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LinkScores {
    /// Average precision, all events.
    pub ap: f64,
    /// ROC-AUC, all events.
    pub auc: f64,
    /// Average precision, events touching a node unseen in training.
    pub ap_inductive: f64,
    /// ROC-AUC, the same events.
    pub auc_inductive: f64,
    /// Events of the inductive setting.
    pub inductive_events: usize,
}

/// Validation and test scores.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LinkReport {
    /// On the validation events.
    pub val: LinkScores,
    /// On the test events.
    pub test: LinkScores,
}

/// The TGN/JODIE workload on backend `B`.
pub struct Pres<B: Backend, C> {
    be: B,
    net: Tgn<B>,
    sync: Box<dyn GradSync<B, C>>,
    always_sync: bool,
    adam: Adam<B>,
    graph: Arc<TemporalGraph>,
    config: TgnConfig,
    settings: StepSettings,
    pres: PresSettings,
    batch: usize,
    seed: u64,
    time_scale: f64,
    stream: Stream,
    /// Node -> its row in the current batch's table (`u32::MAX` when absent).
    row: Vec<u32>,
    model: String,
    writer: checkpoint::Background,
    /// The last evaluation's report.
    pub report: Option<LinkReport>,
}

/// The engine's shape for the job's TGN spec on `graph`.
pub fn tgn_config(t: &lockstep_api::training::Tgn, graph: &TemporalGraph) -> TgnConfig {
    let jodie = t.memory_model == MemoryModel::Jodie;
    TgnConfig {
        memory: t.memory_dim.max(1) as usize,
        time: t.time_dim.max(1) as usize,
        edge: graph.edge_dim,
        embedding: t.embedding_dim.max(1) as usize,
        heads: t.heads.max(1) as usize,
        neighbors: t.neighbors.max(1) as usize,
        updater: if jodie { Updater::Rnn } else { Updater::Gru },
        embed: if jodie {
            Embedding::TimeProjection
        } else {
            Embedding::Attention
        },
    }
}

/// Standard deviation of the time since a node's previous event, over the training events
/// (JODIE's scale of the time projection's input); 1 when there is none.
fn time_scale(g: &TemporalGraph) -> f64 {
    let mut last = vec![f64::NAN; g.num_nodes];
    let (mut n, mut sum, mut sq) = (0.0f64, 0.0f64, 0.0f64);
    for i in 0..g.train_end {
        for v in [g.src[i], g.dst[i]] {
            let prev = last[v as usize];
            if prev.is_finite() {
                let d = g.t[i] - prev;
                n += 1.0;
                sum += d;
                sq += d * d;
            }
            last[v as usize] = g.t[i];
        }
    }
    if n < 2.0 {
        return 1.0;
    }
    let var = (sq - sum * sum / n) / (n - 1.0);
    if var > 0.0 { var.sqrt() } else { 1.0 }
}

impl<B: Backend, C: HostComm> Pres<B, C> {
    /// The workload `cfg` asks for (workload Pres, model tgn, data TemporalGraph).
    pub fn new(
        be: B,
        sync: Box<dyn GradSync<B, C>>,
        always_sync: bool,
        cfg: &WorkerConfig,
        topo: &Topology<C>,
    ) -> Result<Self, WorkError> {
        let Some(data) = &cfg.training.data else {
            return Err(WorkError::config(
                "workload Pres needs spec.training.data (kind TemporalGraph)",
            ));
        };
        let graph = Arc::new(TemporalGraph::load(&data.path)?);
        Self::with_graph(be, sync, always_sync, cfg, topo, graph)
    }

    /// The workload `cfg` asks for, on `graph` instead of the file it names.
    pub fn with_graph(
        be: B,
        sync: Box<dyn GradSync<B, C>>,
        always_sync: bool,
        cfg: &WorkerConfig,
        topo: &Topology<C>,
        graph: Arc<TemporalGraph>,
    ) -> Result<Self, WorkError> {
        let t = &cfg.training;
        if topo.layout.pipeline_stages() > 1 {
            return Err(WorkError::config(
                "workload Pres trains data parallel only: set spec.parallelism.pipelineStages \
                 to 1",
            ));
        }
        let Some(Model::Tgn(spec)) = &t.model else {
            return Err(WorkError::config(
                "workload Pres needs spec.training.model.tgn",
            ));
        };
        let path = t.data.as_ref().map_or("", |d| d.path.as_str());
        let config = tgn_config(spec, &graph);
        let batch = t.pres.temporal_batch.max(1) as usize;
        let replicas = topo.data_parallel_degree();
        if batch < replicas {
            return Err(WorkError::config(format!(
                "spec.training.pres.temporalBatch is {batch}, fewer events than the \
                 {replicas} data-parallel ranks that split each batch: raise it"
            )));
        }
        let seed = t.seed as u64;
        let net = Tgn::new(&be, config, &vec![0.0; config.num_params()])?;
        let adam = Adam::new(&be, config.num_params())?;
        let pres = PresSettings {
            correct: t.pres.prediction_correction,
            gamma: t.pres.gamma as f32,
            beta: t.pres.coherence_weight as f32,
        };
        let variant = match config.updater {
            Updater::Gru => "TGN",
            Updater::Rnn => "JODIE",
        };
        let model = format!(
            "{variant} memory {} time {} embedding {} neighbours {} heads {} edge features {} \
             on {} nodes",
            config.memory,
            config.time,
            config.embed_width(),
            config.slots(),
            config.heads,
            config.edge,
            graph.num_nodes
        );
        tracing::info!(
            path,
            format = graph.format,
            events = graph.len(),
            nodes = graph.num_nodes,
            train = graph.train_end,
            val = graph.val_end - graph.train_end,
            test = graph.len() - graph.val_end,
            batch,
            prediction_correction = pres.correct,
            gamma = pres.gamma,
            coherence = pres.beta,
            "temporal graph"
        );
        Ok(Self {
            stream: Stream::new(graph.num_nodes, config.memory, config.slots()),
            row: vec![u32::MAX; graph.num_nodes],
            time_scale: time_scale(&graph),
            be,
            net,
            sync,
            always_sync,
            adam,
            graph,
            config,
            settings: StepSettings::new(t),
            pres,
            batch,
            seed,
            model,
            writer: checkpoint::Background::default(),
            report: None,
        })
    }

    /// Negative destinations for events `lo..hi`, drawn from `key`.
    fn negatives(&self, key: u64, lo: usize, hi: usize) -> Vec<u32> {
        let (a, b) = self.graph.neg_range;
        let mut rng = rand::rngs::StdRng::seed_from_u64(key);
        (lo..hi).map(|_| rng.random_range(a..=b)).collect()
    }

    /// One temporal batch of events `lo..hi` with negatives `negs`, of which rank `me` of
    /// `ranks` computes its share ([`share_of`]; possibly none); with `train`, also backward.
    /// Then every rank commits the batch (the new memory of the endpoints, taken from the rank
    /// holding each node's last event, over `comm` when there are several ranks).
    #[allow(clippy::too_many_arguments)]
    fn run_batch(
        &mut self,
        lo: usize,
        hi: usize,
        negs: &[u32],
        me: usize,
        ranks: usize,
        train: bool,
        comm: Option<&mut C>,
    ) -> Result<TgnOutput, WorkError> {
        let g = Arc::clone(&self.graph);
        let c = self.config;
        let (m, e, k) = (c.memory, c.edge, c.slots());
        let st = &self.stream;
        let b_all = hi - lo;
        let events: Vec<usize> = share_of(lo, b_all, me, ranks).collect();
        let b = events.len();
        // The batch's endpoints: each node's last event in the batch, and its owner rank.
        let owner_of = |i: usize| owner_of(i - lo, b_all, ranks);
        let mut last: Vec<(u32, usize)> = Vec::new();
        {
            let mut seen = std::collections::HashMap::new();
            for i in lo..hi {
                for v in [g.src[i], g.dst[i]] {
                    seen.insert(v, i);
                }
            }
            last.extend(seen);
            last.sort_unstable();
        }
        let committed: Vec<(u32, usize)> = last
            .iter()
            .copied()
            .filter(|&(v, _)| st.pending[v as usize] != NONE)
            .collect();
        // The endpoints of this rank's share: sources, destinations, negatives.
        let mut ends: Vec<u32> = events.iter().map(|&i| g.src[i]).collect();
        ends.extend(events.iter().map(|&i| g.dst[i]));
        ends.extend(events.iter().map(|&i| negs[i - lo]));
        let end_t: Vec<f64> = (0..3)
            .flat_map(|_| events.iter().map(|&i| g.t[i]))
            .collect();
        // Target rows: one per distinct node for TGN (its embedding does not depend on the
        // query's time), one per endpoint for JODIE (its projection does).
        let (tnodes, tq, pair_src, pair_dst) = match c.embed {
            Embedding::Attention => {
                let mut rows: Vec<u32> = Vec::new();
                let mut at = std::collections::HashMap::new();
                let idx: Vec<i32> = ends
                    .iter()
                    .map(|&v| {
                        *at.entry(v).or_insert_with(|| {
                            rows.push(v);
                            rows.len() as i32 - 1
                        })
                    })
                    .collect();
                let tq = vec![0.0; rows.len()];
                let src = [&idx[..b], &idx[..b]].concat();
                (rows, tq, src, idx[b..].to_vec())
            }
            Embedding::TimeProjection => {
                let b32 = b as i32;
                let src: Vec<i32> = (0..2 * b32).map(|i| i % b32).collect();
                let dst: Vec<i32> = (b32..3 * b32).collect();
                (ends, end_t, src, dst)
            }
        };
        // The node table: targets, then their neighbours; pending first.
        let mut order: Vec<u32> = Vec::new();
        let mut nbr_nodes: Vec<Vec<crate::data::temporal::Neighbor>> = Vec::new();
        for &v in &tnodes {
            if self.row[v as usize] == u32::MAX {
                self.row[v as usize] = 0;
                order.push(v);
            }
            if k > 0 {
                let list: Vec<_> = st.neighbors.recent(v).take(k).collect();
                for n in &list {
                    if self.row[n.node as usize] == u32::MAX {
                        self.row[n.node as usize] = 0;
                        order.push(n.node);
                    }
                }
                nbr_nodes.push(list);
            }
        }
        let (mut table, rest): (Vec<u32>, Vec<u32>) =
            order.iter().partition(|&&v| st.pending[v as usize] != NONE);
        let updated = table.len();
        table.extend(rest);
        for (r, &v) in table.iter().enumerate() {
            self.row[v as usize] = r as u32;
        }
        let u = table.len();
        let mut memory = Vec::with_capacity(u * m);
        for &v in &table {
            memory.extend_from_slice(&st.memory[v as usize * m..(v as usize + 1) * m]);
        }
        let mut msg_other = Vec::with_capacity(updated * m);
        let mut msg_edge = Vec::with_capacity(updated * e);
        let mut msg_dt = Vec::with_capacity(updated);
        let mut predicted = Vec::new();
        // The time of each table node's memory once its pending message is applied.
        let mut new_last = Vec::with_capacity(u);
        for (r, &v) in table.iter().enumerate() {
            if r < updated {
                let ev = st.pending[v as usize] as usize;
                let other = if g.src[ev] == v { g.dst[ev] } else { g.src[ev] };
                msg_other
                    .extend_from_slice(&st.memory[other as usize * m..(other as usize + 1) * m]);
                msg_edge.extend_from_slice(&g.feat[ev * e..(ev + 1) * e]);
                msg_dt.push((g.t[ev] - st.last_update[v as usize]) as f32);
                new_last.push(g.t[ev]);
                if self.pres.correct {
                    let old = &st.memory[v as usize * m..(v as usize + 1) * m];
                    let mean = &st.mean[v as usize * m..(v as usize + 1) * m];
                    predicted.extend(old.iter().zip(mean).map(|(a, b)| a + b));
                }
            } else {
                new_last.push(st.last_update[v as usize]);
            }
        }
        // Coherence: the mean over the nodes the batch commits, each counted by its owner.
        let coherence: Vec<f32> = if self.pres.beta > 0.0 && train {
            let w = self.pres.beta * ranks as f32 / committed.len().max(1) as f32;
            let mine: std::collections::HashSet<u32> = committed
                .iter()
                .filter(|&&(_, i)| owner_of(i) == me)
                .map(|&(v, _)| v)
                .collect();
            table[..updated]
                .iter()
                .map(|v| if mine.contains(v) { w } else { 0.0 })
                .collect()
        } else {
            Vec::new()
        };
        let target: Vec<i32> = tnodes
            .iter()
            .map(|&v| self.row[v as usize] as i32)
            .collect();
        let target_dt: Vec<f32> = tnodes
            .iter()
            .zip(&tq)
            .map(|(&v, &t)| {
                ((t - new_last[self.row[v as usize] as usize]) / self.time_scale) as f32
            })
            .collect();
        let nt = tnodes.len();
        let mut nbr = vec![0i32; nt * k];
        let mut times: Vec<f32> = vec![0.0];
        let mut time_at: std::collections::HashMap<u32, i32> = [(0f32.to_bits(), 0)].into();
        let mut nbr_time = vec![0i32; nt * k];
        let mut nbr_edge = vec![0f32; nt * k * e];
        let mut nbr_mask = vec![0f32; nt * k];
        for (row, list) in nbr_nodes.iter().enumerate() {
            for (s, n) in list.iter().enumerate() {
                let at = row * k + s;
                nbr[at] = self.row[n.node as usize] as i32;
                // PyG's edge time: the neighbour's last update minus the edge's time (mostly
                // small; the query's time minus the edge's, on raw seconds, is noise to the
                // cosine encoding: test AP 0.71 instead of 0.83 on CollegeMsg).
                let dt = (new_last[self.row[n.node as usize] as usize] - n.t) as f32;
                nbr_time[at] = *time_at.entry(dt.to_bits()).or_insert_with(|| {
                    times.push(dt);
                    times.len() as i32 - 1
                });
                let ev = n.event as usize;
                nbr_edge[at * e..(at + 1) * e].copy_from_slice(&g.feat[ev * e..(ev + 1) * e]);
                nbr_mask[at] = 1.0;
            }
        }
        let batch = TgnBatch {
            events: b,
            nodes: u,
            updated,
            memory: &memory,
            msg_other: &msg_other,
            msg_edge: &msg_edge,
            msg_dt: &msg_dt,
            correction: self.pres.correct.then_some(Correction {
                predicted: &predicted,
                gamma: self.pres.gamma,
            }),
            coherence: &coherence,
            target: &target,
            pair_src: &pair_src,
            pair_dst: &pair_dst,
            target_dt: &target_dt,
            nbr: &nbr,
            times: &times,
            nbr_time: &nbr_time,
            nbr_edge: &nbr_edge,
            nbr_mask: &nbr_mask,
            loss_scale: ranks as f32 / b_all as f32,
        };
        // A rank whose share is empty (a batch of fewer events than ranks) computes nothing
        // but joins the exchanges.
        let out = if b == 0 {
            TgnOutput::default()
        } else {
            let out = self.net.forward(&self.be, &batch)?;
            if train {
                self.net.backward(&self.be)?;
            }
            out
        };
        // Commit: [new | computed] of each committed node, from its owner.
        let mut rows = vec![0f32; committed.len() * 2 * m];
        for (j, &(v, i)) in committed.iter().enumerate() {
            if owner_of(i) != me {
                continue;
            }
            let r = self.row[v as usize] as usize;
            debug_assert!(r < updated);
            rows[j * 2 * m..j * 2 * m + m].copy_from_slice(&out.memory[r * m..(r + 1) * m]);
            rows[j * 2 * m + m..(j + 1) * 2 * m].copy_from_slice(&out.computed[r * m..(r + 1) * m]);
        }
        if ranks > 1
            && let Some(comm) = comm
        {
            comm.all_reduce(&mut rows, ReduceOp::Sum)?;
        }
        for &v in &table {
            self.row[v as usize] = u32::MAX;
        }
        let st = &mut self.stream;
        for (j, &(v, _)) in committed.iter().enumerate() {
            let vi = v as usize;
            let ev = st.pending[vi] as usize;
            let new = &rows[j * 2 * m..j * 2 * m + m];
            let computed = &rows[j * 2 * m + m..(j + 1) * 2 * m];
            st.count[vi] += 1;
            let cnt = st.count[vi] as f32;
            // Welford: the transition's running mean and sum of squared deviations.
            let span = vi * m..(vi + 1) * m;
            for (((&c, &old), mean), m2) in computed
                .iter()
                .zip(&st.memory[span.clone()])
                .zip(&mut st.mean[span.clone()])
                .zip(&mut st.m2[span])
            {
                let x = c - old;
                let d = x - *mean;
                *mean += d / cnt;
                *m2 += d * (x - *mean);
            }
            st.memory[vi * m..(vi + 1) * m].copy_from_slice(new);
            st.last_update[vi] = g.t[ev];
        }
        for &(v, i) in &last {
            st.pending[v as usize] = i as u32;
        }
        for i in lo..hi {
            st.neighbors.insert(g.src[i], g.dst[i], g.t[i], i as u32);
        }
        Ok(out)
    }

    /// Replays the training events with the current parameters, then scores the validation and
    /// the test events; the training stream's state is kept aside and restored.
    pub fn link_report(&mut self) -> Result<LinkReport, WorkError> {
        let saved = self.stream.clone();
        self.stream.reset();
        let g = Arc::clone(&self.graph);
        let key = mix(self.seed, 0xe7a1);
        let mut lo = 0;
        while lo < g.train_end {
            let hi = (lo + self.batch).min(g.train_end);
            let negs = self.negatives(mix(key, lo as u64), lo, hi);
            self.run_batch(lo, hi, &negs, 0, 1, false, None)?;
            lo = hi;
        }
        let mut score = |from: usize, to: usize| -> Result<LinkScores, WorkError> {
            let (mut aps, mut aucs) = (Vec::new(), Vec::new());
            let mut inductive: Vec<(f32, f32)> = Vec::new();
            let mut lo = from;
            while lo < to {
                let hi = (lo + EVAL_BATCH).min(to);
                let negs = self.negatives(mix(key, lo as u64), lo, hi);
                let out = self.run_batch(lo, hi, &negs, 0, 1, false, None)?;
                let b = hi - lo;
                let (pos, neg) = out.logits.split_at(b);
                aps.push(average_precision(pos, neg));
                aucs.push(roc_auc(pos, neg));
                for i in 0..b {
                    if g.inductive(lo + i) {
                        inductive.push((pos[i], neg[i]));
                    }
                }
                lo = hi;
            }
            let (mut iap, mut iauc) = (Vec::new(), Vec::new());
            for chunk in inductive.chunks(EVAL_BATCH) {
                let pos: Vec<f32> = chunk.iter().map(|p| p.0).collect();
                let neg: Vec<f32> = chunk.iter().map(|p| p.1).collect();
                iap.push(average_precision(&pos, &neg));
                iauc.push(roc_auc(&pos, &neg));
            }
            Ok(LinkScores {
                ap: mean(&aps),
                auc: mean(&aucs),
                ap_inductive: mean(&iap),
                auc_inductive: mean(&iauc),
                inductive_events: inductive.len(),
            })
        };
        let val = score(g.train_end, g.val_end)?;
        let test = score(g.val_end, g.len())?;
        self.stream = saved;
        Ok(LinkReport { val, test })
    }

    /// The current parameters, downloaded from the backend.
    pub fn params(&mut self) -> Result<Vec<f32>, WorkError> {
        let n = self.config.num_params();
        Ok(self.be.download(self.net.buffers().0, 0, n)?)
    }
}

/// The events of a batch of `b` starting at `lo` that rank `r` of `ranks` computes: contiguous
/// shares in rank order, `floor(r b / ranks)..floor((r + 1) b / ranks)` (empty when `b` is
/// smaller than `ranks`).
pub fn share_of(lo: usize, b: usize, r: usize, ranks: usize) -> std::ops::Range<usize> {
    lo + r * b / ranks..lo + (r + 1) * b / ranks
}

/// The rank whose [`share_of`] a batch of `b` holds the batch's `x`-th event: the largest `r`
/// with `r b < (x + 1) ranks`.
pub fn owner_of(x: usize, b: usize, ranks: usize) -> usize {
    ((x + 1) * ranks - 1) / b
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Average precision of positives `pos` against negatives `neg` (scikit-learn's
/// `average_precision_score`: precision at each distinct threshold, weighted by the recall
/// gained there; tied scores form one threshold).
pub fn average_precision(pos: &[f32], neg: &[f32]) -> f64 {
    let mut all: Vec<(f32, bool)> = pos.iter().map(|&s| (s, true)).collect();
    all.extend(neg.iter().map(|&s| (s, false)));
    all.sort_by(|a, b| b.0.total_cmp(&a.0));
    let total = pos.len() as f64;
    if total == 0.0 {
        return f64::NAN;
    }
    let (mut tp, mut fp, mut ap, mut prev_recall) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    let mut i = 0;
    while i < all.len() {
        let s = all[i].0;
        while i < all.len() && all[i].0 == s {
            if all[i].1 {
                tp += 1.0;
            } else {
                fp += 1.0;
            }
            i += 1;
        }
        let recall = tp / total;
        ap += (recall - prev_recall) * tp / (tp + fp);
        prev_recall = recall;
    }
    ap
}

/// ROC-AUC of `pos` against `neg`: the probability that a positive outscores a negative, ties
/// counting one half.
pub fn roc_auc(pos: &[f32], neg: &[f32]) -> f64 {
    if pos.is_empty() || neg.is_empty() {
        return f64::NAN;
    }
    let mut n: Vec<f32> = neg.to_vec();
    n.sort_by(f32::total_cmp);
    let mut wins = 0.0f64;
    for &p in pos {
        let below = n.partition_point(|&x| x < p);
        let upto = n.partition_point(|&x| x <= p);
        wins += below as f64 + 0.5 * (upto - below) as f64;
    }
    wins / (pos.len() * neg.len()) as f64
}

impl<B: Backend, C: HostComm> Workload<C> for Pres<B, C> {
    fn describe(&self) -> String {
        self.model.clone()
    }

    fn num_params(&self) -> usize {
        self.config.num_params()
    }

    fn steps_per_epoch(&self) -> u64 {
        self.graph.train_end.div_ceil(self.batch) as u64
    }

    fn init(&mut self, topo: &mut Topology<C>) -> Result<(), WorkError> {
        let mut p = self.config.init(self.seed);
        topo.data_parallel.broadcast(&mut p, 0)?;
        self.be.upload(self.net.buffers().0, &p)?;
        Ok(())
    }

    fn load(&mut self, topo: &mut Topology<C>, dir: &Path, step: u64) -> Result<(), WorkError> {
        let path = dir.join(checkpoint::file_name(step));
        let tensors = self.config.tensors();
        let state =
            checkpoint::load(&path, &self.model, &tensors, self.num_params()).map_err(|e| {
                WorkError::new(ExitCode::Checkpoint, format!("rank {}: {e}", topo.rank))
            })?;
        // The stream as it was after `step` steps: mid-epoch, the memory, pending messages,
        // neighbours and PRES statistics the next batch reads.
        let c = self.config;
        let refuse = |why: String| {
            WorkError::new(
                ExitCode::Checkpoint,
                format!(
                    "rank {}: {} has no usable stream state (memory, pending messages, \
                     neighbours) for this job's temporal graph: {why}",
                    topo.rank,
                    path.display(),
                ),
            )
        };
        let blob = state
            .blobs
            .get(STREAM_BLOB)
            .ok_or_else(|| refuse("it has none (not written by temporal-graph training)".into()))?;
        let stream = Stream::from_bytes(
            blob,
            self.graph.num_nodes,
            c.memory,
            c.slots(),
            self.graph.len(),
        )
        .map_err(refuse)?;
        self.stream = stream;
        let (p, _) = self.net.buffers();
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
        let spe = self.steps_per_epoch();
        let (epoch, idx) = (step / spe, (step % spe) as usize);
        if idx == 0 {
            self.stream.reset();
        }
        let lo = idx * self.batch;
        let hi = (lo + self.batch).min(self.graph.train_end);
        let negs = self.negatives(mix(self.seed, epoch * spe + idx as u64), lo, hi);
        let ranks = topo.data_parallel_degree();
        let me = topo.replica as usize;
        let mine = share_of(lo, hi - lo, me, ranks).len();
        self.net.zero_grad(&self.be)?;
        let out = self.run_batch(
            lo,
            hi,
            &negs,
            me,
            ranks,
            true,
            Some(&mut topo.data_parallel),
        )?;
        let mut stats = SyncStats::default();
        let n = self.config.num_params();
        if ranks > 1 || self.always_sync {
            let mut buckets = self.settings.buckets(n, false);
            let (_, g) = self.net.buffers();
            for range in buckets.flush() {
                self.sync
                    .start(&self.be, &mut topo.data_parallel, g, 0, range)?;
            }
            stats = self.sync.finish(&self.be, &mut topo.data_parallel, g, 0)?;
        }
        let decay = self.config.decay_ranges();
        let (p, g) = self.net.buffers();
        self.adam.step(
            &self.be,
            p,
            g,
            &decay,
            lr,
            self.settings.betas,
            self.settings.eps,
            self.settings.weight_decay,
            self.settings.clip,
        )?;
        Ok(StepReport {
            // A rank with no events of this batch has no loss to report.
            loss: (mine > 0).then_some(out.loss as f32),
            samples: mine as u64,
            tokens: 0,
            comm: stats,
            pipeline: None,
        })
    }

    fn evaluate(
        &mut self,
        _topo: &mut Topology<C>,
        _max_batches: Option<usize>,
    ) -> Result<Evaluation, WorkError> {
        let r = self.link_report()?;
        tracing::info!(
            val_ap = r.val.ap,
            val_auc = r.val.auc,
            val_ap_inductive = r.val.ap_inductive,
            test_ap = r.test.ap,
            test_auc = r.test.auc,
            test_ap_inductive = r.test.ap_inductive,
            test_auc_inductive = r.test.auc_inductive,
            inductive_test_events = r.test.inductive_events,
            "link prediction"
        );
        self.report = Some(r);
        Ok(Evaluation {
            metric: Metric::AveragePrecision,
            value: r.val.ap as f32,
            link: Some(r),
        })
    }

    fn save(
        &mut self,
        topo: &mut Topology<C>,
        dir: &Path,
        step: u64,
        keep: usize,
    ) -> Result<Option<PathBuf>, WorkError> {
        if topo.replica != 0 {
            return Ok(None);
        }
        let n = self.num_params();
        let (p, _) = self.net.buffers();
        let params = self.be.download(p, 0, n)?;
        let state = checkpoint::State {
            step,
            adam_t: self.adam.t,
            seed: self.seed,
            model: self.model.clone(),
            tensors: self.config.tensors(),
            meta: Default::default(),
            params,
            m: self.be.download(&self.adam.m, 0, n)?,
            v: self.be.download(&self.adam.v, 0, n)?,
            blobs: [(STREAM_BLOB.to_string(), self.stream.to_bytes())].into(),
        };
        let name = checkpoint::file_name(step);
        Ok(self.writer.start(dir, state, name, Some((keep, None)))?)
    }

    fn flush(&mut self, _topo: &mut Topology<C>) -> Result<Option<PathBuf>, WorkError> {
        Ok(self.writer.wait()?)
    }

    fn params_digest(&mut self) -> Result<u64, WorkError> {
        let params = self.params()?;
        Ok(lockstep_api::config::fnv1a64(bytemuck::cast_slice(&params)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::tcp::{TcpComm, TcpOptions};
    use crate::workload::sync::TcpSync;
    use lockstep_api::layout::Layout;
    use lockstep_engine::cpu::Cpu;

    fn workload(graph: TemporalGraph, model: &str) -> (Pres<Cpu, TcpComm>, Topology<TcpComm>) {
        let yaml = format!(
            r#"apiVersion: lockstep.dev/v1alpha1
kind: ParallelJob
metadata: {{name: within-batch}}
spec:
  parallelism: {{dataParallel: 1}}
  training:
    workload: Pres
    model: {{tgn: {{memoryDim: 8, timeDim: 4, embeddingDim: 8, neighbors: 3, heads: 2, memoryModel: {model}}}}}
    data: {{kind: TemporalGraph, path: unused}}
    optimizer: {{learningRate: 0.003}}
    maxSteps: 4
    pres: {{temporalBatch: 100}}
  template:
    spec:
      containers: [{{name: worker, image: lockstep/worker:0.1.0}}]
"#
        );
        let job = lockstep_api::manifest::parse_job(&yaml).expect("valid job");
        let cfg = WorkerConfig::from_job(&job).expect("config");
        let comm = TcpComm::local_gang(1, TcpOptions::default())
            .expect("gang")
            .remove(0);
        let mut topo = Topology::new(Layout::new(1, 1).expect("layout"), comm).expect("topology");
        let mut w = Pres::with_graph(
            Cpu,
            Box::new(TcpSync::default()),
            false,
            &cfg,
            &topo,
            Arc::new(graph),
        )
        .expect("workload");
        w.init(&mut topo).expect("init");
        (w, topo)
    }

    /// CollegeMsg's first 600 events.
    fn college() -> TemporalGraph {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../data/collegemsg.txt.gz");
        let text = crate::data::read_text(path).expect("data");
        let head: Vec<&str> = text.lines().take(600).collect();
        TemporalGraph::parse(&head.join("\n"), "collegemsg").expect("parse")
    }

    /// The logits of batch 400..500 after training on the four batches before it.
    fn batch_logits(graph: TemporalGraph, model: &str) -> Vec<f32> {
        let (mut w, mut topo) = workload(graph, model);
        for step in 0..4 {
            w.step(&mut topo, step, 0.003).expect("step");
        }
        let negs = w.negatives(99, 400, 500);
        w.run_batch(400, 500, &negs, 0, 1, false, None)
            .expect("batch")
            .logits
    }

    #[test]
    fn a_prediction_reads_nothing_of_its_own_batch() {
        let g = college();
        let seen: std::collections::HashSet<u32> =
            (0..400).flat_map(|i| [g.src[i], g.dst[i]]).collect();
        // An event of the batch whose destination becomes another node seen before (so that no
        // id changes): every other prediction of the batch stays as it was, bit for bit.
        let j = (420..500)
            .find(|&j| seen.contains(&g.dst[j]))
            .expect("an event to change");
        let other = (0..400)
            .map(|i| g.src[i])
            .find(|&v| v != g.dst[j] && v != g.src[j])
            .expect("another node");
        let mut changed = g.clone();
        changed.dst[j] = other;
        for model in ["Tgn", "Jodie"] {
            let (a, b) = (
                batch_logits(g.clone(), model),
                batch_logits(changed.clone(), model),
            );
            let k = j - 400;
            assert_ne!(a[k], b[k], "{model}: the changed event's own logit moves");
            for i in (0..a.len()).filter(|&i| i != k) {
                assert_eq!(
                    a[i].to_bits(),
                    b[i].to_bits(),
                    "{model}: logit {i} read event {j} of its own batch"
                );
            }
        }
    }

    #[test]
    fn a_stream_round_trips_and_one_of_other_sizes_or_indices_is_refused_by_name() {
        let mut st = Stream::new(4, 2, 2);
        st.memory[3] = 1.5;
        st.last_update[1] = 7.25;
        st.pending[2] = 9;
        st.count[0] = 3;
        st.neighbors.insert(0, 3, 5.0, 9);
        let bytes = st.to_bytes();
        assert_eq!(Stream::from_bytes(&bytes, 4, 2, 2, 10).expect("same"), st);
        let e = Stream::from_bytes(&bytes, 4, 2, 3, 10).unwrap_err();
        assert!(e.contains("2 neighbours, this job has 3"), "{e}");
        let e = Stream::from_bytes(&bytes, 4, 2, 2, 9).unwrap_err();
        assert!(e.contains("event 9, the data has 9"), "{e}");
        let e = Stream::from_bytes(&bytes[..bytes.len() - 1], 4, 2, 2, 10).unwrap_err();
        assert!(e.contains("cut short"), "{e}");
    }

    #[test]
    fn every_event_of_a_batch_is_in_exactly_its_owners_share() {
        for ranks in 1..=5 {
            for b in 1..=23 {
                let mut seen = vec![0; b];
                for r in 0..ranks {
                    for i in share_of(100, b, r, ranks) {
                        seen[i - 100] += 1;
                        assert_eq!(owner_of(i - 100, b, ranks), r, "b {b} ranks {ranks}");
                    }
                }
                assert!(
                    seen.iter().all(|&n| n == 1),
                    "b {b} ranks {ranks}: {seen:?}"
                );
            }
        }
    }

    #[test]
    fn average_precision_and_auc_match_scikit_learn() {
        // sklearn.metrics.average_precision_score([1,1,1,0,0,0], [.9,.4,.35,.8,.1,.35])
        // = 1/3 + 2/9 + 1/5 (the tie at .35 is one threshold); roc_auc_score = 6.5 / 9.
        let pos = [0.9, 0.4, 0.35];
        let neg = [0.8, 0.1, 0.35];
        assert!((average_precision(&pos, &neg) - (1.0 / 3.0 + 2.0 / 9.0 + 0.2)).abs() < 1e-9);
        assert!((roc_auc(&pos, &neg) - 6.5 / 9.0).abs() < 1e-9);
        assert_eq!(average_precision(&[2.0], &[1.0]), 1.0);
        assert_eq!(roc_auc(&[1.0], &[2.0]), 0.0);
    }
}
