//! The temporal-graph oracles on the real training loop, with ranks as threads over the real
//! TCP communicator, on the first 2,000 events of CollegeMsg: no future leakage; data parallel
//! over 2 ranks ends where 1 rank ends; a gang resumed from a mid-epoch checkpoint ends where
//! the uninterrupted run ends, bit for bit; a malformed file is refused with its line.

use std::io::Read;
use std::path::{Path, PathBuf};

use lockstep_api::config::WorkerConfig;
use lockstep_api::contract::ExitCode;
use lockstep_engine::models::tgn::{Embedding, TgnConfig, Updater};
use lockstep_worker::checkpoint;
use lockstep_worker::comm::tcp::TcpOptions;
use lockstep_worker::trainer::Summary;

mod common;
use common::{max_diff, ok, scratch};

/// The first `n` lines of CollegeMsg.
fn college(n: usize) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/collegemsg.txt.gz");
    let mut s = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).expect("data/collegemsg.txt.gz"))
        .read_to_string(&mut s)
        .expect("gzip");
    s.lines().take(n).map(String::from).collect()
}

fn write(dir: &Path, lines: &[String]) -> PathBuf {
    let p = dir.join("events.txt");
    std::fs::write(&p, lines.join("\n")).expect("write the events");
    p
}

#[derive(Clone, Copy)]
struct Job<'a> {
    data: &'a Path,
    ranks: usize,
    steps: u64,
    every: u64,
    model: &'a str,
    pres: bool,
    /// Events per temporal batch.
    batch: usize,
}

fn config(j: &Job<'_>) -> WorkerConfig {
    let yaml = format!(
        r#"apiVersion: lockstep.dev/v1alpha1
kind: ParallelJob
metadata: {{name: pres-oracle}}
spec:
  parallelism: {{dataParallel: {ranks}}}
  training:
    workload: Pres
    model: {{tgn: {{memoryDim: 12, timeDim: 6, embeddingDim: 8, neighbors: 4, heads: 2, memoryModel: {model}}}}}
    data: {{kind: TemporalGraph, path: "{data}"}}
    optimizer: {{learningRate: 0.003, schedule: Constant}}
    maxSteps: {steps}
    seed: 3
    pres: {{temporalBatch: {batch}, predictionCorrection: {pres}, gamma: 0.5, coherenceWeight: {beta}}}
    checkpoint: {{everySteps: {every}, keep: 100}}
  template:
    spec:
      containers: [{{name: worker, image: lockstep/worker:0.1.0}}]
"#,
        ranks = j.ranks,
        model = j.model,
        data = j.data.display(),
        steps = j.steps,
        every = j.every,
        pres = j.pres,
        batch = j.batch,
        beta = if j.pres { 0.2 } else { 0.0 },
    );
    let job = lockstep_api::manifest::parse_job(&yaml).expect("valid job");
    WorkerConfig::from_job(&job).expect("config")
}

fn train(j: &Job<'_>, ckpt: &Path) -> Vec<Summary> {
    ok(common::train_gang(
        &config(j),
        j.ranks,
        ckpt,
        TcpOptions::default(),
    ))
}

/// The parameters (`moments` false) or the AdamW first moments of the checkpoint of `step`, in
/// name order.
fn tensors(ckpt: &Path, step: u64, moments: bool) -> Vec<f32> {
    let c = checkpoint::read(&ckpt.join(checkpoint::file_name(step))).expect("the checkpoint");
    c.tensors
        .iter()
        .filter(|(k, _)| {
            if moments {
                k.starts_with("exp_avg.")
            } else {
                !k.starts_with("exp_avg")
            }
        })
        .flat_map(|(_, (_, v))| v.clone())
        .collect()
}

/// The engine's shape of [`config`]'s model on CollegeMsg (no edge features).
fn engine_config(model: &str) -> TgnConfig {
    let jodie = model == "Jodie";
    TgnConfig {
        memory: 12,
        time: 6,
        edge: 0,
        embedding: 8,
        heads: 2,
        neighbors: 4,
        updater: if jodie { Updater::Rnn } else { Updater::Gru },
        embed: if jodie {
            Embedding::TimeProjection
        } else {
            Embedding::Attention
        },
    }
}

