//! The watches behind the controller: the caches reconcile and admission read, what wakes a job
//! up (its pods, its progress report, a deleted node, admission), and the batching of pod changes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, PodSpec, PodStatus};
use k8s_openapi::api::scheduling::v1::PriorityClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::reflector::{self, ObjectRef, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use lockstep_api::contract::{labels, names, operator};
use tokio::sync::Notify;

use crate::gang::admitter::Admitter;
use crate::pods::PodCache;

/// How long a pod's change may wait to be reconciled together with its gang's other changes.
pub const POD_BATCH: Duration = Duration::from_millis(500);

/// The node cache (no managedFields, images or conditions), and a stream that yields when a node is deleted: a rank whose
/// node disappears has failed (NodeLost), and every job is looked at again. Every change of a
/// node notifies `capacity`, and is counted in `gpus`.
pub(super) fn nodes(
    client: &Client,
    capacity: Arc<Notify>,
    gpus: Arc<GpuNodes>,
) -> (Store<Node>, impl Stream<Item = ()> + Send + 'static) {
    let (nodes, writer) = reflector::store::<Node>();
    let deletions = reflector(
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
        if let Ok(ev) = &ev {
            gpus.apply(ev);
        }
        if matches!(ev, Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_))) {
            capacity.notify_one();
        }
        async move { matches!(ev, Ok(watcher::Event::Delete(_))).then_some(()) }
    });
    (nodes, deletions)
}

/// The GPUs every schedulable node offers (its allocatable `nvidia.com/gpu`), kept up to date
/// from the node watch's events, and the most of them ([`GpuNodes::largest`]): every pass over a
/// job that asks for GPUs compares with it, and scanning the node cache for it took 5% of the
/// operator's CPU at 1,000 nodes (and grows with the nodes).
#[derive(Debug, Default)]
pub struct GpuNodes {
    state: Mutex<GpuState>,
}

#[derive(Debug, Default)]
struct GpuState {
    /// Node name -> its GPUs, for the schedulable nodes that have some.
    by_node: HashMap<String, i64>,
    /// GPUs -> how many nodes offer that many.
    counts: BTreeMap<i64, usize>,
    /// The nodes of a relist under way: they replace `by_node` when it is complete.
    relist: Option<HashMap<String, i64>>,
}

impl GpuState {
    fn set(&mut self, name: &str, gpus: Option<i64>) {
        let old = match gpus {
            Some(g) => {
                *self.counts.entry(g).or_default() += 1;
                self.by_node.insert(name.to_string(), g)
            }
            None => self.by_node.remove(name),
        };
        if let Some(old) = old
            && let Some(n) = self.counts.get_mut(&old)
        {
            *n -= 1;
            if *n == 0 {
                self.counts.remove(&old);
            }
        }
    }
}

impl GpuNodes {
    /// Takes one event of the node watch.
    pub fn apply(&self, event: &watcher::Event<Node>) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            watcher::Event::Apply(node) => s.set(&node.name_any(), node_gpus(node)),
            watcher::Event::Delete(node) => s.set(&node.name_any(), None),
            watcher::Event::Init => s.relist = Some(HashMap::new()),
            watcher::Event::InitApply(node) => {
                if let Some(g) = node_gpus(node) {
                    s.relist.get_or_insert_default().insert(node.name_any(), g);
                }
            }
            watcher::Event::InitDone => {
                let listed = s.relist.take().unwrap_or_default();
                s.by_node.clear();
                s.counts.clear();
                for (name, g) in listed {
                    s.set(&name, Some(g));
                }
            }
        }
    }

    /// The most GPUs any schedulable node offers (0 when none does).
    pub fn largest(&self) -> i64 {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.counts.last_key_value().map_or(0, |(g, _)| *g)
    }
}

/// The GPUs a node offers to new pods: none when it is cordoned or has none.
fn node_gpus(node: &Node) -> Option<i64> {
    if node
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
    {
        return None;
    }
    node.status
        .as_ref()?
        .allocatable
        .as_ref()?
        .get(crate::resources::GPU_RESOURCE)?
        .0
        .parse::<i64>()
        .ok()
        .filter(|g| *g > 0)
}

/// Every pod of the cluster, reduced to what admission counts (see [`slim_pod`]), and the task
/// that keeps the cache; a pod that finishes or is deleted notifies `capacity`.
pub(super) fn all_pods(
    client: &Client,
    capacity: Arc<Notify>,
) -> (Store<Pod>, impl Future<Output = ()> + Send + 'static) {
    let (pods, writer) = reflector::store::<Pod>();
    let watch = reflector(
        writer,
        lean_pods(Api::all(client.clone()), watcher::Config::default()).modify(slim_pod),
    )
    .default_backoff()
    .for_each(move |ev| {
        let freed = match &ev {
            Ok(watcher::Event::Delete(_)) => true,
            Ok(watcher::Event::Apply(p)) => matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            ),
            _ => false,
        };
        if freed {
            capacity.notify_one();
        }
        async {}
    });
    (pods, watch)
}

