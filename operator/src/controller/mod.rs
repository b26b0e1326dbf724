//! The controller: the watches, caches and admission queue wired into kube's [`Controller`],
//! which reconciles every ParallelJob.
//!
//! - `watch`: the watch streams, what triggers a pass, and the batching of pod changes.
//! - `reconcile`: one pass, as a named pipeline: read -> decide -> report -> apply.
//! - `apply`: carrying out the decided writes (server-side apply, creations, deletions).
//! - `log_tail`: the last lines of a failed rank's log, kept in the failure's record.
//! - `status`: the one path of every status write and Event, with the counts-only throttle.

mod apply;
mod log_tail;
mod reconcile;
mod status;
mod watch;
pub use watch::GpuNodes;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::Controller;
use kube::runtime::controller::Config as ControllerConfig;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use lockstep_api::ParallelJob;
use lockstep_api::contract::operator;
use tracing::warn;

use crate::backoff::Backoff;
use crate::gang::admitter::Admitter;
use crate::metrics::Metrics;
use crate::pods::PodCache;
use crate::quota;

/// Writes made concurrently at most (pod creations and deletions of one job).
pub const WRITE_CONCURRENCY: usize = 32;

/// What reconcile needs, injected once.
pub struct Context {
    /// API client.
    pub client: Client,
    /// The cluster's nodes: to tell when a rank's node is gone.
    pub nodes: Store<Node>,
    /// The GPUs of the schedulable nodes: whether any node offers the GPUs a worker asks for.
    pub gpu_nodes: Arc<GpuNodes>,
    /// The progress ConfigMaps rank 0 writes (see `lockstep_worker::progress`).
    pub progress: Store<ConfigMap>,
    /// The `managedBy` value this operator answers to.
    pub controller_name: String,
    /// Who records the Events (see `status::record`).
    pub reporter: Reporter,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Gang admission (the Builtin policy).
    pub admitter: Arc<Admitter>,
    /// Every gang's pods, and the writes to them the cache must show before they are read.
    pub pods: Arc<PodCache>,
    /// What this process keeps of each job between passes (by [`crate::job::key`]); it goes
    /// with the job.
    pub kept: Mutex<HashMap<String, Kept>>,
    /// The operator's Kueue Workloads, as the watch last saw them (see
    /// `watch::kueue_workloads`).
    pub workloads: Store<DynamicObject>,
    /// The peers admitted to the workers' metrics port by each job's NetworkPolicy
    /// ([`crate::network_policy`]); `None`: no NetworkPolicy is made.
    pub worker_policy: Option<Vec<NetworkPolicyPeer>>,
}

impl Context {
    fn kept(&self) -> MutexGuard<'_, HashMap<String, Kept>> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets, once a minute, what is kept of jobs that are gone (the last status written,
    /// the pod cache's expectations).
    async fn forget_gone_jobs(self: Arc<Self>, jobs: Store<DynamicObject>) {
        if jobs.wait_until_ready().await.is_err() {
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            let live: HashSet<String> = jobs
                .state()
                .iter()
                .filter_map(|j| Some(crate::job::key(&j.namespace()?, &j.name_any())))
                .collect();
            self.kept().retain(|k, _| live.contains(k));
            self.pods.retain(|k| live.contains(k));
        }
    }
}

/// What this process keeps of one job between passes.
#[derive(Debug, Default)]
pub struct Kept {
    /// The UID of the job all this is of: a job created again under the name starts afresh.
    pub uid: Option<String>,
    /// The API server's answer to the last status this process wrote, and when: reconcile
    /// decides from it while the watch has not yet delivered that version, and a change of the
    /// worker counts alone waits out `status::COUNTS_PERIOD` after it.
    pub status: Option<(Arc<DynamicObject>, Instant)>,
    /// The rank addresses last written into the job's EndpointSlice; `None` until this process
    /// has written it or read it from the API server (after a start, the slice may still hold
    /// what an earlier process published: see `apply::publish_addresses`).
    pub published: Option<Vec<(u32, String)>>,
    /// The job's failed passes in a row, which space its retries (`reconcile::error_policy`).
    pub errors: Backoff,
    /// The gang's wait for the namespace's ResourceQuota, or for objects not the job's own
    /// to go, while it lasts.
    pub quota: Option<quota::Hold>,
    /// Whether the names of the job's objects were found free of objects not its own (see
    /// `reconcile::objects_in_the_way`).
    pub names_free: bool,
    /// Whether that look found none of the job's objects besides its pods (they are then
    /// created without a read first, once; see `apply::shared_writes`).
    pub names_absent: bool,
    /// Whether that look found no EndpointSlice of the job, and none was written since.
    pub slice_absent: bool,
    /// When that look was made.
    pub names_looked: Option<Instant>,
    /// The hash of the job's objects besides its pods as this process last made them, and for
    /// which gang attempt (see `apply::shared_hash`): they are made once per attempt, and again
    /// only when they change.
    pub shared: Option<(u64, i32)>,
}

