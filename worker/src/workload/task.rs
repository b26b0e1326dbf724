//! The model and data pairs that train as one whole network on every rank: the MLP on the
//! digits, the GPT on a text. A [`Task`] computes a micro-step's forward and backward and
//! evaluates; the workload around it (data parallelism) decides which samples, and what happens
//! to the gradients.

use lockstep_api::config::WorkerConfig;
use lockstep_api::training::{DataKind, Model};
use lockstep_engine::models::gpt::{Gpt, GptConfig};
use lockstep_engine::models::mlp::{Mlp, MlpConfig};
use lockstep_engine::models::names::Named;
use lockstep_engine::{Backend, Net};
use std::collections::BTreeMap;

use super::Metric;
use crate::checkpoint;
use crate::data::{Digits, Text};
use crate::error::WorkError;

/// A model with its data: what a data-parallel step trains as one whole network.
pub trait Task<B: Backend> {
    /// The model's description (checkpoints refuse another).
    fn describe(&self) -> String;
    /// Training samples per epoch.
    fn samples(&self) -> usize;
    /// Tokens per sample (0 when the model has no tokens).
    fn tokens_per_sample(&self) -> usize;
    /// What [`Task::evaluate`] measures.
    fn metric(&self) -> Metric;
    /// The model.
    fn net(&mut self) -> &mut dyn Net<B>;
    /// Forward and backward of the samples `idx` of `epoch`, gradients scaled by `scale` and
    /// accumulated; `ready(grads, from)` as gradients at `from..` become final. Returns the
    /// mean loss.
    fn micro_step(
        &mut self,
        be: &B,
        idx: &[usize],
        epoch: u64,
        scale: f32,
        ready: &mut dyn FnMut(&mut B::Buf, usize),
    ) -> Result<f32, WorkError>;
    /// The evaluation result on held-out data, over at most `max_batches` batches.
    fn evaluate(&mut self, be: &B, max_batches: Option<usize>) -> Result<f32, WorkError>;
    /// The model's tensors under their PyTorch names, in its flat buffer.
    fn tensors(&self) -> Vec<Named>;
    /// What a checkpoint records besides the tensors (a GPT's Hugging Face config, a text's
    /// vocabulary).
    fn checkpoint_meta(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }
    /// The GPT's shape, when the model is one.
    fn gpt(&self) -> Option<GptConfig> {
        None
    }
}

