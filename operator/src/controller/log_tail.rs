//! The last lines of a failed rank's worker log, kept in `status.lastFailure.logTail`: read when a
//! pass records the first failure of an attempt, before that status is written and the gang's
//! pods are deleted (the log goes with its pod).
//!
//! [`crate::decide`] records the failure and stays pure; this fills the tail in afterwards. The
//! read is bounded by [`TIMEOUT`] and never fails the pass: a log that cannot be read (a fake
//! node serves none, the node is unreachable, RBAC lacks `pods/log`) leaves the tail empty.

use std::collections::HashSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, LogParams};
use lockstep_api::ParallelJobStatus;
use lockstep_api::contract::operator;
use tracing::debug;

use crate::observe::RankPod;

/// Lines of the log kept at most.
pub const MAX_LINES: usize = 50;
/// Bytes of the log kept at most.
pub const MAX_BYTES: usize = 8 * 1024;
/// Bytes read at most. More than [`MAX_BYTES`]: the API server's `limitBytes` cuts the end of
/// the last [`MAX_LINES`] lines when they are longer, and the end is what tells why the rank
/// failed; the start is cut here instead.
const READ_BYTES: i64 = 64 * 1024;
/// How long the read may take.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// The pod whose log the pass should keep: that of the first failure the decided status
/// records, when the job's status before the pass (`previous`) does not hold that record yet,
/// it has no tail, and its pod is observed on a node that is not gone (`lost`: the pods on gone
/// nodes; a vanished pod, or one whose node is gone, has no log to read).
pub fn wanted<'a>(
    previous: Option<&ParallelJobStatus>,
    decided: &ParallelJobStatus,
    observed: &'a [RankPod],
    lost: &HashSet<String>,
) -> Option<&'a RankPod> {
    let failure = decided.last_failure.as_ref()?;
    let recorded = previous.and_then(|s| s.last_failure.as_ref());
    if failure.log_tail.is_some() || recorded == Some(failure) {
        return None;
    }
    observed
        .iter()
        .find(|p| p.name == failure.pod && p.node.is_some() && !lost.contains(&p.name))
}

/// The end of a log: its last [`MAX_LINES`] lines, and of those at most [`MAX_BYTES`] (cut at
/// the start of a line where one falls within the last [`MAX_BYTES`], else at a character);
/// `None` when nothing but whitespace is left.
pub fn tail(log: &str) -> Option<String> {
    let log = log.trim_end();
    let mut start = 0;
    if let Some((i, _)) = log.rmatch_indices('\n').nth(MAX_LINES - 1) {
        start = i + 1;
    }
    let mut kept = &log[start..];
    if kept.len() > MAX_BYTES {
        let mut cut = kept.len() - MAX_BYTES;
        while !kept.is_char_boundary(cut) {
            cut += 1;
        }
        let at_line_start = kept.as_bytes()[cut - 1] == b'\n';
        kept = &kept[cut..];
        if !at_line_start && let Some(i) = kept.find('\n') {
            kept = &kept[i + 1..];
        }
    }
    (!kept.trim().is_empty()).then(|| kept.to_string())
}

/// Reads the tail (see [`tail`]) of the worker container's log of `pod` in `pods`, within
/// [`TIMEOUT`]; `None`, logged at debug, when it cannot be read.
pub async fn read(pods: &Api<Pod>, pod: &str) -> Option<String> {
    let params = LogParams {
        container: Some(operator::WORKER_CONTAINER.into()),
        tail_lines: Some(MAX_LINES as i64),
        limit_bytes: Some(READ_BYTES),
        ..LogParams::default()
    };
    match tokio::time::timeout(TIMEOUT, pods.logs(pod, &params)).await {
        Ok(Ok(log)) => tail(&log),
        Ok(Err(e)) => {
            debug!(pod, error = %e, "the failed rank's log cannot be read");
            None
        }
        Err(_) => {
            debug!(pod, timeout = ?TIMEOUT, "the failed rank's log was not read in time");
            None
        }
    }
}

