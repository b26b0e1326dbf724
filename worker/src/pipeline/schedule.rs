//! The schedule planner: for a schedule, `p` stages, `m` micro-batches and `v` chunks per stage,
//! each stage's ordered list of [`Action`]s for one training step.
//!
//! Every plan follows the same pattern, so that an executor can run it literally, one action
//! after the other on each stage:
//!
//! - a forward or backward that needs a tensor from another stage is preceded by the receive of
//!   that tensor, and one whose result another stage needs is followed by the send of it;
//!   tensors that stay on the stage (one stage holding consecutive model parts, as with
//!   `p = 1`) are neither sent nor received;
//! - the step ends with one [`Action::GradSync`] and one [`Action::OptimizerStep`] per stage,
//!   after the stage's last backward;
//! - between two stages, the receives come in the order of the sends, so a transport without
//!   tags (NCCL send/recv, one socket per peer) pairs them right;
//! - sends are meant to return at once (an asynchronous send, a buffered socket): with sends
//!   that wait for their receive, 1F1B's steady state deadlocks, stage `s` sending an
//!   activation to `s+1` while `s+1` sends a gradient to `s` (see
//!   [`SendMode::Rendezvous`](super::sim::SendMode::Rendezvous)). A transport with synchronous
//!   sends has to post a send together with the receive that follows it, as Megatron-LM does.
//!
//! The schedules decide only the order of the compute actions:
//!
//! - [`PipelineSchedule::GPipe`]: all `m` forwards, then all `m` backwards (micro-batch 0
//!   first); every stage holds the activations of all `m` micro-batches.
//! - [`PipelineSchedule::OneFOneB`] (PipeDream-Flush): stage `s` runs `min(p-1-s, m)` warm-up
//!   forwards, then alternates one forward and one backward, then drains the remaining
//!   backwards; stage `s` holds at most `p - s` micro-batches of activations.
//! - [`PipelineSchedule::Interleaved`] (Megatron's interleaved 1F1B): the same warm-up /
//!   steady / cool-down shape over the `m * v` (micro-batch, chunk) pairs, taken in groups of
//!   `p` micro-batches per chunk (forwards chunk 0 up to chunk v-1, backwards chunk v-1 down
//!   to 0), with `2(p-1-s) + (v-1)p` warm-up forwards on stage `s`, as in Megatron-LM's
//!   `forward_backward_pipelining_with_interleaving`. Megatron needs `m` to be a multiple of
//!   `p` (the groups are whole), and so does [`plan`]. One difference: when `m = p`, Megatron
//!   runs every forward before any backward; this plan keeps the warm-up above, which gives
//!   the same bubble, `(p-1)/(v m)` of the ideal step (the simulator's tests check it), with
//!   fewer live activations on the later stages.
//! - [`PipelineSchedule::ZeroBubble`] (ZB-H1, Qi et al., ICLR 2024): 1F1B's order of forwards
//!   and backwards, with each backward split into [`Action::BackwardInput`] (B, on the critical
//!   path to the previous stage) and [`Action::BackwardWeight`] (W, needed only by the
//!   optimizer). Stage `s` runs each W right after its B, except the W of its first `s`
//!   micro-batches, which it runs at the end of the step, where it would otherwise wait for the
//!   stages before it to finish. Stage `s` then holds at most `(p - s) + s = p` micro-batches of
//!   activations, 1F1B's peak (on stage 0), and with equal costs F = B = W the bubble shrinks
//!   from 1F1B's `(p-1)(F+B+W)` to `(p-1)F` per stage, a third, when `m >= p`.

use std::fmt;

pub use lockstep_api::training::PipelineSchedule;
use thiserror::Error;

