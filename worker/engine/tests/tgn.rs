//! TGN and JODIE on the CPU backend against finite differences and a naive reference: every
//! parameter tensor's gradient through a whole batch (memory updater, time encoding, graph
//! attention, link prediction, PRES correction and coherence), the GRU cell against PyTorch's
//! formulas, and PRES with gamma = 0 and beta = 0 equal to plain TGN bit for bit.

use lockstep_engine::Net;
use lockstep_engine::cpu::Cpu;
use lockstep_engine::models::tgn::{
    Correction, Embedding, Tgn, TgnBatch, TgnConfig, TgnOutput, Updater, coherence,
};

mod common;
use common::{check_grad, check_grad_at, rnd};

fn config(updater: Updater, embed: Embedding) -> TgnConfig {
    TgnConfig {
        memory: 6,
        time: 4,
        edge: 2,
        embedding: 4,
        heads: 2,
        neighbors: 3,
        updater,
        embed,
    }
}

/// A batch's inputs, owned.
struct Inputs {
    events: usize,
    nodes: usize,
    updated: usize,
    memory: Vec<f32>,
    msg_other: Vec<f32>,
    msg_edge: Vec<f32>,
    msg_dt: Vec<f32>,
    predicted: Vec<f32>,
    coherence: Vec<f32>,
    target: Vec<i32>,
    pair_src: Vec<i32>,
    pair_dst: Vec<i32>,
    target_dt: Vec<f32>,
    nbr: Vec<i32>,
    times: Vec<f32>,
    nbr_time: Vec<i32>,
    nbr_edge: Vec<f32>,
    nbr_mask: Vec<f32>,
}

fn inputs(c: &TgnConfig) -> Inputs {
    let (b, u, up) = (3, 8, 5);
    let nt = 3 * b;
    let slots = c.slots();
    let m = c.memory;
    let pos = |v: Vec<f32>| v.into_iter().map(|x| x.abs() * 3.0).collect::<Vec<_>>();
    Inputs {
        events: b,
        nodes: u,
        updated: up,
        memory: rnd(u * m, 1, 1.0),
        msg_other: rnd(up * m, 2, 1.0),
        msg_edge: rnd(up * c.edge, 3, 1.0),
        msg_dt: pos(rnd(up, 4, 1.0)),
        predicted: rnd(up * m, 5, 1.0),
        coherence: vec![0.3, 0.0, 0.2, 0.1, 0.0],
        target: (0..nt).map(|i| ((i * 5 + 1) % u) as i32).collect(),
        // Sources are rows 0..b (each twice), destinations and negatives the others, one of
        // them shared.
        pair_src: (0..2 * b).map(|i| (i % b) as i32).collect(),
        pair_dst: (0..2 * b).map(|i| (b + i.min(2 * b - 2)) as i32).collect(),
        target_dt: pos(rnd(nt, 6, 1.0)),
        nbr: (0..nt * slots).map(|i| ((i * 3 + 2) % u) as i32).collect(),
        // Four distinct edge times shared by the slots.
        times: pos(rnd(4, 7, 1.0)),
        nbr_time: (0..nt * slots).map(|i| (i % 4) as i32).collect(),
        nbr_edge: rnd(nt * slots * c.edge, 8, 1.0),
        // Row 0 has no neighbour at all, row 1 one, the others two or three.
        nbr_mask: (0..nt * slots)
            .map(|i| {
                let (row, s) = (i / slots, i % slots);
                match row {
                    0 => 0.0,
                    1 => f32::from(s == 0),
                    _ => f32::from(s < 2 + row % 2),
                }
            })
            .collect(),
    }
}

fn batch<'a>(x: &'a Inputs, pres: Option<f32>, coherence: bool) -> TgnBatch<'a> {
    TgnBatch {
        events: x.events,
        nodes: x.nodes,
        updated: x.updated,
        memory: &x.memory,
        msg_other: &x.msg_other,
        msg_edge: &x.msg_edge,
        msg_dt: &x.msg_dt,
        correction: pres.map(|gamma| Correction {
            predicted: &x.predicted,
            gamma,
        }),
        coherence: if coherence { &x.coherence } else { &[] },
        target: &x.target,
        pair_src: &x.pair_src,
        pair_dst: &x.pair_dst,
        target_dt: &x.target_dt,
        nbr: &x.nbr,
        times: &x.times,
        nbr_time: &x.nbr_time,
        nbr_edge: &x.nbr_edge,
        nbr_mask: &x.nbr_mask,
        loss_scale: 1.0 / x.events as f32,
    }
}

