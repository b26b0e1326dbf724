//! Fault suite as a benchmark (not a test; prints figures): on the running test control plane
//! (`KUBECONFIG`, started by `bench/faults/run.sh`), each fault is injected in a number of trials,
//! and for each the bench prints whether the gang recovered, or what was lost (two pods for a
//! rank, a pod not controlled by its job, a checkpoint step lost, a wrong phase), then a table:
//! fault, trials, recovered, lost, median recovery in seconds.
//!
//! The faults (the operator runs in this process, as in the e2e suite):
//! 1. `operator killed`: an operator instance of the bench's own (its own `managedBy` name) aborted
//!    `KILLS` times (default 50) at pseudo-random moments while its job starts, fails and
//!    restarts (as `e2e/tests/e2e/crash.rs`); the invariants are checked after every kill, and a
//!    last instance must bring the gang to one whole running attempt;
//! 2. `rank killed`: rank 1's pod reported Failed (kwok), and rank 1's worker process killed with
//!    SIGKILL on the real node: the gang restarts, `status.lastFailure` names rank 1, the job
//!    succeeds (on the real node, resumed from the last checkpoint written before the kill);
//! 3. `rank hung`: rank 1's communication thread hangs (`LOCKSTEP_FAULT`, the worker's test hook,
//!    given through `envFrom` of a ConfigMap) with `progressTimeoutSeconds` 10: the gang fails
//!    within the timeout (plus 10 s of heartbeats and status writes), naming rank 1, and succeeds;
//! 4. `node lost`: the kwok node of rank 1 deleted: the gang runs again on the node left, no pod
//!    stuck on the lost one, `lastFailure` NodeLost;
//! 5. `corrupt checkpoint`: the newest checkpoint damaged between a killed attempt and the next:
//!    the next resumes from the one before (with the warning), not from 0, and succeeds;
//! 6. `orphaned re-create`: `delete --cascade=orphan`, then the same job created again: it never
//!    adopts the old objects, reports them in `Admitted=False` (reason `ObjectConflict`) naming
//!    them, makes no pod of its own meanwhile, and once they are deleted its gang runs, every pod
//!    controlled by the new UID and labelled `lockstep.dev/job-uid` with it;
//! 7. `quota refusal`: a ResourceQuota too small for the gang: `Admitted=False` `QuotaExceeded`,
//!    no pod placed; the quota raised, the whole gang runs.
//!
//! Faults 2 (real), 3 and 5 need the real node (`REAL_NODES=1`, root); without it they print
//! "not run". `TRIALS` (default 3) sets the trials of the others, `FAULTS` (e.g.
//! `FAULTS=quota,orphan`) runs only the faults whose row name contains one of the words, `SEED`
//! changes the moments of the operator kills.
//!
//!     KUBECONFIG=... bench-faults

#![allow(clippy::print_stdout)] // a benchmark prints its figures

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, ResourceQuota};
use kube::api::{
    Api, DeleteParams, DynamicObject, GroupVersionKind, ListParams, LogParams, Patch, PatchParams,
    PostParams, Preconditions,
};
use lockstep_api::contract::labels;
use lockstep_api::status::{Phase, condition_types, reasons};
use lockstep_api::{ParallelJob, ParallelJobStatus};
use lockstep_e2e::{Cluster, POOL_LABEL, TestNamespace, resumed_step, spawn_operator, worker_pid};
use serde_json::{Value, json};

/// The real node's name and the label and taint that keep other pods off it (realnode.sh).
const REAL_NODE: &str = "lockstep-real-0";
const REAL_NODE_LABEL: &str = "lockstep.dev/real-node";
/// How long a kwok gang may take to run; a real one to finish.
const KWOK_TIMEOUT: Duration = Duration::from_secs(90);
const REAL_TIMEOUT: Duration = Duration::from_secs(300);

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What a recovered trial measured: seconds from the fault to the recovery it waits for, and
/// what it saw.
struct Done {
    secs: f64,
    note: String,
}

/// One row of the table.
struct Row {
    fault: &'static str,
    results: Vec<Result<Done>>,
    not_run: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Jobs, pods and the invariants

/// `examples/ddp-digits.yaml` named `name` with `ranks` ranks, `epochs` epochs, restarts without
/// backoff.
fn digits(name: &str, ranks: usize, epochs: u64) -> Result<Value> {
    let mut v = lockstep_e2e::example_manifest("ddp-digits.yaml")?;
    v["metadata"]["name"] = name.into();
    v["spec"]["parallelism"]["dataParallel"] = ranks.into();
    v["spec"]["training"]["epochs"] = epochs.into();
    v["spec"]["failurePolicy"] =
        json!({"maxRestarts": 3, "restartBackoff": {"initialSeconds": 0, "maxSeconds": 0}});
    Ok(v)
}

/// Pins the job `v` to the real node.
fn on_real_node(v: &mut Value) {
    let spec = &mut v["spec"]["template"]["spec"];
    spec["nodeSelector"] = json!({ REAL_NODE_LABEL: "true" });
    spec["tolerations"] = json!([{"key": REAL_NODE_LABEL, "operator": "Exists"}]);
}

/// Puts the job `v` on the private node pool of `ns`.
fn on_pool(v: &mut Value, ns: &TestNamespace) {
    let placement = ns.pool_placement();
    let spec = &mut v["spec"]["template"]["spec"];
    spec["nodeSelector"] = placement["nodeSelector"].clone();
    spec["tolerations"] = placement["tolerations"].clone();
}

fn label<'a>(p: &'a Pod, key: &str) -> &'a str {
    p.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(key))
        .map_or("", String::as_str)
}

fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

