//! The CUDA backend: cuBLAS for the GEMMs (TF32 tensor cores when asked), and the kernels of
//! `kernels.cu`, compiled by NVRTC for the device's own architecture once per process. Work is
//! queued on one stream; only downloads wait for it. Everything is loaded at run time, so a
//! binary built here runs on machines with or without CUDA.
//!
//! cudarc's per-buffer event tracking is turned off: the engine orders its own work on its
//! streams, and addresses buffers by raw device pointers (checked against their lengths)
//! exactly as llm.c does.
#![allow(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;

use cudarc::cublas::{CudaBlas, sys as blas};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};

use crate::backend::{
    Backend, BinaryOp, DType, Gemm, Kernel, MAX_RANK, Mask, Op, Permutation, Precision, UnaryOp,
};
use crate::{EngineError, Result};

const SOURCE: &str = include_str!("kernels.cu");
/// The kernels of `kernels.cu` the backend loads, one or more per [`Kernel`].
pub const KERNELS: [&str; 23] = [
    "convert",
    "attention_fwd",
    "attention_delta",
    "attention_bwd_dq",
    "attention_bwd_dkv",
    "unary",
    "unary_bwd",
    "binary",
    "gather_rows",
    "scatter_add_rows",
    "add_row",
    "sum_rows",
    "permute",
    "layernorm_fwd",
    "layernorm_bwd_input",
    "layernorm_bwd_params",
    "bias_gelu",
    "residual_layernorm",
    "softmax_fwd",
    "softmax_bwd",
    "crossentropy",
    "sum_squares",
    "adamw",
];
const SUM_BLOCKS: usize = 512;
const THREADS: u32 = 256;
/// Rows each block folds in the column-sum kernels.
const CHUNK: usize = 64;

/// Whether the CUDA driver, cuBLAS and NVRTC libraries can be loaded (never panics).
pub fn available() -> bool {
    // SAFETY: the probes only try to open the shared libraries.
    unsafe {
        cudarc::driver::sys::is_culib_present()
            && cudarc::cublas::sys::is_culib_present()
            && cudarc::nvrtc::sys::is_culib_present()
    }
}

/// A shared library the CUDA backend opens at run time, as this process found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Library {
    /// cudarc's name for it: `cuda` (the driver's libcuda), `cublas` or `nvrtc`.
    pub name: &'static str,
    /// Whether it loads here.
    pub loaded: bool,
    /// The file the process mapped for it, when it loaded (see [`mapped_file`]).
    pub file: Option<PathBuf>,
    /// The version the library reports about itself: the CUDA version the driver supports,
    /// cuBLAS's major.minor.patch, NVRTC's CUDA version.
    pub version: Option<String>,
}

/// The libraries the backend opens at run time (the CUDA driver, cuBLAS, NVRTC), each opened as
/// the backend opens it (cudarc's candidate names, on the library path) and left open, with the
/// file it came from and the version it reports. Opening a library initialises no device, so
/// this needs no GPU; never panics.
pub fn libraries() -> Vec<Library> {
    let version = |major: std::ffi::c_int, minor: std::ffi::c_int| format!("{major}.{minor}");
    // SAFETY: `is_culib_present` only tries to open the library; `culib` opens it again (it is
    // present, so it does not panic) and keeps it open for the process; the version queries
    // write plain integers through pointers to locals and need no initialised device.
    unsafe {
        let driver = cudarc::driver::sys::is_culib_present().then(|| {
            cudarc::driver::sys::culib();
            let mut v = 0;
            (cudarc::driver::sys::cuDriverGetVersion(&mut v)
                == cudarc::driver::sys::CUresult::CUDA_SUCCESS)
                .then(|| version(v / 1000, (v % 1000) / 10))
        });
        let cublas = cudarc::cublas::sys::is_culib_present().then(|| {
            cudarc::cublas::sys::culib();
            let part = |t| {
                let mut v = 0;
                (cudarc::cublas::sys::cublasGetProperty(t, &mut v)
                    == cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
                    .then_some(v)
            };
            use cudarc::cublas::sys::libraryPropertyType::*;
            match (part(MAJOR_VERSION), part(MINOR_VERSION), part(PATCH_LEVEL)) {
                (Some(a), Some(b), Some(c)) => Some(format!("{a}.{b}.{c}")),
                _ => None,
            }
        });
        let nvrtc = cudarc::nvrtc::sys::is_culib_present().then(|| {
            cudarc::nvrtc::sys::culib();
            let (mut major, mut minor) = (0, 0);
            (cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor)
                == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS)
                .then(|| version(major, minor))
        });
        [("cuda", driver), ("cublas", cublas), ("nvrtc", nvrtc)]
            .into_iter()
            .map(|(name, found)| Library {
                name,
                loaded: found.is_some(),
                file: found.as_ref().and_then(|_| mapped_file(name)),
                version: found.flatten(),
            })
            .collect()
    }
}

