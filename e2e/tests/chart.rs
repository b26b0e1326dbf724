//! The Helm chart's files, checked without a cluster: the Grafana dashboard and the alert rules
//! parse as PromQL and use only metrics the code exports; every value is documented and known to
//! `values.schema.json`; the chart's version follows the workspace's. (Installing the chart into
//! the real control plane is in the e2e suite, `tests/e2e/chart.rs`.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;

use promql_parser::parser::Expr;
use promql_parser::util::{ExprVisitor, walk_expr};
use serde_json::Value;

fn chart() -> PathBuf {
    lockstep_e2e::repo_root().join("charts/lockstep")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(chart().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every metric name the operator and the worker register.
fn exported() -> BTreeSet<String> {
    let operator = lockstep_operator::metrics::Metrics::new();
    let worker = lockstep_worker::metrics::Metrics::new("job", 0);
    operator
        .names()
        .iter()
        .chain(worker.names())
        .cloned()
        .collect()
}

/// The metric names a PromQL expression selects.
fn selected(expr: &str) -> Result<BTreeSet<String>, String> {
    struct Names(BTreeSet<String>);
    impl ExprVisitor for Names {
        type Error = String;
        fn pre_visit(&mut self, e: &Expr) -> Result<bool, String> {
            let selector = match e {
                Expr::VectorSelector(v) => Some(v),
                Expr::MatrixSelector(m) => Some(&m.vs),
                _ => None,
            };
            if let Some(v) = selector {
                let name = v.name.clone().or_else(|| {
                    v.matchers
                        .matchers
                        .iter()
                        .find(|m| m.name == "__name__")
                        .map(|m| m.value.clone())
                });
                self.0
                    .insert(name.ok_or("a selector without a metric name")?);
            }
            Ok(true)
        }
    }
    let parsed = promql_parser::parser::parse(expr)?;
    let mut names = Names(BTreeSet::new());
    walk_expr(&mut names, &parsed)?;
    Ok(names.0)
}

/// Whether `name` is an exported metric, or a series Prometheus makes of one (a histogram's
/// `_bucket`, `_sum` and `_count`).
fn is_exported(name: &str, exported: &BTreeSet<String>) -> bool {
    exported.contains(name)
        || ["_bucket", "_sum", "_count"].iter().any(|s| {
            name.strip_suffix(s)
                .is_some_and(|base| exported.contains(base))
        })
}

/// Grafana's variables replaced by what they stand for, so the query parses as PromQL.
fn without_variables(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$namespace", ".*")
        .replace("$job", ".*")
}

fn all_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    _ => all_exprs(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| all_exprs(x, out)),
        _ => {}
    }
}

