//! The end-to-end harness: a real control plane (etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler, kwok fake nodes; see `e2e/cluster/`), one throwaway namespace per test, waits on
//! conditions with deadlines, and a dump of the namespace when a test fails.
//!
//! The cluster named by `KUBECONFIG` is reused when it answers on loopback (`make cluster-up`
//! starts one); otherwise the first test starts a private one under `target/` that a watchdog
//! stops when the test process exits. Either way the ParallelJob CRD from `crds/` is applied once
//! with the real kubectl and awaited until Established.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use k8s_openapi::api::core::v1::{Event, Namespace, Node, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use tokio::sync::OnceCell;

pub mod peers;

/// A running control plane the tests talk to.
#[derive(Clone)]
pub struct Cluster {
    /// Client with the admin token.
    pub client: Client,
    /// Path of the admin kubeconfig.
    pub kubeconfig: PathBuf,
    /// Folder of the pinned binaries (kubectl, helm, ...).
    pub bin: PathBuf,
    /// Folder of the component logs.
    pub logs: PathBuf,
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ has a parent")
        .to_path_buf()
}

/// The pinned helm (built from Go modules by `e2e/cluster/build.sh`, cached by version), for
/// tests that need no cluster.
pub fn helm() -> Result<PathBuf> {
    let out = std::process::Command::new(repo_root().join("e2e/cluster/build.sh"))
        .env("COMPONENTS", "helm")
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running e2e/cluster/build.sh")?;
    if !out.status.success() {
        bail!("e2e/cluster/build.sh failed to build helm");
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()).join("helm"))
}

/// Where the shared cluster is; found or started once per test process. Clients are not shared:
/// each `#[tokio::test]` has its own runtime, and a client dies with the runtime that made it.
struct ClusterInfo {
    kubeconfig: PathBuf,
    bin: PathBuf,
    logs: PathBuf,
}

/// The manifest `examples/<name>` as JSON, ready to be edited and created.
pub fn example_manifest(name: &str) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(repo_root().join("examples").join(name))
        .with_context(|| format!("reading examples/{name}"))?;
    Ok(lockstep_api::manifest::yaml_to_value(&text)?)
}

static CLUSTER: OnceCell<ClusterInfo> = OnceCell::const_new();

/// The shared cluster (started or found once per test process, with the CRD installed) and a
/// client for the calling test.
pub async fn cluster() -> Cluster {
    let info = CLUSTER
        .get_or_init(|| async {
            start_or_reuse()
                .await
                .expect("the test control plane starts")
        })
        .await;
    Cluster {
        client: client_for(&info.kubeconfig)
            .await
            .expect("a client for the test cluster"),
        kubeconfig: info.kubeconfig.clone(),
        bin: info.bin.clone(),
        logs: info.logs.clone(),
    }
}

async fn run(cmd: &mut tokio::process::Command) -> Result<String> {
    let out = cmd
        .output()
        .await
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Cluster {
    /// A client that acts as `user` in `groups` (impersonated by the admin), so that a test sees
    /// exactly what RBAC lets that user do.
    pub async fn client_as(&self, user: &str, groups: &[&str]) -> Result<Client> {
        let kc = Kubeconfig::read_from(&self.kubeconfig)?;
        let mut config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
        config.auth_info.impersonate = Some(user.to_string());
        config.auth_info.impersonate_groups = Some(groups.iter().map(|g| g.to_string()).collect());
        Ok(Client::try_from(config)?)
    }

    /// A client that authenticates with `token` alone (a ServiceAccount token, say), so that a
    /// test sees exactly what RBAC lets that account do.
    pub async fn client_with_token(&self, token: &str) -> Result<Client> {
        let text = std::fs::read_to_string(&self.kubeconfig)?;
        let mut kc = lockstep_api::manifest::yaml_to_value(&text)?;
        let users = kc["users"]
            .as_array_mut()
            .context("the kubeconfig has users")?;
        for u in users {
            u["user"] = serde_json::json!({ "token": token });
        }
        let kc = Kubeconfig::from_yaml(&serde_json::to_string(&kc)?)?;
        let mut config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
        config.read_timeout = Some(Duration::from_secs(60));
        Ok(Client::try_from(config)?)
    }
}

async fn client_for(kubeconfig: &Path) -> Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)?;
    let mut config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    config.read_timeout = Some(Duration::from_secs(60));
    Ok(Client::try_from(config)?)
}

