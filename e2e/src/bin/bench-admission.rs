//! Benchmark of the admission decision alone (not a test; prints figures): no API server, the
//! operator's own [`Admitter`] over caches filled with `NODES` fake nodes of 8 GPUs (default
//! 1,000), pods that keep most of them busy, and `JOBS` queued ParallelJobs (default 500) of
//! mixed shapes, priorities and topology constraints. Each decision is one `request` of a queued
//! job: snapshot of the caches, queue order, placement of every gang that may go.
//!
//!     bench-admission            (NODES=1000 JOBS=500 DECISIONS=300)
//!     NODES=20000 JOBS=5000 bench-admission      (the scale of the largest clusters)
//!
//! It prints the decision's p50, p99 and max, and the process's peak resident memory. A third
//! part makes the decisions again while nodes report their status: `HEARTBEATS` new versions of
//! nodes (default `NODES / 300`, every node once in 5 minutes at one decision a second, as
//! kubelets report) reach the node cache before each decision, changing nothing admission reads.

#![allow(clippy::print_stdout)] // a benchmark prints its figures

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::scheduling::v1::PriorityClass;
use kube::api::{ApiResource, DynamicObject};
use lockstep_api::ParallelJob;
use lockstep_operator::gang::Outcome;
use lockstep_operator::gang::admitter::{Admitter, filled_store, filled_writer};
use lockstep_operator::gang::placement::Shape;
use lockstep_operator::gang::queue::{Explain, Waiting, cycle};
use lockstep_operator::gang::snapshot::{NodeInfo, NodeRules, Snapshot};
use lockstep_operator::metrics::Metrics;

const CLASSES: [&str; 3] = ["low", "mid", "high"];

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A small deterministic generator (xorshift), so every run measures the same cluster.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn quantiles(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
    (at(0.5), at(0.99), at(1.0))
}

