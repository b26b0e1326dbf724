//! Reconcile one ParallelJob: read (the job as of this operator's last status write at least, its
//! pods from the gang cache once that shows this operator's own writes, see [`crate::gangs`]),
//! decide (pure, [`crate::decide`]), apply (status first, then the writes; server-side apply
//! under one field manager for shared objects), record Events on transitions.
//!
//! The status is written before any pod is deleted or created: a crash between two writes then
//! leaves a state the next pass completes (stale pods of an older attempt are deleted, missing
//! ranks created), and the recorded first failure is never lost.

use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use std::collections::{HashMap, HashSet};

use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::api::scheduling::v1::PriorityClass;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action as Requeue, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, reflector::reflector, watcher};
use kube::{Client, Resource, ResourceExt};
use lockstep_api::ParallelJob;
use lockstep_api::contract::{labels, names, operator};
use lockstep_api::status::{Progress, condition_types, reasons};
use tracing::{info, warn};

use crate::decide::{Action, GPU_RESOURCE, check_capacity, decide, set_invalid};
use crate::gang::admitter::Admitter;
use crate::gangs::{Gangs, Write};
use crate::metrics::Metrics;
use crate::observe::RankPod;
use crate::resources::JobContext;
use crate::resources::Pin;
use crate::{Error, Result};

/// Writes made concurrently at most (pod creations and deletions of one job).
pub const WRITE_CONCURRENCY: usize = 32;

/// What reconcile needs, injected once.
pub struct Context {
    /// API client.
    pub client: Client,
    /// The cluster's nodes: to tell when a rank's node is gone, and whether any node offers the
    /// GPUs a worker asks for.
    pub nodes: Store<Node>,
    /// The progress ConfigMaps rank 0 writes (see `lockstep_worker::progress`).
    pub progress: Store<ConfigMap>,
    /// The `managedBy` value this operator answers to.
    pub controller_name: String,
    /// Event recorder.
    pub recorder: Recorder,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Gang admission (the Builtin policy).
    pub admitter: Arc<Admitter>,
    /// Every gang's pods, and the writes to them the cache must show before they are read.
    pub gangs: Arc<Gangs>,
    /// What this process keeps of each job between passes (`ns/name`); it goes with the job.
    pub kept: std::sync::Mutex<HashMap<String, Kept>>,
}

