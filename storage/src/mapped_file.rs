//! A fixed-size, memory-mapped file, named by the 20-digit number of its first unit: commit-log
//! segments (a byte position), consume-queue files (a queue offset) and index files.
//!
//! Every owner keeps two invariants that make the shared mapping safe to use: only one writer
//! writes, and only to bytes at or past its published write position; readers only read bytes
//! below it (or the owner serializes both behind a lock, as the message index does).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use memmap2::{MmapOptions, MmapRaw};

use crate::error::{IoContext, Result};
use crate::fs::FileSystem;

#[derive(Debug)]
pub(crate) struct MappedFile {
    base: u64,
    path: PathBuf,
    /// `None` once released (`release_descriptor`): the mapping needs no descriptor.
    file: Option<File>,
    map: MmapRaw,
}

impl MappedFile {
    pub(crate) fn file_name(base: u64) -> String {
        format!("{base:020}")
    }

    /// Creates a new zero-filled file and makes its existence durable: an fdatasync of the
    /// file (its size) and an fsync of the directory (its name).
    pub(crate) fn create(
        dir: &Path,
        base: u64,
        size_bytes: u64,
        fs: &dyn FileSystem,
    ) -> Result<MappedFile> {
        let created = MappedFile::create_unsynced(dir, base, size_bytes)?;
        created.sync_data(fs).at(&created.path)?;
        fs.sync_dir(dir).at(dir)?;
        Ok(created)
    }

    /// Creates a new zero-filled file, leaving its size and name to be made durable by the
    /// caller (a consume queue's syncs at the next checkpoint do both).
    pub(crate) fn create_unsynced(dir: &Path, base: u64, size_bytes: u64) -> Result<MappedFile> {
        let path = dir.join(MappedFile::file_name(base));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .at(&path)?;
        file.set_len(size_bytes).at(&path)?;
        MappedFile::map(path, file, base)
    }

    /// Replaces the file at `base` with one of `size_bytes` that holds `prefix` and zeros
    /// after it, durably (written beside it, synced, renamed over it, directory synced). The
    /// old file's mappings keep the old bytes: a reader holding them is never written under.
    pub(crate) fn replace_with_prefix(
        dir: &Path,
        base: u64,
        size_bytes: u64,
        prefix: &[u8],
        fs: &dyn FileSystem,
    ) -> Result<MappedFile> {
        use std::os::unix::fs::FileExt;
        let path = dir.join(MappedFile::file_name(base));
        let tmp = dir.join(format!("{}.tmp", MappedFile::file_name(base)));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .at(&tmp)?;
        file.set_len(size_bytes).at(&tmp)?;
        file.write_all_at(prefix, 0).at(&tmp)?;
        fs.sync_file_data(&file).at(&tmp)?;
        std::fs::rename(&tmp, &path).at(&path)?;
        fs.sync_dir(dir).at(dir)?;
        MappedFile::map(path, file, base)
    }

    /// Opens an existing file. A file shorter than `size_bytes` (cut by a crash or by hand)
    /// is extended with zeros, which recovery reads as "never written"; `was_short` tells.
    pub(crate) fn open(path: &Path, base: u64, size_bytes: u64) -> Result<MappedFile> {
        Ok(MappedFile::open_checked(path, base, size_bytes)?.0)
    }

