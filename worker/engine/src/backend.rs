//! The device interface: a [`Backend`] owns memory and runs the primitives every layer is written
//! on. Offsets and lengths are in elements; all floats are f32.

use crate::Result;

/// Whether a GEMM operand is used as stored or transposed (cuBLAS `CUBLAS_OP_N`/`_T`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// As stored.
    N,
    /// Transposed.
    T,
}

/// The shape of one strided batched GEMM, in cuBLAS's column-major convention:
/// `C[i] = alpha * op(A[i]) * op(B[i]) + beta * C[i]` for `i < batch`, where `op(A)` is
/// `m x k`, `op(B)` is `k x n` and `C` is `m x n`, each stored column-major with a leading
/// dimension and a stride between batch entries.
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    /// Operation on A.
    pub ta: Op,
    /// Operation on B.
    pub tb: Op,
    /// Rows of op(A) and C.
    pub m: usize,
    /// Columns of op(B) and C.
    pub n: usize,
    /// Columns of op(A), rows of op(B).
    pub k: usize,
    /// Scale of the product.
    pub alpha: f32,
    /// Leading dimension of A.
    pub lda: usize,
    /// Elements between batch entries of A.
    pub stride_a: usize,
    /// Leading dimension of B.
    pub ldb: usize,
    /// Elements between batch entries of B.
    pub stride_b: usize,
    /// Scale of C's old value (0 overwrites, 1 accumulates).
    pub beta: f32,
    /// Leading dimension of C.
    pub ldc: usize,
    /// Elements between batch entries of C.
    pub stride_c: usize,
    /// Number of products.
    pub batch: usize,
}

impl Gemm {
    /// A single product (batch 1) with tight leading dimensions.
    pub fn single(ta: Op, tb: Op, m: usize, n: usize, k: usize, beta: f32) -> Self {
        let lda = if ta == Op::N { m } else { k };
        let ldb = if tb == Op::N { k } else { n };
        Self {
            ta,
            tb,
            m,
            n,
            k,
            alpha: 1.0,
            lda,
            stride_a: 0,
            ldb,
            stride_b: 0,
            beta,
            ldc: m,
            stride_c: 0,
            batch: 1,
        }
    }

    /// Floating-point operations of the whole batch.
    pub fn flops(&self) -> f64 {
        2.0 * (self.m * self.n * self.k * self.batch) as f64
    }
}

/// AdamW hyper-parameters of one update.
#[derive(Clone, Copy, Debug)]
pub struct AdamStep {
    /// Learning rate of this step.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// Decoupled weight decay (0 for parameters that are not decayed).
    pub weight_decay: f32,
    /// 1-based count of updates so far, for bias correction.
    pub t: i32,
    /// Factor applied to every gradient first (gradient clipping).
    pub grad_scale: f32,
}

/// A place in a buffer: the buffer and an element offset.
pub type At<'a, B> = (&'a <B as Backend>::Buf, usize);

/// The primitives a device provides. Offsets and lengths are in elements; all floats are f32.
///
/// Shapes follow llm.c: `n` rows of `c` channels, `b` sequences of `t` tokens, `nh` heads of
/// `hs` channels each. "Accumulates" means the result is added to the destination.
pub trait Backend {
    /// A buffer of f32 on the device.
    type Buf: Send;
    /// A buffer of i32 (token ids) on the device.
    type Ids: Send;

    /// Short name for logs ("cpu", "cuda").
    fn name(&self) -> String;
    /// A zero-filled buffer of `n` floats.
    fn zeros(&self, n: usize) -> Result<Self::Buf>;
    /// Copies `src` into the start of `dst`.
    fn upload(&self, dst: &mut Self::Buf, src: &[f32]) -> Result<()> {
        self.upload_at(dst, 0, src)
    }
    /// Copies `src` into `dst` from element `off`.
    fn upload_at(&self, dst: &mut Self::Buf, off: usize, src: &[f32]) -> Result<()>;
    /// Copies `len` floats from `src` at `off` to the host.
    fn download(&self, src: &Self::Buf, off: usize, len: usize) -> Result<Vec<f32>>;
    /// A zero-filled id buffer of `n` ids.
    fn ids(&self, n: usize) -> Result<Self::Ids>;
    /// Copies `src` into the start of `dst`.
    fn upload_ids(&self, dst: &mut Self::Ids, src: &[i32]) -> Result<()>;
    /// Sets `len` floats of `buf` at `off` to zero.
    fn fill_zero(&self, buf: &mut Self::Buf, off: usize, len: usize) -> Result<()>;
    /// Waits until all queued work is done.
    fn sync(&self) -> Result<()>;

    /// One strided batched GEMM (see [`Gemm`]) on `a`, `b` and `c` at their offsets.
    fn gemm(
        &self,
        g: &Gemm,
        a: At<'_, Self>,
        b: At<'_, Self>,
        c: (&mut Self::Buf, usize),
    ) -> Result<()>;