/// The PriorityClasses admission orders the queue by, and the task that keeps the cache.
pub(super) fn priority_classes(
    client: &Client,
) -> (
    Store<PriorityClass>,
    impl Future<Output = ()> + Send + 'static,
) {
    let (classes, writer) = reflector::store::<PriorityClass>();
    let watch = reflector(
        writer,
        watcher(
            Api::<PriorityClass>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .for_each(|_| async {});
    (classes, watch)
}

/// Rank 0's progress reports (in `namespace`, or in every namespace), through the progress
/// ConfigMaps only: one watch keeps the cache that reconcile reads and, once the cache holds a
/// new report, yields the ConfigMap (its owner, the job, is woken up).
pub(super) fn progress_reports(
    client: &Client,
    namespace: Option<&str>,
) -> (
    Store<ConfigMap>,
    impl Stream<Item = Result<ConfigMap, watcher::Error>> + Send + 'static,
) {
    let selector = watcher::Config::default().labels(&format!(
        "{}={},{}={}",
        labels::MANAGED_BY,
        operator::FIELD_MANAGER,
        labels::COMPONENT,
        names::PROGRESS_COMPONENT
    ));
    let (cache, writer) = reflector::store::<ConfigMap>();
    let reports = reflector(
        writer,
        watcher(scoped::<ConfigMap>(client, namespace), selector),
    )
    .default_backoff()
    .touched_objects();
    (cache, reports)
}

/// The worker pods (in `namespace`, or in every namespace): one watch keeps `cache` (the gangs
/// reconcile reads) and, once the cache holds a change, wakes the pod's job up (`job` is the
/// job's resource). Returns the task that runs the watch and the jobs to wake: a pod's changes
/// reach its job at most once per [`POD_BATCH`] (as the Job controller of Kubernetes batches
/// them), so a gang of eight starting costs a few passes, not dozens.
pub(super) fn worker_pods(
    client: &Client,
    namespace: Option<&str>,
    cache: Arc<PodCache>,
    job: ApiResource,
) -> (
    impl Future<Output = ()> + Send + 'static,
    impl Stream<Item = ObjectRef<DynamicObject>> + Send + 'static,
) {
    let owned = watcher::Config::default().labels(&format!(
        "{}={}",
        labels::MANAGED_BY,
        operator::FIELD_MANAGER
    ));
    let changed = lean_pods(scoped::<LeanPod>(client, namespace), owned)
        .default_backoff()
        .inspect_ok(move |ev| cache.apply(ev))
        .touched_objects()
        .filter_map(move |pod| {
            let owner = pod.ok().and_then(|p| owning_job(&p, &job));
            async move { owner }
        });
    let (triggers, batched) = futures::channel::mpsc::unbounded();
    (batch(changed, POD_BATCH, triggers), batched)
}

/// The objects of kind `K` in `namespace`, or in every namespace.
fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as kube::Resource>::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs the admission queue again, a moment after `capacity` was freed, while any job waits.
pub(super) async fn admission_queue(capacity: Arc<Notify>, admitter: Arc<Admitter>) {
    loop {
        capacity.notified().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        if admitter.has_waiting() {
            admitter.run_queue();
        }
    }
}

/// The operator's Kueue Workloads (by the operator's label), cached, and the jobs whose
/// Workloads changed (Kueue reserved quota, admitted, evicted them). While Kueue's API is not
/// served (or the operator may not read it) the watch is retried with backoff, the cache never
/// becomes ready, and reconcile reads the Workload itself; a job of the Kueue policy learns
/// that from its own write (`GangApiMissing`).
pub(super) fn kueue_workloads(
    client: &Client,
    namespace: Option<&str>,
    job: ApiResource,
) -> (
    Store<DynamicObject>,
    impl Stream<Item = ObjectRef<DynamicObject>> + Send + 'static,
) {
    let ar = crate::kueue::workload_resource();
    let api = match namespace {
        Some(ns) => Api::<DynamicObject>::namespaced_with(client.clone(), ns, &ar),
        None => Api::<DynamicObject>::all_with(client.clone(), &ar),
    };
    let owned = watcher::Config::default().labels(&format!(
        "{}={}",
        labels::MANAGED_BY,
        operator::FIELD_MANAGER
    ));
    let writer = reflector::store::Writer::<DynamicObject>::new(ar.clone());
    let store = writer.as_reader();
    let changes = reflector(
        writer,
        watcher(api, owned).modify(|w| w.managed_fields_mut().clear()),
    )
    .default_backoff()
    .touched_objects()
    .filter_map(move |w| {
        let owner = w.ok().and_then(|w| owning_job(&w, &job));
        async move { owner }
    });
    (store, changes)
}

/// The ParallelJob a pod's change concerns: the one that controls it; for a pod no object
/// controls (orphaned by a job deleted with `--cascade=orphan`), the job of its name label, which
/// waits for it to go when it has the name of one of its ranks.
fn owning_job(pod: &impl ResourceExt, ar: &ApiResource) -> Option<ObjectRef<DynamicObject>> {
    let controller = pod
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true));
    let name = match controller {
        Some(o) if o.kind == ar.kind && o.api_version == ar.api_version => &o.name,
        Some(_) => return None,
        None => pod.labels().get(labels::JOB_NAME)?,
    };
    Some(ObjectRef::new_with(name, ar.clone()).within(&pod.namespace()?))
}

