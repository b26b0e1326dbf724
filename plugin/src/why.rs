//! `kubectl lockstep why NAME`: on one screen, why a job waits (its `Admitted` condition, its
//! place in the queue and the job ahead of it, the gang object of an external scheduler, the
//! pods that wait) or why it failed (the first failure: rank, pod, node, exit code and what it
//! means, the message, the rank's last log lines).

use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{ApiResource, DynamicObject, ListParams};
use kube::core::GroupVersionKind;
use lockstep_api::ParallelJob;
use lockstep_api::contract::{ExitCode, labels, operator};
use lockstep_api::spec::GangPolicy;
use lockstep_api::status::{RankFailure, condition_types};

use crate::Ctx;
use crate::fmt;

/// Lines of the failed rank's log shown.
const TAIL: i64 = 20;

/// Explains the job `name`.
pub async fn why(ctx: &Ctx, name: &str) -> anyhow::Result<i32> {
    let job = crate::get_job(ctx, name).await?;
    let out = &ctx.out;
    let s = job.status.clone().unwrap_or_default();
    let phase = fmt::phase(&job);
    out.line(format!(
        "{name}: {phase}, attempt {}, {} ranks, age {}",
        s.attempt,
        fmt::world(&job),
        fmt::age(&job)
    ));
    match phase {
        "Pending" | "Queued" => waiting(ctx, &job).await?,
        "Suspended" => out.line(format!(
            "Suspended: spec.runPolicy.suspend is true, so no pod exists and no capacity is \
             held. Resume it with: kubectl lockstep resume {name}"
        )),
        "Starting" => {
            admission(ctx, &job);
            pods_not_running(ctx, &job).await?;
        }
        "Running" => out.line(format!("Running: {}", fmt::progress_line(&job))),
        "Succeeded" => out.line(format!("Succeeded: {}", fmt::progress_line(&job))),
        _ => {}
    }
    if let Some(f) = &s.last_failure {
        failure(ctx, &job, f).await?;
    } else if phase == "Failed" {
        // Failed without a rank's failure: the deadline, a template the API server refused...
        if let Some(c) = fmt::condition(&job, condition_types::FAILED) {
            out.line(format!("Failed: {}: {}", c.reason, c.message));
        }
    }
    warnings(ctx, &job).await?;
    Ok(0)
}

/// The `Admitted` condition in a line.
fn admission(ctx: &Ctx, job: &ParallelJob) {
    match fmt::admitted(job) {
        Some(c) => ctx.out.line(format!(
            "Admitted={} ({}): {}",
            c.status, c.reason, c.message
        )),
        None => ctx
            .out
            .line("Admitted: the operator has not looked at the job yet (is it running?)"),
    }
}

/// Why a gang waits for admission.
async fn waiting(ctx: &Ctx, job: &ParallelJob) -> anyhow::Result<()> {
    admission(ctx, job);
    let name = job.metadata.name.clone().unwrap_or_default();
    let s = job.status.clone().unwrap_or_default();
    let mut policy = job.spec.scheduling.gang_policy;
    // A job labelled with a Kueue queue is Kueue's (as the operator reads it).
    let kueue_label = job
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("kueue.x-k8s.io/queue-name"))
        .is_some_and(|q| !q.is_empty());
    if policy == GangPolicy::Builtin && kueue_label {
        policy = GangPolicy::Kueue;
    }
    if let Some(pos) = s.admission.as_ref().and_then(|a| a.queue_position) {
        let ahead = if pos > 1 {
            job_ahead(ctx, pos - 1, policy).await
        } else {
            None
        };
        match ahead {
            Some(a) => ctx.out.line(format!(
                "Queue: position {pos} (1 = next); ahead of it: {a}"
            )),
            None if pos == 1 => ctx.out.line(
                "Queue: position 1, next to be admitted once its whole gang fits".to_string(),
            ),
            None => ctx.out.line(format!("Queue: position {pos} (1 = next)")),
        }
    }
    if policy != GangPolicy::Builtin {
        gang_object(ctx, &name, policy).await;
    }
    pods_not_running(ctx, job).await
}

