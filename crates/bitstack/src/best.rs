//! `compress --mode best` (docs/BEST.md): one file, any budget, resizable — with the quality
//! per byte of a good scalar quantizer.
//!
//! Differences from the paper's pipeline ([`crate::calibrate`]):
//! - the embedding table and `lm_head` are stacked matrices too (a tied table once), so the
//!   fixed part shrinks to norms and biases;
//! - every matrix is a chain of nested bit planes ([`bitstack_decompose::decompose_planes`]):
//!   a per-group uniform grid refined one bit per weight per block, prefix-consistent — or,
//!   where its measured error curve is lower, one AVD block followed by planes of the residual
//!   ([`crate::chain`]);
//! - columns are scaled by `s^alpha` (activation scales, folded exactly into the preceding
//!   norms as in ALGORITHM.md §1) so that the grid spends its resolution where activations
//!   are large;
//! - blocks are ordered across levels by estimated loss reduction per byte: each matrix's
//!   sensitivity `λ` is measured once (the KL divergence of the model's next-token
//!   distribution when that matrix alone is cut to a few planes, divided by the matrix's
//!   activation-weighted squared error there), a block's gain is `λ ×` the weighted error it
//!   removes, and the chains are merged by gain per byte on their upper convex hulls.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use bitstack_decompose::{PlaneBlock, PlaneParams};
use bitstack_format::{ContainerWriter, Dtype, PartData, Spool};
use bitstack_model::{CausalLm, DenseLinear, Linear, LinearSlot, ModelConfig, Site, TextTokenizer};
use bitstack_order::{StackEntry, StackLayout};
use serde_json::json;

use crate::calibrate::{
    activation_scales, scaling_reparametrisation, text_identity, unflatten_scales,
    CalibrationOptions, ReparametrisedSource,
};
use crate::chain::{build_chain, ChainBlock, ChainChoice, MatrixChain};
use crate::checkpoint::Checkpoint;
use crate::compress::{
    add_aux_and_fixed, push_avd_block, read_architecture, run_description, work_dir_of,
    CheckpointedScorer, CompressOptions, CompressSummary, Progress, Reparametrisation,
};
use crate::resume::Checkpointer;
use crate::select::select_matrices;
use crate::Error;

/// Name of the token embedding table.
pub const EMBED: &str = "model.embed_tokens.weight";
/// Name of the output projection.
pub const HEAD: &str = "lm_head.weight";

/// How best mode orders the planes after the base model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BestOrder {
    /// By estimated loss reduction per byte (KL-probe sensitivity × weighted error removed),
    /// across levels.
    Gain,
    /// By layer-output error removed per byte (activation-weighted squared error, the same
    /// weight `λ = 1` for every matrix): no probe, data only through the activation scales.
    OutputError,
    /// The paper's scorer on planes: level by level, each candidate plane scored by the
    /// perplexity on the scoring windows with every other matrix at the level (costly; for
    /// comparison).
    Perplexity,
    /// Level by level in matrix order (plane 1 of every matrix, then plane 2, ...): the
    /// same number of planes for every matrix at each level boundary (a baseline).
    Levels,
}

/// Options of [`compress_best`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BestOptions {
    /// Block ordering.
    pub order: BestOrder,
    /// Group size and number of planes per matrix.
    pub planes: PlaneParams,
    /// Exponent of the activation scales folded into the columns (0 = none, 1 = the paper's).
    pub alpha: f32,
    /// Number of planes at which each matrix's sensitivity is measured.
    pub probe_planes: usize,
    /// Calibration windows used for the `lm_head` input statistics (a subset suffices).
    pub head_windows: usize,
    /// Which chain each matrix gets (planes throughout, an AVD block first, or per matrix).
    pub chains: ChainChoice,
    /// Choose the planes' bits with full-depth GPTQ error compensation
    /// ([`bitstack_decompose::decompose_planes_gptq`]) under each linear's input Hessian,
    /// measured on this many calibration windows (0 = off; the embedding table is never
    /// compensated: it is a lookup).
    pub gptq_windows: usize,
}

impl Default for BestOptions {
    /// Groups of 128, 8 planes, `alpha = 0.5`, sensitivity probed at 3 planes, chains
    /// chosen per matrix.
    fn default() -> Self {
        Self {
            order: BestOrder::Gain,
            planes: PlaneParams {
                group: 128,
                planes: 8,
            },
            alpha: 0.5,
            probe_planes: 3,
            head_windows: 16,
            chains: ChainChoice::Auto,
            gptq_windows: 0,
        }
    }
}

/// Per-matrix result of the sensitivity probe.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sensitivity {
    /// Mean KL divergence (nats per token) with this matrix alone at the probe planes.
    pub kl: f64,
    /// `kl` divided by the matrix's weighted squared error at the probe planes.
    pub lambda: f64,
}

