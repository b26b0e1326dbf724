//! Benchmark of the operator against the real control plane (not a test; prints figures).
//!
//! Starts a private cluster with `NODES` fake nodes (default 200), runs the operator binary given
//! as the first argument as its own process, and measures in one run:
//! 1. `JOBS` ParallelJobs (default 100) of `RANKS` ranks (default 8), `GPUS` GPUs per rank
//!    (default 0), applied at once: seconds until every pod runs and every job is Running, pods
//!    per second (every job goes through Builtin gang admission: gated, pinned, released);
//! 2. the design's floor: every write the design asks of any implementation, made directly with
//!    no operator running (see [`design_floor`]): the job, its objects, its gated and pinned pods,
//!    their release, a status write per phase change (admitted; Running once its pods run, since
//!    2026-12-05, which `DESIGN_OMIT=running` leaves out); seconds until all run. What the
//!    operator adds over this is its own cost; what this adds over 3 is the design's.
//!    `DESIGN_OMIT` leaves parts out, to see what each costs (see [`Omit`]), and
//!    `DESIGN_VARIANTS` runs it once more after the rounds for each set of parts left out (see
//!    [`design_env`]), compared with each peer too;
//! 3. the API floor: the same pods the operator made (see [`as_direct`]) created directly, with
//!    the operator's write concurrency, seconds until all run;
//! 4. the floor of earlier runs: as many minimal pods (one container, requests only);
//! 5. the operator's CPU seconds and peak resident memory (from /proc);
//! 6. `PEERS=jobset,training-operator`: the same gangs through each peer, built from its Go
//!    module and started beside the cluster with the same workers and client limits as the
//!    operator where it has a setting for them (see [`lockstep_e2e::peers`]): JobSet, one
//!    replicated Job of `RANKS` pods; the Training Operator, a PyTorchJob of 1 master and
//!    `RANKS - 1` workers. Their requests and CPU seconds are always printed.
//!
//! `REQUESTS=1` prints the API requests by verb and resource, the CPU seconds of every process
//! per phase, and the operator's Events by reason; `TIMELINE=1` the pod counts every second;
//! `BASELINE=BINARY` runs the same jobs through another build of the operator after the floors;
//! `FLOORS=0` leaves phases 2 to 4 out, `FLOORS=design` phases 3 and 4 (to compare changes of the operator, or the peers, fast);
//! `ROUNDS=N` runs phases 1 and 2 N times each in the order ABBA ABBA... and prints the ratio of
//! their medians (a phase that runs later in a run is faster, so each side gets the early and
//! the late places alike).
//!
//! The fake nodes renew their leases every 75 s, not every 10 s (`NODE_LEASE_SECONDS`,
//! `NODE_MONITOR_GRACE`: see `e2e/cluster/up.sh`), so that node heartbeats do not crowd out the
//! pods being timed.
//!
//! Times are taken from a pod watch, not by polling. Each phase starts on an empty cluster: the
//! pods of the one before are deleted first.
//!
//!     bench-operator target/release/lockstep-operator

#![allow(clippy::print_stdout)] // a benchmark prints its figures

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use futures::StreamExt;
use std::collections::HashMap;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
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

/// Watches the pods of `pods` from now on and returns, once `want` of them run (or ran), when
/// they all existed, were all bound, and all ran (time since `start`): to tell the operator's part from the
/// scheduler's and the nodes'. A watch, not polling: the measurement must not load the API server
/// it measures (a LIST of thousands of pods every second is a real share of a 2-core server).
fn watch_running(
    pods: Api<Pod>,
    want: usize,
    limit: Duration,
    start: Instant,
) -> tokio::task::JoinHandle<Result<[Duration; 3]>> {
    tokio::spawn(async move {
        // name -> (bound, running)
        let mut seen: HashMap<String, (bool, bool)> = HashMap::new();
        let mut at: [Option<Duration>; 3] = [None; 3];
        let timeline = std::env::var_os("TIMELINE").is_some();
        let mut printed = 0;
        let events = watcher(pods, watcher::Config::default()).default_backoff();
        futures::pin_mut!(events);
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let ev = tokio::time::timeout_at(deadline, events.next())
                .await
                .map_err(|_| {
                    anyhow::anyhow!("timed out after {limit:?} waiting until {want} pods run")
                })?
                .context("the pod watch ended")??;
            match ev {
                watcher::Event::Apply(p) | watcher::Event::InitApply(p) => {
                    let bound = p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some();
                    // A pod that succeeded ran: kwok completes the pods a Job owns (JobSet's)
                    // at once, so they may pass Running between two events.
                    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
                    let running = matches!(phase, Some("Running" | "Succeeded"));
                    let was = seen.get(&p.name_any()).copied().unwrap_or_default();
                    seen.insert(p.name_any(), (bound || was.0, running || was.1));
                }
                watcher::Event::Delete(p) => {
                    seen.remove(&p.name_any());
                }
                watcher::Event::Init | watcher::Event::InitDone => {}
            }
            let counts = [
                seen.len(),
                seen.values().filter(|s| s.0).count(),
                seen.values().filter(|s| s.1).count(),
            ];
            for (i, c) in counts.into_iter().enumerate() {
                if c >= want && at[i].is_none() {
                    at[i] = Some(start.elapsed());
                }
            }
            // TIMELINE=1: the counts once a second, to see where a phase spends its time.
            let second = start.elapsed().as_secs();
            if timeline && second > printed {
                printed = second;
                eprintln!(
                    "  t={second:>4}s created {:>5} bound {:>5} running {:>5}",
                    counts[0], counts[1], counts[2]
                );
            }
            if counts[2] >= want {
                return Ok(at.map(|d| d.unwrap_or_default()));
            }
        }
    })
}

