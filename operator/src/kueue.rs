//! Kueue, integrated the way an operator in another language integrates (as Apache's Spark
//! operator does): the operator writes the job's `kueue.x-k8s.io/v1beta2` Workload itself and
//! plays the part of Kueue's job framework. No webhook, no Go code.
//!
//! - The Workload is owned by the job and named after it: one pod set of `world` pods with the
//!   template of the ranks' pods, the queue (the `kueue.x-k8s.io/queue-name` label, else
//!   `spec.scheduling.queue`, else Kueue's `default` LocalQueue), the PriorityClass and its value
//!   (Kueue's webhook would fill that in; there is none), a topology request from
//!   `spec.scheduling.topology`, and `active` following `spec.runPolicy.suspend`.
//! - No pod exists until Kueue admits the Workload; then the pods get the node labels and
//!   tolerations of the ResourceFlavors Kueue assigned, and the admission checks' pod-set updates.
//! - The operator reports `PodsReady` (every rank running; False, WaitForRecovery, while the gang
//!   restarts), clears the quota reservation once an evicted gang's pods are gone (as the job
//!   framework does: `QuotaReserved=False`, reason Pending, and `Requeued`), and sets `Finished`.
//! - A change of the spec while the Workload waits makes a new one: the Workload carries a hash of
//!   what the job asks of Kueue, and one whose hash differs is deleted and written again.
//!
//! Everything here is pure: [`WorkloadView::read`] reads what reconcile fetched, the decision
//! ([`crate::decide`]) says what to write, and [`status_patch`] builds the status writes.

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;
use lockstep_api::ParallelJob;
use lockstep_api::spec::{GangPolicy, TopologyMode};
use serde_json::{Value, json};

/// Kueue's API group.
pub const GROUP: &str = "kueue.x-k8s.io";
/// The version of Kueue's API the operator writes.
pub const VERSION: &str = "v1beta2";
/// The Workload kind.
pub const KIND: &str = "Workload";
/// The Workload resource.
pub const PLURAL: &str = "workloads";
/// The label that puts a job into a Kueue LocalQueue.
pub const QUEUE_NAME_LABEL: &str = "kueue.x-k8s.io/queue-name";
/// The LocalQueue of a Kueue job that names none (Kueue's own default queue name).
pub const DEFAULT_QUEUE: &str = "default";
/// The name of the Workload's one pod set.
pub const POD_SET: &str = "workers";
/// The annotation with the hash of what the job asks of Kueue.
pub const SPEC_HASH_ANNOTATION: &str = "lockstep.dev/workload-spec-hash";
/// The annotation the operator sets on a Workload it deactivates for the job's suspension (and
/// removes when it activates it again): a Workload Kueue (or a person) deactivated is not the
/// operator's to activate.
pub const SUSPENDED_ANNOTATION: &str = "lockstep.dev/deactivated-for-suspend";
/// The scheduling gate Kueue's topology-aware scheduling holds a pod with until it has picked
/// the pod's domain (its topology ungater removes it and sets the node selector).
pub const TOPOLOGY_GATE: &str = "kueue.x-k8s.io/topology";
/// The label that names a pod's pod set, which the topology ungater lists pods by.
pub const POD_SET_LABEL: &str = "kueue.x-k8s.io/podset";
/// The label of pods placed by topology-aware scheduling.
pub const TAS_LABEL: &str = "kueue.x-k8s.io/tas";
/// The annotation that names a pod's Workload, which the topology ungater finds pods by.
pub const WORKLOAD_ANNOTATION: &str = "kueue.x-k8s.io/workload";
/// The field manager of the operator's writes to a Workload's status (Kueue's job framework
/// writes them under its own name too).
pub const STATUS_MANAGER: &str = "lockstep-operator-kueue";

/// The Workload resource, for the API client.
pub fn workload_resource() -> kube::api::ApiResource {
    let gvk = kube::api::GroupVersionKind::gvk(GROUP, VERSION, KIND);
    kube::api::ApiResource::from_gvk_with_plural(&gvk, PLURAL)
}