async fn start_or_reuse() -> Result<ClusterInfo> {
    let root = repo_root();
    let bin = PathBuf::from(
        run(&mut tokio::process::Command::new(
            root.join("e2e/cluster/build.sh"),
        ))
        .await?
        .trim(),
    );
    let existing = std::env::var_os("KUBECONFIG").map(PathBuf::from);
    let (kubeconfig, logs) = match existing {
        Some(kc) if on_loopback(&kc) && reachable(&kc).await => {
            let logs = kc.parent().map(|p| p.join("logs")).unwrap_or_default();
            (kc, logs)
        }
        _ => {
            // A private cluster for this test process; the watchdog stops it when we exit.
            let state = root.join(format!("target/e2e-cluster-{}", std::process::id()));
            let schedulers =
                std::env::var("SCHEDULERS").unwrap_or_else(|_| ALL_SCHEDULERS.join(","));
            run(tokio::process::Command::new(root.join("e2e/cluster/up.sh"))
                .env("STATE", &state)
                .env("SCHEDULERS", schedulers))
            .await?;
            stop_when_gone(&state, true)?;
            (state.join("kubeconfig"), state.join("logs"))
        }
    };
    let cluster = Cluster {
        client: client_for(&kubeconfig).await?,
        kubeconfig,
        bin,
        logs,
    };
    cluster.install_crd().await?;
    if std::env::var("LOCKSTEP_E2E_OPERATOR").as_deref() != Ok("external") {
        start_operator(&cluster.kubeconfig, &cluster.logs)?;
    }
    Ok(ClusterInfo {
        kubeconfig: cluster.kubeconfig,
        bin: cluster.bin,
        logs: cluster.logs,
    })
}

/// Starts a watchdog that stops the cluster of `state` (`down.sh`) once this test process is
/// gone, or once the cluster was stopped some other way; `remove` also deletes its state folder.
fn stop_when_gone(state: &Path, remove: bool) -> Result<()> {
    let watchdog = format!(
        "while kill -0 {pid} 2>/dev/null && [ -e {state}/pids ]; do sleep 1; done; STATE={state} {down} >/dev/null 2>&1{rm}",
        pid = std::process::id(),
        state = state.display(),
        down = repo_root().join("e2e/cluster/down.sh").display(),
        rm = if remove {
            format!("; rm -rf {}", state.display())
        } else {
            String::new()
        },
    );
    std::process::Command::new("setsid")
        .args(["bash", "-c", &watchdog])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting the cluster watchdog")?;
    Ok(())
}