/// One step of a stage's plan. `micro` is the micro-batch (0-based) and `chunk` the model chunk
/// on this stage (0-based; chunk `c` of stage `s` holds model part `c * p + s`). The peer of a
/// send or receive is a stage index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Forward pass of `micro` through `chunk`. Its activations stay alive until the
    /// matching [`Action::Backward`] or [`Action::BackwardWeight`] ends.
    Forward {
        /// Micro-batch.
        micro: u32,
        /// Local model chunk.
        chunk: u32,
    },
    /// Full backward pass of `micro` through `chunk`: the input gradient and the weight
    /// gradient together (B + W), as GPipe, 1F1B and interleaved 1F1B run it. Frees the
    /// forward's activations.
    Backward {
        /// Micro-batch.
        micro: u32,
        /// Local model chunk.
        chunk: u32,
    },
    /// The input-gradient half of a backward (B in the zero-bubble paper): the gradient with
    /// respect to the chunk's input, which the previous model part waits for.
    BackwardInput {
        /// Micro-batch.
        micro: u32,
        /// Local model chunk.
        chunk: u32,
    },
    /// The weight-gradient half of a backward (W in the zero-bubble paper), after its
    /// [`Action::BackwardInput`]; only the optimizer step waits for it. Frees the forward's
    /// activations.
    BackwardWeight {
        /// Micro-batch.
        micro: u32,
        /// Local model chunk.
        chunk: u32,
    },
    /// Send the output of `chunk`'s forward of `micro` to stage `to`, which holds the next
    /// model part.
    SendActivation {
        /// The receiving stage.
        to: u32,
        /// Micro-batch.
        micro: u32,
        /// Local model chunk that produced the activation.
        chunk: u32,
    },
    /// Receive from stage `from` (which holds the previous model part) the input of `chunk`'s
    /// forward of `micro`.
    RecvActivation {
        /// The sending stage.
        from: u32,
        /// Micro-batch.
        micro: u32,
        /// Local model chunk that consumes the activation.
        chunk: u32,
    },
    /// Send the gradient with respect to `chunk`'s input for `micro` (the result of its
    /// backward) to stage `to`, which holds the previous model part.
    SendGrad {
        /// The receiving stage.
        to: u32,
        /// Micro-batch.
        micro: u32,
        /// Local model chunk that produced the gradient.
        chunk: u32,
    },
    /// Receive from stage `from` (which holds the next model part) the gradient with respect
    /// to `chunk`'s output for `micro`, which its backward needs.
    RecvGrad {
        /// The sending stage.
        from: u32,
        /// Micro-batch.
        micro: u32,
        /// Local model chunk that consumes the gradient.
        chunk: u32,
    },
    /// Reduce this stage's accumulated weight gradients across its data-parallel replicas.
    GradSync,
    /// Apply the optimizer to this stage's parameters.
    OptimizerStep,
}

impl Action {
    /// The (micro-batch, chunk) the action works on; `None` for the gradient sync and the
    /// optimizer step.
    pub fn micro_chunk(&self) -> Option<(u32, u32)> {
        match *self {
            Action::Forward { micro, chunk }
            | Action::Backward { micro, chunk }
            | Action::BackwardInput { micro, chunk }
            | Action::BackwardWeight { micro, chunk }
            | Action::SendActivation { micro, chunk, .. }
            | Action::RecvActivation { micro, chunk, .. }
            | Action::SendGrad { micro, chunk, .. }
            | Action::RecvGrad { micro, chunk, .. } => Some((micro, chunk)),
            Action::GradSync | Action::OptimizerStep => None,
        }
    }

    /// The other stage of a send or receive.
    pub fn peer(&self) -> Option<u32> {
        match *self {
            Action::SendActivation { to, .. } | Action::SendGrad { to, .. } => Some(to),
            Action::RecvActivation { from, .. } | Action::RecvGrad { from, .. } => Some(from),
            _ => None,
        }
    }

    /// Whether the action is a send or a receive (as opposed to work on the stage itself).
    pub fn is_communication(&self) -> bool {
        self.peer().is_some()
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Action::Forward { micro, chunk } => write!(f, "F(micro {micro}, chunk {chunk})"),
            Action::Backward { micro, chunk } => write!(f, "B+W(micro {micro}, chunk {chunk})"),
            Action::BackwardInput { micro, chunk } => {
                write!(f, "B(micro {micro}, chunk {chunk})")
            }
            Action::BackwardWeight { micro, chunk } => {
                write!(f, "W(micro {micro}, chunk {chunk})")
            }
            Action::SendActivation { to, micro, chunk } => {
                write!(
                    f,
                    "send activation(micro {micro}, chunk {chunk}) to stage {to}"
                )
            }
            Action::RecvActivation { from, micro, chunk } => {
                write!(
                    f,
                    "receive activation(micro {micro}, chunk {chunk}) from stage {from}"
                )
            }
            Action::SendGrad { to, micro, chunk } => {
                write!(
                    f,
                    "send gradient(micro {micro}, chunk {chunk}) to stage {to}"
                )
            }
            Action::RecvGrad { from, micro, chunk } => {
                write!(
                    f,
                    "receive gradient(micro {micro}, chunk {chunk}) from stage {from}"
                )
            }
            Action::GradSync => f.write_str("gradient sync"),
            Action::OptimizerStep => f.write_str("optimizer step"),
        }
    }
}

