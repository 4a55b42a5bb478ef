//! The decoder: [`CausalLm`], its linear slots, calibration sites and forward passes.

use std::path::Path;
use std::sync::Arc;

use rayon::prelude::*;

use crate::attention::{attention, AttnShape};
use crate::half16::{HalfLinear, HalfMatrix};
use crate::rope::Rope;
use crate::{DenseLinear, Linear, ModelConfig, ModelError, SafetensorsDir, TensorSource};

/// One of the seven decomposable projections of a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinearSlot {
    /// `self_attn.q_proj`.
    QProj,
    /// `self_attn.k_proj`.
    KProj,
    /// `self_attn.v_proj`.
    VProj,
    /// `self_attn.o_proj`.
    OProj,
    /// `mlp.gate_proj`.
    GateProj,
    /// `mlp.up_proj`.
    UpProj,
    /// `mlp.down_proj`.
    DownProj,
}

impl LinearSlot {
    /// All slots in module order (q, k, v, o, gate, up, down).
    pub const ALL: [LinearSlot; 7] = [
        Self::QProj,
        Self::KProj,
        Self::VProj,
        Self::OProj,
        Self::GateProj,
        Self::UpProj,
        Self::DownProj,
    ];

    /// Module path inside a layer, e.g. `"self_attn.q_proj"`.
    pub fn module(self) -> &'static str {
        match self {
            Self::QProj => "self_attn.q_proj",
            Self::KProj => "self_attn.k_proj",
            Self::VProj => "self_attn.v_proj",
            Self::OProj => "self_attn.o_proj",
            Self::GateProj => "mlp.gate_proj",
            Self::UpProj => "mlp.up_proj",
            Self::DownProj => "mlp.down_proj",
        }
    }

    /// Short name, e.g. `"q_proj"`.
    pub fn short_name(self) -> &'static str {
        let m = self.module();
        m.rsplit('.').next().unwrap_or(m)
    }

    /// Hugging Face weight name, e.g. `model.layers.3.self_attn.q_proj.weight`.
    pub fn weight_name(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}.weight", self.module())
    }

    /// Hugging Face bias name, e.g. `model.layers.3.self_attn.q_proj.bias`.
    pub fn bias_name(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}.bias", self.module())
    }

    /// Parses a weight name produced by [`weight_name`](Self::weight_name) into `(layer, slot)`.
    pub fn parse_weight_name(name: &str) -> Option<(usize, LinearSlot)> {
        let rest = name.strip_prefix("model.layers.")?;
        let (layer, rest) = rest.split_once('.')?;
        let module = rest.strip_suffix(".weight")?;
        let layer = layer.parse().ok()?;
        Self::ALL
            .into_iter()
            .find(|s| s.module() == module)
            .map(|s| (layer, s))
    }

    /// `[out_features, in_features]` of this slot under `cfg`.
    pub fn shape(self, cfg: &ModelConfig) -> [usize; 2] {
        match self {
            Self::QProj => [cfg.q_dim(), cfg.hidden_size],
            Self::KProj | Self::VProj => [cfg.kv_dim(), cfg.hidden_size],
            Self::OProj => [cfg.hidden_size, cfg.q_dim()],
            Self::GateProj | Self::UpProj => [cfg.intermediate_size, cfg.hidden_size],
            Self::DownProj => [cfg.hidden_size, cfg.intermediate_size],
        }
    }

    /// The input site this projection reads.
    pub fn site(self) -> Site {
        match self {
            Self::QProj | Self::KProj | Self::VProj => Site::AttnInput,
            Self::OProj => Site::OProjInput,
            Self::GateProj | Self::UpProj => Site::MlpInput,
            Self::DownProj => Site::DownInput,
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    pub(crate) fn has_bias(self, cfg: &ModelConfig) -> bool {
        match self {
            Self::QProj | Self::KProj | Self::VProj => cfg.qkv_bias,
            Self::OProj => cfg.o_bias,
            _ => cfg.mlp_bias,
        }
    }
}

/// An input site of a decoder layer's linears, as observed during calibration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Site {
    /// Input of q/k/v: the output of `input_layernorm` (width `hidden_size`).
    AttnInput,
    /// Input of `o_proj`: the attention output (width `num_heads · head_dim`).
    OProjInput,
    /// Input of gate/up: the output of `post_attention_layernorm` (width `hidden_size`).
    MlpInput,
    /// Input of `down_proj`: `silu(gate) ⊙ up` (width `intermediate_size`).
    DownInput,
}

impl Site {
    /// All sites in the order they are visited in a layer.
    pub const ALL: [Site; 4] = [
        Self::AttnInput,
        Self::OProjInput,
        Self::MlpInput,
        Self::DownInput,
    ];

    /// The slots that read this site.
    pub fn slots(self) -> &'static [LinearSlot] {
        match self {
            Self::AttnInput => &[LinearSlot::QProj, LinearSlot::KProj, LinearSlot::VProj],
            Self::OProjInput => &[LinearSlot::OProj],
            Self::MlpInput => &[LinearSlot::GateProj, LinearSlot::UpProj],
            Self::DownInput => &[LinearSlot::DownProj],
        }
    }
}

/// Observer of linear inputs: `(layer, site, x: tokens × width row-major, tokens)`.
pub type Observer<'a> = dyn FnMut(usize, Site, &[f32], usize) + 'a;

/// Decides each linear while building a model: `(HF weight name, [out, in])` →
/// `Some(linear)` to use it, `None` for a dense layer read from the source.
pub type LinearChooser<'a> =
    dyn FnMut(&str, [usize; 2]) -> Result<Option<Arc<dyn Linear>>, ModelError> + 'a;

