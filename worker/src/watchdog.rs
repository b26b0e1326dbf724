//! Progress watching: what each rank is doing, and rank 0's judgement of a gang that hangs while
//! every process is alive.
//!
//! Heartbeats tell rank 0 that a process lives; they say nothing of whether it trains. A collective
//! that hangs (a broken network path, a stuck communication thread) leaves every heartbeat flowing
//! while the gang holds its accelerators forever. So each rank records its progress in an
//! [`Activity`]: the trainer its step, the communicator every collective and pipeline message it
//! queues, starts and finishes. The heartbeat carries a [`Snapshot`] of it; rank 0 [`judge`]s the
//! gang, and fails it when the rank that has gone longest without progress passes
//! `spec.failurePolicy.progressTimeoutSeconds`, naming that rank and the operation it is stuck in
//! (as PyTorch's NCCL watchdog and flight recorder do, without the separate analysis step).
//!
//! Each rank measures its own idle time on its own clock, so no two clocks are compared.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lockstep_api::contract::ExitCode;

/// One operation a rank has queued or is running.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Op {
    seq: u64,
    name: &'static str,
    peer: Option<usize>,
    started: bool,
}

/// A fault to inject, for tests and the fault benchmark: set through `LOCKSTEP_FAULT`, which a pod
/// template's `env` may not set (the `LOCKSTEP_` names are reserved) but its `envFrom` of a
/// ConfigMap can, as `make bench-faults` does: it only ever stalls the job that asks for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The communication thread hangs, forever, before it starts the first asynchronous collective
    /// of step `step` or a later one; the process and its heartbeat stay alive.
    HangCommThread {
        /// The first step (counted from 0) whose collectives hang.
        step: u64,
    },
}

impl Fault {
    /// The environment variable that carries a fault: `<kind>@rank=<r>,step=<s>`.
    pub const ENV: &'static str = "LOCKSTEP_FAULT";

    /// The fault `spec` injects into `rank`, if any. `spec` is `hang-comm-thread@rank=R,step=S`.
    pub fn parse(spec: &str, rank: u32) -> Result<Option<Self>, String> {
        let (kind, args) = spec.split_once('@').unwrap_or((spec, ""));
        let (mut at_rank, mut step) = (None, 0u64);
        for kv in args.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("{}: {kv:?} is not key=value", Self::ENV))?;
            let n: u64 = v
                .parse()
                .map_err(|_| format!("{}: {k}={v:?} is not a number", Self::ENV))?;
            match k {
                "rank" => at_rank = Some(n),
                "step" => step = n,
                _ => return Err(format!("{}: unknown key {k:?} (rank, step)", Self::ENV)),
            }
        }
        let fault = match kind {
            "hang-comm-thread" => Fault::HangCommThread { step },
            _ => {
                return Err(format!(
                    "{}: unknown fault {kind:?} (hang-comm-thread)",
                    Self::ENV
                ));
            }
        };
        Ok((at_rank.is_none_or(|r| r == u64::from(rank))).then_some(fault))
    }
}

/// What one rank is doing, recorded by its trainer and its communicators and read by its
/// heartbeat (or, on rank 0, by the watchdog). Shared behind an `Arc`.
#[derive(Debug)]
pub struct Activity {
    epoch: Instant,
    step: AtomicU64,
    /// Milliseconds from `epoch` to the last progress.
    last: AtomicU64,
    ops: Mutex<Ops>,
    fault: Mutex<Option<Fault>>,
}

#[derive(Debug, Default)]
struct Ops {
    next: u64,
    live: Vec<Op>,
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// An operation recorded by [`Activity::queue`] or [`Activity::enter`]: it ends (as progress)
/// when dropped.
#[derive(Debug)]
#[must_use = "the operation ends when this is dropped"]
pub struct OpGuard<'a> {
    activity: &'a Activity,
    seq: u64,
}

impl OpGuard<'_> {
    /// The operation's sequence number on this rank.
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

