//! The engine's CPU backend against finite differences and naive references: every layer's
//! backward, and the whole GPT's gradient on a tiny config.

use lockstep_engine::conformance::reference_gemm;
use lockstep_engine::cpu::{Cpu, CpuBuf};
use lockstep_engine::models::gpt::{Gpt, GptConfig};
use lockstep_engine::nn;
use lockstep_engine::{Backend, BinaryOp, Gemm, Kernel, Mask, Net, Op, UnaryOp};
use rand::{Rng, SeedableRng};

mod common;
use common::{check_grad, rnd};

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum()
}

#[test]
fn gemm_matches_a_naive_product_for_every_transpose_stride_and_batch() {
    let be = Cpu;
    for (ta, tb) in [
        (Op::N, Op::N),
        (Op::N, Op::T),
        (Op::T, Op::N),
        (Op::T, Op::T),
    ] {
        for &(m, n, k, batch) in &[
            (3, 5, 7, 1),
            (33, 70, 17, 1),
            (8, 9, 4, 3),
            (64, 300, 40, 1),
        ] {
            let lda = if ta == Op::N { m } else { k } + 1;
            let ldb = if tb == Op::N { k } else { n } + 2;
            let ldc = m + 3;
            let g = Gemm {
                ta,
                tb,
                m,
                n,
                k,
                alpha: 0.5,
                lda,
                stride_a: lda * m.max(k) + 1,
                ldb,
                stride_b: ldb * n.max(k) + 2,
                beta: 0.75,
                ldc,
                stride_c: ldc * n + 5,
                batch,
            };
            let a = rnd(g.stride_a * batch, 1, 1.0);
            let b = rnd(g.stride_b * batch, 2, 1.0);
            let c0 = rnd(g.stride_c * batch, 3, 1.0);
            let want = reference_gemm(&g, (&a, 0), (&b, 0), (&c0, 0));
            let mut got = CpuBuf::from(c0.clone());
            let (a, b) = (CpuBuf::from(a), CpuBuf::from(b));
            be.gemm(&g, (&a, 0), (&b, 0), (&mut got, 0)).unwrap();
            for (i, (x, y)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (f64::from(*x) - y).abs() < 1e-4,
                    "{g:?}: element {i}: {x} vs {y}"
                );
            }
        }
    }
}

#[test]
#[should_panic(expected = "past its buffers")]
fn gemm_refuses_operands_that_do_not_fit_their_buffers() {
    let be = Cpu;
    let g = Gemm::single(Op::N, Op::N, 4, 4, 4, 0.0);
    let (a, b, mut c) = (
        CpuBuf::from(vec![0.0; 15]),
        CpuBuf::from(vec![0.0; 16]),
        CpuBuf::from(vec![0.0; 16]),
    );
    be.gemm(&g, (&a, 0), (&b, 0), (&mut c, 0)).unwrap();
}

#[test]
fn layernorm_backward_matches_finite_differences() {
    let be = Cpu;
    let (n, c) = (3, 8);
    let x = rnd(n * c, 4, 2.0);
    let mut params = rnd(2 * c, 5, 1.0);
    params[..c].iter_mut().for_each(|w| *w += 1.0);
    let r = rnd(n * c, 6, 1.0);
    let fwd = |x: &[f32], p: &[f32]| {
        let (mut out, mut mean, mut rstd) = (
            CpuBuf::from(vec![0.0; n * c]),
            CpuBuf::from(vec![0.0; n]),
            CpuBuf::from(vec![0.0; n]),
        );
        nn::layernorm_fwd(
            &be,
            &mut out,
            &mut mean,
            &mut rstd,
            &CpuBuf::from(x.to_vec()),
            &CpuBuf::from(p.to_vec()),
            0,
            n,
            c,
        )
        .unwrap();
        (out, mean, rstd)
    };
    let (_, mean, rstd) = fwd(&x, &params);
    let mut dinp = CpuBuf::from(vec![0.0; n * c]);
    let mut grads = CpuBuf::from(vec![0.0; 2 * c]);
    nn::layernorm_bwd(
        &be,
        &mut dinp,
        &mut grads,
        0,
        &CpuBuf::from(r.clone()),
        &CpuBuf::from(x.clone()),
        &CpuBuf::from(params.clone()),
        0,
        &mean,
        &rstd,
        n,
        c,
    )
    .unwrap();
    check_grad("layernorm input", &x, &dinp, 24, 1e-2, 2e-3, &mut |x| {
        dot(&fwd(x, &params).0, &r)
    });
    check_grad(
        "layernorm weight and bias",
        &params,
        &grads,
        16,
        1e-2,
        2e-3,
        &mut |p| dot(&fwd(&x, p).0, &r),
    );
}

