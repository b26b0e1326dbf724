//! Temporal graphs: a stream of timestamped events `(src, dst, t, features)` for link
//! prediction, read from three formats, split chronologically, and the most-recent-k neighbour
//! lists a memory-based dynamic GNN reads.
//!
//! Formats (told apart by the first line):
//! - SNAP temporal edges (CollegeMsg): `src dst t` a line, whitespace-separated; no features.
//! - SNAP signed ratings (bitcoin-otc): a header starting `#`, then `src,dst,rating,t`; the
//!   rating (-10..10) is the one edge feature, divided by 10.
//! - JODIE CSV (Wikipedia, Reddit, MOOC, LastFM): a header, then
//!   `user,item,timestamp,state_label,features...`; users and items are two node sets (items
//!   numbered after the users) and negatives are drawn among the items.
//!
//! Node ids are renumbered densely in order of first appearance (JODIE: users, then items).
//! Events are sorted by time (stably; out-of-order lines are counted and logged); a malformed
//! line is refused with its number. The split is chronological, 70% / 15% / 15% of the events,
//! never cutting between events of the same timestamp.

use std::collections::HashMap;

use super::bad;
use crate::error::WorkError;

/// The events of a temporal graph, sorted by time.
#[derive(Clone, Debug, PartialEq)]
pub struct TemporalGraph {
    /// Source node of each event.
    pub src: Vec<u32>,
    /// Destination node of each event.
    pub dst: Vec<u32>,
    /// Time of each event (the file's unit, seconds for the SNAP sets).
    pub t: Vec<f64>,
    /// Edge features, `edge_dim` per event.
    pub feat: Vec<f32>,
    /// Features per event.
    pub edge_dim: usize,
    /// Nodes (ids are `0..num_nodes`).
    pub num_nodes: usize,
    /// Events `0..train_end` train, `train_end..val_end` validate, the rest test.
    pub train_end: usize,
    /// End of the validation events.
    pub val_end: usize,
    /// Negative destinations are drawn from `neg_range` (every node, or the items of a
    /// bipartite JODIE set).
    pub neg_range: (u32, u32),
    /// Whether each node appears in no training event (the inductive setting's new nodes).
    pub unseen: Vec<bool>,
    /// The format read (for the log).
    pub format: &'static str,
    /// Lines that were out of time order and sorted into place.
    pub reordered: usize,
}

impl TemporalGraph {
    /// Reads `path` (`.gz` decompressed).
    pub fn load(path: &str) -> Result<Self, WorkError> {
        let text = super::read_text(path)?;
        let g = Self::parse(&text, path)?;
        if g.reordered > 0 {
            tracing::warn!(
                path,
                lines = g.reordered,
                "events out of time order were sorted into place"
            );
        }
        Ok(g)
    }

    /// Number of events.
    pub fn len(&self) -> usize {
        self.t.len()
    }

    /// Whether there are no events.
    pub fn is_empty(&self) -> bool {
        self.t.is_empty()
    }

    /// Whether event `i` touches a node no training event touches.
    pub fn inductive(&self, i: usize) -> bool {
        self.unseen[self.src[i] as usize] || self.unseen[self.dst[i] as usize]
    }

