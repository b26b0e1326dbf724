//! Leader election on a real Lease: one holder at a time, takeover after expiry or release, and
//! of two operator replicas only the leader reconciles; when it stops, the other takes over.
//! The replicas answer to a controller name of their own (`spec.managedBy`), so the
//! suite's shared operator leaves their jobs alone.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use lockstep_api::ParallelJob;
use lockstep_api::status::Phase;
use lockstep_e2e::{wait_until, with_namespace};
use lockstep_operator::controller::Settings;
use lockstep_operator::leader::{LeaderElector, Stopped, lead};
use lockstep_operator::metrics::Metrics;

#[tokio::test]
async fn a_lease_has_one_holder_and_passes_on_when_it_expires() -> anyhow::Result<()> {
    with_namespace("lease", |ns| async move {
        let leases: Api<Lease> = ns.api();
        let a = LeaderElector::new(leases.clone(), "op", "replica-a", Duration::from_secs(3));
        let b = LeaderElector::new(leases.clone(), "op", "replica-b", Duration::from_secs(3));
        assert!(a.try_acquire_or_renew().await?, "a free lease is acquired");
        assert!(
            !b.try_acquire_or_renew().await?,
            "a held lease is not taken"
        );
        assert!(a.try_acquire_or_renew().await?, "the holder renews");
        assert!(!b.try_acquire_or_renew().await?);
        // a stops renewing: b gets the lease once it has expired, not before.
        wait_until(
            Duration::from_secs(20),
            "b takes over the expired lease",
            || async { Ok(b.try_acquire_or_renew().await?) },
        )
        .await?;
        let spec = leases.get("op").await?.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("replica-b"));
        assert_eq!(spec.lease_transitions, Some(1));
        assert!(!a.try_acquire_or_renew().await?, "the old holder lost it");
        b.release().await?;
        assert!(
            a.try_acquire_or_renew().await?,
            "a released lease is free at once"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn of_two_replicas_only_the_leader_acts_and_the_other_takes_over() -> anyhow::Result<()> {
    with_namespace("two-replicas", |ns| async move {
        let controller_name = format!("e2e.lockstep.dev/{}", ns.name);
        let replica = |identity: &str| {
            let leases: Api<Lease> = ns.api();
            let elector = LeaderElector::new(leases, "op", identity, Duration::from_secs(3));
            let settings = Settings {
                controller_name: controller_name.clone(),
                instance: identity.to_string(),
                ..Settings::default()
            };
            let metrics = Arc::new(Metrics::new());
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let client = ns.cluster.client.clone();
            let m = metrics.clone();
            let task = tokio::spawn(async move {
                lead(elector, client, settings, m, async {
                    let _ = stop_rx.await;
                })
                .await
            });
            (metrics, stop_tx, task)
        };
        let (m_a, stop_a, task_a) = replica("replica-a");
        let leases: Api<Lease> = ns.api();
        wait_until(Duration::from_secs(30), "replica-a leads", || async {
            Ok(leases
                .get_opt("op")
                .await?
                .and_then(|l| l.spec?.holder_identity)
                .as_deref()
                == Some("replica-a"))
        })
        .await?;
        let (m_b, stop_b, task_b) = replica("replica-b");

        let mut v = lockstep_e2e::example_manifest("ddp-digits.yaml")?;
        v["spec"]["managedBy"] = controller_name.clone().into();
        v["spec"]["failurePolicy"] =
            serde_json::json!({"restartBackoff": {"initialSeconds": 0, "maxSeconds": 0}});
        let jobs: Api<ParallelJob> = ns.api();
        jobs.create(&PostParams::default(), &serde_json::from_value(v)?)
            .await?;
        let phase = |attempt: i32| {
            let jobs = jobs.clone();
            async move {
                let s = jobs.get("ddp-digits").await?.status.unwrap_or_default();
                anyhow::Ok(s.attempt == attempt && s.phase == Some(Phase::Running))
            }
        };
        wait_until(Duration::from_secs(60), "the leader runs the job", || {
            phase(0)
        })
        .await?;
        assert!(m_a.reconciles.get() > 0, "the leader reconciled");
        assert_eq!(m_b.reconciles.get(), 0, "the follower acted");

        // The leader stops (and releases the lease); the follower takes over and handles a failure.
        let _ = stop_a.send(());
        assert_eq!(task_a.await??, Stopped::Shutdown);
        let pods: Api<Pod> = ns.api();
        lockstep_e2e::terminate_worker(&pods, "ddp-digits-1", 1).await?;
        wait_until(
            Duration::from_secs(60),
            "the new leader restarts the gang",
            || phase(1),
        )
        .await?;
        assert!(m_b.reconciles.get() > 0, "the new leader reconciled");
        let _ = stop_b.send(());
        task_b.await??;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn the_operators_client_keeps_to_its_api_rate() -> anyhow::Result<()> {
    use lockstep_operator::ratelimit::RateLimitLayer;
    let c = lockstep_e2e::cluster().await;
    let kc = kube::config::Kubeconfig::read_from(&c.kubeconfig)?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await?;
    // 5 requests per second, bursts of 2: 7 requests need at least (7 - 2) / 5 = 1 s.
    let client = kube::client::ClientBuilder::try_from(config)?
        .with_layer(&RateLimitLayer::new(5.0, 2))
        .build();
    let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(client);
    let started = std::time::Instant::now();
    for _ in 0..7 {
        namespaces.get("default").await?;
    }
    let took = started.elapsed();
    assert!(
        took >= std::time::Duration::from_millis(950),
        "7 requests took only {took:?}"
    );
    Ok(())
}
