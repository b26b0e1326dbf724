//! Jobs in real pods, on the real node of `make cluster-up REAL_NODES=1`: the worker image of
//! `make images`, the env contract, the token, rendezvous through the ranks' DNS names, training,
//! progress written with the pod's ServiceAccount, exit codes and the job's status (with a failed
//! rank's last log lines), as a user's first `kubectl apply` takes them.
//!
//! Ignored in `make e2e` (they need root, the node's build and the worker image): `make e2e-real`
//! runs them.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use lockstep_api::ParallelJob;
use lockstep_api::contract::{labels, ports};
use lockstep_api::status::Phase;
use lockstep_e2e::{example_manifest, wait_until, with_namespace};

/// The real node's name and the label and taint that keep other pods off it (realnode.sh).
pub(crate) const NODE: &str = "lockstep-real-0";
pub(crate) const NODE_LABEL: &str = "lockstep.dev/real-node";

/// The real node has the machine's few cores: its tests run one at a time, so that each gang is
/// admitted at once and its timings are its own.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits (up to 5 minutes) until the job `ddp-digits` has Succeeded.
async fn succeeded(jobs: &Api<ParallelJob>) -> anyhow::Result<()> {
    wait_until(Duration::from_secs(300), "Succeeded", || async {
        Ok(jobs.get("ddp-digits").await?.status.and_then(|s| s.phase) == Some(Phase::Succeeded))
    })
    .await
}

/// An example pinned to the real node.
pub(crate) fn on_the_real_node(example: &str) -> anyhow::Result<serde_json::Value> {
    let mut v = example_manifest(example)?;
    let spec = &mut v["spec"]["template"]["spec"];
    spec["nodeSelector"] = serde_json::json!({ NODE_LABEL: "true" });
    spec["tolerations"] = serde_json::json!([{"key": NODE_LABEL, "operator": "Exists"}]);
    Ok(v)
}

/// Creates the `ddp-digits` job `v` and waits (up to 2 minutes) until rank 0 reports a step.
async fn create_and_wait_training(
    jobs: &Api<ParallelJob>,
    v: serde_json::Value,
) -> anyhow::Result<()> {
    jobs.create(&PostParams::default(), &serde_json::from_value(v)?)
        .await?;
    wait_until(Duration::from_secs(120), "training", || async {
        let s = jobs.get("ddp-digits").await?.status.unwrap_or_default();
        Ok(s.progress.is_some_and(|p| p.step > 0))
    })
    .await
}

/// Checks that the job `job` had `ranks` pods, each on the real node with its worker exited 0.
pub(crate) async fn ranks_ran_on_the_real_node_and_exited_0(
    pods: &Api<Pod>,
    job: &str,
    ranks: usize,
) -> anyhow::Result<()> {
    let list = pods
        .list(&ListParams::default().labels(&format!("{}={job}", labels::JOB_NAME)))
        .await?;
    anyhow::ensure!(list.items.len() == ranks, "{:?}", list.items);
    for p in list.items {
        let name = p.metadata.name.unwrap_or_default();
        let node = p.spec.and_then(|s| s.node_name);
        let code = p
            .status
            .and_then(|s| s.container_statuses)
            .and_then(|c| c.into_iter().next())
            .and_then(|c| c.state)
            .and_then(|s| s.terminated)
            .map(|t| t.exit_code);
        anyhow::ensure!(
            (node.as_deref(), code) == (Some(NODE), Some(0)),
            "{name}: node {node:?}, exit code {code:?}"
        );
    }
    Ok(())
}

