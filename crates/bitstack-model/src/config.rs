//! Model hyper-parameters read from a Hugging Face `config.json`.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{LinearSlot, ModelError};

/// The architectures this crate implements, as listed in error messages.
pub const SUPPORTED_ARCHITECTURES: &str = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM";

/// A supported decoder architecture (they differ only in defaults: biases, sliding window).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Architecture {
    /// `LlamaForCausalLM`.
    Llama,
    /// `MistralForCausalLM`.
    Mistral,
    /// `Qwen2ForCausalLM` (q/k/v biases).
    Qwen2,
}

impl Architecture {
    /// Parses a Hugging Face `architectures` entry.
    pub fn from_hf_name(name: &str) -> Result<Self, ModelError> {
        match name {
            "LlamaForCausalLM" => Ok(Self::Llama),
            "MistralForCausalLM" => Ok(Self::Mistral),
            "Qwen2ForCausalLM" => Ok(Self::Qwen2),
            other => Err(ModelError::UnsupportedArchitecture {
                found: other.to_owned(),
                supported: SUPPORTED_ARCHITECTURES,
            }),
        }
    }

    /// The Hugging Face class name.
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

/// How RoPE frequencies are derived from θ (`rope_type` in the config).
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum RopeScaling {
    /// Plain RoPE: `inv_freq[i] = θ^(-2i/d)`.
    Default,
    /// Positions divided by `factor` (`rope_type: "linear"`).
    Linear {
        /// The position interpolation factor.
        factor: f64,
    },
    /// Llama 3 frequency-dependent scaling (`rope_type: "llama3"`).
    Llama3 {
        /// Scale factor for low frequencies.
        factor: f64,
        /// Low-frequency factor.
        low_freq_factor: f64,
        /// High-frequency factor.
        high_freq_factor: f64,
        /// The context length the model was pretrained with.
        original_max_position_embeddings: f64,
    },
}

/// The hyper-parameters of a Llama-family decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Which architecture.
    pub architecture: Architecture,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Number of query heads.
    pub num_heads: usize,
    /// Number of key/value heads (grouped-query attention when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// RoPE base θ.
    pub rope_theta: f64,
    /// RoPE frequency scaling.
    pub rope_scaling: RopeScaling,
    /// Longest context the model was built for (RoPE tables are precomputed up to it).
    pub max_position_embeddings: usize,
    /// Whether `lm_head` shares the embedding matrix (then it is absent from the checkpoint).
    pub tie_word_embeddings: bool,
    /// Whether q/k/v (and, for Llama with `attention_bias`, o) projections have biases.
    pub qkv_bias: bool,
    /// Whether `o_proj` has a bias (Llama `attention_bias`).
    pub o_bias: bool,
    /// Whether the MLP projections have biases (`mlp_bias`).
    pub mlp_bias: bool,
    /// Sliding-window attention span, when the architecture uses one.
    pub sliding_window: Option<usize>,
    /// Storage dtype named by the config (`dtype` or `torch_dtype`), informative only.
    pub dtype: Option<String>,
}

impl ModelConfig {
    /// The AVD rank the reference implementation uses for a model of this width:
    /// `hidden_size / 128` within 2..=16 (16 for the paper's 4096-wide models, 4 for
    /// small-llama's 512, 2 for tiny-qwen2's 256; ../shared/README.md, docs/DEFAULTS.md).
    pub fn reference_rank(&self) -> usize {
        (self.hidden_size / 128).clamp(2, 16)
    }

