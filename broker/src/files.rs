//! Small state files (metadata, consumer snapshots) replaced atomically: write a temporary
//! file, fsync it, rename it over the old one, fsync the directory. A crash leaves either the
//! old file or the new one, never a mix.

use std::fs;
use std::io::Write;
use std::path::Path;

use crate::error::BrokerError;

pub(crate) fn replace_file(path: &Path, bytes: &[u8]) -> Result<(), BrokerError> {
    let io = |source| BrokerError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io)?;
    let tmp = path.with_extension("tmp");
    let mut file = fs::File::create(&tmp).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    fs::rename(&tmp, path).map_err(io)?;
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)
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