/// Forward and backward from `params`: the output and the gradient.
fn run(c: TgnConfig, params: &[f32], x: &TgnBatch<'_>) -> (TgnOutput, Vec<f32>) {
    let be = Cpu;
    let mut net = Tgn::new(&be, c, params).expect("model");
    net.zero_grad(&be).expect("zero");
    let out = net.forward(&be, x).expect("forward");
    net.backward(&be).expect("backward");
    (out, net.params.grads.to_vec())
}

fn loss(c: TgnConfig, params: &[f32], x: &TgnBatch<'_>) -> f64 {
    let be = Cpu;
    Tgn::new(&be, c, params)
        .expect("model")
        .forward(&be, x)
        .expect("forward")
        .loss
}

/// Every tensor's gradient against central differences.
fn check_every_tensor(c: TgnConfig) {
    let x = inputs(&c);
    let b = batch(&x, Some(0.6), true);
    // Larger parameters than the init's, so that every gate and the attention are far from
    // their linear regime; small steps, so that no difference crosses a ReLU's kink.
    let params: Vec<f32> = c
        .init(3)
        .iter()
        .zip(rnd(c.num_params(), 9, 0.3))
        .map(|(p, r)| p + r)
        .collect();
    let (out, grad) = run(c, &params, &b);
    assert!(out.coherence > 0.0, "the coherence term is on");
    for t in c.tensors() {
        let range = t.offset..t.offset + t.numel();
        assert!(
            grad[range.clone()].iter().any(|g| *g != 0.0),
            "{}: no gradient reaches it",
            t.name
        );
        check_grad_at(
            &format!("{:?}/{:?} {}", c.updater, c.embed, t.name),
            &params,
            &grad,
            range,
            12,
            2e-3,
            2e-2,
            &mut |p| loss(c, p, &b),
        );
    }
}

#[test]
fn the_whole_tgn_step_matches_finite_differences_for_every_tensor() {
    check_every_tensor(config(Updater::Gru, Embedding::Attention));
}

#[test]
fn the_whole_jodie_step_matches_finite_differences_for_every_tensor() {
    check_every_tensor(config(Updater::Rnn, Embedding::TimeProjection));
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

#[test]
fn the_gru_memory_update_is_pytorchs_gru_cell_on_the_identity_message() {
    let c = config(Updater::Gru, Embedding::Attention);
    let x = inputs(&c);
    let params = c.init(5);
    let (out, _) = run(c, &params, &batch(&x, None, false));
    let tensor = |name: &str| {
        let t = c
            .tensors()
            .into_iter()
            .find(|t| t.name == name)
            .expect("tensor");
        params[t.offset..t.offset + t.numel()]
            .iter()
            .map(|&v| f64::from(v))
            .collect::<Vec<f64>>()
    };
    let (wt, bt) = (
        tensor("memory.time_enc.lin.weight"),
        tensor("memory.time_enc.lin.bias"),
    );
    let (wi, bi) = (tensor("memory.gru.weight_ih"), tensor("memory.gru.bias_ih"));
    let (wh, bh) = (tensor("memory.gru.weight_hh"), tensor("memory.gru.bias_hh"));
    let (m, e, t) = (c.memory, c.edge, c.time);
    let dm = c.message();
    for u in 0..x.updated {
        let h: Vec<f64> = x.memory[u * m..(u + 1) * m]
            .iter()
            .map(|&v| v.into())
            .collect();
        let mut msg: Vec<f64> = h.clone();
        msg.extend(
            x.msg_other[u * m..(u + 1) * m]
                .iter()
                .map(|&v| f64::from(v)),
        );
        msg.extend(x.msg_edge[u * e..(u + 1) * e].iter().map(|&v| f64::from(v)));
        msg.extend((0..t).map(|k| (f64::from(x.msg_dt[u]) * wt[k] + bt[k]).cos()));
        let row = |w: &[f64], b: &[f64], r: usize, v: &[f64]| -> f64 {
            b[r] + (0..v.len()).map(|j| w[r * v.len() + j] * v[j]).sum::<f64>()
        };
        assert_eq!(msg.len(), dm);
        for j in 0..m {
            let r = sigmoid(row(&wi, &bi, j, &msg) + row(&wh, &bh, j, &h));
            let z = sigmoid(row(&wi, &bi, m + j, &msg) + row(&wh, &bh, m + j, &h));
            let n = (row(&wi, &bi, 2 * m + j, &msg) + r * row(&wh, &bh, 2 * m + j, &h)).tanh();
            let want = (1.0 - z) * n + z * h[j];
            let got = f64::from(out.memory[u * m + j]);
            assert!(
                (got - want).abs() < 1e-5,
                "node {u} channel {j}: engine {got}, PyTorch's GRU cell {want}"
            );
            assert_eq!(out.memory[u * m + j], out.computed[u * m + j]);
        }
    }
}

#[test]
fn pres_with_gamma_and_beta_zero_is_plain_tgn_bit_for_bit() {
    for c in [
        config(Updater::Gru, Embedding::Attention),
        config(Updater::Rnn, Embedding::TimeProjection),
    ] {
        let mut x = inputs(&c);
        let params = c.init(7);
        let (plain, plain_grad) = run(c, &params, &batch(&x, None, false));
        x.coherence.iter_mut().for_each(|w| *w = 0.0);
        let (pres, pres_grad) = run(c, &params, &batch(&x, Some(0.0), true));
        assert_eq!(plain.loss.to_bits(), pres.loss.to_bits());
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&plain.logits), bits(&pres.logits));
        assert_eq!(bits(&plain.memory), bits(&pres.memory));
        assert_eq!(bits(&plain_grad), bits(&pres_grad));
        // And gamma does act: the corrected memory moves towards the prediction.
        let (on, _) = run(c, &params, &batch(&x, Some(0.5), false));
        assert_ne!(bits(&on.memory), bits(&plain.memory));
        for (i, (&s, (&p, &comp))) in on
            .memory
            .iter()
            .zip(x.predicted.iter().zip(&on.computed))
            .enumerate()
        {
            assert!((s - (0.5 * p + 0.5 * comp)).abs() < 1e-6, "row value {i}");
        }
    }
}

