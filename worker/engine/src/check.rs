//! Checks and benchmarks of the engine: the primitives of a GPT step and whole GPT steps run on
//! two backends with the same inputs and compared (the CUDA backend against the CPU reference),
//! TGN and JODIE steps (memory update with PRES, attention or time projection, link
//! prediction), and GPT training throughput on one backend. Every primitive against a naive reference, on
//! one backend, is [`crate::conformance`].

use std::time::Instant;

use rand::{Rng, SeedableRng};

use crate::backend::{AdamStep, Backend, Gemm, Kernel, Op, UnaryOp};
use crate::models::gpt::{Gpt, GptConfig};
use crate::nn;
use crate::optim::Adam;
use crate::{Net, Result};

/// One compared output.
#[derive(Clone, Debug)]
pub struct Compared {
    /// Primitive and output.
    pub name: String,
    /// Largest absolute difference.
    pub max_abs: f32,
    /// Largest absolute difference over the largest reference magnitude.
    pub rel: f32,
    /// The tolerance on `rel`.
    pub tol: f32,
}

impl Compared {
    /// Whether the difference is within tolerance.
    pub fn ok(&self) -> bool {
        self.rel <= self.tol && self.rel.is_finite()
    }
}

/// Shape of the per-primitive check.
#[derive(Clone, Copy, Debug)]
pub struct CheckShape {
    /// Sequences.
    pub b: usize,
    /// Tokens per sequence.
    pub t: usize,
    /// Heads.
    pub nh: usize,
    /// Channels per head.
    pub hs: usize,
    /// Vocabulary (padded to `vp`).
    pub v: usize,
    /// Padded vocabulary.
    pub vp: usize,
}

impl Default for CheckShape {
    fn default() -> Self {
        Self {
            b: 4,
            // At least 128, so that attention runs in causal blocks.
            t: 128,
            nh: 4,
            hs: 32,
            v: 1000,
            vp: 1024,
        }
    }
}

fn rnd(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| r.random_range(-scale..scale)).collect()
}

fn up<B: Backend>(be: &B, x: &[f32]) -> Result<B::Buf> {
    let mut b = be.zeros(x.len())?;
    be.upload(&mut b, x)?;
    Ok(b)
}

fn down<B: Backend>(be: &B, b: &B::Buf, n: usize) -> Result<Vec<f32>> {
    be.download(b, 0, n)
}

