//! Killing the operator between any two writes never leaves duplicate or orphan pods, and never
//! lets pods of two attempts coexist. An operator instance of this test's own (its own
//! `managedBy` name, so the suite's shared operator stays out) is aborted mid-flight at
//! pseudo-random moments many times while its job starts, fails and restarts; the invariants are
//! checked after every kill, and in the end the gang converges.

use std::collections::HashSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use lockstep_api::ParallelJob;
use lockstep_api::contract::labels;
use lockstep_api::status::Phase;
use lockstep_e2e::{spawn_operator, wait_until, with_namespace};
use lockstep_operator::controller::Settings;

const RANKS: usize = 4;
const KILLS: u64 = 25;
const RESTARTS: i32 = 3;

fn check_invariants(pods: &[Pod], uid: &str, attempt: i32) -> anyhow::Result<()> {
    let mut ranks = HashSet::new();
    let mut attempts = HashSet::new();
    for p in pods {
        let l = p.metadata.labels.clone().unwrap_or_default();
        let rank = l.get(labels::RANK).cloned().unwrap_or_default();
        anyhow::ensure!(ranks.insert(rank.clone()), "rank {rank} has two pods");
        let owned = p
            .metadata
            .owner_references
            .as_ref()
            .is_some_and(|o| o.iter().any(|r| r.uid == uid && r.controller == Some(true)));
        anyhow::ensure!(owned, "pod {:?} is an orphan", p.metadata.name);
        let a: i32 = l
            .get(labels::ATTEMPT)
            .and_then(|a| a.parse().ok())
            .unwrap_or(-1);
        anyhow::ensure!(
            a <= attempt,
            "pod of attempt {a} exists while the job records attempt {attempt}"
        );
        if p.metadata.deletion_timestamp.is_none() {
            attempts.insert(a);
        }
    }
    anyhow::ensure!(
        attempts.len() <= 1,
        "live pods of attempts {attempts:?} coexist"
    );
    Ok(())
}

#[tokio::test]
async fn killing_the_operator_between_writes_never_leaves_duplicates_or_orphans()
-> anyhow::Result<()> {
    with_namespace("crash", |ns| async move {
        let controller_name = format!("e2e.lockstep.dev/{}", ns.name);
        let mut v = lockstep_e2e::example_manifest("ddp-digits.yaml")?;
        v["metadata"]["name"] = "crashy".into();
        v["spec"]["parallelism"]["dataParallel"] = RANKS.into();
        v["spec"]["managedBy"] = controller_name.clone().into();
        v["spec"]["failurePolicy"] =
            serde_json::json!({"maxRestarts": 10, "restartBackoff": {"initialSeconds": 0, "maxSeconds": 0}});
        let jobs: Api<ParallelJob> = ns.api();
        let job = jobs.create(&PostParams::default(), &serde_json::from_value(v)?).await?;
        let uid = job.metadata.uid.clone().unwrap_or_default();
        let pods: Api<Pod> = ns.api();
        let settings = Settings { controller_name: controller_name.clone(), ..Settings::default() };
        let spawn = || spawn_operator(&ns.cluster.client, &settings);

        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for kill in 0..KILLS {
            let operator = spawn();
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            tokio::time::sleep(Duration::from_millis(20 + seed % 300)).await;
            operator.abort(); // a crash: in-flight requests may or may not have landed
            let _ = operator.await;

            let status = jobs.get("crashy").await?.status.unwrap_or_default();
            let now = pods.list(&ListParams::default()).await?.items;
            check_invariants(&now, &uid, status.attempt).map_err(|e| anyhow::anyhow!("after kill {kill}: {e}"))?;
            // Play the kubelet: fail a rank of a running gang, until enough restarts happened.
            if status.phase == Some(Phase::Running) && status.attempt < RESTARTS {
                let victim = format!("crashy-{}", kill as usize % RANKS);
                // The pod may be gone already (the killed operator's last write): that is fine.
                let _ = lockstep_e2e::terminate_worker(&pods, &victim, 1).await;
            }
        }

        // A last operator that stays: the gang converges to one running attempt.
        let operator = spawn();
        let converged = wait_until(Duration::from_secs(120), "the gang runs again with all ranks", || async {
            let s = jobs.get("crashy").await?.status.unwrap_or_default();
            let now = pods.list(&ListParams::default()).await?.items;
            check_invariants(&now, &uid, s.attempt)?;
            Ok(s.phase == Some(Phase::Running)
                && now.len() == RANKS
                && now.iter().all(|p| p.metadata.labels.as_ref().and_then(|l| l.get(labels::ATTEMPT)) == Some(&s.attempt.to_string())))
        })
        .await;
        operator.abort();
        converged?;
        let s = jobs.get("crashy").await?.status.unwrap_or_default();
        assert!(s.attempt >= 1, "the test never got a gang restart in (attempt {})", s.attempt);
        Ok(())
    })
    .await
}
