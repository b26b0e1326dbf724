//! The admission queue of the running operator: builds the [`Snapshot`] from the caches of nodes,
//! pods and jobs, runs a [`cycle`] under one lock (so two reconciles never count the same
//! capacity twice), keeps the plans it grants until the job's status shows them, and wakes the
//! jobs it admitted.
//!
//! **Reservations.** Capacity is taken by (1) every pod that has not finished and is bound to a
//! node, or carries the planned-node annotation of an admitted gang (gated or not yet bound); (2)
//! every rank of an admitted attempt whose pod does not exist yet, on its planned node (from the
//! job's `status.admission`, which is written before any pod is created); (3) plans granted in
//! this process whose status write the job cache has not shown yet. (1) and (2) live in the API
//! server, so an operator that restarts rebuilds every reservation before it admits anything.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::channel::mpsc::UnboundedSender;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::scheduling::v1::PriorityClass;
use kube::ResourceExt;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::reflector::{ObjectRef, Store};
use lockstep_api::ParallelJob;
use lockstep_api::contract::{annotations, labels};
use lockstep_api::spec::{GangPolicy, TopologyMode};
use lockstep_api::status::{Phase, condition_types, reasons};

use super::Outcome;
use super::demand::{Res, pod_request};
use super::placement::Shape;
use super::queue::{Explain, Verdict, Wait, Waiting, cycle};
use super::snapshot::{NodeInfo, NodeRules, Snapshot};
use crate::job;
use crate::metrics::Metrics;
use crate::resources::JobContext;

/// A job as admission needs it, parsed once per resourceVersion.
#[derive(Clone, Debug)]
struct JobInfo {
    key: Arc<str>,
    namespace: String,
    name: String,
    waiting: bool,
    live: bool,
    attempt: i32,
    /// Planned nodes of the current attempt, when it is admitted.
    admitted: Option<Vec<String>>,
    priority_class: Option<String>,
    created: i64,
    /// When the current wait for admission began (seconds since the epoch, see
    /// [`job::queued_since`]).
    queued_since: i64,
    shape: Arc<Shape>,
    rules: Arc<NodeRules>,
}

impl JobInfo {
    fn of(job: &ParallelJob, controller_name: &str) -> Option<JobInfo> {
        let ctx = JobContext::new(job).ok()?;
        let pod = ctx.pod(0, 0, "", true, None).ok()?;
        let spec = pod.spec.unwrap_or_default();
        let status = job.status.clone().unwrap_or_default();
        let phase = status.phase;
        let mine = job.spec.controller() == controller_name;
        let builtin = job.spec.scheduling.gang_policy == GangPolicy::Builtin;
        let live = mine
            && builtin
            && job.metadata.deletion_timestamp.is_none()
            && !job.spec.run_policy.suspend
            && !phase.is_some_and(Phase::is_terminal);
        let admitted = job::admitted_nodes(&status).map(<[String]>::to_vec);
        let created = job.metadata.creation_timestamp.as_ref().map(|t| t.0);
        // A gang its namespace's ResourceQuota refused, or that objects not its own stand in
        // the way of, is not in the queue: admitted on its behalf, it would hold capacity it
        // cannot use. It asks itself when it tries again.
        let quota_wait = status.conditions.iter().any(|c| {
            c.type_ == condition_types::ADMITTED
                && c.status == "False"
                && [reasons::QUOTA_EXCEEDED, reasons::OBJECT_CONFLICT].contains(&c.reason.as_str())
        });
        Some(JobInfo {
            key: job::key(&job.namespace().unwrap_or_default(), &job.name_any()).into(),
            namespace: job.namespace().unwrap_or_default(),
            name: job.name_any(),
            waiting: live
                && admitted.is_none()
                && !quota_wait
                && matches!(phase, None | Some(Phase::Pending | Phase::Queued)),
            live,
            attempt: status.attempt,
            admitted,
            priority_class: job.spec.scheduling.priority_class_name.clone(),
            created: created.map_or(0, |t| t.as_second()),
            queued_since: job::queued_since(&status, created).map_or(0, |t| t.as_second()),
            shape: Arc::new(Shape {
                replicas: ctx.layout.data_parallel(),
                stages: ctx.layout.pipeline_stages(),
                request: pod_request(&spec),
                topology: job
                    .spec
                    .scheduling
                    .topology
                    .as_ref()
                    .map(|t| (t.key.clone(), t.mode == TopologyMode::Required)),
            }),
            rules: Arc::new(NodeRules::of(&spec)),
        })
    }

