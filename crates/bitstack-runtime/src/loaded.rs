//! A budget loaded into owned memory, resizable while in use.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bitstack_bits::{Parallelism, Simd};
use bitstack_decompose::{planes_matvec_add, planes_matvec_add_q16, PlaneTable};
use bitstack_order::Plan;
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use half::{bf16, f16};

use crate::block::{blocks_rows_to_dense, Block};
use crate::file::StackFile;
use crate::RuntimeError;

/// A fixed (non-decomposed) tensor held in memory in its stored 16-bit (or 32-bit) form.
#[derive(Debug, Clone)]
pub struct FixedTensor {
    /// Stored dtype name (`F16`, `BF16`, `F32`, `U8`).
    pub dtype: String,
    /// Dtype of the original checkpoint.
    pub original_dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Little-endian bytes (shared: a model built on this stack may hold them too).
    pub bytes: Arc<[u8]>,
}

impl FixedTensor {
    /// Whether the stored dtype is a float one ([`FixedTensor::to_f32`] gives `Some`).
    pub fn is_float(&self) -> bool {
        matches!(self.dtype.as_str(), "F32" | "F16" | "BF16")
    }

    /// The values widened to f32 (`None` for a dtype that is not a float).
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        let b = &self.bytes;
        match self.dtype.as_str() {
            "F32" => Some(
                b.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            "F16" => Some(
                b.chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            ),
            "BF16" => Some(
                b.chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
            ),
            _ => None,
        }
    }
}

/// What a resize did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResizeReport {
    /// The plan now in force.
    pub plan: Plan,
    /// Bytes of blocks read from the file.
    pub bytes_read: u64,
    /// Bytes of blocks freed.
    pub bytes_freed: u64,
    /// Blocks read.
    pub blocks_read: usize,
    /// Blocks dropped.
    pub blocks_dropped: usize,
}

/// How [`LoadedStack::matvec`] multiplies residual (AVD) blocks, and bit-plane blocks:
/// every setting but [`DecodeTables::F32`] multiplies planes with
/// [`bitstack_decompose::planes_matvec_add_q16`] (`x` as two bytes, one scale per 128
/// columns, products within ~1e-4 relative of the exact ones, where the CPU has VNNI and
/// GFNI with AVX-512 or AVX2; elsewhere the exact product).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum DecodeTables {
    /// 8-bit table entries ([`bitstack_bits::lowrank_matvec_add_q8`]: one scale per 256
    /// columns and rank index, error bounded by half a step per 4-column group) where the
    /// CPU has AVX-512 VBMI and VNNI (about four times faster than [`DecodeTables::F32`]) or
    /// AVX2, FMA and F16C (about twice as fast; the same products); elsewhere the f32
    /// tables (the portable 8-bit version would be slower).
    #[default]
    Int8,
    /// 8-bit `z` multiplied on the AMX tile unit ([`bitstack_bits::lowrank_matvec_add_i8`]:
    /// one scale per 256 columns and rank index, error bounded by half a step per column)
    /// where the CPU has AMX-INT8 (Intel from Sapphire Rapids, Linux), rows are whole bytes
    /// of signs and every block has `k ≥ 8` (a tile product always computes 16 rank
    /// indices: at `k = 2` it was 1.6× slower than the tables); elsewhere as
    /// [`DecodeTables::Int8`]. On one thread it is about twice as fast as the 8-bit tables;
    /// on the 2-vCPU machine measured it did not run faster on two threads, where the tables
    /// caught up (docs/NOTES.md), so it is not the default.
    Int8Tiles,
    /// f32 table entries ([`bitstack_bits::lowrank_matvec_add`]): the exact product up to
    /// f32 rounding.
    F32,
}

/// The smallest rank for which [`DecodeTables::Int8Tiles`] uses the tile unit.
const TILE_MIN_RANK: usize = 8;

