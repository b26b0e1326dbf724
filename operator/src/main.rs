//! `lockstep-operator`: reconciles every ParallelJob of the cluster its kubeconfig (or in-cluster
//! service account) points at.
//!
//!     lockstep-operator [--concurrency N] [--metrics-addr HOST:PORT] [--no-leader-elect]
//!                       [--lease-namespace NS] [--lease-name NAME] [--controller-name NAME]
//!                       [--namespace NS] [--worker-metrics-from JSON] [--no-worker-network-policy]
//!
//! With `--namespace`, only the jobs of that namespace are reconciled (and only its worker pods
//! and progress ConfigMaps watched), so the operator needs write rights there alone; nodes,
//! PriorityClasses and every pod's requests are still read cluster-wide, for gang admission.
//!
//! With leader election (the default) the replica that holds the Lease `--lease-name` (default
//! `lockstep-operator`) in `--lease-namespace` (default `$POD_NAMESPACE`, else `default`) acts;
//! the others wait. A leader that cannot renew exits with code 3 so it restarts as a follower.
//!
//! Every job gets a NetworkPolicy `<job>-workers` (owned by the job) that admits to its worker
//! pods only the same job's pods (every port) and, on the metrics port, the peers of
//! `--worker-metrics-from` (a JSON list of NetworkPolicyPeer; default `[]`: no scraper). It is
//! enforced only where the network plugin enforces NetworkPolicies (elsewhere an inert object);
//! `--no-worker-network-policy` makes none (policies made before stay, and go with their jobs).
//!
//! `/metrics`, `/healthz` and `/readyz` are served on `--metrics-addr` (default `0.0.0.0:8080`).
//!
//! Logs are JSON lines when `LOG_FORMAT=json`, else human-readable; `RUST_LOG` filters them.

use anyhow::Context as _;
use lockstep_operator::controller::{Settings, run};
use lockstep_operator::leader::{LeaderElector, Stopped, lead};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,kube=warn".into());
    if std::env::var("LOG_FORMAT").is_ok_and(|f| f == "json") {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let mut settings = Settings::default();
    let mut metrics_addr = "0.0.0.0:8080".to_string();
    let mut leader_elect = true;
    let mut lease_namespace = std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "default".into());
    let mut lease_name = "lockstep-operator".to_string();
    // client-go's defaults for controllers are 20 and 30; an operator that creates whole gangs of
    // hundreds of pods at once needs more.
    let mut qps = lockstep_operator::ratelimit::DEFAULT_QPS;
    let mut burst = lockstep_operator::ratelimit::DEFAULT_BURST;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--concurrency" => {
                settings.concurrency = args
                    .next()
                    .context("--concurrency needs a number")?
                    .parse()
                    .context("--concurrency")?;
            }
            "--no-leader-elect" => leader_elect = false,
            "--lease-namespace" => {
                lease_namespace = args.next().context("--lease-namespace needs a namespace")?
            }
            "--lease-name" => lease_name = args.next().context("--lease-name needs a name")?,
            "--namespace" => {
                settings.namespace = Some(args.next().context("--namespace needs a namespace")?);
            }
            "--worker-metrics-from" => {
                let json = args
                    .next()
                    .context("--worker-metrics-from needs a JSON list of NetworkPolicyPeer")?;
                settings.worker_metrics_from = serde_json::from_str(&json)
                    .context("--worker-metrics-from: a JSON list of NetworkPolicyPeer")?;
            }
            "--no-worker-network-policy" => settings.worker_network_policy = false,
            "--controller-name" => {
                settings.controller_name = args.next().context("--controller-name needs a name")?;
            }
            "--kube-api-qps" => {
                qps = args
                    .next()
                    .context("--kube-api-qps needs a number")?
                    .parse()
                    .context("--kube-api-qps")?;
            }
            "--kube-api-burst" => {
                burst = args
                    .next()
                    .context("--kube-api-burst needs a number")?
                    .parse()
                    .context("--kube-api-burst")?;
            }
            "--metrics-addr" => {
                metrics_addr = args.next().context("--metrics-addr needs HOST:PORT")?;
            }
            "-h" | "--help" => {
                eprintln!(
                    "usage: lockstep-operator [--concurrency N] [--metrics-addr HOST:PORT] [--no-leader-elect] \
                     [--lease-namespace NS] [--lease-name NAME] [--controller-name NAME] \
                     [--namespace NS (default: every namespace)] \
                     [--kube-api-qps Q (500; 0 = unlimited)] [--kube-api-burst B (1000)] \
                     [--worker-metrics-from JSON (NetworkPolicyPeer list; [] = no scraper)] \
                     [--no-worker-network-policy]"
                );
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other:?} (try --help)"),
        }
    }
    if let Ok(pod) = std::env::var("POD_NAME") {
        settings.instance = pod;
    }
    let config = kube::Config::infer()
        .await
        .context("finding the API server (KUBECONFIG or in-cluster)")?;
    let client = kube::client::ClientBuilder::try_from(config)
        .context("building the API client")?
        .with_layer(&lockstep_operator::ratelimit::RateLimitLayer::new(
            qps, burst,
        ))
        .build();
    let metrics = std::sync::Arc::new(lockstep_operator::metrics::Metrics::new());
    let listener = tokio::net::TcpListener::bind(&metrics_addr)
        .await
        .with_context(|| format!("binding the metrics endpoint {metrics_addr}"))?;
    tokio::spawn(metrics.clone().serve(listener));
    tracing::info!(
        concurrency = settings.concurrency,
        metrics = %metrics_addr,
        namespace = settings.namespace.as_deref().unwrap_or("(all)"),
        worker_network_policy = settings.worker_network_policy,
        worker_metrics_from = settings.worker_metrics_from.len(),
        "lockstep-operator starting"
    );
    // Followers are ready too: a rollout must not wait for a replica that is not leading.
    metrics.set_ready(true);
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    if leader_elect {
        let leases = kube::Api::namespaced(client.clone(), &lease_namespace);
        let elector = LeaderElector::new(
            leases,
            &lease_name,
            &settings.instance,
            std::time::Duration::from_secs(15),
        );
        if lead(elector, client, settings, metrics, shutdown).await? == Stopped::LostLeadership {
            std::process::exit(3);
        }
    } else {
        run(client, settings, metrics, shutdown).await;
    }
    tracing::info!("lockstep-operator stopped");
    Ok(())
}
