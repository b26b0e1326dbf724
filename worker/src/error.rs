//! [`WorkError`]: why a rank stopped training, as an exit code of the contract, a message and the
//! rank it blames.

use lockstep_api::contract::ExitCode;
use lockstep_engine::EngineError;

use crate::checkpoint::CheckpointError;
use crate::comm::CommError;

/// Why training stopped early: the exit code, a message, and the rank it blames if another.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct WorkError {
    /// The worker's exit code.
    pub code: ExitCode,
    /// What happened, in words a person can act on.
    pub message: String,
    /// The rank that caused it, when it is another rank (a lost peer).
    pub blame: Option<u32>,
}

impl WorkError {
    /// An error of this rank.
    pub fn new(code: ExitCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            blame: None,
        }
    }

    /// A job the worker cannot run as configured (exit code `Config`).
    pub fn config(message: impl Into<String>) -> Self {
        Self::new(ExitCode::Config, message)
    }
}

impl From<CommError> for WorkError {
    fn from(e: CommError) -> Self {
        Self {
            code: ExitCode::Communication,
            blame: e.peer().map(|p| p as u32),
            message: e.to_string(),
        }
    }
}

impl From<EngineError> for WorkError {
    fn from(e: EngineError) -> Self {
        let code = match e {
            EngineError::Config(_) => ExitCode::Config,
            EngineError::Device { .. } => ExitCode::Internal,
        };
        Self::new(code, e.to_string())
    }
}

impl From<CheckpointError> for WorkError {
    fn from(e: CheckpointError) -> Self {
        let code = match e {
            CheckpointError::Refused { .. } => ExitCode::Checkpoint,
            // The pod's volume or securityContext: restarting cannot help.
            CheckpointError::Unwritable { .. } => ExitCode::Config,
            // A full or unmounted volume: the job may succeed once it is fixed.
            CheckpointError::Io { .. } => ExitCode::Internal,
        };
        Self::new(code, e.to_string())
    }
}

impl From<crate::hf::HfError> for WorkError {
    fn from(e: crate::hf::HfError) -> Self {
        use crate::hf::HfError;
        match e {
            HfError::Checkpoint(c) => c.into(),
            HfError::Engine(e) => e.into(),
            // A path or a model that does not fit the job: restarting cannot help.
            HfError::Invalid(_) | HfError::Io { .. } | HfError::FlatFormat(_) => {
                Self::new(ExitCode::Config, e.to_string())
            }
        }
    }
}
