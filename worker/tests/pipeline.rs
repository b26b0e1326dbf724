//! The pipeline oracles on the real training loop, with ranks as threads over the real TCP
//! communicator: every schedule on 2 and 4 stages ends within float noise of single-process
//! training on the same global batch; one stage is DDP with gradient accumulation bit for bit;
//! 2 replicas x 2 stages match too; a gang restarted from the per-stage checkpoints ends where
//! the uninterrupted run ends.

use std::path::{Path, PathBuf};

use lockstep_api::config::WorkerConfig;
use lockstep_engine::models::gpt::GptConfig;
use lockstep_worker::comm::tcp::TcpOptions;
use lockstep_worker::error::WorkError;
use lockstep_worker::trainer::Summary;
use lockstep_worker::{checkpoint, hf};

mod common;

fn scratch(name: &str) -> PathBuf {
    common::scratch("pp", name)
}

use common::{max_diff, ok, text};

const LAYERS: usize = 4;

#[derive(Clone, Copy)]
struct Job<'a> {
    data: &'a Path,
    /// None: DDP.
    schedule: Option<&'a str>,
    stages: usize,
    replicas: usize,
    chunks: usize,
    micro: usize,
    /// Per replica per step (DDP: per micro-step).
    batch: usize,
    accum: usize,
    steps: u64,
    every: u64,
    /// `gradClipNorm` (0: no clipping).
    clip: f64,
    /// `initFrom`.
    init_from: Option<&'a Path>,
}

fn config(j: &Job<'_>) -> WorkerConfig {
    let workload = match j.schedule {
        // Small buckets, so that replicas average several while backward runs.
        Some(s) => format!(
            "workload: Pipeline\n    pipeline: {{schedule: {s}, microBatches: {}, chunksPerStage: {}}}\n    \
             ddp: {{bucketCapMB: 0.002, firstBucketCapMB: 0.001}}",
            j.micro, j.chunks
        ),
        None => format!(
            "workload: Ddp\n    ddp: {{gradAccumulationSteps: {}}}",
            j.accum
        ),
    };
    let yaml = format!(
        r#"apiVersion: lockstep.dev/v1alpha1
kind: ParallelJob
metadata: {{name: pp-oracle}}
spec:
  parallelism: {{dataParallel: {dp}, pipelineStages: {pp}}}
  training:
    {workload}
    model: {{gpt: {{layers: {LAYERS}, heads: 2, embedDim: 16, contextLength: 16}}}}
    data: {{kind: Text, path: "{data}"}}
    optimizer: {{learningRate: 0.003, warmupSteps: 2, gradClipNorm: {clip}, weightDecay: 0.1}}
    batchSize: {batch}
    maxSteps: {steps}
    seed: 5
    checkpoint: {{everySteps: {every}, keep: 100}}{init}
  template:
    spec:
      containers: [{{name: worker, image: lockstep/worker:0.1.0}}]
"#,
        dp = j.replicas,
        pp = j.stages,
        data = j.data.display(),
        batch = j.batch,
        steps = j.steps,
        every = j.every,
        clip = j.clip,
        init = j.init_from.map_or(String::new(), |p| format!(
            "\n    initFrom: \"{}\"",
            p.display()
        )),
    );
    let job = lockstep_api::manifest::parse_job(&yaml).expect("valid job");
    WorkerConfig::from_job(&job).expect("config")
}

/// Trains the job on one thread per rank; returns every rank's result.
fn train_gang(j: &Job<'_>, ckpt: &Path) -> Vec<Result<Summary, WorkError>> {
    common::train_gang(
        &config(j),
        j.stages * j.replicas,
        ckpt,
        TcpOptions::default(),
    )
}

fn model(data: &Path) -> GptConfig {
    let text = std::fs::read_to_string(data).expect("text");
    let mut c: Vec<char> = text.chars().collect();
    c.sort_unstable();
    c.dedup();
    GptConfig::new(LAYERS, 2, 16, 16, c.len()).expect("config")
}

