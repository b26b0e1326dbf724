//! A requested gang restart (the `lockstep.dev/restarted-at` annotation, as `kubectl lockstep
//! restart` or `kubectl annotate` sets it) against the real control plane: the running gang is
//! deleted and the next attempt starts at once, without a recorded failure and without counting
//! against `maxRestarts`; a job created with the annotation does not restart; a finished job
//! ignores it with a Warning Event.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use lockstep_api::contract::{annotations, labels};
use lockstep_api::status::{Phase, condition_types, reasons};
use lockstep_api::{ParallelJob, ParallelJobStatus};
use lockstep_e2e::{TestNamespace, terminate_worker, wait_until, with_namespace};

const TIMEOUT: Duration = Duration::from_secs(90);

/// The ddp-digits example named `name` with two ranks, no gang restart after a failure
/// (`maxRestarts: 0`) and a long restart backoff, with `annotation` as its restarted-at value.
async fn create_job(
    ns: &TestNamespace,
    name: &str,
    annotation: Option<&str>,
) -> anyhow::Result<Api<ParallelJob>> {
    let mut v = lockstep_e2e::example_manifest("ddp-digits.yaml")?;
    v["metadata"]["name"] = name.into();
    if let Some(value) = annotation {
        v["metadata"]["annotations"] = serde_json::json!({ annotations::RESTARTED_AT: value });
    }
    v["spec"]["parallelism"]["dataParallel"] = 2.into();
    // A requested restart waits for no backoff: one minute would show.
    v["spec"]["failurePolicy"] = serde_json::json!({
        "maxRestarts": 0,
        "restartBackoff": {"initialSeconds": 60, "maxSeconds": 60}
    });
    let jobs: Api<ParallelJob> = ns.api();
    jobs.create(&PostParams::default(), &serde_json::from_value(v)?)
        .await?;
    Ok(jobs)
}

async fn status(jobs: &Api<ParallelJob>, name: &str) -> anyhow::Result<ParallelJobStatus> {
    Ok(jobs.get(name).await?.status.unwrap_or_default())
}

/// Sets the restarted-at annotation of job `name` to `value`, as a user does.
async fn request_restart(ns: &TestNamespace, name: &str, value: &str) -> anyhow::Result<()> {
    ns.cluster
        .kubectl(&[
            "annotate",
            "--overwrite",
            "-n",
            &ns.name,
            "paralleljob",
            name,
            &format!("{}={value}", annotations::RESTARTED_AT),
        ])
        .await?;
    Ok(())
}

/// The Events of the namespace with `reason`: (type, message) of each.
async fn events(ns: &TestNamespace, reason: &str) -> anyhow::Result<Vec<(String, String)>> {
    Ok(ns
        .api::<Event>()
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .map(|e| (e.type_.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect())
}

/// Every phase the job `name` is seen in from now on, in order (repeats merged).
fn watch_phases(jobs: &Api<ParallelJob>, name: &str) -> Arc<Mutex<Vec<Phase>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let stream = watcher(jobs.clone(), config).applied_objects();
    let into = seen.clone();
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(Ok(job)) = stream.next().await {
            if let Some(phase) = job.status.and_then(|s| s.phase) {
                let mut seen = into.lock().unwrap();
                if seen.last() != Some(&phase) {
                    seen.push(phase);
                }
            }
        }
    });
    seen
}

async fn gang_uids(pods: &Api<Pod>, job: &str) -> anyhow::Result<Vec<(String, String)>> {
    let list = pods
        .list(&ListParams::default().labels(&format!("{}={job}", labels::JOB_NAME)))
        .await?;
    let mut uids: Vec<(String, String)> = list
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| {
            let attempt = p
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(labels::ATTEMPT).cloned())
                .unwrap_or_default();
            (attempt, p.metadata.uid.unwrap_or_default())
        })
        .collect();
    uids.sort();
    Ok(uids)
}

