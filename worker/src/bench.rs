//! `lockstep-worker bench allreduce`: all-reduce time, algorithm bandwidth and bus bandwidth per
//! message size, in the style of nccl-tests, plus a probe of the transport's own speed (one TCP
//! stream over the same interface) so that bus bandwidth reads as a fraction of the link.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::comm::tcp::{TcpComm, TcpOptions};
use crate::comm::{Communicator, ReduceOp, bus_factor};

/// Which transport to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// The TCP ring, ranks as threads of this process over 127.0.0.1.
    Tcp,
    /// NCCL, one rank per GPU (needs the `cuda` feature, CUDA and NCCL).
    Nccl,
}

/// One row of the table.
#[derive(Clone, Debug)]
pub struct Row {
    /// Message size in bytes.
    pub bytes: usize,
    /// Median time of one all-reduce.
    pub time: Duration,
    /// Algorithm bandwidth, bytes per second.
    pub algbw: f64,
    /// Bus bandwidth, bytes per second.
    pub busbw: f64,
}

/// Parses `1K:256M` (powers of two, suffixes K, M, G) into the sizes from the first to the last,
/// multiplying by `factor`.
pub fn parse_sizes(spec: &str, factor: usize) -> Result<Vec<usize>> {
    fn one(s: &str) -> Result<usize> {
        let s = s.trim();
        let (num, mult) = match s.chars().last() {
            Some('K' | 'k') => (&s[..s.len() - 1], 1usize << 10),
            Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
            Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
            _ => (s, 1),
        };
        let n: usize = num
            .parse()
            .with_context(|| format!("{s:?} is not a size like 1K, 64M or 4096"))?;
        Ok(n * mult)
    }
    let (lo, hi) = spec.split_once(':').unwrap_or((spec, spec));
    let (lo, hi) = (one(lo)?, one(hi)?);
    if lo == 0 || hi < lo || factor < 2 {
        bail!("sizes {spec:?}: need 0 < first <= last and a factor of at least 2");
    }
    let mut v = Vec::new();
    let mut s = lo;
    while s <= hi {
        v.push(s);
        s *= factor;
    }
    Ok(v)
}

/// Iterations for a message of `bytes`: enough to measure, bounded in time.
fn iterations(bytes: usize) -> usize {
    ((256usize << 20) / bytes.max(1)).clamp(5, 200)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

/// The transport's own speed: `streams` TCP connections on 127.0.0.1 carrying `total` bytes
/// each at the same time, connection i from thread i to thread i+1 (the traffic of one ring
/// step; one stream is the plain link). Returns the bytes per second of one connection (the
/// median one).
pub fn probe_loopback(streams: usize, total: usize) -> Result<f64> {
    let chunk = 4 << 20;
    let listeners = (0..streams)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    let addrs = listeners
        .iter()
        .map(|l| l.local_addr())
        .collect::<std::io::Result<Vec<_>>>()?;
    let start = std::sync::Barrier::new(2 * streams);
    let rates: Vec<std::io::Result<f64>> = std::thread::scope(|s| {
        let readers: Vec<_> = listeners
            .into_iter()
            .map(|l| {
                let start = &start;
                s.spawn(move || -> std::io::Result<f64> {
                    let (mut c, _) = l.accept()?;
                    let mut buf = vec![0u8; chunk];
                    start.wait();
                    let t = Instant::now();
                    let mut left = total;
                    while left > 0 {
                        let n = c.read(&mut buf[..chunk.min(left)])?;
                        if n == 0 {
                            return Err(std::io::ErrorKind::UnexpectedEof.into());
                        }
                        left -= n;
                    }
                    Ok(total as f64 / t.elapsed().as_secs_f64())
                })
            })
            .collect();
        for a in &addrs {
            let a = *a;
            let start = &start;
            s.spawn(move || -> std::io::Result<()> {
                let mut c = std::net::TcpStream::connect(a)?;
                c.set_nodelay(true)?;
                let buf = vec![7u8; chunk];
                start.wait();
                let mut left = total;
                while left > 0 {
                    let n = chunk.min(left);
                    c.write_all(&buf[..n])?;
                    left -= n;
                }
                Ok(())
            });
        }
        readers
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("probe panicked")))
            })
            .collect()
    });
    let mut rates: Vec<f64> = rates.into_iter().collect::<std::io::Result<_>>()?;
    rates.sort_by(f64::total_cmp);
    Ok(rates[rates.len() / 2])
}

/// Runs the TCP all-reduce benchmark with `ranks` ranks over `sizes` (bytes).
pub fn tcp_allreduce(ranks: usize, sizes: &[usize]) -> Result<Vec<Row>> {
    let comms = TcpComm::local_gang(ranks, TcpOptions::default())?;
    let results: Vec<Result<Vec<Duration>>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|mut c| {
                s.spawn(move || -> Result<Vec<Duration>> {
                    let mut out = Vec::new();
                    for &bytes in sizes {
                        let mut buf = vec![1.0f32; bytes / 4];
                        for _ in 0..2 {
                            c.all_reduce(&mut buf, ReduceOp::Sum)?;
                        }
                        let mut times = Vec::new();
                        for _ in 0..iterations(bytes) {
                            c.barrier()?;
                            let t = Instant::now();
                            c.all_reduce(&mut buf, ReduceOp::Sum)?;
                            times.push(t.elapsed());
                        }
                        out.push(median(times));
                    }
                    Ok(out)
                })
            })
            .collect();
        join_all(handles)
    });
    rows(sizes, results, ranks)
}

