//! The loss: softmax cross-entropy, fused, with the gradient written in place of the logits.

use crate::Result;
use crate::backend::{Backend, Kernel};

/// Softmax cross-entropy of `n` rows of logits (`vp` wide, the first `v` real) against
/// `targets`: each row's loss into `losses`; with `grad: Some(dloss)`, the logits are
/// overwritten with `dloss * (softmax - onehot)` (0 in the padding), ready for backward.
#[allow(clippy::too_many_arguments)]
pub fn crossentropy<B: Backend>(
    be: &B,
    losses: &mut B::Buf,
    logits: &mut B::Buf,
    targets: &B::Ids,
    n: usize,
    v: usize,
    vp: usize,
    grad: Option<f32>,
) -> Result<()> {
    be.launch(Kernel::CrossEntropy {
        losses,
        logits,
        targets,
        n,
        v,
        vp,
        grad,
    })
}
