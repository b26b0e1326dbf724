//! The pod cache: every gang's worker pods, kept from one watch, with expectations of the
//! operator's own writes to them. Reconcile reads a gang from here instead of listing it.
//!
//! A cache lags the API server. A lag behind other writers (the kubelet, the scheduler, a user)
//! is what every level-triggered controller lives with: the change reaches the cache and then
//! triggers another pass. A lag behind the operator's own writes is not: a pass that does not yet
//! see the pods it just created would count the gang as short, and one that still sees pods it
//! deleted would wait on them. So, as Kubernetes' own ReplicaSet and Job controllers do, every
//! creation, release (ungate) and deletion is recorded as an expectation, and a gang is read only
//! once the cache shows all of its expectations met ([`PodCache::view`] says `None` until then; the
//! watch event that meets them triggers the next pass). An expectation that the cache has not
//! met after [`EXPECTATION_TTL`] is dropped, so a write whose effect was undone before the cache
//! saw it (a pod created and at once deleted by someone else) cannot stall a gang for good.
//!
//! Reads from the cache alone also never go back in time, where a mix of fresh lists and cached
//! reads would: a status is never written from an older view than the one before it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::runtime::watcher;
use lockstep_api::contract::{labels, operator};
use tokio::sync::watch;
use tracing::warn;

use crate::job::key;
use crate::observe::{RankPod, observe};

/// How long an expectation may stay unmet before it is dropped.
pub const EXPECTATION_TTL: Duration = Duration::from_secs(30);

/// What the cache must show before a gang is read from it.
#[derive(Debug, Default)]
struct Expected {
    /// Pods created: present.
    created: Vec<String>,
    /// Pods released: present without the gang gate (or being deleted).
    released: Vec<String>,
    /// Pods deleted: absent or being deleted.
    deleted: Vec<String>,
    /// When the oldest unmet expectation was recorded.
    since: Option<Instant>,
}

impl Expected {
    fn is_empty(&self) -> bool {
        self.created.is_empty() && self.released.is_empty() && self.deleted.is_empty()
    }

    /// Drops what the cache's state shows done; true when nothing is left. A pod that is not
    /// there meets a deletion only: absent, it may not have been seen yet at all.
    fn settle(&mut self, pods: Option<&BTreeMap<String, RankPod>>) -> bool {
        let get = |n: &String| pods.and_then(|p| p.get(n));
        self.created.retain(|n| get(n).is_none());
        self.released
            .retain(|n| get(n).is_none_or(|p| p.gated && !p.terminating));
        self.deleted
            .retain(|n| get(n).is_some_and(|p| !p.terminating));
        self.is_empty()
    }

    /// Drops what one watch event shows done: `seen` is the pod as it is now, `None` when the
    /// event deleted it (which it could only do after every write this operator made to it).
    fn saw(&mut self, name: &str, seen: Option<&RankPod>) {
        match seen {
            Some(p) => {
                self.created.retain(|n| n != name);
                if !p.gated || p.terminating {
                    self.released.retain(|n| n != name);
                }
                if p.terminating {
                    self.deleted.retain(|n| n != name);
                }
            }
            None => {
                self.created.retain(|n| n != name);
                self.released.retain(|n| n != name);
                self.deleted.retain(|n| n != name);
            }
        }
    }
}

/// A write the operator made to a gang's pods, to expect in the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    /// The pod was created.
    Created,
    /// The pod's gang gate was removed.
    Released,
    /// The pod was deleted.
    Deleted,
}

#[derive(Debug, Default)]
struct State {
    /// Gang key -> pod name -> what reconcile decides on.
    gangs: HashMap<String, BTreeMap<String, RankPod>>,
    /// The gangs of a relist under way: they replace `gangs` when it is complete.
    relist: Option<HashMap<String, BTreeMap<String, RankPod>>>,
    /// Gang key -> expectations not met yet.
    expected: HashMap<String, Expected>,
}

/// Every gang's pods, as the watch last showed them, and the operator's expectations; gangs are
/// keyed by their job's [`key`].
#[derive(Debug)]
pub struct PodCache {
    state: Mutex<State>,
    ready: watch::Sender<bool>,
}

impl Default for PodCache {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            ready: watch::channel(false).0,
        }
    }
}

/// The gang a worker pod belongs to, and what reconcile sees of it.
fn entry(pod: &Pod) -> Option<(String, RankPod)> {
    let job = pod.labels().get(labels::JOB_NAME)?;
    let seen = observe(pod, operator::WORKER_CONTAINER)?;
    Some((key(&pod.namespace()?, job), seen))
}

