//! `kubectl lockstep logs NAME`: the ranks' worker logs, each line prefixed with its rank as in
//! `local` mode. `-f` follows them, into the next attempt when the gang restarts, until the job
//! ends. A restarted gang's earlier pods are gone (the next attempt's pods take their names):
//! of an earlier attempt, what is left is the last lines of its first failure, which the
//! operator keeps in `status.lastFailure.logTail`.

use std::collections::HashSet;
use std::time::Duration;

use futures::{AsyncBufReadExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, LogParams};
use lockstep_api::contract::{labels, operator};

use crate::{Ctx, fmt};

/// Which ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ranks {
    /// Every rank.
    All,
    /// One rank.
    One(u32),
}

/// Which attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    /// The current attempt.
    Current,
    /// This attempt.
    Attempt(i32),
    /// The attempt before the current one.
    Previous,
    /// The first failure of the latest failed attempt.
    Failed,
}

/// What `logs` shows.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Which ranks.
    pub ranks: Ranks,
    /// Which attempt.
    pub which: Which,
    /// Follow.
    pub follow: bool,
    /// Lines per rank.
    pub tail: Option<i64>,
}

/// Prints the logs `o` asks for.
pub async fn logs(ctx: &Ctx, name: &str, o: &Options) -> anyhow::Result<i32> {
    let job = crate::get_job(ctx, name).await?;
    let s = job.status.clone().unwrap_or_default();
    let current = s.attempt;
    let earlier = match o.which {
        Which::Failed => {
            let Some(f) = s.last_failure.clone() else {
                anyhow::bail!("{name} has no failure recorded");
            };
            // The failed pod itself while it exists with that attempt, else the kept lines.
            let rank = Ranks::One(u32::try_from(f.rank).unwrap_or(0));
            let pods = pods_of(ctx, name, Some(f.attempt)).await?;
            if pods
                .iter()
                .any(|p| p.metadata.name.as_deref() == Some(&f.pod))
            {
                return show(ctx, name, rank, f.attempt, o.tail).await;
            }
            kept(ctx, name, f.attempt, rank, &s)?;
            return Ok(0);
        }
        Which::Previous if current == 0 => {
            anyhow::bail!("{name} has no previous attempt: it is on its first (attempt 0)")
        }
        Which::Previous => Some(current - 1),
        Which::Attempt(a) if a > current || a < 0 => {
            anyhow::bail!("{name} has had attempts 0 to {current}, not {a}")
        }
        Which::Attempt(a) if a < current => Some(a),
        Which::Attempt(_) | Which::Current => None,
    };
    if let Some(a) = earlier {
        kept(ctx, name, a, o.ranks, &s)?;
        if !o.follow {
            return Ok(0);
        }
    }
    if o.follow {
        follow(ctx, name, o.ranks, current, o.tail.or(Some(10))).await?;
        return Ok(0);
    }
    // A finished attempt whose pods are gone (cleaned up): what the operator kept of it.
    let gone = pods_of(ctx, name, Some(current)).await?.is_empty();
    if gone
        && s.last_failure
            .as_ref()
            .is_some_and(|f| f.attempt == current)
    {
        kept(ctx, name, current, o.ranks, &s)?;
        return Ok(0);
    }
    show(ctx, name, o.ranks, current, o.tail).await
}

/// What is left of attempt `a`: the last lines of its first failure.
fn kept(
    ctx: &Ctx,
    name: &str,
    a: i32,
    ranks: Ranks,
    s: &lockstep_api::ParallelJobStatus,
) -> anyhow::Result<()> {
    let f = match &s.last_failure {
        Some(f) if f.attempt == a => f,
        _ => anyhow::bail!(
            "the pods of attempt {a} of {name} are gone (attempt {} took their names), and the \
             operator kept no lines of it: it keeps the last lines of the first failure of the \
             latest failed attempt only",
            s.attempt
        ),
    };
    if let Ranks::One(r) = ranks
        && i64::from(r) != i64::from(f.rank)
    {
        anyhow::bail!(
            "the pods of attempt {a} of {name} are gone; the operator kept the last lines of \
             rank {} (its first failure) only: kubectl lockstep logs {name} --attempt {a} --rank {}",
            f.rank,
            f.rank
        );
    }
    let Some(tail) = &f.log_tail else {
        anyhow::bail!(
            "the pods of attempt {a} of {name} are gone and no log lines of its failure were kept \
             (the node served none): kubectl lockstep why {name} shows the failure"
        );
    };
    ctx.out.line(format!(
        "--- attempt {a}: the last lines of rank {} (pod {}, {}), kept by the operator ---",
        f.rank,
        f.pod,
        f.exit_code
            .map_or(f.reason.clone(), |c| format!("exit code {c}, {}", f.reason))
    ));
    for l in tail.lines() {
        ctx.out.line(format!("[rank {}] {l}", f.rank));
    }
    Ok(())
}

/// The Pods API of the context's namespace.
pub fn pods(ctx: &Ctx) -> kube::Api<Pod> {
    kube::Api::namespaced(ctx.client.clone(), &ctx.namespace)
}

/// Log parameters for the worker container.
pub fn worker_log(tail: Option<i64>) -> LogParams {
    LogParams {
        container: Some(operator::WORKER_CONTAINER.into()),
        // kubectl's `--tail -1`: everything.
        tail_lines: tail.filter(|t| *t >= 0),
        ..LogParams::default()
    }
}

