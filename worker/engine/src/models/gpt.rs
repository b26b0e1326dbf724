//! A GPT-2-style decoder-only transformer (pre-LayerNorm, GELU MLP, tied embeddings), forward
//! and backward written once on the [`crate::nn`] layers.
//!
//! Parameters are laid out so that backward finishes them as contiguous suffixes of the flat
//! buffer: `[wte, wpe, block 0, ..., block L-1, lnf]`. Backward visits `lnf`, then the blocks
//! from the last, then the embeddings, and after each reports the offset from which every
//! gradient is final; data-parallel training all-reduces a bucket as soon as it lies past that
//! offset. Inside a block the weight matrices come first, so weight decay applies to one
//! range per block.
//!
//! A [`Gpt`] is the whole model or a part of it ([`PartSpec`]: a run of blocks, with or without
//! the embedding and the head), as a pipeline stage holds it: a part takes token ids or the
//! previous part's output, hands its output and its input gradient on, and keeps the
//! activations of several micro-batches in flight, one slot each. Its backward runs whole or
//! split into the input-gradient pass and the weight-gradient pass ([`Pass`]) that the
//! zero-bubble schedules reorder. The head's part keeps its own copy of the tied token
//! embedding; the pipeline adds up the two copies' gradients.

use std::ops::Range;

use rand::SeedableRng;

use super::{Net, Params};
use crate::backend::{Backend, UnaryOp};
use crate::nn::{
    activation_bwd, activation_fwd, attention_bwd, attention_fused_bwd, attention_fused_fwd,
    attention_fwd, bias_gelu_fwd, crossentropy, encoder_bwd, encoder_fwd, layernorm_bwd,
    layernorm_fwd, matmul_bwd_input, matmul_bwd_weight, matmul_fwd, residual_fwd,
    residual_layernorm_fwd,
};
use crate::{EngineError, Result};

/// The shape of a GPT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GptConfig {
    /// Transformer blocks.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Width of the residual stream.
    pub channels: usize,
    /// Longest sequence.
    pub max_seq: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Vocabulary rounded up (to a multiple of 64 when large) for faster GEMMs; the padding
    /// rows of the embedding stay zero and get no gradient.
    pub padded_vocab: usize,
    /// Attention through the fused kernel: see [`GptConfig::fused_attention`].
    fused_attention: bool,
    /// The fused element-wise kernels: see [`GptConfig::fused_ops`].
    fused_ops: bool,
}

impl GptConfig {
    /// A config, checked: heads divide channels, nothing is zero.
    pub fn new(
        layers: usize,
        heads: usize,
        channels: usize,
        max_seq: usize,
        vocab: usize,
    ) -> Result<Self> {
        if layers == 0 || heads == 0 || channels == 0 || max_seq == 0 || vocab == 0 {
            return Err(EngineError::Config(format!(
                "a GPT needs layers, heads, embedDim, contextLength and a vocabulary above 0 \
                 (got {layers}, {heads}, {channels}, {max_seq}, {vocab})"
            )));
        }
        if !channels.is_multiple_of(heads) {
            return Err(EngineError::Config(format!(
                "embedDim {channels} is not divisible by heads {heads}"
            )));
        }
        let padded_vocab = if vocab >= 1024 {
            vocab.div_ceil(64) * 64
        } else {
            vocab
        };
        Ok(Self {
            layers,
            heads,
            channels,
            max_seq,
            vocab,
            padded_vocab,
            fused_attention: false,
            fused_ops: false,
        })
    }

    /// Whether attention runs through the fused kernel ([`crate::Kernel::AttentionFwd`]: no
    /// `t x t` matrix kept, probabilities recomputed in backward) instead of GEMMs around a
    /// softmax. Off from [`GptConfig::new`]; the parameters are the same either way.
    pub fn fused_attention(&self) -> bool {
        self.fused_attention
    }

    /// The same config with the fused attention on or off; refuses heads wider than the fused
    /// kernels take.
    pub fn with_fused_attention(mut self, fused: bool) -> Result<Self> {
        if fused {
            crate::backend::check_head_size(self.head_size())?;
        }
        self.fused_attention = fused;
        Ok(self)
    }

    /// Whether each block adds its MLP's first bias and applies GELU in one kernel
    /// ([`crate::Kernel::BiasGelu`]), and makes its attention's residual connection and the
    /// layer norm after it in one ([`crate::Kernel::ResidualLayerNorm`]), rather than two
    /// each. The results are the same to
    /// the bit; whether it is faster is the GPU profile's to say (`bench gpt --fused-ops
    /// --profile`). Off from [`GptConfig::new`].
    pub fn fused_ops(&self) -> bool {
        self.fused_ops
    }

    /// The same config with the fused element-wise kernels on or off.
    pub fn with_fused_ops(mut self, fused: bool) -> Self {
        self.fused_ops = fused;
        self
    }

    /// Floats of attention state one block keeps per micro-batch of `b` x `t`: the `t x t`
    /// probabilities unfused, one log-sum-exp per query fused.
    fn attention_state(&self, b: usize, t: usize) -> usize {
        if self.fused_attention {
            b * self.heads * t
        } else {
            b * self.heads * t * t
        }
    }

    /// Channels per head.
    pub fn head_size(&self) -> usize {
        self.channels / self.heads
    }

    /// Parameters per block.
    pub fn block_len(&self) -> usize {
        let c = self.channels;
        // qkvw, attprojw, fcw, fcprojw, then ln1 (w, b), qkvb, attprojb, ln2 (w, b), fcb, fcprojb.
        3 * c * c + c * c + 4 * c * c + 4 * c * c + 2 * c + 3 * c + c + 2 * c + 4 * c + c
    }

    /// Parameters in all (padded vocabulary included).
    pub fn num_params(&self) -> usize {
        self.padded_vocab * self.channels
            + self.max_seq * self.channels
            + self.layers * self.block_len()
            + 2 * self.channels
    }

