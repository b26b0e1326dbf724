//! `kubectl lockstep`: the commands a person who runs ParallelJobs types, on kube-rs.
//!
//! - `submit -f FILE [--wait] [--local]`: validate exactly as the API server will (the field and
//!   the fix named), apply server-side, and follow the job until its gang runs and then until it
//!   ends; `--local` runs it with `lockstep-worker local` instead.
//! - `ls`: phase, ranks ready, step, loss, restarts, queue position, wait, gang policy, age.
//! - `why NAME`: why a job waits, or why it failed (the first failure and its last log lines).
//! - `logs NAME`: rank-prefixed logs, following the gang into its next attempt; the previous
//!   attempt's first failure from the lines the operator kept.
//! - `top NAME`: per rank, the worker's own metrics, read through the API server's pod proxy.
//! - `suspend`, `resume`, `restart`, `delete`; `completion SHELL`.
//!
//! The commands write to an [`Out`], standard output or a buffer (the e2e tests run them
//! in-process against the test control plane).

pub mod control;
pub mod fmt;
pub mod logs;
pub mod ls;
pub mod submit;
pub mod top;
pub mod why;

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use clap::{Parser, Subcommand, ValueEnum};
use kube::Client;

/// `kubectl lockstep`.
#[derive(Parser, Debug)]
#[command(
    name = "kubectl-lockstep",
    bin_name = "kubectl lockstep",
    version,
    about = "Submit, list, explain, follow and steer Lockstep ParallelJobs"
)]
pub struct Cli {
    /// Namespace (default: the kubeconfig context's).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// Kubeconfig context to use.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Output formats of `ls`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Every job as the API returns it, in a List.
    Json,
    /// The same, as YAML.
    Yaml,
    /// The table with more columns.
    Wide,
}

/// A `kubectl lockstep` command.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Validate a ParallelJob as the API server will, apply it server-side, and follow it.
    Submit {
        /// The manifest.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Print each change of phase and admission until the gang runs, then the progress
        /// until the job ends (exit code 0 when it succeeds, 1 when it fails).
        #[arg(long)]
        wait: bool,
        /// Run it on this machine with `lockstep-worker local` instead (no cluster).
        #[arg(long, conflicts_with = "wait")]
        local: bool,
        /// The lockstep-worker binary for --local (default: $LOCKSTEP_WORKER, else the one
        /// beside this binary, else from PATH).
        #[arg(long, requires = "local")]
        worker: Option<PathBuf>,
    },
    /// List ParallelJobs.
    #[command(alias = "list", alias = "get")]
    Ls {
        /// In every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// Output format.
        #[arg(short = 'o', long, value_enum)]
        output: Option<Output>,
    },
    /// Why a job waits, or why it failed.
    Why {
        /// The job.
        name: String,
    },
    /// Logs of a job's ranks, prefixed with the rank.
    Logs {
        /// The job.
        name: String,
        /// This rank only (default: rank 0).
        #[arg(long, conflicts_with = "all")]
        rank: Option<u32>,
        /// Every rank.
        #[arg(long)]
        all: bool,
        /// This gang attempt (default: the current one).
        #[arg(long, conflicts_with = "previous")]
        attempt: Option<i32>,
        /// The previous attempt (what the operator kept of its first failure).
        #[arg(long)]
        previous: bool,
        /// The first failure's container (the rank that failed first in the latest failed
        /// attempt).
        #[arg(long, conflicts_with_all = ["rank", "all", "attempt", "previous", "follow"])]
        failed: bool,
        /// Follow the logs, into the next attempt when the gang restarts, until the job ends.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Lines of each rank's log to show (all by default, or -1; 10 when following).
        #[arg(long, allow_negative_numbers = true)]
        tail: Option<i64>,
    },
    /// Per rank: step, step time, throughput, GPU utilization and memory, all-reduce bandwidth,
    /// from the ranks' /metrics through the API server's pod proxy.
    Top {
        /// The job.
        name: String,
    },
    /// Suspend a job: its pods are deleted (after a checkpoint when it keeps them) and its
    /// admission given back.
    Suspend {
        /// The job.
        name: String,
    },
    /// Resume a suspended job: it queues for admission again and resumes from its checkpoint.
    Resume {
        /// The job.
        name: String,
    },
    /// Restart a job's gang as a new attempt from the last checkpoint.
    Restart {
        /// The job.
        name: String,
    },
    /// Delete a job (its pods and the objects it owns go with it).
    Delete {
        /// The job.
        name: String,
        /// Wait until the job is gone.
        #[arg(long)]
        wait: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish or powershell).
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// Where a command's output goes: standard output, or a buffer a test reads.
#[derive(Clone)]
pub struct Out(Arc<Mutex<Sink>>);

