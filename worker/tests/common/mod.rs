//! What the training tests share: a scratch folder, a small text to train on, and a gang of
//! ranks as threads over the real TCP communicator.

// Not every suite uses every helper.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use lockstep_api::config::WorkerConfig;
use lockstep_worker::comm::tcp::{TcpComm, TcpOptions};
use lockstep_worker::error::WorkError;
use lockstep_worker::metrics::Metrics;
use lockstep_worker::trainer::{self, RunInputs, Summary};

/// An empty folder for test `name` of `suite`, under the system's temporary folder.
pub fn scratch(suite: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lockstep-{suite}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// A text with some structure to learn (20 kB of words drawn by a fixed generator), written
/// into `dir`.
pub fn text(dir: &Path) -> PathBuf {
    let words = [
        "the ", "quick ", "brown ", "fox ", "jumps ", "over ", "a ", "lazy ", "dog. ",
    ];
    let mut s = String::new();
    let mut x = 7u64;
    while s.len() < 20_000 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        s.push_str(words[(x >> 33) as usize % words.len()]);
    }
    let p = dir.join("text.txt");
    std::fs::write(&p, s).expect("write text");
    p
}

/// Trains `cfg` on `world` ranks, one thread each, over a transport with `opts`, keeping
/// checkpoints in `ckpt`; returns every rank's result.
pub fn train_gang(
    cfg: &WorkerConfig,
    world: usize,
    ckpt: &Path,
    opts: TcpOptions,
) -> Vec<Result<Summary, WorkError>> {
    let gang = TcpComm::local_gang(world, opts).expect("gang");
    std::thread::scope(|s| {
        let handles: Vec<_> = gang
            .into_iter()
            .enumerate()
            .map(|(r, comm)| {
                s.spawn(move || {
                    let metrics = Metrics::new("oracle", r as u32);
                    let inputs = RunInputs {
                        checkpoint_dir: Some(ckpt.to_path_buf()),
                        nccl_id: Vec::new(),
                        on_step: &|_| {},
                        stop: &AtomicBool::new(false),
                    };
                    trainer::run(cfg, comm, &metrics, &inputs)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    })
}

/// Every rank's summary, or the test fails with the first rank's error.
pub fn ok(results: Vec<Result<Summary, WorkError>>) -> Vec<Summary> {
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("a rank failed: {e}")))
        .collect()
}

/// The largest element-wise difference of two vectors of the same length.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
