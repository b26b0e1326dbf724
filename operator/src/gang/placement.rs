//! Placing one gang: every rank onto a node at once, or nothing.
//!
//! - Ranks are packed onto as few nodes as possible: the nodes that hold the most ranks first, and
//!   for the last ranks the node that fits them most tightly (best fit), so that large holes stay
//!   free for large gangs.
//! - With a topology key, `Required` puts the whole gang into one domain (the one that needs the
//!   fewest nodes, then the tightest fit); `Preferred` does that when a domain can hold the gang,
//!   and otherwise fills the domains with the most room first, so the gang spans as few domains as
//!   it can. A node without the label is in no domain (`Required`) or a domain of its own
//!   (`Preferred`).
//! - Ranks are laid out replica by replica, each replica's pipeline stages in stage order, so that
//!   neighbouring stages of a pipeline share a node (or at least a domain) where possible.

use super::demand::Res;
use super::snapshot::Snapshot;

/// What one gang asks for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    /// Data-parallel replicas.
    pub replicas: u32,
    /// Pipeline stages per replica (world size = replicas x stages).
    pub stages: u32,
    /// What each rank's pod asks for.
    pub request: Res,
    /// Topology constraint: the node label naming the domain, and whether it is required.
    pub topology: Option<(String, bool)>,
}

impl Shape {
    /// World size.
    pub fn ranks(&self) -> u32 {
        self.replicas * self.stages
    }
}

/// Why a gang does not fit: the best that can be done.
#[derive(Clone, Debug, PartialEq)]
pub struct Shortfall {
    /// Ranks that fit in the best candidate (one domain for a required topology, else all
    /// eligible nodes).
    pub fit: i64,
    /// The best domain, for a required topology.
    pub domain: Option<String>,
    /// Resources free in the best candidate.
    pub free: Res,
    /// Eligible nodes in the best candidate.
    pub nodes: usize,
}

