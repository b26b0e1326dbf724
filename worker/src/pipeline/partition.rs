//! Which transformer blocks each model part of a pipeline holds.
//!
//! A GPT of `L` blocks is cut into `parts` contiguous runs of at least one block; part 0 also
//! holds the token and position embeddings, the last part the final norm and the head (with
//! its copy of the tied token embedding). [`balance`] chooses the cut that makes the largest
//! part (in parameters) as small as possible; a job can give its own cut instead
//! (`spec.training.pipeline.layersPerPart`), which [`from_counts`] checks.

use std::ops::Range;

use lockstep_engine::models::gpt::GptConfig;

/// Parameters of a part holding `blocks` blocks, as part `k` of `parts`.
fn part_params(cfg: &GptConfig, k: usize, parts: usize, blocks: usize) -> usize {
    let c = cfg.channels;
    let wte = cfg.padded_vocab * c;
    let mut n = blocks * cfg.block_len();
    if k == 0 {
        n += wte + cfg.max_seq * c;
    }
    if k + 1 == parts {
        n += if parts > 1 { wte } else { 0 } + 2 * c;
    }
    n
}

/// The cut of `cfg`'s blocks into `parts` runs that minimises the largest part's parameter
/// count (ties go to the cut with more blocks early); `None` when there are fewer blocks than
/// parts.
pub fn balance(cfg: &GptConfig, parts: usize) -> Option<Vec<Range<usize>>> {
    let l = cfg.layers;
    if parts == 0 || l < parts {
        return None;
    }
    // best[k][i]: the smallest largest-part size cutting the first i blocks into parts 0..k.
    let inf = usize::MAX;
    let mut best = vec![vec![inf; l + 1]; parts + 1];
    let mut from = vec![vec![0usize; l + 1]; parts + 1];
    best[0][0] = 0;
    for k in 1..=parts {
        for i in k..=l {
            for j in (k - 1)..i {
                if best[k - 1][j] == inf {
                    continue;
                }
                let cost = best[k - 1][j].max(part_params(cfg, k - 1, parts, i - j));
                if cost < best[k][i] {
                    best[k][i] = cost;
                    from[k][i] = j;
                }
            }
        }
    }
    let mut cuts = Vec::with_capacity(parts);
    let mut end = l;
    for k in (1..=parts).rev() {
        let start = from[k][end];
        cuts.push(start..end);
        end = start;
    }
    cuts.reverse();
    Some(cuts)
}

/// The cut given as blocks per part, checked against the model: one entry per part, each at
/// least 1, summing to the model's blocks.
pub fn from_counts(
    cfg: &GptConfig,
    parts: usize,
    counts: &[i32],
) -> Result<Vec<Range<usize>>, String> {
    if counts.len() != parts {
        return Err(format!(
            "spec.training.pipeline.layersPerPart has {} entries, but the pipeline has {parts} \
             model parts (pipelineStages x chunksPerStage)",
            counts.len()
        ));
    }
    if let Some(bad) = counts.iter().find(|&&n| n < 1) {
        return Err(format!(
            "spec.training.pipeline.layersPerPart holds {bad}: every part needs at least one block"
        ));
    }
    let total: i64 = counts.iter().map(|&n| i64::from(n)).sum();
    if total != cfg.layers as i64 {
        return Err(format!(
            "spec.training.pipeline.layersPerPart adds up to {total} blocks, but the model has \
             {} (spec.training.model.gpt.layers)",
            cfg.layers
        ));
    }
    let mut start = 0;
    Ok(counts
        .iter()
        .map(|&n| {
            let r = start..start + n as usize;
            start = r.end;
            r
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(cfg: &GptConfig, cuts: &[Range<usize>]) -> Vec<usize> {
        cuts.iter()
            .enumerate()
            .map(|(k, r)| part_params(cfg, k, cuts.len(), r.len()))
            .collect()
    }

    #[test]
    fn a_small_vocabulary_cuts_the_blocks_evenly() {
        let cfg = GptConfig::new(8, 4, 128, 128, 65).unwrap();
        assert_eq!(balance(&cfg, 2).unwrap(), vec![0..4, 4..8]);
        assert_eq!(balance(&cfg, 4).unwrap(), vec![0..2, 2..4, 4..6, 6..8]);
        assert_eq!(balance(&cfg, 1).unwrap(), vec![0..8]);
        assert!(balance(&cfg, 9).is_none(), "fewer blocks than parts");
    }

    #[test]
    fn a_large_vocabulary_gives_the_end_parts_fewer_blocks() {
        // GPT-2 small: the embeddings (39M) outweigh three blocks (7M each).
        let cfg = GptConfig::new(12, 12, 768, 1024, 50257).unwrap();
        let cuts = balance(&cfg, 4).unwrap();
        let s = sizes(&cfg, &cuts);
        assert_eq!(cuts.iter().map(|r| r.len()).sum::<usize>(), 12);
        assert!(
            cuts[0].len() < cuts[1].len() && cuts[3].len() < cuts[2].len(),
            "{cuts:?}"
        );
        // No cut has a smaller largest part: try every cut of 12 into 4.
        let best = *s.iter().max().unwrap();
        for a in 1..12 {
            for b in a + 1..12 {
                for c in b + 1..12 {
                    let other = [0..a, a..b, b..c, c..12];
                    let m = *sizes(&cfg, &other).iter().max().unwrap();
                    assert!(
                        m >= best,
                        "{other:?} has a smaller largest part {m} < {best}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_given_cut_is_checked_against_the_model() {
        let cfg = GptConfig::new(4, 4, 64, 32, 65).unwrap();
        assert_eq!(from_counts(&cfg, 2, &[1, 3]).unwrap(), vec![0..1, 1..4]);
        let e = from_counts(&cfg, 2, &[2, 3]).unwrap_err();
        assert!(e.contains("adds up to 5") && e.contains("has 4"), "{e}");
        let e = from_counts(&cfg, 3, &[2, 2]).unwrap_err();
        assert!(e.contains("3 model parts"), "{e}");
        let e = from_counts(&cfg, 2, &[0, 4]).unwrap_err();
        assert!(e.contains("at least one block"), "{e}");
    }
}
