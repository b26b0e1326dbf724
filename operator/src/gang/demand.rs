//! Resource amounts: Kubernetes quantities parsed into milli-units, and what a pod asks for (the
//! kube-scheduler's rule: the larger of the containers' sum and the largest init container, plus
//! the pod overhead; a request defaults to the limit when only the limit is set).

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{Container, PodSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// An amount of every resource a pod or node has, in milli-units (1 CPU = 1000; 1 byte of memory
/// = 1000; one pod slot = 1000).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Res(pub BTreeMap<String, i64>);

/// The resource every pod takes one of.
pub const PODS: &str = "pods";

impl Res {
    /// The amount of `name` (0 when absent).
    pub fn get(&self, name: &str) -> i64 {
        self.0.get(name).copied().unwrap_or(0)
    }

    /// Adds `other` `times` times (subtracts for a negative `times`).
    pub fn add_times(&mut self, other: &Res, times: i64) {
        for (k, v) in &other.0 {
            let d = v.saturating_mul(times);
            match self.0.get_mut(k) {
                Some(e) => *e = e.saturating_add(d),
                None => {
                    self.0.insert(k.clone(), d);
                }
            }
        }
    }

    /// Adds `other` to this amount.
    pub fn add(&mut self, other: &Res) {
        self.add_times(other, 1);
    }

    fn max_with(&mut self, other: &Res) {
        for (k, v) in &other.0 {
            let e = self.0.entry(k.clone()).or_insert(0);
            *e = (*e).max(*v);
        }
    }

    /// From a Kubernetes resource list (an unparseable quantity counts as 0).
    pub fn from_list(list: &BTreeMap<String, Quantity>) -> Res {
        Res(list
            .iter()
            .map(|(k, q)| (k.clone(), parse_milli(&q.0).unwrap_or(0)))
            .collect())
    }

    /// How many copies of `each` fit into `total - used`: the smallest ratio over the resources
    /// `each` asks for (every pod asks for a pod slot, so a pod's request never fits unboundedly).
    pub fn copies(total: &Res, used: &Res, each: &Res) -> i64 {
        let mut n = i64::MAX;
        for (k, want) in &each.0 {
            if *want <= 0 {
                continue;
            }
            let left = total.get(k).saturating_sub(used.get(k));
            n = n.min(left.max(0) / want);
        }
        n
    }
}

impl fmt::Display for Res {
    /// `1 cpu, 8 nvidia.com/gpu`: the resources asked for, pod slots left out.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .filter(|(k, v)| k.as_str() != PODS && **v != 0)
            .map(|(k, v)| format!("{} {k}", human(k, *v)))
            .collect();
        if parts.is_empty() {
            f.write_str("one pod slot")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// An amount in milli-units written for a person: whole units where exact, `Gi` for memory.
pub fn human(resource: &str, milli: i64) -> String {
    const GI: i64 = 1 << 30;
    if resource.ends_with("memory") || resource.ends_with("storage") {
        let bytes = milli / 1000;
        if bytes % GI == 0 {
            return format!("{}Gi", bytes / GI);
        }
        return format!("{:.1}Gi", bytes as f64 / GI as f64);
    }
    if milli % 1000 == 0 {
        (milli / 1000).to_string()
    } else {
        format!("{milli}m")
    }
}

/// Parses a Kubernetes quantity (`500m`, `2`, `1.5`, `64Gi`, `1e3`, `10M`) into milli-units,
/// rounding a fraction of a milli-unit up as the API server does; `None` when it is not one.
pub fn parse_milli(text: &str) -> Option<i64> {
    let s = text.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let (negative, number) = match number.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, number.strip_prefix('+').unwrap_or(number)),
    };
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && frac.is_empty() {
        return None;
    }
    if !whole
        .chars()
        .chain(frac.chars())
        .all(|c| c.is_ascii_digit())
    {
        return None;
    }
    // value = digits / 10^frac.len() x 2^bin x 10^dec, in milli-units (x 10^3).
    let digits: i128 = format!("{whole}{frac}").parse().ok()?;
    let (bin, dec): (u32, i32) = match suffix {
        "" => (0, 0),
        "Ki" => (10, 0),
        "Mi" => (20, 0),
        "Gi" => (30, 0),
        "Ti" => (40, 0),
        "Pi" => (50, 0),
        "Ei" => (60, 0),
        "n" => (0, -9),
        "u" => (0, -6),
        "m" => (0, -3),
        "k" => (0, 3),
        "M" => (0, 6),
        "G" => (0, 9),
        "T" => (0, 12),
        "P" => (0, 15),
        "E" => (0, 18),
        e if e.starts_with(['e', 'E']) => (0, e[1..].parse().ok()?),
        _ => return None,
    };
    let exp10 = dec + 3 - i32::try_from(frac.len()).ok()?;
    let mut v = digits.checked_mul(1i128.checked_shl(bin)?)?;
    if exp10 >= 0 {
        v = v.checked_mul(10i128.checked_pow(u32::try_from(exp10).ok()?)?)?;
    } else {
        let d = 10i128.checked_pow(u32::try_from(-exp10).ok()?)?;
        v = (v + d - 1) / d;
    }
    let v = i64::try_from(v).unwrap_or(i64::MAX);
    Some(if negative { -v } else { v })
}

fn container_request(c: &Container) -> Res {
    let mut r = Res::default();
    let Some(res) = &c.resources else { return r };
    if let Some(limits) = &res.limits {
        r = Res::from_list(limits);
    }
    if let Some(requests) = &res.requests {
        for (k, v) in Res::from_list(requests).0 {
            r.0.insert(k, v);
        }
    }
    r
}

/// What a pod with this spec asks the scheduler for, pod slot included.
pub fn pod_request(spec: &PodSpec) -> Res {
    let mut sum = Res::default();
    for c in &spec.containers {
        sum.add(&container_request(c));
    }
    // Sidecars (restartable init containers) run beside the containers; an ordinary init
    // container runs alone, before them, so it needs its request only at that moment (together
    // with the sidecars started before it).
    let mut sidecars = Res::default();
    let mut init_peak = Res::default();
    for c in spec.init_containers.iter().flatten() {
        let r = container_request(c);
        if c.restart_policy.as_deref() == Some("Always") {
            sidecars.add(&r);
        } else {
            let mut at = sidecars.clone();
            at.add(&r);
            init_peak.max_with(&at);
        }
    }
    sum.add(&sidecars);
    sum.max_with(&init_peak);
    if let Some(overhead) = &spec.overhead {
        sum.add(&Res::from_list(overhead));
    }
    sum.0.retain(|_, v| *v != 0);
    sum.0.insert(PODS.into(), 1000);
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_into_milli_units() {
        for (text, want) in [
            ("1", 1000),
            ("500m", 500),
            ("1.5", 1500),
            ("0.1", 100),
            ("64Gi", 64 * (1 << 30) * 1000),
            ("1Ki", 1024 * 1000),
            ("1e3", 1_000_000),
            ("10M", 10_000_000_000),
            ("1n", 1),
            ("8", 8000),
        ] {
            assert_eq!(parse_milli(text), Some(want), "{text}");
        }
        for bad in ["", "abc", "1x", "1..2", "Gi"] {
            assert_eq!(parse_milli(bad), None, "{bad}");
        }
    }

    fn container(requests: &[(&str, &str)], limits: &[(&str, &str)], always: bool) -> Container {
        let list = |kv: &[(&str, &str)]| {
            Some(
                kv.iter()
                    .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
                    .collect(),
            )
        };
        Container {
            name: "c".into(),
            resources: Some(k8s_openapi::api::core::v1::ResourceRequirements {
                requests: list(requests),
                limits: list(limits),
                ..Default::default()
            }),
            restart_policy: always.then(|| "Always".to_string()),
            ..Default::default()
        }
    }

    #[test]
    fn a_pod_asks_for_its_containers_its_init_peak_and_its_overhead() {
        let spec = PodSpec {
            containers: vec![
                container(&[("cpu", "1")], &[("nvidia.com/gpu", "2")], false),
                container(&[("cpu", "500m")], &[], false),
            ],
            init_containers: Some(vec![
                container(&[("cpu", "3")], &[], false),
                container(&[("cpu", "250m")], &[], true),
            ]),
            overhead: Some([("cpu".to_string(), Quantity("100m".into()))].into()),
            ..Default::default()
        };
        let r = pod_request(&spec);
        // max(1 + 0.5 + 0.25 sidecar, 3 init) + 0.1 overhead.
        assert_eq!(r.get("cpu"), 3100);
        assert_eq!(r.get("nvidia.com/gpu"), 2000);
        assert_eq!(r.get(PODS), 1000);
        assert_eq!(r.to_string(), "3100m cpu, 2 nvidia.com/gpu");
    }

    #[test]
    fn copies_is_limited_by_the_scarcest_resource() {
        let total = Res([
            ("cpu".into(), 64_000),
            ("nvidia.com/gpu".into(), 8000),
            (PODS.into(), 110_000),
        ]
        .into());
        let used = Res([("nvidia.com/gpu".into(), 2000)].into());
        let each = Res([
            ("cpu".into(), 4000),
            ("nvidia.com/gpu".into(), 2000),
            (PODS.into(), 1000),
        ]
        .into());
        assert_eq!(Res::copies(&total, &used, &each), 3);
        let cpu_only = Res([("cpu".into(), 30_000), (PODS.into(), 1000)].into());
        assert_eq!(Res::copies(&total, &used, &cpu_only), 2);
    }
}
