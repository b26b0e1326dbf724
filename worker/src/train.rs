//! The training loop of the built-in workloads.
//!
//! What is built so far: `Ddp` with the `mlp` model on `Digits`, on the CPU, in the style the
//! engine issue describes: parameters, gradients and optimizer state each live in one flat
//! buffer; each layer has an explicit forward and backward; as backward produces a layer's
//! gradients, they join the current bucket (the last layer's bucket is capped smaller, so that
//! communication starts early) and a full bucket is all-reduced asynchronously while backward
//! goes on (PyTorch DDP semantics: mean over ranks, gradient accumulation without
//! communication on all but the last micro-step, the same AdamW on every rank). The other
//! workloads and models, the CUDA backend and checkpoints are the engine issue's.

use std::time::{Duration, Instant};

use lockstep_api::config::WorkerConfig;
use lockstep_api::contract::ExitCode;
use lockstep_api::training::{DataKind, LrSchedule, Model, Optimizer, Workload};
use rand::SeedableRng;
use rand::seq::SliceRandom;

use crate::comm::{CommError, Communicator, Pending, ReduceOp};
use crate::metrics::Metrics;

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

/// What a finished run reports.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// Optimizer steps taken.
    pub steps: u64,
    /// Training loss of the last step (mean over ranks).
    pub loss: f32,
    /// Accuracy on the held-out data, when evaluated.
    pub eval_accuracy: Option<f32>,
    /// Digest of the final parameters (equal on every rank).
    pub params_digest: u64,
}

/// The digits data set: 64 pixels (0 to 16) and a label per row.
#[derive(Clone, Debug)]
pub struct Digits {
    /// Pixels scaled to 0..1, row-major, 64 per sample.
    pub x: Vec<f32>,
    /// Labels 0..9.
    pub y: Vec<u8>,
}

impl Digits {
    const FEATURES: usize = 64;

    /// Reads the CSV (optionally gzipped) at `path`.
    pub fn load(path: &str) -> Result<Self, WorkError> {
        use std::io::Read;
        let bad = |m: String| WorkError::new(ExitCode::Data, m);
        let raw = std::fs::read(path)
            .map_err(|e| bad(format!("cannot read the data set {path}: {e}")))?;
        let text = if path.ends_with(".gz") {
            let mut s = String::new();
            flate2::read::GzDecoder::new(&raw[..])
                .read_to_string(&mut s)
                .map_err(|e| bad(format!("{path} is not valid gzip text: {e}")))?;
            s
        } else {
            String::from_utf8(raw).map_err(|e| bad(format!("{path} is not UTF-8: {e}")))?
        };
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let v: Vec<f32> = line
                .split(',')
                .map(|f| f.trim().parse::<f32>())
                .collect::<Result<_, _>>()
                .map_err(|e| bad(format!("{path} line {}: {e}", i + 1)))?;
            if v.len() != Self::FEATURES + 1 || !(0.0..10.0).contains(&v[64]) {
                return Err(bad(format!(
                    "{path} line {}: expected 64 pixels and a label 0-9, got {} fields",
                    i + 1,
                    v.len()
                )));
            }
            x.extend(v[..64].iter().map(|p| p / 16.0));
            y.push(v[64] as u8);
        }
        if y.is_empty() {
            return Err(bad(format!("{path} holds no samples")));
        }
        Ok(Self { x, y })
    }

    fn len(&self) -> usize {
        self.y.len()
    }
}

/// A multi-layer perceptron with ReLU between layers and a softmax cross-entropy loss; its
/// parameters are one flat buffer: layer by layer, the weight (out x in, row-major) then the bias.
#[derive(Clone, Debug)]
pub struct Mlp {
    sizes: Vec<usize>,
    /// Start of each layer's weight in the flat buffer.
    offsets: Vec<usize>,
    len: usize,
}

/// `c[m x n] = a[m x k] * b[k x n]`, all row-major.
fn matmul(c: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize) {
    c[..m * n].fill(0.0);
    for i in 0..m {
        let row = &mut c[i * n..(i + 1) * n];
        for (p, &av) in a[i * k..(i + 1) * k].iter().enumerate() {
            if av != 0.0 {
                row.iter_mut()
                    .zip(&b[p * n..(p + 1) * n])
                    .for_each(|(r, &bv)| *r += av * bv);
            }
        }
    }
}

