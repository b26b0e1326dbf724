//! A PyTorch job in real pods, on the real node of `make cluster-up REAL_NODES=1`:
//! `examples/torch-command.yaml` as a user applies it (workload Command, `torchrun` with no
//! arguments, Gloo), with its image replaced by the plain PyTorch image of `make pytorch-image`
//! (`images/pytorch/build.sh`: torch from PyPI on Debian's python3, nothing of Lockstep in it).
//! It shows that the env contract alone (`MASTER_ADDR`, `PET_*`, ...) lets torchrun's ranks find
//! each other across pods, and that their exit codes make the job's phase.
//!
//! Ignored in `make e2e` and `make e2e-real` (it needs root, the node's build and a 3 GB image):
//! `make e2e-torch` runs it.

use std::time::Duration;

use kube::api::{Api, PostParams};
use lockstep_api::ParallelJob;
use lockstep_api::status::Phase;
use lockstep_e2e::{wait_until, with_namespace};

use crate::real_node::{on_the_real_node, ranks_ran_on_the_real_node_and_exited_0};

/// The image of `make pytorch-image`, as the real node imports it.
const IMAGE: &str = "docker.io/lockstep/pytorch:0.1.0";
const JOB: &str = "torch-command";
const RANKS: u32 = 2;

#[tokio::test]
#[ignore = "needs the real node and the PyTorch image: make e2e-torch"]
async fn torch_command_runs_torchrun_ddp_with_gloo_in_real_pods() -> anyhow::Result<()> {
    with_namespace("real-torch", |ns| async move {
        let jobs: Api<ParallelJob> = ns.api();
        let mut v = on_the_real_node("torch-command.yaml")?;
        let worker = &mut v["spec"]["template"]["spec"]["containers"][0];
        anyhow::ensure!(
            worker["name"] == "worker",
            "the example's container: {worker}"
        );
        worker["image"] = IMAGE.into();
        jobs.create(&PostParams::default(), &serde_json::from_value(v)?)
            .await?;

        // Finished either way; a failure is reported below with the ranks' logs.
        wait_until(Duration::from_secs(300), "Succeeded or Failed", || async {
            let phase = jobs.get(JOB).await?.status.and_then(|s| s.phase);
            Ok(matches!(phase, Some(Phase::Succeeded | Phase::Failed)))
        })
        .await?;
        let mut logs = Vec::new();
        for rank in 0..RANKS {
            let pod = format!("{JOB}-{rank}");
            logs.push(ns.cluster.kubectl(&["logs", "-n", &ns.name, &pod]).await?);
        }
        let status = jobs.get(JOB).await?.status.unwrap_or_default();
        anyhow::ensure!(
            status.phase == Some(Phase::Succeeded) && status.attempt == 0,
            "the job ended {:?} in attempt {} ({:?}); the ranks' logs:\n{}",
            status.phase,
            status.attempt,
            status.last_failure,
            logs.join("\n----\n")
        );

        // Both ranks ran on the real node and exited 0.
        ranks_ran_on_the_real_node_and_exited_0(&ns.api(), JOB, RANKS as usize).await?;

        // Each rank all-reduced its rank + 1 over Gloo with the other: 1 + 2 = 3.
        for (rank, log) in logs.iter().enumerate() {
            let want = format!("rank {rank} of {RANKS}: all_reduce ok (3.0)");
            anyhow::ensure!(
                log.lines().any(|l| l.trim() == want),
                "rank {rank} did not log {want:?}:\n{log}"
            );
        }
        Ok(())
    })
    .await
}
