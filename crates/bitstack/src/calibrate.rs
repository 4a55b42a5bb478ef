//! The paper's calibrated pipeline (ALGORITHM.md §1 and §3): activation statistics folded
//! into the weights, and the level-synchronous perplexity scorer.

use std::sync::Arc;

use bitstack_model::{
    CausalLm, DenseLinear, LayerRun, LinearSlot, ModelConfig, ModelError, Site, TensorSource,
};
use bitstack_order::{BlockScorer, ScoreError};

use crate::checkpoint::{from_f32, to_f32, Checkpoint, SourceDtype};
use crate::compress::{Decomposed, Progress, Reparametrisation};
use crate::decompose::AvdBlock;
use crate::resume::Checkpointer;
use crate::Error;

/// Per layer, per site (in [`Site::ALL`] order): `s_j = mean over windows of the L2 norm over
/// positions of x[:, j]`, plus 1e-3 (ALGORITHM.md §1).
pub fn activation_scales(
    model: &CausalLm,
    windows: &[&[u32]],
    progress: &(dyn Fn(Progress<'_>) + Sync),
) -> Result<Vec<[Vec<f32>; 4]>, Error> {
    if windows.is_empty() {
        return Err(Error::Usage(
            "no calibration window: the calibration text is shorter than one window".into(),
        ));
    }
    let layers = model.num_layers();
    let mut sums: Vec<[Vec<f64>; 4]> = (0..layers).map(|_| Default::default()).collect();
    progress(Progress::Stage {
        name: "calibrate",
        total: windows.len() as u64,
    });
    for (done, window) in windows.iter().enumerate() {
        let mut squares: Vec<[Vec<f64>; 4]> = (0..layers).map(|_| Default::default()).collect();
        let mut observe = |layer: usize, site: Site, x: &[f32], tokens: usize| {
            let slot = &mut squares[layer][site_index(site)];
            let width = x.len() / tokens.max(1);
            if slot.len() != width {
                *slot = vec![0.0; width];
            }
            for row in x.chunks_exact(width) {
                for (acc, &v) in slot.iter_mut().zip(row) {
                    *acc += f64::from(v) * f64::from(v);
                }
            }
        };
        model.forward_hidden(window, Some(&mut observe))?;
        for (layer, per_site) in squares.into_iter().enumerate() {
            for (site, sq) in per_site.into_iter().enumerate() {
                let acc = &mut sums[layer][site];
                if acc.len() != sq.len() {
                    *acc = vec![0.0; sq.len()];
                }
                acc.iter_mut().zip(sq).for_each(|(a, s)| *a += s.sqrt());
            }
        }
        progress(Progress::Step {
            done: done as u64 + 1,
            what: "window",
        });
    }
    let n = windows.len() as f64;
    Ok(sums
        .into_iter()
        .map(|per_site| per_site.map(|acc| acc.iter().map(|s| (s / n + 1e-3) as f32).collect()))
        .collect())
}

fn site_index(site: Site) -> usize {
    Site::ALL.iter().position(|s| *s == site).unwrap_or(0)
}

/// Folds activation scales into the weights exactly as ALGORITHM.md §1, including the
/// grouped-query-attention exception (o_proj is scaled only if v_proj and o_proj have the same
/// shape).
pub fn scaling_reparametrisation(
    checkpoint: &Checkpoint,
    scales: &[[Vec<f32>; 4]],
) -> Result<Reparametrisation, Error> {
    let mut r = Reparametrisation::default();
    let mut add_cols = |name: String, s: &[f32]| {
        r.column_scales.insert(name, s.to_vec());
    };
    for (l, per_site) in scales.iter().enumerate() {
        let [attn, o_in, mlp, down_in] = per_site;
        for slot in [LinearSlot::QProj, LinearSlot::KProj, LinearSlot::VProj] {
            add_cols(slot.weight_name(l), attn);
        }
        for slot in [LinearSlot::GateProj, LinearSlot::UpProj] {
            add_cols(slot.weight_name(l), mlp);
        }
        add_cols(LinearSlot::DownProj.weight_name(l), down_in);
        let v_shape = &checkpoint.info(&LinearSlot::VProj.weight_name(l))?.shape;
        let o_shape = &checkpoint.info(&LinearSlot::OProj.weight_name(l))?.shape;
        if v_shape == o_shape {
            add_cols(LinearSlot::OProj.weight_name(l), o_in);
        }
        r.vector_divisors.insert(
            format!("model.layers.{l}.input_layernorm.weight"),
            attn.clone(),
        );
        r.vector_divisors.insert(
            format!("model.layers.{l}.post_attention_layernorm.weight"),
            mlp.clone(),
        );
        if v_shape == o_shape {
            r.row_divisors
                .insert(LinearSlot::VProj.weight_name(l), o_in.clone());
            let bias = LinearSlot::VProj.bias_name(l);
            if checkpoint.tensors().contains_key(&bias) {
                r.vector_divisors.insert(bias, o_in.clone());
            }
        }
        r.row_divisors
            .insert(LinearSlot::UpProj.weight_name(l), down_in.clone());
        let bias = LinearSlot::UpProj.bias_name(l);
        if checkpoint.tensors().contains_key(&bias) {
            r.vector_divisors.insert(bias, down_in.clone());
        }
    }
    Ok(r)
}

/// The checkpoint after a re-parametrisation, each tensor rounded to the dtype the container
/// stores it in (so that a model built from it is the one the runtime will load).
pub struct ReparametrisedSource<'a> {
    /// The checkpoint.
    pub checkpoint: &'a Checkpoint,
    /// The re-parametrisation.
    pub reparametrisation: &'a Reparametrisation,
}

impl TensorSource for ReparametrisedSource<'_> {
    fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
        let info = self
            .checkpoint
            .info(name)
            .map_err(|_| ModelError::MissingTensor {
                name: name.to_string(),
            })?;
        let values = self
            .reparametrisation
            .load(self.checkpoint, name)
            .map_err(|e| ModelError::InvalidArgument(e.to_string()))?;
        let stored = if name.ends_with(".bias") {
            values
        } else {
            let dtype = match info.dtype {
                SourceDtype::BF16 => SourceDtype::BF16,
                _ => SourceDtype::F16,
            };
            to_f32(dtype, &from_f32(dtype, &values))
        };
        Ok((info.shape.clone(), stored))
    }

    fn contains(&self, name: &str) -> bool {
        self.checkpoint.tensors().contains_key(name)
    }

    fn names(&self) -> Vec<String> {
        self.checkpoint.tensors().keys().cloned().collect()
    }
}

