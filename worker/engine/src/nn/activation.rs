//! Element-wise activations (the functions of [`UnaryOp`]: GELU, ReLU, sigmoid, tanh), forward
//! and backward.

use crate::Result;
use crate::backend::{Backend, Kernel, UnaryOp};

/// `out = op(inp)` over `n` values (nothing when `n` is 0).
pub fn activation_fwd<B: Backend>(
    be: &B,
    op: UnaryOp,
    out: &mut B::Buf,
    inp: &B::Buf,
    n: usize,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    be.launch(Kernel::Unary { op, out, inp, n })
}

/// Backward of [`activation_fwd`] from its input: overwrites `dinp = op'(inp) * dout`
/// (nothing when `n` is 0).
pub fn activation_bwd<B: Backend>(
    be: &B,
    op: UnaryOp,
    dinp: &mut B::Buf,
    inp: &B::Buf,
    dout: &B::Buf,
    n: usize,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    be.launch(Kernel::UnaryBwd {
        op,
        dinp,
        inp,
        dout,
        n,
    })
}