#[tokio::test]
#[ignore = "needs the real node and the worker image: make e2e-real"]
async fn ddp_digits_trains_in_real_pods_to_succeeded_with_its_progress_and_metrics()
-> anyhow::Result<()> {
    let _node = ONE_AT_A_TIME.lock().await;
    with_namespace("real-ddp", |ns| async move {
        let jobs: Api<ParallelJob> = ns.api();
        let mut v = on_the_real_node("ddp-digits.yaml")?;
        // Long enough (15 to 20 s here) to watch it run and scrape rank 0 before it exits; the
        // example trains 40 epochs, and 400 take 2 s since the CPU backend keeps small kernels
        // on one thread.
        v["spec"]["training"]["epochs"] = 3000.into();
        jobs.create(&PostParams::default(), &serde_json::from_value(v)?)
            .await?;

        // While it runs: the Step and Loss columns fill, and rank 0's /metrics answers through
        // the API server's pod proxy with the training series, labelled with job and rank.
        wait_until(Duration::from_secs(120), "a reported step", || async {
            let s = jobs.get("ddp-digits").await?.status.unwrap_or_default();
            Ok(s.phase == Some(Phase::Running)
                && s.progress
                    .as_ref()
                    .is_some_and(|p| p.step > 0 && p.loss.is_some()))
        })
        .await?;
        let path = format!(
            "/api/v1/namespaces/{}/pods/ddp-digits-0:{}/proxy/metrics",
            ns.name,
            ports::METRICS
        );
        let metrics = ns.cluster.kubectl(&["get", "--raw", &path]).await?;
        let step = metrics
            .lines()
            .find(|l| l.starts_with("lockstep_worker_step{"))
            .unwrap_or_else(|| panic!("no lockstep_worker_step in:\n{metrics}"));
        assert!(
            step.contains("job_name=\"ddp-digits\"") && step.contains("rank=\"0\""),
            "{step}"
        );

        succeeded(&jobs).await?;
        let status = jobs.get("ddp-digits").await?.status.unwrap_or_default();
        let progress = status.progress.expect("progress");
        assert_eq!(Some(progress.step), progress.total_steps, "{progress:?}");
        let accuracy = progress.eval_metric.expect("the final accuracy");
        assert!(accuracy >= 0.95, "accuracy {accuracy}");
        assert_eq!(status.attempt, 0, "no restart");

        // Both ranks ran on the real node and exited 0.
        ranks_ran_on_the_real_node_and_exited_0(&ns.api(), "ddp-digits", 2).await
    })
    .await
}

/// The pid of the worker process of `rank` of job `job` in namespace `ns`, found by its env
/// contract (the test runs on the real node's machine).
/// Mounts a host folder that every rank shares at the checkpoint path of the job `v` (a folder
/// the workers' user may write), and returns it.
fn shared_checkpoints(ns: &str, v: &mut serde_json::Value) -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("lockstep-{ns}"));
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
    let spec = &mut v["spec"]["template"]["spec"];
    spec["volumes"] = serde_json::json!([{"name": "checkpoints",
        "hostPath": {"path": dir.to_string_lossy(), "type": "Directory"}}]);
    spec["containers"][0]["volumeMounts"] = serde_json::json!([{"name": "checkpoints",
        "mountPath": lockstep_api::contract::paths::CHECKPOINT_DIR}]);
    Ok(dir)
}

/// The step rank 0's log says the gang resumed from.
fn resumed_step(log: &str) -> u64 {
    lockstep_e2e::resumed_step(log).unwrap_or_else(|| panic!("attempt 1 did not resume:\n{log}"))
}