fn main() -> Result<()> {
    let (nodes_n, jobs_n, decisions) = (
        env_or("NODES", 1000),
        env_or("JOBS", 500),
        env_or("DECISIONS", 300),
    );
    let heartbeats = env_or("HEARTBEATS", (nodes_n / 300).max(1));
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let nodes: Vec<Node> = (0..nodes_n)
        .map(|i| {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("node-{i:05}"), "labels": {
                    "kubernetes.io/hostname": format!("node-{i:05}"),
                    "topology.lockstep.dev/rack": format!("rack-{}", i / 16)}},
                "status": {"allocatable": {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": "8"}}
            }))
        })
        .collect::<Result<_, _>>()?;
    // Busy pods: about 85% of the GPUs taken, in pieces of 1 to 8.
    let mut pods = Vec::new();
    for i in 0..nodes_n {
        let mut free = 8;
        while free > 0 && rng.below(100) < 85 {
            let g = (1 + rng.below(free)).min(free);
            free -= g;
            pods.push(serde_json::from_value::<Pod>(serde_json::json!({
                "metadata": {"name": format!("busy-{}", pods.len()), "namespace": "busy"},
                "spec": {"nodeName": format!("node-{i:05}"), "containers": [{"name": "c",
                    "resources": {"limits": {"nvidia.com/gpu": g.to_string()}, "requests": {"cpu": "1"}}}]},
                "status": {"phase": "Running"}
            }))?);
        }
    }
    let classes: Vec<PriorityClass> = [("low", 10), ("mid", 100), ("high", 1000)]
        .iter()
        .map(|(n, v)| {
            serde_json::from_value(serde_json::json!({"metadata": {"name": n}, "value": v}))
        })
        .collect::<Result<_, _>>()?;
    let template = lockstep_e2e::example_manifest("ddp-digits.yaml")?;
    let ar = ApiResource::erase::<ParallelJob>(&());
    let mut jobs = Vec::new();
    for i in 0..jobs_n {
        let mut v = template.clone();
        v["metadata"]["name"] = format!("job-{i:03}").into();
        v["metadata"]["namespace"] = "bench".into();
        v["metadata"]["uid"] = format!("uid-{i}").into();
        v["metadata"]["resourceVersion"] = "1".into();
        v["metadata"]["creationTimestamp"] =
            format!("2026-11-27T00:{:02}:{:02}Z", i / 60 % 60, i % 60).into();
        let (ranks, gpus) = (1 + rng.below(16), [1, 2, 4, 8][rng.below(4) as usize]);
        v["spec"]["parallelism"] =
            serde_json::json!({"dataParallel": ranks, "gpusPerWorker": gpus});
        v["spec"]["scheduling"] =
            serde_json::json!({"priorityClassName": CLASSES[rng.below(3) as usize]});
        if rng.below(10) == 0 {
            v["spec"]["scheduling"]["topology"] =
                serde_json::json!({"key": "topology.lockstep.dev/rack", "mode": "Required"});
        }
        v["apiVersion"] = "lockstep.dev/v1alpha1".into();
        v["kind"] = "ParallelJob".into();
        let job: ParallelJob = serde_json::from_value(v.clone())?;
        let mut raw: DynamicObject = serde_json::from_value(v)?;
        raw.types = Some(kube::api::TypeMeta {
            api_version: ar.api_version.clone(),
            kind: ar.kind.clone(),
        });
        jobs.push((job, raw));
    }

    // 1. The pure cycle: a snapshot and the whole queue.
    let mut snapshot = Snapshot::new(nodes.iter().map(NodeInfo::from_node).collect());
    for p in &pods {
        let spec = p.spec.clone().unwrap_or_default();
        let node = spec.node_name.clone().unwrap_or_default();
        snapshot.take(&node, &lockstep_operator::gang::demand::pod_request(&spec));
    }
    let queue: Vec<Waiting> = jobs
        .iter()
        .enumerate()
        .map(|(i, (j, _))| {
            let ctx = lockstep_operator::resources::JobContext::new(j).expect("a valid job");
            let spec = ctx
                .pod(0, 0, "", true, None)
                .expect("a pod")
                .spec
                .unwrap_or_default();
            Waiting {
                key: format!("bench/{}", j.metadata.name.clone().unwrap_or_default()),
                priority: [10, 100, 1000][i % 3],
                created: i as i64,
                shape: Arc::new(Shape {
                    replicas: ctx.layout.data_parallel(),
                    stages: 1,
                    request: lockstep_operator::gang::demand::pod_request(&spec),
                    topology: j
                        .spec
                        .scheduling
                        .topology
                        .as_ref()
                        .map(|t| (t.key.clone(), true)),
                }),
                rules: Arc::new(NodeRules::of(&spec)),
            }
        })
        .collect();
    let mut cycles = Vec::new();
    let mut admitted = 0;
    for d in 0..decisions {
        let explained = queue[d * 7 % queue.len()].key.clone();
        let mut s = snapshot.clone();
        let mut q = queue.clone();
        let t = Instant::now();
        let out = cycle(&mut s, &mut q, Explain::Only(&explained));
        cycles.push(t.elapsed());
        admitted = out
            .iter()
            .filter(|(_, v)| matches!(v, lockstep_operator::gang::queue::Verdict::Admit(_)))
            .count();
    }

    // 2. The operator's decision: the Admitter over caches, as a reconcile asks it.
    let mut node_cache = filled_writer((), nodes.clone());
    let node_store = node_cache.as_reader();
    // An admitter over the node cache and filled caches of the pods, jobs and classes.
    let admitter_over = |nodes| {
        let (wake, _woken) = futures::channel::mpsc::unbounded();
        Admitter::new(
            nodes,
            filled_store((), pods.clone()),
            filled_store(
                ar.clone(),
                jobs.iter().map(|(_, raw)| raw.clone()).collect(),
            ),
            filled_store((), classes.clone()),
            lockstep_api::contract::operator::CONTROLLER_NAME.into(),
            wake,
            Arc::new(Metrics::new()),
        )
    };
    let admitter = admitter_over(node_store);
    let mut requests = Vec::new();
    let mut waiting = 0;
    for d in 0..decisions {
        let job = &jobs[d * 7 % jobs.len()].0;
        let t = Instant::now();
        let outcome = admitter.request(job);
        requests.push(t.elapsed());
        waiting += usize::from(matches!(outcome, Outcome::Waiting { .. }));
    }

    // 3. The same decisions, by an admitter of their own over the same caches (none of part 2's
    // plans), while nodes report their status: a new version of the node in the cache, with
    // nothing admission reads changed.
    // Part 2's goes first: the peak memory printed is that of one admitter and its caches.
    drop(admitter);
    let admitter = admitter_over(node_cache.as_reader());
    // Its first decision reads every job: made before the clock runs, as part 2's max shows it.
    admitter.request(&jobs[0].0);
    let mut beating = Vec::new();
    for d in 0..decisions {
        for h in 0..heartbeats {
            let mut node = nodes[(d * heartbeats + h) % nodes.len()].clone();
            node.status.get_or_insert_default().conditions = Some(vec![serde_json::from_value(
                serde_json::json!({"type": "Ready", "status": "True",
                    "lastHeartbeatTime": format!("2026-11-27T01:{:02}:{:02}Z", d / 60 % 60, d % 60)}),
            )?]);
            node_cache.apply_watcher_event(&kube::runtime::watcher::Event::Apply(node));
        }
        let job = &jobs[d * 7 % jobs.len()].0;
        let t = Instant::now();
        admitter.request(job);
        beating.push(t.elapsed());
    }

    let gpus_busy: usize = pods
        .iter()
        .map(|p| {
            lockstep_operator::gang::demand::pod_request(p.spec.as_ref().expect("spec"))
                .get("nvidia.com/gpu") as usize
                / 1000
        })
        .sum();
    println!(
        "admission decision: {nodes_n} nodes x 8 GPUs ({} busy in {} pods), {jobs_n} queued jobs \
         (1-16 ranks x 1-8 GPUs, 3 priorities, 10% rack-Required), {decisions} decisions",
        gpus_busy,
        pods.len()
    );
    let (p50, p99, max) = quantiles(cycles);
    println!(
        "  cycle over the queue (pure)        p50 {p50:>7.3} ms  p99 {p99:>7.3} ms  max {max:>7.3} ms  ({admitted} admitted per cycle)"
    );
    let (p50, p99, max) = quantiles(requests);
    println!(
        "  operator decision (caches + cycle) p50 {p50:>7.3} ms  p99 {p99:>7.3} ms  max {max:>7.3} ms  ({waiting} of {decisions} asked and waited; the max is the first decision, which reads every job)"
    );
    let (p50, p99, max) = quantiles(beating);
    println!(
        "  the same, {heartbeats} node heartbeats before each p50 {p50:>7.3} ms  p99 {p99:>7.3} ms  max {max:>7.3} ms"
    );
    // The whole process: the generated cluster, its caches (as the operator holds them) and the
    // decisions' working memory.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let peak_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    println!(
        "  peak resident memory of the process {:>7.1} MiB",
        peak_kib / 1024.0
    );
    Ok(())
}
