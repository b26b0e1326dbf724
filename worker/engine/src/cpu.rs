//! The CPU backend: the reference for every primitive. GEMMs through `matrixmultiply`, split
//! across a rayon pool by batch entry or by columns; row-wise kernels split by rows. The
//! accumulating reductions (scatter-add, column sums) run in row order, so every run of a
//! model gives the same bits.
//!
//! The only `unsafe` is the call into `matrixmultiply`, whose pointers are checked against
//! the buffers' lengths first.
#![allow(unsafe_code)]

use rayon::prelude::*;

use crate::backend::{
    AdamStep, Backend, BinaryOp, DType, Gemm, Kernel, MAX_RANK, Mask, Op, Permutation, UnaryOp,
};
use crate::{EngineError, Result};

/// The CPU backend, on the global rayon pool (`RAYON_NUM_THREADS` threads).
#[derive(Clone, Debug, Default)]
pub struct Cpu;

/// A buffer of the CPU backends: its values as f32, and how it stores them. A bf16 buffer
/// (from [`CpuBf16`]'s [`Backend::activations`]) emulates bf16 storage: it holds only values
/// bf16 represents, because every primitive, upload and copy rounds what it writes into one
/// (nearest, ties to even), as the CUDA backend's bf16 stores do; reads are then exact. A write
/// through [`std::ops::DerefMut`] is kept as given.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CpuBuf {
    data: Vec<f32>,
    dtype: DType,
}

impl CpuBuf {
    /// An f32 buffer holding `data`.
    pub fn new(data: Vec<f32>) -> Self {
        Self {
            data,
            dtype: DType::F32,
        }
    }

    /// A bf16 buffer holding `data`, rounded.
    pub fn bf16(mut data: Vec<f32>) -> Self {
        crate::bf16::round_all(&mut data);
        Self {
            data,
            dtype: DType::Bf16,
        }
    }

    /// How the buffer stores its values.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The values.
    pub fn into_vec(self) -> Vec<f32> {
        self.data
    }

    /// Rounds `len` values from `off` to bf16 when the buffer stores bf16: what a primitive
    /// does after writing them.
    fn settle(&mut self, off: usize, len: usize) {
        if self.dtype == DType::Bf16 {
            self.data[off..off + len]
                .par_iter_mut()
                .with_min_len(SPLIT_ELEMS)
                .for_each(|v| *v = crate::bf16::round(*v));
        }
    }
}

impl From<Vec<f32>> for CpuBuf {
    fn from(data: Vec<f32>) -> Self {
        Self::new(data)
    }
}

impl std::ops::Deref for CpuBuf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.data
    }
}

impl std::ops::DerefMut for CpuBuf {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }
}

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

/// Elements below which an element-wise or row-wise kernel stays on one thread: waking the
/// pool costs more than the work (small kernels are most of a temporal-graph batch).
const SPLIT_ELEMS: usize = 1 << 13;

fn rows_mut(buf: &mut [f32], width: usize) -> impl IndexedParallelIterator<Item = &mut [f32]> + '_ {
    let width = width.max(1);
    buf.par_chunks_mut(width)
        .with_min_len((SPLIT_ELEMS / width).max(1))
}

/// Checks that `ids` name rows below `rows`, so that no row is read or written out of place.
fn check_ids(what: &str, ids: &[i32], rows: usize) -> Result<()> {
    match ids.iter().find(|&&i| i < 0 || i as usize >= rows) {
        Some(bad) => Err(EngineError::Config(format!(
            "{what}: row id {bad} is outside the table's {rows} rows"
        ))),
        None => Ok(()),
    }
}

impl Backend for Cpu {
    type Buf = CpuBuf;
    type Ids = Vec<i32>;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn zeros(&self, n: usize) -> Result<CpuBuf> {
        Ok(CpuBuf::new(vec![0.0; n]))
    }

    fn dtype_of(&self, buf: &CpuBuf) -> DType {
        buf.dtype()
    }

    fn upload_at(&self, dst: &mut CpuBuf, off: usize, src: &[f32]) -> Result<()> {
        dst[off..off + src.len()].copy_from_slice(src);
        dst.settle(off, src.len());
        Ok(())
    }

    fn download(&self, src: &CpuBuf, off: usize, len: usize) -> Result<Vec<f32>> {
        Ok(src[off..off + len].to_vec())
    }