/// The API server's request counts by verb, resource and subresource (`apiserver_request_total`).
async fn requests(client: &kube::Client) -> Result<HashMap<String, f64>> {
    let req = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(req).await?;
    let mut out = HashMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let Some((labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split(&format!("{name}=\""))
                .nth(1)
                .and_then(|v| v.split('"').next())
                .unwrap_or("")
                .to_string()
        };
        let sub = label("subresource");
        let key = format!(
            "{} {}{}",
            label("verb"),
            label("resource"),
            if sub.is_empty() {
                String::new()
            } else {
                format!("/{sub}")
            }
        );
        *out.entry(key).or_default() += value.parse::<f64>().unwrap_or(0.0);
    }
    Ok(out)
}

/// CPU seconds used so far by each live process of the cluster (from its `pids` file, where
/// [`register`] adds the operator and the peers).
fn cluster_cpu(state: &std::path::Path) -> Vec<(String, f64)> {
    let pids = std::fs::read_to_string(state.join("pids")).unwrap_or_default();
    pids.lines()
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(name, pid)| Some((name.to_string(), pid.trim().parse::<u32>().ok()?)))
        .filter_map(|(name, pid)| Some((name, usage(pid).ok()?.0)))
        .collect()
}

/// Takes a process the benchmark stopped out of the cluster's `pids` file again (its pid may be
/// another process's by the time the cluster stops).
fn unregister(state: &std::path::Path, pid: u32) -> Result<()> {
    let path = state.join("pids");
    let kept: String = std::fs::read_to_string(&path)?
        .lines()
        .filter(|l| l.split_once(' ').map(|(_, p)| p.trim()) != Some(pid.to_string().as_str()))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(path, kept)?;
    Ok(())
}

/// Adds a process the benchmark started to the cluster's `pids` file: its CPU seconds are
/// counted with the cluster's, and `down.sh` stops it with the cluster even when the benchmark
/// itself is killed.
fn register(state: &std::path::Path, name: &str, pid: u32) -> Result<()> {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(state.join("pids"))?;
    writeln!(f, "{name} {pid}")?;
    Ok(())
}

/// What the cluster has done so far: the API server's requests (when counted) and each process's
/// CPU seconds.
struct Usage {
    requests: HashMap<String, f64>,
    cpu: Vec<(String, f64)>,
}

impl Usage {
    async fn take(counting: bool, client: &kube::Client, state: &std::path::Path) -> Result<Self> {
        Ok(Self {
            requests: if counting {
                requests(client).await?
            } else {
                HashMap::new()
            },
            cpu: cluster_cpu(state),
        })
    }

    /// REQUESTS=1: prints what was done between `before` and this.
    fn print_since(&self, before: &Usage, phase: &str) {
        print_requests(phase, &before.requests, &self.requests);
        print_cpu(phase, &before.cpu, &self.cpu);
    }
}

/// REQUESTS=1: prints the CPU seconds each process used in one phase.
fn print_cpu(phase: &str, before: &[(String, f64)], after: &[(String, f64)]) {
    let used: Vec<String> = after
        .iter()
        .filter_map(|(name, a)| {
            let b = before.iter().find(|(n, _)| n == name)?.1;
            Some(format!("{name} {:.1}", a - b))
        })
        .collect();
    eprintln!("  CPU seconds {phase}: {}", used.join(", "));
}

/// REQUESTS=1: prints the requests of one phase (after minus before), largest first.
fn print_requests(phase: &str, before: &HashMap<String, f64>, after: &HashMap<String, f64>) {
    let mut diff: Vec<(f64, &String)> = after
        .iter()
        .map(|(k, v)| (v - before.get(k).copied().unwrap_or(0.0), k))
        .filter(|(d, _)| *d > 0.0)
        .collect();
    diff.sort_by(|a, b| b.0.total_cmp(&a.0));
    let total: f64 = diff.iter().map(|d| d.0).sum();
    eprintln!("  requests {phase}: {total:.0} in all");
    for (d, k) in diff.iter().take(20) {
        eprintln!("    {d:>7.0}  {k}");
    }
}

/// REQUESTS=1: prints the Events of namespace `ns` by source and reason, most first.
async fn print_events(client: &kube::Client, ns: &str) -> Result<()> {
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), ns);
    let mut by: HashMap<String, usize> = HashMap::new();
    let mut params = ListParams::default().limit(500);
    loop {
        let page = events.list(&params).await?;
        for e in &page.items {
            let source = e
                .reporting_component
                .clone()
                .filter(|c| !c.is_empty())
                .or_else(|| e.source.as_ref().and_then(|s| s.component.clone()))
                .unwrap_or_default();
            *by.entry(format!(
                "{source} {}",
                e.reason.as_deref().unwrap_or_default()
            ))
            .or_default() += 1;
        }
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => break,
        }
    }
    let mut by: Vec<(usize, String)> = by.into_iter().map(|(k, v)| (v, k)).collect();
    by.sort_by(|a, b| b.cmp(a));
    eprintln!("  events by source and reason:");
    for (n, what) in by {
        eprintln!("    {n:>7}  {what}");
    }
    Ok(())
}

/// Deletes a phase's namespace and waits until it is gone: each phase starts on an empty
/// cluster (with GPUs, three phases of 1,000 nodes' worth of pods would not fit at once).
async fn clear(client: &kube::Client, name: &str) -> Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .delete(name, &kube::api::DeleteParams::default())
        .await?;
    lockstep_e2e::wait_until(
        Duration::from_secs(900),
        &format!("namespace {name} is gone"),
        || async { Ok(namespaces.get_opt(name).await?.is_none()) },
    )
    .await
}

/// Every pod of `api`, a page at a time.
async fn list_all(api: &Api<Pod>) -> Result<Vec<Pod>> {
    let mut all = Vec::new();
    let mut params = ListParams::default().limit(500);
    loop {
        let page = api.list(&params).await?;
        all.extend(page.items);
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => return Ok(all),
        }
    }
}

/// Creates `pods` directly in `api` and returns when they were all created, bound and running.
async fn time_direct(api: &Api<Pod>, pods: Vec<Pod>, limit: Duration) -> Result<[Duration; 3]> {
    let start = Instant::now();
    let watch = watch_running(api.clone(), pods.len(), limit, start);
    create_all(api, pods).await?;
    watch.await?
}