#[test]
fn the_coherence_term_matches_finite_differences_and_is_zero_for_equal_directions() {
    let m = 5;
    let s = rnd(3 * m, 11, 1.0);
    let o = rnd(3 * m, 12, 1.0);
    let w = [0.5, 0.0, 2.0];
    let (_, grad) = coherence(&s, &o, &w, m);
    check_grad("coherence", &s, &grad, 15, 1e-3, 1e-3, &mut |s| {
        coherence(s, &o, &w, m).0
    });
    assert!(
        grad[m..2 * m].iter().all(|g| *g == 0.0),
        "a zero weight has no gradient"
    );
    let scaled: Vec<f32> = o.iter().map(|v| 3.0 * v).collect();
    let (same, g) = coherence(&scaled, &o, &w, m);
    assert!(same.abs() < 1e-6, "parallel memories cohere: {same}");
    assert!(g.iter().all(|x| x.abs() < 1e-5));
}

#[test]
fn a_batch_of_the_wrong_size_is_refused_with_the_input_named() {
    let c = config(Updater::Gru, Embedding::Attention);
    let x = inputs(&c);
    let mut b = batch(&x, None, false);
    b.nbr_mask = &x.nbr_mask[1..];
    let be = Cpu;
    let err = Tgn::new(&be, c, &c.init(0))
        .unwrap()
        .forward(&be, &b)
        .unwrap_err()
        .to_string();
    assert!(err.contains("nbr_mask"), "{err}");
}

#[test]
fn the_engine_checks_tgn_and_jodie_steps_train_on_the_cpu_reference() {
    // `lockstep-worker bench engine-check` compares these outputs of the CUDA backend with the
    // CPU's: here, that they exist and that the steps train.
    for jodie in [false, true] {
        let out = lockstep_engine::check::tgn_steps(&Cpu, jodie, 5).expect("steps");
        let names: Vec<&str> = out.iter().map(|o| o.0.as_str()).collect();
        assert_eq!(names.len(), 5, "{names:?}");
        let losses = &out[0].1;
        assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
        assert!(losses[5] < losses[0], "{names:?}: {losses:?}");
        assert!(
            out.iter()
                .all(|o| !o.1.is_empty() && o.1.iter().all(|v| v.is_finite()))
        );
    }
}