    /// Parses `text` read from `path` (named in errors).
    pub fn parse(text: &str, path: &str) -> Result<Self, WorkError> {
        let mut lines = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim()))
            .filter(|(_, l)| !l.is_empty());
        let Some((first_no, first)) = lines.next() else {
            return Err(bad(format!("{path} holds no events")));
        };
        let line_err = |no: usize, line: &str, why: String| {
            let shown: String = line.chars().take(80).collect();
            bad(format!("{path} line {no}: {why}: {shown:?}"))
        };
        let mut ids: HashMap<(u8, u64), u32> = HashMap::new();
        let mut raw: Vec<(u32, u32, f64, Vec<f32>)> = Vec::new();
        let mut id = |set: u8, v: u64| {
            let n = ids.len() as u32;
            *ids.entry((set, v)).or_insert(n)
        };
        let format;
        let mut edge_dim = 0;
        let mut bipartite = false;
        let num = |no: usize, line: &str, field: &str, what: &str| -> Result<f64, WorkError> {
            field
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| line_err(no, line, format!("{what} {field:?} is not a number")))
        };
        let node = |no: usize, line: &str, field: &str, what: &str| -> Result<u64, WorkError> {
            field
                .trim()
                .parse::<u64>()
                .map_err(|_| line_err(no, line, format!("{what} {field:?} is not a node id")))
        };
        if first.starts_with('#') {
            format = "bitcoin (src,dst,rating,t)";
            edge_dim = 1;
            for (no, line) in lines {
                let f: Vec<&str> = line.split(',').collect();
                if f.len() != 4 {
                    return Err(line_err(
                        no,
                        line,
                        format!("{} fields, expected 4 (src,dst,rating,t)", f.len()),
                    ));
                }
                let (s, d) = (
                    node(no, line, f[0], "source")?,
                    node(no, line, f[1], "target")?,
                );
                let rating = num(no, line, f[2], "rating")?;
                let t = num(no, line, f[3], "time")?;
                raw.push((id(0, s), id(0, d), t, vec![(rating / 10.0) as f32]));
            }
        } else if first.contains(',') {
            format = "JODIE (user,item,timestamp,state_label,features)";
            bipartite = true;
            let header: Vec<&str> = first.split(',').collect();
            if header.len() < 4 || header[0].trim().parse::<f64>().is_ok() {
                return Err(line_err(
                    first_no,
                    first,
                    "a JODIE CSV starts with a header line \
                     (user_id,item_id,timestamp,state_label,features...)"
                        .into(),
                ));
            }
            // The file's user and item ids of each event, renumbered below.
            let mut pairs: Vec<(u64, u64)> = Vec::new();
            for (no, line) in lines {
                let f: Vec<&str> = line.split(',').collect();
                if f.len() < 4 {
                    return Err(line_err(
                        no,
                        line,
                        format!(
                            "{} fields, expected user,item,timestamp,state_label,...",
                            f.len()
                        ),
                    ));
                }
                if raw.is_empty() {
                    edge_dim = f.len() - 4;
                } else if f.len() - 4 != edge_dim {
                    return Err(line_err(
                        no,
                        line,
                        format!("{} features, the first event has {edge_dim}", f.len() - 4),
                    ));
                }
                let (u, i) = (node(no, line, f[0], "user")?, node(no, line, f[1], "item")?);
                let t = num(no, line, f[2], "timestamp")?;
                let feat = f[4..]
                    .iter()
                    .map(|x| num(no, line, x, "feature").map(|v| v as f32))
                    .collect::<Result<Vec<_>, _>>()?;
                pairs.push((u, i));
                raw.push((0, 0, t, feat));
            }
            // Users first (dense, by first appearance), then items.
            let mut user_ids: HashMap<u64, u32> = HashMap::new();
            for &(u, _) in &pairs {
                let n = user_ids.len() as u32;
                user_ids.entry(u).or_insert(n);
            }
            let nu = user_ids.len() as u32;
            let mut item_ids: HashMap<u64, u32> = HashMap::new();
            for (e, (u, i)) in raw.iter_mut().zip(&pairs) {
                e.0 = user_ids[u];
                let n = item_ids.len() as u32;
                e.1 = nu + *item_ids.entry(*i).or_insert(n);
            }
            ids = (0..nu + item_ids.len() as u32)
                .map(|i| ((2, u64::from(i)), i))
                .collect();
        } else {
            format = "SNAP temporal edges (src dst t)";
            for (no, line) in std::iter::once((first_no, first)).chain(lines) {
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() != 3 {
                    return Err(line_err(
                        no,
                        line,
                        format!("{} fields, expected 3 (src dst t)", f.len()),
                    ));
                }
                let (s, d) = (
                    node(no, line, f[0], "source")?,
                    node(no, line, f[1], "target")?,
                );
                let t = num(no, line, f[2], "time")?;
                raw.push((id(0, s), id(0, d), t, Vec::new()));
            }
        }
        if raw.len() < 10 {
            return Err(bad(format!(
                "{path} holds {} events: a temporal graph needs at least 10 (70/15/15 split)",
                raw.len()
            )));
        }
        let reordered = raw.windows(2).filter(|w| w[1].2 < w[0].2).count();
        raw.sort_by(|a, b| a.2.total_cmp(&b.2));
        let num_nodes = ids.len();
        let n = raw.len();
        let cut = |share: f64| {
            let mut i = ((n as f64) * share).round() as usize;
            while i < n && i > 0 && raw[i].2 == raw[i - 1].2 {
                i += 1;
            }
            i
        };
        let (train_end, val_end) = (cut(0.70), cut(0.85));
        // Cuts move past ties: timestamps as coarse as the split leave a part empty.
        if train_end >= val_end || val_end >= n {
            let part = if train_end >= val_end {
                "validation"
            } else {
                "test"
            };
            return Err(bad(format!(
                "{path}: the {part} part is empty: the 70% and 85% cuts move past events of the \
                 same timestamp, and {} of the {n} events share the timestamp at the cut; a \
                 temporal graph needs finer timestamps",
                n - train_end.min(val_end)
            )));
        }
        let mut unseen = vec![true; num_nodes];
        for e in &raw[..train_end] {
            unseen[e.0 as usize] = false;
            unseen[e.1 as usize] = false;
        }
        let neg_range = if bipartite {
            let lo = raw.iter().map(|e| e.1).min().unwrap_or(0);
            (lo, num_nodes as u32 - 1)
        } else {
            (0, num_nodes as u32 - 1)
        };
        let mut g = Self {
            src: Vec::with_capacity(n),
            dst: Vec::with_capacity(n),
            t: Vec::with_capacity(n),
            feat: Vec::with_capacity(n * edge_dim),
            edge_dim,
            num_nodes,
            train_end,
            val_end,
            neg_range,
            unseen,
            format,
            reordered,
        };
        for (s, d, t, f) in raw {
            g.src.push(s);
            g.dst.push(d);
            g.t.push(t);
            g.feat.extend(f);
        }
        Ok(g)
    }
}

