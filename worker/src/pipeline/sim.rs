//! A discrete-event simulator of pipeline plans: it runs each stage's actions in order with
//! given costs, with receives waiting for their sends, and reports the step's makespan, each
//! stage's busy and idle time, the bubble and the peak of live activations per stage, or why
//! the plan cannot run (a deadlock, a send nobody receives, a pass whose input is missing).
//!
//! The model of time: a stage runs one action at a time, in its plan's order. A compute action
//! (forward, backward, gradient sync, optimizer step) occupies the stage for its cost. Sends
//! and receives occupy no compute: with [`SendMode::Buffered`] a send returns at once and its
//! tensor arrives `latency` later; a receive waits until its tensor has arrived. With
//! [`SendMode::Rendezvous`] a send also waits, until its receiver has posted the receive, and
//! both complete `latency` after the later of the two (an unbuffered transport). All waiting
//! is idle time; a stage that has finished its list idles until the step ends.
//!
//! A send and a receive match when they carry the same tensor: the same kind (activation or
//! gradient), micro-batch and pair of model parts (chunk `c` of stage `s` holds part
//! `c * p + s`), whatever the order in which they were posted, as with a tagged transport.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::fmt;

use thiserror::Error;

use super::schedule::Action;

/// What each action costs, in any unit of time (the default is one unit for each compute pass
/// and free communication). The costs are per action: with the interleaved schedule an action
/// runs one chunk, `1/v` of the stage's layers, so to compare makespans with a one-chunk
/// schedule give it costs `v` times smaller (or the one-chunk schedule costs `v` times larger).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Costs {
    /// A forward pass (F).
    pub forward: u64,
    /// The input-gradient half of a backward (B).
    pub backward_input: u64,
    /// The weight-gradient half of a backward (W); a full [`Action::Backward`] costs B + W.
    pub backward_weight: u64,
    /// From a send to the arrival of its tensor.
    pub latency: u64,
    /// The gradient all-reduce across data-parallel replicas.
    pub grad_sync: u64,
    /// The optimizer step.
    pub optimizer_step: u64,
}

impl Default for Costs {
    /// F = B = W = 1, everything else free.
    fn default() -> Self {
        Self {
            forward: 1,
            backward_input: 1,
            backward_weight: 1,
            latency: 0,
            grad_sync: 0,
            optimizer_step: 0,
        }
    }
}

impl Costs {
    /// The time `action` occupies its stage (0 for sends and receives, which only wait).
    pub fn of(&self, action: &Action) -> u64 {
        match action {
            Action::Forward { .. } => self.forward,
            Action::Backward { .. } => self.backward_input + self.backward_weight,
            Action::BackwardInput { .. } => self.backward_input,
            Action::BackwardWeight { .. } => self.backward_weight,
            Action::GradSync => self.grad_sync,
            Action::OptimizerStep => self.optimizer_step,
            Action::SendActivation { .. }
            | Action::RecvActivation { .. }
            | Action::SendGrad { .. }
            | Action::RecvGrad { .. } => 0,
        }
    }
}

/// How a send behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SendMode {
    /// The send returns at once; the tensor waits at the receiver (an eager or asynchronous
    /// send: `isend`, a buffered socket).
    #[default]
    Buffered,
    /// The send completes only together with its receive (a synchronous send, as NCCL's for
    /// large tensors): a stricter test of a plan's order.
    Rendezvous,
}

/// When one action ran: it started at `start` and the stage moved on at `end`. For a receive
/// (or a rendezvous send) the span is the time spent waiting for the other side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Span {
    /// When the stage reached the action.
    pub start: u64,
    /// When the action completed.
    pub end: u64,
}

