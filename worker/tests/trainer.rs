//! The trainer drives any `Workload`: a workload written in this file (as a new one would be)
//! runs under `trainer::train` with the job's cadence: init or load, one step per optimizer
//! step at the schedule's learning rate, evaluation and checkpoints every N steps and at the end,
//! the loss averaged over the ranks that compute one.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use lockstep_api::config::WorkerConfig;
use lockstep_api::layout::Layout;
use lockstep_worker::comm::tcp::{TcpComm, TcpOptions};
use lockstep_worker::error::WorkError;
use lockstep_worker::metrics::Metrics;
use lockstep_worker::topology::Topology;
use lockstep_worker::trainer::{self, RunInputs, Summary};
use lockstep_worker::workload::sync::SyncStats;
use lockstep_worker::workload::{Evaluation, Metric, StepReport, Workload};

/// What the trainer asked of the workload, in order.
type Calls = Arc<Mutex<Vec<String>>>;

fn record(calls: &Calls, call: String) {
    calls.lock().expect("calls").push(call);
}

/// A workload that records every call; its loss is `rank + 1` on the ranks that compute one.
struct Recording {
    calls: Calls,
    has_loss: bool,
}

impl<C> Workload<C> for Recording {
    fn describe(&self) -> String {
        "recording".into()
    }
    fn num_params(&self) -> usize {
        1
    }
    fn steps_per_epoch(&self) -> u64 {
        4
    }
    fn init(&mut self, _topo: &mut Topology<C>) -> Result<(), WorkError> {
        record(&self.calls, "init".into());
        Ok(())
    }
    fn load(&mut self, _topo: &mut Topology<C>, _dir: &Path, step: u64) -> Result<(), WorkError> {
        record(&self.calls, format!("load {step}"));
        Ok(())
    }
    fn step(
        &mut self,
        topo: &mut Topology<C>,
        step: u64,
        lr: f32,
    ) -> Result<StepReport, WorkError> {
        record(&self.calls, format!("step {step} lr {lr}"));
        Ok(StepReport {
            loss: self.has_loss.then_some(topo.rank as f32 + 1.0),
            samples: 8,
            tokens: 0,
            comm: SyncStats::default(),
            pipeline: None,
        })
    }
    fn evaluate(
        &mut self,
        _topo: &mut Topology<C>,
        _max_batches: Option<usize>,
    ) -> Result<Evaluation, WorkError> {
        record(&self.calls, "evaluate".into());
        Ok(Evaluation {
            metric: Metric::Loss,
            value: 0.5,
            link: None,
        })
    }
    fn save(
        &mut self,
        topo: &mut Topology<C>,
        dir: &Path,
        step: u64,
        _keep: usize,
    ) -> Result<Option<PathBuf>, WorkError> {
        record(&self.calls, format!("save {step}"));
        Ok((topo.rank == 0).then(|| dir.join(format!("{step}"))))
    }
    fn params_digest(&mut self) -> Result<u64, WorkError> {
        Ok(7)
    }
}

fn config(world: usize, max_steps: u64) -> WorkerConfig {
    let yaml = format!(
        r#"apiVersion: lockstep.dev/v1alpha1
kind: ParallelJob
metadata: {{name: recording}}
spec:
  parallelism: {{dataParallel: {world}}}
  training:
    workload: Ddp
    model: {{mlp: {{hiddenSizes: [4]}}}}
    data: {{kind: Digits, path: data/digits.csv.gz}}
    optimizer: {{learningRate: 1.0, warmupSteps: 2, schedule: Constant}}
    maxSteps: {max_steps}
    checkpoint: {{everySteps: 2}}
    evaluation: {{everySteps: 3}}
  template:
    spec:
      containers: [{{name: worker, image: lockstep/worker:0.1.0}}]
"#
    );
    let job = lockstep_api::manifest::parse_job(&yaml).expect("valid job");
    WorkerConfig::from_job(&job).expect("config")
}