/// The most tokens that cost less as one-token products than through the batch product, for
/// a matrix with AVD blocks and 8-bit decode tables ([`LoadedStack::token_steps_limit`]).
/// The tile rebuild costs `k` multiply-adds per weight and block whatever the token count;
/// `cargo run --release -p bitstack-runtime --example prompt_paths -- FILE` on small-llama,
/// 4 blocks (AMD Zen 5, two threads), with the products' threads on whole blocks: tiles cost
/// 1.12–1.75× the one-token products at 16 tokens and 0.61–0.97× at 32 with k = 16,
/// 1.20–2.13× and 0.68–1.21× with k = 4 (before that split: 0.96–1.60× at 16 with k = 16,
/// and the limit was 12).
const AVD_Q8_TOKEN_STEPS: usize = 16;
/// As [`AVD_Q8_TOKEN_STEPS`] for the 8-bit kernel's AVX2 version: an estimate, not measured
/// on a CPU without AVX-512 — on Zen 5 the AVX2 products take 2.1–2.8× the AVX-512 ones
/// at small-llama's shapes (`SIMD=avx2 examples/q8_decode`), which puts the crossover near
/// 5 tokens if the tile rebuild ran as fast, later as it runs slower.
const AVD_Q8_AVX2_TOKEN_STEPS: usize = 6;
/// As [`AVD_Q8_TOKEN_STEPS`] with f32 decode tables (crossover near 3 tokens).
const AVD_F32_TOKEN_STEPS: usize = 2;
/// As [`AVD_Q8_TOKEN_STEPS`] for bit planes, whose tile rebuild is cheap (8 planes: tiles
/// 1.7–3.4× the one-token products at 2 tokens, 0.88–1.86× at 4).
const PLANE_TOKEN_STEPS: usize = 3;

/// Cumulative counters of a [`LoadedStack`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Bytes of blocks read from the file since loading (initial load included).
    pub bytes_read: u64,
    /// Bytes of blocks freed since loading.
    pub bytes_freed: u64,
    /// Bytes of blocks resident now.
    pub resident_block_bytes: u64,
    /// Bytes of fixed tensors resident (constant).
    pub fixed_bytes: u64,
}

/// A budget of a [`StackFile`] loaded into memory this struct owns.
///
/// Thread-safe: each matrix's blocks sit behind their own lock, so a forward pass on one
/// thread and a [`LoadedStack::resize`] on another never see a half-changed matrix (a matrix
/// is used either entirely before or entirely after its change). Resizes are serialized.
#[derive(Debug)]
pub struct LoadedStack {
    file: Arc<StackFile>,
    /// Stack positions of each matrix's blocks, in chain order.
    positions: Vec<Vec<usize>>,
    matrices: Vec<RwLock<Vec<Arc<Block>>>>,
    fixed: BTreeMap<String, FixedTensor>,
    fixed_bytes: u64,
    plan: Mutex<Plan>,
    bytes_read: AtomicU64,
    bytes_freed: AtomicU64,
    resident: AtomicU64,
    /// The [`DecodeTables`] setting (its discriminant).
    decode_tables: AtomicU8,
}

impl LoadedStack {
    /// Loads the longest stack prefix that fits `budget` bytes (ALGORITHM.md §4).
    ///
    /// Errors: a budget below the minimum (the error states it), a truncated file that lacks
    /// blocks the budget would use only if `budget` exceeds what is present *and* the base
    /// model is missing (otherwise the plan is clamped to the blocks present — use
    /// [`LoadedStack::load_exact`] to refuse instead), a checksum mismatch.
    pub fn load(file: Arc<StackFile>, budget: u64) -> Result<Self, RuntimeError> {
        file.require_base()?;
        let plan = file.layout().plan_for_budget(budget)?;
        Self::load_plan(file, plan)
    }

    /// Like [`LoadedStack::load`], but a budget that would use blocks missing from a
    /// truncated file is an error that says how many bytes are missing.
    pub fn load_exact(file: Arc<StackFile>, budget: u64) -> Result<Self, RuntimeError> {
        file.require_base()?;
        check_available(&file, budget)?;
        let plan = file.layout().plan_for_budget(budget)?;
        Self::load_plan(file, plan)
    }