/// Runs the primitives of a GPT step on `be` (GEMMs, attention, layer norm, bias, GELU,
/// residual, embedding, cross-entropy, AdamW) with inputs fixed by the shape, returning each
/// output by name.
pub fn primitives<B: Backend>(be: &B, s: &CheckShape) -> Result<Vec<(String, Vec<f32>)>> {
    let (b, t, nh, hs) = (s.b, s.t, s.nh, s.hs);
    let c = nh * hs;
    let n = b * t;
    let mut out = Vec::new();
    let mut seed = 100;
    let mut next = |len: usize, scale: f32| {
        seed += 1;
        rnd(len, seed, scale)
    };
    // GEMMs: every transpose, a batched one, alpha and beta.
    for (ta, tb) in [
        (Op::N, Op::N),
        (Op::N, Op::T),
        (Op::T, Op::N),
        (Op::T, Op::T),
    ] {
        let (m, nn, k) = (96, 80, 3 * c);
        let mut g = Gemm::single(ta, tb, m, nn, k, 0.5);
        g.alpha = 0.75;
        let a = up(be, &next(m * k, 1.0))?;
        let bb = up(be, &next(k * nn, 1.0))?;
        let mut cc = up(be, &next(m * nn, 1.0))?;
        be.gemm(&g, (&a, 0), (&bb, 0), (&mut cc, 0))?;
        out.push((format!("gemm {ta:?}{tb:?}"), down(be, &cc, m * nn)?));
    }
    let qkv_host = next(3 * n * c, 1.0);
    let qkv = up(be, &qkv_host)?;
    let att_n = b * nh * t * t;
    let (mut qkvr, mut att, mut pre, mut vacc, mut y) = (
        be.zeros(3 * n * c)?,
        be.zeros(att_n)?,
        be.zeros(att_n)?,
        be.zeros(n * c)?,
        be.zeros(n * c)?,
    );
    nn::attention_fwd(
        be, &mut y, &mut qkvr, &mut att, &mut pre, &mut vacc, &qkv, b, t, nh, hs,
    )?;
    out.push(("attention fwd: att".into(), down(be, &att, att_n)?));
    out.push(("attention fwd: out".into(), down(be, &y, n * c)?));
    let dy = up(be, &next(n * c, 1.0))?;
    let (mut dqkv, mut dqkvr, mut datt, mut dpre, mut dvacc) = (
        be.zeros(3 * n * c)?,
        be.zeros(3 * n * c)?,
        be.zeros(att_n)?,
        be.zeros(att_n)?,
        be.zeros(n * c)?,
    );
    nn::attention_bwd(
        be, &mut dqkv, &mut dqkvr, &mut datt, &mut dpre, &mut dvacc, &dy, &qkvr, &att, b, t, nh, hs,
    )?;
    out.push(("attention bwd: dqkv".into(), down(be, &dqkv, 3 * n * c)?));
    // The same attention through the fused kernels.
    let (mut yf, mut qkvrf, mut lse, mut vf) = (
        be.zeros(n * c)?,
        be.zeros(3 * n * c)?,
        be.zeros(b * nh * t)?,
        be.zeros(n * c)?,
    );
    nn::attention_fused_fwd(
        be, &mut yf, &mut qkvrf, &mut lse, &mut vf, &qkv, b, t, nh, hs,
    )?;
    out.push(("attention (fused) fwd: out".into(), down(be, &yf, n * c)?));
    out.push((
        "attention (fused) fwd: lse".into(),
        down(be, &lse, b * nh * t)?,
    ));
    let (mut dqkvf, mut dqkvrf, mut oh, mut doh, mut delta) = (
        be.zeros(3 * n * c)?,
        be.zeros(3 * n * c)?,
        be.zeros(n * c)?,
        be.zeros(n * c)?,
        be.zeros(b * nh * t)?,
    );
    nn::attention_fused_bwd(
        be,
        &mut dqkvf,
        &mut dqkvrf,
        &mut oh,
        &mut doh,
        &mut delta,
        &dy,
        &yf,
        &qkvrf,
        &lse,
        b,
        t,
        nh,
        hs,
    )?;
    out.push((
        "attention (fused) bwd: dqkv".into(),
        down(be, &dqkvf, 3 * n * c)?,
    ));

    // Layer norm, bias, GELU, residual.
    let x = up(be, &next(n * c, 2.0))?;
    let mut p_host = next(2 * c + 4 * c, 1.0);
    p_host[..c].iter_mut().for_each(|w| *w += 1.0);
    let params = up(be, &p_host)?;
    let (mut ln, mut mean, mut rstd) = (be.zeros(n * c)?, be.zeros(n)?, be.zeros(n)?);
    nn::layernorm_fwd(be, &mut ln, &mut mean, &mut rstd, &x, &params, 0, n, c)?;
    out.push(("layernorm fwd".into(), down(be, &ln, n * c)?));
    out.push(("layernorm fwd: rstd".into(), down(be, &rstd, n)?));
    let dln = up(be, &next(n * c, 1.0))?;
    let mut dx = up(be, &next(n * c, 0.1))?;
    let mut grads = up(be, &next(2 * c + 4 * c, 0.1))?;
    nn::layernorm_bwd(
        be, &mut dx, &mut grads, 0, &dln, &x, &params, 0, &mean, &rstd, n, c,
    )?;
    out.push(("layernorm bwd: dinp".into(), down(be, &dx, n * c)?));
    out.push((
        "layernorm bwd: dw, db".into(),
        be.download(&grads, 0, 2 * c)?,
    ));
    let mut h = up(be, &next(n * 4 * c, 3.0))?;
    be.launch(Kernel::AddRow {
        out: &mut h,
        row: (&params, 2 * c),
        n,
        width: 4 * c,
    })?;
    out.push(("bias fwd".into(), down(be, &h, n * 4 * c)?));
    be.launch(Kernel::SumRows {
        dst: (&mut grads, 2 * c),
        src: &h,
        n,
        width: 4 * c,
    })?;
    out.push(("bias bwd".into(), be.download(&grads, 2 * c, 4 * c)?));
    let mut gl = be.zeros(n * 4 * c)?;
    nn::activation_fwd(be, UnaryOp::Gelu, &mut gl, &h, n * 4 * c)?;
    out.push(("gelu fwd".into(), down(be, &gl, n * 4 * c)?));
    let mut dgl = be.zeros(n * 4 * c)?;
    nn::activation_bwd(be, UnaryOp::Gelu, &mut dgl, &h, &gl, n * 4 * c)?;
    out.push(("gelu bwd".into(), down(be, &dgl, n * 4 * c)?));
    let mut sum = be.zeros(n * c)?;
    nn::residual_fwd(be, &mut sum, &x, &dln, n * c)?;
    out.push(("residual add".into(), down(be, &sum, n * c)?));

    // Embedding.
    let ids_host = random_ids(n, s.v, 7);
    let mut ids = be.ids(n)?;
    be.upload_ids(&mut ids, &ids_host)?;
    let emb = up(be, &next((s.vp + t) * c, 1.0))?;
    let mut enc = be.zeros(n * c)?;
    nn::encoder_fwd(be, &mut enc, &ids, &emb, 0, s.vp, s.vp * c, b, t, c)?;
    out.push(("encoder fwd".into(), down(be, &enc, n * c)?));
    let mut demb = be.zeros((s.vp + t) * c)?;
    nn::encoder_bwd(be, &mut demb, 0, s.vp, s.vp * c, &dln, &ids, b, t, c)?;
    out.push(("encoder bwd".into(), down(be, &demb, (s.vp + t) * c)?));

    // Cross-entropy with the gradient in place.
    let mut logits = up(be, &next(n * s.vp, 4.0))?;
    let mut losses = be.zeros(n)?;
    nn::crossentropy(
        be,
        &mut losses,
        &mut logits,
        &ids,
        n,
        s.v,
        s.vp,
        Some(1.0 / n as f32),
    )?;
    out.push(("crossentropy: losses".into(), down(be, &losses, n)?));
    out.push(("crossentropy: dlogits".into(), down(be, &logits, n * s.vp)?));

    // Optimizer.
    let len = 100_003;
    let mut p = up(be, &next(len, 1.0))?;
    let g = up(be, &next(len, 1.0))?;
    let (mut m, mut v) = (
        up(be, &next(len, 0.1))?,
        up(
            be,
            &next(len, 0.1).iter().map(|x| x.abs()).collect::<Vec<_>>(),
        )?,
    );
    let step = AdamStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        t: 3,
        grad_scale: 0.5,
    };
    be.launch(Kernel::AdamW {
        params: &mut p,
        grads: &g,
        m: &mut m,
        v: &mut v,
        off: 0,
        len,
        step,
    })?;
    out.push(("adamw: params".into(), down(be, &p, len)?));
    out.push(("adamw: v".into(), down(be, &v, len)?));
    out.push((
        "sum of squares".into(),
        vec![be.sum_squares(&g, 0, len)? as f32],
    ));
    Ok(out)
}

