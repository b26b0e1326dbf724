//! The fully connected layer: `out = inp W^T + b` and its backward, GEMMs and a broadcast bias
//! (its gradient: column sums).

use crate::Result;
use crate::backend::{Backend, Gemm, Kernel, Op};

/// `out (n x oc) = inp (n x c) W^T + b`, W stored oc x c row-major.
#[allow(clippy::too_many_arguments)]
pub fn matmul_fwd<B: Backend>(
    be: &B,
    out: &mut B::Buf,
    inp: &B::Buf,
    params: &B::Buf,
    w: usize,
    bias: Option<usize>,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    let g = Gemm::single(Op::T, Op::N, oc, n, c, 0.0);
    be.gemm(&g, (params, w), (inp, 0), (out, 0))?;
    if let Some(b) = bias {
        be.launch(Kernel::AddRow {
            out,
            row: (params, b),
            n,
            width: oc,
        })?;
    }
    Ok(())
}

/// Backward of [`matmul_fwd`]: overwrites `dinp`, accumulates the weight and bias gradients
/// ([`matmul_bwd_input`], then [`matmul_bwd_weight`]).
#[allow(clippy::too_many_arguments)]
pub fn matmul_bwd<B: Backend>(
    be: &B,
    dinp: &mut B::Buf,
    grads: &mut B::Buf,
    dw: usize,
    dbias: Option<usize>,
    dout: &B::Buf,
    inp: &B::Buf,
    params: &B::Buf,
    w: usize,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    matmul_bwd_input(be, dinp, dout, params, w, n, c, oc)?;
    matmul_bwd_weight(be, grads, dw, dbias, dout, inp, n, c, oc)
}

/// The input-gradient half of [`matmul_bwd`] (B in the zero-bubble schedules): overwrites
/// `dinp (n x c) = dout (n x oc) W`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_bwd_input<B: Backend>(
    be: &B,
    dinp: &mut B::Buf,
    dout: &B::Buf,
    params: &B::Buf,
    w: usize,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    let gi = Gemm::single(Op::N, Op::N, c, n, oc, 0.0);
    be.gemm(&gi, (params, w), (dout, 0), (dinp, 0))
}

/// The weight-gradient half of [`matmul_bwd`] (W in the zero-bubble schedules): accumulates
/// `dW (oc x c) += dout^T inp` at `dw` and the bias gradient (column sums of `dout`) at `dbias`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_bwd_weight<B: Backend>(
    be: &B,
    grads: &mut B::Buf,
    dw: usize,
    dbias: Option<usize>,
    dout: &B::Buf,
    inp: &B::Buf,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    let gw = Gemm::single(Op::N, Op::T, c, oc, n, 1.0);
    be.gemm(&gw, (inp, 0), (dout, 0), (grads, dw))?;
    if let Some(db) = dbias {
        be.launch(Kernel::SumRows {
            dst: (grads, db),
            src: dout,
            n,
            width: oc,
        })?;
    }
    Ok(())
}
