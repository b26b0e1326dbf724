//! Memory-based temporal graph networks for link prediction: TGN (Rossi et al. 2020) and JODIE
//! (Kumar et al. 2019) as a TGN variant, with the differentiable half of PRES (Su, Zou, Wu,
//! ICLR 2024), written on the engine's primitives so that the CPU and CUDA backends run the same
//! algorithm.
//!
//! The engine computes one temporal batch's differentiable part; the caller (the worker's PRES
//! workload) keeps the node memory, the pending messages, the neighbour lists and the PRES
//! statistics on the host, and hands over, per batch, the rows this batch reads ([`TgnBatch`]).
//!
//! One batch, for `b` events `(src_i, dst_i, t_i)` and one negative destination each:
//!
//! 1. Memory update of the `updated` nodes that have a pending message (their last event of an
//!    earlier batch, as TGN's last-message aggregator keeps): the message is
//!    `[s_u || s_v || e_uv || cos(dt w + b)]` (identity message, trainable time encoding), the
//!    updater a GRU cell (TGN) or a tanh RNN cell (JODIE): `s_comp = cell(msg, s_u)`.
//! 2. PRES prediction-correction, when the batch carries a prediction `s_hat = s_old + mean`:
//!    `s_new = gamma * s_hat + (1 - gamma) * s_comp`; otherwise `s_new = s_comp`.
//! 3. Embedding of the target rows the pairs name (the caller's choice: one per distinct node
//!    for TGN, whose embedding does not depend on the query's time, as in PyG; one per event
//!    endpoint for JODIE, whose projection does): TGN's graph attention over the `k` most recent temporal neighbours (keys and values
//!    from the neighbour's memory plus a projection of `[cos(dt w + b) || e]`, `dt` the
//!    neighbour's last update minus the edge's time as in PyG's reference; one query per
//!    target from its memory, `heads` heads, a skip connection from the target's memory, as
//!    PyG's `TransformerConv` computes it), or JODIE's time projection `s * (1 + dt w_p)`.
//! 4. Link prediction: `relu(z_src W_s + b_s + z_dst W_d + b_d) w_f + b_f`, the logit of a
//!    positive (destination) and of a negative pair, and binary cross-entropy (the
//!    cross-entropy kernel over the two logits `[0, l]`, which is `BCE(sigmoid(l))`).
//! 5. PRES memory coherence, `sum_u w_u (1 - cos(s_new_u, s_old_u))` with the caller's weights
//!    (beta over the nodes the batch commits, 0 elsewhere), and its gradient (computed on the
//!    host: a few hundred rows).
//!
//! Nodes without a pending message keep their memory; the memory of every node the batch reads
//! is otherwise a constant (detached, as TGN detaches it after each batch). No dropout.

use rand::{Rng, SeedableRng};

use super::names::Named;
use super::{Net, Params};
use crate::backend::{Backend, BinaryOp, Gemm, Kernel, Mask, Op, UnaryOp};
use crate::nn::activation::{activation_bwd, activation_fwd};
use crate::nn::attention::head_gemm;
use crate::{EngineError, Result};

/// The memory updater.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Updater {
    /// A GRU cell, PyTorch's gate order (reset, update, new): TGN.
    Gru,
    /// A tanh RNN cell: JODIE.
    Rnn,
}

/// The embedding module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Embedding {
    /// One graph-attention layer over the most recent temporal neighbours: TGN.
    Attention,
    /// JODIE's time projection of the memory, `s * (1 + dt w_p)`; the embedding is as wide as
    /// the memory.
    TimeProjection,
}

/// The shape of a [`Tgn`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TgnConfig {
    /// Memory width per node.
    pub memory: usize,
    /// Time-encoding width.
    pub time: usize,
    /// Edge-feature width (0 when the events have none).
    pub edge: usize,
    /// Embedding width (attention); the time projection's is `memory`.
    pub embedding: usize,
    /// Attention heads (dividing `embedding`).
    pub heads: usize,
    /// Temporal neighbours per target (attention).
    pub neighbors: usize,
    /// The memory updater.
    pub updater: Updater,
    /// The embedding module.
    pub embed: Embedding,
}

/// A weight block of a linear layer in the flat parameters: `oc` rows of `ld` columns at `w`
/// (row-major), and a bias of `oc` at `b`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Lin {
    w: usize,
    b: Option<usize>,
    oc: usize,
    ld: usize,
}

/// Offsets of every tensor in the flat parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    time: Lin,
    /// Input and hidden weights of the updater, `gates * memory` rows.
    upd_i: Lin,
    upd_h: Lin,
    gates: usize,
    q: Lin,
    k: Lin,
    v: Lin,
    e: Lin,
    skip: Lin,
    proj: Lin,
    src: Lin,
    dst: Lin,
    fin: Lin,
    len: usize,
}

impl TgnConfig {
    /// Width of a message: both memories, the edge features and the time encoding.
    pub fn message(&self) -> usize {
        2 * self.memory + self.edge + self.time
    }

    /// Width of the embedding the link predictor reads.
    pub fn embed_width(&self) -> usize {
        match self.embed {
            Embedding::Attention => self.embedding,
            Embedding::TimeProjection => self.memory,
        }
    }

    /// Neighbour slots per target row (0 for the time projection, which reads none).
    pub fn slots(&self) -> usize {
        match self.embed {
            Embedding::Attention => self.neighbors,
            Embedding::TimeProjection => 0,
        }
    }