#[tokio::test]
#[ignore = "needs the real node and the worker image: make e2e-real"]
async fn a_rank_killed_for_real_restarts_the_gang_from_its_checkpoint_naming_that_rank()
-> anyhow::Result<()> {
    let _node = ONE_AT_A_TIME.lock().await;
    with_namespace("real-kill", |ns| async move {
        let jobs: Api<ParallelJob> = ns.api();
        let mut v = on_the_real_node("ddp-digits.yaml")?;
        let interval = 500;
        // Several seconds of training (about 4,000 steps a second), so that the kill lands
        // while it trains.
        v["spec"]["training"]["epochs"] = 3000.into();
        v["spec"]["training"]["checkpoint"] = serde_json::json!({"everySteps": interval});
        let top = shared_checkpoints(&ns.name, &mut v)?;
        let created = jobs
            .create(&PostParams::default(), &serde_json::from_value(v)?)
            .await?;
        // A job keeps its checkpoints in a folder of its own, `<path>/<job>/<uid>`.
        let dir = top
            .join("ddp-digits")
            .join(created.metadata.uid.expect("the API server gives a UID"));

        // Past the first checkpoints, rank 1's worker process is killed inside its container.
        wait_until(Duration::from_secs(120), "two checkpoints", || async {
            Ok(std::fs::read_dir(&dir)?.count() >= 2)
        })
        .await?;
        let pid =
            lockstep_e2e::worker_pid(&ns.name, "ddp-digits", 1).expect("rank 1's worker process");
        // The last checkpoint before the kill: the next attempt must resume from it (or a later
        // one), losing no more than the checkpoint interval.
        let latest_before = *checkpoint_steps(&dir).last().expect("a checkpoint");
        kill_9(pid)?;
        let killed = std::time::Instant::now();
        wait_until(Duration::from_secs(30), "the gang restarting", || async {
            let s = jobs.get("ddp-digits").await?.status.unwrap_or_default();
            Ok(s.attempt == 1)
        })
        .await?;
        let stopped = killed.elapsed();

        succeeded(&jobs).await?;
        let status = jobs.get("ddp-digits").await?.status.unwrap_or_default();
        let f = status.last_failure.expect("the first failure");
        assert_eq!(
            (
                f.attempt,
                f.rank,
                f.pod.as_str(),
                f.node.as_deref(),
                f.exit_code
            ),
            (0, 1, "ddp-digits-1", Some(NODE), Some(137)),
            "{f:?}"
        );
        // Its last log lines outlive its pod: read before the gang was deleted.
        let tail = f.log_tail.as_deref().unwrap_or_default();
        assert!(
            tail.contains("training on the") && tail.lines().count() <= 50 && tail.len() <= 8192,
            "the log tail of the killed rank: {tail:?}"
        );
        assert!(
            stopped < Duration::from_secs(5),
            "the gang took {stopped:?} to stop"
        );
        // The next attempt resumed from a checkpoint of the first, and trained to the end.
        let log = ns
            .cluster
            .kubectl(&["logs", "-n", &ns.name, "ddp-digits-0"])
            .await?;
        let resumed = resumed_step(&log);
        assert!(
            resumed >= latest_before && resumed.is_multiple_of(interval),
            "resumed from {resumed}, the last checkpoint before the kill was {latest_before}"
        );
        let progress = status.progress.expect("progress");
        assert_eq!(Some(progress.step), progress.total_steps);
        let _ = std::fs::remove_dir_all(&top);
        Ok(())
    })
    .await
}

#[tokio::test]
#[ignore = "needs the real node and the worker image: make e2e-real"]
async fn a_pipeline_stage_killed_for_real_restarts_the_gang_from_every_stages_shard()
-> anyhow::Result<()> {
    let _node = ONE_AT_A_TIME.lock().await;
    with_namespace("real-pipeline", |ns| async move {
        let jobs: Api<ParallelJob> = ns.api();
        // The example (2 stages x 2 replicas, 1F1B), shortened, with a shared checkpoint folder.
        let mut v = on_the_real_node("pipeline-gpt.yaml")?;
        let (steps, interval) = (60u64, 10u64);
        let training = &mut v["spec"]["training"];
        training["maxSteps"] = steps.into();
        training["optimizer"]["warmupSteps"] = 5.into();
        training["checkpoint"] = serde_json::json!({"everySteps": interval, "keep": 2});
        training["evaluation"] = serde_json::json!({"everySteps": steps, "maxBatches": 2});
        v["spec"]["template"]["spec"]["containers"][0]["resources"] =
            serde_json::json!({"requests": {"cpu": "250m"}});
        let top = shared_checkpoints(&ns.name, &mut v)?;
        let created = jobs
            .create(&PostParams::default(), &serde_json::from_value(v)?)
            .await?;
        let dir = top
            .join("pipeline-gpt")
            .join(created.metadata.uid.expect("the API server gives a UID"));
        // The newest step with both stages' shards in the folder.
        let complete = |dir: &std::path::Path| -> anyhow::Result<Option<u64>> {
            let mut shards: std::collections::BTreeMap<u64, usize> = Default::default();
            for e in std::fs::read_dir(dir)?.flatten() {
                let name = e.file_name().into_string().unwrap_or_default();
                if let Some(step) = name
                    .strip_prefix("step-")
                    .and_then(|r| r.split_once(".stage-"))
                    .and_then(|(n, _)| n.parse::<u64>().ok())
                {
                    *shards.entry(step).or_default() += 1;
                }
            }
            Ok(shards.into_iter().rev().find(|s| s.1 == 2).map(|s| s.0))
        };
        wait_until(
            Duration::from_secs(180),
            "a whole pipeline checkpoint",
            || async { Ok(complete(&dir)?.is_some()) },
        )
        .await?;
        // Stage 1's first replica (rank 2) dies; the gang restarts from every stage's shard.
        let pid =
            lockstep_e2e::worker_pid(&ns.name, "pipeline-gpt", 2).expect("rank 2's worker process");
        let latest_before = complete(&dir)?.expect("a checkpoint");
        kill_9(pid)?;
        let killed = std::time::Instant::now();
        wait_until(Duration::from_secs(30), "the gang restarting", || async {
            let s = jobs.get("pipeline-gpt").await?.status.unwrap_or_default();
            Ok(s.attempt == 1)
        })
        .await?;
        let stopped = killed.elapsed();
        wait_until(Duration::from_secs(300), "Succeeded", || async {
            let s = jobs.get("pipeline-gpt").await?.status.unwrap_or_default();
            anyhow::ensure!(s.phase != Some(Phase::Failed), "the job failed: {s:?}");
            Ok(s.phase == Some(Phase::Succeeded))
        })
        .await?;
        let status = jobs.get("pipeline-gpt").await?.status.unwrap_or_default();
        let f = status.last_failure.expect("the first failure");
        assert_eq!(
            (f.attempt, f.rank, f.pod.as_str(), f.exit_code),
            (0, 2, "pipeline-gpt-2", Some(137)),
            "{f:?}"
        );
        assert!(
            stopped < Duration::from_secs(5),
            "the gang took {stopped:?} to stop"
        );
        let log = ns
            .cluster
            .kubectl(&["logs", "-n", &ns.name, "pipeline-gpt-0"])
            .await?;
        let resumed = resumed_step(&log);
        assert!(
            resumed >= latest_before && resumed.is_multiple_of(interval),
            "resumed from {resumed}, the last whole checkpoint before the kill was {latest_before}"
        );
        let p = status.progress.expect("progress");
        assert_eq!(
            (p.step, p.total_steps),
            (steps as i64, Some(steps as i64)),
            "{p:?}"
        );
        assert!(p.eval_metric.is_some(), "no validation loss: {p:?}");
        let _ = std::fs::remove_dir_all(&top);
        Ok(())
    })
    .await
}