/// Fills in the log tail of the first failure `decided` records (see [`wanted`]), read from the
/// pods of `namespace`.
pub(super) async fn fill(
    client: &kube::Client,
    namespace: &str,
    previous: Option<&ParallelJobStatus>,
    decided: &mut ParallelJobStatus,
    (observed, lost): (&[RankPod], &HashSet<String>),
) {
    let Some(pod) = wanted(previous, decided, observed, lost) else {
        return;
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let log = read(&pods, &pod.name).await;
    if let Some(failure) = decided.last_failure.as_mut() {
        failure.log_tail = log;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::PodState;
    use lockstep_api::status::RankFailure;

    fn pod(name: &str, node: Option<&str>) -> RankPod {
        RankPod {
            name: name.into(),
            rank: 1,
            attempt: 0,
            state: PodState::Running,
            ready: false,
            node: node.map(String::from),
            terminating: false,
            gated: false,
            planned_node: None,
            ip: None,
            uid: None,
            controller: None,
            job_uid: None,
        }
    }

    fn with_failure(attempt: i32, pod: &str) -> ParallelJobStatus {
        ParallelJobStatus {
            attempt,
            last_failure: Some(RankFailure {
                attempt,
                rank: 1,
                pod: pod.into(),
                ..RankFailure::default()
            }),
            ..ParallelJobStatus::default()
        }
    }

    #[test]
    fn the_log_is_read_once_for_a_newly_recorded_failure_whose_pod_is_on_a_node() {
        let observed = [pod("j-0", Some("n")), pod("j-1", Some("n"))];
        let none = HashSet::new();
        let decided = with_failure(0, "j-1");
        assert_eq!(
            wanted(None, &decided, &observed, &none).map(|p| p.name.as_str()),
            Some("j-1")
        );
        let before = ParallelJobStatus::default();
        assert!(wanted(Some(&before), &decided, &observed, &none).is_some());
        // A later pass decides on the record the status holds: not read again.
        assert!(wanted(Some(&decided), &decided, &observed, &none).is_none());
        // Attempt 1's first failure, while attempt 0's is recorded.
        let next = with_failure(1, "j-1");
        assert!(wanted(Some(&decided), &next, &observed, &none).is_some());
        let mut read = decided.clone();
        read.last_failure.as_mut().unwrap().log_tail = Some("x".into());
        assert!(
            wanted(None, &read, &observed, &none).is_none(),
            "already read"
        );
        // No pod, one never scheduled, or one on a gone node: no log to read.
        assert!(wanted(None, &decided, &observed[..1], &none).is_none());
        assert!(wanted(None, &decided, &[pod("j-1", None)], &none).is_none());
        let lost = HashSet::from(["j-1".to_string()]);
        assert!(wanted(None, &decided, &observed, &lost).is_none());
        assert!(wanted(None, &ParallelJobStatus::default(), &observed, &none).is_none());
    }

    #[test]
    fn the_tail_keeps_the_last_lines_within_the_byte_limit() {
        let log: String = (0..80).map(|i| format!("line {i}\n")).collect();
        let t = tail(&log).unwrap();
        assert_eq!(t.lines().count(), MAX_LINES);
        assert!(t.starts_with("line 30\n") && t.ends_with("line 79"), "{t}");
        assert_eq!(tail("one\ntwo\n").as_deref(), Some("one\ntwo"));
        assert_eq!(tail(" \n\n"), None);
        // Long lines: the end is kept, from the start of a whole line.
        let long: String = (0..20)
            .map(|i| format!("{i} {}\n", "é".repeat(300)))
            .collect();
        let t = tail(&long).unwrap();
        assert!(t.len() <= MAX_BYTES);
        assert!(
            t.starts_with(|c: char| c.is_ascii_digit()),
            "a whole line first"
        );
        assert!(t.lines().last().unwrap().starts_with("19 "));
        // One line longer than the limit: its end, cut at a character.
        let huge = "ü".repeat(MAX_BYTES);
        let t = tail(&huge).unwrap();
        assert!(t.len() <= MAX_BYTES && t.chars().all(|c| c == 'ü'));
    }
}
