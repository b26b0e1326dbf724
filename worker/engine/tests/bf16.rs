//! bf16 GEMMs (`Precision::Bf16`) emulated on the CPU (`CpuBf16`): the arithmetic the CUDA
//! backend runs in bf16, checked here against naive references, and whole GPT training steps
//! in bf16 against FP32.

use lockstep_engine::check::{gpt_profile, gpt_steps};
use lockstep_engine::conformance::{conformance, reference_gemm};
use lockstep_engine::cpu::{Cpu, CpuBf16, CpuBuf};
use lockstep_engine::models::gpt::{Gpt, GptConfig};
use lockstep_engine::{Backend, Gemm, Op, bf16};
use rand::{Rng, SeedableRng};

/// `n` values uniform in `-scale..scale`, drawn from `seed`.
fn rnd(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| r.random_range(-scale..scale)).collect()
}

/// Largest |x - y| over the largest |y|.
fn rel(x: &[f32], y: &[f64]) -> f64 {
    let err = x
        .iter()
        .zip(y)
        .map(|(a, b)| (f64::from(*a) - b).abs())
        .fold(0.0, f64::max);
    err / y.iter().map(|v| v.abs()).fold(1e-30, f64::max)
}

#[test]
fn a_bf16_gemm_is_the_fp32_product_of_the_operands_rounded_to_bf16() {
    for (ta, tb) in [
        (Op::N, Op::N),
        (Op::N, Op::T),
        (Op::T, Op::N),
        (Op::T, Op::T),
    ] {
        let mut g = Gemm::single(ta, tb, 48, 40, 300, 0.5);
        g.alpha = 0.75;
        let (a, b, c0) = (
            rnd(48 * 300 + 7, 1, 1.0),
            rnd(300 * 40 + 3, 2, 1.0),
            rnd(48 * 40, 3, 1.0),
        );
        let mut got = CpuBuf::from(c0.clone());
        let (da, db) = (CpuBuf::from(a.clone()), CpuBuf::from(b.clone()));
        // At offsets, so that the rounded copies start where the operands do.
        CpuBf16.gemm(&g, (&da, 7), (&db, 3), (&mut got, 0)).unwrap();
        let (mut ra, mut rb) = (a.clone(), b.clone());
        bf16::round_all(&mut ra);
        bf16::round_all(&mut rb);
        let same_arithmetic = reference_gemm(&g, (&ra, 7), (&rb, 3), (&c0, 0));
        let fp32 = reference_gemm(&g, (&a, 7), (&b, 3), (&c0, 0));
        // Against the rounded operands: FP32 summation error only.
        let r = rel(&got, &same_arithmetic);
        assert!(r < 1e-6, "{ta:?}{tb:?}: {r:e} from the rounded product");
        // Against the FP32 operands: bf16's error (each operand 2^-9 relative on average),
        // within 1e-2 of the largest value, and certainly more than FP32's own.
        let r = rel(&got, &fp32);
        assert!(
            (1e-4..1e-2).contains(&r),
            "{ta:?}{tb:?}: {r:e} from the FP32 product"
        );
    }
}

#[test]
fn every_primitive_in_bf16_matches_its_fp32_reference_within_bf16_tolerance() {
    // Activations in bf16 storage: every output written into one is a bf16 value (the suite
    // fails one that is not) within `BF16_TOL` of the f64 reference; GEMMs within 2e-2.
    let rows = conformance(&CpuBf16, 2e-2).unwrap();
    let bad: Vec<_> = rows.iter().filter(|r| !r.ok()).collect();
    assert!(bad.is_empty(), "outside tolerance: {bad:#?}");
    let rel = |name: &str| {
        rows.iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("no row {name}"))
            .rel
    };
    // The activation outputs did round (FP32 would be within 1e-6) ...
    for name in [
        "gemm NN batch 3",
        "unary Gelu",
        "softmax bwd Causal",
        "attention (fused) 3x45x40",
        "layernorm",
        "layernorm bwd: dinp",
    ] {
        assert!(rel(name) > 5e-4, "{name}: {:e}, as if in FP32", rel(name));
    }
    // ... and the FP32 ones did not: statistics, parameter gradients, optimizer state.
    for name in [
        "layernorm: rstd",
        "layernorm bwd: dw, db",
        "attention (fused) lse 3x45x40",
        "sum rows",
        "crossentropy with grad: losses",
        "adamw: params",
    ] {
        assert!(rel(name) < 1e-6, "{name}: {:e}, as if in bf16", rel(name));
    }
    // Conversions into bf16 round to nearest, ties to even, exactly as `bf16::round`; out of it
    // they are exact.
    for name in [
        "copy into activations",
        "upload into activations",
        "copy out of activations",
        "gather rows",
    ] {
        assert_eq!(rel(name), 0.0, "{name}");
    }
    // The pass with FP32 outputs: bf16 inputs, outputs unrounded (bf16's would be 1e-3).
    for name in ["unary Gelu", "softmax bwd Causal", "layernorm"] {
        let r = rel(&format!("{name} (FP32 output)"));
        assert!(r < 1e-6, "{name} (FP32 output): {r:e}, as if in bf16");
    }
}

