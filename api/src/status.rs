//! `status` of a ParallelJob, written only by the operator (server-side apply on the status
//! subresource), and the condition types and reasons it uses.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Observed state of a ParallelJob.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ParallelJobStatus {
    /// Where the job is in its life: Pending, Queued, Starting, Running, Restarting, Succeeded,
    /// Failed or Suspended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,

    /// The latest observations of the job's state (types in [`condition_types`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Current gang attempt: 0 for the first run, incremented by every gang restart.
    #[serde(default)]
    pub attempt: i32,

    /// Ready ranks over world size (for example `3/4`), for display.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,

    /// Worker pods of the current attempt by state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<WorkerCounts>,

    /// When the operator first started the job's gang (created its pods);
    /// `activeDeadlineSeconds` counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,

    /// When the job finished (Succeeded or Failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,

    /// How the current attempt was admitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admission: Option<Admission>,

    /// The first failure of the latest failed attempt: the root cause, never overwritten by the
    /// cascade of secondary failures that follows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<RankFailure>,

    /// Training progress as reported by rank 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,

    /// The value of the `lockstep.dev/restarted-at` annotation the operator last acted on (a
    /// requested gang restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarted_at: Option<String>,

    /// Gang restarts requested with the `lockstep.dev/restarted-at` annotation so far. They are
    /// counted in `attempt` but not against `spec.failurePolicy.maxRestarts`, nor in the restart
    /// backoff: `attempt - requestedRestarts` is the number of restarts after failures.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub requested_restarts: i32,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

/// Lifecycle phase of a ParallelJob.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Accepted; the operator has not acted on it yet.
    Pending,
    /// Waiting for gang admission (capacity, quota or a PodGroup).
    Queued,
    /// Admitted; pods are being created, scheduled and started.
    Starting,
    /// Every rank is running.
    Running,
    /// A rank failed, or a restart was requested; the gang is being torn down and restarted.
    Restarting,
    /// Training finished.
    Succeeded,
    /// The job failed and will not be retried.
    Failed,
    /// `spec.runPolicy.suspend` is true; no pods exist.
    Suspended,
}

impl Phase {
    /// Every phase.
    pub const ALL: [Phase; 8] = [
        Phase::Pending,
        Phase::Queued,
        Phase::Starting,
        Phase::Running,
        Phase::Restarting,
        Phase::Succeeded,
        Phase::Failed,
        Phase::Suspended,
    ];

    /// Whether the job is finished for good.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed)
    }

    /// The phase as written in the resource (also a metric label value).
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Queued => "Queued",
            Phase::Starting => "Starting",
            Phase::Running => "Running",
            Phase::Restarting => "Restarting",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
            Phase::Suspended => "Suspended",
        }
    }
}

/// Worker pods of the current attempt by state.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct WorkerCounts {
    /// Pods that exist for the current attempt.
    pub active: i32,
    /// Pods whose Ready condition is true.
    pub ready: i32,
    /// Pods in phase Running.
    pub running: i32,
    /// Pods that succeeded.
    pub succeeded: i32,
    /// Pods that failed.
    pub failed: i32,
}

/// How the current attempt was admitted.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Admission {
    /// The gang attempt this admission is for: a restarted gang is admitted again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<i32>,
    /// When the gang was admitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admitted_at: Option<Time>,
    /// Seconds the gang waited in the queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_seconds: Option<f64>,
    /// Nodes the ranks were placed on, indexed by rank.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// Position in the admission queue while waiting (1 = next), counting only the waiting jobs
    /// ahead that may use a node this one may use (jobs on other node pools do not count);
    /// refreshed when the job is reconciled, so it may lag behind the queue by up to half a
    /// minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<i32>,
}

/// The failure of one rank.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RankFailure {
    /// Attempt the failure happened in.
    pub attempt: i32,
    /// Global rank that failed.
    pub rank: i32,
    /// Pod of that rank.
    pub pod: String,
    /// Node the pod ran on, if it was scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Exit code of the worker container, if it terminated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Why it failed (a [`crate::spec::FailureReason`], or the worker's exit-code reason).
    pub reason: String,
    /// What happened, for a person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The last lines of the rank's worker log (at most 50 lines and 8 KiB), read by the
    /// operator before the gang was torn down, so that they outlive the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_tail: Option<String>,
    /// When the operator observed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
}

/// Training progress as reported by rank 0.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Last completed optimizer step.
    pub step: i64,
    /// Steps the job will run in all, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_steps: Option<i64>,
    /// Training loss at that step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Global training throughput.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples_per_second: Option<f64>,
    /// Last evaluation result (accuracy, validation loss or average precision, as the model
    /// defines it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_metric: Option<f64>,
    /// When rank 0 reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<Time>,
    /// The gang attempt whose rank 0 reported it: a report of an earlier attempt is not shown
    /// while the next one starts (it resumes from its checkpoint, not from that step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<i32>,
}