/// Compresses `model_dir` into `out` in best mode (see the module documentation).
pub fn compress_best(
    model_dir: &Path,
    out: &Path,
    options: &CompressOptions,
    best: &BestOptions,
    calibration: &CalibrationOptions,
    progress: &(dyn Fn(Progress<'_>) + Sync),
) -> Result<CompressSummary, Error> {
    if !(best.alpha.is_finite() && (0.0..=1.0).contains(&best.alpha)) {
        return Err(Error::Usage(format!(
            "alpha must be between 0 and 1, got {}",
            best.alpha
        )));
    }
    // Before any work (calibration takes minutes on a large model).
    best.planes.check().map_err(|e| {
        Error::Usage(format!(
            "--planes {} --group {}: {e}",
            best.planes.planes, best.planes.group
        ))
    })?;
    if best.probe_planes == 0 || best.probe_planes > best.planes.planes {
        return Err(Error::Usage(format!(
            "the sensitivity probe needs 1 ..= {} planes (the planes per matrix), got {}",
            best.planes.planes, best.probe_planes
        )));
    }
    let checkpoint = Checkpoint::open(model_dir)?;
    let architecture = read_architecture(&checkpoint)?;
    let mut names = select_matrices(&checkpoint, architecture.as_deref(), &options.include)?;
    for table in [EMBED, HEAD] {
        if checkpoint.tensors().contains_key(table) && !names.iter().any(|n| n == table) {
            names.push(table.to_string());
        }
    }
    let config = ModelConfig::from_file(model_dir.join("config.json"))?;
    calibration.check(&config)?;
    let tokenizer = TextTokenizer::from_model_dir(model_dir)?;
    // The texts are read (and their errors reported) before any progress is saved.
    let (calib, score) = calibration.windows(&tokenizer)?;
    let run = run_description(
        &checkpoint,
        &names,
        options,
        json!({
            "mode": "best",
            "calib_text": text_identity(&calibration.calib_text),
            "calib_windows": calibration.calib_windows,
            "score_text": text_identity(&calibration.score_text),
            "score_windows": calibration.score_windows,
            "seq": calibration.seq,
            "group": best.planes.group,
            "planes": best.planes.planes,
            "alpha": best.alpha,
            "probe_planes": best.probe_planes,
            "head_windows": best.head_windows,
            "order": format!("{:?}", best.order),
            "chains": format!("{:?}", best.chains),
            "gptq_windows": best.gptq_windows,
        }),
    )?;
    let resume = Checkpointer::open(out, options.checkpointing, &run)?;
    let mut stages = Vec::new();

    // 1. Activation statistics of the original model.
    let t = Instant::now();
    let saved = resume.as_ref().and_then(|r| {
        let mut head = r.load_vectors("head")?;
        let scales = unflatten_scales(r.load_vectors("scales")?, &config)?;
        let counts = head.pop()?;
        let sq = head.pop()?;
        // As `head_statistics` makes them: finite, one square per hidden unit (≥ 0), one
        // count per token (≥ 1).
        let fits = head.is_empty()
            && sq.len() == config.hidden_size
            && counts.len() == config.vocab_size
            && sq.iter().all(|x| x.is_finite() && *x >= 0.0)
            && counts.iter().all(|x| x.is_finite() && *x >= 1.0);
        if !fits {
            return None;
        }
        r.count_reused(2);
        Some((scales, sq, counts))
    });
    let (scales, head_sq, token_counts) = match saved {
        Some(saved) => saved,
        None => {
            let original = CausalLm::load(model_dir)?;
            let refs: Vec<&[u32]> = calib.iter().map(Vec::as_slice).collect();
            let scales = activation_scales(&original, &refs, progress)?;
            let (head_sq, token_counts) = head_statistics(&original, &calib, best.head_windows)?;
            if let Some(r) = &resume {
                let flat: Vec<Vec<f32>> = scales.iter().flat_map(|s| s.iter().cloned()).collect();
                r.save_vectors("scales", &flat)?;
                r.save_vectors("head", &[head_sq.clone(), token_counts.clone()])?;
            }
            (scales, head_sq, token_counts)
        }
    };
    let mut options = options.clone();
    options.reparametrisation = if best.alpha > 0.0 {
        let powered: Vec<[Vec<f32>; 4]> = scales
            .iter()
            .map(|per_site| {
                per_site
                    .clone()
                    .map(|s| s.iter().map(|v| v.powf(best.alpha)).collect())
            })
            .collect();
        scaling_reparametrisation(&checkpoint, &powered)?
    } else {
        Reparametrisation::default()
    };
    stages.push(("calibrate".to_string(), t.elapsed()));

    // 1b. Input Hessians for GPTQ compensation, one layer at a time (as the planes need them).
    let gptq_windows = &calib[..best.gptq_windows.min(calib.len())];
    let mut hessians = if gptq_windows.is_empty() {
        None
    } else {
        let (h, i, o) = (
            config.hidden_size as u64,
            config.intermediate_size as u64,
            (config.num_heads * config.head_dim) as u64,
        );
        let tokens: u64 = gptq_windows.iter().map(|w| w.len() as u64).sum();
        let need = 8 * (2 * h * h + o * o + i * i + h * h) + 4 * tokens * h;
        if let Some(available) = crate::compress::available_memory() {
            if need > available {
                return Err(Error::Usage(format!(
                    "--gptq-windows needs {:.1} GiB for one layer's input Hessians and the \
                     windows' hidden states, {:.1} GiB is available: use fewer windows, or \
                     --gptq-windows 0",
                    need as f64 / (1u64 << 30) as f64,
                    available as f64 / (1u64 << 30) as f64
                )));
            }
        }
        Some(HessianStream::new(
            CausalLm::load(model_dir)?,
            gptq_windows,
        )?)
    };

    // 2. Planes of every matrix.
    let t = Instant::now();
    progress(Progress::Stage {
        name: "planes",
        total: names.len() as u64,
    });
    let mut chains = Vec::with_capacity(names.len());
    let mut shapes = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let info = checkpoint.info(name)?;
        let [rows, cols] = info.shape[..] else {
            return Err(Error::Checkpoint(format!(
                "{name} has shape {:?}; only 2-D tensors can be stacked",
                info.shape
            )));
        };
        let w = options.reparametrisation.load(&checkpoint, name)?;
        let cw = column_weights(name, &scales, &options.reparametrisation, &head_sq, &config);
        let rw = (name == EMBED).then(|| token_counts.clone());
        let factor = match &mut hessians {
            Some(h) => gptq_factor(name, h, &options.reparametrisation)?,
            None => None,
        };
        let chain = build_chain(
            &w,
            rows,
            cols,
            &best.planes,
            (rw.as_deref(), cw.as_deref()),
            best.chains,
            factor.as_ref(),
        )
        .map_err(|e| Error::Checkpoint(format!("{name}: {e}")))?;
        chains.push(chain);
        shapes.push((rows, cols));
        progress(Progress::Step {
            done: i as u64 + 1,
            what: name.as_str(),
        });
    }
    stages.push(("planes".to_string(), t.elapsed()));

    // 3. Sensitivity of every matrix (KL probe).
    let t = Instant::now();
    let source = ReparametrisedSource {
        checkpoint: &checkpoint,
        reparametrisation: &options.reparametrisation,
    };
    let model = CausalLm::from_source(config.clone(), &source, &mut |_, _| Ok(None))?;
    let sensitivities = if best.order == BestOrder::Gain {
        probe_sensitivities(
            model,
            &names,
            &chains,
            &score,
            best.probe_planes,
            resume.as_ref(),
            progress,
        )?
    } else {
        drop(model);
        vec![
            Sensitivity {
                kl: f64::NAN,
                lambda: 1.0
            };
            names.len()
        ]
    };
    stages.push(("probe".to_string(), t.elapsed()));

    // 4. Order: the first plane of every matrix is the base model; the rest by gain per byte.
    let t = Instant::now();
    let order = match best.order {
        BestOrder::Gain | BestOrder::OutputError => order_by_gain(&chains, &sensitivities),
        BestOrder::Levels => order_by_levels(&chains),
        BestOrder::Perplexity => {
            let source = ReparametrisedSource {
                checkpoint: &checkpoint,
                reparametrisation: &options.reparametrisation,
            };
            let model = CausalLm::from_source(config.clone(), &source, &mut |_, _| Ok(None))?;
            let counts: Vec<u32> = chains.iter().map(|c| c.len() as u32).collect();
            let mut scorer = PlanePerplexityScorer::new(model, &names, &chains, &score, progress)?;
            match &resume {
                Some(r) => {
                    let mut checkpointed = CheckpointedScorer {
                        inner: &mut scorer,
                        resume: r,
                    };
                    bitstack_order::build_level_synchronous(
                        &counts,
                        &mut checkpointed,
                        &mut |_, _| {},
                    )?
                }
                None => {
                    bitstack_order::build_level_synchronous(&counts, &mut scorer, &mut |_, _| {})?
                }
            }
        }
    };
    let block_bytes: Vec<Vec<u64>> = chains
        .iter()
        .map(|c| c.blocks().map(|b| b.stored_bytes()).collect())
        .collect();
    stages.push(("order".to_string(), t.elapsed()));

    // 5. Write.
    let t = Instant::now();
    let planes = best.planes.planes;
    let depth = chains.iter().map(MatrixChain::len).max().unwrap_or(0);
    let mut mean_rel_err = vec![0.0; depth];
    let mut rel_err = serde_json::Map::new();
    let mut sens = serde_json::Map::new();
    let mut kinds = serde_json::Map::new();
    for ((name, c), s) in names.iter().zip(&chains).zip(&sensitivities) {
        for (b, e) in c.rel_err.iter().enumerate() {
            mean_rel_err[b] += e / names.len() as f64;
        }
        rel_err.insert(name.clone(), json!(c.rel_err));
        sens.insert(name.clone(), json!({"kl": s.kl, "lambda": s.lambda}));
        kinds.insert(name.clone(), json!(c.kind()));
    }
    let avd_first = chains.iter().filter(|c| c.avd.is_some()).count();
    let mut metadata = options.extra_metadata.clone();
    metadata.insert("architecture".into(), json!(architecture));
    metadata.insert(
        "compress".into(),
        json!({
            "mode": "best",
            "kind": if avd_first == 0 { "planes" } else { "avd+planes" },
            "chains": match best.chains {
                ChainChoice::Planes => "planes",
                ChainChoice::AvdFirst => "avd-first",
                ChainChoice::Auto => "auto",
            },
            "avd_first_matrices": avd_first,
            "gptq_windows": best.gptq_windows,
            "group": best.planes.group,
            "planes": planes,
            "alpha": best.alpha,
            "probe_planes": best.probe_planes,
            "scorer": match best.order {
                BestOrder::Gain => "kl-probe-gain-per-byte",
                BestOrder::OutputError => "output-error-per-byte",
                BestOrder::Levels => "levels",
                BestOrder::Perplexity => "perplexity-level-synchronous",
            },
            "reparametrised": !options.reparametrisation.is_identity(),
            "tool": concat!("bitstack ", env!("CARGO_PKG_VERSION")),
        }),
    );
    metadata.insert(
        "calibration".into(),
        json!({
            "calib_text": text_identity(&calibration.calib_text),
            "calib_windows": calibration.calib_windows,
            "score_text": text_identity(&calibration.score_text),
            "score_windows": calibration.score_windows,
            "seq": calibration.seq,
        }),
    );
    metadata.insert("rel_err".into(), serde_json::Value::Object(rel_err));
    metadata.insert("sensitivity".into(), serde_json::Value::Object(sens));
    metadata.insert("chain".into(), serde_json::Value::Object(kinds));
    let mut writer = ContainerWriter::new(metadata);
    // The chains stay in memory until the end; their copies for the file wait on disk.
    writer.spool_blocks_in(Arc::new(Spool::create_in(work_dir_of(out))?));
    let fixed_bytes = add_aux_and_fixed(&mut writer, &checkpoint, &names, &options)?;
    for (name, &(rows, cols)) in names.iter().zip(&shapes) {
        writer.add_matrix(name, rows, cols, checkpoint.info(name)?.dtype.name())?;
    }
    for entry in &order {
        let (m, b) = (entry.matrix as usize, entry.block as usize);
        match chains[m].block(b) {
            Some(ChainBlock::Avd(a)) => push_avd_block(&mut writer, m, b, a.clone())?,
            Some(ChainBlock::Plane(p)) => push_plane_block(&mut writer, m, b, p)?,
            None => {
                return Err(Error::Checkpoint(format!(
                    "internal: stack entry {m}/{b} outside its chain"
                )))
            }
        }
    }
    writer.set_mandatory_blocks(names.len());
    let layout = StackLayout::new(fixed_bytes, block_bytes, order.clone(), names.len())?;
    writer.write_atomic(out)?;
    stages.push(("write".to_string(), t.elapsed()));
    let reused = resume.as_ref().map_or(0, Checkpointer::reused);
    if let Some(r) = resume {
        r.finish()?;
    }
    Ok(CompressSummary::of_written(
        names.len(),
        &layout,
        out,
        stages,
        mean_rel_err,
        reused,
    ))
}

/// Mean squares of the `lm_head` inputs (final-normed hidden states) over the first
/// `windows` calibration windows, and token counts (+1) over all calibration windows.
fn head_statistics(
    model: &CausalLm,
    calib: &[Vec<u32>],
    windows: usize,
) -> Result<(Vec<f32>, Vec<f32>), Error> {
    let cfg = model.config();
    let h = cfg.hidden_size;
    let mut counts = vec![1.0f32; cfg.vocab_size];
    for w in calib {
        for &t in w {
            if let Some(c) = counts.get_mut(t as usize) {
                *c += 1.0;
            }
        }
    }
    let take = calib.len().min(windows.max(1));
    let parts: Vec<(Vec<f64>, usize)> =
        crate::windows::each_on_one_thread(&calib[..take], |_, w| {
            let hidden = model.forward_hidden(w, None)?;
            let xn = model.final_normed(&hidden, w.len())?;
            let mut sq = vec![0.0f64; h];
            for row in xn.chunks_exact(h) {
                for (a, &v) in sq.iter_mut().zip(row) {
                    *a += f64::from(v) * f64::from(v);
                }
            }
            Ok::<_, Error>((sq, w.len()))
        })?;
    let mut sq = vec![0.0f64; h];
    let mut n = 0usize;
    for (s, len) in parts {
        sq.iter_mut().zip(s).for_each(|(a, b)| *a += b);
        n += len;
    }
    let head = sq
        .iter()
        .map(|s| ((s / n.max(1) as f64) as f32).max(1e-12))
        .collect();
    Ok((head, counts))
}

/// `acc += XᵀX` for `x` (`tokens × width`, row-major): an f32 GEMM, summed into f64.
fn add_gram(acc: &mut Vec<f64>, x: &[f32], tokens: usize) {
    use faer::linalg::matmul::matmul;
    use faer::{Accum, MatMut, MatRef, Par};
    let width = x.len() / tokens.max(1);
    let mut g = vec![0.0f32; width * width];
    let xm = MatRef::from_row_major_slice(x, tokens, width);
    matmul(
        MatMut::from_row_major_slice_mut(&mut g, width, width),
        Accum::Replace,
        xm.transpose(),
        xm,
        1.0f32,
        Par::rayon(0),
    );
    if acc.len() != g.len() {
        *acc = vec![0.0; g.len()];
    }
    acc.iter_mut()
        .zip(&g)
        .for_each(|(a, &v)| *a += f64::from(v));
}

/// Input Hessians one layer at a time: the windows' hidden states are carried from layer to
/// layer and only the requested layer's four Hessians are held (memory: one layer's
/// Hessians and the hidden states, instead of every layer's).
pub struct HessianStream<'a> {
    model: CausalLm,
    windows: &'a [Vec<u32>],
    /// Hidden states entering layer `next`, per window.
    hidden: Vec<Vec<f32>>,
    next: usize,
    current: Option<(usize, [Vec<f64>; 4])>,
    head: Option<Vec<f64>>,
}

