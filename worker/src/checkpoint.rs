//! Checkpoints: one safetensors file per saved step, holding each parameter tensor under its own
//! name and shape (for the GPT, Hugging Face GPT-2's: `transformer.h.0.attn.c_attn.weight`, ...;
//! see `lockstep_engine::models::names`) with its AdamW moments beside it (`exp_avg.<name>`,
//! `exp_avg_sq.<name>`, PyTorch's names), all F32, and in its metadata the step, the optimizer's
//! update count, the seed (the data position is `(seed, step)`: the sampler is deterministic), the
//! model's description, a checksum of the tensor bytes and, for a GPT, its Hugging Face
//! `config.json` (what `lockstep-worker export` writes beside the weights, see [`crate::hf`]).
//! Files of the first format (`lockstep-checkpoint/1`: one flat tensor each of parameters and
//! moments) still load.
//!
//! Rank 0 writes `step-NNNNNNNN.safetensors` atomically (a temporary file, fsync, rename,
//! fsync of the directory) and then deletes all but the newest `keep`. Every rank loads the
//! same file. A file that fails its checksum or belongs to another model is refused with an
//! error that names it; nothing is half-loaded.
//!
//! Each file also records who wrote it: the job's UID, the digest of its worker config and the
//! gang attempt ([`Stamp`]). A job lists, resumes from and deletes only files of its own UID (files
//! of another job are left alone, with a warning), and by default keeps them in a folder of its
//! own (`<path>/<job>/<uid>`, see `lockstep_api::contract::paths::job_checkpoints`).
//!
//! A pipeline saves one shard per stage instead, `step-NNNNNNNN.stage-S-of-P.safetensors`
//! (written by the stage's first replica, the same format); a step counts as saved only when
//! every one of its `P` shards is there, so a gang that died halfway through a save resumes
//! from the step before, and old shards are deleted only once the whole newer step is saved.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use lockstep_api::config::fnv1a64;
use lockstep_engine::models::names::{self, Named};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

/// Who writes this process's checkpoints: recorded in each file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stamp {
    /// UID of the job (empty: unknown, as in tests; then nothing is checked).
    pub job_uid: String,
    /// Digest of the worker config.
    pub config_digest: String,
    /// Gang attempt.
    pub attempt: u32,
}

static STAMP: std::sync::OnceLock<Stamp> = std::sync::OnceLock::new();

/// Sets this process's [`Stamp`] (once: a rank is one attempt of one job).
pub fn set_stamp(stamp: Stamp) {
    let _ = STAMP.set(stamp);
}

fn stamp() -> Stamp {
    STAMP.get().cloned().unwrap_or_default()
}

/// The job UID recorded in the checkpoint at `path`, read from its header alone; `None` when
/// the file records none (or cannot be read: the full checks say why later).
pub fn owner(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    let len = u64::from_le_bytes(len);
    // A safetensors header is small; a huge length is a damaged file.
    if len > 100 * 1024 * 1024 {
        return None;
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&header).ok()?;
    Some(v.get("__metadata__")?.get("job_uid")?.as_str()?.to_string())
}

/// Whether the file at `path` belongs to the job `uid` (an empty `uid`, or a file that records
/// none, belongs to anyone).
fn ours(path: &Path, uid: &str) -> bool {
    if uid.is_empty() {
        return true;
    }
    match owner(path) {
        Some(o) if o != uid => {
            tracing::warn!(
                path = %path.display(),
                owner = %o,
                "a checkpoint of another job (another UID): neither resumed from nor deleted"
            );
            false
        }
        _ => true,
    }
}

/// What every refusal of a damaged file (not a checkpoint of another model) says: a gang that
/// resumes sets such a file aside and falls back to the one before.
pub const CORRUPT: &str = "the file is corrupt";

/// The format written in the metadata: named tensors. A file of another is refused, but for
/// [`FLAT_FORMAT`].
pub const FORMAT: &str = "lockstep-checkpoint/2";

/// The first format, still read: one flat tensor each of parameters (`params`) and moments
/// (`adam.m`, `adam.v`) in the engine's own layout.
pub const FLAT_FORMAT: &str = "lockstep-checkpoint/1";

/// The name of a parameter's AdamW first moment (PyTorch's `exp_avg`).
pub fn exp_avg(name: &str) -> String {
    format!("exp_avg.{name}")
}

/// The name of a parameter's AdamW second moment (PyTorch's `exp_avg_sq`).
pub fn exp_avg_sq(name: &str) -> String {
    format!("exp_avg_sq.{name}")
}

/// The metadata key of a GPT's Hugging Face `config.json`.
pub const HF_CONFIG: &str = "hf_config";

/// The metadata key of a character model's vocabulary (a JSON array of its characters, by id).
pub const TEXT_VOCAB: &str = "text_vocab";