/// Runs the operator in this test process, on a thread with its own runtime (so it outlives each
/// test's runtime), logging to `<logs>/operator.log`, which failure dumps show. Set
/// `LOCKSTEP_E2E_OPERATOR=external` to test an operator started some other way.
fn start_operator(kubeconfig: &Path, logs: &Path) -> Result<()> {
    std::fs::create_dir_all(logs)?;
    let file = std::fs::File::create(logs.join("operator.log"))?;
    let _ = tracing_subscriber::fmt()
        .with_writer(std::sync::Mutex::new(file))
        .with_ansi(false)
        .with_env_filter(tracing_subscriber::EnvFilter::new("info,kube=warn"))
        .try_init();
    let kubeconfig = kubeconfig.to_path_buf();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("operator".into())
        .spawn(move || {
            let rt = tokio::runtime::Runtime::new().expect("a runtime for the operator");
            rt.block_on(async move {
                let client = match client_for(&kubeconfig).await {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let metrics = std::sync::Arc::new(lockstep_operator::metrics::Metrics::new());
                lockstep_operator::controller::run(
                    client,
                    lockstep_operator::controller::Settings::default(),
                    metrics,
                    std::future::pending(),
                )
                .await;
            });
        })?;
    ready_rx.recv()?
}

/// Whether a kubeconfig's current server is on this machine's loopback: only such a cluster is
/// reused, so the suite never runs against a real cluster someone's KUBECONFIG points at.
fn on_loopback(kubeconfig: &Path) -> bool {
    let Ok(kc) = Kubeconfig::read_from(kubeconfig) else {
        return false;
    };
    let current = kc.current_context.clone().unwrap_or_default();
    let cluster = kc
        .contexts
        .iter()
        .find(|c| c.name == current)
        .and_then(|c| c.context.as_ref())
        .map(|c| c.cluster.clone());
    kc.clusters
        .iter()
        .filter(|c| Some(&c.name) == cluster.as_ref())
        .filter_map(|c| c.cluster.as_ref()?.server.clone())
        .any(|s| {
            s.starts_with("https://127.")
                || s.starts_with("https://localhost:")
                || s.starts_with("https://[::1]")
        })
}

async fn reachable(kubeconfig: &Path) -> bool {
    match client_for(kubeconfig).await {
        Ok(c) => c.apiserver_version().await.is_ok(),
        Err(_) => false,
    }
}

impl Cluster {
    /// Runs the pinned kubectl against this cluster and returns its stdout, or an error with its
    /// output when it fails.
    pub async fn kubectl(&self, args: &[&str]) -> Result<String> {
        run(tokio::process::Command::new(self.bin.join("kubectl"))
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig))
        .await
    }

    /// Like [`Cluster::kubectl`] with `stdin` as input; returns (success, stdout + stderr).
    pub async fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> Result<(bool, String)> {
        use tokio::io::AsyncWriteExt;
        let mut child = tokio::process::Command::new(self.bin.join("kubectl"))
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let mut input = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
        input.write_all(stdin.as_bytes()).await?;
        drop(input);
        let out = child.wait_with_output().await?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((out.status.success(), text))
    }

    /// Runs the pinned helm against this cluster and returns its stdout, or an error with its
    /// output when it fails.
    pub async fn helm(&self, args: &[&str]) -> Result<String> {
        run(tokio::process::Command::new(self.bin.join("helm"))
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig))
        .await
    }

    /// Installs the Prometheus Operator's ServiceMonitor, PodMonitor and PrometheusRule CRDs (from
    /// its Go module, `e2e/cluster/monitoring-crds.sh`) and waits until they are served.
    pub async fn install_monitoring_crds(&self) -> Result<()> {
        let files = run(&mut tokio::process::Command::new(
            repo_root().join("e2e/cluster/monitoring-crds.sh"),
        ))
        .await?;
        for f in files.lines() {
            self.kubectl(&["apply", "--server-side", "--force-conflicts", "-f", f])
                .await?;
        }
        for name in [
            "servicemonitors.monitoring.coreos.com",
            "podmonitors.monitoring.coreos.com",
            "prometheusrules.monitoring.coreos.com",
        ] {
            self.wait_established(name).await?;
        }
        Ok(())
    }

    /// Waits until the CRD `name` is Established (served by the API server).
    async fn wait_established(&self, name: &str) -> Result<()> {
        let crds: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        wait_until(
            Duration::from_secs(60),
            &format!("{name} is Established"),
            || async {
                let crd = crds.get(name).await?;
                Ok(crd
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True"))
            },
        )
        .await
    }

    /// Applies `crds/` with kubectl (server-side: the CRD is larger than client-side apply's
    /// annotation limit) and waits until the API server serves it.
    pub async fn install_crd(&self) -> Result<()> {
        let dir = repo_root().join("crds");
        self.kubectl(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            &dir.to_string_lossy(),
        ])
        .await?;
        self.wait_established("paralleljobs.lockstep.dev").await
    }
}

/// The external schedulers `e2e/cluster/up.sh` can start (`SCHEDULERS`); a cluster this suite
/// starts runs all of them.
pub const ALL_SCHEDULERS: [&str; 3] = ["kueue", "volcano", "coscheduling"];

impl Cluster {
    /// Whether the external scheduler `name` (one of [`ALL_SCHEDULERS`]) runs in this cluster
    /// (`up.sh` lists those it started in `<state>/schedulers`). When it does not, says that the
    /// calling test is NOT RUN, and why: a cluster of `make cluster-up` without `SCHEDULERS`.
    pub fn runs_scheduler(&self, name: &str, test: &str) -> bool {
        let listed = self
            .kubeconfig
            .parent()
            .and_then(|state| std::fs::read_to_string(state.join("schedulers")).ok())
            .is_some_and(|l| l.lines().any(|s| s.trim() == name));
        if !listed {
            eprintln!(
                "== NOT RUN: {test}: the cluster does not run {name} (start it with \
                 SCHEDULERS={name}, or let the suite start its own)"
            );
        }
        listed
    }
}

