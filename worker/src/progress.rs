//! Rank 0's progress reports to the operator, which shows them in `status.progress`.
//!
//! The channel: rank 0 writes a JSON [`Progress`] into the job's progress ConfigMap every
//! [`names::PROGRESS_INTERVAL_SECONDS`]; the operator watches those ConfigMaps and copies the
//! report into the job's status. Chosen over the operator scraping rank 0's `/metrics` because
//! the operator then needs no network path to every pod (NetworkPolicies, other clusters' pod
//! CIDRs) and does no polling per job; the worker's only API permission is `patch` on that one
//! ConfigMap, by name (a Role the operator creates per job; only rank 0 mounts a token), so a
//! compromised worker can neither touch the job's status nor any other object.

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use lockstep_api::contract::names;
use lockstep_api::status::Progress;

use crate::metrics::Metrics;

/// Writes `progress` into the job's progress ConfigMap.
pub async fn report(
    client: &kube::Client,
    namespace: &str,
    job: &str,
    progress: &Progress,
) -> Result<(), kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let patch = serde_json::json!({ "data": { names::PROGRESS_KEY: progress.to_json() } });
    api.patch(
        &names::progress_config_map(job),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map(drop)
}

/// The progress of the gang as rank 0's metrics tell it: rank 0's data-parallel replica is one
/// of `replicas` that each train the same number of samples per step (its pipeline stages, if
/// any, see the same samples, so the world size would overcount); `attempt` is the gang's.
pub fn from_metrics(m: &Metrics, replicas: u32, attempt: u32) -> Progress {
    let positive = |v: f64| (v > 0.0).then_some(v);
    Progress {
        step: m.step.get(),
        total_steps: Some(m.total_steps.get()).filter(|t| *t > 0),
        loss: Some(m.loss.get()).filter(|l| l.is_finite() && m.step.get() > 0),
        samples_per_second: positive(m.samples_per_second.get() * f64::from(replicas)),
        eval_metric: positive(m.eval_metric.get()),
        updated_at: Some(Time(k8s_openapi::jiff::Timestamp::now())),
        attempt: i32::try_from(attempt).ok(),
    }
}

/// Reports every interval while the process runs; logs (once) when reporting is refused.
pub async fn report_periodically(
    client: kube::Client,
    namespace: String,
    job: String,
    metrics: Metrics,
    replicas: u32,
    attempt: u32,
) {
    let mut last_step = -1;
    let mut warned = false;
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(
            names::PROGRESS_INTERVAL_SECONDS,
        ))
        .await;
        let p = from_metrics(&metrics, replicas, attempt);
        if p.step == last_step {
            continue;
        }
        match report(&client, &namespace, &job, &p).await {
            Ok(()) => last_step = p.step,
            Err(e) if !warned => {
                warned = true;
                tracing::warn!(error = %e, "cannot report progress to the operator (status.progress stays empty)");
            }
            Err(_) => {}
        }
    }
}