/// Waits for every rank's thread.
fn join_all<T>(handles: Vec<std::thread::ScopedJoinHandle<'_, Result<T>>>) -> Vec<Result<T>> {
    handles
        .into_iter()
        .map(|h| {
            h.join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("a rank panicked")))
        })
        .collect()
}

/// One row per size from every rank's median times: the slowest rank's decides (an
/// all-reduce is done when every rank has it).
fn rows(sizes: &[usize], per_rank: Vec<Result<Vec<Duration>>>, ranks: usize) -> Result<Vec<Row>> {
    let per_rank: Vec<Vec<Duration>> = per_rank.into_iter().collect::<Result<_>>()?;
    Ok(sizes
        .iter()
        .enumerate()
        .map(|(i, &bytes)| {
            let time = per_rank.iter().map(|t| t[i]).max().unwrap_or_default();
            let algbw = bytes as f64 / time.as_secs_f64().max(1e-12);
            Row {
                bytes,
                time,
                algbw,
                busbw: algbw * bus_factor("all_reduce", ranks),
            }
        })
        .collect())
}

/// Prints the table; `link` (bytes per second, and how it was measured) adds a busbw/link
/// column.
pub fn print_table(title: &str, rows: &[Row], link: Option<(f64, &str)>) {
    let mut out = String::new();
    out.push_str(&format!("# {title}\n"));
    if let Some((l, how)) = link {
        out.push_str(&format!("# link: {:.2} GB/s ({how})\n", l / 1e9));
    }
    let link = link.map(|(l, _)| l);
    out.push_str(&format!(
        "#{:>13} {:>12} {:>12} {:>12} {:>11}\n",
        "size(B)", "time(us)", "algbw(GB/s)", "busbw(GB/s)", "busbw/link"
    ));
    for r in rows {
        let frac = link
            .map(|l| format!("{:.2}", r.busbw / l))
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:>14} {:>12.1} {:>12.3} {:>12.3} {:>11}\n",
            r.bytes,
            r.time.as_secs_f64() * 1e6,
            r.algbw / 1e9,
            r.busbw / 1e9,
            frac
        ));
    }
    #[allow(clippy::print_stdout)] // the benchmark's output
    {
        print!("{out}");
    }
}

/// The NCCL all-reduce benchmark and a check of every NCCL collective against the CPU
/// reference, with one rank per GPU (threads of this process).
#[cfg(feature = "cuda")]
pub fn nccl_allreduce(ranks: usize, sizes: &[usize]) -> Result<Vec<Row>> {
    use crate::comm::nccl::{NcclComm, available, new_id};
    use cudarc::driver::CudaContext;
    if !available() {
        bail!("the CUDA driver or NCCL (libnccl.so) cannot be loaded on this machine");
    }
    let devices = CudaContext::device_count().map_err(|e| anyhow::anyhow!("{e:?}"))? as usize;
    if devices < ranks {
        bail!("{ranks} NCCL ranks need {ranks} GPUs; this machine has {devices}");
    }
    let id = new_id()?;
    let results: Vec<Result<Vec<Duration>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..ranks)
            .map(|r| {
                let id = id.clone();
                s.spawn(move || -> Result<Vec<Duration>> {
                    let ctx = CudaContext::new(r).map_err(|e| anyhow::anyhow!("{e:?}"))?;
                    let stream = ctx.new_stream().map_err(|e| anyhow::anyhow!("{e:?}"))?;
                    let mut c = NcclComm::new(stream.clone(), r, ranks, &id)?;
                    check_nccl(&mut c, &stream)?;
                    let mut out = Vec::new();
                    for &bytes in sizes {
                        let mut buf = stream
                            .alloc_zeros::<f32>(bytes / 4)
                            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                        for _ in 0..2 {
                            c.all_reduce(&mut buf, ReduceOp::Sum)?;
                        }
                        c.synchronize()?;
                        let mut times = Vec::new();
                        for _ in 0..iterations(bytes) {
                            let t = Instant::now();
                            c.all_reduce(&mut buf, ReduceOp::Sum)?;
                            c.synchronize()?;
                            times.push(t.elapsed());
                        }
                        out.push(median(times));
                    }
                    Ok(out)
                })
            })
            .collect();
        join_all(handles)
    });
    rows(sizes, results, ranks)
}

