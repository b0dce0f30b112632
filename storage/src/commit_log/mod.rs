//! The commit log: one append-only log of records for all topics, in fixed-size segments.
//!
//! Appends serialize on one writer lock, which encodes the record into a reusable buffer, copies
//! it into the active segment and publishes the new write position; readers see it through the
//! segment's mapping. In `sync` mode the copy is a `pwrite`: pages written that way are cheap
//! to flush again and again, while pages dirtied through a mapping must be write-protected and
//! faulted back in around every flush. In `async` mode, where flushes are rare, a small append
//! is copied straight into the mapping, whose pages are faulted in ahead of the writer a chunk
//! at a time, which saves a system call per record; a batch of at least `PWRITE_MIN_BYTES` is a
//! `pwrite`, which fills fresh pages without first zeroing them as faulting them in does.
//! Durability is the flusher thread's job: it flushes everything written since its last flush
//! in one call and then releases every caller waiting for a position it covered (group
//! commit). After a failed flush the log is fail-stop: it
//! refuses appends until the process restarts and recovery decides what is on disk.

mod durability;
mod recovery;

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use durability::Durable;
pub(crate) use recovery::ScanOutcome;

use crate::error::{Error, IoContext, Result};
use crate::fs::{FileSystem, create_dir_all_durably};
use crate::mapped_file::MappedFile as Segment;
use crate::pos::{LogPos, QueueOffset};
use crate::record::{self, DecodeError, END_OF_SEGMENT_MAGIC, NewRecord, RecordView};
use durability::DurabilityWatch;

/// When the flusher makes appended records durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushMode {
    /// Flush as soon as anything is written; callers await `durable()` before answering.
    /// One flush covers every record written while the previous one ran.
    Sync,
    /// Flush on an interval. A caller that answers without awaiting `durable()` may lose the
    /// last interval's records in an operating-system crash (not in a process crash).
    Async { interval: Duration },
}

/// Where one appended record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub pos: LogPos,
    pub len: u32,
    pub queue_offset: QueueOffset,
    pub store_timestamp_ms: i64,
}

impl Appended {
    /// The position just past the record: await `durable(end)` to know it is on disk.
    pub fn end(&self) -> LogPos {
        self.pos.advance(u64::from(self.len))
    }
}

/// Counters for benchmarks and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushStats {
    pub flushes: u64,
    pub flushed_bytes: u64,
}

/// In `async` mode the preparer keeps the pages between one and two of these ahead of the
/// writer faulted in.
const POPULATE_CHUNK: u64 = 4 << 20;

/// In `async` mode, appends of at least this many bytes are written with `pwrite` rather than
/// copied into the mapping.
const PWRITE_MIN_BYTES: usize = 16 << 10;

/// The writer's encode buffer is cut back to this after an unusually large batch.
const MAX_KEPT_PENDING_CAPACITY: usize = 4 << 20;

/// Next queue offset per topic and queue id.
pub(crate) type QueueOffsets = HashMap<String, HashMap<u32, u64>>;

pub struct CommitLog {
    shared: Arc<Shared>,
    /// The flusher and the segment preparer.
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// See [`CommitLog::set_first_queue_offsets`].
    first_queue_offsets: OnceLock<FirstQueueOffsets>,
}

type FirstQueueOffsets = Box<dyn Fn(&str, u32) -> Result<u64> + Send + Sync>;

struct Shared {
    dir: PathBuf,
    segment_size: u64,
    flush_mode: FlushMode,
    /// In `sync` mode, how long the flusher may wait for a batch as large as its last one.
    group_commit_window: Duration,
    fs: Arc<dyn FileSystem>,
    /// Oldest first; every segment is `segment_size` bytes and they are contiguous.
    segments: RwLock<VecDeque<Arc<Segment>>>,
    writer: Mutex<Writer>,
    /// Every byte below this is written; published after the copy (Release).
    written: AtomicU64,
    flushed: AtomicU64,
    /// Records published so far (since open), for sizing group-commit batches.
    published_records: AtomicU64,
    /// In `sync` mode, the parked flusher wants a wake-up once `published_records` reaches
    /// this; `u64::MAX` while it is awake, so appenders skip the wake-up system call.
    flusher_wake_at: AtomicU64,
    /// Held while a flush runs, so flushes never overlap and `flushed` only grows.
    flush_lock: Mutex<()>,
    /// Dispatch may not pass this (a replication layer's "committed up to"); `u64::MAX` when
    /// nothing holds it back.
    committed: AtomicU64,
    durability: Arc<DurabilityWatch>,
    flushes: AtomicU64,
    flushed_bytes: AtomicU64,
    shutting_down: std::sync::atomic::AtomicBool,
    flusher_thread: OnceLock<Thread>,
    /// The next segment, created ahead of time by the preparer thread so that a roll does
    /// not wait for a file to be created and synced.
    prepared: Mutex<Option<Arc<Segment>>>,
    preparer_thread: OnceLock<Thread>,
    /// In `async` mode, the log position up to which the writer wants pages faulted in.
    populate_wanted: AtomicU64,
    /// Woken whenever the dispatchable end moves (the dispatcher).
    progress_listener: OnceLock<Thread>,
    /// True while the listener is parked in `park_listener`; appenders wake it only then.
    listener_parked: std::sync::atomic::AtomicBool,
}