/// What a checkpoint of a GPT on a text records: the model's Hugging Face `config.json` and the
/// text's characters by id.
pub fn text_meta(config: &GptConfig, data: &Text) -> BTreeMap<String, String> {
    let vocab: Vec<String> = data.vocab.iter().map(ToString::to_string).collect();
    [
        (checkpoint::HF_CONFIG, config.hf_config().to_string()),
        (
            checkpoint::TEXT_VOCAB,
            serde_json::Value::from(vocab).to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The MLP on the digits.
struct DigitsTask<B: Backend> {
    data: Digits,
    train_rows: Vec<usize>,
    model: Mlp<B>,
    eval_batch: usize,
    x: Vec<f32>,
    y: Vec<i32>,
}

impl<B: Backend> Task<B> for DigitsTask<B> {
    fn describe(&self) -> String {
        let sizes: Vec<String> = self
            .model
            .config
            .sizes()
            .iter()
            .map(ToString::to_string)
            .collect();
        format!("mlp {}", sizes.join("-"))
    }
    fn samples(&self) -> usize {
        self.train_rows.len()
    }
    fn tokens_per_sample(&self) -> usize {
        0
    }
    fn metric(&self) -> Metric {
        Metric::Accuracy
    }
    fn net(&mut self) -> &mut dyn Net<B> {
        &mut self.model
    }
    fn tensors(&self) -> Vec<Named> {
        self.model.config.tensors()
    }
    fn micro_step(
        &mut self,
        be: &B,
        idx: &[usize],
        _epoch: u64,
        scale: f32,
        ready: &mut dyn FnMut(&mut B::Buf, usize),
    ) -> Result<f32, WorkError> {
        const F: usize = Digits::FEATURES;
        self.x.clear();
        self.y.clear();
        for &i in idx.iter().map(|&s| &self.train_rows[s]) {
            self.x.extend_from_slice(&self.data.x[i * F..(i + 1) * F]);
            self.y.push(i32::from(self.data.y[i]));
        }
        let b = idx.len();
        self.model
            .forward(be, &self.x, Some(&self.y), b, Some(scale / b as f32))?;
        self.model.backward(be, ready)?;
        Ok(self.model.mean_loss(be)?)
    }
    fn evaluate(&mut self, be: &B, max_batches: Option<usize>) -> Result<f32, WorkError> {
        const F: usize = Digits::FEATURES;
        let rows = self.data.test_rows();
        let mut correct = 0usize;
        let mut seen = 0usize;
        let k = Digits::CLASSES;
        for chunk in rows
            .chunks(self.eval_batch)
            .take(max_batches.unwrap_or(usize::MAX))
        {
            let x: Vec<f32> = chunk
                .iter()
                .flat_map(|&i| self.data.x[i * F..(i + 1) * F].iter().copied())
                .collect();
            self.model.forward(be, &x, None, chunk.len(), None)?;
            let logits = self.model.logits(be)?;
            for (row, &i) in logits.chunks(k).zip(chunk) {
                let best = row
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map_or(0, |(c, _)| c);
                correct += usize::from(best == usize::from(self.data.y[i]));
            }
            seen += chunk.len();
        }
        Ok(correct as f32 / seen.max(1) as f32)
    }
}

/// The GPT on a text.
struct TextTask<B: Backend> {
    data: Text,
    model: Gpt<B>,
    t: usize,
    seed: u64,
    eval_batch: usize,
    windows: Option<(u64, Vec<usize>)>,
    x: Vec<i32>,
    y: Vec<i32>,
}

impl<B: Backend> Task<B> for TextTask<B> {
    fn describe(&self) -> String {
        let c = &self.model.config;
        format!(
            "gpt layers={} heads={} embed={} context={} vocab={}",
            c.layers, c.heads, c.channels, c.max_seq, c.vocab
        )
    }
    fn samples(&self) -> usize {
        self.data.windows_per_epoch(self.t)
    }
    fn tokens_per_sample(&self) -> usize {
        self.t
    }
    fn metric(&self) -> Metric {
        Metric::Loss
    }
    fn net(&mut self) -> &mut dyn Net<B> {
        &mut self.model
    }
    fn tensors(&self) -> Vec<Named> {
        self.model.layout.tensors()
    }
    fn checkpoint_meta(&self) -> BTreeMap<String, String> {
        text_meta(&self.model.config, &self.data)
    }
    fn gpt(&self) -> Option<GptConfig> {
        Some(self.model.config)
    }
    fn micro_step(
        &mut self,
        be: &B,
        idx: &[usize],
        epoch: u64,
        scale: f32,
        ready: &mut dyn FnMut(&mut B::Buf, usize),
    ) -> Result<f32, WorkError> {
        if self.windows.as_ref().is_none_or(|(e, _)| *e != epoch) {
            self.windows = Some((epoch, self.data.windows(self.t, self.seed, epoch)));
        }
        let windows = &self.windows.as_ref().expect("set above").1;
        let starts: Vec<usize> = idx.iter().map(|&i| windows[i]).collect();
        self.data.batch(&starts, self.t, &mut self.x, &mut self.y);
        let (b, t) = (starts.len(), self.t);
        self.model.forward(
            be,
            &self.x,
            Some(&self.y),
            b,
            t,
            Some(scale / (b * t) as f32),
        )?;
        self.model.backward(be, ready)?;
        Ok(self.model.mean_loss(be)?)
    }
    fn evaluate(&mut self, be: &B, max_batches: Option<usize>) -> Result<f32, WorkError> {
        let starts = self.data.val_windows(self.t);
        let (mut sum, mut n) = (0.0f64, 0usize);
        for chunk in starts
            .chunks(self.eval_batch)
            .take(max_batches.unwrap_or(usize::MAX))
        {
            self.data.batch(chunk, self.t, &mut self.x, &mut self.y);
            self.model
                .forward(be, &self.x, Some(&self.y), chunk.len(), self.t, None)?;
            sum += f64::from(self.model.mean_loss(be)?) * chunk.len() as f64;
            n += chunk.len();
        }
        Ok((sum / n.max(1) as f64) as f32)
    }
}

/// The task `cfg` names, on `be`, with room for batches of `batch` (training) and
/// `eval_batch` (evaluation) samples.
pub fn build<B: Backend + 'static>(
    be: &B,
    cfg: &WorkerConfig,
    batch: usize,
    eval_batch: usize,
) -> Result<Box<dyn Task<B>>, WorkError> {
    let t = &cfg.training;
    let path = t.data.as_ref().map(|d| d.path.clone()).unwrap_or_default();
    match (t.model.as_ref(), t.data.as_ref().map(|d| d.kind)) {
        (Some(Model::Mlp(mlp)), Some(DataKind::Digits)) => {
            let data = Digits::load(&path)?;
            let mut sizes = vec![Digits::FEATURES];
            sizes.extend(mlp.hidden_sizes.iter().map(|&h| h.max(1) as usize));
            sizes.push(Digits::CLASSES);
            let config = MlpConfig::new(sizes)?;
            let init = vec![0.0; config.num_params()];
            let model = Mlp::new(be, config, &init, batch.max(eval_batch))?;
            Ok(Box::new(DigitsTask {
                train_rows: data.train_rows(),
                data,
                model,
                eval_batch,
                x: Vec::new(),
                y: Vec::new(),
            }))
        }
        (Some(Model::Gpt(g)), Some(DataKind::Text)) => {
            let (data, config) = gpt_on_text(g, &path)?;
            let t_len = config.max_seq;
            let init = vec![0.0; config.num_params()];
            let model = Gpt::new(be, config, &init, batch.max(eval_batch), t_len)?;
            Ok(Box::new(TextTask {
                data,
                model,
                t: t_len,
                seed: t.seed as u64,
                eval_batch,
                windows: None,
                x: Vec::new(),
                y: Vec::new(),
            }))
        }
        _ => Err(super::not_built(t)),
    }
}

/// The text at `path` and the GPT `g` describes on it: its vocabulary is the text's (or
/// `vocabSize`, which must hold it), its context `contextLength`.
pub fn gpt_on_text(
    g: &lockstep_api::training::Gpt,
    path: &str,
) -> Result<(Text, GptConfig), WorkError> {
    let data = Text::load(path)?;
    let vocab = match g.vocab_size {
        Some(v) if (v as usize) < data.vocab.len() => {
            return Err(WorkError::config(format!(
                "spec.training.model.gpt.vocabSize {v} is smaller than the {} distinct \
                 characters of {path}",
                data.vocab.len()
            )));
        }
        Some(v) => v as usize,
        None => data.vocab.len(),
    };
    let config = GptConfig::new(
        g.layers.max(0) as usize,
        g.heads.max(0) as usize,
        g.embed_dim.max(0) as usize,
        g.context_length.max(1) as usize,
        vocab,
    )
    .map_err(|e| WorkError::config(format!("spec.training.model.gpt: {e}")))?;
    Ok((data, config))
}
