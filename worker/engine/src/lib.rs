//! lockstep-engine, the training engine: explicit forward and backward passes over flat buffers, in the style
//! of llm.c.
//!
//! A [`Backend`] owns memory and runs a few generic primitives, the [`Kernel`]s, through one
//! method, [`Backend::launch`]: a strided batched GEMM with cuBLAS's column-major semantics;
//! element-wise functions chosen by op enums ([`UnaryOp`]: GELU, ReLU, sigmoid, tanh;
//! [`BinaryOp`]: add, subtract, multiply); row gather and scatter-add by index; a broadcast row
//! add and column sums; an axis permutation; softmax ([`Mask`]: full or causal); layer norm;
//! fused softmax cross-entropy; AdamW. The layers ([`nn`]) are written once on these, and the
//! models ([`models::gpt::Gpt`], [`models::mlp::Mlp`]) on the layers, so the CPU backend
//! ([`cpu::Cpu`], the reference) and the CUDA backend (`cuda::Cuda`, cuBLAS and NVRTC kernels)
//! run exactly the same algorithm, and can be compared primitive by primitive.
//!
//! Parameters and gradients each live in one flat buffer ([`models::Params`]); a layer's
//! weights are an offset in it. Activations are one buffer per tensor. Every primitive that
//! reads parameters takes the parameter buffer and an offset, and every primitive that writes
//! parameter gradients accumulates into the gradient buffer at an offset (so gradient
//! accumulation over micro-steps is free).
//!
//! Layout: [`backend`] (the device interface and its kernels) with [`cpu`] (the reference) and
//! `cuda` (cuBLAS, NVRTC kernels); [`nn`] the layers, each an explicit forward and backward;
//! [`models`] the networks written on the layers (MLP, GPT) and the [`Net`] trait;
//! [`optim`] AdamW and the learning-rate schedule; [`check`] the numerical comparisons of two
//! backends; [`conformance`] every primitive on one backend against naive references;
//! [`profile`] per-primitive timing. The engine knows nothing of communication, rendezvous or
//! the worker's runtime: data-parallel and pipeline training drive it from outside through the
//! flat buffers.

pub mod backend;
pub mod bf16;
pub mod check;
pub mod conformance;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod flash;
pub mod models;
pub mod nn;
pub mod optim;
pub mod profile;

pub use backend::{
    AdamStep, At, AtMut, Backend, BinaryOp, DType, Gemm, Kernel, Mask, Op, Precision, UnaryOp,
};
pub use models::Net;
/// An engine failure: a device error, or a shape the engine cannot run.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The device (CUDA driver, cuBLAS, NVRTC) reported an error.
    #[error("{what}: {detail}")]
    Device {
        /// What the engine was doing.
        what: &'static str,
        /// The device's own words.
        detail: String,
    },
    /// A configuration the engine cannot run, with the reason.
    #[error("{0}")]
    Config(String),
}

/// Result of an engine operation.
pub type Result<T> = std::result::Result<T, EngineError>;
