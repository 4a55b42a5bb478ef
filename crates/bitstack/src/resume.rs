//! Checkpointed progress for `compress`: an interrupted run (a crash, `kill -9`, a full
//! disk) continues where it stopped with `--resume` and produces the same bytes as an
//! uninterrupted run.
//!
//! While `compress` works, `<output>.partial/` holds:
//! - `run.json` — what the run is (model files, options); a resume with anything different is
//!   refused;
//! - `scales.bin` — the calibration scales (calibrated mode);
//! - `matrix-<i>.bin` — each finished decomposition, bit-exact (signs, f16 factors, errors);
//! - `level-<l>.bin` — the scores of each finished ordering level.
//!
//! Every file is written to a temporary name and renamed, and carries a CRC-32, so a file
//! cut by the interruption is never read back (it is recomputed). The directory is removed
//! once the container has been renamed into place.

use std::io::Write;
use std::path::{Path, PathBuf};

use bitstack_bits::SignMatrix;
use bitstack_decompose::{AvdBlock, AvdParams, Decomposition};
use half::f16;

use crate::Error;

const MAGIC: &[u8; 8] = b"BSPART01";

/// How `compress` treats checkpointed progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Checkpointing {
    /// No progress is saved (library default).
    #[default]
    Off,
    /// Progress is saved to `<output>.partial/`; an old one is discarded.
    Fresh,
    /// Progress is saved, and the finished work of an earlier, interrupted run with the same
    /// inputs and options is reused (an error when there is none).
    Resume,
}

/// The progress directory of one compression.
#[derive(Debug)]
pub struct Checkpointer {
    dir: PathBuf,
    /// Units of work reused from the earlier run (matrices + levels).
    reused: std::sync::atomic::AtomicUsize,
}

/// `<output>.partial`.
pub fn progress_dir(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    out.with_file_name(name)
}

