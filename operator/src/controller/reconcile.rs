//! One reconcile pass of one job, as a named pipeline: read (the job as of this operator's last
//! status write at least; its gang from the pod cache once that shows this operator's own
//! writes, see [`crate::pods`]; the nodes that are gone) -> decide (pure, [`crate::decide`],
//! with gang admission's answer when the pass needs it; the log tail of a failure it records,
//! `super::log_tail`) -> report the status and Events (`super::status`) -> apply the writes
//! (`super::apply`).
//!
//! The status is written before any pod is deleted or created: a crash between two writes then
//! leaves a state the next pass completes (stale pods of an older attempt are deleted, missing
//! ranks created), and the recorded first failure is never lost.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::reflector::ObjectRef;
use lockstep_api::ParallelJob;
use lockstep_api::contract::{names, operator};
use lockstep_api::status::{Progress, condition_types, reasons};
use tracing::{info, warn};

use super::apply::{self, Applied};
use super::{Context, Kept, log_tail, status};
use crate::decide::{
    Action, Decided, Decision, check_capacity, decide_with, hold_gang, set_gang_api_missing,
    set_invalid, wait_unadmitted,
};
use crate::job;
use crate::kueue::WorkloadView;
use crate::metrics::Metrics;
use crate::observe::{self, RankPod};
use crate::resources::JobContext;
use crate::{Error, Result, ownership, quota};

/// Counts a failed pass by its error's category and looks again after a delay that doubles with
/// every failure of this job in a row (see [`crate::backoff`]): a job whose passes keep failing
/// (an API server that refuses, a webhook that is down) is not tried every few seconds for ever.
/// A pass that succeeds starts the count again.
pub(super) fn error_policy(job: Arc<DynamicObject>, err: &Error, ctx: Arc<Context>) -> Requeue {
    ctx.metrics
        .errors
        .with_label_values(&[err.category()])
        .inc();
    let key = job::key(&job.namespace().unwrap_or_default(), &job.name_any());
    let retry_in = ctx.kept().entry(key).or_default().errors.fail();
    warn!(job = %job.name_any(), category = err.category(), error = %err, ?retry_in, "reconcile error");
    Requeue::requeue(retry_in)
}

/// [`reconcile`], counted and timed; a pass that succeeds resets the job's error backoff.
pub(super) async fn timed_reconcile(job: Arc<DynamicObject>, ctx: Arc<Context>) -> Result<Requeue> {
    let timer = ctx.metrics.duration.start_timer();
    ctx.metrics.reconciles.inc();
    let key = job::key(&job.namespace().unwrap_or_default(), &job.name_any());
    let result = reconcile(job, ctx.clone()).await;
    timer.observe_duration();
    if result.is_ok()
        && let Some(kept) = ctx.kept().get_mut(&key)
    {
        kept.errors.reset();
    }
    result
}

