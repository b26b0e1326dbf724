//! Kueue for real: minimalkueue v0.17 (Kueue's controllers and scheduler) admits the Workloads
//! the operator writes. A ClusterQueue of this test's own, over a ResourceFlavor whose node
//! labels and tolerations are those of this test's private pool of fake nodes: a job's pods land
//! there only because Kueue's admission put them there.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Pod};
use k8s_openapi::api::scheduling::v1::PriorityClass;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, PostParams};
use lockstep_api::ParallelJob;
use lockstep_api::status::Phase;
use lockstep_e2e::{POOL_LABEL, TestNamespace, wait_until, with_namespace};

use crate::admission::{TIMEOUT, admitted, bound, create, finish, gang, wait_phase};

/// The Kueue objects of `kind` (resource `plural`), of the test's namespace or cluster-wide.
pub(crate) fn kueue_api(
    ns: &TestNamespace,
    kind: &str,
    plural: &str,
    namespaced: bool,
) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("kueue.x-k8s.io", "v1beta2", kind);
    let ar = ApiResource::from_gvk_with_plural(&gvk, plural);
    if namespaced {
        Api::namespaced_with(ns.cluster.client.clone(), &ns.name, &ar)
    } else {
        Api::all_with(ns.cluster.client.clone(), &ar)
    }
}

async fn make(api: &Api<DynamicObject>, v: serde_json::Value) -> anyhow::Result<()> {
    api.create(&PostParams::default(), &serde_json::from_value(v)?)
        .await?;
    Ok(())
}

/// This test's pool of `nodes` fake nodes of `gpus` GPUs, and a queue of `quota` GPUs on it
/// (see [`cluster_queue`]).
async fn queue(ns: &TestNamespace, nodes: usize, gpus: u32, quota: u32) -> anyhow::Result<()> {
    ns.create_node_pool(nodes, gpus).await?;
    let placement = ns.pool_placement();
    let quotas = serde_json::json!([
        {"name": "cpu", "nominalQuota": 100},
        {"name": "memory", "nominalQuota": "1000Gi"},
        {"name": "nvidia.com/gpu", "nominalQuota": quota},
    ]);
    cluster_queue(ns, &placement, quotas).await
}

/// A ResourceFlavor named after the test whose node labels and tolerations are `placement`'s
/// (`nodeSelector`, `tolerations`), a ClusterQueue of the `quotas` of that flavor (lower
/// priorities preempted within it) for this namespace, and the LocalQueue `team` in it. The
/// cluster-scoped objects go with [`drop_queue`].
pub(crate) async fn cluster_queue(
    ns: &TestNamespace,
    placement: &serde_json::Value,
    quotas: serde_json::Value,
) -> anyhow::Result<()> {
    let covered: Vec<serde_json::Value> = quotas
        .as_array()
        .into_iter()
        .flatten()
        .map(|q| q["name"].clone())
        .collect();
    make(
        &kueue_api(ns, "ResourceFlavor", "resourceflavors", false),
        serde_json::json!({
            "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor",
            "metadata": {"name": ns.name},
            "spec": {"nodeLabels": placement["nodeSelector"], "tolerations": placement["tolerations"]},
        }),
    )
    .await?;
    make(
        &kueue_api(ns, "ClusterQueue", "clusterqueues", false),
        serde_json::json!({
            "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue",
            "metadata": {"name": ns.name},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns.name}},
                "preemption": {"withinClusterQueue": "LowerPriority"},
                "resourceGroups": [{
                    "coveredResources": covered,
                    "flavors": [{"name": ns.name, "resources": quotas}],
                }],
            },
        }),
    )
    .await?;
    make(
        &kueue_api(ns, "LocalQueue", "localqueues", true),
        serde_json::json!({
            "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
            "metadata": {"name": "team"}, "spec": {"clusterQueue": ns.name},
        }),
    )
    .await
}