struct DecoderLayer {
    input_norm: Vec<f32>,
    post_norm: Vec<f32>,
    linears: [Arc<dyn Linear>; 7],
    biases: [Option<Vec<f32>>; 7],
}

/// Reusable intermediate buffers of one forward step.
#[derive(Debug, Default, Clone)]
pub(crate) struct Scratch {
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    att_scratch: Vec<f32>,
    hidden: Vec<f32>,
}

/// One decoder layer's run over a full sequence with what its linears computed kept
/// ([`CausalLm::forward_layer_keeping`]), so that the layer can be run again with one of its
/// linears changed, starting at that linear ([`CausalLm::forward_layer_from`]): the
/// perplexity scorer's candidates share everything their layer computed before (and, in the
/// MLP, beside) the changed product.
#[derive(Debug, Clone)]
pub struct LayerRun {
    layer: usize,
    tokens: usize,
    /// The layer's input (`tokens × hidden`).
    input: Vec<f32>,
    /// The input of `o_proj` (`tokens × q_dim`).
    attn: Vec<f32>,
    /// The hidden states after the attention's residual add (`tokens × hidden`).
    mid: Vec<f32>,
    /// The outputs of `gate_proj` and `up_proj`, before the activation (`tokens × intermediate`).
    gate: Vec<f32>,
    up: Vec<f32>,
    /// The layer's output (`tokens × hidden`).
    output: Vec<f32>,
}

impl LayerRun {
    /// The layer this run is of.
    pub fn layer(&self) -> usize {
        self.layer
    }

    /// The number of tokens.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// The layer's output (the next layer's input), `tokens × hidden`.
    pub fn output(&self) -> &[f32] {
        &self.output
    }

    /// The layer's output, taken out of the run.
    pub fn into_output(self) -> Vec<f32> {
        self.output
    }
}

/// What the MLP of a layer run again takes from a kept [`LayerRun`] instead of computing it.
#[derive(Clone, Copy, Default)]
struct MlpKept<'r> {
    gate: Option<&'r [f32]>,
    up: Option<&'r [f32]>,
}

/// Cached keys and values of past positions, for incremental decoding.
#[derive(Debug, Clone)]
pub struct KvCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    len: usize,
    kv_dim: usize,
    scratch: Scratch,
}

impl KvCache {
    /// An empty cache for a model with this config.
    pub fn new(config: &ModelConfig) -> Self {
        Self::with_capacity(config, 0)
    }

    /// An empty cache with room for `positions` tokens without reallocating.
    pub fn with_capacity(config: &ModelConfig, positions: usize) -> Self {
        let kv_dim = config.kv_dim();
        let mk = || {
            (0..config.num_layers)
                .map(|_| Vec::with_capacity(positions * kv_dim))
                .collect::<Vec<_>>()
        };
        Self {
            keys: mk(),
            values: mk(),
            len: 0,
            kv_dim,
            scratch: Scratch::default(),
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every position (keeps the allocations).
    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Keeps only the first `len` positions.
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            for kv in self.keys.iter_mut().chain(self.values.iter_mut()) {
                kv.truncate(len * self.kv_dim);
            }
            self.len = len;
        }
    }
}

/// The result of a perplexity evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Perplexity {
    /// `exp(mean_nll)`.
    pub ppl: f64,
    /// Mean negative log-likelihood (nats) over all predicted tokens.
    pub mean_nll: f64,
    /// Number of predicted tokens (`Σ (window length − 1)`).
    pub predicted_tokens: usize,
    /// Number of windows evaluated.
    pub windows: usize,
}

/// A Llama-family causal language model (Llama, Mistral, Qwen2), f32 compute on the CPU.
///
/// Every projection is an `Arc<dyn Linear>`, replaceable with [`set_linear`](Self::set_linear).
pub struct CausalLm {
    config: ModelConfig,
    embed: Embedding,
    layers: Vec<DecoderLayer>,
    final_norm: Vec<f32>,
    lm_head: Arc<dyn Linear>,
    rope: Rope,
}

impl std::fmt::Debug for CausalLm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CausalLm")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The token embedding table: f32, or 16-bit shared with the source (widened per row).
enum Embedding {
    F32(Vec<f32>),
    Half(HalfMatrix),
    /// Rows rebuilt on demand (a stacked embedding table).
    Rows(Arc<dyn crate::RowLookup>),
}

impl Embedding {
    fn load(source: &dyn TensorSource, name: &str, shape: [usize; 2]) -> Result<Self, ModelError> {
        if let Some(rows) = source.tensor_rows(name) {
            if [rows.rows(), rows.cols()] != shape {
                return Err(ModelError::TensorShape {
                    name: name.into(),
                    expected: shape.to_vec(),
                    found: vec![rows.rows(), rows.cols()],
                });
            }
            return Ok(Self::Rows(rows));
        }
        match source.tensor_half(name) {
            Some(m) if [m.rows(), m.cols()] == shape => Ok(Self::Half(m)),
            _ => Ok(Self::F32(load_vec(source, name, &shape)?)),
        }
    }

    /// The embedding as the tied `lm_head`.
    fn as_linear(&self, rows: usize, cols: usize) -> Result<Arc<dyn Linear>, ModelError> {
        Ok(match self {
            Self::F32(w) => Arc::new(DenseLinear::new(w.clone(), rows, cols)?),
            Self::Half(m) => Arc::new(HalfLinear::new(m.clone())),
            Self::Rows(_) => {
                return Err(ModelError::InvalidArgument(
                    "the tied lm_head of a stacked embedding table must be given as a linear"
                        .into(),
                ))
            }
        })
    }
}

/// Rows of the lm_head evaluated at once when scoring (bounds the logits buffer).
const LOGIT_CHUNK: usize = 128;

