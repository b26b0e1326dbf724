//! Names and shapes of a model's tensors in its flat parameter buffer, in the layout PyTorch
//! users know: for the GPT, Hugging Face's `GPT2LMHeadModel` (`transformer.h.0.attn.c_attn.weight`
//! and so on, its `Conv1D` weights stored in x out), for the MLP, `nn.Linear` (out x in).
//!
//! A [`Named`] tensor says where its elements lie in the flat buffer and whether the buffer holds
//! its transpose (the engine stores every weight out x in, as `nn.Linear` does; GPT-2's `Conv1D`
//! stores in x out). [`extract`] and [`insert`] convert. What no tensor covers (the GPT's
//! vocabulary padding rows) is not stored, and is zero when a buffer is rebuilt.

use crate::{EngineError, Result};

use super::gpt::{GptConfig, PartLayout};
use super::mlp::MlpConfig;

/// One named tensor of a flat buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Named {
    /// The name (Hugging Face's or PyTorch's).
    pub name: String,
    /// Where its elements start in the flat buffer.
    pub offset: usize,
    /// Its shape as stored under its name.
    pub shape: Vec<usize>,
    /// The flat buffer holds the transpose (2-D only: `shape[1] x shape[0]`, row-major).
    pub transposed: bool,
}

impl Named {
    pub(crate) fn new(name: impl Into<String>, offset: usize, shape: &[usize]) -> Self {
        Self {
            name: name.into(),
            offset,
            shape: shape.to_vec(),
            transposed: false,
        }
    }

