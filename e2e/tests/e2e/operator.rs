//! The operator reconciles ParallelJobs into gangs that run, fail and restart as one, against the
//! real control plane. kwok moves scheduled pods to Running; the tests play the worker's part by
//! writing the pod status a kubelet would report (a container terminated with an exit code).

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use lockstep_api::contract::labels;
use lockstep_api::status::Phase;
use lockstep_api::{ParallelJob, contract};
use lockstep_e2e::{TestNamespace, terminate_worker as terminate, wait_until};

const TIMEOUT: Duration = Duration::from_secs(90);

/// The ddp-digits example with `ranks` ranks, a 1-second restart backoff and `extra` merged into
/// its spec.
async fn create_job(
    ns: &TestNamespace,
    name: &str,
    ranks: i32,
    extra: serde_json::Value,
) -> anyhow::Result<Api<ParallelJob>> {
    let mut v = lockstep_e2e::example_manifest("ddp-digits.yaml")?;
    v["metadata"]["name"] = name.into();
    v["spec"]["parallelism"]["dataParallel"] = ranks.into();
    v["spec"]["failurePolicy"] =
        serde_json::json!({"restartBackoff": {"initialSeconds": 1, "maxSeconds": 2}});
    if let Some(obj) = extra.as_object() {
        for (k, val) in obj {
            v["spec"][k] = val.clone();
        }
    }
    let job: ParallelJob = serde_json::from_value(v)?;
    let jobs: Api<ParallelJob> = ns.api();
    jobs.create(&PostParams::default(), &job).await?;
    Ok(jobs)
}

async fn wait_phase(
    jobs: &Api<ParallelJob>,
    name: &str,
    phase: Phase,
) -> anyhow::Result<ParallelJob> {
    wait_until(TIMEOUT, &format!("{name} is {phase:?}"), || async {
        Ok(jobs.get(name).await?.status.and_then(|s| s.phase) == Some(phase))
    })
    .await?;
    Ok(jobs.get(name).await?)
}

async fn gang(pods: &Api<Pod>, job: &str) -> anyhow::Result<Vec<Pod>> {
    Ok(pods
        .list(&ListParams::default().labels(&format!("{}={job}", labels::JOB_NAME)))
        .await?
        .items)
}

/// Waits until the EndpointSlice of `job`'s Service lists exactly `members`: each pod's hostname
/// with its address.
async fn wait_published(ns: &TestNamespace, job: &str, members: &[Pod]) -> anyhow::Result<()> {
    let mut want: Vec<(String, String)> = members
        .iter()
        .map(|p| {
            let ip = p.status.as_ref().and_then(|s| s.pod_ip.clone());
            let host = p.spec.as_ref().and_then(|s| s.hostname.clone());
            (host.unwrap_or_default(), ip.unwrap_or_default())
        })
        .collect();
    want.sort();
    anyhow::ensure!(
        want.iter().all(|(h, ip)| !h.is_empty() && !ip.is_empty()),
        "a pod without hostname or address: {want:?}"
    );
    let slices: Api<EndpointSlice> = ns.api();
    let selector = format!("{}={job}", lockstep_operator::resources::SERVICE_NAME_LABEL);
    wait_until(TIMEOUT, "the EndpointSlice lists every rank", || async {
        let list = slices
            .list(&ListParams::default().labels(&selector))
            .await?;
        let mut got: Vec<(String, String)> = list
            .items
            .into_iter()
            .flat_map(|s| s.endpoints.unwrap_or_default())
            .map(|e| (e.hostname.unwrap_or_default(), e.addresses.join(",")))
            .collect();
        got.sort();
        Ok(got == want)
    })
    .await
}