/// A tensor of the whole model (`""`: the parameters, `"exp_avg."`, `"exp_avg_sq."`: the AdamW
/// moments) after the newest checkpoint of a run: one file (DDP), or every stage's shard put
/// together by name (the two copies of the tied embedding checked equal).
fn whole_tensor(j: &Job<'_>, ckpt: &Path, prefix: &str) -> Vec<f32> {
    let shape = j.schedule.map(|_| j.stages as u32);
    let (step, path) = checkpoint::list(ckpt, shape)
        .expect("list")
        .pop()
        .expect("a step");
    assert_eq!(step, j.steps);
    let merged = hf::read_step(&path).expect("the step's files put together");
    assert_eq!(merged.files.len(), j.schedule.map_or(1, |_| j.stages));
    let cfg = model(j.data);
    merged
        .flat(prefix, &cfg.tensors(), cfg.num_params())
        .expect("every tensor of the model, each once")
}

/// The whole model's parameters after the newest checkpoint of a run.
fn whole_params(j: &Job<'_>, ckpt: &Path) -> Vec<f32> {
    whole_tensor(j, ckpt, "")
}

fn base(data: &Path) -> Job<'_> {
    Job {
        data,
        schedule: Some("OneFOneB"),
        stages: 2,
        replicas: 1,
        chunks: 1,
        micro: 4,
        batch: 8,
        accum: 1,
        steps: 5,
        every: 1000,
        clip: 1.0,
        init_from: None,
    }
}

/// One process (DDP on one rank) on `base`'s global batch of 8: 4 accumulation steps of 2.
fn one_process(data: &Path) -> Job<'_> {
    Job {
        schedule: None,
        stages: 1,
        batch: 2,
        accum: 4,
        ..base(data)
    }
}

/// Runs `j` in its own checkpoint folder; returns rank 0's summary and the final parameters.
fn run(dir: &Path, name: &str, j: Job<'_>) -> (Summary, Vec<f32>) {
    let ck = dir.join(name);
    let s = ok(train_gang(&j, &ck));
    (s[0].clone(), whole_params(&j, &ck))
}

#[test]
fn every_schedule_on_two_and_four_stages_ends_where_one_process_ends() {
    let dir = scratch("equiv");
    let data = text(&dir);
    // One process, the same global batch of 8 in 4 accumulation steps of 2.
    let ddp = one_process(&data);
    let (one, reference) = run(&dir, "ddp", ddp);
    let start = model(&data).init(5);
    let moved = max_diff(&reference, &start);
    assert!(moved > 1e-3, "the parameters barely moved ({moved})");
    let mut cases = Vec::new();
    for schedule in ["GPipe", "OneFOneB", "ZeroBubble"] {
        for stages in [2, 4] {
            cases.push((schedule, stages, 1));
        }
    }
    cases.push(("Interleaved", 2, 2));
    for (schedule, stages, chunks) in cases {
        let j = Job {
            schedule: Some(schedule),
            stages,
            chunks,
            ..base(&data)
        };
        let (s, params) = run(&dir, &format!("{schedule}-{stages}"), j);
        let d = max_diff(&params, &reference);
        eprintln!("{schedule} on {stages} stages: largest parameter difference {d:.2e}");
        // The same arithmetic up to the order of float additions (the tied embedding's two
        // halves, the norm summed over stages), through AdamW's division: as DDP's ranks.
        assert!(d < 1e-5, "{schedule} on {stages} stages differs by {d}");
        assert!(
            (s.loss - one.loss).abs() < 1e-4,
            "{schedule} on {stages} stages: loss {} vs {}",
            s.loss,
            one.loss
        );
        let val = s.val_loss.expect("a validation loss");
        let want = one.val_loss.expect("a validation loss");
        assert!(
            (val - want).abs() < 1e-4,
            "{schedule}: val_loss {val} vs {want}"
        );
    }
}

