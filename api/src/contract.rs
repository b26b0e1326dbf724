//! The contract between the operator and the worker: environment variable names, labels,
//! annotations, ports, paths and exit codes. Both sides (and `local` mode) use these constants
//! and nothing else, so a name is spelled in exactly one place.

/// Environment variables the operator sets on every worker container (and `local` mode sets on
/// every process).
pub mod env {
    /// Name of the ParallelJob.
    pub const JOB: &str = "LOCKSTEP_JOB";
    /// UID of the ParallelJob (`local` mode: `local`): recorded in every checkpoint, so that a job
    /// never resumes from another's, even one of the same name. Optional, for a worker image newer
    /// than its operator: unset, no checkpoint is checked for its job.
    pub const JOB_UID: &str = "LOCKSTEP_JOB_UID";
    /// Namespace of the ParallelJob.
    pub const NAMESPACE: &str = "LOCKSTEP_NAMESPACE";
    /// This process's global rank, `0..WORLD_SIZE`.
    pub const RANK: &str = "LOCKSTEP_RANK";
    /// Number of ranks in the gang.
    pub const WORLD_SIZE: &str = "LOCKSTEP_WORLD_SIZE";
    /// The gang's attempt (0 for the first run, incremented by every gang restart).
    pub const ATTEMPT: &str = "LOCKSTEP_ATTEMPT";
    /// `host:port` of rank 0's rendezvous server.
    pub const RENDEZVOUS: &str = "LOCKSTEP_RENDEZVOUS";
    /// Path of the worker config file ([`crate::config::WorkerConfig`] as JSON).
    pub const CONFIG: &str = "LOCKSTEP_CONFIG";
    /// Directory where checkpoints are written and read.
    pub const CHECKPOINT_DIR: &str = "LOCKSTEP_CHECKPOINT_DIR";
    /// Port of the worker's Prometheus `/metrics` endpoint.
    pub const METRICS_PORT: &str = "LOCKSTEP_METRICS_PORT";
    /// The job-scoped secret a rank presents to the rendezvous (from the job's Secret; generated
    /// by `local` mode), so that no pod of another job can join the gang.
    pub const TOKEN: &str = "LOCKSTEP_TOKEN";
    /// Pipeline stage of this rank (see [`crate::layout`]).
    pub const STAGE: &str = "LOCKSTEP_STAGE";
    /// Data-parallel replica index of this rank (see [`crate::layout`]).
    pub const REPLICA: &str = "LOCKSTEP_REPLICA";

    /// Ranks of the gang on this machine, set by `local` mode only (unset in a pod, which runs
    /// one rank): the ranks divide the machine's GPUs among themselves, sharing them when
    /// there are fewer GPUs than ranks.
    pub const LOCAL_RANKS: &str = "LOCKSTEP_LOCAL_RANKS";

    /// PyTorch `torch.distributed` convention: host of rank 0.
    pub const MASTER_ADDR: &str = "MASTER_ADDR";
    /// PyTorch convention: port of rank 0's store.
    pub const MASTER_PORT: &str = "MASTER_PORT";
    /// PyTorch convention: number of processes.
    pub const TORCH_WORLD_SIZE: &str = "WORLD_SIZE";
    /// PyTorch convention: global rank.
    pub const TORCH_RANK: &str = "RANK";
    /// PyTorch convention: rank within the node (always 0: one worker process per pod).
    pub const LOCAL_RANK: &str = "LOCAL_RANK";

    /// torchrun: number of nodes (pods).
    pub const PET_NNODES: &str = "PET_NNODES";
    /// torchrun: processes per node.
    pub const PET_NPROC_PER_NODE: &str = "PET_NPROC_PER_NODE";
    /// torchrun: this node's rank.
    pub const PET_NODE_RANK: &str = "PET_NODE_RANK";
    /// torchrun: host of the master node.
    pub const PET_MASTER_ADDR: &str = "PET_MASTER_ADDR";
    /// torchrun: port of the master node.
    pub const PET_MASTER_PORT: &str = "PET_MASTER_PORT";