/// `c[m x n] = a[m x k] * b[n x k]^T`, all row-major: each element a dot product of two rows,
/// so a weight stored out x in is used as it is.
fn matmul_nt(c: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize) {
    for i in 0..m {
        let arow = &a[i * k..(i + 1) * k];
        for (j, out) in c[i * n..(i + 1) * n].iter_mut().enumerate() {
            *out = arow
                .iter()
                .zip(&b[j * k..(j + 1) * k])
                .map(|(x, y)| x * y)
                .sum();
        }
    }
}

/// `c[m x n] += a[k x m]^T * b[k x n]`, all row-major: a weight gradient from the batch's
/// output gradients and inputs, row by row, with no transposed copy.
fn matmul_tn_acc(c: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize) {
    for p in 0..k {
        let brow = &b[p * n..(p + 1) * n];
        for (i, &av) in a[p * m..(p + 1) * m].iter().enumerate() {
            if av != 0.0 {
                c[i * n..(i + 1) * n]
                    .iter_mut()
                    .zip(brow)
                    .for_each(|(r, &bv)| *r += av * bv);
            }
        }
    }
}

impl Mlp {
    /// An MLP with the given layer widths (input first, classes last).
    pub fn new(sizes: Vec<usize>) -> Self {
        let mut offsets = Vec::new();
        let mut len = 0;
        for w in sizes.windows(2) {
            offsets.push(len);
            len += w[0] * w[1] + w[1];
        }
        Self {
            sizes,
            offsets,
            len,
        }
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the model has no parameters.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn layers(&self) -> usize {
        self.sizes.len() - 1
    }

    /// Parameter range of layer `l` (weight and bias).
    pub fn layer_range(&self, l: usize) -> std::ops::Range<usize> {
        let (i, o) = (self.sizes[l], self.sizes[l + 1]);
        self.offsets[l]..self.offsets[l] + i * o + o
    }

    /// PyTorch's `nn.Linear` initialisation: U(-1/sqrt(in), 1/sqrt(in)).
    pub fn init(&self, seed: u64) -> Vec<f32> {
        use rand::Rng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut p = vec![0.0; self.len];
        for l in 0..self.layers() {
            let bound = 1.0 / (self.sizes[l] as f32).sqrt();
            p[self.layer_range(l)]
                .iter_mut()
                .for_each(|v| *v = rng.random_range(-bound..bound));
        }
        p
    }

    /// Which parameters get weight decay (weights, not biases).
    fn decays(&self) -> Vec<bool> {
        let mut d = vec![false; self.len];
        for l in 0..self.layers() {
            let (i, o) = (self.sizes[l], self.sizes[l + 1]);
            d[self.offsets[l]..self.offsets[l] + i * o].fill(true);
        }
        d
    }

    /// Logits of a batch of `b` samples.
    fn forward(&self, params: &[f32], x: &[f32], b: usize) -> Vec<Vec<f32>> {
        let mut acts = vec![x.to_vec()];
        for l in 0..self.layers() {
            let (i, o) = (self.sizes[l], self.sizes[l + 1]);
            let r = self.layer_range(l);
            let (w, bias) = params[r].split_at(i * o);
            // z = a W^T + b, with W stored out x in.
            let mut z = vec![0.0; b * o];
            matmul_nt(&mut z, &acts[l], w, b, i, o);
            for row in z.chunks_mut(o) {
                row.iter_mut().zip(bias).for_each(|(v, bb)| *v += bb);
                if l + 1 < self.layers() {
                    row.iter_mut().for_each(|v| *v = v.max(0.0));
                }
            }
            acts.push(z);
        }
        acts
    }

    /// Mean cross-entropy of a batch; writes the gradients into `grads` layer by layer from the
    /// last, calling `layer_done(l)` as soon as layer `l`'s gradients are final.
    pub fn forward_backward(
        &self,
        params: &[f32],
        grads: &mut [f32],
        x: &[f32],
        y: &[u8],
        accumulate: bool,
        layer_done: &mut dyn FnMut(usize, &[f32]),
    ) -> f32 {
        let b = y.len();
        let acts = self.forward(params, x, b);
        let classes = *self.sizes.last().expect("at least two sizes");
        let logits = acts.last().expect("one activation per layer");
        let mut dz = vec![0.0; b * classes];
        let mut loss = 0.0f64;
        for (s, (row, d)) in logits
            .chunks(classes)
            .zip(dz.chunks_mut(classes))
            .enumerate()
        {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
            let label = y[s] as usize;
            loss += f64::from(sum.ln() + max - row[label]);
            for (c, dv) in d.iter_mut().enumerate() {
                let p = (row[c] - max).exp() / sum;
                *dv = (p - f32::from(c == label)) / b as f32;
            }
        }
        for l in (0..self.layers()).rev() {
            let (i, o) = (self.sizes[l], self.sizes[l + 1]);
            let r = self.layer_range(l);
            {
                let (gw, gb) = grads[r.clone()].split_at_mut(i * o);
                // dW = dz^T a: accumulate row by row.
                if !accumulate {
                    gw.fill(0.0);
                    gb.fill(0.0);
                }
                matmul_tn_acc(gw, &dz, &acts[l], o, b, i);
                for row in dz.chunks(o) {
                    gb.iter_mut().zip(row).for_each(|(g, d)| *g += d);
                }
            }
            if l > 0 {
                // da = dz W, then through the ReLU.
                let w = &params[r.start..r.start + i * o];
                let mut da = vec![0.0; b * i];
                matmul(&mut da, &dz, w, b, o, i);
                da.iter_mut()
                    .zip(&acts[l])
                    .for_each(|(d, a)| *d = if *a > 0.0 { *d } else { 0.0 });
                dz = da;
            }
            layer_done(l, &grads[r]);
        }
        (loss / b as f64) as f32
    }

    /// Accuracy on `data[from..]`.
    pub fn accuracy(&self, params: &[f32], data: &Digits, from: usize) -> f32 {
        let n = data.len() - from;
        if n == 0 {
            return 0.0;
        }
        let x = &data.x[from * 64..];
        let logits = self.forward(params, x, n);
        let classes = *self.sizes.last().expect("at least two sizes");
        let correct = logits
            .last()
            .expect("logits")
            .chunks(classes)
            .zip(&data.y[from..])
            .filter(|(row, y)| {
                let best = row
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map(|(c, _)| c)
                    .unwrap_or(0);
                best == **y as usize
            })
            .count();
        correct as f32 / n as f32
    }
}

/// AdamW over flat buffers, with warmup and a cosine or constant schedule.
#[derive(Debug)]
pub struct AdamW {
    cfg: Optimizer,
    total_steps: u64,
    m: Vec<f32>,
    v: Vec<f32>,
    decay: Vec<bool>,
    t: i32,
}

impl AdamW {
    /// An optimizer for `decay.len()` parameters.
    pub fn new(cfg: Optimizer, total_steps: u64, decay: Vec<bool>) -> Self {
        let n = decay.len();
        Self {
            cfg,
            total_steps,
            m: vec![0.0; n],
            v: vec![0.0; n],
            decay,
            t: 0,
        }
    }