impl<'a> HessianStream<'a> {
    /// A stream over `windows` of `model` (the original model: Hessians in its coordinates).
    pub fn new(model: CausalLm, windows: &'a [Vec<u32>]) -> Result<Self, Error> {
        let hidden = windows
            .iter()
            .map(|w| model.embed(w))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            model,
            windows,
            hidden,
            next: 0,
            current: None,
            head: None,
        })
    }

    /// The Hessians of layer `layer`'s four input sites (in [`Site::ALL`] order). Layers
    /// asked for in increasing order cost one pass; going back restarts from the embeddings.
    pub fn layer(&mut self, layer: usize) -> Result<&[Vec<f64>; 4], Error> {
        let ready = matches!(&self.current, Some((l, _)) if *l == layer);
        if !ready {
            if layer < self.next {
                self.hidden = self
                    .windows
                    .iter()
                    .map(|w| self.model.embed(w))
                    .collect::<Result<_, _>>()?;
                self.next = 0;
            }
            self.current = None;
            while self.next <= layer {
                let collect = self.next == layer;
                let mut sites: [Vec<f64>; 4] = Default::default();
                for (w, h) in self.windows.iter().zip(self.hidden.iter_mut()) {
                    if collect {
                        let mut observe = |_: usize, site: Site, x: &[f32], tokens: usize| {
                            if let Some(s) = Site::ALL.iter().position(|v| *v == site) {
                                add_gram(&mut sites[s], x, tokens);
                            }
                        };
                        self.model
                            .forward_layer(self.next, h, w.len(), Some(&mut observe))?;
                    } else {
                        self.model.forward_layer(self.next, h, w.len(), None)?;
                    }
                }
                if collect {
                    self.current = Some((layer, sites));
                }
                self.next += 1;
            }
        }
        match &self.current {
            Some((_, sites)) => Ok(sites),
            None => Err(Error::Usage(format!("layer {layer} does not exist"))),
        }
    }

    /// The Hessian of the `lm_head`'s input (the final-normed hidden states).
    pub fn head(&mut self) -> Result<&[f64], Error> {
        if self.head.is_none() {
            let layers = self.model.num_layers();
            if self.next < layers {
                // Carry the hidden states to the end (collecting nothing on the way).
                for l in self.next..layers {
                    for (w, h) in self.windows.iter().zip(self.hidden.iter_mut()) {
                        self.model.forward_layer(l, h, w.len(), None)?;
                    }
                }
                self.next = layers;
                self.current = None;
            }
            let mut acc = Vec::new();
            for (w, h) in self.windows.iter().zip(&self.hidden) {
                add_gram(&mut acc, &self.model.final_normed(h, w.len())?, w.len());
            }
            self.head = Some(acc);
        }
        Ok(self.head.as_deref().unwrap_or_default())
    }
}

