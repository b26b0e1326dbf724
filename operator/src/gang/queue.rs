//! One admission cycle: the waiting gangs in queue order, each admitted whole or told why it
//! waits.
//!
//! **Order.** Higher priority first (the PriorityClass value of `priorityClassName`), then older
//! (creation time), then by name.
//!
//! **Backfill rule.** A gang that cannot be admitted now but could be on this cluster once enough
//! running work finishes *blocks* every node it could use: no gang behind it in the queue may take
//! capacity on those nodes. A gang behind it is admitted only onto nodes that no blocked gang ahead
//! of it could ever use (other node pools, taints, selectors). So backfill never delays a gang
//! ahead of it: whatever a later gang takes is capacity no gang ahead could have had. A gang that
//! can never fit (even on an empty cluster) blocks nothing; it says so and waits (nodes may join).

use std::collections::HashMap;
use std::sync::Arc;

use super::demand::{PODS, Res};
use super::placement::{Shape, Shortfall, place};
use super::snapshot::{NodeRules, Snapshot};

/// A gang waiting for admission.
#[derive(Clone, Debug)]
pub struct Waiting {
    /// `namespace/name` of its job.
    pub key: String,
    /// PriorityClass value (higher goes first).
    pub priority: i32,
    /// Creation time of the job, in seconds since the epoch (older goes first).
    pub created: i64,
    /// What it asks for.
    pub shape: Arc<Shape>,
    /// Which nodes it may use.
    pub rules: Arc<NodeRules>,
}

/// Why a gang waits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Not enough free capacity on the nodes it may use.
    Capacity,
    /// It would fit, but the capacity is kept for a gang ahead of it (named).
    Behind(String),
    /// It cannot fit even on an empty cluster.
    Never,
}

/// The outcome for one gang.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Admitted: the node index of every rank in the snapshot.
    Admit(Vec<usize>),
    /// Waiting.
    Waits {
        /// Why.
        why: Wait,
        /// What is missing, for a person.
        message: String,
        /// Position among the waiting gangs that compete with it for nodes (1 = next): those
        /// ahead of it in the queue that may use a node it may use. Gangs on other node pools
        /// wait in a queue of their own.
        position: usize,
    },
}

/// Sorts `queue` into admission order.
pub fn order(queue: &mut [Waiting]) {
    queue.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then(a.created.cmp(&b.created))
            .then(a.key.cmp(&b.key))
    });
}

/// Which waiting gangs a cycle explains (works out why they wait and what is missing). Only the
/// gang whose reconcile asked needs that; the others only need to know whether they go.
#[derive(Clone, Copy, Debug)]
pub enum Explain<'a> {
    /// Every gang (tests, tools).
    All,
    /// The gang with this key only.
    Only(&'a str),
    /// None.
    Nobody,
}

impl Explain<'_> {
    fn covers(&self, key: &str) -> bool {
        match self {
            Explain::All => true,
            Explain::Only(k) => *k == key,
            Explain::Nobody => false,
        }
    }
}

