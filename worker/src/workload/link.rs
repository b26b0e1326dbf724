//! How a pipeline stage's activations and their gradients reach the neighbouring stages: a
//! [`StageLink`] moves tensors between backend buffers.
//!
//! - [`TcpLink`] (any backend): each tensor is copied to the host and goes over the pipeline
//!   group's TCP point-to-point channel; a send returns once the tensor is handed to the
//!   communicator's thread.
//! - `NcclLink` (CUDA, when the gang chose NCCL): device to device with NCCL's `send` and
//!   `recv`, one two-rank communicator per channel (a sending stage and a receiving stage), on
//!   a stream of its own. NCCL's sends wait for their receive and a communicator runs its
//!   operations in order, so one communicator for the whole pipeline, its sends and receives
//!   posted one by one, deadlocks 1F1B (Megatron batches each step's sends and receives in one
//!   NCCL group instead, which needs a schedule whose stages exchange in lockstep); one
//!   communicator per channel behaves as the buffered sends the plans are made for
//!   ([`crate::pipeline::channels`] models both on the host's side: every plan completes with
//!   one per channel, and 1F1B and ZB-H1 deadlock with one for all). The sender's host does
//!   not wait for a send (each channel's connection is made when the link connects); the
//!   receiver's waits for its receive (what the stage's idle time measures). Each send and
//!   receive is queued on its channel's stream behind the work already queued on the compute
//!   stream (an event), so it reads a buffer once the copy that filled it has run, and writes
//!   one once the copies that read it have run.

use lockstep_engine::Backend;

use super::HostComm;
use crate::comm::Pending;
use crate::error::WorkError;

/// Moves a pipeline stage's tensors to and from its neighbours. `C` is the pipeline group's
/// host communicator (stage `s` is its rank `s`).
pub trait StageLink<B: Backend, C> {
    /// Sets up what the link needs for the `channels` (sending stage, receiving stage) of the
    /// gang's plans, all of them, in the same order on every stage; `stage` is this stage.
    /// Every stage calls it once, before the first step.
    fn connect(
        &mut self,
        be: &B,
        comm: &mut C,
        stage: usize,
        channels: &[(u32, u32)],
    ) -> Result<(), WorkError>;
    /// Starts sending the first `len` values of `buf` to stage `to` and returns at once, with
    /// `buf` when it may be reused already (else [`StageLink::finish`] hands it back). Tensors
    /// to one stage arrive in the order sent.
    fn send(
        &mut self,
        be: &B,
        comm: &mut C,
        buf: B::Buf,
        len: usize,
        to: usize,
    ) -> Result<Option<B::Buf>, WorkError>;
    /// Receives the next tensor from stage `from` into the first `len` values of `buf`: once
    /// it returns, work queued on the backend sees them.
    fn recv(
        &mut self,
        be: &B,
        comm: &mut C,
        buf: &mut B::Buf,
        len: usize,
        from: usize,
    ) -> Result<(), WorkError>;
    /// Waits until every send has been handed over, and returns their buffers.
    fn finish(&mut self, be: &B, comm: &mut C) -> Result<Vec<B::Buf>, WorkError>;
}

/// Tensors through the host and the pipeline group's TCP point-to-point channel.
#[derive(Debug, Default)]
pub struct TcpLink {
    sends: Vec<Pending<Vec<f32>>>,
}

impl<B: Backend, C: HostComm> StageLink<B, C> for TcpLink {
    fn connect(
        &mut self,
        _be: &B,
        _comm: &mut C,
        _stage: usize,
        _channels: &[(u32, u32)],
    ) -> Result<(), WorkError> {
        Ok(())
    }

    fn send(
        &mut self,
        be: &B,
        comm: &mut C,
        buf: B::Buf,
        len: usize,
        to: usize,
    ) -> Result<Option<B::Buf>, WorkError> {
        // The download waits for the device: the buffer is free again at once.
        let host = be.download(&buf, 0, len)?;
        self.sends.push(comm.send_async(host, to));
        Ok(Some(buf))
    }

