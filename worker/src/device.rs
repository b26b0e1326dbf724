//! Where a rank computes: the CPU backend, or a GPU through the CUDA backend when the job asks
//! for GPUs and CUDA loads here; and the NCCL set-up that goes with a GPU (rank 0 makes the
//! unique id, the rendezvous carries it, every rank joins the communicator).
//!
//! A GPU job on a machine where CUDA does not load trains on the CPU with a warning, unless rank
//! 0 chose NCCL: the others are then joining its communicator, and this rank fails the gang
//! rather than leave them waiting.

use lockstep_api::config::WorkerConfig;
use lockstep_api::contract::ExitCode;
use lockstep_engine::Backend;
use lockstep_engine::cpu::Cpu;

use crate::comm::Communicator;
use crate::error::WorkError;
use crate::topology::Topology;

/// A rank's compute device, with its gradient transport when that is the device's own.
pub enum Device {
    /// The CPU reference backend.
    Cpu(Cpu),
    /// A GPU.
    #[cfg(feature = "cuda")]
    Cuda {
        /// The CUDA backend on this rank's GPU.
        backend: lockstep_engine::cuda::Cuda,
        /// NCCL over this rank's data-parallel group, when rank 0 chose NCCL.
        nccl: Option<crate::comm::nccl::NcclComm>,
    },
}

impl Device {
    /// The backend's name, for logs.
    pub fn name(&self) -> String {
        match self {
            Device::Cpu(be) => be.name(),
            #[cfg(feature = "cuda")]
            Device::Cuda { backend, .. } => backend.name(),
        }
    }
}

/// Rank 0's NCCL unique id when the job asks for GPUs and NCCL can be loaded here, else empty
/// (the gang then communicates over TCP only). Also empty in `local` mode when the machine has
/// fewer GPUs than ranks: NCCL refuses two ranks of one communicator on one GPU.
pub fn nccl_id(config: &WorkerConfig) -> Vec<u8> {
    #[cfg(feature = "cuda")]
    if config.parallelism.gpus_per_worker > 0 && crate::comm::nccl::available() {
        let here = local_ranks();
        let devices = cudarc::driver::CudaContext::device_count()
            .unwrap_or(0)
            .max(0) as usize;
        if !one_gpu_each(here, devices) {
            tracing::warn!(
                ranks = here,
                gpus = devices,
                "fewer GPUs than ranks on this machine: NCCL takes one GPU per rank, so the \
                 gang averages its gradients over TCP"
            );
            return Vec::new();
        }
        match crate::comm::nccl::new_id() {
            Ok(id) => return id,
            Err(e) => tracing::warn!(error = %e, "cannot make an NCCL id: TCP only"),
        }
    }
    let _ = config;
    Vec::new()
}

/// The device of this rank: a GPU when the job asks for one and CUDA loads, else the CPU.
/// `nccl_id` is rank 0's NCCL id from the rendezvous (empty: no NCCL).
pub fn open<C: Communicator>(
    cfg: &WorkerConfig,
    topo: &Topology<C>,
    nccl_id: &[u8],
) -> Result<Device, WorkError> {
    #[cfg(feature = "cuda")]
    if cfg.parallelism.gpus_per_worker > 0 {
        if lockstep_engine::cuda::available() {
            return open_cuda(cfg, topo, nccl_id);
        }
        tracing::warn!(
            gpus_per_worker = cfg.parallelism.gpus_per_worker,
            "the job asks for GPUs, but CUDA (libcuda, libcublas, libnvrtc) cannot be loaded \
             here: training on the CPU"
        );
    }
    let _ = (cfg, topo);
    if !nccl_id.is_empty() {
        // Rank 0 chose NCCL, so the other ranks are joining its communicator: training on the
        // CPU here would leave them waiting. Failing aborts the whole gang, naming this rank.
        return Err(WorkError::new(
            ExitCode::Communication,
            "rank 0 chose NCCL, but this rank cannot load CUDA (libcuda, libcublas, libnvrtc) \
             or was built without the cuda feature",
        ));
    }
    let be = Cpu;
    if cfg.training.precision != lockstep_api::training::Precision::Fp32 {
        tracing::info!(
            precision = ?cfg.training.precision,
            "the precision is a GPU setting: the CPU trains in FP32"
        );
    }
    tracing::info!(backend = %be.name(), "training on the CPU");
    Ok(Device::Cpu(be))
}

/// The ranks of the gang on this machine, in `local` mode (`None` in a pod).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn local_ranks() -> Option<usize> {
    std::env::var(lockstep_api::contract::env::LOCAL_RANKS)
        .ok()
        .and_then(|v| v.parse().ok())
}

/// Whether every rank of this machine gets a GPU of its own (always in a pod, which runs one
/// rank): what NCCL needs.
pub fn one_gpu_each(local_ranks: Option<usize>, devices: usize) -> bool {
    local_ranks.is_none_or(|ranks| ranks <= devices)
}