/// (layer, slot) of each decomposed matrix, for a perplexity scorer over `windows`: an error
/// for no window, or for a matrix that is not a decoder linear.
fn scoring_places(
    decomposed: &Decomposed,
    windows: &[Vec<u32>],
) -> Result<Vec<(usize, LinearSlot)>, Error> {
    if windows.is_empty() {
        return Err(Error::Usage(
            "no scoring window: the scoring text is shorter than one window".into(),
        ));
    }
    decomposed
        .names
        .iter()
        .map(|n| {
            LinearSlot::parse_weight_name(n).ok_or_else(|| {
                Error::Unsupported(format!(
                    "{n} is not a decoder linear: the perplexity scorer orders only decoder \
                     linears (use --no-calibration with --include)"
                ))
            })
        })
        .collect()
}

/// The paper's scorer (ALGORITHM.md §3): the perplexity on the scoring windows when one
/// matrix gets its next block while every other matrix holds `level` blocks.
///
/// Work is reused: the hidden states entering each layer are computed once per level, so a
/// candidate in layer `L` runs only layers `L..` (and the head); each matrix is rebuilt once
/// per level.
pub struct PerplexityScorer<'a> {
    model: CausalLm,
    decomposed: &'a Decomposed,
    /// (layer, slot) of each stacked matrix.
    places: Vec<(usize, LinearSlot)>,
    /// Reconstruction of each matrix at the current level, shared with `model` (`None`
    /// before the first level is installed: zeros).
    dense: Vec<Option<Arc<DenseLinear>>>,
    level: u32,
    /// Whether `dense` is installed in `model` (which starts with the original matrices).
    installed: bool,
    windows: Vec<Vec<u32>>,
    progress: &'a (dyn Fn(Progress<'_>) + Sync),
    done: u64,
}

