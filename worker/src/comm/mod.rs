//! Collectives behind one [`Communicator`] trait: a TCP ring for CPUs ([`tcp`]) and NCCL for GPUs
//! (`nccl`, with the `cuda` feature). The trainer and the workloads use the trait over host
//! buffers; the one exception is the NCCL gradient sync (`workload::sync`), which all-reduces
//! views of the device's gradient buffer in place through `NcclComm::all_reduce_view`.
//!
//! Every rank of a communicator must issue the same collectives in the same order (as with MPI
//! and NCCL). Results are bit-identical across ranks: each element is reduced once, by one rank,
//! and copied to the others.
//!
//! Point-to-point messages ([`Communicator::send_async`], [`Communicator::send`] and
//! [`Communicator::recv`], for pipeline parallelism) are not collectives: only the two ranks
//! involved take part, and they run on a channel of their own, so that they neither wait for nor
//! delay the collectives in flight (over TCP, separate connections; NCCL queues them on its
//! stream, and the host call returns at once). A send returns once its message has been handed to
//! the transport, without waiting for the receiver's `recv`, so two neighbouring pipeline stages
//! may both send before they receive. Messages from one rank to another arrive in the order they
//! were started.

use std::sync::mpsc;
use std::time::Duration;

#[cfg(feature = "cuda")]
pub mod nccl;
pub mod tcp;

/// How the elements of the ranks' buffers are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// Element-wise sum.
    Sum,
    /// Element-wise mean over the ranks of the communicator.
    Avg,
    /// Element-wise maximum.
    Max,
}

impl ReduceOp {
    /// Every operation.
    pub const ALL: [ReduceOp; 3] = [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max];

    /// Folds `src` into `dst` (Avg sums; the mean is taken once at the end by [`Self::finish`]).
    pub fn fold(self, dst: &mut [f32], src: &[f32]) {
        match self {
            ReduceOp::Sum | ReduceOp::Avg => dst.iter_mut().zip(src).for_each(|(d, s)| *d += *s),
            ReduceOp::Max => dst.iter_mut().zip(src).for_each(|(d, s)| *d = d.max(*s)),
        }
    }

    /// Applies the last step of the operation to a fully folded buffer of `ranks` ranks.
    pub fn finish(self, buf: &mut [f32], ranks: usize) {
        if self == ReduceOp::Avg && ranks > 1 {
            let inv = 1.0 / ranks as f32;
            buf.iter_mut().for_each(|x| *x *= inv);
        }
    }
}

/// Why a collective failed.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// A peer closed its connection or the connection broke: the peer is gone.
    #[error("lost rank {peer} during {op}: {source}")]
    PeerLost {
        /// Global rank of the peer.
        peer: usize,
        /// The collective in progress.
        op: &'static str,
        /// The transport's error.
        source: std::io::Error,
    },
    /// A peer did not send or receive within the transport's timeout: it hangs or is gone.
    #[error("rank {peer} did not respond within {seconds} s during {op}")]
    Timeout {
        /// Global rank of the peer.
        peer: usize,
        /// The collective in progress.
        op: &'static str,
        /// The timeout.
        seconds: u64,
    },
    /// The arguments do not fit the collective (sizes, ranks).
    #[error("invalid {op}: {message}")]
    Invalid {
        /// The collective.
        op: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The transport could not be set up (listen, connect, handshake).
    #[error("transport setup failed: {0}")]
    Setup(String),
    /// NCCL (or the CUDA driver under it) reported an error.
    #[error("NCCL: {0}")]
    Nccl(String),
}

impl CommError {
    /// The global rank this error blames, when it blames one.
    pub fn peer(&self) -> Option<usize> {
        match self {
            CommError::PeerLost { peer, .. } | CommError::Timeout { peer, .. } => Some(*peer),
            _ => None,
        }
    }
}

/// Result of a collective.
pub type Result<T, E = CommError> = std::result::Result<T, E>;

/// An operation (a collective or a send) started by an `*_async` call; [`Pending::wait`] returns
/// its buffer.
#[must_use = "a pending collective must be waited for"]
#[derive(Debug)]
pub struct Pending<T> {
    rx: mpsc::Receiver<(Result<T>, Duration)>,
}

impl<T> Pending<T> {
    /// A pending operation that completes when its sender sends (the result and how long the
    /// operation itself took).
    pub(crate) fn channel() -> (mpsc::Sender<(Result<T>, Duration)>, Self) {
        let (tx, rx) = mpsc::channel();
        (tx, Self { rx })
    }

    /// An operation that has already completed (or, on a GPU, is queued on a stream).
    pub fn ready(value: Result<T>) -> Self {
        let (tx, p) = Self::channel();
        // The receiver is alive: it is in `p`.
        let _ = tx.send((value, Duration::ZERO));
        p
    }

