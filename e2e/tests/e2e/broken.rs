//! Broken manifests are rejected by the real API server with a message that names the offending
//! field: the corpus `api/tests/broken/` (shared with the client-side tests), and an update that
//! changes an immutable field.

use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::discovery::ApiResource;
use lockstep_api::ParallelJob;
use lockstep_e2e::{repo_root, with_namespace};

#[tokio::test]
async fn broken_manifests_are_rejected_naming_the_field() -> anyhow::Result<()> {
    with_namespace("broken", |ns| async move {
        let dir = repo_root().join("api/tests/broken");
        let mut files: Vec<_> = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        files.sort();
        let mut checked = 0;
        let mut failures = Vec::new();
        for path in files {
            let text = std::fs::read_to_string(&path)?;
            if text.lines().any(|l| l.trim() == "# client-only") {
                continue;
            }
            let want = text
                .lines()
                .find_map(|l| l.strip_prefix("# expect: "))
                .ok_or_else(|| anyhow::anyhow!("{} has no # expect: line", path.display()))?
                .trim()
                .to_string();
            // kubectl create with the server's strict field validation, as a user would.
            let (ok, out) = ns
                .cluster
                .kubectl_stdin(&["create", "-n", &ns.name, "-f", "-"], &text)
                .await?;
            checked += 1;
            if ok {
                failures.push(format!("{}: accepted", path.display()));
            } else if !out.contains(&want) {
                failures.push(format!(
                    "{}: message does not name {want}: {out}",
                    path.display()
                ));
            }
        }
        assert!(checked >= 12, "only {checked} broken manifests checked");
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        Ok(())
    })
    .await
}

#[tokio::test]
async fn parallelism_cannot_change_after_creation() -> anyhow::Result<()> {
    with_namespace("immutable", |ns| async move {
        let ar = ApiResource::erase::<ParallelJob>(&());
        let api: Api<DynamicObject> =
            Api::namespaced_with(ns.cluster.client.clone(), &ns.name, &ar);
        let obj: DynamicObject =
            serde_json::from_value(lockstep_e2e::example_manifest("ddp-digits.yaml")?)?;
        api.create(&PostParams::default(), &obj).await?;

        let grow = serde_json::json!({"spec": {"parallelism": {"dataParallel": 8}}});
        let err = api
            .patch("ddp-digits", &PatchParams::default(), &Patch::Merge(&grow))
            .await
            .expect_err("changing the world size must be refused");
        let msg = err.to_string();
        assert!(
            msg.contains("spec.parallelism") && msg.contains("immutable"),
            "{msg}"
        );

        // A mutable field still changes.
        let suspend = serde_json::json!({"spec": {"runPolicy": {"suspend": true}}});
        let patched = api
            .patch(
                "ddp-digits",
                &PatchParams::default(),
                &Patch::Merge(&suspend),
            )
            .await?;
        assert_eq!(patched.data["spec"]["runPolicy"]["suspend"], true);
        Ok(())
    })
    .await
}