/// Runs one cycle over `queue` (sorted here): admits what may go, in order, taking its capacity
/// in `snapshot`, and returns a verdict per gang in queue order. A waiting gang that `explain`
/// does not cover gets an empty message (and `Capacity` where it may be `Behind`).
pub fn cycle(
    snapshot: &mut Snapshot,
    queue: &mut [Waiting],
    explain: Explain<'_>,
) -> Vec<(String, Verdict)> {
    order(queue);
    let n = snapshot.nodes.len();
    let mut eligible: HashMap<Arc<NodeRules>, Vec<bool>> = HashMap::new();
    let mut possible: HashMap<(Arc<NodeRules>, Arc<Shape>), Result<(), Shortfall>> = HashMap::new();
    let mut blocked = vec![false; n];
    let mut blocked_count = 0;
    let mut head: Option<String> = None;
    // The gangs waiting so far, counted by the node rules they wait under, and whether two rules
    // share a node.
    let mut waiting: Vec<(Arc<NodeRules>, usize)> = Vec::new();
    let mut shared: HashMap<(Arc<NodeRules>, Arc<NodeRules>), bool> = HashMap::new();
    let mut out = Vec::with_capacity(queue.len());
    for w in queue.iter() {
        let explained = explain.covers(&w.key);
        let everything_kept = n > 0 && blocked_count == n;
        let elig = eligible
            .entry(w.rules.clone())
            .or_insert_with(|| {
                snapshot
                    .nodes
                    .iter()
                    .map(|node| w.rules.allow(node))
                    .collect()
            })
            .clone();
        let mut wait_here = || {
            let mut position = 1;
            for (rules, count) in &waiting {
                let shares = *shared
                    .entry((rules.clone(), w.rules.clone()))
                    .or_insert_with(|| {
                        *rules == w.rules
                            || eligible[rules].iter().zip(&elig).any(|(a, b)| *a && *b)
                    });
                if shares {
                    position += count;
                }
            }
            match waiting.iter_mut().find(|(r, _)| *r == w.rules) {
                Some((_, count)) => *count += 1,
                None => waiting.push((w.rules.clone(), 1)),
            }
            position
        };
        if everything_kept && !explained {
            // Every node is kept for gangs ahead: this one waits, and whether it could ever fit
            // changes nothing (there is nothing left for it to keep).
            let position = wait_here();
            out.push((
                w.key.clone(),
                Verdict::Waits {
                    why: Wait::Behind(head.clone().unwrap_or_default()),
                    message: String::new(),
                    position,
                },
            ));
            continue;
        }
        let overlaps = elig.iter().zip(&blocked).any(|(e, b)| *e && *b);
        let attempt = if everything_kept {
            None
        } else if overlaps {
            let avail: Vec<bool> = elig.iter().zip(&blocked).map(|(e, b)| *e && !*b).collect();
            Some(place(snapshot, &avail, &w.shape, false))
        } else {
            Some(place(snapshot, &elig, &w.shape, false))
        };
        if let Some(Ok(nodes)) = attempt {
            for i in &nodes {
                snapshot.take_at(*i, &w.shape.request);
            }
            out.push((w.key.clone(), Verdict::Admit(nodes)));
            continue;
        }
        let position = wait_here();
        let ever = possible
            .entry((w.rules.clone(), w.shape.clone()))
            .or_insert_with(|| place(snapshot, &elig, &w.shape, true).map(drop))
            .clone();
        let (why, message) = match ever {
            Err(never) => (
                Wait::Never,
                if explained {
                    never_message(&w.shape, &never)
                } else {
                    String::new()
                },
            ),
            Ok(()) => {
                let reply = if explained {
                    // Would it fit now if nothing were kept for the gangs ahead?
                    let now = match attempt {
                        Some(r) if !overlaps => r,
                        _ => place(snapshot, &elig, &w.shape, false),
                    };
                    match (now, &head) {
                        (Ok(_), Some(ahead)) => (
                            Wait::Behind(ahead.clone()),
                            format!(
                                "it fits, but the capacity it could use is kept for {ahead}, \
                                 which is ahead in the queue (higher priority or older) and \
                                 waits for it"
                            ),
                        ),
                        (Ok(_), None) => (Wait::Capacity, "waiting for capacity".into()),
                        (Err(short), _) => (Wait::Capacity, capacity_message(&w.shape, &short)),
                    }
                } else {
                    (Wait::Capacity, String::new())
                };
                for (b, e) in blocked.iter_mut().zip(&elig) {
                    if *e && !*b {
                        *b = true;
                        blocked_count += 1;
                    }
                }
                head.get_or_insert_with(|| w.key.clone());
                reply
            }
        };
        out.push((
            w.key.clone(),
            Verdict::Waits {
                why,
                message,
                position,
            },
        ));
    }
    out
}

/// The resources that hold the gang back: those of which `free` has less than the gang needs
/// in all (when the totals would do and only the spread across nodes is wrong, every resource
/// the gang asks for).
fn limiting(shape: &Shape, free: &Res) -> Vec<String> {
    let asked = || {
        shape
            .request
            .0
            .iter()
            .filter(|(k, v)| k.as_str() != PODS && **v > 0)
            .map(|(k, _)| k.clone())
    };
    let short: Vec<String> = asked()
        .filter(|k| {
            free.get(k)
                < shape
                    .request
                    .get(k)
                    .saturating_mul(i64::from(shape.ranks()))
        })
        .collect();
    if short.is_empty() {
        asked().collect()
    } else {
        short
    }
}

fn only(res: &Res, keys: &[String]) -> Res {
    Res(keys
        .iter()
        .map(|k| (k.clone(), res.get(k).max(0)))
        .collect())
}

/// What the gang needs of `keys` in all: `16 nvidia.com/gpu (2 ranks x 8 nvidia.com/gpu)`.
fn need(shape: &Shape, keys: &[String]) -> String {
    let each = only(&shape.request, keys);
    let mut total = Res::default();
    total.add_times(&each, i64::from(shape.ranks()));
    format!("{total} ({} ranks x {each})", shape.ranks())
}