#[test]
fn gpt_training_in_bf16_follows_fp32() {
    let cfg = GptConfig::new(2, 4, 64, 64, 256).unwrap();
    let steps = 8;
    let fp32 = gpt_steps(&Cpu, cfg, 4, 64, steps).unwrap();
    let bf = gpt_steps(&CpuBf16, cfg, 4, 64, steps).unwrap();
    let losses = |o: &[(String, Vec<f32>)]| o[0].1.clone();
    let (l32, l16) = (losses(&fp32), losses(&bf));
    eprintln!("fp32 losses {l32:?}\nbf16 losses {l16:?}");
    assert_eq!(l32.len(), steps + 1);
    // Both learn: the loss falls by more than a tenth over the steps.
    for l in [&l32, &l16] {
        assert!(l[steps] < 0.9 * l[0], "no learning: {l:?}");
    }
    // bf16 stays within 1% of FP32 at every step, and is not FP32.
    let worst = l32
        .iter()
        .zip(&l16)
        .map(|(a, b)| ((a - b) / a).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-2, "bf16 loss {worst:e} from FP32");
    assert!(l32 != l16, "bf16 training is bit-identical to FP32");
    // The first step's gradients: bf16's error, 2e-2 of the largest.
    let g32: Vec<f64> = fp32[1].1.iter().map(|v| f64::from(*v)).collect();
    let r = rel(&bf[1].1, &g32);
    assert!(r < 2e-2, "bf16 gradients {r:e} from FP32");
}

/// One forward pass of `cfg` without targets on `be`: the logits, the residual stream after
/// the last block, and the bytes of a micro-batch in flight.
fn gpt_forward<B: Backend>(
    be: &B,
    cfg: GptConfig,
    b: usize,
    t: usize,
) -> (Vec<f32>, Vec<f32>, usize) {
    let ids: Vec<i32> = (0..(b * t) as i32).map(|i| i % cfg.vocab as i32).collect();
    let mut m = Gpt::new(be, cfg, &cfg.init(3), b, t).expect("a model");
    m.forward(be, &ids, None, b, t, None).expect("forward");
    let bytes = m.slot_bytes();
    (
        m.logits(be).expect("logits"),
        m.output(be, 0).expect("output"),
        bytes,
    )
}

#[test]
fn a_gpt_in_bf16_stores_its_activations_in_bf16() {
    let cfg = GptConfig::new(2, 2, 32, 16, 64).unwrap();
    let (logits16, resid16, bytes16) = gpt_forward(&CpuBf16, cfg, 2, 16);
    let (logits32, resid32, bytes32) = gpt_forward(&Cpu, cfg, 2, 16);
    let bf16_value = |x: &f32| x.to_bits() & 0xffff == 0;
    // The logits and the residual stream are bf16 values in bf16, and not in FP32.
    assert!(logits16.iter().all(bf16_value) && resid16.iter().all(bf16_value));
    assert!(!logits32.iter().all(bf16_value) && !resid32.iter().all(bf16_value));
    // Close to FP32's all the same: a few bf16 ulps of the largest logit.
    let want: Vec<f64> = logits32.iter().map(|v| f64::from(*v)).collect();
    let r = rel(&logits16, &want);
    assert!(r < 3e-2, "bf16 logits {r:e} from FP32");
    // A micro-batch in flight costs about half the bytes (the FP32 statistics stay 4 bytes).
    let ratio = bytes16 as f64 / bytes32 as f64;
    assert!(
        (0.5..0.52).contains(&ratio),
        "bf16 slot is {ratio} of FP32's"
    );
}

#[test]
fn the_fused_element_wise_kernels_train_a_gpt_to_the_same_bits_in_fp32_and_in_bf16() {
    let cfg = GptConfig::new(2, 4, 64, 64, 256).unwrap();
    let fused = cfg.with_fused_ops(true);
    assert!(fused.fused_ops() && !cfg.fused_ops());
    for (name, plain, with) in [
        (
            "fp32",
            gpt_steps(&Cpu, cfg, 2, 32, 3).unwrap(),
            gpt_steps(&Cpu, fused, 2, 32, 3).unwrap(),
        ),
        (
            "bf16",
            gpt_steps(&CpuBf16, cfg, 2, 32, 3).unwrap(),
            gpt_steps(&CpuBf16, fused, 2, 32, 3).unwrap(),
        ),
    ] {
        for ((what, a), (_, b)) in plain.iter().zip(&with) {
            assert_eq!(a, b, "{name}: {what} differ with the fused kernels");
        }
    }
    // And the fused kernels did run, in place of the ones they fuse: per step, per block, one
    // of each, and one GELU fewer.
    let calls = |c: GptConfig, kernel: &str| {
        gpt_profile(&Cpu, c, 2, 32, 1)
            .unwrap()
            .iter()
            .find(|(name, _, _)| name == kernel)
            .map_or(0.0, |(_, _, calls)| *calls)
    };
    for kernel in ["bias + gelu (fused)", "residual + layernorm (fused)"] {
        assert_eq!(calls(fused, kernel), 2.0, "{kernel}");
        assert_eq!(calls(cfg, kernel), 0.0, "{kernel}");
    }
    assert_eq!(calls(cfg, "gelu") - calls(fused, "gelu"), 2.0);
}
