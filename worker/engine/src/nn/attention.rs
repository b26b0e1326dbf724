//! Causal multi-head self-attention, forward and backward, as batched GEMMs around a causal
//! softmax, with permutes between the token-major and head-major layouts (the unfused path:
//! the `t x t` attention matrix is kept for backward).

use crate::Result;
use crate::backend::{Backend, Gemm, Kernel, Mask, Op};

/// Blocks of a causal `t x t` attention: query block `j0..j1` sees only keys `..j1`, key block
/// `i0..i1` is seen only by queries `i0..`. Four blocks skip 3/8 of the attention GEMMs' work
/// (the entries above the diagonal, which the causal softmax zeroes).
fn causal_blocks(t: usize) -> Vec<(usize, usize)> {
    let n = if t >= 128 && t.is_multiple_of(4) {
        4
    } else {
        1
    };
    (0..n).map(|i| (i * t / n, (i + 1) * t / n)).collect()
}

/// One batched GEMM of the attention, over `b * nh` heads.
#[allow(clippy::too_many_arguments)]
pub(crate) fn head_gemm(
    ta: Op,
    tb: Op,
    m: usize,
    n: usize,
    k: usize,
    (lda, stride_a): (usize, usize),
    (ldb, stride_b): (usize, usize),
    (ldc, stride_c): (usize, usize),
    batch: usize,
) -> Gemm {
    Gemm {
        ta,
        tb,
        m,
        n,
        k,
        alpha: 1.0,
        lda,
        stride_a,
        ldb,
        stride_b,
        beta: 0.0,
        ldc,
        stride_c,
        batch,
    }
}

/// `(b, t, 3, nh, hs)` to `(3, b, nh, t, hs)`: q, k and v, each head-major, one after the other.
const SPLIT_QKV: [usize; 5] = [2, 0, 3, 1, 4];
/// The inverse of [`SPLIT_QKV`]: `(3, b, nh, t, hs)` back to `(b, t, 3, nh, hs)`.
const JOIN_QKV: [usize; 5] = [1, 3, 0, 2, 4];
/// Swaps the middle axes of a 4-axis tensor: `(b, nh, t, hs)` and `(b, t, nh, hs)` both ways.
const SWAP_HEADS: [usize; 4] = [0, 2, 1, 3];

/// Sequences, tokens, heads and channels per head.
type Dims = (usize, usize, usize, usize);

/// The layout changes attention makes around its per-head kernels.
#[derive(Clone, Copy)]
enum Relayout {
    /// `(b, t, 3, nh, hs)` to `(3, b, nh, t, hs)`: q, k and v of each token, head-major.
    SplitQkv,
    /// `(3, b, nh, t, hs)` back to `(b, t, 3, nh, hs)`.
    JoinQkv,
    /// `(b, nh, t, hs)` to `(b, t, nh, hs)`: heads back into the token-major layout.
    HeadsToTokens,
    /// `(b, t, nh, hs)` to `(b, nh, t, hs)`: each head's tokens together.
    TokensToHeads,
}

/// Writes `inp` into `out` in the layout `to` says, for `(b, t, nh, hs)`.
fn relayout<B: Backend>(
    be: &B,
    to: Relayout,
    out: &mut B::Buf,
    inp: &B::Buf,
    (b, t, nh, hs): Dims,
) -> Result<()> {
    let (shape, perm): (&[usize], &[usize]) = match to {
        Relayout::SplitQkv => (&[b, t, 3, nh, hs], &SPLIT_QKV),
        Relayout::JoinQkv => (&[3, b, nh, t, hs], &JOIN_QKV),
        Relayout::HeadsToTokens => (&[b, nh, t, hs], &SWAP_HEADS),
        Relayout::TokensToHeads => (&[b, t, nh, hs], &SWAP_HEADS),
    };
    be.launch(Kernel::Permute {
        out,
        inp,
        shape,
        perm,
    })
}

/// Causal self-attention of `qkv` (b, t, 3C) into `out` (b, t, C), keeping the permuted
/// q, k, v (`qkvr`) and the attention matrix (`att`, zero above the diagonal) for backward.
/// Entries of `preatt` above the diagonal may be left unwritten: the causal softmax never
/// reads them.
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd<B: Backend>(
    be: &B,
    out: &mut B::Buf,
    qkvr: &mut B::Buf,
    att: &mut B::Buf,
    preatt: &mut B::Buf,
    vaccum: &mut B::Buf,
    qkv: &B::Buf,
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
) -> Result<()> {
    let btc = b * t * nh * hs;
    relayout(be, Relayout::SplitQkv, qkvr, qkv, (b, t, nh, hs))?;
    let (q, k, v) = (0, btc, 2 * btc);
    let (heads, vec, mat) = (b * nh, (hs, t * hs), (t, t * t));
    let blocks = causal_blocks(t);
    // preatt[t1][t2] = q[t1] . k[t2] for t2 < j1 (column-major: C[t2, t1]).
    for &(j0, j1) in &blocks {
        let g = head_gemm(Op::T, Op::N, j1, j1 - j0, hs, vec, vec, mat, heads);
        be.gemm(&g, (qkvr, k), (qkvr, q + j0 * hs), (preatt, j0 * t))?;
    }
    be.launch(Kernel::Softmax {
        out: att,
        inp: preatt,
        rows: heads * t,
        width: t,
        scale: 1.0 / (hs as f32).sqrt(),
        mask: Mask::Causal,
    })?;
    // y[t1] = sum over t2 < j1 of att[t1][t2] v[t2].
    for &(j0, j1) in &blocks {
        let g = head_gemm(Op::N, Op::N, hs, j1 - j0, j1, vec, mat, vec, heads);
        be.gemm(&g, (qkvr, v), (att, j0 * t), (vaccum, j0 * hs))?;
    }
    relayout(be, Relayout::HeadsToTokens, out, vaccum, (b, t, nh, hs))
}