    fn transposed(name: impl Into<String>, offset: usize, shape: [usize; 2]) -> Self {
        Self {
            transposed: true,
            ..Self::new(name, offset, &shape)
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The tensor `t` out of the flat buffer `flat`, in its named layout.
pub fn extract(flat: &[f32], t: &Named) -> Vec<f32> {
    let src = &flat[t.offset..t.offset + t.numel()];
    if !t.transposed {
        return src.to_vec();
    }
    // Stored (rows x cols) under its name; the flat buffer holds cols x rows.
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let mut out = vec![0.0; rows * cols];
    for (c, row) in src.chunks_exact(rows).enumerate() {
        for (r, &v) in row.iter().enumerate() {
            out[r * cols + c] = v;
        }
    }
    out
}

/// Writes `data` (tensor `t` in its named layout) into the flat buffer `flat`.
pub fn insert(flat: &mut [f32], t: &Named, data: &[f32]) {
    let dst = &mut flat[t.offset..t.offset + t.numel()];
    if !t.transposed {
        dst.copy_from_slice(data);
        return;
    }
    let (rows, cols) = (t.shape[0], t.shape[1]);
    for (c, row) in dst.chunks_exact_mut(rows).enumerate() {
        for (r, v) in row.iter_mut().enumerate() {
            *v = data[r * cols + c];
        }
    }
}

/// Checks that `tensors` lie inside a buffer of `len`, overlap nowhere and have distinct names.
pub fn check(tensors: &[Named], len: usize) -> Result<()> {
    let mut spans: Vec<(usize, usize, &str)> = tensors
        .iter()
        .map(|t| (t.offset, t.offset + t.numel(), t.name.as_str()))
        .collect();
    spans.sort();
    let mut names: Vec<&str> = spans.iter().map(|s| s.2).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(EngineError::Config(format!(
            "tensor {} is named twice",
            w[0]
        )));
    }
    for w in spans.windows(2) {
        if w[0].1 > w[1].0 {
            return Err(EngineError::Config(format!(
                "tensors {} and {} overlap",
                w[0].2, w[1].2
            )));
        }
    }
    match spans.last() {
        Some(last) if last.1 > len => Err(EngineError::Config(format!(
            "tensor {} ends at {} in a buffer of {len}",
            last.2, last.1
        ))),
        _ => Ok(()),
    }
}

/// The tensors of one GPT block `l` at flat offsets `b` (see [`super::gpt::BlockParams`]).
fn block(out: &mut Vec<Named>, l: usize, b: super::gpt::BlockParams, c: usize) {
    let p = |s: &str| format!("transformer.h.{l}.{s}");
    out.extend([
        Named::new(p("ln_1.weight"), b.ln1, &[c]),
        Named::new(p("ln_1.bias"), b.ln1 + c, &[c]),
        Named::transposed(p("attn.c_attn.weight"), b.qkvw, [c, 3 * c]),
        Named::new(p("attn.c_attn.bias"), b.qkvb, &[3 * c]),
        Named::transposed(p("attn.c_proj.weight"), b.attprojw, [c, c]),
        Named::new(p("attn.c_proj.bias"), b.attprojb, &[c]),
        Named::new(p("ln_2.weight"), b.ln2, &[c]),
        Named::new(p("ln_2.bias"), b.ln2 + c, &[c]),
        Named::transposed(p("mlp.c_fc.weight"), b.fcw, [c, 4 * c]),
        Named::new(p("mlp.c_fc.bias"), b.fcb, &[4 * c]),
        Named::transposed(p("mlp.c_proj.weight"), b.fcprojw, [4 * c, c]),
        Named::new(p("mlp.c_proj.bias"), b.fcprojb, &[c]),
    ]);
}

/// The name of the token embedding as the head's part holds it without the embedding part (a
/// pipeline's last stage keeps its own copy of the tied embedding, Hugging Face's `lm_head`).
pub const LM_HEAD: &str = "lm_head.weight";

/// The name of the token embedding.
pub const WTE: &str = "transformer.wte.weight";

impl PartLayout {
    /// The part's tensors under Hugging Face GPT-2's names, in its flat buffer. The whole
    /// model's token embedding is `transformer.wte.weight` (the head is tied to it, as
    /// `GPT2LMHeadModel` saves it); a head part without the embedding holds it as
    /// [`LM_HEAD`]. The vocabulary padding rows are not part of any tensor.
    pub fn tensors(&self) -> Vec<Named> {
        let cfg = &self.config;
        let c = cfg.channels;
        let mut out = Vec::new();
        if self.spec.embed {
            out.push(Named::new(WTE, self.wte(), &[cfg.vocab, c]));
            out.push(Named::new(
                "transformer.wpe.weight",
                self.wpe(),
                &[cfg.max_seq, c],
            ));
        } else if self.spec.head {
            out.push(Named::new(LM_HEAD, self.wte(), &[cfg.vocab, c]));
        }
        for l in self.spec.layers.clone() {
            block(&mut out, l, self.block_params(l), c);
        }
        if self.spec.head {
            out.push(Named::new("transformer.ln_f.weight", self.lnf(), &[c]));
            out.push(Named::new("transformer.ln_f.bias", self.lnf() + c, &[c]));
        }
        out
    }
}

impl GptConfig {
    /// The whole model's tensors under Hugging Face GPT-2's names (see [`PartLayout::tensors`]).
    pub fn tensors(&self) -> Vec<Named> {
        let whole = super::gpt::PartSpec::whole(self);
        PartLayout::new(*self, whole)
            .map(|l| l.tensors())
            .unwrap_or_default()
    }

    /// The model as a Hugging Face `GPT2Config` (`config.json`): GPT-2's tanh GELU, layer-norm
    /// epsilon 1e-5, tied embeddings, no dropout.
    pub fn hf_config(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab,
            "n_positions": self.max_seq,
            "n_ctx": self.max_seq,
            "n_embd": self.channels,
            "n_layer": self.layers,
            "n_head": self.heads,
            "n_inner": serde_json::Value::Null,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5,
            "initializer_range": 0.02,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "scale_attn_weights": true,
            "scale_attn_by_inverse_layer_idx": false,
            "reorder_and_upcast_attn": false,
            "tie_word_embeddings": true,
            "torch_dtype": "float32",
        })
    }

