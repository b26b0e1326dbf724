//! The `ParallelJob` resource: its spec (everything but `training`, which has its own module) and
//! the CRD attributes (names, printer columns, status subresource, whole-object CEL rules).

use k8s_openapi::api::core::v1::PodTemplateSpec;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::contract;
use crate::status::ParallelJobStatus;
use crate::training::Training;

// clippy reads the repeated `type_` keys of kube's printcolumn(...) as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
/// A distributed training job: a gang of `dataParallel x pipelineStages` worker pods that is
/// admitted all-or-nothing, finds itself through a stable rendezvous, and restarts together from
/// the last checkpoint when a rank fails.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "lockstep.dev",
    version = "v1alpha1",
    kind = "ParallelJob",
    plural = "paralleljobs",
    singular = "paralleljob",
    namespaced,
    shortname = "pj",
    shortname = "pjob",
    category = "lockstep",
    status = "ParallelJobStatus",
    derive = "PartialEq",
    doc = "A distributed training job: a gang of dataParallel x pipelineStages worker pods admitted all-or-nothing and restarted together.",
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Lifecycle phase of the job"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.ready",
        description = "Ready ranks / world size"
    ),
    printcolumn(
        name = "Step",
        type_ = "integer",
        json_path = ".status.progress.step",
        description = "Last training step reported by rank 0"
    ),
    printcolumn(
        name = "Loss",
        type_ = "number",
        json_path = ".status.progress.loss",
        description = "Last training loss reported by rank 0"
    ),
    printcolumn(
        name = "Restarts",
        type_ = "integer",
        json_path = ".status.attempt",
        description = "Gang restarts so far"
    ),
    printcolumn(
        name = "Admission",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Admitted\")].reason",
        description = "Why the gang waits, or GangAdmitted",
        priority = "1"
    ),
    printcolumn(
        name = "Position",
        type_ = "integer",
        json_path = ".status.admission.queuePosition",
        description = "Position in the admission queue while the gang waits (1 = next)",
        priority = "1"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    validation = Rule::new("size(self.metadata.name) <= 52")
        .message("metadata.name must be at most 52 characters: worker pods and their hostnames are named <name>-<rank>, and a hostname is a DNS label of at most 63")
)]
#[x_kube(validation = Rule::new(
    "self.parallelism.pipelineStages == 1 || self.training.workload in ['Pipeline', 'Command']"
).message("spec.parallelism.pipelineStages > 1 needs spec.training.workload Pipeline (or Command): set pipelineStages to 1 or change the workload").field_path(".parallelism.pipelineStages"))]
#[x_kube(validation = Rule::new(
    "self.training.workload != 'Pipeline' || self.parallelism.pipelineStages >= 2"
).message("spec.training.workload Pipeline needs spec.parallelism.pipelineStages >= 2: add stages or use workload Ddp").field_path(".parallelism.pipelineStages"))]
#[x_kube(validation = Rule::new(
    "self.training.workload != 'Pipeline' || self.training.pipeline.schedule != 'Interleaved' || self.training.pipeline.microBatches % self.parallelism.pipelineStages == 0"
).message("spec.training.pipeline.microBatches must be a multiple of spec.parallelism.pipelineStages for the Interleaved schedule (Megatron's micro-batch groups)").field_path(".training.pipeline.microBatches"))]
#[x_kube(validation = Rule::new(
    "self.training.workload != 'Pipeline' || !has(self.training.pipeline.layersPerPart) || size(self.training.pipeline.layersPerPart) == self.parallelism.pipelineStages * self.training.pipeline.chunksPerStage"
).message("spec.training.pipeline.layersPerPart needs one entry per model part: pipelineStages x chunksPerStage").field_path(".training.pipeline.layersPerPart"))]
#[x_kube(validation = Rule::new(
    "!has(self.training.pipeline.layersPerPart) || self.training.pipeline.layersPerPart.all(n, n >= 1)"
).message("spec.training.pipeline.layersPerPart: every model part needs at least one transformer block").field_path(".training.pipeline.layersPerPart"))]
#[x_kube(validation = Rule::new(
    "self.training.workload == 'Command' || self.template.spec.containers.exists(c, c.name == 'worker')"
).message("spec.template.spec.containers needs a container named 'worker' for a built-in workload: the operator runs lockstep-worker in it").field_path(".template.spec.containers"))]
#[x_kube(validation = Rule::new(
    "self.training.workload != 'Command' || self.template.spec.containers.exists(c, c.name == 'worker') || size(self.template.spec.containers) == 1"
).message("spec.template.spec.containers: with several containers, name the training one 'worker' so the operator knows where to put the env contract").field_path(".template.spec.containers"))]
#[serde(rename_all = "camelCase")]
pub struct ParallelJobSpec {
    /// How many ranks the job has and what each one gets. Immutable after creation.
    pub parallelism: Parallelism,

