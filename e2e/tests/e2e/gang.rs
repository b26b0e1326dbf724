//! The upstream gang API (Kubernetes 1.36: a `scheduling.k8s.io/v1alpha2` PodGroup with a gang
//! policy, pods joining through `spec.schedulingGroup`) places all of a gang or none of it, through
//! the real kube-scheduler. The test runs on a private pool of 4 fake nodes with 8 GPUs each.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, DynamicObject, GroupVersionKind, ListParams, PostParams};
use kube::discovery::ApiResource;
use lockstep_e2e::{TestNamespace, wait_until, with_namespace};

fn pod(ns: &TestNamespace, name: &str, gang: Option<&str>) -> anyhow::Result<Pod> {
    let mut spec = ns.pool_placement();
    spec["containers"] = serde_json::json!([{"name": "worker", "image": "lockstep/worker:0.1.0",
        "resources": {"limits": {"nvidia.com/gpu": "8"}}}]);
    if let Some(g) = gang {
        spec["schedulingGroup"] = serde_json::json!({"podGroupName": g});
    }
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"gang": gang.unwrap_or("none")}}, "spec": spec
    }))?)
}

#[tokio::test]
async fn a_gang_of_four_places_none_with_room_for_three_and_all_with_room_for_four()
-> anyhow::Result<()> {
    with_namespace("upstream-gang", |ns| async move {
        ns.create_node_pool(4, 8).await?;
        let pods: Api<Pod> = ns.api();
        // Take one node of four: room for three 8-GPU pods.
        pods.create(&PostParams::default(), &pod(&ns, "blocker", None)?)
            .await?;
        wait_until(Duration::from_secs(60), "the blocker is bound", || async {
            Ok(pods
                .get("blocker")
                .await?
                .spec
                .and_then(|s| s.node_name)
                .is_some())
        })
        .await?;

        let gvk = GroupVersionKind::gvk("scheduling.k8s.io", "v1alpha2", "PodGroup");
        let groups: Api<DynamicObject> = Api::namespaced_with(
            ns.cluster.client.clone(),
            &ns.name,
            &ApiResource::from_gvk(&gvk),
        );
        let group: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "scheduling.k8s.io/v1alpha2", "kind": "PodGroup",
            "metadata": {"name": "gang"}, "spec": {"schedulingPolicy": {"gang": {"minCount": 4}}}
        }))?;
        groups.create(&PostParams::default(), &group).await?;
        for i in 0..4 {
            pods.create(
                &PostParams::default(),
                &pod(&ns, &format!("rank-{i}"), Some("gang"))?,
            )
            .await?;
        }
        let members = ListParams::default().labels("gang=gang");
        // Wait until the scheduler has judged the gang (PodGroupScheduled=False), then none of it
        // may be bound.
        wait_until(
            Duration::from_secs(90),
            "the scheduler reports the gang unschedulable",
            || async {
                let g = groups.get("gang").await?;
                Ok(g.data["status"]["conditions"].as_array().is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["type"] == "PodGroupScheduled" && c["status"] == "False")
                }))
            },
        )
        .await?;
        let bound = pods
            .list(&members)
            .await?
            .items
            .into_iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some())
            .count();
        assert_eq!(bound, 0, "a gang of 4 with room for 3 placed {bound} pods");

        // Free the fourth node: the whole gang is placed, one pod per node.
        pods.delete("blocker", &DeleteParams::default().grace_period(0))
            .await?;
        wait_until(
            Duration::from_secs(120),
            "all 4 gang pods are bound",
            || async {
                let list = pods.list(&members).await?;
                Ok(list
                    .items
                    .iter()
                    .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some())
                    .count()
                    == 4)
            },
        )
        .await?;
        let mut nodes: Vec<String> = pods
            .list(&members)
            .await?
            .items
            .into_iter()
            .filter_map(|p| p.spec.and_then(|s| s.node_name))
            .collect();
        nodes.sort();
        nodes.dedup();
        assert_eq!(
            nodes.len(),
            4,
            "8-GPU pods must land on 4 different nodes: {nodes:?}"
        );
        Ok(())
    })
    .await
}
