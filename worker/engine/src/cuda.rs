//! The CUDA backend: cuBLAS for the GEMMs (TF32 tensor cores when asked), and the kernels of
//! `kernels.cu`, compiled by NVRTC for the device's own architecture once per process. Work is
//! queued on one stream; only downloads wait for it. Everything is loaded at run time, so a
//! binary built here runs on machines with or without CUDA.
//!
//! cudarc's per-buffer event tracking is turned off: the engine orders its own work on its
//! streams, and addresses buffers by raw device pointers (checked against their lengths)
//! exactly as llm.c does.
#![allow(unsafe_code)]

use std::sync::Arc;

use cudarc::cublas::{CudaBlas, sys as blas};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};

use crate::backend::{AdamStep, At, Backend, Gemm, Op};
use crate::{EngineError, Result};

const SOURCE: &str = include_str!("kernels.cu");
const KERNELS: [&str; 19] = [
    "relu_fwd",
    "relu_bwd",
    "encoder_fwd",
    "encoder_bwd",
    "layernorm_fwd",
    "layernorm_bwd_input",
    "layernorm_bwd_params",
    "bias_fwd",
    "bias_bwd",
    "gelu_fwd",
    "gelu_bwd",
    "add",
    "permute_qkv",
    "unpermute",
    "softmax_causal_fwd",
    "softmax_causal_bwd",
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

/// The CUDA backend on one device.
pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: std::collections::HashMap<&'static str, CudaFunction>,
    partial: CudaSlice<f32>,
    tf32: bool,
    device: String,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cuda")
            .field("device", &self.device)
            .field("tf32", &self.tf32)
            .finish()
    }
}

