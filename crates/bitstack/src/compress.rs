//! The compression pipeline: checkpoint → (optional reparametrisation) → AVD of every stacked
//! matrix → block ordering → one `.bitstack` container.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bitstack_decompose::{decompose, AvdBlock, AvdParams, Decomposition};
use bitstack_format::{ContainerWriter, Dtype, PartData};
use bitstack_order::{
    build_level_synchronous, BlockScorer, ErrorReductionScorer, StackEntry, StackLayout,
};
use rayon::prelude::*;
use serde_json::json;

use crate::checkpoint::{Checkpoint, SourceDtype};
use crate::resume::{Checkpointer, Checkpointing};
use crate::select::select_matrices;
use crate::Error;

/// Files copied from the checkpoint directory into the container when present.
pub const AUX_FILES: [&str; 4] = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
];

/// An exact re-parametrisation applied to the checkpoint before decomposition
/// (ALGORITHM.md §1): columns of matrices multiplied, rows of matrices and whole vectors
/// divided. The identity by default.
#[derive(Debug, Clone, Default)]
pub struct Reparametrisation {
    /// `W[:, j] *= s[j]` for these matrices.
    pub column_scales: HashMap<String, Vec<f32>>,
    /// `W[i, :] /= s[i]` for these matrices.
    pub row_divisors: HashMap<String, Vec<f32>>,
    /// `t[i] /= s[i]` for these 1-D tensors (norm weights, biases).
    pub vector_divisors: HashMap<String, Vec<f32>>,
}

impl Reparametrisation {
    /// True when nothing is changed.
    pub fn is_identity(&self) -> bool {
        self.column_scales.is_empty()
            && self.row_divisors.is_empty()
            && self.vector_divisors.is_empty()
    }

    /// A tensor of the checkpoint with the re-parametrisation applied, as f32.
    pub fn load(&self, checkpoint: &Checkpoint, name: &str) -> Result<Vec<f32>, Error> {
        let mut values = checkpoint.tensor_f32(name)?;
        let shape = &checkpoint.info(name)?.shape;
        let cols = shape.last().copied().unwrap_or(1).max(1);
        let check = |what: &str, s: &[f32], want: usize| {
            if s.len() == want {
                Ok(())
            } else {
                Err(Error::Checkpoint(format!(
                    "{what} for {name} has {} entries, the tensor {shape:?} needs {want}",
                    s.len()
                )))
            }
        };
        if let Some(s) = self.column_scales.get(name) {
            check("column scale", s, cols)?;
            for row in values.chunks_mut(cols) {
                row.iter_mut().zip(s).for_each(|(w, s)| *w *= s);
            }
        }
        if let Some(s) = self.row_divisors.get(name) {
            check("row divisor", s, values.len() / cols)?;
            for (row, s) in values.chunks_mut(cols).zip(s) {
                row.iter_mut().for_each(|w| *w /= s);
            }
        }
        if let Some(s) = self.vector_divisors.get(name) {
            check("divisor", s, values.len())?;
            values.iter_mut().zip(s).for_each(|(w, s)| *w /= s);
        }
        Ok(values)
    }

    fn touches(&self, name: &str) -> bool {
        self.column_scales.contains_key(name)
            || self.row_divisors.contains_key(name)
            || self.vector_divisors.contains_key(name)
    }
}

/// What the pipeline reports while it works.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Progress<'a> {
    /// A stage starts; `total` units of work follow.
    Stage {
        /// Stage name.
        name: &'a str,
        /// Units of work.
        total: u64,
    },
    /// One more unit of the current stage is done.
    Step {
        /// Units done so far.
        done: u64,
        /// What was finished (e.g. a matrix name).
        what: &'a str,
    },
}

/// Options of [`compress`].
#[derive(Debug, Clone)]
pub struct CompressOptions {
    /// AVD parameters (k, niter, SVD method, seed).
    pub avd: AvdParams,
    /// Globs selecting the tensors to stack; empty = the architecture's decoder linears.
    pub include: Vec<String>,
    /// Re-parametrisation applied before decomposition (identity = none).
    pub reparametrisation: Reparametrisation,
    /// Free-form entries added to the container's metadata (e.g. calibration settings).
    pub extra_metadata: BTreeMap<String, serde_json::Value>,
    /// Checkpointed progress in `<output>.partial/` (see [`crate::resume`]).
    pub checkpointing: Checkpointing,
}

