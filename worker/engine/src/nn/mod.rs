//! The layers, each an explicit forward and backward over offsets into the flat parameter and
//! gradient buffers (parameter gradients accumulate, activation gradients are overwritten).

pub mod attention;
pub mod linear;

pub use attention::{attention_bwd, attention_fwd};
pub use linear::{matmul_bwd, matmul_fwd};
