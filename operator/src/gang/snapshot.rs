//! The cluster as admission sees it: every node's allocatable resources, what is already taken
//! on it (requests of bound pods that have not finished, plus reservations of admitted gangs whose
//! pods are not there yet), its labels, taints and whether it is cordoned; and which nodes a pod
//! template may use (nodeSelector, required node affinity, tolerations of NoSchedule and
//! NoExecute taints).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{
    Node, NodeSelectorRequirement, NodeSelectorTerm, PodSpec, Taint, Toleration,
};

use super::demand::Res;

/// One node.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    /// Node name.
    pub name: String,
    /// Its labels (shared: a snapshot is rebuilt for every decision, the labels rarely change).
    pub labels: Arc<BTreeMap<String, String>>,
    /// Taints a pod must tolerate to be scheduled there (effects NoSchedule and NoExecute).
    pub taints: Arc<Vec<Taint>>,
    /// False when cordoned.
    pub schedulable: bool,
    /// Allocatable resources.
    pub allocatable: Arc<Res>,
    /// What is taken.
    pub used: Res,
}

impl NodeInfo {
    /// The node as admission sees it, with nothing used yet.
    pub fn from_node(node: &Node) -> NodeInfo {
        let spec = node.spec.clone().unwrap_or_default();
        NodeInfo {
            name: node.metadata.name.clone().unwrap_or_default(),
            labels: Arc::new(node.metadata.labels.clone().unwrap_or_default()),
            taints: Arc::new(
                spec.taints
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
                    .collect(),
            ),
            schedulable: !spec.unschedulable.unwrap_or(false),
            allocatable: Arc::new(
                node.status
                    .as_ref()
                    .and_then(|s| s.allocatable.as_ref())
                    .map(Res::from_list)
                    .unwrap_or_default(),
            ),
            used: Res::default(),
        }
    }

    /// Whether `other` is the same node as admission reads it (name, labels, taints,
    /// schedulable, allocatable; `used` aside): a new version of a node that differs only in
    /// what admission does not read (its heartbeat, conditions, images) changes no decision.
    pub fn reads_the_same(&self, other: &NodeInfo) -> bool {
        self.name == other.name
            && self.schedulable == other.schedulable
            && self.labels == other.labels
            && self.taints == other.taints
            && self.allocatable == other.allocatable
    }
}

/// Every node, sorted by name, with a dense table of what each has allocatable and free of every
/// resource some node has: a placement looks at every node for every gang it tries, and at
/// 20,000 nodes looking the amounts up by name in each node's map took most of a decision.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The nodes. Their `used` changes only through [`Snapshot::take`] and
    /// [`Snapshot::take_at`], which keep the table in step.
    pub nodes: Vec<NodeInfo>,
    index: Arc<HashMap<String, usize>>,
    /// The resources of the table (every name in some node's allocatable), sorted.
    resources: Vec<String>,
    /// Allocatable, node by node (a row of `resources.len()` amounts each).
    allocatable: Vec<i64>,
    /// Allocatable minus used, in the same layout.
    free: Vec<i64>,
    /// The topology domains of the nodes by label key, made on first use and shared by the
    /// copies of this snapshot (the nodes are the same).
    domains: Arc<std::sync::Mutex<HashMap<String, Arc<Domains>>>>,
    /// What was taken since [`Snapshot::record`], to give back with [`Snapshot::undo`].
    journal: Option<Vec<(usize, Res)>>,
}

/// The domains of one topology key: their names, sorted, and the domain of every node (an
/// index into `names`; `None` for a node without the label).
#[derive(Debug, Default)]
pub struct Domains {
    /// The label values, sorted.
    pub names: Vec<String>,
    /// Node index -> its domain.
    pub of: Vec<Option<u32>>,
}

/// What one copy of a request asks for, as indices into a snapshot's table (`None`: a resource
/// no node has) with the amount; see [`Snapshot::want`].
#[derive(Clone, Debug)]
pub struct Want(Vec<(Option<usize>, i64)>);

impl Snapshot {
    /// A snapshot of these nodes.
    pub fn new(mut nodes: Vec<NodeInfo>) -> Snapshot {
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        let index = Arc::new(
            nodes
                .iter()
                .enumerate()
                .map(|(i, n)| (n.name.clone(), i))
                .collect(),
        );
        let mut resources: Vec<String> = nodes
            .iter()
            .flat_map(|n| n.allocatable.0.keys().cloned())
            .collect();
        resources.sort();
        resources.dedup();
        let mut allocatable = Vec::with_capacity(nodes.len() * resources.len());
        let mut free = Vec::with_capacity(nodes.len() * resources.len());
        for n in &nodes {
            for r in &resources {
                let a = n.allocatable.get(r);
                allocatable.push(a);
                free.push(a.saturating_sub(n.used.get(r)));
            }
        }
        Snapshot {
            nodes,
            index,
            resources,
            allocatable,
            free,
            domains: Arc::default(),
            journal: None,
        }
    }

