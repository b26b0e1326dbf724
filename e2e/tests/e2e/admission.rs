//! Builtin gang admission against the real control plane, on private pools of fake GPU nodes: a
//! gang is admitted whole or not at all, waits with a reason that says what is missing, goes in
//! priority order, never deadlocks, and never oversubscribes a node, even when the operator is
//! killed while it admits and releases gangs.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::scheduling::v1::PriorityClass;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use lockstep_api::ParallelJob;
use lockstep_api::contract::{annotations, labels, operator};
use lockstep_api::status::Phase;
use lockstep_e2e::{
    POOL_LABEL, TestNamespace, spawn_operator, terminate_worker, wait_until, with_namespace,
};
use lockstep_operator::controller::Settings;

/// How long a test waits for the operator to get somewhere.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(90);

/// A job of `ranks` ranks with `gpus` GPUs each on this test's pool; `extra` is merged into the
/// spec.
pub(crate) fn job(
    ns: &TestNamespace,
    name: &str,
    ranks: i32,
    gpus: i32,
    extra: serde_json::Value,
) -> anyhow::Result<ParallelJob> {
    let mut v = lockstep_e2e::example_manifest("ddp-digits.yaml")?;
    v["metadata"]["name"] = name.into();
    v["spec"]["parallelism"] = serde_json::json!({"dataParallel": ranks, "gpusPerWorker": gpus});
    let placement = ns.pool_placement();
    v["spec"]["template"]["spec"]["nodeSelector"] = placement["nodeSelector"].clone();
    v["spec"]["template"]["spec"]["tolerations"] = placement["tolerations"].clone();
    if let Some(obj) = extra.as_object() {
        for (k, val) in obj {
            v["spec"][k] = val.clone();
        }
    }
    Ok(serde_json::from_value(v)?)
}

/// Creates the job `j` in the test's namespace.
pub(crate) async fn create(ns: &TestNamespace, j: ParallelJob) -> anyhow::Result<()> {
    ns.api::<ParallelJob>()
        .create(&PostParams::default(), &j)
        .await?;
    Ok(())
}

/// The pods of the job `name`.
pub(crate) async fn gang(ns: &TestNamespace, name: &str) -> anyhow::Result<Vec<Pod>> {
    ns.gang(name).await
}

/// The node a pod is bound to.
pub(crate) fn bound(p: &Pod) -> Option<String> {
    p.spec.as_ref().and_then(|s| s.node_name.clone())
}

/// The phase of the job `name`.
pub(crate) async fn phase(ns: &TestNamespace, name: &str) -> anyhow::Result<Option<Phase>> {
    ns.phase(name).await
}

/// Waits (up to [`TIMEOUT`]) until the job `name` is in phase `want`.
pub(crate) async fn wait_phase(ns: &TestNamespace, name: &str, want: Phase) -> anyhow::Result<()> {
    ns.wait_phase(name, want, TIMEOUT).await
}

/// Plays the kubelet: every pod of the job exits 0.
pub(crate) async fn finish(ns: &TestNamespace, name: &str) -> anyhow::Result<()> {
    let pods: Api<Pod> = ns.api();
    for p in gang(ns, name).await? {
        terminate_worker(&pods, &p.metadata.name.unwrap_or_default(), 0).await?;
    }
    Ok(())
}

/// Plays the kubelet for gangs that run: each finishes. Returns how many jobs have succeeded.
async fn finish_running(ns: &TestNamespace, names: &[String]) -> anyhow::Result<usize> {
    let mut done = 0;
    for n in names {
        match phase(ns, n).await? {
            Some(Phase::Running) => finish(ns, n).await?,
            Some(Phase::Succeeded) => done += 1,
            _ => {}
        }
    }
    Ok(done)
}