/// Creates `pods` in `api` with at most the operator's write concurrency in flight.
async fn create_all(api: &Api<Pod>, pods: Vec<Pod>) -> Result<()> {
    futures::stream::iter(pods)
        .map(|pod| async move {
            api.create(&PostParams::default(), &pod).await?;
            anyhow::Ok(())
        })
        .buffer_unordered(lockstep_operator::controller::WRITE_CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<()>>>()
        .map(drop)
}

/// A pod the operator made, as a user would create it directly: no owner, no gang gate, no pin
/// to a planned node (the scheduler places it), the namespace's default service account (the
/// job's own does not exist there). Everything else (labels, env, volumes, resources) is kept.
fn as_direct(mut pod: Pod) -> Pod {
    let name = pod.name_any();
    let labels = pod.metadata.labels.take();
    let mut annotations = pod.metadata.annotations.take().unwrap_or_default();
    annotations.remove(lockstep_api::contract::annotations::PLANNED_NODE);
    pod.metadata = ObjectMeta {
        name: Some(name),
        labels,
        annotations: Some(annotations),
        ..ObjectMeta::default()
    };
    pod.status = None;
    if let Some(spec) = pod.spec.as_mut() {
        spec.node_name = None;
        spec.scheduling_gates = None;
        spec.affinity = None; // the bench's template has none of its own: only the pin
        spec.service_account_name = None;
        spec.service_account = None; // the deprecated alias the API server fills in
        spec.priority = None; // set again by the Priority admission plugin
        // The service account token volume the API server added: it is added again on create.
        if let Some(volumes) = spec.volumes.as_mut() {
            volumes.retain(|v| !v.name.starts_with("kube-api-access-"));
        }
        for c in spec
            .containers
            .iter_mut()
            .chain(spec.init_containers.iter_mut().flatten())
        {
            if let Some(mounts) = c.volume_mounts.as_mut() {
                mounts.retain(|m| !m.name.starts_with("kube-api-access-"));
            }
        }
    }
    pod
}

/// Parts of the design its floor leaves out, to see what each costs: a comma-separated list
/// (`DESIGN_OMIT`, or one set of `DESIGN_VARIANTS`; empty or `none`: nothing) of `service` (the
/// headless Service and its EndpointSlice), `gate` (pods created released, so no release write),
/// `rbac` (the worker ServiceAccount, progress Role, RoleBinding and ConfigMap; pods run as the
/// namespace's default account), `policy` (the workers' NetworkPolicy), `status` (both status
/// writes) and `running` (the second status write alone, as the floor was before it made one:
/// then only the admission is written).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Omit {
    service: bool,
    gate: bool,
    rbac: bool,
    policy: bool,
    status: bool,
    running: bool,
}

impl Omit {
    /// The parts named in `list` (comma-separated; empty or `none`: nothing left out).
    fn parse(list: &str) -> Result<Self> {
        let mut omit = Omit::default();
        for part in list.split(',') {
            match part.trim() {
                "" | "none" => {}
                "service" => omit.service = true,
                "gate" => omit.gate = true,
                "rbac" => omit.rbac = true,
                "policy" => omit.policy = true,
                "status" => omit.status = true,
                "running" => omit.running = true,
                other => bail!(
                    "unknown part {other:?} of the design; the parts are service, gate, rbac, policy, status, running"
                ),
            }
        }
        Ok(omit)
    }
}

/// Creates `object` in namespace `ns`; an error names `what`.
async fn make<K>(client: &kube::Client, ns: &str, object: &K, what: &str) -> Result<()>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + k8s_openapi::serde::de::DeserializeOwned
        + k8s_openapi::serde::Serialize
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    Api::<K>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), object)
        .await
        .with_context(|| format!("creating the {what}"))?;
    Ok(())
}