    /// Prefixes of names the user may not set in the pod template: the operator owns them.
    pub const RESERVED_PREFIXES: &[&str] = &["LOCKSTEP_", "PET_"];
    /// Exact names the user may not set in the pod template.
    pub const RESERVED_NAMES: &[&str] = &[
        MASTER_ADDR,
        MASTER_PORT,
        TORCH_WORLD_SIZE,
        TORCH_RANK,
        LOCAL_RANK,
    ];

    /// Whether the operator owns `name`, so that a user may not set it.
    pub fn is_reserved(name: &str) -> bool {
        RESERVED_PREFIXES.iter().any(|p| name.starts_with(p)) || RESERVED_NAMES.contains(&name)
    }

    /// The values of the env contract for one rank (all but [`TOKEN`], which comes from a
    /// Secret). The operator and `local` mode both set exactly [`RankEnv::pairs`]; the worker
    /// reads it back with [`RankEnv::from_lookup`].
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct RankEnv {
        /// Name of the ParallelJob.
        pub job: String,
        /// UID of the ParallelJob.
        pub job_uid: String,
        /// Namespace of the ParallelJob.
        pub namespace: String,
        /// Global rank.
        pub rank: u32,
        /// World size.
        pub world_size: u32,
        /// Gang attempt.
        pub attempt: u32,
        /// Host of rank 0 (its stable DNS name, or 127.0.0.1 in `local` mode).
        pub master_host: String,
        /// Port of rank 0's rendezvous.
        pub rendezvous_port: u16,
        /// Port of rank 0's `torch.distributed` store (`MASTER_PORT`).
        pub torch_port: u16,
        /// Path of the worker config.
        pub config: String,
        /// Checkpoint directory.
        pub checkpoint_dir: String,
        /// Port of this rank's `/metrics`.
        pub metrics_port: u16,
        /// Pipeline stage of this rank.
        pub stage: u32,
        /// Data-parallel replica index of this rank.
        pub replica: u32,
    }

    impl RankEnv {
        /// `(name, value)` of every variable, in a fixed order.
        pub fn pairs(&self) -> Vec<(&'static str, String)> {
            let (world, rank) = (self.world_size.to_string(), self.rank.to_string());
            vec![
                (JOB, self.job.clone()),
                (JOB_UID, self.job_uid.clone()),
                (NAMESPACE, self.namespace.clone()),
                (RANK, rank.clone()),
                (WORLD_SIZE, world.clone()),
                (ATTEMPT, self.attempt.to_string()),
                (RENDEZVOUS, self.rendezvous()),
                (CONFIG, self.config.clone()),
                (CHECKPOINT_DIR, self.checkpoint_dir.clone()),
                (METRICS_PORT, self.metrics_port.to_string()),
                (STAGE, self.stage.to_string()),
                (REPLICA, self.replica.to_string()),
                (MASTER_ADDR, self.master_host.clone()),
                (MASTER_PORT, self.torch_port.to_string()),
                (TORCH_WORLD_SIZE, world.clone()),
                (TORCH_RANK, rank.clone()),
                (LOCAL_RANK, "0".into()),
                (PET_NNODES, world),
                (PET_NPROC_PER_NODE, "1".into()),
                (PET_NODE_RANK, rank),
                (PET_MASTER_ADDR, self.master_host.clone()),
                (PET_MASTER_PORT, self.torch_port.to_string()),
            ]
        }

        /// `host:port` of rank 0's rendezvous.
        pub fn rendezvous(&self) -> String {
            format!("{}:{}", self.master_host, self.rendezvous_port)
        }