    /// Parameters without the vocabulary padding (what FLOP counts use).
    pub fn num_real_params(&self) -> usize {
        self.num_params() - (self.padded_vocab - self.vocab) * self.channels
    }

    /// Training FLOPs per token at sequence length `t`: 6N + 12 L C T (PaLM's estimate).
    pub fn flops_per_token(&self, t: usize) -> f64 {
        6.0 * self.num_real_params() as f64 + 12.0 * (self.layers * self.channels * t) as f64
    }

    /// Offset of the token embedding (vocab x channels).
    pub fn wte(&self) -> usize {
        0
    }

    /// Offset of the position embedding (max_seq x channels).
    pub fn wpe(&self) -> usize {
        self.padded_vocab * self.channels
    }

    /// Offset of block `l`.
    pub fn block(&self, l: usize) -> usize {
        self.wpe() + self.max_seq * self.channels + l * self.block_len()
    }

    /// Offsets of block `l`'s tensors.
    pub fn block_params(&self, l: usize) -> BlockParams {
        BlockParams::at(self.block(l), self.channels)
    }

    /// Offset of the final layer norm (weight, then bias).
    pub fn lnf(&self) -> usize {
        self.block(self.layers)
    }

    /// Ranges of parameters with and without weight decay: `(offset, length, decays)`.
    /// Weight matrices decay; embeddings, biases and norms do not.
    pub fn decay_ranges(&self) -> Vec<(usize, usize, bool)> {
        let c = self.channels;
        let mut r = vec![(0, self.block(0), false)];
        for l in 0..self.layers {
            let o = self.block(l);
            r.push((o, 12 * c * c, true));
            r.push((o + 12 * c * c, self.block_len() - 12 * c * c, false));
        }
        r.push((self.lnf(), 2 * c, false));
        r
    }

    /// GPT-2's initialisation, deterministic in `seed`: N(0, 0.02) weights and embeddings,
    /// residual projections scaled by 1/sqrt(2 L), zero biases, unit norms, zero padding rows.
    pub fn init(&self, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut p = vec![0.0f32; self.num_params()];
        let c = self.channels;
        let std = 0.02f32;
        let proj_std = std / ((2 * self.layers) as f32).sqrt();
        normal(&mut rng, &mut p[..self.vocab * c], std);
        normal(
            &mut rng,
            &mut p[self.wpe()..self.wpe() + self.max_seq * c],
            std,
        );
        for l in 0..self.layers {
            let b = self.block_params(l);
            normal(&mut rng, &mut p[b.qkvw..b.qkvw + 3 * c * c], std);
            normal(&mut rng, &mut p[b.attprojw..b.attprojw + c * c], proj_std);
            normal(&mut rng, &mut p[b.fcw..b.fcw + 4 * c * c], std);
            normal(&mut rng, &mut p[b.fcprojw..b.fcprojw + 4 * c * c], proj_std);
            p[b.ln1..b.ln1 + c].fill(1.0);
            p[b.ln2..b.ln2 + c].fill(1.0);
        }
        p[self.lnf()..self.lnf() + c].fill(1.0);
        p
    }
}

/// Normal samples (Box-Muller) with standard deviation `std`.
fn normal(rng: &mut rand::rngs::StdRng, out: &mut [f32], std: f32) {
    use rand::Rng;
    for pair in out.chunks_mut(2) {
        let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
        let u2: f64 = rng.random();
        let r = (-2.0 * u1.ln()).sqrt();
        let th = 2.0 * std::f64::consts::PI * u2;
        pair[0] = (r * th.cos()) as f32 * std;
        if pair.len() > 1 {
            pair[1] = (r * th.sin()) as f32 * std;
        }
    }
}

/// Offsets of one block's tensors in the flat parameter buffer.
#[derive(Clone, Copy, Debug)]
pub struct BlockParams {
    /// QKV projection weight (3C x C).
    pub qkvw: usize,
    /// Attention output projection weight (C x C).
    pub attprojw: usize,
    /// MLP up-projection weight (4C x C).
    pub fcw: usize,
    /// MLP down-projection weight (C x 4C).
    pub fcprojw: usize,
    /// First layer norm (weight, then bias).
    pub ln1: usize,
    /// QKV bias.
    pub qkvb: usize,
    /// Attention output bias.
    pub attprojb: usize,
    /// Second layer norm (weight, then bias).
    pub ln2: usize,
    /// MLP up-projection bias.
    pub fcb: usize,
    /// MLP down-projection bias.
    pub fcprojb: usize,
}

impl BlockParams {
    /// The offsets of a block that starts at `o`, of width `c`.
    pub fn at(o: usize, c: usize) -> Self {
        let qkvw = o;
        let attprojw = qkvw + 3 * c * c;
        let fcw = attprojw + c * c;
        let fcprojw = fcw + 4 * c * c;
        let ln1 = fcprojw + 4 * c * c;
        let qkvb = ln1 + 2 * c;
        let attprojb = qkvb + 3 * c;
        let ln2 = attprojb + c;
        let fcb = ln2 + 2 * c;
        let fcprojb = fcb + 4 * c;
        Self {
            qkvw,
            attprojw,
            fcw,
            fcprojw,
            ln1,
            qkvb,
            attprojb,
            ln2,
            fcb,
            fcprojb,
        }
    }
}

/// Which part of a GPT a [`Gpt`] holds: a run of blocks, with the embedding (the first part of
/// a pipeline) and the final norm, head and loss (the last part). The whole model is the one
/// part that holds everything ([`PartSpec::whole`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartSpec {
    /// The blocks, a non-empty range of `0..layers`.
    pub layers: Range<usize>,
    /// Holds the token and position embeddings (and takes token ids as input).
    pub embed: bool,
    /// Holds the final norm and the head (tied to the token embedding) and computes the loss.
    pub head: bool,
}

impl PartSpec {
    /// The whole model.
    pub fn whole(config: &GptConfig) -> Self {
        Self {
            layers: 0..config.layers,
            embed: true,
            head: true,
        }
    }
}