    /// What the built-in worker trains, or `workload: Command` to run the pod template's own
    /// command (for example torchrun in a PyTorch image) under the env contract. Immutable after
    /// creation.
    pub training: Training,

    /// Pod template of every worker. The container named `worker` (or the only container of a
    /// Command job) gets the env contract, the config mount, the ports and the GPU limits.
    #[schemars(schema_with = "crate::schema::pod_template")]
    pub template: PodTemplateSpec,

    /// How the gang is admitted and placed.
    #[serde(default)]
    pub scheduling: Scheduling,

    /// What happens when a rank fails.
    #[serde(default)]
    pub failure_policy: FailurePolicy,

    /// Suspension, deadlines and clean-up.
    #[serde(default)]
    pub run_policy: RunPolicy,

    /// Where the workers export their metrics.
    #[serde(default)]
    pub monitoring: Monitoring,

    /// The controller that reconciles this job. Only `lockstep.dev/operator` is reconciled by
    /// Lockstep; any other value (Kueue's MultiKueue, which reads this field of custom jobs, or
    /// another multi-cluster dispatcher) makes the operator leave the job alone. Immutable.
    #[serde(default = "default_managed_by")]
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.managedBy is immutable"))]
    pub managed_by: String,
}

/// The shape of the gang. World size is `dataParallel x pipelineStages`; rank r is pipeline stage
/// `r / dataParallel` and data-parallel replica `r % dataParallel`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self == oldSelf").message("spec.parallelism is immutable: delete the job and create it again to change the world size"))]
#[x_kube(validation = Rule::new("self.dataParallel * self.pipelineStages <= 16384").message("spec.parallelism: dataParallel x pipelineStages must be at most 16384 ranks, the largest gang one rendezvous serves").field_path(".dataParallel"))]
#[serde(rename_all = "camelCase")]
pub struct Parallelism {
    /// Number of data-parallel replicas (ranks per pipeline stage).
    #[schemars(range(min = 1, max = 100000))]
    pub data_parallel: i32,

    /// Number of pipeline stages each replica is split into.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 1024))]
    pub pipeline_stages: i32,

    /// GPUs given to each worker pod (`nvidia.com/gpu` limit); 0 for a CPU job.
    #[serde(default)]
    #[schemars(range(min = 0, max = 64))]
    pub gpus_per_worker: i32,
}

impl ParallelJobSpec {
    /// The controller that reconciles the job: `spec.managedBy`, or the deprecated
    /// `spec.runPolicy.managedBy` of a job written before the move when `spec.managedBy` is left
    /// at its default.
    pub fn controller(&self) -> &str {
        match &self.run_policy.managed_by {
            Some(old) if self.managed_by == contract::operator::CONTROLLER_NAME => old,
            _ => &self.managed_by,
        }
    }

    /// The container that gets the env contract (and, for a built-in workload, runs the worker):
    /// the one named `worker`, or the only one. The CRD's rules refuse a job with neither.
    pub fn worker_container(&self) -> Option<(usize, &k8s_openapi::api::core::v1::Container)> {
        let containers = &self.template.spec.as_ref()?.containers;
        containers
            .iter()
            .position(|c| c.name == contract::operator::WORKER_CONTAINER)
            .or_else(|| (containers.len() == 1).then_some(0))
            .map(|i| (i, &containers[i]))
    }
}

