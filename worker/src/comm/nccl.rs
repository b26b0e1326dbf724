//! Collectives on GPUs through NCCL (cudarc's `nccl` module, loaded at run time).
//!
//! Rank 0 makes the NCCL unique id and hands its 128 bytes to the others through the rendezvous;
//! every rank then calls [`NcclComm::new`], which blocks until all have joined. Buffers are device
//! memory ([`CudaSlice<f32>`]); every collective is queued on the communicator's stream, so the
//! asynchronous variants return at once and a later kernel on that stream (or on a stream that
//! waits on it, which cudarc's per-buffer events arrange) sees the result. NCCL needs its
//! library as `libnccl.so`: see the README for the link the NCCL wheels lack.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::safe::{Comm, Id, ReduceOp as NcclOp};

use super::{CommError, Communicator, Pending, ReduceOp, Result};

/// Whether the CUDA driver and NCCL libraries can be loaded on this machine.
#[allow(unsafe_code)]
pub fn available() -> bool {
    // SAFETY: these only try to dlopen the libraries and report whether that worked.
    unsafe { cudarc::driver::sys::is_culib_present() && cudarc::nccl::sys::is_culib_present() }
}

fn nccl_err(e: impl std::fmt::Debug) -> CommError {
    CommError::Nccl(format!("{e:?}"))
}

fn op(o: ReduceOp) -> NcclOp {
    match o {
        ReduceOp::Sum => NcclOp::Sum,
        ReduceOp::Avg => NcclOp::Avg,
        ReduceOp::Max => NcclOp::Max,
    }
}

/// A new NCCL unique id, as the bytes the rendezvous carries.
pub fn new_id() -> Result<Vec<u8>> {
    let id = Id::new().map_err(nccl_err)?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

fn id_from(bytes: &[u8]) -> Result<Id> {
    let arr: [u8; 128] = bytes
        .try_into()
        .map_err(|_| CommError::Setup(format!("an NCCL id has 128 bytes, got {}", bytes.len())))?;
    Ok(Id::uninit(arr.map(|b| b as std::ffi::c_char)))
}

/// A group of ranks that communicate through NCCL, one GPU each.
#[derive(Debug)]
pub struct NcclComm {
    comm: Comm,
}

impl NcclComm {
    /// Joins the NCCL communicator of `world` ranks identified by `id` (the bytes of
    /// [`new_id`]), on `stream`.
    pub fn new(stream: Arc<CudaStream>, rank: usize, world: usize, id: &[u8]) -> Result<Self> {
        let comm = Comm::from_rank(stream, rank, world, id_from(id)?).map_err(nccl_err)?;
        Ok(Self { comm })
    }

    /// The stream every collective is queued on.
    pub fn stream(&self) -> Arc<CudaStream> {
        self.comm.stream()
    }

    /// The CUDA context of the communicator's device.
    pub fn context(&self) -> &Arc<CudaContext> {
        self.comm.context()
    }

    /// All-reduces a view (a range of a larger buffer, such as a gradient bucket) in place on
    /// the communicator's stream.
    pub fn all_reduce_view(
        &mut self,
        view: &mut cudarc::driver::CudaViewMut<'_, f32>,
        o: ReduceOp,
    ) -> Result<()> {
        if view.is_empty() {
            return Ok(());
        }
        self.comm
            .all_reduce_in_place(view, &op(o))
            .map(|_| ())
            .map_err(nccl_err)
    }

    /// Waits until every queued collective has finished.
    pub fn synchronize(&self) -> Result<()> {
        self.comm.stream().synchronize().map_err(nccl_err)
    }
}

impl Communicator for NcclComm {
    type Buffer = CudaSlice<f32>;
    type Owned = CudaSlice<f32>;

    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn all_reduce(&mut self, buf: &mut CudaSlice<f32>, o: ReduceOp) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.comm
            .all_reduce_in_place(buf, &op(o))
            .map(|_| ())
            .map_err(nccl_err)
    }

    fn broadcast(&mut self, buf: &mut CudaSlice<f32>, root: usize) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.comm
            .broadcast_in_place(buf, root as i32)
            .map(|_| ())
            .map_err(nccl_err)
    }

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
        if output.is_empty() {
            return Ok(());
        }
        self.comm
            .reduce_scatter(input, output, &op(o))
            .map(|_| ())
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
        self.comm
            .all_gather(input, output)
            .map(|_| ())
            .map_err(nccl_err)
    }

    fn send(&mut self, buf: &CudaSlice<f32>, peer: usize) -> Result<()> {
        self.comm.send(buf, peer as i32).map_err(nccl_err)
    }

    fn recv(&mut self, buf: &mut CudaSlice<f32>, peer: usize) -> Result<()> {
        self.comm
            .recv(buf, peer as i32)
            .map(|_| ())
            .map_err(nccl_err)
    }

    fn send_async(&mut self, buf: CudaSlice<f32>, peer: usize) -> Pending<CudaSlice<f32>> {
        // Queued on the stream like every NCCL operation: the host returns at once, and cudarc's
        // per-buffer events keep a later writer of `buf` behind the send.
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
        self.comm.all_gather(&sent, &mut all).map_err(nccl_err)?;
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
        self.comm.all_gather(&sent, &mut ids).map_err(nccl_err)?;
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