/// Where a part's tensors lie in its own flat buffer: the token embedding (when the part holds
/// the embedding or the head, which shares it), the position embedding (the embedding part),
/// its blocks, the final norm (the head part), in the whole model's order. The whole model's
/// layout is [`GptConfig`]'s.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartLayout {
    /// The model.
    pub config: GptConfig,
    /// The part.
    pub spec: PartSpec,
}

impl PartLayout {
    /// The layout of `spec` in `config`, checked: the blocks are a non-empty range of the
    /// model's.
    pub fn new(config: GptConfig, spec: PartSpec) -> Result<Self> {
        if spec.layers.is_empty() || spec.layers.end > config.layers {
            return Err(EngineError::Config(format!(
                "a part of a GPT of {} blocks must hold some of them (got blocks {:?})",
                config.layers, spec.layers
            )));
        }
        Ok(Self { config, spec })
    }

    fn wte_len(&self) -> usize {
        if self.spec.embed || self.spec.head {
            self.config.padded_vocab * self.config.channels
        } else {
            0
        }
    }

    fn wpe_len(&self) -> usize {
        if self.spec.embed {
            self.config.max_seq * self.config.channels
        } else {
            0
        }
    }

    /// Offset of the token embedding (when the part holds it).
    pub fn wte(&self) -> usize {
        0
    }

    /// Offset of the position embedding (embedding part).
    pub fn wpe(&self) -> usize {
        self.wte_len()
    }

    /// Offset of block `l` (one of the part's).
    pub fn block(&self, l: usize) -> usize {
        self.wte_len() + self.wpe_len() + (l - self.spec.layers.start) * self.config.block_len()
    }

    /// Offsets of block `l`'s tensors.
    pub fn block_params(&self, l: usize) -> BlockParams {
        BlockParams::at(self.block(l), self.config.channels)
    }

    /// Offset of the final layer norm (head part).
    pub fn lnf(&self) -> usize {
        self.block(self.spec.layers.end)
    }

    /// Parameters of the part.
    pub fn len(&self) -> usize {
        self.lnf()
            + if self.spec.head {
                2 * self.config.channels
            } else {
                0
            }
    }

    /// Whether the part has no parameters (never: it holds at least one block).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The ranges of the whole model's flat buffer the part holds, with their offsets in the
    /// part: `(part offset, whole offset, length)`.
    pub fn pieces(&self) -> Vec<(usize, usize, usize)> {
        let cfg = &self.config;
        let mut v = Vec::new();
        if self.wte_len() > 0 {
            v.push((0, cfg.wte(), self.wte_len()));
        }
        if self.wpe_len() > 0 {
            v.push((self.wpe(), cfg.wpe(), self.wpe_len()));
        }
        let (lo, hi) = (self.spec.layers.start, self.spec.layers.end);
        v.push((self.block(lo), cfg.block(lo), (hi - lo) * cfg.block_len()));
        if self.spec.head {
            v.push((self.lnf(), cfg.lnf(), 2 * cfg.channels));
        }
        v
    }

    /// The part's parameters out of the whole model's.
    pub fn gather(&self, whole: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0; self.len()];
        for (at, from, len) in self.pieces() {
            out[at..at + len].copy_from_slice(&whole[from..from + len]);
        }
        out
    }

    /// Writes the part's parameters into the whole model's.
    pub fn scatter(&self, part: &[f32], whole: &mut [f32]) {
        for (at, to, len) in self.pieces() {
            whole[to..to + len].copy_from_slice(&part[at..at + len]);
        }
    }

    /// Weight-decay ranges in the part (see [`GptConfig::decay_ranges`]).
    pub fn decay_ranges(&self) -> Vec<(usize, usize, bool)> {
        let c = self.config.channels;
        let lo = self.spec.layers.start;
        let mut r = Vec::new();
        if self.block(lo) > 0 {
            r.push((0, self.block(lo), false));
        }
        for l in self.spec.layers.clone() {
            let o = self.block(l);
            r.push((o, 12 * c * c, true));
            r.push((o + 12 * c * c, self.config.block_len() - 12 * c * c, false));
        }
        if self.spec.head {
            r.push((self.lnf(), 2 * c, false));
        }
        r
    }
}

/// One block's saved activations.
struct BlockActs<B: Backend> {
    ln1: B::Buf,
    ln1_mean: B::Buf,
    ln1_rstd: B::Buf,
    qkv: B::Buf,
    qkvr: B::Buf,
    att: B::Buf,
    atty: B::Buf,
    attproj: B::Buf,
    residual2: B::Buf,
    ln2: B::Buf,
    ln2_mean: B::Buf,
    ln2_rstd: B::Buf,
    fch: B::Buf,
    fch_gelu: B::Buf,
    fcproj: B::Buf,
    residual3: B::Buf,
}

/// One block's output gradients of its four matmuls, kept from the input-gradient pass for the
/// weight-gradient pass of a split backward.
struct Stash<B: Backend> {
    d_qkv: B::Buf,
    d_attproj: B::Buf,
    d_fch: B::Buf,
    d_fcproj: B::Buf,
}

/// The final norm's and the head's activations (head part).
struct HeadActs<B: Backend> {
    lnf: B::Buf,
    lnf_mean: B::Buf,
    lnf_rstd: B::Buf,
    logits: B::Buf,
    losses: B::Buf,
    targets: B::Ids,
}

/// Everything one micro-batch's forward keeps for its backward.
struct Slot<B: Backend> {
    /// The part's input: the embedding's output, or the activation received from the part
    /// before.
    input: B::Buf,
    ids: B::Ids,
    blocks: Vec<BlockActs<B>>,
    head: Option<HeadActs<B>>,
    stash: Vec<Stash<B>>,
    /// Shape of the forward pass that filled the slot.
    shape: (usize, usize),
}

