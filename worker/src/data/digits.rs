//! 8x8 hand-written digits: a CSV of 64 pixels (0 to 16) and a label per row; every fifth row
//! (rows 4, 9, 14, ...) is held out, so both parts mix every writer.

use super::{bad, read_text};
use crate::error::WorkError;

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