struct Writer {
    active: Arc<Segment>,
    /// Write offset inside the active segment, counting the pending bytes.
    offset: usize,
    /// Records encoded but not yet written; they belong at `offset - pending.len()`.
    pending: Vec<u8>,
    /// In `async` mode, the log position up to which the preparer was asked to fault pages in.
    populate_requested: u64,
    next_offsets: QueueOffsets,
    last_store_timestamp_ms: i64,
}

impl CommitLog {
    /// Opens (or creates) the log in `dir` and recovers it: records from `scan_from` on are
    /// checked one by one, and everything after the last valid one is discarded.
    pub(crate) fn open(
        dir: &Path,
        segment_size: u64,
        flush_mode: FlushMode,
        group_commit_window: Duration,
        fs: Arc<dyn FileSystem>,
        scan_from: LogPos,
    ) -> Result<(CommitLog, ScanOutcome)> {
        create_dir_all_durably(fs.as_ref(), dir).at(dir)?;
        let (mut segments, first_short) = recovery::open_segments(dir, segment_size)?;
        let scan_from = first_short.map_or(scan_from, |short| scan_from.min(short));
        if segments.is_empty() {
            segments.push_back(Arc::new(Segment::create(
                dir,
                0,
                segment_size,
                fs.as_ref(),
            )?));
        }
        let outcome = recovery::scan(&segments, scan_from, segment_size);
        recovery::discard_after(dir, &mut segments, outcome.valid_end, fs.as_ref())?;

        let (active, offset) = match segments.back() {
            Some(last) => (last.clone(), (outcome.valid_end.0 - last.base()) as usize),
            None => unreachable!("recovery keeps the segment holding the valid end"),
        };
        let writer = Writer {
            active,
            offset,
            pending: Vec::new(),
            populate_requested: 0,
            next_offsets: outcome.next_offsets.clone(),
            last_store_timestamp_ms: outcome.last_store_timestamp_ms,
        };
        let end = outcome.valid_end.0;
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            segment_size,
            flush_mode,
            group_commit_window,
            fs,
            segments: RwLock::new(segments),
            writer: Mutex::new(writer),
            written: AtomicU64::new(end),
            flushed: AtomicU64::new(end),
            published_records: AtomicU64::new(0),
            flusher_wake_at: AtomicU64::new(0),
            flush_lock: Mutex::new(()),
            committed: AtomicU64::new(u64::MAX),
            durability: Arc::new(DurabilityWatch::new(LogPos(end))),
            flushes: AtomicU64::new(0),
            flushed_bytes: AtomicU64::new(0),
            shutting_down: false.into(),
            flusher_thread: OnceLock::new(),
            prepared: Mutex::new(None),
            preparer_thread: OnceLock::new(),
            populate_wanted: AtomicU64::new(0),
            progress_listener: OnceLock::new(),
            listener_parked: false.into(),
        });
        let flusher = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("ferrumq-flusher".into())
                .spawn(move || shared.run_flusher())
                .at(dir)?
        };
        let _ = shared.flusher_thread.set(flusher.thread().clone());
        let preparer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("ferrumq-segment-prep".into())
                .spawn(move || shared.run_preparer())
                .at(dir)?
        };
        let _ = shared.preparer_thread.set(preparer.thread().clone());
        let log = CommitLog {
            shared,
            threads: Mutex::new(vec![flusher, preparer]),
            first_queue_offsets: OnceLock::new(),
        };
        Ok((log, outcome))
    }

    /// Appends one record. It is written (visible to `read`) on return, durable once
    /// `durable(appended.end())` resolves.
    pub fn append(&self, record: &NewRecord<'_>) -> Result<Appended> {
        let len = self.checked_len(record)?;
        let mut writer = self.lock_writer();
        let appended = self.append_locked(&mut writer, record, len)?;
        self.write_pending(&mut writer)?;
        self.shared.publish(appended.end(), 1);
        Ok(appended)
    }

    /// Appends records in order under one lock. A record that breaks a limit (too large, not
    /// encodable) fails the batch before anything is written. A later failure (a segment that
    /// cannot be rolled or written, a poisoned log) stops at that record: the records before
    /// it stay written with their queue offsets, are listed in `out`, and the error is
    /// returned.
    pub fn append_batch(&self, records: &[NewRecord<'_>], out: &mut Vec<Appended>) -> Result<()> {
        let mut lens = Vec::with_capacity(records.len());
        for record in records {
            lens.push(self.checked_len(record)?);
        }
        let mut writer = self.lock_writer();
        let mut end = None;
        let first = out.len();
        let mut result = Ok(());
        for (record, len) in records.iter().zip(lens) {
            match self.append_locked(&mut writer, record, len) {
                Ok(appended) => {
                    end = Some(appended.end());
                    out.push(appended);
                }
                Err(e) => {
                    // The records before it already hold queue offsets: write them anyway.
                    result = Err(e);
                    break;
                }
            }
        }
        self.write_pending(&mut writer)?;
        if let Some(end) = end {
            self.shared.publish(end, (out.len() - first) as u64);
        }
        result
    }

    /// Resolves when every byte below `end` is durable.
    pub fn durable(&self, end: LogPos) -> Durable {
        Durable::new(self.shared.durability.clone(), end)
    }

    /// Flushes everything written so far now, whatever the flush mode.
    pub fn flush(&self) -> Result<LogPos> {
        self.shared.flush()
    }

    /// Reads the record that starts at `pos`, checking its CRC.
    pub fn read(&self, pos: LogPos) -> Result<StoredRecord> {
        self.read_framed(pos, record::frame_len)
    }

    /// Reads the record at `pos` with `frame_len` checking its frame.
    fn read_framed(
        &self,
        pos: LogPos,
        frame_len: fn(&[u8]) -> std::result::Result<usize, DecodeError>,
    ) -> Result<StoredRecord> {
        let written = self.written_pos();
        let segment = self.segment_for(pos).ok_or(Error::NoRecord {
            pos,
            reason: "outside the retained log",
        })?;
        let offset = (pos.0 - segment.base()) as usize;
        let limit = (written.0.saturating_sub(segment.base())).min(self.shared.segment_size);
        if pos >= written {
            return Err(Error::NoRecord {
                pos,
                reason: "at or past the write position",
            });
        }
        let bytes = segment.bytes(offset, limit as usize);
        match frame_len(bytes) {
            Ok(len) => {
                // A frame whose CRC matches but whose fields do not add up is refused here, so
                // `view()` never meets it.
                if let Err(e) = RecordView::decode_fields(&bytes[..len]) {
                    return Err(Error::Corrupt {
                        path: segment.path().to_path_buf(),
                        offset: offset as u64,
                        reason: e.reason(),
                    });
                }
                Ok(StoredRecord {
                    segment,
                    pos,
                    offset,
                    len,
                })
            }
            Err(e) => Err(Error::NoRecord {
                pos,
                reason: e.reason(),
            }),
        }
    }

    /// Records in `[from, to)` in log order, `from` being a record boundary.
    pub fn records(&self, from: LogPos, to: LogPos) -> Records<'_> {
        Records {
            log: self,
            pos: from,
            to: to.min(self.written_pos()),
        }
    }

    pub fn written_pos(&self) -> LogPos {
        LogPos(self.shared.written.load(Ordering::Acquire))
    }

    pub fn durable_pos(&self) -> LogPos {
        LogPos(self.shared.flushed.load(Ordering::Acquire))
    }

    /// The first retained byte.
    pub fn min_pos(&self) -> LogPos {
        self.read_segments()
            .front()
            .map_or(LogPos::ZERO, |s| s.base_pos())
    }

    /// Where dispatch may go up to: durable records (in `sync` mode) or written ones (in
    /// `async` mode), and never past the committed watermark.
    pub fn dispatchable_end(&self) -> LogPos {
        let end = match self.shared.flush_mode {
            FlushMode::Sync => self.durable_pos(),
            FlushMode::Async { .. } => self.written_pos(),
        };
        end.min(LogPos(self.shared.committed.load(Ordering::Acquire)))
    }

    /// Holds dispatch back at `pos` until a replication layer says more is committed.
    /// `None` lifts the hold.
    pub fn set_committed(&self, pos: Option<LogPos>) {
        let value = pos.map_or(u64::MAX, |p| p.0);
        self.shared.committed.store(value, Ordering::Release);
        self.shared.wake_progress_listener();
    }

    pub fn flush_stats(&self) -> FlushStats {
        FlushStats {
            flushes: self.shared.flushes.load(Ordering::Relaxed),
            flushed_bytes: self.shared.flushed_bytes.load(Ordering::Relaxed),
        }
    }

    pub fn segment_size(&self) -> u64 {
        self.shared.segment_size
    }

    /// The reason appends are refused after a failed flush, if one failed.
    pub fn failure(&self) -> Option<String> {
        self.shared.durability.failure()
    }

    /// Stops the log as a failed flush does: appends are refused and every waiter not yet
    /// released gets `Error::Poisoned`. For failures found outside the log (the dispatcher's).
    pub(crate) fn fail_stop(&self, reason: String) {
        self.shared.durability.fail(reason);
    }

    /// Removes the records from `from` on, which must not have been dispatched (the caller
    /// checks). Used by a replication layer to drop an uncommitted suffix that lost an
    /// election. Waiters for the removed records get `Error::Truncated`. A reader holding a
    /// removed record keeps reading it intact: the segment that held `from` is replaced by a
    /// copy of its bytes before `from`, and the old file is never written again. A failure
    /// part-way leaves the disk unknown, so it fails the log (fail-stop).
    pub fn truncate_uncommitted(&self, from: LogPos) -> Result<()> {
        match self.truncate_uncommitted_inner(from) {
            Err(e @ Error::Io { .. }) => {
                self.fail_stop(format!("truncating the log at {from} failed: {e}"));
                Err(e)
            }
            other => other,
        }
    }

    fn truncate_uncommitted_inner(&self, from: LogPos) -> Result<()> {
        let mut writer = self.lock_writer();
        let _flush = self.shared.lock_flush();
        let written = self.written_pos();
        if from > written || from < self.min_pos() {
            return Err(Error::NoRecord {
                pos: from,
                reason: "truncation point outside the log",
            });
        }
        if from == written {
            return Ok(());
        }
        // Rewind each queue to the first offset the removed suffix used.
        for record in self.records(from, written) {
            let (_, record) = record?;
            let view = record.view();
            if let Some(next) = writer
                .next_offsets
                .get_mut(view.topic)
                .and_then(|q| q.get_mut(&view.queue_id))
            {
                *next = (*next).min(view.queue_offset.0);
            }
        }
        let mut segments = self.shared.write_segments();
        while segments.len() > 1 && segments.back().is_some_and(|s| s.base_pos() > from) {
            if let Some(dropped) = segments.pop_back() {
                std::fs::remove_file(dropped.path()).at(dropped.path())?;
            }
        }
        let holder = segments.back().cloned().ok_or(Error::NoRecord {
            pos: from,
            reason: "no segment holds the truncation point",
        })?;
        let offset = (from.0 - holder.base()) as usize;
        let active = Arc::new(Segment::replace_with_prefix(
            &self.shared.dir,
            holder.base(),
            self.shared.segment_size,
            holder.bytes(0, offset),
            self.shared.fs.as_ref(),
        )?);
        if let Some(last) = segments.back_mut() {
            *last = active.clone();
        }
        drop(segments);
        writer.active = active;
        writer.offset = offset;
        self.shared.written.store(from.0, Ordering::Release);
        self.shared.flushed.fetch_min(from.0, Ordering::AcqRel);
        self.shared.durability.truncate(from);
        Ok(())
    }

    /// Deletes whole segments that end at or below `safe_end` and were last modified before
    /// `older_than`; never the active one. Returns the new first retained position.
    pub(crate) fn delete_segments(
        &self,
        older_than: SystemTime,
        safe_end: LogPos,
    ) -> Result<Vec<LogPos>> {
        let mut removed = Vec::new();
        loop {
            let candidate = {
                let segments = self.read_segments();
                if segments.len() < 2 {
                    break;
                }
                match segments.front() {
                    Some(s) => s.clone(),
                    None => break,
                }
            };
            let end = candidate.base_pos().advance(self.shared.segment_size);
            if end > safe_end || candidate.modified()? >= older_than {
                break;
            }
            self.shared.write_segments().pop_front();
            std::fs::remove_file(candidate.path()).at(candidate.path())?;
            removed.push(candidate.base_pos());
        }
        if !removed.is_empty() {
            self.shared
                .fs
                .sync_dir(&self.shared.dir)
                .at(&self.shared.dir)?;
        }
        Ok(removed)
    }

    pub(crate) fn set_progress_listener(&self, thread: Thread) {
        let _ = self.shared.progress_listener.set(thread);
    }

    /// Parks the progress listener (the calling thread) until the dispatchable end passes
    /// `seen` or `timeout` passes. Appenders make the wake-up system call only while it is
    /// parked here, not once per record.
    pub(crate) fn park_listener(&self, seen: LogPos, timeout: Duration) {
        self.shared.listener_parked.store(true, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.dispatchable_end() <= seen {
            std::thread::park_timeout(timeout);
        }
        self.shared.listener_parked.store(false, Ordering::SeqCst);
    }

    /// Where the log learns a queue's next offset when it first appends to a queue that the
    /// recovered tail did not name (the consume queue's end; without this, 0). Called under
    /// the writer lock.
    pub(crate) fn set_first_queue_offsets(
        &self,
        source: impl Fn(&str, u32) -> Result<u64> + Send + Sync + 'static,
    ) {
        let _ = self.first_queue_offsets.set(Box::new(source));
    }

    /// Flushes what was written, stops the flusher, and waits for it.
    pub fn close(&self) -> Result<()> {
        let result = self.shared.flush();
        self.shared.shutting_down.store(true, Ordering::Release);
        self.shared.wake_flusher();
        self.shared.wake_preparer();
        let handles =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        for handle in handles {
            let _ = handle.join();
        }
        result.map(|_| ())
    }

    fn checked_len(&self, record: &NewRecord<'_>) -> Result<usize> {
        let len = record.encoded_len()?;
        if len as u64 > self.shared.segment_size {
            return Err(Error::TooLarge {
                field: "record",
                actual: len,
                limit: usize::try_from(self.shared.segment_size).unwrap_or(usize::MAX),
            });
        }
        Ok(len)
    }

    fn append_locked(
        &self,
        writer: &mut Writer,
        record: &NewRecord<'_>,
        len: usize,
    ) -> Result<Appended> {
        if let Some(reason) = self.shared.durability.failure() {
            return Err(Error::Poisoned { reason });
        }
        if writer.offset + len > writer.active.len() {
            self.roll(writer)?;
        }
        let next = writer
            .next_offsets
            .get_mut(record.topic)
            .and_then(|queues| queues.get_mut(&record.queue_id));
        let queue_offset = match next {
            Some(next) => {
                *next += 1;
                QueueOffset(*next - 1)
            }
            None => {
                let first = match self.first_queue_offsets.get() {
                    Some(source) => source(record.topic, record.queue_id)?,
                    None => 0,
                };
                writer
                    .next_offsets
                    .entry(record.topic.to_owned())
                    .or_default()
                    .insert(record.queue_id, first + 1);
                QueueOffset(first)
            }
        };
        let store_timestamp_ms = now_ms().max(writer.last_store_timestamp_ms);
        writer.last_store_timestamp_ms = store_timestamp_ms;
        let start = writer.offset;
        let from = writer.pending.len();
        writer.pending.resize(from + len, 0);
        record::encode_into(
            record,
            queue_offset,
            store_timestamp_ms,
            &mut writer.pending[from..],
        );
        writer.offset += len;
        Ok(Appended {
            pos: writer.active.base_pos().advance(start as u64),
            len: u32::try_from(len).unwrap_or(u32::MAX),
            queue_offset,
            store_timestamp_ms,
        })
    }

    /// Writes the pending records into the active segment. A failed write makes the log
    /// fail-stop, as a failed flush does: what reached the file is for recovery to judge.
    fn write_pending(&self, writer: &mut Writer) -> Result<()> {
        if writer.pending.is_empty() {
            return Ok(());
        }
        let start = writer.offset - writer.pending.len();
        let written = match self.shared.flush_mode {
            FlushMode::Sync => writer.active.write_at(start, &writer.pending),
            FlushMode::Async { .. } if writer.pending.len() >= PWRITE_MIN_BYTES => {
                writer.active.write_at(start, &writer.pending)
            }
            FlushMode::Async { .. } => {
                let end = writer.active.base() + writer.offset as u64;
                if end + POPULATE_CHUNK > writer.populate_requested {
                    writer.populate_requested =
                        (end + 2 * POPULATE_CHUNK) / POPULATE_CHUNK * POPULATE_CHUNK;
                    self.shared
                        .populate_wanted
                        .store(writer.populate_requested, Ordering::Release);
                    self.shared.wake_preparer();
                }
                writer
                    .active
                    .bytes_mut(start, writer.offset)
                    .copy_from_slice(&writer.pending);
                Ok(())
            }
        };
        writer.pending.clear();
        if writer.pending.capacity() > MAX_KEPT_PENDING_CAPACITY {
            writer.pending.shrink_to(MAX_KEPT_PENDING_CAPACITY);
        }
        written.map_err(|source| {
            let reason = format!(
                "write to {} failed: {source}",
                writer.active.path().display()
            );
            self.shared.durability.fail(reason.clone());
            Error::Poisoned { reason }
        })
    }

    /// Closes the active segment with an end marker and starts the next one.
    fn roll(&self, writer: &mut Writer) -> Result<()> {
        self.write_pending(writer)?;
        let size = writer.active.len();
        if size - writer.offset >= 4 {
            writer
                .active
                .write_at(writer.offset, &END_OF_SEGMENT_MAGIC.to_le_bytes())
                .at(writer.active.path())?;
        }
        let base = writer.active.base_pos().advance(self.shared.segment_size);
        let segment = self.shared.take_prepared_segment(base.0)?;
        self.shared.write_segments().push_back(segment.clone());
        writer.active = segment;
        writer.offset = 0;
        self.shared.wake_preparer();
        Ok(())
    }

    fn segment_for(&self, pos: LogPos) -> Option<Arc<Segment>> {
        let segments = self.read_segments();
        let first = segments.front()?.base();
        let index = pos.0.checked_sub(first)? / self.shared.segment_size;
        segments.get(usize::try_from(index).ok()?).cloned()
    }

    fn read_segments(&self) -> std::sync::RwLockReadGuard<'_, VecDeque<Arc<Segment>>> {
        self.shared
            .segments
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_writer(&self) -> MutexGuard<'_, Writer> {
        self.shared
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for CommitLog {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// The disk is fuller than the configured watermark.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DiskFull {
    pub(crate) path: PathBuf,
    pub(crate) usage_percent: f64,
    pub(crate) watermark_percent: f64,
}

impl DiskFull {
    pub(crate) fn to_error(&self) -> Error {
        Error::DiskFull {
            path: self.path.clone(),
            usage_percent: self.usage_percent,
            watermark_percent: self.watermark_percent,
        }
    }
}

impl Shared {
    fn publish(&self, end: LogPos, records: u64) {
        self.written.store(end.0, Ordering::Release);
        let published = self.published_records.fetch_add(records, Ordering::SeqCst) + records;
        match self.flush_mode {
            FlushMode::Sync => {
                if published >= self.flusher_wake_at.load(Ordering::SeqCst) {
                    self.wake_flusher();
                }
            }
            FlushMode::Async { .. } => self.wake_progress_listener(),
        }
    }

    fn wake_flusher(&self) {
        if let Some(thread) = self.flusher_thread.get() {
            thread.unpark();
        }
    }

    fn wake_preparer(&self) {
        if let Some(thread) = self.preparer_thread.get() {
            thread.unpark();
        }
    }

    /// Keeps the segment after the active one created and, in `async` mode, the pages ahead
    /// of the writer faulted in, until shutdown. Faulting a page in zeroes it, which would
    /// otherwise happen on the writer's thread under its lock.
    fn run_preparer(&self) {
        let mut populated = 0;
        while !self.shutting_down.load(Ordering::Acquire) {
            let wanted = self.populate_wanted.load(Ordering::Acquire);
            if wanted > populated {
                populated = self.populate(populated, wanted);
            }
            let next = self
                .segments
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .back()
                .map(|s| s.base() + self.segment_size);
            if let Some(base) = next
                && let Err(error) = self.prepare_segment(base)
            {
                tracing::warn!(%error, base, "could not create the next segment ahead of time");
            }
            std::thread::park_timeout(Duration::from_secs(1));
        }
    }

    /// Faults in the pages of `[from, to)` (at most two chunks) in the segments that exist;
    /// returns how far it got.
    fn populate(&self, from: u64, to: u64) -> u64 {
        let from = from.max(to.saturating_sub(2 * POPULATE_CHUNK));
        let segments: Vec<Arc<Segment>> = self
            .segments
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|s| s.base() < to && from < s.base() + self.segment_size)
            .cloned()
            .collect();
        let mut done = from;
        for segment in segments {
            let base = segment.base();
            let end = to.min(base + self.segment_size);
            segment.populate_for_write((from.max(base) - base) as usize, (end - base) as usize);
            done = end;
        }
        done
    }

    fn prepare_segment(&self, base: u64) -> Result<()> {
        self.prepare_locked(&mut self.lock_prepared(), base)
    }

    fn prepare_locked(&self, prepared: &mut Option<Arc<Segment>>, base: u64) -> Result<()> {
        match prepared.as_ref() {
            Some(segment) if segment.base() == base => return Ok(()),
            // Left over from before a truncation moved the log back: never part of the log.
            Some(stale) => stale.remove()?,
            None => {}
        }
        *prepared = None;
        *prepared = Some(Arc::new(Segment::create(
            &self.dir,
            base,
            self.segment_size,
            self.fs.as_ref(),
        )?));
        Ok(())
    }

    /// The segment that starts at `base`: the prepared one, or one created now.
    fn take_prepared_segment(&self, base: u64) -> Result<Arc<Segment>> {
        let mut prepared = self.lock_prepared();
        self.prepare_locked(&mut prepared, base)?;
        prepared.take().ok_or(Error::NoRecord {
            pos: LogPos(base),
            reason: "no segment after a successful creation",
        })
    }

    fn lock_prepared(&self) -> MutexGuard<'_, Option<Arc<Segment>>> {
        self.prepared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wake_progress_listener(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.listener_parked.swap(false, Ordering::SeqCst)
            && let Some(thread) = self.progress_listener.get()
        {
            thread.unpark();
        }
    }

    fn lock_flush(&self) -> MutexGuard<'_, ()> {
        self.flush_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn write_segments(&self) -> std::sync::RwLockWriteGuard<'_, VecDeque<Arc<Segment>>> {
        self.segments
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn run_flusher(&self) {
        let mut batch = GroupCommitBatch::default();
        loop {
            let pending =
                self.written.load(Ordering::Acquire) > self.flushed.load(Ordering::Acquire);
            if pending {
                if self.flush_mode == FlushMode::Sync
                    && !self.shutting_down.load(Ordering::Acquire)
                    && let Some(wait) = batch.wait_for_more(
                        self.published_records.load(Ordering::Acquire),
                        self.group_commit_window,
                    )
                {
                    self.park_until_published(batch.wanted_records(), wait);
                    continue;
                }
                let records = self.published_records.load(Ordering::Acquire);
                if let Err(error) = self.flush() {
                    tracing::error!(%error, "commit log flush failed; refusing appends from now on");
                    return;
                }
                batch.flushed(records);
                if self.flush_mode == FlushMode::Sync {
                    continue;
                }
            }
            if self.shutting_down.load(Ordering::Acquire) {
                return;
            }
            match self.flush_mode {
                FlushMode::Sync => {
                    let next = self.published_records.load(Ordering::SeqCst) + 1;
                    self.park_until_published(next, Duration::from_millis(100));
                }
                FlushMode::Async { interval } => std::thread::park_timeout(interval),
            }
        }
    }

    /// Parks the flusher until `records` are published (an appender wakes it), a shutdown or
    /// a `flush` call wakes it, or `timeout` passes.
    fn park_until_published(&self, records: u64, timeout: Duration) {
        self.flusher_wake_at.store(records, Ordering::SeqCst);
        let published = self.published_records.load(Ordering::SeqCst);
        if published < records && !self.shutting_down.load(Ordering::SeqCst) {
            std::thread::park_timeout(timeout);
        }
        self.flusher_wake_at.store(u64::MAX, Ordering::SeqCst);
    }

    /// One flush: fdatasync of every segment that holds bytes between the durable and the
    /// written position.
    fn flush(&self) -> Result<LogPos> {
        let _guard = self.lock_flush();
        if let Some(reason) = self.durability.failure() {
            return Err(Error::Poisoned { reason });
        }
        let from = self.flushed.load(Ordering::Acquire);
        let to = self.written.load(Ordering::Acquire);
        if to <= from {
            return Ok(LogPos(from));
        }
        let segments: Vec<Arc<Segment>> = self
            .segments
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|s| s.base() + self.segment_size > from && s.base() < to)
            .cloned()
            .collect();
        for segment in &segments {
            if let Err(source) = segment.sync_data(self.fs.as_ref()) {
                let reason = format!("flush of {} failed: {source}", segment.path().display());
                self.durability.fail(reason.clone());
                return Err(Error::Poisoned { reason });
            }
        }
        self.flushed.store(to, Ordering::Release);
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.flushed_bytes.fetch_add(to - from, Ordering::Relaxed);
        self.durability.advance(LogPos(to));
        self.wake_progress_listener();
        Ok(LogPos(to))
    }
}