fn node_of(p: &Pod) -> &str {
    p.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .unwrap_or("")
}

fn controlled_by(p: &Pod, uid: &str) -> bool {
    p.metadata
        .owner_references
        .as_ref()
        .is_some_and(|o| o.iter().any(|r| r.uid == uid && r.controller == Some(true)))
}

/// The invariants of a gang at any moment (`e2e/tests/e2e/crash.rs`): one pod per rank at most,
/// every pod controlled by the job, no pod of a later attempt than the job records, and live pods
/// of one attempt only.
fn check_invariants(pods: &[Pod], uid: &str, attempt: i32) -> Result<()> {
    let mut ranks = HashSet::new();
    let mut attempts = HashSet::new();
    for p in pods {
        let rank = label(p, labels::RANK);
        ensure!(ranks.insert(rank.to_string()), "rank {rank} has two pods");
        ensure!(
            controlled_by(p, uid),
            "pod {:?} is not controlled by its job (an orphan or another's)",
            p.metadata.name
        );
        let a: i32 = label(p, labels::ATTEMPT).parse().unwrap_or(-1);
        ensure!(
            a <= attempt,
            "a pod of attempt {a} exists while the job records attempt {attempt}"
        );
        if p.metadata.deletion_timestamp.is_none() {
            attempts.insert(a);
        }
    }
    ensure!(
        attempts.len() <= 1,
        "live pods of attempts {attempts:?} coexist"
    );
    Ok(())
}

/// A job and its pods, as one trial sees them.
struct Job {
    jobs: Api<ParallelJob>,
    pods: Api<Pod>,
    name: String,
    uid: String,
}

/// The job's status and its pods at one moment.
struct Seen {
    status: ParallelJobStatus,
    pods: Vec<Pod>,
}

impl Seen {
    /// The whole gang of `ranks` runs in attempt `attempt` (and the job says Running).
    fn runs_whole(&self, ranks: usize, attempt: i32) -> bool {
        let want = attempt.to_string();
        self.status.phase == Some(Phase::Running)
            && self.status.attempt == attempt
            && self.pods.len() == ranks
            && self
                .pods
                .iter()
                .all(|p| phase(p) == "Running" && label(p, labels::ATTEMPT) == want)
    }
}

impl Job {
    async fn create(ns: &TestNamespace, v: Value) -> Result<Self> {
        let jobs: Api<ParallelJob> = ns.api();
        let name = v["metadata"]["name"]
            .as_str()
            .context("the job has a name")?
            .to_string();
        let job = jobs
            .create(&PostParams::default(), &serde_json::from_value(v)?)
            .await?;
        Ok(Self {
            jobs,
            pods: ns.api(),
            name,
            uid: job.metadata.uid.context("the API server gives a UID")?,
        })
    }

    async fn seen(&self) -> Result<Seen> {
        let status = self.jobs.get(&self.name).await?.status.unwrap_or_default();
        let pods = self
            .pods
            .list(&ListParams::default().labels(&format!("{}={}", labels::JOB_NAME, self.name)))
            .await?
            .items;
        Ok(Seen { status, pods })
    }

    /// Polls until `done`, checking the invariants at every look (a violation is a loss) and
    /// that the job has not Failed (a wrong phase).
    async fn until(
        &self,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&Seen) -> bool,
    ) -> Result<Seen> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.seen().await?;
            check_invariants(&seen.pods, &self.uid, seen.status.attempt)?;
            ensure!(
                seen.status.phase != Some(Phase::Failed),
                "wrong phase: the job Failed while waiting until {what}: lastFailure {:?}, \
                 conditions {:?}",
                seen.status.last_failure,
                seen.status.conditions
            );
            if done(&seen) {
                return Ok(seen);
            }
            if Instant::now() >= deadline {
                bail!(
                    "wrong phase: not {what} after {timeout:?} (phase {:?}, attempt {}, pods {:?})",
                    seen.status.phase,
                    seen.status.attempt,
                    seen.pods
                        .iter()
                        .map(|p| format!(
                            "{}:{}:a{}",
                            p.metadata.name.as_deref().unwrap_or(""),
                            phase(p),
                            label(p, labels::ATTEMPT)
                        ))
                        .collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn log(&self, pod: &str) -> Result<String> {
        Ok(self.pods.logs(pod, &LogParams::default()).await?)
    }
}

// ---------------------------------------------------------------------------------------------
// Namespaces, real-node helpers

/// A fresh namespace for one trial.
async fn namespace(cluster: &Cluster, prefix: &str) -> Result<TestNamespace> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let name = format!("faults-{prefix}-{:05}", nanos % 100_000);
    let namespaces: Api<Namespace> = Api::all(cluster.client.clone());
    let ns: Namespace = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}
    }))?;
    namespaces.create(&PostParams::default(), &ns).await?;
    Ok(TestNamespace {
        cluster: cluster.clone(),
        name,
    })
}

/// Deletes a trial's namespace and its node pool; with `wait`, until the namespace is gone (the
/// real node's pods hold its two cores until then).
async fn cleanup(ns: &TestNamespace, wait: bool) {
    let client = ns.cluster.client.clone();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let _ = namespaces
        .delete(&ns.name, &DeleteParams::background())
        .await;
    let _ = Api::<Node>::all(client)
        .delete_collection(
            &DeleteParams::background(),
            &ListParams::default().labels(&format!("{POOL_LABEL}={}", ns.name)),
        )
        .await;
    if wait {
        let _ = lockstep_e2e::wait_until(
            Duration::from_secs(120),
            "the namespace is gone",
            || async { Ok(namespaces.get_opt(&ns.name).await?.is_none()) },
        )
        .await;
    }
}