impl Drop for OpGuard<'_> {
    fn drop(&mut self) {
        self.activity.finish(self.seq);
    }
}

impl Activity {
    /// A rank that has just started: step 0, progress now.
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            step: AtomicU64::new(0),
            last: AtomicU64::new(0),
            ops: Mutex::default(),
            fault: Mutex::new(None),
        }
    }

    /// Injects `fault` (see [`Fault`]).
    pub fn inject(&self, fault: Option<Fault>) {
        *self.fault.lock().unwrap_or_else(|e| e.into_inner()) = fault;
    }

    fn progress(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last.fetch_max(ms, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ops> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records progress now without a step or an operation: the gang just formed, and the time
    /// rank 0 spent waiting for the others to join is no stall of its own.
    pub fn touch(&self) {
        self.progress();
    }

    /// Records that `step` optimizer steps are done.
    pub fn set_step(&self, step: u64) {
        if self.step.swap(step, Ordering::Relaxed) != step {
            self.progress();
        }
    }

    /// The steps done.
    pub fn step(&self) -> u64 {
        self.step.load(Ordering::Relaxed)
    }

    /// Records a blocking operation (`name`, with `peer` for a point-to-point message) that starts
    /// now; it ends when the guard drops.
    pub fn enter(&self, name: &'static str, peer: Option<usize>) -> OpGuard<'_> {
        let seq = self.push(name, peer, true);
        OpGuard {
            activity: self,
            seq,
        }
    }

    /// Records an asynchronous operation queued now; returns its sequence number, which
    /// [`Activity::start`] and [`Activity::finish`] take when it starts and ends.
    pub fn queue(&self, name: &'static str) -> u64 {
        self.push(name, None, false)
    }

    fn push(&self, name: &'static str, peer: Option<usize>, started: bool) -> u64 {
        let mut ops = self.lock();
        let seq = ops.next;
        ops.next += 1;
        ops.live.push(Op {
            seq,
            name,
            peer,
            started,
        });
        drop(ops);
        self.progress();
        seq
    }

    /// Records that the queued operation `seq` starts now (on the communication thread). An
    /// injected [`Fault::HangCommThread`] hangs here.
    pub fn start(&self, seq: u64) {
        let hang = matches!(
            *self.fault.lock().unwrap_or_else(|e| e.into_inner()),
            Some(Fault::HangCommThread { step }) if self.step() >= step
        );
        if hang {
            tracing::warn!(seq, "injected fault: the communication thread hangs");
            loop {
                std::thread::park();
            }
        }
        if let Some(op) = self.lock().live.iter_mut().find(|o| o.seq == seq) {
            op.started = true;
        }
        self.progress();
    }

    /// Records that operation `seq` ended (done or failed).
    pub fn finish(&self, seq: u64) {
        self.lock().live.retain(|o| o.seq != seq);
        self.progress();
    }

    /// What the rank is doing now.
    pub fn snapshot(&self) -> Snapshot {
        let now = self.epoch.elapsed().as_millis() as u64;
        let ops = self.lock();
        // The oldest operation is the one everything else waits behind.
        let doing = ops.live.iter().min_by_key(|o| o.seq).map(|o| Doing {
            op: o.name,
            seq: o.seq,
            peer: o.peer,
            started: o.started,
        });
        Snapshot {
            step: self.step(),
            idle_ms: now.saturating_sub(self.last.load(Ordering::Relaxed)),
            communicating: doing.is_some(),
            waiting_on_peers: doing.as_ref().is_some_and(|d| d.started),
            doing: describe(doing.as_ref()),
        }
    }
}

/// The operation a rank is in.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Doing {
    op: &'static str,
    seq: u64,
    peer: Option<usize>,
    started: bool,
}

fn describe(d: Option<&Doing>) -> String {
    match d {
        None => "outside any collective (computing, loading data or writing a checkpoint)".into(),
        Some(d) => {
            let what = match d.peer {
                Some(p) => format!("{} #{} with rank {p}", d.op, d.seq),
                None => format!("{} #{}", d.op, d.seq),
            };
            if d.started {
                format!("inside {what}")
            } else {
                format!("waiting for {what} to start (its communication thread is stuck)")
            }
        }
    }
}

/// What a rank reports of its progress with every heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Steps done.
    pub step: u64,
    /// Milliseconds since the rank last made progress (a step, an operation started or ended).
    pub idle_ms: u64,
    /// The operation it is in (or waits to start), in words.
    pub doing: String,
    /// Whether it is in (or waits to start) a collective or a pipeline message.
    pub communicating: bool,
    /// Whether the operation it is in has started: it waits on its peers, rather than the peers
    /// on it.
    pub waiting_on_peers: bool,
}

