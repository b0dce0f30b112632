//! Scheduled (DELAY) messages: a timer store on disk and a timing wheel in memory.
//!
//! A message due later is appended to [`TIMER_TOPIC`] instead of its topic. The timer thread
//! files each one by delivery time into a slot file (`timer/{slot start ms}.slot`, one per
//! `slot_ms` of delivery time; 16-byte entries `deliver_at_ms, timer offset`), so the disk
//! holds every scheduled message and memory holds only the slots due within
//! `memory_window_ms`, ordered to the millisecond. When an entry is due (never before its
//! time) the thread appends a copy to the real topic and, in the same batch, a done record
//! to [`TIMER_DONE_TOPIC`]; a restart therefore delivers each message once. A recall
//! appends a cancel record to [`TIMER_TOPIC`], filed like an entry.
//!
//! Done and cancel markers go into the slot files too; `timer/checkpoint` says how far the
//! two topics have been filed, and a slot whose entries are all finished is deleted.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use ferrumq_protocol::v2::Code;
use ferrumq_storage::{
    LogPos, MessageStore, MessageType, NewRecord, Properties, QueueOffset, StoredRecord, keys,
};
use serde::{Deserialize, Serialize};

use crate::config::TimerSettings;
use crate::error::{ApiError, ApiResult, BrokerError};
use crate::files;
use crate::log_writer::{Leadership, LogWriter};
use crate::message::{moved_record, property, system_record};
use crate::metadata::Metadata;
use crate::metrics::Metrics;

/// Scheduled messages and recalls, queue 0.
pub const TIMER_TOPIC: &str = "%SYS%TIMER";
/// Which scheduled messages were delivered: written with their copies.
pub const TIMER_DONE_TOPIC: &str = "%SYS%TIMER_DONE";

const ENTRY_LEN: usize = 16;
/// Set in a slot entry's offset: the entry is delivered or recalled.
const FINISHED: u64 = 1 << 63;
/// Entries filed, or delivered, per pass of the timer thread.
const BATCH: usize = 1024;
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
const MAX_OPEN_SLOTS: usize = 256;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Checkpoint {
    /// Every [`TIMER_TOPIC`] offset below this is in its slot file.
    filed_through: u64,
    /// Every [`TIMER_DONE_TOPIC`] record below this has its markers in the slot files.
    done_through: u64,
}

/// A done record: its offset in [`TIMER_DONE_TOPIC`], the `(deliver_at_ms, timer offset)`
/// entries it finished, and where it ends in the log.
type DoneRecord = (u64, Vec<(i64, u64)>, LogPos);

struct State {
    checkpoint: Checkpoint,
    /// Done records whose markers are not yet written, with the log end of their record.
    unmirrored: Vec<DoneRecord>,
    /// Every slot starting before this is in memory.
    loaded_until: i64,
    /// Pending entries of the slots in memory: `(deliver_at_ms, timer offset)`.
    wheel: BTreeSet<(i64, u64)>,
    /// Slots in memory, with how many of their entries are pending.
    pending_per_slot: BTreeMap<i64, usize>,
    open_slots: HashMap<i64, File>,
    /// Recalled entries whose cancel record is not filed yet.
    recalled: HashSet<u64>,
    next_queue: u32,
    /// Entries due before this time were due when the broker started: a crash may have
    /// left their copy without its done record, so the index is asked first.
    verify_before_ms: i64,
}

pub struct Timers {
    store: Arc<MessageStore>,
    log: LogWriter,
    metadata: Arc<Metadata>,
    metrics: Arc<Metrics>,
    settings: TimerSettings,
    dir: PathBuf,
    state: Mutex<State>,
}

/// The handle a producer gets for a scheduled message, to recall it.
pub fn recall_handle(topic: &str, offset: u64, deliver_at_ms: i64) -> String {
    format!(
        "{offset:x}.{deliver_at_ms:x}.{:08x}",
        handle_crc(topic, offset, deliver_at_ms)
    )
}