/// Places a gang on the nodes of `snapshot` that `eligible` allows; with `empty`, as if nothing
/// were used (to tell a gang that must wait from one that can never fit). Returns the node index
/// of every rank.
pub fn place(
    snapshot: &Snapshot,
    eligible: &[bool],
    shape: &Shape,
    empty: bool,
) -> Result<Vec<usize>, Shortfall> {
    let ranks = i64::from(shape.ranks());
    let want = snapshot.want(&shape.request);
    let fits: Vec<(usize, i64)> = (0..snapshot.nodes.len())
        .filter(|i| eligible[*i])
        .map(|i| (i, snapshot.copies(i, &want, empty)))
        .collect();
    let free_of = |nodes: &[(usize, i64)]| {
        let mut free = Res::default();
        for (i, _) in nodes {
            let n = &snapshot.nodes[*i];
            free.add(&n.allocatable);
            if !empty {
                free.add_times(&n.used, -1);
            }
        }
        free
    };
    let Some((key, required)) = &shape.topology else {
        return match choose(&fits, ranks) {
            Some(chosen) => Ok(assign(shape, &chosen)),
            None => Err(Shortfall {
                fit: fits.iter().map(|f| f.1).sum(),
                domain: None,
                free: free_of(&fits),
                nodes: fits.len(),
            }),
        };
    };
    // The domains in name order (as a map by name would hold them): nodes without the label
    // first, one domain each (named after the node, behind a NUL no label value holds), then
    // the labelled ones, from the snapshot's index of the key (looking the label up on every
    // node for every gang took most of a decision at 20,000 nodes).
    let index = snapshot.domains(key);
    let mut labelled: Vec<Fits> = vec![Vec::new(); index.names.len()];
    let mut domains: Vec<(std::borrow::Cow<'_, str>, Fits)> = Vec::new();
    for &(i, fit) in &fits {
        match index.of[i] {
            Some(d) => labelled[d as usize].push((i, fit)),
            None if !required => domains.push((
                std::borrow::Cow::Owned(format!("\0{}", snapshot.nodes[i].name)),
                vec![(i, fit)],
            )),
            None => {}
        }
    }
    domains.extend(
        index
            .names
            .iter()
            .zip(labelled)
            .filter(|(_, nodes)| !nodes.is_empty())
            .map(|(name, nodes)| (std::borrow::Cow::Borrowed(name.as_str()), nodes)),
    );
    // One domain that holds the whole gang: fewest nodes, then the least room left, then name.
    let best = domains
        .iter()
        .map(|(name, nodes)| (name, nodes))
        .filter_map(|(name, nodes)| {
            let total: i64 = nodes.iter().map(|n| n.1).sum();
            let chosen = choose(nodes, ranks)?;
            Some(((chosen.len(), total - ranks, name.clone()), chosen))
        })
        .min_by(|a, b| a.0.cmp(&b.0));
    if let Some((_, chosen)) = best {
        return Ok(assign(shape, &chosen));
    }
    if *required {
        let (domain, nodes) = domains
            .iter()
            .max_by_key(|(name, nodes)| {
                (
                    nodes.iter().map(|n| n.1).sum::<i64>(),
                    std::cmp::Reverse((*name).clone()),
                )
            })
            .map(|(d, n)| (Some(d.to_string()), n.clone()))
            .unwrap_or_default();
        return Err(Shortfall {
            fit: nodes.iter().map(|n| n.1).sum(),
            domain,
            free: free_of(&nodes),
            nodes: nodes.len(),
        });
    }
    // Preferred, and no domain is big enough: the roomiest domains first.
    let mut order: Vec<(i64, &std::borrow::Cow<'_, str>, &Fits)> = domains
        .iter()
        .map(|(name, nodes)| (name, nodes))
        .map(|(name, nodes)| (nodes.iter().map(|n| n.1).sum(), name, nodes))
        .collect();
    order.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    let mut chosen = Vec::new();
    let mut left = ranks;
    for (_, _, nodes) in order {
        if left <= 0 {
            break;
        }
        let mut nodes = nodes.clone();
        nodes.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        for (i, fit) in nodes {
            if left <= 0 {
                break;
            }
            if fit > 0 {
                chosen.push((i, fit.min(left)));
                left -= fit;
            }
        }
    }
    if left > 0 {
        return Err(Shortfall {
            fit: fits.iter().map(|f| f.1).sum(),
            domain: None,
            free: free_of(&fits),
            nodes: fits.len(),
        });
    }
    Ok(assign(shape, &chosen))
}

/// (node index, ranks it holds) of some nodes.
type Fits = Vec<(usize, i64)>;

/// The fewest nodes that hold `ranks`, as (node, ranks on it): the roomiest first, and the
/// tightest fit for the last ones; `None` when they do not hold `ranks` together.
fn choose(fits: &[(usize, i64)], ranks: i64) -> Option<Vec<(usize, i64)>> {
    let mut sorted: Vec<(usize, i64)> = fits.iter().copied().filter(|f| f.1 > 0).collect();
    if sorted.iter().map(|f| f.1).sum::<i64>() < ranks {
        return None;
    }
    // Roomiest first; ties by node order, so the choice is deterministic.
    sorted.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut chosen = Vec::new();
    let mut left = ranks;
    let mut start = 0;
    while left > 0 {
        let rest = &sorted[start..];
        // The last (smallest) node that still holds all that is left, if any.
        let holds = rest.partition_point(|f| f.1 >= left);
        if holds > 0 {
            let pick = rest[..holds]
                .iter()
                .filter(|f| f.1 == rest[holds - 1].1)
                .min_by_key(|f| f.0)
                .copied()?;
            chosen.push((pick.0, left));
            return Some(chosen);
        }
        let (i, fit) = rest[0];
        chosen.push((i, fit));
        left -= fit;
        start += 1;
    }
    Some(chosen)
}

/// Gives each rank a node: `chosen` holds (node, how many ranks), filled in that order with the
/// ranks replica by replica, stages in order within a replica.
fn assign(shape: &Shape, chosen: &[(usize, i64)]) -> Vec<usize> {
    let mut nodes = vec![0; shape.ranks() as usize];
    let mut slots = chosen
        .iter()
        .flat_map(|(i, n)| std::iter::repeat_n(*i, usize::try_from(*n).unwrap_or(0)));
    for replica in 0..shape.replicas {
        for stage in 0..shape.stages {
            let rank = (stage * shape.replicas + replica) as usize;
            nodes[rank] = slots.next().unwrap_or(0);
        }
    }
    nodes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gang::demand::PODS;
    use crate::gang::snapshot::NodeInfo;

    use crate::resources::GPU_RESOURCE as GPU;

    fn res(gpus: i64) -> Res {
        Res([(GPU.to_string(), gpus * 1000), (PODS.to_string(), 110_000)].into())
    }

    fn cluster(free: &[(i64, &str)]) -> Snapshot {
        Snapshot::new(
            free.iter()
                .enumerate()
                .map(|(i, (gpus_free, rack))| NodeInfo {
                    name: format!("n{i}"),
                    labels: std::sync::Arc::new([("rack".to_string(), rack.to_string())].into()),
                    taints: Default::default(),
                    schedulable: true,
                    allocatable: res(8).into(),
                    used: Res([(GPU.to_string(), (8 - gpus_free) * 1000)].into()),
                })
                .collect(),
        )
    }

    fn shape(replicas: u32, stages: u32, gpus: i64, topology: Option<(&str, bool)>) -> Shape {
        Shape {
            replicas,
            stages,
            request: Res([(GPU.to_string(), gpus * 1000), (PODS.to_string(), 1000)].into()),
            topology: topology.map(|(k, r)| (k.to_string(), r)),
        }
    }

    fn all(s: &Snapshot) -> Vec<bool> {
        vec![true; s.nodes.len()]
    }

    #[test]
    fn ranks_pack_onto_the_fewest_nodes_and_the_tightest_hole() {
        // Free GPUs: 8, 3, 8, 4, 2.
        let s = cluster(&[(8, "a"), (3, "a"), (8, "b"), (4, "b"), (2, "b")]);
        // 12 ranks of 1 GPU: one full node, then the tightest node that holds 4 (n3, not n2).
        let p = place(&s, &all(&s), &shape(12, 1, 1, None), false).unwrap();
        let on = |n: usize| p.iter().filter(|x| **x == n).count();
        assert_eq!((on(0), on(3)), (8, 4), "{p:?}");
        // 2 ranks of 1: the tightest single node (n4 with 2 free).
        let p = place(&s, &all(&s), &shape(2, 1, 1, None), false).unwrap();
        assert_eq!(p, vec![4, 4]);
        // 26 ranks of 1 GPU: only 25 free.
        let e = place(&s, &all(&s), &shape(26, 1, 1, None), false).unwrap_err();
        assert_eq!((e.fit, e.nodes, e.free.get(GPU)), (25, 5, 25_000));
        // On an empty cluster it fits.
        assert!(place(&s, &all(&s), &shape(26, 1, 1, None), true).is_ok());
    }

    #[test]
    fn required_topology_keeps_the_gang_in_one_domain_or_nowhere() {
        let s = cluster(&[(8, "a"), (4, "a"), (6, "b"), (6, "b"), (8, "c")]);
        // 12 GPUs: rack a (12 free, 2 nodes) and rack b (12, 2 nodes) both hold it; a wins on name
        // with equal node counts and equal slack.
        let p = place(&s, &all(&s), &shape(12, 1, 1, Some(("rack", true))), false).unwrap();
        assert!(p.iter().all(|n| *n == 0 || *n == 1), "{p:?}");
        // 16 GPUs in one rack: no rack has more than 12 free.
        let e = place(&s, &all(&s), &shape(16, 1, 1, Some(("rack", true))), false).unwrap_err();
        assert_eq!(e.fit, 12);
        assert_eq!(e.domain.as_deref(), Some("a"), "ties go to the first name");
        assert_eq!(e.free.get(GPU), 12_000);
        // Preferred spreads over the roomiest racks instead.
        let p = place(&s, &all(&s), &shape(16, 1, 1, Some(("rack", false))), false).unwrap();
        assert_eq!(p.len(), 16);
        // A node without the label is in no domain for Required.
        let mut s2 = cluster(&[(8, "a")]);
        s2.nodes[0].labels = Default::default();
        assert!(place(&s2, &all(&s2), &shape(1, 1, 1, Some(("rack", true))), false).is_err());
        assert!(
            place(
                &s2,
                &all(&s2),
                &shape(1, 1, 1, Some(("rack", false))),
                false
            )
            .is_ok()
        );
    }

    #[test]
    fn neighbouring_pipeline_stages_share_a_node() {
        // 4 replicas x 4 stages of 2 GPUs: 4 nodes of 8 GPUs, one replica's pipeline per node.
        let s = cluster(&[(8, "a"), (8, "a"), (8, "a"), (8, "a")]);
        let sh = shape(4, 4, 2, None);
        let p = place(&s, &all(&s), &sh, false).unwrap();
        for replica in 0..4u32 {
            let nodes: Vec<usize> = (0..4u32)
                .map(|stage| p[(stage * 4 + replica) as usize])
                .collect();
            assert!(
                nodes.iter().all(|n| *n == nodes[0]),
                "replica {replica}: {nodes:?}"
            );
        }
    }

    #[test]
    fn ineligible_nodes_are_never_used() {
        let s = cluster(&[(8, "a"), (8, "a")]);
        let p = place(&s, &[false, true], &shape(8, 1, 1, None), false).unwrap();
        assert!(p.iter().all(|n| *n == 1));
        assert!(place(&s, &[false, true], &shape(9, 1, 1, None), false).is_err());
    }
}
