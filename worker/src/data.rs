//! The built-in data sets and the distributed sampler.
//!
//! - [`Digits`]: 8x8 hand-written digits (CSV of 64 pixels and a label); every fifth row
//!   (rows 4, 9, 14, ...) is held out, so both parts mix every writer.
//! - [`Text`]: a UTF-8 text modelled character by character; the vocabulary is the sorted set of
//!   its characters; the last 10% is held out.
//! - [`Sampler`]: each epoch a permutation of the training samples drawn from the seed; each
//!   step takes `batch x world x accumulation` of them, and rank `r` takes its own disjoint part,
//!   so the ranks of one step never share a sample and a step is reproducible from
//!   `(seed, step)` alone (which is what a checkpoint records as the data position).

use std::io::Read;

use lockstep_api::contract::ExitCode;
use rand::SeedableRng;
use rand::seq::SliceRandom;

use crate::train::WorkError;

fn bad(m: String) -> WorkError {
    WorkError::new(ExitCode::Data, m)
}

/// Reads a file, decompressing `.gz`, as UTF-8 text.
pub fn read_text(path: &str) -> Result<String, WorkError> {
    let raw =
        std::fs::read(path).map_err(|e| bad(format!("cannot read the data set {path}: {e}")))?;
    if path.ends_with(".gz") {
        let mut s = String::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_string(&mut s)
            .map_err(|e| bad(format!("{path} is not valid gzip text: {e}")))?;
        Ok(s)
    } else {
        String::from_utf8(raw).map_err(|e| bad(format!("{path} is not UTF-8: {e}")))
    }
}

/// The digits data set: 64 pixels (0 to 16) and a label per row.
#[derive(Clone, Debug)]
pub struct Digits {
    /// Pixels scaled to 0..1, row-major, 64 per sample.
    pub x: Vec<f32>,
    /// Labels 0..9.
    pub y: Vec<u8>,
}

impl Digits {
    /// Pixels per sample.
    pub const FEATURES: usize = 64;
    /// Classes.
    pub const CLASSES: usize = 10;

    /// Reads the CSV (optionally gzipped) at `path`.
    pub fn load(path: &str) -> Result<Self, WorkError> {
        let text = read_text(path)?;
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let v: Vec<f32> = line
                .split(',')
                .map(|f| f.trim().parse::<f32>())
                .collect::<Result<_, _>>()
                .map_err(|e| bad(format!("{path} line {}: {e}", i + 1)))?;
            if v.len() != Self::FEATURES + 1 || !(0.0..10.0).contains(&v[64]) {
                return Err(bad(format!(
                    "{path} line {}: expected 64 pixels and a label 0-9, got {} fields",
                    i + 1,
                    v.len()
                )));
            }
            x.extend(v[..64].iter().map(|p| p / 16.0));
            y.push(v[64] as u8);
        }
        if y.is_empty() {
            return Err(bad(format!("{path} holds no samples")));
        }
        Ok(Self { x, y })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// Whether row `i` is held out for evaluation (every fifth row).
    pub fn is_test(i: usize) -> bool {
        i % 5 == 4
    }

    /// Rows used for training.
    pub fn train_rows(&self) -> Vec<usize> {
        (0..self.len()).filter(|&i| !Self::is_test(i)).collect()
    }

    /// Rows held out for evaluation.
    pub fn test_rows(&self) -> Vec<usize> {
        (0..self.len()).filter(|&i| Self::is_test(i)).collect()
    }
}

/// A text as character ids, with its vocabulary.
#[derive(Clone, Debug)]
pub struct Text {
    /// The distinct characters, sorted; a character's id is its index.
    pub vocab: Vec<char>,
    /// The text as ids.
    pub ids: Vec<i32>,
    /// Ids before this index are training data, the rest validation.
    pub split: usize,
}

impl Text {
    /// Reads the text at `path` (optionally gzipped).
    pub fn load(path: &str) -> Result<Self, WorkError> {
        Self::from_text(&read_text(path)?).map_err(|m| bad(format!("{path}: {m}")))
    }

    /// Builds the vocabulary and ids of `text`; the last 10% is validation.
    pub fn from_text(text: &str) -> Result<Self, String> {
        let mut vocab: Vec<char> = text.chars().collect();
        vocab.sort_unstable();
        vocab.dedup();
        let ids: Vec<i32> = text
            .chars()
            .map(|c| vocab.binary_search(&c).map(|i| i as i32).unwrap_or(0))
            .collect();
        if ids.len() < 20 {
            return Err(format!("{} characters are too few to train on", ids.len()));
        }
        let split = ids.len() - ids.len() / 10;
        Ok(Self { vocab, ids, split })
    }

    /// Training windows of `t + 1` tokens (inputs and next-token targets) for epoch `epoch`:
    /// consecutive, non-overlapping, starting at an offset below `t` drawn from the seed so
    /// that each epoch cuts the text differently. Returns the start of each window.
    pub fn windows(&self, t: usize, seed: u64, epoch: u64) -> Vec<usize> {
        let shift = (mix(seed, epoch) % t as u64) as usize;
        let usable = self.split.saturating_sub(shift + 1);
        (0..usable / t).map(|i| shift + i * t).collect()
    }