/// A checkpoint error, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file system failed.
    #[error("checkpoint {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The checkpoint directory cannot be written: found before training starts, so that no
    /// step is trained for a checkpoint that could never be saved.
    #[error(
        "the checkpoint directory {path} is not writable: {source}. Create it writable by the \
         worker's user (uid 65532 in Lockstep's image), or mount a volume there and set the pod's \
         spec.securityContext.fsGroup so that the volume is"
    )]
    Unwritable {
        /// The directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not a valid checkpoint of this model.
    #[error("checkpoint {path} is refused: {reason}; delete it to start from the previous one")]
    Refused {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// What a checkpoint holds.
#[derive(Clone, Debug, PartialEq)]
pub struct State {
    /// Optimizer steps completed.
    pub step: u64,
    /// AdamW updates so far (its bias correction).
    pub adam_t: i32,
    /// Seed of initialisation and data order.
    pub seed: u64,
    /// The model's description; loading into another model is refused.
    pub model: String,
    /// The named tensors of the flat buffers (what the file stores, each under its name).
    pub tensors: Vec<Named>,
    /// More metadata to record ([`HF_CONFIG`], [`TEXT_VOCAB`]).
    pub meta: std::collections::BTreeMap<String, String>,
    /// Flat parameters.
    pub params: Vec<f32>,
    /// AdamW first moments.
    pub m: Vec<f32>,
    /// AdamW second moments.
    pub v: Vec<f32>,
    /// Opaque state besides the tensors (a temporal graph's stream: node memory, pending
    /// messages, neighbours), each stored as a U8 tensor under its name and covered by the
    /// checksum.
    pub blobs: std::collections::BTreeMap<String, Vec<u8>>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The file name of the checkpoint of `step`.
pub fn file_name(step: u64) -> String {
    format!("step-{step:08}.safetensors")
}

/// The file of stage `stage`'s shard of step `step` of a pipeline of `stages` stages.
pub fn shard_name(step: u64, stage: u32, stages: u32) -> String {
    format!("step-{step:08}.stage-{stage}-of-{stages}.safetensors")
}

/// The step of a checkpoint file and, for a shard, its (stage, stages).
fn parse(name: &str) -> Option<(u64, Option<(u32, u32)>)> {
    let rest = name.strip_prefix("step-")?.strip_suffix(".safetensors")?;
    match rest.split_once(".stage-") {
        None => Some((rest.parse().ok()?, None)),
        Some((step, shard)) => {
            let (s, p) = shard.split_once("-of-")?;
            let (s, p): (u32, u32) = (s.parse().ok()?, p.parse().ok()?);
            (s < p).then_some(())?;
            Some((step.parse().ok()?, Some((s, p))))
        }
    }
}

/// The step of a checkpoint file's name and, for a pipeline stage's shard, its (stage, stages).
pub fn parse_name(name: &str) -> Option<(u64, Option<(u32, u32)>)> {
    parse(name)
}

/// The shapes of the checkpoint files in `dir` (see [`Shape`]), of any job.
pub fn shapes(dir: &Path) -> Result<Vec<Shape>, CheckpointError> {
    let mut s: Vec<Shape> = files(dir)?.into_iter().map(|f| f.1.map(|s| s.1)).collect();
    s.sort_unstable();
    s.dedup();
    Ok(s)
}

/// A checkpoint file: its step, its (stage, stages) when it is a shard, its path.
type File = (u64, Option<(u32, u32)>, PathBuf);

/// Every checkpoint file in `dir`.
fn files(dir: &Path) -> Result<Vec<File>, CheckpointError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(dir)(e)),
    };
    let mut found = Vec::new();
    for e in entries {
        let e = e.map_err(io(dir))?;
        if let Some((step, shard)) = e.file_name().to_str().and_then(parse) {
            found.push((step, shard, e.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// Writes a checkpoint on a thread of its own, so that one slow save does not hold the rank
/// that writes (and with it, in their next collective, every other rank) past the transport's
/// timeout: the caller copies the state to host memory, [`Background::start`] hands it to the
/// thread and returns, and training goes on while it is written. One write at a time: the next
/// save (or [`Background::wait`], at the end and before a stop) first waits for the one in
/// progress, so at most one state is held in memory and at most the newest save is in flight
/// when a gang fails. A disk slower than `checkpoint.everySteps` then holds the writing rank at
/// each save, with a warning.
#[derive(Debug, Default)]
pub struct Background {
    pending: Option<std::thread::JoinHandle<Result<PathBuf, CheckpointError>>>,
}

impl Background {
    /// Waits for the write in progress, if any; returns its file.
    pub fn wait(&mut self) -> Result<Option<PathBuf>, CheckpointError> {
        match self.pending.take() {
            None => Ok(None),
            Some(h) => h.join().unwrap_or_else(|_| Err(writer_gone())).map(Some),
        }
    }

    /// Waits for the write in progress, then starts writing `state` as `name` in `dir` and,
    /// with `prune_after`, pruning the checkpoints of the shape to the newest `keep`. Returns the
    /// file of the write it waited for.
    pub fn start(
        &mut self,
        dir: &Path,
        state: State,
        name: String,
        prune_after: Option<(usize, Shape)>,
    ) -> Result<Option<PathBuf>, CheckpointError> {
        let busy = self.pending.as_ref().is_some_and(|h| !h.is_finished());
        if busy {
            tracing::warn!(
                "the previous checkpoint is still being written: the disk is slower than \
                 spec.training.checkpoint.everySteps asks for (raise everySteps, or use faster \
                 storage); this rank waits for it"
            );
        }
        let done = self.wait()?;
        let target = dir.to_path_buf();
        let dir = dir.to_path_buf();
        self.pending = Some(
            std::thread::Builder::new()
                .name("lockstep-checkpoint".into())
                .spawn(move || {
                    let path = write(&dir, &state, &name)?;
                    if let Some((keep, shape)) = prune_after {
                        prune(&dir, keep, shape)?;
                    }
                    Ok(path)
                })
                .map_err(io(target.as_path()))?,
        );
        Ok(done)
    }
}

fn writer_gone() -> CheckpointError {
    CheckpointError::Io {
        path: PathBuf::from("(checkpoint writer)"),
        source: std::io::Error::other("the checkpoint writer thread panicked"),
    }
}

/// A test hook: writes into a folder whose path ends with the given name take this much longer
/// (a slow disk).
#[doc(hidden)]
pub static SLOW_WRITES: std::sync::Mutex<Option<(String, std::time::Duration)>> =
    std::sync::Mutex::new(None);

/// The end of a temporary file's name (`.step-...<pid>-<random>.tmp`).
const TMP_SUFFIX: &str = ".tmp";

/// How long a temporary file must have been left alone before it counts as a dead writer's.
pub const LEFTOVER_AGE: std::time::Duration = std::time::Duration::from_secs(60);

/// Removes the temporary files a writer killed mid-save left in `dir` (untouched for
/// [`LEFTOVER_AGE`]).
pub fn remove_leftovers(dir: &Path) -> Result<(), CheckpointError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(dir)(e)),
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        // Untouched for a minute: a live writer (a previous attempt's pod still terminating)
        // keeps writing to its file.
        let idle = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= LEFTOVER_AGE);
        if name.starts_with(".step-") && name.ends_with(TMP_SUFFIX) && idle {
            tracing::warn!(path = %e.path().display(), "removing a checkpoint left half-written");
            remove(std::iter::once((0, None, e.path())))?;
        }
    }
    Ok(())
}

/// Renames the files of step `step` of `shape` in `dir` to `<name>.<suffix>`, out of every
/// listing (a refused checkpoint kept for inspection, or a save that never completed), so that
/// nothing counts, resumes from or completes them, and nothing is deleted.
pub fn set_aside(dir: &Path, step: u64, shape: Shape, suffix: &str) -> Result<(), CheckpointError> {
    for (s, _, path) in files_of(dir, shape)? {
        if s == step {
            let mut to = path.clone().into_os_string();
            to.push(format!(".{suffix}"));
            std::fs::rename(&path, &to).map_err(io(&path))?;
            tracing::warn!(from = %path.display(), to = %PathBuf::from(&to).display(), "a checkpoint file set aside");
        }
    }
    Ok(())
}

/// Which checkpoint files a job reads and writes: whole-model files (`None`), or the shards of a
/// pipeline of this many stages. A job never counts, resumes from or deletes files of another
/// shape (a job whose stages changed, another workload in the same folder).
pub type Shape = Option<u32>;

/// The files in `dir` of `shape` that belong to this job (see [`Stamp`]): (step, stage or
/// `None`, path).
fn files_of(dir: &Path, shape: Shape) -> Result<Vec<(u64, Option<u32>, PathBuf)>, CheckpointError> {
    files_of_job(dir, shape, &stamp().job_uid)
}

fn files_of_job(
    dir: &Path,
    shape: Shape,
    uid: &str,
) -> Result<Vec<(u64, Option<u32>, PathBuf)>, CheckpointError> {
    Ok(files(dir)?
        .into_iter()
        .filter(|f| f.1.map(|s| s.1) == shape)
        .filter(|f| ours(&f.2, uid))
        .map(|(step, shard, path)| (step, shard.map(|s| s.0), path))
        .collect())
}

/// Complete checkpoints of `shape` in `dir`, oldest first, as (step, path): a whole-model file,
/// or a pipeline step with every stage's shard (the path is stage 0's).
pub fn list(dir: &Path, shape: Shape) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    list_of_job(dir, shape, &stamp().job_uid)
}

