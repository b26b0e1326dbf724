//! The conformance suite, as burn's backend tests: every [`Kernel`] (each op of each op enum,
//! each mask) run on one backend and compared with a naive implementation on the host in f64.
//! The same suite serves every backend: the CPU backend's tests run it, and
//! `lockstep-worker bench engine-check` runs it on the GPU.
//!
//! The references are written for clarity, not speed: plain loops over coordinates, no
//! parallelism, f64 sums. Each output buffer is compared whole, so a kernel that writes outside
//! its range fails too.
//!
//! Operands that are activations in a model (a layer's input and output, their gradients) live
//! in the backend's activation storage ([`Backend::activations`]); parameters, their gradients,
//! optimizer state and statistics in FP32 buffers. Where activations are stored in bf16, the
//! suite draws their inputs as bf16 values (so the reference reads what the backend reads),
//! checks that every bf16 output holds only bf16 values, and compares it within [`BF16_TOL`]
//! (an exact primitive, a copy or a permutation, exactly with the reference rounded to bf16).
//! It then runs again with every output it makes fresh in FP32 (rows marked "(FP32 output)"),
//! so that each kernel also runs with bf16 inputs and an FP32 output, which FP32's tolerances
//! check; outputs that start from values (accumulated or updated in place) stay bf16 there.

use rand::{Rng, SeedableRng};

use crate::Result;
use crate::backend::{AdamStep, Backend, BinaryOp, DType, Gemm, Kernel, Mask, Op, UnaryOp};
use crate::check::Compared;

/// Tolerance on the largest difference over the largest reference magnitude, for everything
/// but GEMMs: f32 rounding of short sums and of `exp`/`tanh`.
const TOL: f32 = 1e-5;

/// Tolerance of an activation output stored in bf16: its own rounding (half an ulp, 2^-9 of
/// each value) and that of bf16 inputs that were themselves rounded outputs (a backward reads
/// its forward's), against the largest reference magnitude.
pub const BF16_TOL: f32 = 1e-2;

/// Runs every primitive on `be` and compares it with the naive reference; `gemm_tol` is the
/// tolerance of the GEMMs (1e-4 in FP32, about 1e-2 with TF32 tensor cores).
pub fn conformance<B: Backend>(be: &B, gemm_tol: f32) -> Result<Vec<Compared>> {
    let mut rows = suite(be, gemm_tol, false)?;
    if be.activation_dtype() == DType::Bf16 {
        for mut r in suite(be, gemm_tol, true)? {
            r.name.push_str(" (FP32 output)");
            rows.push(r);
        }
    }
    Ok(rows)
}

/// One pass of the suite; with `fp32_out`, every output the pass makes fresh is FP32.
fn suite<B: Backend>(be: &B, gemm_tol: f32, fp32_out: bool) -> Result<Vec<Compared>> {
    let mut s = Suite {
        be,
        out: Vec::new(),
        seed: 1000,
        act: be.activation_dtype(),
        fp32_out,
    };
    s.copies()?;
    s.gemm(gemm_tol)?;
    s.unary()?;
    s.binary()?;
    s.gather_and_scatter_add()?;
    s.add_row_and_sum_rows()?;
    s.sum_squares()?;
    s.permute()?;
    s.softmax()?;
    s.fused_attention()?;
    s.layernorm()?;
    s.fusions()?;
    s.crossentropy()?;
    s.adamw()?;
    Ok(s.out)
}

/// One comparison: `got` from the backend against `want` from the reference.
fn compared(name: String, want: &[f64], got: &[f32], tol: f32) -> Compared {
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-30);
    let max_abs = if want.len() == got.len() {
        // A NaN difference is no match (`max` would skip it).
        want.iter().zip(got).fold(0.0f64, |m, (w, g)| {
            let d = (w - f64::from(*g)).abs();
            if d.is_nan() { f64::INFINITY } else { m.max(d) }
        })
    } else {
        f64::INFINITY
    };
    Compared {
        name,
        max_abs: max_abs as f32,
        rel: (max_abs / scale) as f32,
        tol,
    }
}

fn wide(x: &[f32]) -> Vec<f64> {
    x.iter().map(|v| f64::from(*v)).collect()
}

