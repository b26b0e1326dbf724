//! The Lockstep worker: one program that runs in every pod of a gang (`lockstep-worker run`),
//! launches a whole gang on one machine (`lockstep-worker local`) and measures the collectives
//! and the engine (`lockstep-worker bench`).
//!
//! How a rank runs, top to bottom: [`runtime`] reads the env contract, meets the other ranks at
//! the [`rendezvous`] and connects them ([`comm`]); [`trainer`] builds the rank's [`topology`]
//! (its stage, replica and groups), opens its [`device`] and the job's [`workload`], and runs the
//! step loop, reading [`data`], writing [`checkpoint`]s and [`metrics`] (which [`progress`]
//! reports to the operator). The model arithmetic lives in the `lockstep-engine` crate, which
//! knows nothing of any of these.

pub mod auth;
pub mod bench;
pub mod checkpoint;
pub mod comm;
pub mod data;
pub mod device;
pub mod error;
pub mod hf;
pub mod local;
pub mod metrics;
pub mod pipeline;
pub mod progress;
pub mod rendezvous;
pub mod runtime;
pub mod topology;
pub mod trainer;
pub mod watchdog;
pub mod workload;