        /// Reads the contract through `get` (usually `std::env::var`); the error names the
        /// variable that is missing or malformed.
        pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
            let text = |name: &str| get(name).ok_or_else(|| format!("{name} is not set"));
            fn num<T: std::str::FromStr>(name: &str, v: String) -> Result<T, String> {
                v.parse()
                    .map_err(|_| format!("{name}={v:?} is not a valid number"))
            }
            let rdzv = text(RENDEZVOUS)?;
            let (host, port) = rdzv
                .rsplit_once(':')
                .ok_or_else(|| format!("{RENDEZVOUS}={rdzv:?} is not host:port"))?;
            let env = Self {
                job: text(JOB)?,
                job_uid: get(JOB_UID).unwrap_or_default(),
                namespace: text(NAMESPACE)?,
                rank: num(RANK, text(RANK)?)?,
                world_size: num(WORLD_SIZE, text(WORLD_SIZE)?)?,
                attempt: num(ATTEMPT, text(ATTEMPT)?)?,
                master_host: host.to_string(),
                rendezvous_port: num(RENDEZVOUS, port.to_string())?,
                torch_port: num(MASTER_PORT, text(MASTER_PORT)?)?,
                config: text(CONFIG)?,
                checkpoint_dir: text(CHECKPOINT_DIR)?,
                metrics_port: num(METRICS_PORT, text(METRICS_PORT)?)?,
                stage: num(STAGE, text(STAGE)?)?,
                replica: num(REPLICA, text(REPLICA)?)?,
            };
            if env.world_size == 0 || env.rank >= env.world_size {
                return Err(format!(
                    "{RANK}={} is not below {WORLD_SIZE}={}",
                    env.rank, env.world_size
                ));
            }
            Ok(env)
        }
    }
}

/// Label keys put on every object the operator owns. The `app.kubernetes.io/*` ones follow the
/// Kubernetes recommended labels.
pub mod labels {
    /// Name of the owning ParallelJob.
    pub const JOB_NAME: &str = "lockstep.dev/job-name";
    /// UID of the owning ParallelJob: a job deleted with its objects orphaned and created again
    /// under its name has another, so objects of the two are told apart by it (and by their
    /// controller reference), never by name.
    pub const JOB_UID: &str = "lockstep.dev/job-uid";
    /// Global rank of a worker pod.
    pub const RANK: &str = "lockstep.dev/rank";
    /// Pipeline stage of a worker pod.
    pub const STAGE: &str = "lockstep.dev/stage";
    /// Data-parallel replica index of a worker pod.
    pub const REPLICA: &str = "lockstep.dev/replica";
    /// Gang attempt that created the object.
    pub const ATTEMPT: &str = "lockstep.dev/attempt";
    /// `app.kubernetes.io/name`: always [`APP_NAME`].
    pub const APP_NAME_KEY: &str = "app.kubernetes.io/name";
    /// Value of `app.kubernetes.io/name`.
    pub const APP_NAME: &str = "lockstep";
    /// `app.kubernetes.io/instance`: the job name.
    pub const INSTANCE: &str = "app.kubernetes.io/instance";
    /// `app.kubernetes.io/component`: `worker` for worker pods.
    pub const COMPONENT: &str = "app.kubernetes.io/component";
    /// `app.kubernetes.io/managed-by`: the operator's name.
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
}

/// Annotation keys.
pub mod annotations {
    /// Digest of the worker config, so a pod records which config it was started with.
    pub const CONFIG_DIGEST: &str = "lockstep.dev/config-digest";
    /// Node a rank was planned onto by gang admission.
    pub const PLANNED_NODE: &str = "lockstep.dev/planned-node";
    /// On a ParallelJob: set to a new value (`kubectl lockstep restart` writes the time, as
    /// `kubectl rollout restart` does) to restart the gang as a new attempt from the last
    /// checkpoint; the value acted on is recorded in `status.restartedAt`. A requested restart
    /// does not count against `failurePolicy.maxRestarts`.
    pub const RESTARTED_AT: &str = "lockstep.dev/restarted-at";
    /// On an object the operator applies for a job (Service, ConfigMap, ServiceAccount, Role,
    /// RoleBinding, NetworkPolicy, EndpointSlice, gang objects): a hash of the body it last
    /// applied, so that an unchanged object is not written again.
    pub const APPLIED_HASH: &str = "lockstep.dev/applied-hash";
}

/// Names used by the operator when it acts on the cluster.
pub mod operator {
    /// The field manager for every server-side apply the operator makes.
    pub const FIELD_MANAGER: &str = "lockstep-operator";
    /// Value of `spec.managedBy` meaning "the Lockstep operator reconciles this job".
    pub const CONTROLLER_NAME: &str = "lockstep.dev/operator";
    /// Scheduling gate that holds a gang's pods until the gang is admitted as a whole.
    pub const SCHEDULING_GATE: &str = "lockstep.dev/gang";
    /// Name of the container the operator fills in with the env contract.
    pub const WORKER_CONTAINER: &str = "worker";
    /// Key of the worker config in the job's ConfigMap.
    pub const CONFIG_KEY: &str = "worker.json";
    /// Directory where the ConfigMap is mounted in worker pods.
    pub const CONFIG_MOUNT_DIR: &str = "/etc/lockstep";
}

