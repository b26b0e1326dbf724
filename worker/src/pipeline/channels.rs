//! How a plan's sends and receives go onto a transport whose sends are synchronous.
//!
//! A plan assumes buffered sends: a send returns at once, so two neighbouring stages may both
//! send before either receives (1F1B's steady state does). NCCL's `send` completes only once
//! the peer's matching `recv` runs, and NCCL runs the operations of one communicator one after
//! the other, on its stream. Queued on one communicator per pipeline, a plan's operations
//! deadlock (see the tests): stage s's send of an activation waits for stage s+1's receive,
//! which stands behind s+1's send of a gradient, which waits for s's receive, behind s's send.
//!
//! So the NCCL transport gives each *channel* (one sending stage, one receiving stage) a
//! communicator of its own: a queue then holds only one side's operations of one channel, in
//! the order both sides take them (every plan receives on a channel in the order it sends, a
//! test of the planner), and a send waits only for its own receive, never for an unrelated
//! one. The sender's host does not wait for a send; the receiver's waits for its receive. That
//! is the buffered model the plans are made for. [`check`] runs a plan with operations queued
//! by any rule ([`Lane`]) under those synchronous semantics, to show it completes (one
//! communicator per channel) or where it deadlocks (one communicator for all).

use std::collections::{HashMap, VecDeque};

use super::Action;

/// The queue an operation waits in (a communicator's stream): operations of one lane of a
/// stage run one after the other.
pub type Lane = (u32, u32);

/// The channel of a send or receive of `stage`: (sending stage, receiving stage); `None` for
/// other actions. The NCCL transport's rule: one communicator, so one lane, per channel.
pub fn channel(stage: u32, a: &Action) -> Option<Lane> {
    match *a {
        Action::SendActivation { to, .. } | Action::SendGrad { to, .. } => Some((stage, to)),
        Action::RecvActivation { from, .. } | Action::RecvGrad { from, .. } => Some((from, stage)),
        _ => None,
    }
}

/// The tensor a send or receive of stage `at.0` carries: (gradient?, micro-batch, the model
/// part that made it), in a pipeline of `p` stages.
fn tensor(p: usize, at: (usize, usize), a: &Action) -> Option<(bool, u32, u32)> {
    let (p, s) = (p as u32, at.0 as u32);
    match *a {
        Action::SendActivation { micro, chunk, .. } => Some((false, micro, chunk * p + s)),
        Action::SendGrad { micro, chunk, .. } => Some((true, micro, chunk * p + s)),
        Action::RecvActivation { micro, chunk, .. } => {
            Some((false, micro, (chunk * p + s).wrapping_sub(1)))
        }
        Action::RecvGrad { micro, chunk, .. } => Some((true, micro, chunk * p + s + 1)),
        _ => None,
    }
}

/// Whether a stage with `lanes` (indices into its `actions`) has a receive queued.
fn receiving(actions: &[Action], lanes: &HashMap<Lane, VecDeque<usize>>) -> bool {
    lanes.values().flatten().any(|&j| !is_send(&actions[j]))
}

fn is_send(a: &Action) -> bool {
    matches!(a, Action::SendActivation { .. } | Action::SendGrad { .. })
}

