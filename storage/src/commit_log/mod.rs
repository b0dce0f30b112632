//! The commit log: one append-only log of records for all topics, in fixed-size segments.
//!
//! Appends serialize on one writer lock, which copies the record into the mapped active segment
//! and publishes the new write position. Durability is the flusher thread's job: it flushes
//! everything written since its last flush in one call and then releases every caller waiting
//! for a position it covered (group commit). After a failed flush the log is fail-stop: it
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
use crate::fs::FileSystem;
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

/// Next queue offset per topic and queue id.
pub(crate) type QueueOffsets = HashMap<String, HashMap<u32, u64>>;

pub struct CommitLog {
    shared: Arc<Shared>,
    flusher: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    dir: PathBuf,
    segment_size: u64,
    flush_mode: FlushMode,
    fs: Arc<dyn FileSystem>,
    /// Oldest first; every segment is `segment_size` bytes and they are contiguous.
    segments: RwLock<VecDeque<Arc<Segment>>>,
    writer: Mutex<Writer>,
    /// Every byte below this is written; published after the copy (Release).
    written: AtomicU64,
    flushed: AtomicU64,
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
    /// Woken whenever the dispatchable end moves (the dispatcher).
    progress_listener: OnceLock<Thread>,
}

struct Writer {
    active: Arc<Segment>,
    /// Write offset inside the active segment.
    offset: usize,
    next_offsets: QueueOffsets,
    last_store_timestamp_ms: i64,
    /// Set by the disk-usage check: appends are refused while it is `Some`.
    disk_full: Option<DiskFull>,
}