/// One reconcile pass of one job.
pub async fn reconcile(cached: Arc<DynamicObject>, ctx: Arc<Context>) -> Result<Requeue> {
    let ns = cached
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let ar = ApiResource::erase::<ParallelJob>(&());
    let jobs: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &ns, &ar);
    let key = job::key(&ns, &cached.name_any());

    // Read.
    let Some(job) = read_job(&ctx, &jobs, &cached, &key).await? else {
        return Ok(Requeue::await_change());
    };
    let mut job_ctx = JobContext::new(&job)?;
    if let Err(conflict) = crate::kueue::effective_policy(&job) {
        return report_invalid(&ctx, &jobs, &job, &conflict).await;
    }
    job_ctx.priority = kueue_priority(&ctx, &job).await?;
    {
        // What is kept of an earlier job of the same name (deleted, and this one created since)
        // is not this job's: what it published, its backoff, its waits.
        let mut kept = ctx.kept();
        let kept = kept.entry(key.clone()).or_default();
        if kept.uid != job.metadata.uid {
            *kept = Kept {
                uid: job.metadata.uid.clone(),
                ..Kept::default()
            };
        }
    }
    // The gang comes from the pod cache, once it shows every write this operator made to it (see
    // `crate::pods`); the event that shows the last of them starts the next pass.
    ctx.pods.wait_ready().await;
    let Some(seen) = ctx.pods.view(&key, Instant::now()) else {
        return Ok(Requeue::requeue(Duration::from_secs(2)));
    };
    // Only the pods the job controls are its gang; others with its labels (orphans of an
    // earlier job of the same name, say) are left alone, and hold the gang back while they
    // have the names of its ranks.
    let (mut observed, others) = ownership::split_gang(seen, job_ctx.uid());
    let in_the_way = ownership::in_the_way(
        &others,
        job_ctx.name,
        job_ctx.layout.world_size(),
        job_ctx.uid(),
    );
    let gone = gone_nodes(&ctx, &observed).await?;
    let lost = observe::mark_lost_nodes(&mut observed, &gone);

    // Decide. While the gang waits for the namespace's ResourceQuota, or for objects not its
    // own to go, a pass makes none of it.
    let hold = if in_the_way.is_empty() {
        ctx.kept()
            .get(&key)
            .and_then(|k| k.quota.as_ref())
            .and_then(|q| q.holds(job.metadata.uid.as_deref(), Instant::now()))
    } else {
        // Looked at again when they change (their events wake the job, see
        // `watch::owning_job`), and every 30 s. A plan admission may have made for the gang
        // meanwhile is given back.
        ctx.admitter.give_back(&key);
        let message = ownership::explain(&in_the_way);
        Some((reasons::OBJECT_CONFLICT, message, quota::CONFLICT_MAX_WAIT))
    };
    // What Kueue's admission puts on the pods is read only while some rank of the attempt has no
    // pod (a running gang's passes need no ResourceFlavor).
    let attempt = job.status.as_ref().map_or(0, |s| s.attempt);
    let made = observed
        .iter()
        .filter(|p| p.attempt == attempt && !p.terminating)
        .count();
    let placing = made < job_ctx.layout.world_size() as usize;
    let workload = read_workload(&ctx, &job_ctx, placing).await?;
    let mut decision =
        decide_pass(&ctx, &job, &job_ctx, &observed, workload.as_ref(), hold).await?;
    if left_kueue(&ctx, &job_ctx) {
        // The job is no longer Kueue's (its label or gangPolicy changed): the Workload it had
        // goes, and with it the quota it holds.
        decision.actions.push(Action::DeleteWorkload);
    }
    // Before the status is written and the gang deleted: the log goes with the pod.
    log_tail::fill(
        &ctx.client,
        &ns,
        job.status.as_ref(),
        &mut decision.status,
        (&observed, &lost),
    )
    .await;

    // Report.
    let written = decision.status_to_write(job.status.as_ref());
    // The pods this pass makes are counted in what it writes: should a write of the pass be
    // refused, the status is written again with the counts of what exists.
    let counted_ahead = matches!(written, std::borrow::Cow::Owned(_));
    let wait = status::report(
        &ctx,
        &jobs,
        &job,
        &written,
        status::events_of(&decision.events),
    )
    .await?;
    if let Some(wait) = wait {
        decision.requeue_after = Some(decision.requeue_after.map_or(wait, |r| r.min(wait)));
    }
    ctx.metrics.set_phase(&key, decision.status.phase);
    record_metrics(&ctx.metrics, &job, &decision);

    // Apply.
    match apply::actions(&ctx, &job_ctx, &decision.actions, &observed, &lost).await? {
        Applied::All => {
            let created = decision
                .actions
                .iter()
                .any(|a| matches!(a, Action::CreatePods { .. }));
            if created && let Some(kept) = ctx.kept().get_mut(&key) {
                kept.quota = None;
            }
        }
        Applied::QuotaExceeded(refusal) => {
            let message = refusal.explain(job_ctx.layout.world_size());
            warn!(job = %job.name_any(), quota = %refusal.quota, message, "the namespace's ResourceQuota refused part of the gang");
            let wait = (reasons::QUOTA_EXCEEDED, message);
            let seen = (&observed[..], &lost);
            return hold_back(&ctx, &jobs, &job, &job_ctx, decision, seen, wait).await;
        }
        Applied::NotOwned(foreign) => {
            let message = ownership::explain(&foreign);
            warn!(job = %job.name_any(), message, "objects with names the job needs are not its own");
            let wait = (reasons::OBJECT_CONFLICT, message);
            let seen = (&observed[..], &lost);
            return hold_back(&ctx, &jobs, &job, &job_ctx, decision, seen, wait).await;
        }
        Applied::Rejected(refusal) => {
            let message =
                format!("the API server refused an object built from spec.template: {refusal}");
            let mut status = decision.status;
            let generation = job.metadata.generation;
            let reason = reasons::TEMPLATE_REJECTED;
            let news = set_invalid(
                &mut status.conditions,
                reason,
                &message,
                generation,
                Timestamp::now(),
            );
            if news {
                warn!(job = %job.name_any(), message, "template rejected");
            }
            if news || counted_ahead {
                let events = if news {
                    vec![status::event(true, reason, "CreatePods", &message)]
                } else {
                    Vec::new()
                };
                status::report(&ctx, &jobs, &job, &status, events).await?;
            }
            return Ok(Requeue::await_change());
        }
        Applied::GangApiMissing(what) => {
            let message = format!(
                "spec.scheduling.gangPolicy is {:?}, which needs {what}, and this cluster does \
                 not serve it: install that gang scheduler (or enable the API), or use \
                 gangPolicy: Builtin",
                job.spec.scheduling.gang_policy
            );
            let status = decision.status;
            return gang_api_unusable(&ctx, &jobs, &job, status, counted_ahead, &message).await;
        }
        Applied::GangApiForbidden(what, words) => {
            let message = format!(
                "spec.scheduling.gangPolicy is {:?}, which needs {what}, and the operator may \
                 not use it ({words}): grant it the rights (with the chart: kueue.enabled=true \
                 for Kueue), or use gangPolicy: Builtin",
                job.spec.scheduling.gang_policy
            );
            let status = decision.status;
            return gang_api_unusable(&ctx, &jobs, &job, status, counted_ahead, &message).await;
        }
    }
    match apply::publish_addresses(&ctx, &job_ctx, &observed, decision.status.attempt).await {
        Ok(()) => {}
        Err(Error::NotOwned(foreign)) => {
            // The ranks' EndpointSlice is not the job's: their names would not resolve. The
            // gang waits as for any object in its way, with none of its pods kept.
            let message = ownership::explain(&foreign);
            warn!(job = %job.name_any(), message, "objects with names the job needs are not its own");
            let wait = (reasons::OBJECT_CONFLICT, message);
            let seen = (&observed[..], &lost);
            return hold_back(&ctx, &jobs, &job, &job_ctx, decision, seen, wait).await;
        }
        Err(e) => return Err(e),
    }
    info!(job = job_ctx.name, namespace = %ns, phase = ?decision.status.phase, attempt = decision.status.attempt, actions = decision.actions.len(), "reconciled");
    Ok(decision.requeue_after.map_or_else(
        || Requeue::requeue(Duration::from_secs(300)),
        Requeue::requeue,
    ))
}