#[test]
fn gelu_and_softmax_backward_match_finite_differences() {
    let be = Cpu;
    let n = 50;
    let x = rnd(n, 7, 3.0);
    let r = rnd(n, 8, 1.0);
    let gelu = |x: &[f32]| {
        let mut o = CpuBuf::from(vec![0.0; n]);
        nn::activation_fwd(&be, UnaryOp::Gelu, &mut o, &CpuBuf::from(x.to_vec()), n).unwrap();
        dot(&o, &r)
    };
    let mut d = CpuBuf::from(vec![0.0; n]);
    let (bx, br) = (CpuBuf::from(x.clone()), CpuBuf::from(r.clone()));
    nn::activation_bwd(&be, UnaryOp::Gelu, &mut d, &bx, &br, n).unwrap();
    check_grad("gelu", &x, &d, n, 1e-2, 2e-3, &mut |x| gelu(x));

    let (blocks, t, scale) = (2, 5, 0.7);
    let pre = rnd(blocks * t * t, 9, 2.0);
    let r = rnd(blocks * t * t, 10, 1.0);
    let soft = |p: &[f32]| {
        let mut o = CpuBuf::from(vec![0.0; blocks * t * t]);
        be.launch(Kernel::Softmax {
            out: &mut o,
            inp: &CpuBuf::from(p.to_vec()),
            rows: blocks * t,
            width: t,
            scale,
            mask: Mask::Causal,
        })
        .unwrap();
        o
    };
    let att = soft(&pre);
    for (row, chunk) in att.chunks(t).enumerate() {
        let t1 = row % t;
        let sum: f32 = chunk.iter().sum();
        assert!((sum - 1.0).abs() < 1e-5, "row {row} sums to {sum}");
        assert!(
            chunk[t1 + 1..].iter().all(|v| *v == 0.0),
            "row {row} sees the future"
        );
    }
    let mut dpre = CpuBuf::from(vec![0.0; blocks * t * t]);
    be.launch(Kernel::SoftmaxBwd {
        dinp: &mut dpre,
        dout: &CpuBuf::from(r.clone()),
        out: &att,
        rows: blocks * t,
        width: t,
        scale,
        mask: Mask::Causal,
    })
    .unwrap();
    check_grad("causal softmax", &pre, &dpre, 50, 1e-2, 2e-3, &mut |p| {
        dot(&soft(p), &r)
    });
}

#[test]
fn crossentropy_gradient_matches_finite_differences_and_ignores_padding() {
    let be = Cpu;
    let (n, v, vp) = (4, 6, 8);
    let logits = rnd(n * vp, 11, 3.0);
    let targets = vec![0, 5, 2, 3];
    let loss = |l: &[f32]| {
        let mut losses = CpuBuf::from(vec![0.0; n]);
        nn::crossentropy(
            &be,
            &mut losses,
            &mut CpuBuf::from(l.to_vec()),
            &targets,
            n,
            v,
            vp,
            None,
        )
        .unwrap();
        losses.iter().map(|x| f64::from(*x)).sum::<f64>() / n as f64
    };
    let mut d = CpuBuf::from(logits.clone());
    let mut losses = CpuBuf::from(vec![0.0; n]);
    nn::crossentropy(
        &be,
        &mut losses,
        &mut d,
        &targets,
        n,
        v,
        vp,
        Some(1.0 / n as f32),
    )
    .unwrap();
    for row in d.chunks(vp) {
        assert_eq!(&row[v..], &[0.0, 0.0], "padding gets no gradient");
    }
    check_grad("cross-entropy", &logits, &d, 32, 1e-2, 2e-3, &mut |l| {
        loss(l)
    });
}

/// Causal self-attention of `qkv` on the CPU: the output, and the permuted q, k, v and the
/// attention matrix that backward needs.
fn attention(
    qkv: &[f32],
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (btc, att_n) = (b * t * nh * hs, b * nh * t * t);
    let mut out = CpuBuf::from(vec![0.0; btc]);
    let (mut qkvr, mut att, mut pre, mut vacc) = (
        CpuBuf::from(vec![0.0; 3 * btc]),
        CpuBuf::from(vec![0.0; att_n]),
        CpuBuf::from(vec![0.0; att_n]),
        CpuBuf::from(vec![0.0; btc]),
    );
    nn::attention_fwd(
        &Cpu,
        &mut out,
        &mut qkvr,
        &mut att,
        &mut pre,
        &mut vacc,
        &CpuBuf::from(qkv.to_vec()),
        b,
        t,
        nh,
        hs,
    )
    .expect("attention forward");
    (out.into_vec(), qkvr.into_vec(), att.into_vec())
}

/// The gradient of [`attention`]'s input for the output gradient `dout`.
#[allow(clippy::too_many_arguments)]
fn attention_backward(
    dout: &[f32],
    qkvr: &[f32],
    att: &[f32],
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
) -> Vec<f32> {
    let (btc, att_n) = (b * t * nh * hs, b * nh * t * t);
    let mut dqkv = CpuBuf::from(vec![0.0; 3 * btc]);
    let (mut dqkvr, mut datt, mut dpre, mut dvacc) = (
        CpuBuf::from(vec![0.0; 3 * btc]),
        CpuBuf::from(vec![0.0; att_n]),
        CpuBuf::from(vec![0.0; att_n]),
        CpuBuf::from(vec![0.0; btc]),
    );
    nn::attention_bwd(
        &Cpu,
        &mut dqkv,
        &mut dqkvr,
        &mut datt,
        &mut dpre,
        &mut dvacc,
        &CpuBuf::from(dout.to_vec()),
        &CpuBuf::from(qkvr.to_vec()),
        &CpuBuf::from(att.to_vec()),
        b,
        t,
        nh,
        hs,
    )
    .expect("attention backward");
    dqkv.into_vec()
}