/// Creates the PriorityClasses `<namespace>-<name>` of `classes` (name, value).
pub(crate) async fn priority_classes(
    ns: &TestNamespace,
    classes: &[(&str, i32)],
) -> anyhow::Result<()> {
    let api: Api<PriorityClass> = Api::all(ns.cluster.client.clone());
    for (name, value) in classes {
        api.create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                "metadata": {"name": format!("{}-{name}", ns.name)}, "value": value,
            }))?,
        )
        .await?;
    }
    Ok(())
}

/// Deletes what [`priority_classes`] created.
pub(crate) async fn drop_priority_classes(ns: &TestNamespace, classes: &[&str]) {
    let api: Api<PriorityClass> = Api::all(ns.cluster.client.clone());
    for c in classes {
        let _ = api
            .delete(&format!("{}-{c}", ns.name), &DeleteParams::background())
            .await;
    }
}

/// Runs `body` in a namespace of its own when the cluster runs Kueue (the test says NOT RUN
/// otherwise), then deletes what a Kueue test makes cluster-wide under the namespace's name: its
/// queue (see [`drop_queue`]) and the PriorityClasses `classes` (see [`priority_classes`]),
/// whether the body passed or not.
pub(crate) async fn with_kueue<F, Fut>(
    test: &str,
    short: &str,
    classes: &[&str],
    body: F,
) -> anyhow::Result<()>
where
    F: FnOnce(TestNamespace) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    if !lockstep_e2e::cluster().await.runs_scheduler("kueue", test) {
        return Ok(());
    }
    with_namespace(short, |ns| async move {
        let cleanup = TestNamespace {
            cluster: ns.cluster.clone(),
            name: ns.name.clone(),
        };
        let result = body(ns).await;
        drop_priority_classes(&cleanup, classes).await;
        drop_queue(&cleanup).await;
        result
    })
    .await
}

/// Deletes the cluster-scoped objects of [`cluster_queue`], and a Topology of the namespace's
/// name when a test made one.
pub(crate) async fn drop_queue(ns: &TestNamespace) {
    let dp = DeleteParams::background();
    let _ = kueue_api(ns, "Topology", "topologies", false)
        .delete(&ns.name, &dp)
        .await;
    let _ = kueue_api(ns, "ClusterQueue", "clusterqueues", false)
        .delete(&ns.name, &dp)
        .await;
    let _ = kueue_api(ns, "ResourceFlavor", "resourceflavors", false)
        .delete(&ns.name, &dp)
        .await;
}

/// A job of `ranks` ranks of one GPU in the LocalQueue `team` (by its label), with no placement
/// of its own; `extra` is merged into the spec.
fn queued_job(name: &str, ranks: i32, extra: serde_json::Value) -> anyhow::Result<ParallelJob> {
    let mut v = lockstep_e2e::example_manifest("ddp-digits.yaml")?;
    v["metadata"]["name"] = name.into();
    v["metadata"]["labels"] = serde_json::json!({"kueue.x-k8s.io/queue-name": "team"});
    v["spec"]["parallelism"] = serde_json::json!({"dataParallel": ranks, "gpusPerWorker": 1});
    if let Some(obj) = extra.as_object() {
        for (k, val) in obj {
            v["spec"][k] = val.clone();
        }
    }
    Ok(serde_json::from_value(v)?)
}

/// The condition `type_` of the job's Workload: (status, reason).
async fn workload_condition(
    ns: &TestNamespace,
    name: &str,
    type_: &str,
) -> anyhow::Result<Option<(String, String)>> {
    let w = kueue_api(ns, "Workload", "workloads", true)
        .get(name)
        .await?;
    Ok(w.data["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == type_)
        .map(|c| {
            let s = |f: &str| c[f].as_str().unwrap_or_default().to_string();
            (s("status"), s("reason"))
        }))
}

/// The Events on the job `job`: (reason, message).
pub(crate) async fn events(ns: &TestNamespace, job: &str) -> anyhow::Result<Vec<(String, String)>> {
    Ok(ns
        .api::<Event>()
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.involved_object.name.as_deref() == Some(job))
        .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect())
}