/// The reference of one strided batched GEMM (see [`Gemm`]): `c` (from its offset) with every
/// entry `alpha * op(A) op(B) + beta * C` computed in f64, the operands read at their offsets.
/// What every backend's GEMM is checked against, here and in the engine's tests.
pub fn reference_gemm(
    g: &Gemm,
    (a, oa): (&[f32], usize),
    (b, ob): (&[f32], usize),
    (c, oc): (&[f32], usize),
) -> Vec<f64> {
    let mut out = wide(c);
    for bi in 0..g.batch {
        for i in 0..g.m {
            for j in 0..g.n {
                let mut s = 0.0f64;
                for p in 0..g.k {
                    let av = match g.ta {
                        Op::N => a[oa + bi * g.stride_a + i + p * g.lda],
                        Op::T => a[oa + bi * g.stride_a + p + i * g.lda],
                    };
                    let bv = match g.tb {
                        Op::N => b[ob + bi * g.stride_b + p + j * g.ldb],
                        Op::T => b[ob + bi * g.stride_b + j + p * g.ldb],
                    };
                    s += f64::from(av) * f64::from(bv);
                }
                let ci = oc + bi * g.stride_c + i + j * g.ldc;
                out[ci] = f64::from(g.alpha) * s + f64::from(g.beta) * out[ci];
            }
        }
    }
    out
}

/// A real function, for the references.
type Real = fn(f64) -> f64;

/// Inputs, outputs and the running seed.
struct Suite<'b, B: Backend> {
    be: &'b B,
    out: Vec<Compared>,
    seed: u64,
    /// How the backend stores activations.
    act: DType,
    /// Whether fresh outputs are FP32 whatever activations are.
    fp32_out: bool,
}

