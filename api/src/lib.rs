//! The `ParallelJob` API of Lockstep and the contract shared by the operator and the worker.
//!
//! - [`spec`] and [`training`]: the resource's spec; [`status`]: its status, condition types and
//!   reasons.
//! - [`crd`]: the generated CustomResourceDefinition; [`validation`]: the same rules client-side.
//! - [`manifest`]: reading a manifest from YAML with errors that name the field.
//! - [`contract`]: env names, labels, annotations, ports and exit codes; [`layout`]: which rank is
//!   which stage and replica; [`config`]: the config file every worker reads.

pub mod config;
pub mod contract;
pub mod crd;
pub mod layout;
pub mod manifest;
pub mod schema;
pub mod spec;
pub mod status;
pub mod training;
pub mod validation;

pub use spec::{ParallelJob, ParallelJobSpec};
pub use status::ParallelJobStatus;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The text is not valid YAML.
    #[error("invalid YAML: {0}")]
    Yaml(String),
    /// A field has the wrong type or value, is missing or unknown.
    #[error("{path}: {message}")]
    Field {
        /// Path of the field, for example `spec.parallelism.dataParallel`.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// The manifest breaks rules of the schema or its CEL rules (every violation is listed).
    #[error("invalid ParallelJob:\n{}", .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<validation::FieldError>),
    /// A parallelism layout is impossible.
    #[error("invalid layout: {0}")]
    Layout(String),
    /// The worker config is invalid.
    #[error("invalid worker config: {0}")]
    Config(String),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