    /// The learning rate of step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        let c = &self.cfg;
        let warm = c.warmup_steps.max(0) as u64;
        if step < warm {
            return c.learning_rate * (step + 1) as f64 / warm as f64;
        }
        match c.schedule {
            LrSchedule::Constant => c.learning_rate,
            LrSchedule::Cosine => {
                let span = self.total_steps.saturating_sub(warm).max(1) as f64;
                let p = ((step - warm) as f64 / span).min(1.0);
                c.min_learning_rate
                    + 0.5
                        * (c.learning_rate - c.min_learning_rate)
                        * (1.0 + (std::f64::consts::PI * p).cos())
            }
        }
    }

    /// One update of `params` with `grads` (already averaged over ranks).
    pub fn step(&mut self, step: u64, params: &mut [f32], grads: &mut [f32]) {
        let c = &self.cfg;
        if c.grad_clip_norm > 0.0 {
            let norm = grads
                .iter()
                .map(|g| f64::from(*g) * f64::from(*g))
                .sum::<f64>()
                .sqrt();
            if norm > c.grad_clip_norm {
                let s = (c.grad_clip_norm / (norm + 1e-6)) as f32;
                grads.iter_mut().for_each(|g| *g *= s);
            }
        }
        self.t += 1;
        let lr = self.lr(step) as f32;
        let (b1, b2, eps, wd) = (
            c.beta1 as f32,
            c.beta2 as f32,
            c.epsilon as f32,
            c.weight_decay as f32,
        );
        let bc1 = 1.0 - b1.powi(self.t);
        let bc2 = 1.0 - b2.powi(self.t);
        for i in 0..params.len() {
            let g = grads[i];
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * g;
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * g * g;
            if self.decay[i] {
                params[i] -= lr * wd * params[i];
            }
            params[i] -= lr * (self.m[i] / bc1) / ((self.v[i] / bc2).sqrt() + eps);
        }
    }
}