/// The file this process has mapped for the shared library `lib<name>.so*` (`cublas` finds
/// `libcublas.so.13`, not `libcublasLt.so.13`), read from `/proc/self/maps`: where the dynamic
/// loader found a library that was opened by name. `None` when none is mapped.
pub fn mapped_file(name: &str) -> Option<PathBuf> {
    let prefix = format!("lib{name}.so");
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.find('/').map(|i| PathBuf::from(&l[i..])))
        .find(|p| {
            p.file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.starts_with(&prefix))
        })
}

/// Compiles the kernels for `arch` (`sm_90` for an H100) with NVRTC; needs only libnvrtc, no
/// GPU.
pub fn compile(arch: &'static str) -> Result<cudarc::nvrtc::Ptx> {
    // SAFETY: only opens the shared library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(EngineError::Device {
            what: "compiling the kernels",
            detail: "libnvrtc is not on the library path".into(),
        });
    }
    cudarc::nvrtc::compile_ptx_with_opts(
        SOURCE,
        cudarc::nvrtc::CompileOptions {
            arch: Some(arch),
            name: Some("lockstep_kernels.cu".into()),
            ..Default::default()
        },
    )
    .map_err(dev("compiling the kernels with NVRTC"))
}

fn dev<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> EngineError {
    move |e| EngineError::Device {
        what,
        detail: e.to_string(),
    }
}

/// One kernel argument.
enum Arg {
    Ptr(u64),
    Int(i32),
    Long(i64),
    Float(f32),
}

/// A buffer of the CUDA backend: FP32 values, or bf16 values as their 16-bit patterns (the
/// activations of a backend in [`Precision::Bf16`], from [`Backend::activations`]).
#[derive(Debug)]
pub enum CudaBuf {
    /// FP32 values.
    F32(CudaSlice<f32>),
    /// bf16 values, each the upper half of an FP32's bits ([`crate::bf16`]).
    Bf16(CudaSlice<u16>),
}

impl CudaBuf {
    /// Values the buffer holds.
    pub fn len(&self) -> usize {
        match self {
            CudaBuf::F32(b) => b.len(),
            CudaBuf::Bf16(b) => b.len(),
        }
    }

    /// Whether it holds no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How it stores its values.
    pub fn dtype(&self) -> DType {
        match self {
            CudaBuf::F32(_) => DType::F32,
            CudaBuf::Bf16(_) => DType::Bf16,
        }
    }

    /// The FP32 values, or `None` for a bf16 buffer.
    pub fn as_f32_mut(&mut self) -> Option<&mut CudaSlice<f32>> {
        match self {
            CudaBuf::F32(b) => Some(b),
            CudaBuf::Bf16(_) => None,
        }
    }

    /// The device address of the buffer's first value, for `stream` (a communicator's raw
    /// calls: the backend tracks no events on its buffers).
    pub fn device_ptr(&self, stream: &CudaStream) -> u64 {
        match self {
            CudaBuf::F32(b) => b.device_ptr(stream).0,
            CudaBuf::Bf16(b) => b.device_ptr(stream).0,
        }
    }
}

/// The kernels' `dt` argument: bit `k` set when the `k`-th activation operand is bf16 (see
/// kernels.cu).
fn dt(operands: &[&CudaBuf]) -> Arg {
    Arg::Int(
        operands
            .iter()
            .enumerate()
            .map(|(k, b)| i32::from(b.dtype() == DType::Bf16) << k)
            .sum(),
    )
}

/// The CUDA backend on one device.
pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: std::collections::HashMap<&'static str, CudaFunction>,
    partial: CudaSlice<f32>,
    precision: Precision,
    /// Scratch for the bf16 copies of a bf16 GEMM's FP32 A and B (weights; activations are
    /// bf16 already), grown on demand. The GEMMs are queued on one stream, so one pair serves
    /// them all.
    bf16_scratch: Box<std::sync::Mutex<[Option<CudaSlice<u16>>; 2]>>,
    device: String,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cuda")
            .field("device", &self.device)
            .field("precision", &self.precision)
            .finish()
    }
}

