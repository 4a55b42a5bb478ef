//! The compression pipeline: checkpoint → (optional reparametrisation) → AVD of every stacked
//! matrix → block ordering → one `.bitstack` container.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitstack_bits::SignMatrix;
use bitstack_decompose::{decompose, AvdBlock, AvdParams, Decomposition};
use bitstack_format::{ContainerWriter, Dtype, PartData, Spool, SpoolRange, TensorSpec};
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
///
/// The blocks wait in a [`Spool`] file on disk — each matrix's as soon as it is decomposed —
/// and are read back one at a time ([`block`](Self::block)) by the scorer and the writer,
/// so the memory of a compression does not grow with the model (16 blocks at k = 16 are
/// about two bytes per weight: 16 GB for an 8B model). Only the metadata stays here.
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
    /// `‖W − Ŵ_b‖_F / ‖W‖_F` after b = 1, 2, ... blocks of each matrix.
    pub rel_err: Vec<Vec<f64>>,
    blocks: Vec<Vec<SpooledBlock>>,
    spool: Arc<Spool>,
}

/// Where one AVD block waits: its rank and its bytes in the spool (signs, then `u` and `v`
/// as little-endian f16, exactly the container's `avd` parts).
#[derive(Debug, Clone, Copy)]
struct SpooledBlock {
    k: usize,
    range: SpoolRange,
}

/// Bytes of the packed signs of a spooled block of `range_len` bytes.
fn signs_len(range_len: u64, rows: usize, cols: usize, k: usize) -> usize {
    let factors = 2 * k as u64 * (rows as u64 + cols as u64);
    usize::try_from(range_len.saturating_sub(factors)).unwrap_or(usize::MAX)
}

/// The parts of an `avd` block in the container: packed signs, f16 `u` (`rows × k`) and f16
/// `v` (`k × cols`).
fn avd_part_specs(signs_len: usize, rows: usize, cols: usize, k: usize) -> Vec<TensorSpec> {
    let spec = |name: &str, dtype, shape| TensorSpec {
        name: name.to_owned(),
        dtype,
        shape,
    };
    vec![
        spec("signs", Dtype::U8, vec![signs_len]),
        spec("u", Dtype::F16, vec![rows, k]),
        spec("v", Dtype::F16, vec![k, cols]),
    ]
}