fn one() -> i32 {
    1
}

/// Gang admission and placement.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Scheduling {
    /// Who admits the gang all-or-nothing: Builtin (the operator, with pod scheduling gates),
    /// Workload (the upstream Kubernetes gang API), Coscheduling (scheduler-plugins PodGroup),
    /// Volcano (Volcano PodGroup) or Kueue (a Kueue Workload: quota and fair sharing; the pods
    /// are made once Kueue admits it). A job labelled `kueue.x-k8s.io/queue-name` is Kueue's
    /// whatever this says, unless it names another external scheduler, which is refused.
    #[serde(default)]
    pub gang_policy: GangPolicy,

    /// Name of the queue the job waits in (Builtin: informational; Volcano: the Volcano queue;
    /// Kueue: the LocalQueue, when the job has no `kueue.x-k8s.io/queue-name` label; Kueue's
    /// `default` LocalQueue when neither names one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub queue: Option<String>,

    /// PriorityClass of the worker pods; it also orders the admission queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,

    /// Seconds a gang may wait for admission before the job reports AdmissionTimeout (it keeps
    /// waiting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub schedule_timeout_seconds: Option<i64>,

    /// Keep the gang inside one topology domain (rack, NVLink domain, zone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<Topology>,
}

/// Who admits a gang all-or-nothing.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GangPolicy {
    /// The operator admits the gang with pod scheduling gates and pins each rank to a node.
    #[default]
    Builtin,
    /// The upstream Kubernetes Workload API with the GangScheduling scheduler plugin.
    Workload,
    /// scheduler-plugins coscheduling (`scheduling.x-k8s.io` PodGroup).
    Coscheduling,
    /// Volcano (`scheduling.volcano.sh` PodGroup).
    Volcano,
    /// Kueue (`kueue.x-k8s.io/v1beta2` Workload): the operator writes the job's Workload, makes
    /// the gang when Kueue admits it (with the flavor's node labels and tolerations), reports
    /// PodsReady, stops the gang on eviction and waits for readmission.
    Kueue,
}

/// A topology constraint on the whole gang.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Topology {
    /// Node label whose value names the domain, for example `topology.kubernetes.io/zone` or a
    /// rack or NVLink-domain label.
    #[schemars(length(min = 1, max = 317))]
    pub key: String,

    /// Required: the whole gang in one domain or not at all. Preferred: one domain if possible.
    #[serde(default)]
    pub mode: TopologyMode,
}

/// Whether a topology constraint is hard or soft.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TopologyMode {
    /// The gang waits until it fits in one domain.
    Required,
    /// One domain if possible, otherwise as few as possible.
    #[default]
    Preferred,
}

/// What happens when a rank fails. Rules are matched in order against the first failure of an
/// attempt; when none matches, the default applies: permanent worker errors (exit codes 2, 3, 7, 8)
/// fail the job, everything else restarts the gang.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FailurePolicy {
    /// Gang restarts allowed before the job fails.
    #[serde(default = "default_max_restarts")]
    #[schemars(range(min = 0, max = 1000))]
    pub max_restarts: i32,

    /// Rules matched in order; the first match decides.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub rules: Vec<FailureRule>,

    /// Exponential backoff between gang restarts.
    #[serde(default)]
    pub restart_backoff: RestartBackoff,

    /// Seconds a rank may go without progress (no step finished, no collective or pipeline
    /// message started or finished) while the rest of the gang is alive, before rank 0 fails the
    /// gang naming that rank and the operation it is stuck in (a hung collective, a stuck
    /// communication thread). The default fits a slow checkpoint load or evaluation; set it above
    /// the longest stretch a rank legitimately spends without communicating.
    #[serde(default = "default_progress_timeout_seconds")]
    #[schemars(range(min = 5, max = 86400))]
    pub progress_timeout_seconds: i64,
}

fn default_max_restarts() -> i32 {
    3
}