    fn key(&self) -> String {
        self.key.to_string()
    }
}

struct Plan {
    attempt: i32,
    nodes: Vec<String>,
    namespace: String,
    name: String,
    request: Res,
    granted: Instant,
}

/// (namespace, job, attempt, rank) of a worker pod.
type WorkerKey = (String, String, i32, u32);

/// What a pod means to admission.
struct PodUse {
    /// The worker it is, for a worker pod.
    worker: Option<Arc<WorkerKey>>,
    /// The node it holds capacity on (bound, or planned by admission) and how much, unless it
    /// has finished.
    holds: Option<(String, Res)>,
}

impl PodUse {
    fn of(pod: &Pod) -> PodUse {
        let worker = pod.metadata.labels.as_ref().and_then(|l| {
            Some(Arc::new((
                pod.namespace().unwrap_or_default(),
                l.get(labels::JOB_NAME)?.clone(),
                l.get(labels::ATTEMPT)?.parse::<i32>().ok()?,
                l.get(labels::RANK)?.parse::<u32>().ok()?,
            )))
        });
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        let finished = matches!(phase, Some("Succeeded" | "Failed"));
        let holds = pod.spec.as_ref().filter(|_| !finished).and_then(|spec| {
            let node = spec.node_name.clone().or_else(|| {
                pod.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(annotations::PLANNED_NODE).cloned())
            })?;
            Some((node, pod_request(spec)))
        });
        PodUse { worker, holds }
    }
}

/// A cached reading of an object, valid while the cache holds that very object.
type Reading<K, T> = (Arc<K>, T);

/// The (namespace, job, attempt, rank) of every worker pod that exists, finished or not.
type Present = Arc<HashSet<Arc<WorkerKey>>>;

#[derive(Default)]
struct State {
    plans: HashMap<String, Plan>,
    parsed: HashMap<usize, Reading<DynamicObject, Option<Arc<JobInfo>>>>,
    nodes: HashMap<usize, Reading<Node, NodeInfo>>,
    pods: HashMap<usize, Reading<Pod, Arc<PodUse>>>,
    /// The nodes with every pod that holds capacity counted, kept from one decision to the next
    /// and brought up to date with the pods that came and went since (made anew when a node came,
    /// went or changed in what admission reads): at 20,000 nodes and 40,000 pods, making it for
    /// every decision took most of it.
    counted: Option<Snapshot>,
    /// The worker pods that exist, as of the last reading of the pods.
    present: Present,
}

/// The admission queue: one per operator process.
pub struct Admitter {
    nodes: Store<Node>,
    pods: Store<Pod>,
    jobs: Store<DynamicObject>,
    classes: Store<PriorityClass>,
    controller_name: String,
    state: Mutex<State>,
    wake: UnboundedSender<ObjectRef<DynamicObject>>,
    metrics: Arc<Metrics>,
}

/// How long a granted plan is kept for a job the job cache does not show (a job deleted right
/// after it was admitted).
const PLAN_GRACE: Duration = Duration::from_secs(60);