/// Names of the objects a job owns besides its pods, which the worker also needs to know.
pub mod names {
    /// The Secret holding the rendezvous token (key [`TOKEN_KEY`]) of the job `job` with UID
    /// `uid`. The UID is in the name: the operator may create Secrets but not read them, so it
    /// cannot check whose a Secret it finds under a name is; no object made before the job
    /// existed (an orphan of an earlier job of that name, a user's) can have this one.
    pub fn token_secret(job: &str, uid: &str) -> String {
        format!("{job}-token-{uid}")
    }

    /// Key of the token in the token Secret.
    pub const TOKEN_KEY: &str = "token";

    /// The ConfigMap rank 0 writes its progress into (key [`PROGRESS_KEY`]); the operator
    /// reflects it in `status.progress`.
    pub fn progress_config_map(job: &str) -> String {
        format!("{job}-progress")
    }

    /// Key of the progress (a JSON [`crate::status::Progress`]) in the progress ConfigMap.
    pub const PROGRESS_KEY: &str = "progress.json";

    /// Value of `app.kubernetes.io/component` on the progress ConfigMap.
    pub const PROGRESS_COMPONENT: &str = "progress";

    /// Seconds between two progress reports of rank 0.
    pub const PROGRESS_INTERVAL_SECONDS: u64 = 5;

    /// The ServiceAccount of a job's pods when the template names none: it may only write the
    /// job's progress ConfigMap.
    pub fn worker_service_account(job: &str) -> String {
        format!("{job}-worker")
    }

    /// The Role (and RoleBinding) that lets the worker write its progress.
    pub fn progress_role(job: &str) -> String {
        format!("{job}-progress-writer")
    }
}

/// Default ports.
pub mod ports {
    /// Rank 0's Lockstep rendezvous (gRPC).
    pub const RENDEZVOUS: u16 = 29600;
    /// `MASTER_PORT` for `torch.distributed` (Kubeflow Trainer v2's default).
    pub const TORCH_MASTER: u16 = 29500;
    /// Worker `/metrics`.
    pub const METRICS: u16 = 9450;
}

/// Default paths.
pub mod paths {
    /// Default checkpoint directory inside a worker pod.
    pub const CHECKPOINT_DIR: &str = "/var/lib/lockstep/checkpoints";

    /// Where a job keeps its checkpoints under `spec.training.checkpoint.path` (`base`): a folder
    /// per job and UID, `<base>/<job>/<uid>`, so that jobs sharing a volume never read or delete
    /// each other's files, nor a new job those of an earlier one of the same name.
    pub fn job_checkpoints(base: &str, job: &str, uid: &str) -> String {
        format!("{}/{job}/{uid}", base.trim_end_matches('/'))
    }
}

/// The termination message of a rank that stopped because its gang aborted, as the worker writes
/// it and the operator reads it: `<reason>: gang aborted: rank <R> failed: <why>`, where R is the
/// rank the rendezvous holds for the gang's first failure (rank 0 keeps the first report).
pub mod aborted {
    /// What precedes the rank in the message.
    const PREFIX: &str = "gang aborted: rank ";

    /// The message of a rank the abort stopped; `first` says who failed first and why, as
    /// `rank <R> failed: <why>`.
    pub fn message(first: &str) -> String {
        format!("gang aborted: {first}")
    }

    /// The rank that failed first, as a termination message written by [`message`] names it.
    pub fn first_failed_rank(message: &str) -> Option<u32> {
        let (_, rest) = message.split_once(PREFIX)?;
        let digits = rest.split(|c: char| !c.is_ascii_digit()).next()?;
        let tail = &rest[digits.len()..];
        tail.starts_with(" failed")
            .then(|| digits.parse().ok())
            .flatten()
    }

    /// What precedes the rank in the stop message of a rank that stopped with its gang because
    /// another rank received SIGTERM.
    const STOPPED_FOR: &str = "stopped by SIGTERM to rank ";