/// Buffers for backward, reused by every block and slot.
struct Scratch<B: Backend> {
    /// Whether attention runs fused ([`GptConfig::fused_attention`]).
    fused: bool,
    /// Whether the fused element-wise kernels run ([`GptConfig::fused_ops`]).
    fused_ops: bool,
    preatt: B::Buf,
    vaccum: B::Buf,
    dresidual: B::Buf,
    dln: B::Buf,
    datty: B::Buf,
    dqkvr: B::Buf,
    dqkv: B::Buf,
    dfch: B::Buf,
    dfch_gelu: B::Buf,
    datt: B::Buf,
    dpreatt: B::Buf,
    zeros: B::Buf,
}

/// What a part's forward pass starts from.
#[derive(Clone, Copy, Debug)]
pub enum Input<'a> {
    /// Token ids (the embedding part).
    Ids(&'a [i32]),
    /// The previous part's output, `b x t x channels` (every other part).
    Acts(&'a [f32]),
    /// The previous part's output, already written at the start of the slot's input buffer
    /// ([`Gpt::input_mut`]) on the device (every other part): a pipeline stage that receives
    /// activations into device memory copies them there rather than through the host.
    Staged,
}

/// How much of a backward pass to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// Input and weight gradients together.
    Full,
    /// The input gradients only (B); [`Gpt::backward_weight`] adds the weight gradients (W)
    /// later. Needs a part built with `split`.
    Input,
}

/// A GPT, or a part of one (a pipeline stage's model chunk, see [`PartSpec`]), with its
/// parameters, gradients and activations on one backend: room for `slots` micro-batches in
/// flight, each of up to `batch` sequences of up to `seq` tokens.
pub struct Gpt<B: Backend> {
    /// The shape of the whole model.
    pub config: GptConfig,
    /// Where the part's tensors lie in its parameters.
    pub layout: PartLayout,
    /// Parameters and gradients, laid out as [`PartLayout`] says.
    pub params: Params<B>,
    batch: usize,
    seq: usize,
    /// Bytes per activation value ([`Backend::activation_dtype`]).
    act_bytes: usize,
    slots: Vec<Slot<B>>,
    scratch: Scratch<B>,
}

impl<B: Backend> Gpt<B> {
    /// The whole GPT on `be` with parameters `params` (from [`GptConfig::init`] or a
    /// checkpoint), with room for `batch` sequences of `seq` tokens.
    pub fn new(
        be: &B,
        config: GptConfig,
        params: &[f32],
        batch: usize,
        seq: usize,
    ) -> Result<Self> {
        Self::part(
            be,
            config,
            PartSpec::whole(&config),
            params,
            batch,
            seq,
            1,
            false,
        )
    }

    /// The part `spec` of a GPT on `be`, with the part's parameters `params` (see
    /// [`PartLayout::gather`]), room for `slots` micro-batches of up to `batch` x `seq` in
    /// flight, and, with `split`, what a split backward ([`Pass::Input`]) keeps.
    #[allow(clippy::too_many_arguments)]
    pub fn part(
        be: &B,
        config: GptConfig,
        spec: PartSpec,
        params: &[f32],
        batch: usize,
        seq: usize,
        slots: usize,
        split: bool,
    ) -> Result<Self> {
        let layout = PartLayout::new(config, spec)?;
        let init_layout = layout.clone();
        let params = Params::new(
            be,
            params,
            layout.len(),
            layout.decay_ranges(),
            move |seed| init_layout.gather(&config.init(seed)),
        )?;
        if seq > config.max_seq {
            return Err(EngineError::Config(format!(
                "sequence length {seq} exceeds contextLength {}",
                config.max_seq
            )));
        }
        if slots == 0 {
            return Err(EngineError::Config(
                "a model needs room for one micro-batch".into(),
            ));
        }
        let c = config.channels;
        let nh = config.heads;
        let bt = batch * seq;
        let btc = bt * c;
        let att = config.attention_state(batch, seq);
        // Backward's scratch: the score matrices unfused; fused, the output and output gradient
        // head-major (in `preatt` and `vaccum`) and each query's `dout . out` (in `datt`).
        let (preatt, datt, dpreatt) = if config.fused_attention {
            (btc, batch * nh * seq, 0)
        } else {
            (att, att, att)
        };
        // Activations and their gradients in the backend's activation storage (bf16 in bf16);
        // layer-norm statistics, log-sum-exps, losses and the fused backward's deltas in FP32.
        let z = |n: usize| be.zeros(n);
        let a = |n: usize| be.activations(n);
        let fused = config.fused_attention;
        let att_buf = |n: usize| if fused { z(n) } else { a(n) };
        let layers = layout.spec.layers.len();
        let mut all = Vec::with_capacity(slots);
        for _ in 0..slots {
            let mut blocks = Vec::with_capacity(layers);
            let mut stash = Vec::new();
            for _ in 0..layers {
                blocks.push(BlockActs {
                    ln1: a(btc)?,
                    ln1_mean: z(bt)?,
                    ln1_rstd: z(bt)?,
                    qkv: a(3 * btc)?,
                    qkvr: a(3 * btc)?,
                    att: att_buf(att)?,
                    atty: a(btc)?,
                    attproj: a(btc)?,
                    residual2: a(btc)?,
                    ln2: a(btc)?,
                    ln2_mean: z(bt)?,
                    ln2_rstd: z(bt)?,
                    fch: a(4 * btc)?,
                    fch_gelu: a(4 * btc)?,
                    fcproj: a(btc)?,
                    residual3: a(btc)?,
                });
                if split {
                    stash.push(Stash {
                        d_qkv: a(3 * btc)?,
                        d_attproj: a(btc)?,
                        d_fch: a(4 * btc)?,
                        d_fcproj: a(btc)?,
                    });
                }
            }
            let head = if layout.spec.head {
                Some(HeadActs {
                    lnf: a(btc)?,
                    lnf_mean: z(bt)?,
                    lnf_rstd: z(bt)?,
                    logits: a(bt * config.padded_vocab)?,
                    losses: z(bt)?,
                    targets: be.ids(bt)?,
                })
            } else {
                None
            };
            all.push(Slot {
                input: a(btc)?,
                ids: be.ids(if layout.spec.embed { bt } else { 0 })?,
                blocks,
                head,
                stash,
                shape: (0, 0),
            });
        }
        Ok(Self {
            config,
            layout,
            params,
            batch,
            seq,
            act_bytes: be.activation_dtype().size(),
            slots: all,
            scratch: Scratch {
                fused,
                fused_ops: config.fused_ops,
                preatt: a(preatt)?,
                vaccum: a(btc)?,
                dresidual: a(btc)?,
                dln: a(btc)?,
                datty: a(btc)?,
                dqkvr: a(3 * btc)?,
                dqkv: a(3 * btc)?,
                dfch: a(4 * btc)?,
                dfch_gelu: a(4 * btc)?,
                datt: att_buf(datt)?,
                dpreatt: a(dpreatt)?,
                zeros: a(if split { btc } else { 0 })?,
            },
        })
    }

