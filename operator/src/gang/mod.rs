//! Gang admission (the `Builtin` policy): a gang is admitted only when every rank can be placed at
//! once, in queue order, and its pods are pinned to the nodes planned for them.
//!
//! - [`demand`]: resource quantities and what a pod asks for.
//! - [`snapshot`]: nodes, what is used on them, and where a template's pods may go.
//! - [`placement`]: placing one gang (packing, topology domains, pipeline stage order).
//! - [`queue`]: one admission cycle over the queue, with the backfill rule.
//! - [`admitter`]: the queue of the running operator over its caches.

pub mod admitter;
pub mod demand;
pub mod placement;
pub mod queue;
pub mod snapshot;