impl<'a> PerplexityScorer<'a> {
    /// A scorer over `windows` for the decomposed matrices of `model` (which must be the
    /// re-parametrised model the matrices were decomposed from).
    pub fn new(
        model: CausalLm,
        decomposed: &'a Decomposed,
        windows: Vec<Vec<u32>>,
        progress: &'a (dyn Fn(Progress<'_>) + Sync),
    ) -> Result<Self, Error> {
        let places = scoring_places(decomposed, &windows)?;
        let dense = vec![None; decomposed.shapes.len()];
        Ok(Self {
            model,
            decomposed,
            places,
            dense,
            level: 0,
            installed: false,
            windows,
            progress,
            done: 0,
        })
    }

    fn dense_linear(&self, m: usize, weight: Vec<f32>) -> Result<Arc<DenseLinear>, ModelError> {
        let (r, c) = self.decomposed.shapes[m];
        Ok(Arc::new(DenseLinear::new(weight, r, c)?))
    }

    /// A copy of matrix `m`'s reconstruction at the current level (zeros at level 0).
    fn current_weight(&self, m: usize) -> Vec<f32> {
        match &self.dense[m] {
            Some(linear) => linear.weight().to_vec(),
            None => {
                let (r, c) = self.decomposed.shapes[m];
                vec![0.0; r * c]
            }
        }
    }

    /// Brings every matrix to `level` blocks (never back) and installs the reconstructions
    /// in the model, which shares them: one f32 copy of the stacked matrices in all.
    fn advance_to(&mut self, level: u32) -> Result<(), Error> {
        let (from, to) = (self.level as usize, level.max(self.level) as usize);
        if self.installed && from == to {
            return Ok(());
        }
        for m in 0..self.dense.len() {
            let mut weight = self.current_weight(m);
            for b in from..to.min(self.decomposed.block_count(m)) {
                self.decomposed.block(m, b)?.add_to_dense(&mut weight);
            }
            let linear = self.dense_linear(m, weight)?;
            let (layer, slot) = self.places[m];
            self.model.set_linear(layer, slot, linear.clone())?;
            self.dense[m] = Some(linear);
        }
        self.level = to as u32;
        self.installed = true;
        Ok(())
    }

    /// Every window's run of `layer` from `inputs` (windows in parallel, one per thread), with
    /// what the layer's linears computed kept for the candidates of that layer.
    fn run_layer(&self, layer: usize, inputs: &[Vec<f32>]) -> Result<Vec<LayerRun>, ModelError> {
        crate::windows::each_on_one_thread(inputs, |w, input| {
            self.model
                .forward_layer_keeping(layer, input.clone(), self.windows[w].len())
        })
    }

    /// Perplexity on the scoring windows with the linear at `slot` of `runs`' layer changed
    /// since the runs were made: each window's layer is run again from that linear on, then
    /// the later layers and the head (windows in parallel, one per thread).
    fn perplexity_from(&self, slot: LinearSlot, runs: &[LayerRun]) -> Result<f64, ModelError> {
        let parts: Vec<(f64, usize)> = crate::windows::each_on_one_thread(runs, |w, run| {
            let window = &self.windows[w];
            let mut hidden = Vec::new();
            self.model.forward_layer_from(slot, run, &mut hidden)?;
            for l in run.layer() + 1..self.model.num_layers() {
                self.model
                    .forward_layer(l, &mut hidden, window.len(), None)?;
            }
            Ok::<_, ModelError>((
                self.model.hidden_nll(&hidden, window)?,
                window.len().saturating_sub(1),
            ))
        })?;
        let nll: f64 = parts.iter().map(|p| p.0).sum();
        let count: usize = parts.iter().map(|p| p.1).sum();
        Ok((nll / count.max(1) as f64).exp())
    }
}

