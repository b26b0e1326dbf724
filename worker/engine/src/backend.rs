//! The device interface: a [`Backend`] owns memory and runs [`Kernel`]s, the few generic,
//! op-parametrised primitives every layer is written on. Offsets and lengths are in elements;
//! values cross the interface as f32 and are stored as their buffer's [`DType`] says.
//!
//! A new layer is written on these primitives and needs no new trait method. A new primitive is
//! a new [`Kernel`] variant (or a new variant of one of the op enums), run by `Cpu::launch`,
//! `Cuda::launch` and a kernel in `kernels.cu`; wrappers such as [`crate::profile::Profiled`]
//! see it through [`Backend::launch`] with no change.

use crate::{EngineError, Result};

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

/// The arithmetic of a backend (`spec.training.precision`): how its GEMMs multiply and, in
/// bf16, how its activations are stored. The parameters, their gradients and the optimizer
/// state are FP32 in all three.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// IEEE single precision.
    #[default]
    Fp32,
    /// FP32 operands multiplied on TF32 tensor cores (10-bit mantissas), FP32 sums; on the
    /// CPU, the same as FP32.
    Tf32,
    /// Activations and their gradients stored in bf16 ([`Backend::activations`], rounded to
    /// nearest, ties to even: [`crate::bf16`]), every kernel computing in FP32 between its
    /// loads and stores; GEMMs with A and B in bf16 (FP32 weights rounded first) and products
    /// summed in FP32 into C as its buffer stores values: cuBLAS with bf16 inputs and
    /// `CUBLAS_COMPUTE_32F` on the GPU, the same rounding then FP32 arithmetic on the CPU
    /// ([`crate::cpu::CpuBf16`]). A product of two bf16 values is exact in FP32, so the two
    /// differ only in how the sums are made (their order, and the tensor cores'
    /// accumulation). Parameters, gradients, AdamW's moments, layer-norm statistics, losses
    /// and the fused attention's log-sum-exps stay FP32. The fused attention
    /// ([`Kernel::AttentionFwd`]) reads and writes bf16 activations but computes in FP32,
    /// without tensor cores.
    Bf16,
}

impl Precision {
    /// The name in logs and benchmarks ("fp32", "tf32", "bf16").
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
        }
    }
}

/// How a buffer stores its values ([`Backend::activations`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DType {
    /// IEEE single precision, 4 bytes.
    #[default]
    F32,
    /// bfloat16, 2 bytes: every value written is rounded to bf16 (nearest, ties to even) and
    /// every value read is exact. Kernels still compute in FP32 between the load and the store.
    Bf16,
}

impl DType {
    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }

    /// The name in logs ("f32", "bf16").
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
        }
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

/// An element-wise function of one value ([`Kernel::Unary`], [`Kernel::UnaryBwd`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnaryOp {
    /// GELU, tanh approximation (GPT-2's).
    Gelu,
    /// `max(x, 0)`.
    Relu,
    /// `1 / (1 + exp(-x))`.
    Sigmoid,
    /// Hyperbolic tangent.
    Tanh,
    /// Cosine (the time encoding of temporal graph networks).
    Cos,
}

/// An element-wise function of two values ([`Kernel::Binary`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    /// `a + b`.
    Add,
    /// `a - b`.
    Sub,
    /// `a * b`.
    Mul,
}

/// Which entries of a row a softmax sees ([`Kernel::Softmax`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mask {
    /// Every entry of the row.
    Full,
    /// Causal: rows come in square blocks of `width x width`, and row `r` sees the entries up
    /// to its own position `r % width`; the later ones come out 0.
    Causal,
}

/// The largest head size the fused attention ([`Kernel::AttentionFwd`]) takes.
pub const MAX_HEAD_SIZE: usize = 128;

/// The most axes a [`Kernel::Permute`] takes.
pub const MAX_RANK: usize = 6;

/// A place in a buffer: the buffer and an element offset.
pub type At<'a, B> = (&'a <B as Backend>::Buf, usize);

/// A place in a buffer that a primitive writes: the buffer and an element offset.
pub type AtMut<'a, B> = (&'a mut <B as Backend>::Buf, usize);

