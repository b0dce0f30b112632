//! The file-system seam: every fsync and every disk-usage reading goes through
//! [`FileSystem`], so tests can inject a failed fsync or a full disk without root or a
//! special mount, and [`CrashFileSystem`] can tell what was written from what was made
//! durable and cut the power. Production uses [`RealFileSystem`].

mod crash;

pub use crash::CrashFileSystem;

use std::fs::File;
use std::io;
use std::path::Path;

use memmap2::MmapRaw;

/// How full the file system that holds the data directory is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DiskUsage {
    pub total_bytes: u64,
    /// Free blocks, including those reserved for the superuser.
    pub free_bytes: u64,
    /// Free blocks an unprivileged process may use.
    pub available_bytes: u64,
}

impl DiskUsage {
    /// The share of the usable space that is used, the figure `df` prints as `Use%`:
    /// blocks reserved for the superuser count neither as used nor as usable.
    pub fn used_ratio(&self) -> f64 {
        let used = self.total_bytes.saturating_sub(self.free_bytes);
        let usable = used.saturating_add(self.available_bytes);
        if usable == 0 {
            return 0.0;
        }
        used as f64 / usable as f64
    }
}

/// The durability and capacity operations of the file system.
pub trait FileSystem: Send + Sync + 'static {
    /// Makes `len` bytes from `offset` of the file at `path`, mapped at `map`, durable
    /// (msync with `MS_SYNC`).
    fn sync_mapped_range(
        &self,
        path: &Path,
        map: &MmapRaw,
        offset: usize,
        len: usize,
    ) -> io::Result<()>;
    /// Makes a file's data durable (fdatasync).
    fn sync_file_data(&self, file: &File) -> io::Result<()>;
    /// Makes a directory's entries durable, after a file was created, renamed or removed in it.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// The usage of the file system holding `path`.
    fn disk_usage(&self, path: &Path) -> io::Result<DiskUsage>;
}

/// Creates `dir` and any missing parents, each new name made durable in its parent before
/// this returns: a store must not acknowledge a write into a directory a power cut can lose.
pub fn create_dir_all_durably(fs: &dyn FileSystem, dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let missing: Vec<&Path> = dir.ancestors().take_while(|p| !p.exists()).collect();
    std::fs::create_dir_all(dir)?;
    for created in missing {
        match created.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => fs.sync_dir(parent)?,
            _ => fs.sync_dir(Path::new("."))?,
        }
    }
    Ok(())
}

/// The operating system's file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFileSystem;

impl FileSystem for RealFileSystem {
    fn sync_mapped_range(
        &self,
        _path: &Path,
        map: &MmapRaw,
        offset: usize,
        len: usize,
    ) -> io::Result<()> {
        map.flush_range(offset, len)
    }

    fn sync_file_data(&self, file: &File) -> io::Result<()> {
        file.sync_data()
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn disk_usage(&self, path: &Path) -> io::Result<DiskUsage> {
        statvfs(path)
    }
}

#[allow(unsafe_code)]
fn statvfs(path: &Path) -> io::Result<DiskUsage> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c_path` is a valid NUL-terminated string and `stat` points to writable memory
    // of the right type; statvfs writes only into it.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled the whole struct.
    let stat = unsafe { stat.assume_init() };
    let block = stat.f_frsize;
    Ok(DiskUsage {
        total_bytes: stat.f_blocks * block,
        free_bytes: stat.f_bfree * block,
        available_bytes: stat.f_bavail * block,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statvfs_reads_the_temp_dir() {
        let usage = RealFileSystem.disk_usage(&std::env::temp_dir()).unwrap();
        assert!(usage.total_bytes > 0);
        assert!(usage.available_bytes <= usage.total_bytes);
        let ratio = usage.used_ratio();
        assert!((0.0..=1.0).contains(&ratio));
    }

    #[test]
    fn used_ratio_leaves_out_reserved_blocks_like_df() {
        // 100 blocks, 60 free of which 10 are reserved: 40 used of 90 usable.
        let usage = DiskUsage {
            total_bytes: 100,
            free_bytes: 60,
            available_bytes: 50,
        };
        assert!((usage.used_ratio() - 40.0 / 90.0).abs() < 1e-9);
        let empty = DiskUsage {
            total_bytes: 0,
            free_bytes: 0,
            available_bytes: 0,
        };
        assert_eq!(empty.used_ratio(), 0.0);
    }
}