/// The job at `position` in the admission queue, described. Positions count the waiting jobs
/// that compete for the same nodes: one of this namespace is taken first, then one of another
/// namespace (when the user may list them) of the same gang policy.
async fn job_ahead(ctx: &Ctx, position: i32, policy: GangPolicy) -> Option<String> {
    let at = |j: &ParallelJob| {
        j.status
            .as_ref()
            .and_then(|s| s.admission.as_ref())
            .and_then(|a| a.queue_position)
            == Some(position)
            && matches!(fmt::phase(j), "Pending" | "Queued")
            && j.spec.scheduling.gang_policy == policy
    };
    let here = crate::jobs(ctx)
        .list(&ListParams::default())
        .await
        .ok()?
        .items;
    let j = match here.into_iter().find(at) {
        Some(j) => j,
        None => {
            let all: kube::Api<ParallelJob> = kube::Api::all(ctx.client.clone());
            all.list(&ListParams::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(at)?
        }
    };
    let world = fmt::world(&j);
    let prio = j
        .spec
        .scheduling
        .priority_class_name
        .clone()
        .map_or(String::new(), |p| format!(", priority class {p}"));
    Some(format!(
        "{}/{} ({world} ranks, waiting {}{prio})",
        j.metadata.namespace.clone().unwrap_or_default(),
        j.metadata.name.clone().unwrap_or_default(),
        crate::ls::row(&j, false, false)[7]
    ))
}

/// The external scheduler's gang object (named after the job) and what its status says.
async fn gang_object(ctx: &Ctx, name: &str, policy: GangPolicy) {
    let (group, version, kind, plural) = match policy {
        GangPolicy::Workload => ("scheduling.k8s.io", "v1alpha2", "PodGroup", "podgroups"),
        GangPolicy::Coscheduling => ("scheduling.x-k8s.io", "v1alpha1", "PodGroup", "podgroups"),
        GangPolicy::Volcano => ("scheduling.volcano.sh", "v1beta1", "PodGroup", "podgroups"),
        GangPolicy::Kueue => ("kueue.x-k8s.io", "v1beta2", "Workload", "workloads"),
        GangPolicy::Builtin => return,
    };
    let ar =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
    let api: kube::Api<DynamicObject> =
        kube::Api::namespaced_with(ctx.client.clone(), &ctx.namespace, &ar);
    let line = match api.get_opt(name).await {
        Ok(Some(o)) => {
            let status = o.data.get("status").cloned().unwrap_or_default();
            let phase = status
                .get("phase")
                .and_then(|p| p.as_str())
                .map(String::from);
            let conds: Vec<String> = status
                .get("conditions")
                .and_then(|c| c.as_array())
                .into_iter()
                .flatten()
                .map(|c| {
                    format!(
                        "{}={} {}",
                        c["type"].as_str().unwrap_or("?"),
                        c["status"].as_str().unwrap_or("?"),
                        c["message"].as_str().unwrap_or("")
                    )
                    .trim_end()
                    .to_string()
                })
                .collect();
            let what = match (phase, conds.is_empty()) {
                (Some(p), _) => format!("phase {p}"),
                (None, false) => conds.join("; "),
                (None, true) => "no status yet (is its scheduler running?)".into(),
            };
            format!("{kind}.{group} {name}: {what}")
        }
        Ok(None) => format!("{kind}.{group} {name}: not created yet"),
        Err(e) => {
            format!("{kind}.{group} {name}: cannot be read ({e}); is the {group} API installed?")
        }
    };
    ctx.out.line(format!("Gang object: {line}"));
}

/// The job's pods of the current attempt that do not run, and why.
async fn pods_not_running(ctx: &Ctx, job: &ParallelJob) -> anyhow::Result<()> {
    let name = job.metadata.name.clone().unwrap_or_default();
    let attempt = job.status.as_ref().map_or(0, |s| s.attempt);
    for p in crate::logs::pods_of(ctx, &name, Some(attempt)).await? {
        if let Some(why) = pod_waits(&p) {
            ctx.out.line(format!(
                "Pod {} (rank {}): {why}",
                p.metadata.name.clone().unwrap_or_default(),
                rank_of(&p)
            ));
        }
    }
    Ok(())
}

/// A pod's rank label.
pub fn rank_of(p: &Pod) -> u32 {
    p.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(labels::RANK))
        .and_then(|r| r.parse().ok())
        .unwrap_or(u32::MAX)
}

/// Why a pod does not run yet, if it does not.
fn pod_waits(p: &Pod) -> Option<String> {
    let spec = p.spec.as_ref()?;
    let status = p.status.clone().unwrap_or_default();
    if status.phase.as_deref() == Some("Running") || status.phase.as_deref() == Some("Succeeded") {
        return None;
    }
    if let Some(gates) = &spec.scheduling_gates
        && !gates.is_empty()
    {
        let names: Vec<&str> = gates.iter().map(|g| g.name.as_str()).collect();
        let ours = names.contains(&operator::SCHEDULING_GATE);
        return Some(format!(
            "held by scheduling gates {}{}",
            names.join(", "),
            if ours {
                " (the gang is not admitted yet)"
            } else {
                ""
            }
        ));
    }
    let unscheduled = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False");
    if let Some(c) = unscheduled {
        return Some(format!(
            "not scheduled ({}): {}",
            c.reason.clone().unwrap_or_default(),
            c.message.clone().unwrap_or_default()
        ));
    }
    let waiting = status
        .container_statuses
        .iter()
        .flatten()
        .find_map(|c| c.state.as_ref()?.waiting.clone());
    match waiting {
        Some(w) => Some(format!(
            "{}{}",
            w.reason.unwrap_or_else(|| "waiting".into()),
            w.message.map_or(String::new(), |m| format!(": {m}"))
        )),
        None => Some(status.phase.unwrap_or_else(|| "Pending".into())),
    }
}