    fn load_plan(file: Arc<StackFile>, plan: Plan) -> Result<Self, RuntimeError> {
        let container = file.container();
        let mut fixed = BTreeMap::new();
        let mut fixed_bytes = 0;
        for entry in &container.manifest().fixed {
            let tensor = container.fixed(&entry.name).ok_or_else(|| {
                RuntimeError::Invalid(format!("fixed tensor {} is missing", entry.name))
            })?;
            fixed_bytes += tensor.bytes.len() as u64;
            fixed.insert(
                entry.name.clone(),
                FixedTensor {
                    dtype: tensor.dtype.name().to_string(),
                    original_dtype: entry.original_dtype.clone(),
                    shape: tensor.shape.to_vec(),
                    bytes: Arc::from(tensor.bytes),
                },
            );
        }
        let mut positions = vec![Vec::new(); file.matrix_count()];
        for (p, e) in file.layout().order().iter().enumerate() {
            positions[e.matrix as usize].push(p);
        }
        let matrices = (0..file.matrix_count())
            .map(|_| RwLock::new(Vec::new()))
            .collect();
        let empty = Plan {
            blocks_loaded: 0,
            memory_bytes: file.layout().fixed_bytes(),
            per_matrix: vec![0; file.matrix_count()],
        };
        let stack = Self {
            file,
            positions,
            matrices,
            fixed,
            fixed_bytes,
            plan: Mutex::new(empty),
            bytes_read: AtomicU64::new(0),
            bytes_freed: AtomicU64::new(0),
            resident: AtomicU64::new(0),
            decode_tables: AtomicU8::new(DecodeTables::Int8 as u8),
        };
        stack.apply(plan)?;
        Ok(stack)
    }

    /// The file this stack was loaded from.
    pub fn file(&self) -> &Arc<StackFile> {
        &self.file
    }

    /// The plan in force.
    pub fn plan(&self) -> Plan {
        self.lock_plan().clone()
    }

    fn lock_plan(&self) -> std::sync::MutexGuard<'_, Plan> {
        // A panic while holding the lock cannot leave the plan inconsistent with the
        // matrices (it is written last), so a poisoned lock is still usable.
        self.plan.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counters: bytes read and freed so far, bytes resident.
    pub fn counters(&self) -> Counters {
        Counters {
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_freed: self.bytes_freed.load(Ordering::Relaxed),
            resident_block_bytes: self.resident.load(Ordering::Relaxed),
            fixed_bytes: self.fixed_bytes,
        }
    }

    /// Resident bytes of fixed tensors and blocks: equals the plan's `memory_bytes`.
    pub fn resident_bytes(&self) -> u64 {
        self.fixed_bytes + self.resident.load(Ordering::Relaxed)
    }

    /// Moves to the plan of `budget`, reading only the missing blocks and dropping only the
    /// extra ones. Safe to call while other threads use the model.
    ///
    /// A budget beyond what a truncated file holds is an error that says how many bytes are
    /// missing (nothing changes).
    pub fn resize(&self, budget: u64) -> Result<ResizeReport, RuntimeError> {
        check_available(&self.file, budget)?;
        let plan = self.file.layout().plan_for_budget(budget)?;
        self.apply(plan)
    }

    fn apply(&self, target: Plan) -> Result<ResizeReport, RuntimeError> {
        let mut current = self.lock_plan();
        let mut report = ResizeReport {
            plan: target.clone(),
            bytes_read: 0,
            bytes_freed: 0,
            blocks_read: 0,
            blocks_dropped: 0,
        };
        for m in 0..self.matrices.len() {
            let have = current.per_matrix[m] as usize;
            let want = target.per_matrix[m] as usize;
            if want > have {
                // Read outside the matrix lock: readers keep using the old blocks meanwhile.
                let mut chain: Vec<Arc<Block>> = self.read_blocks(m).clone();
                for &position in &self.positions[m][have..want] {
                    let (block, length) = self.file.read_block(position, &chain)?;
                    report.bytes_read += length;
                    report.blocks_read += 1;
                    chain.push(Arc::new(block));
                }
                let fresh = chain.split_off(have);
                // The blocks are owned copies now: give back the map's pages at once, so that
                // loading never holds a block twice.
                self.file.container().release_pages();
                let added: u64 = fresh.iter().map(|b| b.byte_size()).sum();
                let mut blocks = self.matrices[m].write().unwrap_or_else(|e| e.into_inner());
                blocks.extend(fresh);
                self.resident.fetch_add(added, Ordering::Relaxed);
            } else if want < have {
                let mut blocks = self.matrices[m].write().unwrap_or_else(|e| e.into_inner());
                let freed: u64 = blocks[want..].iter().map(|b| b.byte_size()).sum();
                blocks.truncate(want);
                blocks.shrink_to_fit();
                self.resident.fetch_sub(freed, Ordering::Relaxed);
                report.bytes_freed += freed;
                report.blocks_dropped += have - want;
            }
            current.per_matrix[m] = want as u32;
        }
        current.blocks_loaded = target.blocks_loaded;
        current.memory_bytes = target.memory_bytes;
        self.bytes_read
            .fetch_add(report.bytes_read, Ordering::Relaxed);
        self.bytes_freed
            .fetch_add(report.bytes_freed, Ordering::Relaxed);
        // What was read is owned now: the file map's pages need not stay resident.
        self.file.container().release_pages();
        Ok(report)
    }