/// The GPTQ factor of matrix `name`'s input Hessian in the re-parametrised coordinates
/// (`H' = D⁻¹ H D⁻¹` for columns scaled by `D`); `None` for the embedding table.
fn gptq_factor(
    name: &str,
    hessians: &mut HessianStream<'_>,
    reparametrisation: &Reparametrisation,
) -> Result<Option<bitstack_decompose::GptqFactor>, Error> {
    let h = if let Some((layer, slot)) = LinearSlot::parse_weight_name(name) {
        let site = Site::ALL
            .iter()
            .position(|s| *s == slot.site())
            .unwrap_or(0);
        Some(&hessians.layer(layer)?[site][..])
    } else if name == HEAD {
        Some(hessians.head()?)
    } else {
        None
    };
    let Some(h) = h.filter(|h| !h.is_empty()) else {
        return Ok(None);
    };
    let cols = (h.len() as f64).sqrt().round() as usize;
    let mut h = h.to_vec();
    if let Some(f) = reparametrisation.column_scales.get(name) {
        for i in 0..cols {
            for j in 0..cols {
                let d = f64::from(f.get(i).copied().unwrap_or(1.0))
                    * f64::from(f.get(j).copied().unwrap_or(1.0));
                h[i * cols + j] /= d;
            }
        }
    }
    bitstack_decompose::GptqFactor::new(&h, cols, bitstack_decompose::DEFAULT_DAMP)
        .map(Some)
        .map_err(|e| Error::Checkpoint(format!("{name}: GPTQ factor of the input Hessian: {e}")))
}