impl Context {
    fn kept(&self) -> std::sync::MutexGuard<'_, HashMap<String, Kept>> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What this process keeps of one job between passes.
#[derive(Debug, Default)]
pub struct Kept {
    /// The API server's answer to the last status this process wrote, and when: reconcile
    /// decides from it while the watch has not yet delivered that version, and a change of the
    /// worker counts alone waits out [`COUNTS_PERIOD`] after it.
    pub status: Option<(Arc<DynamicObject>, std::time::Instant)>,
    /// The rank addresses last written into the job's EndpointSlice.
    pub published: Vec<(u32, String)>,
}

/// How long a status change of the worker counts alone (`status.ready`, `status.workers`) may
/// wait to be written after the job's last status write. While a gang starts its pods come up one
/// batch at a time, and writing every step cost about two more status writes a job (each the
/// whole job through the API server and every watcher). A change of phase, conditions or
/// anything else is written at once, and the counts with it; the Kubernetes Job controller
/// batches its counts in the same way.
pub const COUNTS_PERIOD: Duration = Duration::from_secs(5);

/// Whether `new` differs from `old` in the worker counts alone.
pub fn counts_only(
    old: &lockstep_api::ParallelJobStatus,
    new: &lockstep_api::ParallelJobStatus,
) -> bool {
    let mut with_new_counts = old.clone();
    with_new_counts.ready.clone_from(&new.ready);
    with_new_counts.workers.clone_from(&new.workers);
    with_new_counts == *new && old != new
}

/// Operator settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Jobs reconciled at once.
    pub concurrency: u16,
    /// Name reported on Events.
    pub instance: String,
    /// The `spec.runPolicy.managedBy` value of the jobs this operator reconciles; jobs with any
    /// other value are left alone.
    pub controller_name: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            concurrency: 32,
            instance: "lockstep-operator".into(),
            controller_name: operator::CONTROLLER_NAME.into(),
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
    // own reconcile, where a failure concerns that job alone (see `read_job`).
    let ar = ApiResource::erase::<ParallelJob>(&());
    let jobs: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let pods: Api<Pod> = Api::all(client.clone());
    let maps: Api<ConfigMap> = Api::all(client.clone());
    let reporter = Reporter {
        controller: operator::FIELD_MANAGER.into(),
        instance: Some(settings.instance.clone()),
    };
    // Nodes, metadata only: a rank whose node disappears has failed (NodeLost), and every job is
    // looked at again when a node is deleted.
    let (nodes, writer) = reflector::store::<Node>();
    // Capacity changed (a node came or went, a pod finished or was deleted): the admission queue
    // runs again, a moment later, so that a burst of changes costs one cycle.
    let capacity = Arc::new(tokio::sync::Notify::new());
    let node_changes = capacity.clone();
    let node_deletions = reflector(
        writer,
        // Only what the operator reads is kept: no managedFields, images or conditions.
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default()).modify(|n| {
            n.managed_fields_mut().clear();
            if let Some(st) = n.status.as_mut() {
                st.images = None;
                st.conditions = None;
            }
        }),
    )
    .default_backoff()
    .filter_map(move |ev| {
        if matches!(ev, Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_))) {
            node_changes.notify_one();
        }
        async move { matches!(ev, Ok(watcher::Event::Delete(_))).then_some(()) }
    });
    // Every pod of the cluster, reduced to what admission counts: where it is (or is planned to
    // be), what it asks for, and whether it has finished.
    let (all_pods, pods_writer) = reflector::store::<Pod>();
    let pod_changes = capacity.clone();
    let pod_stream = reflector(
        pods_writer,
        watcher(Api::<Pod>::all(client.clone()), watcher::Config::default()).modify(slim_pod),
    )
    .default_backoff();
    // The caches' watches and the queue loop belong to this run: they stop when it returns or is
    // dropped (aborted), and never outlive it.
    let mut tasks = Tasks::default();
    tasks.spawn(pod_stream.for_each(move |ev| {
        let freed = match &ev {
            Ok(watcher::Event::Delete(_)) => true,
            Ok(watcher::Event::Apply(p)) => matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            ),
            _ => false,
        };
        if freed {
            pod_changes.notify_one();
        }
        async {}
    }));
    let (classes, classes_writer) = reflector::store::<PriorityClass>();
    tasks.spawn(
        reflector(
            classes_writer,
            watcher(
                Api::<PriorityClass>::all(client.clone()),
                watcher::Config::default(),
            ),
        )
        .default_backoff()
        .for_each(|_| async {}),
    );
    let owned = watcher::Config::default().labels(&format!(
        "{}={}",
        labels::MANAGED_BY,
        operator::FIELD_MANAGER
    ));
    // Rank 0's progress reports, through the progress ConfigMaps only: one watch keeps the cache
    // that reconcile reads and, once the cache holds a new report, wakes its job up.
    let progress_maps = watcher::Config::default().labels(&format!(
        "{}={},{}={}",
        labels::MANAGED_BY,
        operator::FIELD_MANAGER,
        labels::COMPONENT,
        names::PROGRESS_COMPONENT
    ));
    let (progress_cache, progress_writer) = reflector::store::<ConfigMap>();
    let progress_reports = reflector(progress_writer, watcher(maps, progress_maps))
        .default_backoff()
        .touched_objects();
    // The worker pods: one watch keeps the gangs reconcile reads and, once the cache holds a
    // change, wakes the pod's job up.
    // A pod's changes reach its job at most once per POD_BATCH (as the Job controller of
    // Kubernetes batches them): a gang of eight starting costs a few passes, not dozens.
    let gangs = Arc::new(Gangs::default());
    let gang_cache = gangs.clone();
    let owner = ar.clone();
    let worker_pods = watcher(pods, owned)
        .default_backoff()
        .inspect_ok(move |ev| gang_cache.apply(ev))
        .touched_objects()
        .filter_map(move |pod| {
            let job = pod.ok().and_then(|p| owning_job(&p, &owner));
            async move { job }
        });
    let (pod_triggers, batched) = futures::channel::mpsc::unbounded();
    tasks.spawn(batch(worker_pods, POD_BATCH, pod_triggers));
    let controller = Controller::new_with(jobs, watcher::Config::default().any_semantic(), ar);
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
    let queue = admitter.clone();
    tasks.spawn(async move {
        loop {
            capacity.notified().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            if queue.has_waiting() {
                queue.run_queue();
            }
        }
    });
    let ctx = Arc::new(Context {
        progress: progress_cache,
        nodes,
        recorder: Recorder::new(client.clone(), reporter),
        controller_name: settings.controller_name.clone(),
        kept: std::sync::Mutex::new(HashMap::new()),
        client,
        metrics: metrics.clone(),
        admitter,
        gangs,
    });
    // What is kept per job (the last status written, expectations) goes with the job.
    let jobs_seen = controller.store();
    let pruned = ctx.clone();
    tasks.spawn(async move {
        if jobs_seen.wait_until_ready().await.is_err() {
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            let live: HashSet<String> = jobs_seen
                .state()
                .iter()
                .filter_map(|j| Some(crate::gangs::key(&j.namespace()?, &j.name_any())))
                .collect();
            pruned.kept().retain(|k, _| live.contains(k));
            pruned.gangs.retain(|k| live.contains(k));
        }
    });
    metrics.set_ready(true);
    controller
        .reconcile_on(batched)
        .reconcile_on(wake_rx)
        .owns_stream(progress_reports)
        .reconcile_all_on(node_deletions)
        .with_config(ControllerConfig::default().concurrency(settings.concurrency))
        .graceful_shutdown_on(shutdown)
        .run(timed_reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                warn!(error = %e, "reconcile failed");
            }
        })
        .await;
}

/// How long a pod's change may wait to be reconciled together with its gang's other changes.
pub const POD_BATCH: Duration = Duration::from_millis(500);

/// The ParallelJob that controls a pod, if one does.
fn owning_job(pod: &Pod, ar: &ApiResource) -> Option<ObjectRef<DynamicObject>> {
    let owner = pod.owner_references().iter().find(|o| {
        o.controller == Some(true) && o.kind == ar.kind && o.api_version == ar.api_version
    })?;
    Some(ObjectRef::new_with(&owner.name, ar.clone()).within(&pod.namespace()?))
}

/// Forwards what `input` yields to `output`, each item once per `period` at most: an item is
/// held until the end of the period it arrived in, and repeats within it are merged.
async fn batch<T: Eq + std::hash::Hash>(
    input: impl futures::Stream<Item = T>,
    period: Duration,
    output: futures::channel::mpsc::UnboundedSender<T>,
) {
    futures::pin_mut!(input);
    let mut held: HashSet<T> = HashSet::new();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            item = input.next() => match item {
                Some(item) => {
                    held.insert(item);
                }
                None => break,
            },
            _ = tick.tick() => {
                for item in held.drain() {
                    if output.unbounded_send(item).is_err() {
                        return;
                    }
                }
            }
        }
    }
    for item in held.drain() {
        let _ = output.unbounded_send(item);
    }
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

