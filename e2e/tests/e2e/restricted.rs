//! A job runs in a namespace that enforces the restricted Pod Security level: where the template
//! sets no securityContext, the operator's pods default to the restricted one, so the API
//! server's PodSecurity admission lets them in.

use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, Patch, PatchParams, PostParams};
use lockstep_api::ParallelJob;
use lockstep_api::status::Phase;
use lockstep_e2e::{example_manifest, wait_until, with_namespace};

/// Makes the test's namespace enforce the restricted Pod Security level.
pub async fn enforce_restricted(client: &kube::Client, namespace: &str) -> anyhow::Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let patch = serde_json::json!({"metadata": {"labels": {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest"}}});
    namespaces
        .patch(namespace, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

#[tokio::test]
async fn the_example_runs_in_a_namespace_that_enforces_the_restricted_level() -> anyhow::Result<()>
{
    with_namespace("restricted", |ns| async move {
        enforce_restricted(&ns.cluster.client, &ns.name).await?;
        let jobs: Api<ParallelJob> = ns.api();
        let v = example_manifest("ddp-digits.yaml")?;
        jobs.create(&PostParams::default(), &serde_json::from_value(v)?)
            .await?;
        wait_until(Duration::from_secs(90), "every rank running", || async {
            let s = jobs.get("ddp-digits").await?.status.unwrap_or_default();
            let rejected = s
                .conditions
                .iter()
                .find(|c| c.reason == lockstep_api::status::reasons::TEMPLATE_REJECTED);
            if let Some(c) = rejected {
                anyhow::bail!("the pods were refused: {}", c.message);
            }
            Ok(s.phase == Some(Phase::Running))
        })
        .await
    })
    .await
}