#[test]
fn the_dashboard_queries_only_metrics_the_code_exports() {
    let dashboard: Value =
        serde_json::from_str(&read("dashboards/lockstep.json")).expect("the dashboard is JSON");
    assert_eq!(dashboard["uid"], "lockstep");
    let exported = exported();
    let mut exprs = Vec::new();
    all_exprs(&dashboard["panels"], &mut exprs);
    assert!(exprs.len() >= 20, "only {} queries", exprs.len());
    let mut used = BTreeSet::new();
    for e in &exprs {
        let names = selected(&without_variables(e)).unwrap_or_else(|err| panic!("{e}: {err}"));
        for n in names {
            assert!(
                is_exported(&n, &exported),
                "the dashboard queries {n}, which no code exports ({e})"
            );
            used.insert(n);
        }
    }
    // The variables' queries name metrics too: label_values(<selector>, <label>).
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = var["query"]["query"].as_str() {
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.rsplit_once(','))
                .map(|(sel, _)| sel)
                .unwrap_or_else(|| panic!("variable query {q} is not label_values(...)"));
            for n in selected(&without_variables(inner)).unwrap() {
                assert!(is_exported(&n, &exported), "variable {q} uses {n}");
            }
        }
    }
    // What the issue asks the dashboard to show, each by the metric that carries it.
    for needed in [
        "lockstep_jobs",
        "lockstep_gang_queue_length",
        "lockstep_gang_admission_wait_seconds_bucket",
        "lockstep_job_time_to_all_running_seconds_bucket",
        "lockstep_job_restarts_total",
        "lockstep_worker_step_seconds_count",
        "lockstep_worker_loss",
        "lockstep_worker_samples_per_second",
        "lockstep_worker_gpu_utilization_ratio",
        "lockstep_worker_gpu_memory_used_bytes",
        "lockstep_worker_allreduce_busbw_bytes_per_second",
        "lockstep_worker_comm_hidden_ratio",
        "lockstep_worker_pipeline_bubble_ratio",
        "lockstep_worker_pipeline_busy_seconds_total",
        "lockstep_worker_pipeline_idle_seconds_total",
        "lockstep_worker_pipeline_activation_peak_bytes",
        "lockstep_worker_pipeline_stage",
    ] {
        assert!(used.contains(needed), "no panel shows {needed}");
    }
    // The pipeline's bubble, by rank and stage (the stage gauge's value made a label).
    let bubble = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["title"] == "Pipeline bubble")
        .expect("a Pipeline bubble panel");
    let target = &bubble["targets"][0];
    let expr = target["expr"].as_str().unwrap();
    assert!(
        selected(&without_variables(expr))
            .unwrap()
            .contains("lockstep_worker_pipeline_bubble_ratio"),
        "{expr}"
    );
    let legend = target["legendFormat"].as_str().unwrap();
    assert!(
        legend.contains("{{rank}}") && legend.contains("{{stage}}") && expr.contains("\"stage\""),
        "{legend} {expr}"
    );
    let mut ids = BTreeSet::new();
    for p in dashboard["panels"].as_array().unwrap() {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "panel id repeated");
        if p["type"] != "row" {
            assert!(!p["targets"].as_array().unwrap().is_empty(), "{p}");
        }
    }
}

#[test]
fn a_name_the_code_does_not_export_is_caught() {
    let exported = exported();
    let names = selected("sum(rate(lockstep_worker_stepz_total[5m]))").unwrap();
    assert!(!names.iter().all(|n| is_exported(n, &exported)));
    assert!(
        selected("sum(rate(lockstep_jobs[5m])").is_err(),
        "bad PromQL parses"
    );
    assert!(is_exported(
        "lockstep_gang_admission_wait_seconds_bucket",
        &exported
    ));
}