fn base(data: &Path) -> Job<'_> {
    Job {
        data,
        ranks: 1,
        steps: 6,
        every: 1,
        model: "Tgn",
        pres: true,
        batch: 100,
    }
}

#[test]
fn events_after_the_trained_batches_change_nothing_the_training_computed() {
    let dir = scratch("pres", "leak");
    let lines = college(2000);
    let data = write(&dir, &lines);
    // 6 batches of 100 train on events 0..600. The events from `from` on swap destinations
    // among themselves: the same nodes, ids and times (JODIE's time scale is a statistic of the
    // whole training part, so for JODIE only the events after it change).
    let permute = |from: usize| {
        let mut changed = lines.clone();
        let n = lines.len() - from;
        for i in from..lines.len() {
            let f: Vec<&str> = lines[i].split(' ').collect();
            let j = from + (i - from + 37) % n;
            let d = lines[j].split(' ').nth(1).unwrap();
            changed[i] = format!("{} {} {}", f[0], d, f[2]);
        }
        changed
    };
    for (model, from) in [("Tgn", 700), ("Jodie", 1500)] {
        let other = dir.join(format!("changed-{model}"));
        std::fs::create_dir_all(&other).unwrap();
        let data2 = write(&other, &permute(from));
        let a = train(
            &Job {
                model,
                ..base(&data)
            },
            &dir.join(format!("a-{model}")),
        );
        let b = train(
            &Job {
                model,
                data: &data2,
                ..base(&data)
            },
            &dir.join(format!("b-{model}")),
        );
        assert_eq!(
            a[0].params_digest, b[0].params_digest,
            "{model}: the future leaked"
        );
        assert_eq!(a[0].loss, b[0].loss);
        // The evaluation does read them (it replays every training event, then scores the
        // later ones): the changed events are seen there.
        assert_ne!(
            a[0].eval_accuracy, b[0].eval_accuracy,
            "{model}: the change is not seen"
        );
    }
}

/// The ranks average their share's gradients where one rank sums them in one pass: the sums
/// differ in their last bits, and the gradients agree to float precision. From the same state
/// (the first step, and a mid-epoch checkpoint where PRES's statistics are in use), one step on
/// 2 ranks gives 1 rank's gradient (AdamW's first moment after the step) within 1e-4 of the
/// largest entry, and the ranks end with equal parameters. Over many steps the runs drift apart
/// as any two float orders do, faster than usual: TGN's time encoding (trainable frequencies on
/// raw seconds) turns parameter differences of 1e-7 into phase differences of radians.
#[test]
fn two_data_parallel_ranks_take_one_ranks_step() {
    let dir = scratch("pres", "dp");
    let data = write(&dir, &college(2000));
    for (model, pres) in [("Tgn", true), ("Tgn", false), ("Jodie", true)] {
        let tag = format!("{model}-{pres}");
        let first = |ranks: usize| {
            let d = dir.join(format!("first-{ranks}-{tag}"));
            let j = Job {
                model,
                pres,
                ranks,
                steps: 1,
                every: 1,
                ..base(&data)
            };
            let s = train(&j, &d);
            assert!(s.iter().all(|x| x.params_digest == s[0].params_digest));
            tensors(&d, 1, true)
        };
        // Five steps on one rank, then the sixth from that checkpoint on one and on two.
        let start = dir.join(format!("start-{tag}"));
        let j5 = Job {
            model,
            pres,
            steps: 5,
            every: 5,
            ..base(&data)
        };
        train(&j5, &start);
        let sixth = |ranks: usize| {
            let d = dir.join(format!("sixth-{ranks}-{tag}"));
            std::fs::create_dir_all(&d).unwrap();
            let name = checkpoint::file_name(5);
            std::fs::copy(start.join(&name), d.join(&name)).unwrap();
            let j = Job {
                ranks,
                steps: 6,
                every: 6,
                ..j5
            };
            let s = train(&j, &d);
            assert_eq!(s[0].resumed_from, Some(5));
            assert!(
                s.iter().all(|x| x.params_digest == s[0].params_digest),
                "the ranks disagree"
            );
            tensors(&d, 6, true)
        };
        for (what, one, two) in [
            ("step 1", first(1), first(2)),
            ("step 6", sixth(1), sixth(2)),
        ] {
            let big = one.iter().fold(0f32, |m, x| m.max(x.abs()));
            let d = max_diff(&one, &two);
            eprintln!("{tag} {what}: gradients differ by {d:.2e} of {big:.2e}");
            assert!(big > 0.0 && d <= 1e-4 * big, "{tag} {what}: {d} of {big}");
        }
    }
}

