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
            if v.len() != Self::FEATURES + 1 {
                return Err(bad(format!(
                    "{path} line {}: expected 64 pixels and a label 0-9, got {} fields",
                    i + 1,
                    v.len()
                )));
            }
            if let Some((col, bad_value)) = v.iter().enumerate().find(|(_, p)| !p.is_finite()) {
                return Err(bad(format!(
                    "{path} line {}, field {}: {bad_value} is not a number a model can train on",
                    i + 1,
                    col + 1
                )));
            }
            let label = v[64];
            if label.fract() != 0.0 || !(0.0..10.0).contains(&label) {
                return Err(bad(format!(
                    "{path} line {}: the label {label} is not an integer 0-9",
                    i + 1
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

#[cfg(test)]
mod tests {
    use super::*;

    fn load(name: &str, rows: &[String]) -> Result<Digits, WorkError> {
        let dir = std::env::temp_dir().join(format!("lockstep-digits-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, rows.join("\n")).unwrap();
        Digits::load(p.to_str().unwrap())
    }

    fn row(pixel: &str, label: &str) -> String {
        let mut f = vec!["1"; 64];
        f[7] = pixel;
        f.push(label);
        f.join(",")
    }

    #[test]
    fn non_finite_pixels_and_non_integer_labels_are_refused_naming_the_line() {
        let good = row("3", "7");
        let d = load("good.csv", &[good.clone(), row("16", "0")]).unwrap();
        assert_eq!((d.len(), d.y[0], d.y[1]), (2, 7, 0));
        for (name, bad_row, want) in [
            ("nan.csv", row("NaN", "3"), "line 2, field 8: NaN"),
            ("inf.csv", row("inf", "3"), "line 2, field 8: inf"),
            (
                "frac.csv",
                row("2", "3.5"),
                "line 2: the label 3.5 is not an integer",
            ),
            (
                "range.csv",
                row("2", "10"),
                "line 2: the label 10 is not an integer",
            ),
            ("nanlabel.csv", row("2", "nan"), "line 2, field 65: NaN"),
        ] {
            let e = load(name, &[good.clone(), bad_row]).unwrap_err();
            assert!(e.message.contains(want), "{name}: {}", e.message);
            assert_eq!(e.code, lockstep_api::contract::ExitCode::Data);
        }
    }
}