impl Admitter {
    /// An admitter over these caches; jobs it admits on behalf of others are sent to `wake`.
    pub fn new(
        nodes: Store<Node>,
        pods: Store<Pod>,
        jobs: Store<DynamicObject>,
        classes: Store<PriorityClass>,
        controller_name: String,
        wake: UnboundedSender<ObjectRef<DynamicObject>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            nodes,
            pods,
            jobs,
            classes,
            controller_name,
            state: Mutex::new(State::default()),
            wake,
            metrics,
        }
    }

    /// Waits until every cache admission reads has been filled once.
    pub async fn wait_ready(&self) {
        let _ = self.nodes.wait_until_ready().await;
        let _ = self.pods.wait_until_ready().await;
        let _ = self.jobs.wait_until_ready().await;
        let _ = self.classes.wait_until_ready().await;
    }

    /// Asks admission for the current attempt of `job` (read fresh by the caller).
    pub fn request(&self, job: &ParallelJob) -> Outcome {
        match self.run(Some(job)) {
            Some(o) => o,
            None => Outcome::Waiting {
                reason: reasons::INSUFFICIENT_CAPACITY,
                message: "the operator cannot work out what this job's pods ask for".into(),
                position: 0,
            },
        }
    }

    /// The pod `name` of `namespace` as the cluster-wide pod cache holds it (its metadata,
    /// and what admission counts of the rest).
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Arc<Pod>> {
        self.pods.get(&ObjectRef::new(name).within(namespace))
    }

    /// Drops the plan granted to the job `key` that its status does not show yet: its gang was
    /// refused (by the namespace's ResourceQuota, or objects not its own stand in its way) after
    /// admission or before its status showed it, and its status gives the admission back, so
    /// the plan must not keep holding that capacity.
    pub fn give_back(&self, key: &str) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.plans.remove(key);
    }

    /// Runs a cycle for the whole queue (after capacity was freed), waking every job it admits.
    pub fn run_queue(&self) {
        self.run(None);
    }

    /// Whether any job waits.
    pub fn has_waiting(&self) -> bool {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.parsed
            .values()
            .any(|(_, info)| info.as_ref().is_some_and(|i| i.waiting))
    }

    fn run(&self, caller: Option<&ParallelJob>) -> Option<Outcome> {
        let started = Instant::now();
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let caller_info = caller.and_then(|j| JobInfo::of(j, &self.controller_name));
        if caller.is_some() && caller_info.is_none() {
            return None;
        }
        let caller_key = caller_info.as_ref().map(JobInfo::key);
        if let Some(info) = &caller_info
            && let Some(plan) = st.plans.get(&info.key())
            && plan.attempt == info.attempt
        {
            return Some(Outcome::Admitted(plan.nodes.clone()));
        }
        let infos = self.parse_jobs(&mut st, caller_info);
        prune_plans(&mut st.plans, &infos);

        let nodes_changed = self.read_nodes(&mut st);
        let (present, came, went) = self.read_pods(&mut st);
        let counted = match st.counted.take() {
            Some(mut counted) if !nodes_changed => {
                for usage in &went {
                    if let Some((node, request)) = &usage.holds {
                        counted.give(node, request);
                    }
                }
                for usage in &came {
                    if let Some((node, request)) = &usage.holds {
                        counted.take(node, request);
                    }
                }
                counted
            }
            _ => {
                let mut counted =
                    Snapshot::new(st.nodes.values().map(|(_, info)| info.clone()).collect());
                for (_, usage) in st.pods.values() {
                    if let Some((node, request)) = &usage.holds {
                        counted.take(node, request);
                    }
                }
                counted
            }
        };
        // What this decision reserves and admits is given back at its end (see `undo`).
        let mut snapshot = counted;
        snapshot.record();
        for info in infos.values() {
            if let (true, Some(nodes)) = (info.live, &info.admitted) {
                reserve(
                    &mut snapshot,
                    &present,
                    &info.namespace,
                    &info.name,
                    info.attempt,
                    nodes,
                    &info.shape.request,
                );
            }
        }
        for plan in st.plans.values() {
            reserve(
                &mut snapshot,
                &present,
                &plan.namespace,
                &plan.name,
                plan.attempt,
                &plan.nodes,
                &plan.request,
            );
        }
        let priorities = self.priorities();
        let mut queue: Vec<Waiting> = infos
            .values()
            .filter(|i| {
                (i.waiting || caller_key.as_deref() == Some(&i.key()))
                    && !st.plans.contains_key(&i.key())
            })
            .map(|i| Waiting {
                key: i.key(),
                priority: priorities.of(i.priority_class.as_deref()),
                created: i.created,
                shape: i.shape.clone(),
                rules: i.rules.clone(),
            })
            .collect();
        let explain = match &caller_key {
            Some(k) => Explain::Only(k),
            None => Explain::Nobody,
        };
        let verdicts = cycle(&mut snapshot, &mut queue, explain);
        let mut waiting = 0;
        let mut oldest: i64 = 0;
        let now = k8s_openapi::jiff::Timestamp::now().as_second();
        let mut outcome = None;
        for (key, verdict) in verdicts {
            let mine = caller_key.as_deref() == Some(&key);
            let result = match verdict {
                Verdict::Admit(nodes) => {
                    let names: Vec<String> = nodes
                        .iter()
                        .map(|i| snapshot.nodes[*i].name.clone())
                        .collect();
                    if let Some(info) = infos.get(key.as_str()) {
                        st.plans.insert(
                            key.clone(),
                            Plan {
                                attempt: info.attempt,
                                nodes: names.clone(),
                                namespace: info.namespace.clone(),
                                name: info.name.clone(),
                                request: info.shape.request.clone(),
                                granted: Instant::now(),
                            },
                        );
                        if !mine {
                            let ar = ApiResource::erase::<ParallelJob>(&());
                            let _ = self.wake.unbounded_send(
                                ObjectRef::new_with(&info.name, ar).within(&info.namespace),
                            );
                        }
                    }
                    Outcome::Admitted(names)
                }
                Verdict::Waits {
                    why,
                    message,
                    position,
                } => {
                    waiting += 1;
                    if let Some(info) = infos.get(key.as_str()) {
                        oldest = oldest.max(now - info.queued_since);
                    }
                    Outcome::Waiting {
                        reason: match why {
                            Wait::Behind(_) => reasons::QUEUED_BEHIND,
                            Wait::Capacity | Wait::Never => reasons::INSUFFICIENT_CAPACITY,
                        },
                        message,
                        position,
                    }
                }
            };
            if mine {
                outcome = Some(result);
            }
        }
        snapshot.undo();
        st.counted = Some(snapshot);
        self.metrics.gang_queue_length.set(waiting);
        self.metrics.gang_oldest_wait_seconds.set(oldest.max(0));
        self.metrics
            .gang_decision_seconds
            .observe(started.elapsed().as_secs_f64());
        outcome
    }

    /// Parses every cached job (reusing the parse of an unchanged resourceVersion), with the
    /// caller's fresh copy in place of its cached one.
    fn parse_jobs(
        &self,
        st: &mut State,
        caller: Option<JobInfo>,
    ) -> HashMap<Arc<str>, Arc<JobInfo>> {
        let jobs = self.jobs.state();
        let mut infos = HashMap::with_capacity(jobs.len() + 1);
        let mut next = HashMap::with_capacity(jobs.len());
        for raw in jobs {
            // Keyed by the cached object itself, as for nodes and pods.
            let at = Arc::as_ptr(&raw) as usize;
            let info = match st.parsed.remove(&at) {
                Some((_, info)) => info,
                None => job::read_job(&raw)
                    .ok()
                    .and_then(|j| JobInfo::of(&j, &self.controller_name))
                    .map(Arc::new),
            };
            if let Some(info) = &info {
                infos.insert(info.key.clone(), info.clone());
            }
            next.insert(at, (raw, info));
        }
        st.parsed = next;
        if let Some(info) = caller {
            infos.insert(info.key.clone(), Arc::new(info));
        }
        infos
    }

    /// Reads every node as admission sees it into the state (reusing the reading of a node the
    /// cache has not replaced since); whether any node came, went or changed in what admission
    /// reads. A node the cache replaced with a version admission reads the same (a heartbeat of
    /// its status, every few minutes for every node of a cluster) keeps its reading: otherwise
    /// each would have the counted snapshot made anew, every node and every pod.
    fn read_nodes(&self, st: &mut State) -> bool {
        let nodes = self.nodes.state();
        if unchanged(&nodes, &st.nodes) {
            return false;
        }
        let mut old = std::mem::take(&mut st.nodes);
        let mut next = HashMap::with_capacity(nodes.len());
        let mut replaced = Vec::new();
        for node in nodes {
            // Keyed by the cached object itself: the cache replaces the Arc when the node changes,
            // and holding it here keeps its address from being reused.
            let at = Arc::as_ptr(&node) as usize;
            match old.remove(&at) {
                Some((_, info)) => {
                    next.insert(at, (node, info));
                }
                None => replaced.push((at, node)),
            }
        }
        // What is left of the last reading: nodes gone, or replaced by a new version.
        let mut before: HashMap<String, NodeInfo> = old
            .into_values()
            .map(|(_, info)| (info.name.clone(), info))
            .collect();
        let mut changed = false;
        for (at, node) in replaced {
            let info = NodeInfo::from_node(&node);
            let info = match before.remove(&info.name) {
                Some(was) if was.reads_the_same(&info) => was,
                _ => {
                    changed = true;
                    info
                }
            };
            next.insert(at, (node, info));
        }
        st.nodes = next;
        changed || !before.is_empty()
    }

    /// Reads every pod into the state; returns the (namespace, job, attempt, rank) of every
    /// worker pod that exists, finished or not, and what the pods that came and the pods that
    /// went (or changed: both) since the last reading hold.
    fn read_pods(&self, st: &mut State) -> (Present, Vec<Arc<PodUse>>, Vec<Arc<PodUse>>) {
        let pods = self.pods.state();
        if unchanged(&pods, &st.pods) {
            return (st.present.clone(), Vec::new(), Vec::new());
        }
        let mut present = HashSet::new();
        let mut came = Vec::new();
        let mut next = HashMap::with_capacity(pods.len());
        for pod in pods {
            let at = Arc::as_ptr(&pod) as usize;
            let usage = match st.pods.remove(&at) {
                Some((_, u)) => u,
                None => {
                    let u = Arc::new(PodUse::of(&pod));
                    came.push(u.clone());
                    u
                }
            };
            if let Some(w) = &usage.worker {
                present.insert(w.clone());
            }
            next.insert(at, (pod, usage));
        }
        let went = std::mem::replace(&mut st.pods, next)
            .into_values()
            .map(|(_, u)| u)
            .collect();
        st.present = Arc::new(present);
        (st.present.clone(), came, went)
    }

    /// The value of the PriorityClass `name`, when it exists.
    pub fn priority_value(&self, name: &str) -> Option<i32> {
        self.classes
            .state()
            .iter()
            .find(|c| c.name_any() == name)
            .map(|c| c.value.unwrap_or(0))
    }

    fn priorities(&self) -> Priorities {
        let classes = self.classes.state();
        Priorities {
            default: classes
                .iter()
                .find(|c| c.global_default == Some(true))
                .map_or(0, |c| c.value.unwrap_or(0)),
            by_name: classes
                .iter()
                .map(|c| (c.name_any(), c.value.unwrap_or(0)))
                .collect(),
        }
    }
}