/// A rank rank 0 fails the gang for: the one without progress the longest, past the timeout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stalled {
    /// The rank.
    pub rank: u32,
    /// Why, naming the rank, the step and the operation.
    pub reason: String,
    /// The code the rank exits with: communication when stuck in an operation, else internal.
    pub code: ExitCode,
}

/// Rank 0's judgement: `ranks[r]` is rank r's last snapshot, with its idle time brought up to now,
/// or `None` when the rank has not reported one (or finished its work).
///
/// Nothing happens until some rank has made no progress for longer than `timeout`. Then every
/// rank idle for more than half of it is a suspect (a hang stalls the whole gang within moments),
/// and the one the others wait for is named: the lowest step first; then a rank that is not
/// inside a started operation (it computes, or its communication thread never started the
/// collective its peers are in) before one that waits on its peers; then the longest idle; then
/// the lowest rank.
pub fn judge(ranks: &[Option<Snapshot>], timeout: Duration) -> Option<Stalled> {
    let live = || {
        ranks
            .iter()
            .enumerate()
            .filter_map(|(r, s)| s.as_ref().map(|s| (r, s)))
    };
    let longest = live().map(|(_, s)| s.idle_ms).max()?;
    if u128::from(longest) <= timeout.as_millis() {
        return None;
    }
    let half = (timeout.as_millis() / 2) as u64;
    let (rank, s) = live()
        .filter(|(_, s)| s.idle_ms > half)
        .min_by_key(|(r, s)| (s.step, s.waiting_on_peers, std::cmp::Reverse(s.idle_ms), *r))?;
    let steps = ranks.iter().flatten().map(|s| s.step);
    let (lo, hi) = (steps.clone().min().unwrap_or(0), steps.max().unwrap_or(0));
    let others = if lo == hi {
        format!("every rank is at step {hi}")
    } else {
        format!("the ranks are at steps {lo} to {hi}")
    };
    Some(Stalled {
        rank: rank as u32,
        reason: format!(
            "rank {rank} made no progress for {:.1} s (spec.failurePolicy.progressTimeoutSeconds \
             is {}): at step {}, {}; {others}",
            s.idle_ms as f64 / 1000.0,
            timeout.as_secs(),
            s.step,
            s.doing
        ),
        code: if s.communicating {
            ExitCode::Communication
        } else {
            ExitCode::Internal
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rank at `step`, idle for `idle_ms`: inside a started all-reduce when `inside`, else
    /// outside any operation.
    fn snap(step: u64, idle_ms: u64, inside: bool) -> Option<Snapshot> {
        Some(Snapshot {
            step,
            idle_ms,
            doing: if inside {
                "inside all_reduce #7".into()
            } else {
                "outside any collective".into()
            },
            communicating: inside,
            waiting_on_peers: inside,
        })
    }

    #[test]
    fn the_rank_idle_longest_past_the_timeout_is_named_with_its_operation() {
        let t = Duration::from_secs(5);
        // Everyone waits in the collective that rank 2 never joined, a step behind.
        let ranks = [
            snap(4, 5_200, true),
            snap(4, 6_300, true),
            snap(3, 6_000, false),
            None,
        ];
        let s = judge(&ranks, t).expect("stalled");
        assert_eq!(s.rank, 2);
        assert_eq!(s.code, ExitCode::Internal);
        assert!(
            s.reason.starts_with("rank 2 made no progress for 6.0 s"),
            "{}",
            s.reason
        );
        assert!(
            s.reason.contains("at step 3, outside any collective"),
            "{}",
            s.reason
        );
        assert!(
            s.reason.contains("the ranks are at steps 3 to 4"),
            "{}",
            s.reason
        );
        // Below the timeout, nobody is failed.
        let ranks = [snap(4, 4_900, true), snap(3, 5_000, false)];
        assert_eq!(judge(&ranks, t), None);
        // Stuck inside a collective: the communication code.
        let s = judge(&[snap(4, 100, false), snap(4, 7_000, true)], t).expect("stalled");
        assert_eq!((s.rank, s.code), (1, ExitCode::Communication));
        // At the same step, the rank that never started the collective its peers are in is named,
        // even when a peer stalled a moment earlier; a rank idle for less than half the timeout
        // is no suspect.
        let waiting = Some(Snapshot {
            doing: "waiting for all_reduce #9 to start".into(),
            communicating: true,
            waiting_on_peers: false,
            ..snap(4, 5_100, false).expect("some")
        });
        let ranks = [snap(4, 5_200, true), waiting, snap(3, 2_000, false)];
        let s = judge(&ranks, t).expect("stalled");
        assert_eq!(
            (s.rank, s.code),
            (1, ExitCode::Communication),
            "{}",
            s.reason
        );
        assert!(
            s.reason.contains("waiting for all_reduce #9"),
            "{}",
            s.reason
        );
        // A tie goes to the longest idle, then the lower rank.
        let s = judge(&[snap(4, 9_000, true), snap(4, 9_100, true)], t).expect("stalled");
        assert_eq!(s.rank, 1);
        let s = judge(&[snap(4, 9_000, true), snap(4, 9_000, true)], t).expect("stalled");
        assert_eq!(s.rank, 0);
        assert_eq!(judge(&[None, None], t), None);
    }

    #[test]
    fn activity_counts_steps_and_operations_as_progress_and_names_the_oldest() {
        let a = Activity::new();
        std::thread::sleep(Duration::from_millis(30));
        assert!(a.snapshot().idle_ms >= 30);
        a.set_step(1);
        assert!(a.snapshot().idle_ms < 30);
        let queued = a.queue("all_reduce");
        let s = a.snapshot();
        assert!(s.communicating);
        assert!(s.doing.starts_with("waiting"), "{}", s.doing);
        assert!(s.doing.contains("all_reduce #0"), "{}", s.doing);
        {
            let _recv = a.enter("recv", Some(3));
            a.start(queued);
            assert!(a.snapshot().doing.starts_with("inside all_reduce #0"));
            a.finish(queued);
            assert!(
                a.snapshot().doing.starts_with("inside recv #1 with rank 3"),
                "{}",
                a.snapshot().doing
            );
        }
        assert!(!a.snapshot().communicating);
        // The same step again is no progress.
        std::thread::sleep(Duration::from_millis(30));
        a.set_step(1);
        assert!(a.snapshot().idle_ms >= 30);
    }

    #[test]
    fn a_fault_names_its_rank_and_step_and_bad_specs_are_refused() {
        let f = Fault::parse("hang-comm-thread@rank=1,step=3", 1).expect("parses");
        assert_eq!(f, Some(Fault::HangCommThread { step: 3 }));
        assert_eq!(Fault::parse("hang-comm-thread@rank=1,step=3", 0), Ok(None));
        assert_eq!(
            Fault::parse("hang-comm-thread", 4),
            Ok(Some(Fault::HangCommThread { step: 0 }))
        );
        let e = Fault::parse("explode@rank=1", 1).expect_err("unknown");
        assert!(e.contains("unknown fault \"explode\""), "{e}");
        let e = Fault::parse("hang-comm-thread@rank=x", 1).expect_err("not a number");
        assert!(e.contains("rank=\"x\""), "{e}");
    }
}
