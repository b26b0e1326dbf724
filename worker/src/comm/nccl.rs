//! Collectives on GPUs through NCCL (cudarc's `nccl` module, loaded at run time).
//!
//! Rank 0 makes the NCCL unique id and hands its 128 bytes to the others through the rendezvous;
//! every rank then calls [`NcclComm::new`], which blocks until all have joined. Buffers are device
//! memory ([`CudaSlice<f32>`]); every collective is queued on the communicator's stream, so the
//! asynchronous variants return at once and a later kernel on that stream sees the result.
//! cudarc's per-buffer events would order a buffer's users on other streams, but the engine's
//! CUDA backend turns them off (its buffers live on one stream): a caller that shares a buffer
//! between the compute stream and a communicator's stream joins the two with events itself (the
//! gradient sync, the pipeline's channels). NCCL needs its library as `libnccl.so`: see the
//! README for the link the NCCL wheels lack.
//!
//! The communicator is held here, on cudarc's `result` layer (each call as cudarc's own `Comm`
//! makes it), rather than through cudarc's `Comm`, which keeps
//! the raw `ncclComm_t` private: a watch thread ([`watch`]) asks NCCL for each live
//! communicator's asynchronous error (`ncclCommGetAsyncError`: a peer gone, a network error
//! that NCCL's proxy saw) once a second, and ends the process with the communication exit code,
//! naming the error, as soon as there is one. Without it, a collective whose peer is gone waits
//! on the GPU until the gang's progress timeout. The process ends rather than aborting the
//! communicator and going on (as PyTorch's watchdog does): the gang restarts from its checkpoint
//! whatever this rank does, the exit releases the communicator and the GPU, and an
//! `ncclCommAbort` from the watch thread while the training thread is inside an NCCL call on
//! the same communicator would free what that call uses.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::safe::{Id, NcclType};
use cudarc::nccl::{result, sys};

use super::{CommError, Communicator, Pending, ReduceOp, Result};

/// Whether the CUDA driver and NCCL libraries can be loaded on this machine.
#[allow(unsafe_code)]
pub fn available() -> bool {
    // SAFETY: these only try to dlopen the libraries and report whether that worked.
    unsafe { cudarc::driver::sys::is_culib_present() && cudarc::nccl::sys::is_culib_present() }
}

