//! The distributed sampler: each epoch a permutation of the training samples drawn from the seed;
//! each step takes `batch x replicas x accumulation` of them, and data-parallel replica `r` takes
//! its own disjoint part, so the replicas of one step never share a sample and a step is
//! reproducible from `(seed, step)` alone (which is what a checkpoint records as the data
//! position). The ranks of one replica (its pipeline stages) see the same samples.

use rand::SeedableRng;
use rand::seq::SliceRandom;

use super::mix;

/// Which samples each data-parallel replica takes at each step.
#[derive(Clone, Debug)]
pub struct Sampler {
    /// Training samples per epoch.
    pub samples: usize,
    /// Samples per rank per micro-step.
    pub batch: usize,
    /// Data-parallel replicas (ranks of one pipeline stage each take their replica's samples).
    pub replicas: usize,
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
        replicas: usize,
        accum: usize,
        seed: u64,
    ) -> Result<Self, String> {
        let per_step = batch * replicas * accum;
        if per_step == 0 || samples / per_step == 0 {
            return Err(format!(
                "batchSize {batch} x dataParallel {replicas} x gradAccumulationSteps {accum} = \
                 {per_step} exceeds the {samples} training samples: lower \
                 spec.training.batchSize"
            ));
        }
        Ok(Self {
            samples,
            batch,
            replicas,
            accum,
            seed,
            epoch: None,
        })
    }

    /// Optimizer steps per epoch (a last partial step is dropped).
    pub fn steps_per_epoch(&self) -> u64 {
        (self.samples / (self.batch * self.replicas * self.accum)) as u64
    }

    /// The epoch of `step`.
    pub fn epoch_of(&self, step: u64) -> u64 {
        step / self.steps_per_epoch()
    }

    /// Indices (into the epoch's samples) for data-parallel replica `replica` at `step`,
    /// micro-step `micro`.
    pub fn indices(&mut self, step: u64, micro: usize, replica: usize) -> &[usize] {
        let epoch = self.epoch_of(step);
        if self.epoch.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut order: Vec<usize> = (0..self.samples).collect();
            order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(mix(
                self.seed, epoch,
            )));
            self.epoch = Some((epoch, order));
        }
        let in_epoch = (step % self.steps_per_epoch()) as usize;
        let per_step = self.batch * self.replicas * self.accum;
        let start = in_epoch * per_step + (micro * self.replicas + replica) * self.batch;
        let order = &self.epoch.as_ref().expect("set above").1;
        &order[start..start + self.batch]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_of_a_step_take_disjoint_samples_and_epochs_reshuffle() {
        let mut s = Sampler::new(100, 4, 3, 2, 7).unwrap();
        assert_eq!(s.steps_per_epoch(), 4);
        let mut seen = std::collections::HashSet::new();
        for step in 0..4 {
            for micro in 0..2 {
                for replica in 0..3 {
                    for &i in s.indices(step, micro, replica) {
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
}