fn handle_crc(topic: &str, offset: u64, deliver_at_ms: i64) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(topic.as_bytes());
    hasher.update(&offset.to_le_bytes());
    hasher.update(&deliver_at_ms.to_le_bytes());
    hasher.finalize()
}

fn parse_recall_handle(topic: &str, handle: &str) -> Option<(u64, i64)> {
    let mut parts = handle.split('.');
    let offset = u64::from_str_radix(parts.next()?, 16).ok()?;
    let deliver_at = i64::from_str_radix(parts.next()?, 16).ok()?;
    let crc = u32::from_str_radix(parts.next()?, 16).ok()?;
    (parts.next().is_none() && crc == handle_crc(topic, offset, deliver_at))
        .then_some((offset, deliver_at))
}

/// The entries of `wheel` whose millisecond has come by `now_ms`, earliest first (ties in
/// log order), at most `max`: what the timer fires next.
fn due(wheel: &BTreeSet<(i64, u64)>, now_ms: i64, max: usize) -> Vec<(i64, u64)> {
    wheel
        .iter()
        .take_while(|(at, _)| *at <= now_ms)
        .take(max)
        .copied()
        .collect()
}

/// Slots further behind than this are not tried one by one: loading jumps to the next file.
const SCAN_GAP_SLOTS: i64 = 1024;

/// The slot a `<slot>.slot` file holds.
fn slot_of_file_name(name: &std::ffi::OsStr) -> Option<i64> {
    name.to_str()?.strip_suffix(".slot")?.parse().ok()
}

fn io_error(path: &std::path::Path, e: std::io::Error) -> ApiError {
    ApiError::internal(format!("timer store {}: {e}", path.display()))
}

impl Timers {
    /// Opens the timer store and catches up with the log: files what the checkpoint does
    /// not cover, loads the slots due soon, and applies the done records written since.
    pub fn open(
        log: LogWriter,
        metadata: Arc<Metadata>,
        metrics: Arc<Metrics>,
        settings: TimerSettings,
        dir: PathBuf,
        now_ms: i64,
    ) -> Result<Timers, BrokerError> {
        ferrumq_storage::create_dir_all_durably(log.store().file_system().as_ref(), &dir).map_err(
            |source| BrokerError::Io {
                path: dir.clone(),
                source,
            },
        )?;
        let checkpoint_path = dir.join("checkpoint");
        let checkpoint: Checkpoint = match files::read_optional(&checkpoint_path)? {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| BrokerError::Corrupt {
                path: checkpoint_path.clone(),
                reason: e.to_string(),
            })?,
            None => Checkpoint::default(),
        };
        let slot_ms = i64::try_from(settings.slot_ms).unwrap_or(i64::MAX);
        let now_slot = now_ms - now_ms.rem_euclid(slot_ms);
        let earliest = std::fs::read_dir(&dir)
            .map_err(|source| BrokerError::Io {
                path: dir.clone(),
                source,
            })?
            .filter_map(|e| e.ok())
            .filter_map(|e| slot_of_file_name(&e.file_name()))
            .min()
            .map_or(now_slot, |first| first.min(now_slot));
        let timers = Timers {
            store: log.store().clone(),
            log,
            metadata,
            metrics,
            settings,
            dir,
            state: Mutex::new(State {
                checkpoint,
                unmirrored: Vec::new(),
                loaded_until: earliest,
                wheel: BTreeSet::new(),
                pending_per_slot: BTreeMap::new(),
                open_slots: HashMap::new(),
                recalled: HashSet::new(),
                next_queue: 0,
                verify_before_ms: now_ms,
            }),
        };
        let recover = || -> ApiResult<()> {
            let mut state = timers.lock();
            while timers.file_new(&mut state)? == BATCH {}
            timers.load_slots(&mut state, now_ms)?;
            timers.replay_done(&mut state)?;
            Ok(())
        };
        recover().map_err(|e| BrokerError::Corrupt {
            path: timers.dir.clone(),
            reason: e.message,
        })?;
        tracing::info!(
            in_memory = timers.lock().wheel.len(),
            "timer store recovered"
        );
        Ok(timers)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn slot_of(&self, deliver_at_ms: i64) -> i64 {
        let slot_ms = i64::try_from(self.settings.slot_ms).unwrap_or(i64::MAX);
        deliver_at_ms - deliver_at_ms.rem_euclid(slot_ms)
    }

