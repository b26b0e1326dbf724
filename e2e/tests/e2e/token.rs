//! Only rank 0 of a gang gets a service-account token: it alone talks to the API server (it
//! writes the job's progress, see `lockstep_worker::progress`), so the other ranks' pods are made
//! with `automountServiceAccountToken: false` and the API server's ServiceAccount admission
//! mounts no token into them. A template that sets the field itself keeps it on every rank.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use lockstep_api::ParallelJob;
use lockstep_api::status::Phase;
use lockstep_e2e::{example_manifest, wait_until, with_namespace};

/// Where the API server's ServiceAccount admission mounts the token.
const TOKEN_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Whether the pod, as the API server admitted it, carries a service-account token: a projected
/// volume with a `serviceAccountToken` source, mounted at the token path.
fn has_token(pod: &Pod) -> bool {
    let spec = pod.spec.as_ref().expect("spec");
    let volume = spec.volumes.iter().flatten().any(|v| {
        v.projected
            .as_ref()
            .and_then(|p| p.sources.as_ref())
            .is_some_and(|s| s.iter().any(|s| s.service_account_token.is_some()))
    });
    let mounted = spec
        .containers
        .iter()
        .flat_map(|c| c.volume_mounts.iter().flatten())
        .any(|m| m.mount_path == TOKEN_PATH);
    assert_eq!(
        volume, mounted,
        "a token volume without its mount, or the reverse"
    );
    volume
}

#[tokio::test]
async fn only_rank_0_mounts_a_service_account_token() -> anyhow::Result<()> {
    with_namespace("token", |ns| async move {
        let jobs: Api<ParallelJob> = ns.api();
        let plain = example_manifest("ddp-digits.yaml")?;
        jobs.create(&PostParams::default(), &serde_json::from_value(plain)?)
            .await?;
        // A template that asks for the token on every rank gets it.
        let mut own = example_manifest("ddp-digits.yaml")?;
        own["metadata"]["name"] = "asks".into();
        own["spec"]["template"]["spec"]["automountServiceAccountToken"] = true.into();
        jobs.create(&PostParams::default(), &serde_json::from_value(own)?)
            .await?;
        for job in ["ddp-digits", "asks"] {
            wait_until(
                Duration::from_secs(90),
                &format!("{job} is running"),
                || async {
                    Ok(jobs.get(job).await?.status.unwrap_or_default().phase
                        == Some(Phase::Running))
                },
            )
            .await?;
        }
        let pods: Api<Pod> = ns.api();
        let rank0 = pods.get("ddp-digits-0").await?;
        let rank1 = pods.get("ddp-digits-1").await?;
        assert!(
            has_token(&rank0),
            "rank 0 reports progress: it needs the token"
        );
        assert_ne!(
            rank0.spec.as_ref().unwrap().automount_service_account_token,
            Some(false)
        );
        assert!(
            !has_token(&rank1),
            "rank 1 never calls the API, yet has a token"
        );
        assert_eq!(
            rank1.spec.as_ref().unwrap().automount_service_account_token,
            Some(false)
        );
        for name in ["asks-0", "asks-1"] {
            assert!(
                has_token(&pods.get(name).await?),
                "{name}: the template's own `automountServiceAccountToken: true` was overridden"
            );
        }
        Ok(())
    })
    .await
}