impl Default for CompressOptions {
    fn default() -> Self {
        Self {
            avd: AvdParams {
                k: 16,
                niter: 16,
                ..AvdParams::default()
            },
            include: Vec::new(),
            reparametrisation: Reparametrisation::default(),
            extra_metadata: BTreeMap::new(),
            checkpointing: Checkpointing::Off,
        }
    }
}

/// The decomposed matrices of a checkpoint, before ordering.
#[derive(Debug)]
pub struct Decomposed {
    /// Tensor names, in module order.
    pub names: Vec<String>,
    /// Shapes `(rows, cols)`.
    pub shapes: Vec<(usize, usize)>,
    /// Original dtypes.
    pub dtypes: Vec<SourceDtype>,
    /// `‖W‖²_F` of each (re-parametrised) matrix.
    pub squared_norms: Vec<f64>,
    /// The decompositions.
    pub decompositions: Vec<Decomposition>,
}

impl Decomposed {
    /// Block sizes per matrix.
    pub fn block_bytes(&self) -> Vec<Vec<u64>> {
        self.decompositions
            .iter()
            .map(|d| d.blocks.iter().map(|b| b.stored_bytes()).collect())
            .collect()
    }

    /// `‖W − Ŵ_b‖²_F` for b = 0..=blocks of each matrix.
    pub fn squared_errors(&self) -> Vec<Vec<f64>> {
        self.decompositions
            .iter()
            .zip(&self.squared_norms)
            .map(|(d, &n2)| {
                std::iter::once(n2)
                    .chain(d.rel_err.iter().map(|e| e * e * n2))
                    .collect()
            })
            .collect()
    }

    /// The data-free scorer over these decompositions.
    pub fn error_reduction_scorer(&self) -> Result<ErrorReductionScorer, Error> {
        Ok(ErrorReductionScorer::new(
            self.squared_errors(),
            self.block_bytes(),
        )?)
    }
}

/// Summary of a compression.
#[derive(Debug, Clone)]
pub struct CompressSummary {
    /// Stacked matrices.
    pub matrices: usize,
    /// Blocks written.
    pub blocks: usize,
    /// Smallest loadable memory (fixed part + base blocks).
    pub min_memory_bytes: u64,
    /// Memory of the whole stack.
    pub max_memory_bytes: u64,
    /// Size of the written file.
    pub file_bytes: u64,
    /// Seconds per stage, in order.
    pub stage_seconds: Vec<(String, f64)>,
    /// Mean relative error over matrices after 1..=niter blocks.
    pub mean_rel_err: Vec<f64>,
    /// Units of work (matrices, levels, scales) taken from an interrupted run.
    pub reused: usize,
}

/// Opens a checkpoint and reads `config.json`'s first architecture, if any.
pub fn read_architecture(checkpoint: &Checkpoint) -> Result<Option<String>, Error> {
    let Some(bytes) = checkpoint.read_file("config.json")? else {
        return Ok(None);
    };
    let config: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
        Error::Checkpoint(format!(
            "{}: config.json is not valid JSON: {e}; restore the model's original config.json",
            checkpoint.dir().display()
        ))
    })?;
    Ok(config["architectures"][0].as_str().map(str::to_string))
}