    /// `out[b,t,:] = wte[ids[b,t],:] + wpe[t,:]`.
    #[allow(clippy::too_many_arguments)]
    fn encoder_fwd(
        &self,
        out: &mut Self::Buf,
        ids: &Self::Ids,
        params: &Self::Buf,
        wte: usize,
        wpe: usize,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()>;
    /// Accumulates `dout` into the rows of `wte` named by `ids` and into `wpe`.
    #[allow(clippy::too_many_arguments)]
    fn encoder_bwd(
        &self,
        grads: &mut Self::Buf,
        dwte: usize,
        dwpe: usize,
        dout: &Self::Buf,
        ids: &Self::Ids,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()>;
    /// Layer norm of each row of `inp` with weight and bias at `w` and `w + c` in `params`;
    /// keeps each row's mean and reciprocal standard deviation for the backward pass.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_fwd(
        &self,
        out: &mut Self::Buf,
        mean: &mut Self::Buf,
        rstd: &mut Self::Buf,
        inp: &Self::Buf,
        params: &Self::Buf,
        w: usize,
        n: usize,
        c: usize,
    ) -> Result<()>;
    /// Accumulates the input gradient into `dinp` and the weight and bias gradients into
    /// `grads` at `dw` and `dw + c`.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_bwd(
        &self,
        dinp: &mut Self::Buf,
        grads: &mut Self::Buf,
        dw: usize,
        dout: &Self::Buf,
        inp: &Self::Buf,
        params: &Self::Buf,
        w: usize,
        mean: &Self::Buf,
        rstd: &Self::Buf,
        n: usize,
        c: usize,
    ) -> Result<()>;
    /// `out[i, :] += bias` for each of `n` rows of `oc` channels.
    fn bias_fwd(
        &self,
        out: &mut Self::Buf,
        params: &Self::Buf,
        bias: usize,
        n: usize,
        oc: usize,
    ) -> Result<()>;
    /// Accumulates the column sums of `dout` (`n` rows of `oc`) into `grads` at `dbias`.
    fn bias_bwd(
        &self,
        grads: &mut Self::Buf,
        dbias: usize,
        dout: &Self::Buf,
        n: usize,
        oc: usize,
    ) -> Result<()>;
    /// GELU (tanh approximation) of `n` values.
    fn gelu_fwd(&self, out: &mut Self::Buf, inp: &Self::Buf, n: usize) -> Result<()>;
    /// `dinp = gelu'(inp) * dout` over `n` values.
    fn gelu_bwd(
        &self,
        dinp: &mut Self::Buf,
        inp: &Self::Buf,
        dout: &Self::Buf,
        n: usize,
    ) -> Result<()>;
    /// `out = max(inp, 0)` over `n` values.
    fn relu_fwd(&self, out: &mut Self::Buf, inp: &Self::Buf, n: usize) -> Result<()>;
    /// `dinp = dout` where the ReLU's output `out` is positive, else 0.
    fn relu_bwd(
        &self,
        dinp: &mut Self::Buf,
        out: &Self::Buf,
        dout: &Self::Buf,
        n: usize,
    ) -> Result<()>;
    /// `out = a + b` over `n` values.
    fn add(&self, out: &mut Self::Buf, a: &Self::Buf, b: &Self::Buf, n: usize) -> Result<()>;
    /// Splits `qkv` (b, t, 3, nh, hs) into q, k and v, each (b, nh, t, hs), one after the
    /// other in `qkvr`.
    #[allow(clippy::too_many_arguments)]
    fn permute_qkv(
        &self,
        qkvr: &mut Self::Buf,
        qkv: &Self::Buf,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
    ) -> Result<()>;
    /// The inverse of [`Backend::permute_qkv`] for gradients: `dqkv` from `dqkvr`.
    fn permute_qkv_bwd(
        &self,
        dqkv: &mut Self::Buf,
        dqkvr: &Self::Buf,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
    ) -> Result<()>;
    /// (b, nh, t, hs) to (b, t, nh, hs) when `forward`, the other way when not.
    #[allow(clippy::too_many_arguments)]
    fn unpermute(
        &self,
        out: &mut Self::Buf,
        inp: &Self::Buf,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
        forward: bool,
    ) -> Result<()>;
    /// Causal softmax of `rows` blocks of `t x t` scores, each scaled by `scale` first:
    /// entries above the diagonal become 0.
    fn softmax_causal_fwd(
        &self,
        att: &mut Self::Buf,
        preatt: &Self::Buf,
        scale: f32,
        rows: usize,
        t: usize,
    ) -> Result<()>;
    /// Gradient of [`Backend::softmax_causal_fwd`] with respect to the unscaled scores.
    fn softmax_causal_bwd(
        &self,
        dpreatt: &mut Self::Buf,
        datt: &Self::Buf,
        att: &Self::Buf,
        scale: f32,
        rows: usize,
        t: usize,
    ) -> Result<()>;
    /// Softmax cross-entropy of `n` rows of logits (`vp` wide, the first `v` real) against
    /// `targets`: writes each row's loss into `losses`; when `grad`, overwrites the logits with
    /// `dloss * (softmax - onehot)` (0 in the padding).
    #[allow(clippy::too_many_arguments)]
    fn crossentropy(
        &self,
        losses: &mut Self::Buf,
        logits: &mut Self::Buf,
        targets: &Self::Ids,
        n: usize,
        v: usize,
        vp: usize,
        dloss: f32,
        grad: bool,
    ) -> Result<()>;
    /// Sum of squares of `len` floats of `buf` at `off`.
    fn sum_squares(&self, buf: &Self::Buf, off: usize, len: usize) -> Result<f64>;
    /// AdamW on `len` parameters at `off`, with moments `m` and `v` at the same offset.
    #[allow(clippy::too_many_arguments)]
    fn adamw(
        &self,
        params: &mut Self::Buf,
        grads: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        off: usize,
        len: usize,
        s: &AdamStep,
    ) -> Result<()>;
}