/// The gang policy a job is reconciled under: `gangPolicy: Kueue`, or a job labelled
/// `kueue.x-k8s.io/queue-name` whose `gangPolicy` is left at Builtin. `Err` names the conflict
/// when the label is set on a job that asks for another external gang scheduler.
pub fn effective_policy(job: &ParallelJob) -> Result<GangPolicy, String> {
    let policy = job.spec.scheduling.gang_policy;
    let labelled = queue_label(job).is_some();
    match policy {
        GangPolicy::Builtin if labelled => Ok(GangPolicy::Kueue),
        GangPolicy::Workload | GangPolicy::Coscheduling | GangPolicy::Volcano if labelled => {
            Err(format!(
                "the job is labelled {QUEUE_NAME_LABEL}, which hands it to Kueue, and \
                 spec.scheduling.gangPolicy is {policy:?}: remove the label, or set gangPolicy \
                 to Kueue (or leave it out)"
            ))
        }
        p => Ok(p),
    }
}

/// Makes the job's `gangPolicy` the one it is reconciled under (see [`effective_policy`]), so
/// that every reader of the job sees one policy; a conflict leaves it as written and is
/// returned.
pub fn normalize(job: &mut ParallelJob) -> Option<String> {
    match effective_policy(job) {
        Ok(p) => {
            job.spec.scheduling.gang_policy = p;
            None
        }
        Err(conflict) => Some(conflict),
    }
}

fn queue_label(job: &ParallelJob) -> Option<&str> {
    job.metadata
        .labels
        .as_ref()?
        .get(QUEUE_NAME_LABEL)
        .map(String::as_str)
        .filter(|q| !q.is_empty())
}

/// The LocalQueue of a Kueue job.
pub fn queue_name(job: &ParallelJob) -> String {
    queue_label(job)
        .or(job.spec.scheduling.queue.as_deref())
        .unwrap_or(DEFAULT_QUEUE)
        .to_string()
}

/// The spec of the job's Workload: one pod set of `world` pods with `template` (a rank's pod
/// template: metadata and spec), its queue, priority (`priority`: the PriorityClass's value,
/// when the job names one that exists) and topology request; `active` unless the job is
/// suspended.
pub fn workload_spec(
    job: &ParallelJob,
    world: u32,
    template: Value,
    priority: Option<i32>,
) -> Value {
    let sched = &job.spec.scheduling;
    let mut pod_set = json!({"name": POD_SET, "count": world, "template": template});
    if let Some(t) = &sched.topology {
        let mode = match t.mode {
            TopologyMode::Required => "required",
            TopologyMode::Preferred => "preferred",
        };
        pod_set["topologyRequest"] = json!({ mode: t.key });
    }
    let mut spec = json!({
        "queueName": queue_name(job),
        "podSets": [pod_set],
        "active": !job.spec.run_policy.suspend,
    });
    if let (Some(pc), Some(value)) = (&sched.priority_class_name, priority) {
        spec["priorityClassRef"] =
            json!({"group": "scheduling.k8s.io", "kind": "PriorityClass", "name": pc});
        spec["priority"] = value.into();
    }
    spec
}