    /// Checks the widths.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(EngineError::Config(what));
        if self.memory == 0 || self.time == 0 {
            return bad(format!(
                "a TGN needs a memory and a time encoding (memory {}, time {})",
                self.memory, self.time
            ));
        }
        if self.embed == Embedding::Attention
            && (self.embedding == 0
                || self.heads == 0
                || self.neighbors == 0
                || !self.embedding.is_multiple_of(self.heads))
        {
            return bad(format!(
                "graph attention needs neighbours and heads dividing the embedding width \
                 (embedding {}, heads {}, neighbours {})",
                self.embedding, self.heads, self.neighbors
            ));
        }
        Ok(())
    }

    fn layout(&self) -> Layout {
        let mut at = 0;
        let mut lin = |oc: usize, ld: usize, bias: bool| {
            let w = at;
            at += oc * ld;
            let b = bias.then(|| {
                at += oc;
                at - oc
            });
            Lin { w, b, oc, ld }
        };
        let (m, d) = (self.memory, self.embed_width());
        let gates = match self.updater {
            Updater::Gru => 3,
            Updater::Rnn => 1,
        };
        let time = lin(self.time, 1, true);
        let upd_i = lin(gates * m, self.message(), true);
        let upd_h = lin(gates * m, m, true);
        let none = Lin {
            w: 0,
            b: None,
            oc: 0,
            ld: 0,
        };
        let (q, k, v, e, skip, proj) = match self.embed {
            Embedding::Attention => (
                lin(d, m, true),
                lin(d, m, true),
                lin(d, m, true),
                lin(d, self.time + self.edge, false),
                lin(d, m, true),
                none,
            ),
            Embedding::TimeProjection => (none, none, none, none, none, lin(m, 1, false)),
        };
        let src = lin(d, d, true);
        let dst = lin(d, d, true);
        let fin = lin(1, d, true);
        Layout {
            time,
            upd_i,
            upd_h,
            gates,
            q,
            k,
            v,
            e,
            skip,
            proj,
            src,
            dst,
            fin,
            len: at,
        }
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        self.layout().len
    }

    /// Every tensor of the flat parameters under PyTorch Geometric's names for the same
    /// modules (`memory.gru.weight_ih`, `gnn.conv.lin_query.weight`, `link_pred.lin_src.bias`,
    /// ...), in the order of the buffer.
    pub fn tensors(&self) -> Vec<Named> {
        let l = self.layout();
        let cell = match self.updater {
            Updater::Gru => "memory.gru",
            Updater::Rnn => "memory.rnn",
        };
        let mut out = Vec::new();
        let mut push = |name: String, lin: Lin, weight: &str, bias: &str| {
            if lin.oc == 0 {
                return;
            }
            out.push(Named::new(
                format!("{name}.{weight}"),
                lin.w,
                &[lin.oc, lin.ld],
            ));
            if let Some(b) = lin.b {
                out.push(Named::new(format!("{name}.{bias}"), b, &[lin.oc]));
            }
        };
        push("memory.time_enc.lin".into(), l.time, "weight", "bias");
        push(cell.into(), l.upd_i, "weight_ih", "bias_ih");
        push(cell.into(), l.upd_h, "weight_hh", "bias_hh");
        for (name, lin) in [
            ("lin_query", l.q),
            ("lin_key", l.k),
            ("lin_value", l.v),
            ("lin_edge", l.e),
            ("lin_skip", l.skip),
        ] {
            push(format!("gnn.conv.{name}"), lin, "weight", "bias");
        }
        push("embedding.time_proj".into(), l.proj, "weight", "bias");
        for (name, lin) in [("lin_src", l.src), ("lin_dst", l.dst), ("lin_final", l.fin)] {
            push(format!("link_pred.{name}"), lin, "weight", "bias");
        }
        out
    }

    /// Weight-decay ranges: the weight matrices decay, biases and the time encoding do not.
    pub fn decay_ranges(&self) -> Vec<(usize, usize, bool)> {
        let l = self.layout();
        let mut r = Vec::new();
        for lin in [
            l.time, l.upd_i, l.upd_h, l.q, l.k, l.v, l.e, l.skip, l.proj, l.src, l.dst, l.fin,
        ] {
            if lin.oc == 0 {
                continue;
            }
            let decays = lin.w != l.time.w && lin.w != l.proj.w;
            r.push((lin.w, lin.oc * lin.ld, decays));
            if let Some(b) = lin.b {
                r.push((b, lin.oc, false));
            }
        }
        r.sort_unstable();
        r
    }

    /// Parameters drawn from `seed`: PyTorch's defaults (uniform in +-1/sqrt(fan-in); the GRU's
    /// +-1/sqrt(memory)), the time encoding's frequencies `10^(-9 k / (d - 1))` with zero phase
    /// (TGN's), the time projection normal with deviation 1/sqrt(memory).
    pub fn init(&self, seed: u64) -> Vec<f32> {
        let l = self.layout();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut p = vec![0.0f32; l.len];
        let fill = |p: &mut [f32], lin: Lin, bound: f32, rng: &mut rand::rngs::StdRng| {
            for x in &mut p[lin.w..lin.w + lin.oc * lin.ld] {
                *x = rng.random_range(-bound..bound);
            }
            if let Some(b) = lin.b {
                for x in &mut p[b..b + lin.oc] {
                    *x = rng.random_range(-bound..bound);
                }
            }
        };
        let dt = self.time;
        for k in 0..dt {
            let e = if dt > 1 {
                -9.0 * k as f64 / (dt - 1) as f64
            } else {
                0.0
            };
            p[l.time.w + k] = 10f64.powf(e) as f32;
        }
        let hidden = 1.0 / (self.memory as f32).sqrt();
        fill(&mut p, l.upd_i, hidden, &mut rng);
        fill(&mut p, l.upd_h, hidden, &mut rng);
        for lin in [l.q, l.k, l.v, l.e, l.skip, l.src, l.dst, l.fin] {
            if lin.oc > 0 {
                fill(&mut p, lin, 1.0 / (lin.ld as f32).sqrt(), &mut rng);
            }
        }
        if l.proj.oc > 0 {
            let n = rand_distr_normal(&mut rng, l.proj.oc);
            for (x, z) in p[l.proj.w..l.proj.w + l.proj.oc].iter_mut().zip(n) {
                *x = z * hidden;
            }
        }
        p
    }
}

/// `n` standard normal draws (Box-Muller).
fn rand_distr_normal(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1: f64 = rng.random_range(f64::EPSILON..1.0);
            let u2: f64 = rng.random_range(0.0..1.0);
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
        })
        .collect()
}

/// PRES's prediction for the updated rows, and the coherence weights.
#[derive(Clone, Copy, Debug)]
pub struct Correction<'a> {
    /// `s_hat = s_old + mean transition`, `updated x memory`.
    pub predicted: &'a [f32],
    /// The weight of the prediction.
    pub gamma: f32,
}

/// What one temporal batch reads, prepared by the caller. Row indices name rows of the batch's
/// node table (`nodes` rows: the `updated` nodes with a pending message first).
#[derive(Clone, Copy, Debug)]
pub struct TgnBatch<'a> {
    /// Events (positive pairs, each with one negative pair).
    pub events: usize,
    /// Rows of the node table.
    pub nodes: usize,
    /// Leading rows of the node table with a pending message.
    pub updated: usize,
    /// The stored memory of every node of the table, `nodes x memory`.
    pub memory: &'a [f32],
    /// Per updated row, the memory of the pending message's other endpoint, `updated x memory`.
    pub msg_other: &'a [f32],
    /// Per updated row, the pending message's edge features, `updated x edge`.
    pub msg_edge: &'a [f32],
    /// Per updated row, the message's time minus the node's last update.
    pub msg_dt: &'a [f32],
    /// PRES prediction-correction, when on.
    pub correction: Option<Correction<'a>>,
    /// Per updated row, its weight in the coherence term (empty: no term).
    pub coherence: &'a [f32],
    /// Per target row (an embedding to compute: one per node at a time), its row in the node
    /// table.
    pub target: &'a [i32],
    /// Per pair, the target row of its source: the `events` positive pairs, then the `events`
    /// negative ones.
    pub pair_src: &'a [i32],
    /// Per pair, the target row of its destination (positive pairs) or negative destination.
    pub pair_dst: &'a [i32],
    /// Per target row, the event time minus the node's last update (the time projection).
    pub target_dt: &'a [f32],
    /// Per target row and neighbour slot: the neighbour's row in the node table (any row when
    /// the slot is empty).
    pub nbr: &'a [i32],
    /// The distinct edge times of the slots: the neighbour's last update (with its pending
    /// message applied) minus the neighbour event's time (PyG's `TransformerConv` edge time,
    /// `last_update[j] - t_e`). Each is encoded once.
    pub times: &'a [f32],
    /// Per slot, its edge time's index in `times`.
    pub nbr_time: &'a [i32],
    /// Per slot, the neighbour event's edge features, `slots x edge`.
    pub nbr_edge: &'a [f32],
    /// Per slot, 1 when it holds a neighbour, 0 when empty.
    pub nbr_mask: &'a [f32],
    /// Gradient scale of each pair's loss (`1 / events` for PyG's mean over positives plus mean
    /// over negatives).
    pub loss_scale: f32,
}