impl Progress {
    /// The JSON rank 0 writes into the progress ConfigMap.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a Progress always serializes")
    }

    /// Reads what rank 0 wrote; `None` when it is not a progress report (never an error: a
    /// malformed report must not stop the reconcile of the job).
    pub fn from_json(text: &str) -> Option<Self> {
        serde_json::from_str(text).ok()
    }
}

/// Condition types the operator sets (`metav1.Condition.type`).
pub mod condition_types {
    /// The gang has been admitted (all ranks placed at once).
    pub const ADMITTED: &str = "Admitted";
    /// Every rank of the current attempt is running.
    pub const RUNNING: &str = "Running";
    /// The gang is being restarted (after a failure, or on request).
    pub const RESTARTING: &str = "Restarting";
    /// The job is suspended.
    pub const SUSPENDED: &str = "Suspended";
    /// The job succeeded.
    pub const SUCCEEDED: &str = "Succeeded";
    /// The job failed.
    pub const FAILED: &str = "Failed";
    /// The job's spec can work on this cluster (False with a reason when it cannot).
    pub const VALID: &str = "Valid";
}

/// Condition reasons and Event reasons (PascalCase, stable: alerts and dashboards match them).
pub mod reasons {
    /// The job was created and accepted by the operator (as an Event only when it is not
    /// admitted in the same pass: then GangAdmitted says both).
    pub const JOB_CREATED: &str = "JobCreated";
    /// The gang waits for capacity.
    pub const INSUFFICIENT_CAPACITY: &str = "InsufficientCapacity";
    /// The gang waits behind higher-priority or older jobs.
    pub const QUEUED_BEHIND: &str = "QueuedBehind";
    /// The gang waited longer than `scheduleTimeoutSeconds`.
    pub const ADMISSION_TIMEOUT: &str = "AdmissionTimeout";
    /// The gang was admitted.
    pub const GANG_ADMITTED: &str = "GangAdmitted";
    /// Every rank is running.
    pub const GANG_STARTED: &str = "GangStarted";
    /// A rank failed.
    pub const RANK_FAILED: &str = "RankFailed";
    /// The gang is being restarted.
    pub const GANG_RESTARTING: &str = "GangRestarting";
    /// A restart asked for with the `lockstep.dev/restarted-at` annotation was acted on: the
    /// gang is restarted as a new attempt (or, when it was not running, starts from the last
    /// checkpoint anyway).
    pub const RESTART_REQUESTED: &str = "RestartRequested";
    /// A restart asked for with the `lockstep.dev/restarted-at` annotation was ignored: the job
    /// is finished.
    pub const RESTART_IGNORED: &str = "RestartIgnored";
    /// Every rank finished.
    pub const JOB_SUCCEEDED: &str = "JobSucceeded";
    /// The job failed.
    pub const JOB_FAILED: &str = "JobFailed";
    /// `maxRestarts` gang restarts were used up.
    pub const BACKOFF_LIMIT_EXCEEDED: &str = "BackoffLimitExceeded";
    /// `activeDeadlineSeconds` passed.
    pub const DEADLINE_EXCEEDED: &str = "DeadlineExceeded";
    /// A failure rule with action FailJob matched.
    pub const FAILED_BY_RULE: &str = "FailedByRule";
    /// The job was suspended.
    pub const JOB_SUSPENDED: &str = "JobSuspended";
    /// The job was resumed.
    pub const JOB_RESUMED: &str = "JobResumed";
    /// The spec cannot work on this cluster (for example a resource no node has).
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// The API server refused an object the operator built from the spec.
    pub const TEMPLATE_REJECTED: &str = "TemplateRejected";
    /// The operator cannot read the object (a field of a newer version, say); Event only.
    pub const INVALID_OBJECT: &str = "InvalidObject";
    /// An external gang scheduler has not placed every rank yet.
    pub const WAITING_FOR_SCHEDULER: &str = "WaitingForScheduler";
    /// The gang API chosen by `gangPolicy` is not served by this cluster.
    pub const GANG_API_MISSING: &str = "GangApiMissing";
    /// The namespace's ResourceQuota refused part of the gang (what it counts is used up): the
    /// gang waits, with no pod kept, and is tried again with backoff.
    pub const QUOTA_EXCEEDED: &str = "QuotaExceeded";
    /// Objects with names the job needs (pods, its Service, ConfigMaps, ...) exist and are not
    /// the job's own (another job's of the same name, orphaned, or a user's): they are left
    /// alone, and the gang waits, with no pod kept, until they are gone.
    pub const OBJECT_CONFLICT: &str = "ObjectConflict";
    /// The job's Kueue Workload waits for Kueue to reserve quota (the message is Kueue's).
    pub const WAITING_FOR_KUEUE: &str = "WaitingForKueue";
    /// Kueue evicted the job's Workload (preempted, or not ready in time): the gang stops, and
    /// the job waits to be admitted again.
    pub const EVICTED: &str = "Evicted";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_strings_match_serde() {
        for p in Phase::ALL {
            assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
        }
        let terminal: Vec<_> = Phase::ALL.iter().filter(|p| p.is_terminal()).collect();
        assert_eq!(terminal, [&Phase::Succeeded, &Phase::Failed]);
    }
}
