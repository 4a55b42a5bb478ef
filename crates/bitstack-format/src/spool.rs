//! Block data parked on disk until the container is written: [`Spool`].

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::FormatError;

/// An append-only temporary file for block data that exists before the container can be
/// written: the header, which comes first, holds every block's offset and checksum, so a
/// compressor that produces blocks matrix by matrix would otherwise hold them all in
/// memory (two bytes per weight for 16 blocks — 16 GB for an 8B model).
///
/// The file is created in a directory of the caller's choice (the output's, so that it is
/// on a disk with room for the output) under a hidden name, and removed when the spool is
/// dropped; on Unix it is unlinked as soon as it is open, so not even a killed process
/// leaves it behind. Appends and reads may come from several threads.
///
/// ```
/// use std::sync::Arc;
/// use bitstack_format::Spool;
///
/// let spool = Spool::create_in(&std::env::temp_dir())?;
/// let a = spool.append(&[b"signs", b"uv"])?;
/// let b = spool.append(&[b"more"])?;
/// assert_eq!(spool.read(a)?, b"signsuv");
/// assert_eq!(spool.read(b)?, b"more");
/// assert_eq!(spool.len(), 11);
/// # Ok::<(), bitstack_format::FormatError>(())
/// ```
#[derive(Debug)]
pub struct Spool {
    path: PathBuf,
    file: Mutex<SpoolFile>,
}

#[derive(Debug)]
struct SpoolFile {
    file: File,
    len: u64,
}

/// Where [`Spool::append`] put its bytes: offset, length and their CRC-32 (checked again
/// whenever they are read back).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpoolRange {
    offset: u64,
    len: u64,
    crc32: u32,
}

impl SpoolRange {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether no byte was appended.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// CRC-32 of the bytes.
    pub fn crc32(&self) -> u32 {
        self.crc32
    }
}

