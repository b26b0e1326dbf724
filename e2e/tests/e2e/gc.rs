//! kube-controller-manager really runs: deleting an owner (a ParallelJob) deletes the pods that
//! name it in their ownerReferences. The job is managed by another controller
//! (`spec.managedBy`), so the operator leaves it alone and the test owns its pods.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::discovery::ApiResource;
use lockstep_api::ParallelJob;
use lockstep_e2e::{wait_until, with_namespace};

#[tokio::test]
async fn deleting_an_owner_deletes_its_pods() -> anyhow::Result<()> {
    with_namespace("gc", |ns| async move {
        let ar = ApiResource::erase::<ParallelJob>(&());
        let jobs: Api<DynamicObject> = Api::namespaced_with(ns.cluster.client.clone(), &ns.name, &ar);
        let mut raw = lockstep_e2e::example_manifest("ddp-digits.yaml")?;
        raw["spec"]["managedBy"] = "example.com/another-controller".into();
        let job: DynamicObject = serde_json::from_value(raw)?;
        let job = jobs.create(&PostParams::default(), &job).await?;
        let uid = job.metadata.uid.clone().expect("the server sets a uid");

        let pods: Api<Pod> = ns.api();
        for rank in 0..2 {
            let pod: Pod = serde_json::from_value(serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "name": format!("ddp-digits-{rank}"), "labels": {"owned": "yes"},
                    "ownerReferences": [{"apiVersion": "lockstep.dev/v1alpha1", "kind": "ParallelJob",
                        "name": "ddp-digits", "uid": uid, "controller": true, "blockOwnerDeletion": true}]
                },
                "spec": {"containers": [{"name": "worker", "image": "lockstep/worker:0.1.0"}]}
            }))?;
            pods.create(&PostParams::default(), &pod).await?;
        }
        let owned = ListParams::default().labels("owned=yes");
        assert_eq!(pods.list(&owned).await?.items.len(), 2);

        jobs.delete("ddp-digits", &DeleteParams::background()).await?;
        wait_until(Duration::from_secs(60), "the garbage collector deletes the owned pods", || async {
            Ok(pods.list(&owned).await?.items.is_empty())
        })
        .await
    })
    .await
}