/// PriorityClass values: a named class, or the global default when none is named.
struct Priorities {
    default: i32,
    by_name: HashMap<String, i32>,
}

impl Priorities {
    fn of(&self, class: Option<&str>) -> i32 {
        match class {
            Some(name) => self.by_name.get(name).copied().unwrap_or(0),
            None => self.default,
        }
    }
}

/// Whether `objects` (a cache's) are exactly those `read` holds readings of: then nothing came,
/// went or changed since (a changed object is a new one in the cache).
fn unchanged<K, V>(objects: &[Arc<K>], read: &HashMap<usize, (Arc<K>, V)>) -> bool {
    objects.len() == read.len()
        && objects
            .iter()
            .all(|o| read.contains_key(&(Arc::as_ptr(o) as usize)))
}

/// Takes the capacity of every rank of an admitted attempt whose pod does not exist yet.
fn reserve(
    snapshot: &mut Snapshot,
    present: &HashSet<Arc<WorkerKey>>,
    namespace: &str,
    name: &str,
    attempt: i32,
    nodes: &[String],
    request: &Res,
) {
    for (rank, node) in nodes.iter().enumerate() {
        let rank = u32::try_from(rank).unwrap_or(u32::MAX);
        let key = Arc::new((namespace.to_string(), name.to_string(), attempt, rank));
        if !present.contains(&key) {
            snapshot.take(node, request);
        }
    }
}