/// The job's pods (of `attempt` when given), by rank.
pub async fn pods_of(ctx: &Ctx, name: &str, attempt: Option<i32>) -> anyhow::Result<Vec<Pod>> {
    let api = pods(ctx);
    let mut sel = format!("{}={name}", labels::JOB_NAME);
    if let Some(a) = attempt {
        sel.push_str(&format!(",{}={a}", labels::ATTEMPT));
    }
    let mut pods = api.list(&ListParams::default().labels(&sel)).await?.items;
    pods.sort_by_key(crate::why::rank_of);
    Ok(pods)
}

fn wanted(p: &Pod, ranks: Ranks) -> bool {
    match ranks {
        Ranks::All => true,
        Ranks::One(r) => crate::why::rank_of(p) == r,
    }
}

/// The logs of attempt `attempt`'s pods, every rank's lines merged by time.
async fn show(
    ctx: &Ctx,
    name: &str,
    ranks: Ranks,
    attempt: i32,
    tail: Option<i64>,
) -> anyhow::Result<i32> {
    let pods: Vec<Pod> = pods_of(ctx, name, Some(attempt))
        .await?
        .into_iter()
        .filter(|p| wanted(p, ranks))
        .collect();
    if pods.is_empty() {
        let job = crate::get_job(ctx, name).await?;
        anyhow::bail!(
            "{name} has no pod {}of attempt {attempt} (phase {}): kubectl lockstep why {name}",
            match ranks {
                Ranks::One(r) => format!("of rank {r} "),
                Ranks::All => String::new(),
            },
            fmt::phase(&job)
        );
    }
    let api = self::pods(ctx);
    let mut lines: Vec<(String, u32, usize, String)> = Vec::new();
    for p in &pods {
        let pod = p.metadata.name.clone().unwrap_or_default();
        let lp = LogParams {
            timestamps: true,
            ..worker_log(tail)
        };
        let text = match api.logs(&pod, &lp).await {
            Ok(t) => t,
            Err(e) => {
                ctx.out
                    .line(format!("[rank {}] (no log: {e})", crate::why::rank_of(p)));
                continue;
            }
        };
        for (i, l) in text.lines().enumerate() {
            // `2026-12-03T22:14:40.650516123Z message`: sorted by the kubelet's time.
            let (t, msg) = l.split_once(' ').unwrap_or(("", l));
            lines.push((t.to_string(), crate::why::rank_of(p), i, msg.to_string()));
        }
    }
    lines.sort();
    for (_, rank, _, msg) in lines {
        ctx.out.line(format!("[rank {rank}] {msg}"));
    }
    Ok(0)
}

/// Follows the ranks' logs from attempt `attempt` on, into each next attempt, until the job
/// ends or is deleted. The pods are listed again every second, so that a rank whose pod comes
/// late (a gang still starting) is followed from its first line.
async fn follow(
    ctx: &Ctx,
    name: &str,
    ranks: Ranks,
    mut attempt: i32,
    first_tail: Option<i64>,
) -> anyhow::Result<()> {
    let api = pods(ctx);
    // Pods (by UID) already streamed or being streamed: never streamed twice.
    let mut seen: HashSet<String> = HashSet::new();
    let mut streams = tokio::task::JoinSet::new();
    // The pods of the first listing show their last lines only; later ones everything.
    let mut tail = first_tail;
    loop {
        for p in pods_of(ctx, name, Some(attempt)).await? {
            let uid = p.metadata.uid.clone().unwrap_or_default();
            if !wanted(&p, ranks) || !seen.insert(uid.clone()) {
                continue;
            }
            let pod = p.metadata.name.clone().unwrap_or_default();
            let rank = crate::why::rank_of(&p);
            let (api, out) = (api.clone(), ctx.out.clone());
            streams.spawn(async move { follow_pod(&api, &pod, &uid, rank, tail, &out).await });
        }
        tail = None;
        while streams.try_join_next().is_some() {}
        let Some(job) = crate::jobs(ctx).get_opt(name).await? else {
            streams.abort_all();
            ctx.out.line(format!("--- {name} was deleted ---"));
            return Ok(());
        };
        let s = job.status.clone().unwrap_or_default();
        if s.attempt > attempt {
            // The old attempt's streams end as its pods go; their last lines come first.
            let drained = tokio::time::timeout(Duration::from_secs(30), async {
                while streams.join_next().await.is_some() {}
            });
            if drained.await.is_err() {
                streams.abort_all();
            }
            attempt = s.attempt;
            ctx.out.line(format!(
                "--- the gang restarted: attempt {attempt}{} ---",
                s.last_failure
                    .as_ref()
                    .filter(|f| f.attempt == attempt - 1)
                    .map_or(String::new(), |f| format!(
                        " (after rank {} failed: {})",
                        f.rank, f.reason
                    ))
            ));
            continue;
        }
        if s.phase.is_some_and(|p| p.is_terminal()) && streams.is_empty() {
            ctx.out.line(format!("--- {name} {} ---", fmt::phase(&job)));
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Streams one pod's worker log until it ends, waiting for the container to start.
async fn follow_pod(
    api: &kube::Api<Pod>,
    pod: &str,
    uid: &str,
    rank: u32,
    tail: Option<i64>,
    out: &crate::Out,
) {
    let lp = LogParams {
        follow: true,
        ..worker_log(tail)
    };
    loop {
        match api.log_stream(pod, &lp).await {
            Ok(stream) => {
                let mut lines = stream.lines();
                while let Some(Ok(l)) = lines.next().await {
                    out.line(format!("[rank {rank}] {l}"));
                }
                return;
            }
            Err(_) => {
                // Not started yet (ContainerCreating), or gone: wait while it is the same pod.
                match api.get_opt(pod).await {
                    Ok(Some(p)) if p.metadata.uid.as_deref() == Some(uid) => {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    _ => return,
                }
            }
        }
    }
}
