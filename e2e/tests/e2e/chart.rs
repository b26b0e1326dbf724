//! The Helm chart against the real control plane: it lints; its objects, by default and with
//! every optional part on, are accepted by the API server (server-side dry run, with the
//! Prometheus Operator's CRDs installed); installed with `helm install`, the operator running with
//! nothing but the chart's ServiceAccount token leads on the chart's Lease and runs a job end to
//! end, and what it must not do is denied; `helm upgrade` keeps the leader; `helm uninstall`
//! leaves nothing but the CRD.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, Role};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use lockstep_api::ParallelJob;
use lockstep_api::status::Phase;
use lockstep_e2e::{repo_root, terminate_worker, wait_until, with_namespace};
use lockstep_operator::controller::Settings;
use lockstep_operator::leader::{LeaderElector, Stopped, lead};
use lockstep_operator::metrics::Metrics;

pub(crate) fn chart_dir() -> String {
    repo_root().join("charts/lockstep").display().to_string()
}

/// Every optional part on, with the branches that take lists exercised too.
const ALL_ON: &[&str] = &[
    "--set",
    "serviceMonitor.enabled=true,podMonitor.enabled=true,prometheusRule.enabled=true",
    "--set",
    "networkPolicy.enabled=true,networkPolicy.apiServerCidrs={10.96.0.1/32}",
    "--set-json",
    r#"networkPolicy.metricsFrom=[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}}}]"#,
    "--set",
    "serviceMonitor.labels.release=prom,dashboard.annotations.grafana_folder=Lockstep",
    "--set",
    "kueue.enabled=true",
];

/// The namespace-scoped install: the operator's writes in its own namespace only.
const NAMESPACED: &[&str] = &["--set", "rbac.scope=namespace"];

/// Removes, when dropped, the release (unless the test uninstalled it) and the jobs'
/// namespace, with blocking commands: it runs while a failed test unwinds too.
pub(crate) struct Leftovers {
    pub(crate) cluster: lockstep_e2e::Cluster,
    pub(crate) release: String,
    pub(crate) namespace: String,
    pub(crate) jobs_namespace: String,
    pub(crate) uninstalled: std::cell::Cell<bool>,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        let run = |tool: &str, args: &[&str]| {
            let _ = std::process::Command::new(self.cluster.bin.join(tool))
                .args(args)
                .env("KUBECONFIG", &self.cluster.kubeconfig)
                .output();
        };
        if !self.uninstalled.get() {
            run("helm", &["uninstall", &self.release, "-n", &self.namespace]);
        }
        let ns = &self.jobs_namespace;
        run(
            "kubectl",
            &[
                "delete",
                "namespace",
                ns,
                "--wait=false",
                "--ignore-not-found",
            ],
        );
    }
}

/// The API status code of a request's error (0 when it succeeded or failed otherwise).
fn code<T>(r: Result<T, kube::Error>) -> u16 {
    match r {
        Err(kube::Error::Api(e)) => e.code,
        _ => 0,
    }
}

