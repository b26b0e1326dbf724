//! `lockstep-worker local job.yaml`: the whole gang on one machine, without Kubernetes. Reads and
//! validates the manifest exactly as the API server would, writes the worker config, and starts
//! world-size processes with exactly the env contract the operator sets (rank 0's rendezvous on
//! 127.0.0.1): `lockstep-worker run` for the built-in workloads, the `worker` container's own
//! command for `Command` workloads. Shows one progress bar fed by rank 0's `/metrics`, prefixes
//! every rank's output with its rank (and its pipeline stage, for pipelines), forwards Ctrl-C,
//! and when a rank fails exits with the code of the first failure after the others have
//! stopped.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use lockstep_api::config::WorkerConfig;
use lockstep_api::contract::{ExitCode, env, operator};
use lockstep_api::layout::Layout;
use lockstep_api::spec::ParallelJob;
use lockstep_api::training::Workload;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// What `local` was asked to do.
#[derive(Clone, Debug)]
pub struct LocalOptions {
    /// The ParallelJob manifest.
    pub manifest: PathBuf,
    /// World size override (dataParallel becomes ranks / pipelineStages).
    pub ranks: Option<u32>,
    /// Show the progress bar (off when output is not a terminal).
    pub progress: bool,
    /// Where the run's files go (config, checkpoints); a fresh temporary directory by default.
    pub workdir: Option<PathBuf>,
    /// Weights to start from instead of the manifest's `spec.training.initFrom` (`import`).
    pub init_from: Option<PathBuf>,
}

/// How a rank ended.
#[derive(Clone, Debug)]
struct Ended {
    rank: u32,
    code: Option<i32>,
    signal: Option<i32>,
    at: Instant,
}

impl Ended {
    fn ok(&self) -> bool {
        self.code == Some(0)
    }

    fn describe(&self, builtin: bool) -> String {
        match (self.code, self.signal) {
            (Some(c), _) => match ExitCode::from_code(c).filter(|_| builtin) {
                Some(e) => format!("exit code {c} ({})", e.reason()),
                None => format!("exit code {c}"),
            },
            (None, Some(s)) => format!("killed by signal {s}"),
            (None, None) => "ended without a status".into(),
        }
    }
}

/// How output names `rank`: `rank 2`, or `rank 2 (stage 1)` in a job of several pipeline
/// stages.
fn rank_name(layout: &Layout, rank: u32) -> String {
    if layout.pipeline_stages() > 1 {
        format!("rank {rank} (stage {})", layout.stage_of(rank))
    } else {
        format!("rank {rank}")
    }
}

/// The prefix of `rank`'s output lines: `[rank 2]`, or `[rank 2 stage 1]` in a job of several
/// pipeline stages.
fn line_prefix(layout: &Layout, rank: u32) -> String {
    if layout.pipeline_stages() > 1 {
        format!("[rank {rank} stage {}]", layout.stage_of(rank))
    } else {
        format!("[rank {rank}]")
    }
}