/// Per-column error weights of a matrix: the mean square of its (re-parametrised) input.
fn column_weights(
    name: &str,
    scales: &[[Vec<f32>; 4]],
    reparametrisation: &Reparametrisation,
    head_sq: &[f32],
    config: &ModelConfig,
) -> Option<Vec<f32>> {
    if let Some((layer, slot)) = LinearSlot::parse_weight_name(name) {
        let site = Site::ALL.iter().position(|s| *s == slot.site())?;
        let s = scales.get(layer)?.get(site)?;
        let folded = reparametrisation.column_scales.get(name);
        return Some(
            s.iter()
                .enumerate()
                .map(|(j, &sj)| {
                    let a = sj / folded.and_then(|f| f.get(j)).copied().unwrap_or(1.0);
                    (a * a).max(1e-12)
                })
                .collect(),
        );
    }
    // The lm_head (and a tied embedding table, which is the lm_head too) sees the final norm.
    let is_head = name == HEAD || (name == EMBED && config.tie_word_embeddings);
    is_head.then(|| head_sq.to_vec())
}

/// The reference hidden states of one scoring window.
struct Reference {
    /// Hidden state entering each layer.
    inputs: Vec<Vec<f32>>,
    /// Hidden state after the last layer.
    last: Vec<f32>,
    /// Log-probabilities `tokens × vocab`.
    logp: Vec<f32>,
}

fn log_softmax_rows(logits: &mut [f32], vocab: usize) {
    for row in logits.chunks_exact_mut(vocab) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = row.iter().map(|&v| f64::from(v - max).exp()).sum();
        let lse = max + sum.ln() as f32;
        row.iter_mut().for_each(|v| *v -= lse);
    }
}

/// Mean KL(reference ‖ model) per token for the final hidden states of one window.
fn window_kl(
    model: &CausalLm,
    hidden: &[f32],
    reference: &Reference,
) -> Result<(f64, usize), Error> {
    let vocab = model.config().vocab_size;
    let tokens = hidden.len() / model.config().hidden_size;
    let mut logq = model.final_logits(hidden, tokens)?;
    log_softmax_rows(&mut logq, vocab);
    let mut kl = 0.0f64;
    for (p_row, q_row) in reference
        .logp
        .chunks_exact(vocab)
        .zip(logq.chunks_exact(vocab))
    {
        for (&lp, &lq) in p_row.iter().zip(q_row) {
            kl += f64::from(lp).exp() * f64::from(lp - lq);
        }
    }
    Ok((kl, tokens))
}