    /// Number of blocks of matrix `m` loaded now.
    pub fn blocks_of(&self, m: usize) -> usize {
        self.read_blocks(m).len()
    }

    fn read_blocks(&self, m: usize) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Block>>> {
        self.matrices[m].read().unwrap_or_else(|e| e.into_inner())
    }

    /// A fixed tensor (embeddings, norms, biases, …) by its original name.
    pub fn fixed(&self, name: &str) -> Option<&FixedTensor> {
        self.fixed.get(name)
    }

    /// Names of the fixed tensors.
    pub fn fixed_names(&self) -> impl Iterator<Item = &str> {
        self.fixed.keys().map(String::as_str)
    }

    /// Writes `Ŵ` of matrix `m` (row-major `rows × cols`) into `out`.
    ///
    /// # Panics
    /// If `out.len() != rows · cols`.
    pub fn reconstruct_into(&self, m: usize, out: &mut [f32]) {
        let (rows, cols) = self.file.shape(m);
        assert_eq!(
            out.len(),
            rows * cols,
            "reconstruct_into: wrong output length"
        );
        out.fill(0.0);
        blocks_rows_to_dense(&self.read_blocks(m), 0, out);
    }

    /// `Ŵ` of matrix `m` as a new row-major f32 vector.
    pub fn reconstruct_f32(&self, m: usize) -> Vec<f32> {
        let (rows, cols) = self.file.shape(m);
        let mut out = vec![0.0; rows * cols];
        self.reconstruct_into(m, &mut out);
        out
    }

    /// `y = Ŵ x` for matrix `m`, from the packed blocks (no dense `Ŵ` is built): all the
    /// matrix's AVD blocks go through one call of the decode kernel
    /// ([`bitstack_bits::lowrank_matvec_add`]) and all its planes through one pass of
    /// [`bitstack_decompose::planes_matvec_add`] (one lookup table of `x` for all planes);
    /// both split the rows between rayon's threads.
    ///
    /// Call it from a rayon worker where you can: an engine that runs its whole decode step
    /// inside `rayon::scope` or `ThreadPool::install` (as `CausalLm::forward_cached_into`
    /// does) saves a hand-off to the pool and back per product, which costs about 10 µs:
    /// small-llama's 58 best-mode products took 2.2 ms from the main thread against 1.7 ms
    /// on a worker (`cargo run --release -p bitstack-runtime --example outside_pool --
    /// FILE`).
    ///
    /// # Panics
    /// If `x.len() != cols` or `y.len() != rows`.
    pub fn matvec(&self, m: usize, x: &[f32], y: &mut [f32]) {
        let (rows, cols) = self.file.shape(m);
        assert!(x.len() == cols && y.len() == rows, "matvec: wrong lengths");
        y.fill(0.0);
        let blocks = self.read_blocks(m);
        let mut lowrank = Vec::new();
        let mut planes = Vec::new();
        for block in blocks.iter() {
            match block.as_ref() {
                Block::Avd(b) => lowrank.push(b.as_lowrank()),
                Block::Plane(p) => planes.push(p),
            }
        }
        if !lowrank.is_empty() {
            let tables = self.decode_tables();
            if tables == DecodeTables::Int8Tiles
                && cols % 8 == 0
                && lowrank.iter().all(|b| b.k >= TILE_MIN_RANK)
                && bitstack_bits::lowrank_i8_accelerated(Simd::Auto)
            {
                bitstack_bits::lowrank_matvec_add_i8(&lowrank, x, y, Parallelism::Auto, Simd::Auto);
            } else if tables != DecodeTables::F32
                && bitstack_bits::lowrank_q8_vectorized(Simd::Auto)
            {
                bitstack_bits::lowrank_matvec_add_q8(&lowrank, x, y, Parallelism::Auto, Simd::Auto);
            } else {
                bitstack_bits::lowrank_matvec_add(&lowrank, x, y, Parallelism::Auto, Simd::Auto);
            }
        }
        if let Some(first) = planes.first() {
            let table = PlaneTable::new(x, first.grid().group());
            if self.decode_tables() == DecodeTables::F32 {
                planes_matvec_add(&planes, &table, y);
            } else {
                planes_matvec_add_q16(&planes, &table, y);
            }
        }
    }

