//! `suspend`, `resume`, `restart` and `delete`.

use std::time::Duration;

use kube::api::{DeleteParams, Patch, PatchParams};
use lockstep_api::contract::annotations;

use crate::Ctx;

/// Sets `spec.runPolicy.suspend`.
pub async fn suspend(ctx: &Ctx, name: &str, suspend: bool) -> anyhow::Result<i32> {
    let job = crate::get_job(ctx, name).await?;
    if job
        .status
        .as_ref()
        .and_then(|s| s.phase)
        .is_some_and(|p| p.is_terminal())
    {
        anyhow::bail!(
            "{name} has finished ({}): there is nothing to {}",
            crate::fmt::phase(&job),
            if suspend { "suspend" } else { "resume" }
        );
    }
    let patch = serde_json::json!({"spec": {"runPolicy": {"suspend": suspend}}});
    crate::jobs(ctx)
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    ctx.out.line(format!(
        "paralleljob.lockstep.dev/{name} {}",
        if suspend { "suspended" } else { "resumed" }
    ));
    Ok(0)
}

/// Asks the operator for a new attempt from the last checkpoint (the `restarted-at`
/// annotation, set to now).
pub async fn restart(ctx: &Ctx, name: &str) -> anyhow::Result<i32> {
    let job = crate::get_job(ctx, name).await?;
    let phase = crate::fmt::phase(&job);
    if matches!(phase, "Succeeded" | "Failed" | "Suspended") {
        anyhow::bail!(
            "{name} is {phase}: a finished or suspended job has no gang to restart (resume a \
             suspended one)"
        );
    }
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let patch = serde_json::json!({"metadata": {"annotations": {annotations::RESTARTED_AT: now}}});
    crate::jobs(ctx)
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    ctx.out.line(format!(
        "paralleljob.lockstep.dev/{name} restarting (attempt {} from the last checkpoint)",
        job.status.as_ref().map_or(0, |s| s.attempt) + 1
    ));
    Ok(0)
}

/// Deletes the job; with `wait`, until it is gone.
pub async fn delete(ctx: &Ctx, name: &str, wait: bool) -> anyhow::Result<i32> {
    crate::get_job(ctx, name).await?;
    crate::jobs(ctx)
        .delete(name, &DeleteParams::background())
        .await?;
    if wait {
        let until = std::time::Instant::now() + Duration::from_secs(300);
        while crate::jobs(ctx).get_opt(name).await?.is_some() {
            if std::time::Instant::now() > until {
                anyhow::bail!(
                    "{name} is still there after 5 minutes: kubectl get pj {name} -o yaml shows \
                     its finalizers"
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    ctx.out
        .line(format!("paralleljob.lockstep.dev/{name} deleted"));
    Ok(0)
}