impl Cuda {
    /// The backend on device `ordinal` in `precision` (TF32 lets cuBLAS use TF32 tensor cores
    /// for FP32 GEMMs; bf16 stores activations in bf16 and multiplies bf16 operands, converting
    /// FP32 ones first). Compiles the kernels (NVRTC, for the device's architecture).
    pub fn new(ordinal: usize, precision: Precision) -> Result<Self> {
        if !available() {
            return Err(EngineError::Device {
                what: "loading CUDA",
                detail: "libcuda, libcublas or libnvrtc is not on the library path".into(),
            });
        }
        let ctx = CudaContext::new(ordinal).map_err(dev("opening the CUDA device"))?;
        // SAFETY: set before any buffer exists; the engine orders its work on its own stream.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx
            .compute_capability()
            .map_err(dev("reading the compute capability"))?;
        let name = ctx.name().map_err(dev("reading the device name"))?;
        let arch: &'static str = Box::leak(format!("sm_{major}{minor}").into_boxed_str());
        let ptx = compile(arch)?;
        let module = ctx.load_module(ptx).map_err(dev("loading the kernels"))?;
        let mut kernels = std::collections::HashMap::new();
        for k in KERNELS {
            kernels.insert(k, module.load_function(k).map_err(dev("finding a kernel"))?);
        }
        // A stream of its own (not the legacy default stream, which would serialise with a
        // communication stream).
        let stream = ctx.new_stream().map_err(dev("creating a stream"))?;
        let blas = CudaBlas::new(stream.clone()).map_err(dev("creating the cuBLAS handle"))?;
        let mode = if precision == Precision::Tf32 {
            blas::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
        } else {
            blas::cublasMath_t::CUBLAS_DEFAULT_MATH
        };
        // SAFETY: the handle is live for the backend's life.
        unsafe { blas::cublasSetMathMode(*blas.handle(), mode) }
            .result()
            .map_err(dev("setting the cuBLAS math mode"))?;
        let partial = stream
            .alloc_zeros::<f32>(SUM_BLOCKS)
            .map_err(dev("allocating"))?;
        Ok(Self {
            ctx,
            stream,
            blas,
            kernels,
            partial,
            precision,
            bf16_scratch: Box::new(std::sync::Mutex::new([None, None])),
            device: format!("{name} (sm_{major}{minor})"),
        })
    }

    /// The context, for a communicator on the same device.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream all work is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The address of element `off` of `buf`, after checking that `need` values fit.
    fn ptr(&self, buf: &CudaBuf, off: usize, need: usize) -> u64 {
        match buf {
            CudaBuf::F32(b) => self.slice_ptr(b, off, need),
            CudaBuf::Bf16(b) => self.slice_ptr(b, off, need),
        }
    }

    /// As [`Cuda::ptr`], for an operand the kernels keep in FP32 (parameters, their gradients,
    /// statistics): refuses a bf16 buffer, naming the operand.
    fn ptr32(&self, buf: &CudaBuf, off: usize, need: usize, what: &str) -> Result<u64> {
        match buf {
            CudaBuf::F32(b) => Ok(self.slice_ptr(b, off, need)),
            CudaBuf::Bf16(_) => Err(EngineError::Config(format!(
                "{what} must be an FP32 buffer, not bf16 (activations are bf16; parameters, \
                 gradients and statistics FP32)"
            ))),
        }
    }

    /// The address of element `off` of `buf`, after checking that `need` elements fit.
    fn slice_ptr<T>(&self, buf: &CudaSlice<T>, off: usize, need: usize) -> u64 {
        assert!(
            off + need <= buf.len(),
            "device access of {need} elements at {off} in a buffer of {}",
            buf.len()
        );
        let (p, _) = buf.device_ptr(&self.stream);
        p + (off * std::mem::size_of::<T>()) as u64
    }

    fn run(&self, name: &str, grid: (u32, u32), block: u32, args: &[Arg]) -> Result<()> {
        let f = &self.kernels[name];
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::Ptr(p) => b.arg(p),
                Arg::Int(i) => b.arg(i),
                Arg::Long(l) => b.arg(l),
                Arg::Float(x) => b.arg(x),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: (grid.0.max(1), grid.1.max(1), 1),
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: every pointer argument was checked against its buffer by `ptr`, and the
        // argument list matches the kernel's signature in kernels.cu.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(|e| EngineError::Device {
                what: "launching a kernel",
                detail: format!("{name}: {e}"),
            })
    }

    fn elementwise(&self, name: &str, n: usize, args: &[Arg]) -> Result<()> {
        fits_32_bits(name, n)?;
        let grid = n.div_ceil(THREADS as usize) as u32;
        self.run(name, (grid, 1), THREADS, args)
    }

    fn per_row(&self, name: &str, rows: usize, args: &[Arg]) -> Result<()> {
        let per_block = THREADS as usize / 32;
        self.run(name, (rows.div_ceil(per_block) as u32, 1), THREADS, args)
    }
}

/// Refuses `n` elements that the kernels' 32-bit index arithmetic cannot address.
fn fits_32_bits(name: &str, n: usize) -> Result<()> {
    if n >= i32::MAX as usize {
        return Err(EngineError::Config(format!(
            "{name}: {n} elements exceed the kernels' 32-bit indexing; use a smaller batch"
        )));
    }
    Ok(())
}

fn i(x: usize) -> Arg {
    Arg::Int(i32::try_from(x).expect("dimension fits in i32"))
}

fn l(x: usize) -> Arg {
    Arg::Long(x as i64)
}

impl Backend for Cuda {
    type Buf = CudaBuf;
    type Ids = CudaSlice<i32>;

    fn name(&self) -> String {
        format!(
            "cuda {}{}",
            self.device,
            match self.precision {
                Precision::Fp32 => ", FP32 GEMMs",
                Precision::Tf32 => ", TF32 GEMMs",
                Precision::Bf16 => ", bf16 activations and GEMMs (FP32 sums)",
            }
        )
    }

    fn zeros(&self, n: usize) -> Result<CudaBuf> {
        self.stream
            .alloc_zeros(n.max(1))
            .map(CudaBuf::F32)
            .map_err(dev("allocating device memory"))
    }