/// Forwards what `input` yields to `output`, each item once per `period` at most: an item is
/// held until the end of the period it arrived in, and repeats within it are merged.
async fn batch<T: Eq + std::hash::Hash>(
    input: impl Stream<Item = T>,
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

/// The watch of `api`'s pods, read without their `managedFields`: both pod watches see every
/// change of every pod, and decoding the managed fields (which nothing here reads) took a tenth
/// of the operator's CPU while 4,000 pods started (`bench/results/operator-perf-1000-nodes-*`).
fn lean_pods(
    api: Api<LeanPod>,
    config: watcher::Config,
) -> impl Stream<Item = watcher::Result<watcher::Event<Pod>>> + Send + 'static {
    watcher(api, config).map_ok(|ev| match ev {
        watcher::Event::Apply(p) => watcher::Event::Apply(p.0),
        watcher::Event::Delete(p) => watcher::Event::Delete(p.0),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(p) => watcher::Event::InitApply(p.0),
        watcher::Event::InitDone => watcher::Event::InitDone,
    })
}

/// A pod as the API server sends it, decoded without its `managedFields` (skipped, not parsed
/// into values); everything else is the pod's.
#[derive(Clone, Debug)]
struct LeanPod(Pod);

impl kube::Resource for LeanPod {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(dt: &()) -> std::borrow::Cow<'_, str> {
        Pod::kind(dt)
    }
    fn group(dt: &()) -> std::borrow::Cow<'_, str> {
        Pod::group(dt)
    }
    fn version(dt: &()) -> std::borrow::Cow<'_, str> {
        Pod::version(dt)
    }
    fn plural(dt: &()) -> std::borrow::Cow<'_, str> {
        Pod::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.0.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.0.metadata
    }
}

impl<'de> serde::Deserialize<'de> for LeanPod {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// The pod's fields (apiVersion and kind are known).
        #[derive(serde::Deserialize)]
        struct Wire {
            #[serde(default)]
            metadata: LeanMeta,
            spec: Option<PodSpec>,
            status: Option<PodStatus>,
        }
        /// Every field of `ObjectMeta` but `managedFields`, which serde skips unread.
        #[derive(serde::Deserialize, Default)]
        #[serde(rename_all = "camelCase", default)]
        struct LeanMeta {
            annotations: Option<BTreeMap<String, String>>,
            creation_timestamp: Option<Time>,
            deletion_grace_period_seconds: Option<i64>,
            deletion_timestamp: Option<Time>,
            finalizers: Option<Vec<String>>,
            generate_name: Option<String>,
            generation: Option<i64>,
            labels: Option<BTreeMap<String, String>>,
            name: Option<String>,
            namespace: Option<String>,
            owner_references: Option<Vec<OwnerReference>>,
            resource_version: Option<String>,
            self_link: Option<String>,
            uid: Option<String>,
        }
        let w = Wire::deserialize(d)?;
        let m = w.metadata;
        Ok(LeanPod(Pod {
            metadata: ObjectMeta {
                annotations: m.annotations,
                creation_timestamp: m.creation_timestamp,
                deletion_grace_period_seconds: m.deletion_grace_period_seconds,
                deletion_timestamp: m.deletion_timestamp,
                finalizers: m.finalizers,
                generate_name: m.generate_name,
                generation: m.generation,
                labels: m.labels,
                managed_fields: None,
                name: m.name,
                namespace: m.namespace,
                owner_references: m.owner_references,
                resource_version: m.resource_version,
                self_link: m.self_link,
                uid: m.uid,
            },
            spec: w.spec,
            status: w.status,
        }))
    }
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
        *st = PodStatus {
            phase: st.phase.take(),
            ..Default::default()
        };
    }
}