    fn slot_path(&self, slot: i64) -> PathBuf {
        self.dir.join(format!("{slot}.slot"))
    }

    /// Scheduled messages in memory (due within the window).
    pub fn in_memory(&self) -> usize {
        self.lock().wheel.len()
    }

    /// Makes a slot file's entries durable; a failed sync stops the node.
    fn sync_slot(&self, slot: i64, file: &File) -> ApiResult<()> {
        self.store.file_system().sync_file_data(file).map_err(|e| {
            let path = self.slot_path(slot);
            self.store
                .fail_stop(format!("sync of {} failed: {e}", path.display()));
            io_error(&path, e)
        })
    }

    /// Runs the timer thread until `stop` is set or the node has stopped on a failure. Due
    /// entries fire only while this node holds `leadership`; filing and loading go on
    /// regardless.
    pub fn run(&self, stop: &AtomicBool, leadership: &Leadership) {
        let mut last_checkpoint = Instant::now();
        while !stop.load(Ordering::Acquire) {
            if let Some(reason) = self.store.log().failure() {
                tracing::error!(reason, "timer thread stops: the node has failed");
                return;
            }
            let seen = self.store.dispatched_pos();
            let now = crate::service::now_ms();
            let busy = match self.pass(now, leadership.holds()) {
                Ok(busy) => busy,
                Err(e) => {
                    tracing::error!(error = %e.message, "timer pass failed; retrying");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            if last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
                if let Err(e) = self.checkpoint(now) {
                    tracing::error!(error = %e.message, "timer checkpoint failed");
                }
                last_checkpoint = Instant::now();
            }
            if busy {
                continue;
            }
            let next_due = self.lock().wheel.first().map(|(at, _)| *at);
            let wait_ms = next_due.map_or(50, |at| (at - crate::service::now_ms()).clamp(0, 50));
            // Wakes early when anything new is dispatched: it may be a timer entry.
            self.store.wait_dispatched(
                LogPos(seen.0 + 1),
                Duration::from_millis(u64::try_from(wait_ms).unwrap_or(0)),
            );
        }
        if let Err(e) = self.checkpoint(crate::service::now_ms()) {
            tracing::error!(error = %e.message, "timer checkpoint at shutdown failed");
        }
    }

    /// One pass: file new entries, load slots coming due, deliver what is due. Returns
    /// whether a batch limit was hit (more work waits).
    fn pass(&self, now_ms: i64, fire: bool) -> ApiResult<bool> {
        let mut state = self.lock();
        let filed = self.file_new(&mut state)?;
        self.load_slots(&mut state, now_ms)?;
        let delivered = match fire {
            true => self.deliver_due(&mut state, now_ms)?,
            false => 0,
        };
        Ok(filed == BATCH || delivered == BATCH)
    }

    /// Files up to [`BATCH`] new records of [`TIMER_TOPIC`]; returns how many.
    fn file_new(&self, state: &mut State) -> ApiResult<usize> {
        let Some(queue) = self.store.consume_queue(TIMER_TOPIC, 0) else {
            return Ok(0);
        };
        let from = state.checkpoint.filed_through.max(queue.min_offset().0);
        let to = queue.max_offset().0.min(from + BATCH as u64);
        let mut filed = 0;
        for offset in from..to {
            let Some(entry) = queue.get(QueueOffset(offset)) else {
                break;
            };
            let record = self.store.read(entry.log_pos)?;
            let view = record.view();
            match view.message_type {
                MessageType::System => {
                    if let Some((target, deliver_at)) = parse_cancel(view.body) {
                        self.write_entry(state, deliver_at, target | FINISHED)?;
                        if state.wheel.remove(&(deliver_at, target)) {
                            self.count(state, deliver_at, -1);
                        }
                        state.recalled.remove(&target);
                    }
                }
                _ => {
                    if let Some(deliver_at) = deliver_at(&record) {
                        self.write_entry(state, deliver_at, offset)?;
                        let slot = self.slot_of(deliver_at);
                        if slot < state.loaded_until && !state.recalled.contains(&offset) {
                            state.wheel.insert((deliver_at, offset));
                            self.count(state, deliver_at, 1);
                        }
                    }
                }
            }
            state.checkpoint.filed_through = offset + 1;
            filed += 1;
        }
        Ok(filed)
    }

    fn count(&self, state: &mut State, deliver_at: i64, change: isize) {
        let pending = state
            .pending_per_slot
            .entry(self.slot_of(deliver_at))
            .or_insert(0);
        *pending = pending.saturating_add_signed(change);
    }

    fn write_entry(&self, state: &mut State, deliver_at: i64, offset: u64) -> ApiResult<()> {
        let slot = self.slot_of(deliver_at);
        if !state.open_slots.contains_key(&slot) {
            if state.open_slots.len() >= MAX_OPEN_SLOTS {
                for (slot, file) in state.open_slots.drain() {
                    self.sync_slot(slot, &file)?;
                }
            }
            let path = self.slot_path(slot);
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| io_error(&path, e))?;
            state.open_slots.insert(slot, file);
        }
        let mut bytes = [0u8; ENTRY_LEN];
        bytes[..8].copy_from_slice(&deliver_at.to_le_bytes());
        bytes[8..].copy_from_slice(&offset.to_le_bytes());
        if let Some(file) = state.open_slots.get_mut(&slot) {
            file.write_all(&bytes)
                .map_err(|e| io_error(&self.slot_path(slot), e))?;
        }
        Ok(())
    }