/// Groups ready layers into buckets (reverse layer order, so each bucket is one contiguous range
/// of the flat gradient buffer) and all-reduces each full bucket at once, asynchronously.
struct Reducer<'c, C: Communicator<Buffer = [f32], Owned = Vec<f32>>> {
    comm: &'c mut C,
    first_cap: usize,
    cap: usize,
    overlap: bool,
    /// Range of the bucket being filled.
    open: Option<std::ops::Range<usize>>,
    pending: Vec<(std::ops::Range<usize>, Pending<Vec<f32>>)>,
    launched_bytes: usize,
}

impl<C: Communicator<Buffer = [f32], Owned = Vec<f32>>> Reducer<'_, C> {
    fn layer_ready(&mut self, range: std::ops::Range<usize>, grads: &[f32]) {
        let merged = match self.open.take() {
            // Layers arrive last first, so the new range ends where the open bucket starts.
            Some(open) => range.start..open.end,
            None => range,
        };
        let cap = if self.pending.is_empty() {
            self.first_cap
        } else {
            self.cap
        };
        if self.overlap && merged.len() * 4 >= cap {
            self.launch(merged, grads);
        } else {
            self.open = Some(merged);
        }
    }

    /// Starts the all-reduce of `grads[range]` (`grads` is indexed by absolute offset).
    fn launch(&mut self, range: std::ops::Range<usize>, grads: &[f32]) {
        let data = grads[range.clone()].to_vec();
        self.launched_bytes += data.len() * 4;
        let p = self.comm.all_reduce_async(data, ReduceOp::Avg);
        self.pending.push((range, p));
    }
}

fn ddp_error(e: impl std::fmt::Display) -> WorkError {
    WorkError::new(ExitCode::Config, e.to_string())
}

/// Runs the job's workload on this rank; `on_step` is called after every optimizer step.
pub fn run<C: Communicator<Buffer = [f32], Owned = Vec<f32>>>(
    cfg: &WorkerConfig,
    comm: &mut C,
    metrics: &Metrics,
    on_step: &dyn Fn(u64),
) -> Result<Summary, WorkError> {
    let t = &cfg.training;
    match (
        t.workload,
        t.model.as_ref(),
        t.data.as_ref().map(|d| d.kind),
    ) {
        (Workload::Ddp, Some(Model::Mlp(mlp)), Some(DataKind::Digits)) => {
            let data = Digits::load(&t.data.as_ref().expect("matched Some").path)?;
            let mut sizes = vec![Digits::FEATURES];
            sizes.extend(mlp.hidden_sizes.iter().map(|&h| h as usize));
            sizes.push(10);
            run_ddp(cfg, Mlp::new(sizes), &data, comm, metrics, on_step)
        }
        (w, m, d) => Err(WorkError::new(
            ExitCode::Config,
            format!(
                "workload {w:?} with model {} and data {d:?} is not built yet: this worker \
                 trains Ddp + mlp + Digits (the engine issue adds the rest)",
                match m {
                    Some(Model::Mlp(_)) => "mlp",
                    Some(Model::Gpt(_)) => "gpt",
                    Some(Model::Tgn(_)) => "tgn",
                    None => "none",
                }
            ),
        )),
    }
}