fn halves_to_bytes(h: &[half::f16]) -> Vec<u8> {
    h.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bytes_to_halves(b: &[u8]) -> Vec<half::f16> {
    b.chunks_exact(2)
        .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
        .collect()
}

/// Writes the blocks of `d` to `spool`; returns where they are.
fn spool_blocks(spool: &Spool, d: &Decomposition) -> Result<Vec<SpooledBlock>, Error> {
    d.blocks
        .iter()
        .map(|b| {
            let (u, v) = (halves_to_bytes(b.u()), halves_to_bytes(b.v()));
            let range = spool.append(&[&b.signs().row_major_bytes(), &u, &v])?;
            Ok(SpooledBlock { k: b.k(), range })
        })
        .collect()
}

impl Decomposed {
    /// Number of blocks of matrix `m` (0 for an unknown matrix).
    pub fn block_count(&self, m: usize) -> usize {
        self.blocks.get(m).map_or(0, Vec::len)
    }

    /// Where block `b` of matrix `m` waits, and the matrix's shape.
    fn spooled(&self, m: usize, b: usize) -> Result<(SpooledBlock, usize, usize), Error> {
        match (
            self.blocks.get(m).and_then(|v| v.get(b)),
            self.shapes.get(m),
        ) {
            (Some(&spooled), Some(&(rows, cols))) => Ok((spooled, rows, cols)),
            _ => Err(Error::Usage(format!(
                "no block {b} of matrix {m} was decomposed"
            ))),
        }
    }

    /// Block `b` of matrix `m`, read back from the spool (its CRC-32 checked).
    pub fn block(&self, m: usize, b: usize) -> Result<AvdBlock, Error> {
        let (spooled, rows, cols) = self.spooled(m, b)?;
        let bytes = self.spool.read(spooled.range)?;
        let k = spooled.k;
        let n_signs = signs_len(spooled.range.len(), rows, cols, k).min(bytes.len());
        let (signs, factors) = bytes.split_at(n_signs);
        let (u, v) = factors.split_at((2 * rows * k).min(factors.len()));
        let what = |e: &dyn std::fmt::Display| {
            Error::Decompose(format!(
                "{} [{rows}, {cols}] block {b} read back from the spool: {e}",
                self.names.get(m).map_or("?", String::as_str)
            ))
        };
        let signs = SignMatrix::from_packed(signs.to_vec(), rows, cols).map_err(|e| what(&e))?;
        AvdBlock::from_parts(signs, bytes_to_halves(u), bytes_to_halves(v), k).map_err(|e| what(&e))
    }

    /// Bytes of every block, as spooled (the same as the blocks' bytes in the container).
    pub fn spooled_bytes(&self) -> u64 {
        self.blocks.iter().flatten().map(|b| b.range.len()).sum()
    }

    /// Block sizes per matrix.
    pub fn block_bytes(&self) -> Vec<Vec<u64>> {
        self.blocks
            .iter()
            .zip(&self.shapes)
            .map(|(blocks, &(r, c))| {
                blocks
                    .iter()
                    .map(|b| AvdBlock::byte_size(r, c, b.k))
                    .collect()
            })
            .collect()
    }

    /// `‖W − Ŵ_b‖²_F` for b = 0..=blocks of each matrix.
    pub fn squared_errors(&self) -> Vec<Vec<f64>> {
        self.rel_err
            .iter()
            .zip(&self.squared_norms)
            .map(|(rel_err, &n2)| {
                std::iter::once(n2)
                    .chain(rel_err.iter().map(|e| e * e * n2))
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

/// The directory for the temporary files of a run writing `out` (the output's own, so that
/// they land on a disk with room for it).
pub fn work_dir_of(out: &Path) -> &Path {
    match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Bytes one matrix's decomposition holds at its peak: its weights, `|R|` and its error in
/// f32 and its packed signs while it runs (about 12 bytes per weight), and its `niter`
/// finished blocks.
pub fn decomposition_bytes(rows: usize, cols: usize, params: &AvdParams) -> u64 {
    let weights = (rows as u64).saturating_mul(cols as u64);
    let state = weights
        .saturating_mul(12)
        .saturating_add(weights.div_ceil(8));
    let blocks = (params.niter as u64).saturating_mul(AvdBlock::byte_size(rows, cols, params.k));
    state.saturating_add(blocks)
}

/// Checks, before any work starts, that `params` suit every matrix of `names` (rank, number
/// of blocks) and that decomposing them fits in the memory available now: `threads`
/// matrices at a time (the largest, at worst), each as [`decomposition_bytes`] says. An
/// absurd `--niter` is refused here, in a second, instead of exhausting memory hours later.
pub fn check_decomposition(
    checkpoint: &Checkpoint,
    names: &[String],
    params: &AvdParams,
    threads: usize,
    available: Option<u64>,
) -> Result<(), Error> {
    let mut needs = Vec::with_capacity(names.len());
    for name in names {
        let info = checkpoint.info(name)?;
        let (rows, cols) = match info.shape[..] {
            [rows, cols] => (rows, cols),
            _ => {
                return Err(Error::Checkpoint(format!(
                    "{name}: a stacked tensor must be a matrix, its shape is {:?}",
                    info.shape
                )))
            }
        };
        params
            .check_shape(rows, cols)
            .map_err(|e| Error::Decompose(format!("{name} [{rows}, {cols}]: {e}")))?;
        needs.push((decomposition_bytes(rows, cols, params), name, rows, cols));
    }
    needs.sort_by_key(|n| std::cmp::Reverse(n.0));
    let need = needs
        .iter()
        .take(threads.max(1))
        .fold(0u64, |sum, n| sum.saturating_add(n.0));
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    match (available, needs.first()) {
        (Some(available), Some(&(one, name, rows, cols))) if need > available => {
            let blocks =
                (params.niter as u64).saturating_mul(AvdBlock::byte_size(rows, cols, params.k));
            Err(Error::Usage(if one > available {
                format!(
                    "decomposing {name} [{rows}, {cols}] into {} blocks of rank {} needs about \
                     {:.1} GiB (its blocks alone {:.1} GiB), {:.1} GiB is available: use fewer \
                     blocks per matrix (--niter)",
                    params.niter,
                    params.k,
                    gib(one),
                    gib(blocks),
                    gib(available)
                )
            } else {
                format!(
                    "decomposing {threads} matrices at a time needs about {:.1} GiB (the \
                     largest, {name} [{rows}, {cols}], with {} blocks of rank {}: {:.1} GiB), \
                     {:.1} GiB is available: use fewer threads (RAYON_NUM_THREADS=1) or fewer \
                     blocks per matrix (--niter)",
                    gib(need),
                    params.niter,
                    params.k,
                    gib(one),
                    gib(available)
                )
            }))
        }
        _ => Ok(()),
    }
}

/// `MemAvailable` of `/proc/meminfo` in bytes (Linux), if readable.
pub(crate) fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Decomposes every selected matrix (in parallel over matrices), spooling each matrix's
/// blocks to a temporary file in `spool_dir` as soon as it is done. With `resume`, matrices
/// finished by an earlier run are read back and each new one is saved when done.
pub fn decompose_checkpoint(
    checkpoint: &Checkpoint,
    names: &[String],
    options: &CompressOptions,
    resume: Option<&Checkpointer>,
    spool_dir: &Path,
    progress: &(dyn Fn(Progress<'_>) + Sync),
) -> Result<Decomposed, Error> {
    let spool = Arc::new(Spool::create_in(spool_dir)?);
    progress(Progress::Stage {
        name: "decompose",
        total: names.len() as u64,
    });
    let done = AtomicUsize::new(0);
    let results: Vec<(Vec<SpooledBlock>, Vec<f64>, f64)> = names
        .par_iter()
        .enumerate()
        .map(|(index, name)| {
            let info = checkpoint.info(name)?;
            let (rows, cols) = (info.shape[0], info.shape[1]);
            let saved = resume.and_then(|r| r.load_matrix(index, name, (rows, cols), &options.avd));
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
            let spooled = spool_blocks(&spool, &d)?;
            let n = done.fetch_add(1, Ordering::Relaxed) + 1;
            progress(Progress::Step {
                done: n as u64,
                what: name,
            });
            Ok((spooled, d.rel_err, norm2))
        })
        .collect::<Result<_, Error>>()?;
    let mut shapes = Vec::new();
    let mut dtypes = Vec::new();
    for name in names {
        let info = checkpoint.info(name)?;
        shapes.push((info.shape[0], info.shape[1]));
        dtypes.push(info.dtype);
    }
    let mut blocks = Vec::with_capacity(results.len());
    let mut rel_err = Vec::with_capacity(results.len());
    let mut squared_norms = Vec::with_capacity(results.len());
    for (b, e, n2) in results {
        blocks.push(b);
        rel_err.push(e);
        squared_norms.push(n2);
    }
    Ok(Decomposed {
        names: names.to_vec(),
        shapes,
        dtypes,
        squared_norms,
        rel_err,
        blocks,
        spool,
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
    let counts: Vec<u32> = decomposed.blocks.iter().map(|b| b.len() as u32).collect();
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
    // The blocks stay in the spool; the writer copies them into the file.
    for entry in order {
        let (m, b) = (entry.matrix as usize, entry.block as usize);
        let (spooled, rows, cols) = decomposed.spooled(m, b)?;
        let k = spooled.k;
        let specs = avd_part_specs(signs_len(spooled.range.len(), rows, cols, k), rows, cols, k);
        writer.push_spooled_block(
            m,
            b,
            "avd",
            BTreeMap::from([("k".to_string(), k as i64)]),
            specs,
            &decomposed.spool,
            spooled.range,
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
    let specs = avd_part_specs(signs.as_bytes().len(), rows, cols, k);
    let bytes = [signs.into_bytes(), halves_to_bytes(&u), halves_to_bytes(&v)];
    let parts = specs
        .into_iter()
        .zip(bytes)
        .map(|(s, b)| PartData::new(s.name, s.dtype, s.shape, b))
        .collect();
    writer.push_block(
        matrix,
        index,
        "avd",
        BTreeMap::from([("k".to_string(), k as i64)]),
        parts,
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
    check_decomposition(
        &checkpoint,
        &names,
        &options.avd,
        rayon::current_num_threads(),
        available_memory(),
    )?;
    let run = run_description(&checkpoint, &names, options, json!("data-free"))?;
    let resume = Checkpointer::open(out, options.checkpointing, &run)?;
    let mut stages = Vec::new();
    let t = Instant::now();
    let decomposed = decompose_checkpoint(
        &checkpoint,
        &names,
        options,
        resume.as_ref(),
        work_dir_of(out),
        progress,
    )?;
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
    for (name, errors) in decomposed.names.iter().zip(&decomposed.rel_err) {
        for (b, e) in errors.iter().enumerate().take(niter) {
            mean_rel_err[b] += e / decomposed.names.len() as f64;
        }
        rel_err.insert(name.clone(), json!(errors));
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        /// Blocks read back from the spool are the blocks that were decomposed (widths that
        /// are and are not multiples of 8, k from 1 to 5), whichever order they are read in,
        /// and the container parts the writer declares add up to the bytes spooled.
        #[test]
        fn spooled_blocks_read_back(
            rows in 5usize..40,
            cols in 5usize..40,
            k in 1usize..6,
            seed in any::<u64>(),
        ) {
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| {
                    let h = (i as u64 ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    (h >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                })
                .collect();
            let params = AvdParams { k, niter: 3, ..AvdParams::default() };
            let d = decompose(&w, rows, cols, &params, None).unwrap();
            let spool = Arc::new(Spool::create_in(&std::env::temp_dir()).unwrap());
            spool.append(&[b"another matrix"]).unwrap();
            let blocks = spool_blocks(&spool, &d).unwrap();
            let decomposed = Decomposed {
                names: vec!["m".into()],
                shapes: vec![(rows, cols)],
                dtypes: vec![SourceDtype::F32],
                squared_norms: vec![1.0],
                rel_err: vec![d.rel_err.clone()],
                blocks: vec![blocks],
                spool,
            };
            prop_assert_eq!(decomposed.block_count(0), d.blocks.len());
            for (b, block) in d.blocks.iter().enumerate().rev() {
                prop_assert_eq!(&decomposed.block(0, b).unwrap(), block);
                let range = decomposed.blocks[0][b].range;
                let specs = avd_part_specs(
                    signs_len(range.len(), rows, cols, block.k()),
                    rows,
                    cols,
                    block.k(),
                );
                let total: usize =
                    specs.iter().map(|s| s.dtype.byte_len(&s.shape).unwrap()).sum();
                prop_assert_eq!(total as u64, range.len());
                prop_assert_eq!(specs[0].shape[0], block.signs().as_bytes().len());
            }
            prop_assert!(decomposed.block(0, d.blocks.len()).is_err());
            prop_assert!(decomposed.block(1, 0).is_err());
        }
    }

    /// The memory check counts 12 bytes per weight plus the packed signs for the working
    /// state and the stored size of every block, for the largest matrices that run at once;
    /// wrong ranks and block counts are refused before any work.
    #[test]
    fn decomposition_is_checked_before_it_starts() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-qwen2");
        let checkpoint = Checkpoint::open(&dir).unwrap();
        let names = select_matrices(&checkpoint, Some("Qwen2ForCausalLM"), &[]).unwrap();
        let params = AvdParams {
            k: 2,
            niter: 3,
            ..AvdParams::default()
        };
        // The largest matrices of tiny-qwen2 are 768 × 256 (gate, up, down): by hand,
        // 196 608 weights × 12 + 24 576 bytes of signs, and 3 blocks of 24 576 bytes of
        // signs + 2 · 2 · (768 + 256) bytes of factors.
        let one = 196_608 * 12 + 24_576 + 3 * (24_576 + 4 * 1024);
        assert_eq!(decomposition_bytes(768, 256, &params), one);
        let check = |threads: usize, available: Option<u64>| {
            check_decomposition(&checkpoint, &names, &params, threads, available)
        };
        check(2, Some(2 * one)).unwrap();
        check(2, None).unwrap();
        check(1, Some(one)).unwrap();
        let e = check(2, Some(2 * one - 1)).unwrap_err().to_string();
        assert!(e.contains("2 matrices at a time"), "{e}");
        assert!(e.contains("RAYON_NUM_THREADS=1"), "{e}");
        let e = check(1, Some(one - 1)).unwrap_err().to_string();
        assert!(e.contains("into 3 blocks of rank 2"), "{e}");
        assert!(e.contains("[768, 256]"), "{e}");
        assert!(e.contains("fewer blocks per matrix (--niter)"), "{e}");
        assert!(!e.contains("RAYON_NUM_THREADS"), "{e}");
        // A rank or a block count that no matrix can take, and a rank past the narrowest one.
        for (k, niter, what) in [(0, 3, "rank k = 0"), (2, 0, "niter must be at least 1")] {
            let params = AvdParams { k, niter, ..params };
            let e = check_decomposition(&checkpoint, &names, &params, 1, None)
                .unwrap_err()
                .to_string();
            assert!(e.contains(what), "{e}");
        }
        let side = names
            .iter()
            .map(|n| {
                let s = &checkpoint.info(n).unwrap().shape;
                s[0].min(s[1])
            })
            .min()
            .unwrap();
        let too_big = AvdParams {
            k: side + 1,
            ..params
        };
        let e = check_decomposition(&checkpoint, &names, &too_big, 1, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("rank k = {}", side + 1)), "{e}");
        let fits = AvdParams { k: side, ..params };
        check_decomposition(&checkpoint, &names, &fits, 1, None).unwrap();
    }
}
