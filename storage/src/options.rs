//! Storage configuration, with the defaults a production broker uses and a small shape for tests.

use std::sync::Arc;
use std::time::Duration;

use crate::commit_log::FlushMode;
use crate::error::{Error, Result};
use crate::fs::{FileSystem, RealFileSystem};
use crate::message_index::IndexShape;

#[derive(Clone)]
pub struct StoreOptions {
    /// Size of each commit-log segment file. Fixed for the life of a data directory.
    pub segment_size_bytes: u64,
    pub flush: FlushMode,
    /// In `sync` mode the flusher waits up to this long for a batch as large as its last one
    /// before it flushes (see the commit log's group commit); zero flushes at once.
    pub group_commit_window: Duration,
    /// Entries per consume-queue file (32 bytes each).
    pub queue_entries_per_file: u64,
    pub index_shape: IndexShape,
    /// How often the dispatcher writes a checkpoint; recovery re-checks at most the records
    /// written since the last one.
    pub checkpoint_interval: Duration,
    /// A checkpoint is also written once this many bytes were dispatched since the last one,
    /// so the tail recovery re-checks stays bounded however fast the log is written.
    pub checkpoint_max_bytes: u64,
    /// Appends wait while the dispatcher is further than this behind the written end. With
    /// `checkpoint_max_bytes` it bounds what recovery re-checks after a crash.
    pub max_dispatch_lag_bytes: u64,
    /// Segments last modified longer ago than this are deleted; `None` keeps everything.
    pub retention: Option<Duration>,
    /// Appends are refused while the disk is fuller than this fraction (0.0–1.0).
    pub disk_watermark: f64,
    /// How often retention and the disk watermark are checked.
    pub housekeeping_interval: Duration,
    pub fs: Arc<dyn FileSystem>,
}

impl Default for StoreOptions {
    fn default() -> StoreOptions {
        StoreOptions {
            segment_size_bytes: 1 << 30,
            flush: FlushMode::Sync,
            group_commit_window: Duration::from_micros(200),
            queue_entries_per_file: 300_000,
            index_shape: IndexShape {
                slots: 1 << 20,
                entries: 4 << 20,
            },
            checkpoint_interval: Duration::from_secs(1),
            checkpoint_max_bytes: 64 << 20,
            max_dispatch_lag_bytes: 64 << 20,
            retention: Some(Duration::from_secs(72 * 3600)),
            disk_watermark: 0.90,
            housekeeping_interval: Duration::from_secs(10),
            fs: Arc::new(RealFileSystem),
        }
    }
}

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreOptions")
            .field("segment_size_bytes", &self.segment_size_bytes)
            .field("flush", &self.flush)
            .field("group_commit_window", &self.group_commit_window)
            .field("queue_entries_per_file", &self.queue_entries_per_file)
            .field("index_shape", &self.index_shape)
            .field("checkpoint_interval", &self.checkpoint_interval)
            .field("checkpoint_max_bytes", &self.checkpoint_max_bytes)
            .field("max_dispatch_lag_bytes", &self.max_dispatch_lag_bytes)
            .field("retention", &self.retention)
            .field("disk_watermark", &self.disk_watermark)
            .field("housekeeping_interval", &self.housekeeping_interval)
            .finish_non_exhaustive()
    }
}

impl StoreOptions {
    /// Small files, so tests roll segments and queue files often.
    pub fn for_tests() -> StoreOptions {
        StoreOptions {
            segment_size_bytes: 64 * 1024,
            queue_entries_per_file: 64,
            index_shape: IndexShape {
                slots: 64,
                entries: 256,
            },
            checkpoint_interval: Duration::from_millis(50),
            housekeeping_interval: Duration::from_millis(50),
            // Tests must not fail because the machine's disk happens to be nearly full.
            disk_watermark: 1.0,
            ..StoreOptions::default()
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let invalid = |field, reason: &str| {
            Err(Error::InvalidOption {
                field,
                reason: reason.to_owned(),
            })
        };
        if self.segment_size_bytes < 64 * 1024 || self.segment_size_bytes > 1 << 40 {
            return invalid("segment_size_bytes", "must be between 64 KiB and 1 TiB");
        }
        if self.queue_entries_per_file == 0 {
            return invalid("queue_entries_per_file", "must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.disk_watermark) {
            return invalid("disk_watermark", "must be a fraction between 0.0 and 1.0");
        }
        if let FlushMode::Async { interval } = self.flush
            && interval.is_zero()
        {
            return invalid("flush", "the async flush interval must be above zero");
        }
        Ok(())
    }
}
