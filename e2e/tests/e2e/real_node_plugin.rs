//! `kubectl lockstep logs` and `top` on a job in real pods (what a container writes needs a
//! real kubelet): rank-prefixed logs; `-f` followed into the next attempt when a rank is killed
//! for real; the killed attempt's first failure from the lines the operator kept, with
//! `--previous`, `--failed` and `why`, after its pods are gone; each rank's metrics through the
//! pod proxy. A child of `real_node`, so that `make e2e-real` runs it, one real-node test at a
//! time.

use std::time::Duration;

use kube::api::{Api, PostParams};
use lockstep_api::ParallelJob;
use lockstep_api::status::Phase;
use lockstep_e2e::{TestNamespace, wait_until, with_namespace};

use super::{NODE, ONE_AT_A_TIME, kill_9, on_the_real_node};
use crate::plugin::{ok, plugin};

/// Lines of `out` that come from rank `r`.
fn of_rank(out: &str, r: u32) -> Vec<&str> {
    let p = format!("[rank {r}] ");
    out.lines().filter(|l| l.starts_with(&p)).collect()
}

#[tokio::test]
#[ignore = "needs the real node and the worker image: make e2e-real"]
async fn logs_follow_a_gang_into_its_next_attempt_and_keep_the_first_failure() -> anyhow::Result<()>
{
    let _node = ONE_AT_A_TIME.lock().await;
    with_namespace("real-plugin", |ns| async move {
        let jobs: Api<ParallelJob> = ns.api();
        let mut v = on_the_real_node("ddp-digits.yaml")?;
        // About 30 s per attempt on the real node (about 4,000 steps a second): long enough to
        // be killed while it trains.
        v["spec"]["training"]["epochs"] = 6000.into();
        v["spec"]["training"]["evaluation"] = serde_json::json!({"everySteps": 5000});
        jobs.create(&PostParams::default(), &serde_json::from_value(v)?)
            .await?;
        wait_until(Duration::from_secs(120), "training", || async {
            let s = jobs.get("ddp-digits").await?.status.unwrap_or_default();
            Ok(s.progress.is_some_and(|p| p.step > 0))
        })
        .await?;

        // Both ranks' lines, prefixed as `local` mode prefixes them.
        let out = ok(&ns, &["logs", "ddp-digits", "--all", "--tail", "5"]).await?;
        assert!(
            !of_rank(&out, 0).is_empty() && !of_rank(&out, 1).is_empty(),
            "{out}"
        );
        let out = ok(&ns, &["logs", "ddp-digits", "--rank", "1"]).await?;
        assert!(
            of_rank(&out, 1).iter().any(|l| l.contains("gang formed")),
            "{out}"
        );
        assert!(
            of_rank(&out, 0).is_empty(),
            "rank 0 in rank 1's log:\n{out}"
        );

        // Each rank's metrics through the pod proxy.
        let top = ok(&ns, &["top", "ddp-digits"]).await?;
        let rows: Vec<Vec<&str>> = top
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(rows[0][..4], ["RANK", "POD", "NODE", "STEP"], "{top}");
        for (r, row) in rows[1..].iter().enumerate() {
            assert_eq!(
                row[..3],
                [&r.to_string(), &format!("ddp-digits-{r}")[..], NODE],
                "{top}"
            );
            let step: f64 = row[3].parse().unwrap_or_else(|_| panic!("no step:\n{top}"));
            assert!(step > 0.0, "{top}");
            assert!(row[4].ends_with("ms"), "no step time:\n{top}");
        }
        assert_eq!(rows.len(), 3, "{top}");

        // Follow rank 0 while rank 1 is killed for real: the stream goes on into attempt 1.
        let follower = TestNamespace {
            cluster: ns.cluster.clone(),
            name: ns.name.clone(),
        };
        let follow = tokio::spawn(async move {
            plugin(&follower, &["logs", "ddp-digits", "-f", "--rank", "0"]).await
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        let pid =
            lockstep_e2e::worker_pid(&ns.name, "ddp-digits", 1).expect("rank 1's worker process");
        kill_9(pid)?;
        wait_until(
            Duration::from_secs(300),
            "Succeeded after a restart",
            || async {
                let s = jobs.get("ddp-digits").await?.status.unwrap_or_default();
                Ok(s.attempt == 1 && s.phase == Some(Phase::Succeeded))
            },
        )
        .await?;
        let (code, out) = tokio::time::timeout(Duration::from_secs(60), follow).await??;
        assert_eq!(code?, 0, "{out}");
        let restarted = out
            .find("--- the gang restarted: attempt 1 (after rank 1 failed")
            .unwrap_or_else(|| panic!("no restart marker in:\n{out}"));
        assert!(
            of_rank(&out[restarted..], 0)
                .iter()
                .any(|l| l.contains("gang formed")),
            "attempt 1's rank 0 was not followed:\n{out}"
        );
        assert!(
            out.trim_end().ends_with("--- ddp-digits Succeeded ---"),
            "{out}"
        );

        // The killed attempt's pods are gone; its first failure's last lines are kept.
        let prev = ok(&ns, &["logs", "ddp-digits", "--previous", "--rank", "1"]).await?;
        assert!(
            prev.starts_with(
                "--- attempt 0: the last lines of rank 1 (pod ddp-digits-1, exit code 137"
            ),
            "{prev}"
        );
        assert!(of_rank(&prev, 1).len() > 1, "{prev}");
        let (code, _) = plugin(&ns, &["logs", "ddp-digits", "--previous"]).await;
        let e = format!(
            "{:#}",
            code.expect_err("rank 0's lines of attempt 0 are gone")
        );
        assert!(e.contains("kept the last lines of rank 1"), "{e}");
        let failed = ok(&ns, &["logs", "ddp-digits", "--failed"]).await?;
        assert_eq!(of_rank(&failed, 1), of_rank(&prev, 1));
        let why = ok(&ns, &["why", "ddp-digits"]).await?;
        for want in [
            "First failure of attempt 0: rank 1 (pod ddp-digits-1 on node lockstep-real-0)",
            "exit code 137 (killed by signal 9)",
            "log lines (kept by the operator)",
        ] {
            assert!(why.contains(want), "no `{want}` in:\n{why}");
        }
        Ok(())
    })
    .await
}