    /// The start of the stop message of a rank that stopped with its gang because rank `by`
    /// received SIGTERM (an agreed stop: no failure of its own).
    pub fn stopped_for(by: u32) -> String {
        format!("{STOPPED_FOR}{by}")
    }

    /// The rank whose SIGTERM stopped the gang, as a message of [`stopped_for`] names it.
    pub fn stopped_by(message: &str) -> Option<u32> {
        let (_, rest) = message.split_once(STOPPED_FOR)?;
        rest.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn the_rank_a_stop_was_for_is_read_back_from_the_message() {
            let m = format!("Terminated: {} after step 9 of 100", super::stopped_for(3));
            assert_eq!(super::stopped_by(&m), Some(3));
            assert_eq!(
                super::stopped_by("Terminated: stopped by SIGTERM after step 9"),
                None
            );
        }

        #[test]
        fn the_first_failed_rank_is_read_back_from_the_message() {
            let m = format!(
                "PeerFailed: {}",
                super::message("rank 12 failed: killed (reported by rank 0)")
            );
            assert_eq!(super::first_failed_rank(&m), Some(12));
            assert_eq!(
                super::first_failed_rank("container exited with code 5"),
                None
            );
            assert_eq!(
                super::first_failed_rank("gang aborted: rank x failed"),
                None
            );
            assert_eq!(super::first_failed_rank("gang aborted: rank 3 left"), None);
        }
    }
}

/// Exit codes of `lockstep-worker`, so that failure rules can match on them and the operator can
/// explain a failure. Codes above 128 are signals (`128 + n`) and are not used here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum ExitCode {
    /// Training finished.
    Success = 0,
    /// An unexpected internal error.
    Internal = 1,
    /// Bad command line.
    Usage = 2,
    /// The configuration (manifest or worker config) is invalid; restarting cannot help.
    Config = 3,
    /// Rendezvous failed: a rank never arrived, the token or attempt was refused.
    Rendezvous = 4,
    /// This rank was aborted because another rank failed (a secondary failure).
    PeerFailed = 5,
    /// A collective failed or timed out (NCCL or the TCP ring).
    Communication = 6,
    /// A checkpoint is corrupt or does not match the job; restarting cannot help.
    Checkpoint = 7,
    /// The data set could not be read; restarting cannot help.
    Data = 8,
    /// Training diverged (loss became NaN or infinite).
    Diverged = 9,
    /// Stopped by SIGTERM (the pod was deleted, the gang restarted or suspended, the node
    /// drained): the gang stopped together after the step in progress, writing a checkpoint
    /// first when the job keeps them. 128 + 15, the code of a process SIGTERM ends.
    Terminated = 143,
}

impl ExitCode {
    /// Every code, in numeric order.
    pub const ALL: [ExitCode; 11] = [
        ExitCode::Success,
        ExitCode::Internal,
        ExitCode::Usage,
        ExitCode::Config,
        ExitCode::Rendezvous,
        ExitCode::PeerFailed,
        ExitCode::Communication,
        ExitCode::Checkpoint,
        ExitCode::Data,
        ExitCode::Diverged,
        ExitCode::Terminated,
    ];

    /// The numeric process exit code.
    pub fn code(self) -> i32 {
        self as i32
    }

