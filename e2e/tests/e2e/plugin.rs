//! `kubectl lockstep` against the real control plane, its commands run in-process on the test's
//! client and namespace (the binary is the same code behind clap): `submit` validates, applies
//! and follows a job to its end; `ls` and `why` show a running, a queued and a failed job;
//! `suspend`, `resume`, `restart` and `delete` steer one; `completion` prints a script. The
//! commands that read what containers write (`logs`, `top`) need real pods: see `real_node.rs`.

use std::time::Duration;

use clap::Parser;
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kubectl_lockstep::{Cli, Ctx, Out, execute};
use lockstep_api::ParallelJob;
use lockstep_api::status::Phase;
use lockstep_e2e::{TestNamespace, terminate_worker, wait_until, with_namespace};

const TIMEOUT: Duration = Duration::from_secs(90);

/// Runs `kubectl lockstep ARGS` in the test's namespace: (exit code or error, output).
pub(crate) async fn plugin(ns: &TestNamespace, args: &[&str]) -> (anyhow::Result<i32>, String) {
    plugin_to(ns, args, Out::buffer()).await
}

/// `kubectl lockstep ARGS` writing into `out`, which the test may read while it runs.
async fn plugin_to(ns: &TestNamespace, args: &[&str], out: Out) -> (anyhow::Result<i32>, String) {
    let cli = Cli::try_parse_from(std::iter::once("kubectl-lockstep").chain(args.iter().copied()))
        .expect("valid arguments");
    let ctx = Ctx {
        client: ns.cluster.client.clone(),
        namespace: cli.namespace.clone().unwrap_or_else(|| ns.name.clone()),
        out,
    };
    let code = execute(cli.command, &ctx).await;
    (code, ctx.out.text())
}

/// `kubectl lockstep ARGS` that must succeed: its output.
pub(crate) async fn ok(ns: &TestNamespace, args: &[&str]) -> anyhow::Result<String> {
    match plugin(ns, args).await {
        (Ok(0), out) => Ok(out),
        (Ok(c), out) => anyhow::bail!("kubectl lockstep {args:?} exited {c}:\n{out}"),
        (Err(e), out) => anyhow::bail!("kubectl lockstep {args:?} failed: {e:#}\n{out}"),
    }
}

/// A `ddp-digits` job of 2 ranks with `gpus` GPUs each on the test's pool; `extra` merged into
/// the spec.
fn job(ns: &TestNamespace, name: &str, gpus: i32, extra: serde_json::Value) -> serde_json::Value {
    let mut v = ns
        .example_on_pool("ddp-digits.yaml", name)
        .expect("example");
    v["metadata"]["namespace"] = ns.name.clone().into();
    v["spec"]["parallelism"] = serde_json::json!({"dataParallel": 2, "gpusPerWorker": gpus});
    if let Some(obj) = extra.as_object() {
        for (k, val) in obj {
            v["spec"][k] = val.clone();
        }
    }
    v
}

async fn create(ns: &TestNamespace, v: serde_json::Value) -> anyhow::Result<()> {
    ns.api::<ParallelJob>()
        .create(&PostParams::default(), &serde_json::from_value(v)?)
        .await?;
    Ok(())
}

async fn wait_phase(ns: &TestNamespace, name: &str, want: Phase) -> anyhow::Result<()> {
    ns.wait_phase(name, want, TIMEOUT).await
}

/// Writes `v` as YAML into a file of its own.
fn manifest_file(ns: &TestNamespace, tag: &str, v: &serde_json::Value) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("{}-{tag}.yaml", ns.name));
    std::fs::write(&path, serde_saphyr::to_string(v).expect("yaml")).expect("write");
    path
}

