//! The DDP oracles on the real training loop, with ranks as threads over the real TCP
//! communicator: N ranks with batch b end with the same parameters as 1 rank with batch N*b
//! (and as gradient accumulation), independently of the bucket size; a run resumed from a
//! checkpoint ends bit for bit where the uninterrupted run ends; a corrupt checkpoint is
//! refused.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use lockstep_api::config::WorkerConfig;
use lockstep_engine::models::gpt::GptConfig;
use lockstep_worker::checkpoint;
use lockstep_worker::comm::tcp::{TcpComm, TcpOptions};
use lockstep_worker::error::WorkError;
use lockstep_worker::metrics::Metrics;
use lockstep_worker::trainer::{self, RunInputs, Summary};

mod common;

fn scratch(name: &str) -> PathBuf {
    common::scratch("ddp", name)
}

use common::{max_diff, ok, text};

struct Job<'a> {
    data: &'a Path,
    world: usize,
    batch: usize,
    accum: usize,
    bucket_mb: f64,
    first_bucket_mb: f64,
    overlap: bool,
    steps: u64,
    checkpoint_every: u64,
}

fn config(j: &Job<'_>) -> WorkerConfig {
    let yaml = format!(
        r#"apiVersion: lockstep.dev/v1alpha1
kind: ParallelJob
metadata: {{name: ddp-oracle}}
spec:
  parallelism: {{dataParallel: {world}}}
  training:
    workload: Ddp
    model: {{gpt: {{layers: 2, heads: 2, embedDim: 16, contextLength: 16}}}}
    data: {{kind: Text, path: "{data}"}}
    optimizer: {{learningRate: 0.003, warmupSteps: 2, gradClipNorm: 1.0, weightDecay: 0.1}}
    batchSize: {batch}
    maxSteps: {steps}
    seed: 5
    ddp: {{bucketCapMB: {bucket}, firstBucketCapMB: {first}, overlap: {overlap}, gradAccumulationSteps: {accum}}}
    checkpoint: {{everySteps: {every}, keep: 100}}
  template:
    spec:
      containers: [{{name: worker, image: lockstep/worker:0.1.0}}]
"#,
        world = j.world,
        data = j.data.display(),
        batch = j.batch,
        steps = j.steps,
        bucket = j.bucket_mb,
        first = j.first_bucket_mb,
        overlap = j.overlap,
        accum = j.accum,
        every = j.checkpoint_every,
    );
    let job = lockstep_api::manifest::parse_job(&yaml).expect("valid job");
    WorkerConfig::from_job(&job).expect("config")
}

/// Trains the job on `world` threads; returns every rank's result.
fn train_gang(j: &Job<'_>, ckpt: &Path) -> Vec<Result<Summary, WorkError>> {
    train_gang_with(j, ckpt, TcpOptions::default())
}

/// [`train_gang`] over a transport with `opts`.
fn train_gang_with(j: &Job<'_>, ckpt: &Path, opts: TcpOptions) -> Vec<Result<Summary, WorkError>> {
    common::train_gang(&config(j), j.world, ckpt, opts)
}

/// Final parameters (from the last checkpoint) of a run.
fn final_params(ckpt: &Path, steps: u64) -> Vec<f32> {
    let (step, path) = checkpoint::list(ckpt, None)
        .expect("list")
        .pop()
        .expect("a checkpoint");
    assert_eq!(step, steps);
    let n = std::fs::metadata(&path).expect("stat").len();
    assert!(n > 0);
    let vocab = {
        let t =
            std::fs::read_to_string(ckpt.parent().expect("parent").join("text.txt")).expect("text");
        let mut c: Vec<char> = t.chars().collect();
        c.sort_unstable();
        c.dedup();
        c.len()
    };
    let model = format!("gpt layers=2 heads=2 embed=16 context=16 vocab={vocab}");
    let config = GptConfig::new(2, 2, 16, 16, vocab).expect("config");
    checkpoint::load(&path, &model, &config.tensors(), config.num_params())
        .expect("load")
        .params
}

/// The parameters every rank starts from (rank 0's initialisation, seed 5).
fn initial_params(data: &Path) -> Vec<f32> {
    let text = std::fs::read_to_string(data).expect("text");
    let mut c: Vec<char> = text.chars().collect();
    c.sort_unstable();
    c.dedup();
    GptConfig::new(2, 2, 16, 16, c.len())
        .expect("config")
        .init(5)
}

fn job(data: &Path) -> Job<'_> {
    Job {
        data,
        world: 1,
        batch: 8,
        accum: 1,
        bucket_mb: 25.0,
        first_bucket_mb: 1.0,
        overlap: true,
        steps: 6,
        checkpoint_every: 1000,
    }
}