/// The hash of what a Workload `spec` asks of Kueue (all of it but `active`, which follows
/// suspension on the same Workload): FNV-1a over its JSON, in hex.
pub fn spec_hash(spec: &Value) -> String {
    let mut asked = spec.clone();
    if let Some(o) = asked.as_object_mut() {
        o.remove("active");
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in asked.to_string().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// What the pods of an admitted Workload get on top of the job's template: the node labels and
/// tolerations of the flavors Kueue assigned, and the admission checks' pod-set updates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodSetUpdate {
    /// Merged into the pods' node selector.
    pub node_selector: BTreeMap<String, String>,
    /// Added to the pods' tolerations (each a `Toleration` as JSON).
    pub tolerations: Vec<Value>,
    /// Merged into the pods' labels.
    pub labels: BTreeMap<String, String>,
    /// Merged into the pods' annotations.
    pub annotations: BTreeMap<String, String>,
    /// Added to the pods' scheduling gates.
    pub scheduling_gates: Vec<String>,
}

impl PodSetUpdate {
    fn merge(&mut self, update: &Value) {
        let map = |v: &Value| -> BTreeMap<String, String> {
            v.as_object()
                .map(|o| {
                    o.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                        .collect()
                })
                .unwrap_or_default()
        };
        self.node_selector.extend(map(&update["nodeSelector"]));
        self.labels.extend(map(&update["labels"]));
        self.annotations.extend(map(&update["annotations"]));
        for t in update["tolerations"].as_array().into_iter().flatten() {
            if !self.tolerations.contains(t) {
                self.tolerations.push(t.clone());
            }
        }
    }
}

impl PodSetUpdate {
    /// Puts this on a rank's pod: node selector, labels and annotations merged (these win), the
    /// tolerations added.
    pub fn apply(
        &self,
        pod: &mut k8s_openapi::api::core::v1::Pod,
    ) -> Result<(), serde_json::Error> {
        let meta = &mut pod.metadata;
        meta.labels
            .get_or_insert_with(Default::default)
            .extend(self.labels.clone());
        if !self.annotations.is_empty() {
            meta.annotations
                .get_or_insert_with(Default::default)
                .extend(self.annotations.clone());
        }
        let spec = pod.spec.get_or_insert_with(Default::default);
        for g in &self.scheduling_gates {
            let gates = spec.scheduling_gates.get_or_insert_with(Vec::new);
            if !gates.iter().any(|x| &x.name == g) {
                gates.push(k8s_openapi::api::core::v1::PodSchedulingGate { name: g.clone() });
            }
        }
        if !self.node_selector.is_empty() {
            spec.node_selector
                .get_or_insert_with(Default::default)
                .extend(self.node_selector.clone());
        }
        for t in &self.tolerations {
            let t: k8s_openapi::api::core::v1::Toleration = serde_json::from_value(t.clone())?;
            let tolerations = spec.tolerations.get_or_insert_with(Vec::new);
            if !tolerations.contains(&t) {
                tolerations.push(t);
            }
        }
        Ok(())
    }
}

/// What the operator reads of the job's Workload.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorkloadView {
    /// It was written for the job's current spec (its hash annotation matches).
    pub current: bool,
    /// `spec.active`.
    pub active: bool,
    /// The operator deactivated it, for the job's suspension ([`SUSPENDED_ANNOTATION`]).
    pub deactivated_for_suspend: bool,
    /// `QuotaReserved=True`: Kueue has reserved quota for it.
    pub reserved: bool,
    /// `Admitted=True`: reserved, and every admission check passed.
    pub admitted: bool,
    /// `Evicted=True`: its reason and message.
    pub evicted: Option<(String, String)>,
    /// Why it waits, from `QuotaReserved=False`: Kueue's reason and message.
    pub waiting: Option<(String, String)>,
    /// `PodsReady`, when reported.
    pub pods_ready: Option<bool>,
    /// `Finished=True`.
    pub finished: bool,
    /// The ClusterQueue it is admitted to.
    pub cluster_queue: Option<String>,
    /// The flavor assigned to each resource of the pod set, as `resource=flavor`.
    pub flavors: Vec<(String, String)>,
    /// What the admitted pods get (filled in by [`Self::place`]).
    pub update: PodSetUpdate,
}

fn condition<'a>(obj: &'a Value, type_: &str) -> Option<&'a Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

fn is_true(obj: &Value, type_: &str) -> bool {
    condition(obj, type_).is_some_and(|c| c["status"] == "True")
}

fn text(c: &Value, field: &str) -> String {
    c[field].as_str().unwrap_or_default().to_string()
}

