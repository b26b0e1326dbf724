//! Reporting on a job: every status write goes through [`report`] (server-side apply under the
//! operator's field manager, with the counts-only throttle), every Event through [`record`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};
use lockstep_api::contract::operator;
use lockstep_api::status::reasons;
use lockstep_api::{ParallelJob, ParallelJobStatus};
use tracing::warn;

use super::Context;
use crate::Result;
use crate::decide::Note;

/// How long a status change of the worker counts alone (`status.ready`, `status.workers`) may
/// wait to be written after the job's last status write. While a gang starts its pods come up one
/// batch at a time, and writing every step cost about two more status writes a job (each the
/// whole job through the API server and every watcher). A change of phase, conditions or
/// anything else is written at once, and the counts with it; the Kubernetes Job controller
/// batches its counts in the same way.
pub const COUNTS_PERIOD: Duration = Duration::from_secs(5);

/// Whether `new` differs from `old` in the worker counts alone.
pub fn counts_only(old: &ParallelJobStatus, new: &ParallelJobStatus) -> bool {
    crate::decide::same_but_counts(old, new) && old != new
}

/// Reports `status` and `events` on `job` (read from `jobs`): the status is written when it
/// differs from the job's, except that a change of the worker counts alone waits out
/// [`COUNTS_PERIOD`] after this process's last write, and then how long it still waits is
/// returned (look again then). The Events are recorded in either case, see [`record`].
pub(super) async fn report(
    ctx: &Context,
    jobs: &Api<DynamicObject>,
    job: &ParallelJob,
    status: &ParallelJobStatus,
    events: Vec<Event>,
) -> Result<Option<Duration>> {
    let key = crate::job::key(&job.namespace().unwrap_or_default(), &job.name_any());
    let mut wait = None;
    if job.status.as_ref() != Some(status) {
        let since = ctx
            .kept()
            .get(&key)
            .and_then(|k| k.status.as_ref().map(|(_, at)| at.elapsed()));
        wait = since
            .filter(|_| {
                job.status
                    .as_ref()
                    .is_some_and(|old| counts_only(old, status))
            })
            .and_then(|since| COUNTS_PERIOD.checked_sub(since))
            .filter(|wait| !wait.is_zero());
        if wait.is_none() {
            write(ctx, jobs, &key, job, status).await?;
        }
    }
    record(ctx, job.object_ref(&()), events);
    Ok(wait)
}

/// Writes a job's status by server-side apply, and keeps the API server's answer for the next
/// pass to decide from while the watch has not delivered it (see [`super::Kept::status`]).
async fn write(
    ctx: &Context,
    jobs: &Api<DynamicObject>,
    key: &str,
    job: &ParallelJob,
    status: &ParallelJobStatus,
) -> Result<()> {
    let mut patch = serde_json::json!({
        "apiVersion": ParallelJob::api_version(&()),
        "kind": ParallelJob::kind(&()),
        "status": status,
    });
    // This process's first write of the job was decided from the watch cache, unread (see
    // `reconcile::read_job`): it holds only if the job is still that version (a 409 otherwise,
    // and the next pass reads it again), so that nothing newer is overwritten.
    let first = ctx.kept().get(key).is_none_or(|k| k.status.is_none());
    if first && let Some(rv) = &job.metadata.resource_version {
        patch["metadata"] = serde_json::json!({"resourceVersion": rv});
    }
    let updated = jobs
        .patch_status(
            &job.name_any(),
            &PatchParams::apply(operator::FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    ctx.kept().entry(key.to_string()).or_default().status =
        Some((Arc::new(updated), Instant::now()));
    Ok(())
}

/// The Events of decide's notes; each one's action is its reason.
pub(super) fn events_of(notes: &[Note]) -> Vec<Event> {
    notes
        .iter()
        .map(|n| event(n.warning, n.reason, n.reason, &n.message))
        .collect()
}

/// An Event: `reason` (PascalCase), the `action` taken or tried, and `message` cut to the 1000
/// characters an Event's note may hold.
pub(super) fn event(warning: bool, reason: &str, action: &str, message: &str) -> Event {
    Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(message.chars().take(1000).collect()),
        action: action.into(),
        secondary: None,
    }
}

/// Records `events` on the object `regarding`, off the reconcile's path and in order, as
/// client-go's recorder does: the status already says what happened, and the next writes need
/// not wait for the Events. A failure to record one is logged.
///
/// Each Event stands on its own: kube-runtime's `Recorder` folds an Event into an earlier one of
/// the same reason and object (for 6 minutes) and keeps the earlier note, so attempt 1's
/// GangStarted would show as a second count of attempt 0's. The operator records Events on
/// transitions only, so there is no flood to fold: a recorder with an empty cache per batch.
pub(super) fn record(ctx: &Context, regarding: ObjectReference, events: Vec<Event>) {
    if events.is_empty() {
        return;
    }
    let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
    tokio::spawn(async move {
        for ev in events {
            if let Err(e) = recorder.publish(&ev, &regarding).await {
                warn!(job = regarding.name.as_deref().unwrap_or_default(), error = %e, "recording an event failed");
            }
        }
    });
}

/// Says, once per change of the object, that the operator cannot read it, and why: a Warning
/// Event (the object has no status this operator could write) and the error metric.
pub(super) fn report_unreadable(ctx: &Context, raw: &DynamicObject, problem: &str) {
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
    let unreadable = event(true, reasons::INVALID_OBJECT, "Read", &message);
    record(ctx, raw.object_ref(&ar), vec![unreadable]);
}

#[cfg(test)]
mod tests {
    use super::counts_only;
    use lockstep_api::ParallelJobStatus;
    use lockstep_api::status::{Phase, WorkerCounts};

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
}