/// The outcome of a simulated step.
///
/// The bubble, two ways. Both count a stage as idle whenever it is not computing (waiting for
/// a tensor, or finished before the step ends):
///
/// - [`Report::bubble_share`]: idle stage-time over all stage-time, `sum(idle) / (p *
///   makespan)`: the share of the step lost to the bubble. GPipe and 1F1B give
///   `(p-1)/(m+p-1)` (27.3% for p = 4, m = 8).
/// - [`Report::bubble_vs_ideal`]: `(makespan - ideal) / ideal`, where the ideal step is the
///   busiest stage's compute time (the step with no bubble): the extra time relative to the
///   ideal. GPipe and 1F1B give `(p-1)/m` (37.5% for p = 4, m = 8), interleaved 1F1B
///   `(p-1)/(v m)` (18.75% for v = 2; its share of the step is `(p-1)/(v m + p - 1)`, 15.8%),
///   ZB-H1 with F = B = W at most `(p-1)/(3m)` (12.5%; 11.1% of the step).
///
/// For stages with equal work the two are related by `share = r / (1 + r)` where `r` is the
/// ratio to the ideal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// When the last stage finished its last action (the step time).
    pub makespan: u64,
    /// Per stage, the time spent computing (the sum of its compute actions' costs).
    pub busy: Vec<u64>,
    /// Per stage, the most (micro-batch, chunk) forwards whose activations were alive at once:
    /// a forward's activations are counted from its start until its [`Action::Backward`] or
    /// [`Action::BackwardWeight`] ends. With several chunks per stage, one unit is one chunk's
    /// activations for one micro-batch (`1/v` of a micro-batch's activations on the stage).
    pub peak_activations: Vec<u32>,
    /// Per stage, per action of its plan (same indices), when it ran.
    pub spans: Vec<Vec<Span>>,
}

impl Report {
    /// Pipeline stages.
    pub fn stages(&self) -> usize {
        self.busy.len()
    }

    /// The time `stage` was not computing during the step.
    pub fn idle(&self, stage: usize) -> u64 {
        self.makespan - self.busy[stage]
    }

    /// The idle time of all stages together.
    pub fn total_idle(&self) -> u64 {
        (0..self.stages()).map(|s| self.idle(s)).sum()
    }

    /// The step with no bubble: the busiest stage's compute time.
    pub fn ideal(&self) -> u64 {
        self.busy.iter().copied().max().unwrap_or(0)
    }

    /// The share of all stage-time spent idle: `total_idle / (stages * makespan)`.
    pub fn bubble_share(&self) -> f64 {
        let all = self.stages() as u64 * self.makespan;
        if all == 0 {
            return 0.0;
        }
        self.total_idle() as f64 / all as f64
    }

    /// The step's extra time relative to the ideal step: `(makespan - ideal) / ideal`.
    pub fn bubble_vs_ideal(&self) -> f64 {
        let ideal = self.ideal();
        if ideal == 0 {
            return 0.0;
        }
        (self.makespan - ideal) as f64 / ideal as f64
    }
}

/// A stage that cannot go on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Blocked {
    /// The stage.
    pub stage: u32,
    /// The index of the action it waits at, in its plan.
    pub index: usize,
    /// That action (a receive, or a send in rendezvous mode).
    pub action: Action,
    /// Since when it waits.
    pub since: u64,
}

impl fmt::Display for Blocked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "stage {} waits since t={} at action {} ({})",
            self.stage, self.since, self.index, self.action
        )
    }
}

/// Why a plan cannot run.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum SimError {
    /// Chunks per stage is 0.
    #[error("chunks per stage must be at least 1")]
    NoChunks,
    /// Per-stage costs given for another number of stages than the plan has.
    #[error("costs for {costs} stages given for a plan of {stages}")]
    Costs {
        /// Stages in the plan.
        stages: usize,
        /// Costs given.
        costs: usize,
    },
    /// An action that names a chunk, stage or model part that does not exist or does not fit
    /// the layout (a send to a stage that does not hold the next part, say).
    #[error("stage {stage}, action {index} ({action}): {reason}")]
    Invalid {
        /// The stage.
        stage: u32,
        /// The action's index in the stage's plan.
        index: usize,
        /// The action.
        action: Action,
        /// What is wrong.
        reason: String,
    },
    /// A pass or send whose input is not on the stage when it runs (a forward before the
    /// receive of its activation, a backward before its forward, ...).
    #[error("stage {stage}, action {index} ({action}) runs before {needs}")]
    MissingInput {
        /// The stage.
        stage: u32,
        /// The action's index in the stage's plan.
        index: usize,
        /// The action.
        action: Action,
        /// What it needs first.
        needs: String,
    },
    /// A compute pass or a send that the stage already ran.
    #[error("stage {stage}, action {index} ({action}) runs a second time")]
    Repeated {
        /// The stage.
        stage: u32,
        /// The action's index in the stage's plan.
        index: usize,
        /// The action.
        action: Action,
    },
    /// Some stages wait for each other (or for a tensor nobody sends) and none can go on.
    #[error("deadlock: {}", .blocked.iter().map(|b| b.to_string()).collect::<Vec<_>>().join("; "))]
    Deadlock {
        /// Every stage that has actions left, and what it waits at.
        blocked: Vec<Blocked>,
    },
    /// A send whose tensor no stage received by the end of the step.
    #[error("stage {stage}, action {index} ({action}): nobody receives it")]
    UnmatchedSend {
        /// The stage.
        stage: u32,
        /// The action's index in the stage's plan.
        index: usize,
        /// The action.
        action: Action,
    },
}

