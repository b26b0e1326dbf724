//! Checkpoints as PyTorch users load them: `lockstep-worker export` turns a checkpoint (one file,
//! or a pipeline step's shards put back together) into a Hugging Face GPT-2 directory
//! (`model.safetensors`, `config.json`) that `transformers.GPT2LMHeadModel.from_pretrained`
//! loads, and `spec.training.initFrom` starts a job from such a directory (or from any
//! Lockstep checkpoint), fine-tuning it.
//!
//! The GPT's tensors already carry Hugging Face's names and layout in a checkpoint (see
//! `lockstep_engine::models::names`), so an export only drops the optimizer's moments and the
//! pipeline's second copy of the tied embedding (`lm_head.weight`, checked equal to
//! `transformer.wte.weight`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use lockstep_engine::models::gpt::GptConfig;
use lockstep_engine::models::names::{self, LM_HEAD, Named, WTE};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::checkpoint::{self, CheckpointError, Contents, HF_CONFIG, TEXT_VOCAB, TensorMap};

/// What an export or an import refuses, with what to do.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    /// A checkpoint that cannot be read.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The file system failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The input is not what the command or the job needs.
    #[error("{0}")]
    Invalid(String),
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] lockstep_engine::EngineError),
    /// A checkpoint of the first, flat format, where named tensors are needed.
    #[error(
        "{0} is a checkpoint of the first format (lockstep-checkpoint/1: one flat tensor, the \
         engine's own layout). Resume the job from it with this Lockstep, which saves named \
         tensors from its next checkpoint on, and use that checkpoint"
    )]
    FlatFormat(PathBuf),
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> HfError + '_ {
    move |source| HfError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The prefix of a parameter's first moment (see [`checkpoint::exp_avg`]).
const EXP_AVG: &str = "exp_avg.";
/// The prefix of a parameter's second moment.
const EXP_AVG_SQ: &str = "exp_avg_sq.";