/// An API server of its own (etcd and kube-apiserver only: no controllers, scheduler, nodes, or
/// the APIs of the external gang schedulers), with the ParallelJob CRD: where the operator meets
/// a gang API that is not served. Stopped, and its state removed, when dropped.
pub struct BareApiServer {
    /// The admin's view of it.
    pub cluster: Cluster,
    state: PathBuf,
}

impl BareApiServer {
    /// Starts one named after `test`.
    pub async fn start(test: &str) -> Result<BareApiServer> {
        let root = repo_root();
        let shared = cluster().await;
        let state = root.join(format!("target/e2e-bare-{test}-{}", std::process::id()));
        run(tokio::process::Command::new(root.join("e2e/cluster/up.sh"))
            .env("STATE", &state)
            .env("ONLY_APISERVER", "1")
            .env_remove("SCHEDULERS")
            .env_remove("REAL_NODES"))
        .await?;
        // Stopped when this process ends, however it ends (a drop does not run on a kill).
        stop_when_gone(&state, false)?;
        let kubeconfig = state.join("kubeconfig");
        let bare = BareApiServer {
            cluster: Cluster {
                client: client_for(&kubeconfig).await?,
                kubeconfig,
                bin: shared.bin,
                logs: state.join("logs"),
            },
            state,
        };
        bare.cluster.install_crd().await?;
        Ok(bare)
    }
}