/// The GPU a rank opens among the `devices` it sees, and how many ranks of this machine use
/// that GPU (itself included). In a pod (`local_ranks` unset) the rank sees its own GPUs and
/// takes the first. In `local` mode the `local_ranks` ranks of the machine take the GPUs in
/// turn: one each while there are enough, several to a GPU when there are fewer GPUs than ranks.
pub fn gpu_for_rank(rank: usize, local_ranks: Option<usize>, devices: usize) -> (usize, usize) {
    let devices = devices.max(1);
    match local_ranks {
        None => (0, 1),
        Some(ranks) => {
            let device = rank % devices;
            // Ranks device, device + devices, ... below `ranks` share it.
            let sharing = ranks.saturating_sub(device).div_ceil(devices).max(1);
            (device, sharing)
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda<C: Communicator>(
    cfg: &WorkerConfig,
    topo: &Topology<C>,
    nccl_id: &[u8],
) -> Result<Device, WorkError> {
    use lockstep_api::training::Precision;
    let internal = |e: String| WorkError::new(ExitCode::Internal, e);
    let devices = cudarc::driver::CudaContext::device_count()
        .map_err(|e| internal(format!("cannot count CUDA devices: {e:?}")))?;
    if devices <= 0 {
        return Err(internal("CUDA loads but no device is visible".into()));
    }
    let (device, sharing) = gpu_for_rank(topo.rank as usize, local_ranks(), devices as usize);
    if sharing > 1 {
        tracing::warn!(
            rank = topo.rank,
            device,
            ranks_on_this_gpu = sharing,
            gpus = devices,
            "fewer GPUs than ranks on this machine: this rank shares GPU {device} with {} other \
             rank(s), so each gets a part of its memory and compute (local mode)",
            sharing - 1
        );
    }
    let precision = match cfg.training.precision {
        Precision::Fp32 => lockstep_engine::Precision::Fp32,
        Precision::Tf32 => lockstep_engine::Precision::Tf32,
        Precision::Bf16 => lockstep_engine::Precision::Bf16,
    };
    let backend = lockstep_engine::cuda::Cuda::new(device, precision)?;
    tracing::info!(backend = %backend.name(), device, "training on the GPU");
    if nccl_id.is_empty() {
        tracing::info!("no NCCL id from rank 0: gradients are averaged over TCP");
        return Ok(Device::Cuda {
            backend,
            nccl: None,
        });
    }
    let stream = backend
        .context()
        .new_stream()
        .map_err(|e| internal(format!("cannot create the communication stream: {e:?}")))?;
    let world = crate::comm::nccl::NcclComm::new(
        stream,
        topo.rank as usize,
        topo.layout.world_size() as usize,
        nccl_id,
    )?;
    // Gradients are averaged over the data-parallel group of this rank's stage: the whole world
    // unless the job has pipeline stages.
    let nccl = if topo.layout.pipeline_stages() > 1 {
        let mut world = world;
        world.split(topo.stage, topo.replica)?
    } else {
        world
    };
    tracing::info!("gradient buckets are averaged with NCCL on a communication stream");
    Ok(Device::Cuda {
        backend,
        nccl: Some(nccl),
    })
}

#[cfg(test)]
mod tests {
    use super::{gpu_for_rank, one_gpu_each};

    #[test]
    fn a_pod_takes_its_first_gpu_whatever_its_rank() {
        assert_eq!(gpu_for_rank(5, None, 1), (0, 1));
        assert_eq!(gpu_for_rank(5, None, 4), (0, 1));
    }

    #[test]
    fn local_ranks_take_their_own_gpu_when_there_are_enough() {
        for rank in 0..4 {
            assert_eq!(gpu_for_rank(rank, Some(4), 8), (rank, 1));
            assert_eq!(gpu_for_rank(rank, Some(4), 4), (rank, 1));
        }
    }

    #[test]
    fn nccl_is_used_only_when_every_rank_has_a_gpu_of_its_own() {
        assert!(one_gpu_each(None, 1));
        assert!(one_gpu_each(Some(2), 2));
        assert!(one_gpu_each(Some(2), 8));
        assert!(!one_gpu_each(Some(4), 1));
        assert!(!one_gpu_each(Some(3), 2));
    }

    #[test]
    fn local_ranks_share_gpus_when_there_are_fewer_than_ranks() {
        // One GPU, four ranks: all on GPU 0, four to it.
        for rank in 0..4 {
            assert_eq!(gpu_for_rank(rank, Some(4), 1), (0, 4));
        }
        // Two GPUs, three ranks: ranks 0 and 2 on GPU 0, rank 1 alone on GPU 1.
        assert_eq!(gpu_for_rank(0, Some(3), 2), (0, 2));
        assert_eq!(gpu_for_rank(1, Some(3), 2), (1, 1));
        assert_eq!(gpu_for_rank(2, Some(3), 2), (0, 2));
        // No device reported is treated as one.
        assert_eq!(gpu_for_rank(1, Some(2), 0), (0, 2));
    }
}