impl BlockScorer for PerplexityScorer<'_> {
    fn score_level(&mut self, level: u32, candidates: &[u32]) -> Result<Vec<f64>, ScoreError> {
        self.advance_to(level)?;
        // The candidates of each layer (positions in `candidates`).
        let layers = self.model.num_layers();
        let mut by_layer = vec![Vec::new(); layers];
        for (i, &m) in candidates.iter().enumerate() {
            let m = m as usize;
            if m >= self.places.len() || level as usize >= self.decomposed.block_count(m) {
                return Err(format!("candidate {m} without a next block").into());
            }
            by_layer[self.places[m].0].push(i);
        }
        let Some(last) = by_layer.iter().rposition(|c| !c.is_empty()) else {
            return Ok(Vec::new());
        };
        let mut scores = vec![f64::NAN; candidates.len()];
        // Layer by layer: every window's run of the layer at this level (kept, for the
        // layer's candidates to start from their own linear), then its output is the next
        // layer's input. Only one layer's runs are held at a time.
        let mut inputs: Vec<Vec<f32>> =
            crate::windows::each_on_one_thread(&self.windows, |_, window| {
                self.model.embed(window)
            })?;
        for (layer, members) in by_layer.iter().enumerate().take(last + 1) {
            // The runs keep their own copies of the inputs.
            let runs = self.run_layer(layer, &std::mem::take(&mut inputs))?;
            for &i in members {
                let m = candidates[i] as usize;
                let slot = self.places[m].1;
                let mut next = self.current_weight(m);
                self.decomposed
                    .block(m, level as usize)?
                    .add_to_dense(&mut next);
                let previous = self
                    .model
                    .set_linear(layer, slot, self.dense_linear(m, next)?)?;
                let ppl = self.perplexity_from(slot, &runs);
                self.model.set_linear(layer, slot, previous)?;
                scores[i] = ppl?;
                self.done += 1;
                (self.progress)(Progress::Step {
                    done: self.done,
                    what: self.decomposed.names[m].as_str(),
                });
            }
            inputs = runs.into_iter().map(LayerRun::into_output).collect();
        }
        Ok(scores)
    }
}

/// The straightforward implementation of the paper's scorer, the baseline that
/// [`PerplexityScorer`] is measured against (`bitstack bench --only scorer`, the criterion
/// bench `model`): for every candidate, every matrix is rebuilt from its blocks (`level`
/// blocks, the candidate `level + 1`) and the whole model is run on each window in turn. Its
/// products run on the rayon pool it is called from (a one-thread pool: no parallelism at
/// all).
///
/// It computes what [`PerplexityScorer`] computes, with the same kernels, so the two give the
/// same scores; none of the work is reused between candidates.
pub struct StraightforwardScorer {
    model: CausalLm,
    /// (layer, slot) and shape of each stacked matrix.
    places: Vec<(usize, LinearSlot)>,
    shapes: Vec<(usize, usize)>,
    /// The first blocks of each matrix, read once (a straightforward implementation holds
    /// its blocks in memory).
    blocks: Vec<Vec<AvdBlock>>,
    windows: Vec<Vec<u32>>,
}

impl StraightforwardScorer {
    /// A scorer over `windows` for the decomposed matrices of `model`, able to score levels
    /// up to `max_level` (each matrix's first `max_level + 1` blocks are read into memory).
    pub fn new(
        model: CausalLm,
        decomposed: &Decomposed,
        windows: Vec<Vec<u32>>,
        max_level: u32,
    ) -> Result<Self, Error> {
        let places = scoring_places(decomposed, &windows)?;
        let blocks = (0..decomposed.names.len())
            .map(|m| {
                let count = decomposed.block_count(m).min(max_level as usize + 1);
                (0..count).map(|b| decomposed.block(m, b)).collect()
            })
            .collect::<Result<Vec<Vec<_>>, _>>()?;
        Ok(Self {
            model,
            places,
            shapes: decomposed.shapes.clone(),
            blocks,
            windows,
        })
    }
}

