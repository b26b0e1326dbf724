//! A job this operator cannot read (written against a newer CRD) gets an Event naming the field,
//! and never stalls the watch, and so the reconcile, of every other job.

use std::time::Duration;

use k8s_openapi::api::core::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use lockstep_api::ParallelJob;
use lockstep_api::status::Phase;
use lockstep_e2e::{wait_until, with_namespace};

const WORKLOAD_ENUM: &str = "/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/training/properties/workload/enum";

#[tokio::test]
async fn an_unreadable_job_is_reported_and_never_stalls_the_others() -> anyhow::Result<()> {
    with_namespace("guard", |ns| async move {
        let crds: Api<CustomResourceDefinition> = Api::all(ns.cluster.client.clone());
        // A newer CRD: it serves a workload this operator does not know (adding an enum value
        // changes nothing for the other tests).
        let add: json_patch::Patch = serde_json::from_value(serde_json::json!([
            {"op": "add", "path": format!("{WORKLOAD_ENUM}/-"), "value": "Future"}
        ]))?;
        crds.patch(
            "paralleljobs.lockstep.dev",
            &PatchParams::default(),
            &Patch::Json::<()>(add),
        )
        .await?;
        let body = async {
            let ar = ApiResource::erase::<ParallelJob>(&());
            let raw: Api<DynamicObject> =
                Api::namespaced_with(ns.cluster.client.clone(), &ns.name, &ar);
            let mut future = lockstep_e2e::example_manifest("ddp-digits.yaml")?;
            future["metadata"]["name"] = "from-the-future".into();
            future["spec"]["training"]["workload"] = "Future".into();
            let future: DynamicObject = serde_json::from_value(future)?;
            // The API server takes the new schema within moments.
            wait_until(
                Duration::from_secs(30),
                "the API server accepts workload Future",
                || async { Ok(raw.create(&PostParams::default(), &future).await.is_ok()) },
            )
            .await?;

            let mut present = lockstep_e2e::example_manifest("ddp-digits.yaml")?;
            present["metadata"]["name"] = "present".into();
            let jobs: Api<ParallelJob> = ns.api();
            jobs.create(&PostParams::default(), &serde_json::from_value(present)?)
                .await?;
            wait_until(Duration::from_secs(90), "the readable job runs", || async {
                Ok(jobs.get("present").await?.status.and_then(|s| s.phase) == Some(Phase::Running))
            })
            .await?;

            let events: Api<Event> = ns.api();
            let mut note = String::new();
            wait_until(
                Duration::from_secs(60),
                "an InvalidObject event",
                || async {
                    let list = events.list(&ListParams::default()).await?;
                    Ok(list.items.iter().any(|e| {
                        e.involved_object.name.as_deref() == Some("from-the-future")
                            && e.reason.as_deref() == Some("InvalidObject")
                    }))
                },
            )
            .await?;
            for e in events.list(&ListParams::default()).await?.items {
                if e.reason.as_deref() == Some("InvalidObject") {
                    note = e.message.unwrap_or_default();
                }
            }
            assert!(note.contains("spec.training.workload"), "{note}");
            assert!(note.contains("unknown variant `Future`"), "{note}");
            assert!(note.contains("upgrade the operator"), "{note}");
            // The operator wrote nothing for the job it cannot read.
            let stored = raw.get("from-the-future").await?;
            assert!(
                stored.data.get("status").is_none_or(|s| s.is_null()),
                "{stored:?}"
            );
            raw.delete("from-the-future", &DeleteParams::default())
                .await?;
            anyhow::Ok(())
        }
        .await;
        let remove: json_patch::Patch = serde_json::from_value(serde_json::json!([
            {"op": "test", "path": format!("{WORKLOAD_ENUM}/4"), "value": "Future"},
            {"op": "remove", "path": format!("{WORKLOAD_ENUM}/4")}
        ]))?;
        crds.patch(
            "paralleljobs.lockstep.dev",
            &PatchParams::default(),
            &Patch::Json::<()>(remove),
        )
        .await?;
        body
    })
    .await
}