#[tokio::test]
async fn submit_refuses_a_broken_manifest_and_follows_a_good_one_to_its_end() -> anyhow::Result<()>
{
    with_namespace("plugin-submit", |ns| async move {
        ns.create_node_pool(1, 8).await?;
        // Refused before anything is sent, naming the field, as the API server would.
        let mut broken = job(&ns, "broken", 1, serde_json::json!({}));
        broken["spec"]["parallelism"]["dataParallel"] = 0.into();
        let file = manifest_file(&ns, "broken", &broken);
        let (code, _) = plugin(&ns, &["submit", "-f", file.to_str().unwrap()]).await;
        let e = format!("{:#}", code.expect_err("a broken manifest is refused"));
        assert!(e.contains("spec.parallelism.dataParallel"), "{e}");
        assert!(
            ns.api::<ParallelJob>().get_opt("broken").await?.is_none(),
            "a refused manifest was applied"
        );

        // A good one is applied server-side and followed until it ends.
        let good = job(&ns, "good", 1, serde_json::json!({}));
        let file = manifest_file(&ns, "good", &good);
        let path = file.to_str().unwrap().to_string();
        let ns2 = TestNamespace {
            cluster: ns.cluster.clone(),
            name: ns.name.clone(),
        };
        let out = Out::buffer();
        let seen = out.clone();
        let follow =
            tokio::spawn(
                async move { plugin_to(&ns2, &["submit", "-f", &path, "--wait"], out).await },
            );
        // The ranks finish once the plugin has shown the gang running: it polls the job twice a
        // second, and kwok's ranks would otherwise finish between two polls.
        wait_until(TIMEOUT, "the plugin shows Running", || async {
            Ok(seen.text().contains("Running (attempt 0)"))
        })
        .await?;
        let pods = ns.api::<Pod>();
        for p in ns.gang("good").await? {
            terminate_worker(&pods, &p.metadata.name.unwrap_or_default(), 0).await?;
        }
        let (code, out) = tokio::time::timeout(TIMEOUT, follow).await??;
        assert_eq!(code?, 0, "{out}");
        for want in [
            "paralleljob.lockstep.dev/good applied",
            "Running (attempt 0)  Admitted=True",
            "good succeeded",
        ] {
            assert!(out.contains(want), "no `{want}` in:\n{out}");
        }
        let job = ns.api::<ParallelJob>().get("good").await?;
        let managers: Vec<String> = job
            .metadata
            .managed_fields
            .unwrap_or_default()
            .into_iter()
            .filter(|m| m.operation.as_deref() == Some("Apply"))
            .filter_map(|m| m.manager)
            .collect();
        assert!(
            managers.contains(&kubectl_lockstep::submit::FIELD_MANAGER.to_string()),
            "not applied server-side by the plugin: {managers:?}"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn submit_local_trains_the_job_on_this_machine() -> anyhow::Result<()> {
    // This build's worker, beside the test binary's folder.
    let built = std::process::Command::new(env!("CARGO"))
        .args([
            "build",
            "-q",
            "--locked",
            "-p",
            "lockstep-worker",
            "--bin",
            "lockstep-worker",
        ])
        .status()?;
    anyhow::ensure!(built.success(), "cannot build lockstep-worker");
    let worker = std::env::current_exe()?
        .parent()
        .and_then(|deps| deps.parent())
        .map(|d| d.join("lockstep-worker"))
        .expect("the target folder");
    with_namespace("plugin-local", |ns| async move {
        let mut v = lockstep_e2e::example_manifest("ddp-digits.yaml")?;
        v["spec"]["training"]["epochs"] = 1.into();
        v["spec"]["training"]["data"]["path"] = lockstep_e2e::repo_root()
            .join("data/digits.csv.gz")
            .to_string_lossy()
            .into_owned()
            .into();
        let file = manifest_file(&ns, "local", &v);
        let w = worker.to_string_lossy().into_owned();
        let f = file.to_string_lossy().into_owned();
        let (code, _) = plugin(&ns, &["submit", "-f", &f, "--local", "--worker", &w]).await;
        assert_eq!(code?, 0, "the local run failed");
        assert!(
            ns.api::<ParallelJob>()
                .get_opt("ddp-digits")
                .await?
                .is_none(),
            "--local created the job in the cluster"
        );
        // A rank that fails fails the local run, with its exit code.
        v["spec"]["training"]["data"]["path"] = "/nonexistent/digits.csv".into();
        let file = manifest_file(&ns, "local-bad", &v);
        let f = file.to_string_lossy().into_owned();
        let (code, _) = plugin(&ns, &["submit", "-f", &f, "--local", "--worker", &w]).await;
        assert_eq!(code?, 8, "an unreadable data set is exit code 8");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn ls_and_why_show_a_running_a_queued_and_a_failed_job() -> anyhow::Result<()> {
    with_namespace("plugin-ls-why", |ns| async move {
        // One node of 8 GPUs: `first` (2 x 4) runs, `second` and `third` wait behind it.
        ns.create_node_pool(1, 8).await?;
        create(&ns, job(&ns, "first", 4, serde_json::json!({}))).await?;
        wait_phase(&ns, "first", Phase::Running).await?;
        create(&ns, job(&ns, "second", 4, serde_json::json!({}))).await?;
        wait_phase(&ns, "second", Phase::Queued).await?;
        create(&ns, job(&ns, "third", 4, serde_json::json!({}))).await?;
        wait_until(TIMEOUT, "third is second in the queue", || async {
            let s = ns
                .api::<ParallelJob>()
                .get("third")
                .await?
                .status
                .unwrap_or_default();
            Ok(s.admission.and_then(|a| a.queue_position) == Some(2))
        })
        .await?;

        let out = ok(&ns, &["ls"]).await?;
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines[0].starts_with("NAME")
                && lines[0].contains("QUEUE")
                && lines[0].contains("POLICY"),
            "{out}"
        );
        let row = |name: &str| -> Vec<String> {
            lines
                .iter()
                .find(|l| l.starts_with(&format!("{name} ")))
                .unwrap_or_else(|| panic!("no row {name} in\n{out}"))
                .split_whitespace()
                .map(String::from)
                .collect()
        };
        // NAME PHASE READY STEP LOSS RESTARTS QUEUE WAIT POLICY AGE
        assert_eq!(row("first")[1..3], ["Running", "2/2"], "{out}");
        assert_eq!(row("first")[6], "-", "{out}");
        assert_eq!(row("second")[1], "Queued", "{out}");
        assert_eq!(row("second")[6], "#1", "{out}");
        assert_eq!(row("third")[6], "#2", "{out}");
        assert_eq!(row("third")[8], "Builtin", "{out}");

        let wide = ok(&ns, &["ls", "-o", "wide"]).await?;
        assert!(wide.lines().next().unwrap().contains("ADMISSION"), "{wide}");
        let json: serde_json::Value = serde_json::from_str(&ok(&ns, &["ls", "-o", "json"]).await?)?;
        assert_eq!(json["kind"], "List");
        assert_eq!(json["items"].as_array().map(Vec::len), Some(3));
        let yaml = ok(&ns, &["ls", "-o", "yaml"]).await?;
        assert!(
            yaml.contains("kind: List") && yaml.contains("name: third"),
            "{yaml}"
        );

        // Why the third waits: its condition, its place and the job ahead of it.
        let why = ok(&ns, &["why", "third"]).await?;
        for want in [
            "third: Queued",
            "Admitted=False (InsufficientCapacity)",
            "Queue: position 2",
            &format!("ahead of it: {}/second (2 ranks", ns.name),
        ] {
            assert!(why.contains(want), "no `{want}` in:\n{why}");
        }

        // Why `first` failed: rank 1 exits 8 (the data cannot be read; restarting cannot help).
        let pods = ns.api::<Pod>();
        terminate_worker(&pods, "first-1", 8).await?;
        wait_phase(&ns, "first", Phase::Failed).await?;
        let why = ok(&ns, &["why", "first"]).await?;
        for want in [
            "first: Failed",
            "First failure of this attempt: rank 1 (pod first-1 on node",
            "exit code 8 (DataUnreadable: the data set could not be read; restarting cannot help)",
        ] {
            assert!(why.contains(want), "no `{want}` in:\n{why}");
        }
        let (code, _) = plugin(&ns, &["why", "nope"]).await;
        let e = format!("{:#}", code.expect_err("no such job"));
        assert!(
            e.contains(&format!(
                "paralleljob nope not found in namespace {}",
                ns.name
            )),
            "{e}"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn suspend_resume_restart_and_delete_steer_a_job() -> anyhow::Result<()> {
    with_namespace("plugin-steer", |ns| async move {
        ns.create_node_pool(1, 8).await?;
        create(&ns, job(&ns, "steered", 1, serde_json::json!({}))).await?;
        wait_phase(&ns, "steered", Phase::Running).await?;

        let out = ok(&ns, &["suspend", "steered"]).await?;
        assert_eq!(out.trim(), "paralleljob.lockstep.dev/steered suspended");
        wait_phase(&ns, "steered", Phase::Suspended).await?;
        wait_until(TIMEOUT, "no pods while suspended", || async {
            Ok(ns.gang("steered").await?.is_empty())
        })
        .await?;
        let why = ok(&ns, &["why", "steered"]).await?;
        assert!(why.contains("kubectl lockstep resume steered"), "{why}");
        let (code, _) = plugin(&ns, &["restart", "steered"]).await;
        assert!(code.is_err(), "a suspended job has no gang to restart");

        ok(&ns, &["resume", "steered"]).await?;
        wait_phase(&ns, "steered", Phase::Running).await?;
        let before = ns
            .api::<ParallelJob>()
            .get("steered")
            .await?
            .status
            .unwrap_or_default()
            .attempt;

        let out = ok(&ns, &["restart", "steered"]).await?;
        assert!(out.contains("restarting"), "{out}");
        wait_until(TIMEOUT, "a new attempt runs", || async {
            let s = ns
                .api::<ParallelJob>()
                .get("steered")
                .await?
                .status
                .unwrap_or_default();
            Ok(s.attempt == before + 1 && s.phase == Some(Phase::Running))
        })
        .await?;
        let s = ns
            .api::<ParallelJob>()
            .get("steered")
            .await?
            .status
            .unwrap_or_default();
        assert!(
            s.last_failure.is_none(),
            "a requested restart is not a failure: {s:?}"
        );
        assert!(
            s.restarted_at.is_some(),
            "status.restartedAt records the request"
        );

        let out = ok(&ns, &["delete", "steered", "--wait"]).await?;
        assert_eq!(out.trim(), "paralleljob.lockstep.dev/steered deleted");
        assert!(ns.api::<ParallelJob>().get_opt("steered").await?.is_none());

        let script = ok(&ns, &["completion", "bash"]).await?;
        assert!(
            script.contains("kubectl-lockstep") && script.contains("submit"),
            "{script}"
        );
        Ok(())
    })
    .await
}