    /// Micro-batches the part has room for.
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Bytes of activations one slot holds (what one micro-batch in flight costs): its
    /// activations at 2 bytes each in bf16 and 4 otherwise ([`Backend::activation_dtype`]),
    /// the FP32 statistics at 4.
    pub fn slot_bytes(&self) -> usize {
        let c = self.config.channels;
        let bt = self.batch * self.seq;
        let att = self.config.attention_state(self.batch, self.seq);
        // Per block: ln1, atty, attproj, residual2, ln2, fcproj, residual3 (7 of b x t x c);
        // qkv and qkvr (3 each); fch and fch_gelu (4 each); the attention state; the two norms'
        // means and reciprocal deviations.
        let (mut acts, mut stats) = ((7 + 2 * 3 + 2 * 4) * bt * c, 4 * bt);
        if self.config.fused_attention {
            stats += att;
        } else {
            acts += att;
        }
        if !self.slots[0].stash.is_empty() {
            acts += 9 * bt * c;
        }
        let layers = self.layout.spec.layers.len();
        let (mut total_acts, mut total_stats) = (bt * c + layers * acts, layers * stats);
        if self.layout.spec.head {
            total_acts += bt * c + bt * self.config.padded_vocab;
            total_stats += 3 * bt;
        }
        total_acts * self.act_bytes + total_stats * 4
    }

