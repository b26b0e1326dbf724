//! bf16 GEMMs (`Precision::Bf16`) emulated on the CPU (`CpuBf16`): the arithmetic the CUDA
//! backend runs in bf16, checked here against naive references, and whole GPT training steps
//! in bf16 against FP32.

use lockstep_engine::check::gpt_steps;
use lockstep_engine::conformance::{conformance, reference_gemm};
use lockstep_engine::cpu::{Cpu, CpuBf16};
use lockstep_engine::models::gpt::GptConfig;
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
        let mut got = c0.clone();
        // At offsets, so that the rounded copies start where the operands do.
        CpuBf16.gemm(&g, (&a, 7), (&b, 3), (&mut got, 0)).unwrap();
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
    // GEMMs (and the batched attention ones) carry bf16's rounding, 2e-2 of the largest value
    // for sums of up to a few hundred products; every other primitive is FP32 and keeps the
    // suite's own tolerances.
    let rows = conformance(&CpuBf16, 2e-2).unwrap();
    let bad: Vec<_> = rows.iter().filter(|r| !r.ok()).collect();
    assert!(bad.is_empty(), "outside tolerance: {bad:#?}");
    // The GEMMs did round: in FP32 they are 1e-6 from the reference.
    let gemm = rows
        .iter()
        .filter(|r| r.name.starts_with("gemm"))
        .map(|r| r.rel)
        .fold(0.0f32, f32::max);
    assert!(gemm > 1e-4, "the bf16 GEMMs match FP32 to {gemm:e}");
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
