//! What the operator reads of one ParallelJob in more than one place: the job from the untyped
//! watch, its key, whether its current attempt is admitted, and since when it waits for admission.

use k8s_openapi::jiff::Timestamp;
use kube::api::DynamicObject;
use lockstep_api::status::condition_types;
use lockstep_api::{ParallelJob, ParallelJobStatus};

/// Reads a job of the untyped watch as the typed [`ParallelJob`]; the error names the field that
/// does not fit. Lenient where [`lockstep_api::manifest`] is strict: fields this version does
/// not know are ignored (the API server has accepted the object already).
///
/// A job labelled `kueue.x-k8s.io/queue-name` reads as `gangPolicy: Kueue` (see
/// [`crate::kueue::normalize`]), so that every reader sees the policy it is reconciled under.
pub fn read_job(raw: &DynamicObject) -> Result<ParallelJob, String> {
    let value = serde_json::to_value(raw).map_err(|e| e.to_string())?;
    let mut job: ParallelJob = serde_path_to_error::deserialize(value)
        .map_err(|e| format!("{}: {}", e.path(), e.inner()))?;
    crate::kueue::normalize(&mut job);
    Ok(job)
}

/// The key of a job, and of its gang: `namespace/name`.
pub fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// The planned node of every rank when the current attempt is admitted (its admission is
/// recorded for this attempt and has a time); `None` while it is not.
pub fn admitted_nodes(status: &ParallelJobStatus) -> Option<&[String]> {
    status
        .admission
        .as_ref()
        .filter(|a| a.attempt == Some(status.attempt) && a.admitted_at.is_some())
        .map(|a| a.nodes.as_slice())
}

/// When the current wait for admission began: when the `Admitted` condition turned False, else
/// when the job was `created`.
pub fn queued_since(status: &ParallelJobStatus, created: Option<Timestamp>) -> Option<Timestamp> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == condition_types::ADMITTED && c.status == "False")
        .map(|c| c.last_transition_time.0)
        .or(created)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use lockstep_api::status::Admission;

    #[test]
    fn an_attempt_is_admitted_only_by_an_admission_of_that_attempt_with_a_time() {
        let mut status = ParallelJobStatus {
            attempt: 1,
            admission: Some(Admission {
                attempt: Some(1),
                queue_position: Some(3),
                ..Admission::default()
            }),
            ..ParallelJobStatus::default()
        };
        assert_eq!(admitted_nodes(&status), None, "queued, not admitted");
        let admission = status.admission.as_mut().unwrap();
        admission.admitted_at = Some(Time(Timestamp::UNIX_EPOCH));
        admission.nodes = vec!["a".into(), "b".into()];
        assert_eq!(admitted_nodes(&status), Some(&["a".into(), "b".into()][..]));
        status.attempt = 2;
        assert_eq!(
            admitted_nodes(&status),
            None,
            "an older attempt's admission"
        );
    }

    #[test]
    fn a_wait_for_admission_begins_when_admitted_turned_false_else_at_creation() {
        let created = Timestamp::from_second(100).unwrap();
        let mut status = ParallelJobStatus::default();
        assert_eq!(queued_since(&status, Some(created)), Some(created));
        assert_eq!(queued_since(&status, None), None);
        let turned = Timestamp::from_second(500).unwrap();
        status.conditions.push(Condition {
            type_: condition_types::ADMITTED.into(),
            status: "False".into(),
            reason: "QueuedBehind".into(),
            message: String::new(),
            last_transition_time: Time(turned),
            observed_generation: None,
        });
        assert_eq!(queued_since(&status, Some(created)), Some(turned));
    }
}