fn kill_9(pid: i32) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill -9 {pid} failed");
    Ok(())
}

/// The steps of the checkpoints in `dir` (`step-<n>.safetensors`).
fn checkpoint_steps(dir: &std::path::Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_prefix("step-")?
                .strip_suffix(".safetensors")?
                .parse::<u64>()
                .ok()
        })
        .collect();
    steps.sort_unstable();
    steps
}

#[tokio::test]
#[ignore = "needs the real node and the worker image: make e2e-real"]
async fn a_job_kueue_preempts_in_real_pods_checkpoints_waits_and_resumes_where_it_stopped()
-> anyhow::Result<()> {
    let test = "a_job_kueue_preempts_in_real_pods_checkpoints_waits_and_resumes_where_it_stopped";
    let _node = ONE_AT_A_TIME.lock().await;
    crate::kueue::with_kueue(test, "real-kueue", &["low", "high"], |ns| async move {
        use crate::kueue::{cluster_queue, events, priority_classes};
        // One CPU of quota on a flavor of the real node: room for one job of two 500m ranks.
        let placement = serde_json::json!({
            "nodeSelector": { NODE_LABEL: "true" },
            "tolerations": [{"key": NODE_LABEL, "operator": "Exists"}],
        });
        cluster_queue(
            &ns,
            &placement,
            serde_json::json!([
                {"name": "cpu", "nominalQuota": 1}, {"name": "memory", "nominalQuota": "8Gi"},
            ]),
        )
        .await?;
        priority_classes(&ns, &[("low", 100), ("high", 1000)]).await?;
        let jobs: Api<ParallelJob> = ns.api();
        let job = |name: &str, class: &str, epochs: i64| -> anyhow::Result<serde_json::Value> {
            let mut v = example_manifest("ddp-digits.yaml")?;
            v["metadata"]["name"] = name.into();
            v["metadata"]["labels"] = serde_json::json!({"kueue.x-k8s.io/queue-name": "team"});
            v["spec"]["scheduling"] =
                serde_json::json!({"priorityClassName": format!("{}-{class}", ns.name)});
            v["spec"]["training"]["epochs"] = epochs.into();
            Ok(v)
        };
        let mut low = job("low", "low", 3000)?;
        low["spec"]["training"]["checkpoint"] = serde_json::json!({"everySteps": 500});
        let top = shared_checkpoints(&ns.name, &mut low)?;
        let created = jobs
            .create(&PostParams::default(), &serde_json::from_value(low)?)
            .await?;
        let dir = top.join("low").join(created.metadata.uid.expect("a UID"));
        wait_until(
            Duration::from_secs(120),
            "a checkpoint of the low job",
            || async { Ok(!checkpoint_steps(&dir).is_empty()) },
        )
        .await?;

        let before = *checkpoint_steps(&dir).last().expect("a checkpoint");
        // The urgent job takes its quota: Kueue evicts the low one, whose ranks save a
        // checkpoint of the step they are at on SIGTERM and exit.
        jobs.create(
            &PostParams::default(),
            &serde_json::from_value(job("urgent", "high", 40)?)?,
        )
        .await?;
        let pods: Api<Pod> = ns.api();
        let selector = format!("{}=low", labels::JOB_NAME);
        wait_until(
            Duration::from_secs(60),
            "the low job's pods are gone",
            || async {
                Ok(pods
                    .list(&ListParams::default().labels(&selector))
                    .await?
                    .items
                    .is_empty())
            },
        )
        .await?;
        assert!(
            events(&ns, "low")
                .await?
                .iter()
                .any(|(r, m)| r == "Evicted" && m.contains("Preempted")),
            "{:?}",
            events(&ns, "low").await?
        );
        let stopped_at = *checkpoint_steps(&dir).last().expect("checkpoints");
        assert!(
            stopped_at > before,
            "no checkpoint of the step it stopped at: {stopped_at}"
        );
        wait_until(
            Duration::from_secs(300),
            "the urgent job succeeds",
            || async {
                Ok(
                    jobs.get("urgent").await?.status.and_then(|s| s.phase)
                        == Some(Phase::Succeeded),
                )
            },
        )
        .await?;
        // Admitted again, the low job resumes from the step it stopped at: nothing lost.
        wait_until(
            Duration::from_secs(120),
            "the low job trains again",
            || async {
                let s = jobs.get("low").await?.status.unwrap_or_default();
                Ok(s.phase == Some(Phase::Running)
                    && s.progress.is_some_and(|p| p.step > stopped_at as i64))
            },
        )
        .await?;
        let log = ns
            .cluster
            .kubectl(&["logs", "-n", &ns.name, "low-0"])
            .await?;
        assert_eq!(resumed_step(&log), stopped_at, "{log}");
        let status = jobs.get("low").await?.status.unwrap_or_default();
        assert_eq!(status.attempt, 0, "an eviction is not a restart");
        assert!(status.last_failure.is_none(), "{:?}", status.last_failure);
        jobs.delete("low", &kube::api::DeleteParams::foreground())
            .await?;
        let _ = std::fs::remove_dir_all(&top);
        Ok(())
    })
    .await
}