    /// The GPT a Hugging Face `GPT2Config` (`config.json`) describes, refused (naming the key)
    /// when it is not one the engine computes exactly: another activation, layer-norm epsilon,
    /// an inner width other than 4 x n_embd, untied embeddings, or attention scaled otherwise.
    pub fn from_hf_config(v: &serde_json::Value) -> Result<Self> {
        let bad = |m: String| EngineError::Config(format!("config.json: {m}"));
        let num = |k: &str| -> Result<usize> {
            v.get(k)
                .and_then(serde_json::Value::as_u64)
                .map(|n| n as usize)
                .ok_or_else(|| bad(format!("{k} is missing or not a positive integer")))
        };
        if let Some(t) = v.get("model_type").and_then(|t| t.as_str())
            && t != "gpt2"
        {
            return Err(bad(format!(
                "model_type is {t}; only gpt2 (GPT2LMHeadModel) loads"
            )));
        }
        let expect = |k: &str, ok: &dyn Fn(&serde_json::Value) -> bool, what: &str| match v.get(k) {
            Some(x) if !x.is_null() && !ok(x) => {
                Err(bad(format!("{k} is {x}; the engine computes only {what}")))
            }
            _ => Ok(()),
        };
        expect(
            "activation_function",
            &|x| matches!(x.as_str(), Some("gelu_new" | "gelu_pytorch_tanh")),
            "gelu_new (GPT-2's tanh GELU)",
        )?;
        expect(
            "layer_norm_epsilon",
            &|x| x.as_f64().is_some_and(|e| (e - 1e-5).abs() < 1e-12),
            "1e-5",
        )?;
        expect(
            "tie_word_embeddings",
            &|x| x.as_bool() == Some(true),
            "true",
        )?;
        expect("scale_attn_weights", &|x| x.as_bool() == Some(true), "true")?;
        for k in ["scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"] {
            expect(k, &|x| x.as_bool() == Some(false), "false")?;
        }
        let c = num("n_embd")?;
        expect(
            "n_inner",
            &|x| x.as_u64() == Some(4 * c as u64),
            "4 x n_embd (null)",
        )?;
        Self::new(
            num("n_layer")?,
            num("n_head")?,
            c,
            num("n_positions")?,
            num("vocab_size")?,
        )
        .map_err(|e| bad(e.to_string()))
    }
}

