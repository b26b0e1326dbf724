//! `lockstep-worker run`: one rank of a gang, as the operator (or `local` mode) starts it. Reads
//! the env contract and the worker config, serves `/metrics`, meets the other ranks at the
//! rendezvous, sets up the collectives, trains, and exits with a documented code. When any rank
//! fails, rank 0 aborts the whole gang: every rank prints the first failure (rank and reason),
//! writes it to the container's termination message, and exits with `PeerFailed`.

use std::net::TcpListener;
use std::time::Duration;

use lockstep_api::config::WorkerConfig;
use lockstep_api::contract::{ExitCode, aborted, env};

use crate::auth::GangKeys;
use crate::comm::tcp::{TcpComm, TcpOptions};
use crate::error::WorkError;
use crate::metrics::Metrics;
use crate::rendezvous::{self, Identity, Session, describe};
use crate::trainer;
use crate::watchdog::Fault;
use lockstep_proto::v1::Failure;

/// Where Kubernetes reads a container's termination message from.
pub const TERMINATION_LOG: &str = "/dev/termination-log";

/// Timing of a run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Rendezvous and heartbeat timing.
    pub rendezvous: rendezvous::Options,
    /// Timeout of a collective's single send or receive.
    pub comm_timeout: Duration,
    /// How long rank 0 waits for the others to finish before it stops serving.
    pub finish_grace: Duration,
    /// How long after SIGTERM a rank that has not stopped exits anyway.
    pub stop_deadline: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            rendezvous: rendezvous::Options::default(),
            comm_timeout: Duration::from_secs(30),
            finish_grace: Duration::from_secs(30),
            stop_deadline: Duration::from_secs(10),
        }
    }
}

/// Leaves a one-line reason where `kubectl describe pod` (and the operator) can read it.
fn termination_message(message: &str) {
    let path = std::path::Path::new(TERMINATION_LOG);
    if path.exists() {
        let _ = std::fs::write(path, message);
    }
}

pub(crate) fn fail(code: ExitCode, message: &str) -> ExitCode {
    tracing::error!(exit_code = code.code(), reason = code.reason(), "{message}");
    termination_message(&format!("{}: {message}", code.reason()));
    code
}

/// Where a rank listens (rendezvous, data, metrics): on loopback only when rank 0 is on loopback
/// (`local` mode: nothing off this machine has any business with the gang), else everywhere.
pub fn bind_host(master_host: &str) -> std::net::IpAddr {
    let loopback = master_host == "localhost"
        || master_host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback {
        std::net::Ipv4Addr::LOCALHOST.into()
    } else {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    }
}

/// How a rank whose training failed with `e` exits, once the rendezvous has answered with the
/// gang's `first` failure: with its own code and words only when it is the first failure itself;
/// otherwise with `PeerFailed`, naming the first failure. A rank whose error blames a peer (it
/// lost rank 2 in an all-reduce) is never the cause, even when its report reached rank 0 first.
pub fn failure_exit(rank: u32, e: &WorkError, first: &Failure) -> (ExitCode, String) {
    if first.rank == rank && first.reported_by == rank {
        (e.code, format!("rank {rank} failed: {}", e.message))
    } else if first.rank == rank {
        (e.code, aborted::message(&describe(first)))
    } else {
        (ExitCode::PeerFailed, aborted::message(&describe(first)))
    }
}

/// Runs this process as one rank; returns its exit code.
pub fn run(opts: RunOptions) -> ExitCode {
    let contract = match env::RankEnv::from_lookup(|n| std::env::var(n).ok()) {
        Ok(c) => c,
        Err(e) => {
            return fail(
                ExitCode::Config,
                &format!("the env contract is incomplete: {e}"),
            );
        }
    };
    let Ok(token) = std::env::var(env::TOKEN) else {
        return fail(ExitCode::Config, &format!("{} is not set", env::TOKEN));
    };
    let config = match std::fs::read_to_string(&contract.config)
        .map_err(|e| format!("cannot read {}: {e}", contract.config))
        .and_then(|t| WorkerConfig::from_json(&t).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => return fail(ExitCode::Config, &e),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            return fail(
                ExitCode::Internal,
                &format!("cannot start the runtime: {e}"),
            );
        }
    };
    runtime.block_on(run_rank(contract, token, config, opts))
}

