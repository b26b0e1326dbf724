//! The CPU backend: the reference for every primitive. GEMMs through `matrixmultiply`, split
//! across a rayon pool by batch entry or by columns; row-wise kernels split by rows.
//!
//! The only `unsafe` is the call into `matrixmultiply`, whose pointers are checked against
//! the buffers' lengths first.
#![allow(unsafe_code)]

use rayon::prelude::*;

use crate::Result;
use crate::backend::{AdamStep, At, Backend, Gemm, Op};

/// The CPU backend, on the global rayon pool (`RAYON_NUM_THREADS` threads).
#[derive(Clone, Debug, Default)]
pub struct Cpu;

/// The highest element index (exclusive) a strided column-major operand touches.
fn extent(op: Op, rows: usize, cols: usize, ld: usize, stride: usize, batch: usize) -> usize {
    if rows == 0 || cols == 0 || batch == 0 {
        return 0;
    }
    let (r, c) = if op == Op::N {
        (rows, cols)
    } else {
        (cols, rows)
    };
    (batch - 1) * stride + (c - 1) * ld + r
}

/// Row and column strides of op(X) for a column-major X with leading dimension `ld`.
fn strides(op: Op, ld: usize) -> (isize, isize) {
    match op {
        Op::N => (1, ld as isize),
        Op::T => (ld as isize, 1),
    }
}

/// Minimum work (multiply-adds) before a GEMM is split across threads.
const SPLIT_WORK: usize = 1 << 16;

impl Cpu {
    /// Runs `g` on raw pointers already checked against the buffers' lengths.
    ///
    /// # Safety
    /// Every element `g` addresses from `a`, `b` and `c` must lie inside their allocations, and
    /// the `c` ranges of different batch entries must not overlap.
    unsafe fn gemm_raw(g: &Gemm, a: usize, b: usize, c: usize) {
        let (rsa, csa) = strides(g.ta, g.lda);
        let (rsb, csb) = strides(g.tb, g.ldb);
        let one = |i: usize, j0: usize, j1: usize| {
            let a = (a as *const f32).wrapping_add(i * g.stride_a);
            // Column j of op(B) starts at j * csb.
            let b = (b as *const f32).wrapping_add(i * g.stride_b + j0 * csb as usize);
            let c = (c as *mut f32).wrapping_add(i * g.stride_c + j0 * g.ldc);
            // SAFETY: the caller checked every index of the batch entry against the buffers.
            unsafe {
                matrixmultiply::sgemm(
                    g.m,
                    g.k,
                    j1 - j0,
                    g.alpha,
                    a,
                    rsa,
                    csa,
                    b,
                    rsb,
                    csb,
                    g.beta,
                    c,
                    1,
                    g.ldc as isize,
                )
            }
        };
        let threads = rayon::current_num_threads();
        if g.batch > 1 {
            if g.m * g.n * g.k * g.batch >= SPLIT_WORK && threads > 1 {
                (0..g.batch).into_par_iter().for_each(|i| one(i, 0, g.n));
            } else {
                (0..g.batch).for_each(|i| one(i, 0, g.n));
            }
        } else if g.m * g.n * g.k >= SPLIT_WORK && threads > 1 && g.n >= 2 * threads {
            let per = g.n.div_ceil(threads);
            (0..threads).into_par_iter().for_each(|p| {
                let (j0, j1) = (p * per, ((p + 1) * per).min(g.n));
                if j0 < j1 {
                    one(0, j0, j1);
                }
            });
        } else {
            one(0, 0, g.n);
        }
    }
}

fn rows_mut(buf: &mut [f32], width: usize) -> rayon::slice::ChunksMut<'_, f32> {
    buf.par_chunks_mut(width.max(1))
}

impl Backend for Cpu {
    type Buf = Vec<f32>;
    type Ids = Vec<i32>;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn zeros(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }

    fn upload_at(&self, dst: &mut Vec<f32>, off: usize, src: &[f32]) -> Result<()> {
        dst[off..off + src.len()].copy_from_slice(src);
        Ok(())
    }