/// NCCL as the communicator opens it (cudarc's candidate names on the library path), left open:
/// whether it loads, the file it came from and the version it reports (`2.32.6`). Opening it
/// initialises no device, so this needs no GPU.
#[allow(unsafe_code)]
pub fn library() -> lockstep_engine::cuda::Library {
    // SAFETY: `is_culib_present` only tries to open the library; `culib` opens it again (it is
    // present, so it does not panic) and keeps it open for the process.
    let loaded = unsafe {
        let present = sys::is_culib_present();
        if present {
            sys::culib();
        }
        present
    };
    let version = loaded
        .then(|| result::get_nccl_version().ok())
        .flatten()
        // NCCL >= 2.9 encodes major * 10000 + minor * 100 + patch.
        .map(|v| format!("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100));
    lockstep_engine::cuda::Library {
        name: "nccl",
        loaded,
        file: loaded
            .then(|| lockstep_engine::cuda::mapped_file("nccl"))
            .flatten(),
        version,
    }
}

fn nccl_err(e: impl std::fmt::Debug) -> CommError {
    CommError::Nccl(format!("{e:?}"))
}

fn op(o: ReduceOp) -> sys::ncclRedOp_t {
    match o {
        ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
        ReduceOp::Avg => sys::ncclRedOp_t::ncclAvg,
        ReduceOp::Max => sys::ncclRedOp_t::ncclMax,
    }
}

/// A new NCCL unique id, as the bytes the rendezvous carries.
pub fn new_id() -> Result<Vec<u8>> {
    let id = Id::new().map_err(nccl_err)?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

fn id_from(bytes: &[u8]) -> Result<sys::ncclUniqueId> {
    let arr: [u8; 128] = bytes
        .try_into()
        .map_err(|_| CommError::Setup(format!("an NCCL id has 128 bytes, got {}", bytes.len())))?;
    Ok(sys::ncclUniqueId {
        internal: arr.map(|b| b as std::ffi::c_char),
    })
}

/// An NCCL communicator handle, aborted (as cudarc's `Comm` does) when the last reference goes.
#[derive(Debug)]
struct Handle {
    comm: sys::ncclComm_t,
    rank: usize,
}

// SAFETY: an NCCL communicator may be used from any thread. Its operations are made by the one
// `NcclComm` that owns it (`&mut self`); the watch thread only asks for its asynchronous error,
// which NCCL allows from another thread at any time, and holds a reference while it does, so
// the handle is not aborted under it.
#[allow(unsafe_code)]
unsafe impl Send for Handle {}
#[allow(unsafe_code)]
unsafe impl Sync for Handle {}

impl Drop for Handle {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: the last reference: nothing uses the communicator any more.
        if let Err(e) = unsafe { result::comm_abort(self.comm) } {
            tracing::warn!(error = ?e, "aborting an NCCL communicator failed");
        }
    }
}

impl AsyncErrors for Handle {
    #[allow(unsafe_code)]
    fn async_error(&self) -> Option<String> {
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: the handle is alive (the caller holds a reference), and NCCL allows this
        // query from any thread while operations run.
        let asked = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
        let bad = |r: sys::ncclResult_t| {
            !matches!(
                r,
                sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress
            )
        };
        if bad(asked) {
            return Some(format!(
                "rank {}: asking NCCL for its asynchronous error failed: {asked:?}",
                self.rank
            ));
        }
        bad(state).then(|| {
            format!(
                "rank {}: NCCL reports an asynchronous error on its communicator: {state:?} \
                 (a peer or the network failed; NCCL_DEBUG=WARN logs more)",
                self.rank
            )
        })
    }
}

/// What the watch asks of a communicator: its asynchronous error, if it has one.
pub trait AsyncErrors: Send + Sync {
    /// The error, in words, when the communicator has failed.
    fn async_error(&self) -> Option<String>;
}

/// The communicators the watch looks at: those still alive are kept.
static WATCHED: Mutex<Vec<Weak<dyn AsyncErrors>>> = Mutex::new(Vec::new());

/// How often the watch asks.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Looks at every communicator of `watched` once: forgets those that are gone, and returns the
/// first error one has.
pub fn first_async_error(watched: &mut Vec<Weak<dyn AsyncErrors>>) -> Option<String> {
    let mut found = None;
    watched.retain(|w| match w.upgrade() {
        Some(c) => {
            if found.is_none() {
                found = c.async_error();
            }
            true
        }
        None => false,
    });
    found
}

/// Adds a communicator to the watch, and starts the watch thread with the first: every
/// [`WATCH_EVERY`] it asks each live communicator for its asynchronous error and, at the first,
/// calls `on_error` with it (the worker ends the process with the communication exit code).
pub fn watch(comm: Weak<dyn AsyncErrors>, on_error: fn(&str)) {
    static STARTED: std::sync::Once = std::sync::Once::new();
    WATCHED.lock().unwrap_or_else(|e| e.into_inner()).push(comm);
    STARTED.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("nccl-watch".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(WATCH_EVERY);
                    let error = {
                        let mut watched = WATCHED.lock().unwrap_or_else(|e| e.into_inner());
                        first_async_error(&mut watched)
                    };
                    if let Some(error) = error {
                        on_error(&error);
                        return;
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no NCCL watch thread: a failed peer is found by the progress timeout only");
        }
    });
}

/// What the worker does when NCCL reports an asynchronous error: the rank fails with the
/// communication exit code, the error in its termination message.
fn end_the_process(error: &str) {
    let code = crate::runtime::fail(lockstep_api::contract::ExitCode::Communication, error);
    std::process::exit(code.code());
}

/// A group of ranks that communicate through NCCL, one GPU each.
#[derive(Debug)]
pub struct NcclComm {
    handle: Arc<Handle>,
    stream: Arc<CudaStream>,
    world: usize,
}

/// NCCL's type for the values of an engine buffer.
fn nccl_type(dtype: lockstep_engine::DType) -> sys::ncclDataType_t {
    match dtype {
        lockstep_engine::DType::F32 => sys::ncclDataType_t::ncclFloat32,
        lockstep_engine::DType::Bf16 => sys::ncclDataType_t::ncclBfloat16,
    }
}

impl NcclComm {
    /// Joins the NCCL communicator of `world` ranks identified by `id` (the bytes of
    /// [`new_id`]), on `stream`, and puts it under the watch of its asynchronous errors.
    #[allow(unsafe_code)]
    pub fn new(stream: Arc<CudaStream>, rank: usize, world: usize, id: &[u8]) -> Result<Self> {
        let id = id_from(id)?;
        let size = |n: usize| {
            i32::try_from(n).map_err(|_| CommError::Setup(format!("{n} ranks is too many")))
        };
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: as cudarc's `Comm::from_rank`: NCCL writes the handle on success.
        let comm = unsafe {
            result::comm_init_rank(comm.as_mut_ptr(), size(world)?, id, size(rank)?)
                .map_err(nccl_err)?;
            comm.assume_init()
        };
        let handle = Arc::new(Handle { comm, rank });
        let watched: Arc<dyn AsyncErrors> = handle.clone();
        watch(Arc::downgrade(&watched), end_the_process);
        Ok(Self {
            handle,
            stream,
            world,
        })
    }

    /// The stream every collective is queued on.
    pub fn stream(&self) -> Arc<CudaStream> {
        self.stream.clone()
    }

    /// The CUDA context of the communicator's device.
    pub fn context(&self) -> &Arc<CudaContext> {
        self.stream.context()
    }

    fn raw_stream(&self) -> sys::cudaStream_t {
        self.stream.cu_stream() as sys::cudaStream_t
    }

    /// All-reduces a view (a range of a larger buffer, such as a gradient bucket) in place on
    /// the communicator's stream.
    pub fn all_reduce_view(
        &mut self,
        view: &mut cudarc::driver::CudaViewMut<'_, f32>,
        o: ReduceOp,
    ) -> Result<()> {
        self.all_reduce_in_place(view, o)
    }

    /// Sends all of an engine buffer to `peer`, FP32 or bf16 as it stores its values (a
    /// pipeline's activations and their gradients).
    #[allow(unsafe_code)]
    pub fn send_buf(&mut self, buf: &lockstep_engine::cuda::CudaBuf, peer: usize) -> Result<()> {
        let src = buf.device_ptr(&self.stream);
        // SAFETY: `src` holds `buf.len()` values of the type given; the caller keeps `buf` until
        // the stream has sent it (the pipeline link holds sent buffers until `finish` waits),
        // and the engine orders the buffer's writes before this stream.
        unsafe { self.point_to_point(true, src, buf.len(), nccl_type(buf.dtype()), peer) }
    }

    /// Receives all of an engine buffer from `peer`, FP32 or bf16 as it stores its values.
    #[allow(unsafe_code)]
    pub fn recv_buf(
        &mut self,
        buf: &mut lockstep_engine::cuda::CudaBuf,
        peer: usize,
    ) -> Result<()> {
        let dst = buf.device_ptr(&self.stream);
        // SAFETY: `dst` holds `buf.len()` values of the type given, borrowed mutably; the
        // caller waits for the stream before using them (the pipeline link synchronises).
        unsafe { self.point_to_point(false, dst, buf.len(), nccl_type(buf.dtype()), peer) }
    }

    /// Queues a send (`send`) or a receive of `count` values of type `ty` at device address
    /// `ptr` to or from `peer`, on the communicator's stream.
    ///
    /// # Safety
    /// `ptr` must hold `count` values of `ty` until the stream has run the operation, and for
    /// a receive nothing else may use them meanwhile.
    #[allow(unsafe_code)]
    unsafe fn point_to_point(
        &self,
        send: bool,
        ptr: u64,
        count: usize,
        ty: sys::ncclDataType_t,
        peer: usize,
    ) -> Result<()> {
        let peer = i32::try_from(peer).map_err(|_| CommError::Setup(format!("rank {peer}")))?;
        let stream = self.raw_stream();
        // SAFETY: as the caller promises, `ptr` holds `count` values of `ty`.
        unsafe {
            if send {
                result::send(ptr as _, count, ty, peer, self.handle.comm, stream)
            } else {
                result::recv(ptr as _, count, ty, peer, self.handle.comm, stream)
            }
        }
        .map(drop)
        .map_err(nccl_err)
    }

    /// Waits until every queued collective has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(nccl_err)
    }

    /// All-reduces `buf` in place (as cudarc's `Comm::all_reduce_in_place`).
    #[allow(unsafe_code)]
    fn all_reduce_in_place<T: NcclType, B: DevicePtrMut<T>>(
        &mut self,
        buf: &mut B,
        o: ReduceOp,
    ) -> Result<()> {
        let count = buf.len();
        if count == 0 {
            return Ok(());
        }
        let stream = self.raw_stream();
        let (dst, _record) = buf.device_ptr_mut(&self.stream);
        // SAFETY: `dst` holds `count` elements of `T` until `_record` marks the write done.
        unsafe {
            result::all_reduce(
                dst as _,
                dst as _,
                count,
                T::as_nccl_type(),
                op(o),
                self.handle.comm,
                stream,
            )
        }
        .map(drop)
        .map_err(nccl_err)
    }

    /// Gathers every rank's `input` into `output`, in rank order (as cudarc's
    /// `Comm::all_gather`).
    #[allow(unsafe_code)]
    fn gather_all<T: NcclType, I: DevicePtr<T>, O: DevicePtrMut<T>>(
        &mut self,
        input: &I,
        output: &mut O,
    ) -> Result<()> {
        let stream = self.raw_stream();
        let count = input.len();
        let (src, _record_src) = input.device_ptr(&self.stream);
        let (dst, _record_dst) = output.device_ptr_mut(&self.stream);
        // SAFETY: `src` holds `count` elements, `dst` `world x count`, checked by the callers.
        unsafe {
            result::all_gather(
                src as _,
                dst as _,
                count,
                T::as_nccl_type(),
                self.handle.comm,
                stream,
            )
        }
        .map(drop)
        .map_err(nccl_err)
    }
}

