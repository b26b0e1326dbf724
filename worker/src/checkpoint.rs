//! Checkpoints: one safetensors file per saved step, holding the parameters and the AdamW
//! moments as F32 tensors, and in its metadata the step, the optimizer's update count, the
//! seed (the data position is `(seed, step)`: the sampler is deterministic), the model's
//! description and a checksum of the tensor bytes.
//!
//! Rank 0 writes `step-NNNNNNNN.safetensors` atomically (a temporary file, fsync, rename,
//! fsync of the directory) and then deletes all but the newest `keep`. Every rank loads the
//! same file. A file that fails its checksum or belongs to another model is refused with an
//! error that names it; nothing is half-loaded.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use lockstep_api::config::fnv1a64;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

/// The format written in the metadata; a file with another is refused.
pub const FORMAT: &str = "lockstep-checkpoint/1";

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
    /// Flat parameters.
    pub params: Vec<f32>,
    /// AdamW first moments.
    pub m: Vec<f32>,
    /// AdamW second moments.
    pub v: Vec<f32>,
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

fn step_of(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?
        .strip_suffix(".safetensors")?
        .parse()
        .ok()
}

/// Checkpoints in `dir`, oldest first, as (step, path).
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(dir)(e)),
    };
    let mut found = Vec::new();
    for e in entries {
        let e = e.map_err(io(dir))?;
        if let Some(step) = e.file_name().to_str().and_then(step_of) {
            found.push((step, e.path()));
        }
    }
    found.sort();
    Ok(found)
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
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tensors = [
        ("adam.m", &state.m),
        ("adam.v", &state.v),
        ("params", &state.params),
    ];
    let mut sum = Vec::with_capacity(24);
    for (_, t) in &tensors {
        sum.extend(fnv1a64(bytemuck::cast_slice(t)).to_le_bytes());
    }
    let meta: HashMap<String, String> = [
        ("format", FORMAT.to_string()),
        ("step", state.step.to_string()),
        ("adam_t", state.adam_t.to_string()),
        ("seed", state.seed.to_string()),
        ("model", state.model.clone()),
        ("fnv1a64", format!("{:016x}", fnv1a64(&sum))),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let path = dir.join(file_name(state.step));
    let refuse = |reason: String| CheckpointError::Refused {
        path: path.clone(),
        reason,
    };
    let views = tensors
        .iter()
        .map(|(name, t)| {
            TensorView::new(Dtype::F32, vec![t.len()], bytemuck::cast_slice(t))
                .map(|v| (*name, v))
                .map_err(|e| refuse(format!("cannot describe {name}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bytes = safetensors::serialize(views, Some(meta))
        .map_err(|e| refuse(format!("cannot serialize: {e}")))?;
    let tmp = dir.join(format!(".{}.tmp", file_name(state.step)));
    {
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    let all = list(dir)?;
    for (_, old) in all.iter().take(all.len().saturating_sub(keep.max(1))) {
        if let Err(e) = std::fs::remove_file(old) {
            tracing::warn!(path = %old.display(), error = %e, "cannot delete an old checkpoint");
        }
    }
    Ok(path)
}

/// Reads and checks the checkpoint at `path` for a model described as `model` with `n`
/// parameters.
pub fn load(path: &Path, model: &str, n: usize) -> Result<State, CheckpointError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let refuse = |reason: String| CheckpointError::Refused {
        path: path.to_path_buf(),
        reason,
    };
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| refuse(format!("not a valid safetensors file ({e})")))?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| refuse(format!("unreadable header ({e})")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let get = |k: &str| {
        meta.get(k)
            .cloned()
            .ok_or_else(|| refuse(format!("its metadata lacks {k}")))
    };
    let format = get("format")?;
    if format != FORMAT {
        return Err(refuse(format!("format {format}, expected {FORMAT}")));
    }
    let saved_model = get("model")?;
    if saved_model != model {
        return Err(refuse(format!(
            "it holds the model `{saved_model}`, but this job trains `{model}`"
        )));
    }
    let num = |k: &str| -> Result<u64, CheckpointError> {
        get(k)?
            .parse()
            .map_err(|e| refuse(format!("{k} is not a number ({e})")))
    };
    let mut tensors = HashMap::new();
    let mut sum = Vec::with_capacity(24);
    for name in ["adam.m", "adam.v", "params"] {
        let t = st
            .tensor(name)
            .map_err(|e| refuse(format!("tensor {name} is missing ({e})")))?;
        if t.dtype() != Dtype::F32 || t.shape() != [n] {
            return Err(refuse(format!(
                "tensor {name} is {:?} {:?}, expected F32 [{n}]",
                t.dtype(),
                t.shape()
            )));
        }
        sum.extend(fnv1a64(t.data()).to_le_bytes());
        let v: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        tensors.insert(name, v);
    }
    let want = get("fnv1a64")?;
    let got = format!("{:016x}", fnv1a64(&sum));
    if want != got {
        return Err(refuse(format!(
            "its checksum is {got}, but it was written as {want} (the file is corrupt)"
        )));
    }
    Ok(State {
        step: num("step")?,
        adam_t: i32::try_from(num("adam_t")?).map_err(|e| refuse(format!("adam_t: {e}")))?,
        seed: num("seed")?,
        model: saved_model,
        params: tensors.remove("params").unwrap_or_default(),
        m: tensors.remove("adam.m").unwrap_or_default(),
        v: tensors.remove("adam.v").unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: u64) -> State {
        State {
            step,
            adam_t: step as i32,
            seed: 7,
            model: "mlp 64-32-10".into(),
            params: (0..100).map(|i| i as f32 * 0.5).collect(),
            m: vec![0.25; 100],
            v: vec![0.125; 100],
        }
    }

    #[test]
    fn saves_atomically_loads_exactly_and_keeps_the_newest() {
        let dir = std::env::temp_dir().join(format!("lockstep-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for step in [10, 20, 30] {
            save(&dir, &state(step), 2).unwrap();
        }
        let all = list(&dir).unwrap();
        assert_eq!(all.iter().map(|a| a.0).collect::<Vec<_>>(), vec![20, 30]);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "no temporary file is left: {names:?}");
        assert_eq!(load(&all[1].1, "mlp 64-32-10", 100).unwrap(), state(30));

        let e = load(&all[1].1, "gpt 4x128", 100).unwrap_err().to_string();
        assert!(e.contains("holds the model `mlp 64-32-10`"), "{e}");
        let e = load(&all[1].1, "mlp 64-32-10", 99).unwrap_err().to_string();
        assert!(e.contains("expected F32 [99]"), "{e}");

        // Flip one byte of the parameters: the checksum refuses the file.
        let mut bytes = std::fs::read(&all[1].1).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 0x40;
        std::fs::write(&all[1].1, &bytes).unwrap();
        let e = load(&all[1].1, "mlp 64-32-10", 100)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("the file is corrupt") && e.contains("step-00000030"),
            "{e}"
        );
        // A truncated file is refused too.
        std::fs::write(&all[1].1, &bytes[..bytes.len() / 2]).unwrap();
        let e = load(&all[1].1, "mlp 64-32-10", 100)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a valid safetensors file"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