    /// The code for a numeric exit status, if it is one of ours.
    pub fn from_code(code: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.code() == code)
    }

    /// A short PascalCase reason, used in `status.lastFailure.reason` and Events.
    pub fn reason(self) -> &'static str {
        match self {
            ExitCode::Success => "Completed",
            ExitCode::Internal => "InternalError",
            ExitCode::Usage => "UsageError",
            ExitCode::Config => "InvalidConfig",
            ExitCode::Rendezvous => "RendezvousFailed",
            ExitCode::PeerFailed => "PeerFailed",
            ExitCode::Communication => "CommunicationFailed",
            ExitCode::Checkpoint => "CheckpointInvalid",
            ExitCode::Data => "DataUnreadable",
            ExitCode::Diverged => "Diverged",
            ExitCode::Terminated => "Terminated",
        }
    }

    /// What the code means, in a sentence for a person (`kubectl lockstep why`).
    pub fn meaning(self) -> &'static str {
        match self {
            ExitCode::Success => "training finished",
            ExitCode::Internal => "an unexpected internal error of the worker",
            ExitCode::Usage => "a bad command line",
            ExitCode::Config => {
                "the configuration (manifest or worker config) is invalid; restarting cannot help"
            }
            ExitCode::Rendezvous => {
                "rendezvous failed: a rank never arrived, or its token or attempt was refused"
            }
            ExitCode::PeerFailed => {
                "this rank was aborted because another rank failed (a secondary failure)"
            }
            ExitCode::Communication => "a collective failed or timed out (NCCL or the TCP ring)",
            ExitCode::Checkpoint => {
                "a checkpoint is corrupt or does not match the job; restarting cannot help"
            }
            ExitCode::Data => "the data set could not be read; restarting cannot help",
            ExitCode::Diverged => "training diverged (the loss became NaN or infinite)",
            ExitCode::Terminated => {
                "stopped by SIGTERM (pod deleted, gang restarted or suspended, node drained), \
                 after saving a checkpoint when the job keeps them"
            }
        }
    }

    /// Whether a gang restart cannot help (the default failure policy fails the job at once).
    pub fn is_permanent(self) -> bool {
        matches!(
            self,
            ExitCode::Usage | ExitCode::Config | ExitCode::Checkpoint | ExitCode::Data
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_env_names() {
        for n in [
            "LOCKSTEP_RANK",
            "LOCKSTEP_ANYTHING",
            "PET_NNODES",
            "MASTER_ADDR",
            "RANK",
            "LOCAL_RANK",
            "WORLD_SIZE",
        ] {
            assert!(env::is_reserved(n), "{n} should be reserved");
        }
        for n in ["RANKS", "MY_RANK", "NCCL_DEBUG", "lockstep_rank", "PETS"] {
            assert!(!env::is_reserved(n), "{n} should be free");
        }
    }

    #[test]
    fn rank_env_round_trips_through_the_environment() {
        let e = env::RankEnv {
            job: "j".into(),
            job_uid: "0b1c".into(),
            namespace: "ns".into(),
            rank: 3,
            world_size: 4,
            attempt: 2,
            master_host: "j-0.j".into(),
            rendezvous_port: 29600,
            torch_port: 29500,
            config: "/etc/lockstep/worker.json".into(),
            checkpoint_dir: "/ckpt".into(),
            metrics_port: 9450,
            stage: 1,
            replica: 1,
        };
        let pairs: std::collections::HashMap<_, _> = e.pairs().into_iter().collect();
        assert_eq!(pairs[env::RENDEZVOUS], "j-0.j:29600");
        assert_eq!(pairs[env::TORCH_RANK], "3");
        let back = env::RankEnv::from_lookup(|n| pairs.get(n).cloned()).expect("round trip");
        assert_eq!(back, e);
        // A worker newer than its operator gets no UID: it runs, checking no checkpoint's job.
        let old = env::RankEnv::from_lookup(|n| {
            (n != env::JOB_UID).then(|| pairs.get(n).cloned()).flatten()
        })
        .expect("no UID is no error");
        assert_eq!(old.job_uid, "");
        let err = env::RankEnv::from_lookup(|n| {
            (n != env::ATTEMPT).then(|| pairs.get(n).cloned()).flatten()
        })
        .expect_err("missing attempt");
        assert_eq!(err, "LOCKSTEP_ATTEMPT is not set");
        let err = env::RankEnv::from_lookup(|n| {
            if n == env::RANK {
                Some("4".into())
            } else {
                pairs.get(n).cloned()
            }
        })
        .expect_err("rank out of range");
        assert!(err.contains("is not below"), "{err}");
    }

    #[test]
    fn exit_codes_round_trip_and_are_distinct() {
        for c in ExitCode::ALL {
            assert_eq!(ExitCode::from_code(c.code()), Some(c));
        }
        let reasons: std::collections::HashSet<_> =
            ExitCode::ALL.iter().map(|c| c.reason()).collect();
        assert_eq!(reasons.len(), ExitCode::ALL.len());
        assert_eq!(ExitCode::from_code(137), None);
        assert!(ExitCode::Config.is_permanent() && !ExitCode::PeerFailed.is_permanent());
    }
}