/// The files of the checkpoint `path` names: the file itself when it is a whole-model
/// checkpoint, every shard of its step when it is a pipeline stage's shard, or, for a directory,
/// those of its newest complete checkpoint (of any shape). Returns (step, files).
pub fn step_files(path: &Path) -> Result<(u64, Vec<PathBuf>), HfError> {
    if path.is_dir() {
        return newest(path);
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let Some((step, shard)) = checkpoint::parse_name(name) else {
        // A renamed file: its step is in its metadata.
        let step = checkpoint::read(path)?
            .get("step")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        return Ok((step, vec![path.to_path_buf()]));
    };
    let Some((_, stages)) = shard else {
        return Ok((step, vec![path.to_path_buf()]));
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let files: Vec<PathBuf> = (0..stages)
        .map(|s| dir.join(checkpoint::shard_name(step, s, stages)))
        .collect();
    if let Some(missing) = files.iter().find(|f| !f.exists()) {
        return Err(HfError::Invalid(format!(
            "{} is one shard of step {step} of a {stages}-stage pipeline, and {} is missing: the \
             step was never saved whole",
            path.display(),
            missing.display()
        )));
    }
    Ok((step, files))
}

/// The newest complete checkpoint in `dir`, whole or sharded.
fn newest(dir: &Path) -> Result<(u64, Vec<PathBuf>), HfError> {
    let mut best: Option<(u64, Vec<PathBuf>)> = None;
    for shape in checkpoint::shapes(dir)? {
        if let Some((step, first)) = checkpoint::list(dir, shape)?.pop()
            && best.as_ref().is_none_or(|b| b.0 < step)
        {
            let files = match shape {
                None => vec![first],
                Some(p) => (0..p)
                    .map(|s| dir.join(checkpoint::shard_name(step, s, p)))
                    .collect(),
            };
            best = Some((step, files));
        }
    }
    best.ok_or_else(|| HfError::Invalid(format!("{} holds no complete checkpoint", dir.display())))
}

/// A checkpoint step read whole: every tensor (parameters and moments) of every file put
/// together, the pipeline's second copy of the tied embedding checked and dropped.
#[derive(Debug)]
pub struct Merged {
    /// The step.
    pub step: u64,
    /// The files read.
    pub files: Vec<PathBuf>,
    /// The first file's metadata.
    pub meta: HashMap<String, String>,
    /// Tensors by name: shape and values.
    pub tensors: TensorMap,
}

impl Merged {
    /// The GPT the checkpoint holds, from its recorded Hugging Face config.
    pub fn gpt(&self) -> Result<GptConfig, HfError> {
        let files = self
            .files
            .first()
            .map_or(String::new(), |f| f.display().to_string());
        let text = self.meta.get(HF_CONFIG).ok_or_else(|| {
            HfError::Invalid(format!(
                "{files} records no GPT config: only a GPT's checkpoint exports to a Hugging Face \
                 directory"
            ))
        })?;
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| HfError::Invalid(format!("{files}: its {HF_CONFIG} is not JSON: {e}")))?;
        GptConfig::from_hf_config(&v).map_err(|e| HfError::Invalid(format!("{files}: {e}")))
    }

    /// The flat buffer of `len` holding `tensors` under their names with `prefix`: `""` for the
    /// parameters, `"exp_avg."` and `"exp_avg_sq."` for the AdamW moments.
    pub fn flat(&self, prefix: &str, tensors: &[Named], len: usize) -> Result<Vec<f32>, HfError> {
        let what = format!("step {}", self.step);
        assemble(&what, &self.tensors, prefix, tensors, len, &|k| {
            prefix.is_empty() && (k.starts_with(EXP_AVG) || k.starts_with(EXP_AVG_SQ))
        })
    }
}

/// Reads the checkpoint `path` names (see [`step_files`]) and puts its files together.
pub fn read_step(path: &Path) -> Result<Merged, HfError> {
    let (step, files) = step_files(path)?;
    let mut meta = None;
    let mut tensors = BTreeMap::new();
    for f in &files {
        let c: Contents = checkpoint::read(f)?;
        if c.is_flat() {
            return Err(HfError::FlatFormat(f.clone()));
        }
        for (name, t) in c.tensors {
            if tensors.insert(name.clone(), t).is_some() {
                return Err(HfError::Invalid(format!(
                    "tensor {name} is in more than one shard of step {step}"
                )));
            }
        }
        meta.get_or_insert(c.meta);
    }
    // A pipeline's last stage keeps its own copy of the tied embedding; the two stay equal.
    for prefix in ["", EXP_AVG, EXP_AVG_SQ] {
        let (head, wte) = (format!("{prefix}{LM_HEAD}"), format!("{prefix}{WTE}"));
        if let Some(copy) = tensors.remove(&head) {
            match tensors.get(&wte) {
                Some(t) if *t == copy => {}
                Some(_) => {
                    return Err(HfError::Invalid(format!(
                        "step {step}: {head} differs from {wte}: the two copies of the tied \
                         embedding are not equal"
                    )));
                }
                None => {
                    tensors.insert(wte, copy);
                }
            }
        }
    }
    Ok(Merged {
        step,
        files,
        meta: meta.unwrap_or_default(),
        tensors,
    })
}

/// The flat buffer of `len` holding `tensors`, each taken from `found` under its name with
/// `prefix` (missing, misshapen or extra tensors refused, naming them; `ignore` names the extra
/// ones to skip). What no tensor covers is zero.
fn assemble(
    what: &str,
    found: &TensorMap,
    prefix: &str,
    tensors: &[Named],
    len: usize,
    ignore: &dyn Fn(&str) -> bool,
) -> Result<Vec<f32>, HfError> {
    let mut flat = vec![0.0; len];
    for t in tensors {
        let name = format!("{prefix}{}", t.name);
        match found.get(&name) {
            Some((shape, v)) if *shape == t.shape => names::insert(&mut flat, t, v),
            Some((shape, _)) => {
                return Err(HfError::Invalid(format!(
                    "{what}: tensor {name} is {shape:?}, but the job's model has {:?}",
                    t.shape
                )));
            }
            None => {
                return Err(HfError::Invalid(format!(
                    "{what}: tensor {name} of the job's model is missing"
                )));
            }
        }
    }
    let known: std::collections::HashSet<String> = tensors
        .iter()
        .map(|t| format!("{prefix}{}", t.name))
        .collect();
    if let Some(extra) = found
        .keys()
        .find(|k| k.starts_with(prefix) && !known.contains(*k) && !ignore(k))
    {
        return Err(HfError::Invalid(format!(
            "{what}: it holds tensor {extra}, which the job's model does not have"
        )));
    }
    Ok(flat)
}

/// What an export wrote.
#[derive(Debug)]
pub struct Exported {
    /// The step exported.
    pub step: u64,
    /// The files read.
    pub from: Vec<PathBuf>,
    /// The model.
    pub config: GptConfig,
}

/// Writes the GPT of the checkpoint `src` (a file, a shard, or a folder of checkpoints: see
/// [`step_files`]) into `out` as Hugging Face GPT-2 does: `model.safetensors` (F32, the
/// parameters only), `config.json`, and, for a model of characters, `lockstep-vocab.json` (the
/// character of each token id).
pub fn export(src: &Path, out: &Path) -> Result<Exported, HfError> {
    let m = read_step(src)?;
    let config = m.gpt()?;
    let flat = m.flat("", &config.tensors(), config.num_params())?;
    std::fs::create_dir_all(out).map_err(io(out))?;
    let tensors = config.tensors();
    let data: Vec<(String, Vec<usize>, Vec<f32>)> = tensors
        .iter()
        .map(|t| (t.name.clone(), t.shape.clone(), names::extract(&flat, t)))
        .collect();
    let views = data
        .iter()
        .map(|(n, shape, v)| {
            TensorView::new(Dtype::F32, shape.clone(), bytemuck::cast_slice(v))
                .map(|view| (n.as_str(), view))
                .map_err(|e| HfError::Invalid(format!("tensor {n}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // transformers reads `format: pt` to know the tensors are PyTorch's.
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let bytes = safetensors::serialize(views, Some(meta))
        .map_err(|e| HfError::Invalid(format!("cannot serialize: {e}")))?;
    write_atomic(&out.join("model.safetensors"), &bytes)?;
    let json = serde_json::to_vec_pretty(&config.hf_config())
        .map_err(|e| HfError::Invalid(format!("config.json: {e}")))?;
    write_atomic(&out.join("config.json"), &json)?;
    if let Some(vocab) = m.meta.get(TEXT_VOCAB) {
        write_atomic(&out.join("lockstep-vocab.json"), vocab.as_bytes())?;
    }
    Ok(Exported {
        step: m.step,
        from: m.files,
        config,
    })
}

/// Writes `bytes` to `path` whole or not at all (a temporary file, fsync, rename).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), HfError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// The model a job starts from: its tensors in its flat buffer, its description (for the
/// first checkpoint format) and, for a GPT, its shape (checked against a `config.json`).
pub struct Target<'a> {
    /// The model's tensors.
    pub tensors: &'a [Named],
    /// Length of its flat buffer.
    pub len: usize,
    /// Its description, as checkpoints record it.
    pub model: &'a str,
    /// The GPT, if it is one.
    pub gpt: Option<&'a GptConfig>,
}

/// The weights at `path` (`spec.training.initFrom`: a Hugging Face GPT-2 directory or a
/// Lockstep checkpoint) as `target`'s flat buffer; refused, naming the field and the mismatch,
/// when they are not of that model.
pub fn initial_weights(path: &Path, target: &Target<'_>) -> Result<Vec<f32>, HfError> {
    let what = format!("spec.training.initFrom {}", path.display());
    if !path.exists() {
        return Err(HfError::Invalid(format!(
            "{what} does not exist in the worker: mount the volume that holds it (in a cluster), \
             or give a path relative to the current directory (locally)"
        )));
    }
    if path.is_dir() && path.join("config.json").exists() {
        let Some(gpt) = target.gpt else {
            return Err(HfError::Invalid(format!(
                "{what} is a Hugging Face directory, which holds a GPT-2, but \
                 spec.training.model is not a gpt"
            )));
        };
        let theirs = hf_config(path)?;
        same_gpt(&what, &theirs, gpt)?;
        let found = read_hf_weights(path, &what)?;
        let ignore = |k: &str| {
            // The causal masks older GPT-2 files keep as buffers.
            k == LM_HEAD || k.ends_with(".attn.bias") || k.ends_with(".attn.masked_bias")
        };
        if let (Some(head), Some(wte)) = (found.get(LM_HEAD), found.get(WTE))
            && head != wte
        {
            return Err(HfError::Invalid(format!(
                "{what}: {LM_HEAD} differs from {WTE}; the engine's GPT ties them (untied \
                 embeddings do not load)"
            )));
        }
        return assemble(&what, &found, "", target.tensors, target.len, &ignore);
    }
    let m = match read_step(path) {
        Err(HfError::FlatFormat(file)) => {
            // The first format: the engine's own flat layout, of this very model.
            let c = checkpoint::read(&file)?;
            let model = c.get("model").unwrap_or_default();
            if model != target.model {
                return Err(HfError::Invalid(format!(
                    "{what} holds the model `{model}`, but this job trains `{}`",
                    target.model
                )));
            }
            return match c.tensors.get("params") {
                Some((shape, v)) if *shape == [target.len] => Ok(v.clone()),
                _ => Err(HfError::Invalid(format!(
                    "{what}: its params are not [{}]",
                    target.len
                ))),
            };
        }
        other => other?,
    };
    if let (Some(gpt), Ok(theirs)) = (target.gpt, m.gpt()) {
        same_gpt(&what, &theirs, gpt)?;
    }
    m.flat("", target.tensors, target.len)
        .map_err(|e| HfError::Invalid(format!("{what}: {e}")))
}

/// The GPT the `config.json` of the Hugging Face directory `dir` describes.
fn hf_config(dir: &Path) -> Result<GptConfig, HfError> {
    let file = dir.join("config.json");
    let text = std::fs::read(&file).map_err(io(&file))?;
    let v: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| HfError::Invalid(format!("{}: not JSON: {e}", file.display())))?;
    GptConfig::from_hf_config(&v).map_err(|e| HfError::Invalid(format!("{}: {e}", file.display())))
}

/// A GPT from a Hugging Face directory or a Lockstep checkpoint (see [`step_files`]), whichever
/// `path` is: its shape and its flat parameters.
pub fn load_gpt(path: &Path) -> Result<(GptConfig, Vec<f32>), HfError> {
    let config = if path.is_dir() && path.join("config.json").exists() {
        hf_config(path)?
    } else {
        read_step(path)?.gpt()?
    };
    let tensors = config.tensors();
    let target = Target {
        tensors: &tensors,
        len: config.num_params(),
        model: "",
        gpt: Some(&config),
    };
    Ok((config, initial_weights(path, &target)?))
}

/// The next-token logits (`ids.len()` rows of `vocab`) of the GPT at `path` (see [`load_gpt`])
/// on one sequence of token ids, computed by the engine's CPU backend.
pub fn logits(path: &Path, ids: &[i32]) -> Result<(GptConfig, Vec<f32>), HfError> {
    let (config, weights) = load_gpt(path)?;
    let t = ids.len();
    if t == 0 || t > config.max_seq {
        return Err(HfError::Invalid(format!(
            "{t} token ids given; the model takes 1 to {} (n_positions)",
            config.max_seq
        )));
    }
    if let Some(bad) = ids.iter().find(|&&i| i < 0 || i as usize >= config.vocab) {
        return Err(HfError::Invalid(format!(
            "token id {bad} is outside the vocabulary of {}",
            config.vocab
        )));
    }
    let be = lockstep_engine::cpu::Cpu;
    let mut gpt = lockstep_engine::models::gpt::Gpt::new(&be, config, &weights, 1, t)?;
    gpt.forward(&be, ids, None, 1, t, None)?;
    let padded = gpt.logits(&be)?;
    let rows = padded
        .chunks_exact(config.padded_vocab)
        .flat_map(|r| r[..config.vocab].iter().copied())
        .collect();
    Ok((config, rows))
}

/// Refuses a GPT of another shape, naming the job's field.
fn same_gpt(what: &str, theirs: &GptConfig, ours: &GptConfig) -> Result<(), HfError> {
    for (field, key, a, b) in [
        ("layers", "n_layer", theirs.layers, ours.layers),
        ("heads", "n_head", theirs.heads, ours.heads),
        ("embedDim", "n_embd", theirs.channels, ours.channels),
        ("contextLength", "n_positions", theirs.max_seq, ours.max_seq),
        ("vocabSize", "vocab_size", theirs.vocab, ours.vocab),
    ] {
        if a != b {
            return Err(HfError::Invalid(format!(
                "{what} has {key} {a}, but spec.training.model.gpt.{field} is {b} (the data's \
                 when vocabSize is unset): set {field} to {a}"
            )));
        }
    }
    Ok(())
}

/// The tensors of a Hugging Face directory's `model.safetensors`, as F32 under their
/// `GPT2LMHeadModel` names (a `GPT2Model`'s, without the `transformer.` prefix, get it).
fn read_hf_weights(dir: &Path, what: &str) -> Result<TensorMap, HfError> {
    let file = dir.join("model.safetensors");
    if !file.exists() {
        let hint = if dir.join("model.safetensors.index.json").exists() {
            "it is sharded: save it in one file (save_pretrained(..., max_shard_size=\"100GB\"))"
        } else {
            "save the model with save_pretrained (safetensors, transformers' default since 4.35)"
        };
        return Err(HfError::Invalid(format!(
            "{what} has no model.safetensors: {hint}"
        )));
    }
    let bytes = std::fs::read(&file).map_err(io(&file))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| {
        HfError::Invalid(format!(
            "{}: not a valid safetensors file ({e})",
            file.display()
        ))
    })?;
    let mut out = BTreeMap::new();
    for (name, t) in st.tensors() {
        let values: Vec<f32> = match t.dtype() {
            Dtype::F32 => checkpoint::f32s(t.data()),
            Dtype::BF16 => t
                .data()
                .chunks_exact(2)
                .map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16))
                .collect(),
            Dtype::F16 => t
                .data()
                .chunks_exact(2)
                .map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
                .collect(),
            other => {
                return Err(HfError::Invalid(format!(
                    "{}: tensor {name} is {other:?}; F32, BF16 and F16 load",
                    file.display()
                )));
            }
        };
        let name = if name.starts_with("transformer.") || name == LM_HEAD {
            name
        } else {
            format!("transformer.{name}")
        };
        out.insert(name, (t.shape().to_vec(), values));
    }
    Ok(out)
}

/// IEEE half to single precision, exactly.
fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let frac = u32::from(h & 0x3ff);
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, f) => {
            // Subnormal: value f * 2^-24, normalised.
            let v = f as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -v } else { v };
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, f) => sign | 0x7f80_0000 | (f << 13),
        (e, f) => sign | ((e + 112) << 23) | (f << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_engine::models::gpt::{PartLayout, PartSpec};

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lockstep-hf-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// A checkpoint state of `tensors` over `params` (moments: params / 2 and / 4).
    fn state(
        model: &str,
        tensors: Vec<Named>,
        params: Vec<f32>,
        config: &GptConfig,
    ) -> checkpoint::State {
        checkpoint::State {
            step: 3,
            adam_t: 3,
            seed: 1,
            model: model.into(),
            tensors,
            meta: [(HF_CONFIG.to_string(), config.hf_config().to_string())].into(),
            m: params.iter().map(|x| x / 2.0).collect(),
            v: params.iter().map(|x| x / 4.0).collect(),
            blobs: Default::default(),
            params,
        }
    }

    #[test]
    fn a_pipeline_steps_shards_export_as_the_whole_model() {
        let dir = temp("shards");
        let cfg = GptConfig::new(4, 2, 8, 16, 20).unwrap();
        let whole = cfg.init(5);
        let parts = [(0..2, true, false), (2..4, false, true)];
        for (s, (layers, embed, head)) in parts.into_iter().enumerate() {
            let lay = PartLayout::new(
                cfg,
                PartSpec {
                    layers,
                    embed,
                    head,
                },
            )
            .unwrap();
            let st = state("gpt", lay.tensors(), lay.gather(&whole), &cfg);
            checkpoint::write(&dir, &st, &checkpoint::shard_name(3, s as u32, 2)).unwrap();
        }
        // Any shard names the step; the other is read too.
        let out = dir.join("out");
        let e = export(&dir.join(checkpoint::shard_name(3, 1, 2)), &out).unwrap();
        assert_eq!((e.step, e.from.len(), e.config), (3, 2, cfg));
        let (config, w) = load_gpt(&out).unwrap();
        assert_eq!(config, cfg);
        assert_eq!(
            w, whole,
            "the exported weights are the model's, padding aside"
        );
        let m = read_step(&dir).unwrap();
        assert!(!m.tensors.contains_key(LM_HEAD));
        let moments = m
            .flat("exp_avg.", &cfg.tensors(), cfg.num_params())
            .unwrap();
        assert_eq!(moments[7], whole[7] / 2.0);

        // The two copies of the tied embedding must agree.
        let lay = PartLayout::new(
            cfg,
            PartSpec {
                layers: 2..4,
                embed: false,
                head: true,
            },
        )
        .unwrap();
        let mut p = lay.gather(&whole);
        p[0] += 1.0;
        checkpoint::write(
            &dir,
            &state("gpt", lay.tensors(), p, &cfg),
            &checkpoint::shard_name(3, 1, 2),
        )
        .unwrap();
        let err = read_step(&dir).unwrap_err().to_string();
        assert!(
            err.contains("lm_head.weight differs from transformer.wte.weight"),
            "{err}"
        );

        // A lone shard is refused, naming the missing one.
        std::fs::remove_file(dir.join(checkpoint::shard_name(3, 0, 2))).unwrap();
        let err = read_step(&dir.join(checkpoint::shard_name(3, 1, 2)))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("step-00000003.stage-0-of-2.safetensors is missing"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn init_from_refuses_another_model_naming_the_field() {
        let dir = temp("init");
        // A vocabulary of 1030 is padded to 1088 rows: the padding is not exported, and comes
        // back zero.
        let cfg = GptConfig::new(2, 2, 8, 16, 1030).unwrap();
        let st = state("gpt", cfg.tensors(), cfg.init(1), &cfg);
        checkpoint::save(&dir, &st, 1).unwrap();
        let out = dir.join("hf");
        export(&dir, &out).unwrap();
        let wider = GptConfig::new(2, 2, 16, 16, 1030).unwrap();
        let target = |c: &GptConfig, t: &[Named]| -> Result<Vec<f32>, HfError> {
            initial_weights(
                &out,
                &Target {
                    tensors: t,
                    len: c.num_params(),
                    model: "gpt",
                    gpt: Some(c),
                },
            )
        };
        let err = target(&wider, &wider.tensors()).unwrap_err().to_string();
        assert!(
            err.contains("has n_embd 8, but spec.training.model.gpt.embedDim is 16"),
            "{err}"
        );
        let w = target(&cfg, &cfg.tensors()).unwrap();
        assert_eq!(w, cfg.init(1));
        let rows = SafeTensors::deserialize(&std::fs::read(out.join("model.safetensors")).unwrap())
            .unwrap()
            .tensor(WTE)
            .unwrap()
            .shape()[0];
        assert_eq!(rows, 1030, "the padding rows are not exported");
        let missing = dir.join("nope");
        let err = initial_weights(
            &missing,
            &Target {
                tensors: &cfg.tensors(),
                len: cfg.num_params(),
                model: "gpt",
                gpt: Some(&cfg),
            },
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("does not exist in the worker"), "{err}");
        // A tensor the model lacks, and one it needs that is missing.
        let mut fewer = cfg.tensors();
        fewer.pop();
        let err = target(&cfg, &fewer).unwrap_err().to_string();
        assert!(
            err.contains("holds tensor transformer.ln_f.bias, which the job's model does not have"),
            "{err}"
        );
        std::fs::remove_file(out.join("model.safetensors")).unwrap();
        let err = target(&cfg, &cfg.tensors()).unwrap_err().to_string();
        assert!(err.contains("has no model.safetensors"), "{err}");
        // The checkpoint itself starts a job too (its weights only).
        let file = dir.join(checkpoint::file_name(3));
        let w = initial_weights(
            &file,
            &Target {
                tensors: &cfg.tensors(),
                len: cfg.num_params(),
                model: "gpt",
                gpt: Some(&cfg),
            },
        )
        .unwrap();
        assert_eq!(w, cfg.init(1));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn halves_convert_exactly() {
        for (h, f) in [
            (0x3c00u16, 1.0f32),
            (0xc000, -2.0),
            (0x3555, 0.333_251_95),
            (0x0001, 5.960_464_5e-8),
            (0x7bff, 65504.0),
            (0x8000, -0.0),
        ] {
            assert_eq!(f16_to_f32(h), f, "{h:#06x}");
        }
        assert!(f16_to_f32(0x7e00).is_nan());
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
    }
}
