//! lockstep-engine, the training engine: explicit forward and backward passes over flat buffers, in the style
//! of llm.c.
//!
//! A [`Backend`] owns memory and runs a small set of primitives: one strided batched GEMM with
//! cuBLAS's column-major semantics, and a handful of element-wise and row-wise kernels
//! (embedding, layer norm, GELU, causal softmax, fused softmax cross-entropy, AdamW). The
//! models ([`models::gpt::Gpt`]) are written once on top of these primitives, so the CPU backend
//! ([`cpu::Cpu`], the reference) and the CUDA backend (`cuda::Cuda`, cuBLAS and NVRTC
//! kernels) run exactly the same algorithm, and can be compared layer by layer.
//!
//! Parameters and gradients each live in one flat buffer; a layer's weights are an offset in
//! it. Activations are one buffer per tensor. Every primitive that reads parameters takes the
//! parameter buffer and offsets, and every primitive that writes gradients accumulates into
//! the gradient buffer at offsets (so gradient accumulation over micro-steps is free).
//!
//! Layout: [`backend`] (the device interface) with [`cpu`] (the reference) and `cuda` (cuBLAS,
//! NVRTC kernels); [`nn`] the layers, each an explicit forward and backward; [`models`] the
//! networks written on the layers (MLP, GPT); [`optim`] AdamW and the learning-rate schedule;
//! [`check`] the numerical comparisons of two backends; [`profile`] per-primitive timing. The
//! engine knows nothing of communication, rendezvous or the worker's runtime: data-parallel and
//! pipeline training drive it from outside through the flat buffers.

pub mod backend;
pub mod check;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod models;
pub mod nn;
pub mod optim;
pub mod profile;

pub use backend::{AdamStep, At, Backend, Gemm, Op};
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