/// `n` token ids below `vocab`, drawn from `seed`.
fn random_ids(n: usize, vocab: usize, seed: u64) -> Vec<i32> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| r.random_range(0..vocab as i32)).collect()
}

/// A GPT step's loss, gradients and the losses of `steps` further training steps on `be`.
pub fn gpt_steps<B: Backend>(
    be: &B,
    cfg: GptConfig,
    b: usize,
    t: usize,
    steps: usize,
) -> Result<Vec<(String, Vec<f32>)>> {
    let ids = random_ids(b * t, cfg.vocab, 11);
    let tg = random_ids(b * t, cfg.vocab, 12);
    let mut model = Gpt::new(be, cfg, &cfg.init(5), b, t)?;
    let mut adam = Adam::new(be, cfg.num_params())?;
    let ranges = cfg.decay_ranges();
    let mut losses = Vec::new();
    let mut out = Vec::new();
    for s in 0..=steps {
        model.zero_grad(be)?;
        model.forward(be, &ids, Some(&tg), b, t, Some(1.0 / (b * t) as f32))?;
        losses.push(model.mean_loss(be)?);
        model.backward(be, &mut |_, _| {})?;
        if s == 0 {
            out.push((
                "gpt gradients (all)".into(),
                be.download(&model.params.grads, 0, cfg.num_params())?,
            ));
        }
        let (p, g) = model.buffers();
        adam.step(be, p, g, &ranges, 1e-3, (0.9, 0.95), 1e-8, 0.1, 1.0)?;
    }
    out.insert(0, ("gpt losses per step".into(), losses));
    out.push((
        format!("gpt parameters after {steps} steps"),
        be.download(&model.params.values, 0, cfg.num_params())?,
    ));
    Ok(out)
}

/// `n` values uniform in `-scale..scale`, drawn from `seed`.
fn random_values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| r.random_range(-scale..scale)).collect()
}