    fn ids(&self, n: usize) -> Result<Vec<i32>> {
        Ok(vec![0; n])
    }

    fn upload_ids(&self, dst: &mut Vec<i32>, src: &[i32]) -> Result<()> {
        dst[..src.len()].copy_from_slice(src);
        Ok(())
    }

    fn fill_zero(&self, buf: &mut CpuBuf, off: usize, len: usize) -> Result<()> {
        buf[off..off + len].fill(0.0);
        Ok(())
    }

    fn copy(
        &self,
        dst: &mut CpuBuf,
        dst_off: usize,
        src: &CpuBuf,
        src_off: usize,
        len: usize,
    ) -> Result<()> {
        crate::backend::check_copy(dst.len(), dst_off, src.len(), src_off, len)?;
        dst[dst_off..dst_off + len].copy_from_slice(&src[src_off..src_off + len]);
        dst.settle(dst_off, len);
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn launch(&self, kernel: Kernel<'_, CpuBuf, Vec<i32>>) -> Result<()> {
        match kernel {
            Kernel::Gemm { g, a, b, c } => {
                gemm(&g, (a.0, a.1), (b.0, b.1), (&mut c.0[..], c.1));
                c.0.settle(c.1, extent(Op::N, g.m, g.n, g.ldc, g.stride_c, g.batch));
            }
            Kernel::Unary { op, out, inp, n } => {
                unary(op, &mut out[..n], &inp[..n]);
                out.settle(0, n);
            }
            Kernel::UnaryBwd {
                op,
                dinp,
                inp,
                dout,
                n,
            } => {
                unary_bwd(op, &mut dinp[..n], &inp[..n], &dout[..n]);
                dinp.settle(0, n);
            }
            Kernel::Binary { op, out, a, b, n } => {
                binary(op, &mut out[..n], &a[..n], &b[..n]);
                out.settle(0, n);
            }
            Kernel::GatherRows {
                out,
                table,
                table_rows,
                ids,
                n,
                width,
            } => {
                check_ids("gather rows", &ids[..n], table_rows)?;
                let table = &table.0[table.1..table.1 + table_rows * width];
                rows_mut(&mut out[..n * width], width)
                    .zip(ids[..n].par_iter())
                    .for_each(|(row, &id)| {
                        let s = id as usize * width;
                        row.copy_from_slice(&table[s..s + width]);
                    });
                out.settle(0, n * width);
            }
            Kernel::ScatterAddRows {
                table,
                table_rows,
                ids,
                src,
                n,
                width,
            } => {
                check_ids("scatter-add rows", &ids[..n], table_rows)?;
                let (buf, at) = table;
                let table = &mut buf[at..at + table_rows * width];
                // In row order, so that repeated ids add up the same way on every run.
                for (i, &id) in ids[..n].iter().enumerate() {
                    let d = &src[i * width..(i + 1) * width];
                    let s = id as usize * width;
                    table[s..s + width]
                        .iter_mut()
                        .zip(d)
                        .for_each(|(g, x)| *g += x);
                }
                buf.settle(at, table_rows * width);
            }
            Kernel::AddRow { out, row, n, width } => {
                let b = &row.0[row.1..row.1 + width];
                rows_mut(&mut out[..n * width], width).for_each(|row| {
                    row.iter_mut().zip(b).for_each(|(o, x)| *o += x);
                });
                out.settle(0, n * width);
            }
            Kernel::SumRows { dst, src, n, width } => {
                let g = &mut dst.0[dst.1..dst.1 + width];
                for row in src[..n * width].chunks(width.max(1)) {
                    g.iter_mut().zip(row).for_each(|(a, x)| *a += x);
                }
                dst.0.settle(dst.1, width);
            }
            Kernel::SumSquares { src, len, out } => {
                // Per-chunk sums in parallel, then added in order: the same result on every run.
                let parts: Vec<f64> = src.0[src.1..src.1 + len]
                    .par_chunks(4096)
                    .map(|c| c.iter().map(|g| f64::from(*g) * f64::from(*g)).sum::<f64>())
                    .collect();
                *out = parts.iter().sum();
            }
            Kernel::Permute {
                out,
                inp,
                shape,
                perm,
            } => {
                let p = Permutation::new(shape, perm)?;
                permute(out, inp, &p);
                out.settle(0, p.len);
            }
            Kernel::Softmax {
                out,
                inp,
                rows,
                width,
                scale,
                mask,
            } => {
                softmax(out, inp, rows, width, scale, mask);
                out.settle(0, rows * width);
            }
            Kernel::SoftmaxBwd {
                dinp,
                dout,
                out,
                rows,
                width,
                scale,
                mask,
            } => {
                softmax_bwd(dinp, dout, out, rows, width, scale, mask);
                dinp.settle(0, rows * width);
            }
            Kernel::LayerNorm {
                out,
                mean,
                rstd,
                inp,
                params,
                n,
                c,
            } => {
                layernorm(out, mean, rstd, inp, (params.0, params.1), n, c);
                out.settle(0, n * c);
                mean.settle(0, n);
                rstd.settle(0, n);
            }
            Kernel::LayerNormBwd {
                dinp,
                grads,
                dout,
                inp,
                params,
                mean,
                rstd,
                n,
                c,
            } => {
                layernorm_bwd(
                    dinp,
                    (&mut grads.0[..], grads.1),
                    dout,
                    inp,
                    (params.0, params.1),
                    (mean, rstd),
                    n,
                    c,
                );
                dinp.settle(0, n * c);
                grads.0.settle(grads.1, 2 * c);
            }
            // The fusions are their two kernels on the CPU: what the CUDA kernels must match.
            Kernel::BiasGelu {
                out,
                pre,
                bias,
                n,
                width,
            } => {
                self.launch(Kernel::AddRow {
                    out: &mut *pre,
                    row: bias,
                    n,
                    width,
                })?;
                self.launch(Kernel::Unary {
                    op: UnaryOp::Gelu,
                    out,
                    inp: pre,
                    n: n * width,
                })?;
            }
            Kernel::ResidualLayerNorm {
                sum,
                out,
                mean,
                rstd,
                a,
                b,
                params,
                n,
                c,
            } => {
                self.launch(Kernel::Binary {
                    op: BinaryOp::Add,
                    out: &mut *sum,
                    a,
                    b,
                    n: n * c,
                })?;
                self.launch(Kernel::LayerNorm {
                    out,
                    mean,
                    rstd,
                    inp: sum,
                    params,
                    n,
                    c,
                })?;
            }
            Kernel::CrossEntropy {
                losses,
                logits,
                targets,
                n,
                v,
                vp,
                grad,
            } => {
                crossentropy(losses, logits, targets, n, v, vp, grad);
                losses.settle(0, n);
                logits.settle(0, n * vp);
            }
            Kernel::AttentionFwd {
                out,
                lse,
                qkv,
                heads,
                t,
                hs,
                scale,
            } => {
                crate::backend::check_head_size(hs)?;
                crate::flash::forward(out, lse, qkv, heads, t, hs, scale);
                out.settle(0, heads * t * hs);
                lse.settle(0, heads * t);
            }
            Kernel::AttentionBwd {
                dqkv,
                delta,
                dout,
                out,
                lse,
                qkv,
                heads,
                t,
                hs,
                scale,
            } => {
                crate::backend::check_head_size(hs)?;
                crate::flash::backward(dqkv, delta, dout, out, lse, qkv, heads, t, hs, scale);
                dqkv.settle(0, 3 * heads * t * hs);
                delta.settle(0, heads * t);
            }
            Kernel::AdamW {
                params,
                grads,
                m,
                v,
                off,
                len,
                step,
            } => {
                let r = off..off + len;
                adamw(
                    &mut params[r.clone()],
                    &grads[r.clone()],
                    &mut m[r.clone()],
                    &mut v[r],
                    &step,
                );
                for buf in [params, m, v] {
                    buf.settle(off, len);
                }
            }
        }
        Ok(())
    }
}

/// The CPU backend in bf16 ([`Precision::Bf16`](crate::Precision::Bf16)): each GEMM's A and
/// B are rounded to bf16 (nearest, ties to even) and multiplied in FP32, and its activations
/// ([`Backend::activations`]) are stored in bf16 ([`CpuBuf`]: every primitive computes in FP32
/// and rounds what it writes into them); every other primitive is [`Cpu`]'s. This is the
/// arithmetic of the CUDA backend in bf16, so the CUDA path is checked against it, and the
/// tests run it here. It is a reference, not a fast path: the rounding costs more than it
/// saves on a CPU.
#[derive(Clone, Debug, Default)]
pub struct CpuBf16;

impl Backend for CpuBf16 {
    type Buf = CpuBuf;
    type Ids = Vec<i32>;