/// Whether the real node of `REAL_NODES=1` is there and Ready.
async fn real_node_ready(cluster: &Cluster) -> bool {
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    nodes
        .get_opt(REAL_NODE)
        .await
        .ok()
        .flatten()
        .is_some_and(|n| {
            n.status
                .and_then(|s| s.conditions)
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
}

/// Mounts a host folder every rank shares at the checkpoint path of the job `v`, with
/// checkpoints every `every` steps; returns the folder.
fn shared_checkpoints(ns: &str, v: &mut Value, every: u64) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("lockstep-{ns}"));
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
    v["spec"]["training"]["checkpoint"] = json!({"everySteps": every, "keep": 3});
    let spec = &mut v["spec"]["template"]["spec"];
    spec["volumes"] = json!([{"name": "checkpoints",
        "hostPath": {"path": dir.to_string_lossy(), "type": "Directory"}}]);
    spec["containers"][0]["volumeMounts"] = json!([{"name": "checkpoints",
        "mountPath": lockstep_api::contract::paths::CHECKPOINT_DIR}]);
    Ok(dir)
}

/// The steps of the whole checkpoints in `dir`, oldest first.
fn checkpoint_steps(dir: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    e.file_name()
                        .into_string()
                        .ok()?
                        .strip_prefix("step-")?
                        .strip_suffix(".safetensors")?
                        .parse()
                        .ok()
                })
                .collect()
        })
        .unwrap_or_default();
    steps.sort_unstable();
    steps
}

fn kill_9(pid: i32) -> Result<()> {
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()?;
    ensure!(status.success(), "kill -9 {pid} failed");
    Ok(())
}

/// Waits until the job records a checkpoint folder with at least `n` whole checkpoints.
async fn wait_checkpoints(job: &Job, dir: &Path, n: usize) -> Result<()> {
    job.until(Duration::from_secs(180), "checkpoints are written", |_| {
        checkpoint_steps(dir).len() >= n
    })
    .await
    .map(drop)
}

// ---------------------------------------------------------------------------------------------
// 1. The operator killed at random points

async fn operator_killed(cluster: &Cluster, kills: usize) -> Vec<Result<Done>> {
    let ns = match namespace(cluster, "crash").await {
        Ok(ns) => ns,
        Err(e) => return vec![Err(e)],
    };
    let results = operator_killed_in(&ns, kills).await;
    if results.iter().any(Result::is_err) {
        eprintln!("{}", ns.dump().await);
    }
    cleanup(&ns, false).await;
    results
}