/// The Admitted condition of a job: (status, reason, message).
pub(crate) async fn admitted(
    ns: &TestNamespace,
    name: &str,
) -> anyhow::Result<Option<(String, String, String)>> {
    let s = ns
        .api::<ParallelJob>()
        .get(name)
        .await?
        .status
        .unwrap_or_default();
    Ok(s.conditions
        .iter()
        .find(|c| c.type_ == "Admitted")
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone())))
}

/// Checks, every 100 ms until stopped, that on every node of the pool (1) the GPU requests of the
/// bound pods that have not finished, and (2) those of the released (ungated) pods planned onto
/// it, never exceed its allocatable GPUs, and that no gang ever has only part of its pods bound
/// while none of it runs on its own.
struct Guard {
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<anyhow::Result<usize>>,
}

impl Guard {
    fn start(ns: &TestNamespace) -> Guard {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (pods, nodes): (Api<Pod>, Api<Node>) = (ns.api(), Api::all(ns.cluster.client.clone()));
        let selector = format!("{POOL_LABEL}={}", ns.name);
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut checks = 0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let allocatable: HashMap<String, i64> = nodes
                    .list(&ListParams::default().labels(&selector))
                    .await?
                    .items
                    .into_iter()
                    .map(|n| {
                        let gpus = n
                            .status
                            .and_then(|s| s.allocatable)
                            .and_then(|a| a.get("nvidia.com/gpu").map(|q| q.0.parse().unwrap_or(0)))
                            .unwrap_or(0);
                        (n.metadata.name.unwrap_or_default(), gpus)
                    })
                    .collect();
                let mut on_node: BTreeMap<String, i64> = BTreeMap::new();
                let mut planned: BTreeMap<String, i64> = BTreeMap::new();
                for p in pods.list(&ListParams::default()).await?.items {
                    let done = matches!(
                        p.status.as_ref().and_then(|s| s.phase.as_deref()),
                        Some("Succeeded" | "Failed")
                    );
                    if done {
                        continue;
                    }
                    let spec = p.spec.clone().unwrap_or_default();
                    let gpus: i64 = spec
                        .containers
                        .iter()
                        .filter_map(|c| {
                            c.resources
                                .as_ref()?
                                .limits
                                .as_ref()?
                                .get("nvidia.com/gpu")?
                                .0
                                .parse::<i64>()
                                .ok()
                        })
                        .sum();
                    if let Some(n) = bound(&p) {
                        *on_node.entry(n).or_default() += gpus;
                    }
                    let gated = spec
                        .scheduling_gates
                        .as_ref()
                        .is_some_and(|g| g.iter().any(|g| g.name == operator::SCHEDULING_GATE));
                    let plan = p
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(annotations::PLANNED_NODE).cloned());
                    if let (false, Some(n)) = (gated, plan) {
                        *planned.entry(n).or_default() += gpus;
                    }
                }
                for (what, map) in [("bound", &on_node), ("released and planned", &planned)] {
                    for (node, gpus) in map {
                        let cap = allocatable.get(node).copied().unwrap_or(0);
                        anyhow::ensure!(
                            *gpus <= cap,
                            "node {node}: {gpus} GPUs of {what} pods, only {cap} allocatable"
                        );
                    }
                }
                checks += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(checks)
        });
        Guard { stop, task }
    }

    async fn finish(self) -> anyhow::Result<()> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let checks = self.task.await??;
        anyhow::ensure!(checks > 0, "the guard never checked");
        Ok(())
    }
}