/// A TGN (`jodie` false) or JODIE temporal batch's loss, logits, new memory and gradients, and
/// the losses of `steps` further AdamW steps on the same batch, on `be`: 64 events, 160 nodes
/// (96 with a pending message), 10 neighbours, PRES's correction and coherence on.
pub fn tgn_steps<B: Backend>(be: &B, jodie: bool, steps: usize) -> Result<Vec<(String, Vec<f32>)>> {
    use crate::models::tgn::{Correction, Embedding, Tgn, TgnBatch, TgnConfig, Updater};
    let c = TgnConfig {
        memory: 32,
        time: 16,
        edge: 4,
        embedding: 32,
        heads: 2,
        neighbors: 10,
        updater: if jodie { Updater::Rnn } else { Updater::Gru },
        embed: if jodie {
            Embedding::TimeProjection
        } else {
            Embedding::Attention
        },
    };
    let (b, u, up) = (64, 160, 96);
    let nt = if jodie { 3 * b } else { 150 };
    let (m, slots) = (c.memory, c.slots());
    let ns = nt * slots;
    let ids = |n: usize, below: usize, seed: u64| -> Vec<i32> {
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| r.random_range(0..below as i32)).collect()
    };
    let pos = |v: Vec<f32>| v.into_iter().map(|x| x.abs() * 5.0).collect::<Vec<_>>();
    let memory = random_values(u * m, 1, 1.0);
    let msg_other = random_values(up * m, 2, 1.0);
    let msg_edge = random_values(up * c.edge, 3, 1.0);
    let msg_dt = pos(random_values(up, 4, 1.0));
    let predicted = random_values(up * m, 5, 1.0);
    let coherence: Vec<f32> = (0..up)
        .map(|i| if i % 3 == 0 { 0.01 } else { 0.0 })
        .collect();
    let target = ids(nt, u, 6);
    let target_dt = pos(random_values(nt, 7, 1.0));
    let pair_src: Vec<i32> = (0..2 * b).map(|i| (i % b) as i32).collect();
    let pair_dst: Vec<i32> = if jodie {
        (b as i32..3 * b as i32).collect()
    } else {
        ids(2 * b, nt, 8)
    };
    let nbr = ids(ns, u, 9);
    let times = pos(random_values(40, 10, 1.0));
    let nbr_time = ids(ns, times.len(), 11);
    let nbr_edge = random_values(ns * c.edge, 12, 1.0);
    let nbr_mask: Vec<f32> = (0..ns)
        .map(|i| f32::from(i % slots < 3 + i / slots % 8))
        .collect();
    let x = TgnBatch {
        events: b,
        nodes: u,
        updated: up,
        memory: &memory,
        msg_other: &msg_other,
        msg_edge: &msg_edge,
        msg_dt: &msg_dt,
        correction: Some(Correction {
            predicted: &predicted,
            gamma: 0.5,
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
        loss_scale: 1.0 / b as f32,
    };
    let name = if jodie { "jodie" } else { "tgn" };
    let mut net = Tgn::new(be, c, &c.init(5))?;
    let mut adam = Adam::new(be, c.num_params())?;
    let ranges = c.decay_ranges();
    let mut losses = Vec::new();
    let mut out = Vec::new();
    for s in 0..=steps {
        net.zero_grad(be)?;
        let o = net.forward(be, &x)?;
        losses.push(o.loss as f32);
        net.backward(be)?;
        if s == 0 {
            out.push((format!("{name} logits"), o.logits));
            out.push((format!("{name} new memory"), o.memory));
            out.push((
                format!("{name} gradients (all)"),
                be.download(&net.params.grads, 0, c.num_params())?,
            ));
        }
        let (p, g) = net.buffers();
        adam.step(be, p, g, &ranges, 1e-3, (0.9, 0.999), 1e-8, 0.0, 0.0)?;
    }
    out.insert(0, (format!("{name} losses per step"), losses));
    out.push((
        format!("{name} parameters after {steps} steps"),
        be.download(&net.params.values, 0, c.num_params())?,
    ));
    Ok(out)
}

/// Compares two lists of named outputs; `tol` gives each output's tolerance.
pub fn compare(
    reference: &[(String, Vec<f32>)],
    other: &[(String, Vec<f32>)],
    tol: &dyn Fn(&str) -> f32,
) -> Vec<Compared> {
    reference
        .iter()
        .zip(other)
        .map(|((name, a), (_, b))| {
            let scale = a.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-30);
            // A NaN difference is no match (`max` would skip it).
            let max_abs = a
                .iter()
                .zip(b)
                .fold(0.0f32, |m, (x, y)| {
                    let d = (x - y).abs();
                    if d.is_nan() { f32::INFINITY } else { m.max(d) }
                })
                .max(if a.len() == b.len() {
                    0.0
                } else {
                    f32::INFINITY
                });
            Compared {
                name: name.clone(),
                max_abs,
                rel: max_abs / scale,
                tol: tol(name),
            }
        })
        .collect()
}