#[cfg(test)]
mod tests {
    use super::{GpuNodes, batch};
    use k8s_openapi::api::core::v1::Node;
    use kube::runtime::watcher::Event;

    fn node(name: &str, gpus: &str, cordoned: bool) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"unschedulable": cordoned},
            "status": {"allocatable": {"cpu": "64", "nvidia.com/gpu": gpus}}
        }))
        .unwrap()
    }

    #[test]
    fn a_lean_pod_is_the_pod_without_its_managed_fields() {
        use super::LeanPod;
        use k8s_openapi::api::core::v1::Pod;
        // Every field of the metadata set: one the lean decoding dropped would differ.
        let sent = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "annotations": {"a": "1"},
                "creationTimestamp": "2026-12-04T10:00:00Z",
                "deletionGracePeriodSeconds": 30,
                "deletionTimestamp": "2026-12-04T10:05:00Z",
                "finalizers": ["f"],
                "generateName": "j-",
                "generation": 2,
                "labels": {"app.kubernetes.io/managed-by": "lockstep-operator"},
                "managedFields": [{
                    "manager": "kubelet",
                    "operation": "Update",
                    "apiVersion": "v1",
                    "time": "2026-12-04T10:00:01Z",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:status": {"f:phase": {}, "f:conditions": {".": {}}}},
                    "subresource": "status"
                }],
                "name": "j-0",
                "namespace": "ns",
                "ownerReferences": [{
                    "apiVersion": "lockstep.dev/v1alpha1",
                    "kind": "ParallelJob",
                    "name": "j",
                    "uid": "u",
                    "controller": true
                }],
                "resourceVersion": "42",
                "selfLink": "/api/v1/namespaces/ns/pods/j-0",
                "uid": "p"
            },
            "spec": {
                "nodeName": "node-1",
                "schedulingGates": [{"name": "lockstep.dev/gang"}],
                "containers": [{"name": "worker", "image": "w", "env": [{"name": "X", "value": "1"}]}]
            },
            "status": {"phase": "Running", "podIP": "10.0.0.1"}
        });
        let lean: LeanPod = serde_json::from_value(sent.clone()).unwrap();
        let mut full: Pod = serde_json::from_value(sent).unwrap();
        assert!(full.metadata.managed_fields.is_some());
        full.metadata.managed_fields = None;
        assert_eq!(lean.0, full);
        // As a watch event carries it, and with no metadata at all.
        let event: kube::api::WatchEvent<LeanPod> = serde_json::from_value(serde_json::json!({
            "type": "MODIFIED",
            "object": {"metadata": {"name": "j-1", "managedFields": []}, "spec": {"containers": []}}
        }))
        .unwrap();
        let kube::api::WatchEvent::Modified(p) = event else {
            panic!("{event:?}")
        };
        assert_eq!(
            (p.0.metadata.name.as_deref(), p.0.metadata.managed_fields),
            (Some("j-1"), None)
        );
        let bare: LeanPod = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(bare.0, Pod::default());
    }

    #[test]
    fn the_largest_gpu_node_follows_the_node_watch() {
        let g = GpuNodes::default();
        assert_eq!(g.largest(), 0, "no node yet");
        g.apply(&Event::Init);
        g.apply(&Event::InitApply(node("a", "8", false)));
        g.apply(&Event::InitApply(node("b", "4", false)));
        g.apply(&Event::InitApply(node("c", "16", true)));
        assert_eq!(g.largest(), 0, "not before the list is complete");
        g.apply(&Event::InitDone);
        assert_eq!(g.largest(), 8, "a cordoned node offers nothing");
        g.apply(&Event::Apply(node("b", "16", false)));
        assert_eq!(g.largest(), 16);
        g.apply(&Event::Apply(node("b", "16", true)));
        assert_eq!(g.largest(), 8, "b cordoned");
        g.apply(&Event::Apply(node("a", "2", false)));
        assert_eq!(g.largest(), 2, "a shrank");
        g.apply(&Event::Delete(node("a", "2", false)));
        assert_eq!(g.largest(), 0, "a gone");
        // A relist replaces every node: b is back uncordoned, a stays gone.
        g.apply(&Event::Init);
        g.apply(&Event::InitApply(node("b", "4", false)));
        g.apply(&Event::InitDone);
        assert_eq!(g.largest(), 4);
    }
    use futures::StreamExt;
    use std::time::Duration;

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
}
