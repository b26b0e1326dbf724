//! GPT's encoder: a token embedding gathered by id plus a position embedding, forward (a row
//! gather and a broadcast add) and backward (a scatter-add into the token rows and column sums
//! into the positions).

use crate::Result;
use crate::backend::{Backend, Kernel};

/// `out[b, t, :] = wte[ids[b, t], :] + wpe[t, :]` for `b` sequences of `t` tokens, with the
/// token table (`vocab` rows of `c`) at `wte` and the position table at `wpe` in `params`.
#[allow(clippy::too_many_arguments)]
pub fn encoder_fwd<B: Backend>(
    be: &B,
    out: &mut B::Buf,
    ids: &B::Ids,
    params: &B::Buf,
    wte: usize,
    vocab: usize,
    wpe: usize,
    b: usize,
    t: usize,
    c: usize,
) -> Result<()> {
    be.launch(Kernel::GatherRows {
        out,
        table: (params, wte),
        table_rows: vocab,
        ids,
        n: b * t,
        width: c,
    })?;
    // The first t positions, one row of t x c, added to each sequence.
    be.launch(Kernel::AddRow {
        out,
        row: (params, wpe),
        n: b,
        width: t * c,
    })
}

/// Backward of [`encoder_fwd`]: accumulates `dout` into the rows of the token table (at `dwte`
/// in `grads`) named by `ids`, and into the position table at `dwpe`.
#[allow(clippy::too_many_arguments)]
pub fn encoder_bwd<B: Backend>(
    be: &B,
    grads: &mut B::Buf,
    dwte: usize,
    vocab: usize,
    dwpe: usize,
    dout: &B::Buf,
    ids: &B::Ids,
    b: usize,
    t: usize,
    c: usize,
) -> Result<()> {
    be.launch(Kernel::ScatterAddRows {
        table: (grads, dwte),
        table_rows: vocab,
        ids,
        src: dout,
        n: b * t,
        width: c,
    })?;
    be.launch(Kernel::SumRows {
        dst: (grads, dwpe),
        src: dout,
        n: b,
        width: t * c,
    })
}
