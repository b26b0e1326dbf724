//! The networks, each written once on the [`crate::nn`] layers over one [`Params`] store, and
//! the [`Net`] trait through which the training loop sees any of them.

pub mod gpt;
pub mod mlp;
pub mod names;
pub mod tgn;

use crate::backend::Backend;
use crate::{EngineError, Result};

/// How a config initialises its parameters from a seed.
type Init = Box<dyn Fn(u64) -> Vec<f32> + Send + Sync>;

/// A network's parameters and their gradients, each in one flat buffer on the backend (as in
/// llm.c: a layer's tensors are offsets into them), with what the network's config says of
/// them: how many, which decay, how they start.
pub struct Params<B: Backend> {
    /// Flat parameters.
    pub values: B::Buf,
    /// Flat gradients, the same layout.
    pub grads: B::Buf,
    len: usize,
    decay: Vec<(usize, usize, bool)>,
    init: Init,
}

impl<B: Backend> Params<B> {
    /// `host` on `be`, with zero gradients. `decay` and `init` are the config's
    /// [`Net::decay_ranges`] and [`Net::init`]; `host` must hold exactly `len` parameters.
    pub fn new(
        be: &B,
        host: &[f32],
        len: usize,
        decay: Vec<(usize, usize, bool)>,
        init: impl Fn(u64) -> Vec<f32> + Send + Sync + 'static,
    ) -> Result<Self> {
        if host.len() != len {
            return Err(EngineError::Config(format!(
                "{} parameters given for a model of {len}",
                host.len()
            )));
        }
        let mut values = be.zeros(len)?;
        be.upload(&mut values, host)?;
        Ok(Self {
            values,
            grads: be.zeros(len)?,
            len,
            decay,
            init: Box::new(init),
        })
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no parameters.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// What the training loop needs of a model, whichever it is. A model implements it by handing
/// out its [`Params`]; everything else follows from them.
pub trait Net<B: Backend> {
    /// The parameter store.
    fn params(&self) -> &Params<B>;
    /// Parameters and gradients (the store's two buffers).
    fn buffers(&mut self) -> (&mut B::Buf, &mut B::Buf);
    /// Number of parameters.
    fn num_params(&self) -> usize {
        self.params().len
    }
    /// Weight-decay ranges: `(offset, length, decays)`.
    fn decay_ranges(&self) -> Vec<(usize, usize, bool)> {
        self.params().decay.clone()
    }
    /// Parameters initialised from `seed`.
    fn init(&self, seed: u64) -> Vec<f32> {
        (self.params().init)(seed)
    }
    /// Zeroes the gradients (before the first micro-step of an optimizer step).
    fn zero_grad(&mut self, be: &B) -> Result<()> {
        let n = self.num_params();
        be.fill_zero(self.buffers().1, 0, n)
    }
}