    /// The most tokens for which [`LoadedStack::matvec`] once per token costs less than one
    /// [`LoadedStack::matmul`] of them for matrix `m` (with its blocks loaded now): about 16
    /// for AVD blocks with 8-bit decode tables on a CPU that has their AVX-512 kernel (6
    /// with their AVX2 kernel), 2 with f32 tables, 3 for bit planes (the smallest of those
    /// present; 0 for a matrix without blocks). Measured on small-llama (the AVX2 figure
    /// estimated); see `examples/prompt_paths.rs`.
    pub fn token_steps_limit(&self, m: usize) -> usize {
        let blocks = self.read_blocks(m);
        let avd = blocks.iter().any(|b| matches!(b.as_ref(), Block::Avd(_)));
        let planes = blocks.iter().any(|b| matches!(b.as_ref(), Block::Plane(_)));
        let q8 = self.decode_tables() != DecodeTables::F32;
        let avd_limit = if q8 && bitstack_bits::lowrank_q8_avx512(Simd::Auto) {
            AVD_Q8_TOKEN_STEPS
        } else if q8 && bitstack_bits::lowrank_q8_vectorized(Simd::Auto) {
            AVD_Q8_AVX2_TOKEN_STEPS
        } else {
            AVD_F32_TOKEN_STEPS
        };
        [(avd, avd_limit), (planes, PLANE_TOKEN_STEPS)]
            .into_iter()
            .filter_map(|(present, limit)| present.then_some(limit))
            .min()
            .unwrap_or(0)
    }

    /// How [`LoadedStack::matvec`] multiplies AVD blocks (default [`DecodeTables::Int8`]).
    pub fn decode_tables(&self) -> DecodeTables {
        match self.decode_tables.load(Ordering::Relaxed) {
            x if x == DecodeTables::F32 as u8 => DecodeTables::F32,
            x if x == DecodeTables::Int8Tiles as u8 => DecodeTables::Int8Tiles,
            _ => DecodeTables::Int8,
        }
    }

    /// Chooses how [`LoadedStack::matvec`] multiplies AVD blocks, e.g. [`DecodeTables::F32`]
    /// for products exact to f32 rounding. Takes effect with the next product.
    pub fn set_decode_tables(&self, tables: DecodeTables) {
        self.decode_tables.store(tables as u8, Ordering::Relaxed);
    }

    /// Writes row `row` of `Ŵ` of matrix `m` into `out` (e.g. one token's embedding).
    ///
    /// # Panics
    /// If `out.len() != cols` or `row` is out of range.
    pub fn row_into(&self, m: usize, row: usize, out: &mut [f32]) {
        let (rows, cols) = self.file.shape(m);
        assert!(
            row < rows && out.len() == cols,
            "row_into: bad row or length"
        );
        out.fill(0.0);
        blocks_rows_to_dense(&self.read_blocks(m), row, out);
    }

