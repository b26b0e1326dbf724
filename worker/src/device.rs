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
/// (the gang then communicates over TCP only).
pub fn nccl_id(config: &WorkerConfig) -> Vec<u8> {
    #[cfg(feature = "cuda")]
    if config.parallelism.gpus_per_worker > 0 && crate::comm::nccl::available() {
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
    tracing::info!(backend = %be.name(), "training on the CPU");
    Ok(Device::Cpu(be))
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
    // One GPU per pod (device 0); ranks of one machine (local mode) take them in turn.
    let device = topo.rank as usize % devices as usize;
    let tf32 = cfg.training.precision != Precision::Fp32;
    if cfg.training.precision == Precision::Bf16 {
        tracing::warn!(
            "precision Bf16 is not built yet: training in FP32 with TF32 GEMMs (the closest)"
        );
    }
    let backend = lockstep_engine::cuda::Cuda::new(device, tf32)?;
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
