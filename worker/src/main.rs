//! `lockstep-worker`: `run` (one rank, as the operator starts it), `local` (a whole gang on this
//! machine) and `bench allreduce`.

use std::path::PathBuf;
use std::process::ExitCode as ProcessExit;
use std::time::Duration;

use clap::{Parser, Subcommand};
use lockstep_api::contract::ExitCode;
use lockstep_worker::bench::{self, Backend, Device};
use lockstep_worker::{hf, local, rendezvous, runtime};

#[derive(Parser, Debug)]
#[command(name = "lockstep-worker", version, about = "The Lockstep worker")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run one rank of a gang; everything comes from the env contract (LOCKSTEP_*).
    Run {
        /// Seconds to wait for every rank to join (rank 0) or to reach rank 0 (the others).
        #[arg(long, default_value_t = 300)]
        join_timeout: u64,
        /// Milliseconds of heartbeat silence after which a rank is declared failed.
        #[arg(long, default_value_t = 3000)]
        heartbeat_timeout_ms: u64,
        /// Seconds a collective may wait on one peer before it is declared lost.
        #[arg(long, default_value_t = 30)]
        comm_timeout: u64,
    },
    /// Run a ParallelJob on this machine, one process per rank, without Kubernetes.
    Local(LocalArgs),
    /// Write a checkpoint's GPT as a Hugging Face GPT-2 directory (model.safetensors,
    /// config.json) that transformers' GPT2LMHeadModel.from_pretrained loads.
    Export {
        /// A checkpoint file, any shard of a pipeline step (its other shards are read too), or a
        /// folder of checkpoints (its newest complete one).
        checkpoint: PathBuf,
        /// The directory to write.
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Run a ParallelJob on this machine (as `local` does) starting from the weights of a
    /// Hugging Face GPT-2 directory or a Lockstep checkpoint: fine-tuning. In a cluster, set
    /// spec.training.initFrom instead.
    Import {
        /// The weights: a directory with config.json and model.safetensors, or a checkpoint.
        from: PathBuf,
        /// The run.
        #[command(flatten)]
        local: LocalArgs,
    },
    /// The next-token logits of a GPT (a Hugging Face directory or a checkpoint) on a sequence
    /// of token ids, computed by the engine on the CPU, written as a safetensors file
    /// (`logits`: tokens x vocabulary).
    Logits {
        /// A Hugging Face GPT-2 directory, a checkpoint file or a folder of checkpoints.
        model: PathBuf,
        /// Token ids, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        ids: Vec<i32>,
        /// The file to write.
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

/// What `local` and `import` run.
#[derive(clap::Args, Debug)]
struct LocalArgs {
    /// The ParallelJob manifest (data paths are relative to the current directory).
    manifest: PathBuf,
    /// World size to use instead of the manifest's (dataParallel = ranks / stages).
    #[arg(long)]
    ranks: Option<u32>,
    /// No progress bar (the default when standard error is not a terminal).
    #[arg(long)]
    no_progress: bool,
    /// Directory for the run's config and checkpoints (default: a new temporary one).
    #[arg(long)]
    workdir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum BenchCmd {
    /// All-reduce time and bandwidth per message size (nccl-tests style).
    Allreduce {
        /// Number of ranks.
        #[arg(long, default_value_t = 2)]
        ranks: usize,
        /// Sizes as FIRST:LAST with K/M/G suffixes.
        #[arg(long, default_value = "1K:256M")]
        sizes: String,
        /// Each size is the previous times this factor.
        #[arg(long, default_value_t = 2)]
        factor: usize,
        /// Transport.
        #[arg(long, value_enum, default_value_t = Backend::Tcp)]
        backend: Backend,
    },
    /// GPT training throughput (tokens/s, MFU) of the engine on random tokens.
    Gpt {
        /// Backend.
        #[arg(long, value_enum, default_value_t = Device::Cpu)]
        device: Device,
        /// Transformer blocks.
        #[arg(long, default_value_t = 4)]
        layers: usize,
        /// Attention heads.
        #[arg(long, default_value_t = 4)]
        heads: usize,
        /// Residual width.
        #[arg(long, default_value_t = 128)]
        embed: usize,
        /// Tokens per sequence (and the context length).
        #[arg(long, default_value_t = 128)]
        seq: usize,
        /// Sequences per step.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Vocabulary size (65 is tinyshakespeare's characters, 50257 GPT-2's).
        #[arg(long, default_value_t = 65)]
        vocab: usize,
        /// Untimed steps.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Timed steps.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// The arithmetic: TF32 tensor-core GEMMs (FP32 on the CPU), FP32, or bf16 activations
        /// and GEMM operands with FP32 sums (emulated on the CPU).
        #[arg(long, value_enum, default_value_t = bench::GemmPrecision::Tf32)]
        precision: bench::GemmPrecision,
        /// Peak FLOP/s for MFU, in TFLOP/s (H100 SXM dense TF32: 494.7).
        #[arg(long, default_value_t = 0.0)]
        peak_tflops: f64,
        /// Also print the device time of each primitive (3 more steps, each call synchronised).
        #[arg(long)]
        profile: bool,
        /// Attention through the fused kernels (flash-attention's algorithm: no t x t matrix).
        #[arg(long)]
        fused_attention: bool,
        /// The fused element-wise kernels: bias + GELU, residual + layer norm (same results).
        #[arg(long)]
        fused_ops: bool,
    },
    /// Pipeline schedules on a GPT: the bubble measured, simulated on the measured costs and by
    /// the formula; tokens/s; activation memory per stage.
    Pipeline {
        /// Backend.
        #[arg(long, value_enum, default_value_t = Device::Cpu)]
        device: Device,
        /// Pipeline stages (ranks, as threads of this process).
        #[arg(long, default_value_t = 2)]
        stages: usize,
        /// Micro-batch counts, comma-separated.
        #[arg(long, default_value = "4,8,16", value_delimiter = ',')]
        micro: Vec<usize>,
        /// Sequences per micro-batch.
        #[arg(long, default_value_t = 2)]
        micro_batch: usize,
        /// Schedules, comma-separated (GPipe, OneFOneB, Interleaved, ZeroBubble).
        #[arg(
            long,
            default_value = "GPipe,OneFOneB,Interleaved,ZeroBubble",
            value_delimiter = ','
        )]
        schedules: Vec<String>,
        /// Model chunks per stage for Interleaved.
        #[arg(long, default_value_t = 2)]
        chunks: usize,
        /// Transformer blocks.
        #[arg(long, default_value_t = 4)]
        layers: usize,
        /// Attention heads.
        #[arg(long, default_value_t = 4)]
        heads: usize,
        /// Residual width.
        #[arg(long, default_value_t = 128)]
        embed: usize,
        /// Tokens per sequence (and the context length).
        #[arg(long, default_value_t = 128)]
        seq: usize,
        /// The text to train on.
        #[arg(long, default_value = "data/tinyshakespeare.txt.gz")]
        data: String,
        /// CPU threads per stage.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Untimed steps.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Timed steps.
        #[arg(long, default_value_t = 5)]
        steps: usize,
    },
    /// Which CUDA libraries load here (driver, NVML, cuBLAS, NVRTC, NCCL), from which files and
    /// at which versions, and the engine's kernels compiled by NVRTC (no GPU needed); fails when
    /// cuBLAS, NVRTC or NCCL does not load or the kernels do not compile.
    CudaLibs {
        /// The architecture to compile the kernels for.
        #[arg(long, default_value = "sm_90")]
        arch: String,
        /// Fail also when the driver's libraries (libcuda, libnvidia-ml) do not load.
        #[arg(long)]
        require_driver: bool,
    },
    /// The CUDA backend against the CPU reference, primitive by primitive and on GPT steps.
    EngineCheck {
        /// The CUDA GEMMs' arithmetic (TF32: looser tolerances; bf16: against the CPU's
        /// emulation of bf16).
        #[arg(long, value_enum, default_value_t = bench::GemmPrecision::Fp32)]
        precision: bench::GemmPrecision,
    },
}

/// `local` and `import`: runs the gang on this machine.
fn run_local(args: LocalArgs, init_from: Option<PathBuf>) -> ProcessExit {
    use std::io::IsTerminal;
    let opts = local::LocalOptions {
        manifest: args.manifest,
        ranks: args.ranks,
        progress: !args.no_progress && std::io::stderr().is_terminal(),
        workdir: args.workdir,
        init_from,
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lockstep local: cannot start: {e}");
            return ProcessExit::from(ExitCode::Internal.code() as u8);
        }
    };
    match rt.block_on(local::run(opts)) {
        Ok(code) => ProcessExit::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("lockstep local: {e:#}");
            ProcessExit::from(ExitCode::Config.code() as u8)
        }
    }
}

