//! What the operator sees of a gang: each worker pod reduced to the facts reconcile decides on
//! (rank, attempt, phase, readiness, node, and why it failed), and ranks on lost nodes.
//!
//! A failure's [`FailureReason`] is typed from here to the failure policy. Only
//! `status.lastFailure` holds it as text (its `reason` is the failure's `detail`), and
//! [`Failure::from_record`] reads that back for a later pass.

use std::collections::{BTreeSet, HashSet};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use lockstep_api::contract::{ExitCode, annotations, labels, operator};
use lockstep_api::spec::FailureReason;
use lockstep_api::status::RankFailure;

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
    /// Its UID: deletions name it as a precondition, so that they never hit another pod that
    /// has taken the name since.
    pub uid: Option<String>,
    /// The UID of the object that controls it (its controller reference): only a pod this
    /// job controls is one of its gang; one with the job's labels and another controller, or
    /// none (an orphan of an earlier job of the same name, a copy someone made), is left alone.
    pub controller: Option<String>,
    /// Its `lockstep.dev/job-uid` label: the UID of the job that made it.
    pub job_uid: Option<String>,
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
    /// Failure reason the failure policy matches on; always [`reason_named`] by `detail`.
    pub reason: FailureReason,
    /// A reason to show: the name of `reason`, except for an `Error`, where it is the worker's
    /// own exit-code reason when it is one of ours, else the Kubernetes one.
    pub detail: String,
    /// What happened, for a person.
    pub message: String,
    /// When it happened (when the container finished, if known).
    pub time: Option<Timestamp>,
}

impl Failure {
    /// A failure without an exit code, named by its reason alone (evicted, preempted, deleted,
    /// node lost).
    pub fn of(reason: FailureReason, message: String) -> Failure {
        Failure {
            exit_code: None,
            reason,
            detail: format!("{reason:?}"),
            message,
            time: None,
        }
    }

    /// A failure as an earlier pass recorded it in `status.lastFailure`.
    pub fn from_record(f: &RankFailure) -> Failure {
        Failure {
            exit_code: f.exit_code,
            reason: reason_named(&f.reason),
            detail: f.reason.clone(),
            message: f.message.clone().unwrap_or_default(),
            time: f.time.as_ref().map(|t| t.0),
        }
    }
}

/// The failure reason a failure's `detail` names: every reason but `Error` has its own name as
/// its detail; any other detail (the worker's or the kubelet's reason) is an `Error`.
pub fn reason_named(detail: &str) -> FailureReason {
    match detail {
        "OOMKilled" => FailureReason::OOMKilled,
        "Evicted" => FailureReason::Evicted,
        "Preempted" => FailureReason::Preempted,
        "Deleted" => FailureReason::Deleted,
        "NodeLost" => FailureReason::NodeLost,
        "PeerFailed" => FailureReason::PeerFailed,
        _ => FailureReason::Error,
    }
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
        uid: pod.metadata.uid.clone(),
        controller: crate::ownership::controller_uid(&pod.metadata).map(str::to_string),
        job_uid: labels_map.get(labels::JOB_UID).cloned(),
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
        let message = status.message.unwrap_or_else(|| format!("pod {reason:?}"));
        return Failure::of(reason, message);
    }
    match worker_termination(pod, worker) {
        Some(Termination {
            code,
            reason,
            message,
            finished: time,
        }) => {
            // OOMKilled (the kubelet's reason) and PeerFailed (the worker's) name their
            // FailureReason; anything else is an Error with the worker's or the kubelet's reason.
            let detail = if reason.as_deref() == Some("OOMKilled") {
                "OOMKilled".to_string()
            } else {
                ExitCode::from_code(code)
                    .map(|c| c.reason().to_string())
                    .or(reason)
                    .unwrap_or_else(|| "Error".into())
            };
            Failure {
                exit_code: Some(code),
                reason: reason_named(&detail),
                detail,
                message: message
                    .unwrap_or_else(|| format!("container {worker} exited with code {code}")),
                time,
            }
        }
        None => {
            let detail = status.reason.clone().unwrap_or_else(|| "Error".into());
            Failure {
                exit_code: None,
                reason: reason_named(&detail),
                detail,
                message: status.message.unwrap_or_else(|| "pod failed".into()),
                time: None,
            }
        }
    }
}

/// The nodes the ranks are bound to, or planned onto by admission.
pub fn nodes_of(observed: &[RankPod]) -> BTreeSet<&str> {
    observed.iter().filter_map(node_of).collect()
}

fn node_of(p: &RankPod) -> Option<&str> {
    p.node.as_deref().or(p.planned_node.as_deref())
}

/// Marks every rank whose node is `gone` and that has not finished as failed with reason
/// NodeLost; returns the names of every pod on a gone node, finished or not.
pub fn mark_lost_nodes(observed: &mut [RankPod], gone: &HashSet<String>) -> HashSet<String> {
    let mut lost = HashSet::new();
    for p in observed.iter_mut() {
        let Some(node) = node_of(p).filter(|n| gone.contains(*n)).map(str::to_string) else {
            continue;
        };
        lost.insert(p.name.clone());
        if matches!(p.state, PodState::Pending | PodState::Running) {
            p.state = PodState::Failed(Failure::of(
                FailureReason::NodeLost,
                format!("node {node} is gone"),
            ));
        }
    }
    lost
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

    #[test]
    fn ranks_on_a_gone_node_are_lost_and_unfinished_ones_failed() {
        let mut running = observe(&pod("Running", None), WORKER).unwrap();
        running.name = "j-0".into();
        let mut planned = running.clone();
        planned.name = "j-1".into();
        planned.node = None;
        planned.planned_node = Some("node-b".into());
        planned.state = PodState::Pending;
        let mut done = running.clone();
        done.name = "j-2".into();
        done.state = PodState::Succeeded;
        let mut elsewhere = running.clone();
        elsewhere.name = "j-3".into();
        elsewhere.node = Some("node-c".into());
        let mut observed = vec![running, planned, done, elsewhere];
        assert_eq!(
            nodes_of(&observed),
            BTreeSet::from(["node-a", "node-b", "node-c"])
        );
        let gone = HashSet::from(["node-a".to_string(), "node-b".to_string()]);
        let lost = mark_lost_nodes(&mut observed, &gone);
        assert_eq!(
            lost,
            HashSet::from(["j-0".into(), "j-1".into(), "j-2".into()])
        );
        for p in &observed[..2] {
            let PodState::Failed(f) = &p.state else {
                panic!("{p:?}")
            };
            assert_eq!(
                (f.reason, f.detail.as_str()),
                (FailureReason::NodeLost, "NodeLost")
            );
        }
        assert_eq!(
            observed[2].state,
            PodState::Succeeded,
            "finished stays finished"
        );
        assert_eq!(observed[3].state, PodState::Running);
    }

    #[test]
    fn a_recorded_failure_reads_back_as_the_reason_it_was_observed_with() {
        let observed = [
            observe(&pod("Failed", Some((137, "OOMKilled"))), WORKER),
            observe(&pod("Failed", Some((5, "Error"))), WORKER),
            observe(&pod("Failed", Some((3, "Error"))), WORKER),
            observe(&pod("Failed", Some((1, "Error"))), WORKER),
        ];
        for r in observed {
            let PodState::Failed(f) = r.unwrap().state else {
                panic!()
            };
            let record = RankFailure {
                exit_code: f.exit_code,
                reason: f.detail.clone(),
                message: Some(f.message.clone()),
                ..RankFailure::default()
            };
            assert_eq!(Failure::from_record(&record).reason, f.reason, "{f:?}");
        }
    }
}