#[tokio::test]
#[ignore = "needs the real node and the worker image: make e2e-real"]
async fn deleting_a_running_job_stops_its_real_pods_in_seconds_not_the_grace_period()
-> anyhow::Result<()> {
    let _node = ONE_AT_A_TIME.lock().await;
    with_namespace("real-delete", |ns| async move {
        let jobs: Api<ParallelJob> = ns.api();
        let mut v = on_the_real_node("ddp-digits.yaml")?;
        v["spec"]["training"]["epochs"] = 100_000.into();
        create_and_wait_training(&jobs, v).await?;
        let deleted = std::time::Instant::now();
        jobs.delete("ddp-digits", &kube::api::DeleteParams::foreground())
            .await?;
        let pods: Api<Pod> = ns.api();
        let selector = format!("{}=ddp-digits", labels::JOB_NAME);
        wait_until(Duration::from_secs(60), "the pods gone", || async {
            Ok(pods
                .list(&ListParams::default().labels(&selector))
                .await?
                .items
                .is_empty())
        })
        .await?;
        let took = deleted.elapsed();
        // The pods' grace period is 30 s: a worker that ignores SIGTERM takes all of it.
        assert!(
            took < Duration::from_secs(10),
            "the pods took {took:?} to go"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
#[ignore = "needs the real node and the worker image: make e2e-real"]
async fn the_example_trains_in_real_pods_of_a_namespace_that_enforces_the_restricted_level()
-> anyhow::Result<()> {
    let _node = ONE_AT_A_TIME.lock().await;
    with_namespace("real-restricted", |ns| async move {
        crate::restricted::enforce_restricted(&ns.cluster.client, &ns.name).await?;
        let jobs: Api<ParallelJob> = ns.api();
        let v = on_the_real_node("ddp-digits.yaml")?;
        jobs.create(&PostParams::default(), &serde_json::from_value(v)?)
            .await?;
        succeeded(&jobs).await
    })
    .await
}

#[tokio::test]
#[ignore = "needs the real node and the worker image: make e2e-real"]
async fn a_short_gpt_shakespeare_run_trains_in_real_pods_and_its_loss_falls() -> anyhow::Result<()>
{
    let _node = ONE_AT_A_TIME.lock().await;
    with_namespace("real-gpt", |ns| async move {
        let jobs: Api<ParallelJob> = ns.api();
        let mut v = on_the_real_node("gpt-shakespeare.yaml")?;
        let steps = 30;
        let training = &mut v["spec"]["training"];
        training["maxSteps"] = steps.into();
        training["optimizer"]["warmupSteps"] = 5.into();
        training["evaluation"] = serde_json::json!({"everySteps": steps, "maxBatches": 2});
        jobs.create(&PostParams::default(), &serde_json::from_value(v)?)
            .await?;
        wait_until(Duration::from_secs(300), "Succeeded", || async {
            let s = jobs
                .get("gpt-shakespeare")
                .await?
                .status
                .unwrap_or_default();
            anyhow::ensure!(s.phase != Some(Phase::Failed), "the job failed: {s:?}");
            Ok(s.phase == Some(Phase::Succeeded))
        })
        .await?;
        let status = jobs
            .get("gpt-shakespeare")
            .await?
            .status
            .unwrap_or_default();
        let p = status.progress.expect("progress");
        assert_eq!((p.step, p.total_steps), (steps, Some(steps)), "{p:?}");
        // A character model starts at ln(65) = 4.17 (a uniform guess over the vocabulary).
        let loss = p.loss.expect("the loss");
        assert!(loss < 3.9, "the loss did not fall: {loss}");
        assert!(p.eval_metric.is_some(), "no validation loss: {p:?}");
        Ok(())
    })
    .await
}

#[tokio::test]
#[ignore = "needs the real node and the worker image: make e2e-real"]
async fn a_gang_restart_after_a_deleted_pod_takes_seconds_not_the_grace_period()
-> anyhow::Result<()> {
    let _node = ONE_AT_A_TIME.lock().await;
    with_namespace("real-restart", |ns| async move {
        let jobs: Api<ParallelJob> = ns.api();
        let mut v = on_the_real_node("ddp-digits.yaml")?;
        v["spec"]["training"]["epochs"] = 100_000.into();
        v["spec"]["failurePolicy"]["restartBackoff"] =
            serde_json::json!({"initialSeconds": 0, "maxSeconds": 0});
        create_and_wait_training(&jobs, v).await?;
        // A pod deleted (as a drain or a user would): SIGTERM to rank 1, the gang restarts.
        let pods: Api<Pod> = ns.api();
        let deleted = std::time::Instant::now();
        pods.delete("ddp-digits-1", &kube::api::DeleteParams::default())
            .await?;
        let selector = format!("{}=ddp-digits", labels::JOB_NAME);
        wait_until(Duration::from_secs(60), "attempt 0's pods gone", || async {
            Ok(pods
                .list(&ListParams::default().labels(&selector))
                .await?
                .items
                .iter()
                .all(|p| {
                    p.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(labels::ATTEMPT))
                        != Some(&"0".to_string())
                }))
        })
        .await?;
        let took = deleted.elapsed();
        // The pods' grace period is 30 s: a worker that ignores SIGTERM takes all of it.
        assert!(
            took < Duration::from_secs(10),
            "attempt 0's pods took {took:?} to go"
        );
        let status = jobs.get("ddp-digits").await?.status.unwrap_or_default();
        assert_eq!(status.attempt, 1);
        let f = status.last_failure.expect("the failure");
        assert_eq!((f.rank, f.pod.as_str()), (1, "ddp-digits-1"), "{f:?}");
        // Until attempt 1's rank 0 reports, the Step column does not show attempt 0's step.
        if let Some(p) = status.progress {
            assert_eq!(p.attempt, Some(1), "{p:?}");
        }
        wait_until(Duration::from_secs(120), "attempt 1 trains", || async {
            let s = jobs.get("ddp-digits").await?.status.unwrap_or_default();
            Ok(s.phase == Some(Phase::Running)
                && s.progress
                    .is_some_and(|p| p.attempt == Some(1) && p.step > 0))
        })
        .await?;
        Ok(())
    })
    .await
}

#[tokio::test]
#[ignore = "needs the real node and the operator and worker images: make e2e-real"]
async fn the_operator_installed_by_helm_from_its_image_leads_and_takes_a_job_to_succeeded()
-> anyhow::Result<()> {
    let _node = ONE_AT_A_TIME.lock().await;
    with_namespace("real-helm", |ns| async move {
        let c = ns.cluster.clone();
        // The operator and the workers under the restricted Pod Security level.
        crate::restricted::enforce_restricted(&c.client, &ns.name).await?;
        let release = ns.name.clone();
        let full = format!("{release}-lockstep");
        let controller_name = format!("e2e.lockstep.dev/{}", ns.name);
        let _leftovers = crate::chart::Leftovers {
            cluster: c.clone(),
            release: release.clone(),
            namespace: ns.name.clone(),
            jobs_namespace: ns.name.clone(),
            uninstalled: std::cell::Cell::new(false),
        };
        let chart = crate::chart::chart_dir();
        let controller = format!("operator.controllerName={controller_name}");
        let node_selector = format!(r#"nodeSelector={{"{NODE_LABEL}":"true"}}"#);
        let tolerations = format!(r#"tolerations=[{{"key":"{NODE_LABEL}","operator":"Exists"}}]"#);
        // The image from `make images`, imported into the node: never pulled.
        c.helm(&[
            "install",
            &release,
            &chart,
            "-n",
            &ns.name,
            "--wait",
            "--timeout",
            "180s",
            "--set",
            "replicaCount=1,image.pullPolicy=Never,operator.logFormat=text",
            "--set",
            &controller,
            "--set-json",
            &node_selector,
            "--set-json",
            &tolerations,
        ])
        .await?;
        let pods: Api<Pod> = ns.api();
        let operator = pods
            .list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={release}")))
            .await?
            .items
            .into_iter()
            .next()
            .expect("the operator's pod");
        let operator_pod = operator.metadata.name.clone().unwrap_or_default();
        assert_eq!(
            operator.spec.as_ref().and_then(|s| s.node_name.as_deref()),
            Some(NODE)
        );
        let leases: Api<k8s_openapi::api::coordination::v1::Lease> = ns.api();
        wait_until(
            Duration::from_secs(60),
            "the operator leads on its Lease",
            || async {
                let holder = leases
                    .get_opt(&full)
                    .await?
                    .and_then(|l| l.spec?.holder_identity)
                    .unwrap_or_default();
                Ok(holder == operator_pod)
            },
        )
        .await?;

        // A job for that operator alone (the test's own operator leaves it to it).
        let jobs: Api<ParallelJob> = ns.api();
        let mut v = on_the_real_node("ddp-digits.yaml")?;
        v["spec"]["managedBy"] = controller_name.clone().into();
        jobs.create(&PostParams::default(), &serde_json::from_value(v)?)
            .await?;
        succeeded(&jobs).await?;
        let status = jobs.get("ddp-digits").await?.status.unwrap_or_default();
        assert!(
            status
                .progress
                .as_ref()
                .and_then(|p| p.eval_metric)
                .is_some_and(|a| a >= 0.95),
            "{status:?}"
        );

        // Its /metrics through the API server's service proxy: it reconciled that job.
        let path = format!(
            "/api/v1/namespaces/{}/services/{full}-metrics:metrics/proxy/metrics",
            ns.name
        );
        let metrics = c.kubectl(&["get", "--raw", &path]).await?;
        let reconciles: f64 = metrics
            .lines()
            .filter(|l| l.starts_with("lockstep_operator_reconcile_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert!(reconciles > 0.0, "no reconciles in:\n{metrics}");
        c.helm(&["uninstall", &release, "-n", &ns.name, "--wait"])
            .await?;
        _leftovers.uninstalled.set(true);
        Ok(())
    })
    .await
}

#[path = "real_node_plugin.rs"]
mod plugin;