#[test]
fn the_alert_rules_query_only_metrics_the_code_exports() {
    let helm = lockstep_e2e::helm().expect("helm builds");
    let out = std::process::Command::new(helm)
        .args(["template", "t"])
        .arg(chart())
        .args([
            "--set",
            "prometheusRule.enabled=true",
            "--show-only",
            "templates/prometheusrule.yaml",
        ])
        .output()
        .expect("helm runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rule = lockstep_api::manifest::yaml_to_value(&String::from_utf8(out.stdout).unwrap())
        .expect("the rendered rule is YAML");
    let exported = exported();
    let rules = rule["spec"]["groups"][0]["rules"].as_array().unwrap();
    let alerts: BTreeSet<&str> = rules.iter().filter_map(|r| r["alert"].as_str()).collect();
    for a in [
        "LockstepJobFailed",
        "LockstepGangWaitingTooLong",
        "LockstepGpuUtilizationLow",
        "LockstepOperatorDown",
        "LockstepRestartStorm",
    ] {
        assert!(alerts.contains(a), "alert {a} missing");
    }
    for r in rules {
        let expr = r["expr"].as_str().unwrap();
        let names = selected(expr).unwrap_or_else(|e| panic!("{expr}: {e}"));
        assert!(!names.is_empty(), "{expr}");
        for n in names {
            // `up` is Prometheus's own series of each scrape target.
            assert!(
                n == "up" || is_exported(&n, &exported),
                "alert {} uses {n}, which no code exports",
                r["alert"]
            );
        }
    }
}

/// Leaf paths of `values`, following the schema: a value whose schema lists no properties
/// (a free-form map such as `resources`) is one leaf.
fn leaves(values: &Value, schema: &Value, path: &str, out: &mut Vec<String>) {
    let Value::Object(map) = values else { return };
    for (k, v) in map {
        let p = if path.is_empty() {
            k.clone()
        } else {
            format!("{path}.{k}")
        };
        let s = &schema["properties"][k];
        assert!(!s.is_null(), "values.schema.json does not know `{p}`");
        assert!(
            s["description"].is_string() || s["properties"].is_object(),
            "`{p}` has no description in values.schema.json"
        );
        if s["properties"].is_object() {
            leaves(v, s, &p, out);
        } else {
            out.push(p);
        }
    }
}

#[test]
fn every_value_is_in_the_schema_and_documented() {
    let values = lockstep_api::manifest::yaml_to_value(&read("values.yaml")).unwrap();
    let schema: Value = serde_json::from_str(&read("values.schema.json")).unwrap();
    assert_eq!(schema["additionalProperties"], false, "typos must fail");
    let mut paths = Vec::new();
    leaves(&values, &schema, "", &mut paths);
    assert!(paths.len() > 40, "{paths:?}");
    let readme = read("README.md");
    let table = readme
        .split_once("\n## Values")
        .map(|(_, rest)| rest.split("\n## ").next().unwrap_or(rest))
        .expect("README.md has a `## Values` section");
    let documented: BTreeSet<&str> = table
        .lines()
        .filter_map(|l| l.strip_prefix("| `")?.split_once('`').map(|(k, _)| k))
        .collect();
    for p in &paths {
        assert!(
            documented.contains(p.as_str()),
            "`{p}` is not in the values table of charts/lockstep/README.md"
        );
    }
    for d in &documented {
        assert!(
            paths.iter().any(|p| p == d),
            "README.md documents `{d}`, which values.yaml does not have"
        );
    }
}

#[test]
fn the_chart_version_follows_the_workspace() {
    let chart = lockstep_api::manifest::yaml_to_value(&read("Chart.yaml")).unwrap();
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(chart["version"], version, "Chart.yaml version");
    assert_eq!(chart["appVersion"], version, "Chart.yaml appVersion");
}

/// The objects `helm template` renders with `args` (release `t`, namespace `ops`).
fn render(args: &[&str]) -> Vec<Value> {
    let helm = lockstep_e2e::helm().expect("helm builds");
    let out = std::process::Command::new(helm)
        .args(["template", "t"])
        .arg(chart())
        .args(["-n", "ops"])
        .args(args)
        .output()
        .expect("helm runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .split("\n---")
        .map(|doc| lockstep_api::manifest::yaml_to_value(doc).expect("a rendered object is YAML"))
        .filter(|v| v.is_object())
        .collect()
}

/// The verbs `rules` grant on `resource` of the API group `group`.
fn verbs(rules: &Value, group: &str, resource: &str) -> BTreeSet<String> {
    let has = |v: &Value, s: &str| v.as_array().is_some_and(|a| a.iter().any(|x| x == s));
    rules
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| has(&r["apiGroups"], group) && has(&r["resources"], resource))
        .flat_map(|r| r["verbs"].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v.as_str().map(String::from))
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
}

const READ: [&str; 3] = ["get", "list", "watch"];

#[test]
fn the_operator_holds_on_configmaps_only_the_verbs_its_code_uses() {
    let objects = render(&[]);
    let role = find(&objects, "ClusterRole", "t-lockstep-operator").expect("the ClusterRole");
    // Server-side apply of the worker config (patch; create when new), the progress ConfigMap
    // created once, its watch (list, watch); `patch` is also all the workers' Role grants; `get`
    // reads whose a ConfigMap with a name the job needs is before it is written.
    assert_eq!(
        verbs(&role["rules"], "", "configmaps"),
        ["create", "get", "list", "patch", "watch"]
            .map(String::from)
            .into(),
        "the operator's verbs on configmaps"
    );
    // A failed rank's log tail: read, nothing more.
    assert_eq!(
        verbs(&role["rules"], "", "pods/log"),
        ["get"].map(String::from).into(),
        "the operator's verbs on pods/log"
    );
}

#[test]
fn a_namespace_scoped_install_lets_the_operator_write_in_its_namespace_only() {
    for (args, watched) in [
        (&["--set", "rbac.scope=namespace"][..], "ops"),
        (
            &[
                "--set",
                "rbac.scope=namespace,operator.watchNamespace=team-a",
            ][..],
            "team-a",
        ),
    ] {
        let objects = render(args);
        // Cluster-wide, only reads: the nodes and PriorityClasses admission needs, and every
        // pod's requests (what each node has taken). The user-facing aggregated roles aside.
        let cluster_roles: Vec<&Value> = objects
            .iter()
            .filter(|o| o["kind"] == "ClusterRole")
            .filter(|o| {
                o["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"].is_null()
                    && o["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"]
                        .is_null()
            })
            .collect();
        assert_eq!(cluster_roles.len(), 1, "{args:?}: {cluster_roles:?}");
        let reads = cluster_roles[0];
        assert_eq!(
            reads["metadata"]["name"],
            "t-lockstep-operator-cluster-reads"
        );
        for rule in reads["rules"].as_array().unwrap() {
            for v in rule["verbs"].as_array().unwrap() {
                assert!(READ.contains(&v.as_str().unwrap()), "{args:?}: {rule}");
            }
            for r in rule["resources"].as_array().unwrap() {
                assert!(
                    ["nodes", "priorityclasses", "pods"].contains(&r.as_str().unwrap()),
                    "{args:?}: the cluster-wide role names {r}"
                );
            }
        }
        assert!(
            verbs(&reads["rules"], "", "pods")
                .iter()
                .all(|v| v != "get"),
            "pods are listed and watched for capacity, not read one by one"
        );
        let binding = find(
            &objects,
            "ClusterRoleBinding",
            "t-lockstep-operator-cluster-reads",
        )
        .expect("its binding");
        assert_eq!(
            binding["roleRef"]["name"],
            "t-lockstep-operator-cluster-reads"
        );

        // Everything else in a Role of the watched namespace, bound to the operator's account.
        let role = find(&objects, "Role", "t-lockstep-operator").expect("the operator's Role");
        assert_eq!(role["metadata"]["namespace"], watched, "{args:?}");
        let rules = &role["rules"];
        assert!(verbs(rules, "lockstep.dev", "paralleljobs").contains("watch"));
        assert!(verbs(rules, "lockstep.dev", "paralleljobs/status").contains("patch"));
        assert!(verbs(rules, "", "pods").contains("create"));
        assert_eq!(
            verbs(rules, "", "configmaps"),
            ["create", "get", "list", "patch", "watch"]
                .map(String::from)
                .into()
        );
        assert_eq!(
            verbs(rules, "", "pods/log"),
            ["get"].map(String::from).into()
        );
        assert!(verbs(rules, "rbac.authorization.k8s.io", "roles").contains("create"));
        let rb = find(&objects, "RoleBinding", "t-lockstep-operator").expect("its RoleBinding");
        assert_eq!(rb["metadata"]["namespace"], watched);
        assert_eq!(rb["roleRef"]["kind"], "Role");
        assert_eq!(rb["subjects"][0]["name"], "t-lockstep");
        assert_eq!(rb["subjects"][0]["namespace"], "ops");
        assert!(
            find(&objects, "ClusterRoleBinding", "t-lockstep-operator").is_none(),
            "{args:?}: a cluster-wide binding of the operator's writes"
        );

        // The operator watches that namespace alone.
        let deployment =
            find(&objects, "Deployment", "t-lockstep-operator").expect("the Deployment");
        let args_of: Vec<&str> = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            args_of.windows(2).any(|w| w == ["--namespace", watched]),
            "{args_of:?}"
        );
    }
    // The default stays cluster-wide: no Role of the operator's own, no --namespace.
    let objects = render(&[]);
    assert!(find(&objects, "Role", "t-lockstep-operator").is_none());
    let deployment = find(&objects, "Deployment", "t-lockstep-operator").unwrap();
    assert!(
        !deployment.to_string().contains("\"--namespace\""),
        "the default install watches every namespace"
    );
}

