//! Pipeline-parallel schedules as plain data, and a simulator that runs them.
//!
//! A pipeline of `p` stages trains one step on `m` micro-batches. Each stage holds `v` model
//! chunks (one, except for the interleaved schedule): chunk `c` of stage `s` holds model part
//! `c * p + s`, so a micro-batch's forward visits stage 0, 1, ..., p-1 once per chunk, and its
//! backward visits them in the reverse order.
//!
//! [`schedule::plan`] turns (schedule, p, m, v) into each stage's ordered list of
//! [`Action`]s: compute (forward, backward, or backward split into its input-gradient and
//! weight-gradient passes), the sends and receives between neighbouring stages, and the gradient
//! sync and optimizer step that end the step. [`sim::simulate`] runs those lists as a
//! discrete-event system with per-action costs and reports the step's makespan, each stage's
//! idle time (the bubble) and peak live activations, or the deadlock or unmatched message that
//! stops it. Both are pure: no engine, no communication. [`channels`] says why a transport whose sends wait
//! for their receive (NCCL) needs a communicator per channel, and checks that every plan
//! completes that way.
//!
//! Two conventions for the bubble are in use, and they give different percentages for the same
//! schedule (see [`sim::Report`]): the *share of the step* that stages spend idle, which is
//! (p-1)/(m+p-1) for GPipe and 1F1B (GPipe's paper), and the idle time *relative to the ideal
//! step* (the step with no bubble), which is (p-1)/m for GPipe and 1F1B, (p-1)/(v m) for
//! interleaved 1F1B (Megatron's paper) and at most (p-1)/(3m) for ZB-H1 with equal forward,
//! input-gradient and weight-gradient costs (the zero-bubble paper).

pub mod channels;
pub mod partition;
pub mod schedule;
pub mod sim;

pub use schedule::{Action, PipelineSchedule, PlanError, plan};
pub use sim::{Costs, Report, SendMode, SimError, chart, simulate, simulate_stages};

#[cfg(test)]
mod tests;
