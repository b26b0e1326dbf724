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
}

/// Every node, sorted by name.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The nodes.
    pub nodes: Vec<NodeInfo>,
    index: HashMap<String, usize>,
}

impl Snapshot {
    /// A snapshot of these nodes.
    pub fn new(mut nodes: Vec<NodeInfo>) -> Snapshot {
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        let index = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.clone(), i))
            .collect();
        Snapshot { nodes, index }
    }

    /// The index of node `name`.
    pub fn find(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// Counts `request` as taken on node `name` (ignored for a node that is gone).
    pub fn take(&mut self, name: &str, request: &Res) {
        if let Some(i) = self.find(name) {
            self.nodes[i].used.add(request);
        }
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