impl Checkpointer {
    /// Opens (`Resume`) or creates (`Fresh`) the progress directory of `out`; `None` for
    /// `Off`. `run` describes the inputs and options; resuming a run described differently
    /// is an error naming the difference.
    pub fn open(
        out: &Path,
        mode: Checkpointing,
        run: &serde_json::Value,
    ) -> Result<Option<Self>, Error> {
        let dir = progress_dir(out);
        let run_file = dir.join("run.json");
        match mode {
            Checkpointing::Off => return Ok(None),
            Checkpointing::Fresh => {
                if dir.exists() {
                    std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
                }
            }
            Checkpointing::Resume => {
                let bytes = std::fs::read(&run_file).map_err(|e| {
                    Error::Usage(format!(
                        "--resume: no progress to resume at {} ({e}); run without --resume",
                        dir.display()
                    ))
                })?;
                let saved: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
                    Error::Usage(format!(
                        "--resume: {} is damaged ({e}); run without --resume",
                        run_file.display()
                    ))
                })?;
                if &saved != run {
                    return Err(Error::Usage(format!(
                        "--resume: the interrupted run in {} used other inputs or options ({}); \
                         run with the same ones, or without --resume to start over",
                        dir.display(),
                        describe_difference(&saved, run)
                    )));
                }
                return Ok(Some(Self {
                    dir,
                    reused: Default::default(),
                }));
            }
        }
        // Not create_dir_all: an output path in a directory that does not exist (a typo in
        // -o) must fail, not create directories (docs/BAD_INPUT.md).
        std::fs::create_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        let text = serde_json::to_vec_pretty(run)
            .map_err(|e| Error::Usage(format!("cannot describe the run: {e}")))?;
        let me = Self {
            dir,
            reused: Default::default(),
        };
        me.write_file("run.json", &text)?;
        Ok(Some(me))
    }

    /// The progress directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Units of work (matrices, levels) taken from the earlier run so far.
    pub fn reused(&self) -> usize {
        self.reused.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn write_file(&self, name: &str, bytes: &[u8]) -> Result<(), Error> {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(&path, e)
        })
    }

    /// Writes a record: magic, payload, CRC-32 of the payload.
    fn write_record(&self, name: &str, payload: &[u8]) -> Result<(), Error> {
        let mut bytes = Vec::with_capacity(payload.len() + 12);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(payload);
        bytes.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        self.write_file(name, &bytes)
    }

    /// The payload of a record, `None` when absent or damaged (it is then recomputed).
    fn read_record(&self, name: &str) -> Option<Vec<u8>> {
        let bytes = std::fs::read(self.dir.join(name)).ok()?;
        if bytes.len() < MAGIC.len() + 4 || &bytes[..MAGIC.len()] != MAGIC {
            return None;
        }
        let (payload, crc) = bytes[MAGIC.len()..].split_at(bytes.len() - MAGIC.len() - 4);
        let crc = u32::from_le_bytes(crc.try_into().ok()?);
        (crc32fast::hash(payload) == crc).then(|| payload.to_vec())
    }

    /// Counts `units` records taken from the earlier run in [`Checkpointer::reused`].
    /// [`Checkpointer::load_matrix`] and [`Checkpointer::load_level`] count what they return;
    /// the callers of [`Checkpointer::load_numbers`] and [`Checkpointer::load_vectors`],
    /// which check what they read against the run, count what they keep.
    pub fn count_reused(&self, units: usize) {
        self.reused
            .fetch_add(units, std::sync::atomic::Ordering::Relaxed);
    }

    /// Saves a finished decomposition of matrix `index` and `‖W‖²`.
    pub fn save_matrix(
        &self,
        index: usize,
        name: &str,
        decomposition: &Decomposition,
        norm2: f64,
    ) -> Result<(), Error> {
        let mut p = Vec::new();
        put_bytes(&mut p, name.as_bytes());
        put_u64(&mut p, decomposition.rows() as u64);
        put_u64(&mut p, decomposition.cols() as u64);
        put_u64(&mut p, norm2.to_bits());
        put_u64(&mut p, decomposition.rel_err.len() as u64);
        for e in &decomposition.rel_err {
            put_u64(&mut p, e.to_bits());
        }
        put_u64(&mut p, decomposition.blocks.len() as u64);
        for block in &decomposition.blocks {
            put_u64(&mut p, block.k() as u64);
            put_bytes(&mut p, &block.signs().row_major_bytes());
            put_halves(&mut p, block.u());
            put_halves(&mut p, block.v());
        }
        self.write_record(&format!("matrix-{index}.bin"), &p)
    }

    /// A decomposition of matrix `index` saved by an earlier run, if it is there, intact and
    /// what [`bitstack_decompose::decompose`] gives the matrix `name` with `rows × cols`
    /// under `params`: `params.niter` blocks of rank `params.k` with finite factors, one
    /// finite error per block, a finite `‖W‖²`. Anything else is recomputed.
    pub fn load_matrix(
        &self,
        index: usize,
        name: &str,
        (rows, cols): (usize, usize),
        params: &AvdParams,
    ) -> Option<(Decomposition, f64)> {
        let p = self.read_record(&format!("matrix-{index}.bin"))?;
        let mut r = Reader(&p);
        if r.bytes()? != name.as_bytes() || r.u64()? != rows as u64 || r.u64()? != cols as u64 {
            return None;
        }
        let norm2 = f64::from_bits(r.u64()?);
        if !(norm2.is_finite() && norm2 >= 0.0) || r.len()? != params.niter {
            return None;
        }
        let rel_err = (0..params.niter)
            .map(|_| r.u64().map(f64::from_bits).filter(|e| e.is_finite()))
            .collect::<Option<Vec<_>>>()?;
        if r.len()? != params.niter {
            return None;
        }
        let mut blocks = Vec::with_capacity(params.niter);
        for _ in 0..params.niter {
            if r.len()? != params.k {
                return None;
            }
            let signs = SignMatrix::from_packed(r.bytes()?.to_vec(), rows, cols).ok()?;
            let u = r.halves()?;
            let v = r.halves()?;
            if !u.iter().chain(&v).all(|x| x.is_finite()) {
                return None;
            }
            blocks.push(AvdBlock::from_parts(signs, u, v, params.k).ok()?);
        }
        if !r.0.is_empty() {
            return None;
        }
        self.count_reused(1);
        Some((Decomposition { blocks, rel_err }, norm2))
    }

    /// Saves the scores of ordering level `level` (for `candidates`).
    pub fn save_level(&self, level: u32, candidates: &[u32], scores: &[f64]) -> Result<(), Error> {
        let mut p = Vec::new();
        put_u64(&mut p, candidates.len() as u64);
        for (&c, &s) in candidates.iter().zip(scores) {
            put_u64(&mut p, u64::from(c));
            put_u64(&mut p, s.to_bits());
        }
        self.write_record(&format!("level-{level}.bin"), &p)
    }

    /// The scores of `level` saved by an earlier run for exactly these candidates.
    pub fn load_level(&self, level: u32, candidates: &[u32]) -> Option<Vec<f64>> {
        let p = self.read_record(&format!("level-{level}.bin"))?;
        let mut r = Reader(&p);
        if r.len()? != candidates.len() {
            return None;
        }
        let mut scores = Vec::with_capacity(candidates.len());
        for &c in candidates {
            if r.u64()? != u64::from(c) {
                return None;
            }
            scores.push(f64::from_bits(r.u64()?));
        }
        self.count_reused(1);
        Some(scores)
    }

    /// Saves the numbers measured for matrix `index` (`name`) by stage `stage` (e.g. best
    /// mode's sensitivity probe).
    pub fn save_numbers(
        &self,
        stage: &str,
        index: usize,
        name: &str,
        numbers: &[f64],
    ) -> Result<(), Error> {
        let mut p = Vec::new();
        put_bytes(&mut p, name.as_bytes());
        put_u64(&mut p, numbers.len() as u64);
        for x in numbers {
            put_u64(&mut p, x.to_bits());
        }
        self.write_record(&format!("{stage}-{index}.bin"), &p)
    }

    /// The `len` numbers saved by [`Checkpointer::save_numbers`] for matrix `index` of name
    /// `name`, if they are there and intact (not counted as reused: the caller checks them
    /// and counts them with [`Checkpointer::count_reused`] if it keeps them).
    pub fn load_numbers(
        &self,
        stage: &str,
        index: usize,
        name: &str,
        len: usize,
    ) -> Option<Vec<f64>> {
        let p = self.read_record(&format!("{stage}-{index}.bin"))?;
        let mut r = Reader(&p);
        if r.bytes()? != name.as_bytes() || r.len()? != len {
            return None;
        }
        let numbers = (0..len)
            .map(|_| r.u64().map(f64::from_bits))
            .collect::<Option<Vec<_>>>()?;
        if !r.0.is_empty() {
            return None;
        }
        Some(numbers)
    }

    /// Saves f32 vectors under `name` (e.g. the calibration scales).
    pub fn save_vectors(&self, name: &str, vectors: &[Vec<f32>]) -> Result<(), Error> {
        let mut p = Vec::new();
        put_u64(&mut p, vectors.len() as u64);
        for v in vectors {
            put_u64(&mut p, v.len() as u64);
            for x in v {
                p.extend_from_slice(&x.to_bits().to_le_bytes());
            }
        }
        self.write_record(&format!("{name}.bin"), &p)
    }

    /// Vectors saved under `name` by an earlier run (not counted as reused: see
    /// [`Checkpointer::load_numbers`]).
    pub fn load_vectors(&self, name: &str) -> Option<Vec<Vec<f32>>> {
        let p = self.read_record(&format!("{name}.bin"))?;
        let mut r = Reader(&p);
        let n = r.len()?;
        let mut out = Vec::with_capacity(n.min(1 << 16));
        for _ in 0..n {
            let len = r.len()?;
            let raw = r.take(len.checked_mul(4)?)?;
            out.push(
                raw.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            );
        }
        Some(out)
    }

    /// Removes the progress directory (the container is in place).
    pub fn finish(self) -> Result<(), Error> {
        std::fs::remove_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))
    }
}