/// Drops the plans the job cache now shows in a status (the status holds the reservation from
/// then on), of jobs that no longer wait for them (finished, suspended, deleted), and of jobs the
/// cache has not shown for a while.
fn prune_plans(plans: &mut HashMap<String, Plan>, infos: &HashMap<Arc<str>, Arc<JobInfo>>) {
    plans.retain(|key, plan| match infos.get(key.as_str()) {
        Some(info) => {
            info.live && info.attempt == plan.attempt && info.admitted.as_ref() != Some(&plan.nodes)
        }
        None => plan.granted.elapsed() < PLAN_GRACE,
    });
}

/// A store holding `objects`, as a reflector's is after its first complete list: for admission
/// benchmarks and tests that need no API server.
pub fn filled_store<K>(dyntype: K::DynamicType, objects: Vec<K>) -> Store<K>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    filled_writer(dyntype, objects).as_reader()
}

/// The writer of a [`filled_store`], for benchmarks and tests that go on to change what the
/// store holds (`apply_watcher_event`) as a watch would.
pub fn filled_writer<K>(
    dyntype: K::DynamicType,
    objects: Vec<K>,
) -> kube::runtime::reflector::store::Writer<K>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    use kube::runtime::watcher::Event;
    let mut writer = kube::runtime::reflector::store::Writer::<K>::new(dyntype);
    writer.apply_watcher_event(&Event::Init);
    for o in objects {
        writer.apply_watcher_event(&Event::InitApply(o));
    }
    writer.apply_watcher_event(&Event::InitDone);
    writer
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ddp-digits` (2 ranks) asking for 3 GPUs per rank, created at `created`; `queued` is when
    /// its `Admitted` condition turned False, if it did.
    fn job(name: &str, created: &str, queued: Option<&str>) -> ParallelJob {
        let text = std::fs::read_to_string(format!(
            "{}/../examples/ddp-digits.yaml",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        let mut j = lockstep_api::validation::validate_yaml(&text).unwrap();
        j.spec.parallelism.gpus_per_worker = 3;
        let mut v = serde_json::to_value(&j).unwrap();
        v["metadata"] = serde_json::json!({
            "name": name, "namespace": "ns", "uid": name, "creationTimestamp": created
        });
        if let Some(at) = queued {
            v["status"] = serde_json::json!({"conditions": [{
                "type": "Admitted", "status": "False", "reason": "InsufficientCapacity",
                "message": "", "lastTransitionTime": at
            }]});
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_oldest_wait_is_that_of_the_longest_waiting_gang() {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n0", "labels": {"kubernetes.io/hostname": "n0"}},
            "status": {"allocatable": {"cpu": "64", "memory": "256Gi", "pods": "110",
                                       "nvidia.com/gpu": "8"}}
        }))
        .unwrap();
        let now = k8s_openapi::jiff::Timestamp::now();
        let ago = |s: i64| (now - k8s_openapi::jiff::SignedDuration::from_secs(s)).to_string();
        // a runs first (6 of 8 GPUs); b and c each need 6 and wait: b since 10 minutes ago (when
        // a restart sent it back), c since its creation 5 minutes ago.
        let jobs = [
            job("a", &ago(3600), None),
            job("b", &ago(1800), Some(&ago(600))),
            job("c", &ago(300), None),
        ];
        let ar = ApiResource::erase::<ParallelJob>(&());
        let raw: Vec<DynamicObject> = jobs
            .iter()
            .map(|j| serde_json::from_value(serde_json::to_value(j).unwrap()).unwrap())
            .collect();
        let metrics = Arc::new(Metrics::new());
        let (wake, _woken) = futures::channel::mpsc::unbounded();
        let admitter = Admitter::new(
            filled_store((), vec![node]),
            filled_store((), vec![]),
            filled_store(ar, raw),
            filled_store((), vec![]),
            lockstep_api::contract::operator::CONTROLLER_NAME.into(),
            wake,
            metrics.clone(),
        );
        assert!(matches!(admitter.request(&jobs[0]), Outcome::Admitted(_)));
        assert!(matches!(
            admitter.request(&jobs[2]),
            Outcome::Waiting { .. }
        ));
        assert_eq!(metrics.gang_queue_length.get(), 2);
        let oldest = metrics.gang_oldest_wait_seconds.get();
        assert!((600..610).contains(&oldest), "oldest wait {oldest}s");
    }

    #[test]
    fn a_node_version_admission_reads_the_same_keeps_the_counted_snapshot() {
        use kube::runtime::watcher::Event;
        let node = |name: &str, gpus: &str, heartbeat: &str, zone: &str| -> Node {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
                "status": {"allocatable": {"cpu": "64", "nvidia.com/gpu": gpus},
                           "conditions": [{"type": "Ready", "status": "True",
                                           "lastHeartbeatTime": format!("2026-01-01T00:00:0{heartbeat}Z")}]}
            }))
            .unwrap()
        };
        let first = ["n0", "n1"].map(|n| node(n, "8", "0", "a"));
        let mut writer = filled_writer((), first.to_vec());
        let nodes = writer.as_reader();
        let (wake, _woken) = futures::channel::mpsc::unbounded();
        let admitter = Admitter::new(
            nodes,
            filled_store((), vec![]),
            filled_store(ApiResource::erase::<ParallelJob>(&()), vec![]),
            filled_store((), vec![]),
            lockstep_api::contract::operator::CONTROLLER_NAME.into(),
            wake,
            Arc::new(Metrics::new()),
        );
        let mut st = State::default();
        assert!(admitter.read_nodes(&mut st), "the first reading");
        assert!(!admitter.read_nodes(&mut st), "nothing new");
        writer.apply_watcher_event(&Event::Apply(node("n0", "8", "1", "a")));
        assert!(
            !admitter.read_nodes(&mut st),
            "a heartbeat changes nothing admission reads"
        );
        writer.apply_watcher_event(&Event::Apply(node("n0", "4", "2", "a")));
        assert!(admitter.read_nodes(&mut st), "allocatable changed");
        writer.apply_watcher_event(&Event::Apply(node("n1", "8", "2", "b")));
        assert!(admitter.read_nodes(&mut st), "a label changed");
        writer.apply_watcher_event(&Event::Delete(node("n1", "8", "2", "b")));
        assert!(admitter.read_nodes(&mut st), "a node went");
        assert_eq!(st.nodes.len(), 1);
        let kept = st
            .nodes
            .values()
            .next()
            .map(|(_, info)| info.clone())
            .unwrap();
        assert_eq!(kept.allocatable.0.get("nvidia.com/gpu"), Some(&4000));
    }

    #[test]
    fn a_gang_that_waits_for_its_quota_is_not_admitted_on_its_behalf() {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n0", "labels": {"kubernetes.io/hostname": "n0"}},
            "status": {"allocatable": {"cpu": "64", "memory": "256Gi", "pods": "110",
                                       "nvidia.com/gpu": "8"}}
        }))
        .unwrap();
        let mut waits = job("q", "2026-01-01T00:00:00Z", None);
        waits.status = Some(
            serde_json::from_value(serde_json::json!({"phase": "Queued", "conditions": [{
                "type": "Admitted", "status": "False", "reason": "QuotaExceeded",
                "message": "ResourceQuota team-cpu", "lastTransitionTime": "2026-01-01T00:00:01Z"
            }]}))
            .unwrap(),
        );
        let ar = ApiResource::erase::<ParallelJob>(&());
        let raw: DynamicObject =
            serde_json::from_value(serde_json::to_value(&waits).unwrap()).unwrap();
        let (wake, mut woken) = futures::channel::mpsc::unbounded();
        let admitter = Admitter::new(
            filled_store((), vec![node]),
            filled_store((), vec![]),
            filled_store(ar, vec![raw]),
            filled_store((), vec![]),
            lockstep_api::contract::operator::CONTROLLER_NAME.into(),
            wake,
            Arc::new(Metrics::new()),
        );
        // Capacity is freed: the queue runs, and does not take it for a gang that cannot use it.
        admitter.run_queue();
        assert!(woken.try_recv().is_err(), "admitted on its behalf");
        assert!(!admitter.has_waiting());
        // Its wait over, the job asks itself, and is admitted.
        assert!(matches!(admitter.request(&waits), Outcome::Admitted(_)));
        // Refused by its quota again, it gives the plan back: another gang may have it.
        let other = job("r", "2026-01-01T00:00:02Z", None);
        assert!(matches!(admitter.request(&other), Outcome::Waiting { .. }));
        admitter.give_back("ns/q");
        assert!(matches!(admitter.request(&other), Outcome::Admitted(_)));
    }
}