/// Measures every matrix's sensitivity: the KL divergence when it alone holds `probe` planes.
fn probe_sensitivities(
    mut model: CausalLm,
    names: &[String],
    chains: &[MatrixChain],
    windows: &[Vec<u32>],
    probe: usize,
    resume: Option<&Checkpointer>,
    progress: &(dyn Fn(Progress<'_>) + Sync),
) -> Result<Vec<Sensitivity>, Error> {
    if windows.is_empty() {
        return Err(Error::Usage(
            "no scoring window: the scoring text is shorter than one window".into(),
        ));
    }
    let layers = model.num_layers();
    let vocab = model.config().vocab_size;
    let references: Vec<Reference> = crate::windows::each_on_one_thread(windows, |_, w| {
        let mut hidden = model.embed(w)?;
        let mut inputs = Vec::with_capacity(layers);
        for l in 0..layers {
            inputs.push(hidden.clone());
            model.forward_layer(l, &mut hidden, w.len(), None)?;
        }
        let mut logp = model.final_logits(&hidden, w.len())?;
        log_softmax_rows(&mut logp, vocab);
        Ok::<_, Error>(Reference {
            inputs,
            last: hidden,
            logp,
        })
    })?;
    progress(Progress::Stage {
        name: "probe",
        total: names.len() as u64,
    });
    let tied = model.config().tie_word_embeddings;
    let h = model.config().hidden_size;
    let mut out = Vec::with_capacity(names.len());
    for (m, name) in names.iter().enumerate() {
        let saved = resume.and_then(|r| r.load_numbers("probe", m, name, 2));
        // As measured below: finite, `lambda ≥ 0` (anything else is measured again).
        let saved = saved
            .filter(|n| n.iter().all(|x| x.is_finite()) && n.get(1).is_some_and(|l| *l >= 0.0));
        if let Some([kl, lambda]) = saved.as_deref() {
            if let Some(r) = resume {
                r.count_reused(1);
            }
            out.push(Sensitivity {
                kl: *kl,
                lambda: *lambda,
            });
            progress(Progress::Step {
                done: m as u64 + 1,
                what: name.as_str(),
            });
            continue;
        }
        let d = &chains[m];
        let (rows, cols) = (d.rows(), d.cols());
        let mut rec = vec![0.0f32; rows * cols];
        for block in d.blocks().take(probe) {
            block.add_to_dense(&mut rec);
        }
        let linear = || -> Result<Arc<dyn Linear>, Error> {
            Ok(Arc::new(DenseLinear::new(rec.clone(), rows, cols)?))
        };
        let kl_sum = |model: &CausalLm, from: Option<usize>| -> Result<f64, Error> {
            let parts: Vec<(f64, usize)> = crate::windows::each_on_one_thread(windows, |i, w| {
                let r = &references[i];
                let mut hidden = match from {
                    Some(l) if l < layers => r.inputs[l].clone(),
                    Some(_) => r.last.clone(),
                    // The embedding table itself is probed: rows of the reconstruction.
                    None => embed_rows(&rec, w, h)?,
                };
                for l in from.unwrap_or(0)..layers {
                    model.forward_layer(l, &mut hidden, w.len(), None)?;
                }
                window_kl(model, &hidden, r)
            })?;
            let kl: f64 = parts.iter().map(|p| p.0).sum();
            let n: usize = parts.iter().map(|p| p.1).sum();
            Ok(kl / n.max(1) as f64)
        };
        let kl = match place_of(name, tied)? {
            Place::Linear(layer, slot) => {
                let previous = model.set_linear(layer, slot, linear()?)?;
                let kl = kl_sum(&model, Some(layer));
                model.set_linear(layer, slot, previous)?;
                kl?
            }
            Place::Head => {
                let previous = model.set_lm_head(linear()?)?;
                let kl = kl_sum(&model, Some(layers));
                model.set_lm_head(previous)?;
                kl?
            }
            Place::Embed { tied: true } => {
                let previous = model.set_lm_head(linear()?)?;
                let kl = kl_sum(&model, None);
                model.set_lm_head(previous)?;
                kl?
            }
            Place::Embed { tied: false } => kl_sum(&model, None)?,
        };
        let err = d.sq_err[probe - 1];
        let lambda = if err > 0.0 { kl.max(0.0) / err } else { 0.0 };
        if let Some(r) = resume {
            r.save_numbers("probe", m, name, &[kl, lambda])?;
        }
        out.push(Sensitivity { kl, lambda });
        progress(Progress::Step {
            done: m as u64 + 1,
            what: name.as_str(),
        });
    }
    Ok(out)
}

/// The stack: plane 0 of every matrix (in matrix order), then every other plane by
/// `λ × weighted error removed / bytes`, each matrix's chain replaced by its upper convex
/// hull (runs of planes whose gain per byte would increase are merged), so that merging the
/// chains by gain per byte keeps every chain in order.
pub fn order_by_gain(chains: &[MatrixChain], sensitivities: &[Sensitivity]) -> Vec<StackEntry> {
    let mut order: Vec<StackEntry> = (0..chains.len())
        .map(|m| StackEntry::new(m as u32, 0))
        .collect();
    let mut rest: Vec<(f64, u32, u32)> = Vec::new();
    for (m, (d, s)) in chains.iter().zip(sensitivities).enumerate() {
        // Segments (gain, bytes, first, last) with non-increasing gain per byte.
        let mut segments: Vec<(f64, f64, usize, usize)> = Vec::new();
        for (b, block) in d.blocks().enumerate().skip(1) {
            let gain = s.lambda * (d.sq_err[b - 1] - d.sq_err[b]).max(0.0);
            let bytes = block.stored_bytes().max(1) as f64;
            segments.push((gain, bytes, b, b));
            while segments.len() >= 2 {
                let (g1, b1, f1, _) = segments[segments.len() - 2];
                let (g2, b2, _, l2) = segments[segments.len() - 1];
                if g1 / b1 < g2 / b2 {
                    segments.truncate(segments.len() - 2);
                    segments.push((g1 + g2, b1 + b2, f1, l2));
                } else {
                    break;
                }
            }
        }
        for (gain, bytes, first, last) in segments {
            for b in first..=last {
                rest.push((gain / bytes, m as u32, b as u32));
            }
        }
    }
    rest.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    order.extend(rest.into_iter().map(|(_, m, b)| StackEntry::new(m, b)));
    order
}

/// The rows of embedding table `table` (`vocab × h`, row-major) for the tokens of `window`.
fn embed_rows(table: &[f32], window: &[u32], h: usize) -> Result<Vec<f32>, Error> {
    let mut x = Vec::with_capacity(window.len() * h);
    for &tok in window {
        let i = tok as usize;
        let row = table
            .get(i * h..(i + 1) * h)
            .ok_or_else(|| Error::Usage(format!("token {tok} outside the embedding table")))?;
        x.extend_from_slice(row);
    }
    Ok(x)
}

/// Where a stacked matrix sits in the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Linear(usize, LinearSlot),
    Head,
    /// The embedding table (and the lm_head too when `tied`).
    Embed {
        tied: bool,
    },
}

fn place_of(name: &str, tied: bool) -> Result<Place, Error> {
    if let Some((layer, slot)) = LinearSlot::parse_weight_name(name) {
        Ok(Place::Linear(layer, slot))
    } else if name == HEAD {
        Ok(Place::Head)
    } else if name == EMBED {
        Ok(Place::Embed { tied })
    } else {
        Err(Error::Unsupported(format!(
            "{name}: best mode stacks decoder linears, the embedding table and lm_head only"
        )))
    }
}

/// The paper's level-synchronous perplexity scorer, on plane chains (embedding table and
/// lm_head included): at level `L` every matrix holds `L` planes and a candidate gets its
/// plane `L`. Hidden states before each layer are computed once per level.
pub struct PlanePerplexityScorer<'a> {
    model: CausalLm,
    places: Vec<Place>,
    chains: &'a [MatrixChain],
    dense: Vec<Vec<f32>>,
    level: u32,
    windows: &'a [Vec<u32>],
    progress: &'a (dyn Fn(Progress<'_>) + Sync),
    done: u64,
}