/// Runs `Recording` on every rank of a gang of `world` threads; `has_loss(rank)` says which
/// ranks compute a loss. Returns each rank's summary and calls.
fn run(
    world: usize,
    max_steps: u64,
    checkpoint_dir: Option<&Path>,
    has_loss: fn(usize) -> bool,
) -> Vec<(Summary, Vec<String>)> {
    let cfg = config(world, max_steps);
    let gang = TcpComm::local_gang(world, TcpOptions::default()).expect("gang");
    std::thread::scope(|s| {
        let handles: Vec<_> = gang
            .into_iter()
            .enumerate()
            .map(|(r, comm)| {
                let cfg = &cfg;
                s.spawn(move || {
                    let layout = Layout::new(world as u32, 1).expect("layout");
                    let mut topo = Topology::new(layout, comm).expect("topology");
                    let calls = Calls::default();
                    let mut work = Recording {
                        calls: Arc::clone(&calls),
                        has_loss: has_loss(r),
                    };
                    let metrics = Metrics::new("recording", r as u32);
                    let inputs = RunInputs {
                        checkpoint_dir: checkpoint_dir.map(Path::to_path_buf),
                        nccl_id: Vec::new(),
                        on_step: &|_| {},
                        stop: &AtomicBool::new(false),
                    };
                    let summary = trainer::train(cfg, &mut topo, &mut work, &metrics, &inputs)
                        .unwrap_or_else(|e| panic!("rank {r}: {e}"));
                    let calls = calls.lock().expect("calls").clone();
                    (summary, calls)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank"))
            .collect()
    })
}

#[test]
fn a_new_workload_runs_under_the_trainer_with_the_jobs_cadence() {
    let dir = std::env::temp_dir().join(format!("lockstep-trainer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let ranks = run(2, 5, Some(&dir), |_| true);
    let expected: Vec<String> = [
        "init",
        "step 0 lr 0.5",
        "step 1 lr 1",
        "save 2",
        "step 2 lr 1",
        "evaluate",
        "step 3 lr 1",
        "save 4",
        "step 4 lr 1",
        "evaluate",
        "save 5",
    ]
    .map(String::from)
    .to_vec();
    for (r, (summary, calls)) in ranks.iter().enumerate() {
        assert_eq!(calls, &expected, "rank {r}");
        assert_eq!(summary.steps, 5);
        // Losses 1 and 2 on the two ranks.
        assert_eq!(summary.loss, 1.5, "rank {r}: the mean over the ranks");
        assert_eq!(summary.val_loss, Some(0.5));
        assert_eq!(summary.eval_accuracy, None);
        assert_eq!(summary.resumed_from, None);
        assert_eq!(summary.params_digest, 7);
    }
}

#[test]
fn the_loss_is_averaged_over_the_ranks_that_compute_one() {
    // As in a pipeline, where only the last stage has a loss: ranks 1 and 2 of 3 (losses 2, 3).
    let ranks = run(3, 1, None, |r| r > 0);
    for (r, (summary, calls)) in ranks.iter().enumerate() {
        assert_eq!(summary.loss, 2.5, "rank {r}");
        assert!(
            !calls.iter().any(|c| c.starts_with("save")),
            "no directory, no save"
        );
    }
}

#[test]
fn a_gang_resumes_from_the_newest_checkpoint_rank_0_sees() {
    let dir = std::env::temp_dir().join(format!("lockstep-trainer-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    for step in [2u64, 4] {
        std::fs::write(dir.join(lockstep_worker::checkpoint::file_name(step)), b"x").expect("file");
    }
    let ranks = run(2, 5, Some(&dir), |_| true);
    for (r, (summary, calls)) in ranks.iter().enumerate() {
        assert_eq!(calls[0], "load 4", "rank {r}");
        assert_eq!(
            calls[1], "step 4 lr 1",
            "rank {r}: the step after the checkpoint"
        );
        assert_eq!(summary.resumed_from, Some(4));
    }
}

#[test]
fn an_unwritable_checkpoint_directory_stops_the_run_before_the_first_step() {
    // A directory under a regular file: nobody can create it, root included.
    let file = std::env::temp_dir().join(format!("lockstep-trainer-file-{}", std::process::id()));
    std::fs::write(&file, b"not a directory").expect("file");
    let dir = file.join("checkpoints");
    let cfg = config(1, 5);
    let comm = TcpComm::local_gang(1, TcpOptions::default())
        .expect("gang")
        .remove(0);
    let mut topo = Topology::new(Layout::new(1, 1).expect("layout"), comm).expect("topology");
    let calls = Calls::default();
    let mut work = Recording {
        calls: Arc::clone(&calls),
        has_loss: true,
    };
    let inputs = RunInputs {
        checkpoint_dir: Some(dir.clone()),
        nccl_id: Vec::new(),
        on_step: &|_| {},
        stop: &AtomicBool::new(false),
    };
    let metrics = Metrics::new("recording", 0);
    let e = trainer::train(&cfg, &mut topo, &mut work, &metrics, &inputs)
        .expect_err("an unwritable checkpoint directory");
    let _ = std::fs::remove_file(&file);
    assert_eq!(e.code, lockstep_api::contract::ExitCode::Config, "{e}");
    assert!(
        e.message.contains(&dir.display().to_string()) && e.message.contains("fsGroup"),
        "{e}"
    );
    assert!(
        calls.lock().expect("calls").is_empty(),
        "nothing trained before the failure"
    );
}