    fn download(&self, src: &Vec<f32>, off: usize, len: usize) -> Result<Vec<f32>> {
        Ok(src[off..off + len].to_vec())
    }

    fn ids(&self, n: usize) -> Result<Vec<i32>> {
        Ok(vec![0; n])
    }

    fn upload_ids(&self, dst: &mut Vec<i32>, src: &[i32]) -> Result<()> {
        dst[..src.len()].copy_from_slice(src);
        Ok(())
    }

    fn fill_zero(&self, buf: &mut Vec<f32>, off: usize, len: usize) -> Result<()> {
        buf[off..off + len].fill(0.0);
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn gemm(
        &self,
        g: &Gemm,
        a: At<'_, Self>,
        b: At<'_, Self>,
        c: (&mut Vec<f32>, usize),
    ) -> Result<()> {
        if g.m == 0 || g.n == 0 || g.batch == 0 {
            return Ok(());
        }
        let need_a = a.1 + extent(g.ta, g.m, g.k, g.lda, g.stride_a, g.batch);
        let need_b = b.1 + extent(g.tb, g.k, g.n, g.ldb, g.stride_b, g.batch);
        let need_c = c.1 + extent(Op::N, g.m, g.n, g.ldc, g.stride_c, g.batch);
        assert!(
            need_a <= a.0.len() && need_b <= b.0.len() && need_c <= c.0.len(),
            "gemm {g:?} reads or writes past its buffers"
        );
        assert!(
            g.batch == 1 || g.stride_c >= g.ldc * g.n,
            "gemm {g:?}: batch entries of C overlap"
        );
        assert!(g.ldc >= g.m, "gemm {g:?}: ldc < m");
        let pa = a.0[a.1..].as_ptr() as usize;
        let pb = b.0[b.1..].as_ptr() as usize;
        let pc = c.0[c.1..].as_mut_ptr() as usize;
        // SAFETY: the extents of A, B and C were checked against their buffers above, C's
        // batch entries do not overlap, and C is borrowed mutably (so it aliases neither A nor
        // B).
        unsafe { Self::gemm_raw(g, pa, pb, pc) };
        Ok(())
    }

    fn encoder_fwd(
        &self,
        out: &mut Vec<f32>,
        ids: &Vec<i32>,
        params: &Vec<f32>,
        wte: usize,
        wpe: usize,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        rows_mut(&mut out[..b * t * c], c)
            .enumerate()
            .for_each(|(bt, row)| {
                let id = ids[bt] as usize;
                let te = &params[wte + id * c..wte + (id + 1) * c];
                let pe = &params[wpe + (bt % t) * c..wpe + (bt % t + 1) * c];
                for ((o, x), y) in row.iter_mut().zip(te).zip(pe) {
                    *o = x + y;
                }
            });
        Ok(())
    }

    fn encoder_bwd(
        &self,
        grads: &mut Vec<f32>,
        dwte: usize,
        dwpe: usize,
        dout: &Vec<f32>,
        ids: &Vec<i32>,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        for bt in 0..b * t {
            let id = ids[bt] as usize;
            let d = &dout[bt * c..(bt + 1) * c];
            let te = dwte + id * c;
            grads[te..te + c]
                .iter_mut()
                .zip(d)
                .for_each(|(g, x)| *g += x);
            let pe = dwpe + (bt % t) * c;
            grads[pe..pe + c]
                .iter_mut()
                .zip(d)
                .for_each(|(g, x)| *g += x);
        }
        Ok(())
    }

    fn layernorm_fwd(
        &self,
        out: &mut Vec<f32>,
        mean: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
        inp: &Vec<f32>,
        params: &Vec<f32>,
        w: usize,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let (wt, bias) = (&params[w..w + c], &params[w + c..w + 2 * c]);
        rows_mut(&mut out[..n * c], c)
            .zip(mean[..n].par_iter_mut())
            .zip(rstd[..n].par_iter_mut())
            .enumerate()
            .for_each(|(i, ((row, mu), rs))| {
                let x = &inp[i * c..(i + 1) * c];
                let m = x.iter().sum::<f32>() / c as f32;
                let var = x.iter().map(|v| (v - m) * (v - m)).sum::<f32>() / c as f32;
                let s = 1.0 / (var + 1e-5).sqrt();
                for (j, o) in row.iter_mut().enumerate() {
                    *o = (x[j] - m) * s * wt[j] + bias[j];
                }
                *mu = m;
                *rs = s;
            });
        Ok(())
    }

    fn layernorm_bwd(
        &self,
        dinp: &mut Vec<f32>,
        grads: &mut Vec<f32>,
        dw: usize,
        dout: &Vec<f32>,
        inp: &Vec<f32>,
        params: &Vec<f32>,
        w: usize,
        mean: &Vec<f32>,
        rstd: &Vec<f32>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let wt = &params[w..w + c];
        rows_mut(&mut dinp[..n * c], c)
            .enumerate()
            .for_each(|(i, di)| {
                let x = &inp[i * c..(i + 1) * c];
                let d = &dout[i * c..(i + 1) * c];
                let (m, s) = (mean[i], rstd[i]);
                let (mut dnorm_mean, mut dnorm_norm_mean) = (0.0f32, 0.0f32);
                for j in 0..c {
                    let norm = (x[j] - m) * s;
                    let dn = wt[j] * d[j];
                    dnorm_mean += dn;
                    dnorm_norm_mean += dn * norm;
                }
                dnorm_mean /= c as f32;
                dnorm_norm_mean /= c as f32;
                for j in 0..c {
                    let norm = (x[j] - m) * s;
                    let dn = wt[j] * d[j];
                    di[j] += (dn - dnorm_mean - norm * dnorm_norm_mean) * s;
                }
            });
        let (gw, rest) = grads[dw..dw + 2 * c].split_at_mut(c);
        let gb = rest;
        for i in 0..n {
            let x = &inp[i * c..(i + 1) * c];
            let d = &dout[i * c..(i + 1) * c];
            let (m, s) = (mean[i], rstd[i]);
            for j in 0..c {
                gw[j] += (x[j] - m) * s * d[j];
                gb[j] += d[j];
            }
        }
        Ok(())
    }

    fn bias_fwd(
        &self,
        out: &mut Vec<f32>,
        params: &Vec<f32>,
        bias: usize,
        n: usize,
        oc: usize,
    ) -> Result<()> {
        let b = &params[bias..bias + oc];
        rows_mut(&mut out[..n * oc], oc).for_each(|row| {
            row.iter_mut().zip(b).for_each(|(o, x)| *o += x);
        });
        Ok(())
    }

    fn bias_bwd(
        &self,
        grads: &mut Vec<f32>,
        dbias: usize,
        dout: &Vec<f32>,
        n: usize,
        oc: usize,
    ) -> Result<()> {
        let g = &mut grads[dbias..dbias + oc];
        for row in dout[..n * oc].chunks(oc) {
            g.iter_mut().zip(row).for_each(|(a, x)| *a += x);
        }
        Ok(())
    }

    fn gelu_fwd(&self, out: &mut Vec<f32>, inp: &Vec<f32>, n: usize) -> Result<()> {
        out[..n]
            .par_iter_mut()
            .zip(&inp[..n])
            .for_each(|(o, &x)| *o = gelu(x));
        Ok(())
    }

    fn gelu_bwd(
        &self,
        dinp: &mut Vec<f32>,
        inp: &Vec<f32>,
        dout: &Vec<f32>,
        n: usize,
    ) -> Result<()> {
        dinp[..n]
            .par_iter_mut()
            .zip(&inp[..n])
            .zip(&dout[..n])
            .for_each(|((di, &x), &d)| *di = gelu_grad(x) * d);
        Ok(())
    }

    fn relu_fwd(&self, out: &mut Vec<f32>, inp: &Vec<f32>, n: usize) -> Result<()> {
        out[..n]
            .par_iter_mut()
            .zip(&inp[..n])
            .for_each(|(o, &x)| *o = x.max(0.0));
        Ok(())
    }

    fn relu_bwd(
        &self,
        dinp: &mut Vec<f32>,
        out: &Vec<f32>,
        dout: &Vec<f32>,
        n: usize,
    ) -> Result<()> {
        dinp[..n]
            .par_iter_mut()
            .zip(&out[..n])
            .zip(&dout[..n])
            .for_each(|((di, &o), &d)| *di = if o > 0.0 { d } else { 0.0 });
        Ok(())
    }

    fn add(&self, out: &mut Vec<f32>, a: &Vec<f32>, b: &Vec<f32>, n: usize) -> Result<()> {
        out[..n]
            .par_iter_mut()
            .zip(&a[..n])
            .zip(&b[..n])
            .for_each(|((o, x), y)| *o = x + y);
        Ok(())
    }

    fn permute_qkv(
        &self,
        qkvr: &mut Vec<f32>,
        qkv: &Vec<f32>,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
    ) -> Result<()> {
        let c = nh * hs;
        let part = b * t * c;
        for (which, dst) in qkvr[..3 * part].chunks_mut(part).enumerate() {
            dst.par_chunks_mut(hs).enumerate().for_each(|(r, row)| {
                // r = ((bi * nh + h) * t + ti)
                let (ti, bh) = (r % t, r / t);
                let (bi, h) = (bh / nh, bh % nh);
                let src = (bi * t + ti) * 3 * c + which * c + h * hs;
                row.copy_from_slice(&qkv[src..src + hs]);
            });
        }
        Ok(())
    }

    fn permute_qkv_bwd(
        &self,
        dqkv: &mut Vec<f32>,
        dqkvr: &Vec<f32>,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
    ) -> Result<()> {
        let c = nh * hs;
        let part = b * t * c;
        dqkv[..3 * part]
            .par_chunks_mut(hs)
            .enumerate()
            .for_each(|(r, row)| {
                // r = ((bi * t + ti) * 3 + which) * nh + h
                let h = r % nh;
                let which = (r / nh) % 3;
                let bt = r / (3 * nh);
                let (bi, ti) = (bt / t, bt % t);
                let src = which * part + ((bi * nh + h) * t + ti) * hs;
                row.copy_from_slice(&dqkvr[src..src + hs]);
            });
        Ok(())
    }

    fn unpermute(
        &self,
        out: &mut Vec<f32>,
        inp: &Vec<f32>,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
        forward: bool,
    ) -> Result<()> {
        out[..b * t * nh * hs]
            .par_chunks_mut(hs)
            .enumerate()
            .for_each(|(r, row)| {
                let src = if forward {
                    // out row r = (bi, ti, h); input (bi, h, ti)
                    let h = r % nh;
                    let bt = r / nh;
                    let (bi, ti) = (bt / t, bt % t);
                    ((bi * nh + h) * t + ti) * hs
                } else {
                    // out row r = (bi, h, ti); input (bi, ti, h)
                    let ti = r % t;
                    let bh = r / t;
                    let (bi, h) = (bh / nh, bh % nh);
                    ((bi * t + ti) * nh + h) * hs
                };
                row.copy_from_slice(&inp[src..src + hs]);
            });
        Ok(())
    }

    fn softmax_causal_fwd(
        &self,
        att: &mut Vec<f32>,
        preatt: &Vec<f32>,
        scale: f32,
        rows: usize,
        t: usize,
    ) -> Result<()> {
        rows_mut(&mut att[..rows * t * t], t)
            .enumerate()
            .for_each(|(r, out)| {
                let t1 = r % t;
                let x = &preatt[r * t..r * t + t1 + 1];
                let max = x.iter().fold(f32::NEG_INFINITY, |m, v| m.max(v * scale));
                let mut sum = 0.0f32;
                for (o, v) in out.iter_mut().zip(x) {
                    *o = (v * scale - max).exp();
                    sum += *o;
                }
                let inv = 1.0 / sum;
                out[..=t1].iter_mut().for_each(|o| *o *= inv);
                out[t1 + 1..].fill(0.0);
            });
        Ok(())
    }

    fn softmax_causal_bwd(
        &self,
        dpreatt: &mut Vec<f32>,
        datt: &Vec<f32>,
        att: &Vec<f32>,
        scale: f32,
        rows: usize,
        t: usize,
    ) -> Result<()> {
        rows_mut(&mut dpreatt[..rows * t * t], t)
            .enumerate()
            .for_each(|(r, out)| {
                let t1 = r % t;
                let a = &att[r * t..r * t + t1 + 1];
                let d = &datt[r * t..r * t + t1 + 1];
                let dot: f32 = a.iter().zip(d).map(|(x, y)| x * y).sum();
                for ((o, x), y) in out.iter_mut().zip(a).zip(d) {
                    *o = scale * x * (y - dot);
                }
                out[t1 + 1..].fill(0.0);
            });
        Ok(())
    }

    fn crossentropy(
        &self,
        losses: &mut Vec<f32>,
        logits: &mut Vec<f32>,
        targets: &Vec<i32>,
        n: usize,
        v: usize,
        vp: usize,
        dloss: f32,
        grad: bool,
    ) -> Result<()> {
        rows_mut(&mut logits[..n * vp], vp)
            .zip(losses[..n].par_iter_mut())
            .enumerate()
            .for_each(|(i, (row, loss))| {
                let x = &mut row[..v];
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = x.iter().map(|l| (l - max).exp()).sum();
                let target = targets[i] as usize;
                *loss = sum.ln() + max - x[target];
                if grad {
                    let inv = 1.0 / sum;
                    for (j, l) in x.iter_mut().enumerate() {
                        let p = (*l - max).exp() * inv;
                        *l = dloss * (p - f32::from(j == target));
                    }
                    row[v..].fill(0.0);
                }
            });
        Ok(())
    }

    fn sum_squares(&self, buf: &Vec<f32>, off: usize, len: usize) -> Result<f64> {
        // Per-chunk sums in parallel, then added in order: the same result on every run.
        let parts: Vec<f64> = buf[off..off + len]
            .par_chunks(4096)
            .map(|c| c.iter().map(|g| f64::from(*g) * f64::from(*g)).sum::<f64>())
            .collect();
        Ok(parts.iter().sum())
    }

    fn adamw(
        &self,
        params: &mut Vec<f32>,
        grads: &Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        off: usize,
        len: usize,
        s: &AdamStep,
    ) -> Result<()> {
        let bc1 = 1.0 - s.beta1.powi(s.t);
        let bc2 = 1.0 - s.beta2.powi(s.t);
        params[off..off + len]
            .par_iter_mut()
            .zip(&grads[off..off + len])
            .zip(&mut m[off..off + len])
            .zip(&mut v[off..off + len])
            .for_each(|(((p, &g), m), v)| {
                let g = g * s.grad_scale;
                *m = s.beta1 * *m + (1.0 - s.beta1) * g;
                *v = s.beta2 * *v + (1.0 - s.beta2) * g * g;
                let mh = *m / bc1;
                let vh = *v / bc2;
                *p -= s.lr * (mh / (vh.sqrt() + s.eps) + s.weight_decay * *p);
            });
        Ok(())
    }
}

const GELU_SCALE: f32 = 0.797_884_6; // sqrt(2 / pi)

/// tanh through one exponential: several times faster than libm's `tanhf` here, within
/// 1e-7 absolute of it (what GELU needs).
fn tanh(a: f32) -> f32 {
    1.0 - 2.0 / ((2.0 * a).exp() + 1.0)
}

/// GELU, tanh approximation (GPT-2's).
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + tanh(GELU_SCALE * (x + 0.044715 * x * x * x)))
}

/// Derivative of [`gelu`].
pub fn gelu_grad(x: f32) -> f32 {
    let cube = 0.044715 * x * x * x;
    let arg = GELU_SCALE * (x + cube);
    let th = tanh(arg);
    let sech2 = 1.0 - th * th;
    0.5 * (1.0 + th) + x * 0.5 * sech2 * GELU_SCALE * (1.0 + 3.0 * 0.044715 * x * x)
}
