//! Broken manifests are refused with an error that names the offending field. The corpus in
//! `tests/broken/` is shared with the e2e suite, which sends the same files to the real API
//! server: each file says in an `# expect:` line which field its error must name, and
//! `# client-only` marks the ones the server cannot see (a wrong apiVersion never reaches the CRD).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use lockstep_api::Error;
use lockstep_api::manifest::yaml_to_value;
use lockstep_api::validation::{validate, validate_yaml};

fn expected_field(text: &str) -> &str {
    text.lines()
        .find_map(|l| l.strip_prefix("# expect: "))
        .expect("every broken manifest has an `# expect:` line")
        .trim()
}

#[test]
fn there_are_at_least_twenty_broken_manifests() {
    assert!(common::yaml_files("api/tests/broken").len() >= 20);
}

#[test]
fn every_broken_manifest_is_refused_naming_its_field() {
    let mut failures = Vec::new();
    for (path, text) in common::yaml_files("api/tests/broken") {
        let want = expected_field(&text);
        match validate_yaml(&text) {
            Ok(_) => failures.push(format!("{}: accepted", path.display())),
            Err(e) => {
                let shown = e.to_string();
                if !shown.contains(want) {
                    failures.push(format!(
                        "{}: error does not name {want}: {shown}",
                        path.display()
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn type_errors_name_the_path_before_any_rule_runs() {
    let text =
        std::fs::read_to_string(common::repo_root().join("api/tests/broken/01-wrong-type.yaml"))
            .unwrap();
    match validate_yaml(&text) {
        Err(Error::Field { path, message }) => {
            assert_eq!(path, "spec.parallelism.dataParallel");
            assert!(message.contains("invalid type"), "{message}");
        }
        other => panic!("expected a field error, got {other:?}"),
    }
}

#[test]
fn invalid_yaml_is_a_yaml_error() {
    assert!(matches!(
        validate_yaml("spec: [unclosed"),
        Err(Error::Yaml(_))
    ));
}

fn example(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(common::repo_root().join("examples").join(name)).unwrap();
    yaml_to_value(&text).unwrap()
}

#[test]
fn parallelism_and_training_are_immutable() {
    let old = example("ddp-digits.yaml");
    // An unchanged update and a change elsewhere are fine.
    assert!(validate(&old, Some(&old)).is_ok());
    let mut suspended = old.clone();
    suspended["spec"]["runPolicy"] = serde_json::json!({"suspend": true});
    assert!(validate(&suspended, Some(&old)).is_ok());

    for (field, patch) in [
        ("spec.parallelism", serde_json::json!({"dataParallel": 4})),
        (
            "spec.training",
            serde_json::json!({"workload": "Ddp", "batchSize": 64}),
        ),
    ] {
        let mut new = old.clone();
        let key = field.trim_start_matches("spec.");
        let target = &mut new["spec"][key];
        for (k, v) in patch.as_object().unwrap() {
            target[k] = v.clone();
        }
        let errs = validate(&new, Some(&old)).expect_err(field);
        assert!(
            errs.iter()
                .any(|e| e.field == field && e.message.contains("immutable")),
            "{field}: {errs:?}"
        );
    }
}

#[test]
fn the_deprecated_run_policy_managed_by_still_names_the_controller() {
    let mut v = example("ddp-digits.yaml");
    v["spec"]["runPolicy"] = serde_json::json!({"managedBy": "kueue.x-k8s.io/multikueue"});
    let job: lockstep_api::ParallelJob = serde_json::from_value(v.clone()).unwrap();
    assert_eq!(job.spec.controller(), "kueue.x-k8s.io/multikueue");
    v["spec"]["managedBy"] = "example.com/other".into();
    let job: lockstep_api::ParallelJob = serde_json::from_value(v).unwrap();
    assert_eq!(
        job.spec.controller(),
        "example.com/other",
        "spec.managedBy wins"
    );
    let plain: lockstep_api::ParallelJob =
        serde_json::from_value(example("ddp-digits.yaml")).unwrap();
    assert_eq!(plain.spec.controller(), "lockstep.dev/operator");
}

#[test]
fn managed_by_is_immutable() {
    let old = example("ddp-digits.yaml");
    let mut new = old.clone();
    new["spec"]["managedBy"] = "kueue.x-k8s.io/multikueue".into();
    let errs = validate(&new, Some(&old)).expect_err("managedBy changed");
    assert!(errs.iter().any(|e| e.field == "spec.managedBy"), "{errs:?}");
}

#[test]
fn command_jobs_need_no_model_and_may_use_their_only_container() {
    let mut job = example("torch-command.yaml");
    job["spec"]["template"]["spec"]["containers"][0]["name"] = "pytorch".into();
    assert!(validate(&job, None).is_ok());
    // With two containers and none named worker, the operator could not tell which to fill in.
    let second = serde_json::json!({"name": "sidecar", "image": "busybox"});
    job["spec"]["template"]["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(second);
    let errs = validate(&job, None).expect_err("two containers, no worker");
    assert!(
        errs.iter()
            .any(|e| e.field == "spec.template.spec.containers"),
        "{errs:?}"
    );
}

#[test]
fn every_error_is_reported_not_just_the_first() {
    let mut job = example("ddp-digits.yaml");
    job["spec"]["parallelism"]["dataParallel"] = 0.into();
    job["spec"]["parallelism"]["gpusPerWorker"] = (-2).into();
    let errs = validate(&job, None).expect_err("two bound violations");
    let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
    assert!(
        fields.contains(&"spec.parallelism.dataParallel"),
        "{fields:?}"
    );
    assert!(
        fields.contains(&"spec.parallelism.gpusPerWorker"),
        "{fields:?}"
    );
}