    /// Brings every slot starting before `now + memory_window_ms` into memory.
    fn load_slots(&self, state: &mut State, now_ms: i64) -> ApiResult<()> {
        let window = i64::try_from(self.settings.memory_window_ms).unwrap_or(i64::MAX);
        let slot_ms = i64::try_from(self.settings.slot_ms).unwrap_or(i64::MAX);
        let until = now_ms.saturating_add(window);
        while state.loaded_until < until {
            if until - state.loaded_until > slot_ms.saturating_mul(SCAN_GAP_SLOTS) {
                // Long after the last load (a broker stopped for a while): jump to the next
                // slot that has a file rather than trying each one on the way.
                let next = self
                    .first_slot_file_from(state.loaded_until)?
                    .unwrap_or_else(|| self.slot_of(until));
                if next > state.loaded_until {
                    state.loaded_until = next;
                    continue;
                }
            }
            let slot = state.loaded_until;
            let path = self.slot_path(slot);
            let mut bytes = Vec::new();
            match File::open(&path) {
                Ok(mut file) => {
                    file.read_to_end(&mut bytes)
                        .map_err(|e| io_error(&path, e))?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(&path, e)),
            }
            let mut scheduled = BTreeSet::new();
            let mut finished = HashSet::new();
            // A torn last entry (a crash mid-write) is ignored, and so is one outside this
            // slot: zeros where a power cut kept a file's length but not its bytes. Entries
            // past the checkpoint are filed again from the log.
            for entry in bytes.chunks_exact(ENTRY_LEN) {
                let (at, offset) = entry.split_at(8);
                let at = i64::from_le_bytes(at.try_into().unwrap_or_default());
                let offset = u64::from_le_bytes(offset.try_into().unwrap_or_default());
                if self.slot_of(at) != slot {
                    continue;
                }
                if offset & FINISHED == 0 {
                    scheduled.insert((at, offset));
                } else {
                    finished.insert(offset & !FINISHED);
                }
            }
            let mut pending = 0;
            for (at, offset) in scheduled {
                if !finished.contains(&offset) && !state.recalled.contains(&offset) {
                    state.wheel.insert((at, offset));
                    pending += 1;
                }
            }
            state.pending_per_slot.insert(slot, pending);
            state.loaded_until = slot.saturating_add(slot_ms);
        }
        Ok(())
    }