/// What a forward pass gives the caller.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TgnOutput {
    /// Link-prediction loss (scaled as asked), plus the coherence term.
    pub loss: f64,
    /// The coherence term alone.
    pub coherence: f64,
    /// Logits of the positive pairs, then of the negative ones.
    pub logits: Vec<f32>,
    /// The new memory of the updated rows (`updated x memory`): what the caller commits.
    pub memory: Vec<f32>,
    /// The updater's output for the updated rows (before the correction): the observed
    /// transition is `computed - old`.
    pub computed: Vec<f32>,
}

/// The activations of one batch, kept for backward.
struct Acts<B: Backend> {
    b: usize,
    u: usize,
    up: usize,
    nt: usize,
    slots: usize,
    nu: usize,
    memory_old: B::Buf,
    msg_other: B::Buf,
    msg_edge: B::Buf,
    msg_dt: B::Buf,
    msg_phi_pre: B::Buf,
    msg_phi: B::Buf,
    /// Per gate: input part, hidden part (GRU: r, z, n).
    gh: Vec<B::Buf>,
    /// GRU: pre-activations and activations of r and z, r * gh_n, the n pre-activation and n.
    r_pre: B::Buf,
    r: B::Buf,
    z_pre: B::Buf,
    z: B::Buf,
    n_pre: B::Buf,
    h_minus_n: B::Buf,
    one_minus_gamma: Option<B::Buf>,
    up_ids: B::Ids,
    target: B::Ids,
    x_t: B::Buf,
    // attention
    nbr: B::Ids,
    table: B::Buf,
    times: B::Buf,
    nbr_time: B::Ids,
    nbr_phi_pre: B::Buf,
    nbr_phi: B::Buf,
    nbr_edge: B::Buf,
    q: B::Buf,
    kp: B::Buf,
    vp: B::Buf,
    mask: B::Buf,
    probs: B::Buf,
    probs_m: B::Buf,
    // time projection
    target_dt: B::Buf,
    proj: B::Buf,
    // link prediction
    pair_ids: B::Ids,
    other_ids: B::Ids,
    other: B::Buf,
    z_src2: B::Buf,
    pre: B::Buf,
    h: B::Buf,
    logit_ids: B::Ids,
    logits2: B::Buf,
    coherence_grad: Option<Vec<f32>>,
}

/// A TGN or JODIE on a backend: parameters, gradients and the last batch's activations.
pub struct Tgn<B: Backend> {
    /// The shape.
    pub config: TgnConfig,
    /// Parameters and gradients.
    pub params: Params<B>,
    layout: Layout,
    ones: B::Buf,
    acts: Option<Acts<B>>,
}

impl<B: Backend> Net<B> for Tgn<B> {
    fn params(&self) -> &Params<B> {
        &self.params
    }
    fn buffers(&mut self) -> (&mut B::Buf, &mut B::Buf) {
        (&mut self.params.values, &mut self.params.grads)
    }
}

/// `out (n x lin.oc) (beta: +)= inp[:, ..c] W[:, col..col + c]^T` (+ bias when `bias`).
#[allow(clippy::too_many_arguments)]
fn lin_fwd<B: Backend>(
    be: &B,
    lin: Lin,
    p: &B::Buf,
    out: &mut B::Buf,
    inp: &B::Buf,
    n: usize,
    col: usize,
    c: usize,
    beta: f32,
    bias: bool,
) -> Result<()> {
    if n == 0 || c == 0 {
        return Ok(());
    }
    let g = Gemm {
        ta: Op::T,
        tb: Op::N,
        m: lin.oc,
        n,
        k: c,
        alpha: 1.0,
        lda: lin.ld,
        stride_a: 0,
        ldb: c,
        stride_b: 0,
        beta,
        ldc: lin.oc,
        stride_c: 0,
        batch: 1,
    };
    be.gemm(&g, (p, lin.w + col), (inp, 0), (out, 0))?;
    if bias && let Some(b) = lin.b {
        be.launch(Kernel::AddRow {
            out,
            row: (p, b),
            n,
            width: lin.oc,
        })?;
    }
    Ok(())
}

/// `dinp (n x c) (beta: +)= dout W[:, col..col + c]`.
#[allow(clippy::too_many_arguments)]
fn lin_bwd_input<B: Backend>(
    be: &B,
    lin: Lin,
    p: &B::Buf,
    dinp: &mut B::Buf,
    dout: &B::Buf,
    n: usize,
    col: usize,
    c: usize,
    beta: f32,
) -> Result<()> {
    if n == 0 || c == 0 {
        return Ok(());
    }
    let g = Gemm {
        ta: Op::N,
        tb: Op::N,
        m: c,
        n,
        k: lin.oc,
        alpha: 1.0,
        lda: lin.ld,
        stride_a: 0,
        ldb: lin.oc,
        stride_b: 0,
        beta,
        ldc: c,
        stride_c: 0,
        batch: 1,
    };
    be.gemm(&g, (p, lin.w + col), (dout, 0), (dinp, 0))
}

/// `dW[:, col..col + c] += dout^T inp` (and the bias gradient when `bias`).
#[allow(clippy::too_many_arguments)]
fn lin_bwd_weight<B: Backend>(
    be: &B,
    lin: Lin,
    g_buf: &mut B::Buf,
    dout: &B::Buf,
    inp: &B::Buf,
    n: usize,
    col: usize,
    c: usize,
    bias: bool,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    if c > 0 {
        let g = Gemm {
            ta: Op::N,
            tb: Op::T,
            m: c,
            n: lin.oc,
            k: n,
            alpha: 1.0,
            lda: c,
            stride_a: 0,
            ldb: lin.oc,
            stride_b: 0,
            beta: 1.0,
            ldc: lin.ld,
            stride_c: 0,
            batch: 1,
        };
        be.gemm(&g, (inp, 0), (dout, 0), (g_buf, lin.w + col))?;
    }
    if bias && let Some(b) = lin.b {
        be.launch(Kernel::SumRows {
            dst: (g_buf, b),
            src: dout,
            n,
            width: lin.oc,
        })?;
    }
    Ok(())
}

/// The gate `g` of a stacked weight: `oc` rows starting at row `g * oc`.
fn gate(lin: Lin, g: usize, oc: usize) -> Lin {
    Lin {
        w: lin.w + g * oc * lin.ld,
        b: lin.b.map(|b| b + g * oc),
        oc,
        ld: lin.ld,
    }
}