impl PodCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes one event of the worker-pod watch.
    pub fn apply(&self, event: &watcher::Event<Pod>) {
        let mut s = self.lock();
        match event {
            watcher::Event::Apply(pod) => {
                if let Some((key, seen)) = entry(pod) {
                    if let Some(e) = s.expected.get_mut(&key) {
                        e.saw(&seen.name, Some(&seen));
                    }
                    s.gangs
                        .entry(key)
                        .or_default()
                        .insert(seen.name.clone(), seen);
                }
            }
            watcher::Event::Delete(pod) => {
                if let Some((key, seen)) = entry(pod) {
                    if let Some(e) = s.expected.get_mut(&key) {
                        e.saw(&seen.name, None);
                    }
                    if let Some(gang) = s.gangs.get_mut(&key) {
                        gang.remove(&seen.name);
                        if gang.is_empty() {
                            s.gangs.remove(&key);
                        }
                    }
                }
            }
            watcher::Event::Init => s.relist = Some(HashMap::new()),
            watcher::Event::InitApply(pod) => {
                if let Some((key, seen)) = entry(pod) {
                    s.relist
                        .get_or_insert_default()
                        .entry(key)
                        .or_default()
                        .insert(seen.name.clone(), seen);
                }
            }
            watcher::Event::InitDone => {
                if let Some(gangs) = s.relist.take() {
                    s.gangs = gangs;
                }
                drop(s);
                self.ready.send_replace(true);
            }
        }
    }

    /// Waits until the first list of the watch is complete.
    pub async fn wait_ready(&self) {
        let mut rx = self.ready.subscribe();
        // The sender lives in `self`: the wait ends only when it is ready.
        let _ = rx.wait_for(|r| *r).await;
    }

    /// Records writes to a gang's pods that the cache must show before the gang is read again.
    pub fn expect(&self, key: &str, write: Write, names: impl IntoIterator<Item = String>) {
        let mut s = self.lock();
        let e = s.expected.entry(key.to_string()).or_default();
        let list = match write {
            Write::Created => &mut e.created,
            Write::Released => &mut e.released,
            Write::Deleted => &mut e.deleted,
        };
        let before = list.len();
        list.extend(names);
        if list.len() > before && e.since.is_none() {
            e.since = Some(Instant::now());
        }
    }

    /// The gang's pods (sorted by name), or `None` while the cache does not yet show every
    /// write this operator made to them (see the module doc).
    pub fn view(&self, key: &str, now: Instant) -> Option<Vec<RankPod>> {
        let mut s = self.lock();
        let State {
            gangs, expected, ..
        } = &mut *s;
        let pods = gangs.get(key);
        if let Some(e) = expected.get_mut(key) {
            if e.settle(pods) {
                expected.remove(key);
            } else if e
                .since
                .is_some_and(|t| now.duration_since(t) >= EXPECTATION_TTL)
            {
                warn!(gang = key, expected = ?e, "the pod cache has not shown these writes in time; reading it as it is");
                expected.remove(key);
            } else {
                return None;
            }
        }
        Some(
            pods.map(|p| p.values().cloned().collect())
                .unwrap_or_default(),
        )
    }

    /// Forgets a gang's expectations (its job is gone).
    pub fn forget(&self, key: &str) {
        self.lock().expected.remove(key);
    }

    /// Keeps the expectations of the gangs whose key `live` accepts only (their jobs exist).
    pub fn retain(&self, live: impl Fn(&str) -> bool) {
        self.lock().expected.retain(|k, _| live(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(job: &str, rank: u32, gated: bool, deleting: bool) -> Pod {
        serde_json::from_value(json!({
            "metadata": {
                "name": format!("{job}-{rank}"),
                "namespace": "ns",
                "labels": {
                    labels::JOB_NAME: job,
                    labels::RANK: rank.to_string(),
                    labels::ATTEMPT: "0",
                },
                "deletionTimestamp": if deleting { json!("2026-11-27T00:00:00Z") } else { json!(null) },
            },
            "spec": {
                "containers": [{"name": "worker"}],
                "schedulingGates": if gated { json!([{"name": operator::SCHEDULING_GATE}]) } else { json!([]) },
            },
        }))
        .unwrap()
    }

    fn listed(g: &PodCache, pods: &[Pod]) {
        g.apply(&watcher::Event::Init);
        for p in pods {
            g.apply(&watcher::Event::InitApply(p.clone()));
        }
        g.apply(&watcher::Event::InitDone);
    }

    fn names(v: Option<Vec<RankPod>>) -> Option<Vec<String>> {
        v.map(|v| v.into_iter().map(|p| p.name).collect())
    }

    #[test]
    fn a_gang_is_read_by_job_and_namespace_sorted_by_name() {
        let g = PodCache::default();
        listed(
            &g,
            &[
                pod("a", 1, false, false),
                pod("b", 0, false, false),
                pod("a", 0, false, false),
            ],
        );
        let now = Instant::now();
        assert_eq!(
            names(g.view("ns/a", now)),
            Some(vec!["a-0".into(), "a-1".into()])
        );
        assert_eq!(names(g.view("other/a", now)), Some(vec![]));
        g.apply(&watcher::Event::Delete(pod("a", 0, false, false)));
        assert_eq!(names(g.view("ns/a", now)), Some(vec!["a-1".into()]));
    }

    #[test]
    fn created_pods_must_show_before_the_gang_is_read() {
        let g = PodCache::default();
        listed(&g, &[]);
        g.expect(
            "ns/a",
            Write::Created,
            ["a-0".to_string(), "a-1".to_string()],
        );
        let now = Instant::now();
        assert_eq!(g.view("ns/a", now), None, "nothing shown yet");
        g.apply(&watcher::Event::Apply(pod("a", 0, true, false)));
        assert_eq!(g.view("ns/a", now), None, "one of two shown");
        g.apply(&watcher::Event::Apply(pod("a", 1, true, false)));
        assert_eq!(
            names(g.view("ns/a", now)),
            Some(vec!["a-0".into(), "a-1".into()])
        );
    }

    #[test]
    fn released_pods_must_show_without_the_gate() {
        let g = PodCache::default();
        listed(&g, &[pod("a", 0, true, false)]);
        g.expect("ns/a", Write::Released, ["a-0".to_string()]);
        let now = Instant::now();
        assert_eq!(g.view("ns/a", now), None);
        g.apply(&watcher::Event::Apply(pod("a", 0, false, false)));
        let seen = g.view("ns/a", now).unwrap();
        assert!(!seen[0].gated);
    }

    #[test]
    fn deleted_pods_must_show_terminating_or_gone() {
        let g = PodCache::default();
        listed(&g, &[pod("a", 0, false, false), pod("a", 1, false, false)]);
        g.expect(
            "ns/a",
            Write::Deleted,
            ["a-0".to_string(), "a-1".to_string()],
        );
        let now = Instant::now();
        assert_eq!(g.view("ns/a", now), None);
        g.apply(&watcher::Event::Apply(pod("a", 0, false, true)));
        g.apply(&watcher::Event::Delete(pod("a", 1, false, false)));
        let seen = g.view("ns/a", now).unwrap();
        assert_eq!(seen.len(), 1);
        assert!(seen[0].terminating);
    }

    #[test]
    fn a_pod_deleted_before_the_pass_still_meets_its_creation_and_release() {
        let g = PodCache::default();
        listed(&g, &[]);
        g.expect("ns/a", Write::Created, ["a-0".to_string()]);
        g.expect("ns/a", Write::Released, ["a-0".to_string()]);
        g.apply(&watcher::Event::Apply(pod("a", 0, true, false)));
        g.apply(&watcher::Event::Delete(pod("a", 0, true, false)));
        assert_eq!(g.view("ns/a", Instant::now()), Some(vec![]));
    }

    #[test]
    fn the_expectations_of_a_gone_job_are_dropped() {
        let g = PodCache::default();
        listed(&g, &[]);
        g.expect("ns/a", Write::Created, ["a-0".to_string()]);
        g.expect("ns/b", Write::Created, ["b-0".to_string()]);
        g.retain(|k| k == "ns/b");
        let now = Instant::now();
        assert_eq!(g.view("ns/a", now), Some(vec![]));
        assert_eq!(g.view("ns/b", now), None);
    }

    #[test]
    fn an_expectation_unmet_past_its_ttl_is_dropped() {
        let g = PodCache::default();
        listed(&g, &[]);
        g.expect("ns/a", Write::Created, ["a-0".to_string()]);
        assert_eq!(g.view("ns/a", Instant::now()), None);
        let later = Instant::now() + EXPECTATION_TTL;
        assert_eq!(g.view("ns/a", later), Some(vec![]));
        // Dropped, not just skipped once.
        assert_eq!(g.view("ns/a", Instant::now()), Some(vec![]));
    }

    #[test]
    fn a_relist_replaces_the_gangs_only_once_complete() {
        let g = PodCache::default();
        listed(&g, &[pod("a", 0, false, false), pod("a", 1, false, false)]);
        g.apply(&watcher::Event::Init);
        g.apply(&watcher::Event::InitApply(pod("a", 1, false, false)));
        let now = Instant::now();
        assert_eq!(
            g.view("ns/a", now).unwrap().len(),
            2,
            "the old list stands until InitDone"
        );
        g.apply(&watcher::Event::InitDone);
        assert_eq!(names(g.view("ns/a", now)), Some(vec!["a-1".into()]));
    }

    #[tokio::test]
    async fn readiness_waits_for_the_first_complete_list() {
        let g = std::sync::Arc::new(PodCache::default());
        let waiter = tokio::spawn({
            let g = g.clone();
            async move { g.wait_ready().await }
        });
        g.apply(&watcher::Event::Init);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        g.apply(&watcher::Event::InitDone);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("ready after InitDone")
            .unwrap();
    }
}