/// Every NCCL collective against the same reference the TCP tests use.
#[cfg(feature = "cuda")]
fn check_nccl(
    c: &mut crate::comm::nccl::NcclComm,
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
) -> Result<()> {
    let e = |e: cudarc::driver::DriverError| anyhow::anyhow!("{e:?}");
    let (rank, n) = (c.rank(), c.world_size());
    let data = |r: usize, len: usize| -> Vec<f32> {
        (0..len)
            .map(|i| ((r * 31 + i * 7) % 97) as f32 - 48.0)
            .collect()
    };
    for len in [1usize, 7, 1001, 1 << 20] {
        for op in ReduceOp::ALL {
            let mut want = data(0, len);
            for r in 1..n {
                op.fold(&mut want, &data(r, len));
            }
            op.finish(&mut want, n);
            let mut buf = stream.clone_htod(&data(rank, len)).map_err(e)?;
            c.all_reduce(&mut buf, op)?;
            let got = stream.clone_dtoh(&buf).map_err(e)?;
            if got != want {
                bail!("NCCL all_reduce {op:?} of {len} elements differs from the CPU reference");
            }
        }
        let mut buf = stream.clone_htod(&data(rank, len)).map_err(e)?;
        c.broadcast(&mut buf, 0)?;
        if stream.clone_dtoh(&buf).map_err(e)? != data(0, len) {
            bail!("NCCL broadcast of {len} elements differs from the CPU reference");
        }
        let input = stream.clone_htod(&data(rank, len)).map_err(e)?;
        let mut gathered = stream.alloc_zeros::<f32>(len * n).map_err(e)?;
        c.all_gather(&input, &mut gathered)?;
        let want: Vec<f32> = (0..n).flat_map(|r| data(r, len)).collect();
        if stream.clone_dtoh(&gathered).map_err(e)? != want {
            bail!("NCCL all_gather of {len} elements differs from the CPU reference");
        }
        let input = stream.clone_htod(&data(rank, len * n)).map_err(e)?;
        let mut part = stream.alloc_zeros::<f32>(len).map_err(e)?;
        c.reduce_scatter(&input, &mut part, ReduceOp::Sum)?;
        let mut full = data(0, len * n);
        for r in 1..n {
            ReduceOp::Sum.fold(&mut full, &data(r, len * n));
        }
        if stream.clone_dtoh(&part).map_err(e)? != full[rank * len..(rank + 1) * len] {
            bail!("NCCL reduce_scatter of {len} elements differs from the CPU reference");
        }
    }
    let mut sub = c.split(0, rank as u32)?;
    let mut one = stream.clone_htod(&[1.0f32]).map_err(e)?;
    sub.all_reduce(&mut one, ReduceOp::Sum)?;
    if stream.clone_dtoh(&one).map_err(e)? != [n as f32] {
        bail!("NCCL split communicator gave a wrong all_reduce");
    }
    c.barrier()?;
    tracing::info!(
        rank,
        ranks = n,
        "every NCCL collective matches the CPU reference"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_nccl_tests() {
        assert_eq!(
            parse_sizes("1K:8K", 2).expect("valid"),
            vec![1024, 2048, 4096, 8192]
        );
        assert_eq!(parse_sizes("64M", 2).expect("valid"), vec![64 << 20]);
        assert_eq!(parse_sizes("1K:256M", 4).expect("valid").len(), 10);
        assert!(parse_sizes("8K:1K", 2).is_err());
        assert!(parse_sizes("lots", 2).is_err());
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn an_nvrtc_newer_than_the_driver_is_refused() {
        // Seen on an H200 with driver 580.159.04: NVRTC 13.5's PTX did not load, 13.0's did.
        assert!(nvrtc_too_new("13.0", "13.5"));
        assert!(!nvrtc_too_new("13.0", "13.0"));
        assert!(!nvrtc_too_new("13.5", "13.0"));
        assert!(nvrtc_too_new("12.9", "13.0"));
        assert!(!nvrtc_too_new("14.0", "13.10"));
        assert!(!nvrtc_too_new("13.0", "?"));
    }
}

/// Which engine backend a benchmark runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    /// The CPU reference backend.
    Cpu,
    /// The CUDA backend (cuBLAS and NVRTC kernels).
    Cuda,
}

/// The arithmetic of a benchmark's GEMMs (the engine's [`lockstep_engine::Precision`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GemmPrecision {
    /// IEEE single precision.
    Fp32,
    /// TF32 tensor cores on the GPU (FP32 on the CPU).
    Tf32,
    /// bf16 activations and GEMM operands, FP32 sums (emulated on the CPU).
    Bf16,
}

impl From<GemmPrecision> for lockstep_engine::Precision {
    fn from(p: GemmPrecision) -> Self {
        match p {
            GemmPrecision::Fp32 => Self::Fp32,
            GemmPrecision::Tf32 => Self::Tf32,
            GemmPrecision::Bf16 => Self::Bf16,
        }
    }
}

/// Shape of a GPT benchmark.
#[derive(Clone, Copy, Debug)]
pub struct GptBench {
    /// The model.
    pub config: lockstep_engine::models::gpt::GptConfig,
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Untimed steps first.
    pub warmup: usize,
    /// Timed steps.
    pub steps: usize,
    /// The GEMMs' arithmetic.
    pub precision: GemmPrecision,
    /// Attention through the fused kernels (no `t x t` matrix).
    pub fused_attention: bool,
    /// The fused element-wise kernels (bias + GELU, residual + layer norm).
    pub fused_ops: bool,
    /// Peak FLOP/s of the device, for MFU (0: not reported).
    pub peak: f64,
    /// Also print the device time of each primitive.
    pub profile: bool,
}