impl BlockScorer for StraightforwardScorer {
    fn score_level(&mut self, level: u32, candidates: &[u32]) -> Result<Vec<f64>, ScoreError> {
        let level = level as usize;
        let mut scores = Vec::with_capacity(candidates.len());
        for &c in candidates {
            let c = c as usize;
            if self.blocks.get(c).is_none_or(|b| b.len() <= level) {
                return Err(format!("candidate {c} without a next block in memory").into());
            }
            for (m, blocks) in self.blocks.iter().enumerate() {
                let (rows, cols) = self.shapes[m];
                let count = (level + usize::from(m == c)).min(blocks.len());
                let mut weight = vec![0.0f32; rows * cols];
                for block in &blocks[..count] {
                    block.add_to_dense(&mut weight);
                }
                let (layer, slot) = self.places[m];
                let linear = Arc::new(DenseLinear::new(weight, rows, cols)?);
                self.model.set_linear(layer, slot, linear)?;
            }
            let (mut nll, mut count) = (0.0, 0usize);
            for window in &self.windows {
                nll += self.model.window_nll(window)?;
                count += window.len().saturating_sub(1);
            }
            scores.push((nll / count.max(1) as f64).exp());
        }
        Ok(scores)
    }
}

/// Where the calibration and scoring windows come from (ALGORITHM.md §1, §3, §5).
#[derive(Debug, Clone)]
pub struct CalibrationOptions {
    /// Text for activation statistics.
    pub calib_text: std::path::PathBuf,
    /// Number of calibration windows (reference: 128).
    pub calib_windows: usize,
    /// Text for block scoring.
    pub score_text: std::path::PathBuf,
    /// Number of scoring windows (reference: 32).
    pub score_windows: usize,
    /// Window length in tokens (reference: 512).
    pub seq: usize,
}

/// Token windows of a text.
pub type Windows = Vec<Vec<u32>>;

impl CalibrationOptions {
    /// Checks the window counts and length against the model before any work: at least one
    /// calibration and one scoring window, and windows of 2 tokens or more (a window
    /// predicts its tokens after the first) that fit the model's context
    /// (`max_position_embeddings`: past it the positions were never trained, and the
    /// statistics and scores would describe a model that is not run).
    pub fn check(&self, config: &ModelConfig) -> Result<(), Error> {
        if self.calib_windows == 0 || self.score_windows == 0 {
            let what = if self.calib_windows == 0 {
                "calib"
            } else {
                "score"
            };
            return Err(Error::Usage(format!(
                "--{what}-windows 0: at least one window is needed"
            )));
        }
        check_window_length(self.seq, config.max_position_embeddings)
    }

    /// The calibration and scoring windows (tokenized; an error names a text too short).
    pub fn windows(
        &self,
        tokenizer: &bitstack_model::TextTokenizer,
    ) -> Result<(Windows, Windows), Error> {
        let calib = read_windows(
            tokenizer,
            &self.calib_text,
            self.seq,
            self.calib_windows,
            "calibration",
        )?;
        let score = read_windows(
            tokenizer,
            &self.score_text,
            self.seq,
            self.score_windows,
            "scoring",
        )?;
        Ok((calib, score))
    }
}

/// Checks that windows of `seq` tokens can be evaluated by a model whose context is
/// `context` tokens (`max_position_embeddings`): at least 2 tokens (a window predicts each
/// token after the first), at most `context` (past it the positions were never trained).
pub fn check_window_length(seq: usize, context: usize) -> Result<(), Error> {
    if seq < 2 {
        return Err(Error::Usage(format!(
            "--seq {seq}: a window needs at least 2 tokens (it predicts each token after the \
             first)"
        )));
    }
    if seq > context {
        return Err(Error::Usage(format!(
            "--seq {seq} is longer than the model's context of {context} tokens \
             (max_position_embeddings in config.json): use --seq {context} or less"
        )));
    }
    Ok(())
}