/// Names the first top-level key on which two run descriptions differ.
fn describe_difference(saved: &serde_json::Value, now: &serde_json::Value) -> String {
    let (Some(a), Some(b)) = (saved.as_object(), now.as_object()) else {
        return "different run".into();
    };
    for (key, value) in b {
        if a.get(key) != Some(value) {
            return format!(
                "{key}: was {}, now {value}",
                a.get(key).map_or("absent".to_string(), |v| v.to_string())
            );
        }
    }
    "different run".into()
}

fn put_u64(p: &mut Vec<u8>, x: u64) {
    p.extend_from_slice(&x.to_le_bytes());
}

fn put_bytes(p: &mut Vec<u8>, b: &[u8]) {
    put_u64(p, b.len() as u64);
    p.extend_from_slice(b);
}

fn put_halves(p: &mut Vec<u8>, h: &[f16]) {
    put_u64(p, h.len() as u64);
    for x in h {
        p.extend_from_slice(&x.to_le_bytes());
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn len(&mut self) -> Option<usize> {
        usize::try_from(self.u64()?).ok()
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.len()?;
        self.take(n)
    }

    fn halves(&mut self) -> Option<Vec<f16>> {
        let n = self.len()?;
        Some(
            self.take(n.checked_mul(2)?)?
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitstack_decompose::{decompose, AvdParams};

    #[test]
    fn matrix_and_level_records_round_trip_bit_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("m.bitstack");
        let run = serde_json::json!({"k": 2});
        let c = Checkpointer::open(&out, Checkpointing::Fresh, &run)
            .unwrap()
            .unwrap();
        let (rows, cols) = (12, 9);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0)
            .collect();
        let params = AvdParams {
            k: 2,
            niter: 3,
            ..AvdParams::default()
        };
        let d = decompose(&w, rows, cols, &params, None).unwrap();
        c.save_matrix(4, "a.weight", &d, 1.25).unwrap();
        c.save_level(2, &[1, 3], &[2.5, f64::NAN]).unwrap();
        c.save_vectors("scales", &[vec![1.0, -0.5], vec![]])
            .unwrap();
        c.save_numbers("probe", 7, "e.weight", &[0.25, f64::INFINITY])
            .unwrap();
        drop(c);
        let c = Checkpointer::open(&out, Checkpointing::Resume, &run)
            .unwrap()
            .unwrap();
        let (back, n2) = c.load_matrix(4, "a.weight", (rows, cols), &params).unwrap();
        assert_eq!(back, d);
        assert_eq!(n2, 1.25);
        assert!(c
            .load_matrix(4, "b.weight", (rows, cols), &params)
            .is_none());
        assert!(c
            .load_matrix(5, "a.weight", (rows, cols), &params)
            .is_none());
        assert!(c
            .load_matrix(4, "a.weight", (cols, rows), &params)
            .is_none());
        // Blocks of another rank or number than this run makes are not taken.
        for other in [
            AvdParams { k: 1, ..params },
            AvdParams { niter: 2, ..params },
            AvdParams { niter: 4, ..params },
        ] {
            assert!(c.load_matrix(4, "a.weight", (rows, cols), &other).is_none());
        }
        // Nor a record, intact as a file, whose factors are not finite.
        let mut blocks = d.blocks.clone();
        let (signs, mut u, v, k) = blocks.remove(1).into_parts();
        u[3] = f16::INFINITY;
        blocks.insert(1, AvdBlock::from_parts(signs, u, v, k).unwrap());
        let bad = Decomposition {
            blocks,
            rel_err: d.rel_err.clone(),
        };
        c.save_matrix(6, "a.weight", &bad, 1.25).unwrap();
        assert!(c
            .load_matrix(6, "a.weight", (rows, cols), &params)
            .is_none());
        c.save_matrix(6, "a.weight", &d, f64::NAN).unwrap();
        assert!(c
            .load_matrix(6, "a.weight", (rows, cols), &params)
            .is_none());
        c.save_matrix(6, "a.weight", &d, 1.25).unwrap();
        assert!(c
            .load_matrix(6, "a.weight", (rows, cols), &params)
            .is_some());
        let s = c.load_level(2, &[1, 3]).unwrap();
        assert_eq!(s[0], 2.5);
        assert!(s[1].is_nan());
        assert!(c.load_level(2, &[1, 4]).is_none());
        assert_eq!(
            c.load_vectors("scales").unwrap(),
            vec![vec![1.0, -0.5], vec![]]
        );
        assert_eq!(
            c.load_numbers("probe", 7, "e.weight", 2).unwrap(),
            vec![0.25, f64::INFINITY]
        );
        assert!(c.load_numbers("probe", 7, "f.weight", 2).is_none());
        assert!(c.load_numbers("probe", 7, "e.weight", 3).is_none());
        assert!(c.load_numbers("probe", 6, "e.weight", 2).is_none());
        // A damaged record is ignored (recomputed), never misread.
        let path = c.dir().join("matrix-4.bin");
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        assert!(c
            .load_matrix(4, "a.weight", (rows, cols), &params)
            .is_none());
        std::fs::write(&path, &bytes[..mid]).unwrap();
        assert!(c
            .load_matrix(4, "a.weight", (rows, cols), &params)
            .is_none());
        // Other options: refused, naming the difference.
        let e = Checkpointer::open(&out, Checkpointing::Resume, &serde_json::json!({"k": 4}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("k: was 2, now 4"), "{e}");
        // A damaged description of the run: refused, naming the file.
        let run_file = c.dir().join("run.json");
        let text = std::fs::read(&run_file).unwrap();
        std::fs::write(&run_file, &text[..text.len() - 2]).unwrap();
        let e = Checkpointer::open(&out, Checkpointing::Resume, &run)
            .unwrap_err()
            .to_string();
        assert!(e.contains("run.json is damaged"), "{e}");
        assert!(e.contains("run without --resume"), "{e}");
        std::fs::write(&run_file, &text).unwrap();
        assert!(Checkpointer::open(&out, Checkpointing::Resume, &run).is_ok());
        c.finish().unwrap();
        let e = Checkpointer::open(&out, Checkpointing::Resume, &run)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no progress to resume"), "{e}");
    }
}