/// Runs one step of `plan` (one action list per stage, as [`super::plan`] makes) with `chunks`
/// model chunks per stage, the given costs and send behaviour, and reports its timing and
/// memory, or why it cannot run.
pub fn simulate(
    plan: &[Vec<Action>],
    chunks: u32,
    costs: &Costs,
    sends: SendMode,
) -> Result<Report, SimError> {
    simulate_stages(plan, chunks, &vec![*costs; plan.len()], sends)
}

/// [`simulate`] with each stage's own costs (`costs[s]` for stage `s`; a send's latency is
/// its sender's): stages whose parts differ (the embedding on the first, the head on the last)
/// or whose costs were measured.
pub fn simulate_stages(
    plan: &[Vec<Action>],
    chunks: u32,
    costs: &[Costs],
    sends: SendMode,
) -> Result<Report, SimError> {
    if chunks == 0 {
        return Err(SimError::NoChunks);
    }
    if costs.len() != plan.len() {
        return Err(SimError::Costs {
            stages: plan.len(),
            costs: costs.len(),
        });
    }
    let layout = Layout {
        stages: plan.len() as u32,
        chunks,
    };
    let mut busy = Vec::with_capacity(plan.len());
    let mut peak_activations = Vec::with_capacity(plan.len());
    let mut messages = Vec::with_capacity(plan.len());
    for (stage, actions) in plan.iter().enumerate() {
        let checked = check_stage(&layout, stage as u32, actions, &costs[stage])?;
        busy.push(checked.busy);
        peak_activations.push(checked.peak);
        messages.push(checked.messages);
    }
    let (makespan, spans) = run(plan, &messages, costs, sends)?;
    Ok(Report {
        makespan,
        busy,
        peak_activations,
        spans,
    })
}

/// `stages` stages of `chunks` chunks; chunk `c` of stage `s` holds model part `c * stages + s`.
struct Layout {
    stages: u32,
    chunks: u32,
}

impl Layout {
    fn parts(&self) -> u32 {
        self.stages * self.chunks
    }

    fn part(&self, stage: u32, chunk: u32) -> u32 {
        chunk * self.stages + stage
    }

    /// (stage, chunk) of a part.
    fn place(&self, part: u32) -> (u32, u32) {
        (part % self.stages, part / self.stages)
    }
}

/// The tensor a send or receive carries: an activation from part `from` to `from + 1`, or a
/// gradient from part `from` to `from - 1`, of one micro-batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Message {
    grad: bool,
    micro: u32,
    from: u32,
}

/// What the static pass over one stage's list finds.
struct Checked {
    busy: u64,
    peak: u32,
    /// Per action, the tensor it sends (`Ok`) or receives (`Err`), if it communicates.
    messages: Vec<Option<Result<Message, Message>>>,
}