    pub(crate) fn open_checked(
        path: &Path,
        base: u64,
        size_bytes: u64,
    ) -> Result<(MappedFile, bool)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .at(path)?;
        let len = file.metadata().at(path)?.len();
        if len > size_bytes {
            return Err(crate::Error::InvalidOption {
                field: "file size",
                reason: format!(
                    "{} is {len} bytes, larger than the configured size {size_bytes}",
                    path.display()
                ),
            });
        }
        let was_short = len < size_bytes;
        if was_short {
            file.set_len(size_bytes).at(path)?;
        }
        Ok((MappedFile::map(path.to_path_buf(), file, base)?, was_short))
    }

    fn map(path: PathBuf, file: File, base: u64) -> Result<MappedFile> {
        // The data directory is locked by one process and files are never truncated by anyone
        // else while mapped; all access goes through the bounds-checked methods below.
        let map = MmapOptions::new().map_raw(&file).at(&path)?;
        Ok(MappedFile {
            base,
            path,
            file: Some(file),
            map,
        })
    }

    /// Tells the kernel not to read around a page fault in this file. A consume-queue file is
    /// mostly a hole that is written 32 bytes at a time; without this, the first write to a
    /// queue faults in (and zeroes) a whole read-ahead window of it.
    pub(crate) fn advise_random(&self) {
        if let Err(error) = self.map.advise(memmap2::Advice::Random) {
            tracing::debug!(path = %self.path.display(), %error, "could not advise random access");
        }
    }

    /// Closes the file's descriptor and keeps only the mapping, which reads, writes through
    /// the mapping and `sync` still work on. Consume queues do this, so that a store of
    /// 80,000 queues does not hold 80,000 descriptors; `write_at`, `sync_data`,
    /// `discard_from` and `modified` fail afterwards.
    pub(crate) fn release_descriptor(&mut self) {
        self.file = None;
    }

    fn descriptor(&self) -> std::io::Result<&File> {
        self.file.as_ref().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "the file's descriptor was released; only its mapping is kept",
            )
        })
    }

    pub(crate) fn base(&self) -> u64 {
        self.base
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The base read as a commit-log position (for commit-log segments).
    pub(crate) fn base_pos(&self) -> crate::pos::LogPos {
        crate::pos::LogPos(self.base)
    }

    pub(crate) fn remove(&self) -> Result<()> {
        std::fs::remove_file(&self.path).at(&self.path)
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Bytes `[from, to)` of the file. The caller guarantees they are below the published
    /// write position (see the module invariants), so nobody writes them concurrently.
    pub(crate) fn bytes(&self, from: usize, to: usize) -> &[u8] {
        assert!(
            from <= to && to <= self.map.len(),
            "mapped read out of bounds"
        );
        // SAFETY: in bounds (checked above); the mapping lives as long as `self`; by the module
        // invariant no one writes this range while the returned borrow exists.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts(self.map.as_ptr().add(from), to - from)
        }
    }

    /// Bytes `[from, to)` for writing. Only the writer calls this, for bytes at or past the
    /// published write position, which no reader touches.
    #[allow(clippy::mut_from_ref)]
    pub(crate) fn bytes_mut(&self, from: usize, to: usize) -> &mut [u8] {
        assert!(
            from <= to && to <= self.map.len(),
            "mapped write out of bounds"
        );
        // SAFETY: in bounds; the owner makes the caller the only writer, and readers stay
        // below the published write position, so this range is not aliased.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts_mut(self.map.as_mut_ptr().add(from), to - from)
        }
    }

    /// Writes `bytes` at `offset` through the page cache (pwrite), which the mapping sees at
    /// once. The commit log writes this way rather than through the mapping: the kernel then
    /// writes back whole runs of pages instead of page by page, a full disk is an error rather
    /// than a SIGBUS, and the writer takes no page fault per fresh page.
    pub(crate) fn write_at(&self, offset: usize, bytes: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        assert!(
            offset + bytes.len() <= self.map.len(),
            "file write out of bounds"
        );
        self.descriptor()?.write_all_at(bytes, offset as u64)
    }

    /// Faults in the pages of `[from, to)` for writing in one system call, so a writer that
    /// copies into them afterwards takes no page fault per page. On a kernel without
    /// `MADV_POPULATE_WRITE` (before 5.14) this does nothing and the pages fault in one by one.
    pub(crate) fn populate_for_write(&self, from: usize, to: usize) {
        let to = to.min(self.map.len());
        if from >= to {
            return;
        }
        // SAFETY: the range is inside the mapping; populating pages does not change their
        // contents (the kernel pre-faults them as if each were written with its current value).
        #[allow(unsafe_code)]
        let rc = unsafe {
            libc::madvise(
                self.map.as_mut_ptr().add(from).cast(),
                to - from,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if rc != 0 {
            tracing::debug!(path = %self.path.display(), error = %std::io::Error::last_os_error(), "could not pre-fault pages");
        }
    }

    /// Makes every written byte of the file durable (fdatasync).
    pub(crate) fn sync_data(&self, fs: &dyn FileSystem) -> std::io::Result<()> {
        fs.sync_file_data(self.descriptor()?)
    }

    /// Makes bytes `[from, to)` durable.
    pub(crate) fn sync(&self, fs: &dyn FileSystem, from: usize, to: usize) -> std::io::Result<()> {
        if to > from {
            fs.sync_mapped_range(&self.path, &self.map, from, to - from)?;
        }
        Ok(())
    }

    /// Drops everything from `offset` on: the file is cut there and extended again, so the
    /// dropped bytes read as zeros, and the cut is made durable.
    pub(crate) fn discard_from(&self, offset: usize, fs: &dyn FileSystem) -> Result<()> {
        let size = self.map.len() as u64;
        let file = self.descriptor().at(&self.path)?;
        file.set_len(offset as u64).at(&self.path)?;
        file.set_len(size).at(&self.path)?;
        fs.sync_file_data(file).at(&self.path)
    }

    /// The file's last modification time, for age-based retention.
    pub(crate) fn modified(&self) -> Result<std::time::SystemTime> {
        self.descriptor()
            .and_then(File::metadata)
            .and_then(|m| m.modified())
            .at(&self.path)
    }
}

/// Whether any byte of `file` from `from` on is not zero. Reads the rest of the page holding
/// `from`, then asks the file system where data lies beyond it (`SEEK_DATA`), so the holes of
/// a sparse file cost nothing; after a few pages of data it answers yes without reading on.
pub(crate) fn holds_data_from(file: &File, from: u64) -> std::io::Result<bool> {
    use std::os::unix::fs::FileExt;
    const PAGE: u64 = 4096;
    const PAGES_READ: usize = 16;
    let len = file.metadata()?.len();
    let mut page = vec![0u8; PAGE as usize];
    let mut at = from;
    for _ in 0..PAGES_READ {
        if at >= len {
            return Ok(false);
        }
        let page_end = (at / PAGE + 1) * PAGE;
        let chunk = &mut page[..usize::try_from(page_end.min(len) - at).unwrap_or(0)];
        file.read_exact_at(chunk, at)?;
        if chunk.iter().any(|&byte| byte != 0) {
            return Ok(true);
        }
        match seek(file, page_end, libc::SEEK_DATA) {
            Ok(Some(data)) => at = data,
            Ok(None) => return Ok(false),
            // The file system cannot say where data lies: assume there is some.
            Err(_) => return Ok(true),
        }
    }
    Ok(true)
}

/// Where the file's first hole begins (its length if it has none, or if the file system
/// cannot say).
pub(crate) fn data_end(file: &File) -> std::io::Result<u64> {
    match seek(file, 0, libc::SEEK_HOLE) {
        Ok(Some(hole)) => Ok(hole),
        Ok(None) | Err(_) => Ok(file.metadata()?.len()),
    }
}

/// `lseek` to `offset` with `whence` (`SEEK_DATA` or `SEEK_HOLE`); `None` when the file has
/// nothing of that kind past `offset` (ENXIO).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    use std::os::fd::AsRawFd;
    let offset = libc::off_t::try_from(offset)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek on a descriptor the caller borrows to us; it moves only the file offset,
    // which nothing in this crate relies on (reads and writes are positioned).
    #[allow(unsafe_code)]
    let found = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if found < 0 {
        let error = std::io::Error::last_os_error();
        return match error.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(error),
        };
    }
    Ok(u64::try_from(found).ok())
}