/// The flusher's group-commit policy in `sync` mode. The writers a flush releases come back with
/// their next records while the following flush would already be running, so flushing at once
/// splits them into two half-size batches that alternate. Instead the flusher waits until as
/// many records are pending as the last flush covered, but never longer than the window after
/// it first saw a pending record; a lone writer therefore pays the window once, then none.
#[derive(Debug, Default)]
struct GroupCommitBatch {
    /// Records published when the last flush started.
    flushed_records: u64,
    /// How many records the last flush covered.
    last_size: u64,
    /// When the flusher first saw a record pending after the last flush.
    pending_since: Option<std::time::Instant>,
}

impl GroupCommitBatch {
    /// How much longer to wait for more records, or `None` to flush now.
    fn wait_for_more(&mut self, published_records: u64, window: Duration) -> Option<Duration> {
        let pending = published_records.saturating_sub(self.flushed_records);
        if pending >= self.last_size || window.is_zero() {
            return None;
        }
        let since = *self
            .pending_since
            .get_or_insert_with(std::time::Instant::now);
        window
            .checked_sub(since.elapsed())
            .filter(|left| !left.is_zero())
    }

    /// The published-record count at which the next batch is as large as the last one.
    fn wanted_records(&self) -> u64 {
        self.flushed_records + self.last_size
    }