impl Communicator for NcclComm {
    type Buffer = CudaSlice<f32>;
    type Owned = CudaSlice<f32>;

    fn rank(&self) -> usize {
        self.handle.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce(&mut self, buf: &mut CudaSlice<f32>, o: ReduceOp) -> Result<()> {
        self.all_reduce_in_place(buf, o)
    }

    #[allow(unsafe_code)]
    fn broadcast(&mut self, buf: &mut CudaSlice<f32>, root: usize) -> Result<()> {
        let count = buf.len();
        if count == 0 {
            return Ok(());
        }
        let root = i32::try_from(root).map_err(|_| CommError::Setup(format!("rank {root}")))?;
        let stream = self.raw_stream();
        let (dst, _record) = buf.device_ptr_mut(&self.stream);
        // SAFETY: as cudarc's `Comm::broadcast_in_place`: `dst` holds `count` f32.
        unsafe {
            result::broadcast(
                dst as _,
                dst as _,
                count,
                sys::ncclDataType_t::ncclFloat32,
                root,
                self.handle.comm,
                stream,
            )
        }
        .map(drop)
        .map_err(nccl_err)
    }

    #[allow(unsafe_code)]
    fn reduce_scatter(
        &mut self,
        input: &CudaSlice<f32>,
        output: &mut CudaSlice<f32>,
        o: ReduceOp,
    ) -> Result<()> {
        if input.len() != self.world_size() * output.len() {
            return Err(CommError::Invalid {
                op: "reduce_scatter",
                message: format!(
                    "input has {} elements, expected {} ranks x {} output elements",
                    input.len(),
                    self.world_size(),
                    output.len()
                ),
            });
        }
        let count = output.len();
        if count == 0 {
            return Ok(());
        }
        let stream = self.raw_stream();
        let (src, _record_src) = input.device_ptr(&self.stream);
        let (dst, _record_dst) = output.device_ptr_mut(&self.stream);
        // SAFETY: as cudarc's `Comm::reduce_scatter`: `src` holds `world x count`, `dst` `count`.
        unsafe {
            result::reduce_scatter(
                src as _,
                dst as _,
                count,
                sys::ncclDataType_t::ncclFloat32,
                op(o),
                self.handle.comm,
                stream,
            )
        }
        .map(drop)
        .map_err(nccl_err)
    }

    fn all_gather(&mut self, input: &CudaSlice<f32>, output: &mut CudaSlice<f32>) -> Result<()> {
        if output.len() != self.world_size() * input.len() {
            return Err(CommError::Invalid {
                op: "all_gather",
                message: format!(
                    "output has {} elements, expected {} ranks x {} input elements",
                    output.len(),
                    self.world_size(),
                    input.len()
                ),
            });
        }
        if input.is_empty() {
            return Ok(());
        }
        self.gather_all(input, output)
    }

    #[allow(unsafe_code)]
    fn send(&mut self, buf: &CudaSlice<f32>, peer: usize) -> Result<()> {
        let (src, _record) = buf.device_ptr(&self.stream);
        let f32 = sys::ncclDataType_t::ncclFloat32;
        // SAFETY: as cudarc's `Comm::send`: `src` holds `buf.len()` f32, and `_record` marks the
        // read on the buffer until the stream has done it.
        unsafe { self.point_to_point(true, src, buf.len(), f32, peer) }
    }

    #[allow(unsafe_code)]
    fn recv(&mut self, buf: &mut CudaSlice<f32>, peer: usize) -> Result<()> {
        let count = buf.len();
        let (dst, _record) = buf.device_ptr_mut(&self.stream);
        let f32 = sys::ncclDataType_t::ncclFloat32;
        // SAFETY: as cudarc's `Comm::recv`: `dst` holds `count` f32, borrowed mutably, and
        // `_record` marks the write on the buffer until the stream has done it.
        unsafe { self.point_to_point(false, dst, count, f32, peer) }
    }

    fn send_async(&mut self, buf: CudaSlice<f32>, peer: usize) -> Pending<CudaSlice<f32>> {
        // Queued on the stream like every NCCL operation: the host returns at once. A caller
        // that writes `buf` on another stream afterwards waits for this stream first.
        Pending::ready(self.send(&buf, peer).map(|()| buf))
    }

    fn barrier(&mut self) -> Result<()> {
        let mut token = self.stream().alloc_zeros::<f32>(1).map_err(nccl_err)?;
        self.all_reduce(&mut token, ReduceOp::Sum)?;
        self.synchronize()
    }

    fn all_reduce_async(
        &mut self,
        mut buf: CudaSlice<f32>,
        o: ReduceOp,
    ) -> Pending<CudaSlice<f32>> {
        Pending::ready(self.all_reduce(&mut buf, o).map(|()| buf))
    }

    fn split(&mut self, color: u32, key: u32) -> Result<Self> {
        // NCCL's own split needs the raw communicator, which cudarc keeps private; exchange
        // (color, key) and a fresh id per color over this communicator instead, as PyTorch's
        // new_group does through its store.
        let stream = self.stream();
        let n = self.world_size();
        let me = self.rank();
        let mine = [color, key];
        let sent = stream.clone_htod(&mine).map_err(nccl_err)?;
        let mut all = stream.alloc_zeros::<u32>(2 * n).map_err(nccl_err)?;
        self.gather_all(&sent, &mut all)?;
        let all = stream.clone_dtoh(&all).map_err(nccl_err)?;
        let mut members: Vec<(u32, usize)> = (0..n)
            .filter(|&r| all[2 * r] == color)
            .map(|r| (all[2 * r + 1], r))
            .collect();
        members.sort_unstable();
        let leader = members[0].1;
        let id = if me == leader {
            new_id()?
        } else {
            vec![0u8; 128]
        };
        let sent = stream.clone_htod(&id).map_err(nccl_err)?;
        let mut ids = stream.alloc_zeros::<u8>(128 * n).map_err(nccl_err)?;
        self.gather_all(&sent, &mut ids)?;
        let ids = stream.clone_dtoh(&ids).map_err(nccl_err)?;
        let new_rank = members
            .iter()
            .position(|&(_, r)| r == me)
            .expect("this rank passed its own color");
        let sub_stream = self.context().new_stream().map_err(nccl_err)?;
        NcclComm::new(
            sub_stream,
            new_rank,
            members.len(),
            &ids[128 * leader..128 * (leader + 1)],
        )
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A communicator that fails once asked `fails_after` times.
    struct Fake {
        asked: AtomicUsize,
        fails_after: usize,
        name: &'static str,
    }

    impl AsyncErrors for Fake {
        fn async_error(&self) -> Option<String> {
            let n = self.asked.fetch_add(1, Ordering::SeqCst) + 1;
            (n > self.fails_after).then(|| format!("{} failed", self.name))
        }
    }

    fn fake(name: &'static str, fails_after: usize) -> Arc<dyn AsyncErrors> {
        Arc::new(Fake {
            asked: AtomicUsize::new(0),
            fails_after,
            name,
        })
    }

    #[test]
    fn the_watch_finds_the_first_failed_communicator_and_forgets_those_that_are_gone() {
        let world = fake("world", 2);
        let split = fake("split", usize::MAX);
        let gone = fake("gone", 0);
        let mut watched = vec![
            Arc::downgrade(&world),
            Arc::downgrade(&gone),
            Arc::downgrade(&split),
        ];
        drop(gone);
        // Healthy twice: nothing to report, and the dropped one is forgotten (never asked,
        // though it would have failed).
        assert_eq!(first_async_error(&mut watched), None);
        assert_eq!(watched.len(), 2);
        assert_eq!(first_async_error(&mut watched), None);
        // The third look finds the world communicator's error.
        assert_eq!(
            first_async_error(&mut watched).as_deref(),
            Some("world failed")
        );
        // Once the communicators are dropped there is nothing left to watch.
        drop((world, split));
        assert_eq!(first_async_error(&mut watched), None);
        assert!(watched.is_empty());
    }

    #[test]
    fn the_watch_thread_reports_an_error_within_a_few_periods() {
        static REPORTED: Mutex<Option<String>> = Mutex::new(None);
        fn report(error: &str) {
            *REPORTED.lock().unwrap() = Some(error.to_string());
        }
        let comm = fake("peer", 1);
        watch(Arc::downgrade(&comm), report);
        let deadline = std::time::Instant::now() + 10 * WATCH_EVERY;
        while REPORTED.lock().unwrap().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(WATCH_EVERY / 10);
        }
        assert_eq!(REPORTED.lock().unwrap().as_deref(), Some("peer failed"));
    }
}