/// Decomposes every selected matrix (in parallel over matrices). With `resume`, matrices
/// finished by an earlier run are read back and each new one is saved when done.
pub fn decompose_checkpoint(
    checkpoint: &Checkpoint,
    names: &[String],
    options: &CompressOptions,
    resume: Option<&Checkpointer>,
    progress: &(dyn Fn(Progress<'_>) + Sync),
) -> Result<Decomposed, Error> {
    progress(Progress::Stage {
        name: "decompose",
        total: names.len() as u64,
    });
    let done = AtomicUsize::new(0);
    let results: Vec<(Decomposition, f64)> = names
        .par_iter()
        .enumerate()
        .map(|(index, name)| {
            let info = checkpoint.info(name)?;
            let (rows, cols) = (info.shape[0], info.shape[1]);
            let saved = resume.and_then(|r| r.load_matrix(index, name, rows, cols));
            let (d, norm2) = match saved {
                Some(saved) => saved,
                None => {
                    let w = options.reparametrisation.load(checkpoint, name)?;
                    let norm2: f64 = w.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
                    let d = decompose(&w, rows, cols, &options.avd, None)
                        .map_err(|e| Error::Decompose(format!("{name} [{rows}, {cols}]: {e}")))?;
                    if let Some(r) = resume {
                        r.save_matrix(index, name, &d, norm2)?;
                    }
                    (d, norm2)
                }
            };
            let n = done.fetch_add(1, Ordering::Relaxed) + 1;
            progress(Progress::Step {
                done: n as u64,
                what: name,
            });
            Ok((d, norm2))
        })
        .collect::<Result<_, Error>>()?;
    let mut shapes = Vec::new();
    let mut dtypes = Vec::new();
    for name in names {
        let info = checkpoint.info(name)?;
        shapes.push((info.shape[0], info.shape[1]));
        dtypes.push(info.dtype);
    }
    let (decompositions, squared_norms) = results.into_iter().unzip();
    Ok(Decomposed {
        names: names.to_vec(),
        shapes,
        dtypes,
        squared_norms,
        decompositions,
    })
}

/// A scorer whose finished levels are saved to (and, on resume, read back from) the
/// progress directory.
pub struct CheckpointedScorer<'a> {
    /// The scorer doing the work.
    pub inner: &'a mut dyn BlockScorer,
    /// Where levels are saved.
    pub resume: &'a Checkpointer,
}

impl BlockScorer for CheckpointedScorer<'_> {
    fn score_level(
        &mut self,
        level: u32,
        candidates: &[u32],
    ) -> Result<Vec<f64>, bitstack_order::ScoreError> {
        if let Some(scores) = self.resume.load_level(level, candidates) {
            return Ok(scores);
        }
        let scores = self.inner.score_level(level, candidates)?;
        self.resume
            .save_level(level, candidates, &scores)
            .map_err(|e| e.to_string())?;
        Ok(scores)
    }
}

/// What identifies a compression run for `--resume`: the model's files (names and sizes),
/// the stacked tensors and every option that changes the output.
pub fn run_description(
    checkpoint: &Checkpoint,
    names: &[String],
    options: &CompressOptions,
    extra: serde_json::Value,
) -> Result<serde_json::Value, Error> {
    let dir = checkpoint.dir();
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().to_string();
        if name.ends_with(".safetensors") || name.ends_with(".json") {
            let len = entry
                .metadata()
                .map_err(|e| Error::io(&entry.path(), e))?
                .len();
            files.insert(name, len);
        }
    }
    Ok(json!({
        "tool": concat!("bitstack ", env!("CARGO_PKG_VERSION")),
        "model": std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf()),
        "files": files,
        "matrices": names,
        "k": options.avd.k,
        "niter": options.avd.niter,
        "svd": format!("{:?}", options.avd.svd),
        "seed": options.avd.seed,
        "include": options.include,
        "threads": rayon::current_num_threads(),
        "extra": extra,
    }))
}