/// Throughput of `g` on `be`, and its profile when asked.
#[allow(clippy::type_complexity)]
fn measure<B: lockstep_engine::Backend>(
    be: &B,
    g: &GptBench,
) -> Result<(
    String,
    lockstep_engine::check::Throughput,
    Vec<(String, f64, f64)>,
)> {
    use lockstep_engine::check::{gpt_profile, gpt_throughput};
    let c = g
        .config
        .with_fused_attention(g.fused_attention)?
        .with_fused_ops(g.fused_ops);
    let t = gpt_throughput(be, c, g.batch, g.seq, g.warmup, g.steps)?;
    let prof = if g.profile {
        gpt_profile(be, c, g.batch, g.seq, 3)?
    } else {
        Vec::new()
    };
    Ok((be.name(), t, prof))
}

/// Prints GPT training throughput on `device`.
#[allow(clippy::print_stdout)] // the benchmark's output
pub fn gpt(device: Device, g: &GptBench) -> Result<()> {
    let c = &g.config;
    let (name, t, prof) = match device {
        Device::Cpu if g.precision == GemmPrecision::Bf16 => {
            measure(&lockstep_engine::cpu::CpuBf16, g)?
        }
        Device::Cpu => measure(&lockstep_engine::cpu::Cpu, g)?,
        #[cfg(feature = "cuda")]
        Device::Cuda => measure(&lockstep_engine::cuda::Cuda::new(0, g.precision.into())?, g)?,
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => bail!("this build has no CUDA backend: rebuild with the cuda feature"),
    };
    println!(
        "# GPT training, lockstep engine on {name}: {} layers, {} heads, {} wide, vocab {} (padded {}), {:.1}M parameters, {} attention, {} element-wise kernels; batch {} x {} tokens; median of {} steps after {} warm-up",
        c.layers,
        c.heads,
        c.channels,
        c.vocab,
        c.padded_vocab,
        c.num_real_params() as f64 / 1e6,
        if g.fused_attention {
            "fused"
        } else {
            "unfused"
        },
        if g.fused_ops { "fused" } else { "unfused" },
        g.batch,
        g.seq,
        g.steps,
        g.warmup
    );
    let mfu = if g.peak > 0.0 {
        format!("{:.1}%", 100.0 * t.flops / g.peak)
    } else {
        "-".into()
    };
    println!(
        "engine=lockstep step_ms={:.2} tokens_per_s={:.0} tflops={:.2} mfu={mfu} loss_first={:.4} loss_last={:.4}",
        t.step_seconds * 1e3,
        t.tokens_per_second,
        t.flops / 1e12,
        t.loss.0,
        t.loss.1
    );
    if g.profile {
        let total: f64 = prof.iter().map(|p| p.1).sum();
        println!("# device time per step by primitive (each call synchronised; mean of 3 steps)");
        println!(
            "{:<28} {:>10} {:>7} {:>8}",
            "primitive", "ms/step", "share", "calls"
        );
        for (name, ms, calls) in &prof {
            println!(
                "{name:<28} {ms:>10.2} {:>6.1}% {calls:>8.0}",
                100.0 * ms / total.max(1e-12)
            );
        }
        println!("{:<28} {total:>10.2}", "total");
    }
    Ok(())
}