fn tiny() -> GptConfig {
    GptConfig::new(2, 2, 8, 5, 11).expect("a valid config")
}

#[test]
fn attention_and_matmul_backward_match_finite_differences() {
    let be = Cpu;
    let (b, t, nh, hs) = (2, 4, 2, 3);
    let c = nh * hs;
    let qkv = rnd(b * t * 3 * c, 12, 1.0);
    let r = rnd(b * t * c, 13, 1.0);
    let fwd = |qkv: &[f32]| attention(qkv, b, t, nh, hs);
    let (_, qkvr, att) = fwd(&qkv);
    let dqkv = attention_backward(&r, &qkvr, &att, b, t, nh, hs);
    check_grad("attention", &qkv, &dqkv, 72, 1e-2, 2e-3, &mut |x| {
        dot(&fwd(x).0, &r)
    });

    let (n, ic, oc) = (5, 4, 3);
    let x = rnd(n * ic, 14, 1.0);
    let p = rnd(oc * ic + oc, 15, 1.0);
    let r = rnd(n * oc, 16, 1.0);
    let mm = |x: &[f32], p: &[f32]| {
        let mut out = CpuBuf::from(vec![0.0; n * oc]);
        nn::matmul_fwd(
            &be,
            &mut out,
            &CpuBuf::from(x.to_vec()),
            &CpuBuf::from(p.to_vec()),
            0,
            Some(oc * ic),
            n,
            ic,
            oc,
        )
        .unwrap();
        out
    };
    let mut dx = CpuBuf::from(vec![0.0; n * ic]);
    let mut dp = CpuBuf::from(vec![0.0; oc * ic + oc]);
    nn::matmul_bwd(
        &be,
        &mut dx,
        &mut dp,
        0,
        Some(oc * ic),
        &CpuBuf::from(r.clone()),
        &CpuBuf::from(x.clone()),
        &CpuBuf::from(p.clone()),
        0,
        n,
        ic,
        oc,
    )
    .unwrap();
    check_grad("matmul input", &x, &dx, 20, 1e-2, 2e-3, &mut |x| {
        dot(&mm(x, &p), &r)
    });
    check_grad(
        "matmul weight and bias",
        &p,
        &dp,
        15,
        1e-2,
        2e-3,
        &mut |p| dot(&mm(&x, p), &r),
    );
}

fn batch(cfg: &GptConfig, b: usize, t: usize, seed: u64) -> (Vec<i32>, Vec<i32>) {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let ids = (0..b * t)
        .map(|_| r.random_range(0..cfg.vocab as i32))
        .collect();
    let tg = (0..b * t)
        .map(|_| r.random_range(0..cfg.vocab as i32))
        .collect();
    (ids, tg)
}

#[test]
fn the_whole_gpt_gradient_matches_finite_differences() {
    let be = Cpu;
    let cfg = tiny();
    let (b, t) = (2, 5);
    // Larger weights than GPT-2's init, so every path carries a visible gradient.
    let params: Vec<f32> = cfg
        .init(3)
        .iter()
        .zip(rnd(cfg.num_params(), 17, 0.3))
        .map(|(p, r)| p + r)
        .collect();
    let (ids, tg) = batch(&cfg, b, t, 18);
    let mut model = Gpt::new(&be, cfg, &params, b, t).unwrap();
    model
        .forward(&be, &ids, Some(&tg), b, t, Some(1.0 / (b * t) as f32))
        .unwrap();
    model.zero_grad(&be).unwrap();
    let mut ready = Vec::new();
    model
        .backward(&be, &mut |_, from| ready.push(from))
        .unwrap();
    assert_eq!(
        ready,
        vec![cfg.lnf(), cfg.block(1), cfg.block(0), 0],
        "gradients become final as suffixes, last layer first"
    );
    let grads = model.params.grads.clone();
    let mut probe = Gpt::new(&be, cfg, &params, b, t).unwrap();
    check_grad("gpt", &params, &grads, 400, 1e-2, 1e-2, &mut |p| {
        probe.params.values.copy_from_slice(p);
        probe.forward(&be, &ids, Some(&tg), b, t, None).unwrap();
        f64::from(probe.mean_loss(&be).unwrap())
    });
    // The vocabulary padding of wte and the rows of unused positions get nothing.
    assert_eq!(cfg.padded_vocab, cfg.vocab);
}