#[tokio::test]
async fn a_requested_restart_starts_the_next_attempt_without_counting_against_max_restarts()
-> anyhow::Result<()> {
    with_namespace("restart-requested", |ns| async move {
        let jobs = create_job(&ns, "rr", None).await?;
        wait_until(TIMEOUT, "rr runs", || async {
            Ok(status(&jobs, "rr").await?.phase == Some(Phase::Running))
        })
        .await?;
        let pods: Api<Pod> = ns.api();
        let before = gang_uids(&pods, "rr").await?;
        assert_eq!(before.len(), 2);
        assert!(before.iter().all(|(attempt, _)| attempt == "0"));

        for (attempt, value) in [(1, "2026-12-03T22:00:00Z"), (2, "2026-12-03T22:10:00Z")] {
            let phases = watch_phases(&jobs, "rr");
            // The watch has delivered the job as it is before the request.
            wait_until(TIMEOUT, "the watch sees the job", || async {
                Ok(!phases.lock().unwrap().is_empty())
            })
            .await?;
            request_restart(&ns, "rr", value).await?;
            // Within the 60 s backoff a failure's restart would wait.
            wait_until(
                Duration::from_secs(45),
                &format!("attempt {attempt} runs"),
                || async {
                    let s = status(&jobs, "rr").await?;
                    Ok(s.attempt == attempt && s.phase == Some(Phase::Running))
                },
            )
            .await?;
            let s = status(&jobs, "rr").await?;
            assert_eq!(s.restarted_at.as_deref(), Some(value));
            assert_eq!(s.requested_restarts, attempt);
            assert_eq!(s.last_failure, None, "a requested restart is no failure");
            assert!(
                !s.conditions
                    .iter()
                    .any(|c| c.type_ == condition_types::FAILED && c.status == "True"),
                "{:?}",
                s.conditions
            );
            let seen = phases.lock().unwrap().clone();
            let restarting = seen.iter().position(|p| *p == Phase::Restarting);
            assert!(
                restarting.is_some_and(|i| seen[i + 1..].contains(&Phase::Running)),
                "the job went Running -> Restarting -> Running: {seen:?}"
            );
            // A new gang: new pods of the new attempt.
            let now = gang_uids(&pods, "rr").await?;
            assert_eq!(now.len(), 2, "{now:?}");
            assert!(
                now.iter()
                    .all(|(a, uid)| *a == attempt.to_string()
                        && !before.iter().any(|(_, u)| u == uid)),
                "{before:?} -> {now:?}"
            );
            wait_until(
                Duration::from_secs(30),
                "a RestartRequested Event naming the value",
                || async {
                    Ok(events(&ns, reasons::RESTART_REQUESTED)
                        .await?
                        .iter()
                        .any(|(t, m)| t == "Normal" && m.contains(value)))
                },
            )
            .await?;
        }
        assert!(
            events(&ns, reasons::GANG_RESTARTING).await?.is_empty(),
            "no failure restart"
        );

        // A failure still counts against maxRestarts (0): the job fails.
        terminate_worker(&pods, "rr-1", 1).await?;
        wait_until(TIMEOUT, "rr fails", || async {
            Ok(status(&jobs, "rr").await?.phase == Some(Phase::Failed))
        })
        .await?;
        let s = status(&jobs, "rr").await?;
        let failed = s
            .conditions
            .iter()
            .find(|c| c.type_ == condition_types::FAILED)
            .unwrap();
        assert_eq!(failed.reason, reasons::BACKOFF_LIMIT_EXCEEDED);
        assert_eq!(s.last_failure.map(|f| (f.rank, f.attempt)), Some((1, 2)));
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_job_created_with_the_annotation_does_not_restart() -> anyhow::Result<()> {
    with_namespace("restart-at-create", |ns| async move {
        let value = "2026-12-03T21:00:00Z";
        let jobs = create_job(&ns, "rc", Some(value)).await?;
        wait_until(TIMEOUT, "rc runs", || async {
            Ok(status(&jobs, "rc").await?.phase == Some(Phase::Running))
        })
        .await?;
        let s = status(&jobs, "rc").await?;
        assert_eq!((s.attempt, s.requested_restarts), (0, 0));
        assert_eq!(
            s.restarted_at.as_deref(),
            Some(value),
            "recorded as answered"
        );
        // The Events of the start are out: none says a restart was asked for.
        wait_until(Duration::from_secs(30), "a GangStarted Event", || async {
            Ok(!events(&ns, reasons::GANG_STARTED).await?.is_empty())
        })
        .await?;
        assert_eq!(events(&ns, reasons::RESTART_REQUESTED).await?, []);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_finished_job_ignores_a_requested_restart_with_a_warning() -> anyhow::Result<()> {
    with_namespace("restart-finished", |ns| async move {
        let jobs = create_job(&ns, "rf", None).await?;
        wait_until(TIMEOUT, "rf runs", || async {
            Ok(status(&jobs, "rf").await?.phase == Some(Phase::Running))
        })
        .await?;
        let pods: Api<Pod> = ns.api();
        for p in ["rf-0", "rf-1"] {
            terminate_worker(&pods, p, 0).await?;
        }
        wait_until(TIMEOUT, "rf succeeds", || async {
            Ok(status(&jobs, "rf").await?.phase == Some(Phase::Succeeded))
        })
        .await?;
        let value = "2026-12-03T23:00:00Z";
        request_restart(&ns, "rf", value).await?;
        wait_until(TIMEOUT, "the request is answered", || async {
            Ok(status(&jobs, "rf").await?.restarted_at.as_deref() == Some(value))
        })
        .await?;
        let s = status(&jobs, "rf").await?;
        assert_eq!((s.phase, s.attempt), (Some(Phase::Succeeded), 0));
        wait_until(
            Duration::from_secs(30),
            "a RestartIgnored Warning",
            || async {
                Ok(events(&ns, reasons::RESTART_IGNORED)
                    .await?
                    .iter()
                    .any(|(t, m)| t == "Warning" && m.contains(value) && m.contains("Succeeded")))
            },
        )
        .await?;
        Ok(())
    })
    .await
}