fn binary<B: Backend>(
    be: &B,
    op: BinaryOp,
    out: &mut B::Buf,
    a: &B::Buf,
    b: &B::Buf,
    n: usize,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    be.launch(Kernel::Binary { op, out, a, b, n })
}

fn upload<B: Backend>(be: &B, host: &[f32]) -> Result<B::Buf> {
    let mut b = be.zeros(host.len().max(1))?;
    if !host.is_empty() {
        be.upload(&mut b, host)?;
    }
    Ok(b)
}

fn upload_ids<B: Backend>(be: &B, host: &[i32]) -> Result<B::Ids> {
    let mut b = be.ids(host.len().max(1))?;
    if !host.is_empty() {
        be.upload_ids(&mut b, host)?;
    }
    Ok(b)
}

fn zeros<B: Backend>(be: &B, n: usize) -> Result<B::Buf> {
    be.zeros(n.max(1))
}

fn gather<B: Backend>(
    be: &B,
    out: &mut B::Buf,
    table: &B::Buf,
    rows: usize,
    ids: &B::Ids,
    n: usize,
    width: usize,
) -> Result<()> {
    if n == 0 || width == 0 {
        return Ok(());
    }
    be.launch(Kernel::GatherRows {
        out,
        table: (table, 0),
        table_rows: rows,
        ids,
        n,
        width,
    })
}

fn scatter_add<B: Backend>(
    be: &B,
    table: &mut B::Buf,
    rows: usize,
    ids: &B::Ids,
    src: &B::Buf,
    n: usize,
    width: usize,
) -> Result<()> {
    if n == 0 || width == 0 {
        return Ok(());
    }
    be.launch(Kernel::ScatterAddRows {
        table: (table, 0),
        table_rows: rows,
        ids,
        src,
        n,
        width,
    })
}

/// Per (target, head) `i`: the `slots` dot products `out_i[s] = rows_i[s] . v_i` of the rows
/// (`slots x hc`, head-major) with a vector of `hc` (scores from keys and a query; probability
/// gradients from values and an output gradient).
fn slot_dots(slots: usize, hc: usize, bh: usize) -> Gemm {
    head_gemm(
        Op::T,
        Op::N,
        slots,
        1,
        hc,
        (hc, slots * hc),
        (hc, hc),
        (slots, slots),
        bh,
    )
}

/// Per (target, head) `i`: `out_i = rows_i^T w_i`, the rows (`slots x hc`) weighted by `slots`
/// weights (the attention output from values and probabilities; the query gradient from keys and
/// score gradients).
fn slot_mix(slots: usize, hc: usize, bh: usize) -> Gemm {
    head_gemm(
        Op::N,
        Op::N,
        hc,
        1,
        slots,
        (hc, slots * hc),
        (slots, slots),
        (hc, hc),
        bh,
    )
}

/// Per (target, head) `i`: the outer product `out_i[s] = w_i[s] v_i` (`slots x hc`): the key and
/// value gradients.
fn slot_outer(slots: usize, hc: usize, bh: usize) -> Gemm {
    head_gemm(
        Op::N,
        Op::T,
        hc,
        slots,
        1,
        (hc, hc),
        (slots, slots),
        (hc, slots * hc),
        bh,
    )
}

/// `(n, k, h, c)` and `(n, h, k, c)` both ways.
const SWAP: [usize; 4] = [0, 2, 1, 3];

impl<B: Backend> Tgn<B> {
    /// A TGN of `config` on `be` with parameters `params`.
    pub fn new(be: &B, config: TgnConfig, params: &[f32]) -> Result<Self> {
        config.validate()?;
        let layout = config.layout();
        let cfg = config;
        let params = Params::new(be, params, layout.len, config.decay_ranges(), move |s| {
            cfg.init(s)
        })?;
        let ones = upload(be, &vec![1.0; config.memory])?;
        Ok(Self {
            config,
            params,
            layout,
            ones,
            acts: None,
        })
    }

    fn check(&self, x: &TgnBatch<'_>) -> Result<()> {
        let c = &self.config;
        let (b, u, up, nt, k) = (x.events, x.nodes, x.updated, x.target.len(), c.slots());
        let sizes = [
            ("memory", x.memory.len(), u * c.memory),
            ("msg_other", x.msg_other.len(), up * c.memory),
            ("msg_edge", x.msg_edge.len(), up * c.edge),
            ("msg_dt", x.msg_dt.len(), up),
            ("pair_src", x.pair_src.len(), 2 * b),
            ("pair_dst", x.pair_dst.len(), 2 * b),
            ("target_dt", x.target_dt.len(), nt),
            ("nbr", x.nbr.len(), nt * k),
            ("nbr_time", x.nbr_time.len(), nt * k),
            ("nbr_edge", x.nbr_edge.len(), nt * k * c.edge),
            ("nbr_mask", x.nbr_mask.len(), nt * k),
        ];
        for (what, got, want) in sizes {
            if got != want {
                return Err(EngineError::Config(format!(
                    "TGN batch: {what} holds {got} values, the batch needs {want}"
                )));
            }
        }
        if b == 0 || up > u {
            return Err(EngineError::Config(format!(
                "TGN batch: {b} events, {up} updated of {u} nodes"
            )));
        }
        if let Some(cr) = x.correction
            && cr.predicted.len() != up * c.memory
        {
            return Err(EngineError::Config(format!(
                "TGN batch: the prediction holds {} values, the batch needs {}",
                cr.predicted.len(),
                up * c.memory
            )));
        }
        if !x.coherence.is_empty() && x.coherence.len() != up {
            return Err(EngineError::Config(format!(
                "TGN batch: {} coherence weights for {up} updated rows",
                x.coherence.len()
            )));
        }
        Ok(())
    }