    fn recv(
        &mut self,
        be: &B,
        comm: &mut C,
        buf: &mut B::Buf,
        len: usize,
        from: usize,
    ) -> Result<(), WorkError> {
        let mut host = vec![0.0f32; len];
        comm.recv(&mut host, from)?;
        be.upload_at(buf, 0, &host)?;
        Ok(())
    }

    fn finish(&mut self, _be: &B, _comm: &mut C) -> Result<Vec<B::Buf>, WorkError> {
        // Wait for every send, even after an error, so none is left in flight.
        let mut failed = None;
        for pending in std::mem::take(&mut self.sends) {
            if let Err(e) = pending.wait() {
                failed.get_or_insert(WorkError::from(e));
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(Vec::new()),
        }
    }
}

/// Tensors device to device through NCCL, one two-rank communicator per channel (see the
/// module's doc); made by [`StageLink::connect`].
#[cfg(feature = "cuda")]
#[derive(Default)]
pub struct NcclLink {
    /// Per receiving stage, the communicator of the channel this stage sends on.
    sends: std::collections::HashMap<usize, crate::comm::nccl::NcclComm>,
    /// Per sending stage, the communicator of the channel this stage receives on.
    recvs: std::collections::HashMap<usize, crate::comm::nccl::NcclComm>,
    /// Buffers that sends in flight read.
    sent: Vec<lockstep_engine::cuda::CudaBuf>,
}

#[cfg(feature = "cuda")]
fn no_channel(what: &str, stage: usize) -> WorkError {
    WorkError::new(
        lockstep_api::contract::ExitCode::Internal,
        format!("pipeline plan: no NCCL channel to {what} stage {stage}"),
    )
}

/// NCCL moves whole buffers: the executor's are the tensors' size.
#[cfg(feature = "cuda")]
fn sized(buf: usize, len: usize) -> WorkError {
    WorkError::new(
        lockstep_api::contract::ExitCode::Internal,
        format!("pipeline tensor of {len} values in a buffer of {buf}"),
    )
}

/// The channel to or from stage `peer` in `channels`, its stream made to wait for the compute
/// stream, for a tensor of `len` values in a buffer of `buf_len`.
#[cfg(feature = "cuda")]
fn queue_on<'a>(
    be: &lockstep_engine::cuda::Cuda,
    channels: &'a mut std::collections::HashMap<usize, crate::comm::nccl::NcclComm>,
    peer: usize,
    what: &str,
    buf_len: usize,
    len: usize,
) -> Result<&'a mut crate::comm::nccl::NcclComm, WorkError> {
    let channel = channels
        .get_mut(&peer)
        .ok_or_else(|| no_channel(what, peer))?;
    if buf_len != len {
        return Err(sized(buf_len, len));
    }
    after_compute(be, channel)?;
    Ok(channel)
}

#[cfg(feature = "cuda")]
fn cuda_err(e: impl std::fmt::Debug) -> WorkError {
    WorkError::new(
        lockstep_api::contract::ExitCode::Communication,
        format!("NCCL pipeline channel: {e:?}"),
    )
}

/// Makes `channel`'s stream wait for the work queued on the backend's compute stream so far.
/// The backend's buffers carry no events of their own (it turns cudarc's tracking off), so a
/// buffer shared by the two streams is ordered here.
#[cfg(feature = "cuda")]
fn after_compute(
    be: &lockstep_engine::cuda::Cuda,
    channel: &crate::comm::nccl::NcclComm,
) -> Result<(), WorkError> {
    let queued = be.stream().record_event(None).map_err(cuda_err)?;
    channel.stream().wait(&queued).map_err(cuda_err)
}

