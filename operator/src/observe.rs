//! What the operator sees of a gang: each worker pod reduced to the facts reconcile decides on
//! (rank, attempt, phase, readiness, node, and why it failed).

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use lockstep_api::contract::{ExitCode, annotations, labels, operator};
use lockstep_api::spec::FailureReason;

/// The observed state of one worker pod.
#[derive(Clone, Debug, PartialEq)]
pub struct RankPod {
    /// Pod name.
    pub name: String,
    /// Global rank (from its label).
    pub rank: u32,
    /// Gang attempt that created it (from its label).
    pub attempt: i32,
    /// Where it is.
    pub state: PodState,
    /// Whether its Ready condition is true.
    pub ready: bool,
    /// Node it is bound to.
    pub node: Option<String>,
    /// Whether it is being deleted.
    pub terminating: bool,
    /// Whether it still carries the gang scheduling gate.
    pub gated: bool,
    /// The node gang admission planned it onto.
    pub planned_node: Option<String>,
    /// Its IP (`status.podIP`), once it has one: what its rank's DNS name resolves to.
    pub ip: Option<String>,
}

/// Phase of a worker pod, with the failure when it failed.
#[derive(Clone, Debug, PartialEq)]
pub enum PodState {
    /// Not running yet (gated, unscheduled, pulling, starting).
    Pending,
    /// Running.
    Running,
    /// Exited with code 0.
    Succeeded,
    /// Failed.
    Failed(Failure),
}

/// Why a rank failed.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    /// Exit code of the worker container, if it terminated.
    pub exit_code: Option<i32>,
    /// Failure reason the failure policy matches on.
    pub reason: FailureReason,
    /// A reason to show: the worker's own exit-code reason when it is one of ours, else the
    /// Kubernetes one.
    pub detail: String,
    /// What happened, for a person.
    pub message: String,
    /// When it happened (when the container finished, if known).
    pub time: Option<Timestamp>,
}

/// Reduces a pod to its [`RankPod`]; `None` for a pod that is not a worker of a gang (labels
/// missing).
pub fn observe(pod: &Pod, worker_container: &str) -> Option<RankPod> {
    let labels_map = pod.metadata.labels.as_ref()?;
    let rank = labels_map.get(labels::RANK)?.parse().ok()?;
    let attempt = labels_map.get(labels::ATTEMPT)?.parse().ok()?;
    let status = pod.status.clone().unwrap_or_default();
    let ready = status
        .conditions
        .as_ref()
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let state = match status.phase.as_deref() {
        Some("Running") => match worker_termination(pod, worker_container) {
            // restartPolicy Never: a terminated worker fails the pod; do not wait for the kubelet
            // to say so.
            Some(t) if t.code != 0 => PodState::Failed(failure(pod, worker_container)),
            _ => PodState::Running,
        },
        Some("Succeeded") => PodState::Succeeded,
        Some("Failed") => PodState::Failed(failure(pod, worker_container)),
        _ => PodState::Pending,
    };
    Some(RankPod {
        name: pod.metadata.name.clone().unwrap_or_default(),
        rank,
        attempt,
        state,
        ready,
        node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        terminating: pod.metadata.deletion_timestamp.is_some(),
        gated: pod
            .spec
            .as_ref()
            .and_then(|s| s.scheduling_gates.as_ref())
            .is_some_and(|g| g.iter().any(|g| g.name == operator::SCHEDULING_GATE)),
        planned_node: pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(annotations::PLANNED_NODE).cloned()),
        ip: status.pod_ip.filter(|ip| !ip.is_empty()),
    })
}

/// How the worker container terminated.
struct Termination {
    code: i32,
    reason: Option<String>,
    message: Option<String>,
    finished: Option<Timestamp>,
}

/// The worker container's termination, if it terminated.
fn worker_termination(pod: &Pod, worker: &str) -> Option<Termination> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    let s = statuses
        .iter()
        .find(|s| s.name == worker)
        .or_else(|| (statuses.len() == 1).then(|| &statuses[0]))?;
    let t = s.state.as_ref()?.terminated.as_ref()?;
    Some(Termination {
        code: t.exit_code,
        reason: t.reason.clone(),
        message: t.message.clone(),
        finished: t.finished_at.as_ref().map(|f| f.0),
    })
}