/// The design's floor for one job: the writes the design asks of any implementation, in the
/// order they depend on each other, made directly (no operator runs; nothing is read back or
/// decided but when a job's pods all run, which one pod watch of the namespace tells). The job;
/// its objects at once (headless Service, config, worker ServiceAccount, progress Role then
/// RoleBinding, token Secret, progress ConfigMap, and the workers' NetworkPolicy when the
/// operator's settings make one, as they do by default), created plainly; its pods, gated and
/// pinned to `planned` (the operator's own choice, by pod name); their release; the Service's
/// EndpointSlice; one status write per phase change: admitted (phase Starting), then, once
/// `running` says every pod of the job runs, phase Running (in a task of its own, returned, so
/// that the wait holds none of the floor's places for jobs). The operator's builders make every
/// body, so nothing differs but who writes and when; `omit` leaves parts out.
async fn design_floor(
    client: &kube::Client,
    job: ParallelJob,
    planned: &HashMap<String, String>,
    omit: Omit,
    running: &RunningJobs,
) -> Result<Option<tokio::task::JoinHandle<Result<()>>>> {
    use kube::api::{Patch, PatchParams};
    use lockstep_operator::resources::{JobContext, Pin};

    let ns = job.metadata.namespace.clone().context("job namespace")?;
    let jobs: Api<ParallelJob> = Api::namespaced(client.clone(), &ns);
    let job = jobs.create(&PostParams::default(), &job).await?;
    let ctx = JobContext::new(&job)?;
    let service = async {
        if !omit.service {
            make(client, &ns, &ctx.service()?, "service").await?;
        }
        anyhow::Ok(())
    };
    let (config_map, secret) = (ctx.config_map()?.0, ctx.token_secret("bench")?);
    let config = make(client, &ns, &config_map, "config map");
    let account = async {
        if let Some(sa) = ctx.service_account()?.filter(|_| !omit.rbac) {
            make(client, &ns, &sa, "service account").await?;
        }
        anyhow::Ok(())
    };
    // The Role before its binding, as the operator does.
    let rbac = async {
        if !omit.rbac {
            make(client, &ns, &ctx.progress_role()?, "role").await?;
            make(client, &ns, &ctx.progress_role_binding()?, "role binding").await?;
        }
        anyhow::Ok(())
    };
    let secret = make(client, &ns, &secret, "secret");
    let progress = async {
        if !omit.rbac {
            make(
                client,
                &ns,
                &ctx.progress_config_map()?,
                "progress config map",
            )
            .await?;
        }
        anyhow::Ok(())
    };
    // As the benchmark's operator runs by default (OPERATOR_ARGS=--no-worker-network-policy
    // goes with DESIGN_OMIT=policy).
    let settings = lockstep_operator::controller::Settings::default();
    let policy = async {
        if settings.worker_network_policy && !omit.policy {
            let policy = ctx.network_policy(&settings.worker_metrics_from)?;
            make(client, &ns, &policy, "network policy").await?;
        }
        anyhow::Ok(())
    };
    futures::try_join!(service, config, account, rbac, secret, progress, policy)?;

    let digest = ctx.config_digest()?;
    let world = ctx.layout.world_size();
    // Told before any of its pods exists, so that no pod runs unseen.
    let all_running = (!omit.status && !omit.running).then(|| running.expect(ctx.name, world));
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let built = (0..world)
        .map(|rank| {
            let name = ctx.pod_name(rank);
            let node = planned
                .get(&name)
                .with_context(|| format!("no planned node for {name}"))?;
            // The benchmark's nodes carry their own name as kubernetes.io/hostname.
            let pin = Pin {
                node,
                hostname: Some(node),
            };
            let mut pod = ctx.pod(rank, 0, &digest, !omit.gate, Some(&pin))?;
            if omit.rbac
                && let Some(spec) = pod.spec.as_mut()
            {
                spec.service_account_name = None;
            }
            Ok(pod)
        })
        .collect::<Result<Vec<Pod>>>()?;
    let pp = PostParams::default();
    futures::future::try_join_all(built.iter().map(|pod| pods.create(&pp, pod))).await?;
    if !omit.gate {
        let release = serde_json::json!({"spec": {"schedulingGates": [
            {"$patch": "delete", "name": lockstep_api::contract::operator::SCHEDULING_GATE}
        ]}});
        let (params, release) = (PatchParams::default(), Patch::Strategic(&release));
        futures::future::try_join_all(built.iter().map(|pod| {
            pods.patch(
                pod.metadata.name.as_deref().unwrap_or_default(),
                &params,
                &release,
            )
        }))
        .await?;
    }
    if !omit.service {
        // The Service has no selector: the operator writes its EndpointSlice once the ranks have
        // addresses. The floor reads nothing, so it writes stand-in addresses after the release.
        let addresses: Vec<(u32, String)> = (0..world)
            .map(|rank| (rank, format!("10.255.{}.{}", rank / 250, rank % 250 + 1)))
            .collect();
        make(
            client,
            &ns,
            &ctx.endpoint_slice(&addresses)?,
            "endpoint slice",
        )
        .await?;
    }
    if !omit.status {
        let status = serde_json::json!({"status": {"phase": "Starting", "attempt": 0,
            "admission": {"attempt": 0, "nodes": built.iter()
                .map(|p| planned[p.metadata.name.as_deref().unwrap_or_default()].clone())
                .collect::<Vec<_>>()}}});
        jobs.patch_status(ctx.name, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
    }
    Ok(all_running.map(|all_running| {
        let name = ctx.name.to_string();
        tokio::spawn(async move {
            all_running
                .await
                .with_context(|| format!("the pod watch ended before {name}'s pods ran"))?;
            let status = serde_json::json!({"status": {"phase": "Running"}});
            jobs.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                .await
                .with_context(|| format!("writing {name}'s Running status"))?;
            Ok(())
        })
    }))
}

/// A job expected by [`RunningJobs`]: its world size, and the sender to tell when its pods run.
type Expected = (u32, tokio::sync::oneshot::Sender<()>);

/// Which jobs of a design's floor have every pod running: each job is expected (with its world
/// size) before its pods are made, and told once by a pod watch of the namespace when they all run.
#[derive(Clone, Default)]
struct RunningJobs {
    /// Job name -> what it waits for.
    waiting: std::sync::Arc<std::sync::Mutex<HashMap<String, Expected>>>,
}

impl RunningJobs {
    /// Expects job `name` with `world` pods; the receiver is told when they all run.
    fn expect(&self, name: &str, world: u32) -> tokio::sync::oneshot::Receiver<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waiting
            .lock()
            .expect("not poisoned")
            .insert(name.to_string(), (world, tx));
        rx
    }

    /// Watches the pods of `pods` (the floor's namespace) until the task is aborted, telling
    /// each expected job when as many of its pods (by the job-name label) have run as it has
    /// ranks. A watch error is logged and the watch goes on (it relists after a backoff); if the
    /// stream ends, every job still waiting is told it never will (its receiver fails).
    fn watch(&self, pods: Api<Pod>) -> tokio::task::JoinHandle<Result<()>> {
        let waiting = self.waiting.clone();
        tokio::spawn(async move {
            use lockstep_api::contract::labels;
            let config = watcher::Config::default().labels(labels::JOB_NAME);
            let events = watcher(pods, config).default_backoff().applied_objects();
            futures::pin_mut!(events);
            // Job name -> names of its running pods.
            let mut ran: HashMap<String, std::collections::HashSet<String>> = HashMap::new();
            while let Some(pod) = events.next().await {
                let pod = match pod {
                    Ok(pod) => pod,
                    Err(e) => {
                        eprintln!("  the design's floor's pod watch: {e} (retrying)");
                        continue;
                    }
                };
                // As in `watch_running`: a pod that succeeded ran.
                let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
                let Some(job) = pod.labels().get(labels::JOB_NAME).cloned() else {
                    continue;
                };
                if !matches!(phase, Some("Running" | "Succeeded")) {
                    continue;
                }
                let count = {
                    let names = ran.entry(job.clone()).or_default();
                    names.insert(pod.name_any());
                    names.len()
                };
                let mut waiting = waiting.lock().expect("not poisoned");
                if waiting
                    .get(&job)
                    .is_some_and(|(world, _)| count >= *world as usize)
                    && let Some((_, tx)) = waiting.remove(&job)
                {
                    let _ = tx.send(());
                }
            }
            waiting.lock().expect("not poisoned").clear();
            Ok(())
        })
    }
}

