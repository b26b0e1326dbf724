//! The networks, each written once on the [`crate::nn`] layers over one flat parameter buffer.

pub mod gpt;
pub mod mlp;

use crate::Result;
use crate::backend::Backend;

/// What the training loop needs of a model, whichever it is.
pub trait Net<B: Backend> {
    /// Number of parameters.
    fn num_params(&self) -> usize;
    /// Weight-decay ranges: `(offset, length, decays)`.
    fn decay_ranges(&self) -> Vec<(usize, usize, bool)>;
    /// Parameters initialised from `seed`.
    fn init(&self, seed: u64) -> Vec<f32>;
    /// Parameters and gradients.
    fn buffers(&mut self) -> (&mut B::Buf, &mut B::Buf);
    /// Zeroes the gradients (before the first micro-step of an optimizer step).
    fn zero_grad(&mut self, be: &B) -> Result<()> {
        let n = self.num_params();
        be.fill_zero(self.buffers().1, 0, n)
    }
}