    fn dtype_of(&self, buf: &CudaBuf) -> DType {
        buf.dtype()
    }

    fn activation_dtype(&self) -> DType {
        if self.precision == Precision::Bf16 {
            DType::Bf16
        } else {
            DType::F32
        }
    }

    fn activations(&self, n: usize) -> Result<CudaBuf> {
        if self.activation_dtype() == DType::F32 {
            return self.zeros(n);
        }
        self.stream
            .alloc_zeros(n.max(1))
            .map(CudaBuf::Bf16)
            .map_err(dev("allocating device memory"))
    }

    fn upload_at(&self, dst: &mut CudaBuf, off: usize, src: &[f32]) -> Result<()> {
        let end = off + src.len();
        match dst {
            CudaBuf::F32(d) => self
                .stream
                .memcpy_htod(src, &mut d.slice_mut(off..end))
                .map_err(dev("copying to the device")),
            CudaBuf::Bf16(d) => {
                // A copy from pageable host memory has staged its source when it returns, so
                // the converted values may go out of scope at once (as `src` may for FP32).
                let bits: Vec<u16> = src.iter().map(|x| crate::bf16::to_bits(*x)).collect();
                self.stream
                    .memcpy_htod(&bits, &mut d.slice_mut(off..end))
                    .map_err(dev("copying to the device"))
            }
        }
    }

    fn download(&self, src: &CudaBuf, off: usize, len: usize) -> Result<Vec<f32>> {
        match src {
            CudaBuf::F32(s) => {
                let mut out = vec![0.0f32; len];
                self.stream
                    .memcpy_dtoh(&s.slice(off..off + len), &mut out)
                    .map_err(dev("copying from the device"))?;
                self.sync()?;
                Ok(out)
            }
            CudaBuf::Bf16(s) => {
                let mut bits = vec![0u16; len];
                self.stream
                    .memcpy_dtoh(&s.slice(off..off + len), &mut bits)
                    .map_err(dev("copying from the device"))?;
                self.sync()?;
                Ok(bits.into_iter().map(crate::bf16::from_bits).collect())
            }
        }
    }

    fn ids(&self, n: usize) -> Result<CudaSlice<i32>> {
        self.stream
            .alloc_zeros(n.max(1))
            .map_err(dev("allocating device memory"))
    }

    fn upload_ids(&self, dst: &mut CudaSlice<i32>, src: &[i32]) -> Result<()> {
        self.stream
            .memcpy_htod(src, &mut dst.slice_mut(0..src.len()))
            .map_err(dev("copying to the device"))
    }

    fn fill_zero(&self, buf: &mut CudaBuf, off: usize, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let p = self.ptr(buf, off, len);
        let bytes = len * buf.dtype().size();
        // SAFETY: the range was checked against the buffer.
        unsafe { cudarc::driver::result::memset_d8_async(p, 0, bytes, self.stream.cu_stream()) }
            .map_err(dev("zeroing device memory"))
    }

    fn copy(
        &self,
        dst: &mut CudaBuf,
        dst_off: usize,
        src: &CudaBuf,
        src_off: usize,
        len: usize,
    ) -> Result<()> {
        crate::backend::check_copy(dst.len(), dst_off, src.len(), src_off, len)?;
        if len == 0 {
            return Ok(());
        }
        let (d, e) = (dst_off..dst_off + len, src_off..src_off + len);
        match (dst, src) {
            (CudaBuf::F32(dst), CudaBuf::F32(src)) => self
                .stream
                .memcpy_dtod(&src.slice(e), &mut dst.slice_mut(d))
                .map_err(dev("copying on the device")),
            (CudaBuf::Bf16(dst), CudaBuf::Bf16(src)) => self
                .stream
                .memcpy_dtod(&src.slice(e), &mut dst.slice_mut(d))
                .map_err(dev("copying on the device")),
            (dst, src) => {
                // Between the two kinds: converted (rounded into bf16).
                let mask = dt(&[dst, src]);
                let args = [
                    Arg::Ptr(self.ptr(dst, dst_off, len)),
                    Arg::Ptr(self.ptr(src, src_off, len)),
                    l(len),
                    mask,
                ];
                self.convert(len, &args)
            }
        }
    }

    fn sync(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(dev("waiting for the device"))
    }

