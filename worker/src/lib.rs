//! The Lockstep worker: one program that runs in every pod of a gang (`lockstep-worker run`),
//! launches a whole gang on one machine (`lockstep-worker local`) and measures the collectives
//! (`lockstep-worker bench`).

pub mod bench;
pub mod checkpoint;
pub mod comm;
pub mod data;
pub mod ddp;
pub mod local;
pub mod metrics;
pub mod progress;
pub mod rendezvous;
pub mod runtime;
pub mod train;