async fn operator_killed_in(ns: &TestNamespace, kills: usize) -> Vec<Result<Done>> {
    use lockstep_operator::controller::Settings;
    const RANKS: usize = 4;
    let controller_name = format!("faults.lockstep.dev/{}", ns.name);
    let settings = Settings {
        controller_name: controller_name.clone(),
        ..Settings::default()
    };
    let spawn = || spawn_operator(&ns.cluster.client, &settings);
    let job = async {
        let mut v = digits("crashy", RANKS, 40)?;
        v["spec"]["managedBy"] = controller_name.clone().into();
        v["spec"]["failurePolicy"]["maxRestarts"] = 1000.into();
        Job::create(ns, v).await
    }
    .await;
    let job = match job {
        Ok(j) => j,
        Err(e) => return vec![Err(e)],
    };
    // Kills fall while the job starts, while a failed rank's gang restarts, and while it runs:
    // a rank fails whenever it runs, for the first third of the kills.
    let restarts = (kills / 3).max(1) as i32;
    let mut results = Vec::new();
    let mut seed: u64 = std::env::var("SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x9e37_79b9_7f4a_7c15)
        | 1;
    for kill in 0..kills {
        let operator = spawn();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let at = 20 + seed % 300;
        tokio::time::sleep(Duration::from_millis(at)).await;
        operator.abort(); // a crash: in-flight requests may or may not have landed
        let _ = operator.await;
        let outcome = async {
            let seen = job.seen().await?;
            check_invariants(&seen.pods, &job.uid, seen.status.attempt)?;
            if seen.status.phase == Some(Phase::Running) && seen.status.attempt < restarts {
                // Play the kubelet: a rank fails. The pod may be gone already (the killed
                // operator's last write): that is fine.
                let victim = format!("crashy-{}", kill % RANKS);
                let _ = lockstep_e2e::terminate_worker(&job.pods, &victim, 1).await;
            }
            Ok::<_, anyhow::Error>(format!(
                "killed after {at} ms: phase {:?}, attempt {}, {} pods",
                seen.status.phase,
                seen.status.attempt,
                seen.pods.len()
            ))
        }
        .await;
        match &outcome {
            Ok(note) => println!("  operator killed {}/{kills}: {note}", kill + 1),
            Err(e) => println!("  operator killed {}/{kills}: LOST: {e:#}", kill + 1),
        }
        results.push(outcome);
    }
    // A last instance that stays: the gang converges to one whole running attempt.
    let start = Instant::now();
    let operator = spawn();
    let converged = job
        .until(
            Duration::from_secs(120),
            "the gang runs whole in one attempt",
            |s| s.runs_whole(RANKS, s.status.attempt),
        )
        .await;
    let secs = start.elapsed().as_secs_f64();
    operator.abort();
    let _ = operator.await;
    match converged {
        Ok(seen) => {
            println!(
                "  operator killed: converged {secs:.1} s after the last kill (attempt {})",
                seen.status.attempt
            );
            results
                .into_iter()
                .map(|r| r.map(|note| Done { secs, note }))
                .collect()
        }
        Err(e) => {
            println!("  operator killed: LOST: the gang never converged: {e:#}");
            results
                .into_iter()
                .map(|_| Err(anyhow!("the gang did not converge after the kills: {e:#}")))
                .collect()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. A rank killed

/// kwok: rank 1's pod reported Failed with exit code 1.
async fn rank_killed_kwok(ns: &TestNamespace) -> Result<Done> {
    let job = Job::create(ns, digits("rk", 2, 40)?).await?;
    job.until(KWOK_TIMEOUT, "the gang runs", |s| s.runs_whole(2, 0))
        .await?;
    let start = Instant::now();
    lockstep_e2e::terminate_worker(&job.pods, "rk-1", 1).await?;
    job.until(KWOK_TIMEOUT, "attempt 1 runs whole", |s| s.runs_whole(2, 1))
        .await?;
    let secs = start.elapsed().as_secs_f64();
    let seen = job.seen().await?;
    let f = seen
        .status
        .last_failure
        .context("wrong status: no lastFailure")?;
    ensure!(
        (f.attempt, f.rank, f.pod.as_str(), f.exit_code) == (0, 1, "rk-1", Some(1)),
        "wrong status: lastFailure does not name rank 1 of attempt 0 with exit code 1: {f:?}"
    );
    for r in 0..2 {
        lockstep_e2e::terminate_worker(&job.pods, &format!("rk-{r}"), 0).await?;
    }
    job.until(KWOK_TIMEOUT, "Succeeded", |s| {
        s.status.phase == Some(Phase::Succeeded)
    })
    .await?;
    Ok(Done {
        secs,
        note: format!(
            "lastFailure rank {} exit {:?}; Succeeded",
            f.rank, f.exit_code
        ),
    })
}

/// Real node: rank 1's worker process killed (SIGKILL) past the first checkpoints.
async fn rank_killed_real(ns: &TestNamespace) -> Result<Done> {
    let mut v = digits("rkr", 2, 300)?;
    on_real_node(&mut v);
    let interval = 500;
    let top = shared_checkpoints(&ns.name, &mut v, interval)?;
    let result = async {
        let job = Job::create(ns, v).await?;
        let dir = top.join("rkr").join(&job.uid);
        wait_checkpoints(&job, &dir, 2).await?;
        let pid = worker_pid(&ns.name, "rkr", 1).context("rank 1's worker process")?;
        let latest_before = checkpoint_steps(&dir).last().copied().unwrap_or(0);
        kill_9(pid)?;
        let killed = Instant::now();
        job.until(Duration::from_secs(120), "attempt 1 runs whole", |s| {
            s.runs_whole(2, 1)
        })
        .await?;
        let secs = killed.elapsed().as_secs_f64();
        let seen = job
            .until(REAL_TIMEOUT, "Succeeded", |s| {
                s.status.phase == Some(Phase::Succeeded)
            })
            .await?;
        let f = seen
            .status
            .last_failure
            .context("wrong status: no lastFailure")?;
        ensure!(
            (f.attempt, f.rank, f.pod.as_str(), f.exit_code) == (0, 1, "rkr-1", Some(137)),
            "wrong status: lastFailure does not name rank 1 of attempt 0 killed (137): {f:?}"
        );
        let resumed = resumed_step(&job.log("rkr-0").await?)
            .context("checkpoint lost: attempt 1 did not resume (started from 0)")?;
        ensure!(
            resumed >= latest_before,
            "checkpoint step lost: resumed from {resumed}, the last checkpoint before the kill \
             was {latest_before}"
        );
        let p = seen.status.progress.context("no progress")?;
        ensure!(
            Some(p.step) == p.total_steps,
            "wrong end: step {} of {:?}",
            p.step,
            p.total_steps
        );
        Ok(Done {
            secs,
            note: format!(
                "lastFailure rank 1 exit 137; resumed from {resumed} (last before the kill \
                 {latest_before}); Succeeded"
            ),
        })
    }
    .await;
    let _ = std::fs::remove_dir_all(&top);
    result
}

// ---------------------------------------------------------------------------------------------
// 3. A rank hung

/// Real node: rank 1's communication thread hangs at step `HANG_STEP` of attempt 0.
async fn rank_hung(ns: &TestNamespace) -> Result<Done> {
    const HANG_STEP: u64 = 1000;
    const TIMEOUT_S: u64 = 10;
    // `LOCKSTEP_*` is reserved in `env`; the worker's test hook comes through `envFrom` of a
    // ConfigMap, made harmless (another rank) before the next attempt starts.
    let maps: Api<ConfigMap> = ns.api();
    let fault = |spec: String| -> Result<ConfigMap> {
        Ok(serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "fault"},
            "data": {"LOCKSTEP_FAULT": spec}
        }))?)
    };
    maps.create(
        &PostParams::default(),
        &fault(format!("hang-comm-thread@rank=1,step={HANG_STEP}"))?,
    )
    .await?;
    let mut v = digits("hang", 2, 150)?;
    on_real_node(&mut v);
    v["spec"]["failurePolicy"]["progressTimeoutSeconds"] = TIMEOUT_S.into();
    v["spec"]["template"]["spec"]["containers"][0]["envFrom"] =
        json!([{"configMapRef": {"name": "fault", "optional": true}}]);
    let job = Job::create(ns, v).await?;
    job.until(Duration::from_secs(120), "the gang runs", |s| {
        s.runs_whole(2, 0)
    })
    .await?;
    // The moment rank 1 says its communication thread hangs.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let log = job.log("hang-1").await.unwrap_or_default();
        if log.contains("injected fault") {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "rank 1 never hung (no 'injected fault' in its log):\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let hung = Instant::now();
    maps.replace(
        "fault",
        &PostParams::default(),
        &fault("hang-comm-thread@rank=99,step=0".into())?,
    )
    .await?;
    job.until(
        Duration::from_secs(120),
        "the gang fails and restarts",
        |s| s.status.attempt >= 1,
    )
    .await?;
    let secs = hung.elapsed().as_secs_f64();
    let seen = job.seen().await?;
    let f = seen
        .status
        .last_failure
        .context("wrong status: no lastFailure")?;
    ensure!(
        f.rank == 1 && f.attempt == 0,
        "wrong status: lastFailure does not name hung rank 1: {f:?}"
    );
    ensure!(
        secs <= (TIMEOUT_S + 10) as f64,
        "the hang was found after {secs:.1} s, the progress timeout is {TIMEOUT_S} s"
    );
    job.until(REAL_TIMEOUT, "Succeeded", |s| {
        s.status.phase == Some(Phase::Succeeded)
    })
    .await?;
    Ok(Done {
        secs,
        note: format!(
            "lastFailure rank {} exit {:?} ({}); Succeeded",
            f.rank,
            f.exit_code,
            f.message
                .unwrap_or_default()
                .chars()
                .take(120)
                .collect::<String>()
        ),
    })
}

// ---------------------------------------------------------------------------------------------
// 4. A node lost

async fn node_lost(ns: &TestNamespace) -> Result<Done> {
    // One rank per node (8 GPUs each), and a node to spare.
    ns.create_node_pool(3, 8).await?;
    let mut v = digits("nl", 2, 40)?;
    v["spec"]["parallelism"]["gpusPerWorker"] = 8.into();
    on_pool(&mut v, ns);
    let job = Job::create(ns, v).await?;
    let seen = job
        .until(KWOK_TIMEOUT, "the gang runs", |s| s.runs_whole(2, 0))
        .await?;
    let lost = seen
        .pods
        .iter()
        .find(|p| label(p, labels::RANK) == "1")
        .map(|p| node_of(p).to_string())
        .context("rank 1 is bound")?;
    let start = Instant::now();
    Api::<Node>::all(ns.cluster.client.clone())
        .delete(&lost, &DeleteParams::default())
        .await?;
    job.until(
        KWOK_TIMEOUT,
        "attempt 1 runs whole off the lost node",
        |s| {
            s.runs_whole(2, 1)
                && s.pods
                    .iter()
                    .all(|p| node_of(p) != lost && p.metadata.deletion_timestamp.is_none())
        },
    )
    .await?;
    let secs = start.elapsed().as_secs_f64();
    let f = job
        .seen()
        .await?
        .status
        .last_failure
        .context("wrong status: no lastFailure")?;
    ensure!(
        f.reason == "NodeLost" && f.node.as_deref() == Some(lost.as_str()) && f.rank == 1,
        "wrong status: lastFailure is not rank 1 NodeLost on {lost}: {f:?}"
    );
    // Nothing stays stuck on the lost node (any pod of the namespace).
    let stuck: Vec<String> = job
        .pods
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|p| node_of(p) == lost)
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    ensure!(stuck.is_empty(), "pods left on the lost node: {stuck:?}");
    Ok(Done {
        secs,
        note: format!("lastFailure NodeLost on {lost}, rank {}", f.rank),
    })
}

