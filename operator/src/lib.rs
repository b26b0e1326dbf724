//! The Lockstep operator: the single controller of every ParallelJob.
//!
//! - [`controller`]: watches and wiring; reconcile = read, decide, apply (server-side apply),
//!   report status.
//! - [`decide`]: the pure phase machine and failure policy.
//! - [`observe`]: worker pods reduced to per-rank facts, and ranks on lost nodes.
//! - [`job`]: what the operator reads of a ParallelJob in more than one place.
//! - [`pods`]: the pod cache: every gang's pods from one watch, with expectations of the
//!   operator's own writes.
//! - [`gang`]: gang admission (capacity snapshot, queue, placement) for the Builtin policy.
//! - [`resources`]: pure builders of the owned objects (Service, ConfigMap, worker pods).
//! - [`network_policy`]: the pure builder of each job's NetworkPolicy for its workers.
//! - [`metrics`]: Prometheus metrics and the health endpoints.
//! - [`leader`]: leader election on a Lease, so one of several replicas acts.
//! - [`ratelimit`]: the client's limit on requests per second to the API server.
//! - [`quota`]: ResourceQuota refusals: which are a wait (usage) and which a broken template.
//! - [`backoff`]: exponential backoff for failed passes and quota waits.

pub mod backoff;
pub mod controller;
pub mod decide;
pub mod gang;
pub mod job;
pub mod kueue;
pub mod leader;
pub mod metrics;
pub mod network_policy;
pub mod observe;
pub mod ownership;
pub mod pods;
pub mod quota;
pub mod ratelimit;
pub mod resources;

/// Errors of the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A field the operator needs is missing.
    #[error("{0} is missing")]
    MissingField(&'static str),
    /// The template has no container the operator can fill in.
    #[error("spec.template has no container named 'worker' (and more than one container)")]
    NoWorkerContainer,
    /// The job's spec is invalid for the API crate.
    #[error(transparent)]
    Api(#[from] lockstep_api::Error),
    /// A call to the API server failed.
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    /// The API of the external gang scheduler `gangPolicy` names is not served.
    #[error("{0} is not served by this cluster")]
    GangApiMissing(String),
    /// The operator may not use the API of the external gang scheduler (the API named, and the
    /// API server's words): its RBAC lacks the rights.
    #[error("the operator may not use {0}: {1}")]
    GangApiForbidden(String, String),
    /// Serializing an object failed.
    #[error("serialization: {0}")]
    Serde(#[from] serde_json::Error),
    /// Reading an object before writing it failed (a write's refusal is [`Error::Kube`]).
    #[error("kubernetes: reading an object before writing it: {0}")]
    Read(kube::Error),
    /// An object of the job changed between the read and the write that named its
    /// resourceVersion (or went): the next pass looks again.
    #[error("{0} changed while it was written; looked at again")]
    Changed(String),
    /// Objects with names the job needs exist and are not its own (see [`ownership`]).
    #[error("{}", ownership::explain(.0))]
    NotOwned(Vec<ownership::Foreign>),
}

impl Error {
    /// A stable, low-cardinality category for metric labels and Event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Error::MissingField(_) | Error::NoWorkerContainer | Error::Api(_) => "invalid_spec",
            Error::Kube(_) | Error::Read(_) => "kubernetes",
            Error::Changed(_) => "conflict",
            Error::GangApiMissing(_) => "gang_api_missing",
            Error::GangApiForbidden(..) => "gang_api_forbidden",
            Error::Serde(_) => "serialization",
            Error::NotOwned(_) => "not_owned",
        }
    }
}

/// Result with the operator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