#[test]
fn one_stage_is_ddp_with_gradient_accumulation_bit_for_bit() {
    let dir = scratch("one");
    let data = text(&dir);
    let ddp = one_process(&data);
    let (_, reference) = run(&dir, "ddp", ddp);
    for schedule in ["GPipe", "OneFOneB"] {
        let j = Job {
            schedule: Some(schedule),
            stages: 1,
            ..base(&data)
        };
        let (_, params) = run(&dir, schedule, j);
        assert!(
            params == reference,
            "{schedule} on 1 stage differs from DDP by {}",
            max_diff(&params, &reference)
        );
    }
    // Two chunks on one stage hand activations and gradients over locally and hold both copies
    // of the tied embedding: the same up to the order of the embedding's two additions, as ZB-H1
    // (whose weight-gradient pass adds the head's half after the input pass's embedding half).
    for (schedule, chunks) in [("Interleaved", 2), ("ZeroBubble", 1)] {
        let j = Job {
            schedule: Some(schedule),
            stages: 1,
            chunks,
            ..base(&data)
        };
        let (_, params) = run(&dir, &format!("{schedule}-1"), j);
        let d = max_diff(&params, &reference);
        assert!(d < 1e-5, "{schedule} on 1 stage differs from DDP by {d}");
    }
}

#[test]
fn two_replicas_of_two_stages_match_one_process() {
    let dir = scratch("dpxpp");
    let data = text(&dir);
    let ddp = one_process(&data);
    let (_, reference) = run(&dir, "ddp", ddp);
    // Interleaved: each chunk's gradient buckets start during its own last backward.
    for (schedule, chunks) in [("OneFOneB", 1), ("ZeroBubble", 1), ("Interleaved", 2)] {
        // 2 replicas x 4 micro-batches of 1 = the global batch of 8.
        let j = Job {
            schedule: Some(schedule),
            replicas: 2,
            batch: 4,
            chunks,
            ..base(&data)
        };
        let ck = dir.join(format!("dpxpp-{schedule}"));
        let s = ok(train_gang(&j, &ck));
        // Ranks of one stage hold the same parameters.
        assert_eq!(s[0].params_digest, s[1].params_digest, "stage 0's replicas");
        assert_eq!(s[2].params_digest, s[3].params_digest, "stage 1's replicas");
        let d = max_diff(&whole_params(&j, &ck), &reference);
        eprintln!("{schedule} 2 x 2: largest parameter difference {d:.2e}");
        assert!(d < 1e-5, "{schedule} 2 x 2 differs by {d}");
    }
}

#[test]
fn a_pipeline_restarted_from_its_stage_checkpoints_ends_where_it_would_have() {
    let dir = scratch("resume");
    let data = text(&dir);
    let j = Job {
        schedule: Some("ZeroBubble"),
        steps: 6,
        every: 3,
        ..base(&data)
    };
    let full = dir.join("full");
    let whole = ok(train_gang(&j, &full));
    let saved: Vec<u64> = checkpoint::list(&full, Some(2))
        .unwrap()
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(saved, vec![3, 6]);
    // A gang restarted after step 3 finds step 3's shards, and step 6's first shard only (it
    // died while saving): it resumes from step 3.
    let again = dir.join("again");
    std::fs::create_dir_all(&again).unwrap();
    for (step, stage) in [(3, 0), (3, 1), (6, 0)] {
        let name = checkpoint::shard_name(step, stage, 2);
        std::fs::copy(full.join(&name), again.join(&name)).unwrap();
    }
    let resumed = ok(train_gang(&j, &again));
    assert_eq!(resumed[0].resumed_from, Some(3));
    for (a, b) in resumed.iter().zip(&whole) {
        assert_eq!(
            a.params_digest, b.params_digest,
            "the resumed run ends elsewhere"
        );
    }
    assert_eq!(
        resumed[1].loss, whole[1].loss,
        "the last step's loss differs"
    );
}