fn error_policy(job: Arc<DynamicObject>, err: &Error, ctx: Arc<Context>) -> Requeue {
    ctx.metrics
        .errors
        .with_label_values(&[err.category()])
        .inc();
    warn!(job = %job.name_any(), category = err.category(), error = %err, "reconcile error");
    Requeue::requeue(Duration::from_secs(5))
}

async fn timed_reconcile(job: Arc<DynamicObject>, ctx: Arc<Context>) -> Result<Requeue> {
    let timer = ctx.metrics.duration.start_timer();
    ctx.metrics.reconciles.inc();
    let result = reconcile(job, ctx).await;
    timer.observe_duration();
    result
}

/// Reads a job as the typed [`ParallelJob`]; the error names the field that does not fit.
pub fn read_job(raw: &DynamicObject) -> std::result::Result<ParallelJob, String> {
    let value = serde_json::to_value(raw).map_err(|e| e.to_string())?;
    serde_path_to_error::deserialize(value).map_err(|e| format!("{}: {}", e.path(), e.inner()))
}

/// Says, once per change of the object, that the operator cannot read it, and why.
async fn report_unreadable(ctx: &Context, raw: &DynamicObject, problem: &str) {
    let ar = ApiResource::erase::<ParallelJob>(&());
    let message = format!(
        "the operator cannot read this ParallelJob: {problem}. It was probably written for a \
         newer version of Lockstep: fix the field, or upgrade the operator"
    );
    ctx.metrics
        .errors
        .with_label_values(&["invalid_object"])
        .inc();
    warn!(job = %raw.name_any(), namespace = ?raw.namespace(), problem, "unreadable job");
    let ev = Event {
        type_: EventType::Warning,
        reason: reasons::INVALID_OBJECT.into(),
        note: Some(message.chars().take(1000).collect()),
        action: "Read".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &raw.object_ref(&ar)).await {
        warn!(job = %raw.name_any(), error = %e, "recording an event failed");
    }
}

/// One reconcile pass of one job.
pub async fn reconcile(cached: Arc<DynamicObject>, ctx: Arc<Context>) -> Result<Requeue> {
    let ns = cached
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let ar = ApiResource::erase::<ParallelJob>(&());
    let raw_jobs: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &ns, &ar);
    let jobs: Api<ParallelJob> = Api::namespaced(ctx.client.clone(), &ns);
    // Decide from a job that holds our own last status write: the cached one when the watch has
    // delivered that write (or something newer), else the answer to that write; a fresh read
    // when this process has written no status for the job yet.
    let key = crate::gangs::key(&ns, &cached.name_any());
    let last = ctx
        .kept()
        .get(&key)
        .and_then(|k| k.status.as_ref().map(|(w, _)| w.clone()));
    let newest = last
        .filter(|w| w.metadata.uid == cached.metadata.uid)
        .and_then(|w| {
            match compare_resource_versions(
                cached.metadata.resource_version.as_deref()?,
                w.metadata.resource_version.as_deref()?,
            )? {
                std::cmp::Ordering::Less => Some((*w).clone()),
                _ => Some((*cached).clone()),
            }
        });
    let raw = if let Some(raw) = newest {
        raw
    } else {
        let Some(raw) = raw_jobs.get_opt(&cached.name_any()).await? else {
            ctx.metrics.set_phase(&key, None);
            ctx.gangs.forget(&key);
            ctx.kept().remove(&key);
            return Ok(Requeue::await_change());
        };
        raw
    };
    let managed_by = raw.data["spec"]["runPolicy"]["managedBy"]
        .as_str()
        .unwrap_or(operator::CONTROLLER_NAME);
    if managed_by != ctx.controller_name || raw.metadata.deletion_timestamp.is_some() {
        return Ok(Requeue::await_change());
    }
    let job = match read_job(&raw) {
        Ok(job) => job,
        Err(problem) => {
            report_unreadable(&ctx, &raw, &problem).await;
            return Ok(Requeue::await_change());
        }
    };
    let job_ctx = JobContext::new(&job)?;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    // The gang comes from the pod cache, once it shows every write this operator made to it (see
    // `gangs`); the event that shows the last of them starts the next pass.
    ctx.gangs.wait_ready().await;
    let Some(mut observed) = ctx.gangs.view(&key, std::time::Instant::now()) else {
        return Ok(Requeue::requeue(Duration::from_secs(2)));
    };

    let lost = mark_lost_nodes(&ctx, &mut observed).await?;
    // Admission counts what the caches hold: a job that may ask for it waits until they are
    // complete. Other jobs (admitted, finished, external policies) do not wait for them.
    if may_need_admission(&job) {
        ctx.admitter.wait_ready().await;
    }
    let mut decision = decide(
        &job,
        job_ctx.layout.world_size(),
        &observed,
        Timestamp::now(),
        &mut || ctx.admitter.request(&job),
    );
    decision.status.progress = progress(&ctx, &job);
    if job.spec.parallelism.gpus_per_worker > 0 {
        check_capacity(
            &mut decision,
            &job,
            largest_gpu_node(&ctx.nodes),
            Timestamp::now(),
        );
    }

    if job.status.as_ref() != Some(&decision.status) {
        // A change of the counts alone waits out COUNTS_PERIOD after the last write.
        let since = ctx
            .kept()
            .get(&key)
            .and_then(|k| k.status.as_ref().map(|(_, at)| at.elapsed()));
        let wait = since
            .filter(|_| {
                job.status
                    .as_ref()
                    .is_some_and(|old| counts_only(old, &decision.status))
            })
            .and_then(|since| COUNTS_PERIOD.checked_sub(since))
            .filter(|wait| !wait.is_zero());
        match wait {
            Some(wait) => {
                decision.requeue_after = Some(decision.requeue_after.map_or(wait, |r| r.min(wait)));
            }
            None => write_status(&ctx, &raw_jobs, &job, &decision.status).await?,
        }
    }
    ctx.metrics.set_phase(&key, decision.status.phase);
    record_metrics(&ctx.metrics, &job, &decision);
    // Events are recorded off the reconcile's path, in order, as client-go's recorder does: the
    // status already says what happened, and the next writes need not wait for the Events.
    let events: Vec<Event> = decision
        .events
        .iter()
        .map(|note| Event {
            type_: if note.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: note.reason.into(),
            note: Some(note.message.chars().take(1000).collect()),
            action: note.reason.into(),
            secondary: None,
        })
        .collect();
    if !events.is_empty() {
        let recorder = ctx.recorder.clone();
        let reference = job.object_ref(&());
        let name = job_ctx.name.to_string();
        tokio::spawn(async move {
            for ev in events {
                if let Err(e) = recorder.publish(&ev, &reference).await {
                    warn!(job = name, error = %e, "recording an event failed");
                }
            }
        });
    }
    // A pod on a node that is gone never finishes terminating (no kubelet confirms it): force it,
    // or the next attempt would wait for it forever.
    let stuck: Vec<String> = observed
        .iter()
        .filter(|p| p.terminating && lost.contains(&p.name))
        .map(|p| p.name.clone())
        .collect();
    force_delete(&ctx, &key, &pods, stuck).await?;
    for action in &decision.actions {
        if let Action::DeletePods(names) = action {
            let (dead, alive): (Vec<String>, Vec<String>) =
                names.iter().cloned().partition(|n| lost.contains(n));
            force_delete(&ctx, &key, &pods, dead).await?;
            apply(&ctx, &job_ctx, &pods, &jobs, &Action::DeletePods(alive)).await?;
            continue;
        }
        match apply(&ctx, &job_ctx, &pods, &jobs, action).await {
            Ok(()) => {}
            // The API server refuses what the template makes (a pod that is invalid or forbidden):
            // retrying cannot help until the user changes the job, so say so and wait for that.
            Err(Error::Kube(kube::Error::Api(e))) if matches!(e.code, 400 | 403 | 422) => {
                let message = format!(
                    "the API server refused an object built from spec.template: {}",
                    e.message
                );
                report_rejected(&ctx, &raw_jobs, &job, &decision.status, &message).await?;
                return Ok(Requeue::await_change());
            }
            Err(Error::GangApiMissing(what)) => {
                let message = format!(
                    "spec.scheduling.gangPolicy is {:?}, which needs {what}, and this cluster \
                     does not serve it: install that gang scheduler (or enable the API), or use \
                     gangPolicy: Builtin",
                    job.spec.scheduling.gang_policy
                );
                report_gang_api_missing(&ctx, &raw_jobs, &job, &decision.status, &message).await?;
                return Ok(Requeue::requeue(Duration::from_secs(60)));
            }
            Err(e) => return Err(e),
        }
    }
    publish_addresses(&ctx, &job_ctx, &key, &observed, decision.status.attempt).await?;
    info!(job = job_ctx.name, namespace = %ns, phase = ?decision.status.phase, attempt = decision.status.attempt, actions = decision.actions.len(), "reconciled");
    Ok(decision.requeue_after.map_or_else(
        || Requeue::requeue(Duration::from_secs(300)),
        Requeue::requeue,
    ))
}