    fn flushed(&mut self, published_records: u64) {
        self.last_size = published_records.saturating_sub(self.flushed_records);
        self.flushed_records = published_records;
        self.pending_since = None;
    }
}

/// A record in the log, borrowed from its mapped segment (zero-copy).
#[derive(Debug, Clone)]
pub struct StoredRecord {
    segment: Arc<Segment>,
    pos: LogPos,
    offset: usize,
    len: usize,
}

impl StoredRecord {
    pub fn pos(&self) -> LogPos {
        self.pos
    }

    pub fn end(&self) -> LogPos {
        self.pos.advance(self.len as u64)
    }

    /// The whole encoded record.
    pub fn bytes(&self) -> &[u8] {
        self.segment.bytes(self.offset, self.offset + self.len)
    }

    /// The decoded fields. The frame and the fields were checked by `read`.
    pub fn view(&self) -> RecordView<'_> {
        match RecordView::decode_checked_fields(self.bytes()) {
            Ok(view) => view,
            // `read` (and so `Records`) only hands out records whose fields decoded.
            Err(e) => unreachable!("validated record failed to decode: {}", e.reason()),
        }
    }
}

/// The encoded record, so a `bytes::Bytes` can share the mapping instead of copying it.
impl AsRef<[u8]> for StoredRecord {
    fn as_ref(&self) -> &[u8] {
        self.bytes()
    }
}