/// One primitive with its operands, over float buffers `F` and id buffers `I` (a backend's
/// [`Backend::Buf`] and [`Backend::Ids`]); [`Backend::launch`] runs it.
///
/// Shapes follow llm.c: `n` rows of `c` (or `width`) channels. Operands given as a pair
/// `(buffer, offset)` start at that offset (parameters and gradients live in one flat buffer
/// each); bare buffers start at 0. "Accumulates" means the result is added to the
/// destination; every other output is overwritten. Outputs never alias inputs.
#[derive(Debug)]
pub enum Kernel<'a, F, I> {
    /// One strided batched GEMM (see [`Gemm`]) on `a`, `b` and `c`.
    Gemm {
        /// The shape.
        g: Gemm,
        /// A.
        a: (&'a F, usize),
        /// B.
        b: (&'a F, usize),
        /// C, scaled by `beta` and accumulated.
        c: (&'a mut F, usize),
    },
    /// `out = op(inp)` over `n` values.
    Unary {
        /// The function.
        op: UnaryOp,
        /// Output.
        out: &'a mut F,
        /// Input.
        inp: &'a F,
        /// Values.
        n: usize,
    },
    /// `dinp = op'(inp) * dout` over `n` values, from the forward input `inp`.
    UnaryBwd {
        /// The function of the forward pass.
        op: UnaryOp,
        /// Input gradient.
        dinp: &'a mut F,
        /// The forward pass's input.
        inp: &'a F,
        /// Output gradient.
        dout: &'a F,
        /// Values.
        n: usize,
    },
    /// `out = op(a, b)` over `n` values.
    Binary {
        /// The function.
        op: BinaryOp,
        /// Output.
        out: &'a mut F,
        /// First operand.
        a: &'a F,
        /// Second operand.
        b: &'a F,
        /// Values.
        n: usize,
    },
    /// `out[i, :] = table[ids[i], :]` for `n` rows of `width` (index-select: an embedding
    /// lookup, gathering node memories). Every id must name a row of the table: the CPU
    /// backend refuses one that does not, the CUDA backend does not check.
    GatherRows {
        /// Output, `n x width`.
        out: &'a mut F,
        /// The table's first row.
        table: (&'a F, usize),
        /// Rows of the table.
        table_rows: usize,
        /// Row of the table for each output row.
        ids: &'a I,
        /// Rows.
        n: usize,
        /// Floats per row.
        width: usize,
    },
    /// `table[ids[i], :] += src[i, :]` for `n` rows of `width` (index-add: the gradient of
    /// [`Kernel::GatherRows`], scattering messages to nodes); accumulates. Repeated ids add up:
    /// in row order on the CPU, in any order on the GPU. Ids are checked as for
    /// [`Kernel::GatherRows`].
    ScatterAddRows {
        /// The table's first row.
        table: (&'a mut F, usize),
        /// Rows of the table.
        table_rows: usize,
        /// Row of the table for each source row.
        ids: &'a I,
        /// Source, `n x width`.
        src: &'a F,
        /// Rows.
        n: usize,
        /// Floats per row.
        width: usize,
    },
    /// `out[i, :] += row` for each of `n` rows of `width` (a broadcast add: a bias, or the
    /// position embedding with one "row" of `t x c`).
    AddRow {
        /// Output, `n x width`; accumulates.
        out: &'a mut F,
        /// The row, `width` floats.
        row: (&'a F, usize),
        /// Rows.
        n: usize,
        /// Floats per row.
        width: usize,
    },
    /// `dst += src[0, :] + ... + src[n - 1, :]`: column sums of `n` rows of `width` (the
    /// gradient of [`Kernel::AddRow`]); accumulates, each column summed in row order on the
    /// CPU.
    SumRows {
        /// Destination, `width` floats; accumulates.
        dst: (&'a mut F, usize),
        /// Source, `n x width`.
        src: &'a F,
        /// Rows.
        n: usize,
        /// Floats per row.
        width: usize,
    },
    /// `*out = sum of squares of len floats of src`, in f64 on the host (waits for the device).
    SumSquares {
        /// The values.
        src: (&'a F, usize),
        /// Values.
        len: usize,
        /// The result.
        out: &'a mut f64,
    },
    /// `out` = `inp` (row-major, of `shape`) with its axes reordered: axis `j` of `out` is axis
    /// `perm[j]` of `inp` (as `torch.permute`). At most [`MAX_RANK`] axes.
    Permute {
        /// Output, row-major.
        out: &'a mut F,
        /// Input, row-major.
        inp: &'a F,
        /// Sizes of the input's axes, outermost first.
        shape: &'a [usize],
        /// The input axis each output axis takes.
        perm: &'a [usize],
    },
    /// Softmax of each of `rows` rows of `width` scores, each scaled by `scale` first; entries
    /// the mask hides come out 0.
    Softmax {
        /// Probabilities, `rows x width`.
        out: &'a mut F,
        /// Scores, `rows x width`.
        inp: &'a F,
        /// Rows.
        rows: usize,
        /// Entries per row.
        width: usize,
        /// Factor on the scores.
        scale: f32,
        /// Which entries each row sees.
        mask: Mask,
    },
    /// Gradient of [`Kernel::Softmax`] with respect to the unscaled scores.
    SoftmaxBwd {
        /// Score gradient, `rows x width`.
        dinp: &'a mut F,
        /// Probability gradient.
        dout: &'a F,
        /// The forward pass's probabilities.
        out: &'a F,
        /// Rows.
        rows: usize,
        /// Entries per row.
        width: usize,
        /// Factor on the scores.
        scale: f32,
        /// Which entries each row sees.
        mask: Mask,
    },
    /// Layer norm of each of `n` rows of `c`, with weight and bias at `params.1` and
    /// `params.1 + c`; keeps each row's mean and reciprocal standard deviation for backward.
    LayerNorm {
        /// Output, `n x c`.
        out: &'a mut F,
        /// Row means, `n`.
        mean: &'a mut F,
        /// Row reciprocal standard deviations, `n`.
        rstd: &'a mut F,
        /// Input, `n x c`.
        inp: &'a F,
        /// Weight, then bias.
        params: (&'a F, usize),
        /// Rows.
        n: usize,
        /// Channels.
        c: usize,
    },
    /// Backward of [`Kernel::LayerNorm`]: accumulates the input gradient into `dinp` and the
    /// weight and bias gradients into `grads` at `grads.1` and `grads.1 + c`.
    LayerNormBwd {
        /// Input gradient, `n x c`; accumulates.
        dinp: &'a mut F,
        /// Weight gradient, then bias gradient; accumulates.
        grads: (&'a mut F, usize),
        /// Output gradient.
        dout: &'a F,
        /// The forward pass's input.
        inp: &'a F,
        /// Weight, then bias.
        params: (&'a F, usize),
        /// The forward pass's row means.
        mean: &'a F,
        /// The forward pass's reciprocal standard deviations.
        rstd: &'a F,
        /// Rows.
        n: usize,
        /// Channels.
        c: usize,
    },
    /// `pre[i, :] += bias` for `n` rows of `width`, then `out = gelu(pre)` ([`UnaryOp::Gelu`]):
    /// a linear layer's bias and its GELU in one pass ([`Kernel::AddRow`] then
    /// [`Kernel::Unary`]). `pre` keeps the biased values, which GELU's backward reads; GELU
    /// reads them as `pre` stores them, so the result is the two kernels' to the bit.
    BiasGelu {
        /// GELU's output, `n x width`.
        out: &'a mut F,
        /// The product without its bias, `n x width`; the bias is added in place.
        pre: &'a mut F,
        /// The bias, `width` floats.
        bias: (&'a F, usize),
        /// Rows.
        n: usize,
        /// Floats per row.
        width: usize,
    },
    /// `sum = a + b` (the residual stream), then [`Kernel::LayerNorm`] of `sum` as it stores
    /// it, `n` rows of `c`, in one pass: the two kernels' result to the bit.
    ResidualLayerNorm {
        /// The sum, `n x c`.
        sum: &'a mut F,
        /// The norm's output, `n x c`.
        out: &'a mut F,
        /// Row means, `n`.
        mean: &'a mut F,
        /// Row reciprocal standard deviations, `n`.
        rstd: &'a mut F,
        /// The stream.
        a: &'a F,
        /// What is added to it.
        b: &'a F,
        /// The norm's weight, then bias.
        params: (&'a F, usize),
        /// Rows.
        n: usize,
        /// Channels.
        c: usize,
    },
    /// Softmax cross-entropy of `n` rows of logits (`vp` wide, the first `v` real) against
    /// `targets`: writes each row's loss into `losses`; with `grad: Some(dloss)`, overwrites
    /// the logits with `dloss * (softmax - onehot)` (0 in the padding).
    CrossEntropy {
        /// Per-row losses, `n`.
        losses: &'a mut F,
        /// Logits, `n x vp`; the gradient when `grad`.
        logits: &'a mut F,
        /// Target of each row, below `v`.
        targets: &'a I,
        /// Rows.
        n: usize,
        /// Real classes.
        v: usize,
        /// Row width (padded classes).
        vp: usize,
        /// The loss gradient's scale per row, when the gradient is wanted.
        grad: Option<f32>,
    },
    /// Fused causal self-attention (flash-attention's algorithm): for each of `heads` heads,
    /// queries, keys and values of `t` tokens x `hs` channels, writes the output and the
    /// log-sum-exp of each query's scaled scores, visiting the keys in tiles with an online
    /// softmax, so that no `t x t` matrix is kept. `hs` is at most [`MAX_HEAD_SIZE`].
    AttentionFwd {
        /// Output, `(heads, t, hs)`.
        out: &'a mut F,
        /// Log-sum-exp of each query's scaled, causally masked scores, `heads x t`.
        lse: &'a mut F,
        /// q, k and v one after the other, each `(heads, t, hs)`.
        qkv: &'a F,
        /// Heads (batch x heads).
        heads: usize,
        /// Tokens.
        t: usize,
        /// Channels per head.
        hs: usize,
        /// Factor on the scores (`1 / sqrt(hs)`).
        scale: f32,
    },
    /// Backward of [`Kernel::AttentionFwd`]: overwrites `dqkv` (laid out as `qkv`) from the
    /// output gradient, recomputing the probabilities from `lse`.
    AttentionBwd {
        /// q, k and v gradients, laid out as `qkv`.
        dqkv: &'a mut F,
        /// Scratch, `heads x t`: each query's `dout . out`.
        delta: &'a mut F,
        /// Output gradient, `(heads, t, hs)`.
        dout: &'a F,
        /// The forward pass's output.
        out: &'a F,
        /// The forward pass's log-sum-exp.
        lse: &'a F,
        /// The forward pass's q, k and v.
        qkv: &'a F,
        /// Heads (batch x heads).
        heads: usize,
        /// Tokens.
        t: usize,
        /// Channels per head.
        hs: usize,
        /// Factor on the scores.
        scale: f32,
    },
    /// AdamW on `len` parameters at `off`, with gradients and moments `m` and `v` at the same
    /// offset.
    AdamW {
        /// Parameters.
        params: &'a mut F,
        /// Gradients.
        grads: &'a F,
        /// First moments.
        m: &'a mut F,
        /// Second moments.
        v: &'a mut F,
        /// First parameter.
        off: usize,
        /// Parameters.
        len: usize,
        /// Hyper-parameters.
        step: AdamStep,
    },
}

impl<F, I> Kernel<'_, F, I> {
    /// A short name for profiles and errors: the primitive, and its op where it has one.
    pub fn name(&self) -> &'static str {
        match self {
            Kernel::Gemm { g, .. } if g.batch > 1 => "gemm (attention, batched)",
            Kernel::Gemm { g, .. } if g.beta != 0.0 => "gemm (weight gradients)",
            Kernel::Gemm { .. } => "gemm (linear)",
            Kernel::Unary { op, .. } => match op {
                UnaryOp::Gelu => "gelu",
                UnaryOp::Relu => "relu",
                UnaryOp::Sigmoid => "sigmoid",
                UnaryOp::Tanh => "tanh",
                UnaryOp::Cos => "cos",
            },
            Kernel::UnaryBwd { op, .. } => match op {
                UnaryOp::Gelu => "gelu bwd",
                UnaryOp::Relu => "relu bwd",
                UnaryOp::Sigmoid => "sigmoid bwd",
                UnaryOp::Tanh => "tanh bwd",
                UnaryOp::Cos => "cos bwd",
            },
            Kernel::Binary { op, .. } => match op {
                BinaryOp::Add => "add",
                BinaryOp::Sub => "sub",
                BinaryOp::Mul => "mul",
            },
            Kernel::GatherRows { .. } => "gather rows",
            Kernel::ScatterAddRows { .. } => "scatter-add rows",
            Kernel::AddRow { .. } => "add row (bias)",
            Kernel::SumRows { .. } => "sum rows (bias bwd)",
            Kernel::SumSquares { .. } => "sum of squares",
            Kernel::Permute { .. } => "permute",
            Kernel::Softmax { .. } => "softmax",
            Kernel::SoftmaxBwd { .. } => "softmax bwd",
            Kernel::LayerNorm { .. } => "layernorm",
            Kernel::LayerNormBwd { .. } => "layernorm bwd",
            Kernel::BiasGelu { .. } => "bias + gelu (fused)",
            Kernel::ResidualLayerNorm { .. } => "residual + layernorm (fused)",
            Kernel::CrossEntropy { .. } => "crossentropy",
            Kernel::AttentionFwd { .. } => "attention (fused)",
            Kernel::AttentionBwd { .. } => "attention bwd (fused)",
            Kernel::AdamW { .. } => "adamw",
        }
    }
}

/// Refuses a [`Backend::copy`] that reaches past either buffer.
pub(crate) fn check_copy(
    dst_len: usize,
    dst_off: usize,
    src_len: usize,
    src_off: usize,
    len: usize,
) -> Result<()> {
    let fits = |off: usize, n: usize| off.checked_add(len).is_some_and(|end| end <= n);
    if fits(dst_off, dst_len) && fits(src_off, src_len) {
        Ok(())
    } else {
        Err(EngineError::Config(format!(
            "a copy of {len} values from {src_off} of a buffer of {src_len} to {dst_off} of a \
             buffer of {dst_len} reaches past the end"
        )))
    }
}

/// Refuses a head size the fused attention's kernels do not take.
pub(crate) fn check_head_size(hs: usize) -> Result<()> {
    if hs == 0 || hs > crate::backend::MAX_HEAD_SIZE {
        return Err(EngineError::Config(format!(
            "fused attention takes heads of 1 to {} channels, not {hs}: use the unfused \
             attention",
            crate::backend::MAX_HEAD_SIZE
        )));
    }
    Ok(())
}

/// A [`Kernel::Permute`] resolved for a backend: the output's axis sizes and, for each output
/// axis, the step in the input between neighbours along it. Axes are right-aligned in the
/// [`MAX_RANK`] slots (the leading ones have size 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Permutation {
    /// Number of axes.
    pub rank: usize,
    /// Output axis sizes, the last `rank` slots.
    pub dims: [usize; MAX_RANK],
    /// Input stride of each output axis, the last `rank` slots.
    pub strides: [usize; MAX_RANK],
    /// Elements in all.
    pub len: usize,
}

impl Permutation {
    /// Checks `perm` against `shape` and resolves it.
    pub fn new(shape: &[usize], perm: &[usize]) -> Result<Self> {
        let rank = shape.len();
        let mut seen = [false; MAX_RANK];
        let valid = rank == perm.len()
            && (1..=MAX_RANK).contains(&rank)
            && perm
                .iter()
                .all(|&p| p < rank && !std::mem::replace(&mut seen[p], true));
        if !valid {
            return Err(EngineError::Config(format!(
                "permute: {perm:?} is not a permutation of the {rank} axes of {shape:?} \
                 (at most {MAX_RANK})"
            )));
        }
        let mut input_stride = [0; MAX_RANK];
        let mut s = 1;
        for a in (0..rank).rev() {
            input_stride[a] = s;
            s *= shape[a];
        }
        let (mut dims, mut strides) = ([1; MAX_RANK], [0; MAX_RANK]);
        let lead = MAX_RANK - rank;
        for (j, &p) in perm.iter().enumerate() {
            dims[lead + j] = shape[p];
            strides[lead + j] = input_stride[p];
        }
        Ok(Self {
            rank,
            dims,
            strides,
            len: s,
        })
    }
}

/// A device: memory, and the primitives of [`Kernel`]. Offsets and lengths are in elements;
/// values cross the interface as f32 and are stored as their buffer's [`DType`] says.
///
/// Every compute primitive goes through [`Backend::launch`]: a wrapper (timing, tracing)
/// implements that one method and the memory methods, whatever the primitives are. [`gemm`]
/// and [`sum_squares`] are shorthands for their kernels.
///
/// [`gemm`]: Backend::gemm
/// [`sum_squares`]: Backend::sum_squares
pub trait Backend {
    /// A buffer of floats on the device, stored as f32 or, for activations in bf16, as bf16.
    type Buf: Send;
    /// A buffer of i32 (token ids, row indices) on the device.
    type Ids: Send;

    /// Short name for logs ("cpu", "cuda").
    fn name(&self) -> String;
    /// A zero-filled buffer of `n` floats, stored as f32.
    fn zeros(&self, n: usize) -> Result<Self::Buf>;
    /// How `buf` stores its values (f32 unless it came from [`Backend::activations`] on a
    /// backend whose activations are bf16).
    fn dtype_of(&self, buf: &Self::Buf) -> DType;
    /// How [`Backend::activations`] stores its values: bf16 where the backend's precision is
    /// [`Precision::Bf16`], f32 otherwise (the default).
    fn activation_dtype(&self) -> DType {
        DType::F32
    }
    /// A zero-filled buffer of `n` floats for activations and their gradients, stored as
    /// [`Backend::activation_dtype`] says. Parameters, gradients, optimizer state and
    /// statistics kept in FP32 (layer norms' means, log-sum-exps, losses) use
    /// [`Backend::zeros`]. Every primitive takes either kind for its activation operands; the
    /// CUDA backend refuses a bf16 buffer for every other operand, and for any GEMM operand
    /// outside bf16 precision.
    fn activations(&self, n: usize) -> Result<Self::Buf> {
        self.zeros(n)
    }
    /// Copies `src` into the start of `dst` (rounded, into a bf16 buffer).
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
    /// Copies `len` floats of `src` from `src_off` into `dst` from `dst_off`, on the device
    /// (queued, on a device with a queue); from an f32 buffer into a bf16 one, each value is
    /// rounded.
    fn copy(
        &self,
        dst: &mut Self::Buf,
        dst_off: usize,
        src: &Self::Buf,
        src_off: usize,
        len: usize,
    ) -> Result<()>;
    /// Waits until all queued work is done.
    fn sync(&self) -> Result<()>;

    /// Runs one primitive (queues it, on a device with a queue).
    fn launch(&self, kernel: Kernel<'_, Self::Buf, Self::Ids>) -> Result<()>;

    /// One strided batched GEMM (see [`Gemm`]) on `a`, `b` and `c` at their offsets.
    fn gemm(&self, g: &Gemm, a: At<'_, Self>, b: At<'_, Self>, c: AtMut<'_, Self>) -> Result<()> {
        self.launch(Kernel::Gemm { g: *g, a, b, c })
    }

    /// Sum of squares of `len` floats of `buf` at `off`, in f64 (waits for the device).
    fn sum_squares(&self, buf: &Self::Buf, off: usize, len: usize) -> Result<f64> {
        let mut out = 0.0;
        self.launch(Kernel::SumSquares {
            src: (buf, off),
            len,
            out: &mut out,
        })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_permutation_resolves_to_output_sizes_and_input_strides() {
        // (b, t, 3, nh, hs) -> (3, b, nh, t, hs): attention's q, k, v split.
        let p = Permutation::new(&[2, 5, 3, 4, 7], &[2, 0, 3, 1, 4]).unwrap();
        assert_eq!(p.rank, 5);
        assert_eq!(p.len, 2 * 5 * 3 * 4 * 7);
        assert_eq!(p.dims, [1, 3, 2, 4, 5, 7]);
        assert_eq!(p.strides[1..], [28, 420, 7, 84, 1]);
    }

    #[test]
    fn a_permutation_refuses_repeated_missing_or_too_many_axes() {
        assert!(Permutation::new(&[2, 3], &[0, 0]).is_err());
        assert!(Permutation::new(&[2, 3], &[1]).is_err());
        assert!(Permutation::new(&[2, 3], &[0, 2]).is_err());
        assert!(Permutation::new(&[1; 7], &[0, 1, 2, 3, 4, 5, 6]).is_err());
        assert!(Permutation::new(&[], &[]).is_err());
        assert!(Permutation::new(&[4, 1, 2], &[2, 1, 0]).is_ok());
    }
}