/// The operator's arguments in the Deployment of `objects`.
fn operator_args(objects: &[Value]) -> Vec<String> {
    let deployment = find(objects, "Deployment", "t-lockstep-operator").expect("the Deployment");
    deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str().map(String::from))
        .collect()
}

#[test]
fn the_operator_writes_worker_network_policies_admitting_the_scrapers_of_the_values() {
    // Both scopes grant the server-side apply of each job's NetworkPolicy (create when new,
    // patch), and the read by name of the job's EndpointSlice after a start.
    for (args, kind) in [
        (&[][..], "ClusterRole"),
        (&["--set", "rbac.scope=namespace"][..], "Role"),
    ] {
        let objects = render(args);
        let role = find(&objects, kind, "t-lockstep-operator").expect("the operator's role");
        assert_eq!(
            verbs(&role["rules"], "networking.k8s.io", "networkpolicies"),
            ["create", "get", "patch"].map(String::from).into(),
            "{kind}"
        );
        assert_eq!(
            verbs(&role["rules"], "discovery.k8s.io", "endpointslices"),
            ["create", "get", "patch"].map(String::from).into(),
            "{kind}"
        );
    }
    // On by default, admitting no scraper; the chart's own (operator) NetworkPolicy stays off.
    let objects = render(&[]);
    let args = operator_args(&objects);
    assert!(
        args.windows(2)
            .any(|w| w == ["--worker-metrics-from", "[]"]),
        "{args:?}"
    );
    assert!(!args.iter().any(|a| a == "--no-worker-network-policy"));
    assert!(objects.iter().all(|o| o["kind"] != "NetworkPolicy"));
    // The value reaches the operator as a JSON list of NetworkPolicyPeer.
    let peers = serde_json::json!([
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
         "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
    ]);
    let set = format!("networkPolicy.workers.metricsFrom={peers}");
    let args = operator_args(&render(&["--set-json", &set]));
    let at = args
        .iter()
        .position(|a| a == "--worker-metrics-from")
        .expect("--worker-metrics-from");
    let passed: Value = serde_json::from_str(&args[at + 1]).unwrap();
    assert_eq!(passed, peers);
    let _: Vec<k8s_openapi::api::networking::v1::NetworkPolicyPeer> =
        serde_json::from_value(passed).expect("NetworkPolicyPeers");
    // Off: the operator is told so.
    let args = operator_args(&render(&["--set", "networkPolicy.workers.enabled=false"]));
    assert!(
        args.iter().any(|a| a == "--no-worker-network-policy"),
        "{args:?}"
    );
    assert!(
        !args.iter().any(|a| a == "--worker-metrics-from"),
        "{args:?}"
    );
}

#[test]
fn kueue_enabled_grants_the_workload_rights_the_kueue_integration_uses_and_only_then() {
    let role = |args: &[&str]| {
        let objects = render(args);
        find(&objects, "ClusterRole", "t-lockstep-operator")
            .expect("the ClusterRole")
            .clone()
    };
    let off = role(&[]);
    assert!(verbs(&off["rules"], "kueue.x-k8s.io", "workloads").is_empty());
    let on = role(&["--set", "kueue.enabled=true"]);
    // Written by server-side apply (get first, create when new), watched for Kueue's decisions,
    // deleted when written for an older spec; its status patched.
    assert_eq!(
        verbs(&on["rules"], "kueue.x-k8s.io", "workloads"),
        ["create", "delete", "get", "list", "patch", "watch"]
            .map(String::from)
            .into()
    );
    assert_eq!(
        verbs(&on["rules"], "kueue.x-k8s.io", "workloads/status"),
        ["get", "patch"].map(String::from).into()
    );
    assert_eq!(
        verbs(&on["rules"], "kueue.x-k8s.io", "resourceflavors"),
        ["get"].map(String::from).into()
    );
}