/// One neighbour of a node: the other endpoint, the event's time and the event.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Neighbor {
    /// The other endpoint.
    pub node: u32,
    /// The event's time.
    pub t: f64,
    /// The event's index.
    pub event: u32,
}

/// The `k` most recent neighbours of every node, from the events inserted so far (so never
/// from the future of what is inserted): a ring per node.
#[derive(Clone, Debug, PartialEq)]
pub struct Neighbors {
    k: usize,
    ring: Vec<Neighbor>,
    /// Events inserted per node (the ring's write position is this modulo `k`).
    count: Vec<u64>,
}

impl Neighbors {
    /// Empty lists of `k` for `nodes` nodes.
    pub fn new(nodes: usize, k: usize) -> Self {
        let none = Neighbor {
            node: 0,
            t: 0.0,
            event: 0,
        };
        Self {
            k,
            ring: vec![none; nodes * k],
            count: vec![0; nodes],
        }
    }

    /// Forgets every neighbour.
    pub fn reset(&mut self) {
        self.count.iter_mut().for_each(|c| *c = 0);
    }

    /// Records event `event` between `src` and `dst` at `t` in both nodes' lists.
    pub fn insert(&mut self, src: u32, dst: u32, t: f64, event: u32) {
        if self.k == 0 {
            return;
        }
        for (a, b) in [(src, dst), (dst, src)] {
            let c = &mut self.count[a as usize];
            let slot = (*c % self.k as u64) as usize;
            self.ring[a as usize * self.k + slot] = Neighbor { node: b, t, event };
            *c += 1;
        }
    }