#[tokio::test]
async fn the_chart_lints_and_the_api_server_accepts_all_it_renders() -> anyhow::Result<()> {
    with_namespace("chart-render", |ns| async move {
        let c = &ns.cluster;
        let chart = chart_dir();
        let out = c.helm(&["lint", "--strict", &chart]).await?;
        assert!(out.contains("0 chart(s) failed"), "{out}");
        c.install_monitoring_crds().await?;
        for (what, extra, kinds) in [
            ("defaults", &[][..], 12),
            ("every optional part", ALL_ON, 16),
            // Role and RoleBinding of the operator besides its ClusterRole (of reads) and binding.
            ("a namespace scope", NAMESPACED, 14),
        ] {
            let mut args = vec!["template", "rel", &chart, "-n", &ns.name];
            args.extend_from_slice(extra);
            let rendered = c.helm(&args).await?;
            let (ok, out) = c
                .kubectl_stdin(
                    &["apply", "--dry-run=server", "-n", &ns.name, "-f", "-"],
                    &rendered,
                )
                .await?;
            assert!(ok, "the API server refused the chart with {what}:\n{out}");
            assert_eq!(
                out.lines().count(),
                kinds,
                "objects rendered with {what}:\n{out}"
            );
            for kind in [
                "deployment.apps",
                "lease.coordination.k8s.io",
                "clusterrole",
            ] {
                assert!(out.contains(kind), "no {kind} with {what}:\n{out}");
            }
            if extra == NAMESPACED {
                assert!(
                    out.contains("role.rbac.authorization.k8s.io/rel-lockstep-operator "),
                    "no Role of the operator with {what}:\n{out}"
                );
            }
            if extra == ALL_ON {
                for kind in [
                    "servicemonitor.monitoring.coreos.com",
                    "podmonitor.monitoring.coreos.com",
                    "prometheusrule.monitoring.coreos.com",
                    "networkpolicy.networking.k8s.io",
                ] {
                    assert!(out.contains(kind), "no {kind} with {what}:\n{out}");
                }
            }
        }
        // A misspelt value is refused by the schema, naming it.
        let bad = c
            .helm(&["template", "rel", &chart, "--set", "replicas=3"])
            .await
            .expect_err("an unknown value renders");
        assert!(
            format!("{bad:#}").contains("'replicas' not allowed"),
            "{bad:#}"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn installed_by_helm_the_operator_runs_a_job_with_the_charts_rights_alone()
-> anyhow::Result<()> {
    with_namespace("chart", |ns| async move {
        let c = ns.cluster.clone();
        c.install_monitoring_crds().await?;
        // The release is named after the namespace: its cluster-wide objects never collide with
        // another run's.
        let release = ns.name.clone();
        let full = format!("{release}-lockstep");
        let chart = chart_dir();
        let jobs_ns = format!("{}-jobs", ns.name);
        // The restricted Pod Security Standard, enforced by the API server's admission: a pod of
        // the chart that breaks it is never created, and `helm install --wait` times out.
        c.kubectl(&[
            "label",
            "namespace",
            &ns.name,
            "pod-security.kubernetes.io/enforce=restricted",
        ])
        .await?;
        // A failed run, by error or by panic, leaves no cluster-wide objects or extra
        // namespace behind.
        let leftovers = Leftovers {
            cluster: c.clone(),
            release: release.clone(),
            namespace: ns.name.clone(),
            jobs_namespace: jobs_ns.clone(),
            uninstalled: std::cell::Cell::new(false),
        };
        let outcome = async {
            let mut install = vec![
                "install",
                &release,
                &chart,
                "-n",
                &ns.name,
                "--wait",
                "--timeout",
                "120s",
            ];
            install.extend_from_slice(ALL_ON);
            c.helm(&install).await?;

            // The Deployment: two replicas under the restricted profile, electing on the Lease.
            let deployments: Api<Deployment> = ns.api();
            let d = deployments.get(&format!("{full}-operator")).await?;
            assert_eq!(
                d.status.as_ref().and_then(|s| s.ready_replicas),
                Some(2),
                "both replicas admitted under the restricted profile and ready"
            );
            let spec = d.spec.unwrap();
            assert_eq!(spec.replicas, Some(2));
            let pod = spec.template.spec.unwrap();
            let container = &pod.containers[0];
            let sc = container.security_context.clone().unwrap();
            assert_eq!(sc.read_only_root_filesystem, Some(true));
            assert_eq!(sc.allow_privilege_escalation, Some(false));
            assert_eq!(sc.capabilities.unwrap().drop, Some(vec!["ALL".to_string()]));
            let psc = pod.security_context.unwrap();
            assert_eq!(psc.run_as_non_root, Some(true));
            assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
            let args = container.args.clone().unwrap();
            assert!(
                args.windows(2)
                    .any(|w| w[0] == "--lease-name" && w[1] == full),
                "{args:?}"
            );
            assert!(container.liveness_probe.is_some() && container.readiness_probe.is_some());

            // The operator as a local process with nothing but the chart's ServiceAccount token.
            let token = c
                .kubectl(&[
                    "create",
                    "token",
                    &full,
                    "-n",
                    &ns.name,
                    "--duration",
                    "3600s",
                ])
                .await?;
            let sa = c.client_with_token(token.trim()).await?;

            // What it must not do.
            let secrets: Api<Secret> = Api::namespaced(sa.clone(), "kube-system");
            assert_eq!(
                code(secrets.list(&ListParams::default()).await),
                403,
                "read Secrets of kube-system"
            );
            let own: Api<Secret> = Api::namespaced(sa.clone(), &ns.name);
            assert_eq!(
                code(own.list(&ListParams::default()).await),
                403,
                "read Secrets of its own namespace"
            );
            let nodes: Api<Node> = Api::all(sa.clone());
            assert_eq!(
                code(nodes.delete("no-such-node", &DeleteParams::default()).await),
                403,
                "delete a node"
            );
            let bindings: Api<ClusterRoleBinding> = Api::all(sa.clone());
            let admin: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("{full}-escalate")},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": "cluster-admin"
                },
                "subjects": [{"kind": "ServiceAccount", "name": full, "namespace": ns.name}]
            }))?;
            assert_eq!(
                code(bindings.create(&PostParams::default(), &admin).await),
                403,
                "make itself cluster-admin"
            );
            let other_lease: Api<Lease> = Api::namespaced(sa.clone(), &ns.name);
            assert_eq!(
                code(other_lease.get("someone-elses").await),
                403,
                "read another Lease"
            );

            let controller_name = format!("e2e.lockstep.dev/{}", ns.name);
            let identity = "chart-operator".to_string();
            let elector = LeaderElector::new(
                Api::namespaced(sa.clone(), &ns.name),
                &full,
                &identity,
                Duration::from_secs(15),
            );
            let settings = Settings {
                controller_name: controller_name.clone(),
                instance: identity.clone(),
                ..Settings::default()
            };
            let metrics = Arc::new(Metrics::new());
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let operator = tokio::spawn(lead(
                elector,
                sa.clone(),
                settings,
                metrics.clone(),
                async {
                    let _ = stop_rx.await;
                },
            ));
            let leases: Api<Lease> = ns.api();
            let holder = || async {
                anyhow::Ok(
                    leases
                        .get(&full)
                        .await?
                        .spec
                        .and_then(|s| s.holder_identity)
                        .unwrap_or_default(),
                )
            };
            wait_until(
                Duration::from_secs(30),
                "the operator leads on the chart's Lease",
                || async { Ok(holder().await? == identity) },
            )
            .await?;

            // A job in another namespace, end to end: RBAC is cluster-wide where it must be.
            c.kubectl(&["create", "namespace", &jobs_ns]).await?;
            let run = async {
                let jobs = run_ddp_example(&c.client, &jobs_ns, &controller_name).await?;
                // With kueue.enabled its rights suffice to write a Kueue job's Workload, watch
                // it, and read Kueue's answer (here, in Kueue's words: that the job's LocalQueue
                // does not exist).
                let kueue = c.runs_scheduler("kueue", "the chart's Kueue rights");
                let (reason, text) = if kueue {
                    ("WaitingForKueue", "LocalQueue nowhere doesn't exist")
                } else {
                    ("GangApiMissing", "does not serve it")
                };
                kueue_job_says(&c.client, &jobs_ns, &controller_name, reason, text).await?;
                let phase = || phase_of(&jobs, "ddp-digits");
                let pods: Api<Pod> = Api::namespaced(c.client.clone(), &jobs_ns);
                // The rank addresses, which the operator may publish only with the chart's
                // rights on EndpointSlices (a refused write would only be logged).
                let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
                    Api::namespaced(c.client.clone(), &jobs_ns);
                wait_until(
                    Duration::from_secs(60),
                    "the ranks' EndpointSlice",
                    || async {
                        Ok(slices
                            .get_opt("ddp-digits-ranks")
                            .await?
                            .is_some_and(|s| s.endpoints.is_some_and(|e| e.len() == 2)))
                    },
                )
                .await?;
                // The chart's PodMonitor selects the worker pods the operator made, on a port
                // they have: its labels and port name are not the operator's own constants.
                let monitor_ar = kube::api::ApiResource::from_gvk_with_plural(
                    &kube::api::GroupVersionKind::gvk("monitoring.coreos.com", "v1", "PodMonitor"),
                    "podmonitors",
                );
                let monitors: Api<kube::api::DynamicObject> =
                    Api::namespaced_with(c.client.clone(), &ns.name, &monitor_ar);
                let monitor = monitors.get(&format!("{full}-workers")).await?;
                let worker = pods.get("ddp-digits-0").await?;
                let pod_labels = worker.metadata.labels.clone().unwrap_or_default();
                let selector = monitor.data["spec"]["selector"]["matchLabels"]
                    .as_object()
                    .cloned()
                    .unwrap_or_default();
                assert!(!selector.is_empty(), "the PodMonitor selects every pod");
                for (k, v) in &selector {
                    assert_eq!(
                        pod_labels.get(k).map(String::as_str),
                        v.as_str(),
                        "the PodMonitor selects {k}={v}, the worker pod has {pod_labels:?}"
                    );
                }
                let port = monitor.data["spec"]["podMetricsEndpoints"][0]["port"].as_str();
                assert!(
                    worker
                        .spec
                        .as_ref()
                        .unwrap()
                        .containers
                        .iter()
                        .any(|ctr| ctr
                            .ports
                            .iter()
                            .flatten()
                            .any(|p| p.name.as_deref() == port)),
                    "no container port named {port:?} on the worker pod"
                );
                for p in ["ddp-digits-0", "ddp-digits-1"] {
                    terminate_worker(&pods, p, 0).await?;
                }
                wait_until(Duration::from_secs(60), "the job succeeds", || async {
                    Ok(phase().await? == Some(Phase::Succeeded))
                })
                .await?;
                // The workers' Role: the operator may grant it only because it holds those rights.
                let roles: Api<Role> = Api::namespaced(c.client.clone(), &jobs_ns);
                assert!(roles.get_opt("ddp-digits-progress-writer").await?.is_some());
                // Events are recorded (a forbidden Event would only be logged).
                let events: Api<k8s_openapi::api::core::v1::Event> =
                    Api::namespaced(c.client.clone(), &jobs_ns);
                wait_until(Duration::from_secs(30), "a JobSucceeded Event", || async {
                    Ok(events
                        .list(&ListParams::default())
                        .await?
                        .items
                        .iter()
                        .any(|e| e.reason.as_deref() == Some("JobSucceeded")))
                })
                .await?;
                let status = jobs.get("ddp-digits").await?.status.unwrap_or_default();
                assert!(status.admission.is_some_and(|a| a.nodes.len() == 2));
                anyhow::Ok(jobs)
            }
            .await;
            let jobs = run?;
            assert!(metrics.reconciles.get() > 0);

            // An upgrade changes the Deployment and keeps the running leader's Lease.
            c.helm(&[
                "upgrade",
                &release,
                &chart,
                "-n",
                &ns.name,
                "--reuse-values",
                "--set",
                "operator.concurrency=8",
                "--wait",
                "--timeout",
                "120s",
            ])
            .await?;
            let args = deployments
                .get(&format!("{full}-operator"))
                .await?
                .spec
                .unwrap()
                .template
                .spec
                .unwrap()
                .containers[0]
                .args
                .clone()
                .unwrap();
            assert!(
                args.windows(2)
                    .any(|w| w[0] == "--concurrency" && w[1] == "8"),
                "{args:?}"
            );
            assert_eq!(
                holder().await?,
                identity,
                "the upgrade took the Lease from its holder"
            );

            let _ = stop_tx.send(());
            assert_eq!(operator.await??, Stopped::Shutdown);

            // Uninstall: nothing of the release is left, but the CRD and the user's job.
            c.helm(&[
                "uninstall",
                &release,
                "-n",
                &ns.name,
                "--wait",
                "--timeout",
                "120s",
            ])
            .await?;
            leftovers.uninstalled.set(true);
            let kinds = "deployments,replicasets,pods,services,serviceaccounts,configmaps,secrets,\
                     leases,roles,rolebindings,poddisruptionbudgets,networkpolicies,clusterroles,\
                     clusterrolebindings,servicemonitors,podmonitors,prometheusrules";
            let selector = format!("app.kubernetes.io/instance={release}");
            wait_until(
                Duration::from_secs(60),
                "nothing of the release is left",
                || async {
                    let left = c
                        .kubectl(&["get", kinds, "-A", "-l", &selector, "-o", "name"])
                        .await?;
                    Ok(left.trim().is_empty())
                },
            )
            .await?;
            let left = c
                .kubectl(&[
                    "get",
                    "secrets,leases,configmaps",
                    "-n",
                    &ns.name,
                    "-o",
                    "name",
                ])
                .await?;
            assert_eq!(
                left.trim(),
                "configmap/kube-root-ca.crt",
                "left in the release namespace"
            );
            let crds: Api<CustomResourceDefinition> = Api::all(c.client.clone());
            assert!(
                crds.get_opt("paralleljobs.lockstep.dev").await?.is_some(),
                "the CRD went"
            );
            assert!(
                jobs.get_opt("ddp-digits").await?.is_some(),
                "the user's job went"
            );
            anyhow::Ok(())
        }
        .await;
        drop(leftovers);
        outcome
    })
    .await
}