impl Cuda {
    /// The backend on device `ordinal`; `tf32` lets cuBLAS use TF32 tensor cores for FP32
    /// GEMMs. Compiles the kernels (NVRTC, for the device's architecture).
    pub fn new(ordinal: usize, tf32: bool) -> Result<Self> {
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
        let mode = if tf32 {
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
            tf32,
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

    /// The address of element `off` of `buf`, after checking that `need` elements fit.
    fn ptr<T>(&self, buf: &CudaSlice<T>, off: usize, need: usize) -> u64 {
        assert!(
            off + need <= buf.len(),
            "device access of {need} elements at {off} in a buffer of {}",
            buf.len()
        );
        let (p, _) = buf.device_ptr(&self.stream);
        p + (off * std::mem::size_of::<T>()) as u64
    }

    fn launch(&self, name: &str, grid: (u32, u32), block: u32, args: &[Arg]) -> Result<()> {
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
        if n >= i32::MAX as usize {
            return Err(EngineError::Config(format!(
                "{name}: {n} elements exceed the kernels' 32-bit indexing; use a smaller batch"
            )));
        }
        let grid = n.div_ceil(THREADS as usize) as u32;
        self.launch(name, (grid, 1), THREADS, args)
    }

    fn per_row(&self, name: &str, rows: usize, args: &[Arg]) -> Result<()> {
        let per_block = THREADS as usize / 32;
        self.launch(name, (rows.div_ceil(per_block) as u32, 1), THREADS, args)
    }
}

fn i(x: usize) -> Arg {
    Arg::Int(i32::try_from(x).expect("dimension fits in i32"))
}

fn l(x: usize) -> Arg {
    Arg::Long(x as i64)
}

impl Backend for Cuda {
    type Buf = CudaSlice<f32>;
    type Ids = CudaSlice<i32>;

    fn name(&self) -> String {
        format!(
            "cuda {}{}",
            self.device,
            if self.tf32 {
                ", TF32 GEMMs"
            } else {
                ", FP32 GEMMs"
            }
        )
    }

    fn zeros(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.stream
            .alloc_zeros(n.max(1))
            .map_err(dev("allocating device memory"))
    }

    fn upload_at(&self, dst: &mut CudaSlice<f32>, off: usize, src: &[f32]) -> Result<()> {
        self.stream
            .memcpy_htod(src, &mut dst.slice_mut(off..off + src.len()))
            .map_err(dev("copying to the device"))
    }

    fn download(&self, src: &CudaSlice<f32>, off: usize, len: usize) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; len];
        self.stream
            .memcpy_dtoh(&src.slice(off..off + len), &mut out)
            .map_err(dev("copying from the device"))?;
        self.sync()?;
        Ok(out)
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

    fn fill_zero(&self, buf: &mut CudaSlice<f32>, off: usize, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let p = self.ptr(buf, off, len);
        // SAFETY: the range was checked against the buffer.
        unsafe { cudarc::driver::result::memset_d8_async(p, 0, len * 4, self.stream.cu_stream()) }
            .map_err(dev("zeroing device memory"))
    }

    fn sync(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(dev("waiting for the device"))
    }

    fn gemm(
        &self,
        g: &Gemm,
        a: At<'_, Self>,
        b: At<'_, Self>,
        c: (&mut Self::Buf, usize),
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
        let pa = self.ptr(a.0, a.1, ext(g.ta, g.m, g.k, g.lda, g.stride_a));
        let pb = self.ptr(b.0, b.1, ext(g.tb, g.k, g.n, g.ldb, g.stride_b));
        let pc = self.ptr(c.0, c.1, ext(Op::N, g.m, g.n, g.ldc, g.stride_c));
        let op = |o: Op| match o {
            Op::N => blas::cublasOperation_t::CUBLAS_OP_N,
            Op::T => blas::cublasOperation_t::CUBLAS_OP_T,
        };
        let d = |x: usize| i32::try_from(x).expect("GEMM dimension fits in i32");
        // SAFETY: the three operands' extents were checked against their buffers.
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

    fn encoder_fwd(
        &self,
        out: &mut Self::Buf,
        ids: &Self::Ids,
        params: &Self::Buf,
        wte: usize,
        wpe: usize,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        let n = b * t * c;
        let args = [
            Arg::Ptr(self.ptr(out, 0, n)),
            Arg::Ptr(self.ptr(ids, 0, b * t)),
            Arg::Ptr(self.ptr(params, wte, c)),
            Arg::Ptr(self.ptr(params, wpe, t * c)),
            i(b),
            i(t),
            i(c),
        ];
        self.elementwise("encoder_fwd", n, &args)
    }

    fn encoder_bwd(
        &self,
        grads: &mut Self::Buf,
        dwte: usize,
        dwpe: usize,
        dout: &Self::Buf,
        ids: &Self::Ids,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        let n = b * t * c;
        let args = [
            Arg::Ptr(self.ptr(grads, dwte, c)),
            Arg::Ptr(self.ptr(grads, dwpe, t * c)),
            Arg::Ptr(self.ptr(dout, 0, n)),
            Arg::Ptr(self.ptr(ids, 0, b * t)),
            i(b),
            i(t),
            i(c),
        ];
        self.elementwise("encoder_bwd", n, &args)
    }

    fn layernorm_fwd(
        &self,
        out: &mut Self::Buf,
        mean: &mut Self::Buf,
        rstd: &mut Self::Buf,
        inp: &Self::Buf,
        params: &Self::Buf,
        w: usize,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let args = [
            Arg::Ptr(self.ptr(out, 0, n * c)),
            Arg::Ptr(self.ptr(mean, 0, n)),
            Arg::Ptr(self.ptr(rstd, 0, n)),
            Arg::Ptr(self.ptr(inp, 0, n * c)),
            Arg::Ptr(self.ptr(params, w, c)),
            Arg::Ptr(self.ptr(params, w + c, c)),
            i(n),
            i(c),
        ];
        self.per_row("layernorm_fwd", n, &args)
    }

    fn layernorm_bwd(
        &self,
        dinp: &mut Self::Buf,
        grads: &mut Self::Buf,
        dw: usize,
        dout: &Self::Buf,
        inp: &Self::Buf,
        params: &Self::Buf,
        w: usize,
        mean: &Self::Buf,
        rstd: &Self::Buf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let (pd, pi) = (self.ptr(dout, 0, n * c), self.ptr(inp, 0, n * c));
        let (pm, pr) = (self.ptr(mean, 0, n), self.ptr(rstd, 0, n));
        let args = [
            Arg::Ptr(self.ptr(dinp, 0, n * c)),
            Arg::Ptr(pd),
            Arg::Ptr(pi),
            Arg::Ptr(self.ptr(params, w, c)),
            Arg::Ptr(pm),
            Arg::Ptr(pr),
            i(n),
            i(c),
        ];
        self.per_row("layernorm_bwd_input", n, &args)?;
        let args = [
            Arg::Ptr(self.ptr(grads, dw, c)),
            Arg::Ptr(self.ptr(grads, dw + c, c)),
            Arg::Ptr(pd),
            Arg::Ptr(pi),
            Arg::Ptr(pm),
            Arg::Ptr(pr),
            i(n),
            i(c),
            i(CHUNK),
        ];
        let grid = (
            c.div_ceil(THREADS as usize) as u32,
            n.div_ceil(CHUNK) as u32,
        );
        self.launch("layernorm_bwd_params", grid, THREADS, &args)
    }

    fn bias_fwd(
        &self,
        out: &mut Self::Buf,
        params: &Self::Buf,
        bias: usize,
        n: usize,
        oc: usize,
    ) -> Result<()> {
        let args = [
            Arg::Ptr(self.ptr(out, 0, n * oc)),
            Arg::Ptr(self.ptr(params, bias, oc)),
            i(n),
            i(oc),
        ];
        self.elementwise("bias_fwd", n * oc, &args)
    }

    fn bias_bwd(
        &self,
        grads: &mut Self::Buf,
        dbias: usize,
        dout: &Self::Buf,
        n: usize,
        oc: usize,
    ) -> Result<()> {
        let args = [
            Arg::Ptr(self.ptr(grads, dbias, oc)),
            Arg::Ptr(self.ptr(dout, 0, n * oc)),
            i(n),
            i(oc),
            i(CHUNK),
        ];
        let grid = (
            oc.div_ceil(THREADS as usize) as u32,
            n.div_ceil(CHUNK) as u32,
        );
        self.launch("bias_bwd", grid, THREADS, &args)
    }

    fn gelu_fwd(&self, out: &mut Self::Buf, inp: &Self::Buf, n: usize) -> Result<()> {
        let args = [
            Arg::Ptr(self.ptr(out, 0, n)),
            Arg::Ptr(self.ptr(inp, 0, n)),
            l(n),
        ];
        self.elementwise("gelu_fwd", n, &args)
    }

    fn gelu_bwd(
        &self,
        dinp: &mut Self::Buf,
        inp: &Self::Buf,
        dout: &Self::Buf,
        n: usize,
    ) -> Result<()> {
        let args = [
            Arg::Ptr(self.ptr(dinp, 0, n)),
            Arg::Ptr(self.ptr(inp, 0, n)),
            Arg::Ptr(self.ptr(dout, 0, n)),
            l(n),
        ];
        self.elementwise("gelu_bwd", n, &args)
    }

    fn relu_fwd(&self, out: &mut Self::Buf, inp: &Self::Buf, n: usize) -> Result<()> {
        let args = [
            Arg::Ptr(self.ptr(out, 0, n)),
            Arg::Ptr(self.ptr(inp, 0, n)),
            l(n),
        ];
        self.elementwise("relu_fwd", n, &args)
    }

    fn relu_bwd(
        &self,
        dinp: &mut Self::Buf,
        out: &Self::Buf,
        dout: &Self::Buf,
        n: usize,
    ) -> Result<()> {
        let args = [
            Arg::Ptr(self.ptr(dinp, 0, n)),
            Arg::Ptr(self.ptr(out, 0, n)),
            Arg::Ptr(self.ptr(dout, 0, n)),
            l(n),
        ];
        self.elementwise("relu_bwd", n, &args)
    }

    fn add(&self, out: &mut Self::Buf, a: &Self::Buf, b: &Self::Buf, n: usize) -> Result<()> {
        let args = [
            Arg::Ptr(self.ptr(out, 0, n)),
            Arg::Ptr(self.ptr(a, 0, n)),
            Arg::Ptr(self.ptr(b, 0, n)),
            l(n),
        ];
        self.elementwise("add", n, &args)
    }

    fn permute_qkv(
        &self,
        qkvr: &mut Self::Buf,
        qkv: &Self::Buf,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
    ) -> Result<()> {
        let n = 3 * b * t * nh * hs;
        let args = [
            Arg::Ptr(self.ptr(qkvr, 0, n)),
            Arg::Ptr(self.ptr(qkv, 0, n)),
            i(b),
            i(t),
            i(nh),
            i(hs),
            Arg::Int(0),
        ];
        self.elementwise("permute_qkv", n, &args)
    }

    fn permute_qkv_bwd(
        &self,
        dqkv: &mut Self::Buf,
        dqkvr: &Self::Buf,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
    ) -> Result<()> {
        let n = 3 * b * t * nh * hs;
        let args = [
            Arg::Ptr(self.ptr(dqkvr, 0, n)),
            Arg::Ptr(self.ptr(dqkv, 0, n)),
            i(b),
            i(t),
            i(nh),
            i(hs),
            Arg::Int(1),
        ];
        self.elementwise("permute_qkv", n, &args)
    }

    fn unpermute(
        &self,
        out: &mut Self::Buf,
        inp: &Self::Buf,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
        forward: bool,
    ) -> Result<()> {
        let n = b * t * nh * hs;
        let args = [
            Arg::Ptr(self.ptr(out, 0, n)),
            Arg::Ptr(self.ptr(inp, 0, n)),
            i(b),
            i(t),
            i(nh),
            i(hs),
            Arg::Int(i32::from(forward)),
        ];
        self.elementwise("unpermute", n, &args)
    }

    fn softmax_causal_fwd(
        &self,
        att: &mut Self::Buf,
        preatt: &Self::Buf,
        scale: f32,
        rows: usize,
        t: usize,
    ) -> Result<()> {
        let n = rows * t * t;
        let args = [
            Arg::Ptr(self.ptr(att, 0, n)),
            Arg::Ptr(self.ptr(preatt, 0, n)),
            Arg::Float(scale),
            i(rows),
            i(t),
        ];
        self.per_row("softmax_causal_fwd", rows * t, &args)
    }

    fn softmax_causal_bwd(
        &self,
        dpreatt: &mut Self::Buf,
        datt: &Self::Buf,
        att: &Self::Buf,
        scale: f32,
        rows: usize,
        t: usize,
    ) -> Result<()> {
        let n = rows * t * t;
        let args = [
            Arg::Ptr(self.ptr(dpreatt, 0, n)),
            Arg::Ptr(self.ptr(datt, 0, n)),
            Arg::Ptr(self.ptr(att, 0, n)),
            Arg::Float(scale),
            i(rows),
            i(t),
        ];
        self.per_row("softmax_causal_bwd", rows * t, &args)
    }

    fn crossentropy(
        &self,
        losses: &mut Self::Buf,
        logits: &mut Self::Buf,
        targets: &Self::Ids,
        n: usize,
        v: usize,
        vp: usize,
        dloss: f32,
        grad: bool,
    ) -> Result<()> {
        let args = [
            Arg::Ptr(self.ptr(losses, 0, n)),
            Arg::Ptr(self.ptr(logits, 0, n * vp)),
            Arg::Ptr(self.ptr(targets, 0, n)),
            i(n),
            i(v),
            i(vp),
            Arg::Float(dloss),
            Arg::Int(i32::from(grad)),
        ];
        self.launch("crossentropy", (n as u32, 1), 512, &args)
    }

    fn sum_squares(&self, buf: &Self::Buf, off: usize, len: usize) -> Result<f64> {
        let args = [
            Arg::Ptr(self.ptr(&self.partial, 0, SUM_BLOCKS)),
            Arg::Ptr(self.ptr(buf, off, len)),
            l(len),
        ];
        self.launch("sum_squares", (SUM_BLOCKS as u32, 1), THREADS, &args)?;
        let parts = self.download(&self.partial, 0, SUM_BLOCKS)?;
        Ok(parts.iter().map(|p| f64::from(*p)).sum())
    }

    fn adamw(
        &self,
        params: &mut Self::Buf,
        grads: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        off: usize,
        len: usize,
        s: &AdamStep,
    ) -> Result<()> {
        let args = [
            Arg::Ptr(self.ptr(params, off, len)),
            Arg::Ptr(self.ptr(grads, off, len)),
            Arg::Ptr(self.ptr(m, off, len)),
            Arg::Ptr(self.ptr(v, off, len)),
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