    /// Blocks until the operation has completed.
    pub fn wait(self) -> Result<T> {
        self.wait_timed().map(|(v, _)| v)
    }

    /// Blocks until the operation has completed; also returns how long the operation ran (from
    /// when the communication thread started it), to tell hidden from exposed communication.
    pub fn wait_timed(self) -> Result<(T, Duration)> {
        match self.rx.recv() {
            Ok((r, d)) => r.map(|v| (v, d)),
            Err(_) => Err(CommError::Setup("the communicator was dropped".into())),
        }
    }
}

/// Collective communication among the ranks of a group.
///
/// `Buffer` is what the collectives read and write in place (`[f32]` on the host for the TCP
/// ring; device memory for NCCL); `Owned` is an owned buffer, handed to the asynchronous variants
/// and handed back when they complete.
pub trait Communicator {
    /// A borrowed buffer of elements.
    type Buffer: ?Sized;
    /// An owned buffer of elements.
    type Owned;

    /// This rank's index in the communicator, `0..world_size`.
    fn rank(&self) -> usize;
    /// Number of ranks in the communicator.
    fn world_size(&self) -> usize;

    /// Reduces `buf` across all ranks in place; every rank ends with the same result.
    fn all_reduce(&mut self, buf: &mut Self::Buffer, op: ReduceOp) -> Result<()>;
    /// Copies `root`'s `buf` into every rank's `buf`.
    fn broadcast(&mut self, buf: &mut Self::Buffer, root: usize) -> Result<()>;
    /// Reduces `input` (`world_size x output.len()` elements) across ranks; rank r receives
    /// segment r of the result in `output`.
    fn reduce_scatter(
        &mut self,
        input: &Self::Buffer,
        output: &mut Self::Buffer,
        op: ReduceOp,
    ) -> Result<()>;
    /// Concatenates every rank's `input` in rank order into `output`
    /// (`world_size x input.len()` elements).
    fn all_gather(&mut self, input: &Self::Buffer, output: &mut Self::Buffer) -> Result<()>;
    /// Sends `buf` to rank `peer`, which receives it with [`Communicator::recv`]: the blocking
    /// form of [`Communicator::send_async`], on the same point-to-point channel (separate from the
    /// collectives' and ordered with the asynchronous sends); returns once the message has been
    /// handed to the transport, not when the receiver has received it.
    fn send(&mut self, buf: &Self::Buffer, peer: usize) -> Result<()>;
    /// Receives from rank `peer` exactly `buf`'s length of elements: the next message `peer`
    /// sent to this rank with [`Communicator::send`] or [`Communicator::send_async`]. It runs on
    /// the point-to-point channel: it neither waits for nor delays the collectives in flight.
    fn recv(&mut self, buf: &mut Self::Buffer, peer: usize) -> Result<()>;
    /// Starts sending `buf` to rank `peer` (an index in this communicator) and returns at once;
    /// the buffer comes back from [`Pending::wait`] once it has been handed to the transport.
    /// Messages to one peer arrive in the order they were started (whether by this or by
    /// [`Communicator::send`]). It never waits for the receiver's [`Communicator::recv`], and it
    /// does not wait for nor delay collectives: point-to-point messages have their own channel.
    fn send_async(&mut self, buf: Self::Owned, peer: usize) -> Pending<Self::Owned>;
    /// Returns once every rank has entered the barrier.
    fn barrier(&mut self) -> Result<()>;

    /// Starts [`Communicator::all_reduce`] and returns at once; the buffer comes back from
    /// [`Pending::wait`]. Operations complete in the order they were started.
    fn all_reduce_async(&mut self, buf: Self::Owned, op: ReduceOp) -> Pending<Self::Owned>;

    /// Splits the communicator: ranks that pass the same `color` form a new communicator, ordered
    /// by `key` (then by rank). Every rank must call it.
    fn split(&mut self, color: u32, key: u32) -> Result<Self>
    where
        Self: Sized;

    /// Where this rank's operations are recorded as progress (see [`crate::watchdog`]), when
    /// this communicator records them; code that waits for communication outside the trait (a
    /// CUDA stream) records its waits there too.
    fn activity(&self) -> Option<std::sync::Arc<crate::watchdog::Activity>> {
        None
    }
}

/// Bus bandwidth factor of a collective, as nccl-tests defines it: busbw = algbw x factor.
pub fn bus_factor(collective: &str, ranks: usize) -> f64 {
    let n = ranks as f64;
    match collective {
        "all_reduce" => 2.0 * (n - 1.0) / n,
        "reduce_scatter" | "all_gather" => (n - 1.0) / n,
        _ => 1.0,
    }
}
