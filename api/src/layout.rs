//! How ranks map onto pipeline stages and data-parallel replicas.
//!
//! World size = `dataParallel x pipelineStages`. Ranks are numbered stage-major: rank `r` belongs
//! to stage `r / dataParallel` and is data-parallel replica `r % dataParallel` of that stage. The
//! ranks of one stage are therefore contiguous (`stage * dataParallel ..`), which keeps a stage's
//! data-parallel group together when a placement packs consecutive ranks onto one node, and rank 0
//! (the rendezvous server) is replica 0 of the first stage.
//!
//! ```
//! use lockstep_api::layout::Layout;
//! let l = Layout::new(2, 3).unwrap(); // 2 replicas x 3 stages
//! assert_eq!(l.world_size(), 6);
//! assert_eq!((l.stage_of(3), l.replica_of(3)), (1, 1));
//! assert_eq!(l.rank_of(2, 0), 4);
//! ```

use crate::{Error, Result};

/// The most ranks a gang may have (the CRD refuses more): one rendezvous on rank 0 serves every
/// rank's join and heartbeat stream, and rank labels and pod names (`<job>-<rank>`, the job's
/// name at most 52 characters) stay within a 63-character DNS label.
pub const MAX_WORLD_SIZE: u32 = 16384;

/// The shape of a gang: data-parallel replicas times pipeline stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Layout {
    data_parallel: u32,
    pipeline_stages: u32,
}

impl Layout {
    /// A layout of `data_parallel` replicas of a `pipeline_stages`-stage pipeline; both must be at
    /// least 1 and their product must fit in a `u32`.
    pub fn new(data_parallel: u32, pipeline_stages: u32) -> Result<Self> {
        if data_parallel == 0 || pipeline_stages == 0 {
            return Err(Error::Layout(format!(
                "dataParallel ({data_parallel}) and pipelineStages ({pipeline_stages}) must both be at least 1"
            )));
        }
        if data_parallel.checked_mul(pipeline_stages).is_none() {
            return Err(Error::Layout(format!(
                "world size {data_parallel} x {pipeline_stages} overflows"
            )));
        }
        Ok(Self {
            data_parallel,
            pipeline_stages,
        })
    }

    /// Number of data-parallel replicas.
    pub fn data_parallel(&self) -> u32 {
        self.data_parallel
    }

    /// Number of pipeline stages.
    pub fn pipeline_stages(&self) -> u32 {
        self.pipeline_stages
    }

    /// Total number of ranks.
    pub fn world_size(&self) -> u32 {
        self.data_parallel * self.pipeline_stages
    }

    /// The pipeline stage of `rank`.
    pub fn stage_of(&self, rank: u32) -> u32 {
        rank / self.data_parallel
    }

    /// The data-parallel replica index of `rank` within its stage.
    pub fn replica_of(&self, rank: u32) -> u32 {
        rank % self.data_parallel
    }

    /// The rank of replica `replica` of stage `stage`.
    pub fn rank_of(&self, stage: u32, replica: u32) -> u32 {
        stage * self.data_parallel + replica
    }

    /// The ranks of one stage's data-parallel group (they reduce gradients together).
    pub fn stage_group(&self, stage: u32) -> std::ops::Range<u32> {
        let first = self.rank_of(stage, 0);
        first..first + self.data_parallel
    }

    /// The ranks of one replica's pipeline, in stage order (they pass activations along).
    pub fn pipeline_group(&self, replica: u32) -> Vec<u32> {
        (0..self.pipeline_stages)
            .map(|s| self.rank_of(s, replica))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rank_has_one_stage_and_replica_and_back() {
        for dp in 1..=5 {
            for pp in 1..=4 {
                let l = Layout::new(dp, pp).unwrap();
                let mut seen = std::collections::HashSet::new();
                for r in 0..l.world_size() {
                    let (s, d) = (l.stage_of(r), l.replica_of(r));
                    assert!(s < pp && d < dp, "rank {r} out of range in {l:?}");
                    assert_eq!(l.rank_of(s, d), r);
                    assert!(seen.insert((s, d)), "two ranks map to ({s},{d})");
                }
            }
        }
    }

    #[test]
    fn groups_partition_the_world() {
        let l = Layout::new(3, 4).unwrap();
        let mut by_stage: Vec<u32> = (0..4).flat_map(|s| l.stage_group(s)).collect();
        by_stage.sort_unstable();
        assert_eq!(by_stage, (0..12).collect::<Vec<_>>());
        assert_eq!(l.pipeline_group(2), vec![2, 5, 8, 11]);
        assert!(l.stage_group(1).all(|r| l.stage_of(r) == 1));
    }

    #[test]
    fn zero_sizes_are_refused() {
        assert!(Layout::new(0, 1).is_err());
        assert!(Layout::new(1, 0).is_err());
        assert!(Layout::new(u32::MAX, 2).is_err());
    }
}
