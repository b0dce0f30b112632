//! The storage error type. Every I/O error names the file it happened on.

use std::path::PathBuf;

use crate::pos::LogPos;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("i/o on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A flush failed earlier; the log refuses appends until the process restarts and recovers.
    #[error("commit log is read-only after a failed flush: {reason}")]
    Poisoned { reason: String },
    #[error("corrupt data in {path} at byte {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: &'static str,
    },
    /// The record breaks a size limit of the format or of the configuration.
    #[error("record rejected: {field} is {actual} bytes, the limit is {limit}")]
    TooLarge {
        field: &'static str,
        actual: usize,
        limit: usize,
    },
    #[error(
        "disk usage {usage_percent:.1}% of {path} is above the {watermark_percent:.1}% watermark; appends are refused until space is freed"
    )]
    DiskFull {
        path: PathBuf,
        usage_percent: f64,
        watermark_percent: f64,
    },
    #[error("no record at commit-log position {pos}: {reason}")]
    NoRecord { pos: LogPos, reason: &'static str },
    /// The records a caller waited for were removed by `truncate_uncommitted`.
    #[error("records from {from} on were truncated before they became durable")]
    Truncated { from: LogPos },
    #[error("invalid storage option {field}: {reason}")]
    InvalidOption { field: &'static str, reason: String },
    #[error("the store is closed")]
    Closed,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches a path to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn at(self, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: &std::path::Path) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}