impl<B: Backend> Suite<'_, B> {
    /// `n` uniform values in `-scale..scale`, a new draw each call.
    fn rnd(&mut self, n: usize, scale: f32) -> Vec<f32> {
        self.seed += 1;
        let mut r = rand::rngs::StdRng::seed_from_u64(self.seed);
        (0..n).map(|_| r.random_range(-scale..scale)).collect()
    }

    /// `n` uniform values in `-scale..scale` for an activation input: bf16 values where
    /// activations are stored in bf16, so that the reference reads what the backend does.
    fn rnd_act(&mut self, n: usize, scale: f32) -> Vec<f32> {
        let mut x = self.rnd(n, scale);
        if self.act == DType::Bf16 {
            crate::bf16::round_all(&mut x);
        }
        x
    }

    /// `n` ids below `rows`, a new draw each call.
    fn ids(&mut self, n: usize, rows: usize) -> Vec<i32> {
        self.seed += 1;
        let mut r = rand::rngs::StdRng::seed_from_u64(self.seed);
        (0..n).map(|_| r.random_range(0..rows as i32)).collect()
    }

    fn up(&self, x: &[f32]) -> Result<B::Buf> {
        let mut b = self.be.zeros(x.len())?;
        self.be.upload(&mut b, x)?;
        Ok(b)
    }

    /// `x` in an activation buffer.
    fn up_act(&self, x: &[f32]) -> Result<B::Buf> {
        let mut b = self.be.activations(x.len())?;
        self.be.upload(&mut b, x)?;
        Ok(b)
    }

    /// A zero buffer of `n` values for an output: activation storage, or FP32 in the pass
    /// with FP32 outputs.
    fn act(&self, n: usize) -> Result<B::Buf> {
        if self.fp32_out {
            self.be.zeros(n)
        } else {
            self.be.activations(n)
        }
    }

    fn up_ids(&self, x: &[i32]) -> Result<B::Ids> {
        let mut b = self.be.ids(x.len())?;
        self.be.upload_ids(&mut b, x)?;
        Ok(b)
    }

    /// Compares all of `buf` (`want.len()` floats) with `want`.
    fn check(
        &mut self,
        name: impl Into<String>,
        want: &[f64],
        buf: &B::Buf,
        tol: f32,
    ) -> Result<()> {
        let got = self.be.download(buf, 0, want.len())?;
        self.out.push(compared(name.into(), want, &got, tol));
        Ok(())
    }

    /// Compares an activation output: as [`Suite::check`] for an FP32 buffer; for a bf16
    /// one, failing if any value is not a bf16 value, and within [`BF16_TOL`], or, for an
    /// exact primitive (`tol` 0), exactly with the reference rounded to bf16.
    fn check_act(
        &mut self,
        name: impl Into<String>,
        want: &[f64],
        buf: &B::Buf,
        tol: f32,
    ) -> Result<()> {
        if self.be.dtype_of(buf) != DType::Bf16 {
            return self.check(name, want, buf, tol);
        }
        let got = self.be.download(buf, 0, want.len())?;
        let mut c = if tol == 0.0 {
            let rounded: Vec<f64> = want
                .iter()
                .map(|w| f64::from(crate::bf16::round(*w as f32)))
                .collect();
            compared(name.into(), &rounded, &got, 0.0)
        } else {
            compared(name.into(), want, &got, tol.max(BF16_TOL))
        };
        if let Some(bad) = got.iter().find(|v| v.to_bits() & 0xffff != 0) {
            c.name = format!("{} (holds {bad:e}, not a bf16 value)", c.name);
            c.rel = f32::INFINITY;
        }
        self.out.push(c);
        Ok(())
    }

    /// Uploads and device copies between FP32 and activation buffers: into bf16 storage a
    /// value is rounded, out of it it is exact.
    fn copies(&mut self) -> Result<()> {
        let (n, off) = (300, 5);
        let x = self.rnd(off + n, 1.0);
        let src = self.up(&x)?;
        let mut a = self.act(n + 3)?;
        self.be.copy(&mut a, 3, &src, off, n)?;
        let mut want = vec![0.0; 3];
        want.extend(wide(&x[off..]));
        self.check_act("copy into activations", &want, &a, 0.0)?;
        let stored = self.be.download(&a, 0, n + 3)?;
        let mut back = self.be.zeros(n + 2)?;
        self.be.copy(&mut back, 2, &a, 3, n)?;
        let mut want = vec![0.0; 2];
        want.extend(wide(&stored[3..]));
        self.check("copy out of activations", &want, &back, 0.0)?;
        let mut up = self.act(n)?;
        self.be.upload(&mut up, &x[off..])?;
        self.check_act("upload into activations", &wide(&x[off..]), &up, 0.0)
    }

    fn gemm(&mut self, tol: f32) -> Result<()> {
        for (ta, tb) in [
            (Op::N, Op::N),
            (Op::N, Op::T),
            (Op::T, Op::N),
            (Op::T, Op::T),
        ] {
            for &(m, n, k, batch) in &[(17, 23, 45, 1), (8, 9, 5, 3)] {
                let lda = if ta == Op::N { m } else { k } + 1;
                let ldb = if tb == Op::N { k } else { n } + 2;
                let ldc = m + 3;
                let g = Gemm {
                    ta,
                    tb,
                    m,
                    n,
                    k,
                    alpha: 0.75,
                    lda,
                    stride_a: lda * m.max(k) + 1,
                    ldb,
                    stride_b: ldb * n.max(k) + 2,
                    beta: 0.5,
                    ldc,
                    stride_c: ldc * n + 5,
                    batch,
                };
                let (oa, ob, oc) = (3, 4, 5);
                // A and B activations; C an activation in the batched products (attention's),
                // FP32 in the others (a weight gradient's accumulation).
                let a = self.rnd_act(oa + g.stride_a * batch, 1.0);
                let b = self.rnd_act(ob + g.stride_b * batch, 1.0);
                let c = if batch > 1 {
                    self.rnd_act(oc + g.stride_c * batch, 1.0)
                } else {
                    self.rnd(oc + g.stride_c * batch, 1.0)
                };
                let want = reference_gemm(&g, (&a, oa), (&b, ob), (&c, oc));
                let (da, db) = (self.up_act(&a)?, self.up_act(&b)?);
                let name = format!("gemm {ta:?}{tb:?} batch {batch}");
                if batch > 1 {
                    let mut dc = self.up_act(&c)?;
                    self.be.gemm(&g, (&da, oa), (&db, ob), (&mut dc, oc))?;
                    self.check_act(name, &want, &dc, tol)?;
                } else {
                    let mut dc = self.up(&c)?;
                    self.be.gemm(&g, (&da, oa), (&db, ob), (&mut dc, oc))?;
                    self.check(name, &want, &dc, tol)?;
                }
            }
        }
        Ok(())
    }

    fn unary(&mut self) -> Result<()> {
        let n = 1001;
        let x = self.rnd_act(n, 5.0);
        let d = self.rnd_act(n, 1.0);
        let (dx, dd) = (self.up_act(&x)?, self.up_act(&d)?);
        for op in [
            UnaryOp::Gelu,
            UnaryOp::Relu,
            UnaryOp::Sigmoid,
            UnaryOp::Tanh,
            UnaryOp::Cos,
        ] {
            let (f, df): (Real, Real) = match op {
                UnaryOp::Gelu => (gelu, gelu_grad),
                UnaryOp::Relu => (|x| x.max(0.0), |x| if x > 0.0 { 1.0 } else { 0.0 }),
                UnaryOp::Sigmoid => (sigmoid, |x| sigmoid(x) * (1.0 - sigmoid(x))),
                UnaryOp::Tanh => (f64::tanh, |x| 1.0 - x.tanh() * x.tanh()),
                UnaryOp::Cos => (f64::cos, |x| -x.sin()),
            };
            let mut out = self.act(n)?;
            self.be.launch(Kernel::Unary {
                op,
                out: &mut out,
                inp: &dx,
                n,
            })?;
            let want: Vec<f64> = x.iter().map(|&v| f(f64::from(v))).collect();
            self.check_act(format!("unary {op:?}"), &want, &out, TOL)?;
            let mut dinp = self.act(n)?;
            self.be.launch(Kernel::UnaryBwd {
                op,
                dinp: &mut dinp,
                inp: &dx,
                dout: &dd,
                n,
            })?;
            let want: Vec<f64> = x
                .iter()
                .zip(&d)
                .map(|(&v, &g)| df(f64::from(v)) * f64::from(g))
                .collect();
            self.check_act(format!("unary bwd {op:?}"), &want, &dinp, TOL)?;
        }
        Ok(())
    }

    fn binary(&mut self) -> Result<()> {
        let n = 777;
        let (a, b) = (self.rnd_act(n, 3.0), self.rnd_act(n, 3.0));
        let (da, db) = (self.up_act(&a)?, self.up_act(&b)?);
        for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul] {
            let f: fn(f64, f64) -> f64 = match op {
                BinaryOp::Add => |x, y| x + y,
                BinaryOp::Sub => |x, y| x - y,
                BinaryOp::Mul => |x, y| x * y,
            };
            let mut out = self.act(n)?;
            self.be.launch(Kernel::Binary {
                op,
                out: &mut out,
                a: &da,
                b: &db,
                n,
            })?;
            let want: Vec<f64> = a
                .iter()
                .zip(&b)
                .map(|(&x, &y)| f(f64::from(x), f64::from(y)))
                .collect();
            self.check_act(format!("binary {op:?}"), &want, &out, TOL)?;
        }
        Ok(())
    }

    fn gather_and_scatter_add(&mut self) -> Result<()> {
        // More rows gathered than the table has: ids repeat, and scatter-add must sum them.
        let (rows, width, n, off) = (13, 7, 40, 5);
        let table = self.rnd(off + rows * width, 1.0);
        let ids = self.ids(n, rows);
        let (dt, di) = (self.up(&table)?, self.up_ids(&ids)?);
        let mut out = self.act(n * width)?;
        self.be.launch(Kernel::GatherRows {
            out: &mut out,
            table: (&dt, off),
            table_rows: rows,
            ids: &di,
            n,
            width,
        })?;
        let mut want = Vec::new();
        for &id in &ids {
            let s = off + id as usize * width;
            want.extend(wide(&table[s..s + width]));
        }
        self.check_act("gather rows", &want, &out, 0.0)?;

        let src = self.rnd_act(n * width, 1.0);
        let ds = self.up_act(&src)?;
        let mut acc = self.up(&table)?;
        self.be.launch(Kernel::ScatterAddRows {
            table: (&mut acc, off),
            table_rows: rows,
            ids: &di,
            src: &ds,
            n,
            width,
        })?;
        let mut want = wide(&table);
        for (i, &id) in ids.iter().enumerate() {
            for c in 0..width {
                want[off + id as usize * width + c] += f64::from(src[i * width + c]);
            }
        }
        self.check("scatter-add rows", &want, &acc, TOL)
    }

    fn add_row_and_sum_rows(&mut self) -> Result<()> {
        // More rows than a CUDA block folds (64) and more columns than its threads (256).
        let (n, width, off) = (70, 300, 3);
        let row = self.rnd(off + width, 1.0);
        let x = self.rnd_act(n * width, 1.0);
        let dr = self.up(&row)?;
        let mut out = self.up_act(&x)?;
        self.be.launch(Kernel::AddRow {
            out: &mut out,
            row: (&dr, off),
            n,
            width,
        })?;
        let want: Vec<f64> = (0..n * width)
            .map(|i| f64::from(x[i]) + f64::from(row[off + i % width]))
            .collect();
        self.check_act("add row", &want, &out, TOL)?;

        let dx = self.up_act(&x)?;
        let mut dst = self.up(&row)?;
        self.be.launch(Kernel::SumRows {
            dst: (&mut dst, off),
            src: &dx,
            n,
            width,
        })?;
        let mut want = wide(&row);
        for i in 0..n {
            for c in 0..width {
                want[off + c] += f64::from(x[i * width + c]);
            }
        }
        self.check("sum rows", &want, &dst, TOL)
    }

    fn sum_squares(&mut self) -> Result<()> {
        let (len, off) = (100_003, 7);
        let x = self.rnd(off + len + 11, 1.0);
        let dx = self.up(&x)?;
        let got = self.be.sum_squares(&dx, off, len)?;
        let want: f64 = x[off..off + len]
            .iter()
            .map(|v| f64::from(*v) * f64::from(*v))
            .sum();
        self.out.push(compared(
            "sum of squares".into(),
            &[want],
            &[got as f32],
            TOL,
        ));
        Ok(())
    }

    fn permute(&mut self) -> Result<()> {
        let cases: [(&[usize], &[usize]); 5] = [
            // Attention's q, k, v split and its inverse's shape; the head swap.
            (&[2, 5, 3, 4, 7], &[2, 0, 3, 1, 4]),
            (&[2, 3, 5, 4], &[0, 2, 1, 3]),
            // The last axis moves: no contiguous runs.
            (&[2, 3, 1, 4, 2, 3], &[5, 4, 3, 2, 1, 0]),
            (&[9, 11], &[1, 0]),
            (&[10], &[0]),
        ];
        for (shape, perm) in cases {
            let len: usize = shape.iter().product();
            let x = self.rnd_act(len, 1.0);
            let dx = self.up_act(&x)?;
            let mut out = self.act(len)?;
            self.be.launch(Kernel::Permute {
                out: &mut out,
                inp: &dx,
                shape,
                perm,
            })?;
            // For each input element, its coordinates, then its place in the output.
            let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
            let mut want = vec![0.0; len];
            for (i, v) in x.iter().enumerate() {
                let mut coord = vec![0; shape.len()];
                let mut rem = i;
                for a in (0..shape.len()).rev() {
                    coord[a] = rem % shape[a];
                    rem /= shape[a];
                }
                let mut o = 0;
                for (j, &p) in perm.iter().enumerate() {
                    o = o * out_shape[j] + coord[p];
                }
                want[o] = f64::from(*v);
            }
            self.check_act(format!("permute {shape:?} by {perm:?}"), &want, &out, 0.0)?;
        }
        Ok(())
    }

    fn softmax(&mut self) -> Result<()> {
        // Rows wider than a warp; causal rows in square blocks.
        let (width, rows, scale) = (45, 90, 0.7f32);
        let x = self.rnd_act(rows * width, 4.0);
        let d = self.rnd_act(rows * width, 1.0);
        let (dx, dd) = (self.up_act(&x)?, self.up_act(&d)?);
        for mask in [Mask::Full, Mask::Causal] {
            let mut out = self.act(rows * width)?;
            self.be.launch(Kernel::Softmax {
                out: &mut out,
                inp: &dx,
                rows,
                width,
                scale,
                mask,
            })?;
            let mut p = vec![0.0f64; rows * width];
            for r in 0..rows {
                let seen = match mask {
                    Mask::Full => width,
                    Mask::Causal => r % width + 1,
                };
                let s: Vec<f64> = (0..seen)
                    .map(|j| f64::from(scale) * f64::from(x[r * width + j]))
                    .collect();
                let mx = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|v| (v - mx).exp()).sum();
                for j in 0..seen {
                    p[r * width + j] = (s[j] - mx).exp() / z;
                }
            }
            self.check_act(format!("softmax {mask:?}"), &p, &out, TOL)?;
            let mut dinp = self.act(rows * width)?;
            self.be.launch(Kernel::SoftmaxBwd {
                dinp: &mut dinp,
                dout: &dd,
                out: &out,
                rows,
                width,
                scale,
                mask,
            })?;
            let mut want = vec![0.0f64; rows * width];
            for r in 0..rows {
                let row = r * width..(r + 1) * width;
                let dot: f64 = p[row.clone()]
                    .iter()
                    .zip(&d[row.clone()])
                    .map(|(a, b)| a * f64::from(*b))
                    .sum();
                for i in row {
                    want[i] = f64::from(scale) * p[i] * (f64::from(d[i]) - dot);
                }
            }
            self.check_act(format!("softmax bwd {mask:?}"), &want, &dinp, TOL)?;
        }
        Ok(())
    }

    fn fused_attention(&mut self) -> Result<()> {
        // Tokens not a multiple of the 32-key tile, heads wider than a warp and narrower.
        // Every channel slot of a lane (hs up to the kernels' 128) and a part-filled last one.
        for (heads, t, hs) in [(3, 45, 40), (2, 70, 8), (1, 33, 128), (2, 40, 100)] {
            let n = heads * t * hs;
            let scale = 1.0 / (hs as f32).sqrt();
            let qkv = self.rnd_act(3 * n, 2.0);
            let dout = self.rnd_act(n, 1.0);
            let (dq, dd) = (self.up_act(&qkv)?, self.up_act(&dout)?);
            let (mut out, mut lse) = (self.act(n)?, self.be.zeros(heads * t)?);
            self.be.launch(Kernel::AttentionFwd {
                out: &mut out,
                lse: &mut lse,
                qkv: &dq,
                heads,
                t,
                hs,
                scale,
            })?;
            // The reference: every score, a softmax per query, in f64.
            let x = |i: usize| f64::from(qkv[i]);
            let (mut want, mut want_lse) = (vec![0.0f64; n], vec![0.0f64; heads * t]);
            let mut probs = vec![0.0f64; heads * t * t];
            for h in 0..heads {
                for i in 0..t {
                    let r = h * t + i;
                    let s: Vec<f64> = (0..=i)
                        .map(|j| {
                            let kr = h * t + j;
                            f64::from(scale)
                                * (0..hs)
                                    .map(|d| x(r * hs + d) * x(n + kr * hs + d))
                                    .sum::<f64>()
                        })
                        .collect();
                    let mx = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|v| (v - mx).exp()).sum();
                    want_lse[r] = mx + z.ln();
                    for (j, sj) in s.iter().enumerate() {
                        let p = (sj - mx).exp() / z;
                        probs[r * t + j] = p;
                        for d in 0..hs {
                            want[r * hs + d] += p * x(2 * n + (h * t + j) * hs + d);
                        }
                    }
                }
            }
            let tag = format!("{heads}x{t}x{hs}");
            self.check_act(format!("attention (fused) {tag}"), &want, &out, TOL)?;
            self.check(format!("attention (fused) lse {tag}"), &want_lse, &lse, TOL)?;
            let (mut dqkv, mut delta) = (self.act(3 * n)?, self.be.zeros(heads * t)?);
            self.be.launch(Kernel::AttentionBwd {
                dqkv: &mut dqkv,
                delta: &mut delta,
                dout: &dd,
                out: &out,
                lse: &lse,
                qkv: &dq,
                heads,
                t,
                hs,
                scale,
            })?;
            // dP = dout v^T, dS = P (dP - rowsum(P dP)), dq = scale dS k, dk = scale dS^T q,
            // dv = P^T dout.
            let mut dw = vec![0.0f64; 3 * n];
            let g = |i: usize| f64::from(dout[i]);
            for h in 0..heads {
                for i in 0..t {
                    let r = h * t + i;
                    let dp: Vec<f64> = (0..=i)
                        .map(|j| {
                            (0..hs)
                                .map(|d| g(r * hs + d) * x(2 * n + (h * t + j) * hs + d))
                                .sum()
                        })
                        .collect();
                    let rowdot: f64 = (0..=i).map(|j| probs[r * t + j] * dp[j]).sum();
                    for j in 0..=i {
                        let kr = h * t + j;
                        let p = probs[r * t + j];
                        let ds = p * (dp[j] - rowdot) * f64::from(scale);
                        for d in 0..hs {
                            dw[r * hs + d] += ds * x(n + kr * hs + d);
                            dw[n + kr * hs + d] += ds * x(r * hs + d);
                            dw[2 * n + kr * hs + d] += p * g(r * hs + d);
                        }
                    }
                }
            }
            self.check_act(format!("attention bwd (fused) {tag}"), &dw, &dqkv, 1e-4)?;
        }
        Ok(())
    }

    fn layernorm(&mut self) -> Result<()> {
        let (n, c, off) = (6, 50, 4);
        let x = self.rnd_act(n * c, 2.0);
        let mut p = self.rnd(off + 2 * c, 1.0);
        p[off..off + c].iter_mut().for_each(|w| *w += 1.0);
        let (dx, dp) = (self.up_act(&x)?, self.up(&p)?);
        let (mut out, mut mean, mut rstd) =
            (self.act(n * c)?, self.be.zeros(n)?, self.be.zeros(n)?);
        self.be.launch(Kernel::LayerNorm {
            out: &mut out,
            mean: &mut mean,
            rstd: &mut rstd,
            inp: &dx,
            params: (&dp, off),
            n,
            c,
        })?;
        let (want, wm, wr, norm) = layernorm_reference(&wide(&x), &p, off, n, c);
        self.check_act("layernorm", &want, &out, TOL)?;
        self.check("layernorm: mean", &wm, &mean, TOL)?;
        self.check("layernorm: rstd", &wr, &rstd, TOL)?;

        let dout = self.rnd_act(n * c, 1.0);
        let dinp0 = self.rnd_act(n * c, 0.1);
        let grads0 = self.rnd(off + 2 * c, 0.1);
        let dd = self.up_act(&dout)?;
        let (mut dinp, mut grads) = (self.up_act(&dinp0)?, self.up(&grads0)?);
        self.be.launch(Kernel::LayerNormBwd {
            dinp: &mut dinp,
            grads: (&mut grads, off),
            dout: &dd,
            inp: &dx,
            params: (&dp, off),
            mean: &mean,
            rstd: &rstd,
            n,
            c,
        })?;
        let (mut wd, mut wg) = (wide(&dinp0), wide(&grads0));
        for i in 0..n {
            let dn: Vec<f64> = (0..c)
                .map(|j| f64::from(p[off + j]) * f64::from(dout[i * c + j]))
                .collect();
            let mean_dn = dn.iter().sum::<f64>() / c as f64;
            let mean_dn_norm = (0..c).map(|j| dn[j] * norm[i * c + j]).sum::<f64>() / c as f64;
            for j in 0..c {
                wd[i * c + j] += wr[i] * (dn[j] - mean_dn - norm[i * c + j] * mean_dn_norm);
                wg[off + j] += norm[i * c + j] * f64::from(dout[i * c + j]);
                wg[off + c + j] += f64::from(dout[i * c + j]);
            }
        }
        self.check_act("layernorm bwd: dinp", &wd, &dinp, TOL)?;
        self.check("layernorm bwd: dw, db", &wg, &grads, TOL)
    }

    /// `v` as `buf` stores it: rounded to bf16 where `buf` is bf16.
    fn as_stored(&self, buf: &B::Buf, v: f64) -> f64 {
        if self.be.dtype_of(buf) == DType::Bf16 {
            f64::from(crate::bf16::round(v as f32))
        } else {
            v
        }
    }

    /// The fused kernels against the references of the two kernels each replaces, the second
    /// reading what the first stored.
    fn fusions(&mut self) -> Result<()> {
        let (n, width, off) = (37, 70, 3);
        let x = self.rnd_act(n * width, 2.0);
        let bias = self.rnd(off + width, 1.0);
        let db = self.up(&bias)?;
        let (mut pre, mut out) = (self.up_act(&x)?, self.act(n * width)?);
        self.be.launch(Kernel::BiasGelu {
            out: &mut out,
            pre: &mut pre,
            bias: (&db, off),
            n,
            width,
        })?;
        let biased: Vec<f64> = (0..n * width)
            .map(|i| f64::from(x[i]) + f64::from(bias[off + i % width]))
            .collect();
        let want: Vec<f64> = biased
            .iter()
            .map(|&v| gelu(self.as_stored(&pre, v)))
            .collect();
        self.check_act("bias + gelu (fused): biased", &biased, &pre, TOL)?;
        self.check_act("bias + gelu (fused)", &want, &out, TOL)?;

        let (n, c, off) = (6, 50, 4);
        let (a, b) = (self.rnd_act(n * c, 1.0), self.rnd_act(n * c, 1.0));
        let mut p = self.rnd(off + 2 * c, 1.0);
        p[off..off + c].iter_mut().for_each(|w| *w += 1.0);
        let (da, db, dp) = (self.up_act(&a)?, self.up_act(&b)?, self.up(&p)?);
        let (mut sum, mut out) = (self.act(n * c)?, self.act(n * c)?);
        let (mut mean, mut rstd) = (self.be.zeros(n)?, self.be.zeros(n)?);
        self.be.launch(Kernel::ResidualLayerNorm {
            sum: &mut sum,
            out: &mut out,
            mean: &mut mean,
            rstd: &mut rstd,
            a: &da,
            b: &db,
            params: (&dp, off),
            n,
            c,
        })?;
        let want_sum: Vec<f64> = a
            .iter()
            .zip(&b)
            .map(|(x, y)| f64::from(*x) + f64::from(*y))
            .collect();
        let stored: Vec<f64> = want_sum.iter().map(|&v| self.as_stored(&sum, v)).collect();
        let (want, wm, wr, _) = layernorm_reference(&stored, &p, off, n, c);
        self.check_act("residual + layernorm (fused): sum", &want_sum, &sum, TOL)?;
        self.check_act("residual + layernorm (fused)", &want, &out, TOL)?;
        self.check("residual + layernorm (fused): mean", &wm, &mean, TOL)?;
        self.check("residual + layernorm (fused): rstd", &wr, &rstd, TOL)
    }

    fn crossentropy(&mut self) -> Result<()> {
        let (n, v, vp, dloss) = (5, 37, 40, 0.25f32);
        let x = self.rnd_act(n * vp, 4.0);
        let targets = self.ids(n, v);
        let dt = self.up_ids(&targets)?;
        let mut wl = vec![0.0; n];
        let mut wg = vec![0.0; n * vp];
        for i in 0..n {
            let row = wide(&x[i * vp..i * vp + v]);
            let mx = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = row.iter().map(|l| (l - mx).exp()).sum();
            let t = targets[i] as usize;
            wl[i] = z.ln() + mx - row[t];
            for j in 0..v {
                let onehot = if j == t { 1.0 } else { 0.0 };
                wg[i * vp + j] = f64::from(dloss) * ((row[j] - mx).exp() / z - onehot);
            }
        }
        for grad in [None, Some(dloss)] {
            let mut logits = self.up_act(&x)?;
            let mut losses = self.be.zeros(n)?;
            self.be.launch(Kernel::CrossEntropy {
                losses: &mut losses,
                logits: &mut logits,
                targets: &dt,
                n,
                v,
                vp,
                grad,
            })?;
            let what = if grad.is_some() { "with" } else { "without" };
            self.check(
                format!("crossentropy {what} grad: losses"),
                &wl,
                &losses,
                TOL,
            )?;
            // Without the gradient, the logits are left as they were.
            let (want, tol) = if grad.is_some() {
                (wg.clone(), TOL)
            } else {
                (wide(&x), 0.0)
            };
            self.check_act(
                format!("crossentropy {what} grad: logits"),
                &want,
                &logits,
                tol,
            )?;
        }
        Ok(())
    }

    fn adamw(&mut self) -> Result<()> {
        let (total, off, len) = (1200, 10, 1000);
        let s = AdamStep {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            t: 3,
            grad_scale: 0.5,
        };
        let p = self.rnd(total, 1.0);
        let g = self.rnd(total, 1.0);
        let m = self.rnd(total, 0.1);
        let v: Vec<f32> = self.rnd(total, 0.1).iter().map(|x| x.abs()).collect();
        let (mut dp, dg, mut dm, mut dv) = (self.up(&p)?, self.up(&g)?, self.up(&m)?, self.up(&v)?);
        self.be.launch(Kernel::AdamW {
            params: &mut dp,
            grads: &dg,
            m: &mut dm,
            v: &mut dv,
            off,
            len,
            step: s,
        })?;
        let (mut wp, mut wm, mut wv) = (wide(&p), wide(&m), wide(&v));
        let (b1, b2) = (f64::from(s.beta1), f64::from(s.beta2));
        for i in off..off + len {
            let gi = f64::from(g[i]) * f64::from(s.grad_scale);
            wm[i] = b1 * wm[i] + (1.0 - b1) * gi;
            wv[i] = b2 * wv[i] + (1.0 - b2) * gi * gi;
            let mh = wm[i] / (1.0 - b1.powi(s.t));
            let vh = wv[i] / (1.0 - b2.powi(s.t));
            wp[i] -= f64::from(s.lr)
                * (mh / (vh.sqrt() + f64::from(s.eps)) + f64::from(s.weight_decay) * wp[i]);
        }
        self.check("adamw: params", &wp, &dp, TOL)?;
        self.check("adamw: m", &wm, &dm, TOL)?;
        self.check("adamw: v", &wv, &dv, TOL)
    }
}