/// Says in `Admitted=False` (reason `GangApiMissing`, see [`set_gang_api_missing`]) that the gang
/// scheduler's API cannot be used, as `message` explains, with a Warning Event when that is news,
/// over the `status` this pass decided (written again, without an Event, when what the pass
/// wrote counted pods it did not make: `counted_ahead`); looks again in a minute.
async fn gang_api_unusable(
    ctx: &Context,
    jobs: &Api<DynamicObject>,
    job: &ParallelJob,
    mut status: lockstep_api::ParallelJobStatus,
    counted_ahead: bool,
    message: &str,
) -> Result<Requeue> {
    let news = set_gang_api_missing(
        &mut status,
        message,
        job.metadata.generation,
        Timestamp::now(),
    );
    if news || counted_ahead {
        let events = if news {
            let reason = reasons::GANG_API_MISSING;
            vec![status::event(true, reason, "EnsureGangObjects", message)]
        } else {
            Vec::new()
        };
        status::report(ctx, jobs, job, &status, events).await?;
    }
    Ok(Requeue::requeue(Duration::from_secs(60)))
}

/// The pods of the current attempt that exist, or may: those observed, and those this pass
/// tried to create.
fn partial_gang(
    decision: &Decision,
    observed: &[RankPod],
    job_ctx: &JobContext<'_>,
) -> Vec<String> {
    let attempt = decision.status.attempt;
    let mut names: Vec<String> = observed
        .iter()
        .filter(|p| p.attempt == attempt && !p.terminating)
        .map(|p| p.name.clone())
        .collect();
    for action in &decision.actions {
        if let Action::CreatePods { ranks, .. } = action {
            names.extend(ranks.iter().map(|r| job_ctx.pod_name(*r)));
        }
    }
    names.sort();
    names.dedup();
    names
}

