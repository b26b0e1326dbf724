//! Gang admission (the `Builtin` policy): a gang is admitted only when every rank can be placed at
//! once, in queue order, and its pods are pinned to the nodes planned for them.
//!
//! - [`demand`]: resource quantities and what a pod asks for.
//! - [`snapshot`]: nodes, what is used on them, and where a template's pods may go.
//! - [`placement`]: placing one gang (packing, topology domains, pipeline stage order).
//! - [`queue`]: one admission cycle over the queue, with the backfill rule.
//! - [`admitter`]: the queue of the running operator over its caches.
//!
//! What admission answers a job, [`Outcome`], is all that the phase machine
//! ([`crate::decide`]) knows of it.

pub mod admitter;
pub mod demand;
pub mod placement;
pub mod queue;
pub mod snapshot;

/// What admission says to a job that asks.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Admitted: the node of every rank.
    Admitted(Vec<String>),
    /// Waiting.
    Waiting {
        /// Condition reason (`InsufficientCapacity` or `QueuedBehind`).
        reason: &'static str,
        /// What is missing.
        message: String,
        /// Position in the queue (1 = next).
        position: usize,
    },
}