#[cfg(feature = "cuda")]
impl<C: HostComm> StageLink<lockstep_engine::cuda::Cuda, C> for NcclLink {
    fn connect(
        &mut self,
        be: &lockstep_engine::cuda::Cuda,
        comm: &mut C,
        stage: usize,
        channels: &[(u32, u32)],
    ) -> Result<(), WorkError> {
        use crate::comm::nccl::{NcclComm, new_id};
        // In the same order on every stage: the first channel not yet made has both its
        // stages making it, so the blocking joins never wait in a cycle. The sender makes the
        // channel's id and hands it over the TCP channel.
        for &(from, to) in channels {
            let (from, to) = (from as usize, to as usize);
            if stage != from && stage != to {
                continue;
            }
            let stream = be.context().new_stream().map_err(cuda_err)?;
            if stage == from {
                let id = new_id()?;
                let words: Vec<f32> = id
                    .chunks(4)
                    .map(|b| f32::from_bits(u32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                    .collect();
                comm.send(&words, to)?;
                self.sends.insert(to, NcclComm::new(stream, 0, 2, &id)?);
            } else {
                let mut words = vec![0.0f32; 32];
                comm.recv(&mut words, from)?;
                let id: Vec<u8> = words
                    .iter()
                    .flat_map(|w| w.to_bits().to_le_bytes())
                    .collect();
                self.recvs.insert(from, NcclComm::new(stream, 1, 2, &id)?);
            }
        }
        // NCCL connects a point-to-point pair at its first send and receive, with an exchange
        // between the two hosts: done here, a channel at a time in the same order, so that no
        // send of a step waits for its receiver's host.
        let mut token = be.zeros(1)?;
        for &(from, to) in channels {
            let (from, to) = (from as usize, to as usize);
            let (channel, send) = if stage == from {
                (self.sends.get_mut(&to), true)
            } else if stage == to {
                (self.recvs.get_mut(&from), false)
            } else {
                continue;
            };
            let channel = channel.ok_or_else(|| no_channel("connect with", from + to - stage))?;
            after_compute(be, channel)?;
            if send {
                channel.send_buf(&token, 1)?;
            } else {
                channel.recv_buf(&mut token, 0)?;
            }
            channel.synchronize()?;
        }
        if !channels.is_empty() {
            tracing::info!(
                channels = self.sends.len() + self.recvs.len(),
                "pipeline tensors go device to device over NCCL, a communicator per channel"
            );
        }
        Ok(())
    }

    fn send(
        &mut self,
        be: &lockstep_engine::cuda::Cuda,
        _comm: &mut C,
        buf: lockstep_engine::cuda::CudaBuf,
        len: usize,
        to: usize,
    ) -> Result<Option<lockstep_engine::cuda::CudaBuf>, WorkError> {
        // Behind the copy that filled `buf`.
        let channel = queue_on(be, &mut self.sends, to, "send to", buf.len(), len)?;
        channel.send_buf(&buf, 1)?;
        // The send reads `buf` until `finish` has waited for it.
        self.sent.push(buf);
        Ok(None)
    }

    fn recv(
        &mut self,
        be: &lockstep_engine::cuda::Cuda,
        comm: &mut C,
        buf: &mut lockstep_engine::cuda::CudaBuf,
        len: usize,
        from: usize,
    ) -> Result<(), WorkError> {
        // Behind the buffer's allocation and the copies that read it last.
        let channel = queue_on(be, &mut self.recvs, from, "receive from", buf.len(), len)?;
        channel.recv_buf(buf, 0)?;
        // The stage waits here for its neighbour (its idle time), and a hang shows as this; the
        // work the host queues next, on the compute stream, comes after the receive.
        let activity = comm.activity();
        let _op = activity
            .as_deref()
            .map(|a| a.enter("NCCL pipeline recv", Some(from)));
        channel.synchronize()?;
        Ok(())
    }

    fn finish(
        &mut self,
        _be: &lockstep_engine::cuda::Cuda,
        comm: &mut C,
    ) -> Result<Vec<lockstep_engine::cuda::CudaBuf>, WorkError> {
        let activity = comm.activity();
        let _op = activity
            .as_deref()
            .map(|a| a.enter("NCCL pipeline sends", None));
        for channel in self.sends.values() {
            channel.synchronize()?;
        }
        Ok(std::mem::take(&mut self.sent))
    }
}