    /// Forward pass of the whole model over `ids` (`b` sequences of `t` tokens); with
    /// `targets`, also the per-token losses (see [`Gpt::mean_loss`]). `grad` also leaves the
    /// loss gradient, scaled by `dloss` per token, in the logits for [`Gpt::backward`].
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &mut self,
        be: &B,
        ids: &[i32],
        targets: Option<&[i32]>,
        b: usize,
        t: usize,
        grad: Option<f32>,
    ) -> Result<()> {
        self.forward_slot(be, 0, Input::Ids(ids), targets, b, t, grad)
    }

    /// Forward pass of the part over `input` (`b` sequences of `t` tokens) into `slot`; with
    /// `targets` (head part), also the per-token losses, and with `grad` the loss gradient,
    /// scaled by `grad` per token, left in the slot's logits for its backward.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_slot(
        &mut self,
        be: &B,
        slot: usize,
        input: Input<'_>,
        targets: Option<&[i32]>,
        b: usize,
        t: usize,
        grad: Option<f32>,
    ) -> Result<()> {
        let cfg = self.config;
        let spec = self.layout.spec.clone();
        let (c, nh, hs) = (cfg.channels, cfg.heads, cfg.head_size());
        let n = b * t;
        if b > self.batch || t > self.seq || slot >= self.slots.len() {
            return Err(EngineError::Config(format!(
                "a batch of {b} x {t} in slot {slot} does not fit a model sized {} x {} with {} \
                 slots",
                self.batch,
                self.seq,
                self.slots.len()
            )));
        }
        let ids = match input {
            Input::Ids(ids) if spec.embed && ids.len() == n => ids,
            Input::Acts(x) if !spec.embed && x.len() == n * c => &[][..],
            Input::Staged if !spec.embed => &[][..],
            _ => {
                return Err(EngineError::Config(format!(
                    "the input of a {} part for a batch of {b} x {t} must be {}",
                    if spec.embed { "first" } else { "later" },
                    if spec.embed {
                        format!("{n} token ids")
                    } else {
                        format!("{} activations", n * c)
                    }
                )));
            }
        };
        if targets.is_some() && !spec.head {
            return Err(EngineError::Config(
                "only the part with the head takes targets".into(),
            ));
        }
        if let Some(bad) = ids
            .iter()
            .chain(targets.unwrap_or(&[]))
            .find(|&&i| i < 0 || i as usize >= cfg.vocab)
        {
            return Err(EngineError::Config(format!(
                "token id {bad} is outside the vocabulary of {}",
                cfg.vocab
            )));
        }
        if targets.is_some_and(|t| t.len() != n) {
            return Err(EngineError::Config(format!("{n} targets expected")));
        }
        let p = &self.params.values;
        let s = &mut self.slots[slot];
        match input {
            Input::Ids(ids) => {
                be.upload_ids(&mut s.ids, ids)?;
                encoder_fwd(
                    be,
                    &mut s.input,
                    &s.ids,
                    p,
                    self.layout.wte(),
                    cfg.padded_vocab,
                    self.layout.wpe(),
                    b,
                    t,
                    c,
                )?;
            }
            Input::Acts(x) => be.upload_at(&mut s.input, 0, x)?,
            Input::Staged => {}
        }
        let sc = &mut self.scratch;
        for (i, l) in spec.layers.clone().enumerate() {
            let (done, rest) = s.blocks.split_at_mut(i);
            let a = &mut rest[0];
            let residual = if i == 0 {
                &s.input
            } else {
                &done[i - 1].residual3
            };
            let w = self.layout.block_params(l);
            block_fwd(be, a, residual, p, &w, sc, (b, t, c, nh, hs))?;
        }
        if let Some(h) = s.head.as_mut() {
            let last = &s.blocks.last().expect("a part holds a block").residual3;
            layernorm_fwd(
                be,
                &mut h.lnf,
                &mut h.lnf_mean,
                &mut h.lnf_rstd,
                last,
                p,
                self.layout.lnf(),
                n,
                c,
            )?;
            matmul_fwd(
                be,
                &mut h.logits,
                &h.lnf,
                p,
                self.layout.wte(),
                None,
                n,
                c,
                cfg.padded_vocab,
            )?;
            if let Some(targets) = targets {
                be.upload_ids(&mut h.targets, targets)?;
                crossentropy(
                    be,
                    &mut h.losses,
                    &mut h.logits,
                    &h.targets,
                    n,
                    cfg.vocab,
                    cfg.padded_vocab,
                    grad,
                )?;
            }
        }
        s.shape = (b, t);
        Ok(())
    }

    /// Mean of the per-token losses of the last forward pass (waits for the device).
    pub fn mean_loss(&self, be: &B) -> Result<f32> {
        self.mean_loss_slot(be, 0)
    }

    /// Mean of the per-token losses of the forward pass in `slot` (head part).
    pub fn mean_loss_slot(&self, be: &B, slot: usize) -> Result<f32> {
        let s = &self.slots[slot];
        let (b, t) = s.shape;
        let h = s.head.as_ref().ok_or_else(no_head)?;
        let l = be.download(&h.losses, 0, b * t)?;
        Ok((l.iter().map(|x| f64::from(*x)).sum::<f64>() / (b * t) as f64) as f32)
    }

    /// Logits of the last forward pass without targets, row by row (`padded_vocab` wide).
    pub fn logits(&self, be: &B) -> Result<Vec<f32>> {
        let s = &self.slots[0];
        let (b, t) = s.shape;
        let h = s.head.as_ref().ok_or_else(no_head)?;
        be.download(&h.logits, 0, b * t * self.config.padded_vocab)
    }

    /// The output of the forward pass in `slot` (parts without the head): the residual stream
    /// after the part's last block, `b x t x channels`, which the next part takes as input.
    pub fn output(&self, be: &B, slot: usize) -> Result<Vec<f32>> {
        let s = &self.slots[slot];
        let (b, t) = s.shape;
        let last = &s.blocks.last().expect("a part holds a block").residual3;
        be.download(last, 0, b * t * self.config.channels)
    }

    /// The device buffer that [`Gpt::output`] copies from: the residual stream after the part's
    /// last block in `slot`, whose first `b x t x channels` values are the output.
    pub fn output_buf(&self, slot: usize) -> &B::Buf {
        &self.slots[slot]
            .blocks
            .last()
            .expect("a part holds a block")
            .residual3
    }

    /// The gradient with respect to the part's input from the last backward pass (parts
    /// without the embedding), which the previous part's backward takes: the first `b x t x
    /// channels` values of this buffer.
    pub fn input_grad_buf(&self) -> &B::Buf {
        &self.scratch.dresidual
    }

    /// The input buffer of `slot`: a later part's forward pass with [`Input::Staged`] starts
    /// from its first `b x t x channels` values.
    pub fn input_mut(&mut self, slot: usize) -> &mut B::Buf {
        &mut self.slots[slot].input
    }

    /// The buffer the backward pass of a part without the head takes the gradient with respect
    /// to the part's output from (its first `b x t x channels` values). Shared by every slot:
    /// write it just before that backward pass ([`Gpt::backward_slot`]).
    pub fn dout_mut(&mut self) -> &mut B::Buf {
        &mut self.scratch.dresidual
    }

    /// Backward pass of the whole model's last forward pass (which had targets and `grad`):
    /// accumulates into the gradients, calling `ready(from)` each time every gradient at
    /// offsets `from..` is final (after the final norm, after each block from the last, after
    /// the embeddings).
    pub fn backward(&mut self, be: &B, ready: &mut dyn FnMut(&mut B::Buf, usize)) -> Result<()> {
        self.backward_slot(be, 0, Pass::Full, ready)
    }

    /// Backward pass of the forward pass in `slot`: from the loss gradient left by the forward
    /// (head part) or from the gradient with respect to the part's output written into
    /// [`Gpt::dout_mut`] (every other part). Accumulates into the gradients (all of them with
    /// [`Pass::Full`], calling `ready(from)` as gradients at `from..` become final; the
    /// embeddings' and norms' with [`Pass::Input`]) and leaves the gradient with respect to the
    /// part's input in [`Gpt::input_grad_buf`].
    pub fn backward_slot(
        &mut self,
        be: &B,
        slot: usize,
        pass: Pass,
        ready: &mut dyn FnMut(&mut B::Buf, usize),
    ) -> Result<()> {
        let cfg = self.config;
        let lay = &self.layout;
        let s = &mut self.slots[slot];
        let (b, t) = s.shape;
        let (c, nh, hs) = (cfg.channels, cfg.heads, cfg.head_size());
        let n = b * t;
        if pass == Pass::Input && s.stash.is_empty() {
            return Err(EngineError::Config(
                "a split backward needs a part built with split".into(),
            ));
        }
        let p = &self.params.values;
        let g = &mut self.params.grads;
        let sc = &mut self.scratch;
        // Without the head, the caller wrote the output's gradient into `dresidual` (dout_mut).
        if let Some(h) = s.head.as_ref() {
            // The logits hold dloss/dlogits; the classifier shares its weight with wte.
            matmul_bwd_input(
                be,
                &mut sc.dln,
                &h.logits,
                p,
                lay.wte(),
                n,
                c,
                cfg.padded_vocab,
            )?;
            if pass == Pass::Full {
                matmul_bwd_weight(
                    be,
                    g,
                    lay.wte(),
                    None,
                    &h.logits,
                    &h.lnf,
                    n,
                    c,
                    cfg.padded_vocab,
                )?;
            }
            let last = &s.blocks.last().expect("a part holds a block").residual3;
            be.fill_zero(&mut sc.dresidual, 0, n * c)?;
            layernorm_bwd(
                be,
                &mut sc.dresidual,
                g,
                lay.lnf(),
                &sc.dln,
                last,
                p,
                lay.lnf(),
                &h.lnf_mean,
                &h.lnf_rstd,
                n,
                c,
            )?;
            if pass == Pass::Full {
                ready(g, lay.lnf());
            }
        }
        for (i, l) in lay.spec.layers.clone().enumerate().rev() {
            let residual = if i == 0 {
                &s.input
            } else {
                &s.blocks[i - 1].residual3
            };
            let stash = if pass == Pass::Input {
                Some(&mut s.stash[i])
            } else {
                None
            };
            let w = lay.block_params(l);
            block_bwd(
                be,
                &s.blocks[i],
                residual,
                p,
                g,
                &w,
                sc,
                stash,
                (b, t, c, nh, hs),
            )?;
            if pass == Pass::Full {
                ready(g, lay.block(l));
            }
        }
        if lay.spec.embed {
            encoder_bwd(
                be,
                g,
                lay.wte(),
                cfg.padded_vocab,
                lay.wpe(),
                &sc.dresidual,
                &s.ids,
                b,
                t,
                c,
            )?;
        }
        if pass == Pass::Full && (lay.spec.embed || lay.spec.head) {
            ready(g, 0);
        }
        Ok(())
    }

    /// The weight-gradient pass (W) of a split backward of `slot` (after its
    /// [`Pass::Input`] pass): accumulates the matmuls' weight and bias gradients, calling
    /// `ready(from)` as [`Gpt::backward_slot`] does (meaningful on the last micro-batch's pass,
    /// when the gradients it completes are final).
    pub fn backward_weight(
        &mut self,
        be: &B,
        slot: usize,
        ready: &mut dyn FnMut(&mut B::Buf, usize),
    ) -> Result<()> {
        let cfg = self.config;
        let lay = &self.layout;
        let s = &self.slots[slot];
        let (b, t) = s.shape;
        let (c, n) = (cfg.channels, b * t);
        let g = &mut self.params.grads;
        if s.stash.is_empty() {
            return Err(EngineError::Config(
                "a split backward needs a part built with split".into(),
            ));
        }
        if let Some(h) = s.head.as_ref() {
            matmul_bwd_weight(
                be,
                g,
                lay.wte(),
                None,
                &h.logits,
                &h.lnf,
                n,
                c,
                cfg.padded_vocab,
            )?;
        }
        for (i, l) in lay.spec.layers.clone().enumerate().rev() {
            let (a, st, w) = (&s.blocks[i], &s.stash[i], lay.block_params(l));
            matmul_bwd_weight(
                be,
                g,
                w.fcprojw,
                Some(w.fcprojb),
                &st.d_fcproj,
                &a.fch_gelu,
                n,
                4 * c,
                c,
            )?;
            matmul_bwd_weight(be, g, w.fcw, Some(w.fcb), &st.d_fch, &a.ln2, n, c, 4 * c)?;
            matmul_bwd_weight(
                be,
                g,
                w.attprojw,
                Some(w.attprojb),
                &st.d_attproj,
                &a.atty,
                n,
                c,
                c,
            )?;
            matmul_bwd_weight(be, g, w.qkvw, Some(w.qkvb), &st.d_qkv, &a.ln1, n, c, 3 * c)?;
            ready(g, lay.block(l));
        }
        if lay.spec.embed || lay.spec.head {
            ready(g, 0);
        }
        Ok(())
    }
}