    fn launch(&self, kernel: Kernel<'_, CudaBuf, CudaSlice<i32>>) -> Result<()> {
        match kernel {
            Kernel::Gemm { g, a, b, c } => self.gemm_blas(&g, (a.0, a.1), (b.0, b.1), (c.0, c.1)),
            Kernel::Unary { op, out, inp, n } => {
                let args = [
                    Arg::Ptr(self.ptr(out, 0, n)),
                    Arg::Ptr(self.ptr(inp, 0, n)),
                    l(n),
                    Arg::Int(unary_code(op)),
                    dt(&[out, inp]),
                ];
                self.elementwise("unary", n, &args)
            }
            Kernel::UnaryBwd {
                op,
                dinp,
                inp,
                dout,
                n,
            } => {
                let args = [
                    Arg::Ptr(self.ptr(dinp, 0, n)),
                    Arg::Ptr(self.ptr(inp, 0, n)),
                    Arg::Ptr(self.ptr(dout, 0, n)),
                    l(n),
                    Arg::Int(unary_code(op)),
                    dt(&[dinp, inp, dout]),
                ];
                self.elementwise("unary_bwd", n, &args)
            }
            Kernel::Binary { op, out, a, b, n } => {
                let args = [
                    Arg::Ptr(self.ptr(out, 0, n)),
                    Arg::Ptr(self.ptr(a, 0, n)),
                    Arg::Ptr(self.ptr(b, 0, n)),
                    l(n),
                    Arg::Int(binary_code(op)),
                    dt(&[out, a, b]),
                ];
                self.elementwise("binary", n, &args)
            }
            Kernel::GatherRows {
                out,
                table,
                table_rows,
                ids,
                n,
                width,
            } => {
                let args = [
                    Arg::Ptr(self.ptr(out, 0, n * width)),
                    Arg::Ptr(self.ptr(table.0, table.1, table_rows * width)),
                    Arg::Ptr(self.slice_ptr(ids, 0, n)),
                    i(n),
                    i(width),
                    dt(&[out, table.0]),
                ];
                self.elementwise("gather_rows", n * width, &args)
            }
            Kernel::ScatterAddRows {
                table,
                table_rows,
                ids,
                src,
                n,
                width,
            } => {
                let args = [
                    Arg::Ptr(self.ptr32(
                        table.0,
                        table.1,
                        table_rows * width,
                        "scatter-add rows: the table",
                    )?),
                    Arg::Ptr(self.ptr(src, 0, n * width)),
                    Arg::Ptr(self.slice_ptr(ids, 0, n)),
                    i(n),
                    i(width),
                    dt(&[src]),
                ];
                self.elementwise("scatter_add_rows", n * width, &args)
            }
            Kernel::AddRow { out, row, n, width } => {
                let args = [
                    Arg::Ptr(self.ptr(out, 0, n * width)),
                    Arg::Ptr(self.ptr(row.0, row.1, width)),
                    i(n),
                    i(width),
                    dt(&[out, row.0]),
                ];
                self.elementwise("add_row", n * width, &args)
            }
            Kernel::SumRows { dst, src, n, width } => {
                let args = [
                    Arg::Ptr(self.ptr32(dst.0, dst.1, width, "sum rows: the destination")?),
                    Arg::Ptr(self.ptr(src, 0, n * width)),
                    i(n),
                    i(width),
                    i(CHUNK),
                    dt(&[src]),
                ];
                let grid = (
                    width.div_ceil(THREADS as usize) as u32,
                    n.div_ceil(CHUNK) as u32,
                );
                self.run("sum_rows", grid, THREADS, &args)
            }
            Kernel::SumSquares { src, len, out } => {
                let args = [
                    Arg::Ptr(self.slice_ptr(&self.partial, 0, SUM_BLOCKS)),
                    Arg::Ptr(self.ptr32(src.0, src.1, len, "sum of squares: the values")?),
                    l(len),
                ];
                self.run("sum_squares", (SUM_BLOCKS as u32, 1), THREADS, &args)?;
                let mut parts = vec![0.0f32; SUM_BLOCKS];
                self.stream
                    .memcpy_dtoh(&self.partial, &mut parts)
                    .map_err(dev("copying from the device"))?;
                self.sync()?;
                *out = parts.iter().map(|p| f64::from(*p)).sum();
                Ok(())
            }
            Kernel::Permute {
                out,
                inp,
                shape,
                perm,
            } => {
                let p = Permutation::new(shape, perm)?;
                // Before the arguments: every dimension and stride is at most the length.
                fits_32_bits("permute", p.len)?;
                let mut args = vec![
                    Arg::Ptr(self.ptr(out, 0, p.len)),
                    Arg::Ptr(self.ptr(inp, 0, p.len)),
                    i(p.len),
                    i(MAX_RANK - p.rank),
                ];
                args.extend(p.dims.iter().map(|&d| i(d)));
                args.extend(p.strides.iter().map(|&s| i(s)));
                args.push(dt(&[out, inp]));
                self.elementwise("permute", p.len, &args)
            }
            Kernel::AttentionFwd {
                out,
                lse,
                qkv,
                heads,
                t,
                hs,
                scale,
            } => {
                crate::backend::check_head_size(hs)?;
                let (rows, n) = (heads * t, heads * t * hs);
                fits_32_bits("fused attention", 3 * n)?;
                let args = [
                    Arg::Ptr(self.ptr(out, 0, n)),
                    Arg::Ptr(self.ptr32(lse, 0, rows, "fused attention: the log-sum-exps")?),
                    Arg::Ptr(self.ptr(qkv, 0, 3 * n)),
                    i(heads),
                    i(t),
                    i(hs),
                    Arg::Float(scale),
                    dt(&[out, qkv]),
                ];
                self.per_row("attention_fwd", rows, &args)
            }
            Kernel::AttentionBwd {
                dqkv,
                delta,
                dout,
                out,
                lse,
                qkv,
                heads,
                t,
                hs,
                scale,
            } => {
                crate::backend::check_head_size(hs)?;
                let (rows, n) = (heads * t, heads * t * hs);
                fits_32_bits("fused attention", 3 * n)?;
                let (pdout, plse, pqkv) = (
                    self.ptr(dout, 0, n),
                    self.ptr32(lse, 0, rows, "fused attention: the log-sum-exps")?,
                    self.ptr(qkv, 0, 3 * n),
                );
                let pdelta = self.ptr32(delta, 0, rows, "fused attention: the deltas")?;
                let pdqkv = self.ptr(dqkv, 0, 3 * n);
                self.per_row(
                    "attention_delta",
                    rows,
                    &[
                        Arg::Ptr(pdelta),
                        Arg::Ptr(pdout),
                        Arg::Ptr(self.ptr(out, 0, n)),
                        i(rows),
                        i(hs),
                        dt(&[dout, out]),
                    ],
                )?;
                let args = [
                    Arg::Ptr(pdqkv),
                    Arg::Ptr(pdout),
                    Arg::Ptr(plse),
                    Arg::Ptr(pdelta),
                    Arg::Ptr(pqkv),
                    i(heads),
                    i(t),
                    i(hs),
                    Arg::Float(scale),
                    dt(&[dqkv, dout, qkv]),
                ];
                self.per_row("attention_bwd_dq", rows, &args)?;
                self.per_row("attention_bwd_dkv", rows, &args)
            }
            Kernel::Softmax {
                out,
                inp,
                rows,
                width,
                scale,
                mask,
            } => {
                let n = rows * width;
                let args = [
                    Arg::Ptr(self.ptr(out, 0, n)),
                    Arg::Ptr(self.ptr(inp, 0, n)),
                    Arg::Float(scale),
                    i(rows),
                    i(width),
                    Arg::Int(i32::from(mask == Mask::Causal)),
                    dt(&[out, inp]),
                ];
                self.per_row("softmax_fwd", rows, &args)
            }
            Kernel::SoftmaxBwd {
                dinp,
                dout,
                out,
                rows,
                width,
                scale,
                mask,
            } => {
                let n = rows * width;
                let args = [
                    Arg::Ptr(self.ptr(dinp, 0, n)),
                    Arg::Ptr(self.ptr(dout, 0, n)),
                    Arg::Ptr(self.ptr(out, 0, n)),
                    Arg::Float(scale),
                    i(rows),
                    i(width),
                    Arg::Int(i32::from(mask == Mask::Causal)),
                    dt(&[dinp, dout, out]),
                ];
                self.per_row("softmax_bwd", rows, &args)
            }
            Kernel::LayerNorm {
                out,
                mean,
                rstd,
                inp,
                params,
                n,
                c,
            } => {
                let args = [
                    Arg::Ptr(self.ptr(out, 0, n * c)),
                    Arg::Ptr(self.ptr32(mean, 0, n, "layer norm: the means")?),
                    Arg::Ptr(self.ptr32(rstd, 0, n, "layer norm: the deviations")?),
                    Arg::Ptr(self.ptr(inp, 0, n * c)),
                    Arg::Ptr(self.ptr32(params.0, params.1, 2 * c, "layer norm: the weights")?),
                    Arg::Ptr(self.ptr(params.0, params.1 + c, c)),
                    i(n),
                    i(c),
                    dt(&[out, inp]),
                ];
                self.per_row("layernorm_fwd", n, &args)
            }
            Kernel::LayerNormBwd {
                dinp,
                grads,
                dout,
                inp,
                params,
                mean,
                rstd,
                n,
                c,
            } => {
                let (pd, pi) = (self.ptr(dout, 0, n * c), self.ptr(inp, 0, n * c));
                let pm = self.ptr32(mean, 0, n, "layer norm: the means")?;
                let pr = self.ptr32(rstd, 0, n, "layer norm: the deviations")?;
                let args = [
                    Arg::Ptr(self.ptr(dinp, 0, n * c)),
                    Arg::Ptr(pd),
                    Arg::Ptr(pi),
                    Arg::Ptr(self.ptr32(params.0, params.1, c, "layer norm: the weights")?),
                    Arg::Ptr(pm),
                    Arg::Ptr(pr),
                    i(n),
                    i(c),
                    dt(&[dinp, dout, inp]),
                ];
                self.per_row("layernorm_bwd_input", n, &args)?;
                let args = [
                    Arg::Ptr(self.ptr32(grads.0, grads.1, 2 * c, "layer norm: the gradients")?),
                    Arg::Ptr(self.ptr(grads.0, grads.1 + c, c)),
                    Arg::Ptr(pd),
                    Arg::Ptr(pi),
                    Arg::Ptr(pm),
                    Arg::Ptr(pr),
                    i(n),
                    i(c),
                    i(CHUNK),
                    dt(&[dout, inp]),
                ];
                let grid = (
                    c.div_ceil(THREADS as usize) as u32,
                    n.div_ceil(CHUNK) as u32,
                );
                self.run("layernorm_bwd_params", grid, THREADS, &args)
            }
            Kernel::BiasGelu {
                out,
                pre,
                bias,
                n,
                width,
            } => {
                let args = [
                    Arg::Ptr(self.ptr(out, 0, n * width)),
                    Arg::Ptr(self.ptr(pre, 0, n * width)),
                    Arg::Ptr(self.ptr32(bias.0, bias.1, width, "bias + gelu: the bias")?),
                    i(n),
                    i(width),
                    dt(&[out, pre]),
                ];
                self.elementwise("bias_gelu", n * width, &args)
            }
            Kernel::ResidualLayerNorm {
                sum,
                out,
                mean,
                rstd,
                a,
                b,
                params,
                n,
                c,
            } => {
                let args = [
                    Arg::Ptr(self.ptr(sum, 0, n * c)),
                    Arg::Ptr(self.ptr(out, 0, n * c)),
                    Arg::Ptr(self.ptr32(mean, 0, n, "layer norm: the means")?),
                    Arg::Ptr(self.ptr32(rstd, 0, n, "layer norm: the deviations")?),
                    Arg::Ptr(self.ptr(a, 0, n * c)),
                    Arg::Ptr(self.ptr(b, 0, n * c)),
                    Arg::Ptr(self.ptr32(params.0, params.1, 2 * c, "layer norm: the weights")?),
                    Arg::Ptr(self.ptr(params.0, params.1 + c, c)),
                    i(n),
                    i(c),
                    dt(&[sum, out, a, b]),
                ];
                self.per_row("residual_layernorm", n, &args)
            }
            Kernel::CrossEntropy {
                losses,
                logits,
                targets,
                n,
                v,
                vp,
                grad,
            } => {
                let args = [
                    Arg::Ptr(self.ptr32(losses, 0, n, "cross-entropy: the losses")?),
                    Arg::Ptr(self.ptr(logits, 0, n * vp)),
                    Arg::Ptr(self.slice_ptr(targets, 0, n)),
                    i(n),
                    i(v),
                    i(vp),
                    Arg::Float(grad.unwrap_or(0.0)),
                    Arg::Int(i32::from(grad.is_some())),
                    dt(&[logits]),
                ];
                self.run("crossentropy", (n as u32, 1), 512, &args)
            }
            Kernel::AdamW {
                params,
                grads,
                m,
                v,
                off,
                len,
                step: s,
            } => {
                let args = [
                    Arg::Ptr(self.ptr32(params, off, len, "AdamW: the parameters")?),
                    Arg::Ptr(self.ptr32(grads, off, len, "AdamW: the gradients")?),
                    Arg::Ptr(self.ptr32(m, off, len, "AdamW: the first moments")?),
                    Arg::Ptr(self.ptr32(v, off, len, "AdamW: the second moments")?),
                    l(len),
                    Arg::Float(s.lr),
                    Arg::Float(s.beta1),
                    Arg::Float(s.beta2),
                    Arg::Float(s.eps),
                    Arg::Float(s.weight_decay),
                    Arg::Float(1.0 - s.beta1.powi(s.t)),
                    Arg::Float(1.0 - s.beta2.powi(s.t)),
                    Arg::Float(s.grad_scale),
                ];
                self.elementwise("adamw", len, &args)
            }
        }
    }
}