    /// The forward pass of one batch; keeps what [`Tgn::backward`] needs.
    pub fn forward(&mut self, be: &B, x: &TgnBatch<'_>) -> Result<TgnOutput> {
        self.check(x)?;
        let c = self.config;
        let l = self.layout;
        let p = &self.params.values;
        let (m, t, e) = (c.memory, c.time, c.edge);
        let (b, u, up, nt, slots) = (x.events, x.nodes, x.updated, x.target.len(), c.slots());
        let ns = nt * slots;

        // 1. The memory update of the nodes with a pending message.
        let memory_old = upload(be, x.memory)?;
        let msg_other = upload(be, x.msg_other)?;
        let msg_edge = upload(be, x.msg_edge)?;
        let msg_dt = upload(be, x.msg_dt)?;
        let mut msg_phi_pre = zeros(be, up * t)?;
        lin_fwd(
            be,
            l.time,
            p,
            &mut msg_phi_pre,
            &msg_dt,
            up,
            0,
            1,
            0.0,
            true,
        )?;
        let mut msg_phi = zeros(be, up * t)?;
        activation_fwd(be, UnaryOp::Cos, &mut msg_phi, &msg_phi_pre, up * t)?;
        let mut gi = Vec::new();
        let mut gh = Vec::new();
        for g in 0..l.gates {
            let wi = gate(l.upd_i, g, m);
            let mut o = zeros(be, up * m)?;
            lin_fwd(be, wi, p, &mut o, &memory_old, up, 0, m, 0.0, false)?;
            lin_fwd(be, wi, p, &mut o, &msg_other, up, m, m, 1.0, false)?;
            lin_fwd(be, wi, p, &mut o, &msg_edge, up, 2 * m, e, 1.0, false)?;
            lin_fwd(be, wi, p, &mut o, &msg_phi, up, 2 * m + e, t, 1.0, true)?;
            gi.push(o);
            let mut h = zeros(be, up * m)?;
            lin_fwd(
                be,
                gate(l.upd_h, g, m),
                p,
                &mut h,
                &memory_old,
                up,
                0,
                m,
                0.0,
                true,
            )?;
            gh.push(h);
        }
        let n_up = up * m;
        let mut r_pre = zeros(be, n_up)?;
        let mut r = zeros(be, n_up)?;
        let mut z_pre = zeros(be, n_up)?;
        let mut z = zeros(be, n_up)?;
        let mut rgh = zeros(be, n_up)?;
        let mut n_pre = zeros(be, n_up)?;
        let mut n = zeros(be, n_up)?;
        let mut h_minus_n = zeros(be, n_up)?;
        let mut computed = zeros(be, n_up)?;
        match c.updater {
            Updater::Gru => {
                binary(be, BinaryOp::Add, &mut r_pre, &gi[0], &gh[0], n_up)?;
                activation_fwd(be, UnaryOp::Sigmoid, &mut r, &r_pre, n_up)?;
                binary(be, BinaryOp::Add, &mut z_pre, &gi[1], &gh[1], n_up)?;
                activation_fwd(be, UnaryOp::Sigmoid, &mut z, &z_pre, n_up)?;
                binary(be, BinaryOp::Mul, &mut rgh, &r, &gh[2], n_up)?;
                binary(be, BinaryOp::Add, &mut n_pre, &gi[2], &rgh, n_up)?;
                activation_fwd(be, UnaryOp::Tanh, &mut n, &n_pre, n_up)?;
                // h' = n + z * (h - n)
                binary(be, BinaryOp::Sub, &mut h_minus_n, &memory_old, &n, n_up)?;
                let mut zhn = zeros(be, n_up)?;
                binary(be, BinaryOp::Mul, &mut zhn, &z, &h_minus_n, n_up)?;
                binary(be, BinaryOp::Add, &mut computed, &n, &zhn, n_up)?;
            }
            Updater::Rnn => {
                binary(be, BinaryOp::Add, &mut n_pre, &gi[0], &gh[0], n_up)?;
                activation_fwd(be, UnaryOp::Tanh, &mut computed, &n_pre, n_up)?;
            }
        }

        // 2. PRES prediction-correction.
        let (s_new, one_minus_gamma) = match x.correction {
            Some(cr) => {
                let scaled: Vec<f32> = cr.predicted.iter().map(|v| cr.gamma * v).collect();
                let gs_hat = upload(be, &scaled)?;
                let omg = upload(be, &vec![1.0 - cr.gamma; n_up])?;
                let mut part = zeros(be, n_up)?;
                binary(be, BinaryOp::Mul, &mut part, &omg, &computed, n_up)?;
                let mut s = zeros(be, n_up)?;
                binary(be, BinaryOp::Add, &mut s, &gs_hat, &part, n_up)?;
                (s, Some(omg))
            }
            None => {
                let mut s = zeros(be, n_up)?;
                binary(
                    be,
                    BinaryOp::Add,
                    &mut s,
                    &computed,
                    &zeros(be, n_up)?,
                    n_up,
                )?;
                (s, None)
            }
        };

        // The batch's node table: the new memory of the updated rows, the stored one elsewhere.
        let mut table = zeros(be, u * m)?;
        if u > up {
            be.upload_at(&mut table, up * m, &x.memory[up * m..])?;
        }
        let up_ids = upload_ids(be, &(0..up as i32).collect::<Vec<_>>())?;
        scatter_add(be, &mut table, u, &up_ids, &s_new, up, m)?;

        // 3. Embeddings of the target rows.
        let target = upload_ids(be, x.target)?;
        let mut x_t = zeros(be, nt * m)?;
        gather(be, &mut x_t, &table, u, &target, nt, m)?;
        let dw = c.embed_width();
        let mut z_emb = zeros(be, nt * dw)?;
        let nbr = upload_ids(be, x.nbr)?;
        let nu = x.times.len();
        let times = upload(be, x.times)?;
        let nbr_time = upload_ids(be, x.nbr_time)?;
        let mut nbr_phi_pre = zeros(be, nu * t)?;
        let mut nbr_phi = zeros(be, nu * t)?;
        let nbr_edge = upload(be, x.nbr_edge)?;
        let mut ea = zeros(be, ns * dw)?;
        let mut q = zeros(be, nt * dw)?;
        let mut k = zeros(be, ns * dw)?;
        let mut v = zeros(be, ns * dw)?;
        let mut kp = zeros(be, ns * dw)?;
        let mut vp = zeros(be, ns * dw)?;
        let heads = c.heads.max(1);
        let hc = dw / heads;
        let mut scores = zeros(be, nt * heads * slots)?;
        let bias_host: Vec<f32> = (0..nt * heads * slots)
            .map(|i| {
                let (row, s) = (i / (heads * slots), i % slots);
                if x.nbr_mask.get(row * slots + s).copied().unwrap_or(0.0) > 0.0 {
                    0.0
                } else {
                    -1e9
                }
            })
            .collect();
        let bias = upload(be, &bias_host)?;
        let mask_host: Vec<f32> = bias_host
            .iter()
            .map(|&b| if b == 0.0 { 1.0 } else { 0.0 })
            .collect();
        let mask = upload(be, &mask_host)?;
        let mut probs = zeros(be, nt * heads * slots)?;
        let mut probs_m = zeros(be, nt * heads * slots)?;
        let mut att = zeros(be, nt * dw)?;
        let target_dt = upload(be, x.target_dt)?;
        let mut proj = zeros(be, nt * m)?;
        match c.embed {
            Embedding::Attention => {
                lin_fwd(be, l.time, p, &mut nbr_phi_pre, &times, nu, 0, 1, 0.0, true)?;
                activation_fwd(be, UnaryOp::Cos, &mut nbr_phi, &nbr_phi_pre, nu * t)?;
                // Each distinct time encoded and projected once, gathered per slot.
                let mut ea_u = zeros(be, nu * dw)?;
                lin_fwd(be, l.e, p, &mut ea_u, &nbr_phi, nu, 0, t, 0.0, false)?;
                gather(be, &mut ea, &ea_u, nu, &nbr_time, ns, dw)?;
                lin_fwd(be, l.e, p, &mut ea, &nbr_edge, ns, t, e, 1.0, false)?;
                lin_fwd(be, l.q, p, &mut q, &x_t, nt, 0, m, 0.0, true)?;
                // Keys and values: each node's projection once (as PyG's TransformerConv
                // projects every node), gathered per slot, plus the slot's edge projection.
                let mut kx_u = zeros(be, u * dw)?;
                let mut kx = zeros(be, ns * dw)?;
                lin_fwd(be, l.k, p, &mut kx_u, &table, u, 0, m, 0.0, true)?;
                gather(be, &mut kx, &kx_u, u, &nbr, ns, dw)?;
                binary(be, BinaryOp::Add, &mut k, &kx, &ea, ns * dw)?;
                lin_fwd(be, l.v, p, &mut kx_u, &table, u, 0, m, 0.0, true)?;
                gather(be, &mut kx, &kx_u, u, &nbr, ns, dw)?;
                binary(be, BinaryOp::Add, &mut v, &kx, &ea, ns * dw)?;
                let shape = [nt, slots, heads, hc];
                be.launch(Kernel::Permute {
                    out: &mut kp,
                    inp: &k,
                    shape: &shape,
                    perm: &SWAP,
                })?;
                be.launch(Kernel::Permute {
                    out: &mut vp,
                    inp: &v,
                    shape: &shape,
                    perm: &SWAP,
                })?;
                let bh = nt * heads;
                // scores[(i,h), s] = k[(i,h), s, :] . q[(i,h), :]
                let g = slot_dots(slots, hc, bh);
                be.gemm(&g, (&kp, 0), (&q, 0), (&mut scores, 0))?;
                let mut biased = zeros(be, bh * slots)?;
                binary(be, BinaryOp::Add, &mut biased, &scores, &bias, bh * slots)?;
                be.launch(Kernel::Softmax {
                    out: &mut probs,
                    inp: &biased,
                    rows: bh,
                    width: slots,
                    scale: 1.0 / (hc as f32).sqrt(),
                    mask: Mask::Full,
                })?;
                binary(be, BinaryOp::Mul, &mut probs_m, &probs, &mask, bh * slots)?;
                // att[(i,h), :] = v[(i,h), :, :]^T p[(i,h), :]
                let g = slot_mix(slots, hc, bh);
                be.gemm(&g, (&vp, 0), (&probs_m, 0), (&mut att, 0))?;
                let mut skip = zeros(be, nt * dw)?;
                lin_fwd(be, l.skip, p, &mut skip, &x_t, nt, 0, m, 0.0, true)?;
                binary(be, BinaryOp::Add, &mut z_emb, &att, &skip, nt * dw)?;
            }
            Embedding::TimeProjection => {
                // proj = 1 + dt w_p
                lin_fwd(be, l.proj, p, &mut proj, &target_dt, nt, 0, 1, 0.0, false)?;
                be.launch(Kernel::AddRow {
                    out: &mut proj,
                    row: (&self.ones, 0),
                    n: nt,
                    width: m,
                })?;
                binary(be, BinaryOp::Mul, &mut z_emb, &x_t, &proj, nt * m)?;
            }
        }

        // 4. Link prediction over the positive then the negative pairs.
        let pair_ids = upload_ids(be, x.pair_src)?;
        let mut z_src2 = zeros(be, 2 * b * dw)?;
        gather(be, &mut z_src2, &z_emb, nt, &pair_ids, 2 * b, dw)?;
        let mut hs = zeros(be, 2 * b * dw)?;
        lin_fwd(be, l.src, p, &mut hs, &z_src2, 2 * b, 0, dw, 0.0, true)?;
        let other_ids = upload_ids(be, x.pair_dst)?;
        let mut other = zeros(be, 2 * b * dw)?;
        gather(be, &mut other, &z_emb, nt, &other_ids, 2 * b, dw)?;
        let mut hd = zeros(be, 2 * b * dw)?;
        lin_fwd(be, l.dst, p, &mut hd, &other, 2 * b, 0, dw, 0.0, true)?;
        let mut pre = zeros(be, 2 * b * dw)?;
        binary(be, BinaryOp::Add, &mut pre, &hs, &hd, 2 * b * dw)?;
        let mut h = zeros(be, 2 * b * dw)?;
        activation_fwd(be, UnaryOp::Relu, &mut h, &pre, 2 * b * dw)?;
        let mut logit = zeros(be, 2 * b)?;
        lin_fwd(be, l.fin, p, &mut logit, &h, 2 * b, 0, dw, 0.0, true)?;
        let logit_host = be.download(&logit, 0, 2 * b)?;
        let logit_ids = upload_ids(
            be,
            &(0..2 * b).map(|i| 2 * i as i32 + 1).collect::<Vec<_>>(),
        )?;
        let mut logits2 = zeros(be, 4 * b)?;
        scatter_add(be, &mut logits2, 4 * b, &logit_ids, &logit, 2 * b, 1)?;
        let labels = upload_ids(
            be,
            &(0..2 * b).map(|i| i32::from(i < b)).collect::<Vec<_>>(),
        )?;
        let mut losses = zeros(be, 2 * b)?;
        be.launch(Kernel::CrossEntropy {
            losses: &mut losses,
            logits: &mut logits2,
            targets: &labels,
            n: 2 * b,
            v: 2,
            vp: 2,
            grad: Some(x.loss_scale),
        })?;
        let link: f64 = be
            .download(&losses, 0, 2 * b)?
            .iter()
            .map(|&v| f64::from(v))
            .sum();

        // 5. Memory coherence, on the host.
        let s_new_host = be.download(&s_new, 0, n_up)?;
        let computed_host = be.download(&computed, 0, n_up)?;
        let (coh, coh_grad) = if x.coherence.is_empty() {
            (0.0, None)
        } else {
            let (v, g) = coherence(&s_new_host, &x.memory[..n_up], x.coherence, m);
            (v, Some(g))
        };
        let loss = link * f64::from(x.loss_scale) + coh;
        self.acts = Some(Acts {
            b,
            u,
            up,
            nt,
            slots,
            nu,
            memory_old,
            msg_other,
            msg_edge,
            msg_dt,
            msg_phi_pre,
            msg_phi,
            gh,
            r_pre,
            r,
            z_pre,
            z,
            n_pre,
            h_minus_n,
            one_minus_gamma,
            up_ids,
            target,
            x_t,
            nbr,
            table,
            times,
            nbr_time,
            nbr_phi_pre,
            nbr_phi,
            nbr_edge,
            q,
            kp,
            vp,
            mask,
            probs,
            probs_m,
            target_dt,
            proj,
            pair_ids,
            other_ids,
            other,
            z_src2,
            pre,
            h,
            logit_ids,
            logits2,
            coherence_grad: coh_grad,
        });
        Ok(TgnOutput {
            loss,
            coherence: coh,
            logits: logit_host,
            memory: s_new_host,
            computed: computed_host,
        })
    }