/// The progress bar's message from rank 0's metrics: loss and throughput, and the bubble of
/// rank 0's stage when the job is a pipeline.
fn progress_message(
    loss: f64,
    samples_per_second: f64,
    bubble: Option<f64>,
    pipeline: bool,
) -> String {
    let mut m = format!("loss {loss:.4}  {samples_per_second:.0} samples/s/rank");
    if let Some(b) = bubble.filter(|_| pipeline) {
        m.push_str(&format!("  bubble {:.0}%", b * 100.0));
    }
    m
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

fn load(opts: &LocalOptions) -> Result<ParallelJob> {
    let text = std::fs::read_to_string(&opts.manifest)
        .with_context(|| format!("cannot read {}", opts.manifest.display()))?;
    let mut job = lockstep_api::validation::validate_yaml(&text)
        .with_context(|| format!("{} is not a valid ParallelJob", opts.manifest.display()))?;
    if let Some(n) = opts.ranks {
        let stages = job.spec.parallelism.pipeline_stages.max(1) as u32;
        if n == 0 || n % stages != 0 {
            bail!(
                "--ranks {n} must be a positive multiple of spec.parallelism.pipelineStages ({stages})"
            );
        }
        job.spec.parallelism.data_parallel = (n / stages) as i32;
    }
    if let Some(from) = &opts.init_from {
        let workload = job.spec.training.workload;
        if !matches!(workload, Workload::Ddp | Workload::Pipeline) {
            bail!(
                "{}: spec.training.workload is {workload:?}; only Ddp and Pipeline start from \
                 imported weights",
                opts.manifest.display()
            );
        }
        // The ranks run in this directory: an absolute path survives any later change of it.
        let from = std::path::absolute(from)
            .with_context(|| format!("cannot resolve {}", from.display()))?;
        job.spec.training.init_from = Some(from.to_string_lossy().into_owned());
    }
    Ok(job)
}

/// The command of the `worker` container for a Command workload.
fn user_command(job: &ParallelJob) -> Result<Vec<String>> {
    let (_, c) = job
        .spec
        .worker_container()
        .context("a Command workload needs a container named worker in spec.template")?;
    let mut argv: Vec<String> = c.command.clone().unwrap_or_default();
    argv.extend(c.args.clone().unwrap_or_default());
    if argv.is_empty() {
        bail!(
            "container {} has no command: local mode cannot use the image's entrypoint, set \
             command in spec.template",
            c.name
        );
    }
    Ok(argv)
}

/// Runs the gang; returns the process exit code.
pub async fn run(opts: LocalOptions) -> Result<i32> {
    let job = load(&opts)?;
    let p = &job.spec.parallelism;
    let layout = Layout::new(p.data_parallel as u32, p.pipeline_stages as u32)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let world = layout.world_size();
    let name = job.metadata.name.clone().unwrap_or_else(|| "local".into());
    let workdir = match &opts.workdir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("lockstep-{name}-{}", std::process::id())),
    };
    std::fs::create_dir_all(&workdir)
        .with_context(|| format!("cannot create {}", workdir.display()))?;
    let mut config = WorkerConfig::from_job(&job).map_err(|e| anyhow::anyhow!("{e}"))?;
    config.parallelism = job.spec.parallelism.clone();
    let config_path = workdir.join(operator::CONFIG_KEY);
    std::fs::write(&config_path, config.to_json())?;
    let checkpoints = workdir.join("checkpoints");
    std::fs::create_dir_all(&checkpoints)?;
    let token = format!("{:032x}", rand::random::<u128>());
    let (rdzv_port, torch_port) = (free_port()?, free_port()?);
    let metrics_ports: Vec<u16> = (0..world).map(|_| free_port()).collect::<Result<_>>()?;
    let builtin = job.spec.training.workload != Workload::Command;
    let argv = if builtin {
        vec![
            std::env::current_exe()?.to_string_lossy().into_owned(),
            "run".to_string(),
        ]
    } else {
        user_command(&job)?
    };
    eprintln!(
        "lockstep local: {name}: {world} rank(s) ({} x {} stages), workload {:?}, files in {}",
        p.data_parallel,
        p.pipeline_stages,
        job.spec.training.workload,
        workdir.display()
    );

    let bar = if opts.progress {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps {msg}",
        )
        .expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(200));

    // The ranks share this machine's cores: each gets its share for the CPU engine's threads,
    // unless RAYON_NUM_THREADS says otherwise.
    let rayon_threads = std::env::var_os("RAYON_NUM_THREADS").is_none().then(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / world as usize).max(1).to_string()
    });
    let mut children: Vec<(u32, Child)> = Vec::new();
    for rank in 0..world {
        let contract = env::RankEnv {
            job: name.clone(),
            // One job per working folder: a run in the same folder resumes the one before.
            job_uid: "local".into(),
            namespace: config.namespace.clone(),
            rank,
            world_size: world,
            attempt: 0,
            master_host: "127.0.0.1".into(),
            rendezvous_port: rdzv_port,
            torch_port,
            config: config_path.to_string_lossy().into_owned(),
            checkpoint_dir: checkpoints.to_string_lossy().into_owned(),
            metrics_port: metrics_ports[rank as usize],
            stage: layout.stage_of(rank),
            replica: layout.replica_of(rank),
        };
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .envs(contract.pairs())
            .envs(
                rayon_threads
                    .as_ref()
                    .map(|n| ("RAYON_NUM_THREADS", n.clone())),
            )
            .env(env::TOKEN, &token)
            .env(env::LOCAL_RANKS, world.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start rank {rank}: {}", argv.join(" ")))?;
        for out in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let bar = bar.clone();
            let prefix = line_prefix(&layout, rank);
            tokio::spawn(async move {
                let mut lines = BufReader::new(out).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let line = format!("{prefix} {line}");
                    if bar.is_hidden() {
                        eprintln!("{line}");
                    } else {
                        bar.println(line);
                    }
                }
            });
        }
        children.push((rank, child));
    }

    // Progress from rank 0's /metrics.
    if builtin {
        let bar = bar.clone();
        let url = format!("127.0.0.1:{}", metrics_ports[0]);
        let pipeline = layout.pipeline_stages() > 1;
        tokio::spawn(async move {
            loop {
                if let Some(text) = scrape(&url).await {
                    let get = |n| crate::metrics::scrape_value(&text, n);
                    if let Some(t) = get("lockstep_worker_total_steps") {
                        bar.set_length(t as u64);
                    }
                    if let Some(s) = get("lockstep_worker_step") {
                        bar.set_position(s as u64);
                    }
                    if let (Some(l), Some(sps)) = (
                        get("lockstep_worker_loss"),
                        get("lockstep_worker_samples_per_second"),
                    ) {
                        bar.set_message(progress_message(
                            l,
                            sps,
                            get("lockstep_worker_pipeline_bubble_ratio"),
                            pipeline,
                        ));
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }

    let code = supervise(children, builtin, &layout).await;
    bar.finish_and_clear();
    Ok(code)
}

/// Waits for every rank. After the first failure, built-in workers get 10 s to stop by
/// themselves (rank 0 aborts them within 5 s) before they are killed; the ranks of a Command
/// workload, which have no rendezvous to abort them, are killed at once. Ctrl-C is forwarded to
/// every rank. The summary names each failed rank as [`rank_name`] does.
async fn supervise(children: Vec<(u32, Child)>, builtin: bool, layout: &Layout) -> i32 {
    let grace = if builtin {
        Duration::from_secs(10)
    } else {
        Duration::ZERO
    };
    let world = children.len();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Ended>();
    let mut pids = Vec::new();
    let mut kills = Vec::new();
    for (rank, mut child) in children {
        pids.push(child.id());
        let (kill_tx, mut kill_rx) = tokio::sync::oneshot::channel::<()>();
        kills.push(kill_tx);
        let tx = tx.clone();
        tokio::spawn(async move {
            let status = tokio::select! {
                s = child.wait() => s,
                _ = &mut kill_rx => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            use std::os::unix::process::ExitStatusExt;
            let (code, signal) = match status {
                Ok(s) => (s.code(), s.signal()),
                Err(_) => (None, None),
            };
            let _ = tx.send(Ended {
                rank,
                code,
                signal,
                at: Instant::now(),
            });
        });
    }
    drop(tx);
    let mut ended: Vec<Ended> = Vec::new();
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut interrupted = false;
    while ended.len() < world {
        let next = async {
            match deadline {
                Some(d) => tokio::time::timeout_at(d, rx.recv()).await.ok().flatten(),
                None => rx.recv().await,
            }
        };
        tokio::select! {
            e = next => match e {
                Some(e) => {
                    if !e.ok() && deadline.is_none() {
                        deadline = Some(tokio::time::Instant::now() + grace);
                    }
                    ended.push(e);
                }
                None => {
                    // The grace period is over: kill whatever still runs.
                    for k in kills.drain(..) {
                        let _ = k.send(());
                    }
                    deadline = None;
                }
            },
            _ = tokio::signal::ctrl_c(), if !interrupted => {
                interrupted = true;
                eprintln!("lockstep local: interrupted: stopping every rank");
                for pid in pids.iter().flatten() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(*pid as i32),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                }
                deadline = Some(tokio::time::Instant::now() + Duration::from_secs(10));
            }
        }
    }
    if interrupted {
        eprintln!("lockstep local: interrupted");
        return 130;
    }
    let mut failed: Vec<&Ended> = ended.iter().filter(|e| !e.ok()).collect();
    if failed.is_empty() {
        eprintln!("lockstep local: all {world} rank(s) succeeded");
        return 0;
    }
    // The first failure is the earliest that is not a secondary one (aborted because of a peer).
    failed.sort_by_key(|e| e.at);
    let secondary = |e: &&Ended| builtin && e.code == Some(ExitCode::PeerFailed.code());
    let first = failed
        .iter()
        .find(|e| !secondary(e))
        .or(failed.first())
        .expect("at least one failure");
    eprintln!(
        "lockstep local: {} failed first: {}; {} rank(s) failed in all",
        rank_name(layout, first.rank),
        first.describe(builtin),
        failed.len()
    );
    for e in failed.iter().filter(|e| e.rank != first.rank) {
        eprintln!(
            "lockstep local:   {}: {}",
            rank_name(layout, e.rank),
            e.describe(builtin)
        );
    }
    match (first.code, first.signal) {
        (Some(c), _) if c != 0 => c,
        (_, Some(s)) => 128 + s,
        _ => 1,
    }
}

async fn scrape(addr: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(
        Duration::from_millis(300),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .ok()?
    .ok()?;
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(1), s.read_to_string(&mut body))
        .await
        .ok()?
        .ok()?;
    Some(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_are_named_with_their_stage_only_in_pipelines() {
        let ddp = Layout::new(4, 1).expect("layout");
        assert_eq!(line_prefix(&ddp, 2), "[rank 2]");
        assert_eq!(rank_name(&ddp, 2), "rank 2");
        let pp = Layout::new(2, 3).expect("layout");
        assert_eq!(line_prefix(&pp, 0), "[rank 0 stage 0]");
        assert_eq!(line_prefix(&pp, 3), "[rank 3 stage 1]");
        assert_eq!(rank_name(&pp, 5), "rank 5 (stage 2)");
    }

    #[test]
    fn the_progress_shows_the_bubble_of_pipelines_only() {
        assert_eq!(
            progress_message(1.23456, 455.6, None, false),
            "loss 1.2346  456 samples/s/rank"
        );
        assert_eq!(
            progress_message(1.23456, 455.6, Some(0.0), false),
            "loss 1.2346  456 samples/s/rank"
        );
        assert_eq!(
            progress_message(1.23456, 455.6, Some(0.1234), true),
            "loss 1.2346  456 samples/s/rank  bubble 12%"
        );
        assert_eq!(
            progress_message(1.23456, 455.6, None, true),
            "loss 1.2346  456 samples/s/rank"
        );
    }
}
