//! Causal multi-head self-attention, forward and backward, as batched GEMMs around a causal
//! softmax (the unfused path: the `t x t` attention matrix is kept for backward).

use crate::Result;
use crate::backend::{Backend, Gemm, Op};

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
fn head_gemm(
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

/// Causal self-attention of `qkv` (b, t, 3C) into `out` (b, t, C), keeping the permuted
/// q, k, v (`qkvr`) and the attention matrix (`att`, zero above the diagonal) for backward.
/// Entries of `preatt` above the diagonal are left unwritten.
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
    be.permute_qkv(qkvr, qkv, b, t, nh, hs)?;
    let (q, k, v) = (0, btc, 2 * btc);
    let (heads, vec, mat) = (b * nh, (hs, t * hs), (t, t * t));
    let blocks = causal_blocks(t);
    // preatt[t1][t2] = q[t1] . k[t2] for t2 < j1 (column-major: C[t2, t1]).
    for &(j0, j1) in &blocks {
        let g = head_gemm(Op::T, Op::N, j1, j1 - j0, hs, vec, vec, mat, heads);
        be.gemm(&g, (qkvr, k), (qkvr, q + j0 * hs), (preatt, j0 * t))?;
    }
    let scale = 1.0 / (hs as f32).sqrt();
    be.softmax_causal_fwd(att, preatt, scale, heads, t)?;
    // y[t1] = sum over t2 < j1 of att[t1][t2] v[t2].
    for &(j0, j1) in &blocks {
        let g = head_gemm(Op::N, Op::N, hs, j1 - j0, j1, vec, mat, vec, heads);
        be.gemm(&g, (qkvr, v), (att, j0 * t), (vaccum, j0 * hs))?;
    }
    be.unpermute(out, vaccum, b, t, nh, hs, true)
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
    be.unpermute(dvaccum, dout, b, t, nh, hs, false)?;
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
    let scale = 1.0 / (hs as f32).sqrt();
    be.softmax_causal_bwd(dpreatt, datt, att, scale, heads, t)?;
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
    be.permute_qkv_bwd(dqkv, dqkvr, b, t, nh, hs)
}