// ---------------------------------------------------------------------------------------------
// 5. A corrupt newest checkpoint

async fn corrupt_checkpoint(ns: &TestNamespace) -> Result<Done> {
    let mut v = digits("cc", 2, 300)?;
    on_real_node(&mut v);
    // Time between the killed attempt and the next to damage the newest file.
    v["spec"]["failurePolicy"]["restartBackoff"] = json!({"initialSeconds": 8, "maxSeconds": 8});
    let interval = 500;
    let top = shared_checkpoints(&ns.name, &mut v, interval)?;
    let result = async {
        let job = Job::create(ns, v).await?;
        let dir = top.join("cc").join(&job.uid);
        wait_checkpoints(&job, &dir, 2).await?;
        let pid = worker_pid(&ns.name, "cc", 1).context("rank 1's worker process")?;
        kill_9(pid)?;
        // Attempt 0 is over (no worker of it writes any more), attempt 1 not started.
        job.until(
            Duration::from_secs(60),
            "attempt 0's workers are gone",
            |s| {
                s.status.attempt == 1
                    && worker_pid(&ns.name, "cc", 0).is_none()
                    && worker_pid(&ns.name, "cc", 1).is_none()
            },
        )
        .await?;
        let steps = checkpoint_steps(&dir);
        let [.., previous, newest] = steps[..] else {
            bail!("fewer than two checkpoints: {steps:?}");
        };
        let seen = job.seen().await?;
        ensure!(
            seen.pods.iter().all(|p| label(p, labels::ATTEMPT) == "0"),
            "harness too late: attempt 1 started before the checkpoint was damaged"
        );
        let path = dir.join(format!("step-{newest:08}.safetensors"));
        let mut bytes = std::fs::read(&path)?;
        let at = bytes.len() * 3 / 4;
        for b in bytes.iter_mut().skip(at).take(64) {
            *b ^= 0xff;
        }
        std::fs::write(&path, &bytes)?;
        let damaged = Instant::now();
        let seen = job
            .until(REAL_TIMEOUT, "Succeeded", |s| {
                s.status.phase == Some(Phase::Succeeded)
            })
            .await?;
        let secs = damaged.elapsed().as_secs_f64();
        ensure!(
            seen.status.attempt == 1,
            "wrong status: attempt {} (the damaged file cost a restart)",
            seen.status.attempt
        );
        let log = job.log("cc-0").await?;
        let resumed = resumed_step(&log)
            .context("checkpoint lost: attempt 1 started from 0, not from the previous one")?;
        ensure!(
            resumed == previous,
            "checkpoint step lost: resumed from {resumed}; the newest ({newest}) was damaged, \
             the previous kept one is {previous}"
        );
        ensure!(
            log.contains("the newest checkpoint is refused"),
            "no warning about the damaged checkpoint in rank 0's log"
        );
        let p = seen.status.progress.context("no progress")?;
        ensure!(
            Some(p.step) == p.total_steps,
            "wrong end: step {} of {:?}",
            p.step,
            p.total_steps
        );
        Ok(Done {
            secs,
            note: format!(
                "step {newest} damaged, resumed from {previous} with the warning; Succeeded"
            ),
        })
    }
    .await;
    let _ = std::fs::remove_dir_all(&top);
    result
}