    /// Records what is taken from now on, for [`Snapshot::undo`]: a decision takes what it
    /// reserves and admits from a snapshot kept for the next one, and gives it back after,
    /// instead of copying 20,000 nodes.
    pub fn record(&mut self) {
        self.journal = Some(Vec::new());
    }

    /// Gives back everything taken since [`Snapshot::record`], and stops recording.
    pub fn undo(&mut self) {
        for (i, request) in self.journal.take().into_iter().flatten().rev() {
            self.give_at(i, &request);
        }
    }

    /// The domains of the label `key` (see [`Domains`]).
    pub fn domains(&self, key: &str) -> Arc<Domains> {
        let mut cache = self.domains.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = cache.get(key) {
            return d.clone();
        }
        let mut names: Vec<String> = self
            .nodes
            .iter()
            .filter_map(|n| n.labels.get(key).cloned())
            .collect();
        names.sort();
        names.dedup();
        let of = self
            .nodes
            .iter()
            .map(|n| {
                let v = n.labels.get(key)?;
                names
                    .binary_search(v)
                    .ok()
                    .and_then(|i| u32::try_from(i).ok())
            })
            .collect();
        let d = Arc::new(Domains { names, of });
        cache.insert(key.to_string(), d.clone());
        d
    }

    /// The index of node `name`.
    pub fn find(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// Counts `request` as taken on node `name` (ignored for a node that is gone).
    pub fn take(&mut self, name: &str, request: &Res) {
        if let Some(i) = self.find(name) {
            self.take_at(i, request);
        }
    }

    /// Gives back `request` taken on node `name` by [`Snapshot::take`] (ignored for a node that
    /// is gone).
    pub fn give(&mut self, name: &str, request: &Res) {
        if let Some(i) = self.find(name) {
            self.give_at(i, request);
        }
    }

    fn give_at(&mut self, i: usize, request: &Res) {
        self.nodes[i].used.add_times(request, -1);
        let width = self.resources.len();
        for (k, v) in &request.0 {
            if let Ok(r) = self.resources.binary_search(k) {
                let f = &mut self.free[i * width + r];
                *f = f.saturating_add(*v);
            }
        }
    }

    /// Counts `request` as taken on the node at index `i`.
    pub fn take_at(&mut self, i: usize, request: &Res) {
        if let Some(journal) = self.journal.as_mut() {
            journal.push((i, request.clone()));
        }
        self.nodes[i].used.add(request);
        let width = self.resources.len();
        for (k, v) in &request.0 {
            if let Ok(r) = self.resources.binary_search(k) {
                let f = &mut self.free[i * width + r];
                *f = f.saturating_sub(*v);
            }
        }
    }

    /// `each` as indices into this snapshot's table, for [`Snapshot::copies`].
    pub fn want(&self, each: &Res) -> Want {
        Want(
            each.0
                .iter()
                .filter(|(_, v)| **v > 0)
                .map(|(k, v)| (self.resources.binary_search(k).ok(), *v))
                .collect(),
        )
    }

    /// How many copies of `want` fit on the node at index `i`: in what is free there, or in all
    /// it has when `empty`. The same as [`Res::copies`] of its allocatable and used.
    pub fn copies(&self, i: usize, want: &Want, empty: bool) -> i64 {
        let width = self.resources.len();
        let row = if empty {
            &self.allocatable[i * width..(i + 1) * width]
        } else {
            &self.free[i * width..(i + 1) * width]
        };
        let mut n = i64::MAX;
        for (r, amount) in &want.0 {
            let left = r.map_or(0, |r| row[r]);
            n = n.min(left.max(0) / amount);
        }
        n
    }
}

/// Where a pod may go: what the template says about nodes.
#[derive(Clone, Debug, Default, PartialEq, Hash, Eq)]
pub struct NodeRules {
    /// `spec.nodeSelector`.
    pub selector: BTreeMap<String, String>,
    /// Required node affinity terms (ORed); `None` when there is no required affinity.
    pub terms: Option<Vec<TermKey>>,
    /// Tolerations.
    pub tolerations: Vec<TolerationKey>,
}

/// A node selector term reduced to what matching needs (hashable, so rules can key a cache).
#[derive(Clone, Debug, Default, PartialEq, Hash, Eq)]
pub struct TermKey {
    /// Label requirements (ANDed).
    pub labels: Vec<(String, String, Vec<String>)>,
    /// Field requirements on `metadata.name` (ANDed).
    pub fields: Vec<(String, String, Vec<String>)>,
}

/// A toleration reduced to what matching needs.
#[derive(Clone, Debug, Default, PartialEq, Hash, Eq)]
pub struct TolerationKey {
    key: String,
    operator: String,
    value: String,
    effect: String,
}

fn requirement(r: &NodeSelectorRequirement) -> (String, String, Vec<String>) {
    (
        r.key.clone(),
        r.operator.clone(),
        r.values.clone().unwrap_or_default(),
    )
}

fn term(t: &NodeSelectorTerm) -> TermKey {
    TermKey {
        labels: t
            .match_expressions
            .iter()
            .flatten()
            .map(requirement)
            .collect(),
        fields: t.match_fields.iter().flatten().map(requirement).collect(),
    }
}

impl NodeRules {
    /// The rules of a pod spec.
    pub fn of(spec: &PodSpec) -> NodeRules {
        let required = spec
            .affinity
            .as_ref()
            .and_then(|a| a.node_affinity.as_ref())
            .and_then(|na| {
                na.required_during_scheduling_ignored_during_execution
                    .as_ref()
            });
        NodeRules {
            selector: spec.node_selector.clone().unwrap_or_default(),
            terms: required.map(|r| r.node_selector_terms.iter().map(term).collect()),
            tolerations: spec
                .tolerations
                .iter()
                .flatten()
                .map(|t: &Toleration| TolerationKey {
                    key: t.key.clone().unwrap_or_default(),
                    operator: t.operator.clone().unwrap_or_else(|| "Equal".into()),
                    value: t.value.clone().unwrap_or_default(),
                    effect: t.effect.clone().unwrap_or_default(),
                })
                .collect(),
        }
    }