/// Reads the `what` text (e.g. "calibration") at `path`; a file that is not UTF-8 (a binary
/// file given by mistake, or text in another encoding) is an error naming the first bad
/// byte.
pub fn read_text(path: &std::path::Path, what: &str) -> Result<String, Error> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    String::from_utf8(bytes).map_err(|e| {
        Error::Usage(format!(
            "{}: the {what} text is not UTF-8 (the byte at offset {} of {} is not valid \
             UTF-8); give a plain-text file in UTF-8",
            path.display(),
            e.utf8_error().valid_up_to(),
            e.as_bytes().len()
        ))
    })
}

fn read_windows(
    tokenizer: &bitstack_model::TextTokenizer,
    path: &std::path::Path,
    seq: usize,
    count: usize,
    what: &str,
) -> Result<Vec<Vec<u32>>, Error> {
    let text = read_text(path, what)?;
    let ids = tokenizer.encode(&text)?;
    let windows: Vec<Vec<u32>> = bitstack_model::windows(&ids, seq, Some(count))
        .into_iter()
        .map(<[u32]>::to_vec)
        .collect();
    if windows.len() < count {
        return Err(Error::Usage(format!(
            "{}: {} tokens give only {} {what} windows of {seq} tokens, {count} requested \
             (use a longer text or fewer windows)",
            path.display(),
            ids.len(),
            windows.len()
        )));
    }
    Ok(windows)
}