/// Tokens that [`CausalLm::perplexity`] runs through the layers together (consecutive windows
/// of one length, [`CausalLm::windows_nll`]): two windows of 512. A stack's batch products
/// rebuild their tiles of `Ŵ` once per call, so this halves that work per token.
const BATCH_TOKENS: usize = 1024;

fn load_vec(src: &dyn TensorSource, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
    let (found, values) = src.tensor_f32(name)?;
    if found != shape {
        return Err(ModelError::TensorShape {
            name: name.into(),
            expected: shape.to_vec(),
            found,
        });
    }
    Ok(values)
}

fn check_linear(name: &str, lin: &dyn Linear, shape: [usize; 2]) -> Result<(), ModelError> {
    if lin.out_features() != shape[0] || lin.in_features() != shape[1] {
        return Err(ModelError::LinearShape {
            name: name.into(),
            expected_out: shape[0],
            expected_in: shape[1],
            found_out: lin.out_features(),
            found_in: lin.in_features(),
        });
    }
    Ok(())
}

impl CausalLm {
    /// Loads a Hugging Face model directory (`config.json` + safetensors) with dense linears.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self, ModelError> {
        let dir = dir.as_ref();
        bitstack_checkpoint::check_is_not_a_file(dir)?;
        let config = ModelConfig::from_file(dir.join("config.json"))?;
        let source = SafetensorsDir::open(dir)?;
        Self::from_source(config, &source, &mut |_, _| Ok(None))
    }

    /// Builds a model from any tensor source, asking `choose` for each linear (the seven
    /// projections of every layer, then `lm_head.weight`).
    ///
    /// `choose` returns `None` to get a [`DenseLinear`] from the source (for a tied
    /// `lm_head`, the embedding matrix). The weight of a chosen linear is never read, so it
    /// may be absent from the source.
    pub fn from_source(
        config: ModelConfig,
        source: &dyn TensorSource,
        choose: &mut LinearChooser<'_>,
    ) -> Result<Self, ModelError> {
        config
            .validate()
            .map_err(|m| ModelError::config("<config>", m))?;
        let h = config.hidden_size;
        let embed = Embedding::load(source, "model.embed_tokens.weight", [config.vocab_size, h])?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for l in 0..config.num_layers {
            let input_norm = load_vec(
                source,
                &format!("model.layers.{l}.input_layernorm.weight"),
                &[h],
            )?;
            let post_norm = load_vec(
                source,
                &format!("model.layers.{l}.post_attention_layernorm.weight"),
                &[h],
            )?;
            let mut linears = Vec::with_capacity(7);
            let mut biases = Vec::with_capacity(7);
            for slot in LinearSlot::ALL {
                let name = slot.weight_name(l);
                let shape = slot.shape(&config);
                let lin: Arc<dyn Linear> = match choose(&name, shape)? {
                    Some(lin) => {
                        check_linear(&name, lin.as_ref(), shape)?;
                        lin
                    }
                    None => Arc::new(DenseLinear::new(
                        load_vec(source, &name, &shape)?,
                        shape[0],
                        shape[1],
                    )?),
                };
                linears.push(lin);
                biases.push(if slot.has_bias(&config) {
                    Some(load_vec(source, &slot.bias_name(l), &[shape[0]])?)
                } else {
                    None
                });
            }
            let linears: [Arc<dyn Linear>; 7] = linears
                .try_into()
                .map_err(|_| ModelError::InvalidArgument("internal: 7 linears per layer".into()))?;
            let biases: [Option<Vec<f32>>; 7] = biases
                .try_into()
                .map_err(|_| ModelError::InvalidArgument("internal: 7 biases per layer".into()))?;
            layers.push(DecoderLayer {
                input_norm,
                post_norm,
                linears,
                biases,
            });
        }
        let final_norm = load_vec(source, "model.norm.weight", &[h])?;
        let head_shape = [config.vocab_size, h];
        let lm_head: Arc<dyn Linear> = match choose("lm_head.weight", head_shape)? {
            Some(lin) => {
                check_linear("lm_head.weight", lin.as_ref(), head_shape)?;
                lin
            }
            None if config.tie_word_embeddings => embed.as_linear(config.vocab_size, h)?,
            None => match source.tensor_half("lm_head.weight") {
                Some(m) if [m.rows(), m.cols()] == head_shape => Arc::new(HalfLinear::new(m)),
                _ => Arc::new(DenseLinear::new(
                    load_vec(source, "lm_head.weight", &head_shape)?,
                    config.vocab_size,
                    h,
                )?),
            },
        };
        let rope = Rope::new(&config);
        Ok(Self {
            config,
            embed,
            layers,
            final_norm,
            lm_head,
            rope,
        })
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn layer(&self, layer: usize) -> Result<&DecoderLayer, ModelError> {
        self.layers.get(layer).ok_or_else(|| {
            ModelError::InvalidArgument(format!(
                "layer {layer} out of range (model has {})",
                self.layers.len()
            ))
        })
    }

    /// The linear currently in `slot` of `layer`.
    pub fn linear(&self, layer: usize, slot: LinearSlot) -> Result<&Arc<dyn Linear>, ModelError> {
        Ok(&self.layer(layer)?.linears[slot.index()])
    }

    /// The bias of `slot` in `layer`, if the architecture has one.
    pub fn bias(&self, layer: usize, slot: LinearSlot) -> Result<Option<&[f32]>, ModelError> {
        Ok(self.layer(layer)?.biases[slot.index()].as_deref())
    }

    /// Replaces the linear in `slot` of `layer`, returning the previous one.
    ///
    /// Errors when the shapes differ or the layer does not exist.
    pub fn set_linear(
        &mut self,
        layer: usize,
        slot: LinearSlot,
        linear: Arc<dyn Linear>,
    ) -> Result<Arc<dyn Linear>, ModelError> {
        let name = slot.weight_name(layer);
        check_linear(&name, linear.as_ref(), slot.shape(&self.config))?;
        let n = self.layers.len();
        let l = self.layers.get_mut(layer).ok_or_else(|| {
            ModelError::InvalidArgument(format!("layer {layer} out of range (model has {n})"))
        })?;
        Ok(std::mem::replace(&mut l.linears[slot.index()], linear))
    }

    /// The output projection.
    pub fn lm_head(&self) -> &Arc<dyn Linear> {
        &self.lm_head
    }

    /// Replaces the output projection, returning the previous one.
    pub fn set_lm_head(&mut self, linear: Arc<dyn Linear>) -> Result<Arc<dyn Linear>, ModelError> {
        check_linear(
            "lm_head.weight",
            linear.as_ref(),
            [self.config.vocab_size, self.config.hidden_size],
        )?;
        Ok(std::mem::replace(&mut self.lm_head, linear))
    }

    /// Input-layernorm and post-attention-layernorm weights of `layer`, for re-scaling.
    pub fn layer_norms(&self, layer: usize) -> Result<(&[f32], &[f32]), ModelError> {
        let l = self.layer(layer)?;
        Ok((&l.input_norm, &l.post_norm))
    }

    /// Embeds `tokens`: returns the hidden states, `tokens.len() × hidden_size` row-major.
    pub fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        let mut out = Vec::new();
        self.embed_into(tokens, &mut out)?;
        Ok(out)
    }

    fn embed_into(&self, tokens: &[u32], out: &mut Vec<f32>) -> Result<(), ModelError> {
        let h = self.config.hidden_size;
        out.clear();
        out.reserve(tokens.len() * h);
        for &t in tokens {
            let i = t as usize;
            if i >= self.config.vocab_size {
                return Err(ModelError::TokenOutOfRange {
                    token: t,
                    vocab_size: self.config.vocab_size,
                });
            }
            match &self.embed {
                Embedding::F32(w) => out.extend_from_slice(&w[i * h..(i + 1) * h]),
                Embedding::Half(m) => {
                    let at = out.len();
                    out.resize(at + h, 0.0);
                    m.rows_into(i, &mut out[at..]);
                }
                Embedding::Rows(rows) => {
                    let at = out.len();
                    out.resize(at + h, 0.0);
                    rows.row_into(i, &mut out[at..]);
                }
            }
        }
        Ok(())
    }

    fn check_hidden(&self, hidden: &[f32], tokens: usize) -> Result<(), ModelError> {
        if tokens == 0 || hidden.len() != tokens * self.config.hidden_size {
            return Err(ModelError::InvalidArgument(format!(
                "hidden has {} values, expected {tokens} tokens x {} (and at least one token)",
                hidden.len(),
                self.config.hidden_size
            )));
        }
        Ok(())
    }

    /// Runs decoder layer `layer` in place on a full sequence (`hidden`: `tokens × hidden_size`,
    /// positions `0..tokens`, causal), reporting the inputs of its linears to `observer`.
    pub fn forward_layer(
        &self,
        layer: usize,
        hidden: &mut [f32],
        tokens: usize,
        observer: Option<&mut Observer<'_>>,
    ) -> Result<(), ModelError> {
        self.check_hidden(hidden, tokens)?;
        let l = self.layer(layer)?;
        let mut scratch = Scratch::default();
        let mut obs = observer;
        self.layer_step(
            layer,
            l,
            hidden,
            tokens,
            tokens,
            0,
            None,
            &mut obs,
            &mut scratch,
            None,
        );
        Ok(())
    }

    /// [`forward_layer`](Self::forward_layer) on `input` (no observer), keeping what the
    /// layer's linears computed for [`forward_layer_from`](Self::forward_layer_from). Holds
    /// `tokens × (3·hidden + q_dim + 2·intermediate)` floats.
    pub fn forward_layer_keeping(
        &self,
        layer: usize,
        input: Vec<f32>,
        tokens: usize,
    ) -> Result<LayerRun, ModelError> {
        self.check_hidden(&input, tokens)?;
        let l = self.layer(layer)?;
        let mut output = input.clone();
        let mut run = LayerRun {
            layer,
            tokens,
            input,
            attn: Vec::new(),
            mid: Vec::new(),
            gate: Vec::new(),
            up: Vec::new(),
            output: Vec::new(),
        };
        let mut scratch = Scratch::default();
        self.layer_step(
            layer,
            l,
            &mut output,
            tokens,
            tokens,
            0,
            None,
            &mut None,
            &mut scratch,
            Some(&mut run),
        );
        run.output = output;
        Ok(run)
    }

    /// The output of `run`'s layer run again from its linear `from` on, with the model's
    /// current linears, into `hidden`: what [`forward_layer`](Self::forward_layer) on the
    /// run's input computes (the same operations, so the same values) when `from` is the
    /// only linear of the layer that changed since `run` was made. The products before
    /// `from` (and, for `gate_proj` / `up_proj`, the other one of the two) come from `run`.
    pub fn forward_layer_from(
        &self,
        from: LinearSlot,
        run: &LayerRun,
        hidden: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        let l = self.layer(run.layer)?;
        let t = run.tokens;
        let c = &self.config;
        let (h, im) = (c.hidden_size, c.intermediate_size);
        let sizes = [
            (run.input.len(), t * h),
            (run.attn.len(), t * c.q_dim()),
            (run.mid.len(), t * h),
            (run.gate.len(), t * im),
            (run.up.len(), t * im),
        ];
        if sizes.iter().any(|(got, want)| got != want) {
            return Err(ModelError::InvalidArgument(format!(
                "forward_layer_from: the kept run of layer {} does not fit this model's shapes \
                 (a run of another model?)",
                run.layer
            )));
        }
        let mut s = Scratch::default();
        hidden.clear();
        match from {
            LinearSlot::QProj | LinearSlot::KProj | LinearSlot::VProj => {
                hidden.extend_from_slice(&run.input);
                self.layer_step(run.layer, l, hidden, t, t, 0, None, &mut None, &mut s, None);
            }
            LinearSlot::OProj => {
                hidden.extend_from_slice(&run.input);
                s.proj.resize(t * h, 0.0);
                self.project(l, LinearSlot::OProj, &run.attn, t, &mut s.proj);
                add_in_place(hidden, &s.proj);
                self.mlp_step(
                    run.layer,
                    l,
                    hidden,
                    t,
                    &mut None,
                    &mut s,
                    MlpKept::default(),
                    None,
                );
            }
            LinearSlot::GateProj | LinearSlot::UpProj | LinearSlot::DownProj => {
                hidden.extend_from_slice(&run.mid);
                let kept = MlpKept {
                    gate: (from != LinearSlot::GateProj).then_some(run.gate.as_slice()),
                    up: (from != LinearSlot::UpProj).then_some(run.up.as_slice()),
                };
                self.mlp_step(run.layer, l, hidden, t, &mut None, &mut s, kept, None);
            }
        }
        Ok(())
    }

    /// The final norm of hidden states `tokens × hidden` (the input of `lm_head`).
    pub fn final_normed(&self, hidden: &[f32], tokens: usize) -> Result<Vec<f32>, ModelError> {
        self.check_hidden(hidden, tokens)?;
        let mut xn = vec![0.0; hidden.len()];
        rms_norm(hidden, &self.final_norm, self.config.rms_norm_eps, &mut xn);
        Ok(xn)
    }

    /// Final norm + `lm_head`: logits `tokens × vocab_size` for hidden states `tokens × hidden`.
    pub fn final_logits(&self, hidden: &[f32], tokens: usize) -> Result<Vec<f32>, ModelError> {
        self.check_hidden(hidden, tokens)?;
        let mut xn = vec![0.0; hidden.len()];
        rms_norm(hidden, &self.final_norm, self.config.rms_norm_eps, &mut xn);
        let mut logits = vec![0.0; tokens * self.config.vocab_size];
        self.lm_head.forward(&xn, tokens, &mut logits);
        Ok(logits)
    }

    /// Logits for every position of `tokens` (`tokens.len() × vocab_size`), full sequence
    /// from position 0.
    pub fn forward(&self, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        let hidden = self.forward_hidden(tokens, None)?;
        self.final_logits(&hidden, tokens.len())
    }

    /// Hidden states after the last decoder layer (before the final norm), calling `observer`
    /// with the inputs of every linear of every layer.
    pub fn forward_hidden(
        &self,
        tokens: &[u32],
        observer: Option<&mut Observer<'_>>,
    ) -> Result<Vec<f32>, ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::InvalidArgument("empty token sequence".into()));
        }
        let mut hidden = self.embed(tokens)?;
        let mut scratch = Scratch::default();
        let mut obs = observer;
        for (i, l) in self.layers.iter().enumerate() {
            self.layer_step(
                i,
                l,
                &mut hidden,
                tokens.len(),
                tokens.len(),
                0,
                None,
                &mut obs,
                &mut scratch,
                None,
            );
        }
        Ok(hidden)
    }

    /// Sum over `i in 0..T-1` of `−log p(tokens[i+1] | tokens[..=i])` for one window.
    pub fn window_nll(&self, tokens: &[u32]) -> Result<f64, ModelError> {
        self.window_nll_observed(tokens, None)
    }

    /// [`window_nll`](Self::window_nll) that also reports linear inputs to `observer`.
    pub fn window_nll_observed(
        &self,
        tokens: &[u32],
        observer: Option<&mut Observer<'_>>,
    ) -> Result<f64, ModelError> {
        let hidden = self.forward_hidden(tokens, observer)?;
        self.hidden_nll(&hidden, tokens)
    }

    /// [`window_nll`](Self::window_nll) of windows of one length, run through the layers
    /// together: every linear takes all their tokens in one product (so a stack's tiles of
    /// `Ŵ` are rebuilt once for all of them), each window keeps its own positions and causal
    /// attention.
    pub fn windows_nll(&self, windows: &[&[u32]]) -> Result<Vec<f64>, ModelError> {
        let Some(first) = windows.first() else {
            return Ok(Vec::new());
        };
        let seq = first.len();
        if seq == 0 || windows.iter().any(|w| w.len() != seq) {
            return Err(ModelError::InvalidArgument(
                "windows_nll: the windows must be non-empty and of one length".into(),
            ));
        }
        let tokens = windows.concat();
        let mut hidden = self.embed(&tokens)?;
        let mut scratch = Scratch::default();
        let mut obs: Option<&mut Observer<'_>> = None;
        for (i, l) in self.layers.iter().enumerate() {
            self.layer_step(
                i,
                l,
                &mut hidden,
                tokens.len(),
                seq,
                0,
                None,
                &mut obs,
                &mut scratch,
                None,
            );
        }
        let h = self.config.hidden_size;
        windows
            .iter()
            .zip(hidden.chunks_exact(seq * h))
            .map(|(w, hs)| self.hidden_nll(hs, w))
            .collect()
    }

    /// NLL sum of `tokens[1..]` from the last layer's hidden states (`tokens.len() × hidden`),
    /// computed in chunks so the full logits matrix is never held.
    pub fn hidden_nll(&self, hidden: &[f32], tokens: &[u32]) -> Result<f64, ModelError> {
        let t = tokens.len();
        self.check_hidden(hidden, t)?;
        let v = self.config.vocab_size;
        if let Some(&bad) = tokens.iter().find(|&&x| x as usize >= v) {
            return Err(ModelError::TokenOutOfRange {
                token: bad,
                vocab_size: v,
            });
        }
        let h = self.config.hidden_size;
        let scored = t - 1;
        let chunk = LOGIT_CHUNK.min(scored.max(1));
        let mut xn = vec![0.0f32; chunk * h];
        let mut logits = vec![0.0f32; chunk * v];
        let mut row_nll = vec![0.0f64; chunk];
        let mut total = 0.0f64;
        let mut r0 = 0;
        while r0 < scored {
            let r1 = (r0 + chunk).min(scored);
            let n = r1 - r0;
            rms_norm(
                &hidden[r0 * h..r1 * h],
                &self.final_norm,
                self.config.rms_norm_eps,
                &mut xn[..n * h],
            );
            self.lm_head.forward(&xn[..n * h], n, &mut logits[..n * v]);
            // Per-row values summed in order: deterministic whatever the thread split.
            logits[..n * v]
                .par_chunks(v)
                .zip(row_nll[..n].par_iter_mut())
                .enumerate()
                .for_each(|(i, (row, out))| {
                    *out = crate::fastmath::nll(row, tokens[r0 + i + 1] as usize);
                });
            total += row_nll[..n].iter().sum::<f64>();
            r0 = r1;
        }
        Ok(total)
    }

    /// Perplexity over windows (docs/ALGORITHM.md §5): `exp(Σ window NLL / Σ (len − 1))`.
    pub fn perplexity(&self, windows: &[&[u32]]) -> Result<Perplexity, ModelError> {
        self.perplexity_with_progress(windows, &mut |_, _| {})
    }

    /// [`perplexity`](Self::perplexity) calling `progress(done, total)` after each window.
    pub fn perplexity_with_progress(
        &self,
        windows: &[&[u32]],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Perplexity, ModelError> {
        if let Some((i, w)) = windows.iter().enumerate().find(|(_, w)| w.len() < 2) {
            return Err(ModelError::InvalidArgument(format!(
                "window {i} has {} tokens; at least 2 are needed",
                w.len()
            )));
        }
        let mut nll = 0.0f64;
        let mut count = 0usize;
        let mut done = 0;
        while done < windows.len() {
            // Consecutive windows of one length, up to `BATCH_TOKENS` tokens together.
            let len = windows[done].len();
            let most = (BATCH_TOKENS / len).max(1);
            let batch = windows[done..]
                .iter()
                .take(most)
                .take_while(|w| w.len() == len)
                .count();
            for (w, window_nll) in windows[done..done + batch]
                .iter()
                .zip(self.windows_nll(&windows[done..done + batch])?)
            {
                nll += window_nll;
                count += w.len() - 1;
            }
            done += batch;
            progress(done, windows.len());
        }
        if count == 0 {
            return Err(ModelError::InvalidArgument("no windows to evaluate".into()));
        }
        let mean_nll = nll / count as f64;
        Ok(Perplexity {
            ppl: mean_nll.exp(),
            mean_nll,
            predicted_tokens: count,
            windows: windows.len(),
        })
    }

    /// A new, empty KV cache for this model, with room for `max_position_embeddings`
    /// positions (at most 4096; it grows beyond that as needed).
    pub fn new_cache(&self) -> KvCache {
        KvCache::with_capacity(&self.config, self.config.max_position_embeddings.min(4096))
    }

    fn check_cache(&self, cache: &KvCache) -> Result<(), ModelError> {
        if cache.keys.len() != self.layers.len() || cache.kv_dim != self.config.kv_dim() {
            return Err(ModelError::InvalidArgument(format!(
                "KV cache built for {} layers x {} kv width, model has {} x {}",
                cache.keys.len(),
                cache.kv_dim,
                self.layers.len(),
                self.config.kv_dim()
            )));
        }
        Ok(())
    }

    /// Feeds `tokens` after the cached positions (batched), appends their keys/values to
    /// `cache`, and writes the logits of the last token into `logits` (`vocab_size`).
    ///
    /// A run of at most [`CausalLm::token_steps_limit`] tokens (more than one) goes through
    /// the decoder one token at a time instead, as decoding does: the linears said that
    /// costs less (a short prompt through a packed stack, whose batch product rebuilds
    /// tiles of every weight). The logits are then those of feeding the tokens one by one.
    ///
    /// Runs on a thread of rayon's pool (moving there once if called from outside it), so
    /// that the parallel parts of each product are shared with the other workers directly: a
    /// caller outside the pool would otherwise wake a worker for every matrix.
    pub fn forward_cached_into(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        logits: &mut [f32],
    ) -> Result<(), ModelError> {
        rayon::scope(|_| self.forward_cached_in_pool(tokens, cache, logits))
    }

    fn forward_cached_in_pool(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        logits: &mut [f32],
    ) -> Result<(), ModelError> {
        self.check_cache(cache)?;
        let v = self.config.vocab_size;
        if logits.len() != v {
            return Err(ModelError::InvalidArgument(format!(
                "logits buffer has {} values, vocabulary is {v}",
                logits.len()
            )));
        }
        if tokens.is_empty() {
            return Err(ModelError::InvalidArgument("empty token sequence".into()));
        }
        if let Some(&token) = tokens.iter().find(|&&t| t as usize >= v) {
            // Checked before any token is fed (a run fed token by token would otherwise
            // leave the tokens before it in the cache).
            return Err(ModelError::TokenOutOfRange {
                token,
                vocab_size: v,
            });
        }
        let t = tokens.len();
        let h = self.config.hidden_size;
        let mut hidden = std::mem::take(&mut cache.scratch.hidden);
        let steps = t > 1 && t <= self.token_steps_limit();
        let res = if steps {
            tokens
                .iter()
                .try_for_each(|token| self.feed(std::slice::from_ref(token), cache, &mut hidden))
        } else {
            self.feed(tokens, cache, &mut hidden)
        };
        if let Err(e) = res {
            cache.scratch.hidden = hidden;
            return Err(e);
        }
        // The last token's row: the only row left when fed one at a time.
        let last = if steps { 0 } else { t - 1 };
        let s = &mut cache.scratch;
        s.xn.resize(h, 0.0);
        rms_norm(
            &hidden[last * h..],
            &self.final_norm,
            self.config.rms_norm_eps,
            &mut s.xn,
        );
        self.lm_head.forward(&s.xn, 1, logits);
        cache.scratch.hidden = hidden;
        Ok(())
    }

    /// Embeds `tokens` into `hidden` and runs them through every layer after the cached
    /// positions, appending their keys and values to `cache` (`hidden` then holds their
    /// last layer's output).
    fn feed(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        hidden: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        self.embed_into(tokens, hidden)?;
        let t = tokens.len();
        let pos0 = cache.len;
        let mut obs: Option<&mut Observer<'_>> = None;
        for (i, l) in self.layers.iter().enumerate() {
            let (keys, values, scratch) =
                (&mut cache.keys[i], &mut cache.values[i], &mut cache.scratch);
            self.layer_step(
                i,
                l,
                hidden,
                t,
                t,
                pos0,
                Some((keys, values)),
                &mut obs,
                scratch,
                None,
            );
        }
        cache.len += t;
        Ok(())
    }

    /// The most new tokens that [`CausalLm::forward_cached_into`] feeds one at a time: the
    /// smallest [`Linear::token_steps_limit`] of the decoder layers' linears (0: never).
    pub fn token_steps_limit(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| l.linears.iter())
            .map(|l| l.token_steps_limit())
            .min()
            .unwrap_or(0)
    }

    /// Feeds `tokens` after the cached positions; returns the logits of the last one.
    pub fn forward_cached(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
    ) -> Result<Vec<f32>, ModelError> {
        let mut logits = vec![0.0; self.config.vocab_size];
        self.forward_cached_into(tokens, cache, &mut logits)?;
        Ok(logits)
    }

    /// Incremental decoding: feeds one token at position `cache.len()`, returns its logits.
    pub fn forward_next(&self, token: u32, cache: &mut KvCache) -> Result<Vec<f32>, ModelError> {
        self.forward_cached(&[token], cache)
    }

    /// Generates up to `max_new_tokens` after `prompt`, stopping after any token in `stop`
    /// or when `on_token` returns `false`. Returns the generated tokens (prompt excluded).
    pub fn generate(
        &self,
        prompt: &[u32],
        max_new_tokens: usize,
        sampler: &mut crate::Sampler,
        stop: &[u32],
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<Vec<u32>, ModelError> {
        let mut cache = self.new_cache();
        let mut logits = vec![0.0; self.config.vocab_size];
        let mut out = Vec::new();
        if max_new_tokens == 0 {
            return Ok(out);
        }
        self.forward_cached_into(prompt, &mut cache, &mut logits)?;
        loop {
            let next = sampler.sample(&logits);
            out.push(next);
            if stop.contains(&next) || !on_token(next) || out.len() >= max_new_tokens {
                break;
            }
            self.forward_cached_into(&[next], &mut cache, &mut logits)?;
        }
        Ok(out)
    }

    /// One decoder layer on `t` rows of `hidden`: `t / seq` sequences of `seq` tokens stacked
    /// (each its own positions from `pos0` and its own causal attention; the linears take all
    /// rows at once). With a KV cache (`kv`: the new keys and values are appended to it and
    /// attention covers all its rows), one sequence (`seq == t`). With `keep`, what the
    /// layer's linears computed is copied into it.
    #[allow(clippy::too_many_arguments)]
    fn layer_step(
        &self,
        li: usize,
        l: &DecoderLayer,
        hidden: &mut [f32],
        t: usize,
        seq: usize,
        pos0: usize,
        kv: Option<(&mut Vec<f32>, &mut Vec<f32>)>,
        obs: &mut Option<&mut Observer<'_>>,
        s: &mut Scratch,
        mut keep: Option<&mut LayerRun>,
    ) {
        let c = &self.config;
        let (h, qd, kvd) = (c.hidden_size, c.q_dim(), c.kv_dim());
        let eps = c.rms_norm_eps;
        s.xn.resize(t * h, 0.0);
        rms_norm(hidden, &l.input_norm, eps, &mut s.xn);
        if let Some(o) = obs.as_deref_mut() {
            o(li, Site::AttnInput, &s.xn, t);
        }
        s.q.resize(t * qd, 0.0);
        s.k.resize(t * kvd, 0.0);
        s.v.resize(t * kvd, 0.0);
        if t == 1 {
            // One token: the three products side by side (q against k and v, about half the
            // work each with grouped-query attention), one fork and join instead of three.
            let (xn, q, k, v) = (&s.xn, &mut s.q, &mut s.k, &mut s.v);
            rayon::join(
                || self.project(l, LinearSlot::QProj, xn, t, q),
                || {
                    self.project(l, LinearSlot::KProj, xn, t, k);
                    self.project(l, LinearSlot::VProj, xn, t, v);
                },
            );
        } else {
            self.project(l, LinearSlot::QProj, &s.xn, t, &mut s.q);
            self.project(l, LinearSlot::KProj, &s.xn, t, &mut s.k);
            self.project(l, LinearSlot::VProj, &s.xn, t, &mut s.v);
        }
        debug_assert!(seq > 0 && t.is_multiple_of(seq) && (kv.is_none() || seq == t));
        for q in s.q.chunks_exact_mut(seq * qd) {
            self.rope.apply(q, seq, c.num_heads, pos0);
        }
        for k in s.k.chunks_exact_mut(seq * kvd) {
            self.rope.apply(k, seq, c.num_kv_heads, pos0);
        }
        s.attn.resize(t * qd, 0.0);
        let shape = AttnShape {
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            tokens: seq,
            pos0,
            window: c.sliding_window,
        };
        match kv {
            Some((keys, values)) => {
                keys.extend_from_slice(&s.k);
                values.extend_from_slice(&s.v);
                attention(shape, &s.q, keys, values, &mut s.attn, &mut s.att_scratch);
            }
            None => {
                for (((q, k), v), out) in
                    s.q.chunks_exact(seq * qd)
                        .zip(s.k.chunks_exact(seq * kvd))
                        .zip(s.v.chunks_exact(seq * kvd))
                        .zip(s.attn.chunks_exact_mut(seq * qd))
                {
                    attention(shape, q, k, v, out, &mut s.att_scratch);
                }
            }
        }
        if let Some(o) = obs.as_deref_mut() {
            o(li, Site::OProjInput, &s.attn, t);
        }
        s.proj.resize(t * h, 0.0);
        self.project(l, LinearSlot::OProj, &s.attn, t, &mut s.proj);
        add_in_place(hidden, &s.proj);
        if let Some(k) = keep.as_deref_mut() {
            k.attn.clone_from(&s.attn);
            k.mid.clear();
            k.mid.extend_from_slice(hidden);
        }
        self.mlp_step(li, l, hidden, t, obs, s, MlpKept::default(), keep);
    }

    /// The MLP half of a layer on `hidden` (the states after the attention's residual add),
    /// in place: norm, `gate_proj` and `up_proj` (or what `kept` has of them), activation,
    /// `down_proj`, residual add; the two products copied into `keep`.
    #[allow(clippy::too_many_arguments)]
    fn mlp_step(
        &self,
        li: usize,
        l: &DecoderLayer,
        hidden: &mut [f32],
        t: usize,
        obs: &mut Option<&mut Observer<'_>>,
        s: &mut Scratch,
        kept: MlpKept<'_>,
        keep: Option<&mut LayerRun>,
    ) {
        let c = &self.config;
        let (h, im) = (c.hidden_size, c.intermediate_size);
        s.gate.resize(t * im, 0.0);
        s.up.resize(t * im, 0.0);
        if let (Some(gate), Some(up)) = (kept.gate, kept.up) {
            s.gate.copy_from_slice(gate);
            s.up.copy_from_slice(up);
        } else {
            s.xn.resize(t * h, 0.0);
            rms_norm(hidden, &l.post_norm, c.rms_norm_eps, &mut s.xn);
            if let Some(o) = obs.as_deref_mut() {
                o(li, Site::MlpInput, &s.xn, t);
            }
            match (kept.gate, kept.up) {
                (Some(gate), _) => {
                    s.gate.copy_from_slice(gate);
                    self.project(l, LinearSlot::UpProj, &s.xn, t, &mut s.up);
                }
                (_, Some(up)) => {
                    s.up.copy_from_slice(up);
                    self.project(l, LinearSlot::GateProj, &s.xn, t, &mut s.gate);
                }
                (None, None) if t == 1 => {
                    let (xn, gate, up) = (&s.xn, &mut s.gate, &mut s.up);
                    rayon::join(
                        || self.project(l, LinearSlot::GateProj, xn, t, gate),
                        || self.project(l, LinearSlot::UpProj, xn, t, up),
                    );
                }
                (None, None) => {
                    self.project(l, LinearSlot::GateProj, &s.xn, t, &mut s.gate);
                    self.project(l, LinearSlot::UpProj, &s.xn, t, &mut s.up);
                }
            }
        }
        if let Some(k) = keep {
            k.gate.clone_from(&s.gate);
            k.up.clone_from(&s.up);
        }
        crate::fastmath::silu_mul(&mut s.gate, &s.up);
        if let Some(o) = obs.as_deref_mut() {
            o(li, Site::DownInput, &s.gate, t);
        }
        s.proj.resize(t * h, 0.0);
        self.project(l, LinearSlot::DownProj, &s.gate, t, &mut s.proj);
        add_in_place(hidden, &s.proj);
    }

    fn project(&self, l: &DecoderLayer, slot: LinearSlot, x: &[f32], t: usize, y: &mut [f32]) {
        l.linears[slot.index()].forward(x, t, y);
        if let Some(b) = &l.biases[slot.index()] {
            for row in y.chunks_exact_mut(b.len()) {
                add_in_place(row, b);
            }
        }
    }
}

/// Row-wise RMSNorm: `out = x / sqrt(mean(x²) + eps) ⊙ w`.
pub(crate) fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let h = w.len();
    for (xr, or) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let ss = crate::linear::dot(xr, xr);
        let r = 1.0 / (ss / h as f32 + eps).sqrt();
        for ((o, &a), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = a * r * g;
        }
    }
}

fn add_in_place(y: &mut [f32], x: &[f32]) {
    for (a, b) in y.iter_mut().zip(x) {
        *a += b;
    }
}