/// The default of `spec.failurePolicy.progressTimeoutSeconds`: ten minutes, as PyTorch's NCCL
/// watchdog.
pub const DEFAULT_PROGRESS_TIMEOUT_SECONDS: i64 = 600;

fn default_progress_timeout_seconds() -> i64 {
    DEFAULT_PROGRESS_TIMEOUT_SECONDS
}

impl Default for FailurePolicy {
    fn default() -> Self {
        Self {
            max_restarts: default_max_restarts(),
            rules: Vec::new(),
            restart_backoff: RestartBackoff::default(),
            progress_timeout_seconds: default_progress_timeout_seconds(),
        }
    }
}

/// One failure rule: it matches when every matcher it sets matches.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.exitCodes) || has(self.reasons)").message("a spec.failurePolicy.rules entry needs exitCodes or reasons (or both) to match on"))]
#[serde(rename_all = "camelCase")]
pub struct FailureRule {
    /// What to do when the rule matches.
    pub action: FailureAction,

    /// Exit code ranges of the failed container; the rule matches if any range contains it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32))]
    pub exit_codes: Option<Vec<ExitCodeRange>>,

    /// Failure reasons; the rule matches if the failure has any of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16))]
    pub reasons: Option<Vec<FailureReason>>,
}

/// An inclusive range of exit codes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new("!has(self.to) || self.to >= self.from").message("exitCodes: 'to' must be at least 'from'"))]
#[serde(rename_all = "camelCase")]
pub struct ExitCodeRange {
    /// First exit code of the range.
    #[schemars(range(min = 0, max = 255))]
    pub from: i32,
    /// Last exit code of the range (defaults to `from`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 255))]
    pub to: Option<i32>,
}

impl ExitCodeRange {
    /// Whether `code` lies in the range.
    pub fn contains(&self, code: i32) -> bool {
        code >= self.from && code <= self.to.unwrap_or(self.from)
    }
}

/// What a failure rule does.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureAction {
    /// Remove the whole attempt and start the next one from the last checkpoint.
    RestartGang,
    /// Fail the job now.
    FailJob,
    /// Leave the gang alone (the failed rank stays failed).
    Ignore,
}

/// Why a rank failed, as the operator observes it.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureReason {
    /// The worker container exited with a non-zero code.
    Error,
    /// The container was killed for exceeding its memory limit.
    OOMKilled,
    /// The pod was evicted by the kubelet or the eviction API.
    Evicted,
    /// The pod was preempted for a higher-priority pod.
    Preempted,
    /// The pod's node disappeared or stopped reporting.
    NodeLost,
    /// The pod was deleted by someone other than the operator.
    Deleted,
    /// The worker reported that another rank failed first (exit code 5).
    PeerFailed,
}

/// Exponential backoff between gang restarts: `initialSeconds x 2^(attempt-1)`, capped.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.maxSeconds >= self.initialSeconds").message("spec.failurePolicy.restartBackoff.maxSeconds must be at least initialSeconds"))]
#[serde(rename_all = "camelCase")]
pub struct RestartBackoff {
    /// Delay before the first gang restart.
    #[serde(default = "default_backoff_initial")]
    #[schemars(range(min = 0, max = 86400))]
    pub initial_seconds: i32,
    /// Longest delay between gang restarts.
    #[serde(default = "default_backoff_max")]
    #[schemars(range(min = 0, max = 86400))]
    pub max_seconds: i32,
}

fn default_backoff_initial() -> i32 {
    10
}
fn default_backoff_max() -> i32 {
    300
}

impl Default for RestartBackoff {
    fn default() -> Self {
        Self {
            initial_seconds: default_backoff_initial(),
            max_seconds: default_backoff_max(),
        }
    }
}

impl RestartBackoff {
    /// Seconds to wait before starting `attempt` (1 for the first restart).
    pub fn delay_seconds(&self, attempt: u32) -> u64 {
        let initial = self.initial_seconds.max(0) as u64;
        let exp = attempt.saturating_sub(1).min(32);
        initial
            .saturating_mul(1u64 << exp)
            .min(self.max_seconds.max(0) as u64)
    }
}