/// After one step AdamW's first moment is (1 - beta1) times the step's gradient, clipped: the
/// pipelines' gradients themselves (the tied embedding's two halves added once, the replicas
/// averaged, the micro-batches scaled, the norm over all stages) against one process's. AdamW's
/// parameters alone would hide a gradient off by a constant factor.
#[test]
fn the_first_steps_gradient_matches_one_process_with_and_without_clipping() {
    let dir = scratch("grad");
    let data = text(&dir);
    fn one_step(j: Job<'_>) -> Job<'_> {
        Job { steps: 1, ..j }
    }
    let mut largest_by_clip = Vec::new();
    for clip in [0.0, 0.05] {
        let ddp = one_step(Job {
            clip,
            ..one_process(&data)
        });
        let ck = dir.join(format!("ddp-{clip}"));
        ok(train_gang(&ddp, &ck));
        let reference = whole_tensor(&ddp, &ck, "exp_avg.");
        let largest = reference.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        largest_by_clip.push(largest);
        for (schedule, stages, chunks, replicas, batch) in [
            ("OneFOneB", 2, 1, 1, 8),
            ("ZeroBubble", 4, 1, 1, 8),
            ("Interleaved", 2, 2, 1, 8),
            ("GPipe", 2, 1, 2, 4),
            ("ZeroBubble", 2, 1, 2, 4),
        ] {
            let j = one_step(Job {
                schedule: Some(schedule),
                stages,
                chunks,
                replicas,
                batch,
                clip,
                ..base(&data)
            });
            let ck = dir.join(format!("{schedule}-{stages}x{replicas}-{clip}"));
            ok(train_gang(&j, &ck));
            let m = whole_tensor(&j, &ck, "exp_avg.");
            let d = max_diff(&m, &reference);
            eprintln!(
                "{schedule} {stages} stages x {replicas} replicas, clip {clip}: largest \
                 gradient difference {d:.2e} of {largest:.2e}"
            );
            assert!(
                d <= 1e-5 * largest,
                "{schedule} {stages} x {replicas}, clip {clip}: gradients differ by {d} (largest {largest})"
            );
        }
    }
    // Clipping at 0.05 engaged: it shrank the gradient.
    let (unclipped, clipped) = (largest_by_clip[0], largest_by_clip[1]);
    assert!(
        clipped < 0.5 * unclipped,
        "clipping did not engage: {clipped} vs {unclipped}"
    );
}

#[test]
fn pipelines_fine_tune_imported_weights_as_one_process_does() {
    let dir = scratch("import");
    let data = text(&dir);
    // Weights of another seed, exported as transformers loads them.
    let cfg = model(&data);
    let weights = cfg.init(99);
    let zeros = vec![0.0; weights.len()];
    let state = checkpoint::State {
        step: 1,
        adam_t: 1,
        seed: 99,
        model: "gpt".into(),
        tensors: cfg.tensors(),
        meta: [(
            checkpoint::HF_CONFIG.to_string(),
            cfg.hf_config().to_string(),
        )]
        .into(),
        params: weights,
        m: zeros.clone(),
        v: zeros,
        blobs: Default::default(),
    };
    checkpoint::save(&dir.join("pretrained"), &state, 1).expect("save");
    let hf_dir = dir.join("hf");
    hf::export(&dir.join("pretrained"), &hf_dir).expect("export");

    let (_, seeded) = run(&dir, "ddp-seeded", one_process(&data));
    let ddp = Job {
        init_from: Some(&hf_dir),
        ..one_process(&data)
    };
    let (_, reference) = run(&dir, "ddp", ddp);
    let d = max_diff(&reference, &seeded);
    assert!(d > 1e-3, "the imported weights were not used ({d})");
    for (schedule, stages, chunks) in [("OneFOneB", 2, 1), ("Interleaved", 2, 2)] {
        let j = Job {
            schedule: Some(schedule),
            stages,
            chunks,
            init_from: Some(&hf_dir),
            ..base(&data)
        };
        let (_, params) = run(&dir, &format!("{schedule}-import"), j);
        let d = max_diff(&params, &reference);
        assert!(d < 1e-5, "{schedule} from imported weights differs by {d}");
    }
}
