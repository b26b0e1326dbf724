//! The layers, each an explicit forward and backward written on the [`crate::Kernel`]
//! primitives, over offsets into the flat parameter and gradient buffers. Parameter gradients
//! accumulate; activation gradients are overwritten, except layer norm's input gradient, which
//! accumulates into the residual stream's.

pub mod activation;
pub mod attention;
pub mod embedding;
pub mod layernorm;
pub mod linear;
pub mod loss;
pub mod residual;

pub use activation::{activation_bwd, activation_fwd, bias_gelu_fwd};
pub use attention::{attention_bwd, attention_fused_bwd, attention_fused_fwd, attention_fwd};
pub use embedding::{encoder_bwd, encoder_fwd};
pub use layernorm::{layernorm_bwd, layernorm_fwd, residual_layernorm_fwd};
pub use linear::{matmul_bwd, matmul_bwd_input, matmul_bwd_weight, matmul_fwd};
pub use loss::crossentropy;
pub use residual::residual_fwd;