#[test]
fn two_and_four_ranks_match_one_rank_with_the_combined_batch() {
    let dir = scratch("equiv");
    let data = text(&dir);
    let run = |name: &str, j: Job<'_>| {
        let ck = dir.join(name);
        let s = ok(train_gang(&j, &ck));
        assert!(
            s.iter().all(|x| x.params_digest == s[0].params_digest),
            "{name}: ranks disagree"
        );
        (s[0].clone(), final_params(&ck, j.steps))
    };
    let (one, p1) = run("one", job(&data));
    let (_, p2) = run(
        "two",
        Job {
            world: 2,
            batch: 4,
            ..job(&data)
        },
    );
    let (_, p4) = run(
        "four",
        Job {
            world: 4,
            batch: 2,
            ..job(&data)
        },
    );
    let (_, pa) = run(
        "accum",
        Job {
            batch: 2,
            accum: 4,
            ..job(&data)
        },
    );
    assert!(one.loss.is_finite(), "loss {}", one.loss);
    // The same arithmetic up to the order of float additions (a mean over 8 samples versus
    // a mean of per-rank means, through AdamW's division): 1e-5 after 6 steps, while one
    // step moves parameters by about 3e-3.
    for (name, p) in [("2 ranks", &p2), ("4 ranks", &p4), ("accumulation", &pa)] {
        let d = max_diff(&p1, p);
        eprintln!("{name}: largest parameter difference from 1 rank {d:.2e}");
        assert!(d < 1e-5, "{name} differs from 1 rank by {d}");
    }
    // The oracle means something only if training moved the parameters far more than the
    // tolerance: against the initialisation every rank starts from.
    let moved = max_diff(&p1, &initial_params(&data));
    eprintln!("largest parameter change in 6 steps {moved:.2e}");
    assert!(moved > 1e-3, "the parameters barely moved ({moved})");
}

#[test]
fn bucket_size_and_overlap_do_not_change_the_result() {
    let dir = scratch("buckets");
    let data = text(&dir);
    let digest = |name: &str, j: Job<'_>| ok(train_gang(&j, &dir.join(name)))[0].params_digest;
    let base = Job {
        world: 2,
        batch: 4,
        ..job(&data)
    };
    let one_bucket = digest("one-bucket", Job { ..base });
    // 4 KiB buckets: dozens of them, the first even smaller.
    let many = digest(
        "many",
        Job {
            bucket_mb: 0.004,
            first_bucket_mb: 0.001,
            ..base
        },
    );
    let no_overlap = digest(
        "no-overlap",
        Job {
            overlap: false,
            bucket_mb: 0.004,
            ..base
        },
    );
    // Two ranks: every element is one addition of two values, whatever the bucket.
    assert_eq!(one_bucket, many, "bucket size changed the parameters");
    assert_eq!(one_bucket, no_overlap, "overlap changed the parameters");
}