/// Layer norm of `n` rows of `c` of `x` with the weight at `off` in `p` and the bias after it,
/// in f64: the output, the row means, the reciprocal deviations and the normalised values.
fn layernorm_reference(
    x: &[f64],
    p: &[f32],
    off: usize,
    n: usize,
    c: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut want, mut wm, mut wr) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
    let mut norm = vec![0.0; n * c];
    for i in 0..n {
        let row = &x[i * c..(i + 1) * c];
        let m = row.iter().sum::<f64>() / c as f64;
        let var = row.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / c as f64;
        let r = 1.0 / (var + 1e-5).sqrt();
        for j in 0..c {
            norm[i * c + j] = (row[j] - m) * r;
            want[i * c + j] = norm[i * c + j] * f64::from(p[off + j]) + f64::from(p[off + c + j]);
        }
        (wm[i], wr[i]) = (m, r);
    }
    (want, wm, wr, norm)
}

const GELU_SCALE: f64 = 0.797_884_560_802_865_4; // sqrt(2 / pi)

fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + (GELU_SCALE * (x + 0.044715 * x * x * x)).tanh())
}

fn gelu_grad(x: f64) -> f64 {
    let th = (GELU_SCALE * (x + 0.044715 * x * x * x)).tanh();
    0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * GELU_SCALE * (1.0 + 3.0 * 0.044715 * x * x)
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nan_or_a_missing_value_is_no_match() {
        let want = [1.0, -2.0, 3.0];
        assert!(compared("same".into(), &want, &[1.0, -2.0, 3.0], 0.0).ok());
        assert!(!compared("off".into(), &want, &[1.0, -2.0, 3.5], 0.1).ok());
        for got in [
            [f32::NAN, -2.0, 3.0],
            [f32::NAN; 3],
            [1.0, f32::INFINITY, 3.0],
        ] {
            let c = compared("bad".into(), &want, &got, 1.0);
            assert!(!c.ok(), "{got:?} passed as {c:?}");
        }
        assert!(!compared("short".into(), &want, &[1.0, -2.0], 1.0).ok());
    }
}