#[test]
fn gpt_training_on_cpu_lowers_the_loss_on_a_repeated_batch() {
    let be = Cpu;
    let cfg = tiny();
    let (b, t) = (2, 5);
    let (ids, tg) = batch(&cfg, b, t, 19);
    let mut model = Gpt::new(&be, cfg, &cfg.init(1), b, t).unwrap();
    let mut adam = lockstep_engine::optim::Adam::new(&be, cfg.num_params()).unwrap();
    let ranges = cfg.decay_ranges();
    let mut losses = Vec::new();
    for _ in 0..60 {
        model.zero_grad(&be).unwrap();
        model
            .forward(&be, &ids, Some(&tg), b, t, Some(1.0 / (b * t) as f32))
            .unwrap();
        losses.push(model.mean_loss(&be).unwrap());
        model.backward(&be, &mut |_, _| {}).unwrap();
        let (p, g) = model.buffers();
        adam.step(&be, p, g, &ranges, 1e-2, (0.9, 0.95), 1e-8, 0.1, 1.0)
            .unwrap();
    }
    assert!(
        (losses[0] - (cfg.vocab as f32).ln()).abs() < 0.1,
        "starts near ln(vocab): {}",
        losses[0]
    );
    assert!(losses[59] < 0.5, "memorises one batch: {losses:?}");
}

#[test]
fn decay_ranges_cover_every_parameter_once() {
    for cfg in [tiny(), GptConfig::new(12, 12, 768, 1024, 50257).unwrap()] {
        let mut next = 0;
        for (off, len, _) in cfg.decay_ranges() {
            assert_eq!(off, next);
            next += len;
        }
        assert_eq!(next, cfg.num_params());
    }
    let gpt2 = GptConfig::new(12, 12, 768, 1024, 50257).unwrap();
    assert_eq!(gpt2.padded_vocab, 50304);
    assert_eq!(
        gpt2.num_real_params(),
        124_439_808,
        "GPT-2 small has 124M parameters"
    );
}