/// Whether `decide` may ask Builtin admission about this job: its current attempt has no
/// recorded admission and it has not finished.
fn may_need_admission(job: &ParallelJob) -> bool {
    let status = job.status.clone().unwrap_or_default();
    job.spec.scheduling.gang_policy == lockstep_api::spec::GangPolicy::Builtin
        && !status
            .phase
            .is_some_and(lockstep_api::status::Phase::is_terminal)
        && !status
            .admission
            .is_some_and(|a| a.attempt == Some(status.attempt) && a.admitted_at.is_some())
}

/// The progress to show: rank 0's last report in the progress ConfigMap (from the cache), else
/// what the status already holds (a malformed report counts as none).
fn progress(ctx: &Context, job: &ParallelJob) -> Option<Progress> {
    let ns = job.namespace().unwrap_or_default();
    let key = ObjectRef::new(&names::progress_config_map(&job.name_any())).within(&ns);
    let written = ctx.progress.get(&key).and_then(|cm| {
        cm.data
            .as_ref()?
            .get(names::PROGRESS_KEY)
            .and_then(|t| Progress::from_json(t))
    });
    written.or_else(|| job.status.as_ref().and_then(|s| s.progress.clone()))
}

/// The most GPUs any schedulable node offers.
fn largest_gpu_node(nodes: &Store<Node>) -> i64 {
    nodes
        .state()
        .iter()
        .filter(|n| {
            !n.spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .unwrap_or(false)
        })
        .filter_map(|n| {
            n.status
                .as_ref()?
                .allocatable
                .as_ref()?
                .get(GPU_RESOURCE)?
                .0
                .parse::<i64>()
                .ok()
        })
        .max()
        .unwrap_or(0)
}