fn label(p: &Pod, key: &str) -> String {
    p.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(key).cloned())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_four_rank_job_runs_and_succeeds() -> anyhow::Result<()> {
    lockstep_e2e::with_namespace("op-success", |ns| async move {
        let jobs = create_job(&ns, "four", 4, serde_json::json!({})).await?;
        let job = wait_phase(&jobs, "four", Phase::Running).await?;
        let status = job.status.unwrap();
        assert_eq!(status.ready.as_deref(), Some("4/4"));
        assert!(status.start_time.is_some());

        let pods: Api<Pod> = ns.api();
        let members = gang(&pods, "four").await?;
        assert_eq!(members.len(), 4);
        for p in &members {
            let rank = label(p, labels::RANK);
            let spec = p.spec.as_ref().unwrap();
            assert_eq!(
                spec.hostname.as_deref(),
                Some(format!("four-{rank}").as_str())
            );
            let env: Vec<_> = spec.containers[0].env.clone().unwrap_or_default();
            let get = |k: &str| {
                env.iter()
                    .find(|e| e.name == k)
                    .and_then(|e| e.value.clone())
                    .unwrap_or_default()
            };
            assert_eq!(get(contract::env::RANK), rank);
            assert_eq!(get(contract::env::WORLD_SIZE), "4");
            assert_eq!(
                get(contract::env::MASTER_ADDR),
                format!("four-0.four.{}.svc", ns.name)
            );
        }
        let svc = Api::<Service>::namespaced(ns.cluster.client.clone(), &ns.name)
            .get("four")
            .await?;
        assert_eq!(svc.spec.unwrap().cluster_ip.as_deref(), Some("None"));
        // The Service's EndpointSlice, written by the operator: every rank's hostname with the
        // address of its pod, which is what `four-<rank>.four` resolves to.
        wait_published(&ns, "four", &members).await?;
        Api::<ConfigMap>::namespaced(ns.cluster.client.clone(), &ns.name)
            .get("four-config")
            .await?;

        for p in &members {
            terminate(&pods, p.metadata.name.as_deref().unwrap(), 0).await?;
        }
        let job = wait_phase(&jobs, "four", Phase::Succeeded).await?;
        assert!(job.status.unwrap().completion_time.is_some());
        Ok(())
    })
    .await
}