/// `bench cuda-libs`: which CUDA libraries load here as the worker opens them (the driver's
/// libcuda and libnvidia-ml, cuBLAS with its cuBLASLt, NVRTC, NCCL), from which files and at
/// which versions, then the engine's kernels compiled by NVRTC for `arch`. Needs no GPU: it is
/// the check the CUDA image's build runs inside the image. Fails when cuBLAS, NVRTC or NCCL does
/// not load (what the image carries) or the kernels do not compile; the driver's libraries are
/// only reported, unless `require_driver` (on a GPU node, where the NVIDIA container toolkit
/// mounts them).
#[cfg(feature = "cuda")]
#[allow(clippy::print_stdout)] // the check's report
pub fn cuda_libs(arch: &'static str, require_driver: bool) -> Result<()> {
    use lockstep_engine::cuda::{self, Library};
    const FROM_DRIVER: &str = "(the NVIDIA driver's: mounted on GPU nodes, absent without one)";
    let mut libs = cuda::libraries();
    libs.push(crate::comm::nccl::library());
    // NVML, as the metrics open it; it is the driver's too.
    let mut nvml_note = String::new();
    libs.push(match nvml_wrapper::Nvml::init() {
        Ok(n) => Library {
            name: "nvidia-ml",
            loaded: true,
            file: cuda::mapped_file("nvidia-ml"),
            version: n.sys_driver_version().ok(),
        },
        Err(e) => {
            let loaded = !matches!(e, nvml_wrapper::error::NvmlError::LibloadingError(_));
            if loaded {
                nvml_note = format!("(loaded, but NVML did not start: {e})");
            }
            Library {
                name: "nvidia-ml",
                loaded,
                file: cuda::mapped_file("nvidia-ml"),
                version: None,
            }
        }
    });
    // cuBLASLt is not opened by name: the loader brings it in as a dependency of cuBLAS.
    if let Some(at) = libs.iter().position(|l| l.name == "cublas") {
        let file = cuda::mapped_file("cublasLt");
        libs.insert(
            at + 1,
            Library {
                name: "cublasLt",
                loaded: file.is_some(),
                file,
                version: None,
            },
        );
    }
    println!(
        "# CUDA libraries as the worker opens them (cudarc's names for CUDA 13, on the library path)"
    );
    for l in &libs {
        let driver = matches!(l.name, "cuda" | "nvidia-ml");
        let what = match (l.loaded, &l.file) {
            (true, Some(f)) => f.display().to_string(),
            (true, None) => "(file not found in /proc/self/maps)".into(),
            (false, _) if driver => FROM_DRIVER.into(),
            (false, _) => "(not on the library path)".into(),
        };
        let what = if l.name == "nvidia-ml" && !nvml_note.is_empty() {
            format!("{what} {nvml_note}")
        } else {
            what
        };
        println!(
            "{:<10} {:<10} {:<9} {what}",
            l.name,
            if l.loaded { "loaded" } else { "not found" },
            l.version.as_deref().unwrap_or("-"),
        );
    }
    let loaded = |name: &str| libs.iter().any(|l| l.name == name && l.loaded);
    let mut problems: Vec<String> = ["cublas", "cublasLt", "nvrtc", "nccl"]
        .into_iter()
        .filter(|n| !loaded(n))
        .map(|n| format!("lib{n} does not load"))
        .collect();
    if require_driver {
        problems.extend(
            ["cuda", "nvidia-ml"]
                .into_iter()
                .filter(|n| !loaded(n))
                .map(|n| format!("the driver's lib{n} does not load")),
        );
    }
    // A driver loads PTX of its own CUDA version or older: kernels that a newer NVRTC compiles
    // fail to load there (CUDA_ERROR_UNSUPPORTED_PTX_VERSION).
    let version = |name: &str| libs.iter().find(|l| l.name == name)?.version.clone();
    if let (Some(driver), Some(nvrtc)) = (version("cuda"), version("nvrtc"))
        && nvrtc_too_new(&driver, &nvrtc)
    {
        problems.push(format!(
            "NVRTC {nvrtc} writes PTX that this driver (CUDA {driver}) cannot load: use an NVRTC no newer than the driver"
        ));
    }
    if loaded("nvrtc") {
        match cuda::compile(arch) {
            Ok(ptx) => {
                let src = ptx.to_src();
                let missing: Vec<_> = cuda::KERNELS
                    .iter()
                    .filter(|k| !src.contains(&format!(".entry {k}(")))
                    .collect();
                let isa = src
                    .lines()
                    .find_map(|l| l.trim().strip_prefix(".version "))
                    .unwrap_or("?");
                let builtins = cuda::mapped_file("nvrtc-builtins")
                    .map(|f| f.display().to_string())
                    .unwrap_or_else(|| "?".into());
                println!(
                    "# kernels: {} of {} compiled by NVRTC for {arch}: {} bytes of PTX (ISA {isa}), builtins {builtins}",
                    cuda::KERNELS.len() - missing.len(),
                    cuda::KERNELS.len(),
                    src.len(),
                );
                if !missing.is_empty() {
                    problems.push(format!("kernels missing from the PTX: {missing:?}"));
                }
            }
            Err(e) => problems.push(format!("the kernels do not compile for {arch}: {e}")),
        }
    }
    if !problems.is_empty() {
        bail!(
            "{} (the CUDA worker image carries cuBLAS, NVRTC and NCCL; elsewhere put them on LD_LIBRARY_PATH, with a libnccl.so link to NCCL's libnccl.so.2)",
            problems.join("; ")
        );
    }
    Ok(())
}

/// Whether NVRTC of CUDA version `nvrtc` ("13.5") is newer than what a driver of CUDA version
/// `driver` ("13.0") supports: NVRTC writes PTX of its own version, and a driver loads PTX of its
/// version or older only (newer fails with CUDA_ERROR_UNSUPPORTED_PTX_VERSION). False when either
/// does not parse.
#[cfg(feature = "cuda")]
fn nvrtc_too_new(driver: &str, nvrtc: &str) -> bool {
    let parse = |v: &str| -> Option<(u32, u32)> {
        let mut parts = v.split('.');
        Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
    };
    matches!((parse(driver), parse(nvrtc)), (Some(d), Some(n)) if n > d)
}