#[tokio::test]
async fn installed_namespace_scoped_the_operator_runs_jobs_in_its_namespace_and_writes_nowhere_else()
-> anyhow::Result<()> {
    with_namespace("chart-ns", |ns| async move {
        let c = ns.cluster.clone();
        let release = ns.name.clone();
        let full = format!("{release}-lockstep");
        let chart = chart_dir();
        // The watched namespace exists before the install: the chart puts the operator's Role there.
        let jobs_ns = format!("{}-jobs", ns.name);
        c.kubectl(&["create", "namespace", &jobs_ns]).await?;
        let leftovers = Leftovers {
            cluster: c.clone(),
            release: release.clone(),
            namespace: ns.name.clone(),
            jobs_namespace: jobs_ns.clone(),
            uninstalled: std::cell::Cell::new(false),
        };
        let outcome = async {
            let scope = format!("rbac.scope=namespace,operator.watchNamespace={jobs_ns}");
            c.helm(&[
                "install",
                &release,
                &chart,
                "-n",
                &ns.name,
                "--set",
                &scope,
                "--set",
                "replicaCount=1",
                "--wait",
                "--timeout",
                "120s",
            ])
            .await?;
            // The Deployment tells the operator which namespace to watch.
            let deployments: Api<Deployment> = ns.api();
            let args = deployments
                .get(&format!("{full}-operator"))
                .await?
                .spec
                .and_then(|s| s.template.spec)
                .and_then(|s| s.containers[0].args.clone())
                .unwrap_or_default();
            let watched = args
                .windows(2)
                .find(|w| w[0] == "--namespace")
                .map(|w| w[1].clone());
            assert_eq!(watched.as_deref(), Some(jobs_ns.as_str()), "{args:?}");

            let token = c
                .kubectl(&[
                    "create",
                    "token",
                    &full,
                    "-n",
                    &ns.name,
                    "--duration",
                    "3600s",
                ])
                .await?;
            let sa = c.client_with_token(token.trim()).await?;

            // Outside the watched namespace it may write nothing, and read none of the
            // namespaced objects but pods (admission counts every node's pods).
            let pod: Pod = serde_json::from_value(serde_json::json!({
                "metadata": {"name": "intruder"},
                "spec": {"containers": [{"name": "c", "image": "busybox"}]}
            }))?;
            for elsewhere in [ns.name.as_str(), "default"] {
                let pods: Api<Pod> = Api::namespaced(sa.clone(), elsewhere);
                assert_eq!(
                    code(pods.create(&PostParams::default(), &pod).await),
                    403,
                    "create a pod in {elsewhere}"
                );
                let maps: Api<k8s_openapi::api::core::v1::ConfigMap> =
                    Api::namespaced(sa.clone(), elsewhere);
                assert_eq!(
                    code(maps.list(&ListParams::default()).await),
                    403,
                    "list ConfigMaps of {elsewhere}"
                );
            }
            let all_jobs: Api<ParallelJob> = Api::all(sa.clone());
            assert_eq!(
                code(all_jobs.list(&ListParams::default()).await),
                403,
                "list jobs cluster-wide"
            );
            let all_pods: Api<Pod> = Api::all(sa.clone());
            all_pods.list(&ListParams::default().limit(1)).await?;

            // With those rights alone, the operator runs a job in its namespace end to end.
            let controller_name = format!("e2e.lockstep.dev/{}", ns.name);
            let identity = "chart-ns-operator".to_string();
            let elector = LeaderElector::new(
                Api::namespaced(sa.clone(), &ns.name),
                &full,
                &identity,
                Duration::from_secs(15),
            );
            let settings = Settings {
                controller_name: controller_name.clone(),
                instance: identity,
                namespace: watched,
                ..Settings::default()
            };
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let operator = tokio::spawn(lead(
                elector,
                sa.clone(),
                settings,
                Arc::new(Metrics::new()),
                async {
                    let _ = stop_rx.await;
                },
            ));
            let jobs = run_ddp_example(&c.client, &jobs_ns, &controller_name).await?;
            // Without kueue.enabled a Kueue job says the operator may not use Kueue's API.
            kueue_job_says(
                &c.client,
                &jobs_ns,
                &controller_name,
                "GangApiMissing",
                "kueue.enabled=true",
            )
            .await?;
            let phase = || phase_of(&jobs, "ddp-digits");
            let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
                Api::namespaced(c.client.clone(), &jobs_ns);
            wait_until(
                Duration::from_secs(60),
                "the ranks' EndpointSlice",
                || async {
                    Ok(slices
                        .get_opt("ddp-digits-ranks")
                        .await?
                        .is_some_and(|s| s.endpoints.is_some_and(|e| e.len() == 2)))
                },
            )
            .await?;
            // The workers' Role, which the operator may grant only because its Role holds it.
            let roles: Api<Role> = Api::namespaced(c.client.clone(), &jobs_ns);
            assert!(roles.get_opt("ddp-digits-progress-writer").await?.is_some());
            let pods: Api<Pod> = Api::namespaced(c.client.clone(), &jobs_ns);
            for p in ["ddp-digits-0", "ddp-digits-1"] {
                terminate_worker(&pods, p, 0).await?;
            }
            wait_until(Duration::from_secs(60), "the job succeeds", || async {
                Ok(phase().await? == Some(Phase::Succeeded))
            })
            .await?;
            let _ = stop_tx.send(());
            assert_eq!(operator.await??, Stopped::Shutdown);
            anyhow::Ok(())
        }
        .await;
        drop(leftovers);
        outcome
    })
    .await
}