impl MlpConfig {
    /// The tensors as `nn.Linear` layers name them: `layers.{i}.weight` (out x in) and
    /// `layers.{i}.bias`.
    pub fn tensors(&self) -> Vec<Named> {
        let s = self.sizes();
        (0..self.layers())
            .flat_map(|l| {
                let (w, b) = self.layer(l);
                [
                    Named::new(format!("layers.{l}.weight"), w, &[s[l + 1], s[l]]),
                    Named::new(format!("layers.{l}.bias"), b, &[s[l + 1]]),
                ]
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::gpt::PartSpec;

    #[test]
    fn gpt_tensors_cover_every_parameter_but_the_padding_once() {
        // vocab 1030 is padded to 1088: 58 rows of the embedding are padding.
        let cfg = GptConfig::new(3, 2, 8, 16, 1030).unwrap();
        let t = cfg.tensors();
        check(&t, cfg.num_params()).unwrap();
        let covered: usize = t.iter().map(Named::numel).sum();
        assert_eq!(
            covered,
            cfg.num_params() - (cfg.padded_vocab - cfg.vocab) * cfg.channels
        );
        assert_eq!(t.len(), 2 + 12 * 3 + 2);
        let qkv = t
            .iter()
            .find(|n| n.name == "transformer.h.1.attn.c_attn.weight")
            .unwrap();
        assert_eq!((qkv.shape.clone(), qkv.transposed), (vec![8, 24], true));
        assert_eq!(qkv.offset, cfg.block_params(1).qkvw);
    }

    #[test]
    fn pipeline_parts_name_the_tied_copy_lm_head_and_cover_their_buffers() {
        let cfg = GptConfig::new(4, 2, 8, 16, 50).unwrap();
        let first = PartLayout::new(
            cfg,
            PartSpec {
                layers: 0..2,
                embed: true,
                head: false,
            },
        )
        .unwrap();
        let last = PartLayout::new(
            cfg,
            PartSpec {
                layers: 2..4,
                embed: false,
                head: true,
            },
        )
        .unwrap();
        for part in [&first, &last] {
            let t = part.tensors();
            check(&t, part.len()).unwrap();
            assert_eq!(t.iter().map(Named::numel).sum::<usize>(), part.len());
        }
        let names = |p: &PartLayout| p.tensors().into_iter().map(|n| n.name).collect::<Vec<_>>();
        assert!(names(&first).contains(&WTE.to_string()));
        assert!(names(&last).contains(&LM_HEAD.to_string()));
        assert!(names(&last).contains(&"transformer.h.3.mlp.c_proj.bias".to_string()));
        assert!(!names(&last).contains(&"transformer.h.1.mlp.c_proj.bias".to_string()));
    }

    #[test]
    fn transposed_tensors_round_trip_and_are_the_transpose() {
        let t = Named::transposed("w", 2, [2, 3]);
        // The flat buffer holds the 3 x 2 transpose after two other values.
        let flat = [9.0, 9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let named = extract(&flat, &t);
        assert_eq!(named, vec![1.0, 3.0, 5.0, 2.0, 4.0, 6.0]);
        let mut back = [0.0; 8];
        insert(&mut back, &t, &named);
        assert_eq!(&back[2..], &flat[2..]);
    }

    #[test]
    fn overlaps_and_twice_named_tensors_are_refused() {
        let a = Named::new("a", 0, &[4]);
        let b = Named::new("b", 3, &[2]);
        assert!(
            check(&[a.clone(), b], 8)
                .unwrap_err()
                .to_string()
                .contains("overlap")
        );
        let a2 = Named::new("a", 4, &[2]);
        assert!(
            check(&[a.clone(), a2], 8)
                .unwrap_err()
                .to_string()
                .contains("named twice")
        );
        assert!(
            check(&[a], 3)
                .unwrap_err()
                .to_string()
                .contains("ends at 4")
        );
    }

    #[test]
    fn hf_configs_the_engine_cannot_compute_are_refused_by_key() {
        let cfg = GptConfig::new(2, 2, 8, 16, 65).unwrap();
        assert_eq!(GptConfig::from_hf_config(&cfg.hf_config()).unwrap(), cfg);
        for (k, v, says) in [
            (
                "activation_function",
                serde_json::json!("relu"),
                "activation_function",
            ),
            ("n_inner", serde_json::json!(10), "n_inner"),
            (
                "layer_norm_epsilon",
                serde_json::json!(1e-6),
                "layer_norm_epsilon",
            ),
            (
                "model_type",
                serde_json::json!("llama"),
                "model_type is llama",
            ),
        ] {
            let mut c = cfg.hf_config();
            c[k] = v;
            let e = GptConfig::from_hf_config(&c).unwrap_err().to_string();
            assert!(e.contains(says), "{k}: {e}");
        }
        let mut c = cfg.hf_config();
        c.as_object_mut().unwrap().remove("n_embd");
        let e = GptConfig::from_hf_config(&c).unwrap_err().to_string();
        assert!(e.contains("n_embd is missing"), "{e}");
    }

    #[test]
    fn mlp_tensors_are_linear_layers() {
        let cfg = MlpConfig::new(vec![64, 32, 10]).unwrap();
        let t = cfg.tensors();
        check(&t, cfg.num_params()).unwrap();
        assert_eq!(t.iter().map(Named::numel).sum::<usize>(), cfg.num_params());
        assert_eq!(t[2].name, "layers.1.weight");
        assert_eq!(t[2].shape, vec![10, 32]);
    }
}