/// Checks one stage's list in order: every action fits the layout, every pass finds its inputs
/// on the stage (received, or computed there), no pass or send runs twice. Counts the busy time
/// and the live activations on the way.
fn check_stage(
    layout: &Layout,
    stage: u32,
    actions: &[Action],
    costs: &Costs,
) -> Result<Checked, SimError> {
    let mut forwarded = HashSet::new();
    let mut input_grad = HashSet::new();
    let mut split_input_grad = HashSet::new();
    let mut weight_grad = HashSet::new();
    let mut received_activation = HashSet::new();
    let mut received_grad = HashSet::new();
    let mut sent = HashSet::new();
    let mut checked = Checked {
        busy: 0,
        peak: 0,
        messages: Vec::with_capacity(actions.len()),
    };
    let mut live = 0u32;

    for (index, action) in actions.iter().enumerate() {
        let invalid = |reason: String| SimError::Invalid {
            stage,
            index,
            action: *action,
            reason,
        };
        let missing = |needs: String| SimError::MissingInput {
            stage,
            index,
            action: *action,
            needs,
        };
        let repeated = SimError::Repeated {
            stage,
            index,
            action: *action,
        };
        checked.busy += costs.of(action);
        let Some((micro, chunk)) = action.micro_chunk() else {
            checked.messages.push(None);
            continue;
        };
        if chunk >= layout.chunks {
            return Err(invalid(format!(
                "chunk {chunk} does not exist ({} per stage)",
                layout.chunks
            )));
        }
        let part = layout.part(stage, chunk);
        let key = (micro, chunk);
        // The part before and after this one, and where they live.
        let previous = part.checked_sub(1).map(|p| layout.place(p));
        let next = (part + 1 < layout.parts()).then(|| layout.place(part + 1));
        let mut message = None;
        match *action {
            Action::Forward { .. } => {
                // The input: the previous part's output, computed here or received.
                match previous {
                    Some((s, c)) if s == stage && !forwarded.contains(&(micro, c)) => {
                        return Err(missing(format!("F(micro {micro}, chunk {c})")));
                    }
                    Some((s, _)) if s != stage && !received_activation.contains(&key) => {
                        return Err(missing(format!(
                            "the receive of its activation from stage {s}"
                        )));
                    }
                    _ => {}
                }
                if !forwarded.insert(key) {
                    return Err(repeated);
                }
                live += 1;
                checked.peak = checked.peak.max(live);
            }
            Action::Backward { .. } | Action::BackwardInput { .. } => {
                if !forwarded.contains(&key) {
                    return Err(missing(format!("F(micro {micro}, chunk {chunk})")));
                }
                // The output's gradient: from the next part, computed here or received; the
                // last part has the loss instead.
                match next {
                    Some((s, c)) if s == stage && !input_grad.contains(&(micro, c)) => {
                        return Err(missing(format!(
                            "the backward of (micro {micro}, chunk {c})"
                        )));
                    }
                    Some((s, _)) if s != stage && !received_grad.contains(&key) => {
                        return Err(missing(format!(
                            "the receive of its gradient from stage {s}"
                        )));
                    }
                    _ => {}
                }
                if !input_grad.insert(key) {
                    return Err(repeated);
                }
                if matches!(action, Action::Backward { .. }) {
                    weight_grad.insert(key);
                    live -= 1;
                } else {
                    split_input_grad.insert(key);
                }
            }
            Action::BackwardWeight { .. } => {
                if !split_input_grad.contains(&key) {
                    return Err(missing(format!("B(micro {micro}, chunk {chunk})")));
                }
                if !weight_grad.insert(key) {
                    return Err(repeated);
                }
                live -= 1;
            }
            Action::SendActivation { to, .. } | Action::SendGrad { to, .. } => {
                let grad = matches!(action, Action::SendGrad { .. });
                let (target, what) = if grad {
                    (previous, "previous")
                } else {
                    (next, "next")
                };
                let Some((s, _)) = target else {
                    return Err(invalid(format!(
                        "part {part} has no {what} part to send to"
                    )));
                };
                if to != s {
                    return Err(invalid(format!(
                        "the {what} part ({}) is on stage {s}, not {to}",
                        if grad { part - 1 } else { part + 1 }
                    )));
                }
                let ready = if grad {
                    input_grad.contains(&key)
                } else {
                    forwarded.contains(&key)
                };
                if !ready {
                    let pass = if grad { "the backward" } else { "F" };
                    return Err(missing(format!("{pass}(micro {micro}, chunk {chunk})")));
                }
                if !sent.insert((grad, key)) {
                    return Err(repeated);
                }
                message = Some(Ok(Message {
                    grad,
                    micro,
                    from: part,
                }));
            }
            Action::RecvActivation { from, .. } | Action::RecvGrad { from, .. } => {
                let grad = matches!(action, Action::RecvGrad { .. });
                let (source, what) = if grad {
                    (next, "next")
                } else {
                    (previous, "previous")
                };
                let Some((s, _)) = source else {
                    return Err(invalid(format!(
                        "part {part} has no {what} part to receive from"
                    )));
                };
                if from != s {
                    return Err(invalid(format!(
                        "the {what} part ({}) is on stage {s}, not {from}",
                        if grad { part + 1 } else { part - 1 }
                    )));
                }
                let fresh = if grad {
                    received_grad.insert(key)
                } else {
                    received_activation.insert(key)
                };
                if !fresh {
                    return Err(repeated);
                }
                message = Some(Err(Message {
                    grad,
                    micro,
                    from: if grad { part + 1 } else { part - 1 },
                }));
            }
            // Skipped above: they carry no micro-batch.
            Action::GradSync | Action::OptimizerStep => {}
        }
        checked.messages.push(message);
    }
    Ok(checked)
}

