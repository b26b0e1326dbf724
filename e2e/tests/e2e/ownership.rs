//! A job's objects are its own by UID, not by name. A job deleted with its pods orphaned
//! (`kubectl delete pj X --cascade=orphan`) and created again under its name does not adopt the
//! old pods: it names them in `Admitted=False` (reason `ObjectConflict`), keeps no pod of its
//! own, and makes its gang once they are gone. A user's objects that happen to have the names of
//! a job's (its Service, its config ConfigMap) are never taken over: the job waits on them the
//! same way, and they keep their data and gain no owner (so the garbage collector would never
//! delete them with the job).

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Event, Pod, Service};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use lockstep_api::contract::labels;
use lockstep_api::status::{Phase, condition_types, reasons};
use lockstep_api::{ParallelJob, ParallelJobStatus};
use lockstep_e2e::{TestNamespace, wait_until, with_namespace};
use lockstep_operator::ownership::LEFT_BEHIND;

const TIMEOUT: Duration = Duration::from_secs(90);

/// `ddp-digits` (2 ranks) named `name`, on this test's pool.
fn job(ns: &TestNamespace, name: &str) -> anyhow::Result<ParallelJob> {
    Ok(serde_json::from_value(
        ns.example_on_pool("ddp-digits.yaml", name)?,
    )?)
}

async fn status(jobs: &Api<ParallelJob>, name: &str) -> anyhow::Result<ParallelJobStatus> {
    Ok(jobs.get(name).await?.status.unwrap_or_default())
}

/// The job's `Admitted` condition's reason and message.
fn admitted(s: &ParallelJobStatus) -> Option<(String, String)> {
    s.conditions
        .iter()
        .find(|c| c.type_ == condition_types::ADMITTED)
        .map(|c| (c.reason.clone(), c.message.clone()))
}

/// The controller UID of a pod.
fn controller(p: &Pod) -> Option<String> {
    p.metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|r| r.controller == Some(true))
        .map(|r| r.uid.clone())
}

/// Every pod with the job's name label.
async fn named(pods: &Api<Pod>, name: &str) -> anyhow::Result<Vec<Pod>> {
    Ok(pods
        .list(&ListParams::default().labels(&format!("{}={name}", labels::JOB_NAME)))
        .await?
        .items)
}

/// Waits until the job says `ObjectConflict` in `Admitted=False` naming every one of `objects`.
async fn conflict_named(
    jobs: &Api<ParallelJob>,
    name: &str,
    objects: &[&str],
) -> anyhow::Result<ParallelJobStatus> {
    wait_until(TIMEOUT, "Admitted=False ObjectConflict", || async {
        let s = status(jobs, name).await?;
        anyhow::ensure!(
            !matches!(s.phase, Some(Phase::Running | Phase::Failed)),
            "the job went {:?} though objects not its own have its names: {:?}",
            s.phase,
            s.conditions
        );
        Ok(admitted(&s).is_some_and(|(reason, message)| {
            reason == reasons::OBJECT_CONFLICT && objects.iter().all(|o| message.contains(o))
        }))
    })
    .await?;
    status(jobs, name).await
}

/// Waits until the job runs with a whole gang of its own.
async fn runs_with_its_own_gang(
    jobs: &Api<ParallelJob>,
    pods: &Api<Pod>,
    name: &str,
    uid: &str,
) -> anyhow::Result<()> {
    wait_until(TIMEOUT, "the job runs its own gang", || async {
        let gang = named(pods, name).await?;
        Ok(status(jobs, name).await?.phase == Some(Phase::Running)
            && gang.len() == 2
            && gang.iter().all(|p| {
                controller(p).as_deref() == Some(uid)
                    && p.labels().get(labels::JOB_UID).map(String::as_str) == Some(uid)
            }))
    })
    .await
}

/// Runs the `kubectl delete ...` the job's condition gives for what an earlier job left, in the
/// test's namespace, exactly as written there.
async fn run_the_cleanup_it_names(ns: &TestNamespace, message: &str) -> anyhow::Result<()> {
    let command = message
        .split("`kubectl ")
        .nth(1)
        .and_then(|rest| rest.split('`').next())
        .ok_or_else(|| anyhow::anyhow!("no kubectl command in {message:?}"))?;
    let mut args: Vec<&str> = command.split_whitespace().collect();
    args.extend(["-n", &ns.name, "--grace-period=0", "--wait=false"]);
    ns.cluster.kubectl(&args).await?;
    Ok(())
}

/// The job's Events with `reason`.
async fn events(ns: &TestNamespace, job: &str, reason: &str) -> anyhow::Result<usize> {
    let events: Api<Event> = ns.api();
    let selector = format!("involvedObject.name={job}");
    Ok(events
        .list(&ListParams::default().fields(&selector))
        .await?
        .items
        .iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .count())
}