/// Compares the CUDA backend with the CPU reference, primitive by primitive and on whole GPT,
/// TGN and JODIE steps, and runs the conformance suite (every primitive against a naive reference) on it;
/// prints one row per output and fails when any is out of tolerance.
#[cfg(feature = "cuda")]
#[allow(clippy::print_stdout)] // the check's report
pub fn engine_check(precision: GemmPrecision) -> Result<()> {
    use lockstep_engine::check::{CheckShape, compare};
    use lockstep_engine::models::gpt::GptConfig;
    let cuda = lockstep_engine::cuda::Cuda::new(0, precision.into())?;
    // FP32 on both sides differs only in summation order: 1e-5 of the largest value for
    // element-wise kernels, 1e-4 for GEMMs and what goes through them (sums of hundreds of
    // terms). TF32 GEMMs round inputs to 10 mantissa bits: 1e-2. bf16 is compared with the
    // CPU's emulation of the same rounding (bf16 GEMM operands, activations stored in bf16), so
    // its primitives keep FP32's tolerances, except where a bf16 rounding of a value that
    // differs in its last FP32 bits flips by an ulp (2^-8 relative): 2e-2 for whole training
    // steps, whose every activation is stored in bf16 and goes through several GEMMs. The
    // conformance suite draws activation inputs as bf16 values and compares with f64
    // references: GEMMs into FP32 differ by summation order only, into bf16 by C's rounding
    // too, within 2e-2; its other bf16 outputs within `BF16_TOL`.
    let (gemm_tol, steps_tol, conformance_tol) = match precision {
        GemmPrecision::Fp32 => (1e-4, 1e-3, 1e-4),
        GemmPrecision::Tf32 => (1e-2, 5e-2, 1e-2),
        GemmPrecision::Bf16 => (1e-4, 2e-2, 2e-2),
    };
    let tol = |name: &str| -> f32 {
        if name.starts_with("gemm") {
            gemm_tol
        } else if name.starts_with("attention") {
            gemm_tol.max(if precision == GemmPrecision::Bf16 {
                1e-2
            } else {
                0.0
            })
        } else if name.starts_with("gpt") || name.starts_with("tgn") || name.starts_with("jodie") {
            steps_tol
        } else {
            1e-5
        }
    };
    let shape = CheckShape::default();
    let cfg = GptConfig::new(2, 4, 64, 64, 256)?;
    // The same outputs on CUDA and on the CPU reference of the same arithmetic; the fused
    // attention's GPT is named apart (in bf16 the unfused attention's GEMMs round their
    // operands to bf16, the fused kernels compute in FP32 between bf16 loads and stores, so
    // each is compared with its own twin).
    let reference = if precision == GemmPrecision::Bf16 {
        check_outputs(&lockstep_engine::cpu::CpuBf16, &shape, cfg)?
    } else {
        check_outputs(&lockstep_engine::cpu::Cpu, &shape, cfg)?
    };
    let mut rows = compare(&reference, &check_outputs(&cuda, &shape, cfg)?, &tol);
    rows.extend(lockstep_engine::conformance::conformance(
        &cuda,
        conformance_tol,
    )?);
    println!(
        "# CUDA backend ({}) against the CPU reference and the conformance suite's naive \
         references; rel = max |cuda - reference| / max |reference|",
        lockstep_engine::Backend::name(&cuda)
    );
    println!(
        "{:<48} {:>12} {:>12} {:>10}  result",
        "output", "max abs", "rel", "tolerance"
    );
    let mut bad = 0;
    for r in &rows {
        println!(
            "{:<48} {:>12.3e} {:>12.3e} {:>10.0e}  {}",
            r.name,
            r.max_abs,
            r.rel,
            r.tol,
            if r.ok() { "ok" } else { "FAIL" }
        );
        bad += usize::from(!r.ok());
    }
    if bad > 0 {
        bail!("{bad} of {} outputs differ beyond tolerance", rows.len());
    }
    println!("all {} outputs within tolerance", rows.len());
    Ok(())
}

/// What [`engine_check`] compares between two backends: the primitives of a GPT step, 5 GPT
/// steps with unfused and with fused attention and with the fused element-wise kernels, and
/// 5 TGN and JODIE steps.
#[cfg(feature = "cuda")]
fn check_outputs<B: lockstep_engine::Backend>(
    be: &B,
    shape: &lockstep_engine::check::CheckShape,
    cfg: lockstep_engine::models::gpt::GptConfig,
) -> Result<Vec<(String, Vec<f32>)>> {
    use lockstep_engine::check::{gpt_steps, primitives, tgn_steps};
    let mut out = primitives(be, shape)?;
    out.extend(gpt_steps(be, cfg, 4, 64, 5)?);
    let fused = cfg.with_fused_attention(true)?;
    out.extend(
        gpt_steps(be, fused, 4, 64, 5)?
            .into_iter()
            .map(|(name, v)| (format!("{name} (fused attention)"), v)),
    );
    out.extend(
        gpt_steps(be, cfg.with_fused_ops(true), 4, 64, 5)?
            .into_iter()
            .map(|(name, v)| (format!("{name} (fused ops)"), v)),
    );
    out.extend(tgn_steps(be, false, 5)?);
    out.extend(tgn_steps(be, true, 5)?);
    Ok(out)
}

/// Shape of a pipeline benchmark: a GPT on a text, cut into `stages` ranks (threads of this
/// process over the TCP transport, each with its own `threads` CPU threads).
#[derive(Clone, Debug)]
pub struct PipelineBench {
    /// The job's model and data (`spec.training.model.gpt`, `spec.training.data`) as YAML
    /// lines under `training:`.
    pub model_yaml: String,
    /// Pipeline stages.
    pub stages: usize,
    /// Micro-batch counts to measure.
    pub micro: Vec<usize>,
    /// Sequences per micro-batch.
    pub micro_batch: usize,
    /// Schedules to measure.
    pub schedules: Vec<lockstep_api::training::PipelineSchedule>,
    /// Model chunks per stage for the interleaved schedule.
    pub chunks: usize,
    /// Untimed steps first.
    pub warmup: usize,
    /// Timed steps.
    pub steps: usize,
    /// CPU threads per stage.
    pub threads: usize,
    /// The engine.
    pub device: Device,
}