    fn name(&self) -> String {
        format!("{}, bf16 activations and GEMMs emulated", Cpu.name())
    }

    fn zeros(&self, n: usize) -> Result<CpuBuf> {
        Cpu.zeros(n)
    }

    fn dtype_of(&self, buf: &CpuBuf) -> DType {
        buf.dtype()
    }

    fn activation_dtype(&self) -> DType {
        DType::Bf16
    }

    fn activations(&self, n: usize) -> Result<CpuBuf> {
        Ok(CpuBuf::bf16(vec![0.0; n]))
    }

    fn upload_at(&self, dst: &mut CpuBuf, off: usize, src: &[f32]) -> Result<()> {
        Cpu.upload_at(dst, off, src)
    }

    fn download(&self, src: &CpuBuf, off: usize, len: usize) -> Result<Vec<f32>> {
        Cpu.download(src, off, len)
    }

    fn ids(&self, n: usize) -> Result<Vec<i32>> {
        Cpu.ids(n)
    }

    fn upload_ids(&self, dst: &mut Vec<i32>, src: &[i32]) -> Result<()> {
        Cpu.upload_ids(dst, src)
    }

    fn fill_zero(&self, buf: &mut CpuBuf, off: usize, len: usize) -> Result<()> {
        Cpu.fill_zero(buf, off, len)
    }

