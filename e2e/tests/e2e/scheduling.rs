//! The real kube-scheduler places GPU pods on fake GPU nodes by their `nvidia.com/gpu`
//! allocatable, and leaves a pod that no node can hold Pending with an Unschedulable reason.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, PostParams};
use lockstep_e2e::{wait_until, with_namespace};

fn gpu_pod(name: &str, gpus: u32) -> anyhow::Result<Pod> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"containers": [{"name": "worker", "image": "lockstep/worker:0.1.0",
            "resources": {"limits": {"nvidia.com/gpu": gpus.to_string()}}}]}
    }))?)
}

#[tokio::test]
async fn a_gpu_pod_runs_on_a_fake_gpu_node() -> anyhow::Result<()> {
    with_namespace("gpu-pod", |ns| async move {
        let pods: Api<Pod> = ns.api();
        pods.create(&PostParams::default(), &gpu_pod("one-gpu", 1)?)
            .await?;
        wait_until(
            Duration::from_secs(60),
            "the GPU pod is Running",
            || async {
                Ok(pods
                    .get("one-gpu")
                    .await?
                    .status
                    .and_then(|s| s.phase)
                    .as_deref()
                    == Some("Running"))
            },
        )
        .await?;
        let node_name = pods
            .get("one-gpu")
            .await?
            .spec
            .and_then(|s| s.node_name)
            .expect("bound");
        let node = Api::<Node>::all(ns.cluster.client.clone())
            .get(&node_name)
            .await?;
        let gpus = node
            .status
            .and_then(|s| s.allocatable)
            .and_then(|a| a.get("nvidia.com/gpu").cloned());
        assert!(gpus.is_some_and(|q| q.0 != "0"), "{node_name} has no GPUs");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_pod_wanting_more_gpus_than_any_node_has_stays_unschedulable() -> anyhow::Result<()> {
    with_namespace("gpu-too-many", |ns| async move {
        let pods: Api<Pod> = ns.api();
        pods.create(&PostParams::default(), &gpu_pod("greedy", 9)?)
            .await?;
        wait_until(
            Duration::from_secs(60),
            "the scheduler reports the pod Unschedulable",
            || async {
                let pod = pods.get("greedy").await?;
                Ok(pod
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| {
                        c.type_ == "PodScheduled"
                            && c.status == "False"
                            && c.reason.as_deref() == Some("Unschedulable")
                            && c.message
                                .as_deref()
                                .is_some_and(|m| m.contains("Insufficient nvidia.com/gpu"))
                    }))
            },
        )
        .await?;
        let pod = pods.get("greedy").await?;
        assert_eq!(pod.status.and_then(|s| s.phase).as_deref(), Some("Pending"));
        assert!(pod.spec.and_then(|s| s.node_name).is_none(), "bound anyway");
        Ok(())
    })
    .await
}