/// Throughput of GPT training on one backend.
#[derive(Clone, Debug)]
pub struct Throughput {
    /// Median seconds per optimizer step.
    pub step_seconds: f64,
    /// Tokens per second (b x t / step).
    pub tokens_per_second: f64,
    /// Achieved training FLOP/s (6N + 12 L C T per token).
    pub flops: f64,
    /// Loss of the first and the last timed step.
    pub loss: (f32, f32),
}

/// Times `steps` training steps (after `warmup`) of `cfg` at batch `b` x `t` on random
/// tokens, each with forward, backward, a clipped AdamW update and the loss read back.
pub fn gpt_throughput<B: Backend>(
    be: &B,
    cfg: GptConfig,
    b: usize,
    t: usize,
    warmup: usize,
    steps: usize,
) -> Result<Throughput> {
    throughput_with(be, cfg, b, t, warmup, steps, &|| {})
}

/// [`gpt_throughput`], calling `timed` when the timed steps start.
#[allow(clippy::too_many_arguments)]
fn throughput_with<B: Backend>(
    be: &B,
    cfg: GptConfig,
    b: usize,
    t: usize,
    warmup: usize,
    steps: usize,
    timed: &dyn Fn(),
) -> Result<Throughput> {
    if steps == 0 {
        return Err(crate::EngineError::Config("time at least one step".into()));
    }
    let ids = random_ids(b * t + 1, cfg.vocab, 3);
    let mut model = Gpt::new(be, cfg, &cfg.init(1), b, t)?;
    let mut adam = Adam::new(be, cfg.num_params())?;
    let ranges = cfg.decay_ranges();
    let mut times = Vec::new();
    let mut losses = Vec::new();
    for s in 0..warmup + steps {
        if s == warmup {
            timed();
        }
        let start = Instant::now();
        model.zero_grad(be)?;
        model.forward(
            be,
            &ids[..b * t],
            Some(&ids[1..]),
            b,
            t,
            Some(1.0 / (b * t) as f32),
        )?;
        model.backward(be, &mut |_, _| {})?;
        let (p, g) = model.buffers();
        adam.step(be, p, g, &ranges, 6e-4, (0.9, 0.95), 1e-8, 0.1, 1.0)?;
        let loss = model.mean_loss(be)?;
        if s >= warmup {
            times.push(start.elapsed().as_secs_f64());
            losses.push(loss);
        }
    }
    times.sort_by(f64::total_cmp);
    let step = times[times.len() / 2];
    let tps = (b * t) as f64 / step;
    Ok(Throughput {
        step_seconds: step,
        tokens_per_second: tps,
        flops: tps * cfg.flops_per_token(t),
        loss: (losses[0], *losses.last().unwrap_or(&f32::NAN)),
    })
}

/// Device time per primitive of one GPT training step (mean of `steps` after one untimed),
/// longest first: (primitive, milliseconds per step, calls per step).
pub fn gpt_profile<B: Backend>(
    be: &B,
    cfg: GptConfig,
    b: usize,
    t: usize,
    steps: usize,
) -> Result<Vec<(String, f64, f64)>> {
    let p = crate::profile::Profiled::new(be);
    throughput_with(&p, cfg, b, t, 1, steps.max(1), &|| p.reset())?;
    let s = steps.max(1) as f64;
    Ok(p.report()
        .into_iter()
        .map(|(name, d, n)| (name, d.as_secs_f64() * 1e3 / s, n as f64 / s))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_output_with_a_nan_differs_from_its_reference() {
        let reference = vec![("x".to_string(), vec![1.0f32, 2.0, 3.0])];
        let tol = |_: &str| 1.0;
        for got in [
            vec![1.0, 2.0, 3.0],
            vec![1.0, f32::NAN, 3.0],
            vec![f32::NAN; 3],
        ] {
            let same = got == reference[0].1;
            let rows = compare(&reference, &[("x".to_string(), got.clone())], &tol);
            assert_eq!(rows[0].ok(), same, "{got:?}: {:?}", rows[0]);
        }
    }
}