/// Why (schedule, stages, micro-batches, chunks) has no plan.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PlanError {
    /// No stages, no micro-batches or no chunks.
    #[error("a pipeline needs at least one {what}, got 0")]
    Zero {
        /// "stage", "micro-batch" or "chunk per stage".
        what: &'static str,
    },
    /// The schedule does not take this many chunks per stage.
    #[error(
        "the {schedule:?} schedule takes {expected} chunks per stage, got {chunks} (chunksPerStage)"
    )]
    Chunks {
        /// The schedule asked for.
        schedule: PipelineSchedule,
        /// Chunks per stage asked for.
        chunks: u32,
        /// What the schedule takes, in words ("1", "at least 2").
        expected: &'static str,
    },
    /// Interleaved 1F1B runs micro-batches in groups of `stages`.
    #[error(
        "the Interleaved schedule needs micro-batches ({micro_batches}) to be a multiple of \
         pipeline stages ({stages}), as in Megatron-LM"
    )]
    NotMultipleOfStages {
        /// Micro-batches asked for.
        micro_batches: u32,
        /// Pipeline stages.
        stages: u32,
    },
    /// Stages x chunks or micro-batches x chunks overflows.
    #[error(
        "{stages} stages x {micro_batches} micro-batches x {chunks} chunks is too large to plan"
    )]
    TooLarge {
        /// Pipeline stages.
        stages: u32,
        /// Micro-batches.
        micro_batches: u32,
        /// Chunks per stage.
        chunks: u32,
    },
}

/// Each stage's ordered actions for one training step of `schedule` with `stages` pipeline
/// stages, `micro_batches` micro-batches and `chunks` model chunks per stage (at least 2 for
/// Interleaved, 1 for the others). Element `s` of the result is stage `s`'s list.
pub fn plan(
    schedule: PipelineSchedule,
    stages: u32,
    micro_batches: u32,
    chunks: u32,
) -> Result<Vec<Vec<Action>>, PlanError> {
    check(schedule, stages, micro_batches, chunks)?;
    let shape = Shape {
        stages,
        micro_batches,
        chunks,
    };
    Ok((0..stages)
        .map(|stage| {
            let order = match schedule {
                PipelineSchedule::GPipe => gpipe(micro_batches),
                PipelineSchedule::OneFOneB | PipelineSchedule::ZeroBubble => {
                    one_f_one_b(stages, micro_batches, stage)
                }
                PipelineSchedule::Interleaved => interleaved(&shape, stage),
            };
            let split = schedule == PipelineSchedule::ZeroBubble;
            shape.actions(stage, &order, split)
        })
        .collect())
}

fn check(
    schedule: PipelineSchedule,
    stages: u32,
    micro_batches: u32,
    chunks: u32,
) -> Result<(), PlanError> {
    for (n, what) in [
        (stages, "stage"),
        (micro_batches, "micro-batch"),
        (chunks, "chunk per stage"),
    ] {
        if n == 0 {
            return Err(PlanError::Zero { what });
        }
    }
    let interleaved = schedule == PipelineSchedule::Interleaved;
    if interleaved != (chunks >= 2) {
        return Err(PlanError::Chunks {
            schedule,
            chunks,
            expected: if interleaved { "at least 2" } else { "1" },
        });
    }
    if interleaved && !micro_batches.is_multiple_of(stages) {
        return Err(PlanError::NotMultipleOfStages {
            micro_batches,
            stages,
        });
    }
    // Every index below (model parts, (micro-batch, chunk) pairs, their products with a
    // stage count) stays within u32.
    let fits = stages
        .checked_mul(chunks)
        .and_then(|parts| parts.checked_mul(micro_batches))
        .is_some();
    if !fits {
        return Err(PlanError::TooLarge {
            stages,
            micro_batches,
            chunks,
        });
    }
    Ok(())
}

/// A forward or a (whole) backward of one micro-batch through one local chunk, in the order a
/// schedule runs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    Forward(u32, u32),
    Backward(u32, u32),
}

/// GPipe: every forward, then every backward, micro-batch 0 first.
fn gpipe(micro_batches: u32) -> Vec<Pass> {
    let forwards = (0..micro_batches).map(|i| Pass::Forward(i, 0));
    let backwards = (0..micro_batches).map(|i| Pass::Backward(i, 0));
    forwards.chain(backwards).collect()
}