// ---------------------------------------------------------------------------------------------
// 6. An orphaned re-create

/// Every object of namespace `ns` (of every listable, deletable kind) that `uid` controls or
/// owns: (apiVersion, kind, name, uid).
async fn owned_objects(
    ns: &TestNamespace,
    uid: &str,
) -> Result<Vec<(String, String, String, String)>> {
    let kinds = ns
        .cluster
        .kubectl(&[
            "api-resources",
            "--namespaced",
            "--verbs=list,delete",
            "-o",
            "name",
        ])
        .await?;
    let kinds: Vec<&str> = kinds.lines().filter(|k| !k.starts_with("events")).collect();
    let text = ns
        .cluster
        .kubectl(&["get", &kinds.join(","), "-n", &ns.name, "-o", "json"])
        .await?;
    let list: Value = serde_json::from_str(&text)?;
    Ok(list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|o| {
            o["metadata"]["ownerReferences"]
                .as_array()
                .is_some_and(|rs| rs.iter().any(|r| r["uid"] == uid))
        })
        .map(|o| {
            let s = |v: &Value| v.as_str().unwrap_or("").to_string();
            (
                s(&o["apiVersion"]),
                s(&o["kind"]),
                s(&o["metadata"]["name"]),
                s(&o["metadata"]["uid"]),
            )
        })
        .collect())
}