    fn copy(
        &self,
        dst: &mut CpuBuf,
        dst_off: usize,
        src: &CpuBuf,
        src_off: usize,
        len: usize,
    ) -> Result<()> {
        Cpu.copy(dst, dst_off, src, src_off, len)
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn launch(&self, kernel: Kernel<'_, CpuBuf, Vec<i32>>) -> Result<()> {
        match kernel {
            Kernel::Gemm { g, a, b, c } => {
                if g.m == 0 || g.n == 0 || g.batch == 0 {
                    return Ok(());
                }
                let ext_a = extent(g.ta, g.m, g.k, g.lda, g.stride_a, g.batch);
                let ext_b = extent(g.tb, g.k, g.n, g.ldb, g.stride_b, g.batch);
                let (ra, oa) = bf16_operand(a.0, a.1, ext_a);
                let (rb, ob) = bf16_operand(b.0, b.1, ext_b);
                gemm(&g, (&ra, oa), (&rb, ob), (&mut c.0[..], c.1));
                c.0.settle(c.1, extent(Op::N, g.m, g.n, g.ldc, g.stride_c, g.batch));
                Ok(())
            }
            other => Cpu.launch(other),
        }
    }
}

/// A bf16 GEMM's operand of `len` values from `off` of `x`, and the offset to read it at: a bf16
/// buffer (an activation) in place, as the CUDA backend reads it; an FP32 one (a weight) as a
/// rounded copy of its reach. [`gemm`] then checks the extents.
fn bf16_operand(x: &CpuBuf, off: usize, len: usize) -> (std::borrow::Cow<'_, [f32]>, usize) {
    if x.dtype() == DType::Bf16 {
        return (std::borrow::Cow::Borrowed(&x[..]), off);
    }
    assert!(off + len <= x.len(), "a bf16 gemm reads past its buffers");
    let mut r = x[off..off + len].to_vec();
    r.par_iter_mut()
        .with_min_len(SPLIT_ELEMS)
        .for_each(|v| *v = crate::bf16::round(*v));
    (std::borrow::Cow::Owned(r), 0)
}

/// [`Kernel::Gemm`]: checks the operands' extents, then runs the product.
fn gemm(g: &Gemm, a: (&[f32], usize), b: (&[f32], usize), c: (&mut [f32], usize)) {
    if g.m == 0 || g.n == 0 || g.batch == 0 {
        return;
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
    // SAFETY: the extents of A, B and C were checked against their buffers above, C's batch
    // entries do not overlap, and C is borrowed mutably (so it aliases neither A nor B).
    unsafe { Cpu::gemm_raw(g, pa, pb, pc) };
}

/// `out[i] = f(inp[i])`.
fn map(out: &mut [f32], inp: &[f32], f: impl Fn(f32) -> f32 + Sync) {
    out.par_iter_mut()
        .with_min_len(SPLIT_ELEMS)
        .zip(inp)
        .for_each(|(o, &x)| *o = f(x));
}

/// `out[i] = f(a[i], b[i])`.
fn zip_map(out: &mut [f32], a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) {
    out.par_iter_mut()
        .with_min_len(SPLIT_ELEMS)
        .zip(a)
        .zip(b)
        .for_each(|((o, &x), &y)| *o = f(x, y));
}

/// [`Kernel::Unary`]; one loop per op, so that each compiles to its own tight loop.
fn unary(op: UnaryOp, out: &mut [f32], inp: &[f32]) {
    match op {
        UnaryOp::Gelu => map(out, inp, gelu),
        UnaryOp::Relu => map(out, inp, |x| x.max(0.0)),
        UnaryOp::Sigmoid => map(out, inp, sigmoid),
        UnaryOp::Tanh => map(out, inp, f32::tanh),
        UnaryOp::Cos => map(out, inp, f32::cos),
    }
}

/// [`Kernel::UnaryBwd`]: `dinp = op'(inp) * dout`.
fn unary_bwd(op: UnaryOp, dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    match op {
        UnaryOp::Gelu => zip_map(dinp, inp, dout, |x, d| gelu_grad(x) * d),
        UnaryOp::Relu => zip_map(dinp, inp, dout, |x, d| if x > 0.0 { d } else { 0.0 }),
        UnaryOp::Sigmoid => zip_map(dinp, inp, dout, |x, d| {
            let s = sigmoid(x);
            s * (1.0 - s) * d
        }),
        UnaryOp::Tanh => zip_map(dinp, inp, dout, |x, d| {
            let t = x.tanh();
            (1.0 - t * t) * d
        }),
        UnaryOp::Cos => zip_map(dinp, inp, dout, |x, d| -x.sin() * d),
    }
}

/// [`Kernel::Binary`].
fn binary(op: BinaryOp, out: &mut [f32], a: &[f32], b: &[f32]) {
    match op {
        BinaryOp::Add => zip_map(out, a, b, |x, y| x + y),
        BinaryOp::Sub => zip_map(out, a, b, |x, y| x - y),
        BinaryOp::Mul => zip_map(out, a, b, |x, y| x * y),
    }
}

/// [`Kernel::Permute`]: copies runs that are contiguous in both tensors (the last axis, when
/// it stays last), in parallel tasks that each walk their runs with an odometer over the
/// output's axes (no division per run).
fn permute(out: &mut [f32], inp: &[f32], p: &Permutation) {
    if p.len == 0 {
        return;
    }
    let last = MAX_RANK - 1;
    let first = MAX_RANK - p.rank;
    let contiguous = p.strides[last] == 1;
    let inner = if contiguous { p.dims[last] } else { 1 };
    // The axes that index the runs.
    let top = if contiguous { last } else { MAX_RANK };
    let runs = p.len / inner;
    let per_task = runs.div_ceil(4 * rayon::current_num_threads()).max(1);
    let inp = &inp[..p.len];
    out[..p.len]
        .par_chunks_mut(per_task * inner)
        .enumerate()
        .for_each(|(task, chunk)| {
            let mut idx = [0usize; MAX_RANK];
            let mut rem = task * per_task;
            let mut src = 0;
            for a in (first..top).rev() {
                idx[a] = rem % p.dims[a];
                rem /= p.dims[a];
                src += idx[a] * p.strides[a];
            }
            for run in chunk.chunks_mut(inner) {
                run.copy_from_slice(&inp[src..src + inner]);
                let mut a = top;
                while a > first {
                    a -= 1;
                    idx[a] += 1;
                    src += p.strides[a];
                    if idx[a] < p.dims[a] {
                        break;
                    }
                    src -= p.dims[a] * p.strides[a];
                    idx[a] = 0;
                }
            }
        });
}

/// Entries row `r` of a softmax `width` wide sees under `mask`.
fn visible(mask: Mask, r: usize, width: usize) -> usize {
    match mask {
        Mask::Full => width,
        Mask::Causal => r % width + 1,
    }
}

/// [`Kernel::Softmax`].
fn softmax(out: &mut [f32], inp: &[f32], rows: usize, t: usize, scale: f32, mask: Mask) {
    rows_mut(&mut out[..rows * t], t)
        .enumerate()
        .for_each(|(r, out)| {
            let seen = visible(mask, r, t);
            let x = &inp[r * t..r * t + seen];
            let max = x.iter().fold(f32::NEG_INFINITY, |m, v| m.max(v * scale));
            let mut sum = 0.0f32;
            for (o, v) in out.iter_mut().zip(x) {
                *o = (v * scale - max).exp();
                sum += *o;
            }
            let inv = 1.0 / sum;
            out[..seen].iter_mut().for_each(|o| *o *= inv);
            out[seen..].fill(0.0);
        });
}

/// [`Kernel::SoftmaxBwd`].
#[allow(clippy::too_many_arguments)]
fn softmax_bwd(
    dinp: &mut [f32],
    dout: &[f32],
    att: &[f32],
    rows: usize,
    t: usize,
    scale: f32,
    mask: Mask,
) {
    rows_mut(&mut dinp[..rows * t], t)
        .enumerate()
        .for_each(|(r, out)| {
            let seen = visible(mask, r, t);
            let a = &att[r * t..r * t + seen];
            let d = &dout[r * t..r * t + seen];
            let dot: f32 = a.iter().zip(d).map(|(x, y)| x * y).sum();
            for ((o, x), y) in out.iter_mut().zip(a).zip(d) {
                *o = scale * x * (y - dot);
            }
            out[seen..].fill(0.0);
        });
}

/// [`Kernel::LayerNorm`].
fn layernorm(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    (params, w): (&[f32], usize),
    n: usize,
    c: usize,
) {
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
}

/// [`Kernel::LayerNormBwd`].
#[allow(clippy::too_many_arguments)]
fn layernorm_bwd(
    dinp: &mut [f32],
    (grads, dw): (&mut [f32], usize),
    dout: &[f32],
    inp: &[f32],
    (params, w): (&[f32], usize),
    (mean, rstd): (&[f32], &[f32]),
    n: usize,
    c: usize,
) {
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
    let (gw, gb) = grads[dw..dw + 2 * c].split_at_mut(c);
    for i in 0..n {
        let x = &inp[i * c..(i + 1) * c];
        let d = &dout[i * c..(i + 1) * c];
        let (m, s) = (mean[i], rstd[i]);
        for j in 0..c {
            gw[j] += (x[j] - m) * s * d[j];
            gb[j] += d[j];
        }
    }
}

/// [`Kernel::CrossEntropy`].
fn crossentropy(
    losses: &mut [f32],
    logits: &mut [f32],
    targets: &[i32],
    n: usize,
    v: usize,
    vp: usize,
    grad: Option<f32>,
) {
    rows_mut(&mut logits[..n * vp], vp)
        .zip(losses[..n].par_iter_mut())
        .enumerate()
        .for_each(|(i, (row, loss))| {
            let x = &mut row[..v];
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = x.iter().map(|l| (l - max).exp()).sum();
            let target = targets[i] as usize;
            *loss = sum.ln() + max - x[target];
            if let Some(dloss) = grad {
                let inv = 1.0 / sum;
                for (j, l) in x.iter_mut().enumerate() {
                    let p = (*l - max).exp() * inv;
                    *l = dloss * (p - f32::from(j == target));
                }
                row[v..].fill(0.0);
            }
        });
}

/// [`Kernel::AdamW`] on one range of parameters, gradients and moments.
fn adamw(params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamStep) {
    let bc1 = 1.0 - s.beta1.powi(s.t);
    let bc2 = 1.0 - s.beta2.powi(s.t);
    params
        .par_iter_mut()
        .zip(grads)
        .zip(m)
        .zip(v)
        .for_each(|(((p, &g), m), v)| {
            let g = g * s.grad_scale;
            *m = s.beta1 * *m + (1.0 - s.beta1) * g;
            *v = s.beta2 * *v + (1.0 - s.beta2) * g * g;
            let mh = *m / bc1;
            let vh = *v / bc2;
            *p -= s.lr * (mh / (vh.sqrt() + s.eps) + s.weight_decay * *p);
        });
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

/// The logistic function, `1 / (1 + exp(-x))`.
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}
