//! The fused attention's CPU twin (`lockstep_engine::flash`, run by `Kernel::AttentionFwd` and
//! `Kernel::AttentionBwd`) against the unfused path (GEMMs around a causal softmax), forward
//! and backward, alone and inside GPT training.

use lockstep_engine::check::gpt_steps;
use lockstep_engine::cpu::{Cpu, CpuBuf};
use lockstep_engine::models::gpt::GptConfig;
use lockstep_engine::nn::{attention_bwd, attention_fused_bwd, attention_fused_fwd, attention_fwd};
use lockstep_engine::{Backend, Kernel};
use rand::{Rng, SeedableRng};

fn rnd(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| r.random_range(-scale..scale)).collect()
}

/// Largest |x - y| over the largest |y|.
fn rel(x: &[f32], y: &[f32]) -> f32 {
    assert_eq!(x.len(), y.len());
    let err = x
        .iter()
        .zip(y)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    err / y.iter().map(|v| v.abs()).fold(1e-30, f32::max)
}

#[test]
fn fused_attention_matches_the_unfused_path_forward_and_backward() {
    let be = Cpu;
    // t = 128 runs the unfused path in causal blocks; t = 45 is not a multiple of the tile.
    for (b, t, nh, hs) in [(2, 128, 2, 16), (1, 45, 3, 24)] {
        let c = nh * hs;
        let btc = b * t * c;
        let qkv = CpuBuf::from(rnd(3 * btc, 7, 1.5));
        let dout = CpuBuf::from(rnd(btc, 8, 1.0));
        // Unfused.
        let z = |n: usize| be.zeros(n).unwrap();
        let (mut out_u, mut qkvr_u, mut att, mut preatt, mut vacc) = (
            z(btc),
            z(3 * btc),
            z(b * nh * t * t),
            z(b * nh * t * t),
            z(btc),
        );
        attention_fwd(
            &be,
            &mut out_u,
            &mut qkvr_u,
            &mut att,
            &mut preatt,
            &mut vacc,
            &qkv,
            b,
            t,
            nh,
            hs,
        )
        .unwrap();
        let (mut dqkv_u, mut dqkvr, mut datt, mut dpreatt, mut dvacc) = (
            z(3 * btc),
            z(3 * btc),
            z(b * nh * t * t),
            z(b * nh * t * t),
            z(btc),
        );
        attention_bwd(
            &be,
            &mut dqkv_u,
            &mut dqkvr,
            &mut datt,
            &mut dpreatt,
            &mut dvacc,
            &dout,
            &qkvr_u,
            &att,
            b,
            t,
            nh,
            hs,
        )
        .unwrap();
        // Fused: no t x t buffer at all.
        let (mut out_f, mut qkvr_f, mut lse, mut vacc_f) =
            (z(btc), z(3 * btc), z(b * nh * t), z(btc));
        attention_fused_fwd(
            &be,
            &mut out_f,
            &mut qkvr_f,
            &mut lse,
            &mut vacc_f,
            &qkv,
            b,
            t,
            nh,
            hs,
        )
        .unwrap();
        let (mut dqkv_f, mut dqkvr_f, mut oh, mut doh, mut delta) =
            (z(3 * btc), z(3 * btc), z(btc), z(btc), z(b * nh * t));
        attention_fused_bwd(
            &be,
            &mut dqkv_f,
            &mut dqkvr_f,
            &mut oh,
            &mut doh,
            &mut delta,
            &dout,
            &out_f,
            &qkvr_f,
            &lse,
            b,
            t,
            nh,
            hs,
        )
        .unwrap();
        let r = rel(&out_f, &out_u);
        assert!(r < 1e-5, "{b}x{t}x{nh}x{hs}: forward {r:e}");
        let r = rel(&dqkv_f, &dqkv_u);
        assert!(r < 1e-5, "{b}x{t}x{nh}x{hs}: backward {r:e}");
        // lse is each query's log-sum-exp: a query sees at least itself, so the first query's
        // is its own scaled score q0 . k0 / sqrt(hs).
        let q0k0: f32 = (0..hs).map(|d| qkvr_f[d] * qkvr_f[btc + d]).sum();
        assert!((lse[0] - q0k0 / (hs as f32).sqrt()).abs() < 1e-5);
    }
}

#[test]
fn a_gpt_trains_the_same_with_fused_attention() {
    let cfg = GptConfig::new(2, 4, 64, 64, 256).unwrap();
    let fused = cfg.with_fused_attention(true).unwrap();
    let a = gpt_steps(&Cpu, cfg, 2, 64, 4).unwrap();
    let f = gpt_steps(&Cpu, fused, 2, 64, 4).unwrap();
    for ((name, x), (_, y)) in a.iter().zip(&f) {
        let r = rel(y, x);
        assert!(r < 1e-4, "{name}: fused {r:e} from unfused");
    }
}

#[test]
fn fused_attention_refuses_heads_wider_than_its_kernels_take() {
    let wide = GptConfig::new(1, 1, 256, 16, 64).unwrap();
    let err = wide.with_fused_attention(true).unwrap_err().to_string();
    assert!(err.contains("256") && err.contains("unfused"), "{err}");
    let mut out = CpuBuf::from(vec![0.0; 256]);
    let mut lse = CpuBuf::from(vec![0.0; 1]);
    let err = Cpu
        .launch(Kernel::AttentionFwd {
            out: &mut out,
            lse: &mut lse,
            qkv: &CpuBuf::from(vec![0.0; 768]),
            heads: 1,
            t: 1,
            hs: 256,
            scale: 1.0,
        })
        .unwrap_err();
    assert!(err.to_string().contains("fused attention"), "{err}");
}