fn failure(pod: &Pod, worker: &str) -> Failure {
    let status = pod.status.clone().unwrap_or_default();
    let preempted = status.conditions.as_ref().is_some_and(|cs| {
        cs.iter().any(|c| {
            c.type_ == "DisruptionTarget" && c.reason.as_deref() == Some("PreemptionByScheduler")
        })
    });
    if status.reason.as_deref() == Some("Evicted") || preempted {
        let reason = if preempted {
            FailureReason::Preempted
        } else {
            FailureReason::Evicted
        };
        return Failure {
            exit_code: None,
            reason,
            detail: format!("{reason:?}"),
            message: status.message.unwrap_or_else(|| format!("pod {reason:?}")),
            time: None,
        };
    }
    match worker_termination(pod, worker) {
        Some(Termination {
            code,
            reason,
            message,
            finished: time,
        }) => {
            let ours = ExitCode::from_code(code);
            let (kind, detail) = if reason.as_deref() == Some("OOMKilled") {
                (FailureReason::OOMKilled, "OOMKilled".to_string())
            } else if ours == Some(ExitCode::PeerFailed) {
                (
                    FailureReason::PeerFailed,
                    ExitCode::PeerFailed.reason().to_string(),
                )
            } else {
                let detail = ours
                    .map(|c| c.reason().to_string())
                    .or(reason)
                    .unwrap_or_else(|| "Error".into());
                (FailureReason::Error, detail)
            };
            Failure {
                exit_code: Some(code),
                reason: kind,
                detail,
                message: message
                    .unwrap_or_else(|| format!("container {worker} exited with code {code}")),
                time,
            }
        }
        None => Failure {
            exit_code: None,
            reason: FailureReason::Error,
            detail: status.reason.clone().unwrap_or_else(|| "Error".into()),
            message: status.message.unwrap_or_else(|| "pod failed".into()),
            time: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_api::contract::operator::WORKER_CONTAINER as WORKER;

    fn pod(phase: &str, exit: Option<(i32, &str)>) -> Pod {
        let mut v = serde_json::json!({
            "metadata": {"name": "j-1", "labels": {labels::RANK: "1", labels::ATTEMPT: "0"}},
            "spec": {"nodeName": "node-a", "containers": [{"name": "worker", "image": "x"}]},
            "status": {"phase": phase}
        });
        if let Some((code, reason)) = exit {
            v["status"]["containerStatuses"] = serde_json::json!([{
                "name": "worker", "ready": false, "restartCount": 0, "image": "x", "imageID": "",
                "state": {"terminated": {"exitCode": code, "reason": reason}}
            }]);
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn exit_codes_become_reasons() {
        let r = observe(&pod("Failed", Some((137, "OOMKilled"))), WORKER).unwrap();
        let PodState::Failed(f) = r.state else {
            panic!("{r:?}")
        };
        assert_eq!(
            (f.exit_code, f.reason),
            (Some(137), FailureReason::OOMKilled)
        );

        let r = observe(&pod("Failed", Some((5, "Error"))), WORKER).unwrap();
        let PodState::Failed(f) = r.state else {
            panic!()
        };
        assert_eq!(f.reason, FailureReason::PeerFailed);

        let r = observe(&pod("Failed", Some((3, "Error"))), WORKER).unwrap();
        let PodState::Failed(f) = r.state else {
            panic!()
        };
        assert_eq!(
            (f.reason, f.detail.as_str()),
            (FailureReason::Error, "InvalidConfig")
        );
        assert_eq!(
            (r.rank, r.attempt, r.node.as_deref()),
            (1, 0, Some("node-a"))
        );
    }

    #[test]
    fn a_terminated_worker_in_a_running_pod_is_a_failure() {
        let r = observe(&pod("Running", Some((1, "Error"))), WORKER).unwrap();
        assert!(matches!(r.state, PodState::Failed(_)));
        let r = observe(&pod("Running", None), WORKER).unwrap();
        assert_eq!(r.state, PodState::Running);
    }

    #[test]
    fn evictions_are_recognised_and_pods_without_labels_ignored() {
        let mut p = pod("Failed", None);
        p.status.as_mut().unwrap().reason = Some("Evicted".into());
        let PodState::Failed(f) = observe(&p, WORKER).unwrap().state else {
            panic!()
        };
        assert_eq!(f.reason, FailureReason::Evicted);
        p.metadata.labels = None;
        assert!(observe(&p, WORKER).is_none());
    }
}
