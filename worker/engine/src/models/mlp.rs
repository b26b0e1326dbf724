//! A multi-layer perceptron classifier (ReLU between layers, softmax cross-entropy) on the
//! [`crate::nn`] layers. Its flat parameters are layer by layer, each weight (out x in,
//! row-major) then its bias; backward finishes them last layer first, as contiguous suffixes.

use rand::SeedableRng;

use super::{Net, Params};
use crate::backend::{Backend, UnaryOp};
use crate::nn::{activation_bwd, activation_fwd, crossentropy, matmul_bwd, matmul_fwd};
use crate::{EngineError, Result};

/// Layer widths, input first, classes last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MlpConfig {
    sizes: Vec<usize>,
    offsets: Vec<usize>,
    len: usize,
}

impl MlpConfig {
    /// An MLP with these widths (at least input and output, none zero).
    pub fn new(sizes: Vec<usize>) -> Result<Self> {
        if sizes.len() < 2 || sizes.contains(&0) {
            return Err(EngineError::Config(format!(
                "an MLP needs an input and an output width, none zero (got {sizes:?})"
            )));
        }
        let mut offsets = Vec::new();
        let mut len = 0;
        for w in sizes.windows(2) {
            offsets.push(len);
            len += w[0] * w[1] + w[1];
        }
        Ok(Self {
            sizes,
            offsets,
            len,
        })
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        self.len
    }

    /// Layer widths, input first.
    pub fn sizes(&self) -> &[usize] {
        &self.sizes
    }

    /// Number of linear layers.
    pub fn layers(&self) -> usize {
        self.sizes.len() - 1
    }

    /// Input width.
    pub fn inputs(&self) -> usize {
        self.sizes[0]
    }

    /// Number of classes.
    pub fn classes(&self) -> usize {
        self.sizes[self.layers()]
    }

    /// Offsets of layer `l`'s weight and bias.
    pub fn layer(&self, l: usize) -> (usize, usize) {
        let w = self.offsets[l];
        (w, w + self.sizes[l] * self.sizes[l + 1])
    }

    /// Weights decay, biases do not: `(offset, length, decays)`.
    pub fn decay_ranges(&self) -> Vec<(usize, usize, bool)> {
        (0..self.layers())
            .flat_map(|l| {
                let (w, b) = self.layer(l);
                [(w, b - w, true), (b, self.sizes[l + 1], false)]
            })
            .collect()
    }

    /// PyTorch's `nn.Linear` initialisation, U(-1/sqrt(in), 1/sqrt(in)), deterministic in
    /// `seed`.
    pub fn init(&self, seed: u64) -> Vec<f32> {
        use rand::Rng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut p = vec![0.0; self.len];
        for l in 0..self.layers() {
            let bound = 1.0 / (self.sizes[l] as f32).sqrt();
            let end = self.offsets[l] + self.sizes[l] * self.sizes[l + 1] + self.sizes[l + 1];
            p[self.offsets[l]..end]
                .iter_mut()
                .for_each(|v| *v = rng.random_range(-bound..bound));
        }
        p
    }
}

/// An MLP with parameters, gradients and activations on a backend, for batches of up to
/// `batch` samples.
pub struct Mlp<B: Backend> {
    /// The shape.
    pub config: MlpConfig,
    /// Parameters and gradients, laid out as [`MlpConfig`] says.
    pub params: Params<B>,
    batch: usize,
    /// Input, then each hidden layer's ReLU output.
    acts: Vec<B::Buf>,
    /// Each hidden layer's pre-activation, and the logits last.
    pre: Vec<B::Buf>,
    scratch: (B::Buf, B::Buf),
    losses: B::Buf,
    targets: B::Ids,
    last: usize,
}

impl<B: Backend> Mlp<B> {
    /// An MLP on `be` with `params`, for batches of up to `batch`.
    pub fn new(be: &B, config: MlpConfig, params: &[f32], batch: usize) -> Result<Self> {
        let layout = config.clone();
        let params = Params::new(
            be,
            params,
            config.num_params(),
            config.decay_ranges(),
            move |seed| layout.init(seed),
        )?;
        let widest = config.sizes.iter().copied().max().unwrap_or(1);
        let mut acts = Vec::new();
        let mut pre = Vec::new();
        for l in 0..config.layers() {
            acts.push(be.zeros(batch * config.sizes[l])?);
            pre.push(be.zeros(batch * config.sizes[l + 1])?);
        }
        Ok(Self {
            params,
            batch,
            acts,
            pre,
            scratch: (be.zeros(batch * widest)?, be.zeros(batch * widest)?),
            losses: be.zeros(batch)?,
            targets: be.ids(batch)?,
            config,
            last: 0,
        })
    }