/// A message posted by one side and not yet matched by the other.
#[derive(Clone, Copy)]
struct Posted {
    stage: usize,
    index: usize,
    /// When it was posted (a rendezvous send, a receive) or arrives (a buffered send).
    at: u64,
}

/// The discrete-event run: stages become free at event times (earliest first) and run their
/// next actions. Returns the makespan and every action's span.
fn run(
    plan: &[Vec<Action>],
    messages: &[Vec<Option<Result<Message, Message>>>],
    costs: &[Costs],
    sends: SendMode,
) -> Result<(u64, Vec<Vec<Span>>), SimError> {
    let mut spans: Vec<Vec<Span>> = plan
        .iter()
        .map(|a| vec![Span::default(); a.len()])
        .collect();
    let mut next = vec![0usize; plan.len()];
    // Sends not yet received (buffered: arrival time; rendezvous: the blocked sender).
    let mut unreceived: HashMap<Message, Posted> = HashMap::new();
    // Receives waiting for their send.
    let mut waiting: HashMap<Message, Posted> = HashMap::new();
    let mut events = BinaryHeap::new();
    for stage in 0..plan.len() {
        events.push(Reverse((0u64, stage)));
    }

    while let Some(Reverse((t, stage))) = events.pop() {
        // Run the stage's actions that can start at t, up to one that takes time or waits.
        while let Some(action) = plan[stage].get(next[stage]) {
            let index = next[stage];
            match messages[stage][index] {
                None => {
                    let end = t + costs[stage].of(action);
                    spans[stage][index] = Span { start: t, end };
                    next[stage] += 1;
                    if end > t {
                        events.push(Reverse((end, stage)));
                        break;
                    }
                }
                Some(Ok(message)) => match (sends, waiting.remove(&message)) {
                    (SendMode::Buffered, receiver) => {
                        spans[stage][index] = Span { start: t, end: t };
                        next[stage] += 1;
                        let arrival = t + costs[stage].latency;
                        match receiver {
                            Some(r) => {
                                spans[r.stage][r.index] = Span {
                                    start: r.at,
                                    end: arrival,
                                };
                                next[r.stage] += 1;
                                events.push(Reverse((arrival, r.stage)));
                            }
                            None => {
                                unreceived.insert(
                                    message,
                                    Posted {
                                        stage,
                                        index,
                                        at: arrival,
                                    },
                                );
                            }
                        }
                    }
                    (SendMode::Rendezvous, Some(r)) => {
                        let end = t + costs[stage].latency;
                        spans[r.stage][r.index] = Span { start: r.at, end };
                        spans[stage][index] = Span { start: t, end };
                        next[r.stage] += 1;
                        next[stage] += 1;
                        events.push(Reverse((end, r.stage)));
                        events.push(Reverse((end, stage)));
                        break;
                    }
                    (SendMode::Rendezvous, None) => {
                        unreceived.insert(
                            message,
                            Posted {
                                stage,
                                index,
                                at: t,
                            },
                        );
                        break;
                    }
                },
                Some(Err(message)) => match unreceived.remove(&message) {
                    Some(s) => {
                        let end = match sends {
                            SendMode::Buffered => t.max(s.at),
                            SendMode::Rendezvous => {
                                // The sender has been waiting since s.at <= t.
                                let end = t + costs[stage].latency;
                                spans[s.stage][s.index] = Span { start: s.at, end };
                                next[s.stage] += 1;
                                events.push(Reverse((end, s.stage)));
                                end
                            }
                        };
                        spans[stage][index] = Span { start: t, end };
                        next[stage] += 1;
                        if end > t {
                            events.push(Reverse((end, stage)));
                            break;
                        }
                    }
                    None => {
                        waiting.insert(
                            message,
                            Posted {
                                stage,
                                index,
                                at: t,
                            },
                        );
                        break;
                    }
                },
            }
        }
    }

    let blocked: Vec<Blocked> = (0..plan.len())
        .filter(|&s| next[s] < plan[s].len())
        .map(|s| {
            let index = next[s];
            let since = waiting
                .values()
                .chain(unreceived.values())
                .find(|p| p.stage == s && p.index == index)
                .map_or(0, |p| p.at);
            Blocked {
                stage: s as u32,
                index,
                action: plan[s][index],
                since,
            }
        })
        .collect();
    if !blocked.is_empty() {
        return Err(SimError::Deadlock { blocked });
    }
    // Buffered sends nobody received; report the first in stage, then plan order.
    let first = unreceived
        .values()
        .map(|p| (p.stage, p.index))
        .collect::<BTreeMap<_, _>>()
        .into_iter()
        .next();
    if let Some((stage, index)) = first {
        return Err(SimError::UnmatchedSend {
            stage: stage as u32,
            index,
            action: plan[stage][index],
        });
    }
    let makespan = spans
        .iter()
        .filter_map(|s| s.last())
        .map(|s| s.end)
        .max()
        .unwrap_or(0);
    Ok((makespan, spans))
}