fn no_head() -> EngineError {
    EngineError::Config("only the part with the head computes a loss and logits".into())
}

/// `b, t, c, heads, head size`.
type Dims = (usize, usize, usize, usize, usize);

/// One block's forward from `residual` into `a`.
fn block_fwd<B: Backend>(
    be: &B,
    a: &mut BlockActs<B>,
    residual: &B::Buf,
    p: &B::Buf,
    w: &BlockParams,
    sc: &mut Scratch<B>,
    (b, t, c, nh, hs): Dims,
) -> Result<()> {
    let n = b * t;
    layernorm_fwd(
        be,
        &mut a.ln1,
        &mut a.ln1_mean,
        &mut a.ln1_rstd,
        residual,
        p,
        w.ln1,
        n,
        c,
    )?;
    matmul_fwd(be, &mut a.qkv, &a.ln1, p, w.qkvw, Some(w.qkvb), n, c, 3 * c)?;
    if sc.fused {
        attention_fused_fwd(
            be,
            &mut a.atty,
            &mut a.qkvr,
            &mut a.att,
            &mut sc.vaccum,
            &a.qkv,
            b,
            t,
            nh,
            hs,
        )?;
    } else {
        attention_fwd(
            be,
            &mut a.atty,
            &mut a.qkvr,
            &mut a.att,
            &mut sc.preatt,
            &mut sc.vaccum,
            &a.qkv,
            b,
            t,
            nh,
            hs,
        )?;
    }
    matmul_fwd(
        be,
        &mut a.attproj,
        &a.atty,
        p,
        w.attprojw,
        Some(w.attprojb),
        n,
        c,
        c,
    )?;
    if sc.fused_ops {
        residual_layernorm_fwd(
            be,
            &mut a.residual2,
            &mut a.ln2,
            (&mut a.ln2_mean, &mut a.ln2_rstd),
            residual,
            &a.attproj,
            p,
            w.ln2,
            n,
            c,
        )?;
        matmul_fwd(be, &mut a.fch, &a.ln2, p, w.fcw, None, n, c, 4 * c)?;
        bias_gelu_fwd(be, &mut a.fch_gelu, &mut a.fch, p, w.fcb, n, 4 * c)?;
    } else {
        residual_fwd(be, &mut a.residual2, residual, &a.attproj, n * c)?;
        layernorm_fwd(
            be,
            &mut a.ln2,
            &mut a.ln2_mean,
            &mut a.ln2_rstd,
            &a.residual2,
            p,
            w.ln2,
            n,
            c,
        )?;
        matmul_fwd(be, &mut a.fch, &a.ln2, p, w.fcw, Some(w.fcb), n, c, 4 * c)?;
        activation_fwd(be, UnaryOp::Gelu, &mut a.fch_gelu, &a.fch, n * 4 * c)?;
    }
    matmul_fwd(
        be,
        &mut a.fcproj,
        &a.fch_gelu,
        p,
        w.fcprojw,
        Some(w.fcprojb),
        n,
        4 * c,
        c,
    )?;
    residual_fwd(be, &mut a.residual3, &a.residual2, &a.fcproj, n * c)
}