#[tokio::test]
async fn of_two_jobs_needing_six_of_eight_gpus_one_runs_and_the_other_waits_then_runs()
-> anyhow::Result<()> {
    with_namespace("adm-six", |ns| async move {
        ns.create_node_pool(2, 4).await?;
        let guard = Guard::start(&ns);
        create(&ns, job(&ns, "first", 6, 1, serde_json::json!({}))?).await?;
        wait_phase(&ns, "first", Phase::Running).await?;
        create(&ns, job(&ns, "second", 6, 1, serde_json::json!({}))?).await?;
        wait_phase(&ns, "second", Phase::Queued).await?;
        let (status, reason, message) = admitted(&ns, "second").await?.expect("Admitted");
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("False", "InsufficientCapacity")
        );
        assert_eq!(
            message,
            "needs 6 nvidia.com/gpu (6 ranks x 1 nvidia.com/gpu); the 2 nodes it may use have 2 \
             nvidia.com/gpu free (room for 2 ranks)"
        );
        let s = ns
            .api::<ParallelJob>()
            .get("second")
            .await?
            .status
            .unwrap_or_default();
        assert_eq!(s.admission.and_then(|a| a.queue_position), Some(1));
        // Nothing of the second gang exists while the first runs.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            gang(&ns, "second").await?.is_empty(),
            "the waiting gang made pods"
        );

        finish(&ns, "first").await?;
        wait_phase(&ns, "first", Phase::Succeeded).await?;
        wait_phase(&ns, "second", Phase::Running).await?;
        let s = ns
            .api::<ParallelJob>()
            .get("second")
            .await?
            .status
            .unwrap_or_default();
        let a = s.admission.expect("admission");
        assert_eq!(a.nodes.len(), 6);
        assert!(a.wait_seconds.unwrap_or(0.0) > 1.0, "{a:?}");
        let pods = gang(&ns, "second").await?;
        for p in &pods {
            let rank: usize = p.metadata.labels.as_ref().unwrap()[labels::RANK].parse()?;
            assert_eq!(
                bound(p).as_deref(),
                Some(a.nodes[rank].as_str()),
                "rank {rank} is not on its planned node"
            );
            assert!(
                p.spec
                    .as_ref()
                    .unwrap()
                    .scheduling_gates
                    .as_ref()
                    .is_none_or(|g| g.is_empty())
            );
        }
        guard.finish().await
    })
    .await
}

#[tokio::test]
async fn three_jobs_in_a_circular_wait_all_complete() -> anyhow::Result<()> {
    with_namespace("adm-circular", |ns| async move {
        // Three nodes, three gangs of two 8-GPU ranks: a pod-by-pod scheduler gives each gang one
        // node and all three wait forever for a second one.
        ns.create_node_pool(3, 8).await?;
        let guard = Guard::start(&ns);
        let names = ["a", "b", "c"];
        for n in names {
            create(&ns, job(&ns, n, 2, 8, serde_json::json!({}))?).await?;
        }
        wait_until(
            Duration::from_secs(180),
            "all three jobs succeed",
            || async {
                let mut running = 0;
                let mut finished = 0;
                for n in names {
                    let pods = gang(&ns, n).await?;
                    let bound_now = pods.iter().filter(|p| bound(p).is_some()).count();
                    anyhow::ensure!(
                        bound_now == 0
                            || bound_now == 2
                            || pods.iter().any(|p| p.metadata.deletion_timestamp.is_some()),
                        "gang {n} is half-bound: {bound_now} of 2"
                    );
                    match phase(&ns, n).await? {
                        Some(Phase::Running) => {
                            running += 1;
                            finish(&ns, n).await?;
                        }
                        Some(Phase::Succeeded) => finished += 1,
                        _ => {}
                    }
                }
                anyhow::ensure!(running <= 1, "{running} gangs of 2 nodes run on 3 nodes");
                Ok(finished == names.len())
            },
        )
        .await?;
        guard.finish().await
    })
    .await
}