/// When a phase's pods were all created, all bound and all running.
fn phases(p: [Duration; 3]) -> String {
    format!(
        "all created {:.2} s, all bound {:.2} s, all Running {:.2} s",
        p[0].as_secs_f64(),
        p[1].as_secs_f64(),
        p[2].as_secs_f64()
    )
}

/// Prints a direct phase's figures: its time and pods per second, [`phases`], and its ratios
/// (`what`, ratio).
fn print_phase(title: &str, short: &str, p: [Duration; 3], pods: f64, ratios: &[(&str, f64)]) {
    let all = p[2].as_secs_f64();
    println!("  {title} {all:>6.2} s  ({:.0} pods/s)", pods / all);
    println!("  {short}: {}", phases(p));
    for (what, ratio) in ratios {
        println!("  {what:<28} {ratio:>8.2}x");
    }
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
    design_env()?;
    let root = repo_root();
    let state = root.join(format!("target/bench-cluster-{}", std::process::id()));
    let up = std::process::Command::new(root.join("e2e/cluster/up.sh"))
        .env("STATE", &state)
        .env("NODES", nodes.to_string())
        // Every gang's pods run on, as training pods do: kwok would end JobSet's (a Job's) at once.
        .env("KWOK_COMPLETE_JOB_PODS", "0")
        // Quiet nodes: kwok renews a lease every 75 s instead of 10 s, and a node is marked
        // NotReady after 300 s without one instead of 50 s. At 1,000 nodes the default is 100
        // lease writes a second, more than kwok keeps up with here while it also runs the pods
        // being timed; late nodes then flapped NotReady, with taints, evictions scheduled and
        // cancelled, and pods marked not ready, at random in one phase or another. Either can
        // be set to the cluster's default (40, 50s) in the environment.
        .env(
            "NODE_LEASE_SECONDS",
            std::env::var("NODE_LEASE_SECONDS").unwrap_or_else(|_| "300".into()),
        )
        .env(
            "NODE_MONITOR_GRACE",
            std::env::var("NODE_MONITOR_GRACE").unwrap_or_else(|_| "300s".into()),
        )
        .output()?;
    if !up.status.success() {
        bail!("cluster-up failed: {}", String::from_utf8_lossy(&up.stderr));
    }
    let result = run(&operator, &state, nodes, jobs_n, ranks, gpus).await;
    // KEEP_LOGS=DIR: the cluster's logs are copied there before it goes.
    if let Some(dir) = std::env::var_os("KEEP_LOGS") {
        let _ = std::process::Command::new("cp")
            .arg("-r")
            .arg(state.join("logs"))
            .arg(dir)
            .status();
    }
    let _ = std::process::Command::new(root.join("e2e/cluster/down.sh"))
        .env("STATE", &state)
        .output();
    let _ = std::fs::remove_dir_all(&state);
    result
}

/// Starts the operator `binary` against the cluster of `state` (registered as `name`, logs in
/// `logs/NAME.log`) and waits until it is ready: the clock starts on a ready operator, as it does
/// on a ready peer.
async fn start_operator(
    binary: &std::path::Path,
    state: &std::path::Path,
    name: &str,
) -> Result<(tokio::process::Child, u32)> {
    let metrics = format!("127.0.0.1:{}", lockstep_e2e::peers::free_port()?);
    let log = state.join(format!("logs/{name}.log"));
    let mut child = tokio::process::Command::new(binary)
        .args(["--metrics-addr", &metrics])
        // Extra operator flags, to compare settings: OPERATOR_ARGS="--concurrency 64".
        .args(
            std::env::var("OPERATOR_ARGS")
                .unwrap_or_default()
                .split_whitespace(),
        )
        .env("KUBECONFIG", state.join("kubeconfig"))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let pid = child.id().context("operator pid")?;
    register(state, name, pid)?;
    lockstep_e2e::peers::wait_ready(&mut child, &format!("http://{metrics}/readyz"), &log).await?;
    Ok((child, pid))
}

/// `DESIGN_OMIT`, the parts the design's floor leaves out in every round, and `DESIGN_VARIANTS`
/// (`"policy;policy,rbac;none"`), the sets of parts left out by one more design's floor each
/// after the rounds (`none`: the whole design again, which shows how much faster a later phase
/// runs), each compared with the design's floor and each peer; checked before the cluster starts.
/// A variant's set replaces `DESIGN_OMIT` (it is not added to it): with both, the rounds' floor
/// leaves out `DESIGN_OMIT` and each variant only its own set.
fn design_env() -> Result<(String, Vec<String>)> {
    let omit = std::env::var("DESIGN_OMIT").unwrap_or_default();
    Omit::parse(&omit).context("DESIGN_OMIT")?;
    let variants: Vec<String> = std::env::var("DESIGN_VARIANTS")
        .unwrap_or_default()
        .split(';')
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(String::from)
        .collect();
    for v in &variants {
        Omit::parse(v).context("DESIGN_VARIANTS")?;
    }
    if !variants.is_empty() && std::env::var("FLOORS").is_ok_and(|f| f == "0") {
        bail!("DESIGN_VARIANTS needs the design's floor: leave FLOORS unset or set it to design");
    }
    Ok((omit, variants))
}

