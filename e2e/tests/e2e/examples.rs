//! Every file in `examples/` is accepted by the real API server, which applies the same defaults
//! as the client-side validation (both come from the generated CRD).

use kube::api::{Api, DynamicObject, PostParams};
use kube::discovery::ApiResource;
use lockstep_api::ParallelJob;
use lockstep_e2e::{repo_root, with_namespace};

#[tokio::test]
async fn every_example_is_accepted_with_the_same_defaults() -> anyhow::Result<()> {
    with_namespace("examples", |ns| async move {
        let ar = ApiResource::erase::<ParallelJob>(&());
        let api: Api<DynamicObject> =
            Api::namespaced_with(ns.cluster.client.clone(), &ns.name, &ar);
        let mut count = 0;
        for entry in std::fs::read_dir(repo_root().join("examples"))? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "yaml") {
                continue;
            }
            let text = std::fs::read_to_string(&path)?;
            let raw = lockstep_api::manifest::yaml_to_value(&text)?;
            let obj: DynamicObject = serde_json::from_value(raw.clone())?;
            let created = api
                .create(&PostParams::default(), &obj)
                .await
                .map_err(|e| anyhow::anyhow!("{}: refused: {e}", path.display()))?;
            // The server's defaulting equals ours.
            let server_spec = &created.data["spec"];
            let client_spec = &lockstep_api::validation::apply_defaults(&raw)["spec"];
            let diff = differences(server_spec, client_spec, "spec");
            assert!(
                diff.is_empty(),
                "{}: server and client defaults differ at {diff:?}",
                path.display()
            );
            // And the stored object reads back into the typed ParallelJob.
            let typed: ParallelJob = serde_json::from_value(serde_json::to_value(&created)?)?;
            assert_eq!(typed.spec, lockstep_api::manifest::parse_job(&text)?.spec);
            count += 1;
        }
        assert!(count >= 5, "only {count} examples");
        Ok(())
    })
    .await
}

/// Paths where two JSON values differ, with both sides.
fn differences(a: &serde_json::Value, b: &serde_json::Value, path: &str) -> Vec<String> {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter()
                .flat_map(|k| {
                    let null = Value::Null;
                    differences(
                        x.get(k).unwrap_or(&null),
                        y.get(k).unwrap_or(&null),
                        &format!("{path}.{k}"),
                    )
                })
                .collect()
        }
        (x, y) if x == y => vec![],
        // 25 and 25.0 are the same number to the API server.
        (Value::Number(x), Value::Number(y)) if x.as_f64() == y.as_f64() => vec![],
        (x, y) => vec![format!("{path}: server {x} vs client {y}")],
    }
}