#[test]
fn a_resumed_run_ends_exactly_where_the_uninterrupted_run_ends() {
    let dir = scratch("resume");
    let data = text(&dir);
    let j = || Job {
        world: 2,
        batch: 4,
        steps: 8,
        checkpoint_every: 3,
        ..job(&data)
    };
    let full = dir.join("full");
    let whole = ok(train_gang(&j(), &full));
    let saved: Vec<u64> = checkpoint::list(&full, None)
        .unwrap()
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(saved, vec![3, 6, 8]);

    // A gang restarted after step 3: only that checkpoint is on its storage.
    let resumed_dir = dir.join("resumed");
    std::fs::create_dir_all(&resumed_dir).unwrap();
    let name = checkpoint::file_name(3);
    std::fs::copy(full.join(&name), resumed_dir.join(&name)).unwrap();
    let resumed = ok(train_gang(&j(), &resumed_dir));
    assert_eq!(resumed[0].resumed_from, Some(3));
    assert_eq!(whole[0].resumed_from, None);
    assert_eq!(
        resumed[0].loss, whole[0].loss,
        "the last step's loss differs"
    );
    assert_eq!(
        resumed[0].params_digest, whole[0].params_digest,
        "the resumed run ends elsewhere"
    );

    // A corrupt checkpoint is refused on every rank, with its name; nothing trains.
    let corrupt_dir = dir.join("corrupt");
    std::fs::create_dir_all(&corrupt_dir).unwrap();
    let mut bytes = std::fs::read(full.join(&name)).unwrap();
    let mid = bytes.len() - 100;
    bytes[mid] ^= 0x01;
    std::fs::write(corrupt_dir.join(&name), bytes).unwrap();
    for r in train_gang(&j(), &corrupt_dir) {
        let e = r.expect_err("a corrupt checkpoint must be refused");
        assert_eq!(e.code, lockstep_api::contract::ExitCode::Checkpoint);
        assert!(
            e.message.contains("refused") && e.message.contains(&name),
            "{}",
            e.message
        );
    }
    assert_eq!(
        checkpoint::list(&corrupt_dir, None).unwrap().len(),
        1,
        "nothing new was written"
    );

    // The newest checkpoint is corrupt, an older one is whole: the gang resumes from the older
    // one (with a warning) and still ends where the uninterrupted run ends. A temporary file a
    // killed writer left behind is removed.
    let fallback = dir.join("fallback");
    std::fs::create_dir_all(&fallback).unwrap();
    std::fs::copy(full.join(&name), fallback.join(&name)).unwrap();
    let newer = checkpoint::file_name(6);
    let mut bytes = std::fs::read(full.join(&newer)).unwrap();
    let mid = bytes.len() - 100;
    bytes[mid] ^= 0x01;
    std::fs::write(fallback.join(&newer), bytes).unwrap();
    let leftover = fallback.join(format!(".{newer}.1234-00000000deadbeef.tmp"));
    std::fs::write(&leftover, b"half a checkpoint").unwrap();
    // Left alone for longer than a live writer would be.
    std::fs::File::options()
        .write(true)
        .open(&leftover)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - checkpoint::LEFTOVER_AGE * 2)
        .unwrap();
    let resumed = ok(train_gang(&j(), &fallback));
    assert_eq!(resumed[0].resumed_from, Some(3), "skips the corrupt step 6");
    assert_eq!(resumed[0].params_digest, whole[0].params_digest);
    assert!(
        !leftover.exists(),
        "the leftover temporary file was removed"
    );
    assert!(
        fallback.join(format!("{newer}.corrupt")).exists(),
        "the refused checkpoint is kept aside, not deleted"
    );
}

#[test]
fn a_rank_without_cuda_refuses_a_gang_that_chose_nccl() {
    #[cfg(feature = "cuda")]
    if lockstep_engine::cuda::available() {
        eprintln!("CUDA loads here: this rank would join NCCL; nothing to check");
        return;
    }
    let dir = scratch("nccl-refused");
    let data = text(&dir);
    let mut yaml_job = job(&data);
    yaml_job.steps = 1;
    let mut cfg = config(&yaml_job);
    cfg.parallelism.gpus_per_worker = 1;
    let comm = TcpComm::local_gang(1, TcpOptions::default())
        .expect("gang")
        .remove(0);
    let metrics = Metrics::new("ddp-oracle", 0);
    let inputs = RunInputs {
        checkpoint_dir: None,
        nccl_id: vec![7; 128],
        on_step: &|_| {},
        stop: &AtomicBool::new(false),
    };
    let e = trainer::run(&cfg, comm, &metrics, &inputs).expect_err("must not train on the CPU");
    assert_eq!(e.code, lockstep_api::contract::ExitCode::Communication);
    assert!(e.message.contains("rank 0 chose NCCL"), "{}", e.message);
}

/// Rank 0 writes checkpoints while the others go on to the next step's all-reduce, where they
/// wait for it: a write slower than the transport's timeout must not stop the gang. Writes into
/// this test's folder take 2.5 s (a slow disk), the transport times out after 1 s.
#[test]
fn a_checkpoint_slower_than_the_communication_timeout_does_not_stop_the_gang() {
    let dir = scratch("slow-disk");
    let data = text(&dir);
    let ckpt = dir.join("slow-checkpoints");
    *checkpoint::SLOW_WRITES.lock().unwrap() = Some((
        "slow-checkpoints".into(),
        std::time::Duration::from_millis(2500),
    ));
    let j = Job {
        world: 2,
        batch: 4,
        steps: 6,
        checkpoint_every: 3,
        ..job(&data)
    };
    let opts = TcpOptions {
        timeout: std::time::Duration::from_secs(1),
        ..TcpOptions::default()
    };
    let results = train_gang_with(&j, &ckpt, opts);
    *checkpoint::SLOW_WRITES.lock().unwrap() = None;
    let s = ok(results);
    assert_eq!(s[0].params_digest, s[1].params_digest);
    let saved: Vec<u64> = checkpoint::list(&ckpt, None)
        .unwrap()
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(
        saved,
        vec![3, 6],
        "every checkpoint was written, the last before the end"
    );
}