impl Spool {
    /// A new, empty spool file in `dir`.
    pub fn create_in(dir: &Path) -> Result<Spool, FormatError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let path = dir.join(format!(
            ".bitstack-spool-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|source| FormatError::Io {
                file: path.display().to_string(),
                action: "create a temporary spool file for the blocks as",
                source,
            })?;
        // The open handle keeps the data; the name is not needed any more.
        #[cfg(unix)]
        let _ = std::fs::remove_file(&path);
        Ok(Spool {
            path,
            file: Mutex::new(SpoolFile { file, len: 0 }),
        })
    }

    /// The path the spool was created as (already unlinked on Unix).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes appended so far.
    pub fn len(&self) -> u64 {
        self.lock().len
    }

    /// Whether nothing was appended yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SpoolFile> {
        // A panic while holding the lock leaves `len` consistent with what was written
        // (it is updated last), so a poisoned lock is still usable.
        self.file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn io(&self, action: &'static str) -> impl FnOnce(std::io::Error) -> FormatError + '_ {
        move |source| FormatError::Io {
            file: self.path.display().to_string(),
            action,
            source,
        }
    }

    /// Appends the concatenation of `pieces`; returns where it lies.
    pub fn append(&self, pieces: &[&[u8]]) -> Result<SpoolRange, FormatError> {
        let mut crc = crc32fast::Hasher::new();
        let mut len = 0u64;
        for piece in pieces {
            crc.update(piece);
            len += piece.len() as u64;
        }
        let mut guard = self.lock();
        let offset = guard.len;
        let end = offset.checked_add(len).ok_or_else(|| FormatError::Spool {
            file: self.path.display().to_string(),
            reason: "more than 2^64 bytes spooled".into(),
        })?;
        let f = &mut guard.file;
        f.seek(SeekFrom::Start(offset))
            .map_err(self.io("seek in the spool file"))?;
        for piece in pieces {
            f.write_all(piece)
                .map_err(self.io("write blocks to the spool file (is the disk full?)"))?;
        }
        guard.len = end;
        Ok(SpoolRange {
            offset,
            len,
            crc32: crc.finalize(),
        })
    }

    /// The bytes of `range`, after checking their CRC-32.
    pub fn read(&self, range: SpoolRange) -> Result<Vec<u8>, FormatError> {
        let len = usize::try_from(range.len).map_err(|_| FormatError::Spool {
            file: self.path.display().to_string(),
            reason: format!(
                "a spooled range of {} bytes does not fit in memory",
                range.len
            ),
        })?;
        let mut bytes = vec![0u8; len];
        self.read_chunks(range, |chunk, at| {
            bytes[at..at + chunk.len()].copy_from_slice(chunk);
            Ok(())
        })?;
        Ok(bytes)
    }

    /// Copies the bytes of `range` to `out`, checking their CRC-32 on the way.
    pub fn copy_to(&self, range: SpoolRange, out: &mut dyn Write) -> Result<(), FormatError> {
        self.read_chunks(range, |chunk, _| out.write_all(chunk))
    }

    /// Reads `range` in 1 MiB chunks, handing each (with its offset in the range) to `f`,
    /// then checks the CRC-32. Errors of `f` are reported as write errors.
    fn read_chunks(
        &self,
        range: SpoolRange,
        mut f: impl FnMut(&[u8], usize) -> std::io::Result<()>,
    ) -> Result<(), FormatError> {
        const CHUNK: usize = 1 << 20;
        let mut guard = self.lock();
        if range.offset.saturating_add(range.len) > guard.len {
            return Err(FormatError::Spool {
                file: self.path.display().to_string(),
                reason: format!(
                    "bytes [{}, {}) were never spooled ({} bytes are)",
                    range.offset,
                    range.offset.saturating_add(range.len),
                    guard.len
                ),
            });
        }
        let file = &mut guard.file;
        file.seek(SeekFrom::Start(range.offset))
            .map_err(self.io("seek in the spool file"))?;
        let mut buf = vec![0u8; CHUNK.min(usize::try_from(range.len).unwrap_or(CHUNK))];
        let mut crc = crc32fast::Hasher::new();
        let mut done = 0u64;
        while done < range.len {
            let n = usize::try_from((range.len - done).min(buf.len() as u64)).unwrap_or(0);
            file.read_exact(&mut buf[..n])
                .map_err(self.io("read back the spool file"))?;
            crc.update(&buf[..n]);
            f(&buf[..n], usize::try_from(done).unwrap_or(usize::MAX))
                .map_err(self.io("write spooled blocks out"))?;
            done += n as u64;
        }
        if crc.finalize() != range.crc32 {
            return Err(FormatError::Spool {
                file: self.path.display().to_string(),
                reason: format!(
                    "bytes [{}, {}) changed on disk since they were spooled (CRC-32 mismatch)",
                    range.offset,
                    range.offset + range.len
                ),
            });
        }
        Ok(())
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        // Unix: already unlinked at creation. Elsewhere: best effort.
        #[cfg(not(unix))]
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Whatever is appended (from any mix of piece sizes, some over a read chunk) reads
        /// back byte for byte, in any order, and as the concatenation of the appends.
        #[test]
        fn appends_read_back(
            records in prop::collection::vec(
                prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..4),
                1..12,
            ),
            big in 0usize..3,
        ) {
            let spool = Spool::create_in(&std::env::temp_dir()).unwrap();
            let mut expected_all = Vec::new();
            let mut ranges = Vec::new();
            for (i, pieces) in records.iter().enumerate() {
                let mut pieces: Vec<Vec<u8>> = pieces.clone();
                if i == big {
                    pieces.push((0..(1usize << 20) + 77).map(|j| (j * 31 % 251) as u8).collect());
                }
                let refs: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
                let joined: Vec<u8> = pieces.concat();
                ranges.push((spool.append(&refs).unwrap(), joined.clone()));
                expected_all.extend_from_slice(&joined);
            }
            prop_assert_eq!(spool.len(), expected_all.len() as u64);
            for (range, joined) in ranges.iter().rev() {
                prop_assert_eq!(range.len(), joined.len() as u64);
                prop_assert_eq!(range.crc32(), crc32fast::hash(joined));
                prop_assert_eq!(&spool.read(*range).unwrap(), joined);
            }
            let mut out = Vec::new();
            for (range, _) in &ranges {
                spool.copy_to(*range, &mut out).unwrap();
            }
            prop_assert_eq!(out, expected_all);
        }
    }

    #[test]
    fn changed_bytes_are_an_error() {
        let spool = Spool::create_in(&std::env::temp_dir()).unwrap();
        let range = spool.append(&[b"hello world"]).unwrap();
        {
            let mut g = spool.lock();
            g.file.seek(SeekFrom::Start(3)).unwrap();
            g.file.write_all(b"X").unwrap();
        }
        let err = spool.read(range).unwrap_err().to_string();
        assert!(err.contains("changed on disk"), "{err}");
        let mut out = Vec::new();
        assert!(spool.copy_to(range, &mut out).is_err());
    }

    #[test]
    fn a_range_past_the_end_is_an_error() {
        let spool = Spool::create_in(&std::env::temp_dir()).unwrap();
        let mut range = spool.append(&[b"abc"]).unwrap();
        range.len = 10;
        let err = spool.read(range).unwrap_err().to_string();
        assert!(err.contains("never spooled"), "{err}");
    }

    #[test]
    fn a_missing_directory_is_named() {
        let err = Spool::create_in(Path::new("/nonexistent/dir/for/bitstack"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/dir/for/bitstack"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn nothing_is_left_on_disk() {
        let dir = std::env::temp_dir().join(format!("bitstack-spool-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let spool = Spool::create_in(&dir).unwrap();
        spool.append(&[b"data"]).unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        drop(spool);
        std::fs::remove_dir(&dir).unwrap();
    }
}
