//! Small state files (metadata, consumer snapshots) replaced atomically: write a temporary
//! file, fsync it, rename it over the old one, fsync the directory. A crash leaves either the
//! old file or the new one, never a mix. The syncs go through the store's file system, and a
//! failed one stops the node as a failed log sync does: what reached the disk is then unknown.

use std::fs;
use std::io::Write;
use std::path::Path;

use ferrumq_storage::{MessageStore, create_dir_all_durably};

use crate::error::BrokerError;

pub(crate) fn replace_file(
    store: &MessageStore,
    path: &Path,
    bytes: &[u8],
) -> Result<(), BrokerError> {
    let io = |source| BrokerError::Io {
        path: path.to_owned(),
        source,
    };
    let synced = |result: std::io::Result<()>| {
        result.map_err(|source| {
            store.fail_stop(format!("sync of {} failed: {source}", path.display()));
            io(source)
        })
    };
    let fs = store.file_system();
    let dir = path.parent().unwrap_or(Path::new("."));
    synced(create_dir_all_durably(fs.as_ref(), dir))?;
    let tmp = path.with_extension("tmp");
    let mut file = fs::File::create(&tmp).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    synced(fs.sync_file_data(&file))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io)?;
    synced(fs.sync_dir(dir))
}

/// The file's bytes, or `None` if it does not exist.
pub(crate) fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, BrokerError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(BrokerError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use ferrumq_storage::{DiskUsage, FileSystem, RealFileSystem, StoreOptions};
    use memmap2::MmapRaw;

    use super::*;

    /// The real file system, whose directory syncs fail once `broken` is set.
    #[derive(Default)]
    struct BrokenDirSync {
        broken: AtomicBool,
    }

    impl FileSystem for BrokenDirSync {
        fn sync_mapped_range(
            &self,
            path: &Path,
            map: &MmapRaw,
            offset: usize,
            len: usize,
        ) -> std::io::Result<()> {
            RealFileSystem.sync_mapped_range(path, map, offset, len)
        }
        fn sync_file_data(&self, file: &fs::File) -> std::io::Result<()> {
            RealFileSystem.sync_file_data(file)
        }
        fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
            if self.broken.load(Ordering::SeqCst) {
                return Err(std::io::Error::from_raw_os_error(5)); // EIO
            }
            RealFileSystem.sync_dir(dir)
        }
        fn disk_usage(&self, path: &Path) -> std::io::Result<DiskUsage> {
            RealFileSystem.disk_usage(path)
        }
    }

    /// After a failed sync what reached the disk is unknown: the node stops, as it does when
    /// a log sync fails, rather than carry on or retry.
    #[test]
    fn a_failed_sync_of_a_state_file_stops_the_node() {
        let dir = tempfile::tempdir().unwrap();
        let fs = Arc::new(BrokenDirSync::default());
        let options = StoreOptions {
            fs: fs.clone(),
            ..StoreOptions::for_tests()
        };
        let store = MessageStore::open(&dir.path().join("store"), options).unwrap();
        let path = dir.path().join("state.json");
        replace_file(&store, &path, b"1").unwrap();
        assert!(store.log().failure().is_none());
        fs.broken.store(true, Ordering::SeqCst);
        assert!(replace_file(&store, &path, b"2").is_err());
        let failure = store.log().failure().expect("the node stopped");
        assert!(failure.contains("state.json"), "{failure}");
    }
}