/// Suspension, deadlines and clean-up.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RunPolicy {
    /// Suspend the job: its pods are deleted, the job is kept; setting it back to false starts a
    /// new gang from the last checkpoint.
    #[serde(default)]
    pub suspend: bool,

    /// Seconds the job may run, counted from its first start, before it fails with
    /// DeadlineExceeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<i64>,

    /// Seconds after the job finished (Succeeded or Failed) when it is deleted with everything it
    /// owns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i32>,

    /// Which pods are deleted when the job finishes: All, Running (those still running; finished
    /// ones keep their logs) or None.
    #[serde(default)]
    pub clean_pod_policy: CleanPodPolicy,

    /// When the job counts as Succeeded: AllRanks, or RankZero (for Command jobs whose other ranks
    /// may not exit on their own).
    #[serde(default)]
    pub success_policy: SuccessPolicy,

    /// Deprecated: moved to `spec.managedBy`, which wins when both are set. Still read, so that
    /// jobs written before the move keep their controller. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.runPolicy.managedBy is immutable"))]
    pub managed_by: Option<String>,
}

fn default_managed_by() -> String {
    contract::operator::CONTROLLER_NAME.to_string()
}

/// Which pods are deleted when the job finishes.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CleanPodPolicy {
    /// Delete every pod.
    All,
    /// Delete the pods still running; keep finished ones (and their logs).
    #[default]
    Running,
    /// Delete nothing.
    None,
}

/// When a job counts as Succeeded.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SuccessPolicy {
    /// Every rank exited with code 0.
    #[default]
    AllRanks,
    /// Rank 0 exited with code 0.
    RankZero,
}

/// Where the workers export metrics.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("!(self.metricsPort in [29500, 29600])").message("spec.monitoring.metricsPort must differ from the ports the ranks meet on: 29600 (Lockstep's rendezvous) and 29500 (torch's MASTER_PORT)").field_path(".metricsPort"))]
#[serde(rename_all = "camelCase")]
pub struct Monitoring {
    /// Port of each worker's Prometheus `/metrics` endpoint.
    #[serde(default = "default_metrics_port")]
    #[schemars(range(min = 1024, max = 65535))]
    pub metrics_port: i32,
}

fn default_metrics_port() -> i32 {
    i32::from(contract::ports::METRICS)
}

impl Default for Monitoring {
    fn default() -> Self {
        Self {
            metrics_port: default_metrics_port(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_crds_port_and_world_rules_use_the_contracts_numbers() {
        use kube::CustomResourceExt;
        let crd = serde_json::to_string(&crate::ParallelJob::crd()).expect("crd");
        let ports = format!(
            "!(self.metricsPort in [{}, {}])",
            contract::ports::TORCH_MASTER,
            contract::ports::RENDEZVOUS
        );
        assert!(crd.contains(&ports), "no rule {ports:?}");
        let world = format!(
            "self.dataParallel * self.pipelineStages <= {}",
            crate::layout::MAX_WORLD_SIZE
        );
        assert!(crd.contains(&world), "no rule {world:?}");
    }

    #[test]
    fn exit_code_ranges_are_inclusive() {
        let one = ExitCodeRange {
            from: 137,
            to: None,
        };
        assert!(one.contains(137) && !one.contains(136) && !one.contains(138));
        let signals = ExitCodeRange {
            from: 128,
            to: Some(255),
        };
        assert!(signals.contains(128) && signals.contains(255) && !signals.contains(127));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let b = RestartBackoff {
            initial_seconds: 10,
            max_seconds: 300,
        };
        let delays: Vec<u64> = (1..=7).map(|a| b.delay_seconds(a)).collect();
        assert_eq!(delays, [10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(b.delay_seconds(1000), 300, "no overflow on huge attempts");
        let none = RestartBackoff {
            initial_seconds: 0,
            max_seconds: 0,
        };
        assert_eq!(none.delay_seconds(3), 0);
    }
}
