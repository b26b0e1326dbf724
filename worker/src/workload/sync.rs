//! Gradient synchronisation over a data-parallel group, with PyTorch DDP's semantics, shared by
//! every workload that averages gradients: gradient buckets are contiguous ranges of the flat
//! gradient buffer, filled in reverse order as backward makes gradients final (a smaller first
//! bucket so communication starts early, then `cap`-sized ones); each full bucket is averaged
//! over the group at once, asynchronously, while backward goes on; the optimizer waits for all
//! of them.
//!
//! Two transports implement [`GradSync`]: [`TcpSync`] (any backend; the all-reduce runs on the
//! TCP communicator's thread, through the [`Communicator`] trait) and, with CUDA, `NcclSync`
//! (in place on the device, on a communication stream that waits for the compute stream's
//! event). `NcclSync` calls NCCL's in-place all-reduce of a view directly rather than through
//! the trait: a bucket is a sub-range of the device's gradient buffer, which the trait's owned
//! device buffers cannot express without a copy.

use std::ops::Range;
use std::time::{Duration, Instant};

use lockstep_engine::Backend;

use crate::comm::{Communicator, Pending, ReduceOp};
use crate::error::WorkError;

/// Communication of one optimizer step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SyncStats {
    /// Bytes all-reduced.
    pub bytes: usize,
    /// Buckets all-reduced.
    pub buckets: usize,
    /// Time the all-reduces took, summed over buckets.
    pub comm: Duration,
    /// Time the step waited for communication after backward (not hidden behind it).
    pub exposed: Duration,
}

impl SyncStats {
    /// Fraction of communication hidden behind backward (1 when there was none).
    pub fn overlap_ratio(&self) -> f64 {
        if self.comm.is_zero() {
            return 1.0;
        }
        1.0 - (self.exposed.as_secs_f64() / self.comm.as_secs_f64()).min(1.0)
    }
}

/// A transport that averages ranges of gradient buffers over the ranks. A workload with one
/// gradient buffer calls it with `tag` 0; one with several (a pipeline stage's model chunks)
/// tags each buffer's ranges with the buffer's index, so that buffers in flight at once are
/// finished one by one.
pub trait GradSync<B: Backend, C> {
    /// Starts averaging `grads[range]` (final from now on) and returns at once.
    fn start(
        &mut self,
        be: &B,
        comm: &mut C,
        grads: &mut B::Buf,
        tag: usize,
        range: Range<usize>,
    ) -> Result<(), WorkError>;
    /// Waits for every range started with `tag` and leaves the averages in `grads` (the buffer
    /// they were started on).
    fn finish(
        &mut self,
        be: &B,
        comm: &mut C,
        grads: &mut B::Buf,
        tag: usize,
    ) -> Result<SyncStats, WorkError>;
}

/// Groups gradients into buckets as backward makes them final, and starts each full bucket.
#[derive(Debug)]
pub struct Buckets {
    first_cap: usize,
    cap: usize,
    overlap: bool,
    /// Gradients at `open_end..` are launched; `..open_end` not yet.
    open_end: usize,
    /// Start of the final region not yet launched.
    ready_from: usize,
    launched: usize,
}

impl Buckets {
    /// Buckets over `n` gradients, caps in bytes; without `overlap` everything is launched at
    /// [`Buckets::flush`].
    pub fn new(n: usize, first_cap_bytes: usize, cap_bytes: usize, overlap: bool) -> Self {
        Self {
            first_cap: (first_cap_bytes / 4).max(1),
            cap: (cap_bytes / 4).max(1),
            overlap,
            open_end: n,
            ready_from: n,
            launched: 0,
        }
    }

    /// Gradients at `from..` are final: returns the buckets to start now, last first.
    pub fn ready(&mut self, from: usize) -> Vec<Range<usize>> {
        self.ready_from = self.ready_from.min(from);
        let mut out = Vec::new();
        if !self.overlap {
            return out;
        }
        loop {
            let cap = if self.launched == 0 {
                self.first_cap
            } else {
                self.cap
            };
            let avail = self.open_end - self.ready_from;
            if avail == 0 || avail < cap {
                break;
            }
            // Cut at most `cap`, so one huge final region still becomes several buckets.
            let start = self.open_end - cap.min(avail);
            out.push(start..self.open_end);
            self.open_end = start;
            self.launched += 1;
        }
        out
    }

