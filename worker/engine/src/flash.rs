//! The CPU twin of the CUDA backend's fused causal attention (`attention_fwd`,
//! `attention_delta`, `attention_bwd_dq` and `attention_bwd_dkv` in `kernels.cu`): the same
//! algorithm, one query (or key) row at a time, keys visited in tiles of [`TILE`] (a warp's
//! width on the GPU) with an online softmax, so that no `t x t` matrix exists; backward
//! recomputes the probabilities from the forward's log-sum-exp, in two passes without atomics
//! (query rows for dq, key rows for dk and dv). The unfused path (`nn::attention`) is the
//! reference both are checked against.

use rayon::prelude::*;

/// Keys per tile of the online softmax (a warp on the GPU).
pub const TILE: usize = 32;

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Forward: `out` `(heads, t, hs)` and `lse` `heads x t` from `qkv` (q, k, v one after the
/// other, each `(heads, t, hs)`).
pub fn forward(
    out: &mut [f32],
    lse: &mut [f32],
    qkv: &[f32],
    heads: usize,
    t: usize,
    hs: usize,
    scale: f32,
) {
    let n = heads * t * hs;
    let (q, k, v) = (&qkv[..n], &qkv[n..2 * n], &qkv[2 * n..3 * n]);
    out[..n]
        .par_chunks_mut(hs)
        .zip(lse[..heads * t].par_iter_mut())
        .enumerate()
        .for_each(|(row, (o, lse))| {
            let (h, i) = (row / t, row % t);
            let base = h * t;
            let qi = &q[row * hs..(row + 1) * hs];
            let (mut m, mut l) = (f32::NEG_INFINITY, 0.0f32);
            o.fill(0.0);
            let mut s = [0.0f32; TILE];
            for j0 in (0..=i).step_by(TILE) {
                let j1 = (j0 + TILE).min(i + 1);
                let mut tile_max = f32::NEG_INFINITY;
                for j in j0..j1 {
                    let kj = &k[(base + j) * hs..(base + j + 1) * hs];
                    s[j - j0] = scale * dot(qi, kj);
                    tile_max = tile_max.max(s[j - j0]);
                }
                let m_new = m.max(tile_max);
                let corr = (m - m_new).exp();
                l *= corr;
                o.iter_mut().for_each(|x| *x *= corr);
                for j in j0..j1 {
                    let p = (s[j - j0] - m_new).exp();
                    l += p;
                    let vj = &v[(base + j) * hs..(base + j + 1) * hs];
                    o.iter_mut().zip(vj).for_each(|(x, y)| *x += p * y);
                }
                m = m_new;
            }
            let inv = 1.0 / l;
            o.iter_mut().for_each(|x| *x *= inv);
            *lse = m + l.ln();
        });
}

/// Backward: overwrites `dqkv` (laid out as `qkv`) from `dout` `(heads, t, hs)`; `delta`
/// (`heads x t`) receives each query's `dout . out`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dqkv: &mut [f32],
    delta: &mut [f32],
    dout: &[f32],
    out: &[f32],
    lse: &[f32],
    qkv: &[f32],
    heads: usize,
    t: usize,
    hs: usize,
    scale: f32,
) {
    let n = heads * t * hs;
    let rows = heads * t;
    let (q, k, v) = (&qkv[..n], &qkv[n..2 * n], &qkv[2 * n..3 * n]);
    delta[..rows]
        .par_iter_mut()
        .enumerate()
        .for_each(|(r, d)| *d = dot(&dout[r * hs..(r + 1) * hs], &out[r * hs..(r + 1) * hs]));
    let delta = &delta[..rows];
    // p and ds of query row `qr` (global row) against key row `kr`.
    let grads = |qr: usize, kr: usize| {
        let qi = &q[qr * hs..(qr + 1) * hs];
        let kj = &k[kr * hs..(kr + 1) * hs];
        let p = (scale * dot(qi, kj) - lse[qr]).exp();
        let dp = dot(&dout[qr * hs..(qr + 1) * hs], &v[kr * hs..(kr + 1) * hs]);
        (p, p * (dp - delta[qr]))
    };
    let (dq, dkv) = dqkv[..3 * n].split_at_mut(n);
    // dq_i = scale * sum over keys j <= i of ds_ij k_j.
    dq.par_chunks_mut(hs).enumerate().for_each(|(row, dqi)| {
        let (h, i) = (row / t, row % t);
        dqi.fill(0.0);
        for j in 0..=i {
            let kr = h * t + j;
            let (_, ds) = grads(row, kr);
            let kj = &k[kr * hs..(kr + 1) * hs];
            dqi.iter_mut().zip(kj).for_each(|(x, y)| *x += ds * y);
        }
        dqi.iter_mut().for_each(|x| *x *= scale);
    });
    // dk_j = scale * sum over queries i >= j of ds_ij q_i; dv_j = sum of p_ij dout_i.
    let (dk, dv) = dkv.split_at_mut(n);
    dk.par_chunks_mut(hs)
        .zip(dv.par_chunks_mut(hs))
        .enumerate()
        .for_each(|(row, (dkj, dvj))| {
            let (h, j) = (row / t, row % t);
            dkj.fill(0.0);
            dvj.fill(0.0);
            for i in j..t {
                let qr = h * t + i;
                let (p, ds) = grads(qr, row);
                let qi = &q[qr * hs..(qr + 1) * hs];
                let doi = &dout[qr * hs..(qr + 1) * hs];
                dkj.iter_mut().zip(qi).for_each(|(x, y)| *x += ds * y);
                dvj.iter_mut().zip(doi).for_each(|(x, y)| *x += p * y);
            }
            dkj.iter_mut().for_each(|x| *x *= scale);
        });
}