    /// The most recent neighbours of `node`, newest first (at most `k`).
    pub fn recent(&self, node: u32) -> impl Iterator<Item = Neighbor> + '_ {
        let c = self.count[node as usize];
        let have = c.min(self.k as u64);
        (0..have).map(move |i| {
            let slot = ((c - 1 - i) % self.k as u64) as usize;
            self.ring[node as usize * self.k + slot]
        })
    }

    /// The lists as flat vectors (for checkpoints): per node its count, then the rings.
    pub fn to_parts(&self) -> (Vec<u64>, Vec<Neighbor>) {
        (self.count.clone(), self.ring.clone())
    }

    /// Lists from [`Neighbors::to_parts`].
    pub fn from_parts(k: usize, count: Vec<u64>, ring: Vec<Neighbor>) -> Option<Self> {
        (ring.len() == count.len() * k).then_some(Self { k, ring, count })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(n: usize) -> String {
        (0..n)
            .map(|i| format!("{} {} {}\n", 10 + i % 4, 20 + i % 3, 1000 + i))
            .collect()
    }

    #[test]
    fn snap_edges_are_renumbered_split_70_15_15_and_new_nodes_found() {
        let mut text = snap(20);
        text.push_str("99 20 1020\n");
        let g = TemporalGraph::parse(&text, "x.txt").unwrap();
        assert_eq!(g.len(), 21);
        assert_eq!(g.num_nodes, 8);
        assert_eq!((g.src[0], g.dst[0]), (0, 1));
        assert_eq!((g.train_end, g.val_end), (15, 18));
        assert!(g.inductive(20), "node 99 appears only in the test part");
        assert!(!g.inductive(19));
        assert_eq!(g.neg_range, (0, 7));
        assert_eq!(g.edge_dim, 0);
    }

    #[test]
    fn out_of_order_lines_are_sorted_and_counted_and_ties_are_not_split() {
        let mut lines: Vec<String> = snap(20).lines().map(String::from).collect();
        lines.swap(3, 4);
        // Events 13..=15 share one time: the cut at 14 moves past them.
        for l in &mut lines[13..16] {
            let f: Vec<&str> = l.split(' ').collect();
            *l = format!("{} {} 1013", f[0], f[1]);
        }
        let g = TemporalGraph::parse(&lines.join("\n"), "x.txt").unwrap();
        assert_eq!(g.reordered, 1);
        assert!(g.t.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(g.train_end, 16);
    }

    #[test]
    fn bitcoin_ratings_are_an_edge_feature() {
        let mut text = String::from("#source,#target,#rating,#timestamp\n");
        for i in 0..12 {
            text.push_str(&format!(
                "{},{},{},{}.5\n",
                i % 5,
                (i + 1) % 5,
                i - 6,
                100 + i
            ));
        }
        let g = TemporalGraph::parse(&text, "b.csv").unwrap();
        assert_eq!(g.edge_dim, 1);
        assert_eq!(g.feat[0], -0.6);
        assert_eq!(g.t[0], 100.5);
    }

    #[test]
    fn jodie_csv_puts_items_after_users_and_draws_negatives_among_items() {
        let mut text = String::from("user_id,item_id,timestamp,state_label,f1,f2\n");
        for i in 0..12 {
            text.push_str(&format!("{},{},{},0,0.5,{}\n", i % 3, i % 4, i, i));
        }
        let g = TemporalGraph::parse(&text, "w.csv").unwrap();
        assert_eq!(g.num_nodes, 7);
        assert_eq!(g.edge_dim, 2);
        assert_eq!(g.neg_range, (3, 6));
        assert!(g.src.iter().all(|&s| s < 3) && g.dst.iter().all(|&d| d >= 3));
        assert_eq!(&g.feat[2..4], &[0.5, 1.0]);
    }

    #[test]
    fn a_malformed_line_is_refused_with_its_number() {
        let mut text = snap(12);
        text.push_str("5 x 2000\n");
        let e = TemporalGraph::parse(&text, "c.txt").unwrap_err();
        assert!(e.message.contains("c.txt line 13"), "{}", e.message);
        assert!(e.message.contains("not a node id"), "{}", e.message);
        let e = TemporalGraph::parse("#h\n1,2,3\n", "b.csv").unwrap_err();
        assert!(
            e.message.contains("b.csv line 2: 3 fields"),
            "{}",
            e.message
        );
        let e = TemporalGraph::parse("1 2 3\n", "t.txt").unwrap_err();
        assert!(e.message.contains("at least 10"), "{}", e.message);
        let e = TemporalGraph::parse(&format!("{}1 2 nan\n", snap(12)), "t.txt").unwrap_err();
        assert!(
            e.message.contains("line 13") && e.message.contains("time"),
            "{}",
            e.message
        );
    }

    #[test]
    fn a_split_left_empty_by_ties_is_refused_and_large_jodie_ids_do_not_collide() {
        // 12 events, the last 9 at one time: the 70% cut moves to the end.
        let text: String = (0..12)
            .map(|i| format!("{} {} {}\n", i % 3, 3 + i % 2, if i < 3 { i } else { 9 }))
            .collect();
        let e = TemporalGraph::parse(&text, "ties.txt").unwrap_err();
        assert!(
            e.message.contains("validation part is empty"),
            "{}",
            e.message
        );
        // Item ids past u32 stay distinct.
        let mut csv = String::from("user_id,item_id,timestamp,state_label\n");
        for i in 0..12u64 {
            csv.push_str(&format!(
                "{},{},{i},0\n",
                5_000_000_000 + i % 2,
                (1 << 32) + i % 3
            ));
        }
        let g = TemporalGraph::parse(&csv, "big.csv").unwrap();
        assert_eq!(g.num_nodes, 5);
    }

    #[test]
    fn neighbours_are_the_k_most_recent_newest_first() {
        let mut n = Neighbors::new(4, 2);
        assert_eq!(n.recent(0).count(), 0);
        n.insert(0, 1, 1.0, 0);
        n.insert(0, 2, 2.0, 1);
        n.insert(3, 0, 3.0, 2);
        let got: Vec<(u32, u32)> = n.recent(0).map(|x| (x.node, x.event)).collect();
        assert_eq!(got, vec![(3, 2), (2, 1)]);
        assert_eq!(n.recent(1).map(|x| x.node).collect::<Vec<_>>(), vec![0]);
        let (c, r) = n.to_parts();
        assert_eq!(Neighbors::from_parts(2, c, r).unwrap(), n);
        n.reset();
        assert_eq!(n.recent(0).count(), 0);
    }
}