    /// Whether a pod with these rules may be placed on `node` (cordons included).
    pub fn allow(&self, node: &NodeInfo) -> bool {
        node.schedulable
            && self
                .selector
                .iter()
                .all(|(k, v)| node.labels.get(k) == Some(v))
            && self
                .terms
                .as_ref()
                .is_none_or(|terms| terms.iter().any(|t| term_matches(t, node)))
            && node
                .taints
                .iter()
                .all(|taint| self.tolerations.iter().any(|t| tolerates(t, taint)))
    }
}

fn term_matches(t: &TermKey, node: &NodeInfo) -> bool {
    // An empty term matches no node.
    if t.labels.is_empty() && t.fields.is_empty() {
        return false;
    }
    t.labels
        .iter()
        .all(|(k, op, vs)| matches(op, node.labels.get(k).map(String::as_str), vs))
        && t.fields
            .iter()
            .all(|(k, op, vs)| k == "metadata.name" && matches(op, Some(node.name.as_str()), vs))
}

fn matches(op: &str, value: Option<&str>, values: &[String]) -> bool {
    let number = |s: &str| s.parse::<i64>().ok();
    match op {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(bound)) = (
                value.and_then(number),
                values.first().and_then(|b| number(b)),
            ) else {
                return false;
            };
            if op == "Gt" { v > bound } else { v < bound }
        }
        _ => false,
    }
}

