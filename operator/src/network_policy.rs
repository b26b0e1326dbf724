//! The NetworkPolicy every job gets: its worker pods take connections from the same job's pods
//! only (rendezvous, the torch store, NCCL, the TCP ring: every port), and on the metrics port
//! from the scrapers the operator's settings name. Pure, like [`crate::resources`].
//!
//! The policy is enforced only where the cluster's network plugin enforces NetworkPolicies;
//! elsewhere it is an inert object.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use lockstep_api::contract::{labels, ports};

use crate::Result;
use crate::resources::JobContext;

impl JobContext<'_> {
    /// Name of the job's NetworkPolicy.
    pub fn network_policy_name(&self) -> String {
        format!("{}-workers", self.name)
    }

    /// The job's NetworkPolicy: it selects the job's worker pods and admits, for Ingress, the
    /// pods of the same job (by the job's name and UID labels) on every port, and
    /// `metrics_from` on the metrics port. An empty `metrics_from` admits no scraper (a rule
    /// with no peers would admit every source, so none is written).
    pub fn network_policy(&self, metrics_from: &[NetworkPolicyPeer]) -> Result<NetworkPolicy> {
        // By UID too: pods left by an earlier job of the same name (orphaned) are not this job's.
        let job = BTreeMap::from([
            (labels::JOB_NAME.to_string(), self.name.to_string()),
            (labels::JOB_UID.to_string(), self.uid().to_string()),
        ]);
        let mut workers = job.clone();
        workers.insert(labels::COMPONENT.into(), "worker".into());
        let mut ingress = vec![NetworkPolicyIngressRule {
            from: Some(vec![NetworkPolicyPeer {
                pod_selector: Some(LabelSelector {
                    match_labels: Some(job),
                    ..LabelSelector::default()
                }),
                ..NetworkPolicyPeer::default()
            }]),
            ports: None,
        }];
        if !metrics_from.is_empty() {
            // The pods' metrics port, as the pod builder sets it.
            let port =
                u16::try_from(self.job.spec.monitoring.metrics_port).unwrap_or(ports::METRICS);
            ingress.push(NetworkPolicyIngressRule {
                from: Some(metrics_from.to_vec()),
                ports: Some(vec![NetworkPolicyPort {
                    port: Some(IntOrString::Int(i32::from(port))),
                    protocol: Some("TCP".into()),
                    ..NetworkPolicyPort::default()
                }]),
            });
        }
        Ok(NetworkPolicy {
            metadata: ObjectMeta {
                name: Some(self.network_policy_name()),
                namespace: Some(self.namespace.to_string()),
                labels: Some(self.common_labels()),
                owner_references: Some(vec![self.owner_reference()?]),
                ..ObjectMeta::default()
            },
            spec: Some(NetworkPolicySpec {
                pod_selector: Some(LabelSelector {
                    match_labels: Some(workers),
                    ..LabelSelector::default()
                }),
                policy_types: Some(vec!["Ingress".into()]),
                ingress: Some(ingress),
                ..NetworkPolicySpec::default()
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    use lockstep_api::contract::labels;

    use lockstep_api::ParallelJob;

    use crate::resources::JobContext;

    fn job(yaml: &str) -> ParallelJob {
        let path = format!("{}/../examples/{yaml}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(path).unwrap();
        let mut job = lockstep_api::validation::validate_yaml(&text).unwrap();
        job.metadata.namespace = Some("team-a".into());
        job.metadata.uid = Some("uid-1".into());
        job
    }

    fn scraper() -> NetworkPolicyPeer {
        serde_json::from_value(serde_json::json!({
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
        }))
        .unwrap()
    }

    #[test]
    fn the_policy_admits_the_same_job_everywhere_and_the_scrapers_on_the_metrics_port() {
        let job = job("ddp-digits.yaml");
        let ctx = JobContext::new(&job).unwrap();
        let name = ctx.name.to_string();
        let policy = ctx.network_policy(&[scraper()]).unwrap();
        let meta = &policy.metadata;
        assert_eq!(
            meta.name.as_deref(),
            Some(format!("{name}-workers").as_str())
        );
        assert_eq!(meta.namespace.as_deref(), Some("team-a"));
        assert_eq!(meta.labels.as_ref(), Some(&ctx.common_labels()));
        let owner = &meta.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.uid.as_str(), owner.controller),
            ("uid-1", Some(true))
        );

        let spec = policy.spec.unwrap();
        // It selects the job's worker pods, which carry those labels.
        let selected = spec.pod_selector.unwrap().match_labels.unwrap();
        let pod = ctx.pod(0, 0, "d", false, None).unwrap();
        let pod_labels = pod.metadata.labels.unwrap();
        assert_eq!(selected.len(), 3);
        assert!(
            selected.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
            "{selected:?}"
        );
        assert_eq!(selected[labels::JOB_NAME], name);
        // By UID too: an orphaned pod of an earlier job of the same name is not selected.
        assert_eq!(selected[labels::JOB_UID], "uid-1");
        assert_eq!(selected[labels::COMPONENT], "worker");
        assert_eq!(
            spec.policy_types.as_deref(),
            Some(&["Ingress".to_string()][..])
        );

        let ingress = spec.ingress.unwrap();
        assert_eq!(ingress.len(), 2);
        // The same job's pods, on every port (a torch job's MASTER_PORT and NCCL's too).
        let peers = ingress[0].from.as_ref().unwrap();
        assert_eq!(peers.len(), 1);
        assert_eq!(
            peers[0].pod_selector,
            Some(LabelSelector {
                match_labels: Some(
                    [
                        (labels::JOB_NAME.to_string(), name.clone()),
                        (labels::JOB_UID.to_string(), "uid-1".to_string()),
                    ]
                    .into()
                ),
                ..LabelSelector::default()
            })
        );
        assert!(peers[0].namespace_selector.is_none() && peers[0].ip_block.is_none());
        assert!(ingress[0].ports.is_none());
        // The scrapers, on the metrics port only.
        assert_eq!(ingress[1].from.as_deref(), Some(&[scraper()][..]));
        let ports = ingress[1].ports.as_ref().unwrap();
        assert_eq!(ports.len(), 1);
        let metrics = job.spec.monitoring.metrics_port;
        assert_eq!(ports[0].port, Some(IntOrString::Int(metrics)));
        assert_eq!(ports[0].protocol.as_deref(), Some("TCP"));
    }

    #[test]
    fn no_scrapers_means_no_rule_that_would_admit_everyone() {
        let job = job("ddp-digits.yaml");
        let ctx = JobContext::new(&job).unwrap();
        let ingress = ctx
            .network_policy(&[])
            .unwrap()
            .spec
            .unwrap()
            .ingress
            .unwrap();
        assert_eq!(ingress.len(), 1);
        assert!(
            ingress
                .iter()
                .all(|r| r.from.as_ref().is_some_and(|f| !f.is_empty()))
        );
    }
}