/// Creates `jobs` (16 at a time, as a user's script might) through `api`.
async fn create_jobs<K>(api: &Api<K>, jobs: Vec<Result<K>>) -> Result<()>
where
    K: kube::Resource
        + Clone
        + k8s_openapi::serde::de::DeserializeOwned
        + k8s_openapi::serde::Serialize
        + std::fmt::Debug,
{
    futures::stream::iter(jobs)
        .map(|job| async move {
            api.create(&PostParams::default(), &job?).await?;
            anyhow::Ok(())
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<()>>>()
        .map(drop)
}

/// What every phase of one benchmark run shares: the cluster, the jobs' shape, and whether the
/// API requests are counted.
struct Bench {
    client: kube::Client,
    state: PathBuf,
    template: serde_json::Value,
    jobs_n: usize,
    ranks: usize,
    gpus: usize,
    counting: bool,
    limit: Duration,
}

impl Bench {
    /// Pods of the run: `jobs_n` gangs of `ranks`.
    fn want(&self) -> usize {
        self.jobs_n * self.ranks
    }

    /// The `i`-th job of namespace `ns`.
    fn manifest(&self, i: usize, ns: &str) -> Result<ParallelJob> {
        let mut v = self.template.clone();
        v["metadata"]["name"] = format!("job-{i:03}").into();
        v["metadata"]["namespace"] = ns.into();
        v["spec"]["parallelism"]["dataParallel"] = self.ranks.into();
        v["spec"]["parallelism"]["gpusPerWorker"] = self.gpus.into();
        v["spec"]["template"]["spec"]["containers"][0]["resources"] =
            serde_json::json!({"requests": {"cpu": "100m", "memory": "64Mi"}});
        Ok(serde_json::from_value(v)?)
    }
}

/// One phase through a build of the operator.
struct OperatorRun {
    /// Until every job was created.
    applied: Duration,
    /// All created, all bound, all running.
    phases: [Duration; 3],
    /// The pods it made (their planned nodes feed the design's floor).
    made: Vec<Pod>,
}

/// Starts the operator `binary` (registered as `name`), applies every job in a new namespace
/// `ns`, and times it until all pods run; prints its CPU seconds and peak RSS, and with
/// `counting` its requests and Events. The operator is stopped and the pods are kept.
async fn through_operator(
    b: &Bench,
    binary: &std::path::Path,
    name: &str,
    ns: &str,
) -> Result<OperatorRun> {
    let (mut child, pid) = start_operator(binary, &b.state, name).await?;
    let (cpu0, _) = usage(pid)?;
    namespace(&b.client, ns).await?;
    let jobs: Api<ParallelJob> = Api::namespaced(b.client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(b.client.clone(), ns);
    let before = Usage::take(b.counting, &b.client, &b.state).await?;
    let start = Instant::now();
    let watch = watch_running(pods.clone(), b.want(), b.limit, start);
    create_jobs(&jobs, (0..b.jobs_n).map(|i| b.manifest(i, ns)).collect()).await?;
    let applied = start.elapsed();
    let phases = watch.await??;
    let (cpu1, peak) = usage(pid)?;
    let after = Usage::take(b.counting, &b.client, &b.state).await?;
    let _ = child.kill().await;
    unregister(&b.state, pid)?;
    println!(
        "  {:<29}{:>8.2} s  (peak RSS {peak:.1} MiB)",
        format!("{name} CPU"),
        cpu1 - cpu0
    );
    if b.counting {
        after.print_since(&before, &format!("through the {name}"));
        print_events(&b.client, ns).await?;
    }
    Ok(OperatorRun {
        applied,
        phases,
        made: list_all(&pods).await?,
    })
}

/// A task aborted when dropped, so that a phase that fails early leaves none of its tasks running.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The design's floor in a new namespace `ns` (see [`design_floor`]): every job's writes made
/// directly, the operator's concurrency of jobs at a time, each pod pinned to the node the
/// operator planned for it in `made`, without the parts named in `omit_text` (see [`Omit`]).
/// Returns its phases; with `counting`, prints its requests.
async fn design_phase(b: &Bench, ns: &str, made: &[Pod], omit_text: &str) -> Result<[Duration; 3]> {
    let planned: HashMap<String, String> = made
        .iter()
        .filter_map(|p| {
            let node = p
                .annotations()
                .get(lockstep_api::contract::annotations::PLANNED_NODE)?;
            Some((p.name_any(), node.clone()))
        })
        .collect();
    namespace(&b.client, ns).await?;
    let design_pods: Api<Pod> = Api::namespaced(b.client.clone(), ns);
    let before = Usage::take(b.counting, &b.client, &b.state).await?;
    let start = Instant::now();
    let mut watch = AbortOnDrop(watch_running(design_pods, b.want(), b.limit, start));
    let concurrency = usize::from(lockstep_operator::controller::Settings::default().concurrency);
    let omit = Omit::parse(omit_text)?;
    let running = RunningJobs::default();
    // Only a floor that writes Running watches for it.
    let _running_watch = (!omit.status && !omit.running)
        .then(|| AbortOnDrop(running.watch(Api::namespaced(b.client.clone(), ns))));
    let made_jobs = futures::stream::iter(0..b.jobs_n)
        .map(|i| {
            let (client, planned, running) = (&b.client, &planned, &running);
            let job = b.manifest(i, ns);
            async move { design_floor(client, job?, planned, omit, running).await }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await;
    // Every write task is kept (and aborted if this phase fails) before any error is returned.
    let mut running_writes = Vec::new();
    let mut first_error = None;
    for made in made_jobs {
        match made {
            Ok(write) => running_writes.extend(write.map(AbortOnDrop)),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let phases = (&mut watch.0).await??;
    // The last jobs' Running writes come after the clock stops; they are made before the next
    // phase starts, so that none of this phase's writes land in it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    for mut write in running_writes {
        tokio::time::timeout_at(deadline, &mut write.0)
            .await
            .context(
                "the design's floor's Running writes took over 120 s after its pods ran",
            )???;
    }
    let without = if Omit::parse(omit_text)? == Omit::default() {
        String::new()
    } else {
        format!(", without {omit_text}")
    };
    print_phase(
        &format!("design's floor: its writes made directly, {concurrency} jobs at a time{without}"),
        "design's writes directly",
        phases,
        b.want() as f64,
        &[],
    );
    if b.counting {
        let after = Usage::take(b.counting, &b.client, &b.state).await?;
        after.print_since(&before, "of the design's floor");
    }
    Ok(phases)
}

/// The median of `v` (the mean of the middle two when even).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

async fn run(
    operator: &std::path::Path,
    state: &std::path::Path,
    nodes: usize,
    jobs_n: usize,
    ranks: usize,
    gpus: usize,
) -> Result<()> {
    let kubeconfig = &state.join("kubeconfig");
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

    let template = lockstep_e2e::example_manifest("ddp-digits.yaml")?;
    let peers = lockstep_e2e::peers::Peer::parse_list(&std::env::var("PEERS").unwrap_or_default())?;
    let b = Bench {
        client: client.clone(),
        state: state.to_path_buf(),
        template: template.clone(),
        jobs_n,
        ranks,
        gpus,
        // Requests are counted when asked, and always beside the peers: they are part of the table.
        counting: std::env::var_os("REQUESTS").is_some() || !peers.is_empty(),
        limit: Duration::from_secs(900),
    };
    let want = b.want();
    let pods_n = want as f64;
    // The API server's first write of a ParallelJob takes seconds (it builds the kind's
    // handlers); without a warm-up the first phase alone pays it.
    namespace(&client, "bench-warmup").await?;
    Api::<ParallelJob>::namespaced(client.clone(), "bench-warmup")
        .create(&PostParams::default(), &b.manifest(0, "bench-warmup")?)
        .await?;
    clear(&client, "bench-warmup").await?;
    println!(
        "operator benchmark: {nodes} fake nodes, {jobs_n} jobs x {ranks} ranks x {gpus} GPUs = {want} pods"
    );

    // FLOORS=0: the operator (and the peers) alone, to compare changes of the operator quickly.
    let floors_env = std::env::var("FLOORS").unwrap_or_default();
    let floors = floors_env != "0";
    // FLOORS=design: the design's floor alone (the ratio the operator is held to).
    let design_only = floors_env == "design";
    // ROUNDS=N: the operator and the design's floor N times each, in the order ABBA ABBA...: a
    // phase that runs later in a run is faster (a warm API server, a compacted etcd), so each
    // side gets as many early places as late ones, and the ratio is of the medians.
    let rounds = env_or("ROUNDS", 1).max(1);
    let (omit, variant_sets) = design_env()?;
    let (mut op_times, mut design_times) = (Vec::new(), Vec::new());
    let mut through: Option<OperatorRun> = None;
    for round in 0..rounds {
        let suffix = if round == 0 {
            String::new()
        } else {
            format!("-{}", round + 1)
        };
        if rounds > 1 {
            println!("round {} of {rounds}", round + 1);
        }
        let design_first = round % 2 == 1 && floors;
        if design_first {
            let made = &through
                .as_ref()
                .context("an operator phase ran before")?
                .made;
            let ns = format!("bench-design{suffix}");
            design_times.push(design_phase(&b, &ns, made, &omit).await?[2].as_secs_f64());
            clear(&client, &ns).await?;
        }
        // 1. Through the operator.
        let ns = format!("bench-jobs{suffix}");
        let run = through_operator(&b, operator, "operator", &ns).await?;
        // Each phase's figures are printed as soon as it ends: a later phase that fails loses nothing.
        println!(
            "  jobs applied in              {:>8.2} s",
            run.applied.as_secs_f64()
        );
        println!(
            "  apply -> all pods Running    {:>8.2} s  ({:.0} pods/s)",
            run.phases[2].as_secs_f64(),
            pods_n / run.phases[2].as_secs_f64()
        );
        println!("  through the operator: {}", phases(run.phases));
        op_times.push(run.phases[2].as_secs_f64());
        clear(&client, &ns).await?;
        if floors && !design_first {
            // 2. The design's floor: the writes any implementation of the design makes, made directly.
            let ns = format!("bench-design{suffix}");
            design_times.push(design_phase(&b, &ns, &run.made, &omit).await?[2].as_secs_f64());
            clear(&client, &ns).await?;
        }
        if floors {
            let (op, design) = (op_times[round], design_times[round]);
            println!("  operator / design's floor    {:>8.2}x", op / design);
        }
        through = Some(run);
    }
    let run = through.context("no operator phase ran")?;
    let op_time = Duration::from_secs_f64(median(op_times.clone()));
    if rounds > 1 && !floors {
        let times: Vec<String> = op_times.iter().map(|t| format!("{t:.2}")).collect();
        println!(
            "  {rounds} rounds: operator {} s, median {:.2} s",
            times.join(", "),
            median(op_times.clone())
        );
    }
    if rounds > 1 && floors {
        let list = |v: &[f64]| {
            v.iter()
                .map(|t| format!("{t:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "  {rounds} rounds (ABBA): operator {} s; design's floor {} s",
            list(&op_times),
            list(&design_times)
        );
        println!(
            "  operator / design's floor, medians {:>8.2}x",
            median(op_times.clone()) / median(design_times.clone())
        );
    }

    let mut variants: Vec<(String, f64)> = Vec::new();
    if floors {
        let design = Duration::from_secs_f64(median(design_times.clone()));
        for (i, set) in variant_sets.iter().enumerate() {
            let ns = format!("bench-variant-{}", i + 1);
            let t = design_phase(&b, &ns, &run.made, set).await?[2].as_secs_f64();
            println!(
                "  this variant / design's floor {:>8.2}x",
                t / design.as_secs_f64()
            );
            variants.push((set.clone(), t));
            clear(&client, &ns).await?;
        }
        let made = run.made;
        if !design_only {
            // 3. The API floor: the same pods, created directly.
            namespace(&client, "bench-floor").await?;
            let direct: Api<Pod> = Api::namespaced(client.clone(), "bench-floor");
            let same: Vec<Pod> = made.into_iter().map(as_direct).collect();
            let before = Usage::take(b.counting, &client, state).await?;
            let floor_phases = time_direct(&direct, same, b.limit).await?;
            let floor = floor_phases[2];
            print_phase(
                &format!(
                    "API floor: the same pods created directly, {} at a time",
                    lockstep_operator::controller::WRITE_CONCURRENCY
                ),
                "same pods directly",
                floor_phases,
                pods_n,
                &[
                    ("operator / floor", op_time.div_duration_f64(floor)),
                    ("design's floor / floor", design.div_duration_f64(floor)),
                ],
            );
            if b.counting {
                let after = Usage::take(b.counting, &client, state).await?;
                after.print_since(&before, "of the floor");
            }
            clear(&client, "bench-floor").await?;

            // 4. The floor of earlier runs: minimal pods (one container, requests only).
            namespace(&client, "bench-floor-minimal").await?;
            let minimal_api: Api<Pod> = Api::namespaced(client.clone(), "bench-floor-minimal");
            let minimal = (0..want)
                .map(|i| {
                    serde_json::from_value(serde_json::json!({
                        "metadata": {"name": format!("pod-{i:04}")},
                        "spec": {"containers": [{"name": "worker", "image": "lockstep/worker:0.1.0",
                            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"},
                                "limits": if gpus > 0 {
                                    serde_json::json!({"nvidia.com/gpu": gpus.to_string()})
                                } else {
                                    serde_json::json!({})
                                }}}]}
                    }))
                })
                .collect::<serde_json::Result<Vec<Pod>>>()?;
            let minimal_phases = time_direct(&minimal_api, minimal, b.limit).await?;
            print_phase(
                "minimal pods created directly (earlier runs' floor)",
                "minimal pods",
                minimal_phases,
                pods_n,
                &[(
                    "operator / minimal pods",
                    op_time.div_duration_f64(minimal_phases[2]),
                )],
            );
            clear(&client, "bench-floor-minimal").await?;
        }
    }

    // 5. BASELINE=BINARY: the same jobs through another build of the operator (the one before a
    // change), to compare the two in one run.
    if let Some(baseline) = std::env::var_os("BASELINE") {
        let ns = "bench-baseline";
        let base = through_operator(&b, baseline.as_ref(), "baseline", ns).await?;
        print_phase(
            &format!("baseline operator {}", PathBuf::from(&baseline).display()),
            "baseline operator",
            base.phases,
            pods_n,
            &[(
                "baseline / operator",
                base.phases[2].div_duration_f64(op_time),
            )],
        );
        clear(&client, ns).await?;
    }

    // 6. The peers (PEERS=jobset,training-operator): the same gangs through each, one at a time.
    let mut pod_template = template["spec"]["template"].clone();
    pod_template["spec"]["containers"][0]["resources"] =
        serde_json::json!({"requests": {"cpu": "100m", "memory": "64Mi"}});
    if gpus > 0 {
        pod_template["spec"]["containers"][0]["resources"]["limits"] =
            serde_json::json!({"nvidia.com/gpu": gpus.to_string()});
    }
    for peer in peers {
        let ns = format!("bench-{}", peer.name());
        namespace(&client, &ns).await?;
        let running = lockstep_e2e::peers::start(peer, &cluster, state).await?;
        let peer_pid = running.pid().context("peer pid")?;
        register(state, peer.name(), peer_pid)?;
        let (peer_cpu0, _) = usage(peer_pid)?;
        let api = kube::Api::<kube::api::DynamicObject>::namespaced_with(
            client.clone(),
            &ns,
            &peer_resource(peer),
        );
        let before = Usage::take(b.counting, &client, state).await?;
        let start = Instant::now();
        let watch = watch_running(Api::namespaced(client.clone(), &ns), want, b.limit, start);
        let objects = (0..jobs_n)
            .map(|i| {
                let object = peer.job(&format!("job-{i:03}"), &ns, ranks, &pod_template);
                Ok(serde_json::from_value::<kube::api::DynamicObject>(object)?)
            })
            .collect();
        create_jobs(&api, objects)
            .await
            .with_context(|| format!("creating the {}", peer.resource()))?;
        let peer_phases = watch.await??;
        let (peer_cpu1, peer_peak) = usage(peer_pid)?;
        print_phase(
            &format!("{}: the same gangs as {}", peer.name(), peer.resource()),
            peer.name(),
            peer_phases,
            pods_n,
            &[(
                &format!("{} / operator", peer.name()),
                peer_phases[2].div_duration_f64(op_time),
            )],
        );
        let peer_time = peer_phases[2].as_secs_f64();
        if floors {
            println!(
                "  {} / design's floor {:>10.2}x",
                peer.name(),
                peer_time / median(design_times.clone())
            );
        }
        for (set, t) in &variants {
            let which = if Omit::parse(set)? == Omit::default() {
                "the whole design's floor again".to_string()
            } else {
                format!("the design's floor without {set}")
            };
            println!("  {} / {which}: {:.2}x", peer.name(), peer_time / t);
        }
        println!(
            "  {} CPU {:>14.2} s  (peak RSS {peer_peak:.1} MiB)",
            peer.name(),
            peer_cpu1 - peer_cpu0
        );
        let after = Usage::take(b.counting, &client, state).await?;
        after.print_since(&before, &format!("through {}", peer.name()));
        clear(&client, &ns).await?;
        running.stop(&cluster).await?;
        unregister(state, peer_pid)?;
    }
    Ok(())
}

/// The API resource of a peer's job kind.
fn peer_resource(peer: lockstep_e2e::peers::Peer) -> kube::api::ApiResource {
    use lockstep_e2e::peers::Peer;
    let (group, version, kind, plural) = match peer {
        Peer::JobSet => ("jobset.x-k8s.io", "v1alpha2", "JobSet", "jobsets"),
        Peer::TrainingOperator => ("kubeflow.org", "v1", "PyTorchJob", "pytorchjobs"),
    };
    kube::api::ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: format!("{group}/{version}"),
        kind: kind.into(),
        plural: plural.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::Omit;

    #[test]
    fn the_parts_left_out_are_read_by_name_and_an_unknown_one_is_refused() {
        let omit = Omit::parse("policy, rbac,running").expect("known parts");
        assert!(omit.policy && omit.rbac && omit.running);
        assert!(!omit.service && !omit.gate && !omit.status);
        assert_eq!(Omit::parse("none").expect("none"), Omit::default());
        assert_eq!(Omit::parse("").expect("empty"), Omit::default());
        let err = Omit::parse("policy,gates").expect_err("a typo").to_string();
        assert!(
            err.contains("\"gates\"") && err.contains("running"),
            "{err}"
        );
    }
}