/// One measured configuration.
#[derive(Clone, Debug)]
pub struct PipelineRow {
    /// The schedule.
    pub schedule: lockstep_api::training::PipelineSchedule,
    /// Micro-batches.
    pub micro: usize,
    /// Chunks per stage.
    pub chunks: usize,
    /// Measured share of stage-time spent idle over the forward-backward phase (median).
    pub measured: f64,
    /// The simulator's share on the same plan with each stage's measured costs.
    pub simulated: f64,
    /// The published formula's share (unit costs).
    pub formula: f64,
    /// Median forward-backward phase (makespan), seconds.
    pub makespan: f64,
    /// Median step time, seconds.
    pub step: f64,
    /// Tokens per second of the whole pipeline.
    pub tokens_per_second: f64,
    /// Peak activation bytes per stage.
    pub activations: Vec<usize>,
    /// Each stage's mean cost per action (microseconds), as given to the simulator.
    pub costs: Vec<crate::pipeline::Costs>,
}

/// The published bubble of a schedule as a share of the step, with unit costs (ZB-H1: the
/// simulator's, with F = B = W).
fn formula_share(
    schedule: lockstep_api::training::PipelineSchedule,
    p: usize,
    m: usize,
    v: usize,
) -> f64 {
    use lockstep_api::training::PipelineSchedule as S;
    let (p, m, v) = (p as f64, m as f64, v as f64);
    match schedule {
        S::GPipe | S::OneFOneB => (p - 1.0) / (m + p - 1.0),
        S::Interleaved => (p - 1.0) / (v * m + p - 1.0),
        S::ZeroBubble => {
            let plan = crate::pipeline::plan(schedule, p as u32, m as u32, 1);
            plan.ok()
                .and_then(|pl| {
                    crate::pipeline::simulate(
                        &pl,
                        1,
                        &crate::pipeline::Costs::default(),
                        crate::pipeline::SendMode::Buffered,
                    )
                    .ok()
                })
                .map_or(f64::NAN, |r| r.bubble_share())
        }
    }
}

/// What one stage measured: its stats and step times of the timed steps, and the tokens of a
/// step.
type Measured = (
    Vec<crate::workload::pipeline::StageStats>,
    Vec<Duration>,
    u64,
);