/// Operator settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Jobs reconciled at once.
    pub concurrency: u16,
    /// Name reported on Events.
    pub instance: String,
    /// The `spec.managedBy` value of the jobs this operator reconciles; jobs with any
    /// other value are left alone.
    pub controller_name: String,
    /// The one namespace whose jobs this operator reconciles (and whose worker pods and progress
    /// ConfigMaps it watches), so that it needs rights there alone; `None`: every namespace.
    /// Nodes, PriorityClasses and every pod's requests are still read cluster-wide: gang
    /// admission counts what each node has free, whoever's pods take it.
    pub namespace: Option<String>,
    /// Whether every job gets a NetworkPolicy for its workers (see [`crate::network_policy`]):
    /// ingress from the same job's pods, and from [`Self::worker_metrics_from`] on the metrics
    /// port. Enforced only by a network plugin that enforces NetworkPolicies.
    pub worker_network_policy: bool,
    /// The peers admitted to the workers' metrics port (the metrics scrapers); empty: none.
    pub worker_metrics_from: Vec<NetworkPolicyPeer>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            concurrency: 32,
            instance: "lockstep-operator".into(),
            controller_name: operator::CONTROLLER_NAME.into(),
            namespace: None,
            worker_network_policy: true,
            worker_metrics_from: Vec::new(),
        }
    }
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    // Jobs are watched untyped: one object this version cannot read (written against a newer
    // CRD, say) must not break the list and watch of all the others. Each is read typed in its
    // own reconcile, where a failure concerns that job alone (see `crate::job::read_job`).
    let ar = ApiResource::erase::<ParallelJob>(&());
    let namespace = settings.namespace.as_deref();
    let jobs = match namespace {
        Some(ns) => kube::Api::<DynamicObject>::namespaced_with(client.clone(), ns, &ar),
        None => kube::Api::<DynamicObject>::all_with(client.clone(), &ar),
    };
    let controller =
        Controller::new_with(jobs, watcher::Config::default().any_semantic(), ar.clone());
    // The caches' watches and the loops belong to this run: they stop when it returns or is
    // dropped (aborted), and never outlive it.
    let mut tasks = Tasks::default();
    // Capacity changed (a node came or went, a pod finished or was deleted): the admission queue
    // runs again, a moment later, so that a burst of changes costs one cycle.
    let capacity = Arc::new(tokio::sync::Notify::new());
    let gpu_nodes = Arc::new(GpuNodes::default());
    let (nodes, node_deletions) = watch::nodes(&client, capacity.clone(), gpu_nodes.clone());
    let (all_pods, all_pods_watch) = watch::all_pods(&client, capacity.clone());
    tasks.spawn(all_pods_watch);
    let (classes, classes_watch) = watch::priority_classes(&client);
    tasks.spawn(classes_watch);
    let (progress, progress_reports) = watch::progress_reports(&client, namespace);
    let pods = Arc::new(PodCache::default());
    let (workloads, workload_triggers) = watch::kueue_workloads(&client, namespace, ar.clone());
    let (pod_changes, pod_triggers) = watch::worker_pods(&client, namespace, pods.clone(), ar);
    tasks.spawn(pod_changes);
    let (wake_tx, wake_rx) = futures::channel::mpsc::unbounded();
    let admitter = Arc::new(Admitter::new(
        nodes.clone(),
        all_pods,
        controller.store(),
        classes,
        settings.controller_name.clone(),
        wake_tx,
        metrics.clone(),
    ));
    tasks.spawn(watch::admission_queue(capacity, admitter.clone()));
    let reporter = Reporter {
        controller: operator::FIELD_MANAGER.into(),
        instance: Some(settings.instance.clone()),
    };
    let ctx = Arc::new(Context {
        progress,
        nodes,
        gpu_nodes,
        reporter,
        controller_name: settings.controller_name.clone(),
        kept: Mutex::new(HashMap::new()),
        worker_policy: settings
            .worker_network_policy
            .then(|| settings.worker_metrics_from.clone()),
        client,
        metrics: metrics.clone(),
        admitter,
        pods,
        workloads,
    });
    tasks.spawn(ctx.clone().forget_gone_jobs(controller.store()));
    metrics.set_ready(true);
    controller
        .reconcile_on(pod_triggers)
        .reconcile_on(workload_triggers)
        .reconcile_on(wake_rx)
        .owns_stream(progress_reports)
        .reconcile_all_on(node_deletions)
        .with_config(ControllerConfig::default().concurrency(settings.concurrency))
        .graceful_shutdown_on(shutdown)
        .run(reconcile::timed_reconcile, reconcile::error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                warn!(error = %e, "reconcile failed");
            }
        })
        .await;
}

/// Tasks that are aborted when this is dropped.
#[derive(Default)]
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Tasks {
    fn spawn(&mut self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.0.push(tokio::spawn(task));
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}