/// Marks the ranks whose node is gone as failed with reason NodeLost and returns the names of
/// every pod on a gone node. The node cache is trusted when it knows a node; a node it does not
/// know is confirmed with a GET, so a cache that lags behind a new node raises no false alarm.
async fn mark_lost_nodes(
    ctx: &Context,
    observed: &mut [crate::observe::RankPod],
) -> Result<HashSet<String>> {
    use crate::observe::{Failure, PodState};
    ctx.nodes
        .wait_until_ready()
        .await
        .map_err(|_| Error::MissingField("node cache"))?;
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let mut gone: HashMap<String, bool> = HashMap::new();
    let mut lost = HashSet::new();
    for p in observed.iter_mut() {
        let Some(node) = p.node.clone().or_else(|| p.planned_node.clone()) else {
            continue;
        };
        let is_gone = match gone.get(&node) {
            Some(g) => *g,
            None => {
                let g = ctx.nodes.get(&ObjectRef::new(&node)).is_none()
                    && nodes.get_opt(&node).await?.is_none();
                gone.insert(node.clone(), g);
                g
            }
        };
        if !is_gone {
            continue;
        }
        lost.insert(p.name.clone());
        if matches!(p.state, PodState::Pending | PodState::Running) {
            p.state = PodState::Failed(Failure {
                exit_code: None,
                reason: lockstep_api::spec::FailureReason::NodeLost,
                detail: "NodeLost".into(),
                message: format!("node {node} is gone"),
                time: None,
            });
        }
    }
    Ok(lost)
}

async fn force_delete(ctx: &Context, key: &str, pods: &Api<Pod>, names: Vec<String>) -> Result<()> {
    if names.is_empty() {
        return Ok(());
    }
    bounded(names, 404, |name| async move {
        pods.delete(&name, &DeleteParams::default().grace_period(0))
            .await
            .map(drop)?;
        ctx.gangs.expect(key, Write::Deleted, [name]);
        Ok(())
    })
    .await
}

/// Counts restarts and observes time-to-all-running from a decision's transitions.
fn record_metrics(metrics: &Metrics, job: &ParallelJob, decision: &crate::decide::Decision) {
    for note in &decision.events {
        if note.reason == reasons::GANG_RESTARTING {
            let reason = decision
                .status
                .last_failure
                .as_ref()
                .map_or("Unknown", |f| f.reason.as_str());
            metrics.restarts.with_label_values(&[reason]).inc();
        }
        if note.reason == reasons::GANG_ADMITTED
            && let Some(wait) = decision
                .status
                .admission
                .as_ref()
                .and_then(|a| a.wait_seconds)
        {
            metrics.gang_wait_seconds.observe(wait);
        }
        if note.reason == reasons::GANG_STARTED {
            // From the restart decision for a later attempt, from creation for the first.
            let restarted = job.status.as_ref().and_then(|s| {
                s.conditions
                    .iter()
                    .find(|c| c.type_ == condition_types::RESTARTING && c.status == "True")
                    .map(|c| c.last_transition_time.0)
            });
            if let Some(since) =
                restarted.or_else(|| job.metadata.creation_timestamp.as_ref().map(|t| t.0))
            {
                let secs = Timestamp::now().duration_since(since).as_secs_f64();
                metrics.time_to_all_running.observe(secs.max(0.0));
            }
        }
    }
}

/// Says in `Admitted=False` (and an Event, once) that the gang API is missing; no pod is made.
async fn report_gang_api_missing(
    ctx: &Context,
    jobs: &Api<DynamicObject>,
    job: &ParallelJob,
    status: &lockstep_api::ParallelJobStatus,
    message: &str,
) -> Result<()> {
    let mut status = status.clone();
    let already = status.conditions.iter().any(|c| {
        c.type_ == condition_types::ADMITTED
            && c.reason == reasons::GANG_API_MISSING
            && c.message == message
    });
    if already {
        return Ok(());
    }
    status
        .conditions
        .retain(|c| c.type_ != condition_types::ADMITTED);
    status
        .conditions
        .push(k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
            type_: condition_types::ADMITTED.into(),
            status: "False".into(),
            reason: reasons::GANG_API_MISSING.into(),
            message: message.into(),
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                Timestamp::now(),
            ),
            observed_generation: job.metadata.generation,
        });
    status.phase = Some(lockstep_api::status::Phase::Queued);
    report(
        ctx,
        jobs,
        job,
        &status,
        reasons::GANG_API_MISSING,
        "EnsureGangObjects",
        message,
    )
    .await
}

async fn report_rejected(
    ctx: &Context,
    jobs: &Api<DynamicObject>,
    job: &ParallelJob,
    status: &lockstep_api::ParallelJobStatus,
    message: &str,
) -> Result<()> {
    let mut status = status.clone();
    let changed = set_invalid(
        &mut status.conditions,
        reasons::TEMPLATE_REJECTED,
        message,
        job.metadata.generation,
        Timestamp::now(),
    );
    if !changed {
        return Ok(());
    }
    warn!(job = %job.name_any(), message, "template rejected");
    report(
        ctx,
        jobs,
        job,
        &status,
        reasons::TEMPLATE_REJECTED,
        "CreatePods",
        message,
    )
    .await
}

/// What the job's EndpointSlice should now hold, when that differs from what was `published`:
/// the addresses of the attempt's ranks (rank, pod IP), sorted by rank, once every one of the
/// `world` ranks has one (the gang starts whole, so one write an attempt does); no addresses
/// while the attempt is incomplete and the slice still holds an earlier attempt's, so that no
/// name resolves to a pod that is gone. `None`: leave the slice as it is.
pub fn addresses_to_publish(
    observed: &[RankPod],
    attempt: i32,
    world: u32,
    published: &[(u32, String)],
) -> Option<Vec<(u32, String)>> {
    let mut ranks: Vec<(u32, String)> = observed
        .iter()
        .filter(|p| p.attempt == attempt && !p.terminating)
        .filter_map(|p| Some((p.rank, p.ip.clone()?)))
        .collect();
    ranks.sort();
    ranks.dedup_by_key(|r| r.0);
    let want = if ranks.len() == usize::try_from(world).ok()? {
        ranks
    } else if published.is_empty() {
        return None;
    } else {
        Vec::new()
    };
    (want != published).then_some(want)
}