/// 1F1B (PipeDream-Flush) on `stage`: `p-1-stage` warm-up forwards, then one forward and one
/// backward at a time, then the remaining backwards.
fn one_f_one_b(stages: u32, micro_batches: u32, stage: u32) -> Vec<Pass> {
    let warmup = (stages - 1 - stage).min(micro_batches);
    warm_steady_cool(
        micro_batches,
        warmup,
        |i| Pass::Forward(i, 0),
        |i| Pass::Backward(i, 0),
    )
}

/// Megatron's interleaved 1F1B on `stage`, over the `m * v` virtual micro-batches.
fn interleaved(shape: &Shape, stage: u32) -> Vec<Pass> {
    let (p, v) = (shape.stages, shape.chunks);
    let total = shape.micro_batches * v;
    let warmup = (2 * (p - 1 - stage) + (v - 1) * p).min(total);
    // Virtual micro-batch k belongs to group k / (p v); inside a group, p micro-batches run
    // through chunk 0, then the same p through chunk 1, and so on (backwards: from chunk v-1).
    let unpack = |k: u32| {
        let (group, in_group) = (k / (p * v), k % (p * v));
        (group * p + in_group % p, in_group / p)
    };
    warm_steady_cool(
        total,
        warmup,
        |k| {
            let (micro, chunk) = unpack(k);
            Pass::Forward(micro, chunk)
        },
        |k| {
            let (micro, chunk) = unpack(k);
            Pass::Backward(micro, v - 1 - chunk)
        },
    )
}

/// `warmup` forwards, then forward `warmup + k` and backward `k` for each remaining k, then the
/// last `warmup` backwards.
fn warm_steady_cool(
    total: u32,
    warmup: u32,
    forward: impl Fn(u32) -> Pass,
    backward: impl Fn(u32) -> Pass,
) -> Vec<Pass> {
    let mut order = Vec::with_capacity(2 * total as usize);
    order.extend((0..warmup).map(&forward));
    for k in 0..total - warmup {
        order.push(forward(warmup + k));
        order.push(backward(k));
    }
    order.extend((total - warmup..total).map(&backward));
    order
}

/// The pipeline's shape: what turns a stage's order of passes into its actions.
struct Shape {
    stages: u32,
    micro_batches: u32,
    chunks: u32,
}

impl Shape {
    /// The stage holding model part `part`.
    fn stage_of(&self, part: u32) -> u32 {
        part % self.stages
    }

    /// Stage `stage`'s actions: `order` with the receives and sends it needs around each pass,
    /// backwards split into B and W when `split` (ZB-H1: W right after B except for the first
    /// `stage` micro-batches, whose W runs at the end), then the gradient sync and the
    /// optimizer step.
    fn actions(&self, stage: u32, order: &[Pass], split: bool) -> Vec<Action> {
        let last_part = self.stages * self.chunks - 1;
        let deferred = if split {
            stage.min(self.micro_batches)
        } else {
            0
        };
        let mut out = Vec::with_capacity(order.len() * 3 + 2);
        for &pass in order {
            match pass {
                Pass::Forward(micro, chunk) => {
                    let part = chunk * self.stages + stage;
                    if part > 0 && self.stage_of(part - 1) != stage {
                        out.push(Action::RecvActivation {
                            from: self.stage_of(part - 1),
                            micro,
                            chunk,
                        });
                    }
                    out.push(Action::Forward { micro, chunk });
                    if part < last_part && self.stage_of(part + 1) != stage {
                        out.push(Action::SendActivation {
                            to: self.stage_of(part + 1),
                            micro,
                            chunk,
                        });
                    }
                }
                Pass::Backward(micro, chunk) => {
                    let part = chunk * self.stages + stage;
                    if part < last_part && self.stage_of(part + 1) != stage {
                        out.push(Action::RecvGrad {
                            from: self.stage_of(part + 1),
                            micro,
                            chunk,
                        });
                    }
                    if split {
                        out.push(Action::BackwardInput { micro, chunk });
                    } else {
                        out.push(Action::Backward { micro, chunk });
                    }
                    if part > 0 && self.stage_of(part - 1) != stage {
                        out.push(Action::SendGrad {
                            to: self.stage_of(part - 1),
                            micro,
                            chunk,
                        });
                    }
                    if split && micro >= deferred {
                        out.push(Action::BackwardWeight { micro, chunk });
                    }
                }
            }
        }
        out.extend((0..deferred).map(|micro| Action::BackwardWeight { micro, chunk: 0 }));
        out.push(Action::GradSync);
        out.push(Action::OptimizerStep);
        out
    }
}
