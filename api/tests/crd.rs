//! The committed CRD is exactly what the types generate, and it has what `kubectl` users rely
//! on: names, printer columns, the status subresource, defaults, descriptions and CEL rules that
//! compile.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use lockstep_api::crd::{CHART_CRD_PATH, CRD_PATH, crd, crd_yaml};
use serde_json::Value;

#[test]
fn committed_crd_is_current() {
    let committed = std::fs::read_to_string(common::repo_root().join(CRD_PATH))
        .unwrap_or_else(|e| panic!("{CRD_PATH}: {e}; run `make crds`"));
    assert!(
        committed == crd_yaml(),
        "{CRD_PATH} is stale: run `make crds` and commit the result"
    );
}

#[test]
fn the_chart_installs_the_same_crd() {
    let chart = std::fs::read_to_string(common::repo_root().join(CHART_CRD_PATH))
        .unwrap_or_else(|e| panic!("{CHART_CRD_PATH}: {e}; run `make crds`"));
    assert!(
        chart == crd_yaml(),
        "{CHART_CRD_PATH} differs from the types: run `make crds` and commit the result"
    );
}

#[test]
fn names_scope_and_subresources() {
    let c = crd();
    assert_eq!(c.spec.group, "lockstep.dev");
    assert_eq!(c.spec.scope, "Namespaced");
    assert_eq!(c.spec.names.kind, "ParallelJob");
    assert_eq!(c.spec.names.plural, "paralleljobs");
    assert_eq!(
        c.spec.names.short_names.as_deref(),
        Some(&["pj".to_string(), "pjob".to_string()][..])
    );
    let v = &c.spec.versions[0];
    assert_eq!(
        (v.name.as_str(), v.served, v.storage),
        ("v1alpha1", true, true)
    );
    assert!(
        v.subresources
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .is_some(),
        "no status subresource"
    );
    let columns: Vec<&str> = v
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        columns,
        [
            "Phase",
            "Ready",
            "Step",
            "Loss",
            "Restarts",
            "Admission",
            "Position",
            "Age"
        ]
    );
    // The admission columns show with `-o wide` only.
    let wide: Vec<&str> = v
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .filter(|c| c.priority == Some(1))
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(wide, ["Admission", "Position"]);
}

fn schema() -> Value {
    let c = crd();
    serde_json::to_value(
        c.spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap()
}

/// Every property of ours has a description (`kubectl explain` reads them). The embedded pod
/// template is upstream's schema and is not ours to describe below its top.
fn undescribed(s: &Value, path: &str, out: &mut Vec<String>) {
    let Some(props) = s.get("properties").and_then(Value::as_object) else {
        if let Some(items) = s.get("items") {
            undescribed(items, &format!("{path}[]"), out);
        }
        return;
    };
    for (k, v) in props {
        let p = format!("{path}.{k}");
        if v.get("description")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            out.push(p.clone());
        }
        if p == ".spec.template"
            || p == ".metadata"
            || p.ends_with(".conditions")
            || p.ends_with("Time")
            || p.ends_with("At")
        {
            continue;
        }
        undescribed(v, &p, out);
    }
}

#[test]
fn every_field_is_described() {
    let s = schema();
    let mut missing = Vec::new();
    for top in ["spec", "status"] {
        undescribed(&s["properties"][top], &format!(".{top}"), &mut missing);
    }
    assert!(
        missing.is_empty(),
        "fields without a description: {missing:?}"
    );
}

#[test]
fn defaults_are_in_the_schema() {
    let s = schema();
    let spec = &s["properties"]["spec"]["properties"];
    assert_eq!(
        spec["parallelism"]["properties"]["pipelineStages"]["default"],
        1
    );
    assert_eq!(
        spec["training"]["properties"]["ddp"]["properties"]["bucketCapMB"]["default"],
        25.0
    );
    assert_eq!(
        spec["training"]["properties"]["pres"]["properties"]["gamma"]["default"],
        0.9
    );
    assert_eq!(
        spec["training"]["properties"]["pres"]["properties"]["coherenceWeight"]["default"],
        0.1
    );
    assert_eq!(spec["scheduling"]["default"]["gangPolicy"], "Builtin");
    assert_eq!(spec["failurePolicy"]["default"]["maxRestarts"], 3);
}

fn rules(s: &Value, out: &mut Vec<String>) {
    match s {
        Value::Object(o) => {
            if let Some(Value::Array(rs)) = o.get("x-kubernetes-validations") {
                out.extend(rs.iter().map(|r| r["rule"].as_str().unwrap().to_string()));
            }
            o.values().for_each(|v| rules(v, out));
        }
        Value::Array(a) => a.iter().for_each(|v| rules(v, out)),
        _ => {}
    }
}

#[test]
fn cel_rules_are_present_and_compile() {
    let s = schema();
    let mut all = Vec::new();
    rules(&s, &mut all);
    for needle in [
        "self == oldSelf",
        "startsWith('LOCKSTEP_')",
        "c.name == 'worker'",
        "has(self.model.tgn)",
        "pipelineStages == 1",
    ] {
        assert!(
            all.iter().any(|r| r.contains(needle)),
            "no rule contains {needle:?}"
        );
    }
    let compiled = kube::core::cel::compile_schema(&s);
    fn errors(c: &kube::core::cel::CompiledSchema, out: &mut Vec<String>) {
        out.extend(c.compilation_errors().iter().map(|e| e.to_string()));
        c.properties.values().for_each(|p| errors(p, out));
    }
    let mut errs = Vec::new();
    errors(&compiled, &mut errs);
    assert!(errs.is_empty(), "CEL rules that do not compile: {errs:?}");
}