/// The code of `op` in kernels.cu's `unary` and `unary_bwd` (`OP_GELU` and the rest).
fn unary_code(op: UnaryOp) -> i32 {
    match op {
        UnaryOp::Gelu => 0,
        UnaryOp::Relu => 1,
        UnaryOp::Sigmoid => 2,
        UnaryOp::Tanh => 3,
        UnaryOp::Cos => 4,
    }
}

/// The code of `op` in kernels.cu's `binary` (`OP_ADD` and the rest).
fn binary_code(op: BinaryOp) -> i32 {
    match op {
        BinaryOp::Add => 0,
        BinaryOp::Sub => 1,
        BinaryOp::Mul => 2,
    }
}

impl Cuda {
    /// Runs kernels.cu's `convert` over `n` values with `args` (destination, source, count,
    /// mask).
    fn convert(&self, n: usize, args: &[Arg]) -> Result<()> {
        // 64-bit indices in the kernel: an operand may exceed 2^31 elements, as cuBLAS allows.
        let grid = u32::try_from(n.div_ceil(THREADS as usize))
            .map_err(|_| EngineError::Config(format!("a conversion of {n} values is too large")))?;
        self.run("convert", (grid, 1), THREADS, args)
    }

    /// The device address of a bf16 GEMM operand of `n` values from `off` of `buf`: the
    /// buffer's own for a bf16 buffer (an activation); for an FP32 one (a weight), a copy
    /// rounded to bf16 in `scratch`, grown to fit.
    fn bf16_operand(
        &self,
        scratch: &mut Option<CudaSlice<u16>>,
        buf: &CudaBuf,
        off: usize,
        n: usize,
    ) -> Result<u64> {
        let src = self.ptr(buf, off, n);
        if buf.dtype() == DType::Bf16 {
            return Ok(src);
        }
        if scratch.as_ref().is_none_or(|s| s.len() < n) {
            // Exactly the largest FP32 operand so far (a step's GEMMs repeat, so this settles
            // after the first step): the weights, the largest of which, GPT-2's token
            // embedding, is 77 MB in bf16.
            *scratch = Some(
                self.stream
                    .alloc_zeros::<u16>(n)
                    .map_err(dev("allocating the bf16 scratch"))?,
            );
        }
        let dst = self.slice_ptr(scratch.as_ref().expect("allocated above"), 0, n);
        // Destination bf16 (bit 0), source FP32.
        self.convert(n, &[Arg::Ptr(dst), Arg::Ptr(src), l(n), Arg::Int(1)])?;
        Ok(dst)
    }