impl Drop for BareApiServer {
    fn drop(&mut self) {
        let _ = std::process::Command::new(repo_root().join("e2e/cluster/down.sh"))
            .env("STATE", &self.state)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// Polls `check` until it returns true or `timeout` passes; the error names `what`. Polling starts
/// at 50 ms and backs off to 1 s: a wait on a condition with a deadline, never a fixed sleep.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut delay = Duration::from_millis(50);
    let mut last_err = None;
    loop {
        match check().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        if tokio::time::Instant::now() >= deadline {
            let why = last_err
                .map(|e| format!(" (last error: {e:#})"))
                .unwrap_or_default();
            bail!("timed out after {timeout:?} waiting until {what}{why}");
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

/// A throwaway namespace for one test.
pub struct TestNamespace {
    /// The cluster, with this test's client.
    pub cluster: Cluster,
    /// The namespace's name.
    pub name: String,
}

/// Plays the kubelet: writes the status a kubelet reports when the worker container of pod
/// `name` exits with `code` (Succeeded for 0, else Failed). kwok runs no containers, so this is how
/// tests make a rank finish or fail.
pub async fn terminate_worker(pods: &Api<Pod>, name: &str, code: i32) -> Result<()> {
    use kube::api::{Patch, PatchParams};
    let phase = if code == 0 { "Succeeded" } else { "Failed" };
    let reason = if code == 0 { "Completed" } else { "Error" };
    let status = serde_json::json!({"status": {"phase": phase, "containerStatuses": [{
        "name": lockstep_api::contract::operator::WORKER_CONTAINER, "image": "lockstep/worker:0.1.0",
        "imageID": "", "ready": false, "restartCount": 0,
        "state": {"terminated": {"exitCode": code, "reason": reason,
            "finishedAt": k8s_openapi::jiff::Timestamp::now().to_string()}}
    }]}});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

/// Label (and taint key) that marks the fake nodes of one test's private pool.
pub const POOL_LABEL: &str = "lockstep.dev/e2e-pool";

impl TestNamespace {
    /// Creates `count` fake nodes with `gpus` GPUs each, private to this test: labelled
    /// `lockstep.dev/e2e-pool=<namespace>` and tainted with the same key, so only pods that
    /// tolerate the taint land there and other tests' pods never take their capacity. Waits until
    /// they are Ready; they are deleted with the namespace. Returns their names.
    pub async fn create_node_pool(&self, count: usize, gpus: u32) -> Result<Vec<String>> {
        let nodes: Api<Node> = Api::all(self.cluster.client.clone());
        let mut names = Vec::new();
        for i in 0..count {
            let name = format!("{}-n{i}", self.name);
            let node: Node = serde_json::from_value(serde_json::json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {
                    "name": name,
                    "annotations": {"kwok.x-k8s.io/node": "fake"},
                    "labels": {
                        "kubernetes.io/hostname": name, "type": "kwok", POOL_LABEL: self.name,
                        "topology.lockstep.dev/rack": format!("{}-rack{}", self.name, i / 2),
                    }
                },
                "spec": {"taints": [{"key": POOL_LABEL, "value": self.name, "effect": "NoSchedule"}]},
                "status": {
                    "allocatable": {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": gpus.to_string()},
                    "capacity": {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": gpus.to_string()}
                }
            }))?;
            nodes.create(&PostParams::default(), &node).await?;
            names.push(name);
        }
        let selector = format!("{POOL_LABEL}={}", self.name);
        wait_until(
            Duration::from_secs(120),
            &format!("{count} pool nodes are Ready"),
            || async {
                let list = nodes.list(&ListParams::default().labels(&selector)).await?;
                Ok(list.items.len() == count
                    && list.items.iter().all(|n| {
                        let ready = n
                            .status
                            .as_ref()
                            .and_then(|s| s.conditions.as_ref())
                            .is_some_and(|cs| {
                                cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                            });
                        let only_pool_taint = n
                            .spec
                            .as_ref()
                            .and_then(|s| s.taints.as_ref())
                            .is_none_or(|ts| ts.iter().all(|t| t.key == POOL_LABEL));
                        ready && only_pool_taint
                    }))
            },
        )
        .await?;
        Ok(names)
    }

    /// The toleration and node selector that put a pod onto this test's node pool.
    pub fn pool_placement(&self) -> serde_json::Value {
        serde_json::json!({
            "nodeSelector": {POOL_LABEL: self.name},
            "tolerations": [{"key": POOL_LABEL, "operator": "Equal", "value": self.name, "effect": "NoSchedule"}]
        })
    }

    /// The example manifest `example` (a file of `examples/`) named `name`, its pods put onto
    /// this test's node pool.
    pub fn example_on_pool(&self, example: &str, name: &str) -> Result<serde_json::Value> {
        let mut v = example_manifest(example)?;
        v["metadata"]["name"] = name.into();
        let placement = self.pool_placement();
        let spec = &mut v["spec"]["template"]["spec"];
        spec["nodeSelector"] = placement["nodeSelector"].clone();
        spec["tolerations"] = placement["tolerations"].clone();
        Ok(v)
    }

    /// The phase of the job `name` (`None` before the operator writes one).
    pub async fn phase(&self, name: &str) -> Result<Option<lockstep_api::status::Phase>> {
        Ok(self
            .api::<lockstep_api::ParallelJob>()
            .get(name)
            .await?
            .status
            .and_then(|s| s.phase))
    }

    /// Waits (up to `timeout`) until the job `name` is in phase `want`.
    pub async fn wait_phase(
        &self,
        name: &str,
        want: lockstep_api::status::Phase,
        timeout: Duration,
    ) -> Result<()> {
        wait_until(timeout, &format!("{name} is {want:?}"), || async {
            Ok(self.phase(name).await? == Some(want))
        })
        .await
    }

    /// The pods with the job `name`'s name label, by name.
    pub async fn gang(&self, name: &str) -> Result<Vec<Pod>> {
        let lp = ListParams::default().labels(&format!(
            "{}={name}",
            lockstep_api::contract::labels::JOB_NAME
        ));
        let mut pods = self.api::<Pod>().list(&lp).await?.items;
        pods.sort_by_key(|p| p.metadata.name.clone());
        Ok(pods)
    }

    /// A typed API for namespaced objects of this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.cluster.client.clone(), &self.name)
    }

    /// What a person debugging a failure wants to see: the namespace's pods and events, and the
    /// tail of the operator's log when one runs.
    pub async fn dump(&self) -> String {
        let mut out = format!("---- namespace {} ----\n", self.name);
        match self.api::<Pod>().list(&ListParams::default()).await {
            Ok(pods) => {
                for p in pods {
                    let s = p.status.unwrap_or_default();
                    out += &format!(
                        "pod {} phase={} node={} reason={} message={}\n",
                        p.metadata.name.unwrap_or_default(),
                        s.phase.unwrap_or_default(),
                        p.spec.and_then(|s| s.node_name).unwrap_or_default(),
                        s.reason.unwrap_or_default(),
                        s.message.unwrap_or_default()
                    );
                }
            }
            Err(e) => out += &format!("listing pods failed: {e}\n"),
        }
        if let Ok(events) = self.api::<Event>().list(&ListParams::default()).await {
            for e in events {
                out += &format!(
                    "event {} {} {}: {}\n",
                    e.involved_object.name.unwrap_or_default(),
                    e.type_.unwrap_or_default(),
                    e.reason.unwrap_or_default(),
                    e.message.unwrap_or_default()
                );
            }
        }
        let operator_log = self.cluster.logs.join("operator.log");
        if let Ok(text) = std::fs::read_to_string(&operator_log) {
            let tail: Vec<&str> = text.lines().rev().take(50).collect();
            out += "---- operator log (last 50 lines) ----\n";
            out += &tail.into_iter().rev().collect::<Vec<_>>().join("\n");
        }
        out
    }
}

/// Runs `body` in a fresh namespace named after the test; on failure prints the namespace's state,
/// then deletes the namespace either way and returns the test's result.
pub async fn with_namespace<F, Fut>(test: &str, body: F) -> Result<()>
where
    F: FnOnce(TestNamespace) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let cluster = cluster().await;
    let suffix: u32 = (std::process::id()
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0))
        % 100_000;
    let name = format!("e2e-{}-{suffix:05}", test.replace('_', "-"))
        .chars()
        .take(63)
        .collect::<String>()
        .trim_end_matches('-')
        .to_string();
    let namespaces: Api<Namespace> = Api::all(cluster.client.clone());
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}
    }))?;
    namespaces.create(&PostParams::default(), &ns).await?;
    let handle = TestNamespace {
        cluster: cluster.clone(),
        name: name.clone(),
    };
    let keep = TestNamespace {
        cluster: cluster.clone(),
        name: name.clone(),
    };
    let result = body(handle).await;
    if let Err(e) = &result {
        eprintln!("test {test} failed: {e:#}\n{}", keep.dump().await);
    }
    let _ = namespaces.delete(&name, &DeleteParams::background()).await;
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    let _ = nodes
        .delete_collection(
            &DeleteParams::background(),
            &ListParams::default().labels(&format!("{POOL_LABEL}={name}")),
        )
        .await;
    result
}