async fn orphaned_recreate(ns: &TestNamespace) -> Result<Done> {
    let v = digits("orph", 2, 40)?;
    let old = Job::create(ns, v.clone()).await?;
    old.until(KWOK_TIMEOUT, "the gang runs", |s| s.runs_whole(2, 0))
        .await?;
    let orphans = owned_objects(ns, &old.uid).await?;
    let old_pods: Vec<(String, String)> = orphans
        .iter()
        .filter(|o| o.1 == "Pod")
        .map(|o| (o.2.clone(), o.3.clone()))
        .collect();
    ensure!(old_pods.len() == 2, "the old gang's pods: {orphans:?}");
    ns.cluster
        .kubectl(&[
            "delete",
            "paralleljob",
            "orph",
            "-n",
            &ns.name,
            "--cascade=orphan",
            "--wait=true",
            "--timeout=60s",
        ])
        .await?;
    let new = Job::create(ns, v).await?;
    ensure!(new.uid != old.uid, "the same UID");
    // The new job must report the old objects, and never adopt them.
    let adopted = |pods: &[Pod]| -> Result<()> {
        for p in pods {
            let uid = p.metadata.uid.as_deref().unwrap_or("");
            if old_pods.iter().any(|o| o.1 == uid)
                && p.metadata
                    .owner_references
                    .as_ref()
                    .is_some_and(|rs| rs.iter().any(|r| r.uid == new.uid))
            {
                bail!(
                    "adopted: the new job took over the old pod {:?}",
                    p.metadata.name
                );
            }
        }
        Ok(())
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let condition = loop {
        let seen = new.seen().await?;
        adopted(&seen.pods)?;
        ensure!(
            seen.status.phase != Some(Phase::Failed) && seen.status.phase != Some(Phase::Succeeded),
            "wrong phase: the new job is {:?} on the old pods' account",
            seen.status.phase
        );
        if let Some(c) = seen.status.conditions.iter().find(|c| {
            c.type_ == condition_types::ADMITTED
                && c.status == "False"
                && c.reason == reasons::OBJECT_CONFLICT
        }) {
            break c.clone();
        }
        if Instant::now() >= deadline {
            let running_old = seen
                .pods
                .iter()
                .filter(|p| {
                    let uid = p.metadata.uid.as_deref().unwrap_or("");
                    old_pods.iter().any(|o| o.1 == uid)
                })
                .count();
            bail!(
                "no condition Admitted=False (ObjectConflict) on the re-created job after 60 s \
                 (phase {:?}, {running_old} of the old pods still there, conditions {:?})",
                seen.status.phase,
                seen.status
                    .conditions
                    .iter()
                    .map(|c| format!("{}={} {}", c.type_, c.status, c.reason))
                    .collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let named: Vec<&str> = orphans
        .iter()
        .filter(|o| condition.message.contains(&o.2))
        .map(|o| o.2.as_str())
        .collect();
    ensure!(
        !named.is_empty(),
        "the conflict's message names none of the old objects {:?}: {}",
        orphans.iter().map(|o| &o.2).collect::<Vec<_>>(),
        condition.message
    );
    // Still not adopted, and no pod of the new job's own, while the old objects are there.
    let seen = new.seen().await?;
    adopted(&seen.pods)?;
    ensure!(
        !seen.pods.iter().any(|p| controlled_by(p, &new.uid)),
        "the new job made pods while the old objects were in the way"
    );
    // The trial deletes the orphans (only those: UID preconditions), and the gang starts.
    let start = Instant::now();
    for (api_version, kind, name, uid) in &orphans {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let (ar, _) = kube::discovery::pinned_kind(
            &ns.cluster.client,
            &GroupVersionKind::gvk(group, version, kind),
        )
        .await?;
        let api: Api<DynamicObject> =
            Api::namespaced_with(ns.cluster.client.clone(), &ns.name, &ar);
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(uid.clone()),
                resource_version: None,
            }),
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        };
        match api.delete(name, &dp).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    let seen = new
        .until(KWOK_TIMEOUT, "the new job's gang runs whole", |s| {
            s.runs_whole(2, s.status.attempt)
        })
        .await?;
    let secs = start.elapsed().as_secs_f64();
    for p in &seen.pods {
        ensure!(
            controlled_by(p, &new.uid) && label(p, labels::JOB_UID) == new.uid,
            "pod {:?} is not the new job's (controller and {})",
            p.metadata.name,
            labels::JOB_UID
        );
    }
    let note = format!(
        "{} old objects, {} named in the condition, none adopted; once they were deleted the \
         new UID's gang ran in {secs:.1} s, every pod controlled by it and labelled with it",
        orphans.len(),
        named.len()
    );
    Ok(Done { secs, note })
}

// ---------------------------------------------------------------------------------------------
// 7. A quota refusal

async fn quota_refusal(ns: &TestNamespace) -> Result<Done> {
    ns.create_node_pool(2, 0).await?;
    let quotas: Api<ResourceQuota> = ns.api();
    let quota: ResourceQuota = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ResourceQuota",
        "metadata": {"name": "team-cpu"},
        "spec": {"hard": {"requests.cpu": "750m"}}
    }))?;
    quotas.create(&PostParams::default(), &quota).await?;
    lockstep_e2e::wait_until(KWOK_TIMEOUT, "the quota is counted", || async {
        Ok(quotas
            .get("team-cpu")
            .await?
            .status
            .and_then(|s| s.used)
            .is_some_and(|u| u.contains_key("requests.cpu")))
    })
    .await?;
    let mut v = digits("big", 2, 40)?;
    on_pool(&mut v, ns);
    let job = Job::create(ns, v).await?;
    let placed = |s: &Seen| -> Result<()> {
        if let Some(c) = s
            .status
            .conditions
            .iter()
            .find(|c| c.reason == "TemplateRejected")
        {
            bail!(
                "wrong status: the refusal was reported TemplateRejected: {}",
                c.message
            );
        }
        for p in &s.pods {
            ensure!(
                node_of(p).is_empty() && phase(p) != "Running",
                "partial gang: pod {:?} of a gang its quota cannot hold was placed",
                p.metadata.name
            );
        }
        Ok(())
    };
    let mut bad = None;
    job.until(KWOK_TIMEOUT, "Admitted=False QuotaExceeded", |s| {
        if let Err(e) = placed(s) {
            bad = Some(e);
            return true;
        }
        s.status.conditions.iter().any(|c| {
            c.type_ == "Admitted"
                && c.status == "False"
                && c.reason == "QuotaExceeded"
                && c.message.contains("team-cpu")
        })
    })
    .await?;
    if let Some(e) = bad {
        return Err(e);
    }
    // It waits whole: nothing placed for a while.
    let watch = Instant::now() + Duration::from_secs(5);
    while Instant::now() < watch {
        let s = job.seen().await?;
        check_invariants(&s.pods, &job.uid, s.status.attempt)?;
        placed(&s)?;
        // Queued, or Starting while a retry creates the (gated, unplaced) pods.
        ensure!(
            matches!(s.status.phase, Some(Phase::Queued | Phase::Starting)),
            "wrong phase while waiting for quota: {:?}",
            s.status.phase
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let start = Instant::now();
    quotas
        .patch(
            "team-cpu",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"hard": {"requests.cpu": "2"}}})),
        )
        .await?;
    let seen = job
        .until(Duration::from_secs(180), "the whole gang runs", |s| {
            s.runs_whole(2, 0)
        })
        .await?;
    let secs = start.elapsed().as_secs_f64();
    let admitted = seen
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == "Admitted")
        .map(|c| format!("{} {}", c.status, c.reason))
        .unwrap_or_default();
    ensure!(
        admitted == "True GangAdmitted",
        "wrong status: Admitted is {admitted} once the gang runs"
    );
    Ok(Done {
        secs,
        note: "waited whole with QuotaExceeded; ran whole after the raise".into(),
    })
}

// ---------------------------------------------------------------------------------------------
// The runner and the table

/// Runs `trials` trials of one fault, each in a namespace of its own.
async fn trials<F, Fut>(
    cluster: &Cluster,
    fault: &'static str,
    prefix: &str,
    n: usize,
    real: bool,
    trial: F,
) -> Row
where
    F: Fn(TestNamespace) -> Fut,
    Fut: std::future::Future<Output = Result<Done>>,
{
    let mut results = Vec::new();
    for i in 0..n {
        let result = async {
            let ns = namespace(cluster, prefix).await?;
            let handle = TestNamespace {
                cluster: ns.cluster.clone(),
                name: ns.name.clone(),
            };
            let r = trial(handle).await;
            if let Err(e) = &r {
                eprintln!("{fault} trial {} lost: {e:#}\n{}", i + 1, ns.dump().await);
            }
            cleanup(&ns, real).await;
            r
        }
        .await;
        match &result {
            Ok(d) => println!(
                "  {fault} {}/{n}: recovered in {:.1} s: {}",
                i + 1,
                d.secs,
                d.note
            ),
            Err(e) => println!("  {fault} {}/{n}: LOST: {e:#}", i + 1),
        }
        results.push(result);
    }
    Row {
        fault,
        results,
        not_run: None,
    }
}