fn list_of_job(
    dir: &Path,
    shape: Shape,
    uid: &str,
) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    let mut by_step: std::collections::BTreeMap<u64, (usize, PathBuf)> = Default::default();
    for (step, _, path) in files_of_job(dir, shape, uid)? {
        let e = by_step.entry(step).or_insert((0, path.clone()));
        e.0 += 1;
        if path.file_name() == Some(std::ffi::OsStr::new(&first_name(step, shape))) {
            e.1 = path;
        }
    }
    let need = shape.map_or(1, |p| p as usize);
    Ok(by_step
        .into_iter()
        .filter(|(_, (n, _))| *n == need)
        .map(|(step, (_, path))| (step, path))
        .collect())
}

/// The file that names a step of `shape`: the whole file, or stage 0's shard.
fn first_name(step: u64, shape: Shape) -> String {
    match shape {
        None => file_name(step),
        Some(p) => shard_name(step, 0, p),
    }
}

/// Deletes the files of `shape` (whole or shard, complete or not) older than its newest `keep`
/// complete steps.
pub fn prune(dir: &Path, keep: usize, shape: Shape) -> Result<(), CheckpointError> {
    prune_of_job(dir, keep, shape, &stamp().job_uid)
}

fn prune_of_job(dir: &Path, keep: usize, shape: Shape, uid: &str) -> Result<(), CheckpointError> {
    let complete = list_of_job(dir, shape, uid)?;
    let Some(&(oldest_kept, _)) = complete
        .iter()
        .rev()
        .nth(keep.max(1) - 1)
        .or(complete.first())
    else {
        return Ok(());
    };
    remove(
        files_of_job(dir, shape, uid)?
            .into_iter()
            .filter(|f| f.0 < oldest_kept),
    )
}