/// The gang could not be made (the namespace's ResourceQuota refused part of it, or objects
/// with names it needs are not the job's own: `reason`, said in `message`), and what was made of
/// it (of the pods `observed`, on the nodes `lost` or not) is deleted: a wait, not a broken
/// template. The job says so in `Admitted=False` with
/// `reason`, with a Warning Event when that is news, over the status this pass reported
/// (`decision`'s); gives its admission back (the status's, and the plan admission may still
/// keep); and is tried again after a delay that doubles with every refusal in a row (see
/// [`quota::Hold`]).
async fn hold_back(
    ctx: &Context,
    jobs: &Api<DynamicObject>,
    job: &ParallelJob,
    job_ctx: &JobContext<'_>,
    decision: Decision,
    (observed, lost): (&[RankPod], &HashSet<String>),
    (reason, message): (&'static str, String),
) -> Result<Requeue> {
    // No part of the gang is kept, so that a later try creates it whole, and a partly made gang
    // neither runs nor holds what others could use. Deleted before the status says so: a crash
    // in between leaves the admitted attempt without pods, which the next pass creates (and,
    // the cause still there, deletes) again.
    let doomed = partial_gang(&decision, observed, job_ctx);
    let delete = [Action::DeletePods(doomed)];
    apply::actions(ctx, job_ctx, &delete, observed, lost).await?;
    let key = job::key(job_ctx.namespace, job_ctx.name);
    ctx.admitter.give_back(&key);
    let retry_in = ctx
        .kept()
        .entry(key.clone())
        .or_default()
        .quota
        .get_or_insert_with(quota::Hold::default)
        .refused(
            job.metadata.uid.clone(),
            reason,
            message.clone(),
            Instant::now(),
        );
    let mut status = decision.status.clone();
    let news = wait_unadmitted(
        &mut status,
        job.status.as_ref(),
        reason,
        &message,
        job.metadata.generation,
        Timestamp::now(),
    );
    info!(job = %job.name_any(), reason, ?retry_in, "the gang waits");
    let events = if news {
        vec![status::event(true, reason, "CreatePods", &message)]
    } else {
        Vec::new()
    };
    // This pass reported its status already: the wait is written over it.
    let mut reported = job.clone();
    reported.status = Some(decision.status_to_write(job.status.as_ref()).into_owned());
    status::report(ctx, jobs, &reported, &status, events).await?;
    ctx.metrics.set_phase(&key, status.phase);
    Ok(Requeue::requeue(retry_in))
}

/// Reads the job to decide on: one that holds this process's own last status write, that is the
/// cached one when the watch has delivered that write (or something newer), else the answer to
/// that write; when this process has written no status for the job yet, the cached one if it has
/// no status at all (a job no controller has reported on: no status write can be missing from
/// a cache that this leader's watch filled), else a fresh read. `None`
/// when there is nothing to do: the job is gone (what is kept of it is forgotten), is another
/// controller's, is being deleted, or cannot be read (that is reported on the job).
async fn read_job(
    ctx: &Context,
    jobs: &Api<DynamicObject>,
    cached: &DynamicObject,
    key: &str,
) -> Result<Option<ParallelJob>> {
    let last = ctx
        .kept()
        .get(key)
        .and_then(|k| k.status.as_ref().map(|(w, _)| w.clone()));
    let newest = last
        .filter(|w| w.metadata.uid == cached.metadata.uid)
        .and_then(|w| {
            match compare_resource_versions(
                cached.metadata.resource_version.as_deref()?,
                w.metadata.resource_version.as_deref()?,
            )? {
                std::cmp::Ordering::Less => Some((*w).clone()),
                _ => Some(cached.clone()),
            }
        });
    let unreported = cached
        .data
        .get("status")
        .is_none_or(|s| s.is_null() || s.as_object().is_some_and(|o| o.is_empty()));
    let raw = match newest {
        Some(raw) => raw,
        None if unreported => cached.clone(),
        None => {
            let Some(raw) = jobs.get_opt(&cached.name_any()).await? else {
                ctx.metrics.set_phase(key, None);
                ctx.pods.forget(key);
                ctx.kept().remove(key);
                return Ok(None);
            };
            raw
        }
    };
    // `spec.managedBy`, else the deprecated `spec.runPolicy.managedBy` (see
    // `ParallelJobSpec::controller`).
    let managed_by = raw.data["spec"]["managedBy"]
        .as_str()
        .filter(|m| *m != operator::CONTROLLER_NAME)
        .or_else(|| raw.data["spec"]["runPolicy"]["managedBy"].as_str())
        .unwrap_or(operator::CONTROLLER_NAME);
    if managed_by != ctx.controller_name || raw.metadata.deletion_timestamp.is_some() {
        return Ok(None);
    }
    match job::read_job(&raw) {
        Ok(job) => Ok(Some(job)),
        Err(problem) => {
            status::report_unreadable(ctx, &raw, &problem);
            Ok(None)
        }
    }
}

/// Reports `message` in `Valid=False` (reason InvalidSpec), with a Warning Event when that is
/// news, and makes nothing: the user has to change the job.
async fn report_invalid(
    ctx: &Context,
    jobs: &Api<DynamicObject>,
    job: &ParallelJob,
    message: &str,
) -> Result<Requeue> {
    let mut status = job.status.clone().unwrap_or_default();
    let reason = reasons::INVALID_SPEC;
    if set_invalid(
        &mut status.conditions,
        reason,
        message,
        job.metadata.generation,
        Timestamp::now(),
    ) {
        warn!(job = %job.name_any(), message, "invalid spec");
        let event = status::event(true, reason, "Validate", message);
        status::report(ctx, jobs, job, &status, vec![event]).await?;
    }
    Ok(Requeue::await_change())
}

/// The value of a Kueue job's PriorityClass (what its Workload carries, as Kueue's webhook would
/// fill it in): from the cache once it is complete, else read; `None` when the job names no
/// class or one that does not exist, and for jobs that are not Kueue's.
async fn kueue_priority(ctx: &Context, job: &ParallelJob) -> Result<Option<i32>> {
    if job.spec.scheduling.gang_policy != lockstep_api::spec::GangPolicy::Kueue {
        return Ok(None);
    }
    let Some(name) = job.spec.scheduling.priority_class_name.as_deref() else {
        return Ok(None);
    };
    // A value missed here would change the Workload's hash (and so make it anew) once seen.
    ctx.admitter.wait_ready().await;
    if let Some(v) = ctx.admitter.priority_value(name) {
        return Ok(Some(v));
    }
    let classes: Api<k8s_openapi::api::scheduling::v1::PriorityClass> =
        Api::all(ctx.client.clone());
    Ok(classes
        .get_opt(name)
        .await
        .map_err(Error::Read)?
        .map(|c| c.value.unwrap_or(0)))
}

/// The job's own Workload in the cache of Kueue Workloads, if the cache is complete: `Some(None)`
/// when it holds none; `None` when the cache cannot tell (Kueue's API not served yet, or not
/// readable).
fn cached_workload(ctx: &Context, job_ctx: &JobContext<'_>) -> Option<Option<Arc<DynamicObject>>> {
    use futures::FutureExt;
    ctx.workloads.wait_until_ready().now_or_never()?.ok()?;
    let key = ObjectRef::new_with(job_ctx.name, crate::kueue::workload_resource())
        .within(job_ctx.namespace);
    Some(
        ctx.workloads
            .get(&key)
            .filter(|w| ownership::controller_uid(&w.metadata) == Some(job_ctx.uid())),
    )
}

/// Whether a job that is not Kueue's has a Workload of its own (it was Kueue's before).
fn left_kueue(ctx: &Context, job_ctx: &JobContext<'_>) -> bool {
    job_ctx.job.spec.scheduling.gang_policy != lockstep_api::spec::GangPolicy::Kueue
        && cached_workload(ctx, job_ctx).is_some_and(|w| w.is_some())
}

/// The job's Kueue Workload, for a job under the Kueue policy, as the decision reads it (with
/// what its assigned ResourceFlavors put on the pods, when `placing`: some rank has no pod):
/// from the watch's cache once that is complete (it shows Kueue's decisions as they come, and the job's own writes a moment later:
/// the decision is level-triggered, and its writes find what is there), else read; `None` when
/// the job is not Kueue's, or has no Workload of its own (then the pass writes it: a missing
/// Kueue API, or an object of another under the name, is found and reported by that write).
async fn read_workload(
    ctx: &Context,
    job_ctx: &JobContext<'_>,
    placing: bool,
) -> Result<Option<WorkloadView>> {
    if job_ctx.job.spec.scheduling.gang_policy != lockstep_api::spec::GangPolicy::Kueue {
        return Ok(None);
    }
    let found = match cached_workload(ctx, job_ctx) {
        Some(cached) => cached.map(|w| (*w).clone()),
        None => match apply::workloads(ctx, job_ctx).get_opt(job_ctx.name).await {
            Ok(found) => found,
            // Kueue's API is not served (a plain-text 404), or the operator may not read it:
            // the write says so.
            Err(kube::Error::Api(e)) if matches!(e.code, 403 | 404) => None,
            Err(e) => return Err(Error::Read(e)),
        },
    };
    let Some(found) = found else {
        return Ok(None);
    };
    if ownership::controller_uid(&found.metadata) != Some(job_ctx.uid()) {
        return Ok(None);
    }
    let mut view = WorkloadView::read(&serde_json::to_value(&found)?, &job_ctx.workload_hash()?);
    if view.reserved && placing {
        let gvk = kube::api::GroupVersionKind::gvk(
            crate::kueue::GROUP,
            crate::kueue::VERSION,
            "ResourceFlavor",
        );
        let ar = ApiResource::from_gvk_with_plural(&gvk, "resourceflavors");
        let api: Api<DynamicObject> = Api::all_with(ctx.client.clone(), &ar);
        let mut flavors = Vec::new();
        for name in view.flavor_names() {
            match api.get_opt(&name).await.map_err(Error::Read)? {
                Some(f) => flavors.push((name, f.data["spec"].clone())),
                None => {
                    warn!(job = job_ctx.name, flavor = %name, "the ResourceFlavor Kueue assigned is gone: its node labels and tolerations are not applied")
                }
            }
        }
        view.place(&flavors);
    }
    Ok(Some(view))
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

/// The nodes the ranks of `observed` are on (or planned onto) that are gone. The node cache is
/// trusted when it knows a node; a node it does not know is confirmed with a GET, so a cache
/// that lags behind a new node raises no false alarm.
async fn gone_nodes(ctx: &Context, observed: &[RankPod]) -> Result<HashSet<String>> {
    ctx.nodes
        .wait_until_ready()
        .await
        .map_err(|_| Error::MissingField("node cache"))?;
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let mut gone = HashSet::new();
    for node in observe::nodes_of(observed) {
        if ctx.nodes.get(&ObjectRef::new(node)).is_none() && nodes.get_opt(node).await?.is_none() {
            gone.insert(node.to_string());
        }
    }
    Ok(gone)
}

/// Decides the pass, asking gang admission when the pass needs it, and adds what reconcile
/// reads besides the pods: rank 0's progress, and whether any node offers the GPUs a worker
/// asks for. While the gang waits for the namespace's ResourceQuota or for objects not its own
/// to go (`hold`: the condition's reason and message, and how long until the next try)
/// admission is not asked and nothing of the gang is made (see [`hold_gang`]).
async fn decide_pass(
    ctx: &Context,
    job: &ParallelJob,
    job_ctx: &JobContext<'_>,
    observed: &[RankPod],
    workload: Option<&WorkloadView>,
    hold: Option<(&'static str, String, Duration)>,
) -> Result<Decision> {
    let world = job_ctx.layout.world_size();
    let mut decided = decide_with(job, world, observed, workload, Timestamp::now());
    let mut decision = match hold {
        Some((reason, message, retry_in)) => hold_gang(
            decided,
            job,
            observed,
            reason,
            &message,
            retry_in,
            Timestamp::now(),
        ),
        None => {
            if let Decided::AwaitsAdmission(_) = &decided {
                // Admission counts what the caches hold: a job that asks it waits until they
                // are complete. Other jobs (admitted, finished, external policies) do not wait
                // for them. The pass is decided again after the wait, so that its time (the
                // admission time, the queue wait, the schedule timeout) is not the time before
                // the caches synced.
                ctx.admitter.wait_ready().await;
                decided = decide_with(job, world, observed, workload, Timestamp::now());
                if let Some((message, retry_in)) = objects_in_the_way(ctx, job, job_ctx).await? {
                    let reason = reasons::OBJECT_CONFLICT;
                    let now = Timestamp::now();
                    return Ok(hold_gang(
                        decided, job, observed, reason, &message, retry_in, now,
                    ));
                }
            }
            decided.answer_with(|| ctx.admitter.request(job))
        }
    };
    // For the attempt this pass decides on (a restart starts the next one now).
    decision.status.progress = progress(ctx, job, decision.status.attempt);
    if job.spec.parallelism.gpus_per_worker > 0 {
        check_capacity(
            &mut decision,
            job,
            ctx.gpu_nodes.largest(),
            Timestamp::now(),
        );
    }
    Ok(decision)
}

/// Before a gang is first admitted: whether objects with names it needs exist that are not the
/// job's own (see [`apply::foreign_objects`]). Then the condition's message and how long until
/// the next look (the wait is recorded like a refusal, see [`quota::Hold`]). Otherwise the gang
/// would be admitted, refused by its own writes, and given back on every try. Looked at once per
/// job until nothing is found; objects that appear later are found when written.
async fn objects_in_the_way(
    ctx: &Context,
    job: &ParallelJob,
    job_ctx: &JobContext<'_>,
) -> Result<Option<(String, Duration)>> {
    let key = job::key(job_ctx.namespace, job_ctx.name);
    if ctx.kept().get(&key).is_some_and(|k| k.names_free) {
        return Ok(None);
    }
    let looked = apply::foreign_objects(ctx, job_ctx).await?;
    let foreign = looked.foreign;
    if !foreign.is_empty() {
        // A plan the queue made before this pass (the job was waiting) holds nothing now.
        ctx.admitter.give_back(&key);
    }
    let mut kept = ctx.kept();
    let kept = kept.entry(key).or_default();
    if foreign.is_empty() {
        kept.names_free = true;
        kept.names_absent = looked.all_absent;
        kept.slice_absent = looked.slice_absent;
        kept.names_looked = Some(Instant::now());
        if looked.slice_absent && kept.published.is_none() {
            kept.published = Some(Vec::new());
        }
        return Ok(None);
    }
    let message = ownership::explain(&foreign);
    let retry_in = kept.quota.get_or_insert_with(quota::Hold::default).refused(
        job.metadata.uid.clone(),
        reasons::OBJECT_CONFLICT,
        message.clone(),
        Instant::now(),
    );
    Ok(Some((message, retry_in)))
}

/// The progress to show: rank 0's last report in the progress ConfigMap (from the cache), else
/// what the status already holds (a malformed report counts as none).
fn progress(ctx: &Context, job: &ParallelJob, attempt: i32) -> Option<Progress> {
    let ns = job.namespace().unwrap_or_default();
    let key = ObjectRef::new(&names::progress_config_map(&job.name_any())).within(&ns);
    let uid = job.metadata.uid.as_deref().unwrap_or_default();
    let written = ctx.progress.get(&key).and_then(|cm| {
        // An earlier job's of the same name, orphaned, says nothing of this one.
        (ownership::controller_uid(&cm.metadata) == Some(uid)).then_some(())?;
        cm.data
            .as_ref()?
            .get(names::PROGRESS_KEY)
            .and_then(|t| Progress::from_json(t))
    });
    shown_progress(
        written,
        job.status.as_ref().and_then(|s| s.progress.clone()),
        attempt,
    )
}

/// The progress to show for a job at gang attempt `attempt`: the report `written` by rank 0,
/// else the one `shown` before; neither when it comes from an earlier attempt (the next attempt
/// resumes from its checkpoint, not from that step: the Step column stays empty until it reports).
fn shown_progress(
    written: Option<Progress>,
    shown: Option<Progress>,
    attempt: i32,
) -> Option<Progress> {
    written
        .or(shown)
        .filter(|p| p.attempt.is_none_or(|a| a == attempt))
}

/// Counts restarts and observes queue waits and time-to-all-running from a decision's
/// transitions.
fn record_metrics(metrics: &Metrics, job: &ParallelJob, decision: &Decision) {
    for note in &decision.events {
        if note.reason == reasons::GANG_RESTARTING {
            let reason = decision
                .status
                .last_failure
                .as_ref()
                .map_or("Unknown", |f| f.reason.as_str());
            metrics.restarts.with_label_values(&[reason]).inc();
        }
        let restarted = job
            .status
            .as_ref()
            .is_none_or(|s| s.attempt < decision.status.attempt);
        if note.reason == reasons::RESTART_REQUESTED && restarted {
            metrics.restarts.with_label_values(&["Requested"]).inc();
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

#[cfg(test)]
mod tests {
    use super::{compare_resource_versions, shown_progress};
    use lockstep_api::status::Progress;
    use std::cmp::Ordering;

    fn report(step: i64, attempt: Option<i32>) -> Option<Progress> {
        Some(Progress {
            step,
            attempt,
            ..Progress::default()
        })
    }

    #[test]
    fn a_report_of_an_earlier_attempt_is_not_shown_while_the_next_starts() {
        let step = |p: Option<Progress>| p.map(|p| p.step);
        // The restart to attempt 1: rank 0 of attempt 0 reported step 700 last.
        assert_eq!(step(shown_progress(report(700, Some(0)), None, 1)), None);
        assert_eq!(step(shown_progress(None, report(700, Some(0)), 1)), None);
        // Attempt 1 resumed from its checkpoint at 500 and reports.
        assert_eq!(
            step(shown_progress(
                report(520, Some(1)),
                report(700, Some(0)),
                1
            )),
            Some(520)
        );
        // The report written wins over the one shown before; a report without an attempt (an
        // older worker) is shown.
        assert_eq!(
            step(shown_progress(report(42, Some(0)), report(7, Some(0)), 0)),
            Some(42)
        );
        assert_eq!(step(shown_progress(report(42, None), None, 3)), Some(42));
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