/// Trains `steps` steps of one configuration and measures it.
fn pipeline_one(
    b: &PipelineBench,
    schedule: lockstep_api::training::PipelineSchedule,
    m: usize,
) -> Result<PipelineRow> {
    use crate::pipeline::{Costs, SendMode, plan, simulate_stages};
    use crate::workload::pipeline::StageStats;
    use lockstep_api::training::PipelineSchedule as S;
    let p = b.stages;
    let v = if schedule == S::Interleaved {
        b.chunks
    } else {
        1
    };
    let yaml = format!(
        r#"apiVersion: lockstep.dev/v1alpha1
kind: ParallelJob
metadata: {{name: bench-pipeline}}
spec:
  parallelism: {{dataParallel: 1, pipelineStages: {p}}}
  training:
    workload: Pipeline
{model}
    optimizer: {{learningRate: 0.0003, warmupSteps: 1}}
    batchSize: {batch}
    maxSteps: 1000000
    seed: 1
    pipeline: {{schedule: {schedule:?}, microBatches: {m}, chunksPerStage: {v}}}
  template:
    spec:
      containers: [{{name: worker, image: lockstep/worker:0.1.0}}]
"#,
        model = b.model_yaml,
        batch = b.micro_batch * m,
    );
    let job = lockstep_api::manifest::parse_job(&yaml).map_err(|e| anyhow::anyhow!("{e}"))?;
    let cfg =
        lockstep_api::config::WorkerConfig::from_job(&job).map_err(|e| anyhow::anyhow!("{e}"))?;
    let layout =
        lockstep_api::layout::Layout::new(1, p as u32).map_err(|e| anyhow::anyhow!("{e}"))?;
    let gang = TcpComm::local_gang(p, TcpOptions::default())?;
    let total = b.warmup + b.steps;
    let per_rank: Vec<Result<Measured>> = std::thread::scope(|s| {
        let handles: Vec<_> = gang
            .into_iter()
            .map(|comm| {
                let cfg = &cfg;
                s.spawn(move || -> Result<Measured> {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(b.threads.max(1))
                        .build()?;
                    pool.install(|| {
                        let mut topo = crate::topology::Topology::new(layout, comm)?;
                        let device = match b.device {
                            Device::Cpu => crate::device::Device::Cpu(lockstep_engine::cpu::Cpu),
                            #[cfg(feature = "cuda")]
                            Device::Cuda => crate::device::Device::Cuda {
                                backend: lockstep_engine::cuda::Cuda::new(
                                    0,
                                    lockstep_engine::Precision::Tf32,
                                )?,
                                nccl: None,
                            },
                            #[cfg(not(feature = "cuda"))]
                            Device::Cuda => bail!("this build has no CUDA backend"),
                        };
                        let mut work = crate::workload::build(cfg, device, &topo)?;
                        work.init(&mut topo)?;
                        let (mut stats, mut times, mut tokens) = (Vec::new(), Vec::new(), 0);
                        for step in 0..total as u64 {
                            topo.world.barrier()?;
                            let t0 = Instant::now();
                            let r = work.step(&mut topo, step, 3e-4)?;
                            let mut done = [0.0f32];
                            topo.world.all_reduce(&mut done, ReduceOp::Sum)?;
                            if step as usize >= b.warmup {
                                times.push(t0.elapsed());
                                stats.push(r.pipeline.unwrap_or_default());
                                tokens = r.tokens;
                            }
                        }
                        Ok((stats, times, tokens))
                    })
                })
            })
            .collect();
        join_all(handles)
    });
    let mut stages = Vec::with_capacity(p);
    for r in per_rank {
        stages.push(r?);
    }
    let tokens = stages[0].2;
    // Per timed step: the measured share, over the common time line of the stages.
    let mut shares = Vec::new();
    let mut spans = Vec::new();
    for i in 0..b.steps {
        let start = stages
            .iter()
            .filter_map(|s| s.0[i].phase.map(|x| x.0))
            .min();
        let end = stages
            .iter()
            .filter_map(|s| s.0[i].phase.map(|x| x.1))
            .max();
        let (Some(start), Some(end)) = (start, end) else {
            bail!("a stage measured no phase");
        };
        let makespan = end.duration_since(start).as_secs_f64();
        let busy: f64 = stages.iter().map(|s| s.0[i].busy.as_secs_f64()).sum();
        shares.push(1.0 - busy / (p as f64 * makespan));
        spans.push(makespan);
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    // Each stage's mean cost per action, in microseconds, for the simulator.
    let n = (m * v * b.steps) as f64;
    let us = |d: Duration| (d.as_secs_f64() * 1e6 / n).round().max(1.0) as u64;
    let costs: Vec<Costs> = stages
        .iter()
        .map(|s| {
            let sum = |f: fn(&StageStats) -> Duration| s.0.iter().map(f).sum::<Duration>();
            let (bwd, bi, bw) = (
                sum(|x| x.backward),
                sum(|x| x.backward_input),
                sum(|x| x.backward_weight),
            );
            Costs {
                forward: us(sum(|x| x.forward)),
                backward_input: if bwd.is_zero() { us(bi) } else { us(bwd) },
                backward_weight: if bwd.is_zero() { us(bw) } else { 0 },
                ..Costs::default()
            }
        })
        .collect();
    let pl = plan(schedule, p as u32, m as u32, v as u32)?;
    let sim = simulate_stages(&pl, v as u32, &costs, SendMode::Buffered)?;
    let step = med(stages[0].1.iter().map(Duration::as_secs_f64).collect());
    Ok(PipelineRow {
        schedule,
        micro: m,
        chunks: v,
        measured: med(shares),
        simulated: sim.bubble_share(),
        formula: formula_share(schedule, p, m, v),
        makespan: med(spans),
        step,
        tokens_per_second: tokens as f64 / step,
        activations: stages
            .iter()
            .map(|s| {
                s.0.iter()
                    .map(|x| x.peak_activation_bytes)
                    .max()
                    .unwrap_or(0)
            })
            .collect(),
        costs,
    })
}

/// Measures every schedule and micro-batch count of `b`, and prints one row each: the bubble
/// measured, simulated on the measured costs and by the formula, throughput and activation
/// memory per stage.
#[allow(clippy::print_stdout)] // the benchmark's output
pub fn pipeline(b: &PipelineBench) -> Result<()> {
    println!(
        "# pipeline, {} stages as threads ({} CPU thread(s) each), micro-batches of {} sequences; median of {} steps after {} warm-up",
        b.stages, b.threads, b.micro_batch, b.steps, b.warmup
    );
    println!(
        "# bubble = idle share of stage-time over the forward-backward phase: measured (one time line), simulated (same plan, each stage's measured F/B/W costs), formula (unit costs)"
    );
    println!(
        "{:<12} {:>3} {:>2} {:>9} {:>9} {:>8} {:>8} {:>10} {:>10} {:>12}  activations MiB per stage; F/B/W ms per stage",
        "schedule",
        "m",
        "v",
        "measured",
        "simulated",
        "gap",
        "formula",
        "phase_ms",
        "step_ms",
        "tokens/s"
    );
    for &schedule in &b.schedules {
        for &m in &b.micro {
            let v = if schedule == lockstep_api::training::PipelineSchedule::Interleaved {
                b.chunks
            } else {
                1
            };
            if schedule == lockstep_api::training::PipelineSchedule::Interleaved
                && !m.is_multiple_of(b.stages)
            {
                continue;
            }
            let r = pipeline_one(b, schedule, m)
                .with_context(|| format!("{schedule:?} with {m} micro-batches, {v} chunk(s)"))?;
            let act: Vec<String> = r
                .activations
                .iter()
                .map(|a| format!("{:.1}", *a as f64 / (1 << 20) as f64))
                .collect();
            let fbw: Vec<String> = r
                .costs
                .iter()
                .map(|c| {
                    let ms = |us: u64| us as f64 / 1e3;
                    format!(
                        "{:.2}/{:.2}/{:.2}",
                        ms(c.forward),
                        ms(c.backward_input),
                        ms(c.backward_weight)
                    )
                })
                .collect();
            println!(
                "{:<12} {:>3} {:>2} {:>8.1}% {:>8.1}% {:>+7.1}% {:>7.1}% {:>10.1} {:>10.1} {:>12.0}  {}; {}",
                format!("{:?}", r.schedule),
                r.micro,
                r.chunks,
                100.0 * r.measured,
                100.0 * r.simulated,
                100.0 * (r.measured - r.simulated) / r.simulated.max(1e-9),
                100.0 * r.formula,
                r.makespan * 1e3,
                r.step * 1e3,
                r.tokens_per_second,
                act.join(" "),
                fbw.join(" ")
            );
        }
    }
    Ok(())
}
