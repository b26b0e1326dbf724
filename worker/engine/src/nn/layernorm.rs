//! Layer normalisation of each row over its channels, with a weight and a bias per channel.

use crate::Result;
use crate::backend::{Backend, Kernel};

/// The residual connection and the layer norm after it in one kernel
/// ([`Kernel::ResidualLayerNorm`]): `sum = a + b`, then [`layernorm_fwd`] of `sum` into `out`.
#[allow(clippy::too_many_arguments)]
pub fn residual_layernorm_fwd<B: Backend>(
    be: &B,
    sum: &mut B::Buf,
    out: &mut B::Buf,
    (mean, rstd): (&mut B::Buf, &mut B::Buf),
    a: &B::Buf,
    b: &B::Buf,
    params: &B::Buf,
    w: usize,
    n: usize,
    c: usize,
) -> Result<()> {
    be.launch(Kernel::ResidualLayerNorm {
        sum,
        out,
        mean,
        rstd,
        a,
        b,
        params: (params, w),
        n,
        c,
    })
}

/// Layer norm of `n` rows of `c` from `inp` into `out`, with the weight at `w` in `params` and
/// the bias after it; keeps each row's mean and reciprocal standard deviation for backward.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_fwd<B: Backend>(
    be: &B,
    out: &mut B::Buf,
    mean: &mut B::Buf,
    rstd: &mut B::Buf,
    inp: &B::Buf,
    params: &B::Buf,
    w: usize,
    n: usize,
    c: usize,
) -> Result<()> {
    be.launch(Kernel::LayerNorm {
        out,
        mean,
        rstd,
        inp,
        params: (params, w),
        n,
        c,
    })
}

/// Backward of [`layernorm_fwd`]: accumulates the input gradient into `dinp` (the residual
/// stream's gradient) and the weight and bias gradients into `grads` at `dw` and `dw + c`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_bwd<B: Backend>(
    be: &B,
    dinp: &mut B::Buf,
    grads: &mut B::Buf,
    dw: usize,
    dout: &B::Buf,
    inp: &B::Buf,
    params: &B::Buf,
    w: usize,
    mean: &B::Buf,
    rstd: &B::Buf,
    n: usize,
    c: usize,
) -> Result<()> {
    be.launch(Kernel::LayerNormBwd {
        dinp,
        grads: (grads, dw),
        dout,
        inp,
        params: (params, w),
        mean,
        rstd,
        n,
        c,
    })
}
