//! The rank's place in the gang: its [`Layout`] (pipeline stage and data-parallel replica) and
//! the communicators it uses: the whole world, the data-parallel group of its stage (which
//! averages gradients) and the pipeline group of its replica (which passes activations).
//!
//! Workloads and samplers take every degree from here: the data-parallel degree is
//! `dataParallel`, never the world size, which differs as soon as a job has pipeline stages.

use lockstep_api::layout::Layout;

use crate::comm::Communicator;
use crate::error::WorkError;

/// A rank's layout and communicators.
pub struct Topology<C> {
    /// The gang's shape.
    pub layout: Layout,
    /// This rank in the world.
    pub rank: u32,
    /// This rank's pipeline stage.
    pub stage: u32,
    /// This rank's data-parallel replica (its index in its stage's group).
    pub replica: u32,
    /// Every rank of the gang, in rank order.
    pub world: C,
    /// The ranks of this rank's stage, one per replica, in replica order.
    pub data_parallel: C,
    /// The ranks of this rank's replica, one per stage, in stage order.
    pub pipeline: C,
}

impl<C: Communicator> Topology<C> {
    /// The topology of `world`'s rank in `layout`. Every rank of the world must call it (it
    /// splits the world into the groups).
    pub fn new(layout: Layout, mut world: C) -> Result<Self, WorkError> {
        if world.world_size() != layout.world_size() as usize {
            return Err(WorkError::config(format!(
                "the gang has {} ranks, but its layout ({} replicas x {} stages) needs {}",
                world.world_size(),
                layout.data_parallel(),
                layout.pipeline_stages(),
                layout.world_size()
            )));
        }
        let rank = world.rank() as u32;
        let (stage, replica) = (layout.stage_of(rank), layout.replica_of(rank));
        let data_parallel = world.split(stage, replica)?;
        let pipeline = world.split(replica, stage)?;
        Ok(Self {
            layout,
            rank,
            stage,
            replica,
            world,
            data_parallel,
            pipeline,
        })
    }

    /// Number of data-parallel replicas (the ranks that average gradients together).
    pub fn data_parallel_degree(&self) -> usize {
        self.layout.data_parallel() as usize
    }

    /// Global ranks of this rank's data-parallel group, in replica order.
    pub fn data_parallel_ranks(&self) -> Vec<u32> {
        self.layout.stage_group(self.stage).collect()
    }

    /// Global ranks of this rank's pipeline, in stage order.
    pub fn pipeline_ranks(&self) -> Vec<u32> {
        self.layout.pipeline_group(self.replica)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::tcp::{TcpComm, TcpOptions};

    /// What a rank saw: its rank, its groups' ranks, its data-parallel communicator's members,
    /// and the sums of the global ranks over its two groups.
    struct Seen {
        rank: u32,
        dp_ranks: Vec<u32>,
        pp_ranks: Vec<u32>,
        members: Vec<usize>,
        dp_sum: f32,
        pp_sum: f32,
    }

    #[test]
    fn groups_follow_the_layout_and_reduce_within_themselves() {
        // 2 replicas x 3 stages: rank r is stage r / 2, replica r % 2.
        let layout = Layout::new(2, 3).expect("layout");
        let gang = TcpComm::local_gang(6, TcpOptions::default()).expect("gang");
        let seen: Vec<Seen> = std::thread::scope(|s| {
            let handles: Vec<_> = gang
                .into_iter()
                .map(|comm| {
                    s.spawn(move || {
                        let mut t = Topology::new(layout, comm).expect("topology");
                        let members = t.data_parallel.members().to_vec();
                        // Sum the global rank over each group: which ranks each group holds.
                        let mut dp = [t.rank as f32];
                        t.data_parallel
                            .all_reduce(&mut dp, crate::comm::ReduceOp::Sum)
                            .expect("dp all-reduce");
                        let mut pp = [t.rank as f32];
                        t.pipeline
                            .all_reduce(&mut pp, crate::comm::ReduceOp::Sum)
                            .expect("pp all-reduce");
                        Seen {
                            rank: t.rank,
                            dp_ranks: t.data_parallel_ranks(),
                            pp_ranks: t.pipeline_ranks(),
                            members,
                            dp_sum: dp[0],
                            pp_sum: pp[0],
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("rank"))
                .collect()
        });
        for Seen {
            rank,
            dp_ranks,
            pp_ranks,
            members,
            dp_sum,
            pp_sum,
        } in seen
        {
            let stage = rank / 2;
            let replica = rank % 2;
            assert_eq!(dp_ranks, vec![stage * 2, stage * 2 + 1], "rank {rank}");
            assert_eq!(
                pp_ranks,
                vec![replica, replica + 2, replica + 4],
                "rank {rank}"
            );
            let as_usize: Vec<usize> = dp_ranks.iter().map(|&r| r as usize).collect();
            assert_eq!(members, as_usize, "rank {rank}: the split's members");
            assert_eq!(dp_sum, dp_ranks.iter().sum::<u32>() as f32, "rank {rank}");
            assert_eq!(pp_sum, pp_ranks.iter().sum::<u32>() as f32, "rank {rank}");
        }
    }

    #[test]
    fn a_world_of_the_wrong_size_is_refused() {
        let layout = Layout::new(2, 2).expect("layout");
        let comm = TcpComm::local_gang(1, TcpOptions::default())
            .expect("gang")
            .remove(0);
        let e = Topology::new(layout, comm).err().expect("refused");
        assert!(e.message.contains("needs 4"), "{}", e.message);
    }
}