    /// The earliest slot at or after `from` that has a slot file.
    fn first_slot_file_from(&self, from: i64) -> ApiResult<Option<i64>> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| io_error(&self.dir, e))?;
        Ok(entries
            .filter_map(Result::ok)
            .filter_map(|e| slot_of_file_name(&e.file_name()))
            .filter(|slot| *slot >= from)
            .min())
    }

    /// Applies done records the slot files may lack (written since the checkpoint).
    fn replay_done(&self, state: &mut State) -> ApiResult<()> {
        let Some(queue) = self.store.consume_queue(TIMER_DONE_TOPIC, 0) else {
            return Ok(());
        };
        let from = state.checkpoint.done_through.max(queue.min_offset().0);
        for offset in from..queue.max_offset().0 {
            let Some(entry) = queue.get(QueueOffset(offset)) else {
                break;
            };
            let record = self.store.read(entry.log_pos)?;
            let done = parse_done(record.view().body);
            for &(at, timer_offset) in &done {
                if state.wheel.remove(&(at, timer_offset)) {
                    self.count(state, at, -1);
                }
            }
            state.unmirrored.push((offset, done, record.end()));
        }
        Ok(())
    }

    /// Delivers up to [`BATCH`] due entries; returns how many were taken.
    fn deliver_due(&self, state: &mut State, now_ms: i64) -> ApiResult<usize> {
        let due = due(&state.wheel, now_ms, BATCH);
        if due.is_empty() {
            return Ok(0);
        }
        let mut sources: Vec<(StoredRecord, u32, Properties)> = Vec::with_capacity(due.len());
        let mut taken = Vec::with_capacity(due.len());
        for &(at, offset) in &due {
            let record =
                self.store
                    .read_queued(TIMER_TOPIC, 0, QueueOffset(offset), Duration::ZERO);
            let Some(record) = record.filter(|r| deliver_at(r) == Some(at)) else {
                // Deleted by retention, or an entry left by a record a machine crash
                // took back: nothing to deliver.
                tracing::warn!(offset, "scheduled message no longer in the log");
                taken.push((at, offset));
                continue;
            };
            let view = record.view();
            let topic = view
                .properties
                .get(property::REAL_TOPIC)
                .unwrap_or_default();
            let Some(config) = self.metadata.topic(topic) else {
                tracing::warn!(
                    topic,
                    offset,
                    "scheduled message's topic was deleted; dropped"
                );
                taken.push((at, offset));
                continue;
            };
            if at < state.verify_before_ms && self.delivered_before(&record, topic) {
                taken.push((at, offset));
                continue;
            }
            let properties =
                crate::message::properties_without(view.properties, &[property::REAL_TOPIC])?;
            state.next_queue = state.next_queue.wrapping_add(1);
            let queue_id = state.next_queue % config.queue_count.max(1);
            sources.push((record, queue_id, properties));
            taken.push((at, offset));
        }
        let mut done_body = Vec::with_capacity(taken.len() * ENTRY_LEN);
        for (at, offset) in &taken {
            done_body.extend_from_slice(&at.to_le_bytes());
            done_body.extend_from_slice(&offset.to_le_bytes());
        }
        let mut records: Vec<NewRecord<'_>> = sources
            .iter()
            .map(|(record, queue_id, properties)| {
                let view = record.view();
                let topic = view
                    .properties
                    .get(property::REAL_TOPIC)
                    .unwrap_or_default();
                moved_record(&view, topic, *queue_id, MessageType::Delay, properties)
            })
            .collect();
        records.push(system_record(TIMER_DONE_TOPIC, &done_body));
        let mut appended = Vec::with_capacity(records.len());
        self.log.propose_batch(&records, &mut appended)?;
        if let Some(done) = appended.last() {
            state
                .unmirrored
                .push((done.queue_offset.0, taken.clone(), done.end()));
        }
        for (at, offset) in &taken {
            if state.wheel.remove(&(*at, *offset)) {
                self.count(state, *at, -1);
            }
        }
        self.metrics
            .add(&self.metrics.timers_delivered, sources.len() as u64);
        Ok(due.len())
    }

    /// Whether a copy of this scheduled message is already in its topic.
    fn delivered_before(&self, record: &StoredRecord, topic: &str) -> bool {
        let view = record.view();
        let id = view.properties.get(keys::MESSAGE_ID).unwrap_or_default();
        self.store
            .query_by_id(id, view.store_timestamp_ms, i64::MAX)
            .iter()
            .any(|r| {
                r.pos() > record.pos()
                    && r.view().topic == topic
                    && r.view().message_type == MessageType::Delay
            })
    }

    /// Cancels a scheduled message that is not delivered yet. Returns its message id and
    /// the log position to make durable before answering.
    pub fn recall(&self, topic: &str, handle: &str) -> ApiResult<(String, LogPos)> {
        let (offset, deliver_at) = parse_recall_handle(topic, handle).ok_or_else(|| {
            ApiError::bad_request(format!(
                "recall_handle {handle:?} is not a handle this broker gave out for topic {topic:?}"
            ))
        })?;
        // Recalled moments after it was stored, dispatch may still be on its way.
        let record = self
            .store
            .read_queued(TIMER_TOPIC, 0, QueueOffset(offset), Duration::from_secs(1))
            .filter(|r| deliver_at_of(r) == Some(deliver_at))
            .ok_or_else(|| {
                ApiError::new(
                    Code::NotFound,
                    format!("recall_handle {handle:?}: the scheduled message is gone"),
                )
            })?;
        let message_id = record
            .view()
            .properties
            .get(keys::MESSAGE_ID)
            .unwrap_or_default()
            .to_owned();
        let mut state = self.lock();
        let filed = offset < state.checkpoint.filed_through;
        let in_memory = self.slot_of(deliver_at) < state.loaded_until;
        let pending = if filed && in_memory {
            state.wheel.contains(&(deliver_at, offset))
        } else {
            !state.recalled.contains(&offset)
        };
        if !pending {
            return Err(ApiError::new(
                Code::NotFound,
                format!("message {message_id} was already delivered or recalled"),
            ));
        }
        // The cancel record first: if it cannot be written, the message stays scheduled,
        // as the error the caller gets says.
        let body = format!("{offset} {deliver_at}");
        let appended = self
            .log
            .propose(&system_record(TIMER_TOPIC, body.as_bytes()))?;
        if filed && in_memory {
            state.wheel.remove(&(deliver_at, offset));
            self.count(&mut state, deliver_at, -1);
        }
        state.recalled.insert(offset);
        self.metrics.add(&self.metrics.timers_recalled, 1);
        Ok((message_id, appended.end()))
    }

    /// Makes the markers durable, records how far filing got, and deletes finished slots.
    fn checkpoint(&self, now_ms: i64) -> ApiResult<()> {
        let mut state = self.lock();
        // A done marker must never be on disk before its done record and copies are.
        let log_end = state.unmirrored.iter().map(|(_, _, end)| *end).max();
        if let Some(end) = log_end {
            drop(state);
            self.store.durable(end).wait()?;
            state = self.lock();
        }
        let unmirrored = std::mem::take(&mut state.unmirrored);
        for (done_offset, entries, _) in unmirrored {
            for (at, offset) in entries {
                self.write_entry(&mut state, at, offset | FINISHED)?;
            }
            state.checkpoint.done_through = state.checkpoint.done_through.max(done_offset + 1);
        }
        // Filed entries must not name records a machine crash could take back.
        let written = self.store.log().written_pos();
        drop(state);
        self.store.durable(written).wait()?;
        let mut state = self.lock();
        for (slot, file) in &state.open_slots {
            self.sync_slot(*slot, file)?;
        }
        let bytes =
            serde_json::to_vec(&state.checkpoint).map_err(|e| ApiError::internal(e.to_string()))?;
        files::replace_file(&self.store, &self.dir.join("checkpoint"), &bytes)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let slot_ms = i64::try_from(self.settings.slot_ms).unwrap_or(i64::MAX);
        let finished: Vec<i64> = state
            .pending_per_slot
            .iter()
            .filter(|(slot, pending)| **pending == 0 && slot.saturating_add(slot_ms) <= now_ms)
            .map(|(slot, _)| *slot)
            .collect();
        for slot in finished {
            state.pending_per_slot.remove(&slot);
            state.open_slots.remove(&slot);
            let path = self.slot_path(slot);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(&path, e)),
            }
        }
        Ok(())
    }
}