/// The paper's full pipeline: activation-aware scaling from calibration windows, AVD of the
/// scaled weights, level-synchronous ordering by perplexity on scoring windows.
pub fn compress_calibrated(
    model_dir: &std::path::Path,
    out: &std::path::Path,
    options: &crate::CompressOptions,
    calibration: &CalibrationOptions,
    progress: &(dyn Fn(Progress<'_>) + Sync),
) -> Result<crate::CompressSummary, Error> {
    use std::time::Instant;
    let checkpoint = Checkpoint::open(model_dir)?;
    let architecture = crate::compress::read_architecture(&checkpoint)?;
    let names =
        crate::select::select_matrices(&checkpoint, architecture.as_deref(), &options.include)?;
    crate::compress::check_decomposition(
        &checkpoint,
        &names,
        &options.avd,
        rayon::current_num_threads(),
        crate::compress::available_memory(),
    )?;
    let config = ModelConfig::from_file(model_dir.join("config.json"))?;
    calibration.check(&config)?;
    let tokenizer = bitstack_model::TextTokenizer::from_model_dir(model_dir)?;
    let mut stages = Vec::new();
    // The texts are read (and their errors reported) before any progress is saved.
    let (calib, score) = calibration.windows(&tokenizer)?;
    let run = crate::compress::run_description(
        &checkpoint,
        &names,
        options,
        serde_json::json!({
            "calib_text": text_identity(&calibration.calib_text),
            "calib_windows": calibration.calib_windows,
            "score_text": text_identity(&calibration.score_text),
            "score_windows": calibration.score_windows,
            "seq": calibration.seq,
        }),
    )?;
    let resume = Checkpointer::open(out, options.checkpointing, &run)?;

    let t = Instant::now();
    let saved = resume.as_ref().and_then(|r| {
        let scales = unflatten_scales(r.load_vectors("scales")?, &config)?;
        r.count_reused(1);
        Some(scales)
    });
    let scales = match saved {
        Some(scales) => scales,
        None => {
            let original = CausalLm::load(model_dir)?;
            let refs: Vec<&[u32]> = calib.iter().map(Vec::as_slice).collect();
            let scales = activation_scales(&original, &refs, progress)?;
            if let Some(r) = &resume {
                let flat: Vec<Vec<f32>> = scales.iter().flat_map(|s| s.iter().cloned()).collect();
                r.save_vectors("scales", &flat)?;
            }
            scales
        }
    };
    let mut options = options.clone();
    options.reparametrisation = scaling_reparametrisation(&checkpoint, &scales)?;
    stages.push(("calibrate".to_string(), t.elapsed()));

    let t = Instant::now();
    let decomposed = crate::compress::decompose_checkpoint(
        &checkpoint,
        &names,
        &options,
        resume.as_ref(),
        crate::compress::work_dir_of(out),
        progress,
    )?;
    stages.push(("decompose".to_string(), t.elapsed()));

    let t = Instant::now();
    let source = ReparametrisedSource {
        checkpoint: &checkpoint,
        reparametrisation: &options.reparametrisation,
    };
    let scaled = CausalLm::from_source(config, &source, &mut |_, _| Ok(None))?;
    let mut scorer = PerplexityScorer::new(scaled, &decomposed, score, progress)?;
    let order = match &resume {
        Some(r) => {
            let mut checkpointed = crate::compress::CheckpointedScorer {
                inner: &mut scorer,
                resume: r,
            };
            crate::compress::order_blocks(&decomposed, &mut checkpointed, progress)?
        }
        None => crate::compress::order_blocks(&decomposed, &mut scorer, progress)?,
    };
    drop(scorer);
    stages.push(("score".to_string(), t.elapsed()));

    options.extra_metadata.insert(
        "calibration".into(),
        serde_json::json!({
            "calib_text": calibration.calib_text.file_name().map(|n| n.to_string_lossy().to_string()),
            "calib_windows": calibration.calib_windows,
            "score_text": calibration.score_text.file_name().map(|n| n.to_string_lossy().to_string()),
            "score_windows": calibration.score_windows,
            "seq": calibration.seq,
        }),
    );
    crate::compress::finish(
        &checkpoint,
        architecture,
        decomposed,
        &order,
        &options,
        "perplexity",
        out,
        stages,
        resume,
    )
}

/// A text file as it enters the run description: its path and length.
pub(crate) fn text_identity(path: &std::path::Path) -> serde_json::Value {
    let len = std::fs::metadata(path).map(|m| m.len()).ok();
    serde_json::json!([
        std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()),
        len
    ])
}

/// Saved scales (4 vectors per layer) back into per-layer arrays; `None` (they are then
/// recomputed) unless there are 4 for every layer of `config`, each as wide as its site
/// ([`Site::ALL`]: hidden, `q_dim`, hidden, intermediate), every entry finite and positive
/// (as [`activation_scales`] makes them).
pub(crate) fn unflatten_scales(
    flat: Vec<Vec<f32>>,
    config: &ModelConfig,
) -> Option<Vec<[Vec<f32>; 4]>> {
    let widths = [
        config.hidden_size,
        config.q_dim(),
        config.hidden_size,
        config.intermediate_size,
    ];
    let fits = flat.len() == config.num_layers * 4
        && flat
            .iter()
            .zip(widths.iter().cycle())
            .all(|(s, &width)| s.len() == width && s.iter().all(|x| x.is_finite() && *x > 0.0));
    if !fits {
        return None;
    }
    let mut it = flat.into_iter();
    (0..config.num_layers)
        .map(|_| Some([it.next()?, it.next()?, it.next()?, it.next()?]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Saved scales are taken back only in the shape and range `activation_scales` makes.
    #[test]
    fn saved_scales_must_fit_the_model() {
        let config = ModelConfig::from_json_str(
            r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 8,
                "intermediate_size": 12, "num_attention_heads": 2, "num_key_value_heads": 1,
                "head_dim": 6, "num_hidden_layers": 2, "vocab_size": 16}"#,
        )
        .unwrap();
        assert_eq!(config.q_dim(), 12);
        let widths = [8, 12, 8, 12];
        let good: Vec<Vec<f32>> = (0..8)
            .map(|i| vec![1e-3 + i as f32; widths[i % 4]])
            .collect();
        let back = unflatten_scales(good.clone(), &config).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[1][3], good[7]);
        // One layer's worth too few or too many.
        assert!(unflatten_scales(good[..4].to_vec(), &config).is_none());
        let mut more = good.clone();
        more.extend(good[..4].iter().cloned());
        assert!(unflatten_scales(more, &config).is_none());
        // Each site with one entry too few, and entries that are not finite and positive.
        for i in 0..8 {
            let mut short = good.clone();
            short[i].pop();
            assert!(unflatten_scales(short, &config).is_none(), "site {i}");
            for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
                let mut wrong = good.clone();
                wrong[i][0] = bad;
                assert!(unflatten_scales(wrong, &config).is_none(), "{bad} at {i}");
            }
        }
    }
}