#[tokio::test]
async fn required_topology_keeps_a_gang_in_one_rack_and_an_impossible_gang_waits_whole()
-> anyhow::Result<()> {
    with_namespace("adm-rack", |ns| async move {
        // Two racks of two 8-GPU nodes.
        ns.create_node_pool(4, 8).await?;
        let guard = Guard::start(&ns);
        let rack = serde_json::json!({"scheduling": {"topology": {"key": "topology.lockstep.dev/rack", "mode": "Required"}}});
        // Three 8-GPU ranks never fit in one rack; it must not hold up the gang behind it.
        create(&ns, job(&ns, "too-big", 3, 8, rack.clone())?).await?;
        create(&ns, job(&ns, "fits", 4, 4, rack)?).await?;
        wait_phase(&ns, "fits", Phase::Running).await?;
        let nodes = Api::<Node>::all(ns.cluster.client.clone());
        let mut racks = Vec::new();
        for p in gang(&ns, "fits").await? {
            let n = nodes.get(&bound(&p).expect("bound")).await?;
            racks.push(n.metadata.labels.unwrap_or_default()["topology.lockstep.dev/rack"].clone());
        }
        racks.dedup();
        assert_eq!(racks.len(), 1, "one gang across racks {racks:?}");

        wait_phase(&ns, "too-big", Phase::Queued).await?;
        let (_, reason, message) = admitted(&ns, "too-big").await?.expect("Admitted");
        assert_eq!(reason, "InsufficientCapacity");
        assert!(message.starts_with("can never be admitted on the current nodes: needs 24 nvidia.com/gpu (3 ranks x 8 nvidia.com/gpu)"), "{message}");
        assert!(message.contains("in one topology.lockstep.dev/rack domain, and the largest"), "{message}");
        assert!(gang(&ns, "too-big").await?.is_empty(), "part of an impossible gang was placed");
        guard.finish().await
    })
    .await
}