fn deliver_at(record: &StoredRecord) -> Option<i64> {
    (record.view().message_type == MessageType::Delay)
        .then(|| deliver_at_of(record))
        .flatten()
}

fn deliver_at_of(record: &StoredRecord) -> Option<i64> {
    record
        .view()
        .properties
        .get(property::DELIVER_AT_MS)?
        .parse()
        .ok()
}

fn parse_cancel(body: &[u8]) -> Option<(u64, i64)> {
    let text = std::str::from_utf8(body).ok()?;
    let (offset, at) = text.split_once(' ')?;
    Some((offset.parse().ok()?, at.parse().ok()?))
}

fn parse_done(body: &[u8]) -> Vec<(i64, u64)> {
    body.chunks_exact(ENTRY_LEN)
        .map(|entry| {
            let (at, offset) = entry.split_at(8);
            (
                i64::from_le_bytes(at.try_into().unwrap_or_default()),
                u64::from_le_bytes(offset.try_into().unwrap_or_default()),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recall_handles_name_their_topic_and_entry() {
        let handle = recall_handle("orders", 42, 1_800_000_000_123);
        assert_eq!(
            parse_recall_handle("orders", &handle),
            Some((42, 1_800_000_000_123))
        );
        assert_eq!(parse_recall_handle("other", &handle), None);
        assert_eq!(parse_recall_handle("orders", "2a.1.0"), None);
        assert_eq!(parse_recall_handle("orders", ""), None);
    }

    #[test]
    fn entries_fire_when_their_millisecond_comes_earliest_first_never_before() {
        let wheel: BTreeSet<(i64, u64)> = [(1_000, 7), (999, 9), (1_000, 3), (1_001, 1)]
            .into_iter()
            .collect();
        assert_eq!(due(&wheel, 998, 10), []);
        assert_eq!(due(&wheel, 999, 10), [(999, 9)]);
        assert_eq!(due(&wheel, 1_000, 10), [(999, 9), (1_000, 3), (1_000, 7)]);
        assert_eq!(due(&wheel, 5_000, 2), [(999, 9), (1_000, 3)]);
    }

    /// What a power cut can leave: a slot file whose length survived and its bytes did not
    /// (zeros), and a slot file far behind now. Opening loads nothing from either, and does
    /// not try every slot since the old one (a hundred million here).
    #[test]
    fn zeroed_entries_are_ignored_and_an_old_slot_is_not_walked_to_one_by_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            MessageStore::open(
                &dir.path().join("store"),
                ferrumq_storage::StoreOptions::for_tests(),
            )
            .unwrap(),
        );
        let config = Arc::new(crate::BrokerConfig::default());
        let log = LogWriter::new(store, crate::config::FlushPolicy::Sync);
        let metadata = Arc::new(Metadata::open(dir.path(), config.clone(), log.clone()).unwrap());
        let settings = TimerSettings {
            slot_ms: 1000,
            memory_window_ms: 2000,
        };
        let now = 1_800_000_000_000i64;
        let timer_dir = dir.path().join("timer");
        std::fs::create_dir(&timer_dir).unwrap();
        let old_slot = now - 100_000_000 * 1000;
        std::fs::write(timer_dir.join(format!("{old_slot}.slot")), [0u8; ENTRY_LEN]).unwrap();
        std::fs::write(timer_dir.join(format!("{now}.slot")), [0u8; 4 * ENTRY_LEN]).unwrap();
        let (done, opened) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let timers = Timers::open(
                log,
                metadata,
                Arc::new(Metrics::default()),
                settings,
                timer_dir,
                now,
            )
            .unwrap();
            let _ = done.send(timers.in_memory());
        });
        let in_memory = opened
            .recv_timeout(Duration::from_secs(20))
            .expect("opening walked every slot since the old one");
        assert_eq!(in_memory, 0);
    }
}