impl CommitLog {
    /// Opens (or creates) the log in `dir` and recovers it: records from `scan_from` on are
    /// checked one by one, and everything after the last valid one is discarded.
    pub(crate) fn open(
        dir: &Path,
        segment_size: u64,
        flush_mode: FlushMode,
        fs: Arc<dyn FileSystem>,
        scan_from: LogPos,
    ) -> Result<(CommitLog, ScanOutcome)> {
        std::fs::create_dir_all(dir).at(dir)?;
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
            next_offsets: outcome.next_offsets.clone(),
            last_store_timestamp_ms: outcome.last_store_timestamp_ms,
            disk_full: None,
        };
        let end = outcome.valid_end.0;
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            segment_size,
            flush_mode,
            fs,
            segments: RwLock::new(segments),
            writer: Mutex::new(writer),
            written: AtomicU64::new(end),
            flushed: AtomicU64::new(end),
            flush_lock: Mutex::new(()),
            committed: AtomicU64::new(u64::MAX),
            durability: Arc::new(DurabilityWatch::new(LogPos(end))),
            flushes: AtomicU64::new(0),
            flushed_bytes: AtomicU64::new(0),
            shutting_down: false.into(),
            flusher_thread: OnceLock::new(),
            progress_listener: OnceLock::new(),
        });
        let flusher = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("ferrumq-flusher".into())
                .spawn(move || shared.run_flusher())
                .at(dir)?
        };
        let _ = shared.flusher_thread.set(flusher.thread().clone());
        let log = CommitLog {
            shared,
            flusher: Mutex::new(Some(flusher)),
        };
        Ok((log, outcome))
    }

    /// Appends one record. It is written (visible to `read`) on return, durable once
    /// `durable(appended.end())` resolves.
    pub fn append(&self, record: &NewRecord<'_>) -> Result<Appended> {
        let len = self.checked_len(record)?;
        let mut writer = self.lock_writer();
        let appended = self.append_locked(&mut writer, record, len)?;
        self.shared.publish(appended.end());
        Ok(appended)
    }

    /// Appends records in order, all or none: a record that breaks a limit fails the whole
    /// batch before anything is written.
    pub fn append_batch(&self, records: &[NewRecord<'_>], out: &mut Vec<Appended>) -> Result<()> {
        let mut lens = Vec::with_capacity(records.len());
        for record in records {
            lens.push(self.checked_len(record)?);
        }
        let mut writer = self.lock_writer();
        let mut end = None;
        for (record, len) in records.iter().zip(lens) {
            let appended = self.append_locked(&mut writer, record, len)?;
            end = Some(appended.end());
            out.push(appended);
        }
        if let Some(end) = end {
            self.shared.publish(end);
        }
        Ok(())
    }

    /// Resolves when every byte below `end` is durable.
    pub fn durable(&self, end: LogPos) -> Durable {
        if self.shared.flush_mode == FlushMode::Sync {
            self.shared.wake_flusher();
        }
        Durable::new(self.shared.durability.clone(), end)
    }

    /// Flushes everything written so far now, whatever the flush mode.
    pub fn flush(&self) -> Result<LogPos> {
        self.shared.flush()
    }

    /// Reads the record that starts at `pos`, checking its CRC.
    pub fn read(&self, pos: LogPos) -> Result<StoredRecord> {
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
        match record::frame_len(bytes) {
            Ok(len) => Ok(StoredRecord {
                segment,
                pos,
                offset,
                len,
            }),
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

    /// Removes the records from `from` on, which must not have been dispatched (the caller
    /// checks). Used by a replication layer to drop an uncommitted suffix that lost an
    /// election. Waiters for the removed records get `Error::Truncated`.
    pub fn truncate_uncommitted(&self, from: LogPos) -> Result<()> {
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
        let active = segments.back().cloned().ok_or(Error::NoRecord {
            pos: from,
            reason: "no segment holds the truncation point",
        })?;
        drop(segments);
        self.shared
            .fs
            .sync_dir(&self.shared.dir)
            .at(&self.shared.dir)?;
        let offset = (from.0 - active.base()) as usize;
        let end = (written.0 - active.base()).min(self.shared.segment_size) as usize;
        active.bytes_mut(offset, end).fill(0);
        active
            .sync(self.shared.fs.as_ref(), offset, end)
            .at(active.path())?;
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

    pub(crate) fn set_disk_full(&self, refusal: Option<DiskFull>) {
        self.lock_writer().disk_full = refusal;
    }

    pub(crate) fn set_progress_listener(&self, thread: Thread) {
        let _ = self.shared.progress_listener.set(thread);
    }

    pub(crate) fn seed_queue_offsets(&self, offsets: impl IntoIterator<Item = (String, u32, u64)>) {
        let mut writer = self.lock_writer();
        for (topic, queue_id, next) in offsets {
            let slot = writer
                .next_offsets
                .entry(topic)
                .or_default()
                .entry(queue_id)
                .or_insert(0);
            *slot = (*slot).max(next);
        }
    }

    /// Flushes what was written, stops the flusher, and waits for it.
    pub fn close(&self) -> Result<()> {
        let result = self.shared.flush();
        self.shared.shutting_down.store(true, Ordering::Release);
        self.shared.wake_flusher();
        let handle = self
            .flusher
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle {
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
        if let Some(full) = &writer.disk_full {
            return Err(full.to_error());
        }
        if writer.offset + len > writer.active.len() {
            self.roll(writer)?;
        }
        let queue_offset = {
            let next = match writer.next_offsets.get_mut(record.topic) {
                Some(queues) => queues.entry(record.queue_id).or_insert(0),
                None => writer
                    .next_offsets
                    .entry(record.topic.to_owned())
                    .or_default()
                    .entry(record.queue_id)
                    .or_insert(0),
            };
            let offset = QueueOffset(*next);
            *next += 1;
            offset
        };
        let store_timestamp_ms = now_ms().max(writer.last_store_timestamp_ms);
        writer.last_store_timestamp_ms = store_timestamp_ms;
        let start = writer.offset;
        let dst = writer.active.bytes_mut(start, start + len);
        record::encode_into(record, queue_offset, store_timestamp_ms, dst);
        writer.offset += len;
        Ok(Appended {
            pos: writer.active.base_pos().advance(start as u64),
            len: u32::try_from(len).unwrap_or(u32::MAX),
            queue_offset,
            store_timestamp_ms,
        })
    }

    /// Closes the active segment with an end marker and starts the next one.
    fn roll(&self, writer: &mut Writer) -> Result<()> {
        let size = writer.active.len();
        if size - writer.offset >= 4 {
            writer
                .active
                .bytes_mut(writer.offset, writer.offset + 4)
                .copy_from_slice(&END_OF_SEGMENT_MAGIC.to_le_bytes());
        }
        let base = writer.active.base_pos().advance(self.shared.segment_size);
        let segment = Arc::new(Segment::create(
            &self.shared.dir,
            base.0,
            self.shared.segment_size,
            self.shared.fs.as_ref(),
        )?);
        self.shared.write_segments().push_back(segment.clone());
        writer.active = segment;
        writer.offset = 0;
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

/// Why appends are refused: the disk is fuller than the configured watermark.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DiskFull {
    pub(crate) path: PathBuf,
    pub(crate) usage_percent: f64,
    pub(crate) watermark_percent: f64,
}

impl DiskFull {
    fn to_error(&self) -> Error {
        Error::DiskFull {
            path: self.path.clone(),
            usage_percent: self.usage_percent,
            watermark_percent: self.watermark_percent,
        }
    }
}

impl Shared {
    fn publish(&self, end: LogPos) {
        self.written.store(end.0, Ordering::Release);
        match self.flush_mode {
            FlushMode::Sync => self.wake_flusher(),
            FlushMode::Async { .. } => self.wake_progress_listener(),
        }
    }

    fn wake_flusher(&self) {
        if let Some(thread) = self.flusher_thread.get() {
            thread.unpark();
        }
    }

    fn wake_progress_listener(&self) {
        if let Some(thread) = self.progress_listener.get() {
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
        loop {
            let pending =
                self.written.load(Ordering::Acquire) > self.flushed.load(Ordering::Acquire);
            if pending {
                if let Err(error) = self.flush() {
                    tracing::error!(%error, "commit log flush failed; refusing appends from now on");
                    return;
                }
                if self.flush_mode == FlushMode::Sync {
                    continue;
                }
            }
            if self.shutting_down.load(Ordering::Acquire) {
                return;
            }
            match self.flush_mode {
                FlushMode::Sync => std::thread::park_timeout(Duration::from_millis(100)),
                FlushMode::Async { interval } => std::thread::park_timeout(interval),
            }
        }
    }

    /// One flush: every segment range between the durable and the written position.
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
            let base = segment.base();
            let start = from.saturating_sub(base) as usize;
            let end = (to - base).min(self.segment_size) as usize;
            if let Err(source) = segment.sync(self.fs.as_ref(), start, end) {
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

    /// The decoded fields. The frame was checked by `read`.
    pub fn view(&self) -> RecordView<'_> {
        match RecordView::decode_fields(self.bytes()) {
            Ok(view) => view,
            // `read` and `Records` only hand out records whose fields decoded.
            Err(e) => unreachable!("validated record failed to decode: {}", e.reason()),
        }
    }
}

/// Iterates records in log order, skipping segment ends.
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
            match self.log.read(self.pos) {
                Ok(record) => {
                    if let Err(e) = RecordView::decode_fields(record.bytes()) {
                        return Some(Err(corrupt(&record, e)));
                    }
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

fn corrupt(record: &StoredRecord, e: DecodeError) -> Error {
    Error::Corrupt {
        path: record.segment.path().to_path_buf(),
        offset: record.offset as u64,
        reason: e.reason(),
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
