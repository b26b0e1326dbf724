//! The conformance suite on the CPU backend: every primitive, each op and mask, against its
//! naive reference (see `lockstep_engine::conformance`).

use std::collections::BTreeSet;

use lockstep_engine::conformance::conformance;
use lockstep_engine::cpu::Cpu;
use lockstep_engine::profile::Profiled;

#[test]
fn every_primitive_on_the_cpu_matches_its_naive_reference() {
    // Through the profiler, which names every kernel launched: the suite must cover them all.
    let be = Profiled::new(&Cpu);
    let rows = conformance(&be, 1e-4).unwrap();
    for r in &rows {
        eprintln!("{:<40} rel {:.2e} (tolerance {:.0e})", r.name, r.rel, r.tol);
    }
    let bad: Vec<_> = rows.iter().filter(|r| !r.ok()).collect();
    assert!(bad.is_empty(), "outside tolerance: {bad:#?}");
    let launched: BTreeSet<String> = be.report().into_iter().map(|r| r.0).collect();
    for kernel in [
        "gemm (weight gradients)",
        "gemm (attention, batched)",
        "gelu",
        "gelu bwd",
        "relu",
        "relu bwd",
        "sigmoid",
        "sigmoid bwd",
        "tanh",
        "tanh bwd",
        "add",
        "sub",
        "mul",
        "gather rows",
        "scatter-add rows",
        "add row (bias)",
        "sum rows (bias bwd)",
        "sum of squares",
        "permute",
        "softmax",
        "softmax bwd",
        "attention (fused)",
        "attention bwd (fused)",
        "layernorm",
        "layernorm bwd",
        "bias + gelu (fused)",
        "residual + layernorm (fused)",
        "crossentropy",
        "adamw",
    ] {
        assert!(
            launched.contains(kernel),
            "the suite never runs {kernel}: {launched:?}"
        );
    }
}
