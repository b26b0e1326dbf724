//! Rank 0's progress reaches `status.progress` through the job's progress ConfigMap, written with
//! the workers' own ServiceAccount, whose Role allows nothing else. The test plays rank 0 with
//! the worker's own reporting code, impersonating that ServiceAccount.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{Api, Patch, PatchParams, PostParams};
use lockstep_api::ParallelJob;
use lockstep_api::contract::{env, names};
use lockstep_api::status::Progress;
use lockstep_e2e::{wait_until, with_namespace};

const TIMEOUT: Duration = Duration::from_secs(90);

async fn create(jobs: &Api<ParallelJob>, name: &str) -> anyhow::Result<()> {
    let mut v = lockstep_e2e::example_manifest("ddp-digits.yaml")?;
    v["metadata"]["name"] = name.into();
    jobs.create(&PostParams::default(), &serde_json::from_value(v)?)
        .await?;
    Ok(())
}

#[tokio::test]
async fn rank_zero_reports_progress_through_a_narrow_role() -> anyhow::Result<()> {
    with_namespace("progress", |ns| async move {
        let jobs: Api<ParallelJob> = ns.api();
        create(&jobs, "trainer").await?;
        create(&jobs, "neighbour").await?;
        let pods: Api<Pod> = ns.api();
        wait_until(TIMEOUT, "trainer is running", || async {
            Ok(jobs.get("trainer").await?.status.and_then(|s| s.phase)
                == Some(lockstep_api::status::Phase::Running))
        })
        .await?;

        // The pods run as the job's ServiceAccount and read the token from the job's Secret.
        let pod = pods.get("trainer-0").await?;
        let spec = pod.spec.expect("spec");
        assert_eq!(spec.service_account_name.as_deref(), Some("trainer-worker"));
        let token_ref = spec.containers[0]
            .env
            .as_ref()
            .and_then(|e| e.iter().find(|v| v.name == env::TOKEN))
            .and_then(|v| v.value_from.clone())
            .and_then(|f| f.secret_key_ref)
            .expect("the token comes from a Secret");
        let secrets: Api<Secret> = ns.api();
        let secret = secrets.get(&token_ref.name).await?;
        let token = secret.data.expect("data")[&token_ref.key].0.clone();
        assert_eq!(token.len(), 32, "a 128-bit hex token");
        let neighbour = jobs
            .get("neighbour")
            .await?
            .metadata
            .uid
            .unwrap_or_default();
        let other = secrets
            .get(&names::token_secret("neighbour", &neighbour))
            .await?;
        assert_ne!(
            other.data.expect("data")[names::TOKEN_KEY].0,
            token,
            "tokens are per job"
        );

        // Rank 0 (as the ServiceAccount) reports; the operator shows it.
        let sa = format!("system:serviceaccount:{}:trainer-worker", ns.name);
        let sa_groups = [
            "system:serviceaccounts".to_string(),
            format!("system:serviceaccounts:{}", ns.name),
            "system:authenticated".to_string(),
        ];
        let groups: Vec<&str> = sa_groups.iter().map(String::as_str).collect();
        let worker = ns.cluster.client_as(&sa, &groups).await?;
        let report = Progress {
            step: 42,
            total_steps: Some(880),
            loss: Some(0.25),
            samples_per_second: Some(1234.0),
            eval_metric: Some(0.9),
            updated_at: None,
            attempt: Some(0),
        };
        lockstep_worker::progress::report(&worker, &ns.name, "trainer", &report).await?;
        wait_until(TIMEOUT, "status.progress shows step 42", || async {
            Ok(jobs
                .get("trainer")
                .await?
                .status
                .and_then(|s| s.progress)
                .map(|p| p.step)
                == Some(42))
        })
        .await?;
        let shown = jobs
            .get("trainer")
            .await?
            .status
            .and_then(|s| s.progress)
            .expect("progress");
        assert_eq!(shown, report);

        // That is all the ServiceAccount may do.
        let forbidden = |r: Result<(), kube::Error>, what: &str| match r {
            Err(kube::Error::Api(e)) if e.code == 403 => {}
            other => panic!("{what} should be forbidden, got {other:?}"),
        };
        forbidden(
            lockstep_worker::progress::report(&worker, &ns.name, "neighbour", &report).await,
            "writing another job's progress",
        );
        let as_worker_jobs: Api<ParallelJob> = Api::namespaced(worker.clone(), &ns.name);
        forbidden(
            as_worker_jobs
                .patch_status(
                    "trainer",
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({"status": {"phase": "Succeeded"}})),
                )
                .await
                .map(drop),
            "writing the job's status",
        );
        let as_worker_maps: Api<ConfigMap> = Api::namespaced(worker.clone(), &ns.name);
        forbidden(
            as_worker_maps.get("trainer-config").await.map(drop),
            "reading another ConfigMap",
        );
        // Not even its own progress ConfigMap may it read or replace: the worker only patches.
        let own = names::progress_config_map("trainer");
        forbidden(
            as_worker_maps.get(&own).await.map(drop),
            "reading its progress ConfigMap",
        );
        let current = ns.api::<ConfigMap>().get(&own).await?;
        forbidden(
            as_worker_maps
                .replace(&own, &PostParams::default(), &current)
                .await
                .map(drop),
            "replacing its progress ConfigMap (update)",
        );
        let as_worker_secrets: Api<Secret> = Api::namespaced(worker, &ns.name);
        forbidden(
            as_worker_secrets.get(&token_ref.name).await.map(drop),
            "reading the token Secret",
        );

        // A malformed report does not break the job's reconcile: the last good one stays.
        let maps: Api<ConfigMap> = ns.api();
        maps.patch(
            &names::progress_config_map("trainer"),
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"data": {names::PROGRESS_KEY: "{not json"}})),
        )
        .await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let job = jobs.get("trainer").await?;
        let status = job.status.expect("status");
        assert_eq!(status.progress.map(|p| p.step), Some(42));
        assert_eq!(status.phase, Some(lockstep_api::status::Phase::Running));
        Ok(())
    })
    .await
}