    /// Reads and validates a `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json_str(text: &str) -> Result<Self, ModelError> {
        Self::parse(text, Path::new("<memory>"))
    }

    /// Parses and validates the bytes of a `config.json` (e.g. one carried inside a
    /// container); `origin` names where they came from in error messages.
    pub fn from_json_bytes(bytes: &[u8], origin: impl AsRef<Path>) -> Result<Self, ModelError> {
        let path = origin.as_ref();
        let v: Value = serde_json::from_slice(bytes)
            .map_err(|e| ModelError::config(path, format!("not valid JSON: {e}")))?;
        Self::from_value(&v, path)
    }

    fn parse(text: &str, path: &Path) -> Result<Self, ModelError> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| ModelError::config(path, format!("not valid JSON: {e}")))?;
        Self::from_value(&v, path)
    }

    fn from_value(v: &Value, path: &Path) -> Result<Self, ModelError> {
        let p = Parser { v, path };
        let arch_name = match v.get("architectures") {
            Some(Value::Array(a)) => match a.first() {
                Some(Value::String(s)) => s.clone(),
                _ => return Err(p.err("`architectures` must be a non-empty list of strings")),
            },
            Some(Value::String(s)) => s.clone(),
            _ => return Err(p.err("missing `architectures`")),
        };
        let architecture = Architecture::from_hf_name(&arch_name)?;
        if let Some(act) = v.get("hidden_act").or_else(|| v.get("hidden_activation")) {
            if act.as_str() != Some("silu") {
                return Err(p.err(format!(
                    "unsupported hidden_act {act}; only \"silu\" is implemented"
                )));
            }
        }
        let hidden_size = p.usize_req("hidden_size")?;
        let num_heads = p.usize_req("num_attention_heads")?;
        let num_kv_heads = p.usize_opt("num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = match p.usize_opt("head_dim")? {
            Some(d) => d,
            None => {
                if num_heads == 0 || hidden_size % num_heads != 0 {
                    return Err(p.err(format!(
                        "hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads}"
                    )));
                }
                hidden_size / num_heads
            }
        };
        let rope_params = v.get("rope_parameters").or_else(|| v.get("rope_scaling"));
        let rope_params = rope_params.filter(|x| !x.is_null());
        let rope_theta = match rope_params.and_then(|r| r.get("rope_theta")) {
            Some(t) => t
                .as_f64()
                .ok_or_else(|| p.err("`rope_parameters.rope_theta` is not a number"))?,
            None => p.f64_opt("rope_theta")?.unwrap_or(10000.0),
        };
        let rope_scaling = parse_rope_scaling(rope_params, &p)?;
        let qkv_bias_default = architecture == Architecture::Qwen2;
        let attention_bias = p.bool_opt("attention_bias")?;
        let sliding_window = match architecture {
            Architecture::Mistral => p.usize_opt("sliding_window")?,
            Architecture::Qwen2 if p.bool_opt("use_sliding_window")? == Some(true) => {
                return Err(p.err(
                    "Qwen2 `use_sliding_window: true` (per-layer sliding windows) is not supported",
                ))
            }
            _ => None,
        };
        let dtype = v
            .get("dtype")
            .or_else(|| v.get("torch_dtype"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let cfg = Self {
            architecture,
            hidden_size,
            intermediate_size: p.usize_req("intermediate_size")?,
            num_layers: p.usize_req("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: p.usize_req("vocab_size")?,
            rms_norm_eps: p.f64_opt("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            rope_theta,
            rope_scaling,
            max_position_embeddings: p.usize_opt("max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: p.bool_opt("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias: attention_bias.unwrap_or(qkv_bias_default),
            o_bias: attention_bias.unwrap_or(false),
            mlp_bias: p.bool_opt("mlp_bias")?.unwrap_or(false),
            sliding_window,
            dtype,
        };
        cfg.validate().map_err(|m| p.err(m))?;
        Ok(cfg)
    }

    /// Checks the internal consistency of the numbers (non-zero sizes, head grouping).
    pub fn validate(&self) -> Result<(), String> {
        let nonzero = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
        ];
        for (k, v) in nonzero {
            if v == 0 {
                return Err(format!("`{k}` must be positive"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(format!("rope_theta {} must be positive", self.rope_theta));
        }
        if self.vocab_size > u32::MAX as usize {
            return Err(format!(
                "vocab_size {} exceeds u32 token ids",
                self.vocab_size
            ));
        }
        // Every size the model multiplies must fit (no wrap-around in shapes or tables).
        let products = [
            (
                "num_attention_heads × head_dim",
                self.num_heads,
                self.head_dim,
            ),
            (
                "num_key_value_heads × head_dim",
                self.num_kv_heads,
                self.head_dim,
            ),
            (
                "vocab_size × hidden_size",
                self.vocab_size,
                self.hidden_size,
            ),
            (
                "intermediate_size × hidden_size",
                self.intermediate_size,
                self.hidden_size,
            ),
            (
                "max_position_embeddings × head_dim",
                self.max_position_embeddings,
                self.head_dim,
            ),
        ];
        for (what, a, b) in products {
            if a.checked_mul(b).and_then(|n| n.checked_mul(8)).is_none() {
                return Err(format!("{what} = {a} × {b} is too large"));
            }
        }
        if self
            .q_dim()
            .checked_mul(self.hidden_size)
            .and_then(|n| n.checked_mul(8))
            .is_none()
        {
            return Err(format!(
                "q_proj of [{}, {}] is too large",
                self.q_dim(),
                self.hidden_size
            ));
        }
        Ok(())
    }

    /// Every tensor a model of this config reads from a checkpoint, with the shape the config
    /// implies, in module order: the embedding; per layer the two norms, the seven
    /// projections and their biases (when the config has them); the final norm; and
    /// `lm_head.weight` unless it is tied to the embedding.
    ///
    /// Call on a validated config (from [`from_file`](Self::from_file) and friends, or after
    /// [`validate`](Self::validate)): the shapes are computed without overflow checks. Lazy,
    /// so that a config claiming absurdly many layers costs nothing until a tensor is missing.
    pub fn expected_tensors(&self) -> impl Iterator<Item = (String, Vec<usize>)> + '_ {
        let h = self.hidden_size;
        let head = [(
            "model.embed_tokens.weight".to_owned(),
            vec![self.vocab_size, h],
        )];
        let layers = (0..self.num_layers).flat_map(move |l| {
            let norms = [
                (format!("model.layers.{l}.input_layernorm.weight"), vec![h]),
                (
                    format!("model.layers.{l}.post_attention_layernorm.weight"),
                    vec![h],
                ),
            ];
            let linears = LinearSlot::ALL.into_iter().flat_map(move |slot| {
                let shape = slot.shape(self);
                let bias = slot
                    .has_bias(self)
                    .then(|| (slot.bias_name(l), vec![shape[0]]));
                std::iter::once((slot.weight_name(l), shape.to_vec())).chain(bias)
            });
            norms.into_iter().chain(linears)
        });
        let tail = std::iter::once(("model.norm.weight".to_owned(), vec![h])).chain(
            (!self.tie_word_embeddings)
                .then(|| ("lm_head.weight".to_owned(), vec![self.vocab_size, h])),
        );
        head.into_iter().chain(layers).chain(tail)
    }

    /// `num_heads * head_dim`: the output width of `q_proj`.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// `num_kv_heads * head_dim`: the output width of `k_proj` and `v_proj`.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// RoPE inverse frequencies (`head_dim / 2` of them), scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim as f64;
        let base: Vec<f64> = (0..self.head_dim / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / d))
            .collect();
        match self.rope_scaling {
            RopeScaling::Default => base,
            RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

fn parse_rope_scaling(params: Option<&Value>, p: &Parser<'_>) -> Result<RopeScaling, ModelError> {
    let Some(r) = params else {
        return Ok(RopeScaling::Default);
    };
    let ty = r
        .get("rope_type")
        .or_else(|| r.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |k: &str| -> Result<f64, ModelError> {
        r.get(k)
            .and_then(Value::as_f64)
            .ok_or_else(|| p.err(format!("rope type {ty:?} needs a numeric `{k}`")))
    };
    match ty {
        "default" => Ok(RopeScaling::Default),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        other => Err(p.err(format!(
            "unsupported rope_type {other:?} (supported: default, linear, llama3)"
        ))),
    }
}

struct Parser<'a> {
    v: &'a Value,
    path: &'a Path,
}

impl Parser<'_> {
    fn err(&self, m: impl Into<String>) -> ModelError {
        ModelError::Config {
            path: PathBuf::from(self.path),
            message: m.into(),
        }
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>, ModelError> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| {
                    self.err(format!("`{key}` must be a non-negative integer, got {x}"))
                }),
        }
    }

    fn usize_req(&self, key: &str) -> Result<usize, ModelError> {
        self.usize_opt(key)?
            .ok_or_else(|| self.err(format!("missing `{key}`")))
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>, ModelError> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(format!("`{key}` must be a number, got {x}"))),
        }
    }

    fn bool_opt(&self, key: &str) -> Result<Option<bool>, ModelError> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(format!("`{key}` must be a boolean, got {x}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD_STYLE: &str = r#"{
        "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 100, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "torch_dtype": "bfloat16", "tie_word_embeddings": true, "hidden_act": "silu"
    }"#;

    #[test]
    fn parses_old_key_style() {
        let c = ModelConfig::from_json_str(OLD_STYLE).unwrap();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
        assert!(c.tie_word_embeddings);
        assert!(!c.qkv_bias);
    }

    #[test]
    fn reference_rank_follows_the_width() {
        // The reference's ranks: tiny-qwen2 (256) 2, small-llama (512) 4, 4096-wide 16;
        // narrower and wider widths stay within 2..=16.
        for (hidden, k) in [
            (64, 2),
            (256, 2),
            (512, 4),
            (1024, 8),
            (4096, 16),
            (8192, 16),
        ] {
            let text = OLD_STYLE.replace(
                r#""hidden_size": 64"#,
                &format!(r#""hidden_size": {hidden}"#),
            );
            let c = ModelConfig::from_json_str(&text).unwrap();
            assert_eq!(c.hidden_size, hidden);
            assert_eq!(c.reference_rank(), k, "hidden {hidden}");
        }
    }

    #[test]
    fn parses_new_key_style() {
        let text = r#"{
            "architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 32, "vocab_size": 100, "dtype": "float16",
            "rope_parameters": {"rope_theta": 1234.0, "rope_type": "default"},
            "use_sliding_window": false, "sliding_window": null
        }"#;
        let c = ModelConfig::from_json_str(text).unwrap();
        assert_eq!(c.architecture, Architecture::Qwen2);
        assert_eq!(c.rope_theta, 1234.0);
        assert_eq!(c.head_dim, 32);
        assert!(c.qkv_bias);
        assert_eq!(c.dtype.as_deref(), Some("float16"));
    }

    #[test]
    fn unsupported_architecture_names_it() {
        let text = OLD_STYLE.replace("LlamaForCausalLM", "GPT2LMHeadModel");
        let e = ModelConfig::from_json_str(&text).unwrap_err().to_string();
        assert!(e.contains("GPT2LMHeadModel"), "{e}");
        assert!(e.contains("Qwen2ForCausalLM"), "{e}");
    }

    #[test]
    fn expected_tensors_follow_the_config() {
        let c = ModelConfig::from_json_str(OLD_STYLE).unwrap();
        let t: Vec<_> = c.expected_tensors().collect();
        // embed + 2 layers × (2 norms + 7 linears) + final norm; tied lm_head, no biases.
        assert_eq!(t.len(), 1 + 2 * 9 + 1);
        assert_eq!(t[0], ("model.embed_tokens.weight".into(), vec![100, 64]));
        let q = t
            .iter()
            .find(|(n, _)| n == "model.layers.1.self_attn.q_proj.weight");
        assert_eq!(q.unwrap().1, vec![64, 64]);
        let k = t
            .iter()
            .find(|(n, _)| n == "model.layers.1.self_attn.k_proj.weight");
        assert_eq!(k.unwrap().1, vec![32, 64]);
        let untied = OLD_STYLE.replace("\"tie_word_embeddings\": true", "\"attention_bias\": true");
        let c = ModelConfig::from_json_str(&untied).unwrap();
        let names: Vec<String> = c.expected_tensors().map(|(n, _)| n).collect();
        assert!(names.contains(&"lm_head.weight".to_string()));
        assert!(names.contains(&"model.layers.0.self_attn.o_proj.bias".to_string()));
        // A huge layer count is not materialised.
        let mut c = c;
        c.num_layers = usize::MAX;
        assert_eq!(c.expected_tensors().take(5).count(), 5);
    }

    #[test]
    fn sizes_that_overflow_are_refused() {
        let text = OLD_STYLE.replace(
            "\"num_key_value_heads\": 2,",
            "\"num_key_value_heads\": 2, \"head_dim\": 4611686018427387904,",
        );
        let e = ModelConfig::from_json_str(&text).unwrap_err().to_string();
        assert!(e.contains("too large"), "{e}");
    }

    #[test]
    fn from_json_bytes_names_the_origin() {
        let e = ModelConfig::from_json_bytes(b"{", "x.bitstack#config.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("x.bitstack#config.json") && e.contains("not valid JSON"),
            "{e}"
        );
        let c = ModelConfig::from_json_bytes(OLD_STYLE.as_bytes(), "mem").unwrap();
        assert_eq!(c, ModelConfig::from_json_str(OLD_STYLE).unwrap());
    }

    #[test]
    fn missing_key_is_named() {
        let text = OLD_STYLE.replace("\"vocab_size\": 100,", "");
        let e = ModelConfig::from_json_str(&text).unwrap_err().to_string();
        assert!(e.contains("vocab_size"), "{e}");
    }
}
