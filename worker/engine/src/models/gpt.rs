//! A GPT-2-style decoder-only transformer (pre-LayerNorm, GELU MLP, tied embeddings), forward
//! and backward written once on the [`crate::nn`] layers.
//!
//! Parameters are laid out so that backward finishes them as contiguous suffixes of the flat
//! buffer: `[wte, wpe, block 0, ..., block L-1, lnf]`. Backward visits `lnf`, then the blocks
//! from the last, then the embeddings, and after each reports the offset from which every
//! gradient is final; data-parallel training all-reduces a bucket as soon as it lies past that
//! offset. Inside a block the weight matrices come first, so weight decay applies to one
//! range per block.

use rand::SeedableRng;

use super::{Net, Params};
use crate::backend::{Backend, UnaryOp};
use crate::nn::{
    activation_bwd, activation_fwd, attention_bwd, attention_fwd, crossentropy, encoder_bwd,
    encoder_fwd, layernorm_bwd, layernorm_fwd, matmul_bwd, matmul_fwd, residual_fwd,
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
        })
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
        let c = self.channels;
        let o = self.block(l);
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
        BlockParams {
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

/// Buffers for backward, reused by every block.
struct Scratch<B: Backend> {
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
}

/// A GPT with its parameters, gradients and activations on one backend, sized for batches of
/// up to `batch` sequences of up to `seq` tokens.
pub struct Gpt<B: Backend> {
    /// The shape.
    pub config: GptConfig,
    /// Parameters and gradients, laid out as [`GptConfig`] says.
    pub params: Params<B>,
    batch: usize,
    seq: usize,
    encoded: B::Buf,
    blocks: Vec<BlockActs<B>>,
    lnf: B::Buf,
    lnf_mean: B::Buf,
    lnf_rstd: B::Buf,
    logits: B::Buf,
    losses: B::Buf,
    ids: B::Ids,
    targets: B::Ids,
    scratch: Scratch<B>,
    /// Shape of the last forward pass.
    last: (usize, usize),
}

impl<B: Backend> Gpt<B> {
    /// A GPT on `be` with parameters `params` (from [`GptConfig::init`] or a checkpoint), with
    /// room for `batch` sequences of `seq` tokens.
    pub fn new(
        be: &B,
        config: GptConfig,
        params: &[f32],
        batch: usize,
        seq: usize,
    ) -> Result<Self> {
        let params = Params::new(
            be,
            params,
            config.num_params(),
            config.decay_ranges(),
            move |seed| config.init(seed),
        )?;
        if seq > config.max_seq {
            return Err(EngineError::Config(format!(
                "sequence length {seq} exceeds contextLength {}",
                config.max_seq
            )));
        }
        let c = config.channels;
        let nh = config.heads;
        let bt = batch * seq;
        let btc = bt * c;
        let att = batch * nh * seq * seq;
        let z = |n: usize| be.zeros(n);
        let mut blocks = Vec::with_capacity(config.layers);
        for _ in 0..config.layers {
            blocks.push(BlockActs {
                ln1: z(btc)?,
                ln1_mean: z(bt)?,
                ln1_rstd: z(bt)?,
                qkv: z(3 * btc)?,
                qkvr: z(3 * btc)?,
                att: z(att)?,
                atty: z(btc)?,
                attproj: z(btc)?,
                residual2: z(btc)?,
                ln2: z(btc)?,
                ln2_mean: z(bt)?,
                ln2_rstd: z(bt)?,
                fch: z(4 * btc)?,
                fch_gelu: z(4 * btc)?,
                fcproj: z(btc)?,
                residual3: z(btc)?,
            });
        }
        Ok(Self {
            config,
            params,
            batch,
            seq,
            encoded: z(btc)?,
            blocks,
            lnf: z(btc)?,
            lnf_mean: z(bt)?,
            lnf_rstd: z(bt)?,
            logits: z(bt * config.padded_vocab)?,
            losses: z(bt)?,
            ids: be.ids(bt)?,
            targets: be.ids(bt)?,
            scratch: Scratch {
                preatt: z(att)?,
                vaccum: z(btc)?,
                dresidual: z(btc)?,
                dln: z(btc)?,
                datty: z(btc)?,
                dqkvr: z(3 * btc)?,
                dqkv: z(3 * btc)?,
                dfch: z(4 * btc)?,
                dfch_gelu: z(4 * btc)?,
                datt: z(att)?,
                dpreatt: z(att)?,
            },
            last: (0, 0),
        })
    }

    /// Forward pass over `ids` (`b` sequences of `t` tokens); with `targets`, also the
    /// per-token losses (see [`Gpt::mean_loss`]). `grad` also leaves the loss gradient, scaled
    /// by `dloss` per token, in the logits for [`Gpt::backward`].
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
        let cfg = self.config;
        if b > self.batch || t > self.seq || ids.len() != b * t {
            return Err(EngineError::Config(format!(
                "a batch of {b} x {t} ({} ids) does not fit a model sized {} x {}",
                ids.len(),
                self.batch,
                self.seq
            )));
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
        let (c, nh, hs) = (cfg.channels, cfg.heads, cfg.head_size());
        let n = b * t;
        be.upload_ids(&mut self.ids, ids)?;
        let p = &self.params.values;
        encoder_fwd(
            be,
            &mut self.encoded,
            &self.ids,
            p,
            cfg.wte(),
            cfg.padded_vocab,
            cfg.wpe(),
            b,
            t,
            c,
        )?;
        let s = &mut self.scratch;
        for l in 0..cfg.layers {
            let (done, rest) = self.blocks.split_at_mut(l);
            let a = &mut rest[0];
            let residual = if l == 0 {
                &self.encoded
            } else {
                &done[l - 1].residual3
            };
            let w = cfg.block_params(l);
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
            attention_fwd(
                be,
                &mut a.atty,
                &mut a.qkvr,
                &mut a.att,
                &mut s.preatt,
                &mut s.vaccum,
                &a.qkv,
                b,
                t,
                nh,
                hs,
            )?;
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
            residual_fwd(be, &mut a.residual3, &a.residual2, &a.fcproj, n * c)?;
        }
        let last = match self.blocks.last() {
            Some(a) => &a.residual3,
            None => &self.encoded,
        };
        layernorm_fwd(
            be,
            &mut self.lnf,
            &mut self.lnf_mean,
            &mut self.lnf_rstd,
            last,
            p,
            cfg.lnf(),
            n,
            c,
        )?;
        matmul_fwd(
            be,
            &mut self.logits,
            &self.lnf,
            p,
            cfg.wte(),
            None,
            n,
            c,
            cfg.padded_vocab,
        )?;
        if let Some(targets) = targets {
            be.upload_ids(&mut self.targets, targets)?;
            crossentropy(
                be,
                &mut self.losses,
                &mut self.logits,
                &self.targets,
                n,
                cfg.vocab,
                cfg.padded_vocab,
                grad,
            )?;
        }
        self.last = (b, t);
        Ok(())
    }

    /// Mean of the per-token losses of the last forward pass (waits for the device).
    pub fn mean_loss(&self, be: &B) -> Result<f32> {
        let (b, t) = self.last;
        let l = be.download(&self.losses, 0, b * t)?;
        Ok((l.iter().map(|x| f64::from(*x)).sum::<f64>() / (b * t) as f64) as f32)
    }

    /// Logits of the last forward pass without targets, row by row (`padded_vocab` wide).
    pub fn logits(&self, be: &B) -> Result<Vec<f32>> {
        let (b, t) = self.last;
        be.download(&self.logits, 0, b * t * self.config.padded_vocab)
    }

    /// Backward pass of the last forward pass (which had targets and `grad`): accumulates into
    /// the gradients, calling `ready(from)` each time every gradient at offsets `from..` is
    /// final (after the final norm, after each block from the last, after the embeddings).
    pub fn backward(&mut self, be: &B, ready: &mut dyn FnMut(&mut B::Buf, usize)) -> Result<()> {
        let cfg = self.config;
        let (b, t) = self.last;
        let (c, nh, hs) = (cfg.channels, cfg.heads, cfg.head_size());
        let n = b * t;
        let p = &self.params.values;
        let g = &mut self.params.grads;
        let s = &mut self.scratch;
        // The logits hold dloss/dlogits; the classifier shares its weight with wte.
        matmul_bwd(
            be,
            &mut s.dln,
            g,
            cfg.wte(),
            None,
            &self.logits,
            &self.lnf,
            p,
            cfg.wte(),
            n,
            c,
            cfg.padded_vocab,
        )?;
        let last = match self.blocks.last() {
            Some(a) => &a.residual3,
            None => &self.encoded,
        };
        be.fill_zero(&mut s.dresidual, 0, n * c)?;
        layernorm_bwd(
            be,
            &mut s.dresidual,
            g,
            cfg.lnf(),
            &s.dln,
            last,
            p,
            cfg.lnf(),
            &self.lnf_mean,
            &self.lnf_rstd,
            n,
            c,
        )?;
        ready(g, cfg.lnf());
        for l in (0..cfg.layers).rev() {
            let a = &self.blocks[l];
            let residual = if l == 0 {
                &self.encoded
            } else {
                &self.blocks[l - 1].residual3
            };
            let w = cfg.block_params(l);
            // residual3 = residual2 + fcproj: dfcproj is dresidual.
            matmul_bwd(
                be,
                &mut s.dfch_gelu,
                g,
                w.fcprojw,
                Some(w.fcprojb),
                &s.dresidual,
                &a.fch_gelu,
                p,
                w.fcprojw,
                n,
                4 * c,
                c,
            )?;
            activation_bwd(
                be,
                UnaryOp::Gelu,
                &mut s.dfch,
                &a.fch,
                &s.dfch_gelu,
                n * 4 * c,
            )?;
            matmul_bwd(
                be,
                &mut s.dln,
                g,
                w.fcw,
                Some(w.fcb),
                &s.dfch,
                &a.ln2,
                p,
                w.fcw,
                n,
                c,
                4 * c,
            )?;
            layernorm_bwd(
                be,
                &mut s.dresidual,
                g,
                w.ln2,
                &s.dln,
                &a.residual2,
                p,
                w.ln2,
                &a.ln2_mean,
                &a.ln2_rstd,
                n,
                c,
            )?;
            // residual2 = residual + attproj: dattproj is dresidual.
            matmul_bwd(
                be,
                &mut s.datty,
                g,
                w.attprojw,
                Some(w.attprojb),
                &s.dresidual,
                &a.atty,
                p,
                w.attprojw,
                n,
                c,
                c,
            )?;
            attention_bwd(
                be,
                &mut s.dqkv,
                &mut s.dqkvr,
                &mut s.datt,
                &mut s.dpreatt,
                &mut s.vaccum,
                &s.datty,
                &a.qkvr,
                &a.att,
                b,
                t,
                nh,
                hs,
            )?;
            matmul_bwd(
                be,
                &mut s.dln,
                g,
                w.qkvw,
                Some(w.qkvb),
                &s.dqkv,
                &a.ln1,
                p,
                w.qkvw,
                n,
                c,
                3 * c,
            )?;
            layernorm_bwd(
                be,
                &mut s.dresidual,
                g,
                w.ln1,
                &s.dln,
                residual,
                p,
                w.ln1,
                &a.ln1_mean,
                &a.ln1_rstd,
                n,
                c,
            )?;
            ready(g, cfg.block(l));
        }
        encoder_bwd(
            be,
            g,
            cfg.wte(),
            cfg.padded_vocab,
            cfg.wpe(),
            &s.dresidual,
            &self.ids,
            b,
            t,
            c,
        )?;
        ready(g, 0);
        Ok(())
    }
}

impl<B: Backend> Net<B> for Gpt<B> {
    fn params(&self) -> &Params<B> {
        &self.params
    }
    fn buffers(&mut self) -> (&mut B::Buf, &mut B::Buf) {
        (&mut self.params.values, &mut self.params.grads)
    }
}