    /// Backward is done: the rest, as buckets of at most `cap`.
    pub fn flush(&mut self) -> Vec<Range<usize>> {
        self.ready_from = 0;
        let mut out = Vec::new();
        while self.open_end > 0 {
            let start = self.open_end.saturating_sub(self.cap);
            out.push(start..self.open_end);
            self.open_end = start;
            self.launched += 1;
        }
        out
    }
}

/// Gradient averaging over the TCP communicator: each bucket is copied to the host (a plain
/// copy on the CPU backend) and all-reduced on the communicator's thread.
#[derive(Debug, Default)]
pub struct TcpSync {
    pending: Vec<(usize, Range<usize>, Pending<Vec<f32>>)>,
}

impl<B: Backend, C: Communicator<Buffer = [f32], Owned = Vec<f32>>> GradSync<B, C> for TcpSync {
    fn start(
        &mut self,
        be: &B,
        comm: &mut C,
        grads: &mut B::Buf,
        tag: usize,
        range: Range<usize>,
    ) -> Result<(), WorkError> {
        let data = be.download(grads, range.start, range.len())?;
        self.pending
            .push((tag, range, comm.all_reduce_async(data, ReduceOp::Avg)));
        Ok(())
    }

    fn finish(
        &mut self,
        be: &B,
        _comm: &mut C,
        grads: &mut B::Buf,
        tag: usize,
    ) -> Result<SyncStats, WorkError> {
        let waiting = Instant::now();
        let (mine, others) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|(t, _, _)| *t == tag);
        self.pending = others;
        let mine: Vec<_> = mine;
        let mut stats = SyncStats {
            bytes: mine.iter().map(|(_, r, _)| r.len() * 4).sum(),
            buckets: mine.len(),
            ..SyncStats::default()
        };
        // Wait for every bucket, even after an error, so none is left in flight.
        let mut failed = None;
        for (_, range, p) in mine {
            match p.wait_timed() {
                Ok((reduced, took)) => {
                    stats.comm += took;
                    if let Err(e) = be.upload_at(grads, range.start, &reduced) {
                        failed.get_or_insert(WorkError::from(e));
                    }
                }
                Err(e) => {
                    failed.get_or_insert(WorkError::from(e));
                }
            }
        }
        stats.exposed = waiting.elapsed();
        match failed {
            Some(e) => Err(e),
            None => Ok(stats),
        }
    }
}

/// Gradient averaging through NCCL, in place on the device: a bucket's all-reduce is queued on
/// the communication stream after an event of the compute stream, so it overlaps the rest of
/// backward; `finish` makes the compute stream wait for the communication stream.
#[cfg(feature = "cuda")]
pub struct NcclSync {
    comm: crate::comm::nccl::NcclComm,
    stream: std::sync::Arc<cudarc::driver::CudaStream>,
    /// Per bucket: its tag, bytes, and the events around its all-reduce.
    buckets: Vec<(
        usize,
        usize,
        cudarc::driver::CudaEvent,
        cudarc::driver::CudaEvent,
    )>,
}

