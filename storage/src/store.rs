//! `MessageStore`: the commit log plus everything derived from it, kept in step by the
//! dispatcher thread, checkpointed, recovered on open, and trimmed by retention.
//!
//! The dispatcher is the only writer of consume queues and the index. It follows the commit log
//! up to `CommitLog::dispatchable_end`, and every `checkpoint_interval` it makes the log and the
//! derived files durable and records how far it got. Recovery re-checks and re-dispatches only
//! what lies past that checkpoint.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::checkpoint::{Checkpoint, CheckpointFile};
use crate::commit_log::{Appended, CommitLog, DiskFull, Durable, StoredRecord};
use crate::consume_queue::{ConsumeQueue, ConsumeQueueEntry, ConsumeQueues, tag_hash_bytes};
use crate::error::{Error, IoContext, Result};
use crate::fs::{DiskUsage, FileSystem, create_dir_all_durably};
use crate::message_index::{IndexKey, MessageIndex, message_id_hash, message_key_hash};
use crate::options::StoreOptions;
use crate::pos::{LogPos, QueueOffset};
use crate::record::{NewRecord, keys};

/// What `MessageStore::open` found and did.
#[derive(Debug, Clone)]
pub struct RecoveryReport {
    /// The previous run shut down cleanly.
    pub clean_shutdown: bool,
    pub checkpoint: Checkpoint,
    /// Records were checked from here...
    pub scanned_from: LogPos,
    /// ...to here, the valid end of the log.
    pub valid_end: LogPos,
    pub records_scanned: u64,
    pub records_redispatched: u64,
    /// Where a damaged (not merely unwritten) record ended the log, and why.
    pub damage: Option<(LogPos, &'static str)>,
    pub elapsed: Duration,
}

/// What one retention pass removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionReport {
    pub segments_removed: Vec<LogPos>,
    pub min_pos: LogPos,
}

pub struct MessageStore {
    inner: Arc<Inner>,
    dispatcher: Mutex<Option<JoinHandle<()>>>,
    recovery: RecoveryReport,
    /// The data directory's lock; released by `close`, after which the store never writes.
    lock: Mutex<Option<File>>,
}

struct Inner {
    dir: PathBuf,
    options: StoreOptions,
    log: CommitLog,
    queues: Arc<ConsumeQueues>,
    index: MessageIndex,
    cursor: Mutex<DispatchCursor>,
    dispatched: AtomicU64,
    dispatched_changed: Condvar,
    dispatched_lock: Mutex<()>,
    /// Told of each move of the dispatched position, on the dispatcher thread.
    dispatch_listener: std::sync::OnceLock<DispatchListener>,
    /// Set while the disk is above the watermark (see [`MessageStore::check_space`]).
    disk_full: Mutex<Option<DiskFull>>,
    stopping: AtomicBool,
    /// Set while retention may not run (a replica that is not the leader).
    retention_paused: AtomicBool,
}

type DispatchListener = Box<dyn Fn(LogPos) + Send + Sync>;

struct DispatchCursor {
    pos: LogPos,
    checkpoint: CheckpointFile,
    checkpointed: LogPos,
}