/// Iterates records in log order, skipping segment ends. Every record it meets was written by
/// this process or checked by recovery when the log was opened, so their CRCs are not checked
/// again: that would double the CRC work of every append.
pub struct Records<'a> {
    log: &'a CommitLog,
    pos: LogPos,
    to: LogPos,
}

impl Records<'_> {
    /// Where the next record would start: past every record and segment end consumed so far.
    pub fn position(&self) -> LogPos {
        self.pos.min(self.log.written_pos())
    }
}

impl Iterator for Records<'_> {
    type Item = Result<(LogPos, StoredRecord)>;

    fn next(&mut self) -> Option<Self::Item> {
        while self.pos < self.to {
            let segment_size = self.log.shared.segment_size;
            let segment_end = LogPos((self.pos.0 / segment_size + 1) * segment_size);
            if segment_end.0 - self.pos.0 < record::HEADER_LEN as u64 {
                self.pos = segment_end;
                continue;
            }
            match self
                .log
                .read_framed(self.pos, record::frame_len_unchecked_crc)
            {
                Ok(record) => {
                    let pos = self.pos;
                    self.pos = record.end();
                    return Some(Ok((pos, record)));
                }
                Err(Error::NoRecord { reason, .. })
                    if reason == DecodeError::EndOfSegment.reason() =>
                {
                    self.pos = segment_end;
                }
                Err(e) => {
                    let error = Some(Err(e));
                    self.to = self.pos;
                    return error;
                }
            }
        }
        None
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_commit_waits_for_a_batch_as_large_as_the_last_but_not_past_the_window() {
        let window = Duration::from_millis(50);
        let mut batch = GroupCommitBatch::default();
        // Nothing flushed yet: the first record goes at once.
        assert_eq!(batch.wait_for_more(1, window), None);
        batch.flushed(10);
        // The last flush covered 10 records: with 4 of the next pending, wait for more.
        let wait = batch.wait_for_more(14, window).unwrap();
        assert!(wait <= window);
        assert_eq!(batch.wanted_records(), 20);
        assert_eq!(batch.wait_for_more(20, window), None);
        // A lone writer waits one window at most, after which batches of 1 go at once.
        std::thread::sleep(window);
        assert_eq!(batch.wait_for_more(11, window), None);
        batch.flushed(11);
        assert_eq!(batch.wait_for_more(12, window), None);
        // A zero window never waits.
        batch.flushed(100);
        assert_eq!(batch.wait_for_more(101, Duration::ZERO), None);
    }
}
