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