    /// Backward of the last [`Tgn::forward`]: accumulates the parameter gradients.
    pub fn backward(&mut self, be: &B) -> Result<()> {
        let Some(a) = self.acts.take() else {
            return Err(EngineError::Config(
                "TGN backward without a forward pass".into(),
            ));
        };
        let c = self.config;
        let l = self.layout;
        let (p, gr) = (&self.params.values, &mut self.params.grads);
        let (m, t, e) = (c.memory, c.time, c.edge);
        let (b, u, up, nt, slots) = (a.b, a.u, a.up, a.nt, a.slots);
        let ns = nt * slots;
        let dw = c.embed_width();
        let n_up = up * m;

        // 4. Link prediction.
        let mut dlogit = zeros(be, 2 * b)?;
        gather(be, &mut dlogit, &a.logits2, 4 * b, &a.logit_ids, 2 * b, 1)?;
        lin_bwd_weight(be, l.fin, gr, &dlogit, &a.h, 2 * b, 0, dw, true)?;
        let mut dh = zeros(be, 2 * b * dw)?;
        lin_bwd_input(be, l.fin, p, &mut dh, &dlogit, 2 * b, 0, dw, 0.0)?;
        let mut dpre = zeros(be, 2 * b * dw)?;
        activation_bwd(be, UnaryOp::Relu, &mut dpre, &a.pre, &dh, 2 * b * dw)?;
        let other = &a.other;
        lin_bwd_weight(be, l.src, gr, &dpre, &a.z_src2, 2 * b, 0, dw, true)?;
        lin_bwd_weight(be, l.dst, gr, &dpre, other, 2 * b, 0, dw, true)?;
        let mut dz_src2 = zeros(be, 2 * b * dw)?;
        lin_bwd_input(be, l.src, p, &mut dz_src2, &dpre, 2 * b, 0, dw, 0.0)?;
        let mut dother = zeros(be, 2 * b * dw)?;
        lin_bwd_input(be, l.dst, p, &mut dother, &dpre, 2 * b, 0, dw, 0.0)?;
        let mut dz = zeros(be, nt * dw)?;
        scatter_add(be, &mut dz, nt, &a.pair_ids, &dz_src2, 2 * b, dw)?;
        scatter_add(be, &mut dz, nt, &a.other_ids, &dother, 2 * b, dw)?;

        // 3. Embedding: gradients of the target rows' and the neighbours' memory.
        let mut dx_t = zeros(be, nt * m)?;
        let mut dtable = zeros(be, u * m)?;
        match c.embed {
            Embedding::Attention => {
                let heads = c.heads.max(1);
                let hc = dw / heads;
                let bh = nt * heads;
                // skip
                lin_bwd_weight(be, l.skip, gr, &dz, &a.x_t, nt, 0, m, true)?;
                lin_bwd_input(be, l.skip, p, &mut dx_t, &dz, nt, 0, m, 0.0)?;
                // att = V^T p: dp = V datt, dV = p datt^T
                let mut dprobs_m = zeros(be, bh * slots)?;
                let g = slot_dots(slots, hc, bh);
                be.gemm(&g, (&a.vp, 0), (&dz, 0), (&mut dprobs_m, 0))?;
                let mut dvp = zeros(be, ns * dw)?;
                let g = slot_outer(slots, hc, bh);
                be.gemm(&g, (&dz, 0), (&a.probs_m, 0), (&mut dvp, 0))?;
                let mut dprobs = zeros(be, bh * slots)?;
                binary(
                    be,
                    BinaryOp::Mul,
                    &mut dprobs,
                    &dprobs_m,
                    &a.mask,
                    bh * slots,
                )?;
                let mut dscores = zeros(be, bh * slots)?;
                be.launch(Kernel::SoftmaxBwd {
                    dinp: &mut dscores,
                    dout: &dprobs,
                    out: &a.probs,
                    rows: bh,
                    width: slots,
                    scale: 1.0 / (hc as f32).sqrt(),
                    mask: Mask::Full,
                })?;
                // scores = K q: dq = K^T dscores, dK = q dscores^T
                let mut dq = zeros(be, nt * dw)?;
                let g = slot_mix(slots, hc, bh);
                be.gemm(&g, (&a.kp, 0), (&dscores, 0), (&mut dq, 0))?;
                let mut dkp = zeros(be, ns * dw)?;
                let g = slot_outer(slots, hc, bh);
                be.gemm(&g, (&a.q, 0), (&dscores, 0), (&mut dkp, 0))?;
                let shape = [nt, heads, slots, hc];
                let mut dk = zeros(be, ns * dw)?;
                let mut dv = zeros(be, ns * dw)?;
                be.launch(Kernel::Permute {
                    out: &mut dk,
                    inp: &dkp,
                    shape: &shape,
                    perm: &SWAP,
                })?;
                be.launch(Kernel::Permute {
                    out: &mut dv,
                    inp: &dvp,
                    shape: &shape,
                    perm: &SWAP,
                })?;
                // q
                lin_bwd_weight(be, l.q, gr, &dq, &a.x_t, nt, 0, m, true)?;
                lin_bwd_input(be, l.q, p, &mut dx_t, &dq, nt, 0, m, 1.0)?;
                // k and v from the neighbours' memory
                let mut dkx_u = zeros(be, u * dw)?;
                scatter_add(be, &mut dkx_u, u, &a.nbr, &dk, ns, dw)?;
                lin_bwd_weight(be, l.k, gr, &dkx_u, &a.table, u, 0, m, true)?;
                lin_bwd_input(be, l.k, p, &mut dtable, &dkx_u, u, 0, m, 0.0)?;
                let mut dvx_u = zeros(be, u * dw)?;
                scatter_add(be, &mut dvx_u, u, &a.nbr, &dv, ns, dw)?;
                lin_bwd_weight(be, l.v, gr, &dvx_u, &a.table, u, 0, m, true)?;
                lin_bwd_input(be, l.v, p, &mut dtable, &dvx_u, u, 0, m, 1.0)?;
                // the edge projection feeds both
                let mut dea = zeros(be, ns * dw)?;
                binary(be, BinaryOp::Add, &mut dea, &dk, &dv, ns * dw)?;
                let nu = a.nu;
                let mut dea_u = zeros(be, nu * dw)?;
                scatter_add(be, &mut dea_u, nu, &a.nbr_time, &dea, ns, dw)?;
                lin_bwd_weight(be, l.e, gr, &dea_u, &a.nbr_phi, nu, 0, t, false)?;
                lin_bwd_weight(be, l.e, gr, &dea, &a.nbr_edge, ns, t, e, false)?;
                let mut dphi = zeros(be, nu * t)?;
                lin_bwd_input(be, l.e, p, &mut dphi, &dea_u, nu, 0, t, 0.0)?;
                let mut dphi_pre = zeros(be, nu * t)?;
                activation_bwd(
                    be,
                    UnaryOp::Cos,
                    &mut dphi_pre,
                    &a.nbr_phi_pre,
                    &dphi,
                    nu * t,
                )?;
                lin_bwd_weight(be, l.time, gr, &dphi_pre, &a.times, nu, 0, 1, true)?;
            }
            Embedding::TimeProjection => {
                binary(be, BinaryOp::Mul, &mut dx_t, &dz, &a.proj, nt * m)?;
                let mut dproj = zeros(be, nt * m)?;
                binary(be, BinaryOp::Mul, &mut dproj, &dz, &a.x_t, nt * m)?;
                lin_bwd_weight(be, l.proj, gr, &dproj, &a.target_dt, nt, 0, 1, false)?;
            }
        }
        scatter_add(be, &mut dtable, u, &a.target, &dx_t, nt, m)?;
        if up == 0 {
            return Ok(());
        }
        let mut ds_new = zeros(be, n_up)?;
        gather(be, &mut ds_new, &dtable, u, &a.up_ids, up, m)?;
        if let Some(g) = &a.coherence_grad {
            let gbuf = upload(be, g)?;
            let mut sum = zeros(be, n_up)?;
            binary(be, BinaryOp::Add, &mut sum, &ds_new, &gbuf, n_up)?;
            ds_new = sum;
        }

        // 2. The correction: d computed = (1 - gamma) d s_new.
        let dcomputed = match &a.one_minus_gamma {
            Some(omg) => {
                let mut d = zeros(be, n_up)?;
                binary(be, BinaryOp::Mul, &mut d, omg, &ds_new, n_up)?;
                d
            }
            None => ds_new,
        };

        // 1. The updater; the old memory and the message's memories are constants.
        let mut dgi = Vec::new();
        let mut dgh = Vec::new();
        match c.updater {
            Updater::Gru => {
                // h' = n + z * (h - n): dn = dh' (1 - z), dz = dh' (h - n)
                let mut dzg = zeros(be, n_up)?;
                binary(be, BinaryOp::Mul, &mut dzg, &dcomputed, &a.h_minus_n, n_up)?;
                let mut dhz = zeros(be, n_up)?;
                binary(be, BinaryOp::Mul, &mut dhz, &dcomputed, &a.z, n_up)?;
                let mut dn = zeros(be, n_up)?;
                binary(be, BinaryOp::Sub, &mut dn, &dcomputed, &dhz, n_up)?;
                let mut dn_pre = zeros(be, n_up)?;
                activation_bwd(be, UnaryOp::Tanh, &mut dn_pre, &a.n_pre, &dn, n_up)?;
                // n_pre = gi_n + r * gh_n
                let mut dr = zeros(be, n_up)?;
                binary(be, BinaryOp::Mul, &mut dr, &dn_pre, &a.gh[2], n_up)?;
                let mut dgh_n = zeros(be, n_up)?;
                binary(be, BinaryOp::Mul, &mut dgh_n, &dn_pre, &a.r, n_up)?;
                let mut dr_pre = zeros(be, n_up)?;
                activation_bwd(be, UnaryOp::Sigmoid, &mut dr_pre, &a.r_pre, &dr, n_up)?;
                let mut dz_pre = zeros(be, n_up)?;
                activation_bwd(be, UnaryOp::Sigmoid, &mut dz_pre, &a.z_pre, &dzg, n_up)?;
                // gate order r, z, n; gi and gh share the r and z pre-activations
                let dz_pre2 = copy(be, &dz_pre, n_up)?;
                let dr_pre2 = copy(be, &dr_pre, n_up)?;
                dgi.extend([dr_pre, dz_pre, dn_pre]);
                dgh.extend([dr_pre2, dz_pre2, dgh_n]);
            }
            Updater::Rnn => {
                let mut dn_pre = zeros(be, n_up)?;
                activation_bwd(be, UnaryOp::Tanh, &mut dn_pre, &a.n_pre, &dcomputed, n_up)?;
                let dh = copy(be, &dn_pre, n_up)?;
                dgi.push(dn_pre);
                dgh.push(dh);
            }
        }
        let mut dphi = zeros(be, up * t)?;
        for g in 0..l.gates {
            let wi = gate(l.upd_i, g, m);
            lin_bwd_weight(be, wi, gr, &dgi[g], &a.memory_old, up, 0, m, false)?;
            lin_bwd_weight(be, wi, gr, &dgi[g], &a.msg_other, up, m, m, false)?;
            lin_bwd_weight(be, wi, gr, &dgi[g], &a.msg_edge, up, 2 * m, e, false)?;
            lin_bwd_weight(be, wi, gr, &dgi[g], &a.msg_phi, up, 2 * m + e, t, true)?;
            lin_bwd_input(
                be,
                wi,
                p,
                &mut dphi,
                &dgi[g],
                up,
                2 * m + e,
                t,
                if g == 0 { 0.0 } else { 1.0 },
            )?;
            let wh = gate(l.upd_h, g, m);
            lin_bwd_weight(be, wh, gr, &dgh[g], &a.memory_old, up, 0, m, true)?;
        }
        let mut dphi_pre = zeros(be, up * t)?;
        activation_bwd(
            be,
            UnaryOp::Cos,
            &mut dphi_pre,
            &a.msg_phi_pre,
            &dphi,
            up * t,
        )?;
        lin_bwd_weight(be, l.time, gr, &dphi_pre, &a.msg_dt, up, 0, 1, true)?;
        Ok(())
    }
}