/// The first failure of the latest failed attempt, and the rank's last log lines.
async fn failure(ctx: &Ctx, job: &ParallelJob, f: &RankFailure) -> anyhow::Result<()> {
    let out = &ctx.out;
    let current = job.status.as_ref().map_or(0, |s| s.attempt);
    let when = if f.attempt == current {
        "this attempt".to_string()
    } else {
        format!("attempt {}", f.attempt)
    };
    out.line(format!(
        "First failure of {when}: rank {} (pod {}{})",
        f.rank,
        f.pod,
        f.node
            .as_ref()
            .map_or(String::new(), |n| format!(" on node {n}"))
    ));
    match f.exit_code {
        Some(c) => {
            let meaning = match ExitCode::from_code(c) {
                Some(e) => format!("{}: {}", e.reason(), e.meaning()),
                None if c > 128 => format!("killed by signal {}", c - 128),
                None => "not a code of lockstep-worker (the template's own command?)".into(),
            };
            // The kubelet's reason when it says more (OOMKilled).
            let reason = match ExitCode::from_code(c) {
                Some(e) if e.reason() == f.reason => String::new(),
                _ if f.reason == "Error" => String::new(),
                _ => format!("{}; ", f.reason),
            };
            out.line(format!("  exit code {c} ({reason}{meaning})"));
        }
        None => out.line(format!("  {}", f.reason)),
    }
    if let Some(m) = &f.message {
        out.line(format!("  message: {m}"));
    }
    // The pod's own log while it exists with that attempt; else what the operator kept.
    let live = live_tail(ctx, f).await;
    let (source, text) = match (live, &f.log_tail) {
        (Some(t), _) => ("its log", t),
        (None, Some(t)) => ("kept by the operator", t.clone()),
        (None, None) => {
            out.line("  (no log lines: the pod is gone and none were kept)");
            return Ok(());
        }
    };
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(TAIL as usize);
    out.line(format!(
        "  last {} log lines ({source}):",
        lines.len() - from
    ));
    for l in &lines[from..] {
        out.line(format!("    [rank {}] {l}", f.rank));
    }
    Ok(())
}

/// The last lines of the failed pod's worker log, when the pod of that attempt still exists.
async fn live_tail(ctx: &Ctx, f: &RankFailure) -> Option<String> {
    let pods = crate::logs::pods(ctx);
    let p = pods.get_opt(&f.pod).await.ok()??;
    let attempt = p
        .metadata
        .labels
        .as_ref()?
        .get(labels::ATTEMPT)?
        .parse::<i32>()
        .ok()?;
    if attempt != f.attempt {
        return None;
    }
    pods.logs(&f.pod, &crate::logs::worker_log(Some(TAIL)))
        .await
        .ok()
        .filter(|t| !t.is_empty())
}

/// The job's latest Warning Events.
async fn warnings(ctx: &Ctx, job: &ParallelJob) -> anyhow::Result<()> {
    let events: kube::Api<Event> = kube::Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let name = job.metadata.name.clone().unwrap_or_default();
    let lp = ListParams::default().fields(&format!(
        "involvedObject.kind=ParallelJob,involvedObject.name={name},type=Warning"
    ));
    let mut list = events.list(&lp).await.map(|l| l.items).unwrap_or_default();
    let uid = job.metadata.uid.clone();
    list.retain(|e| e.involved_object.uid == uid);
    list.sort_by_key(|e| {
        e.last_timestamp
            .as_ref()
            .map(|t| t.0)
            .or(e.event_time.as_ref().map(|t| t.0))
    });
    let from = list.len().saturating_sub(5);
    if from < list.len() {
        ctx.out.line("Recent warnings:");
    }
    for e in &list[from..] {
        ctx.out.line(format!(
            "  {} {}: {}",
            e.reason.clone().unwrap_or_default(),
            e.count.map_or(String::new(), |c| format!("(x{c})")),
            e.message.clone().unwrap_or_default()
        ));
    }
    Ok(())
}