/// Writes the job's EndpointSlice (server-side apply) when [`addresses_to_publish`] says so.
async fn publish_addresses(
    ctx: &Context,
    job: &JobContext<'_>,
    key: &str,
    observed: &[RankPod],
    attempt: i32,
) -> Result<()> {
    let want = addresses_to_publish(
        observed,
        attempt,
        job.layout.world_size(),
        ctx.kept().get(key).map_or(&[][..], |k| &k.published),
    );
    let Some(want) = want else {
        return Ok(());
    };
    let slice = job.endpoint_slice(&want)?;
    Api::<EndpointSlice>::namespaced(ctx.client.clone(), job.namespace)
        .patch(
            &job.endpoint_slice_name(),
            &PatchParams::apply(operator::FIELD_MANAGER).force(),
            &Patch::Apply(&typed(slice, "discovery.k8s.io/v1", "EndpointSlice")),
        )
        .await?;
    ctx.kept().entry(key.to_string()).or_default().published = want;
    Ok(())
}

/// Writes a job's status by server-side apply, and keeps the API server's answer for the next
/// pass to decide from while the watch has not delivered it (see [`Kept::status`]).
async fn write_status(
    ctx: &Context,
    jobs: &Api<DynamicObject>,
    job: &ParallelJob,
    status: &lockstep_api::ParallelJobStatus,
) -> Result<()> {
    let name = job.name_any();
    let patch = serde_json::json!({
        "apiVersion": ParallelJob::api_version(&()),
        "kind": ParallelJob::kind(&()),
        "status": status,
    });
    let updated = jobs
        .patch_status(
            &name,
            &PatchParams::apply(operator::FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    let key = crate::gangs::key(&job.namespace().unwrap_or_default(), &name);
    ctx.kept().entry(key).or_default().status =
        Some((Arc::new(updated), std::time::Instant::now()));
    Ok(())
}

/// Writes `status` and records a Warning Event `reason` for `action` with `message`: how a
/// problem that stops a job's pods from being made is reported outside `decide`.
async fn report(
    ctx: &Context,
    jobs: &Api<DynamicObject>,
    job: &ParallelJob,
    status: &lockstep_api::ParallelJobStatus,
    reason: &str,
    action: &str,
    message: &str,
) -> Result<()> {
    write_status(ctx, jobs, job, status).await?;
    let ev = Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(message.chars().take(1000).collect()),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &job.object_ref(&())).await {
        warn!(job = %job.name_any(), error = %e, "recording an event failed");
    }
    Ok(())
}

async fn apply(
    ctx: &Context,
    job: &JobContext<'_>,
    pods: &Api<Pod>,
    jobs: &Api<ParallelJob>,
    action: &Action,
) -> Result<()> {
    let ssa = PatchParams::apply(operator::FIELD_MANAGER).force();
    let gang = crate::gangs::key(job.namespace, job.name);
    let gang = gang.as_str();
    match action {
        Action::EnsureSharedObjects => {
            // Independent writes, made at once: a reconcile waits for one round trip, not seven.
            let c = &ctx.client;
            let ns = job.namespace;
            let service = async {
                Api::<Service>::namespaced(c.clone(), ns)
                    .patch(
                        &job.service_name(),
                        &ssa,
                        &Patch::Apply(&typed(job.service()?, "v1", "Service")),
                    )
                    .await?;
                Ok::<_, Error>(())
            };
            let maps: Api<ConfigMap> = Api::namespaced(c.clone(), ns);
            let config = async {
                let (cm, _) = job.config_map()?;
                maps.patch(
                    &job.config_map_name(),
                    &ssa,
                    &Patch::Apply(&typed(cm, "v1", "ConfigMap")),
                )
                .await?;
                Ok(())
            };
            let account = async {
                if let Some(sa) = job.service_account()? {
                    let name = sa.metadata.name.clone().unwrap_or_default();
                    Api::<ServiceAccount>::namespaced(c.clone(), ns)
                        .patch(
                            &name,
                            &ssa,
                            &Patch::Apply(&typed(sa, "v1", "ServiceAccount")),
                        )
                        .await?;
                }
                Ok(())
            };
            // The Role first: binding a Role that does not exist yet needs the `bind` verb,
            // which the operator does not hold.
            let rbac = async {
                let rbac = "rbac.authorization.k8s.io/v1";
                let role = job.progress_role()?;
                let name = role.metadata.name.clone().unwrap_or_default();
                Api::<Role>::namespaced(c.clone(), ns)
                    .patch(&name, &ssa, &Patch::Apply(&typed(role, rbac, "Role")))
                    .await?;
                let binding = job.progress_role_binding()?;
                Api::<RoleBinding>::namespaced(c.clone(), ns)
                    .patch(
                        &name,
                        &ssa,
                        &Patch::Apply(&typed(binding, rbac, "RoleBinding")),
                    )
                    .await?;
                Ok(())
            };
            // Created once and never re-applied: the token must not change under running ranks,
            // and the progress belongs to the worker once it exists.
            let create = PostParams {
                field_manager: Some(operator::FIELD_MANAGER.into()),
                ..PostParams::default()
            };
            let token = async {
                let token = format!("{:032x}", rand::random::<u128>());
                let secrets: Api<Secret> = Api::namespaced(c.clone(), ns);
                ignore_conflict(secrets.create(&create, &job.token_secret(&token)?).await)
            };
            let progress =
                async { ignore_conflict(maps.create(&create, &job.progress_config_map()?).await) };
            futures::try_join!(service, config, account, rbac, token, progress)?;
        }
        Action::CreatePods {
            attempt,
            ranks,
            nodes,
        } => {
            let digest = job.config_digest()?;
            let built: Vec<Pod> = ranks
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let planned = nodes.as_ref().and_then(|n| n.get(i));
                    let node = planned.and_then(|n| ctx.nodes.get(&ObjectRef::new(n)));
                    let hostname = node
                        .as_ref()
                        .and_then(|n| n.labels().get(crate::resources::HOSTNAME_LABEL).cloned());
                    let pin = planned.map(|n| (n.as_str(), hostname));
                    let pin = pin.as_ref().map(|(node, hostname)| Pin {
                        node,
                        hostname: hostname.as_deref(),
                    });
                    job.pod(*r, *attempt, &digest, pin.is_some(), pin.as_ref())
                })
                .collect::<Result<_>>()?;
            let params = PostParams {
                field_manager: Some(operator::FIELD_MANAGER.into()),
                ..PostParams::default()
            };
            // 409: created by an earlier pass whose status write we have not seen yet.
            bounded(built, 409, |pod| {
                let params = &params;
                async move {
                    let name = pod.name_any();
                    match pods.create(params, &pod).await {
                        Ok(_) => {}
                        Err(kube::Error::Api(e)) if e.code == 409 => {}
                        Err(e) => return Err(e),
                    }
                    ctx.gangs.expect(gang, Write::Created, [name]);
                    Ok(())
                }
            })
            .await?;
        }
        Action::Ungate(names) => {
            // Only the Lockstep gate goes; gates of other controllers stay.
            let patch = serde_json::json!({"spec": {"schedulingGates": [
                {"$patch": "delete", "name": operator::SCHEDULING_GATE}
            ]}});
            bounded(names.iter().cloned(), 404, |name| {
                let patch = &patch;
                async move {
                    pods.patch(&name, &PatchParams::default(), &Patch::Strategic(patch))
                        .await
                        .map(drop)?;
                    ctx.gangs.expect(gang, Write::Released, [name]);
                    Ok(())
                }
            })
            .await?;
        }
        Action::EnsureGangObjects => {
            for object in job.gang_objects()? {
                let gvk =
                    kube::api::GroupVersionKind::gvk(&object.group, &object.version, &object.kind);
                let ar = ApiResource::from_gvk_with_plural(&gvk, &object.plural);
                let api: Api<DynamicObject> =
                    Api::namespaced_with(ctx.client.clone(), job.namespace, &ar);
                let body: DynamicObject = serde_json::from_value(object.body)?;
                match api.patch(job.name, &ssa, &Patch::Apply(&body)).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {
                        return Err(Error::GangApiMissing(format!(
                            "{}/{} {}",
                            object.group, object.version, object.kind
                        )));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Action::DeletePods(names) => {
            bounded(names.iter().cloned(), 404, |name| async move {
                pods.delete(&name, &DeleteParams::background())
                    .await
                    .map(drop)?;
                ctx.gangs.expect(gang, Write::Deleted, [name]);
                Ok(())
            })
            .await?;
        }
        Action::DeleteJob => match jobs.delete(job.name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        },
    }
    Ok(())
}

/// Orders two resourceVersions of objects of one resource: since Kubernetes 1.35 they are
/// decimal integers without leading zeros, comparable by length and then digit by digit
/// (KEP-5504). `None` when either is not of that form (then only equality means anything).
pub fn compare_resource_versions(a: &str, b: &str) -> Option<std::cmp::Ordering> {
    let well_formed = |v: &str| {
        !v.is_empty()
            && v.bytes().all(|c| c.is_ascii_digit())
            && !(v.len() > 1 && v.starts_with('0'))
    };
    (well_formed(a) && well_formed(b)).then(|| a.len().cmp(&b.len()).then_with(|| a.cmp(b)))
}

/// A create that found the object already there is a success.
fn ignore_conflict<T>(r: Result<T, kube::Error>) -> Result<()> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Runs `write` on every item with at most [`WRITE_CONCURRENCY`] in flight, treating the API
/// status `ok_code` (already exists, already gone) as success: never one by one, never unbounded.
async fn bounded<I, F, Fut>(items: I, ok_code: u16, write: F) -> Result<()>
where
    I: IntoIterator,
    F: Fn(I::Item) -> Fut,
    Fut: std::future::Future<Output = Result<(), kube::Error>>,
{
    futures::stream::iter(items)
        .map(|item| {
            let fut = write(item);
            async move {
                match fut.await {
                    Ok(()) => Ok(()),
                    Err(kube::Error::Api(e)) if e.code == ok_code => Ok(()),
                    Err(e) => Err(Error::Kube(e)),
                }
            }
        })
        .buffer_unordered(WRITE_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await
        .map(drop)
}

/// An object with apiVersion and kind set, as server-side apply requires.
fn typed<T: serde::Serialize>(obj: T, api_version: &str, kind: &str) -> serde_json::Value {
    let mut v = serde_json::to_value(obj).unwrap_or_default();
    v["apiVersion"] = api_version.into();
    v["kind"] = kind.into();
    v
}

/// Keeps of a pod only what admission reads: labels, annotations, node, resources, phase.
fn slim_pod(p: &mut Pod) {
    p.managed_fields_mut().clear();
    if let Some(spec) = p.spec.as_mut() {
        spec.volumes = None;
        spec.affinity = None;
        spec.tolerations = None;
        for c in spec
            .containers
            .iter_mut()
            .chain(spec.init_containers.iter_mut().flatten())
        {
            c.env = None;
            c.env_from = None;
            c.command = None;
            c.args = None;
            c.volume_mounts = None;
            c.ports = None;
            c.liveness_probe = None;
            c.readiness_probe = None;
            c.startup_probe = None;
        }
    }
    if let Some(st) = p.status.as_mut() {
        *st = k8s_openapi::api::core::v1::PodStatus {
            phase: st.phase.take(),
            ..Default::default()
        };
    }
}

#[cfg(test)]
mod tests {
    use super::{addresses_to_publish, batch, compare_resource_versions, counts_only};
    use crate::observe::{PodState, RankPod};
    use futures::StreamExt;
    use lockstep_api::ParallelJobStatus;
    use lockstep_api::status::{Phase, WorkerCounts};
    use std::cmp::Ordering;
    use std::time::Duration;

    #[test]
    fn only_a_change_of_the_worker_counts_alone_may_wait() {
        let starting = ParallelJobStatus {
            phase: Some(Phase::Starting),
            ready: Some("1/8".into()),
            workers: Some(WorkerCounts {
                active: 8,
                ready: 1,
                running: 1,
                ..WorkerCounts::default()
            }),
            ..ParallelJobStatus::default()
        };
        let mut more = starting.clone();
        more.ready = Some("5/8".into());
        more.workers.as_mut().unwrap().ready = 5;
        assert!(counts_only(&starting, &more));
        assert!(!counts_only(&starting, &starting), "nothing changed");
        let mut running = more.clone();
        running.phase = Some(Phase::Running);
        assert!(
            !counts_only(&starting, &running),
            "a phase change goes at once, with the counts"
        );
        let mut restarted = more.clone();
        restarted.attempt = 1;
        assert!(!counts_only(&starting, &restarted));
    }

    fn rank(rank: u32, attempt: i32, ip: Option<&str>) -> RankPod {
        RankPod {
            name: format!("j-{rank}"),
            rank,
            attempt,
            state: PodState::Running,
            ready: false,
            node: Some("n".into()),
            terminating: false,
            gated: false,
            planned_node: None,
            ip: ip.map(str::to_string),
        }
    }

    #[test]
    fn addresses_are_published_once_an_attempt_is_whole_and_withdrawn_when_it_goes() {
        let addr = |r: u32, ip: &str| (r, ip.to_string());
        // Rank 1 has no address yet: nothing is written.
        let partial = [rank(1, 0, None), rank(0, 0, Some("10.0.0.1"))];
        assert_eq!(addresses_to_publish(&partial, 0, 2, &[]), None);
        // Whole: both, sorted by rank.
        let whole = [rank(1, 0, Some("10.0.0.2")), rank(0, 0, Some("10.0.0.1"))];
        let first = vec![addr(0, "10.0.0.1"), addr(1, "10.0.0.2")];
        assert_eq!(addresses_to_publish(&whole, 0, 2, &[]), Some(first.clone()));
        // Written already: nothing to do.
        assert_eq!(addresses_to_publish(&whole, 0, 2, &first), None);
        // A restart: the old attempt's pods terminate, the new ones have no address yet. The
        // old addresses are withdrawn once, so no name resolves to a pod that is gone.
        let mut restarting = vec![rank(0, 1, None), rank(1, 1, None)];
        restarting.extend(whole.iter().cloned().map(|mut p| {
            p.terminating = true;
            p
        }));
        assert_eq!(
            addresses_to_publish(&restarting, 1, 2, &first),
            Some(vec![])
        );
        assert_eq!(addresses_to_publish(&restarting, 1, 2, &[]), None);
        // The new attempt is whole: its addresses replace them.
        let next = [rank(0, 1, Some("10.0.0.5")), rank(1, 1, Some("10.0.0.6"))];
        assert_eq!(
            addresses_to_publish(&next, 1, 2, &[]),
            Some(vec![addr(0, "10.0.0.5"), addr(1, "10.0.0.6")])
        );
        // A rank that got a new address (its pod was replaced) is written again.
        let moved = [rank(0, 1, Some("10.0.0.5")), rank(1, 1, Some("10.0.0.8"))];
        assert_eq!(
            addresses_to_publish(&moved, 1, 2, &[addr(0, "10.0.0.5"), addr(1, "10.0.0.6")]),
            Some(vec![addr(0, "10.0.0.5"), addr(1, "10.0.0.8")])
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_merges_repeats_and_holds_each_item_to_the_end_of_its_period() {
        let (input, rx) = futures::channel::mpsc::unbounded::<&str>();
        let (output, mut out) = futures::channel::mpsc::unbounded();
        let period = Duration::from_millis(500);
        let task = tokio::spawn(batch(rx, period, output));
        // The first tick fires at once; what arrives after it waits for the next.
        tokio::time::sleep(Duration::from_millis(1)).await;
        for item in ["a", "a", "b", "a"] {
            input.unbounded_send(item).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(out.try_recv().is_err(), "nothing before the period ends");
        tokio::time::sleep(period).await;
        let mut got = vec![out.next().await.unwrap(), out.next().await.unwrap()];
        got.sort_unstable();
        assert_eq!(got, ["a", "b"]);
        assert!(out.try_recv().is_err(), "each item once");
        input.unbounded_send("a").unwrap();
        drop(input);
        task.await.unwrap();
        assert_eq!(
            out.next().await,
            Some("a"),
            "what is held when the input ends still goes"
        );
    }

    #[test]
    fn resource_versions_compare_as_integers() {
        assert_eq!(compare_resource_versions("99", "100"), Some(Ordering::Less));
        assert_eq!(
            compare_resource_versions("1000", "999"),
            Some(Ordering::Greater)
        );
        assert_eq!(
            compare_resource_versions("512", "512"),
            Some(Ordering::Equal)
        );
        assert_eq!(
            compare_resource_versions("123", "124"),
            Some(Ordering::Less)
        );
    }

    #[test]
    fn resource_versions_of_another_form_do_not_compare() {
        assert_eq!(compare_resource_versions("", "1"), None);
        assert_eq!(compare_resource_versions("012", "13"), None);
        assert_eq!(compare_resource_versions("1a", "2"), None);
        assert_eq!(compare_resource_versions("-1", "2"), None);
    }
}
