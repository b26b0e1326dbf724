//! Every job gets a NetworkPolicy for its workers: ingress from the same job's pods on every
//! port, and from the operator's configured metrics scrapers on the metrics port. The test
//! control plane has no network plugin that enforces NetworkPolicies, so this checks the object
//! the operator writes, not the traffic it would stop. An operator instance of this test's own
//! (its own `managedBy` name and scraper setting) runs in-process.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer};
use kube::api::{Api, ListParams, PostParams};
use lockstep_api::ParallelJob;
use lockstep_api::contract::labels;
use lockstep_api::status::Phase;
use lockstep_e2e::{spawn_operator, wait_until, with_namespace};
use lockstep_operator::controller::Settings;

/// Generous: the machines that run this suite are slow and shared.
const TIMEOUT: Duration = Duration::from_secs(180);

#[tokio::test]
async fn a_running_job_has_a_network_policy_admitting_its_own_pods_and_the_scrapers()
-> anyhow::Result<()> {
    with_namespace("netpol", |ns| async move {
        let controller_name = format!("e2e.lockstep.dev/{}", ns.name);
        let mut v = lockstep_e2e::example_manifest("ddp-digits.yaml")?;
        v["metadata"]["name"] = "fenced".into();
        v["spec"]["parallelism"]["dataParallel"] = 2.into();
        v["spec"]["managedBy"] = controller_name.clone().into();
        let jobs: Api<ParallelJob> = ns.api();
        let job = jobs
            .create(&PostParams::default(), &serde_json::from_value(v)?)
            .await?;
        let uid = job.metadata.uid.clone().unwrap_or_default();
        let scraper: NetworkPolicyPeer = serde_json::from_value(serde_json::json!({
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
        }))?;
        let settings = Settings {
            controller_name,
            worker_metrics_from: vec![scraper.clone()],
            ..Settings::default()
        };
        let operator = spawn_operator(&ns.cluster.client, &settings);
        let running = wait_until(TIMEOUT, "fenced runs", || async {
            Ok(jobs.get("fenced").await?.status.and_then(|s| s.phase) == Some(Phase::Running))
        })
        .await;
        operator.abort();
        let _ = operator.await;
        running?;

        let policies: Api<NetworkPolicy> = ns.api();
        let policy = policies.get("fenced-workers").await?;
        let owner = &policy.metadata.owner_references.clone().unwrap_or_default()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("ParallelJob", uid.as_str(), Some(true))
        );
        let meta_labels = policy.metadata.labels.clone().unwrap_or_default();
        assert_eq!(
            meta_labels.get(labels::JOB_NAME).map(String::as_str),
            Some("fenced")
        );
        let spec = policy.spec.unwrap();
        assert_eq!(
            spec.policy_types.as_deref(),
            Some(&["Ingress".to_string()][..])
        );
        // It selects exactly the job's worker pods.
        let selector = spec.pod_selector.unwrap().match_labels.unwrap_or_default();
        let selector = selector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let pods: Api<Pod> = ns.api();
        let selected = pods
            .list(&ListParams::default().labels(&selector))
            .await?
            .items;
        let all = pods.list(&ListParams::default()).await?.items;
        assert_eq!(selected.len(), 2, "{selector}");
        assert_eq!(all.len(), 2);
        assert!(
            selector.contains(&format!("{}=fenced", labels::JOB_NAME)),
            "{selector}"
        );

        let ingress = spec.ingress.unwrap();
        assert_eq!(ingress.len(), 2, "{ingress:?}");
        // The same job's pods, on every port.
        let own = ingress[0].from.clone().unwrap_or_default();
        assert_eq!(own.len(), 1);
        let own_labels = own[0]
            .pod_selector
            .clone()
            .unwrap()
            .match_labels
            .unwrap_or_default();
        // By name and UID: pods an earlier job of the same name left are not admitted.
        assert_eq!(
            own_labels.into_iter().collect::<Vec<_>>(),
            vec![
                (labels::JOB_NAME.to_string(), "fenced".to_string()),
                (labels::JOB_UID.to_string(), uid.clone())
            ]
        );
        assert!(own[0].namespace_selector.is_none());
        assert!(ingress[0].ports.is_none());
        // The scraper of the setting, on the metrics port alone.
        assert_eq!(ingress[1].from.as_deref(), Some(&[scraper][..]));
        let ports = ingress[1].ports.clone().unwrap_or_default();
        let metrics = job.spec.monitoring.metrics_port;
        assert_eq!(ports.len(), 1);
        assert_eq!(
            ports[0].port,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(metrics))
        );
        Ok(())
    })
    .await
}