#[cfg(feature = "cuda")]
impl NcclSync {
    /// Wraps a communicator made on its own stream of the backend's device.
    pub fn new(comm: crate::comm::nccl::NcclComm) -> Self {
        Self {
            stream: comm.stream(),
            comm,
            buckets: Vec::new(),
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_err(e: impl std::fmt::Debug) -> WorkError {
    WorkError::new(
        lockstep_api::contract::ExitCode::Communication,
        format!("NCCL gradient sync: {e:?}"),
    )
}

#[cfg(feature = "cuda")]
impl<C: crate::comm::Communicator> GradSync<lockstep_engine::cuda::Cuda, C> for NcclSync {
    fn start(
        &mut self,
        be: &lockstep_engine::cuda::Cuda,
        _comm: &mut C,
        grads: &mut lockstep_engine::cuda::CudaBuf,
        tag: usize,
        range: Range<usize>,
    ) -> Result<(), WorkError> {
        use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
        let produced = be.stream().record_event(None).map_err(cuda_err)?;
        self.stream.wait(&produced).map_err(cuda_err)?;
        let begin = self
            .stream
            .record_event(Some(CU_EVENT_DEFAULT))
            .map_err(cuda_err)?;
        let bytes = range.len() * 4;
        let grads = grads.as_f32_mut().ok_or_else(|| {
            WorkError::new(
                lockstep_api::contract::ExitCode::Internal,
                "NCCL gradient sync: the gradients are not an FP32 buffer".to_string(),
            )
        })?;
        let mut view = grads.slice_mut(range);
        self.comm
            .all_reduce_view(&mut view, ReduceOp::Avg)
            .map_err(WorkError::from)?;
        let end = self
            .stream
            .record_event(Some(CU_EVENT_DEFAULT))
            .map_err(cuda_err)?;
        self.buckets.push((tag, bytes, begin, end));
        Ok(())
    }

    fn finish(
        &mut self,
        be: &lockstep_engine::cuda::Cuda,
        comm: &mut C,
        _grads: &mut lockstep_engine::cuda::CudaBuf,
        tag: usize,
    ) -> Result<SyncStats, WorkError> {
        use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
        // The NCCL all-reduces run on their stream: a hang shows here, as this wait.
        let activity = comm.activity();
        let _op = activity
            .as_deref()
            .map(|a| a.enter("NCCL gradient all_reduce", None));
        let backward_done = be
            .stream()
            .record_event(Some(CU_EVENT_DEFAULT))
            .map_err(cuda_err)?;
        let comm_done = self
            .stream
            .record_event(Some(CU_EVENT_DEFAULT))
            .map_err(cuda_err)?;
        be.stream().wait(&comm_done).map_err(cuda_err)?;
        comm_done.synchronize().map_err(cuda_err)?;
        backward_done.synchronize().map_err(cuda_err)?;
        // The compute stream now waits for every bucket queued so far, this tag's among them.
        let (mine, others) = std::mem::take(&mut self.buckets)
            .into_iter()
            .partition(|(t, ..)| *t == tag);
        self.buckets = others;
        let mine: Vec<_> = mine;
        let mut stats = SyncStats {
            bytes: mine.iter().map(|(_, bytes, ..)| bytes).sum(),
            buckets: mine.len(),
            ..SyncStats::default()
        };
        for (_, _, b, e) in mine {
            let ms = b.elapsed_ms(&e).map_err(cuda_err)?;
            stats.comm += Duration::from_secs_f64(f64::from(ms.max(0.0)) / 1e3);
        }
        let exposed = backward_done.elapsed_ms(&comm_done).map_err(cuda_err)?;
        stats.exposed = Duration::from_secs_f64(f64::from(exposed.max(0.0)) / 1e3);
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_reverse_ranges_with_a_smaller_first_one() {
        let none: Vec<Range<usize>> = Vec::new();
        // 1000 gradients (4000 bytes); first cap 400 bytes (100), then 1200 bytes (300).
        let mut b = Buckets::new(1000, 400, 1200, true);
        assert_eq!(b.ready(950), none, "50 ready: below the first cap");
        assert_eq!(b.ready(880), vec![900..1000]);
        assert_eq!(b.ready(700), none, "200 open: below the cap");
        assert_eq!(b.ready(0), vec![600..900, 300..600, 0..300]);
        assert_eq!(b.flush(), none);

        let mut b = Buckets::new(1000, 400, 1200, true);
        assert_eq!(b.ready(500), vec![900..1000, 600..900]);
        assert_eq!(b.flush(), vec![300..600, 0..300]);

        let mut off = Buckets::new(1000, 400, 1200, false);
        assert_eq!(
            off.ready(0),
            none,
            "without overlap nothing starts during backward"
        );
        assert_eq!(off.flush(), vec![700..1000, 400..700, 100..400, 0..100]);
    }

    #[test]
    fn overlap_ratio_is_the_hidden_share() {
        let s = SyncStats {
            comm: Duration::from_millis(100),
            exposed: Duration::from_millis(25),
            ..SyncStats::default()
        };
        assert!((s.overlap_ratio() - 0.75).abs() < 1e-9);
        assert_eq!(SyncStats::default().overlap_ratio(), 1.0);
    }
}