    /// [`Kernel::Gemm`] through cuBLAS, after checking the operands' extents. In bf16, A and B
    /// are read as bf16 (converted first where they are FP32 buffers) and C is written as its
    /// buffer stores values, the products summed in FP32; otherwise all three are FP32.
    fn gemm_blas(
        &self,
        g: &Gemm,
        a: (&CudaBuf, usize),
        b: (&CudaBuf, usize),
        c: (&mut CudaBuf, usize),
    ) -> Result<()> {
        if g.m == 0 || g.n == 0 || g.batch == 0 {
            return Ok(());
        }
        let ext = |op: Op, rows: usize, cols: usize, ld: usize, stride: usize| {
            let (r, cc) = if op == Op::N {
                (rows, cols)
            } else {
                (cols, rows)
            };
            (g.batch - 1) * stride + (cc - 1) * ld + r
        };
        let ea = ext(g.ta, g.m, g.k, g.lda, g.stride_a);
        let eb = ext(g.tb, g.k, g.n, g.ldb, g.stride_b);
        let ec = ext(Op::N, g.m, g.n, g.ldc, g.stride_c);
        let op = |o: Op| match o {
            Op::N => blas::cublasOperation_t::CUBLAS_OP_N,
            Op::T => blas::cublasOperation_t::CUBLAS_OP_T,
        };
        let d = |x: usize| i32::try_from(x).expect("GEMM dimension fits in i32");
        if self.precision == Precision::Bf16 {
            let pc = self.ptr(c.0, c.1, ec);
            let mut scratch = self.bf16_scratch.lock().expect("the scratch lock");
            let [sa, sb] = &mut *scratch;
            let qa = self.bf16_operand(sa, a.0, a.1, ea)?;
            let qb = self.bf16_operand(sb, b.0, b.1, eb)?;
            let bf = blas::cudaDataType::CUDA_R_16BF;
            let ctype = match c.0.dtype() {
                DType::F32 => blas::cudaDataType::CUDA_R_32F,
                DType::Bf16 => bf,
            };
            // SAFETY: A's and B's bf16 values cover their extents (the buffer's own, checked by
            // `ptr`, or the scratch copy), C's extent was checked against its buffer and its
            // type is the buffer's, and alpha and beta are f32 as CUBLAS_COMPUTE_32F wants.
            return unsafe {
                blas::cublasGemmStridedBatchedEx(
                    *self.blas.handle(),
                    op(g.ta),
                    op(g.tb),
                    d(g.m),
                    d(g.n),
                    d(g.k),
                    (&g.alpha as *const f32).cast(),
                    qa as *const std::ffi::c_void,
                    bf,
                    d(g.lda),
                    g.stride_a as i64,
                    qb as *const std::ffi::c_void,
                    bf,
                    d(g.ldb),
                    g.stride_b as i64,
                    (&g.beta as *const f32).cast(),
                    pc as *mut std::ffi::c_void,
                    ctype,
                    d(g.ldc),
                    g.stride_c as i64,
                    d(g.batch),
                    blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .result()
            .map_err(dev("cuBLAS bf16 GEMM"));
        }
        let pa = self.ptr32(a.0, a.1, ea, "an FP32 GEMM's A")?;
        let pb = self.ptr32(b.0, b.1, eb, "an FP32 GEMM's B")?;
        let pc = self.ptr32(c.0, c.1, ec, "an FP32 GEMM's C")?;
        // SAFETY: the three operands' extents were checked against their FP32 buffers.
        unsafe {
            blas::cublasSgemmStridedBatched(
                *self.blas.handle(),
                op(g.ta),
                op(g.tb),
                d(g.m),
                d(g.n),
                d(g.k),
                &g.alpha,
                pa as *const f32,
                d(g.lda),
                g.stride_a as i64,
                pb as *const f32,
                d(g.ldb),
                g.stride_b as i64,
                &g.beta,
                pc as *mut f32,
                d(g.ldc),
                g.stride_c as i64,
                d(g.batch),
            )
        }
        .result()
        .map_err(dev("cuBLAS GEMM"))
    }
}