impl<'a> PlanePerplexityScorer<'a> {
    /// A scorer over `windows` for the plane chains of `names` in `model` (the
    /// re-parametrised model the planes were computed from).
    pub fn new(
        model: CausalLm,
        names: &[String],
        chains: &'a [MatrixChain],
        windows: &'a [Vec<u32>],
        progress: &'a (dyn Fn(Progress<'_>) + Sync),
    ) -> Result<Self, Error> {
        if windows.is_empty() {
            return Err(Error::Usage(
                "no scoring window: the scoring text is shorter than one window".into(),
            ));
        }
        let tied = model.config().tie_word_embeddings;
        let places = names
            .iter()
            .map(|n| place_of(n, tied))
            .collect::<Result<Vec<_>, _>>()?;
        let dense = chains
            .iter()
            .map(|d| vec![0.0; d.rows() * d.cols()])
            .collect();
        let total: u64 = chains
            .iter()
            .map(|d| d.len().saturating_sub(1) as u64)
            .sum();
        progress(Progress::Stage {
            name: "order",
            total,
        });
        Ok(Self {
            model,
            places,
            chains,
            dense,
            level: 0,
            windows,
            progress,
            done: 0,
        })
    }

    fn linear(&self, m: usize, w: Vec<f32>) -> Result<Arc<dyn Linear>, Error> {
        let c = &self.chains[m];
        Ok(Arc::new(DenseLinear::new(w, c.rows(), c.cols())?))
    }

    /// Puts `w` in place of matrix `m`; returns what it replaced (for the lm_head part).
    fn install(&mut self, m: usize, w: Vec<f32>) -> Result<Option<Arc<dyn Linear>>, Error> {
        Ok(match self.places[m] {
            Place::Linear(layer, slot) => {
                Some(self.model.set_linear(layer, slot, self.linear(m, w)?)?)
            }
            Place::Head | Place::Embed { tied: true } => {
                Some(self.model.set_lm_head(self.linear(m, w)?)?)
            }
            Place::Embed { tied: false } => None,
        })
    }

    fn restore(&mut self, m: usize, previous: Option<Arc<dyn Linear>>) -> Result<(), Error> {
        match (self.places[m], previous) {
            (Place::Linear(layer, slot), Some(p)) => {
                self.model.set_linear(layer, slot, p)?;
            }
            (Place::Head | Place::Embed { tied: true }, Some(p)) => {
                self.model.set_lm_head(p)?;
            }
            _ => {}
        }
        Ok(())
    }

    fn embed_index(&self) -> Option<usize> {
        self.places
            .iter()
            .position(|p| matches!(p, Place::Embed { .. }))
    }

    /// The hidden states entering layer 0 with embedding table `table` (or the model's own).
    fn embedded(&self, window: &[u32], table: Option<&[f32]>) -> Result<Vec<f32>, Error> {
        match table {
            None => Ok(self.model.embed(window)?),
            Some(t) => embed_rows(t, window, self.model.config().hidden_size),
        }
    }

    /// Hidden states entering each layer, per window, at the current level.
    fn layer_inputs(&self) -> Result<Vec<Vec<Vec<f32>>>, Error> {
        let table = self.embed_index().map(|e| self.dense[e].as_slice());
        crate::windows::each_on_one_thread(self.windows, |_, w| {
            let mut hidden = self.embedded(w, table)?;
            let layers = self.model.num_layers();
            let mut inputs = Vec::with_capacity(layers + 1);
            for l in 0..layers {
                inputs.push(hidden.clone());
                self.model.forward_layer(l, &mut hidden, w.len(), None)?;
            }
            inputs.push(hidden);
            Ok(inputs)
        })
    }

    /// Perplexity from the cached inputs of `layer` (`num_layers` = the last hidden state),
    /// or from the embedding `table` when given.
    fn perplexity(
        &self,
        inputs: &[Vec<Vec<f32>>],
        layer: usize,
        table: Option<&[f32]>,
    ) -> Result<f64, Error> {
        let parts: Vec<(f64, usize)> = crate::windows::each_on_one_thread(self.windows, |i, w| {
            let cached = &inputs[i];
            let (mut hidden, start) = match table {
                Some(t) => (self.embedded(w, Some(t))?, 0),
                None => (cached[layer].clone(), layer),
            };
            for l in start..self.model.num_layers() {
                self.model.forward_layer(l, &mut hidden, w.len(), None)?;
            }
            Ok::<_, Error>((
                self.model.hidden_nll(&hidden, w)?,
                w.len().saturating_sub(1),
            ))
        })?;
        let nll: f64 = parts.iter().map(|p| p.0).sum();
        let n: usize = parts.iter().map(|p| p.1).sum();
        Ok((nll / n.max(1) as f64).exp())
    }
}