/// Backward of [`attention_fwd`]: overwrites `dqkv` from `dout`.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd<B: Backend>(
    be: &B,
    dqkv: &mut B::Buf,
    dqkvr: &mut B::Buf,
    datt: &mut B::Buf,
    dpreatt: &mut B::Buf,
    dvaccum: &mut B::Buf,
    dout: &B::Buf,
    qkvr: &B::Buf,
    att: &B::Buf,
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
) -> Result<()> {
    let btc = b * t * nh * hs;
    let (q, k, v) = (0, btc, 2 * btc);
    let (heads, vec, mat) = (b * nh, (hs, t * hs), (t, t * t));
    let blocks = causal_blocks(t);
    relayout(be, Relayout::TokensToHeads, dvaccum, dout, (b, t, nh, hs))?;
    for &(i0, i1) in &blocks {
        // datt[t1][t2] = dy[t1] . v[t2] for queries i0..i1 and keys t2 < i1.
        let g = head_gemm(Op::T, Op::N, i1, i1 - i0, hs, vec, vec, mat, heads);
        be.gemm(&g, (qkvr, v), (dvaccum, i0 * hs), (datt, i0 * t))?;
        // dv[t2] = sum over t1 >= i0 of att[t1][t2] dy[t1], for keys i0..i1.
        let g = head_gemm(Op::N, Op::T, hs, i1 - i0, t - i0, vec, mat, vec, heads);
        be.gemm(
            &g,
            (dvaccum, i0 * hs),
            (att, i0 + i0 * t),
            (dqkvr, v + i0 * hs),
        )?;
    }
    be.launch(Kernel::SoftmaxBwd {
        dinp: dpreatt,
        dout: datt,
        out: att,
        rows: heads * t,
        width: t,
        scale: 1.0 / (hs as f32).sqrt(),
        mask: Mask::Causal,
    })?;
    for &(i0, i1) in &blocks {
        // dq[t1] = sum over t2 < i1 of dpreatt[t1][t2] k[t2], for queries i0..i1.
        let g = head_gemm(Op::N, Op::N, hs, i1 - i0, i1, vec, mat, vec, heads);
        be.gemm(&g, (qkvr, k), (dpreatt, i0 * t), (dqkvr, q + i0 * hs))?;
        // dk[t2] = sum over t1 >= i0 of dpreatt[t1][t2] q[t1], for keys i0..i1.
        let g = head_gemm(Op::N, Op::T, hs, i1 - i0, t - i0, vec, mat, vec, heads);
        be.gemm(
            &g,
            (qkvr, q + i0 * hs),
            (dpreatt, i0 + i0 * t),
            (dqkvr, k + i0 * hs),
        )?;
    }
    relayout(be, Relayout::JoinQkv, dqkv, dqkvr, (b, t, nh, hs))
}

/// Causal self-attention of `qkv` (b, t, 3C) into `out` (b, t, C) through the fused kernel
/// ([`Kernel::AttentionFwd`]): keeps the permuted q, k, v (`qkvr`) and each query's
/// log-sum-exp (`lse`, `b * nh * t`) for backward, and no `t x t` matrix. `vaccum` (b, t, C)
/// is scratch.
#[allow(clippy::too_many_arguments)]
pub fn attention_fused_fwd<B: Backend>(
    be: &B,
    out: &mut B::Buf,
    qkvr: &mut B::Buf,
    lse: &mut B::Buf,
    vaccum: &mut B::Buf,
    qkv: &B::Buf,
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
) -> Result<()> {
    relayout(be, Relayout::SplitQkv, qkvr, qkv, (b, t, nh, hs))?;
    be.launch(Kernel::AttentionFwd {
        out: vaccum,
        lse,
        qkv: qkvr,
        heads: b * nh,
        t,
        hs,
        scale: 1.0 / (hs as f32).sqrt(),
    })?;
    relayout(be, Relayout::HeadsToTokens, out, vaccum, (b, t, nh, hs))
}

/// Backward of [`attention_fused_fwd`]: overwrites `dqkv` from `dout`, given the forward's
/// output `out` (b, t, C), `qkvr` and `lse`. `dqkvr` (3 x b x t x C), `out_heads` and
/// `dout_heads` (b, t, C) and `delta` (`b * nh * t`) are scratch.
#[allow(clippy::too_many_arguments)]
pub fn attention_fused_bwd<B: Backend>(
    be: &B,
    dqkv: &mut B::Buf,
    dqkvr: &mut B::Buf,
    out_heads: &mut B::Buf,
    dout_heads: &mut B::Buf,
    delta: &mut B::Buf,
    dout: &B::Buf,
    out: &B::Buf,
    qkvr: &B::Buf,
    lse: &B::Buf,
    b: usize,
    t: usize,
    nh: usize,
    hs: usize,
) -> Result<()> {
    relayout(
        be,
        Relayout::TokensToHeads,
        dout_heads,
        dout,
        (b, t, nh, hs),
    )?;
    relayout(be, Relayout::TokensToHeads, out_heads, out, (b, t, nh, hs))?;
    be.launch(Kernel::AttentionBwd {
        dqkv: dqkvr,
        delta,
        dout: dout_heads,
        out: out_heads,
        lse,
        qkv: qkvr,
        heads: b * nh,
        t,
        hs,
        scale: 1.0 / (hs as f32).sqrt(),
    })?;
    relayout(be, Relayout::JoinQkv, dqkv, dqkvr, (b, t, nh, hs))
}