/// The phase of the job `name`.
async fn phase_of(jobs: &Api<ParallelJob>, name: &str) -> anyhow::Result<Option<Phase>> {
    Ok(jobs.get(name).await?.status.unwrap_or_default().phase)
}

/// Creates a job in the LocalQueue `nowhere` of `ns` for the operator named `controller_name`,
/// and waits until its `Admitted` condition has `reason` and a message with `text`.
async fn kueue_job_says(
    client: &kube::Client,
    ns: &str,
    controller_name: &str,
    reason: &str,
    text: &str,
) -> anyhow::Result<()> {
    let mut v = lockstep_e2e::example_manifest("ddp-digits.yaml")?;
    v["metadata"]["name"] = "queued".into();
    v["metadata"]["labels"] = serde_json::json!({"kueue.x-k8s.io/queue-name": "nowhere"});
    v["spec"]["managedBy"] = controller_name.into();
    let jobs: Api<ParallelJob> = Api::namespaced(client.clone(), ns);
    jobs.create(&PostParams::default(), &serde_json::from_value(v)?)
        .await?;
    wait_until(
        Duration::from_secs(60),
        &format!("Admitted: {reason}, saying {text}"),
        || async {
            let s = jobs.get("queued").await?.status.unwrap_or_default();
            Ok(s.conditions
                .iter()
                .any(|c| c.type_ == "Admitted" && c.reason == reason && c.message.contains(text)))
        },
    )
    .await?;
    jobs.delete("queued", &DeleteParams::default()).await?;
    Ok(())
}

/// Creates the example DDP job in `ns` for the operator named `controller_name`, and waits until
/// it runs.
async fn run_ddp_example(
    client: &kube::Client,
    ns: &str,
    controller_name: &str,
) -> anyhow::Result<Api<ParallelJob>> {
    let mut v = lockstep_e2e::example_manifest("ddp-digits.yaml")?;
    v["spec"]["managedBy"] = controller_name.into();
    let jobs: Api<ParallelJob> = Api::namespaced(client.clone(), ns);
    jobs.create(&PostParams::default(), &serde_json::from_value(v)?)
        .await?;
    wait_until(Duration::from_secs(90), "the job runs", || async {
        Ok(phase_of(&jobs, "ddp-digits").await? == Some(Phase::Running))
    })
    .await?;
    Ok(jobs)
}