impl MessageStore {
    /// Opens the store in `dir`, creating it if needed, and recovers it.
    pub fn open(dir: &Path, options: StoreOptions) -> Result<MessageStore> {
        let started = Instant::now();
        options.validate()?;
        let fs = options.fs.clone();
        create_dir_all_durably(fs.as_ref(), dir).at(dir)?;
        let lock = lock_dir(dir)?;
        let (mut checkpoint_file, checkpoint) =
            CheckpointFile::open(&dir.join("checkpoint"), fs.clone())?;
        let (log, scan) = CommitLog::open(
            &dir.join("commitlog"),
            options.segment_size_bytes,
            options.flush,
            options.group_commit_window,
            fs.clone(),
            checkpoint.dispatched,
        )?;
        if let Some((pos, error)) = scan.damage {
            tracing::warn!(%pos, reason = error.reason(), "commit log damaged; discarded everything from here on");
        }
        if scan.valid_end < checkpoint.dispatched {
            tracing::error!(
                valid_end = %scan.valid_end,
                checkpoint = %checkpoint.dispatched,
                "commit log ends before the checkpoint; derived data past its end is dropped"
            );
        }
        let boundary = scan.valid_end.min(checkpoint.dispatched);
        // After a clean stop with the log whole, no queue holds an entry at or past the
        // boundary, and no queue file needs to be looked at before it is used.
        let trusted = checkpoint.clean && scan.valid_end >= checkpoint.dispatched;
        let queues = Arc::new(ConsumeQueues::open(
            dir.join("consumequeue"),
            options.queue_entries_per_file,
            fs.clone(),
            boundary,
            trusted,
        )?);
        let index = MessageIndex::open(
            dir.join("index"),
            options.index_shape,
            fs.clone(),
            boundary,
            checkpoint.clean,
        )?;
        {
            let queues = queues.clone();
            log.set_first_queue_offsets(move |topic, queue_id| {
                Ok(queues
                    .get(topic, queue_id)?
                    .map_or(0, |queue| queue.max_offset().0))
            });
        }
        let min_pos = log.min_pos();
        let start = boundary.max(min_pos);
        // Mark the run unclean before anything derived changes, so a crash during recovery is
        // recovered as a crash.
        checkpoint_file.write(&Checkpoint {
            clean: false,
            ..checkpoint
        })?;
        let inner = Arc::new(Inner {
            dir: dir.to_path_buf(),
            options,
            log,
            queues,
            index,
            cursor: Mutex::new(DispatchCursor {
                pos: start,
                checkpoint: checkpoint_file,
                checkpointed: boundary,
            }),
            dispatched: AtomicU64::new(start.0),
            dispatched_changed: Condvar::new(),
            dispatched_lock: Mutex::new(()),
            dispatch_listener: std::sync::OnceLock::new(),
            disk_full: Mutex::new(None),
            stopping: AtomicBool::new(false),
            retention_paused: AtomicBool::new(false),
        });
        let redispatched = {
            let mut cursor = inner.lock_cursor();
            let count = inner.dispatch(&mut cursor, inner.log.dispatchable_end())?;
            inner.queues.trim_below(min_pos)?;
            inner.index.trim_below(min_pos)?;
            inner.checkpoint(&mut cursor, false)?;
            count
        };
        if let Err(error) = inner.check_disk_usage() {
            tracing::warn!(%error, "could not read disk usage");
        }

        let dispatcher = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("ferrumq-dispatcher".into())
                .spawn(move || inner.run_dispatcher())
                .at(dir)?
        };
        inner.log.set_progress_listener(dispatcher.thread().clone());
        let recovery = RecoveryReport {
            clean_shutdown: checkpoint.clean,
            checkpoint,
            scanned_from: scan.scanned_from,
            valid_end: scan.valid_end,
            records_scanned: scan.records_scanned,
            records_redispatched: redispatched,
            damage: scan.damage.map(|(pos, e)| (pos, e.reason())),
            elapsed: started.elapsed(),
        };
        tracing::info!(?recovery, "message store open");
        Ok(MessageStore {
            inner,
            dispatcher: Mutex::new(Some(dispatcher)),
            recovery,
            lock: Mutex::new(Some(lock)),
        })
    }

    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// Pauses (or resumes) the dispatcher's retention passes; a replication layer pauses them
    /// on a node that is not the leader. [`run_retention`](Self::run_retention) still runs.
    pub fn pause_retention(&self, paused: bool) {
        self.inner.retention_paused.store(paused, Ordering::Release);
    }

    /// Stops the node as a failed log sync does: appends fail, dispatch and checkpoints stop.
    /// For the files kept beside the store, whose failed sync leaves the disk as unknown.
    pub fn fail_stop(&self, reason: impl Into<String>) {
        self.inner.log.fail_stop(reason.into());
    }

    /// The file system the store makes its writes durable through, for files kept beside it.
    pub fn file_system(&self) -> Arc<dyn FileSystem> {
        self.inner.options.fs.clone()
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The commit log, for appends, reads and durability waits.
    pub fn log(&self) -> &CommitLog {
        &self.inner.log
    }

    /// Appends one record; see `CommitLog::append`. While the dispatcher is more than
    /// `max_dispatch_lag_bytes` behind, this first waits for it (for up to a second), so a
    /// writer faster than dispatch cannot grow the tail that recovery must re-check.
    pub fn append(&self, record: &NewRecord<'_>) -> Result<Appended> {
        self.wait_for_dispatcher();
        self.inner.log.append(record)
    }

    /// Appends records in order under one lock; see `CommitLog::append_batch` for what a
    /// failure leaves.
    pub fn append_batch(&self, records: &[NewRecord<'_>], out: &mut Vec<Appended>) -> Result<()> {
        self.wait_for_dispatcher();
        self.inner.log.append_batch(records, out)
    }

    fn wait_for_dispatcher(&self) {
        let lag = self.inner.options.max_dispatch_lag_bytes;
        let written = self.inner.log.written_pos();
        if written.0.saturating_sub(self.dispatched_pos().0) <= lag {
            return;
        }
        // Never wait for what dispatch may not reach yet (a replication hold, unflushed data).
        let target = LogPos(written.0 - lag).min(self.inner.log.dispatchable_end());
        self.wait_dispatched(target, Duration::from_secs(1));
    }

    /// Resolves when the log is durable up to `end`.
    pub fn durable(&self, end: LogPos) -> Durable {
        self.inner.log.durable(end)
    }

    pub fn read(&self, pos: LogPos) -> Result<StoredRecord> {
        self.inner.log.read(pos)
    }

    /// A topic's queue, mapped on its first use; `None` if it never had an entry (or its files
    /// cannot be mapped, which is logged).
    pub fn consume_queue(&self, topic: &str, queue_id: u32) -> Option<Arc<ConsumeQueue>> {
        self.inner
            .queues
            .get(topic, queue_id)
            .unwrap_or_else(|error| {
                tracing::error!(%error, topic, queue_id, "could not open a consume queue");
                None
            })
    }

    /// The record at `offset` of a topic's queue. A record appended moments ago may not be
    /// dispatched yet: with a non-zero `wait`, a miss waits up to that long for dispatch to
    /// reach what is written now, then looks again.
    pub fn read_queued(
        &self,
        topic: &str,
        queue_id: u32,
        offset: QueueOffset,
        wait: Duration,
    ) -> Option<StoredRecord> {
        let find = || {
            let entry = self.consume_queue(topic, queue_id)?.get(offset)?;
            self.read(entry.log_pos).ok()
        };
        find().or_else(|| {
            if wait.is_zero() {
                return None;
            }
            self.wait_dispatched(self.inner.log.written_pos(), wait);
            find()
        })
    }

    /// Every consume queue, each mapped: for listings and tests, not for a hot path.
    pub fn consume_queues(&self) -> Result<Vec<Arc<ConsumeQueue>>> {
        self.inner.queues.all()
    }

    /// Records with message id `id` stored within `[from_ms, to_ms]`.
    pub fn query_by_id(&self, id: &str, from_ms: i64, to_ms: i64) -> Vec<StoredRecord> {
        let candidates = self
            .inner
            .index
            .lookup(IndexKey::MessageId(id), from_ms, to_ms, 16);
        self.confirmed(candidates, |record| {
            record.view().properties.get(keys::MESSAGE_ID) == Some(id)
        })
    }

    /// Up to `max` records of `topic` with key `key` stored within `[from_ms, to_ms]`,
    /// newest first.
    pub fn query_by_key(
        &self,
        topic: &str,
        key: &str,
        from_ms: i64,
        to_ms: i64,
        max: usize,
    ) -> Vec<StoredRecord> {
        let candidates = self
            .inner
            .index
            .lookup(IndexKey::Key { topic, key }, from_ms, to_ms, max);
        self.confirmed(candidates, |record| {
            let view = record.view();
            view.topic == topic
                && view
                    .properties
                    .iter()
                    .any(|(k, v)| k == keys::KEY && v == key)
        })
    }

    /// The message-index entries of records stored at or after `since_ms`, newest first, at
    /// most `max`: each key's hash (see [`IndexKey::hash`]) and its record's position and
    /// store time. Message ids and message keys alike; only dispatched records are indexed.
    pub fn newest_index_entries(&self, since_ms: i64, max: usize) -> Vec<(u64, LogPos, i64)> {
        self.inner.index.newest(since_ms, max)
    }

    /// Every record below this has its consume-queue and index entries.
    pub fn dispatched_pos(&self) -> LogPos {
        LogPos(self.inner.dispatched.load(Ordering::Acquire))
    }

    /// Calls `listener` with the dispatched position each time dispatch moves, from the
    /// dispatcher thread: it must be quick and must not block. One listener per store; a
    /// second is refused (false).
    pub fn on_dispatched(&self, listener: impl Fn(LogPos) + Send + Sync + 'static) -> bool {
        self.inner.dispatch_listener.set(Box::new(listener)).is_ok()
    }

    /// Waits until dispatch reaches `pos`; false on timeout.
    pub fn wait_dispatched(&self, pos: LogPos, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut guard = self
            .inner
            .dispatched_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while self.dispatched_pos() < pos {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            guard = self
                .inner
                .dispatched_changed
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    /// Makes everything dispatched so far durable and records it in the checkpoint.
    pub fn checkpoint(&self) -> Result<()> {
        let mut cursor = self.inner.lock_cursor();
        self.inner.checkpoint(&mut cursor, false)
    }

    /// Deletes segments older than the configured retention (relative to `now`), never the
    /// active one nor anything not yet checkpointed, and trims the derived structures.
    pub fn run_retention(&self, now: SystemTime) -> Result<RetentionReport> {
        self.inner.run_retention(now)
    }

    /// Reads the disk usage and compares it with the watermark (see `check_space`).
    pub fn check_disk_usage(&self) -> Result<DiskUsage> {
        self.inner.check_disk_usage()
    }

    /// `Error::DiskFull` while the disk was above the watermark at the last look. The store
    /// still appends: what to refuse is the caller's choice. A broker refuses new messages
    /// and keeps writing what finishes the ones it holds (acks, decisions, due timers), so
    /// that consumers can go on draining the disk.
    pub fn check_space(&self) -> Result<()> {
        let full = self
            .inner
            .disk_full
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        full.as_ref().map_or(Ok(()), |full| Err(full.to_error()))
    }

    /// Dispatches and flushes everything, writes a clean checkpoint and stops the threads.
    pub fn close(&self) -> Result<()> {
        let handle = self
            .dispatcher
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(handle) = handle else { return Ok(()) };
        self.inner.stopping.store(true, Ordering::Release);
        handle.thread().unpark();
        let _ = handle.join();
        let result = (|| {
            self.inner.log.flush()?;
            let mut cursor = self.inner.lock_cursor();
            self.inner
                .dispatch(&mut cursor, self.inner.log.dispatchable_end())?;
            self.inner.checkpoint(&mut cursor, true)
        })();
        let closed = self.inner.log.close();
        // Another store (in this process, or after a restart) may open the directory now,
        // even while readers still hold this one.
        drop(
            self.lock
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        result.and(closed)
    }
}

impl Drop for MessageStore {
    fn drop(&mut self) {
        if let Err(error) = self.close() {
            tracing::error!(%error, "closing the message store failed");
        }
    }
}

impl MessageStore {
    fn confirmed(
        &self,
        candidates: Vec<LogPos>,
        matches: impl Fn(&StoredRecord) -> bool,
    ) -> Vec<StoredRecord> {
        candidates
            .into_iter()
            .filter_map(|pos| self.inner.log.read(pos).ok())
            .filter(|record| matches(record))
            .collect()
    }
}

impl Inner {
    fn lock_cursor(&self) -> MutexGuard<'_, DispatchCursor> {
        self.cursor.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The dispatcher thread. A failed step (a queue or index write, a checkpoint's msync or
    /// fsync, retention) stops the node: the log is failed, so appends are refused and waiters
    /// released with an error, and the thread ends. It never retries: after a failed fsync
    /// the kernel may have dropped the dirty pages, and a later fsync that succeeds would
    /// checkpoint what was never written.
    fn run_dispatcher(&self) {
        let mut last_checkpoint = Instant::now();
        let mut last_housekeeping = Instant::now();
        let mut seen = LogPos::ZERO;
        while !self.stopping.load(Ordering::Acquire) {
            let result = (|| -> Result<()> {
                let max_bytes = self.options.checkpoint_max_bytes.max(1);
                let mut cursor = self.lock_cursor();
                loop {
                    // Dispatch in steps, so a checkpoint can fall between them.
                    let end = self
                        .log
                        .dispatchable_end()
                        .min(cursor.pos.advance(max_bytes));
                    if cursor.pos < end {
                        self.dispatch(&mut cursor, end)?;
                    }
                    let behind = cursor.pos.0 - cursor.checkpointed.0.min(cursor.pos.0);
                    let due = last_checkpoint.elapsed() >= self.options.checkpoint_interval;
                    if (due && behind > 0) || behind >= max_bytes {
                        last_checkpoint = Instant::now();
                        self.checkpoint(&mut cursor, false)?;
                    }
                    if cursor.pos >= self.log.dispatchable_end() {
                        break;
                    }
                }
                seen = cursor.pos;
                drop(cursor);
                if last_housekeeping.elapsed() >= self.options.housekeeping_interval {
                    last_housekeeping = Instant::now();
                    if let Err(error) = self.check_disk_usage() {
                        tracing::warn!(%error, "could not read disk usage");
                    }
                    if !self.retention_paused.load(Ordering::Acquire) {
                        self.run_retention(SystemTime::now())?;
                    }
                }
                Ok(())
            })();
            if let Err(error) = result {
                tracing::error!(%error, "dispatcher failed; the store stops accepting appends");
                self.log.fail_stop(format!("dispatcher failed: {error}"));
                return;
            }
            let wait = self
                .options
                .checkpoint_interval
                .min(self.options.housekeeping_interval)
                .min(Duration::from_millis(100));
            self.log.park_listener(seen, wait);
        }
    }

    /// Builds consume-queue and index entries for every record in `[cursor.pos, end)`.
    fn dispatch(&self, cursor: &mut DispatchCursor, end: LogPos) -> Result<u64> {
        let mut count = 0;
        let mut index_keys: Vec<u64> = Vec::new();
        // Records of one batch mostly share a queue: look it up again only when it changes.
        let mut queue: Option<Arc<ConsumeQueue>> = None;
        let mut records = self.log.records(cursor.pos, end);
        for item in records.by_ref() {
            let (pos, record) = item?;
            let view = record.view();
            // One pass over the properties, as bytes: the record's were checked when read.
            let mut tag = None;
            index_keys.clear();
            for (key, value) in view.properties.iter_bytes() {
                if key == keys::TAG.as_bytes() {
                    tag = tag.or(Some(value));
                } else if key == keys::MESSAGE_ID.as_bytes() {
                    index_keys.push(message_id_hash(value));
                } else if key == keys::KEY.as_bytes() {
                    index_keys.push(message_key_hash(view.topic.as_bytes(), value));
                }
            }
            let entry = ConsumeQueueEntry {
                log_pos: pos,
                size: view.len,
                tag_hash: tag.map_or(0, tag_hash_bytes),
                store_timestamp_ms: view.store_timestamp_ms,
            };
            let queue = match queue.take() {
                Some(q) if q.queue_id() == view.queue_id && q.topic() == view.topic => {
                    queue.insert(q)
                }
                _ => queue.insert(self.queues.get_or_create(view.topic, view.queue_id)?),
            };
            self.queues.put(queue, view.queue_offset, &entry)?;
            if !index_keys.is_empty() {
                self.index
                    .add(index_keys.iter().copied(), pos, view.store_timestamp_ms)?;
            }
            cursor.pos = record.end();
            count += 1;
            if count % 4096 == 0 {
                self.publish_dispatched(cursor.pos);
            }
        }
        // Past the last record there may be a segment's unused end, which the iterator skipped.
        cursor.pos = cursor.pos.max(records.position());
        self.publish_dispatched(cursor.pos);
        Ok(count)
    }

    fn publish_dispatched(&self, pos: LogPos) {
        self.dispatched.store(pos.0, Ordering::Release);
        {
            let _guard = self
                .dispatched_lock
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            self.dispatched_changed.notify_all();
        }
        if let Some(listener) = self.dispatch_listener.get() {
            listener(pos);
        }
    }

    /// The checkpoint, in order: (1) for a clean one only, flush the commit log, (2) fsync
    /// consume queues, (3) fsync the index, (4) write and fdatasync the checkpoint.
    fn checkpoint(&self, cursor: &mut DispatchCursor, clean: bool) -> Result<()> {
        // After a failure nothing is made to look durable: the next open recovers instead.
        if let Some(reason) = self.log.failure() {
            return Err(Error::Poisoned { reason });
        }
        let dispatched = cursor.pos;
        // Only a clean checkpoint needs the log flushed. Otherwise the log may be durable
        // short of `dispatched` (in `async` mode): after an operating-system crash recovery
        // then finds the log ending before the checkpoint and cuts the derived files back to
        // its valid end. Not waiting for the log here keeps checkpoints frequent, and so the
        // tail recovery re-checks short, however far write-back lags behind a fast writer.
        let log_end = if clean {
            self.log.flush()?
        } else {
            self.log.durable_pos()
        };
        self.queues.flush()?;
        self.index.flush()?;
        cursor.checkpoint.write(&Checkpoint {
            dispatched,
            log_end,
            clean,
            timestamp_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        })?;
        cursor.checkpointed = dispatched;
        Ok(())
    }

    fn run_retention(&self, now: SystemTime) -> Result<RetentionReport> {
        let Some(retention) = self.options.retention else {
            return Ok(RetentionReport {
                segments_removed: Vec::new(),
                min_pos: self.log.min_pos(),
            });
        };
        let older_than = now.checked_sub(retention).unwrap_or(UNIX_EPOCH);
        let safe_end = self.lock_cursor().checkpointed;
        let removed = self.log.delete_segments(older_than, safe_end)?;
        let min_pos = self.log.min_pos();
        if !removed.is_empty() {
            self.queues.trim_below(min_pos)?;
            self.index.trim_below(min_pos)?;
            tracing::info!(segments = removed.len(), %min_pos, "retention removed segments");
        }
        Ok(RetentionReport {
            segments_removed: removed,
            min_pos,
        })
    }

    fn check_disk_usage(&self) -> Result<DiskUsage> {
        let usage = self.options.fs.disk_usage(&self.dir).at(&self.dir)?;
        let ratio = usage.used_ratio();
        let full = (ratio > self.options.disk_watermark).then(|| DiskFull {
            path: self.dir.clone(),
            usage_percent: ratio * 100.0,
            watermark_percent: self.options.disk_watermark * 100.0,
        });
        if let Some(full) = &full {
            tracing::warn!(
                usage = full.usage_percent,
                watermark = full.watermark_percent,
                "disk above watermark"
            );
        }
        *self
            .disk_full
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = full;
        Ok(usage)
    }
}

/// Takes an exclusive lock on the data directory, so two processes never map the same files.
#[allow(unsafe_code)]
fn lock_dir(dir: &Path) -> Result<File> {
    use std::os::fd::AsRawFd;
    let path = dir.join("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .at(&path)?;
    // SAFETY: flock on a descriptor we own; it has no memory effects.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(Error::Io {
            path,
            source: std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                "the data directory is in use by another process",
            ),
        });
    }
    Ok(file)
}
