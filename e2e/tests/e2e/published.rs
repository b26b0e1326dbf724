//! After an operator restart, the ranks' EndpointSlice is judged by what the API server holds,
//! not by the memory of the process that wrote it: a slice listing an earlier attempt's
//! addresses is withdrawn while the current attempt is incomplete, so that no rank's name
//! resolves to a pod that is gone. An operator instance of this test's own (its own `managedBy`
//! name, so the suite's shared operator stays out) is stopped and started again in-process.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, PostParams};
use lockstep_api::ParallelJob;
use lockstep_api::status::Phase;
use lockstep_e2e::{spawn_operator, wait_until, with_namespace};
use lockstep_operator::controller::Settings;

/// Generous: the machines that run this suite are slow and shared.
const TIMEOUT: Duration = Duration::from_secs(180);

/// The (hostname, address) pairs the slice `name` lists; none when it does not exist.
async fn listed(slices: &Api<EndpointSlice>, name: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut got: Vec<(String, String)> = slices
        .get_opt(name)
        .await?
        .and_then(|s| s.endpoints)
        .unwrap_or_default()
        .into_iter()
        .map(|e| (e.hostname.unwrap_or_default(), e.addresses.join(",")))
        .collect();
    got.sort();
    Ok(got)
}

#[tokio::test]
async fn a_restarted_operator_withdraws_addresses_of_a_pod_deleted_while_it_was_down()
-> anyhow::Result<()> {
    with_namespace("published", |ns| async move {
        let controller_name = format!("e2e.lockstep.dev/{}", ns.name);
        let mut v = lockstep_e2e::example_manifest("ddp-digits.yaml")?;
        v["metadata"]["name"] = "stale".into();
        v["spec"]["parallelism"]["dataParallel"] = 2.into();
        v["spec"]["managedBy"] = controller_name.clone().into();
        // A long backoff: the next attempt does not start within the test, so the current one
        // stays incomplete and the old addresses could only go by being withdrawn.
        v["spec"]["failurePolicy"] = serde_json::json!(
            {"restartBackoff": {"initialSeconds": 3600, "maxSeconds": 3600}});
        let jobs: Api<ParallelJob> = ns.api();
        jobs.create(&PostParams::default(), &serde_json::from_value(v)?)
            .await?;
        let pods: Api<Pod> = ns.api();
        let slices: Api<EndpointSlice> = ns.api();
        let settings = Settings {
            controller_name,
            ..Settings::default()
        };
        let spawn = || spawn_operator(&ns.cluster.client, &settings);

        // The gang runs and its addresses are published.
        let operator = spawn();
        let published = wait_until(TIMEOUT, "stale runs with both ranks published", || async {
            let running =
                jobs.get("stale").await?.status.and_then(|s| s.phase) == Some(Phase::Running);
            Ok(running && listed(&slices, "stale-ranks").await?.len() == 2)
        })
        .await;
        operator.abort();
        let _ = operator.await;
        published?;
        let gone = pods.get("stale-1").await?;
        let gone_ip = gone.status.and_then(|s| s.pod_ip).unwrap_or_default();
        anyhow::ensure!(!gone_ip.is_empty(), "stale-1 has no address");
        let before = listed(&slices, "stale-ranks").await?;
        anyhow::ensure!(
            before.contains(&("stale-1".to_string(), gone_ip.clone())),
            "the slice does not list stale-1 at {gone_ip}: {before:?}"
        );

        // While the operator is down, a rank's pod goes: its address is stale.
        pods.delete("stale-1", &DeleteParams::default().grace_period(0))
            .await?;
        wait_until(TIMEOUT, "stale-1 is gone", || async {
            Ok(pods.get_opt("stale-1").await?.is_none())
        })
        .await?;

        // A new operator process, which never wrote the slice, withdraws it.
        let operator = spawn();
        let withdrawn = wait_until(
            TIMEOUT,
            "the slice no longer lists stale-1's address",
            || async {
                let now = listed(&slices, "stale-ranks").await?;
                Ok(!now
                    .iter()
                    .any(|(_, ip)| ip.split(',').any(|a| a == gone_ip)))
            },
        )
        .await;
        let now = listed(&slices, "stale-ranks").await;
        operator.abort();
        let _ = operator.await;
        withdrawn.map_err(|e| anyhow::anyhow!("{e:#}; the slice lists {now:?}"))?;
        Ok(())
    })
    .await
}