impl bitstack_order::BlockScorer for PlanePerplexityScorer<'_> {
    fn score_level(
        &mut self,
        level: u32,
        candidates: &[u32],
    ) -> Result<Vec<f64>, bitstack_order::ScoreError> {
        while self.level < level {
            for (m, d) in self.chains.iter().enumerate() {
                if let Some(b) = d.block(self.level as usize) {
                    b.add_to_dense(&mut self.dense[m]);
                }
            }
            self.level += 1;
        }
        for m in 0..self.dense.len() {
            self.install(m, self.dense[m].clone())?;
        }
        let inputs = self.layer_inputs()?;
        let layers = self.model.num_layers();
        let mut scores = Vec::with_capacity(candidates.len());
        for &m in candidates {
            let m = m as usize;
            let mut next = self.dense[m].clone();
            self.chains[m]
                .block(level as usize)
                .ok_or("candidate without a next block")?
                .add_to_dense(&mut next);
            let ppl = match self.places[m] {
                Place::Linear(layer, _) => {
                    let previous = self.install(m, next)?;
                    let ppl = self.perplexity(&inputs, layer, None);
                    self.restore(m, previous)?;
                    ppl?
                }
                Place::Head => {
                    let previous = self.install(m, next)?;
                    let ppl = self.perplexity(&inputs, layers, None);
                    self.restore(m, previous)?;
                    ppl?
                }
                Place::Embed { .. } => {
                    let previous = self.install(m, next.clone())?;
                    let ppl = self.perplexity(&inputs, 0, Some(&next));
                    self.restore(m, previous)?;
                    ppl?
                }
            };
            scores.push(ppl);
            self.done += 1;
            (self.progress)(Progress::Step {
                done: self.done,
                what: "candidate",
            });
        }
        Ok(scores)
    }
}

/// Plane by plane: every matrix's plane 0, then every matrix's plane 1, ...
pub fn order_by_levels(chains: &[MatrixChain]) -> Vec<StackEntry> {
    let depth = chains.iter().map(MatrixChain::len).max().unwrap_or(0);
    (0..depth)
        .flat_map(|b| {
            chains
                .iter()
                .enumerate()
                .filter(move |(_, d)| b < d.len())
                .map(move |(m, _)| StackEntry::new(m as u32, b as u32))
        })
        .collect()
}

/// Appends plane `block` of matrix `matrix` (block `index` of its chain) to the stack being
/// written, as the container's `planes` kind: packed signs, plus the grid (`mid`, `half`, f16
/// `rows × groups`) on plane 0.
pub fn push_plane_block(
    writer: &mut ContainerWriter,
    matrix: usize,
    index: usize,
    block: &PlaneBlock,
) -> Result<(), bitstack_format::FormatError> {
    let grid = block.grid();
    let (rows, groups) = (grid.rows(), grid.groups());
    let halves = |h: &[half::f16]| h.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let signs = block.signs().row_major_bytes().into_owned();
    let mut parts = vec![PartData::new("signs", Dtype::U8, vec![signs.len()], signs)];
    if block.plane() == 0 {
        parts.push(PartData::new(
            "mid",
            Dtype::F16,
            vec![rows, groups],
            halves(grid.mid()),
        ));
        parts.push(PartData::new(
            "half",
            Dtype::F16,
            vec![rows, groups],
            halves(grid.half()),
        ));
    }
    writer.push_block(
        matrix,
        index,
        "planes",
        BTreeMap::from([
            ("group".to_string(), grid.group() as i64),
            ("plane".to_string(), block.plane() as i64),
        ]),
        parts,
    )?;
    Ok(())
}