impl WorkloadView {
    /// Reads a Workload (as JSON); `hash` is the [`spec_hash`] the job's current spec gives.
    pub fn read(obj: &Value, hash: &str) -> WorkloadView {
        let evicted = condition(obj, "Evicted")
            .filter(|c| c["status"] == "True")
            .map(|c| (text(c, "reason"), text(c, "message")));
        let waiting = condition(obj, "QuotaReserved")
            .filter(|c| c["status"] == "False")
            .map(|c| (text(c, "reason"), text(c, "message")));
        let admission = &obj["status"]["admission"];
        let mut flavors: Vec<(String, String)> = admission["podSetAssignments"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["name"] == POD_SET)
            .filter_map(|a| a["flavors"].as_object())
            .flatten()
            .filter_map(|(r, f)| Some((r.clone(), f.as_str()?.to_string())))
            .collect();
        flavors.sort();
        let mut update = PodSetUpdate::default();
        let assignment = admission["podSetAssignments"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["name"] == POD_SET);
        if assignment.is_some_and(|a| !a["topologyAssignment"].is_null()) {
            // Topology-aware scheduling chose the domains: the pods wait behind Kueue's gate,
            // marked so that its ungater finds them and gives each its domain.
            update.scheduling_gates.push(TOPOLOGY_GATE.into());
            update.labels.insert(POD_SET_LABEL.into(), POD_SET.into());
            update.labels.insert(TAS_LABEL.into(), "true".into());
            if let Some(name) = obj["metadata"]["name"].as_str() {
                update
                    .annotations
                    .insert(WORKLOAD_ANNOTATION.into(), name.into());
            }
            let request = obj["spec"]["podSets"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["name"] == POD_SET)
                .map(|p| p["topologyRequest"].clone())
                .unwrap_or_default();
            for (field, annotation) in [
                ("required", "kueue.x-k8s.io/podset-required-topology"),
                ("preferred", "kueue.x-k8s.io/podset-preferred-topology"),
            ] {
                if let Some(level) = request[field].as_str() {
                    update.annotations.insert(annotation.into(), level.into());
                }
            }
        }
        for check in obj["status"]["admissionChecks"]
            .as_array()
            .into_iter()
            .flatten()
        {
            for u in check["podSetUpdates"].as_array().into_iter().flatten() {
                if u["name"] == POD_SET {
                    update.merge(u);
                }
            }
        }
        WorkloadView {
            current: obj["metadata"]["annotations"][SPEC_HASH_ANNOTATION] == hash,
            active: obj["spec"]["active"].as_bool().unwrap_or(true),
            deactivated_for_suspend: obj["metadata"]["annotations"][SUSPENDED_ANNOTATION] == "true",
            reserved: is_true(obj, "QuotaReserved"),
            admitted: is_true(obj, "Admitted"),
            evicted,
            waiting,
            pods_ready: condition(obj, "PodsReady").map(|c| c["status"] == "True"),
            finished: is_true(obj, "Finished"),
            cluster_queue: admission["clusterQueue"].as_str().map(str::to_string),
            flavors,
            update,
        }
    }

    /// The distinct flavors assigned, in order.
    pub fn flavor_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.flavors.iter().map(|(_, f)| f.clone()).collect();
        names.sort();
        names.dedup();
        names
    }

    /// Adds what the assigned ResourceFlavors (`flavors`: each flavor's name and `spec`) put on
    /// the pods: their node labels and tolerations. The admission checks' updates, read before,
    /// win over the flavors' labels where both set one key.
    pub fn place(&mut self, flavors: &[(String, Value)]) {
        let checks = std::mem::take(&mut self.update);
        for (_, spec) in flavors {
            self.update.merge(&json!({
                "nodeSelector": spec["nodeLabels"],
                "tolerations": spec["tolerations"],
            }));
        }
        self.update.node_selector.extend(checks.node_selector);
        self.update.labels.extend(checks.labels);
        self.update.annotations.extend(checks.annotations);
        self.update.scheduling_gates = checks.scheduling_gates;
        for t in checks.tolerations {
            if !self.update.tolerations.contains(&t) {
                self.update.tolerations.push(t);
            }
        }
    }

    /// Says where Kueue admitted it: `ClusterQueue q (flavors a, b)`.
    pub fn describe_admission(&self) -> String {
        let queue = self.cluster_queue.as_deref().unwrap_or("?");
        let flavors = self.flavor_names();
        if flavors.is_empty() {
            format!("ClusterQueue {queue}")
        } else {
            format!("ClusterQueue {queue} (flavor {})", flavors.join(", "))
        }
    }
}

/// A write to the Workload's status that the job framework makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StatusUpdate {
    /// `PodsReady`: every rank runs (True, reason Started or Recovered), or not any more (False,
    /// WaitForRecovery).
    PodsReady(bool),
    /// The evicted gang's pods are gone: the quota reservation is cleared (`QuotaReserved=False`,
    /// reason Pending, with the eviction's message; `Admitted=False`), and `Requeued` says whether
    /// it goes back to the queue at once (True after a preemption, as Kueue's job framework).
    Release {
        /// The eviction's reason.
        reason: String,
        /// The eviction's message.
        message: String,
    },
    /// `Finished=True`: the job succeeded or failed, with its message.
    Finished {
        /// Whether it succeeded.
        succeeded: bool,
        /// What happened.
        message: String,
    },
}