/// A text chart of a simulated step, one row per stage and one column per unit of time, for
/// small integer costs: `F3` is micro-batch 3's forward, `B3` its backward (both halves for a
/// full backward, the input-gradient half when split), `W3` its weight-gradient half, `S` the
/// gradient sync, `O` the optimizer step, `.` idle. With several chunks per stage, a letter
/// names the chunk (`F3a`, `F3b`, ...).
pub fn chart(plan: &[Vec<Action>], report: &Report) -> String {
    let chunked = plan
        .iter()
        .flatten()
        .any(|a| a.micro_chunk().is_some_and(|(_, c)| c > 0));
    let label = |a: &Action| -> Option<String> {
        let pass = match a {
            Action::Forward { .. } => "F",
            Action::Backward { .. } | Action::BackwardInput { .. } => "B",
            Action::BackwardWeight { .. } => "W",
            Action::GradSync => return Some("S".into()),
            Action::OptimizerStep => return Some("O".into()),
            _ => return None,
        };
        let (micro, chunk) = a.micro_chunk()?;
        let chunk = if chunked {
            char::from_u32(u32::from(b'a') + chunk).map_or(String::new(), String::from)
        } else {
            String::new()
        };
        Some(format!("{pass}{micro}{chunk}"))
    };
    let width = plan
        .iter()
        .flatten()
        .filter_map(label)
        .map(|l| l.len())
        .max()
        .unwrap_or(1);
    let mut out = String::new();
    for (stage, actions) in plan.iter().enumerate() {
        let mut row = vec![".".to_string(); report.makespan as usize];
        for (action, span) in actions.iter().zip(&report.spans[stage]) {
            if let Some(l) = label(action) {
                for cell in &mut row[span.start as usize..span.end as usize] {
                    cell.clone_from(&l);
                }
            }
        }
        let cells: Vec<String> = row.iter().map(|c| format!("{c:<width$}")).collect();
        out.push_str(cells.join(" ").trim_end());
        out.push('\n');
    }
    out
}