    /// Number of training windows of `t` tokens in any epoch (the smallest over shifts).
    pub fn windows_per_epoch(&self, t: usize) -> usize {
        self.split.saturating_sub(t) / t
    }

    /// Validation windows of `t + 1` tokens: consecutive from the split.
    pub fn val_windows(&self, t: usize) -> Vec<usize> {
        let n = (self.ids.len() - self.split).saturating_sub(1) / t;
        (0..n).map(|i| self.split + i * t).collect()
    }

    /// Fills `x` and `y` with the windows starting at `starts` (inputs and shifted targets).
    pub fn batch(&self, starts: &[usize], t: usize, x: &mut Vec<i32>, y: &mut Vec<i32>) {
        x.clear();
        y.clear();
        for &s in starts {
            x.extend_from_slice(&self.ids[s..s + t]);
            y.extend_from_slice(&self.ids[s + 1..s + t + 1]);
        }
    }
}

/// A 64-bit mix of a seed and a counter (splitmix64).
pub fn mix(seed: u64, n: u64) -> u64 {
    let mut z = seed ^ n.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Which samples each rank takes at each step.
#[derive(Clone, Debug)]
pub struct Sampler {
    /// Training samples per epoch.
    pub samples: usize,
    /// Samples per rank per micro-step.
    pub batch: usize,
    /// Ranks.
    pub world: usize,
    /// Micro-steps per optimizer step.
    pub accum: usize,
    /// Seed of the shuffles.
    pub seed: u64,
    epoch: Option<(u64, Vec<usize>)>,
}

impl Sampler {
    /// A sampler; fails when one step needs more samples than an epoch has.
    pub fn new(
        samples: usize,
        batch: usize,
        world: usize,
        accum: usize,
        seed: u64,
    ) -> Result<Self, String> {
        let per_step = batch * world * accum;
        if per_step == 0 || samples / per_step == 0 {
            return Err(format!(
                "batchSize {batch} x dataParallel {world} x gradAccumulationSteps {accum} = \
                 {per_step} exceeds the {samples} training samples: lower \
                 spec.training.batchSize"
            ));
        }
        Ok(Self {
            samples,
            batch,
            world,
            accum,
            seed,
            epoch: None,
        })
    }

    /// Optimizer steps per epoch (a last partial step is dropped).
    pub fn steps_per_epoch(&self) -> u64 {
        (self.samples / (self.batch * self.world * self.accum)) as u64
    }

    /// The epoch of `step`.
    pub fn epoch_of(&self, step: u64) -> u64 {
        step / self.steps_per_epoch()
    }

    /// Indices (into the epoch's samples) for `rank` at `step`, micro-step `micro`.
    pub fn indices(&mut self, step: u64, micro: usize, rank: usize) -> &[usize] {
        let epoch = self.epoch_of(step);
        if self.epoch.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut order: Vec<usize> = (0..self.samples).collect();
            order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(mix(
                self.seed, epoch,
            )));
            self.epoch = Some((epoch, order));
        }
        let in_epoch = (step % self.steps_per_epoch()) as usize;
        let per_step = self.batch * self.world * self.accum;
        let start = in_epoch * per_step + (micro * self.world + rank) * self.batch;
        let order = &self.epoch.as_ref().expect("set above").1;
        &order[start..start + self.batch]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_of_a_step_take_disjoint_samples_and_epochs_reshuffle() {
        let mut s = Sampler::new(100, 4, 3, 2, 7).unwrap();
        assert_eq!(s.steps_per_epoch(), 4);
        let mut seen = std::collections::HashSet::new();
        for step in 0..4 {
            for micro in 0..2 {
                for rank in 0..3 {
                    for &i in s.indices(step, micro, rank) {
                        assert!(seen.insert(i), "sample {i} taken twice in one epoch");
                    }
                }
            }
        }
        assert_eq!(seen.len(), 96);
        let first: Vec<usize> = s.indices(0, 0, 0).to_vec();
        let next_epoch: Vec<usize> = s.indices(4, 0, 0).to_vec();
        assert_ne!(first, next_epoch, "each epoch is reshuffled");
        let again = Sampler::new(100, 4, 3, 2, 7)
            .unwrap()
            .indices(4, 0, 0)
            .to_vec();
        assert_eq!(
            again, next_epoch,
            "a step's samples depend only on (seed, step)"
        );
        assert!(
            Sampler::new(10, 4, 3, 1, 0)
                .unwrap_err()
                .contains("batchSize 4")
        );
    }

    #[test]
    fn text_vocab_windows_and_targets() {
        let t = Text::from_text("hello world, hello lockstep, hello again!").unwrap();
        assert_eq!(t.vocab.len(), 19);
        assert_eq!(t.vocab[t.ids[0] as usize], 'h');
        let w = t.windows(4, 1, 0);
        assert!(
            w.iter().all(|&s| s + 5 <= t.split),
            "windows stay in the training part"
        );
        let (mut x, mut y) = (Vec::new(), Vec::new());
        t.batch(&w[..2], 4, &mut x, &mut y);
        assert_eq!(&x[1..4], &y[..3], "targets are the inputs shifted by one");
        assert!(t.val_windows(4).iter().all(|&s| s >= t.split));
        assert_ne!(
            t.windows(4, 1, 0)[0],
            t.windows(4, 1, 1)[0],
            "epochs cut differently"
        );
    }
}