fn set_condition(
    conds: &mut Vec<Value>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    now: &str,
    generation: &Value,
) {
    let status = if status { "True" } else { "False" };
    if let Some(c) = conds.iter_mut().find(|c| c["type"] == type_) {
        if c["status"] != status {
            c["lastTransitionTime"] = now.into();
        }
        c["status"] = status.into();
        c["reason"] = reason.into();
        c["message"] = message.into();
        c["observedGeneration"] = generation.clone();
    } else {
        conds.push(json!({
            "type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": now, "observedGeneration": generation,
        }));
    }
}

/// The merge patch of a Workload that makes it `active` (and says whether the operator
/// deactivated it for a suspension): only `spec.active` and the annotation, never what Kueue
/// admitted (a changed queue, priority or pod set of a Workload that holds quota is refused).
pub fn active_patch(active: bool) -> Value {
    let mark = if active { Value::Null } else { "true".into() };
    json!({
        "metadata": {"annotations": {SUSPENDED_ANNOTATION: mark}},
        "spec": {"active": active},
    })
}

/// The merge patch of the Workload `obj`'s status that makes `update` at `now`: the whole list
/// of conditions (a merge patch replaces a list), and the `resourceVersion` read, so that a
/// Workload Kueue changed since is not overwritten (the write fails with 409 and the next pass
/// reads again). `None` when the status says so already.
pub fn status_patch(obj: &Value, update: &StatusUpdate, now: Timestamp) -> Option<Value> {
    let now = now.to_string();
    let generation = obj["metadata"]["generation"].clone();
    let mut conds: Vec<Value> = obj["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let before = conds.clone();
    let mut status = json!({});
    match update {
        StatusUpdate::PodsReady(true) => {
            let recovering = condition(obj, "PodsReady")
                .is_some_and(|c| c["reason"] == "WaitForRecovery" || c["reason"] == "Recovered");
            let reason = if recovering { "Recovered" } else { "Started" };
            let message = "All pods reached readiness and the workload is running";
            set_condition(
                &mut conds,
                "PodsReady",
                true,
                reason,
                message,
                &now,
                &generation,
            );
        }
        StatusUpdate::PodsReady(false) => {
            let message = "At least one pod has failed, waiting for recovery";
            set_condition(
                &mut conds,
                "PodsReady",
                false,
                "WaitForRecovery",
                message,
                &now,
                &generation,
            );
        }
        StatusUpdate::Release { reason, message } => {
            if !obj["status"]["admission"].is_null() {
                status["admission"] = Value::Null;
            }
            let requeued = reason == "Preempted" || reason == "NodeFailures";
            set_condition(
                &mut conds,
                "Requeued",
                requeued,
                reason,
                message,
                &now,
                &generation,
            );
            set_condition(
                &mut conds,
                "QuotaReserved",
                false,
                "Pending",
                message,
                &now,
                &generation,
            );
            set_condition(
                &mut conds,
                "Admitted",
                false,
                "NoReservation",
                "The workload has no reservation",
                &now,
                &generation,
            );
            // Not ready any more: a readmitted gang is waited for from its start, not from its
            // recovery (Kueue does not reset this itself).
            if condition(obj, "PodsReady").is_some() {
                let message = "Not all pods are ready or succeeded";
                set_condition(
                    &mut conds,
                    "PodsReady",
                    false,
                    "WaitForStart",
                    message,
                    &now,
                    &generation,
                );
            }
        }
        StatusUpdate::Finished { succeeded, message } => {
            let reason = if *succeeded { "Succeeded" } else { "Failed" };
            set_condition(
                &mut conds,
                "Finished",
                true,
                reason,
                message,
                &now,
                &generation,
            );
        }
    }
    // Only what changes: the times of conditions that keep their status stay as they were.
    let same = |a: &Value, b: &Value| {
        a["type"] == b["type"]
            && a["status"] == b["status"]
            && a["reason"] == b["reason"]
            && a["message"] == b["message"]
    };
    let unchanged =
        conds.len() == before.len() && conds.iter().zip(&before).all(|(a, b)| same(a, b));
    if unchanged && status.as_object().is_some_and(|o| o.is_empty()) {
        return None;
    }
    status["conditions"] = Value::Array(conds);
    Some(json!({
        "metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]},
        "status": status,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(labels: &[(&str, &str)], extra: Value) -> ParallelJob {
        let text = std::fs::read_to_string(format!(
            "{}/../examples/ddp-digits.yaml",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        let mut j = lockstep_api::validation::validate_yaml(&text).unwrap();
        j.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        let mut spec = serde_json::to_value(&j.spec).unwrap();
        if let Some(o) = extra.as_object() {
            for (k, v) in o {
                spec["scheduling"][k] = v.clone();
            }
        }
        j.spec = serde_json::from_value(spec).unwrap();
        j
    }

    #[test]
    fn the_queue_label_makes_a_job_kueues_and_conflicts_with_another_gang_scheduler() {
        let plain = job(&[], json!({}));
        assert_eq!(effective_policy(&plain), Ok(GangPolicy::Builtin));
        let labelled = job(&[(QUEUE_NAME_LABEL, "team-a")], json!({}));
        assert_eq!(effective_policy(&labelled), Ok(GangPolicy::Kueue));
        assert_eq!(queue_name(&labelled), "team-a");
        let mut normalized = labelled.clone();
        assert_eq!(normalize(&mut normalized), None);
        assert_eq!(normalized.spec.scheduling.gang_policy, GangPolicy::Kueue);
        let asked = job(&[], json!({"gangPolicy": "Kueue", "queue": "team-b"}));
        assert_eq!(effective_policy(&asked), Ok(GangPolicy::Kueue));
        assert_eq!(queue_name(&asked), "team-b");
        let label_wins = job(&[(QUEUE_NAME_LABEL, "team-a")], json!({"queue": "team-b"}));
        assert_eq!(queue_name(&label_wins), "team-a");
        assert_eq!(
            queue_name(&job(&[], json!({"gangPolicy": "Kueue"}))),
            DEFAULT_QUEUE
        );
        let conflict = job(&[(QUEUE_NAME_LABEL, "q")], json!({"gangPolicy": "Volcano"}));
        let err = effective_policy(&conflict).unwrap_err();
        assert!(
            err.contains("gangPolicy is Volcano") && err.contains(QUEUE_NAME_LABEL),
            "{err}"
        );
        let mut untouched = conflict.clone();
        assert!(normalize(&mut untouched).is_some());
        assert_eq!(untouched.spec.scheduling.gang_policy, GangPolicy::Volcano);
    }

    #[test]
    fn the_workload_spec_has_one_pod_set_its_queue_priority_and_topology() {
        let j = job(
            &[(QUEUE_NAME_LABEL, "team-a")],
            json!({"priorityClassName": "high", "topology": {"key": "rack", "mode": "Required"}}),
        );
        let template = json!({"spec": {"containers": [{"name": "worker"}]}});
        let spec = workload_spec(&j, 6, template.clone(), Some(1000));
        assert_eq!(spec["queueName"], "team-a");
        assert_eq!(spec["active"], true);
        assert_eq!(spec["podSets"][0]["name"], POD_SET);
        assert_eq!(spec["podSets"][0]["count"], 6);
        assert_eq!(spec["podSets"][0]["template"], template);
        assert_eq!(
            spec["podSets"][0]["topologyRequest"],
            json!({"required": "rack"})
        );
        assert_eq!(spec["priorityClassRef"]["name"], "high");
        assert_eq!(spec["priority"], 1000);
        // A class that does not exist: no priority (Kueue's CRD requires one with the ref).
        let spec = workload_spec(&j, 6, template.clone(), None);
        assert!(spec.get("priorityClassRef").is_none() && spec.get("priority").is_none());
        // Suspension changes `active` only; the hash stays, and changes with what Kueue admits.
        let mut suspended = j.clone();
        suspended.spec.run_policy.suspend = true;
        let a = workload_spec(&j, 6, template.clone(), Some(1000));
        let b = workload_spec(&suspended, 6, template.clone(), Some(1000));
        assert_eq!(b["active"], false);
        assert_eq!(spec_hash(&a), spec_hash(&b));
        assert_ne!(
            spec_hash(&a),
            spec_hash(&workload_spec(&j, 8, template, Some(1000)))
        );
    }

    /// A Workload as Kueue v0.17 leaves it once admitted, with an admission check's update.
    fn admitted() -> Value {
        json!({
            "metadata": {"name": "j", "generation": 1, "resourceVersion": "42",
                         "annotations": {SPEC_HASH_ANNOTATION: "h"}},
            "spec": {"active": true},
            "status": {
                "admission": {"clusterQueue": "team", "podSetAssignments": [{
                    "name": POD_SET, "count": 4,
                    "flavors": {"cpu": "default", "nvidia.com/gpu": "a100"},
                }]},
                "admissionChecks": [{"name": "prov", "state": "Ready", "podSetUpdates": [{
                    "name": POD_SET, "nodeSelector": {"zone": "b"},
                    "annotations": {"check": "done"},
                }]}],
                "conditions": [
                    {"type": "QuotaReserved", "status": "True", "reason": "QuotaReserved", "message": "Quota reserved in ClusterQueue team", "lastTransitionTime": "2026-01-01T00:00:00Z"},
                    {"type": "Admitted", "status": "True", "reason": "Admitted", "message": "The workload is admitted", "lastTransitionTime": "2026-01-01T00:00:00Z"},
                ],
            },
        })
    }

    #[test]
    fn an_admitted_workload_reads_with_its_flavors_and_their_node_labels_and_tolerations() {
        let mut v = WorkloadView::read(&admitted(), "h");
        assert!(v.current && v.active && v.reserved && v.admitted);
        assert_eq!(v.evicted, None);
        assert_eq!(v.flavor_names(), ["a100", "default"]);
        assert_eq!(
            v.describe_admission(),
            "ClusterQueue team (flavor a100, default)"
        );
        v.place(&[
            (
                "a100".into(),
                json!({"nodeLabels": {"gpu": "a100", "zone": "a"},
                "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]}),
            ),
            ("default".into(), json!({})),
        ]);
        assert_eq!(v.update.node_selector["gpu"], "a100");
        assert_eq!(
            v.update.node_selector["zone"], "b",
            "the admission check's update wins"
        );
        assert_eq!(v.update.annotations["check"], "done");
        assert_eq!(v.update.tolerations.len(), 1);
        let mut pod = k8s_openapi::api::core::v1::Pod::default();
        v.update.apply(&mut pod).unwrap();
        let spec = pod.spec.unwrap();
        assert_eq!(spec.node_selector.unwrap()["gpu"], "a100");
        assert_eq!(spec.tolerations.unwrap()[0].key.as_deref(), Some("gpu"));
        assert!(!WorkloadView::read(&admitted(), "other").current);
    }

    #[test]
    fn a_workload_placed_by_topology_aware_scheduling_gates_its_pods_for_kueues_ungater() {
        let mut w = admitted();
        w["spec"]["podSets"] =
            json!([{"name": POD_SET, "count": 4, "topologyRequest": {"required": "rack"}}]);
        w["status"]["admission"]["podSetAssignments"][0]["topologyAssignment"] =
            json!({"levels": ["rack"], "slices": []});
        let v = WorkloadView::read(&w, "h");
        assert_eq!(v.update.scheduling_gates, [TOPOLOGY_GATE]);
        assert_eq!(v.update.labels[POD_SET_LABEL], POD_SET);
        assert_eq!(v.update.labels[TAS_LABEL], "true");
        assert_eq!(v.update.annotations[WORKLOAD_ANNOTATION], "j");
        assert_eq!(
            v.update.annotations["kueue.x-k8s.io/podset-required-topology"],
            "rack"
        );
        let mut placed = v.clone();
        placed.place(&[]);
        assert_eq!(
            placed.update.scheduling_gates,
            [TOPOLOGY_GATE],
            "kept by place()"
        );
        let mut pod = k8s_openapi::api::core::v1::Pod::default();
        placed.update.apply(&mut pod).unwrap();
        let gates = pod.spec.unwrap().scheduling_gates.unwrap();
        assert_eq!(gates[0].name, TOPOLOGY_GATE);
        // Without a topology assignment, no gate.
        assert!(
            WorkloadView::read(&admitted(), "h")
                .update
                .scheduling_gates
                .is_empty()
        );
    }

    #[test]
    fn an_evicted_or_waiting_workload_reads_with_kueues_words() {
        let mut w = admitted();
        w["status"]["conditions"].as_array_mut().unwrap().push(json!({
            "type": "Evicted", "status": "True", "reason": "Preempted", "message": "Preempted to accommodate a workload",
        }));
        let v = WorkloadView::read(&w, "h");
        assert_eq!(
            v.evicted,
            Some((
                "Preempted".into(),
                "Preempted to accommodate a workload".into()
            ))
        );
        let waiting = json!({"status": {"conditions": [{"type": "QuotaReserved", "status": "False",
            "reason": "Pending", "message": "insufficient quota"}]}});
        let v = WorkloadView::read(&waiting, "h");
        assert!(!v.reserved && !v.admitted && v.active);
        assert_eq!(
            v.waiting,
            Some(("Pending".into(), "insufficient quota".into()))
        );
    }

    #[test]
    fn status_patches_do_what_kueues_job_framework_does_and_nothing_twice() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let w = admitted();
        let p = status_patch(&w, &StatusUpdate::PodsReady(true), now).unwrap();
        assert_eq!(p["metadata"]["resourceVersion"], "42");
        let conds = p["status"]["conditions"].as_array().unwrap();
        assert_eq!(conds.len(), 3, "the others are kept");
        let ready = conds.iter().find(|c| c["type"] == "PodsReady").unwrap();
        assert_eq!(
            (ready["status"].as_str(), ready["reason"].as_str()),
            (Some("True"), Some("Started"))
        );
        // Said already: nothing to write.
        let mut after = w.clone();
        after["status"]["conditions"] = p["status"]["conditions"].clone();
        assert_eq!(
            status_patch(&after, &StatusUpdate::PodsReady(true), now),
            None
        );
        // Lost, then back: Recovered.
        let p = status_patch(&after, &StatusUpdate::PodsReady(false), now).unwrap();
        after["status"]["conditions"] = p["status"]["conditions"].clone();
        let p = status_patch(&after, &StatusUpdate::PodsReady(true), now).unwrap();
        let ready = p["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "PodsReady")
            .cloned()
            .unwrap();
        assert_eq!(ready["reason"], "Recovered");
        // An evicted gang's reservation is released, and it is requeued after a preemption;
        // its PodsReady goes back to waiting for a start.
        let release = StatusUpdate::Release {
            reason: "Preempted".into(),
            message: "m".into(),
        };
        let p = status_patch(&after, &release, now).unwrap();
        assert!(
            p["status"]["admission"].is_null()
                && p["status"].as_object().unwrap().contains_key("admission")
        );
        let by_type = |t: &str| {
            p["status"]["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == t)
                .cloned()
                .unwrap()
        };
        assert_eq!(by_type("QuotaReserved")["status"], "False");
        assert_eq!(by_type("QuotaReserved")["reason"], "Pending");
        assert_eq!(by_type("Admitted")["status"], "False");
        assert_eq!(by_type("Requeued")["status"], "True");
        assert_eq!(by_type("PodsReady")["status"], "False");
        assert_eq!(by_type("PodsReady")["reason"], "WaitForStart");
        assert_eq!(
            active_patch(false)["metadata"]["annotations"][SUSPENDED_ANNOTATION],
            "true"
        );
        assert!(active_patch(true)["metadata"]["annotations"][SUSPENDED_ANNOTATION].is_null());
        let p = status_patch(
            &w,
            &StatusUpdate::Finished {
                succeeded: false,
                message: "rank 2 failed".into(),
            },
            now,
        )
        .unwrap();
        let fin = p["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Finished")
            .cloned()
            .unwrap();
        assert_eq!(
            (
                fin["status"].as_str(),
                fin["reason"].as_str(),
                fin["message"].as_str()
            ),
            (Some("True"), Some("Failed"), Some("rank 2 failed"))
        );
    }
}