/// `dst = src` over `n` values (an add of zeros: the kernels have no copy).
fn copy<B: Backend>(
    be: &B,
    dst: &mut B::Buf,
    src: &B::Buf,
    zeros: &B::Buf,
    n: usize,
) -> Result<()> {
    residual_fwd(be, dst, src, zeros, n)
}

/// One block's backward from the gradient of its output in `sc.dresidual` (which ends as the
/// gradient of its input). Without `stash`, accumulates every parameter gradient; with it, only
/// the norms', keeping the matmuls' output gradients in `stash` for [`Gpt::backward_weight`].
#[allow(clippy::too_many_arguments)]
fn block_bwd<B: Backend>(
    be: &B,
    a: &BlockActs<B>,
    residual: &B::Buf,
    p: &B::Buf,
    g: &mut B::Buf,
    w: &BlockParams,
    sc: &mut Scratch<B>,
    mut stash: Option<&mut Stash<B>>,
    (b, t, c, nh, hs): Dims,
) -> Result<()> {
    let n = b * t;
    // residual3 = residual2 + fcproj: dfcproj is dresidual.
    matmul_bwd_input(
        be,
        &mut sc.dfch_gelu,
        &sc.dresidual,
        p,
        w.fcprojw,
        n,
        4 * c,
        c,
    )?;
    match stash.as_deref_mut() {
        Some(st) => copy(be, &mut st.d_fcproj, &sc.dresidual, &sc.zeros, n * c)?,
        None => matmul_bwd_weight(
            be,
            g,
            w.fcprojw,
            Some(w.fcprojb),
            &sc.dresidual,
            &a.fch_gelu,
            n,
            4 * c,
            c,
        )?,
    }
    let dfch = match stash.as_deref_mut() {
        Some(st) => &mut st.d_fch,
        None => &mut sc.dfch,
    };
    activation_bwd(be, UnaryOp::Gelu, dfch, &a.fch, &sc.dfch_gelu, n * 4 * c)?;
    let dfch: &B::Buf = match stash.as_deref() {
        Some(st) => &st.d_fch,
        None => &sc.dfch,
    };
    matmul_bwd_input(be, &mut sc.dln, dfch, p, w.fcw, n, c, 4 * c)?;
    if stash.is_none() {
        matmul_bwd_weight(be, g, w.fcw, Some(w.fcb), dfch, &a.ln2, n, c, 4 * c)?;
    }
    layernorm_bwd(
        be,
        &mut sc.dresidual,
        g,
        w.ln2,
        &sc.dln,
        &a.residual2,
        p,
        w.ln2,
        &a.ln2_mean,
        &a.ln2_rstd,
        n,
        c,
    )?;
    // residual2 = residual + attproj: dattproj is dresidual.
    matmul_bwd_input(be, &mut sc.datty, &sc.dresidual, p, w.attprojw, n, c, c)?;
    match stash.as_deref_mut() {
        Some(st) => copy(be, &mut st.d_attproj, &sc.dresidual, &sc.zeros, n * c)?,
        None => matmul_bwd_weight(
            be,
            g,
            w.attprojw,
            Some(w.attprojb),
            &sc.dresidual,
            &a.atty,
            n,
            c,
            c,
        )?,
    }
    let dqkv = match stash.as_deref_mut() {
        Some(st) => &mut st.d_qkv,
        None => &mut sc.dqkv,
    };
    if sc.fused {
        attention_fused_bwd(
            be,
            dqkv,
            &mut sc.dqkvr,
            &mut sc.preatt,
            &mut sc.vaccum,
            &mut sc.datt,
            &sc.datty,
            &a.atty,
            &a.qkvr,
            &a.att,
            b,
            t,
            nh,
            hs,
        )?;
    } else {
        attention_bwd(
            be,
            dqkv,
            &mut sc.dqkvr,
            &mut sc.datt,
            &mut sc.dpreatt,
            &mut sc.vaccum,
            &sc.datty,
            &a.qkvr,
            &a.att,
            b,
            t,
            nh,
            hs,
        )?;
    }
    let dqkv: &B::Buf = match stash.as_deref() {
        Some(st) => &st.d_qkv,
        None => &sc.dqkv,
    };
    matmul_bwd_input(be, &mut sc.dln, dqkv, p, w.qkvw, n, c, 3 * c)?;
    if stash.is_none() {
        matmul_bwd_weight(be, g, w.qkvw, Some(w.qkvb), dqkv, &a.ln1, n, c, 3 * c)?;
    }
    layernorm_bwd(
        be,
        &mut sc.dresidual,
        g,
        w.ln1,
        &sc.dln,
        residual,
        p,
        w.ln1,
        &a.ln1_mean,
        &a.ln1_rstd,
        n,
        c,
    )
}

impl<B: Backend> Net<B> for Gpt<B> {
    fn params(&self) -> &Params<B> {
        &self.params
    }
    fn buffers(&mut self) -> (&mut B::Buf, &mut B::Buf) {
        (&mut self.params.values, &mut self.params.grads)
    }
}