async fn run_rank(
    contract: env::RankEnv,
    token: String,
    config: WorkerConfig,
    mut opts: RunOptions,
) -> ExitCode {
    let rank = contract.rank;
    crate::checkpoint::set_stamp(crate::checkpoint::Stamp {
        job_uid: contract.job_uid.clone(),
        config_digest: config.digest(),
        attempt: contract.attempt,
    });
    opts.rendezvous.progress_timeout = Duration::from_secs(config.progress_timeout_seconds);
    let fault = match std::env::var(Fault::ENV) {
        Ok(spec) => match Fault::parse(&spec, rank) {
            Ok(f) => f,
            Err(e) => return fail(ExitCode::Usage, &e),
        },
        Err(_) => None,
    };
    let metrics = Metrics::new(&contract.job, rank);
    let host = bind_host(&contract.master_host);
    match tokio::net::TcpListener::bind((host, contract.metrics_port)).await {
        Ok(l) => {
            tokio::spawn(metrics.clone().serve(l));
        }
        Err(e) => tracing::warn!(port = contract.metrics_port, error = %e, "cannot serve /metrics"),
    }
    if metrics.sample_gpus(Duration::from_secs(5)) {
        tracing::info!("sampling GPUs through NVML");
    }
    let data = match TcpListener::bind((host, 0)) {
        Ok(l) => l,
        Err(e) => {
            return fail(
                ExitCode::Communication,
                &format!("cannot open a data port: {e}"),
            );
        }
    };
    let data_port = data.local_addr().map(|a| a.port()).unwrap_or(0);
    let me = Identity {
        rank,
        world_size: contract.world_size,
        attempt: contract.attempt,
        token: token.clone(),
        config_digest: config.digest(),
        // Rank 0 is reached at its stable name; rank 0 sees the others' addresses itself.
        host: if rank == 0 {
            contract.master_host.clone()
        } else {
            String::new()
        },
        data_port: u32::from(data_port),
    };
    let session = if rank == 0 {
        let listener = match tokio::net::TcpListener::bind((host, contract.rendezvous_port)).await {
            Ok(l) => l,
            Err(e) => {
                return fail(
                    ExitCode::Rendezvous,
                    &format!(
                        "cannot serve the rendezvous on port {}: {e}",
                        contract.rendezvous_port
                    ),
                );
            }
        };
        Session::serve(
            listener,
            me,
            crate::device::nccl_id(&config),
            opts.rendezvous.clone(),
        )
        .await
    } else {
        Session::join(&contract.rendezvous(), me, opts.rendezvous.clone()).await
    };
    let session = match session {
        Ok(s) => s,
        Err(e) => return fail(ExitCode::Rendezvous, &e.to_string()),
    };
    let addrs = session
        .world()
        .peers
        .iter()
        .map(|p| format!("{}:{}", p.host, p.data_port))
        .collect();
    tracing::info!(
        rank,
        world = contract.world_size,
        attempt = contract.attempt,
        "gang formed"
    );
    let nccl_id = session.world().nccl_id.clone();
    let activity = session.activity();
    activity.inject(fault);
    let comm = match TcpComm::new(
        rank as usize,
        addrs,
        data,
        GangKeys::derive(&token, contract.attempt),
        TcpOptions {
            timeout: opts.comm_timeout,
            activity,
            ..TcpOptions::default()
        },
    ) {
        Ok(c) => c,
        Err(e) => return fail(ExitCode::Communication, &e.to_string()),
    };

    // When the gang is aborted, stop at once: the first failure is named, never a secondary one.
    let abort = session.aborted();
    tokio::spawn(async move {
        let f = abort.await;
        let code = if f.rank != rank {
            ExitCode::PeerFailed
        } else {
            // Rank 0 judged this rank stuck (see `watchdog`): the code it chose.
            ExitCode::from_code(f.exit_code)
                .filter(|c| *c != ExitCode::Success)
                .unwrap_or(ExitCode::Internal)
        };
        // A rank rank 0 judged stuck reports its own failure; the others, the gang's abort.
        let message = if f.rank == rank {
            describe(&f)
        } else {
            aborted::message(&describe(&f))
        };
        let code = fail(code, &message);
        if rank == 0 {
            // Rank 0 serves the abort: give its streams a moment to carry it to every rank, so
            // that none mistakes the end of the server for the failure.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        std::process::exit(code.code());
    });

    // Rank 0 in a pod reports progress to the operator (see `progress`).
    let replicas = config.parallelism.data_parallel.max(1) as u32;
    let reporter = if rank == 0 && std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        match kube::Client::try_default().await {
            Ok(client) => {
                tokio::spawn(crate::progress::report_periodically(
                    client.clone(),
                    contract.namespace.clone(),
                    contract.job.clone(),
                    metrics.clone(),
                    replicas,
                    contract.attempt,
                ));
                Some(client)
            }
            Err(e) => {
                tracing::warn!(error = %e, "no API access: progress is not reported");
                None
            }
        }
    } else {
        None
    };
    let final_metrics = metrics.clone();

    // SIGTERM (a delete, a gang restart, a suspend, a drain): the trainer stops the gang after
    // the step in progress, writing a checkpoint first; a rank that cannot get there (still at
    // the rendezvous, stuck in a collective) exits when the stop deadline passes.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            let stop = std::sync::Arc::clone(&stop);
            let deadline = opts.stop_deadline;
            tokio::spawn(async move {
                if term.recv().await.is_none() {
                    return;
                }
                tracing::warn!(
                    deadline_s = deadline.as_secs_f64(),
                    "SIGTERM: stopping the gang after this step"
                );
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(deadline).await;
                let code = fail(
                    ExitCode::Terminated,
                    &format!(
                        "stopped by SIGTERM: training did not stop within {} s",
                        deadline.as_secs()
                    ),
                );
                std::process::exit(code.code());
            });
        }
        Err(e) => tracing::warn!(error = %e, "cannot handle SIGTERM"),
    }

    // Held until a failure is reported (see `Connections`).
    let connections = comm.connections();
    let session = std::sync::Arc::new(session);
    let steps = std::sync::Arc::clone(&session);
    let checkpoint_dir = contract.checkpoint_dir.clone();
    let work = tokio::task::spawn_blocking(move || {
        let inputs = trainer::RunInputs {
            checkpoint_dir: Some(std::path::PathBuf::from(&checkpoint_dir)),
            nccl_id,
            on_step: &|s| steps.set_step(s),
            stop: &stop,
        };
        trainer::run(&config, comm, &metrics, &inputs)
    })
    .await;
    let result = work.unwrap_or_else(|e| {
        Err(WorkError::new(
            ExitCode::Internal,
            format!("the training thread panicked: {e}"),
        ))
    });
    match result {
        Ok(summary) => {
            tracing::info!(
                rank,
                steps = summary.steps,
                loss = summary.loss,
                eval_accuracy = summary.eval_accuracy,
                val_loss = summary.val_loss,
                resumed_from = summary.resumed_from,
                train_s = summary.train_seconds,
                tokens_per_s = summary.tokens as f64 / summary.train_seconds.max(1e-9),
                comm_s = summary.comm.comm.as_secs_f64(),
                exposed_comm_s = summary.comm.exposed.as_secs_f64(),
                overlap = summary.comm.overlap_ratio(),
                params_digest = format!("{:016x}", summary.params_digest),
                "training finished"
            );
            if let Some(client) = &reporter {
                let p = crate::progress::from_metrics(&final_metrics, replicas, contract.attempt);
                if let Err(e) =
                    crate::progress::report(client, &contract.namespace, &contract.job, &p).await
                {
                    tracing::warn!(error = %e, "cannot report the final progress");
                }
            }
            if let Ok(session) = std::sync::Arc::try_unwrap(session) {
                session.finish(opts.finish_grace).await;
            }
            ExitCode::Success
        }
        Err(e) if e.code == ExitCode::Terminated => {
            // Every rank agreed to stop after the same step: end the membership as on success,
            // so that no rank takes the others' exit for a failure.
            if let Ok(session) = std::sync::Arc::try_unwrap(session) {
                session
                    .finish(opts.finish_grace.min(opts.stop_deadline))
                    .await;
            }
            fail(ExitCode::Terminated, &e.message)
        }
        Err(e) => {
            let blamed = e.blame.unwrap_or(rank);
            // With this rank's own exit code when it is the failed rank: the abort that comes
            // back to this rank (see above) then exits with the same code as this path, whichever
            // of the two ends the process first.
            let code = if blamed == rank { e.code.code() } else { 0 };
            let first = session.report(blamed, e.message.clone(), code).await;
            let (code, message) = failure_exit(rank, &e, &first);
            let code = fail(code, &message);
            if rank == 0 {
                // Rank 0 serves the abort: give its streams a moment to carry it to every rank
                // (as the abort task does), so that none mistakes the end of the server for the
                // failure.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            drop(connections);
            code
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(rank: u32, reported_by: u32) -> Failure {
        Failure {
            rank,
            reason: "lost rank 2 during all_reduce: connection reset".into(),
            reported_by,
            ..Failure::default()
        }
    }

    #[test]
    fn a_rank_that_blames_a_peer_exits_peer_failed_even_when_it_reported_first() {
        // Rank 0 lost rank 2 in a collective and its report was the gang's first failure.
        let mut e = WorkError::new(ExitCode::Communication, "lost rank 2 during all_reduce");
        e.blame = Some(2);
        let (code, message) = failure_exit(0, &e, &failure(2, 0));
        assert_eq!(code, ExitCode::PeerFailed);
        assert!(
            message.starts_with("gang aborted: rank 2 failed"),
            "{message}"
        );
    }

    #[test]
    fn the_first_failure_exits_with_its_own_code_and_others_name_it() {
        let e = WorkError::new(ExitCode::Data, "bad line 7");
        let (code, message) = failure_exit(1, &e, &failure(1, 1));
        assert_eq!(code, ExitCode::Data);
        assert_eq!(message, "rank 1 failed: bad line 7");
        // Another rank failed first: this one is secondary.
        let (code, message) = failure_exit(3, &e, &failure(1, 1));
        assert_eq!(code, ExitCode::PeerFailed);
        assert!(message.contains("rank 1 failed"), "{message}");
        // Rank 0 noticed this rank's failure first (its heartbeat stopped): still its own code.
        let (code, _) = failure_exit(1, &e, &failure(1, 0));
        assert_eq!(code, ExitCode::Data);
    }
}
