//! A namespace's ResourceQuota too small for a whole gang: the API server refuses part of the gang
//! (403 "exceeded quota"). That is a wait, not a broken template: the job stays Queued with
//! `Admitted=False`, reason `QuotaExceeded`, naming the quota and what was asked, keeps no part of
//! its gang, tries again with backoff, and gets all of its pods once the quota is raised.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Pod, ResourceQuota};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use lockstep_api::contract::labels;
use lockstep_api::status::Phase;
use lockstep_api::{ParallelJob, ParallelJobStatus};
use lockstep_e2e::{TestNamespace, wait_until, with_namespace};

const TIMEOUT: Duration = Duration::from_secs(90);

/// `ddp-digits` (2 ranks asking for 500m CPU each) on this test's pool.
fn job(ns: &TestNamespace, name: &str) -> anyhow::Result<ParallelJob> {
    Ok(serde_json::from_value(
        ns.example_on_pool("ddp-digits.yaml", name)?,
    )?)
}

async fn status(jobs: &Api<ParallelJob>, name: &str) -> anyhow::Result<ParallelJobStatus> {
    Ok(jobs.get(name).await?.status.unwrap_or_default())
}

async fn gang(pods: &Api<Pod>, name: &str) -> anyhow::Result<Vec<Pod>> {
    Ok(pods
        .list(&ListParams::default().labels(&format!("{}={name}", labels::JOB_NAME)))
        .await?
        .items)
}

fn running(p: &Pod) -> bool {
    p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

fn bound(p: &Pod) -> bool {
    p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some()
}

/// A refusal reported as a broken template is the bug this file guards against: fail at once,
/// with the message, rather than wait for a condition that will not come.
fn not_rejected(s: &ParallelJobStatus) -> anyhow::Result<()> {
    if let Some(c) = s.conditions.iter().find(|c| c.reason == "TemplateRejected") {
        anyhow::bail!(
            "the quota refusal was reported as TemplateRejected: {}",
            c.message
        );
    }
    anyhow::ensure!(
        s.phase != Some(Phase::Failed),
        "the job failed: {:?}",
        s.conditions
    );
    Ok(())
}

#[tokio::test]
async fn a_gang_its_quota_cannot_hold_waits_whole_and_runs_once_the_quota_is_raised()
-> anyhow::Result<()> {
    with_namespace("quota", |ns| async move {
        ns.create_node_pool(2, 0).await?;
        // Room for one rank's 500m CPU, not for two.
        let quotas: Api<ResourceQuota> = ns.api();
        let quota: ResourceQuota = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "ResourceQuota",
            "metadata": {"name": "team-cpu"},
            "spec": {"hard": {"requests.cpu": "750m"}}
        }))?;
        quotas.create(&PostParams::default(), &quota).await?;
        // Until the quota controller has counted the namespace, the API server refuses with
        // "status unknown"; the test starts from a quota that admits by its numbers.
        wait_until(TIMEOUT, "the quota is counted", || async {
            Ok(quotas
                .get("team-cpu")
                .await?
                .status
                .and_then(|s| s.used)
                .is_some_and(|u| u.contains_key("requests.cpu")))
        })
        .await?;

        let jobs: Api<ParallelJob> = ns.api();
        let pods: Api<Pod> = ns.api();
        jobs.create(&PostParams::default(), &job(&ns, "big")?)
            .await?;
        wait_until(
            TIMEOUT,
            "Admitted=False QuotaExceeded names the quota and the request",
            || async {
                let s = status(&jobs, "big").await?;
                not_rejected(&s)?;
                Ok(s.conditions.iter().any(|c| {
                    c.type_ == "Admitted"
                        && c.status == "False"
                        && c.reason == "QuotaExceeded"
                        && c.message.contains("team-cpu")
                        && c.message.contains("requested: requests.cpu=500m")
                }))
            },
        )
        .await?;
        let s = status(&jobs, "big").await?;
        assert_eq!(s.phase, Some(Phase::Queued), "{s:?}");
        let events: Api<Event> = ns.api();
        wait_until(TIMEOUT, "a Warning Event QuotaExceeded", || async {
            Ok(events
                .list(&ListParams::default())
                .await?
                .items
                .iter()
                .any(|e| {
                    e.involved_object.name.as_deref() == Some("big")
                        && e.type_.as_deref() == Some("Warning")
                        && e.reason.as_deref() == Some("QuotaExceeded")
                }))
        })
        .await?;

        // No part of the gang is kept while it waits, and none of it is ever placed.
        wait_until(TIMEOUT, "no pod of the gang is left", || async {
            Ok(gang(&pods, "big").await?.is_empty())
        })
        .await?;
        let watch_until = tokio::time::Instant::now() + Duration::from_secs(8);
        while tokio::time::Instant::now() < watch_until {
            for p in gang(&pods, "big").await? {
                assert!(
                    !bound(&p) && !running(&p),
                    "pod {:?} of a gang its quota cannot hold was placed",
                    p.metadata.name
                );
            }
            not_rejected(&status(&jobs, "big").await?)?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // The quota is raised: the next try makes the whole gang, and it runs.
        quotas
            .patch(
                "team-cpu",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"hard": {"requests.cpu": "2"}}})),
            )
            .await?;
        wait_until(
            Duration::from_secs(180),
            "big runs with both ranks",
            || async {
                let s = status(&jobs, "big").await?;
                not_rejected(&s)?;
                let ranks = gang(&pods, "big").await?;
                Ok(
                    s.phase == Some(Phase::Running)
                        && ranks.len() == 2
                        && ranks.iter().all(running),
                )
            },
        )
        .await?;
        let s = status(&jobs, "big").await?;
        let admitted = s
            .conditions
            .iter()
            .find(|c| c.type_ == "Admitted")
            .expect("an Admitted condition");
        assert_eq!(
            (admitted.status.as_str(), admitted.reason.as_str()),
            ("True", "GangAdmitted"),
            "the quota condition is cleared: {admitted:?}"
        );
        Ok(())
    })
    .await
}