#[tokio::test]
async fn priority_orders_the_queue_and_a_deleted_job_gives_up_its_place() -> anyhow::Result<()> {
    with_namespace("adm-priority", |ns| async move {
        ns.create_node_pool(1, 8).await?;
        let classes: Api<PriorityClass> = Api::all(ns.cluster.client.clone());
        let (low, high) = (format!("{}-low", ns.name), format!("{}-high", ns.name));
        for (name, value) in [(&low, 10), (&high, 1000)] {
            let pc: PriorityClass = serde_json::from_value(serde_json::json!({
                "apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                "metadata": {"name": name}, "value": value}))?;
            classes.create(&PostParams::default(), &pc).await?;
        }
        let with = |class: &str| serde_json::json!({"scheduling": {"priorityClassName": class}});
        create(&ns, job(&ns, "blocker", 1, 8, serde_json::json!({}))?).await?;
        wait_phase(&ns, "blocker", Phase::Running).await?;
        create(&ns, job(&ns, "old-low", 1, 8, with(&low))?).await?;
        wait_phase(&ns, "old-low", Phase::Queued).await?;
        create(&ns, job(&ns, "doomed-high", 1, 8, with(&high))?).await?;
        wait_phase(&ns, "doomed-high", Phase::Queued).await?;
        create(&ns, job(&ns, "new-high", 1, 8, with(&high))?).await?;
        wait_phase(&ns, "new-high", Phase::Queued).await?;
        let position = |name: &'static str| {
            let ns = &ns;
            async move {
                anyhow::Ok(
                    ns.api::<ParallelJob>()
                        .get(name)
                        .await?
                        .status
                        .and_then(|s| s.admission)
                        .and_then(|a| a.queue_position),
                )
            }
        };
        assert_eq!(
            position("new-high").await?,
            Some(2),
            "behind the older high-priority job"
        );
        ns.api::<ParallelJob>()
            .delete("doomed-high", &DeleteParams::default())
            .await?;

        finish(&ns, "blocker").await?;
        wait_phase(&ns, "new-high", Phase::Running).await?;
        assert_eq!(
            phase(&ns, "old-low").await?,
            Some(Phase::Queued),
            "the low-priority job went first"
        );
        finish(&ns, "new-high").await?;
        wait_phase(&ns, "old-low", Phase::Running).await?;
        for c in [&low, &high] {
            classes.delete(c, &DeleteParams::default()).await?;
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn killing_the_operator_while_it_admits_and_releases_never_oversubscribes_a_node()
-> anyhow::Result<()> {
    with_namespace("adm-crash", |ns| async move {
        // An operator of this test's own, killed at pseudo-random moments while six gangs of two
        // 4-GPU ranks share two 8-GPU nodes (two gangs at a time).
        ns.create_node_pool(2, 8).await?;
        let guard = Guard::start(&ns);
        let controller_name = format!("e2e.lockstep.dev/{}", ns.name);
        let names: Vec<String> = (0..6).map(|i| format!("g{i}")).collect();
        for n in &names {
            create(
                &ns,
                job(
                    &ns,
                    n,
                    2,
                    4,
                    serde_json::json!({"runPolicy": {"managedBy": controller_name}}),
                )?,
            )
            .await?;
        }
        let settings = Settings {
            controller_name: controller_name.clone(),
            ..Settings::default()
        };
        let spawn = || spawn_operator(&ns.cluster.client, &settings);
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..40 {
            let operator = spawn();
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            tokio::time::sleep(Duration::from_millis(50 + seed % 600)).await;
            operator.abort();
            let _ = operator.await;
            if finish_running(&ns, &names).await? == names.len() {
                break;
            }
        }
        let operator = spawn();
        let all = wait_until(Duration::from_secs(180), "every gang succeeds", || async {
            Ok(finish_running(&ns, &names).await? == names.len())
        })
        .await;
        operator.abort();
        all?;
        guard.finish().await
    })
    .await
}

#[tokio::test]
async fn the_workload_policy_places_a_gang_all_or_nothing_through_kube_scheduler()
-> anyhow::Result<()> {
    with_namespace("adm-workload", |ns| async move {
        ns.create_node_pool(4, 8).await?;
        // One node of four taken: room for three 8-GPU ranks, not four.
        let blocker: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "blocker"},
            "spec": {
                "nodeSelector": ns.pool_placement()["nodeSelector"],
                "tolerations": ns.pool_placement()["tolerations"],
                "containers": [{"name": "c", "image": "x", "resources": {"limits": {"nvidia.com/gpu": "8"}}}]
            }
        }))?;
        let pods: Api<Pod> = ns.api();
        pods.create(&PostParams::default(), &blocker).await?;
        wait_until(TIMEOUT, "the blocker is bound", || async { Ok(bound(&pods.get("blocker").await?).is_some()) }).await?;
        create(&ns, job(&ns, "upstream", 4, 8, serde_json::json!({"scheduling": {"gangPolicy": "Workload"}}))?).await?;
        wait_until(TIMEOUT, "the four pods exist, in the PodGroup", || async {
            let g = gang(&ns, "upstream").await?;
            Ok(g.len() == 4 && g.iter().all(|p| p.spec.as_ref().and_then(|s| s.scheduling_group.as_ref()).and_then(|sg| sg.pod_group_name.as_deref()) == Some("upstream")))
        })
        .await?;
        wait_until(TIMEOUT, "Admitted=False WaitingForScheduler", || async {
            Ok(admitted(&ns, "upstream").await?.is_some_and(|(s, r, _)| s == "False" && r == "WaitingForScheduler"))
        })
        .await?;
        // The scheduler has judged the gang by the time its PodGroup says so; none of it is bound.
        let groups: Api<kube::api::DynamicObject> = Api::namespaced_with(
            ns.cluster.client.clone(),
            &ns.name,
            &kube::api::ApiResource::from_gvk_with_plural(&kube::api::GroupVersionKind::gvk("scheduling.k8s.io", "v1alpha2", "PodGroup"), "podgroups"),
        );
        wait_until(TIMEOUT, "the scheduler reports the gang unschedulable", || async {
            let g = groups.get("upstream").await?;
            Ok(g.data["status"]["conditions"].as_array().is_some_and(|cs| cs.iter().any(|c| c["type"] == "PodGroupScheduled" && c["status"] == "False")))
        })
        .await?;
        assert_eq!(gang(&ns, "upstream").await?.iter().filter(|p| bound(p).is_some()).count(), 0);
        pods.delete("blocker", &DeleteParams::default().grace_period(0)).await?;
        wait_phase(&ns, "upstream", Phase::Running).await?;
        let (status, reason, _) = admitted(&ns, "upstream").await?.expect("Admitted");
        assert_eq!((status.as_str(), reason.as_str()), ("True", "GangAdmitted"));
        let workloads: Api<kube::api::DynamicObject> = Api::namespaced_with(
            ns.cluster.client.clone(),
            &ns.name,
            &kube::api::ApiResource::from_gvk_with_plural(&kube::api::GroupVersionKind::gvk("scheduling.k8s.io", "v1alpha2", "Workload"), "workloads"),
        );
        let w = workloads.get("upstream").await?;
        assert_eq!(w.data["spec"]["podGroupTemplates"][0]["schedulingPolicy"]["gang"]["minCount"], 4);
        Ok(())
    })
    .await
}

/// Three jobs of two 8-GPU ranks on three 8-GPU nodes under the external gang scheduler of
/// `policy`: all complete, and no gang is ever left partly bound (a gang scheduler binds a gang's
/// pods one call at a time, so a gang seen partly bound must be whole within a moment).
async fn circular_wait_completes_under(policy: &str, test: &str) -> anyhow::Result<()> {
    with_namespace(test, |ns| async move {
        ns.create_node_pool(3, 8).await?;
        let names = ["a", "b", "c"];
        let extra = serde_json::json!({"scheduling": {"gangPolicy": policy}});
        for n in names {
            create(&ns, job(&ns, n, 2, 8, extra.clone())?).await?;
        }
        let half_since: std::cell::RefCell<HashMap<&str, tokio::time::Instant>> =
            Default::default();
        let checks = std::cell::Cell::new(0);
        wait_until(Duration::from_secs(180), "all three jobs succeed", || {
            checks.set(checks.get() + 1);
            let ns = &ns;
            let half_since = &half_since;
            async move {
                let mut running = 0;
                let mut finished = 0;
                for n in names {
                    let pods = gang(ns, n).await?;
                    let bound_now = pods.iter().filter(|p| bound(p).is_some()).count();
                    let going = pods.iter().any(|p| p.metadata.deletion_timestamp.is_some());
                    if bound_now == 1 && !going {
                        let since = *half_since
                            .borrow_mut()
                            .entry(n)
                            .or_insert_with(tokio::time::Instant::now);
                        anyhow::ensure!(
                            since.elapsed() < Duration::from_secs(10),
                            "gang {n} has stayed half-bound (1 of 2) for {:?} under {policy}",
                            since.elapsed()
                        );
                    } else {
                        half_since.borrow_mut().remove(n);
                    }
                    // What runs, from the pods themselves: the job's phase may lag behind a
                    // gang the scheduler placed as soon as the one before finished.
                    let live = pods
                        .iter()
                        .filter(|p| bound(p).is_some())
                        .filter(|p| {
                            p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                        })
                        .count();
                    if live == 2 {
                        running += 1;
                    }
                    match phase(ns, n).await? {
                        Some(Phase::Running) => finish(ns, n).await?,
                        Some(Phase::Succeeded) => finished += 1,
                        _ => {}
                    }
                }
                anyhow::ensure!(running <= 1, "{running} gangs of 2 nodes run on 3 nodes");
                Ok(finished == names.len())
            }
        })
        .await?;
        assert!(
            checks.get() > 3,
            "watched the gangs {} times only",
            checks.get()
        );
        // The gang object the scheduler placed them by is the job's.
        let (group, version) = match policy {
            "Volcano" => ("scheduling.volcano.sh", "v1beta1"),
            _ => ("scheduling.x-k8s.io", "v1alpha1"),
        };
        let groups: Api<kube::api::DynamicObject> = Api::namespaced_with(
            ns.cluster.client.clone(),
            &ns.name,
            &kube::api::ApiResource::from_gvk_with_plural(
                &kube::api::GroupVersionKind::gvk(group, version, "PodGroup"),
                "podgroups",
            ),
        );
        let g = groups.get("a").await?;
        assert_eq!(g.data["spec"]["minMember"], 2);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn three_jobs_in_a_circular_wait_all_complete_under_volcano() -> anyhow::Result<()> {
    let test = "three_jobs_in_a_circular_wait_all_complete_under_volcano";
    if !lockstep_e2e::cluster()
        .await
        .runs_scheduler("volcano", test)
    {
        return Ok(());
    }
    circular_wait_completes_under("Volcano", "adm-circular-volcano").await
}

#[tokio::test]
async fn three_jobs_in_a_circular_wait_all_complete_under_coscheduling() -> anyhow::Result<()> {
    let test = "three_jobs_in_a_circular_wait_all_complete_under_coscheduling";
    if !lockstep_e2e::cluster()
        .await
        .runs_scheduler("coscheduling", test)
    {
        return Ok(());
    }
    circular_wait_completes_under("Coscheduling", "adm-circular-cosched").await
}

/// Where a gang scheduler's API is not served (an API server of its own, without Volcano's or
/// Kueue's CRDs), a job that asks for it says so, stays Queued, and makes no pod.
#[tokio::test]
async fn a_gang_scheduler_that_is_not_installed_is_named_in_a_condition() -> anyhow::Result<()> {
    let bare = lockstep_e2e::BareApiServer::start("missing-gang-api").await?;
    let client = bare.cluster.client.clone();
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": "bare"}}))?,
        )
        .await?;
    let operator = spawn_operator(&client, &Settings::default());
    let jobs: Api<ParallelJob> = Api::namespaced(client.clone(), "bare");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "bare");
    let cases = [
        (
            "volcanic",
            serde_json::json!({"gangPolicy": "Volcano"}),
            None,
            "scheduling.volcano.sh/v1beta1 PodGroup",
        ),
        (
            "queued",
            serde_json::json!({}),
            Some("team"),
            "kueue.x-k8s.io/v1beta2 Workload",
        ),
    ];
    for (name, scheduling, queue_label, _) in &cases {
        let mut v = lockstep_e2e::example_manifest("ddp-digits.yaml")?;
        v["metadata"]["name"] = (*name).into();
        v["spec"]["scheduling"] = scheduling.clone();
        if let Some(q) = queue_label {
            v["metadata"]["labels"] = serde_json::json!({"kueue.x-k8s.io/queue-name": q});
        }
        jobs.create(&PostParams::default(), &serde_json::from_value(v)?)
            .await?;
    }
    let admitted_of = |j: ParallelJob| {
        j.status
            .unwrap_or_default()
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Admitted")
    };
    for (name, _, _, api) in &cases {
        wait_until(
            TIMEOUT,
            &format!("{name}: Admitted=False GangApiMissing"),
            || async {
                Ok(admitted_of(jobs.get(name).await?).is_some_and(|c| {
                    c.status == "False" && c.reason == "GangApiMissing" && c.message.contains(api)
                }))
            },
        )
        .await?;
    }
    // It stays so: the passes the report's own write starts do not flip it back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (name, _, _, _) in &cases {
        let j = jobs.get(name).await?;
        assert_eq!(
            j.status.as_ref().and_then(|s| s.phase),
            Some(Phase::Queued),
            "{name}"
        );
        assert_eq!(
            admitted_of(j).map(|c| c.reason).as_deref(),
            Some("GangApiMissing")
        );
    }
    assert!(
        pods.list(&ListParams::default()).await?.items.is_empty(),
        "pods made for a scheduler that is not there"
    );
    operator.abort();
    Ok(())
}