fn tolerates(t: &TolerationKey, taint: &Taint) -> bool {
    if !t.effect.is_empty() && t.effect != taint.effect {
        return false;
    }
    match t.operator.as_str() {
        "Exists" => t.key.is_empty() || t.key == taint.key,
        _ => t.key == taint.key && Some(&t.value) == taint.value.as_ref().or(Some(&String::new())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(pairs: &[(&str, i64)]) -> Res {
        Res(pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect())
    }

    fn gpu_node(name: &str, rack: Option<&str>, gpus: i64, used: i64) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            labels: Arc::new(
                rack.map(|r| ("rack".to_string(), r.to_string()))
                    .into_iter()
                    .collect(),
            ),
            taints: Arc::default(),
            schedulable: true,
            allocatable: Arc::new(res(&[
                ("nvidia.com/gpu", gpus),
                ("cpu", 8000),
                ("pods", 110),
            ])),
            used: res(&[("nvidia.com/gpu", used), ("cpu", 1000), ("pods", 1)]),
        }
    }

    #[test]
    fn the_table_counts_copies_as_the_maps_do_and_undo_gives_back_what_was_taken() {
        let mut s = Snapshot::new(vec![
            gpu_node("b", Some("r2"), 8, 3),
            gpu_node("a", Some("r1"), 4, 0),
            gpu_node("c", None, 2, 2),
        ]);
        let asks = [
            res(&[("nvidia.com/gpu", 2), ("cpu", 500), ("pods", 1)]),
            res(&[("cpu", 3000), ("pods", 1)]),
            res(&[("example.com/fpga", 1), ("pods", 1)]),
            res(&[("nvidia.com/gpu", 0), ("pods", 1)]),
        ];
        let check = |s: &Snapshot| {
            for each in &asks {
                let want = s.want(each);
                for (i, n) in s.nodes.iter().enumerate() {
                    assert_eq!(
                        s.copies(i, &want, false),
                        Res::copies(&n.allocatable, &n.used, each),
                        "{} {each:?}",
                        n.name
                    );
                    assert_eq!(
                        s.copies(i, &want, true),
                        Res::copies(&n.allocatable, &Res::default(), each),
                    );
                }
            }
        };
        check(&s);
        let before: Vec<i64> = (0..3)
            .map(|i| s.copies(i, &s.want(&asks[0]), false))
            .collect();
        assert_eq!(before, vec![2, 2, 0], "a: 4 free, b: 5 free, c: none");
        s.record();
        s.take("b", &asks[0]);
        s.take_at(0, &asks[0]);
        check(&s);
        assert_eq!(s.copies(1, &s.want(&asks[0]), false), 1, "b: 3 GPUs left");
        s.undo();
        check(&s);
        let after: Vec<i64> = (0..3)
            .map(|i| s.copies(i, &s.want(&asks[0]), false))
            .collect();
        assert_eq!(after, before);
        // Taken outside a record stays taken; so does a give without a take (a pod that went).
        s.take("a", &asks[0]);
        s.undo();
        assert_eq!(s.copies(0, &s.want(&asks[0]), false), 1);
        s.give("a", &asks[0]);
        assert_eq!(s.copies(0, &s.want(&asks[0]), false), 2);
        check(&s);
    }

    #[test]
    fn domains_are_sorted_and_each_node_has_its_own() {
        let s = Snapshot::new(vec![
            gpu_node("n3", Some("r2"), 8, 0),
            gpu_node("n1", Some("r10"), 8, 0),
            gpu_node("n2", None, 8, 0),
            gpu_node("n4", Some("r2"), 8, 0),
        ]);
        let d = s.domains("rack");
        assert_eq!(d.names, vec!["r10".to_string(), "r2".to_string()]);
        // Nodes in name order: n1, n2, n3, n4.
        assert_eq!(d.of, vec![Some(0), None, Some(1), Some(1)]);
        assert!(
            Arc::ptr_eq(&d, &s.clone().domains("rack")),
            "shared by copies"
        );
        assert!(s.domains("zone").names.is_empty());
    }

    fn node(name: &str, labels: &[(&str, &str)], taints: &[(&str, &str, &str)]) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            labels: Arc::new(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            taints: Arc::new(
                taints
                    .iter()
                    .map(|(k, v, e)| Taint {
                        key: k.to_string(),
                        value: Some(v.to_string()),
                        effect: e.to_string(),
                        ..Default::default()
                    })
                    .collect(),
            ),
            schedulable: true,
            allocatable: Default::default(),
            used: Res::default(),
        }
    }

    fn rules(spec: serde_json::Value) -> NodeRules {
        let mut v = spec;
        v["containers"] = serde_json::json!([]);
        NodeRules::of(&serde_json::from_value(v).unwrap())
    }

    #[test]
    fn selector_affinity_taints_and_cordons_decide_where_a_pod_may_go() {
        let plain = node("a", &[("rack", "r1"), ("gpus", "8")], &[]);
        let tainted = node("b", &[("rack", "r2")], &[("dedicated", "ml", "NoSchedule")]);
        let none = rules(serde_json::json!({}));
        assert!(none.allow(&plain));
        assert!(!none.allow(&tainted), "an untolerated NoSchedule taint");
        let tolerant = rules(serde_json::json!({"tolerations": [
            {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]}));
        assert!(tolerant.allow(&tainted));
        let wrong_value = rules(serde_json::json!({"tolerations": [
            {"key": "dedicated", "value": "web"}]}));
        assert!(!wrong_value.allow(&tainted));
        let everything = rules(serde_json::json!({"tolerations": [{"operator": "Exists"}]}));
        assert!(everything.allow(&tainted));

        let selector = rules(serde_json::json!({"nodeSelector": {"rack": "r1"}}));
        assert!(selector.allow(&plain));
        let affinity = |expr: serde_json::Value| {
            rules(serde_json::json!({"affinity": {"nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [expr]}}}}))
        };
        let r1 = affinity(serde_json::json!({"matchExpressions": [
            {"key": "rack", "operator": "In", "values": ["r1", "r3"]}]}));
        assert!(r1.allow(&plain));
        let big = affinity(serde_json::json!({"matchExpressions": [
            {"key": "gpus", "operator": "Gt", "values": ["4"]}]}));
        assert!(big.allow(&plain));
        let by_name = affinity(serde_json::json!({"matchFields": [
            {"key": "metadata.name", "operator": "In", "values": ["z"]}]}));
        assert!(!by_name.allow(&plain));
        let empty_term = affinity(serde_json::json!({}));
        assert!(!empty_term.allow(&plain), "an empty term matches nothing");

        let mut cordoned = plain.clone();
        cordoned.schedulable = false;
        assert!(!none.allow(&cordoned));
    }
}