enum Sink {
    Stdout,
    Buffer(Vec<u8>),
}

impl Out {
    /// Standard output.
    pub fn stdout() -> Self {
        Self(Arc::new(Mutex::new(Sink::Stdout)))
    }

    /// A buffer; [`Out::text`] reads it.
    pub fn buffer() -> Self {
        Self(Arc::new(Mutex::new(Sink::Buffer(Vec::new()))))
    }

    /// Writes one line.
    pub fn line(&self, s: impl std::fmt::Display) {
        let mut sink = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *sink {
            Sink::Stdout => {
                let mut o = std::io::stdout().lock();
                // A closed pipe (`| head`) ends the output, not the command with a panic.
                let _ = writeln!(o, "{s}");
            }
            Sink::Buffer(b) => {
                let _ = writeln!(b, "{s}");
            }
        }
    }

    /// What was written to a buffer (empty for standard output).
    pub fn text(&self) -> String {
        match &*self.0.lock().unwrap_or_else(|e| e.into_inner()) {
            Sink::Stdout => String::new(),
            Sink::Buffer(b) => String::from_utf8_lossy(b).into_owned(),
        }
    }
}

/// What every command works with.
#[derive(Clone)]
pub struct Ctx {
    /// The client.
    pub client: Client,
    /// The namespace.
    pub namespace: String,
    /// Where output goes.
    pub out: Out,
}

/// Runs `command`; returns the process exit code.
pub async fn execute(command: Command, ctx: &Ctx) -> anyhow::Result<i32> {
    match command {
        Command::Submit {
            file,
            wait,
            local,
            worker,
        } => {
            let local = local.then(|| worker.unwrap_or_else(submit::worker_binary));
            submit::submit(ctx, &file, wait, local.as_deref()).await
        }
        Command::Ls {
            all_namespaces,
            output,
        } => ls::ls(ctx, all_namespaces, output).await,
        Command::Why { name } => why::why(ctx, &name).await,
        Command::Logs {
            name,
            rank,
            all,
            attempt,
            previous,
            failed,
            follow,
            tail,
        } => {
            let which = if failed {
                logs::Which::Failed
            } else if previous {
                logs::Which::Previous
            } else {
                match attempt {
                    Some(a) => logs::Which::Attempt(a),
                    None => logs::Which::Current,
                }
            };
            let ranks = match (all, rank) {
                (true, _) => logs::Ranks::All,
                (false, Some(r)) => logs::Ranks::One(r),
                (false, None) => logs::Ranks::One(0),
            };
            logs::logs(
                ctx,
                &name,
                &logs::Options {
                    ranks,
                    which,
                    follow,
                    tail,
                },
            )
            .await
        }
        Command::Top { name } => top::top(ctx, &name).await,
        Command::Suspend { name } => control::suspend(ctx, &name, true).await,
        Command::Resume { name } => control::suspend(ctx, &name, false).await,
        Command::Restart { name } => control::restart(ctx, &name).await,
        Command::Delete { name, wait } => control::delete(ctx, &name, wait).await,
        Command::Completion { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut cmd, "kubectl-lockstep", &mut buf);
            ctx.out.line(String::from_utf8_lossy(&buf).trim_end());
            Ok(0)
        }
    }
}

/// The ParallelJobs API in the context's namespace.
pub fn jobs(ctx: &Ctx) -> kube::Api<lockstep_api::ParallelJob> {
    kube::Api::namespaced(ctx.client.clone(), &ctx.namespace)
}

/// The job `name`, or an error that says where it was looked for.
pub async fn get_job(ctx: &Ctx, name: &str) -> anyhow::Result<lockstep_api::ParallelJob> {
    match jobs(ctx).get_opt(name).await? {
        Some(j) => Ok(j),
        None => anyhow::bail!(
            "paralleljob {name} not found in namespace {} (kubectl lockstep ls -A lists every \
             namespace's)",
            ctx.namespace
        ),
    }
}
