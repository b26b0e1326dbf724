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

/// A linear layer's bias and GELU in one kernel ([`Kernel::BiasGelu`]): adds the bias at
/// `bias` in `params` to each of the `n` rows of `width` of `pre` (a product without its
/// bias), and writes GELU of the result into `out`. Its backward is [`activation_bwd`] from
/// `pre`, then the linear layer's.
pub fn bias_gelu_fwd<B: Backend>(
    be: &B,
    out: &mut B::Buf,
    pre: &mut B::Buf,
    params: &B::Buf,
    bias: usize,
    n: usize,
    width: usize,
) -> Result<()> {
    if n * width == 0 {
        return Ok(());
    }
    be.launch(Kernel::BiasGelu {
        out,
        pre,
        bias: (params, bias),
        n,
        width,
    })
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