fn run_ddp<C: Communicator<Buffer = [f32], Owned = Vec<f32>>>(
    cfg: &WorkerConfig,
    model: Mlp,
    data: &Digits,
    comm: &mut C,
    metrics: &Metrics,
    on_step: &dyn Fn(u64),
) -> Result<Summary, WorkError> {
    let t = &cfg.training;
    let (rank, world) = (comm.rank(), comm.world_size());
    let batch = t.batch_size.unwrap_or(32).max(1) as usize;
    let accum = t.ddp.grad_accumulation_steps.max(1) as usize;
    let held_out = data.len() / 5;
    let n_train = data.len() - held_out;
    let per_step = batch * world * accum;
    let steps_per_epoch = n_train / per_step;
    if steps_per_epoch == 0 {
        return Err(ddp_error(format!(
            "batchSize {batch} x dataParallel {world} x gradAccumulationSteps {accum} = {per_step} \
             exceeds the {n_train} training samples: lower spec.training.batchSize"
        )));
    }
    let total = match (t.max_steps, t.epochs) {
        (Some(s), _) => s.max(1) as u64,
        (None, Some(e)) => e.max(1) as u64 * steps_per_epoch as u64,
        (None, None) => steps_per_epoch as u64,
    };
    metrics.total_steps.set(total as i64);
    let seed = t.seed as u64;
    let mut params = model.init(seed);
    // Every rank starts from rank 0's parameters, as DDP does.
    comm.broadcast(&mut params, 0)?;
    let mut grads = vec![0.0f32; model.len()];
    let mut opt = AdamW::new(t.optimizer.clone(), total, model.decays());
    let mb = |v: f64| (v * 1024.0 * 1024.0) as usize;
    let eval_every = t.evaluation.every_steps.map(|e| e.max(1) as u64);
    tracing::info!(
        rank,
        world,
        params = model.len(),
        steps = total,
        steps_per_epoch,
        batch,
        accum,
        "training an MLP on the digits (DDP, CPU)"
    );
    let mut order: Vec<usize> = Vec::new();
    let (mut loss_mean, mut accuracy) = (0.0f32, None);
    // Buffers of a step, allocated once: the batch, and the gradients as backward hands them
    // over (a bucket is copied out of here when it is all-reduced).
    let ranges: Vec<_> = (0..model.layers()).map(|l| model.layer_range(l)).collect();
    let mut snapshot = vec![0.0f32; model.len()];
    let mut x = Vec::with_capacity(batch * Digits::FEATURES);
    let mut y = Vec::with_capacity(batch);
    for step in 0..total {
        let started = Instant::now();
        let epoch = step / steps_per_epoch as u64;
        let in_epoch = (step % steps_per_epoch as u64) as usize;
        if in_epoch == 0 {
            order = (0..n_train).collect();
            order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(
                seed ^ (epoch + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            ));
        }
        let mut loss_sum = 0.0f32;
        let mut exposed = Duration::ZERO;
        let mut comm_time = Duration::ZERO;
        let mut launched = 0usize;
        for micro in 0..accum {
            let start = in_epoch * per_step + (micro * world + rank) * batch;
            let idx = &order[start..start + batch];
            x.clear();
            y.clear();
            for &i in idx {
                x.extend_from_slice(&data.x[i * Digits::FEATURES..(i + 1) * Digits::FEATURES]);
                y.push(data.y[i]);
            }
            let last = micro + 1 == accum;
            let mut reducer = Reducer {
                comm: &mut *comm,
                first_cap: mb(t.ddp.first_bucket_cap_mb),
                cap: mb(t.ddp.bucket_cap_mb),
                overlap: t.ddp.overlap && last,
                open: None,
                pending: Vec::new(),
                launched_bytes: 0,
            };
            let loss =
                model.forward_backward(&params, &mut grads, &x, &y, micro > 0, &mut |l, g| {
                    if !last {
                        return;
                    }
                    let r = ranges[l].clone();
                    snapshot[r.clone()].copy_from_slice(g);
                    reducer.layer_ready(r, &snapshot);
                });
            loss_sum += loss;
            if last {
                if let Some(open) = reducer.open.take() {
                    reducer.launch(open, &snapshot);
                }
                let waiting = Instant::now();
                // Wait for every bucket, even after an error, so none is left in flight.
                let mut failed = None;
                for (range, p) in std::mem::take(&mut reducer.pending) {
                    match p.wait_timed() {
                        Ok((reduced, took)) => {
                            comm_time += took;
                            grads[range].copy_from_slice(&reduced);
                        }
                        Err(e) => {
                            failed.get_or_insert(e);
                        }
                    }
                }
                exposed = waiting.elapsed();
                launched = reducer.launched_bytes;
                if let Some(e) = failed {
                    return Err(e.into());
                }
            }
        }
        opt.step(step, &mut params, &mut grads);
        // The mean loss over ranks (a tiny all-reduce that doubles as a liveness check).
        let mut l = [loss_sum / accum as f32];
        comm.all_reduce(&mut l, ReduceOp::Avg)?;
        loss_mean = l[0];
        if !loss_mean.is_finite() {
            return Err(WorkError::new(
                ExitCode::Diverged,
                format!(
                    "the loss became {loss_mean} at step {step}: lower spec.training.optimizer.learningRate"
                ),
            ));
        }
        let secs = started.elapsed().as_secs_f64();
        metrics.step.set(step as i64 + 1);
        metrics.step_seconds.observe(secs);
        metrics.loss.set(f64::from(loss_mean));
        metrics
            .samples_per_second
            .set((batch * accum) as f64 / secs.max(1e-9));
        if world > 1 {
            metrics.observe_allreduce(launched, world, comm_time.as_secs_f64());
            if !comm_time.is_zero() {
                let hidden = 1.0 - (exposed.as_secs_f64() / comm_time.as_secs_f64()).min(1.0);
                metrics.comm_hidden_ratio.set(hidden);
            }
        }
        let done = step + 1 == total;
        if eval_every.is_some_and(|e| (step + 1) % e == 0) || done {
            let acc = model.accuracy(&params, data, n_train);
            accuracy = Some(acc);
            metrics.eval_metric.set(f64::from(acc));
            if rank == 0 {
                tracing::info!(
                    step = step + 1,
                    loss = loss_mean,
                    eval_accuracy = acc,
                    "evaluated"
                );
            }
        }
        on_step(step + 1);
    }
    let digest = lockstep_api::config::fnv1a64(bytemuck::cast_slice(&params));
    Ok(Summary {
        steps: total,
        loss: loss_mean,
        eval_accuracy: accuracy,
        params_digest: digest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mlp_gradients_match_finite_differences() {
        let m = Mlp::new(vec![5, 4, 3]);
        let p = m.init(7);
        let x: Vec<f32> = (0..10).map(|i| (i as f32 * 0.37).sin()).collect();
        let y = [1u8, 2];
        let mut g = vec![0.0; m.len()];
        let mut order = Vec::new();
        m.forward_backward(&p, &mut g, &x, &y, false, &mut |l, _| order.push(l));
        assert_eq!(order, vec![1, 0], "layers are reported last first");
        let mut scratch = vec![0.0; m.len()];
        for i in (0..m.len()).step_by(3) {
            let h = 1e-3;
            let (mut a, mut b) = (p.clone(), p.clone());
            a[i] += h;
            b[i] -= h;
            let la = m.forward_backward(&a, &mut scratch, &x, &y, false, &mut |_, _| {});
            let lb = m.forward_backward(&b, &mut scratch, &x, &y, false, &mut |_, _| {});
            let fd = (la - lb) / (2.0 * h);
            assert!(
                (fd - g[i]).abs() < 2e-3,
                "param {i}: analytic {} vs numeric {fd}",
                g[i]
            );
        }
    }

    #[test]
    fn cosine_schedule_warms_up_then_decays_to_the_minimum() {
        let cfg = Optimizer {
            learning_rate: 1.0,
            min_learning_rate: 0.1,
            warmup_steps: 10,
            schedule: LrSchedule::Cosine,
            ..Optimizer::default()
        };
        let o = AdamW::new(cfg, 110, vec![]);
        assert!((o.lr(0) - 0.1).abs() < 1e-12);
        assert!((o.lr(9) - 1.0).abs() < 1e-12);
        assert!((o.lr(10) - 1.0).abs() < 1e-12);
        assert!((o.lr(60) - 0.55).abs() < 1e-12);
        assert!((o.lr(110) - 0.1).abs() < 1e-12);
    }
}