#[tokio::test]
async fn a_job_created_again_after_an_orphaning_delete_never_adopts_the_old_pods()
-> anyhow::Result<()> {
    with_namespace("orphans", |ns| async move {
        ns.create_node_pool(2, 0).await?;
        let jobs: Api<ParallelJob> = ns.api();
        let pods: Api<Pod> = ns.api();
        let first = jobs
            .create(&PostParams::default(), &job(&ns, "again")?)
            .await?;
        let old_uid = first.metadata.uid.clone().expect("a uid");
        runs_with_its_own_gang(&jobs, &pods, "again", &old_uid).await?;

        // `kubectl delete pj again --cascade=orphan`: the garbage collector strips the pods'
        // owner references and leaves them running.
        jobs.delete("again", &DeleteParams::orphan()).await?;
        wait_until(TIMEOUT, "the job is gone, its pods orphaned", || async {
            let gone = jobs.get_opt("again").await?.is_none();
            let orphans = named(&pods, "again").await?;
            Ok(gone && orphans.len() == 2 && orphans.iter().all(|p| controller(p).is_none()))
        })
        .await?;

        let second = jobs
            .create(&PostParams::default(), &job(&ns, "again")?)
            .await?;
        let uid = second.metadata.uid.clone().expect("a uid");
        assert_ne!(uid, old_uid);
        let cleanup = format!(
            "`kubectl delete {LEFT_BEHIND} -l {}={old_uid}`",
            labels::JOB_UID
        );
        let s = conflict_named(&jobs, "again", &["Pod again-0", "Pod again-1", &cleanup]).await?;
        assert_eq!(s.phase, Some(Phase::Queued), "{:?}", s.conditions);
        assert_eq!(s.admission, None, "no capacity is held");
        // The old pods are untouched: no owner, the old UID label; no pod of the new job's.
        let left = named(&pods, "again").await?;
        assert_eq!(
            left.len(),
            2,
            "{:?}",
            left.iter().map(|p| p.name_any()).collect::<Vec<_>>()
        );
        for p in &left {
            assert_eq!(controller(p), None, "{} was adopted", p.name_any());
            assert_eq!(
                p.labels().get(labels::JOB_UID).map(String::as_str),
                Some(old_uid.as_str())
            );
            assert!(
                p.metadata.deletion_timestamp.is_none(),
                "{} was deleted",
                p.name_any()
            );
        }

        // Waiting on pods, the gang was never admitted (and given back).
        assert_eq!(
            events(&ns, "again", "GangAdmitted").await?,
            1,
            "the first job's only"
        );

        // The user runs the command the condition gives: the new job makes its objects and its
        // gang, every pod its own (a kind the command missed would keep it waiting).
        let (_, message) = admitted(&s).expect("the condition");
        run_the_cleanup_it_names(&ns, &message).await?;
        runs_with_its_own_gang(&jobs, &pods, "again", &uid).await
    })
    .await
}

#[tokio::test]
async fn objects_of_a_user_with_a_jobs_names_are_never_taken_over() -> anyhow::Result<()> {
    with_namespace("usernames", |ns| async move {
        ns.create_node_pool(2, 0).await?;
        let jobs: Api<ParallelJob> = ns.api();
        let pods: Api<Pod> = ns.api();
        // A user's ConfigMap and Service that happen to have the names the job `mine` needs.
        let maps: Api<ConfigMap> = ns.api();
        let services: Api<Service> = ns.api();
        let theirs: ConfigMap = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "mine-config"},
            "data": {"worker.json": "the user's own"}
        }))?;
        maps.create(&PostParams::default(), &theirs).await?;
        let service: Service = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "mine"},
            "spec": {"ports": [{"port": 80}]}
        }))?;
        services.create(&PostParams::default(), &service).await?;
        // And a pod of theirs called like rank 1, without any of the job's labels.
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "mine-1"},
            "spec": {"containers": [{"name": "c", "image": "theirs:1"}]}
        }))?;
        pods.create(&PostParams::default(), &pod).await?;

        let created = jobs
            .create(&PostParams::default(), &job(&ns, "mine")?)
            .await?;
        let uid = created.metadata.uid.clone().expect("a uid");
        let s = conflict_named(
            &jobs,
            "mine",
            &[
                "ConfigMap mine-config (controlled by no object)",
                "Service mine (controlled by no object)",
                "Pod mine-1 (controlled by no object)",
            ],
        )
        .await?;
        assert_eq!(s.phase, Some(Phase::Queued), "{:?}", s.conditions);
        assert_eq!(s.admission, None, "no capacity is held");
        assert!(named(&pods, "mine").await?.is_empty(), "no pod is made");
        // Found before admission: never admitted, then refused, then given back.
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(events(&ns, "mine", "GangAdmitted").await?, 0);
        assert!(named(&pods, "mine").await?.is_empty(), "no pod is made");
        // Left as they were: the user's data, no owner (so never collected with the job).
        let cm = maps.get("mine-config").await?;
        assert_eq!(
            cm.data
                .unwrap_or_default()
                .get("worker.json")
                .map(String::as_str),
            Some("the user's own")
        );
        assert_eq!(cm.metadata.owner_references, None);
        let svc = services.get("mine").await?;
        assert_eq!(svc.metadata.owner_references, None);
        assert_ne!(
            svc.spec.and_then(|s| s.cluster_ip).as_deref(),
            Some("None"),
            "still the user's ClusterIP Service"
        );

        // Gone: the job makes its own objects and its gang (tried again within 30 s).
        maps.delete("mine-config", &DeleteParams::default()).await?;
        services.delete("mine", &DeleteParams::default()).await?;
        pods.delete("mine-1", &DeleteParams::default().grace_period(0))
            .await?;
        runs_with_its_own_gang(&jobs, &pods, "mine", &uid).await?;
        let cm = maps.get("mine-config").await?;
        assert_eq!(
            cm.metadata
                .owner_references
                .unwrap_or_default()
                .iter()
                .find(|r| r.controller == Some(true))
                .map(|r| r.uid.as_str()),
            Some(uid.as_str())
        );
        Ok(())
    })
    .await
}
