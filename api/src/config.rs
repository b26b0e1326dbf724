//! The worker config: what the operator writes into the job's ConfigMap (and `local` mode into a
//! file) and the worker reads from `LOCKSTEP_CONFIG`. It is the job's spec minus everything that
//! only concerns Kubernetes, so every rank of a gang trains exactly the same thing; the digest
//! lets the rendezvous refuse a rank whose config differs.

use serde::{Deserialize, Serialize};

use crate::spec::{Monitoring, ParallelJob, Parallelism};
use crate::training::Training;
use crate::{Error, Result};

/// What every worker of a job reads at start.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerConfig {
    /// Name of the ParallelJob.
    pub job: String,
    /// Namespace of the ParallelJob (`default` in local mode).
    pub namespace: String,
    /// The gang's shape.
    pub parallelism: Parallelism,
    /// What to train.
    pub training: Training,
    /// Where to export metrics.
    pub monitoring: Monitoring,
    /// `spec.failurePolicy.progressTimeoutSeconds`: how long a rank may make no progress before
    /// rank 0 fails the gang.
    #[serde(default = "default_progress_timeout")]
    pub progress_timeout_seconds: u64,
}

fn default_progress_timeout() -> u64 {
    crate::spec::DEFAULT_PROGRESS_TIMEOUT_SECONDS as u64
}

impl WorkerConfig {
    /// The config of `job`. The job needs a name; its namespace defaults to `default`.
    pub fn from_job(job: &ParallelJob) -> Result<Self> {
        let name = job
            .metadata
            .name
            .clone()
            .ok_or_else(|| Error::Config("metadata.name is required".into()))?;
        Ok(Self {
            job: name,
            namespace: job
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            parallelism: job.spec.parallelism.clone(),
            training: job.spec.training.clone(),
            monitoring: job.spec.monitoring.clone(),
            progress_timeout_seconds: job.spec.failure_policy.progress_timeout_seconds.max(1)
                as u64,
        })
    }

    /// The config as the JSON text stored in the ConfigMap.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a WorkerConfig always serializes")
    }

    /// Parses a config written by [`WorkerConfig::to_json`]; unknown fields are refused, so an
    /// operator and a worker of different versions fail loudly instead of training something else.
    pub fn from_json(text: &str) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::Config(format!("worker config is not JSON: {e}")))?;
        crate::manifest::strict_from_value(&value)
            .map_err(|e| Error::Config(format!("worker config at {e}")))
    }

    /// A stable 64-bit FNV-1a digest of the config's JSON, as 16 hex digits. Not cryptographic:
    /// it detects ranks started with different configs, it does not authenticate them.
    pub fn digest(&self) -> String {
        let bytes = serde_json::to_vec(self).expect("a WorkerConfig always serializes");
        format!("{:016x}", fnv1a64(&bytes))
    }
}

/// The 64-bit FNV-1a hash of `bytes`: the one digest of the project (configs, gang keys,
/// parameters). Not cryptographic: it tells things apart, it does not authenticate them.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> ParallelJob {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/ddp-digits.yaml"
        ))
        .unwrap();
        crate::manifest::parse_job(&text).unwrap()
    }

    #[test]
    fn round_trips_and_refuses_unknown_fields() {
        let c = WorkerConfig::from_job(&job()).unwrap();
        assert_eq!(c.namespace, "default");
        assert_eq!(WorkerConfig::from_json(&c.to_json()).unwrap(), c);
        let mut v: serde_json::Value = serde_json::from_str(&c.to_json()).unwrap();
        v["training"]["learningRateTypo"] = 1.into();
        let err = WorkerConfig::from_json(&v.to_string())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("training") && err.contains("learningRateTypo"),
            "{err}"
        );
    }

    #[test]
    fn fnv1a64_matches_the_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn digest_is_stable_and_sensitive() {
        let c = WorkerConfig::from_job(&job()).unwrap();
        assert_eq!(c.digest(), c.clone().digest());
        assert_eq!(c.digest().len(), 16);
        let mut other = c.clone();
        other.training.seed += 1;
        assert_ne!(c.digest(), other.digest());
    }

    #[test]
    fn a_job_without_a_name_has_no_config() {
        let mut j = job();
        j.metadata.name = None;
        assert!(WorkerConfig::from_job(&j).is_err());
    }
}