/// The CUDA kernels compile with NVRTC for Hopper. NVRTC needs no GPU: CI installs it from
/// PyPI (`nvidia-cuda-nvrtc`); where it is absent the test says so and checks nothing else.
#[cfg(feature = "cuda")]
#[test]
fn cuda_kernels_compile_with_nvrtc() {
    match lockstep_engine::cuda::compile("sm_90") {
        Ok(ptx) => {
            let src = ptx.to_src();
            for k in lockstep_engine::cuda::KERNELS {
                assert!(
                    src.contains(&format!(".entry {k}")),
                    "{k} missing from the PTX"
                );
            }
        }
        Err(e) if e.to_string().contains("not on the library path") => {
            eprintln!("NVRTC is not installed here; kernels not compiled: {e}");
            if std::env::var_os("LOCKSTEP_REQUIRE_NVRTC").is_some() {
                panic!("LOCKSTEP_REQUIRE_NVRTC is set but {e}");
            }
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn the_mlp_gradient_matches_finite_differences_and_reports_layers_last_first() {
    use lockstep_engine::models::mlp::{Mlp, MlpConfig};
    let be = Cpu;
    let cfg = MlpConfig::new(vec![5, 7, 4, 3]).expect("a valid config");
    let b = 4;
    let x = rnd(b * 5, 20, 1.0);
    let y = vec![0, 2, 1, 2];
    let params = cfg.init(9);
    let mut m = Mlp::new(&be, cfg.clone(), &params, b).unwrap();
    m.zero_grad(&be).unwrap();
    m.forward(&be, &x, Some(&y), b, Some(1.0 / b as f32))
        .unwrap();
    let mut ready = Vec::new();
    m.backward(&be, &mut |_, from| ready.push(from)).unwrap();
    assert_eq!(ready, vec![cfg.layer(2).0, cfg.layer(1).0, 0]);
    let grads = m.params.grads.clone();
    let mut probe = Mlp::new(&be, cfg.clone(), &params, b).unwrap();
    // A small step, so that no ReLU input crosses zero between the two evaluations.
    check_grad("mlp", &params, &grads, 200, 1e-3, 5e-3, &mut |p| {
        probe.params.values.copy_from_slice(p);
        probe.forward(&be, &x, Some(&y), b, None).unwrap();
        f64::from(probe.mean_loss(&be).unwrap())
    });
}

#[test]
fn blocked_causal_attention_matches_a_direct_computation_and_finite_differences() {
    // t = 128: the attention runs as four causal blocks.
    let (b, t, nh, hs) = (1, 128, 2, 4);
    let c = nh * hs;
    let qkv = rnd(b * t * 3 * c, 21, 1.0);
    let fwd = |qkv: &[f32]| attention(qkv, b, t, nh, hs);
    let (out, qkvr, att) = fwd(&qkv);
    // Direct: for each head and query, softmax over the keys up to it, then the weighted values.
    let at = |ti: usize, which: usize, h: usize, d: usize| qkv[ti * 3 * c + which * c + h * hs + d];
    for h in 0..nh {
        for t1 in 0..t {
            let s: Vec<f32> = (0..=t1)
                .map(|t2| {
                    (0..hs)
                        .map(|d| at(t1, 0, h, d) * at(t2, 1, h, d))
                        .sum::<f32>()
                        / 2.0
                })
                .collect();
            let mx = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let z: f32 = s.iter().map(|x| (x - mx).exp()).sum();
            for d in 0..hs {
                let y: f32 = (0..=t1)
                    .map(|t2| (s[t2] - mx).exp() / z * at(t2, 2, h, d))
                    .sum();
                let got = out[t1 * c + h * hs + d];
                assert!(
                    (got - y).abs() < 1e-5,
                    "head {h} query {t1} channel {d}: {got} vs {y}"
                );
            }
        }
    }
    let r = rnd(b * t * c, 22, 1.0);
    let dqkv = attention_backward(&r, &qkvr, &att, b, t, nh, hs);
    check_grad(
        "blocked attention",
        &qkv,
        &dqkv,
        150,
        1e-2,
        2e-3,
        &mut |x| dot(&fwd(x).0, &r),
    );
}

#[test]
fn gather_rows_copies_the_named_rows_and_scatter_add_sums_repeated_ids_in_place() {
    let be = Cpu;
    // A table of 3 rows of 2 after one float of something else.
    let table = CpuBuf::from(vec![-1.0, 10.0, 11.0, 20.0, 21.0, 30.0, 31.0]);
    let ids = vec![2, 0, 2, 1];
    let mut out = CpuBuf::from(vec![0.0; 8]);
    be.launch(Kernel::GatherRows {
        out: &mut out,
        table: (&table, 1),
        table_rows: 3,
        ids: &ids,
        n: 4,
        width: 2,
    })
    .unwrap();
    assert_eq!(*out, [30.0, 31.0, 10.0, 11.0, 30.0, 31.0, 20.0, 21.0]);
    let src = CpuBuf::from(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
    let mut acc = table.clone();
    be.launch(Kernel::ScatterAddRows {
        table: (&mut acc, 1),
        table_rows: 3,
        ids: &ids,
        src: &src,
        n: 4,
        width: 2,
    })
    .unwrap();
    assert_eq!(*acc, [-1.0, 13.0, 15.0, 27.0, 29.0, 36.0, 39.0]);
}

#[test]
fn gather_and_scatter_add_refuse_ids_outside_the_table() {
    let be = Cpu;
    let mut table = CpuBuf::from(vec![0.0; 6]);
    let mut out = CpuBuf::from(vec![0.0; 2]);
    for bad in [3, -1] {
        let ids = vec![bad];
        let e = be
            .launch(Kernel::GatherRows {
                out: &mut out,
                table: (&table, 0),
                table_rows: 3,
                ids: &ids,
                n: 1,
                width: 2,
            })
            .unwrap_err();
        assert!(e.to_string().contains("outside the table's 3 rows"), "{e}");
        let e = be
            .launch(Kernel::ScatterAddRows {
                table: (&mut table, 0),
                table_rows: 3,
                ids: &ids,
                src: &out,
                n: 1,
                width: 2,
            })
            .unwrap_err();
        assert!(e.to_string().contains("outside the table's 3 rows"), "{e}");
    }
    assert!(table.iter().all(|x| *x == 0.0), "nothing written");
}

#[test]
fn sigmoid_tanh_cos_and_mul_backward_match_finite_differences() {
    let be = Cpu;
    let n = 40;
    let x = rnd(n, 23, 4.0);
    let r = rnd(n, 24, 1.0);
    for op in [UnaryOp::Sigmoid, UnaryOp::Tanh, UnaryOp::Relu, UnaryOp::Cos] {
        let f = |x: &[f32]| {
            let mut o = CpuBuf::from(vec![0.0; n]);
            nn::activation_fwd(&be, op, &mut o, &CpuBuf::from(x.to_vec()), n).unwrap();
            dot(&o, &r)
        };
        let mut d = CpuBuf::from(vec![0.0; n]);
        let (bx, br) = (CpuBuf::from(x.clone()), CpuBuf::from(r.clone()));
        nn::activation_bwd(&be, op, &mut d, &bx, &br, n).unwrap();
        check_grad(&format!("{op:?}"), &x, &d, n, 1e-3, 2e-3, &mut |x| f(x));
    }
    // d/da of r . (a * b) is r * b: the product's backward is the product itself.
    let b = rnd(n, 25, 2.0);
    let mul = |a: &[f32], b: &[f32]| {
        let mut o = CpuBuf::from(vec![0.0; n]);
        be.launch(Kernel::Binary {
            op: BinaryOp::Mul,
            out: &mut o,
            a: &CpuBuf::from(a.to_vec()),
            b: &CpuBuf::from(b.to_vec()),
            n,
        })
        .unwrap();
        o
    };
    let da = mul(&r, &b);
    check_grad("mul", &x, &da, n, 1e-2, 2e-3, &mut |a| dot(&mul(a, &b), &r));
}

#[test]
fn unmasked_softmax_rows_sum_to_one_and_backward_matches_finite_differences() {
    let be = Cpu;
    let (rows, width, scale) = (3, 7, 1.3);
    let x = rnd(rows * width, 26, 2.0);
    let r = rnd(rows * width, 27, 1.0);
    let soft = |x: &[f32]| {
        let mut o = CpuBuf::from(vec![0.0; rows * width]);
        be.launch(Kernel::Softmax {
            out: &mut o,
            inp: &CpuBuf::from(x.to_vec()),
            rows,
            width,
            scale,
            mask: Mask::Full,
        })
        .unwrap();
        o
    };
    let p = soft(&x);
    for row in p.chunks(width) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert!(row.iter().all(|v| *v > 0.0), "every entry is seen: {row:?}");
    }
    let mut d = CpuBuf::from(vec![0.0; rows * width]);
    be.launch(Kernel::SoftmaxBwd {
        dinp: &mut d,
        dout: &CpuBuf::from(r.clone()),
        out: &p,
        rows,
        width,
        scale,
        mask: Mask::Full,
    })
    .unwrap();
    check_grad("softmax", &x, &d, rows * width, 1e-2, 2e-3, &mut |x| {
        dot(&soft(x), &r)
    });
}

/// Checks that `net` reports the layout its config gives: `len` parameters, `ranges`, and
/// `init` from seed 7; and that zeroing its gradients zeroes all of them.
fn reports_layout(
    net: &mut dyn Net<Cpu>,
    len: usize,
    ranges: &[(usize, usize, bool)],
    init: &[f32],
) {
    assert_eq!(net.num_params(), len);
    assert_eq!(net.decay_ranges(), ranges);
    assert_eq!(net.init(7), init);
    net.buffers().1.fill(1.0);
    net.zero_grad(&Cpu).expect("zeroing the gradients");
    let (p, grads) = net.buffers();
    assert_eq!((p.len(), grads.len()), (len, len));
    assert!(grads.iter().all(|x| *x == 0.0));
}

#[test]
fn a_model_reports_its_config_layout_through_net() {
    use lockstep_engine::models::mlp::{Mlp, MlpConfig};
    let be = Cpu;
    let cfg = MlpConfig::new(vec![4, 3, 2]).unwrap();
    let mut mlp = Mlp::new(&be, cfg.clone(), &cfg.init(1), 2).unwrap();
    reports_layout(
        &mut mlp,
        cfg.num_params(),
        &cfg.decay_ranges(),
        &cfg.init(7),
    );
    let gpt = tiny();
    let mut g = Gpt::new(&be, gpt, &gpt.init(2), 1, 5).unwrap();
    reports_layout(&mut g, gpt.num_params(), &gpt.decay_ranges(), &gpt.init(7));
    let e = Mlp::new(&be, cfg, &[0.0; 3], 2)
        .err()
        .expect("too few parameters");
    assert!(
        e.to_string()
            .contains("3 parameters given for a model of 23"),
        "{e}"
    );
}

/// Runs micro-batches through a GPT cut into parts, the way a pipeline does (each part's
/// output is the next one's input; each input gradient the previous one's output gradient),
/// with a full or a split backward, and returns the loss and the whole model's gradient
/// gathered from the parts (the tied token embedding's two halves added up). `staged` passes
/// activations and gradients between parts in device buffers (`Input::Staged`, and copies
/// into `dout_mut`) rather than through the host.
#[allow(clippy::too_many_arguments)]
fn run_parts<B: lockstep_engine::Backend<Buf = CpuBuf, Ids = Vec<i32>>>(
    be: &B,
    cfg: GptConfig,
    cuts: &[std::ops::Range<usize>],
    params: &[f32],
    micro: &[(Vec<i32>, Vec<i32>)],
    split: bool,
    (b, t): (usize, usize),
    staged: bool,
) -> (f32, Vec<f32>) {
    use lockstep_engine::models::gpt::{Input, PartSpec, Pass};
    let last = cuts.len() - 1;
    let mut parts: Vec<Gpt<B>> = cuts
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let spec = PartSpec {
                layers: r.clone(),
                embed: i == 0,
                head: i == last,
            };
            let lay = lockstep_engine::models::gpt::PartLayout::new(cfg, spec.clone())
                .expect("the part runs");
            Gpt::part(be, cfg, spec, &lay.gather(params), b, t, micro.len(), split)
                .expect("the part runs")
        })
        .collect();
    let scale = 1.0 / (micro.len() * b * t) as f32;
    let mut loss = 0.0;
    // GPipe order: every forward, then every backward from the last micro-batch.
    let n = b * t * cfg.channels;
    // A device buffer between two parts, as a pipeline stage receives one (activation
    // storage: bf16 in bf16).
    let mut wire = be.activations(n).expect("a buffer");
    for (k, (ids, tg)) in micro.iter().enumerate() {
        let mut x = Vec::new();
        for (i, part) in parts.iter_mut().enumerate() {
            let input = if i == 0 {
                Input::Ids(ids)
            } else if staged {
                be.copy(part.input_mut(k), 0, &wire, 0, n)
                    .expect("the copy fits");
                Input::Staged
            } else {
                Input::Acts(&x)
            };
            let targets = (i == last).then_some(&tg[..]);
            part.forward_slot(be, k, input, targets, b, t, Some(scale))
                .expect("the part runs");
            if i < last && staged {
                be.copy(&mut wire, 0, part.output_buf(k), 0, n)
                    .expect("the copy fits");
            } else if i < last {
                x = part.output(be, k).expect("the part runs");
            } else {
                loss += part.mean_loss_slot(be, k).expect("the part runs") / micro.len() as f32;
            }
        }
    }
    for k in (0..micro.len()).rev() {
        // The output gradient on its way down through the host (without `staged`).
        let mut d: Vec<f32> = Vec::new();
        for (i, part) in parts.iter_mut().enumerate().rev() {
            let pass = if split { Pass::Input } else { Pass::Full };
            if i < last && staged {
                be.copy(part.dout_mut(), 0, &wire, 0, n)
                    .expect("the copy fits");
            } else if i < last {
                be.upload(part.dout_mut(), &d).expect("the upload fits");
            }
            part.backward_slot(be, k, pass, &mut |_, _| {})
                .expect("the part runs");
            if i > 0 && staged {
                be.copy(&mut wire, 0, part.input_grad_buf(), 0, n)
                    .expect("the copy fits");
            } else if i > 0 {
                d = be
                    .download(part.input_grad_buf(), 0, n)
                    .expect("a download");
            }
        }
    }
    if split {
        // The weight passes, in another order than the input passes.
        for k in 0..micro.len() {
            for part in &mut parts {
                part.backward_weight(be, k, &mut |_, _| {})
                    .expect("the part runs");
            }
        }
    }
    let mut whole = CpuBuf::from(vec![0.0f32; cfg.num_params()]);
    let wte = cfg.padded_vocab * cfg.channels;
    let mut tied = CpuBuf::from(vec![0.0f32; wte]);
    for part in &parts {
        let g = part.params.grads.clone();
        part.layout.scatter(&g, &mut whole);
        if part.layout.spec.embed || part.layout.spec.head {
            tied.iter_mut().zip(&g[..wte]).for_each(|(s, x)| *s += x);
        }
    }
    if cuts.len() > 1 {
        whole[..wte].copy_from_slice(&tied);
    }
    (loss, whole.to_vec())
}

/// Asserts that the gradients `g` of a model cut into parts are the whole model's within 1e-5 of
/// the largest (the tied embedding's gradient is summed in another order).
fn assert_gradients_close(g: &[f32], whole: &[f32], what: &str) {
    let worst = g
        .iter()
        .zip(whole)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let scale = whole.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    assert!(
        worst <= 1e-5 * scale,
        "{what}: gradients differ by {worst} (largest {scale})"
    );
}

#[test]
fn a_gpt_cut_into_parts_computes_the_whole_gpts_loss_and_gradient() {
    let cfg = GptConfig::new(4, 2, 8, 6, 11).unwrap();
    let (b, t) = (2, 5);
    let params = cfg.init(4);
    let micro: Vec<_> = (0..3).map(|k| batch(&cfg, b, t, 40 + k)).collect();
    let whole_model = 0..cfg.layers;
    let (whole_loss, whole) = run_parts(
        &Cpu,
        cfg,
        std::slice::from_ref(&whole_model),
        &params,
        &micro,
        false,
        (b, t),
        false,
    );
    // The whole model, one micro-batch at a time in the same order, as DDP's accumulation.
    let be = Cpu;
    let mut m = Gpt::new(&be, cfg, &params, b, t).unwrap();
    m.zero_grad(&be).unwrap();
    for (ids, tg) in micro.iter().rev() {
        m.forward(&be, ids, Some(tg), b, t, Some(1.0 / (3 * b * t) as f32))
            .unwrap();
        m.backward(&be, &mut |_, _| {}).unwrap();
    }
    assert_eq!(
        whole, *m.params.grads,
        "one part with every slot is the whole model, bit for bit"
    );
    for cuts in [
        vec![0..1, 1..4],
        vec![0..1, 1..2, 2..3, 3..4],
        vec![0..2, 2..4],
    ] {
        for split in [false, true] {
            let (loss, g) = run_parts(&Cpu, cfg, &cuts, &params, &micro, split, (b, t), false);
            assert!(
                (loss - whole_loss).abs() < 1e-6,
                "{cuts:?} split={split}: loss {loss} vs {whole_loss}"
            );
            assert_gradients_close(&g, &whole, &format!("{cuts:?} split={split}"));
        }
    }
}

#[test]
fn parts_passing_device_buffers_compute_what_parts_passing_host_vectors_do() {
    let cfg = GptConfig::new(4, 2, 8, 6, 11).unwrap();
    let (b, t) = (2, 5);
    let params = cfg.init(9);
    let micro: Vec<_> = (0..3).map(|k| batch(&cfg, b, t, 70 + k)).collect();
    for cuts in [vec![0..1, 1..4], vec![0..1, 1..2, 2..3, 3..4]] {
        for split in [false, true] {
            let host = run_parts(&Cpu, cfg, &cuts, &params, &micro, split, (b, t), false);
            let device = run_parts(&Cpu, cfg, &cuts, &params, &micro, split, (b, t), true);
            assert_eq!(host.0, device.0, "{cuts:?} split={split}: loss");
            assert_eq!(
                host.1, device.1,
                "{cuts:?} split={split}: gradients, bit for bit"
            );
        }
    }
}

#[test]
fn a_gpt_in_bf16_cut_into_parts_computes_the_whole_gpts_loss_and_gradient() {
    // Activations in bf16 between the parts too: through the host (downloaded exactly,
    // uploaded as the bf16 values they are) or device buffers, the parts compute what the
    // whole model does; only the tied embedding's gradient is summed in another order.
    let be = lockstep_engine::cpu::CpuBf16;
    let cfg = GptConfig::new(4, 2, 8, 6, 11).unwrap();
    let (b, t) = (2, 5);
    let params = cfg.init(5);
    let micro: Vec<_> = (0..3).map(|k| batch(&cfg, b, t, 90 + k)).collect();
    let all = 0..cfg.layers;
    let whole_model = std::slice::from_ref(&all);
    let (whole_loss, whole) =
        run_parts(&be, cfg, whole_model, &params, &micro, false, (b, t), false);
    let (fp32_loss, _) = run_parts(
        &Cpu,
        cfg,
        whole_model,
        &params,
        &micro,
        false,
        (b, t),
        false,
    );
    assert_ne!(whole_loss, fp32_loss, "the bf16 model is not FP32's");
    for cuts in [vec![0..1, 1..4], vec![0..1, 1..2, 2..3, 3..4]] {
        for split in [false, true] {
            let host = run_parts(&be, cfg, &cuts, &params, &micro, split, (b, t), false);
            let device = run_parts(&be, cfg, &cuts, &params, &micro, split, (b, t), true);
            assert_eq!(
                host, device,
                "{cuts:?} split={split}: host and device differ"
            );
            assert_eq!(host.0, whole_loss, "{cuts:?} split={split}: loss");
            assert_gradients_close(&host.1, &whole, &format!("{cuts:?} split={split}"));
        }
    }
}

#[test]
fn a_copy_past_the_end_of_a_buffer_is_refused() {
    use lockstep_engine::Backend;
    let be = Cpu;
    let src = CpuBuf::from(vec![1.0f32, 2.0, 3.0, 4.0]);
    let mut dst = CpuBuf::from(vec![0.0f32; 3]);
    be.copy(&mut dst, 1, &src, 2, 2).expect("fits");
    assert_eq!(*dst, [0.0, 3.0, 4.0]);
    let e = be.copy(&mut dst, 2, &src, 0, 2).expect_err("past dst");
    assert!(e.to_string().contains("reaches past the end"), "{e}");
    assert!(be.copy(&mut dst, 0, &src, 3, 2).is_err(), "past src");
    assert!(
        be.copy(&mut dst, usize::MAX, &src, 0, 2).is_err(),
        "overflow"
    );
}

#[test]
fn a_part_layout_gathers_and_scatters_the_whole_models_tensors() {
    use lockstep_engine::models::gpt::{PartLayout, PartSpec};
    let cfg = GptConfig::new(3, 2, 8, 6, 11).unwrap();
    let whole: Vec<f32> = (0..cfg.num_params()).map(|i| i as f32).collect();
    let spec = |layers, embed, head| PartSpec {
        layers,
        embed,
        head,
    };
    let first = PartLayout::new(cfg, spec(0..1, true, false)).unwrap();
    let mid = PartLayout::new(cfg, spec(1..2, false, false)).unwrap();
    let last = PartLayout::new(cfg, spec(2..3, false, true)).unwrap();
    // The parts hold every parameter once, and the token embedding twice.
    let wte = cfg.padded_vocab * cfg.channels;
    assert_eq!(first.len() + mid.len() + last.len(), cfg.num_params() + wte);
    assert_eq!(first.gather(&whole)[..], whole[..cfg.block(1)]);
    assert_eq!(mid.gather(&whole)[..], whole[cfg.block(1)..cfg.block(2)]);
    let l = last.gather(&whole);
    assert_eq!(l[..wte], whole[..wte], "the head's tied embedding");
    assert_eq!(l[wte..], whole[cfg.block(2)..]);
    assert_eq!(last.lnf(), wte + cfg.block_len());
    let mut back = vec![-1.0f32; cfg.num_params()];
    for p in [&first, &mid, &last] {
        p.scatter(&p.gather(&whole), &mut back);
    }
    assert_eq!(back, whole);
    // Decay ranges cover each part once and decay exactly the blocks' weight matrices.
    for p in [&first, &mid, &last] {
        let r = p.decay_ranges();
        assert_eq!(r.iter().map(|x| x.1).sum::<usize>(), p.len());
        let decayed: usize = r.iter().filter(|x| x.2).map(|x| x.1).sum();
        assert_eq!(decayed, 12 * cfg.channels * cfg.channels);
    }
    assert!(PartLayout::new(cfg, spec(2..2, false, true)).is_err());
    assert!(PartLayout::new(cfg, spec(2..4, false, true)).is_err());
}