/// `logits`: the engine's logits of `model` on `ids`, written to `out`.
fn write_logits(model: &std::path::Path, ids: &[i32], out: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    let (config, logits) = hf::logits(model, ids)?;
    let view = safetensors::tensor::TensorView::new(
        safetensors::Dtype::F32,
        vec![ids.len(), config.vocab],
        bytemuck::cast_slice(&logits),
    )?;
    let bytes = safetensors::serialize([("logits", view)], None)?;
    std::fs::write(out, bytes).with_context(|| format!("cannot write {}", out.display()))
}

fn main() -> ProcessExit {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ProcessExit::from(if e.use_stderr() {
                ExitCode::Usage.code() as u8
            } else {
                0
            });
        }
    };
    match cli.command {
        Cmd::Run {
            join_timeout,
            heartbeat_timeout_ms,
            comm_timeout,
        } => {
            let opts = runtime::RunOptions {
                rendezvous: rendezvous::Options {
                    join_timeout: Duration::from_secs(join_timeout),
                    heartbeat_timeout: Duration::from_millis(heartbeat_timeout_ms),
                    ..rendezvous::Options::default()
                },
                comm_timeout: Duration::from_secs(comm_timeout),
                ..runtime::RunOptions::default()
            };
            ProcessExit::from(runtime::run(opts).code() as u8)
        }
        Cmd::Local(local) => run_local(local, None),
        Cmd::Import { from, local } => run_local(local, Some(from)),
        Cmd::Export { checkpoint, out } => match hf::export(&checkpoint, &out) {
            Ok(e) => {
                let c = e.config;
                eprintln!(
                    "exported step {} of a GPT ({} layers, {} heads, {} wide, context {}, \
                     vocabulary {}) from {} to {}: load it with \
                     transformers.GPT2LMHeadModel.from_pretrained(\"{}\")",
                    e.step,
                    c.layers,
                    c.heads,
                    c.channels,
                    c.max_seq,
                    c.vocab,
                    e.from
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    out.display(),
                    out.display()
                );
                ProcessExit::SUCCESS
            }
            Err(e) => {
                eprintln!("lockstep-worker export: {e}");
                ProcessExit::from(lockstep_worker::error::WorkError::from(e).code.code() as u8)
            }
        },
        Cmd::Logits { model, ids, out } => match write_logits(&model, &ids, &out) {
            Ok(()) => ProcessExit::SUCCESS,
            Err(e) => {
                eprintln!("lockstep-worker logits: {e:#}");
                ProcessExit::from(ExitCode::Config.code() as u8)
            }
        },
        Cmd::Bench {
            what:
                BenchCmd::Allreduce {
                    ranks,
                    sizes,
                    factor,
                    backend,
                },
        } => bench_exit(bench_allreduce(ranks, &sizes, factor, backend)),
        Cmd::Bench {
            what:
                BenchCmd::Gpt {
                    device,
                    layers,
                    heads,
                    embed,
                    seq,
                    batch,
                    vocab,
                    warmup,
                    steps,
                    precision,
                    peak_tflops,
                    profile,
                    fused_attention,
                    fused_ops,
                },
        } => bench_exit((|| {
            let config =
                lockstep_engine::models::gpt::GptConfig::new(layers, heads, embed, seq, vocab)?;
            bench::gpt(
                device,
                &bench::GptBench {
                    config,
                    batch,
                    seq,
                    warmup,
                    steps,
                    precision,
                    peak: peak_tflops * 1e12,
                    profile,
                    fused_attention,
                    fused_ops,
                },
            )
        })()),
        Cmd::Bench {
            what:
                BenchCmd::Pipeline {
                    device,
                    stages,
                    micro,
                    micro_batch,
                    schedules,
                    chunks,
                    layers,
                    heads,
                    embed,
                    seq,
                    data,
                    threads,
                    warmup,
                    steps,
                },
        } => bench_exit((|| {
            let schedules = schedules
                .iter()
                .map(|s| {
                    serde_json::from_value(serde_json::Value::String(s.clone())).map_err(|_| {
                        anyhow::anyhow!(
                            "unknown schedule {s}: GPipe, OneFOneB, Interleaved or ZeroBubble"
                        )
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            bench::pipeline(&bench::PipelineBench {
                model_yaml: format!(
                    "    model: {{gpt: {{layers: {layers}, heads: {heads}, embedDim: {embed}, contextLength: {seq}}}}}\n    data: {{kind: Text, path: \"{data}\"}}"
                ),
                stages,
                micro,
                micro_batch,
                schedules,
                chunks,
                warmup,
                steps,
                threads,
                device,
            })
        })()),
        #[cfg(feature = "cuda")]
        Cmd::Bench {
            what:
                BenchCmd::CudaLibs {
                    arch,
                    require_driver,
                },
        } => bench_exit(bench::cuda_libs(arch.leak(), require_driver)),
        #[cfg(not(feature = "cuda"))]
        Cmd::Bench {
            what: BenchCmd::CudaLibs { .. },
        } => bench_exit(Err(anyhow::anyhow!(
            "this build does not load CUDA: rebuild with the cuda feature"
        ))),
        #[cfg(feature = "cuda")]
        Cmd::Bench {
            what: BenchCmd::EngineCheck { precision },
        } => bench_exit(bench::engine_check(precision)),
        #[cfg(not(feature = "cuda"))]
        Cmd::Bench {
            what: BenchCmd::EngineCheck { .. },
        } => bench_exit(Err(anyhow::anyhow!(
            "this build has no CUDA backend: rebuild with the cuda feature"
        ))),
    }
}

fn bench_exit(r: anyhow::Result<()>) -> ProcessExit {
    match r {
        Ok(()) => ProcessExit::SUCCESS,
        Err(e) => {
            eprintln!("lockstep bench: {e:#}");
            ProcessExit::from(ExitCode::Internal.code() as u8)
        }
    }
}

fn bench_allreduce(
    ranks: usize,
    sizes: &str,
    factor: usize,
    backend: Backend,
) -> anyhow::Result<()> {
    let sizes = bench::parse_sizes(sizes, factor)?;
    match backend {
        Backend::Tcp => {
            // The plain link (one stream), and the link under the ring's own traffic (every rank
            // sending to the next at once), which is what a ring step can get at best.
            // Each probe is the median of three, as this kind of machine is noisy.
            let median = |streams: usize, bytes: usize| -> anyhow::Result<f64> {
                let mut v = (0..3)
                    .map(|_| bench::probe_loopback(streams, bytes))
                    .collect::<anyhow::Result<Vec<f64>>>()?;
                v.sort_by(f64::total_cmp);
                Ok(v[1])
            };
            let single = median(1, 1 << 30)?;
            let ring = median(ranks.max(2), 512 << 20)?;
            let rows = bench::tcp_allreduce(ranks, &sizes)?;
            bench::print_table(
                &format!(
                    "all_reduce, TCP ring, {ranks} ranks on 127.0.0.1, float32 sum, median of each size; one stream alone: {:.2} GB/s",
                    single / 1e9
                ),
                &rows,
                Some((
                    ring,
                    &format!("per stream, {} streams in a ring at once", ranks.max(2)),
                )),
            );
            Ok(())
        }
        #[cfg(feature = "cuda")]
        Backend::Nccl => {
            let rows = bench::nccl_allreduce(ranks, &sizes)?;
            bench::print_table(
                &format!("all_reduce, NCCL, {ranks} GPU rank(s), float32 sum"),
                &rows,
                None,
            );
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        Backend::Nccl => anyhow::bail!("this build has no NCCL: rebuild with the cuda feature"),
    }
}