    /// Forward pass of `b` samples `x` (row-major, `inputs()` wide); with `targets`, the
    /// per-sample losses, and with `grad` also the loss gradient (scaled by `grad` per sample)
    /// left for [`Mlp::backward`].
    pub fn forward(
        &mut self,
        be: &B,
        x: &[f32],
        targets: Option<&[i32]>,
        b: usize,
        grad: Option<f32>,
    ) -> Result<()> {
        let c = &self.config;
        if b > self.batch || x.len() != b * c.inputs() {
            return Err(EngineError::Config(format!(
                "a batch of {b} samples ({} values) does not fit an MLP sized for {} of {}",
                x.len(),
                self.batch,
                c.inputs()
            )));
        }
        be.upload(&mut self.acts[0], x)?;
        for l in 0..c.layers() {
            let (w, bias) = c.layer(l);
            let (i, o) = (c.sizes[l], c.sizes[l + 1]);
            matmul_fwd(
                be,
                &mut self.pre[l],
                &self.acts[l],
                &self.params.values,
                w,
                Some(bias),
                b,
                i,
                o,
            )?;
            if l + 1 < c.layers() {
                activation_fwd(
                    be,
                    UnaryOp::Relu,
                    &mut self.acts[l + 1],
                    &self.pre[l],
                    b * o,
                )?;
            }
        }
        if let Some(t) = targets {
            if let Some(bad) = t.iter().find(|&&y| y < 0 || y as usize >= c.classes()) {
                return Err(EngineError::Config(format!(
                    "label {bad} is outside the {} classes",
                    c.classes()
                )));
            }
            be.upload_ids(&mut self.targets, t)?;
            let k = c.classes();
            let logits = self.pre.last_mut().expect("at least one layer");
            crossentropy(be, &mut self.losses, logits, &self.targets, b, k, k, grad)?;
        }
        self.last = b;
        Ok(())
    }

    /// Mean loss of the last forward pass with targets (waits for the device).
    pub fn mean_loss(&self, be: &B) -> Result<f32> {
        let l = be.download(&self.losses, 0, self.last)?;
        Ok((l.iter().map(|x| f64::from(*x)).sum::<f64>() / self.last.max(1) as f64) as f32)
    }

    /// Logits of the last forward pass without targets, `classes()` per sample.
    pub fn logits(&self, be: &B) -> Result<Vec<f32>> {
        let k = self.config.classes();
        be.download(
            self.pre.last().expect("at least one layer"),
            0,
            self.last * k,
        )
    }

    /// Backward of the last forward pass (with targets and `grad`), accumulating into the
    /// gradients and calling `ready(from)` after each layer, last first.
    pub fn backward(&mut self, be: &B, ready: &mut dyn FnMut(&mut B::Buf, usize)) -> Result<()> {
        let c = &self.config;
        let b = self.last;
        let (s1, s2) = (&mut self.scratch.0, &mut self.scratch.1);
        for l in (0..c.layers()).rev() {
            let (w, bias) = c.layer(l);
            let (i, o) = (c.sizes[l], c.sizes[l + 1]);
            let dout: &B::Buf = if l + 1 == c.layers() {
                &self.pre[l]
            } else {
                s2
            };
            matmul_bwd(
                be,
                s1,
                &mut self.params.grads,
                w,
                Some(bias),
                dout,
                &self.acts[l],
                &self.params.values,
                w,
                b,
                i,
                o,
            )?;
            ready(&mut self.params.grads, w);
            if l > 0 {
                // acts[l] = relu(pre[l - 1]).
                activation_bwd(be, UnaryOp::Relu, s2, &self.pre[l - 1], s1, b * i)?;
            }
        }
        Ok(())
    }
}

impl<B: Backend> Net<B> for Mlp<B> {
    fn params(&self) -> &Params<B> {
        &self.params
    }
    fn buffers(&mut self) -> (&mut B::Buf, &mut B::Buf) {
        (&mut self.params.values, &mut self.params.grads)
    }
}