/// A copy of the first `n` floats of `src`.
fn copy<B: Backend>(be: &B, src: &B::Buf, n: usize) -> Result<B::Buf> {
    let mut out = zeros(be, n)?;
    let z = zeros(be, n)?;
    binary(be, BinaryOp::Add, &mut out, src, &z, n)?;
    Ok(out)
}

/// PRES's memory-coherence term `sum_u w_u (1 - cos(s_u, o_u))` over rows of `m` and its
/// gradient with respect to `s` (zero where either row is zero: the cosine is then taken as
/// 1, as for a node that has no memory yet).
pub fn coherence(s: &[f32], o: &[f32], w: &[f32], m: usize) -> (f64, Vec<f32>) {
    let mut loss = 0.0f64;
    let mut grad = vec![0.0f32; s.len()];
    for (i, &wi) in w.iter().enumerate() {
        if wi == 0.0 {
            continue;
        }
        let (si, oi) = (&s[i * m..(i + 1) * m], &o[i * m..(i + 1) * m]);
        let dot: f64 = si
            .iter()
            .zip(oi)
            .map(|(a, b)| f64::from(*a) * f64::from(*b))
            .sum();
        let ns: f64 = si.iter().map(|a| f64::from(*a).powi(2)).sum::<f64>().sqrt();
        let no: f64 = oi.iter().map(|a| f64::from(*a).powi(2)).sum::<f64>().sqrt();
        if ns == 0.0 || no == 0.0 {
            continue;
        }
        let cos = dot / (ns * no);
        loss += f64::from(wi) * (1.0 - cos);
        // d(1 - cos)/ds = -(o / (|s||o|) - cos s / |s|^2)
        for j in 0..m {
            let g = -(f64::from(oi[j]) / (ns * no) - cos * f64::from(si[j]) / (ns * ns));
            grad[i * m + j] = (f64::from(wi) * g) as f32;
        }
    }
    (loss, grad)
}