    /// `Y = X Ŵᵀ` for `tokens` row vectors `X` (`tokens × cols`, row-major) into `Y`
    /// (`tokens × rows`). One token goes through [`LoadedStack::matvec`]; more tokens rebuild
    /// `Ŵ` one tile of rows at a time (about 256 kB, one per thread) and multiply each tile
    /// with a dense GEMM: the dense `Ŵ` is never held whole.
    ///
    /// # Panics
    /// If the slice lengths do not match the shapes.
    pub fn matmul(&self, m: usize, x: &[f32], tokens: usize, y: &mut [f32]) {
        let (rows, cols) = self.file.shape(m);
        // A tile's floats, or more for at least `MIN_TILE_ROWS` rows; at least two tiles a
        // thread.
        let by_size = (TILE_FLOATS / cols.max(1)).max(MIN_TILE_ROWS);
        let by_threads = rows.div_ceil(2 * rayon::current_num_threads());
        self.matmul_tiled(m, x, tokens, y, by_size.min(by_threads).max(8));
    }

    /// [`LoadedStack::matmul`] with `tile_rows` rows per tile (for tests and benchmarks).
    ///
    /// # Panics
    /// If the slice lengths do not match the shapes or `tile_rows == 0`.
    pub fn matmul_tiled(
        &self,
        m: usize,
        x: &[f32],
        tokens: usize,
        y: &mut [f32],
        tile_rows: usize,
    ) {
        let (rows, cols) = self.file.shape(m);
        assert!(
            x.len() == tokens * cols && y.len() == tokens * rows && tile_rows > 0,
            "matmul: wrong lengths"
        );
        if tokens == 1 {
            return self.matvec(m, x, y);
        }
        let blocks = self.read_blocks(m);
        let xm = MatRef::from_row_major_slice(x, tokens, cols);
        let ym = MatMut::from_row_major_slice_mut(y, tokens, rows);
        let leaf = |tile: &mut Vec<f32>, row0: usize, out: MatMut<'_, f32>| {
            let n = out.ncols();
            tile.clear();
            tile.resize(n * cols, 0.0);
            blocks_rows_to_dense(&blocks, row0, tile);
            let wt = MatRef::from_row_major_slice(tile, n, cols).transpose();
            matmul(out, Accum::Replace, xm, wt, 1.0f32, Par::Seq);
        };
        // Tiles of `tile_rows` columns of y (rows of Ŵ), in parallel; each run of tiles that
        // rayon hands a thread reuses one buffer (a fresh megabyte per tile cost page faults).
        use rayon::prelude::*;
        ym.par_col_chunks_mut(tile_rows)
            .enumerate()
            .for_each_init(Vec::new, |tile, (t, ys)| leaf(tile, t * tile_rows, ys));
    }
}

/// f32 values in one tile of the batch product (256 kB) for matrices of up to 1024
/// columns; wider ones take [`MIN_TILE_ROWS`] rows.
const TILE_FLOATS: usize = 1 << 16;

/// Fewest rows of a tile: each tile multiplies all of `X`, so narrow tiles read it many
/// times. 256 kB tiles of a 4096-column matrix (16 rows) read 512 tokens' 8 MB 256 times and
/// took 1.41–1.46× a dense GEMM at 4096², 4 blocks; 64 rows (1 MiB) 1.12–1.29× (512 kB
/// 1.16–1.30, 2 MiB 1.26–1.31, 4 MiB 1.26–1.30; `bitstack bench --only kernels`).
const MIN_TILE_ROWS: usize = 64;

fn check_available(file: &StackFile, budget: u64) -> Result<(), RuntimeError> {
    let full = file.full_layout();
    if !file.is_truncated() || budget < full.min_memory() {
        return Ok(());
    }
    let wanted = full.plan_for_budget(budget)?;
    let present = file.layout().order().len();
    if wanted.blocks_loaded > present {
        return Err(RuntimeError::BeyondAvailable {
            budget,
            missing_bytes: wanted.memory_bytes - full.memory_of_prefix(present),
            available_blocks: present,
            total_blocks: full.order().len(),
            max_available: file.layout().max_memory(),
        });
    }
    Ok(())
}