/// Builds the universal stack level by level with `scorer` (ALGORITHM.md §3).
pub fn order_blocks(
    decomposed: &Decomposed,
    scorer: &mut dyn BlockScorer,
    progress: &(dyn Fn(Progress<'_>) + Sync),
) -> Result<Vec<StackEntry>, Error> {
    let counts: Vec<u32> = decomposed
        .decompositions
        .iter()
        .map(|d| d.blocks.len() as u32)
        .collect();
    // One step per candidate evaluation (scorers report their own steps).
    let evaluations: u64 = counts.iter().map(|&c| u64::from(c.saturating_sub(1))).sum();
    progress(Progress::Stage {
        name: "order",
        total: evaluations,
    });
    let mut on_level = |_level: u32, _levels: u32| {};
    let order = build_level_synchronous(&counts, scorer, &mut on_level)?;
    progress(Progress::Step {
        done: evaluations,
        what: "done",
    });
    Ok(order)
}

/// The stored dtype of a fixed tensor: 16-bit as in the checkpoint, f32 sources as f16
/// when every value fits, else bf16 (ALGORITHM.md §4 counts 2 bytes per parameter).
fn stored_dtype(source: SourceDtype, values: &[f32]) -> (Dtype, Vec<u8>) {
    let as_f16 = |v: &[f32]| crate::checkpoint::from_f32(SourceDtype::F16, v);
    match source {
        SourceDtype::F16 => (Dtype::F16, as_f16(values)),
        SourceDtype::BF16 => (
            Dtype::BF16,
            crate::checkpoint::from_f32(SourceDtype::BF16, values),
        ),
        SourceDtype::F32 => {
            if values.iter().all(|v| v.abs() <= 65504.0) {
                (Dtype::F16, as_f16(values))
            } else {
                (
                    Dtype::BF16,
                    crate::checkpoint::from_f32(SourceDtype::BF16, values),
                )
            }
        }
    }
}

/// Adds the aux files and every tensor that is not in `stacked` (as a fixed tensor, with
/// the re-parametrisation applied) to `writer`; returns the fixed tensors' bytes.
pub(crate) fn add_aux_and_fixed(
    writer: &mut ContainerWriter,
    checkpoint: &Checkpoint,
    stacked: &[String],
    options: &CompressOptions,
) -> Result<u64, Error> {
    let mut fixed_bytes = 0u64;
    for file in AUX_FILES {
        if let Some(bytes) = checkpoint.read_file(file)? {
            writer.add_aux_file(file, bytes)?;
        }
    }
    for (name, info) in checkpoint.tensors() {
        if stacked.contains(name) {
            continue;
        }
        let (dtype, bytes) = if name.ends_with(".bias") {
            // Biases are kept in f32, as the reference implementation keeps them (its
            // accounting counts them at 4 bytes: tiny-qwen2's base_bytes).
            let values = options.reparametrisation.load(checkpoint, name)?;
            (
                Dtype::F32,
                crate::checkpoint::from_f32(SourceDtype::F32, &values),
            )
        } else if options.reparametrisation.touches(name) {
            let values = options.reparametrisation.load(checkpoint, name)?;
            stored_dtype(info.dtype, &values)
        } else if info.dtype == SourceDtype::F32 {
            stored_dtype(info.dtype, &checkpoint.tensor_f32(name)?)
        } else {
            let raw = checkpoint.raw(name)?;
            // Check the values once: NaN/Inf in a fixed tensor is as bad as in a matrix.
            checkpoint.tensor_f32(name)?;
            let dtype = if info.dtype == SourceDtype::F16 {
                Dtype::F16
            } else {
                Dtype::BF16
            };
            (dtype, raw.to_vec())
        };
        fixed_bytes += bytes.len() as u64;
        writer.add_fixed(name, dtype, info.shape.clone(), bytes, info.dtype.name())?;
    }
    Ok(fixed_bytes)
}

/// Writes the container: aux files, fixed tensors (every tensor that is not stacked), then
/// the blocks in `order`. Atomic (temporary file + rename).
pub fn write_container(
    checkpoint: &Checkpoint,
    decomposed: Decomposed,
    order: &[StackEntry],
    options: &CompressOptions,
    metadata: BTreeMap<String, serde_json::Value>,
    out: &Path,
) -> Result<StackLayout, Error> {
    let block_bytes = decomposed.block_bytes();
    let mandatory = decomposed.names.len();
    let mut writer = ContainerWriter::new(metadata);
    let fixed_bytes = add_aux_and_fixed(&mut writer, checkpoint, &decomposed.names, options)?;
    for (i, name) in decomposed.names.iter().enumerate() {
        let (rows, cols) = decomposed.shapes[i];
        writer.add_matrix(name, rows, cols, decomposed.dtypes[i].name())?;
    }
    let mut blocks: Vec<Vec<Option<bitstack_decompose::AvdBlock>>> = decomposed
        .decompositions
        .into_iter()
        .map(|d| d.blocks.into_iter().map(Some).collect())
        .collect();
    for entry in order {
        let block = blocks[entry.matrix as usize][entry.block as usize]
            .take()
            .ok_or_else(|| Error::Usage("a block appears twice in the stack".into()))?;
        push_avd_block(
            &mut writer,
            entry.matrix as usize,
            entry.block as usize,
            block,
        )?;
    }
    writer.set_mandatory_blocks(mandatory);
    // The layout is checked before anything is written.
    let layout = StackLayout::new(fixed_bytes, block_bytes, order.to_vec(), mandatory)?;
    writer.write_atomic(out)?;
    Ok(layout)
}

/// Appends an AVD block (block `index` of matrix `matrix`) to the stack being written, in
/// the container's `avd` kind: packed signs, f16 `u` (`rows × k`) and `v` (`k × cols`).
pub fn push_avd_block(
    writer: &mut ContainerWriter,
    matrix: usize,
    index: usize,
    block: AvdBlock,
) -> Result<(), bitstack_format::FormatError> {
    let (rows, cols, k) = (block.rows(), block.cols(), block.k());
    let (signs, u, v, _) = block.into_parts();
    let halves = |h: Vec<half::f16>| h.iter().flat_map(|x| x.to_le_bytes()).collect();
    writer.push_block(
        matrix,
        index,
        "avd",
        BTreeMap::from([("k".to_string(), k as i64)]),
        vec![
            PartData::new(
                "signs",
                Dtype::U8,
                vec![signs.as_bytes().len()],
                signs.into_bytes(),
            ),
            PartData::new("u", Dtype::F16, vec![rows, k], halves(u)),
            PartData::new("v", Dtype::F16, vec![k, cols], halves(v)),
        ],
    )?;
    Ok(())
}

/// Compresses the checkpoint in `model_dir` into `out` without calibration: raw weights (or
/// `options.reparametrisation`), AVD, and the data-free [`ErrorReductionScorer`] ordering.
pub fn compress(
    model_dir: &Path,
    out: &Path,
    options: &CompressOptions,
    progress: &(dyn Fn(Progress<'_>) + Sync),
) -> Result<CompressSummary, Error> {
    let checkpoint = Checkpoint::open(model_dir)?;
    let architecture = read_architecture(&checkpoint)?;
    let names = select_matrices(&checkpoint, architecture.as_deref(), &options.include)?;
    let run = run_description(&checkpoint, &names, options, json!("data-free"))?;
    let resume = Checkpointer::open(out, options.checkpointing, &run)?;
    let mut stages = Vec::new();
    let t = Instant::now();
    let decomposed = decompose_checkpoint(&checkpoint, &names, options, resume.as_ref(), progress)?;
    stages.push(("decompose".to_string(), t.elapsed()));
    let t = Instant::now();
    let mut scorer = decomposed.error_reduction_scorer()?;
    let order = order_blocks(&decomposed, &mut scorer, progress)?;
    stages.push(("order".to_string(), t.elapsed()));
    finish(
        &checkpoint,
        architecture,
        decomposed,
        &order,
        options,
        "error-reduction-per-byte",
        out,
        stages,
        resume,
    )
}

/// Writes the container and builds the summary (shared by every ordering).
#[allow(clippy::too_many_arguments)]
pub fn finish(
    checkpoint: &Checkpoint,
    architecture: Option<String>,
    decomposed: Decomposed,
    order: &[StackEntry],
    options: &CompressOptions,
    scorer_name: &str,
    out: &Path,
    mut stages: Vec<(String, Duration)>,
    resume: Option<Checkpointer>,
) -> Result<CompressSummary, Error> {
    let t = Instant::now();
    let niter = options.avd.niter;
    let mut mean_rel_err = vec![0.0; niter];
    let mut rel_err = serde_json::Map::new();
    for (name, d) in decomposed.names.iter().zip(&decomposed.decompositions) {
        for (b, e) in d.rel_err.iter().enumerate().take(niter) {
            mean_rel_err[b] += e / decomposed.names.len() as f64;
        }
        rel_err.insert(name.clone(), json!(d.rel_err));
    }
    let mut metadata = options.extra_metadata.clone();
    metadata.insert("architecture".into(), json!(architecture));
    metadata.insert(
        "compress".into(),
        json!({
            "k": options.avd.k,
            "niter": options.avd.niter,
            "svd": format!("{:?}", options.avd.svd),
            "seed": options.avd.seed,
            "scorer": scorer_name,
            "reparametrised": !options.reparametrisation.is_identity(),
            "tool": concat!("bitstack ", env!("CARGO_PKG_VERSION")),
        }),
    );
    metadata.insert("rel_err".into(), serde_json::Value::Object(rel_err));
    let matrices = decomposed.names.len();
    let layout = write_container(checkpoint, decomposed, order, options, metadata, out)?;
    stages.push(("write".to_string(), t.elapsed()));
    let reused = match resume {
        Some(r) => {
            let reused = r.reused();
            r.finish()?;
            reused
        }
        None => 0,
    };
    Ok(CompressSummary::of_written(
        matrices,
        &layout,
        out,
        stages,
        mean_rel_err,
        reused,
    ))
}

impl CompressSummary {
    /// The summary of a container just written to `out` with `layout`.
    pub(crate) fn of_written(
        matrices: usize,
        layout: &StackLayout,
        out: &Path,
        stages: Vec<(String, Duration)>,
        mean_rel_err: Vec<f64>,
        reused: usize,
    ) -> Self {
        Self {
            matrices,
            blocks: layout.order().len(),
            min_memory_bytes: layout.min_memory(),
            max_memory_bytes: layout.max_memory(),
            file_bytes: std::fs::metadata(out).map(|m| m.len()).unwrap_or(0),
            stage_seconds: stages
                .into_iter()
                .map(|(n, d)| (n, d.as_secs_f64()))
                .collect(),
            mean_rel_err,
            reused,
        }
    }
}