/// The free amounts of `keys`.
fn free_of(free: &Res, keys: &[String]) -> String {
    if keys.is_empty() {
        "no free pod slots".into()
    } else {
        format!("{} free", only(free, keys))
    }
}

fn capacity_message(shape: &Shape, short: &Shortfall) -> String {
    let ranks = |n: i64| {
        if n == 1 {
            "1 rank".to_string()
        } else {
            format!("{n} ranks")
        }
    };
    let keys = limiting(shape, &short.free);
    match (&shape.topology, &short.domain) {
        (Some((key, true)), Some(domain)) => format!(
            "needs {} in one {key} domain; the best, {domain}, has {} (room for {})",
            need(shape, &keys),
            free_of(&short.free, &keys),
            ranks(short.fit)
        ),
        (Some((key, true)), None) => format!(
            "needs {} in one {key} domain, and no node it may use has that label",
            need(shape, &keys)
        ),
        _ => format!(
            "needs {}; the {} nodes it may use have {} (room for {})",
            need(shape, &keys),
            short.nodes,
            free_of(&short.free, &keys),
            ranks(short.fit)
        ),
    }
}

fn never_message(shape: &Shape, short: &Shortfall) -> String {
    let keys = limiting(shape, &short.free);
    match (&shape.topology, &short.domain) {
        (Some((key, true)), Some(domain)) => format!(
            "can never be admitted on the current nodes: needs {} in one {key} domain, and the \
             largest, {domain}, holds {} ranks even when empty",
            need(shape, &keys),
            short.fit
        ),
        _ if short.nodes == 0 => format!(
            "can never be admitted on the current nodes: needs {}, and no node matches its \
             nodeSelector, affinity and tolerations (or every match is cordoned)",
            need(shape, &keys)
        ),
        _ => format!(
            "can never be admitted on the current nodes: needs {}, and the {} nodes it may use \
             hold {} ranks even when empty",
            need(shape, &keys),
            short.nodes,
            short.fit
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gang::snapshot::NodeInfo;
    use k8s_openapi::api::core::v1::Taint;
    use proptest::prelude::*;

    use crate::resources::GPU_RESOURCE as GPU;

    fn node(name: &str, gpus: i64, used: i64, rack: &str, tainted: bool) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            labels: std::sync::Arc::new([("rack".to_string(), rack.to_string())].into()),
            taints: std::sync::Arc::new(if tainted {
                vec![Taint {
                    key: "pool".into(),
                    value: Some("x".into()),
                    effect: "NoSchedule".into(),
                    ..Default::default()
                }]
            } else {
                vec![]
            }),
            schedulable: true,
            allocatable: Res([(GPU.into(), gpus * 1000), (PODS.into(), 110_000)].into()).into(),
            used: Res([(GPU.into(), used * 1000)].into()),
        }
    }

    fn gang(key: &str, priority: i32, created: i64, ranks: u32, gpus: i64) -> Waiting {
        Waiting {
            key: key.into(),
            priority,
            created,
            shape: Arc::new(Shape {
                replicas: ranks,
                stages: 1,
                request: Res([(GPU.into(), gpus * 1000), (PODS.into(), 1000)].into()),
                topology: None,
            }),
            rules: Arc::default(),
        }
    }

    fn verdict<'a>(out: &'a [(String, Verdict)], key: &str) -> &'a Verdict {
        &out.iter().find(|(k, _)| k == key).unwrap().1
    }

    #[test]
    fn two_gangs_of_six_on_eight_free_gpus_admit_one_and_explain_the_other() {
        let mut s = Snapshot::new(vec![
            node("a", 4, 0, "r", false),
            node("b", 4, 0, "r", false),
        ]);
        let mut q = vec![
            gang("ns/second", 0, 20, 6, 1),
            gang("ns/first", 0, 10, 6, 1),
        ];
        let out = cycle(&mut s, &mut q, Explain::All);
        assert!(matches!(verdict(&out, "ns/first"), Verdict::Admit(n) if n.len() == 6));
        let Verdict::Waits {
            why,
            message,
            position,
        } = verdict(&out, "ns/second")
        else {
            panic!("second admitted");
        };
        assert_eq!((why, *position), (&Wait::Capacity, 1));
        assert_eq!(
            message,
            "needs 6 nvidia.com/gpu (6 ranks x 1 nvidia.com/gpu); the 2 nodes it may use have \
             2 nvidia.com/gpu free (room for 2 ranks)"
        );
    }

    #[test]
    fn priority_beats_age_and_a_small_gang_cannot_jump_a_blocked_head() {
        let mut s = Snapshot::new(vec![
            node("a", 8, 4, "r", false),
            node("b", 8, 8, "r", false),
        ]);
        // 4 GPUs free. The high-priority gang needs 8 and waits; the small old gang would fit but
        // must not take the head's capacity.
        let mut q = vec![gang("ns/small", 0, 1, 2, 1), gang("ns/high", 100, 50, 8, 1)];
        let out = cycle(&mut s, &mut q, Explain::All);
        assert_eq!(out[0].0, "ns/high", "priority orders the queue");
        assert!(matches!(
            verdict(&out, "ns/high"),
            Verdict::Waits {
                why: Wait::Capacity,
                position: 1,
                ..
            }
        ));
        let Verdict::Waits { why, position, .. } = verdict(&out, "ns/small") else {
            panic!("the small gang jumped the head");
        };
        assert_eq!((why, *position), (&Wait::Behind("ns/high".into()), 2));
    }

    #[test]
    fn the_queue_position_counts_only_gangs_that_compete_for_the_same_nodes() {
        // Two racks, both full. A gang pinned to each rack waits at position 1 of its own rack's
        // queue; a gang that may use either rack waits behind both.
        let mut s = Snapshot::new(vec![
            node("a", 8, 8, "r1", false),
            node("b", 8, 8, "r2", false),
        ]);
        let pinned = |key: &str, created: i64, rack: &str| {
            let mut g = gang(key, 0, created, 2, 1);
            g.rules = Arc::new(NodeRules::of(
                &serde_json::from_value(serde_json::json!({
                    "containers": [], "nodeSelector": {"rack": rack}
                }))
                .unwrap(),
            ));
            g
        };
        let mut q = vec![
            pinned("ns/r1-first", 1, "r1"),
            pinned("ns/r2-first", 2, "r2"),
            pinned("ns/r1-second", 3, "r1"),
            gang("ns/anywhere", 0, 4, 2, 1),
        ];
        let out = cycle(&mut s, &mut q, Explain::All);
        let position = |key: &str| match verdict(&out, key) {
            Verdict::Waits { position, .. } => *position,
            Verdict::Admit(_) => panic!("{key} admitted onto full nodes"),
        };
        assert_eq!(position("ns/r1-first"), 1);
        assert_eq!(position("ns/r2-first"), 1);
        assert_eq!(position("ns/r1-second"), 2);
        assert_eq!(position("ns/anywhere"), 4);
    }

    #[test]
    fn backfill_uses_only_nodes_the_head_cannot_use() {
        // The head may only use untainted nodes (it has no toleration); a gang that tolerates the
        // taint may take the tainted node while the head waits.
        let mut s = Snapshot::new(vec![
            node("a", 8, 6, "r", false),
            node("t", 8, 0, "r", true),
        ]);
        let mut tolerant = gang("ns/tolerant", 0, 20, 4, 1);
        tolerant.rules = Arc::new(NodeRules::of(
            &serde_json::from_value(serde_json::json!({
                "containers": [], "tolerations": [{"key": "pool", "operator": "Exists"}]
            }))
            .unwrap(),
        ));
        let mut q = vec![gang("ns/head", 0, 10, 4, 1), tolerant];
        let out = cycle(&mut s, &mut q, Explain::All);
        assert!(matches!(verdict(&out, "ns/head"), Verdict::Waits { .. }));
        assert_eq!(verdict(&out, "ns/tolerant"), &Verdict::Admit(vec![1; 4]));
    }

    #[test]
    fn a_gang_that_can_never_fit_says_so_and_blocks_nobody() {
        let mut s = Snapshot::new(vec![
            node("a", 8, 0, "r1", false),
            node("b", 8, 0, "r2", false),
        ]);
        let mut huge = gang("ns/huge", 100, 1, 2, 8);
        Arc::make_mut(&mut huge.shape).topology = Some(("rack".into(), true));
        let mut q = vec![huge, gang("ns/small", 0, 5, 1, 8)];
        let out = cycle(&mut s, &mut q, Explain::All);
        let Verdict::Waits { why, message, .. } = verdict(&out, "ns/huge") else {
            panic!("placed across racks");
        };
        assert_eq!(why, &Wait::Never);
        assert!(message.contains("in one rack domain"), "{message}");
        assert!(matches!(verdict(&out, "ns/small"), Verdict::Admit(_)));
    }

    #[test]
    fn the_required_topology_message_names_the_best_domain() {
        let mut s = Snapshot::new(vec![
            node("a", 8, 0, "rack-1", false),
            node("b", 8, 4, "rack-1", false),
            node("c", 8, 8, "rack-2", false),
            node("d", 8, 0, "rack-2", false),
        ]);
        let mut g = gang("ns/g", 0, 1, 2, 8);
        Arc::make_mut(&mut g.shape).topology = Some(("rack".into(), true));
        let out = cycle(&mut s, &mut [g], Explain::All);
        let Verdict::Waits { message, .. } = &out[0].1 else {
            panic!("admitted")
        };
        assert_eq!(
            message,
            "needs 16 nvidia.com/gpu (2 ranks x 8 nvidia.com/gpu) in one rack domain; the best, \
             rack-1, has 12 nvidia.com/gpu free (room for 1 rank)"
        );
    }

    prop_compose! {
        fn arb_cluster()(nodes in prop::collection::vec((1i64..=8, 0i64..=8, 0usize..3, any::<bool>()), 1..12)) -> Snapshot {
            Snapshot::new(nodes.into_iter().enumerate().map(|(i, (gpus, used, rack, tainted))| {
                node(&format!("n{i:02}"), gpus, used.min(gpus), &format!("r{rack}"), tainted)
            }).collect())
        }
    }

    prop_compose! {
        fn arb_queue()(gangs in prop::collection::vec((0i32..3, 1u32..4, 1u32..3, 0i64..=8, 0u8..3, any::<bool>()), 0..10)) -> Vec<Waiting> {
            gangs.into_iter().enumerate().map(|(i, (prio, replicas, stages, gpus, topo, tolerant))| {
                let mut g = gang(&format!("ns/g{i}"), prio, i as i64, replicas, gpus);
                Arc::make_mut(&mut g.shape).stages = stages;
                Arc::make_mut(&mut g.shape).topology = match topo { 1 => Some(("rack".into(), true)), 2 => Some(("rack".into(), false)), _ => None };
                if tolerant {
                    Arc::make_mut(&mut g.rules).tolerations = NodeRules::of(&serde_json::from_value(serde_json::json!({
                        "containers": [], "tolerations": [{"key": "pool", "operator": "Exists"}]
                    })).unwrap()).tolerations;
                }
                g
            }).collect()
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Admission never oversubscribes a node, places every rank of an admitted gang on a node
        /// it may use (in one domain when required), and never lets a gang take a node that a
        /// waiting gang ahead of it could use.
        #[test]
        fn admission_never_oversubscribes_and_never_jumps_a_waiting_gang(
            mut s in arb_cluster(), mut q in arb_queue()
        ) {
            let before = s.clone();
            let out = cycle(&mut s, &mut q, Explain::All);
            let mut used: Vec<Res> = before.nodes.iter().map(|n| n.used.clone()).collect();
            let mut kept_for_ahead = vec![false; before.nodes.len()];
            for ((key, v), w) in out.iter().zip(q.iter()) {
                prop_assert_eq!(key, &w.key);
                let elig: Vec<bool> = before.nodes.iter().map(|n| w.rules.allow(n)).collect();
                match v {
                    Verdict::Admit(nodes) => {
                        prop_assert_eq!(nodes.len(), w.shape.ranks() as usize);
                        for i in nodes {
                            prop_assert!(elig[*i], "{} placed on a node it may not use", key);
                            prop_assert!(!kept_for_ahead[*i], "{} took a node kept for a gang ahead", key);
                            used[*i].add(&w.shape.request);
                        }
                        if let Some((k, true)) = &w.shape.topology {
                            let domain = &before.nodes[nodes[0]].labels[k];
                            prop_assert!(nodes.iter().all(|i| &before.nodes[*i].labels[k] == domain));
                        }
                    }
                    Verdict::Waits { why, .. } => {
                        if *why != Wait::Never {
                            for (k, e) in kept_for_ahead.iter_mut().zip(&elig) {
                                *k |= *e;
                            }
                        }
                    }
                }
            }
            for (n, u) in before.nodes.iter().zip(&used) {
                for (res, amount) in &u.0 {
                    prop_assert!(*amount <= n.allocatable.get(res), "{} oversubscribed on {}", n.name, res);
                }
            }
            // The head of the queue is admitted whenever it fits on its own.
            if let Some(first) = q.first() {
                let elig: Vec<bool> = before.nodes.iter().map(|n| first.rules.allow(n)).collect();
                let fits = place(&before, &elig, &first.shape, false).is_ok();
                prop_assert_eq!(fits, matches!(out[0].1, Verdict::Admit(_)));
            }
        }
    }
}