#[tokio::test]
async fn of_two_jobs_of_six_gpus_in_a_queue_of_eight_kueue_runs_one_then_the_other()
-> anyhow::Result<()> {
    let test = "of_two_jobs_of_six_gpus_in_a_queue_of_eight_kueue_runs_one_then_the_other";
    with_kueue(test, "kueue-two", &[], |ns| async move {
        queue(&ns, 2, 4, 8).await?;
        create(&ns, queued_job("first", 6, serde_json::json!({}))?).await?;
        wait_phase(&ns, "first", Phase::Running).await?;
        // Kueue's flavor put every rank on the pool (the job's template names no node).
        let pool = ns.pool_placement();
        for p in gang(&ns, "first").await? {
            let spec = p.spec.clone().unwrap_or_default();
            assert_eq!(
                spec.node_selector.as_ref().and_then(|s| s.get(POOL_LABEL)),
                pool["nodeSelector"][POOL_LABEL]
                    .as_str()
                    .map(String::from)
                    .as_ref()
            );
            assert!(
                bound(&p).is_some_and(|n| n.starts_with(&ns.name)),
                "{:?}",
                bound(&p)
            );
        }
        let (status, reason, message) = admitted(&ns, "first").await?.expect("Admitted");
        assert_eq!((status.as_str(), reason.as_str()), ("True", "GangAdmitted"));
        assert!(
            message.contains(&format!("ClusterQueue {}", ns.name)),
            "{message}"
        );
        wait_until(TIMEOUT, "Kueue hears PodsReady", || async {
            Ok(workload_condition(&ns, "first", "PodsReady")
                .await?
                .is_some_and(|(s, _)| s == "True"))
        })
        .await?;

        create(&ns, queued_job("second", 6, serde_json::json!({}))?).await?;
        wait_until(TIMEOUT, "second waits with Kueue's reason", || async {
            Ok(admitted(&ns, "second").await?.is_some_and(|(s, r, m)| {
                s == "False"
                    && r == "WaitingForKueue"
                    && m.contains("insufficient unused quota for nvidia.com/gpu")
            }))
        })
        .await?;
        assert_eq!(ns.phase("second").await?, Some(Phase::Queued));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            gang(&ns, "second").await?.is_empty(),
            "a pod of the waiting job exists"
        );
        // Moved to another queue while it waits: its Workload is written again there.
        let workloads = kueue_api(&ns, "Workload", "workloads", true);
        let old_uid = workloads.get("second").await?.metadata.uid;
        let relabel =
            |q: &str| serde_json::json!({"metadata": {"labels": {"kueue.x-k8s.io/queue-name": q}}});
        let jobs = ns.api::<ParallelJob>();
        let pp = kube::api::PatchParams::default();
        jobs.patch(
            "second",
            &pp,
            &kube::api::Patch::Merge(relabel("elsewhere")),
        )
        .await?;
        wait_until(TIMEOUT, "a new Workload in the queue elsewhere", || async {
            let w = workloads.get_opt("second").await?;
            Ok(w.is_some_and(|w| {
                w.metadata.uid != old_uid && w.data["spec"]["queueName"] == "elsewhere"
            }))
        })
        .await?;
        jobs.patch("second", &pp, &kube::api::Patch::Merge(relabel("team")))
            .await?;
        wait_until(TIMEOUT, "back in team, waiting for quota", || async {
            let w = workloads.get_opt("second").await?;
            let back = w.is_some_and(|w| w.data["spec"]["queueName"] == "team");
            Ok(back
                && admitted(&ns, "second")
                    .await?
                    .is_some_and(|(_, _, m)| m.contains("insufficient unused quota")))
        })
        .await?;
        assert!(gang(&ns, "second").await?.is_empty());

        finish(&ns, "first").await?;
        wait_phase(&ns, "first", Phase::Succeeded).await?;
        wait_until(TIMEOUT, "first's Workload is Finished", || async {
            Ok(workload_condition(&ns, "first", "Finished")
                .await?
                .is_some_and(|(s, r)| s == "True" && r == "Succeeded"))
        })
        .await?;
        wait_phase(&ns, "second", Phase::Running).await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_high_priority_job_preempts_a_low_one_which_stops_waits_and_runs_again()
-> anyhow::Result<()> {
    let test = "a_high_priority_job_preempts_a_low_one_which_stops_waits_and_runs_again";
    with_kueue(test, "kueue-preempt", &["low", "high"], |ns| async move {
        queue(&ns, 2, 4, 8).await?;
        priority_classes(&ns, &[("low", 100), ("high", 1000)]).await?;
        let class = |c: &str| serde_json::json!({"scheduling": {"priorityClassName": format!("{}-{c}", ns.name)}});
        create(&ns, queued_job("low", 6, class("low"))?).await?;
        wait_phase(&ns, "low", Phase::Running).await?;
        let before: Vec<String> = gang(&ns, "low").await?.iter().filter_map(|p| p.metadata.uid.clone()).collect();
        let w = kueue_api(&ns, "Workload", "workloads", true).get("low").await?;
        assert_eq!(w.data["spec"]["priority"], 100);

        create(&ns, queued_job("high", 6, class("high"))?).await?;
        // Kueue evicts the low one: its gang stops (no restart counted) and it waits.
        wait_until(TIMEOUT, "low's gang is stopped for the high one", || async {
            let evicted = events(&ns, "low").await?.iter().any(|(r, m)| r == "Evicted" && m.contains("Preempted"));
            Ok(evicted && gang(&ns, "low").await?.is_empty())
        })
        .await?;
        wait_phase(&ns, "high", Phase::Running).await?;
        assert_eq!(ns.phase("low").await?, Some(Phase::Queued));
        let (status, reason, message) = admitted(&ns, "low").await?.expect("Admitted");
        assert_eq!((status.as_str(), reason.as_str()), ("False", "WaitingForKueue"), "{message}");
        assert_eq!(
            workload_condition(&ns, "low", "Requeued").await?,
            Some(("True".into(), "Preempted".into())),
            "its quota given back and requeued, as Kueue's job framework does"
        );
        // The high one finishes: the low one is admitted again and starts again, the same
        // attempt (its ranks resume from their checkpoint), no restart counted.
        finish(&ns, "high").await?;
        wait_phase(&ns, "low", Phase::Running).await?;
        let job = ns.api::<ParallelJob>().get("low").await?;
        let status = job.status.unwrap_or_default();
        assert_eq!(status.attempt, 0);
        assert!(status.last_failure.is_none(), "{:?}", status.last_failure);
        let after: Vec<Pod> = gang(&ns, "low").await?;
        assert_eq!(after.len(), 6);
        assert!(after.iter().all(|p| !before.contains(p.metadata.uid.as_ref().unwrap())), "new pods");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_workload_deactivated_by_hand_stops_the_gang_and_stays_so_until_activated_again()
-> anyhow::Result<()> {
    let test = "a_workload_deactivated_by_hand_stops_the_gang_and_stays_so_until_activated_again";
    with_kueue(test, "kueue-inactive", &[], |ns| async move {
        queue(&ns, 1, 8, 8).await?;
        create(&ns, queued_job("held", 2, serde_json::json!({}))?).await?;
        wait_phase(&ns, "held", Phase::Running).await?;
        // An administrator deactivates the Workload (as Kueue does itself at a requeuing or
        // execution-time limit): Kueue evicts it, the gang stops, and the operator does not
        // make it active again.
        let workloads = kueue_api(&ns, "Workload", "workloads", true);
        let pp = kube::api::PatchParams::default();
        let active = |a: bool| serde_json::json!({"spec": {"active": a}});
        workloads
            .patch("held", &pp, &kube::api::Patch::Merge(active(false)))
            .await?;
        wait_until(
            TIMEOUT,
            "the gang is stopped and the job says why",
            || async {
                let stopped = gang(&ns, "held").await?.is_empty();
                let said = admitted(&ns, "held").await?.is_some_and(|(s, r, m)| {
                    s == "False" && r == "WaitingForKueue" && m.contains("was deactivated")
                });
                Ok(stopped && said)
            },
        )
        .await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let w = workloads.get("held").await?;
        assert_eq!(
            w.data["spec"]["active"], false,
            "activated again by the operator"
        );
        assert!(gang(&ns, "held").await?.is_empty());
        assert_eq!(
            workload_condition(&ns, "held", "QuotaReserved")
                .await?
                .map(|(s, _)| s),
            Some("False".into()),
            "its quota was given back"
        );
        // Activated again by hand: admitted again, the gang runs, no restart counted.
        workloads
            .patch("held", &pp, &kube::api::Patch::Merge(active(true)))
            .await?;
        wait_phase(&ns, "held", Phase::Running).await?;
        let status = ns
            .api::<ParallelJob>()
            .get("held")
            .await?
            .status
            .unwrap_or_default();
        assert_eq!(status.attempt, 0);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn kueue_places_a_gang_with_a_required_rack_in_one_rack_through_its_topology_ungater()
-> anyhow::Result<()> {
    let test = "kueue_places_a_gang_with_a_required_rack_in_one_rack_through_its_topology_ungater";
    with_kueue(test, "kueue-tas", &[], |ns| async move {
        // Two racks of two 8-GPU nodes, and a Topology of racks and hosts for the flavor.
        ns.create_node_pool(4, 8).await?;
        let rack = "topology.lockstep.dev/rack";
        make(
            &kueue_api(&ns, "Topology", "topologies", false),
            serde_json::json!({
                "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Topology",
                "metadata": {"name": ns.name},
                "spec": {"levels": [{"nodeLabel": rack}, {"nodeLabel": "kubernetes.io/hostname"}]},
            }),
        )
        .await?;
        let placement = ns.pool_placement();
        let quotas = serde_json::json!([
            {"name": "cpu", "nominalQuota": 100},
            {"name": "memory", "nominalQuota": "1000Gi"},
            {"name": "nvidia.com/gpu", "nominalQuota": 32},
        ]);
        cluster_queue(&ns, &placement, quotas).await?;
        let flavors = kueue_api(&ns, "ResourceFlavor", "resourceflavors", false);
        let pp = kube::api::PatchParams::default();
        flavors
            .patch(
                &ns.name,
                &pp,
                &kube::api::Patch::Merge(serde_json::json!({"spec": {"topologyName": ns.name}})),
            )
            .await?;
        let topology =
            serde_json::json!({"scheduling": {"topology": {"key": rack, "mode": "Required"}}});
        let mut j = queued_job("racked", 2, topology)?;
        j.spec.parallelism.gpus_per_worker = 8;
        create(&ns, j).await?;
        // Kueue's ungater takes its gate off each pod and gives it its domain.
        wait_phase(&ns, "racked", Phase::Running).await?;
        let pods = gang(&ns, "racked").await?;
        for p in &pods {
            let spec = p.spec.clone().unwrap_or_default();
            assert!(
                spec.scheduling_gates.as_ref().is_none_or(|g| g.is_empty()),
                "{:?}",
                spec.scheduling_gates
            );
            let labels = p.metadata.labels.clone().unwrap_or_default();
            assert_eq!(
                labels.get("kueue.x-k8s.io/podset").map(String::as_str),
                Some("workers")
            );
            let selector = spec.node_selector.unwrap_or_default();
            assert!(
                selector.contains_key(rack) || selector.contains_key("kubernetes.io/hostname"),
                "{selector:?}"
            );
        }
        // Both 8-GPU ranks in one rack: nodes n0 and n1 are rack 0, n2 and n3 rack 1.
        let nodes: std::collections::BTreeSet<String> = pods.iter().filter_map(bound).collect();
        let rack_of = |n: &str| n.ends_with("n0") || n.ends_with("n1");
        assert!(
            nodes.iter().all(|n| rack_of(n)) || nodes.iter().all(|n| !rack_of(n)),
            "the gang spans racks: {nodes:?}"
        );
        Ok(())
    })
    .await
}
