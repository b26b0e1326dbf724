//! Benchmark of the operator against the real control plane (not a test; prints figures).
//!
//! Starts a private cluster with `NODES` fake nodes (default 200), runs the operator binary given
//! as the first argument as its own process, and measures in one run:
//! 1. `JOBS` ParallelJobs (default 100) of `RANKS` ranks (default 8), `GPUS` GPUs per rank
//!    (default 0), applied at once: seconds until every pod runs and every job is Running, pods
//!    per second (every job goes through Builtin gang admission: gated, pinned, released);
//! 2. the API floor: the same number of pods created directly (same concurrency as the operator's
//!    writes), seconds until all run;
//! 3. the operator's CPU seconds and peak resident memory (from /proc).
//!
//!     bench-operator target/release/lockstep-operator

#![allow(clippy::print_stdout)] // a benchmark prints its figures

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, ListParams, PostParams};
use lockstep_api::ParallelJob;
use lockstep_e2e::repo_root;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// (CPU seconds, peak RSS in MiB) of a process.
fn usage(pid: u32) -> Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hwm_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .context("VmHWM")?
        .parse()?;
    Ok((ticks / 100.0, hwm_kib / 1024.0))
}

/// Pods that exist, are bound to a node, and run.
async fn count_pods(pods: &Api<Pod>) -> Result<(usize, usize, usize)> {
    let list = pods.list(&ListParams::default()).await?;
    let bound = |p: &&Pod| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some();
    let running = |p: &&Pod| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
    Ok((
        list.items.len(),
        list.items.iter().filter(bound).count(),
        list.items.iter().filter(running).count(),
    ))
}

/// Waits until `want` pods run; returns when they all existed, were all bound, and all ran
/// (time since `start`), to tell the operator's part from the scheduler's and the nodes'.
async fn wait_running(
    pods: &Api<Pod>,
    want: usize,
    limit: Duration,
    start: Instant,
) -> Result<[Duration; 3]> {
    let mut seen: [Option<Duration>; 3] = [None; 3];
    let seen_ref = std::sync::Mutex::new(&mut seen);
    lockstep_e2e::wait_until(limit, &format!("{want} pods run"), || async {
        let (n, bound, running) = count_pods(pods).await?;
        let mut s = seen_ref.lock().unwrap_or_else(|e| e.into_inner());
        for (i, c) in [n, bound, running].into_iter().enumerate() {
            if c >= want && s[i].is_none() {
                s[i] = Some(start.elapsed());
            }
        }
        Ok(running >= want)
    })
    .await?;
    Ok(seen.map(|d| d.unwrap_or_default()))
}

async fn namespace(client: &kube::Client, name: &str) -> Result<()> {
    let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let operator = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: bench-operator OPERATOR_BINARY")?,
    );
    let (nodes, jobs_n, ranks, gpus) = (
        env_or("NODES", 200),
        env_or("JOBS", 100),
        env_or("RANKS", 8),
        env_or("GPUS", 0),
    );
    let root = repo_root();
    let state = root.join(format!("target/bench-cluster-{}", std::process::id()));
    let up = std::process::Command::new(root.join("e2e/cluster/up.sh"))
        .env("STATE", &state)
        .env("NODES", nodes.to_string())
        .output()?;
    if !up.status.success() {
        bail!("cluster-up failed: {}", String::from_utf8_lossy(&up.stderr));
    }
    let kubeconfig = state.join("kubeconfig");
    let result = run(&operator, &kubeconfig, nodes, jobs_n, ranks, gpus).await;
    let _ = std::process::Command::new(root.join("e2e/cluster/down.sh"))
        .env("STATE", &state)
        .output();
    let _ = std::fs::remove_dir_all(&state);
    result
}

