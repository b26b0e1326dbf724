//! A UTF-8 text modelled character by character: the vocabulary is the sorted set of its
//! characters; the last 10% is held out.

use super::{bad, mix, read_text};
use crate::error::WorkError;

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

#[cfg(test)]
mod tests {
    use super::*;

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