/// Batches that the ranks cannot split evenly: 101 events over 2 ranks (and the epoch's last
/// batch of 87), and 233 over 3 (and a last batch of 2: one rank computes nothing). A whole epoch
/// trains, the ranks end equal, and the first step's gradient is one rank's.
#[test]
fn ranks_split_uneven_and_short_batches_through_a_whole_epoch() {
    let dir = scratch("pres", "uneven");
    let data = write(&dir, &college(2000));
    for (ranks, batch, steps) in [(2, 101, 14), (3, 233, 7)] {
        let j = Job {
            ranks,
            batch,
            steps,
            every: 1,
            ..base(&data)
        };
        let one = Job { ranks: 1, ..j };
        let (da, db) = (
            dir.join(format!("one-{ranks}-{batch}")),
            dir.join(format!("many-{ranks}-{batch}")),
        );
        let single = train(&one, &da);
        let many = train(&j, &db);
        assert_eq!(single[0].steps, steps);
        assert!(
            many.iter()
                .all(|s| s.params_digest == many[0].params_digest),
            "{ranks} ranks disagree"
        );
        let (ma, mb) = (tensors(&da, 1, true), tensors(&db, 1, true));
        let big = ma.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(
            max_diff(&ma, &mb) <= 1e-4 * big,
            "{ranks} ranks, batch {batch}"
        );
    }
}

#[test]
fn a_gang_resumed_mid_epoch_ends_where_the_uninterrupted_run_ends() {
    let dir = scratch("pres", "resume");
    let data = write(&dir, &college(2000));
    for model in ["Tgn", "Jodie"] {
        // 14 training batches an epoch: steps 5 and 10 are mid-epoch, 16 is in the second.
        let j = Job {
            model,
            steps: 16,
            every: 5,
            ..base(&data)
        };
        let full = dir.join(format!("full-{model}"));
        let whole = train(&j, &full);
        let again = dir.join(format!("again-{model}"));
        std::fs::create_dir_all(&again).unwrap();
        let name = checkpoint::file_name(10);
        std::fs::copy(full.join(&name), again.join(&name)).unwrap();
        let resumed = train(&j, &again);
        assert_eq!(resumed[0].resumed_from, Some(10));
        assert_eq!(
            resumed[0].params_digest, whole[0].params_digest,
            "{model}: the resumed run ends elsewhere"
        );
        assert_eq!(resumed[0].loss, whole[0].loss);
        // Without the stream state the checkpoint is refused, not half-loaded.
        let path = full.join(&name);
        let model_name = checkpoint::read(&path)
            .unwrap()
            .get("model")
            .unwrap()
            .to_string();
        let tensors = engine_config(model).tensors();
        let n = engine_config(model).num_params();
        let mut state = checkpoint::load(&path, &model_name, &tensors, n).unwrap();
        assert!(state.blobs.contains_key("stream"));
        state.blobs.clear();
        let broken = dir.join(format!("broken-{model}"));
        checkpoint::write(&broken, &state, &name).unwrap();
        let r = common::train_gang(&config(&j), 1, &broken, TcpOptions::default());
        let e = r.into_iter().next().unwrap().unwrap_err();
        assert_eq!(e.code, ExitCode::Checkpoint);
        assert!(e.message.contains("stream state"), "{}", e.message);
    }
}

#[test]
fn a_malformed_event_file_is_refused_with_its_line() {
    let dir = scratch("pres", "bad");
    let mut lines = college(200);
    lines[41] = "17 18".into();
    let data = write(&dir, &lines);
    let r = common::train_gang(
        &config(&base(&data)),
        1,
        &dir.join("ckpt"),
        TcpOptions::default(),
    );
    let e = r.into_iter().next().unwrap().unwrap_err();
    assert_eq!(e.code, ExitCode::Data);
    assert!(e.message.contains("line 42: 2 fields"), "{}", e.message);
}