#[tokio::test]
async fn rank_2_failing_with_137_restarts_the_whole_gang_as_attempt_1() -> anyhow::Result<()> {
    lockstep_e2e::with_namespace("op-restart", |ns| async move {
        let jobs = create_job(&ns, "restart", 4, serde_json::json!({})).await?;
        wait_phase(&jobs, "restart", Phase::Running).await?;
        let pods: Api<Pod> = ns.api();
        terminate(&pods, "restart-2", 137).await?;
        // The cascade: other ranks exit because their peer died; they must not become the root
        // cause.
        terminate(&pods, "restart-0", contract::ExitCode::PeerFailed.code()).await?;

        wait_until(TIMEOUT, "attempt 1 runs with all 4 ranks", || async {
            let job = jobs.get("restart").await?;
            let members = gang(&pods, "restart").await?;
            Ok(job
                .status
                .as_ref()
                .is_some_and(|s| s.attempt == 1 && s.phase == Some(Phase::Running))
                && members.len() == 4
                && members.iter().all(|p| label(p, labels::ATTEMPT) == "1"))
        })
        .await?;
        let failure = jobs
            .get("restart")
            .await?
            .status
            .unwrap()
            .last_failure
            .unwrap();
        assert_eq!(
            (failure.rank, failure.exit_code, failure.attempt),
            (2, Some(137), 0),
            "{failure:?}"
        );
        assert_eq!(failure.pod, "restart-2");
        // The slice follows the new attempt's pods.
        let members = gang(&pods, "restart").await?;
        wait_published(&ns, "restart", &members).await?;
        // Each attempt's gang Events stand on their own, saying which attempt they are about
        // (not folded into attempt 0's Event, whose note would still say attempt 0).
        let events: Api<k8s_openapi::api::core::v1::Event> = ns.api();
        for reason in ["GangAdmitted", "GangStarted"] {
            wait_until(
                TIMEOUT,
                &format!("a {reason} Event per attempt"),
                || async {
                    let notes: Vec<String> = events
                        .list(&Default::default())
                        .await?
                        .items
                        .into_iter()
                        .filter(|e| e.reason.as_deref() == Some(reason))
                        .filter_map(|e| e.message)
                        .collect();
                    Ok(["attempt 0", "attempt 1"]
                        .iter()
                        .all(|a| notes.iter().any(|n| n.contains(a))))
                },
            )
            .await?;
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_fail_job_rule_fails_the_job_at_once() -> anyhow::Result<()> {
    lockstep_e2e::with_namespace("op-failjob", |ns| async move {
        let rules = serde_json::json!({"failurePolicy": {"maxRestarts": 5, "rules": [
            {"action": "FailJob", "exitCodes": [{"from": 42}]}]}});
        let jobs = create_job(&ns, "failjob", 2, rules).await?;
        wait_phase(&jobs, "failjob", Phase::Running).await?;
        let pods: Api<Pod> = ns.api();
        terminate(&pods, "failjob-1", 42).await?;
        let job = wait_phase(&jobs, "failjob", Phase::Failed).await?;
        let status = job.status.unwrap();
        assert_eq!(status.attempt, 0, "no restart");
        let failed = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Failed")
            .unwrap();
        assert_eq!(failed.reason, "FailedByRule");
        assert!(
            failed.message.contains("rank 1") && failed.message.contains("exit code 42"),
            "{}",
            failed.message
        );
        // cleanPodPolicy Running (the default): the rank still running is deleted.
        wait_until(TIMEOUT, "the running rank is cleaned up", || async {
            Ok(gang(&pods, "failjob")
                .await?
                .iter()
                .all(|p| p.metadata.name.as_deref() == Some("failjob-1")))
        })
        .await
    })
    .await
}

#[tokio::test]
async fn deleting_a_job_removes_everything_it_owns() -> anyhow::Result<()> {
    lockstep_e2e::with_namespace("op-delete", |ns| async move {
        let jobs = create_job(&ns, "doomed", 2, serde_json::json!({})).await?;
        wait_phase(&jobs, "doomed", Phase::Running).await?;
        let pods: Api<Pod> = ns.api();
        wait_published(&ns, "doomed", &gang(&pods, "doomed").await?).await?;
        jobs.delete("doomed", &DeleteParams::background()).await?;
        let services: Api<Service> = ns.api();
        let maps: Api<ConfigMap> = ns.api();
        let slices: Api<EndpointSlice> = ns.api();
        wait_until(
            TIMEOUT,
            "the pods, Service, EndpointSlice and ConfigMap are gone",
            || async {
                Ok(gang(&pods, "doomed").await?.is_empty()
                    && services.get_opt("doomed").await?.is_none()
                    && slices.get_opt("doomed-ranks").await?.is_none()
                    && maps.get_opt("doomed-config").await?.is_none())
            },
        )
        .await
    })
    .await
}

#[tokio::test]
async fn restarts_run_out_and_the_job_fails_naming_the_first_failure() -> anyhow::Result<()> {
    lockstep_e2e::with_namespace("op-exhausted", |ns| async move {
        let policy = serde_json::json!({"failurePolicy": {"maxRestarts": 1,
            "restartBackoff": {"initialSeconds": 0, "maxSeconds": 0}}});
        let jobs = create_job(&ns, "flaky", 2, policy).await?;
        let pods: Api<Pod> = ns.api();
        for attempt in 0..2 {
            wait_until(TIMEOUT, &format!("attempt {attempt} runs"), || async {
                let s = jobs.get("flaky").await?.status.unwrap_or_default();
                Ok(s.attempt == attempt && s.phase == Some(Phase::Running))
            })
            .await?;
            terminate(&pods, "flaky-1", 1).await?;
        }
        let job = wait_phase(&jobs, "flaky", Phase::Failed).await?;
        let status = job.status.unwrap();
        let failed = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Failed")
            .unwrap();
        assert_eq!(failed.reason, "BackoffLimitExceeded");
        assert!(failed.message.contains("rank 1"), "{}", failed.message);
        assert_eq!(status.last_failure.unwrap().attempt, 1);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn suspend_deletes_the_pods_and_resume_starts_the_gang_again() -> anyhow::Result<()> {
    lockstep_e2e::with_namespace("op-suspend", |ns| async move {
        let jobs = create_job(&ns, "pausable", 2, serde_json::json!({})).await?;
        wait_phase(&jobs, "pausable", Phase::Running).await?;
        let pods: Api<Pod> = ns.api();
        let set = |on: bool| serde_json::json!({"spec": {"runPolicy": {"suspend": on}}});
        jobs.patch(
            "pausable",
            &PatchParams::default(),
            &Patch::Merge(&set(true)),
        )
        .await?;
        wait_phase(&jobs, "pausable", Phase::Suspended).await?;
        wait_until(TIMEOUT, "the suspended job has no pods", || async {
            Ok(gang(&pods, "pausable").await?.is_empty())
        })
        .await?;
        jobs.patch(
            "pausable",
            &PatchParams::default(),
            &Patch::Merge(&set(false)),
        )
        .await?;
        wait_phase(&jobs, "pausable", Phase::Running).await?;
        assert_eq!(gang(&pods, "pausable").await?.len(), 2);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn the_deadline_fails_the_job_and_the_ttl_deletes_it() -> anyhow::Result<()> {
    lockstep_e2e::with_namespace("op-deadline", |ns| async move {
        let policy = serde_json::json!({"runPolicy": {"activeDeadlineSeconds": 2, "ttlSecondsAfterFinished": 2}});
        let jobs = create_job(&ns, "bounded", 2, policy).await?;
        let job = wait_phase(&jobs, "bounded", Phase::Failed).await?;
        let failed = job.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Failed").unwrap();
        assert_eq!(failed.reason, "DeadlineExceeded");
        wait_until(TIMEOUT, "the TTL deletes the finished job", || async {
            Ok(jobs.get_opt("bounded").await?.is_none())
        })
        .await
    })
    .await
}

#[tokio::test]
async fn a_template_the_api_server_refuses_is_reported_not_retried_forever() -> anyhow::Result<()> {
    lockstep_e2e::with_namespace("op-rejected", |ns| async move {
        // Valid as a ParallelJob, invalid as a pod: the mount names a volume that does not exist.
        let mut v = lockstep_e2e::example_manifest("ddp-digits.yaml")?;
        v["metadata"]["name"] = "rejected".into();
        v["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] =
            serde_json::json!([{"name": "no-such-volume", "mountPath": "/data"}]);
        let jobs: Api<ParallelJob> = ns.api();
        jobs.create(&PostParams::default(), &serde_json::from_value(v)?)
            .await?;
        wait_until(TIMEOUT, "the job reports TemplateRejected", || async {
            let s = jobs.get("rejected").await?.status.unwrap_or_default();
            Ok(s.conditions.iter().any(|c| {
                c.type_ == "Valid"
                    && c.status == "False"
                    && c.reason == "TemplateRejected"
                    && c.message.contains("no-such-volume")
            }))
        })
        .await?;
        let pods: Api<Pod> = ns.api();
        assert!(gang(&pods, "rejected").await?.is_empty());
        // The admission's status write counted the pods the pass was about to make; the refusal
        // is written with the pods that exist.
        let s = jobs.get("rejected").await?.status.unwrap_or_default();
        assert_eq!(s.workers.map(|w| w.active), Some(0), "{:?}", s.conditions);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn losing_a_node_restarts_the_gang_and_names_the_node() -> anyhow::Result<()> {
    lockstep_e2e::with_namespace("op-node-lost", |ns| async move {
        ns.create_node_pool(2, 8).await?;
        let mut placement = ns.pool_placement();
        placement["containers"] =
            serde_json::json!([{"name": "worker", "image": "lockstep/worker:0.1.0"}]);
        let spec = serde_json::json!({
            "parallelism": {"dataParallel": 2, "gpusPerWorker": 4},
            "template": {"spec": placement},
        });
        let jobs = create_job(&ns, "nodeloss", 2, spec).await?;
        wait_phase(&jobs, "nodeloss", Phase::Running).await?;
        let pods: Api<Pod> = ns.api();
        let node = pods
            .get("nodeloss-1")
            .await?
            .spec
            .and_then(|s| s.node_name)
            .expect("rank 1 is bound");
        let on_node: Vec<i32> = gang(&pods, "nodeloss")
            .await?
            .iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.as_str()))
            .map(|p| label(p, labels::RANK).parse().unwrap_or(-1))
            .collect();

        Api::<k8s_openapi::api::core::v1::Node>::all(ns.cluster.client.clone())
            .delete(&node, &DeleteParams::default())
            .await?;
        // Attempt 1 runs on the node that is left (2 ranks x 4 GPUs fit on its 8), and no pod of
        // attempt 0 is left hanging in Terminating on the lost node.
        wait_until(TIMEOUT, "attempt 1 runs without the lost node", || async {
            let s = jobs.get("nodeloss").await?.status.unwrap_or_default();
            let members = gang(&pods, "nodeloss").await?;
            Ok(s.attempt == 1
                && s.phase == Some(Phase::Running)
                && members.len() == 2
                && members.iter().all(|p| label(p, labels::ATTEMPT) == "1"))
        })
        .await?;
        let failure = jobs
            .get("nodeloss")
            .await?
            .status
            .unwrap()
            .last_failure
            .unwrap();
        assert_eq!(failure.reason, "NodeLost", "{failure:?}");
        assert_eq!(failure.node.as_deref(), Some(node.as_str()));
        assert_eq!(failure.rank, *on_node.iter().min().unwrap(), "{failure:?}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_gpu_request_no_node_can_meet_is_explained_not_left_silent() -> anyhow::Result<()> {
    lockstep_e2e::with_namespace("op-gpu", |ns| async move {
        // The fake nodes offer 8 GPUs each.
        let jobs = create_job(
            &ns,
            "too-wide",
            2,
            serde_json::json!({"parallelism": {"dataParallel": 2, "gpusPerWorker": 16}}),
        )
        .await?;
        wait_until(TIMEOUT, "a Valid=False InvalidSpec condition", || async {
            let job = jobs.get("too-wide").await?;
            Ok(job.status.is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Valid" && c.status == "False" && c.reason == "InvalidSpec")
            }))
        })
        .await?;
        let job = jobs.get("too-wide").await?;
        let status = job.status.expect("status");
        let c = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Valid")
            .expect("Valid");
        assert!(
            c.message.contains("asks for 16 nvidia.com/gpu"),
            "{}",
            c.message
        );
        assert!(
            c.message
                .contains("the largest node of this cluster offers 8"),
            "{}",
            c.message
        );
        // Builtin admission keeps the gang queued, saying why, and makes no pod: no crash loop,
        // no failure, no half-placed gang.
        wait_until(TIMEOUT, "the job is Queued with Admitted=False", || async {
            let s = jobs.get("too-wide").await?.status.unwrap_or_default();
            Ok(s.phase == Some(Phase::Queued)
                && s.conditions.iter().any(|c| {
                    c.type_ == "Admitted"
                        && c.status == "False"
                        && c.message
                            .contains("can never be admitted on the current nodes")
                }))
        })
        .await?;
        let pods: Api<Pod> = ns.api();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(gang(&pods, "too-wide").await?.is_empty());
        assert_ne!(status.phase, Some(Phase::Failed));
        Ok(())
    })
    .await
}