/// Sets aside (as `.incomplete`) the files of `shape` newer than `step`, the newest complete
/// step: shards of a save that never completed, which a later save of the same step must not
/// complete with. Nothing is deleted.
pub fn set_aside_newer(dir: &Path, step: u64, shape: Shape) -> Result<(), CheckpointError> {
    let mut newer: Vec<u64> = files_of(dir, shape)?
        .into_iter()
        .filter(|f| f.0 > step)
        .map(|f| f.0)
        .collect();
    newer.dedup();
    for s in newer {
        set_aside(dir, s, shape, "incomplete")?;
    }
    Ok(())
}

fn remove(files: impl Iterator<Item = (u64, Option<u32>, PathBuf)>) -> Result<(), CheckpointError> {
    for (_, _, old) in files {
        if let Err(e) = std::fs::remove_file(&old) {
            tracing::warn!(path = %old.display(), error = %e, "cannot delete an old checkpoint");
        }
    }
    Ok(())
}

/// Checks that checkpoints can be written into `dir` (creating it if needed), with a probe file
/// of a unique name created exclusively and removed.
pub fn ensure_writable(dir: &Path) -> Result<(), CheckpointError> {
    use std::io::Write;
    // Refused by the pod's setup (permissions, a read-only or missing mount): the job cannot
    // run as configured. Anything else (a full or failing volume) may pass once it is fixed.
    let unwritable = |source: std::io::Error| {
        use std::io::ErrorKind::{NotADirectory, PermissionDenied, ReadOnlyFilesystem};
        let path = dir.to_path_buf();
        if matches!(
            source.kind(),
            PermissionDenied | ReadOnlyFilesystem | NotADirectory
        ) {
            CheckpointError::Unwritable { path, source }
        } else {
            CheckpointError::Io { path, source }
        }
    };
    std::fs::create_dir_all(dir).map_err(unwritable)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let probe = dir.join(format!(".write-probe-{}-{nanos}", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .and_then(|mut f| f.write_all(b"lockstep"));
    let removed = std::fs::remove_file(&probe);
    written.and(removed).map_err(unwritable)
}

/// Writes `state` into `dir` atomically and keeps the newest `keep` checkpoints.
pub fn save(dir: &Path, state: &State, keep: usize) -> Result<PathBuf, CheckpointError> {
    let path = write(dir, state, &file_name(state.step))?;
    prune(dir, keep, None)?;
    Ok(path)
}

/// Writes `state` atomically as `name` in `dir` (a temporary file, fsync, rename, fsync of the
/// directory), without deleting older checkpoints (a pipeline stage's shard: see [`prune`]).
pub fn write(dir: &Path, state: &State, name: &str) -> Result<PathBuf, CheckpointError> {
    write_stamped(dir, state, name, stamp())
}

fn write_stamped(
    dir: &Path,
    state: &State,
    name: &str,
    by: Stamp,
) -> Result<PathBuf, CheckpointError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let slow = SLOW_WRITES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .filter(|(d, _)| dir.ends_with(d));
    if let Some((_, delay)) = slow {
        std::thread::sleep(delay);
    }
    let path = dir.join(name);
    let refuse = |reason: String| CheckpointError::Refused {
        path: path.clone(),
        reason,
    };
    names::check(&state.tensors, state.params.len()).map_err(|e| {
        refuse(format!(
            "its tensors are not a layout of the parameters: {e}"
        ))
    })?;
    // Each parameter, then its moments, in its named layout.
    let mut data: Vec<(String, &Named, Vec<f32>)> = Vec::with_capacity(3 * state.tensors.len());
    for t in &state.tensors {
        data.push((t.name.clone(), t, names::extract(&state.params, t)));
        data.push((exp_avg(&t.name), t, names::extract(&state.m, t)));
        data.push((exp_avg_sq(&t.name), t, names::extract(&state.v, t)));
    }
    // Every tensor, the blobs among them, in name order: the order of the checksum.
    let mut all: Vec<(&str, Dtype, Vec<usize>, &[u8])> = data
        .iter()
        .map(|(name, t, v)| {
            (
                name.as_str(),
                Dtype::F32,
                t.shape.clone(),
                bytemuck::cast_slice::<f32, u8>(v),
            )
        })
        .collect();
    for (name, b) in &state.blobs {
        if data.iter().any(|d| d.0 == *name) {
            return Err(refuse(format!("the blob {name} has a tensor's name")));
        }
        all.push((name.as_str(), Dtype::U8, vec![b.len()], b.as_slice()));
    }
    all.sort_by(|a, b| a.0.cmp(b.0));
    let mut sum = Vec::with_capacity(8 * all.len());
    for (_, _, _, bytes) in &all {
        sum.extend(fnv1a64(bytes).to_le_bytes());
    }
    let mut meta: HashMap<String, String> = [
        ("format", FORMAT.to_string()),
        ("step", state.step.to_string()),
        ("adam_t", state.adam_t.to_string()),
        ("seed", state.seed.to_string()),
        ("model", state.model.clone()),
        ("fnv1a64", format!("{:016x}", fnv1a64(&sum))),
        ("job_uid", by.job_uid),
        ("config_digest", by.config_digest),
        ("attempt", by.attempt.to_string()),
    ]
    .into_iter()
    .filter(|(_, v)| !v.is_empty())
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    meta.extend(state.meta.clone());
    let views = all
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|view| (*name, view))
                .map_err(|e| refuse(format!("cannot describe {name}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bytes = safetensors::serialize(views, Some(meta))
        .map_err(|e| refuse(format!("cannot serialize: {e}")))?;
    // A name of its own, created exclusively: two writers never share a temporary file.
    let tmp = dir.join(format!(
        ".{name}.{}-{:016x}{TMP_SUFFIX}",
        std::process::id(),
        rand::random::<u64>()
    ));
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(&bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(path)
}

/// Reads and checks the checkpoint at `path` for a model described as `model` whose flat buffers
/// of `n` values hold `tensors`.
pub fn load(
    path: &Path,
    model: &str,
    tensors: &[Named],
    n: usize,
) -> Result<State, CheckpointError> {
    read_checked(path, Some((model, tensors, n)), &stamp())
}

/// Checks the file at `path` is a whole checkpoint (its format, tensors and checksum), whatever
/// model it holds.
pub fn verify(path: &Path) -> Result<(), CheckpointError> {
    read(path).map(drop)
}

/// Tensors by name: shape and values.
pub type TensorMap = std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// A checkpoint file read whole and checked (its format and checksum), not yet matched to a
/// model.
#[derive(Debug)]
pub struct Contents {
    /// The metadata ([`FORMAT`] or [`FLAT_FORMAT`] under `format`, the step, the model, ...).
    pub meta: HashMap<String, String>,
    /// Every tensor by name: its shape and values.
    pub tensors: TensorMap,
    /// Every blob (U8 tensor) by name.
    pub blobs: std::collections::BTreeMap<String, Vec<u8>>,
}

impl Contents {
    /// The metadata value `k`.
    pub fn get(&self, k: &str) -> Option<&str> {
        self.meta.get(k).map(String::as_str)
    }

    /// Whether the file is of the first, flat format.
    pub fn is_flat(&self) -> bool {
        self.get("format") == Some(FLAT_FORMAT)
    }
}

/// Little-endian F32 bytes (a safetensors tensor's data) as values.
pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Reads `path` and checks its format and checksum, whatever model it holds.
pub fn read(path: &Path) -> Result<Contents, CheckpointError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let (meta, _) = header(path, &bytes)?;
    contents(path, &bytes, meta)
}

/// The metadata of the safetensors file `bytes` (read from `path`) and its format, checked.
fn header(path: &Path, bytes: &[u8]) -> Result<(HashMap<String, String>, String), CheckpointError> {
    let refuse = |reason: String| CheckpointError::Refused {
        path: path.to_path_buf(),
        reason,
    };
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| refuse(format!("not a valid safetensors file ({e}): {CORRUPT}")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let format = meta
        .get("format")
        .cloned()
        .ok_or_else(|| refuse("its metadata lacks format".into()))?;
    if format != FORMAT && format != FLAT_FORMAT {
        return Err(refuse(format!(
            "format {format}, expected {FORMAT} (or {FLAT_FORMAT})"
        )));
    }
    Ok((meta, format))
}

/// Every tensor of `bytes` as F32, checked against the checksum in `meta`.
fn contents(
    path: &Path,
    bytes: &[u8],
    meta: HashMap<String, String>,
) -> Result<Contents, CheckpointError> {
    let refuse = |reason: String| CheckpointError::Refused {
        path: path.to_path_buf(),
        reason,
    };
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| refuse(format!("not a valid safetensors file ({e}): {CORRUPT}")))?;
    let mut tensors = std::collections::BTreeMap::new();
    let mut blobs = std::collections::BTreeMap::new();
    let mut sum = Vec::with_capacity(8 * st.len());
    // Names in sorted order: the order the checksum was computed in.
    let mut order = st.names();
    order.sort_unstable();
    for name in order {
        let t = st
            .tensor(name)
            .map_err(|e| refuse(format!("tensor {name} is unreadable ({e}): {CORRUPT}")))?;
        sum.extend(fnv1a64(t.data()).to_le_bytes());
        match t.dtype() {
            Dtype::F32 => {
                tensors.insert(name.to_string(), (t.shape().to_vec(), f32s(t.data())));
            }
            Dtype::U8 => {
                blobs.insert(name.to_string(), t.data().to_vec());
            }
            other => {
                return Err(refuse(format!(
                    "tensor {name} is {other:?}, expected F32 (or U8 for a blob)"
                )));
            }
        }
    }
    let want = meta
        .get("fnv1a64")
        .ok_or_else(|| refuse("its metadata lacks fnv1a64".into()))?;
    let got = format!("{:016x}", fnv1a64(&sum));
    if *want != got {
        return Err(refuse(format!(
            "its checksum is {got}, but it was written as {want} ({CORRUPT})"
        )));
    }
    Ok(Contents {
        meta,
        tensors,
        blobs,
    })
}

/// Reads and checks `path`; with `want`, also that it holds that model with those tensors in
/// flat buffers of that length.
fn read_checked(
    path: &Path,
    want: Option<(&str, &[Named], usize)>,
    me: &Stamp,
) -> Result<State, CheckpointError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let refuse = |reason: String| CheckpointError::Refused {
        path: path.to_path_buf(),
        reason,
    };
    let (meta, _) = header(path, &bytes)?;
    let get = |k: &str| {
        meta.get(k)
            .cloned()
            .ok_or_else(|| refuse(format!("its metadata lacks {k}")))
    };
    let mine = &me.job_uid;
    if let (Some(theirs), false) = (meta.get("job_uid"), mine.is_empty())
        && theirs != mine
    {
        return Err(refuse(format!(
            "it was written by the job with UID {theirs}, not by this one ({mine}): a job never \
             resumes from another's checkpoint"
        )));
    }
    if want.is_some()
        && let Some(digest) = meta.get("config_digest")
        && !me.config_digest.is_empty()
        && *digest != me.config_digest
    {
        tracing::warn!(
            path = %path.display(),
            written_with = %digest,
            now = %me.config_digest,
            attempt = meta.get("attempt").map(String::as_str),
            "the checkpoint was written with another worker config (the job changed since)"
        );
    }
    let saved_model = get("model")?;
    if let Some((model, _, _)) = want
        && saved_model != model
    {
        return Err(refuse(format!(
            "it holds the model `{saved_model}`, but this job trains `{model}`"
        )));
    }
    let num = |k: &str| -> Result<u64, CheckpointError> {
        get(k)?
            .parse()
            .map_err(|e| refuse(format!("{k} is not a number ({e})")))
    };
    let (step, adam_t, seed) = (num("step")?, num("adam_t")?, num("seed")?);
    let adam_t = i32::try_from(adam_t).map_err(|e| refuse(format!("adam_t: {e}")))?;
    let mut c = contents(path, &bytes, meta)?;
    let extra = c
        .meta
        .iter()
        .filter(|(k, _)| [HF_CONFIG, TEXT_VOCAB].contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let (tensors, params, m, v) = match want {
        None => (Vec::new(), Vec::new(), Vec::new(), Vec::new()),
        Some((_, tensors, n)) if c.is_flat() => {
            let mut take = |name: &str| match c.tensors.remove(name) {
                Some((shape, v)) if shape == [n] => Ok(v),
                Some((shape, _)) => Err(refuse(format!(
                    "tensor {name} is {shape:?}, expected [{n}]"
                ))),
                None => Err(refuse(format!("tensor {name} is missing"))),
            };
            (
                tensors.to_vec(),
                take("params")?,
                take("adam.m")?,
                take("adam.v")?,
            )
        }
        Some((_, tensors, n)) => {
            names::check(tensors, n).map_err(|e| refuse(e.to_string()))?;
            let (mut p, mut m, mut v) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
            for t in tensors {
                for (name, flat) in [
                    (t.name.clone(), &mut p),
                    (exp_avg(&t.name), &mut m),
                    (exp_avg_sq(&t.name), &mut v),
                ] {
                    match c.tensors.remove(&name) {
                        Some((shape, data)) if shape == t.shape => names::insert(flat, t, &data),
                        Some((shape, _)) => {
                            return Err(refuse(format!(
                                "tensor {name} is {shape:?}, but this model's is {:?}",
                                t.shape
                            )));
                        }
                        None => {
                            return Err(refuse(format!("tensor {name} of this model is missing")));
                        }
                    }
                }
            }
            if let Some(name) = c.tensors.keys().next() {
                return Err(refuse(format!(
                    "it holds tensor {name}, which this model does not have"
                )));
            }
            (tensors.to_vec(), p, m, v)
        }
    };
    Ok(State {
        step,
        adam_t,
        seed,
        model: saved_model,
        tensors,
        meta: extra,
        params,
        m,
        v,
        blobs: std::mem::take(&mut c.blobs),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 9 x 10 weight, stored transposed, and a bias of 10.
    fn layout() -> Vec<Named> {
        vec![
            Named {
                name: "layers.0.weight".into(),
                offset: 0,
                shape: vec![9, 10],
                transposed: true,
            },
            Named {
                name: "layers.0.bias".into(),
                offset: 90,
                shape: vec![10],
                transposed: false,
            },
        ]
    }

    fn state(step: u64) -> State {
        State {
            step,
            adam_t: step as i32,
            seed: 7,
            model: "mlp 64-32-10".into(),
            tensors: layout(),
            meta: [(HF_CONFIG.to_string(), "{}".to_string())].into(),
            params: (0..100).map(|i| i as f32 * 0.5).collect(),
            m: vec![0.25; 100],
            v: vec![0.125; 100],
            blobs: Default::default(),
        }
    }

    #[test]
    fn a_job_neither_lists_nor_loads_nor_deletes_another_jobs_checkpoints() {
        let dir = std::env::temp_dir().join(format!("lockstep-ckpt-uid-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let by = |uid: &str| Stamp {
            job_uid: uid.into(),
            config_digest: "cafe".into(),
            attempt: 2,
        };
        // The job "old" (a job of the same name, deleted) left step 50; "new" writes 10, 20, 30.
        write_stamped(&dir, &state(50), &file_name(50), by("old")).unwrap();
        for step in [10, 20, 30] {
            write_stamped(&dir, &state(step), &file_name(step), by("new")).unwrap();
        }
        assert_eq!(owner(&dir.join(file_name(50))).as_deref(), Some("old"));
        let steps = |uid: &str| -> Vec<u64> {
            list_of_job(&dir, None, uid)
                .unwrap()
                .into_iter()
                .map(|c| c.0)
                .collect()
        };
        assert_eq!(steps("new"), vec![10, 20, 30]);
        assert_eq!(steps("old"), vec![50]);
        // Unknown (tests, old checkpoints): everything counts.
        assert_eq!(steps(""), vec![10, 20, 30, 50]);
        prune_of_job(&dir, 1, None, "new").unwrap();
        assert_eq!(steps("new"), vec![30]);
        assert!(
            dir.join(file_name(50)).exists(),
            "another job's file was deleted"
        );
        let e = read_checked(
            &dir.join(file_name(50)),
            Some(("mlp 64-32-10", &layout(), 100)),
            &by("new"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("written by the job with UID old, not by this one (new)"),
            "{e}"
        );
        assert!(
            !e.contains(CORRUPT),
            "another job's file is not damaged: {e}"
        );
        let ok = read_checked(
            &dir.join(file_name(30)),
            Some(("mlp 64-32-10", &layout(), 100)),
            &by("new"),
        );
        assert_eq!(ok.unwrap(), state(30));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn each_tensor_and_moment_is_stored_under_its_name_in_its_layout() {
        let dir = std::env::temp_dir().join(format!("lockstep-ckpt-named-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = save(&dir, &state(10), 1).unwrap();
        let c = read(&path).unwrap();
        let names: Vec<&str> = c.tensors.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "exp_avg.layers.0.bias",
                "exp_avg.layers.0.weight",
                "exp_avg_sq.layers.0.bias",
                "exp_avg_sq.layers.0.weight",
                "layers.0.bias",
                "layers.0.weight"
            ]
        );
        // The flat buffer holds the weight transposed (10 x 9): element (r, c) of the named
        // 9 x 10 tensor is flat[c * 9 + r] = (c * 9 + r) / 2.
        let (shape, w) = &c.tensors["layers.0.weight"];
        assert_eq!(shape, &[9, 10]);
        assert_eq!(w[10 + 3], (3 * 9 + 1) as f32 * 0.5);
        assert_eq!(c.tensors["layers.0.bias"].1[0], 45.0);
        assert_eq!(c.get(HF_CONFIG), Some("{}"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_flat_checkpoint_of_the_first_format_still_loads() {
        let dir = std::env::temp_dir().join(format!("lockstep-ckpt-flat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let s = state(40);
        let tensors = [("adam.m", &s.m), ("adam.v", &s.v), ("params", &s.params)];
        let mut sum = Vec::new();
        for (_, t) in &tensors {
            sum.extend(fnv1a64(bytemuck::cast_slice(t)).to_le_bytes());
        }
        let meta: HashMap<String, String> = [
            ("format", FLAT_FORMAT.to_string()),
            ("step", "40".into()),
            ("adam_t", "40".into()),
            ("seed", "7".into()),
            ("model", s.model.clone()),
            ("fnv1a64", format!("{:016x}", fnv1a64(&sum))),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let views = tensors.iter().map(|(n, t)| {
            (
                *n,
                TensorView::new(Dtype::F32, vec![t.len()], bytemuck::cast_slice(t)).unwrap(),
            )
        });
        let path = dir.join(file_name(40));
        std::fs::write(&path, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
        let loaded = load(&path, "mlp 64-32-10", &layout(), 100).unwrap();
        assert_eq!(loaded.params, s.params);
        assert_eq!((loaded.m, loaded.v), (s.m, s.v));
        assert_eq!(loaded.step, 40);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn saves_atomically_loads_exactly_and_keeps_the_newest() {
        let dir = std::env::temp_dir().join(format!("lockstep-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for step in [10, 20, 30] {
            save(&dir, &state(step), 2).unwrap();
        }
        let all = list(&dir, None).unwrap();
        assert_eq!(all.iter().map(|a| a.0).collect::<Vec<_>>(), vec![20, 30]);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "no temporary file is left: {names:?}");
        assert_eq!(
            load(&all[1].1, "mlp 64-32-10", &layout(), 100).unwrap(),
            state(30)
        );

        let e = load(&all[1].1, "gpt 4x128", &layout(), 100)
            .unwrap_err()
            .to_string();
        assert!(e.contains("holds the model `mlp 64-32-10`"), "{e}");
        let mut other = layout();
        other[0].shape = vec![10, 9];
        let e = load(&all[1].1, "mlp 64-32-10", &other, 100)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tensor layers.0.weight is [9, 10], but this model's is [10, 9]"),
            "{e}"
        );
        other = layout();
        other[1].name = "layers.1.bias".into();
        let e = load(&all[1].1, "mlp 64-32-10", &other, 100)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tensor layers.1.bias of this model is missing"),
            "{e}"
        );

        // Flip one byte of the parameters: the checksum refuses the file.
        let mut bytes = std::fs::read(&all[1].1).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 0x40;
        std::fs::write(&all[1].1, &bytes).unwrap();
        let e = load(&all[1].1, "mlp 64-32-10", &layout(), 100)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("the file is corrupt") && e.contains("step-00000030"),
            "{e}"
        );
        // A truncated file is refused too.
        std::fs::write(&all[1].1, &bytes[..bytes.len() / 2]).unwrap();
        let e = load(&all[1].1, "mlp 64-32-10", &layout(), 100)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a valid safetensors file"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_pipeline_step_counts_only_with_every_shard_and_old_shards_go_after_a_whole_newer_step() {
        let dir = std::env::temp_dir().join(format!("lockstep-shards-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let shard = |step, stage| {
            write(&dir, &state(step), &shard_name(step, stage, 3)).unwrap();
        };
        for stage in 0..3 {
            shard(10, stage);
        }
        // Step 20 lost its last stage's shard (the gang died while saving).
        shard(20, 0);
        shard(20, 1);
        let steps = |d: &Path| {
            list(d, Some(3))
                .unwrap()
                .iter()
                .map(|a| a.0)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            steps(&dir),
            vec![10],
            "an incomplete step is not a checkpoint"
        );
        assert_eq!(
            list(&dir, Some(3)).unwrap()[0].1,
            dir.join(shard_name(10, 0, 3))
        );
        prune(&dir, 1, Some(3)).unwrap();
        assert!(
            dir.join(shard_name(10, 2, 3)).exists(),
            "the only complete step stays"
        );
        shard(20, 2);
        assert_eq!(steps(&dir), vec![10, 20]);
        prune(&dir, 1, Some(3)).unwrap();
        assert_eq!(steps(&dir), vec![20]);
        let left = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(left, 3, "step 10's shards are gone once step 20 is whole");
        // Files of another shape (2 stages; a whole model) are neither counted nor deleted.
        for stage in 0..2 {
            write(&dir, &state(40), &shard_name(40, stage, 2)).unwrap();
        }
        save(&dir, &state(50), 1).unwrap();
        assert_eq!(steps(&dir), vec![20]);
        assert_eq!(list(&dir, Some(2)).unwrap()[0].0, 40);
        assert_eq!(list(&dir, None).unwrap()[0].0, 50);
        prune(&dir, 1, Some(3)).unwrap();
        assert!(dir.join(shard_name(40, 1, 2)).exists() && dir.join(file_name(50)).exists());
        // A save of step 30 that died after one shard: a gang resuming from 20 sets it aside, so
        // that a later save of 30 is not completed by it; nothing is deleted.
        shard(30, 1);
        set_aside_newer(&dir, 20, Some(3)).unwrap();
        assert!(!dir.join(shard_name(30, 1, 3)).exists());
        assert!(
            dir.join(format!("{}.incomplete", shard_name(30, 1, 3)))
                .exists()
        );
        assert!(
            dir.join(shard_name(20, 1, 3)).exists(),
            "the resume step stays"
        );
        assert!(
            dir.join(shard_name(40, 1, 2)).exists(),
            "another shape stays"
        );
        assert_eq!(parse("step-00000005.stage-3-of-3.safetensors"), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