async fn run(
    operator: &PathBuf,
    kubeconfig: &PathBuf,
    nodes: usize,
    jobs_n: usize,
    ranks: usize,
    gpus: usize,
) -> Result<()> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    let client = kube::Client::try_from(config)?;
    let bin = PathBuf::from(
        String::from_utf8(
            std::process::Command::new(repo_root().join("e2e/cluster/build.sh"))
                .output()?
                .stdout,
        )?
        .trim(),
    );
    let cluster = lockstep_e2e::Cluster {
        client: client.clone(),
        kubeconfig: kubeconfig.clone(),
        bin,
        logs: kubeconfig.with_file_name("logs"),
    };
    cluster.install_crd().await?;

    let mut child = tokio::process::Command::new(operator)
        .args(["--metrics-addr", "127.0.0.1:0"])
        // Extra operator flags, to compare settings: OPERATOR_ARGS="--concurrency 64".
        .args(
            std::env::var("OPERATOR_ARGS")
                .unwrap_or_default()
                .split_whitespace(),
        )
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting the operator")?;
    let pid = child.id().context("operator pid")?;
    let (cpu0, _) = usage(pid)?;

    // 1. Through the operator.
    namespace(&client, "bench-jobs").await?;
    let template = lockstep_e2e::example_manifest("ddp-digits.yaml")?;
    let jobs: Api<ParallelJob> = Api::namespaced(client.clone(), "bench-jobs");
    let start = Instant::now();
    futures::stream::iter(0..jobs_n)
        .map(|i| {
            let jobs = jobs.clone();
            let mut v = template.clone();
            async move {
                v["metadata"]["name"] = format!("job-{i:03}").into();
                v["spec"]["parallelism"]["dataParallel"] = ranks.into();
                v["spec"]["parallelism"]["gpusPerWorker"] = gpus.into();
                v["spec"]["template"]["spec"]["containers"][0]["resources"] =
                    serde_json::json!({"requests": {"cpu": "100m", "memory": "64Mi"}});
                let job: ParallelJob = serde_json::from_value(v)?;
                jobs.create(&PostParams::default(), &job).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<()>>>()?;
    let applied = start.elapsed();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "bench-jobs");
    let op_phases = wait_running(&pods, jobs_n * ranks, Duration::from_secs(900), start).await?;
    let through_operator = start.elapsed();
    let (cpu1, peak) = usage(pid)?;
    let _ = child.kill().await;

    // 2. The API floor: the same pods, created directly.
    namespace(&client, "bench-floor").await?;
    let direct: Api<Pod> = Api::namespaced(client.clone(), "bench-floor");
    let start = Instant::now();
    futures::stream::iter(0..jobs_n * ranks)
        .map(|i| {
            let direct = direct.clone();
            async move {
                let pod: Pod = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": format!("pod-{i:04}")},
                    "spec": {"containers": [{"name": "worker", "image": "lockstep/worker:0.1.0",
                        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"},
                            "limits": if gpus > 0 {
                                serde_json::json!({"nvidia.com/gpu": gpus.to_string()})
                            } else {
                                serde_json::json!({})
                            }}}]}
                }))?;
                direct.create(&PostParams::default(), &pod).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(lockstep_operator::controller::WRITE_CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<()>>>()?;
    let floor_phases =
        wait_running(&direct, jobs_n * ranks, Duration::from_secs(900), start).await?;
    let floor = start.elapsed();

    let pods_n = (jobs_n * ranks) as f64;
    println!(
        "operator benchmark: {nodes} fake nodes, {jobs_n} jobs x {ranks} ranks x {gpus} GPUs = {} pods",
        jobs_n * ranks
    );
    println!(
        "  jobs applied in              {:>8.2} s",
        applied.as_secs_f64()
    );
    println!(
        "  apply -> all pods Running    {:>8.2} s  ({:.0} pods/s)",
        through_operator.as_secs_f64(),
        pods_n / through_operator.as_secs_f64()
    );
    println!(
        "  API floor (pods created directly, {} at a time) {:>6.2} s  ({:.0} pods/s)",
        lockstep_operator::controller::WRITE_CONCURRENCY,
        floor.as_secs_f64(),
        pods_n / floor.as_secs_f64()
    );
    let phases = |p: [Duration; 3]| {
        format!(
            "all created {:.2} s, all bound {:.2} s, all Running {:.2} s",
            p[0].as_secs_f64(),
            p[1].as_secs_f64(),
            p[2].as_secs_f64()
        )
    };
    println!("  through the operator: {}", phases(op_phases));
    println!("  directly:             {}", phases(floor_phases));
    println!(
        "  operator / floor             {:>8.2}x",
        through_operator.as_secs_f64() / floor.as_secs_f64()
    );
    println!(
        "  operator CPU                 {:>8.2} s  (peak RSS {peak:.1} MiB)",
        cpu1 - cpu0
    );
    Ok(())
}