/// Starts an operator in this process with `settings` (a test gives it a `managedBy` name of its
/// own, so the suite's shared operator leaves its jobs alone), on a task the test may abort at
/// any moment, as a crash would end it.
pub fn spawn_operator(
    client: &Client,
    settings: &lockstep_operator::controller::Settings,
) -> tokio::task::JoinHandle<()> {
    let (client, settings) = (client.clone(), settings.clone());
    tokio::spawn(async move {
        lockstep_operator::controller::run(
            client,
            settings,
            std::sync::Arc::new(lockstep_operator::metrics::Metrics::new()),
            std::future::pending(),
        )
        .await
    })
}

/// The pid of the worker process of rank `rank` of the job `job` in namespace `ns`, found by its
/// env contract (for tests and benchmarks that run on the real node's machine).
pub fn worker_pid(ns: &str, job: &str, rank: u32) -> Option<i32> {
    use lockstep_api::contract::env;
    let want = [
        format!("{}={ns}", env::NAMESPACE),
        format!("{}={job}", env::JOB),
        format!("{}={rank}", env::RANK),
    ];
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let environ = std::fs::read(e.path().join("environ")).ok()?;
        let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
        want.iter()
            .all(|w| vars.contains(&w.as_bytes()))
            .then_some(pid)
    })
}

/// The step rank 0's log says the gang resumed from, if it resumed.
pub fn resumed_step(log: &str) -> Option<u64> {
    log.lines()
        .find(|l| l.contains("resumed from a checkpoint"))
        .and_then(|l| l.split("step=").nth(1))
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
}
