//! An operator told to watch one namespace (`--namespace`, [`Settings::namespace`]) reconciles
//! the jobs there and leaves a job in any other namespace alone, even one that names it in
//! `spec.managedBy`: it never sees it. Its own controller name keeps the suite's shared
//! operator out of both.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::api::{Api, ListParams, PostParams};
use lockstep_api::ParallelJob;
use lockstep_api::contract::labels;
use lockstep_api::status::Phase;
use lockstep_e2e::{example_manifest, spawn_operator, wait_until, with_namespace};
use lockstep_operator::controller::Settings;

/// Deletes the second namespace when dropped, a failed test's too.
struct Other(lockstep_e2e::Cluster, String);

impl Drop for Other {
    fn drop(&mut self) {
        let _ = std::process::Command::new(self.0.bin.join("kubectl"))
            .args(["delete", "namespace", &self.1, "--wait=false"])
            .args(["--ignore-not-found"])
            .env("KUBECONFIG", &self.0.kubeconfig)
            .output();
    }
}

#[tokio::test]
async fn an_operator_watching_one_namespace_ignores_jobs_in_another() -> anyhow::Result<()> {
    with_namespace("watched", |ns| async move {
        let c = ns.cluster.clone();
        let other = Other(c.clone(), format!("{}-other", ns.name));
        c.kubectl(&["create", "namespace", &other.1]).await?;
        let controller_name = format!("e2e.lockstep.dev/{}", ns.name);
        let mut v = example_manifest("ddp-digits.yaml")?;
        v["spec"]["managedBy"] = controller_name.clone().into();
        let job: ParallelJob = serde_json::from_value(v)?;
        let watched: Api<ParallelJob> = ns.api();
        let ignored: Api<ParallelJob> = Api::namespaced(c.client.clone(), &other.1);
        ignored.create(&PostParams::default(), &job).await?;
        watched.create(&PostParams::default(), &job).await?;

        let settings = Settings {
            controller_name,
            namespace: Some(ns.name.clone()),
            ..Settings::default()
        };
        let operator = spawn_operator(&c.client, &settings);
        let outcome = async {
            wait_until(Duration::from_secs(90), "the watched job runs", || async {
                Ok(watched
                    .get("ddp-digits")
                    .await?
                    .status
                    .unwrap_or_default()
                    .phase
                    == Some(Phase::Running))
            })
            .await?;
            // A pass over the other job would have come with the first ones over this one
            // (a new job is reconciled at once); give it a moment more all the same.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let status = ignored.get("ddp-digits").await?.status;
            anyhow::ensure!(
                status.is_none(),
                "the job in {} was reconciled: {status:?}",
                other.1
            );
            let pods: Api<Pod> = Api::namespaced(c.client.clone(), &other.1);
            let services: Api<Service> = Api::namespaced(c.client.clone(), &other.1);
            let maps: Api<ConfigMap> = Api::namespaced(c.client.clone(), &other.1);
            let all = ListParams::default().labels(&format!("{}=ddp-digits", labels::JOB_NAME));
            anyhow::ensure!(pods.list(&all).await?.items.is_empty(), "pods were made");
            anyhow::ensure!(
                services.list(&all).await?.items.is_empty(),
                "a Service was made"
            );
            anyhow::ensure!(
                maps.list(&all).await?.items.is_empty(),
                "ConfigMaps were made"
            );
            anyhow::Ok(())
        }
        .await;
        operator.abort();
        drop(other);
        outcome
    })
    .await
}
