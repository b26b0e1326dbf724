//! Throwaway probe of the GPU machine's CUDA stack through cudarc (dynamic loading).
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, sys as blas_sys};
use cudarc::driver::{CudaContext, LaunchConfig, PushKernelArg};
use cudarc::nccl::{Comm, Id, ReduceOp};
use cudarc::nvrtc::{CompileOptions, Ptx, compile_ptx_with_opts};
use std::time::Instant;

const SRC: &str = r#"
extern "C" __global__ void saxpy(float a, const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] + y[i];
}"#;

fn step<T, E: std::fmt::Debug>(name: &str, f: impl FnOnce() -> Result<T, E>) -> Option<T> {
    match f() {
        Ok(v) => {
            println!("OK   {name}");
            Some(v)
        }
        Err(e) => {
            println!("FAIL {name}: {e:?}");
            None
        }
    }
}

fn cubin(src: &str, arch: &str) -> Result<Vec<u8>, String> {
    use cudarc::nvrtc::sys;
    use std::ffi::CString;
    unsafe {
        let prog = cudarc::nvrtc::result::create_program(&CString::new(src).unwrap(), None)
            .map_err(|e| format!("{e:?}"))?;
        let opts = [format!("--gpu-architecture={arch}")];
        cudarc::nvrtc::result::compile_program(prog, &opts).map_err(|e| format!("{e:?}"))?;
        let mut size = 0usize;
        sys::nvrtcGetCUBINSize(prog, &mut size)
            .result()
            .map_err(|e| format!("{e:?}"))?;
        let mut buf = vec![0u8; size];
        sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut _)
            .result()
            .map_err(|e| format!("{e:?}"))?;
        Ok(buf)
    }
}

fn main() {
    for lib in ["cuda", "nvrtc", "cublas", "cublasLt", "nccl", "nvidia-ml"] {
        println!(
            "candidates {lib}: {:?}",
            cudarc::get_lib_name_candidates(lib)
                .iter()
                .filter(|c| c.contains(".so."))
                .collect::<Vec<_>>()
        );
    }
    unsafe {
        println!(
            "present: driver={} nvrtc={} cublas={} nccl={}",
            cudarc::driver::sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
            cudarc::cublas::sys::is_culib_present(),
            cudarc::nccl::sys::is_culib_present()
        );
    }
    let ctx = CudaContext::new(0).expect("context");
    println!(
        "device: {} cc={:?}",
        ctx.name().unwrap(),
        ctx.compute_capability()
    );
    let stream = ctx.default_stream();
    let n = 1 << 20;
    let x: Vec<f32> = (0..n).map(|i| (i % 97) as f32 * 0.5).collect();
    let y: Vec<f32> = (0..n).map(|i| (i % 13) as f32).collect();
    let want: Vec<f32> = x.iter().zip(&y).map(|(a, b)| 2.0 * a + b).collect();
    let run = |ptx: Ptx, label: &str| {
        step(label, || -> Result<(), String> {
            let m = ctx.load_module(ptx).map_err(|e| format!("{e:?}"))?;
            let f = m.load_function("saxpy").map_err(|e| format!("{e:?}"))?;
            let dx = stream.clone_htod(&x).unwrap();
            let mut dy = stream.clone_htod(&y).unwrap();
            let mut b = stream.launch_builder(&f);
            let (a, nn) = (2.0f32, n as i32);
            b.arg(&a).arg(&dx).arg(&mut dy).arg(&nn);
            unsafe { b.launch(LaunchConfig::for_num_elems(n as u32)) }
                .map_err(|e| format!("{e:?}"))?;
            let got = stream.clone_dtoh(&dy).unwrap();
            if got != want {
                return Err("mismatch".into());
            }
            Ok(())
        })
    };
    for arch in [None, Some("compute_90")] {
        if let Some(ptx) = step(&format!("nvrtc ptx arch={arch:?}"), || {
            compile_ptx_with_opts(
                SRC,
                CompileOptions {
                    arch,
                    ..Default::default()
                },
            )
        }) {
            run(ptx, &format!("load+launch ptx arch={arch:?}"));
        }
    }
    if let Some(bin) = step("nvrtc cubin sm_90", || cubin(SRC, "sm_90")) {
        run(Ptx::from_binary(bin), "load+launch cubin sm_90");
    }
    // cuBLAS sgemm, default math then TF32.
    let blas = CudaBlas::new(stream.clone()).expect("cublas");
    let d = 8192usize;
    let a = stream.alloc_zeros::<f32>(d * d).unwrap();
    let bm = stream.alloc_zeros::<f32>(d * d).unwrap();
    let mut c = stream.alloc_zeros::<f32>(d * d).unwrap();
    for tf32 in [false, true] {
        if tf32 {
            unsafe {
                blas_sys::cublasSetMathMode(
                    *blas.handle(),
                    blas_sys::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH,
                )
            };
        }
        let cfg = GemmConfig {
            transa: blas_sys::cublasOperation_t::CUBLAS_OP_N,
            transb: blas_sys::cublasOperation_t::CUBLAS_OP_N,
            m: d as i32,
            n: d as i32,
            k: d as i32,
            alpha: 1.0f32,
            lda: d as i32,
            ldb: d as i32,
            beta: 0.0,
            ldc: d as i32,
        };
        unsafe { blas.gemm(cfg, &a, &bm, &mut c) }.unwrap();
        stream.synchronize().unwrap();
        let t = Instant::now();
        let iters = 20;
        for _ in 0..iters {
            unsafe { blas.gemm(cfg, &a, &bm, &mut c) }.unwrap();
        }
        stream.synchronize().unwrap();
        let s = t.elapsed().as_secs_f64() / iters as f64;
        println!(
            "sgemm {d}^3 tf32={tf32}: {:.1} TFLOP/s",
            2.0 * (d as f64).powi(3) / s / 1e12
        );
    }
    // NCCL one rank.
    step("nccl 1-rank all_reduce", || -> Result<(), String> {
        let id = Id::new().map_err(|e| format!("{e:?}"))?;
        let comm = Comm::from_rank(stream.clone(), 0, 1, id).map_err(|e| format!("{e:?}"))?;
        let mut buf = stream.clone_htod(&x).unwrap();
        comm.all_reduce_in_place(&mut buf, &ReduceOp::Sum)
            .map_err(|e| format!("{e:?}"))?;
        let got = stream.clone_dtoh(&buf).unwrap();
        if got != x {
            return Err("mismatch".into());
        }
        let mut big = stream.alloc_zeros::<f32>(16 << 20).unwrap();
        stream.synchronize().unwrap();
        let t = Instant::now();
        for _ in 0..20 {
            comm.all_reduce_in_place(&mut big, &ReduceOp::Sum)
                .map_err(|e| format!("{e:?}"))?;
        }
        stream.synchronize().unwrap();
        println!(
            "     nccl 64MiB 1-rank all_reduce: {:.3} ms",
            t.elapsed().as_secs_f64() * 1e3 / 20.0
        );
        Ok(())
    });
    step("nvml", || -> Result<(), nvml_wrapper::error::NvmlError> {
        let nvml = nvml_wrapper::Nvml::init()?;
        let dev = nvml.device_by_index(0)?;
        println!(
            "     nvml: {} util={:?} mem={:?} power_mw={:?} sm_clock={:?}",
            dev.name()?,
            dev.utilization_rates()?.gpu,
            dev.memory_info()?.used,
            dev.power_usage()?,
            dev.clock_info(nvml_wrapper::enum_wrappers::device::Clock::SM)?
        );
        Ok(())
    });
}