/// What the recovery time of each fault measures.
const RECOVERY: &[(&str, &str)] = &[
    (
        "operator killed",
        "a last operator instance started after the last kill -> one whole running attempt",
    ),
    (
        "rank killed (kwok",
        "the pod reported Failed -> the next attempt runs whole",
    ),
    (
        "rank killed (real",
        "kill -9 -> the next attempt's pods run whole",
    ),
    (
        "rank hung",
        "the hang seen in rank 1's log -> the job's next attempt (the timeout is 10 s)",
    ),
    (
        "node lost",
        "the node deleted -> the next attempt runs whole on the nodes left",
    ),
    (
        "corrupt",
        "the newest checkpoint damaged -> Succeeded (8 s of restart backoff and the training included)",
    ),
    (
        "orphaned",
        "the trial deleted the orphans -> the new job's gang runs whole",
    ),
    (
        "quota",
        "the quota raised -> the whole gang runs (the operator retries with backoff)",
    ),
];

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[n / 2]),
        n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{:<32} | {:>6} | {:>9} | {:>4} | {:>16}",
        "fault", "trials", "recovered", "lost", "median recovery s"
    );
    println!("{}", "-".repeat(82));
    for r in rows {
        if let Some(why) = &r.not_run {
            println!("{:<32} | not run: {why}", r.fault);
            continue;
        }
        let ok: Vec<f64> = r
            .results
            .iter()
            .filter_map(|x| x.as_ref().ok().map(|d| d.secs))
            .collect();
        let lost = r.results.len() - ok.len();
        let med = median(ok.clone()).map_or("-".to_string(), |m| format!("{m:.1}"));
        println!(
            "{:<32} | {:>6} | {:>9} | {:>4} | {:>16}",
            r.fault,
            r.results.len(),
            ok.len(),
            lost,
            med
        );
    }
    println!();
    println!("recovery is measured from -> to:");
    for r in rows.iter().filter(|r| r.not_run.is_none()) {
        if let Some((_, what)) = RECOVERY.iter().find(|(k, _)| r.fault.starts_with(k)) {
            println!("  {:<32} {what}", r.fault);
        }
    }
    let lost: BTreeMap<&str, Vec<String>> = rows
        .iter()
        .map(|r| {
            (
                r.fault,
                r.results
                    .iter()
                    .filter_map(|x| x.as_ref().err().map(|e| format!("{e:#}")))
                    .collect::<Vec<_>>(),
            )
        })
        .filter(|(_, v)| !v.is_empty())
        .collect();
    if !lost.is_empty() {
        println!();
        println!("what was lost:");
        for (fault, reasons) in lost {
            let mut distinct: Vec<String> = Vec::new();
            for r in reasons {
                let short: String = r.chars().take(300).collect();
                if !distinct.contains(&short) {
                    distinct.push(short);
                }
            }
            for r in distinct {
                println!("  {fault}: {r}");
            }
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let cluster = lockstep_e2e::cluster().await;
    let real = real_node_ready(&cluster).await;
    let kills = env_or("KILLS", 50);
    let n = env_or("TRIALS", 3);
    let only: Option<Vec<String>> = std::env::var("FAULTS")
        .ok()
        .filter(|s| !s.is_empty())
        .map(|s| s.split(',').map(|w| w.trim().to_string()).collect());
    let wanted = |fault: &str| {
        only.as_ref()
            .is_none_or(|ws| ws.iter().any(|w| fault.contains(w.as_str())))
    };
    let no_root = "needs root (REAL_NODES=1: the real node)".to_string();
    println!(
        "fault suite: {kills} operator kills, {n} trials of each other fault; real node: {}",
        if real { "yes" } else { "no" }
    );
    let started = Instant::now();
    let mut rows = Vec::new();

    macro_rules! fault {
        ($name:expr, $prefix:expr, $real:expr, $f:expr) => {
            if wanted($name) {
                if $real && !real {
                    println!("  {}: not run: {no_root}", $name);
                    rows.push(Row {
                        fault: $name,
                        results: Vec::new(),
                        not_run: Some(no_root.clone()),
                    });
                } else {
                    let t = Instant::now();
                    rows.push(trials(&cluster, $name, $prefix, n, $real, $f).await);
                    println!("  ({} took {:.0} s)", $name, t.elapsed().as_secs_f64());
                }
            }
        };
    }

    if wanted("operator killed") {
        let t = Instant::now();
        rows.push(Row {
            fault: "operator killed (random points)",
            results: operator_killed(&cluster, kills).await,
            not_run: None,
        });
        println!(
            "  (operator killed took {:.0} s)",
            t.elapsed().as_secs_f64()
        );
    }
    fault!(
        "rank killed (kwok pod Failed)",
        "rank-kwok",
        false,
        |ns| async move { rank_killed_kwok(&ns).await }
    );
    fault!(
        "rank killed (real, kill -9)",
        "rank-real",
        true,
        |ns| async move { rank_killed_real(&ns).await }
    );
    fault!(
        "rank hung (real, comm thread)",
        "hang",
        true,
        |ns| async move { rank_hung(&ns).await }
    );
    fault!("node lost (kwok)", "node", false, |ns| async move {
        node_lost(&ns).await
    });
    fault!(
        "corrupt newest checkpoint (real)",
        "corrupt",
        true,
        |ns| async move { corrupt_checkpoint(&ns).await }
    );
    fault!("orphaned re-create", "orphan", false, |ns| async move {
        orphaned_recreate(&ns).await
    });
    fault!("quota refusal", "quota", false, |ns| async move {
        quota_refusal(&ns).await
    });

    print_table(&rows);
    println!("\nwhole run: {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}