/// Runs every stage's plan with synchronous sends, each operation queued in the lane
/// `lane(stage, action)` gives:
///
/// - a stage goes through its plan in order; it queues a send and goes on; it queues a receive
///   and waits until the receive has completed; at the gradient sync it waits until every
///   stage with actions left is at its gradient sync (its collectives);
/// - an operation runs once it is first in its lane; a send and its receive (the k-th receive
///   on a channel pairs with its k-th send, as an untagged transport pairs them) complete
///   together once both run, and leave their lanes.
///
/// Returns what blocks each stage that cannot finish.
pub fn check(plan: &[Vec<Action>], lane: impl Fn(u32, &Action) -> Lane) -> Result<(), String> {
    let p = plan.len();
    // Each communicating action's partner: (stage, action index).
    let mut partner: HashMap<(usize, usize), (usize, usize)> = HashMap::new();
    let mut sends: HashMap<Lane, Vec<(usize, usize)>> = HashMap::new();
    let mut recvs: HashMap<Lane, Vec<(usize, usize)>> = HashMap::new();
    for (s, actions) in plan.iter().enumerate() {
        for (i, a) in actions.iter().enumerate() {
            if let Some(ch) = channel(s as u32, a) {
                let side = if is_send(a) { &mut sends } else { &mut recvs };
                side.entry(ch).or_default().push((s, i));
            }
        }
    }
    for (ch, out) in &sends {
        let into = recvs.get(ch).map_or(&[][..], |v| &v[..]);
        if out.len() != into.len() {
            return Err(format!(
                "stage {} sends {} tensors to stage {}, which receives {}",
                ch.0,
                out.len(),
                ch.1,
                into.len()
            ));
        }
        for (&a, &b) in out.iter().zip(into) {
            let (sent, received) = (tensor(p, a, &plan[a.0][a.1]), tensor(p, b, &plan[b.0][b.1]));
            if sent != received {
                return Err(format!(
                    "stage {}'s receive {} pairs with stage {}'s send {}, another tensor: an \
                     untagged transport receives on a channel in the order it sends",
                    b.0, plan[b.0][b.1], a.0, plan[a.0][a.1]
                ));
            }
            partner.insert(a, b);
            partner.insert(b, a);
        }
    }
    for (ch, into) in &recvs {
        if !sends.contains_key(ch) {
            return Err(format!(
                "stage {} receives {} tensors from stage {}, which sends none",
                ch.1,
                into.len(),
                ch.0
            ));
        }
    }
    // Per stage: the next action, and its lanes' queues of action indices.
    let mut next = vec![0usize; p];
    let mut lanes: Vec<HashMap<Lane, VecDeque<usize>>> = vec![HashMap::new(); p];
    let mut lane_of: HashMap<(usize, usize), Lane> = HashMap::new();
    loop {
        let mut moved = false;
        // Each stage queues what it can: sends, then up to and including a receive.
        for s in 0..p {
            while let Some(a) = plan[s].get(next[s]) {
                let i = next[s];
                if a == &Action::GradSync {
                    break;
                }
                if receiving(&plan[s], &lanes[s]) {
                    // The stage waits for a receive it queued.
                    break;
                }
                if channel(s as u32, a).is_some() {
                    let l = lane(s as u32, a);
                    lanes[s].entry(l).or_default().push_back(i);
                    lane_of.insert((s, i), l);
                }
                next[s] += 1;
                moved = true;
            }
        }
        // Operations first in their lanes whose partners are first in theirs complete.
        let mut completed = Vec::new();
        for s in 0..p {
            for queue in lanes[s].values() {
                let Some(&i) = queue.front() else { continue };
                let (t, j) = partner[&(s, i)];
                let first = lane_of
                    .get(&(t, j))
                    .and_then(|l| lanes[t].get(l))
                    .and_then(|q| q.front());
                if first == Some(&j) {
                    completed.push((s, i));
                }
            }
        }
        for (s, i) in completed {
            let l = lane_of[&(s, i)];
            lanes[s].get_mut(&l).and_then(|q| q.pop_front());
            moved = true;
        }
        // The gradient sync, once every stage with actions left is there.
        let left: Vec<usize> = (0..p).filter(|&s| next[s] < plan[s].len()).collect();
        if !left.is_empty()
            && left
                .iter()
                .all(|&s| plan[s][next[s]] == Action::GradSync && !receiving(&plan[s], &lanes[s]))
        {
            for s in left {
                next[s] += 1;
            }
            moved = true;
        }
        let idle =
            (0..p).all(|s| next[s] == plan[s].len() && lanes[s].values().all(|q| q.is_empty()));
        if idle {
            return Ok(());
        }
        if !moved {
            let blocked: Vec<String> = (0..p)
                .filter(|&s| next[s] < plan[s].len() || lanes[s].values().any(|q| !q.is_empty()))
                .map(|s| {
                    let queued: Vec<String> = lanes[s]
                        .iter()
                        .filter_map(|(l, q)| {
                            q.front().map(|&i| format!("{} in lane {l:?}", plan[s][i]))
                        })
                        .collect();
                    format!(
                        "stage {s} at action {} waits on [{}]",
                        next[s],
                        queued.join(", ")
                    )
                })
                .collect();
            return Err(format!("deadlock: {}", blocked.join("; ")));
        }
    }
}
