//! Consumer groups: POP-style delivery with leases, acks, lease changes, redelivery with a
//! growing attempt count, and dead letters.
//!
//! A receive hands out messages on a lease that ends after the invisible duration. An ack
//! finishes a message; a message whose lease ends unacked is delivered again with the
//! attempt count one higher, and once it has been delivered `max_delivery_attempts` times
//! it is moved to `%DLQ%{group}` (keeping its message id) instead. The state lives in memory
//! ([`state::ConsumerState`]), one state and one lock per group, so groups never wait on
//! each other; every change is journaled in the commit log (topic [`OPS_TOPIC`]) before the
//! client hears of it, and a snapshot file bounds the replay.

mod offsets;
pub mod receipt;
pub mod state;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use ferrumq_protocol::v2::Code;
use std::collections::{HashSet, VecDeque};

use ferrumq_storage::{
    ConsumeQueue, LogPos, MessageStore, MessageType, NewRecord, QueueOffset, StoredRecord, keys,
};

use crate::error::{ApiError, ApiResult, BrokerError};
use crate::files;
use crate::filter::Filter;
use crate::log_writer::LogWriter;
use crate::message::property;
use crate::metadata::{GroupConfig, Metadata, StartPosition, TopicConfig};
use crate::metrics::Metrics;
use receipt::ReceiptHandle;
use state::{ConsumerState, Op, QueueState};

/// The internal topic that journals consumer-state changes.
pub const OPS_TOPIC: &str = "%SYS%CONSUMER_STATE";
const SNAPSHOT_FILE: &str = "consumer-state.json";
/// New messages looked at per receive before giving up on a heavily filtered queue.
const MAX_SCAN_PER_RECEIVE: u64 = 4096;

/// Where a queue's scan for new messages stopped, and whether it stopped at its limit.
struct Scan {
    next: u64,
    more: bool,
}

fn message_group(record: &StoredRecord) -> &str {
    record
        .view()
        .properties
        .get(property::MESSAGE_GROUP)
        .unwrap_or_default()
}

/// One message handed out by a receive.
pub struct Delivered {
    pub record: StoredRecord,
    pub handle: ReceiptHandle,
    pub attempt: u32,
}

/// What a receive found, and the log position that must be durable before the client hears.
pub struct Received {
    pub messages: Vec<Delivered>,
    pub journal_end: Option<LogPos>,
    /// The scan stopped at its limit with messages left to look at (a heavily filtered
    /// queue): receive again at once rather than wait for new messages.
    pub more: bool,
}

/// One group's state (a [`ConsumerState`] holding that group only) behind its own lock.
type Shard = Arc<Mutex<ConsumerState>>;

/// `consumer-state.json`: each group's state, with the journal offset of the last op it
/// includes (`last_op`). Every op below `journal_floor` is in it; a group it does not list
/// had none.
#[derive(serde::Serialize, serde::Deserialize)]
struct Snapshot {
    shards: BTreeMap<String, ConsumerState>,
    journal_floor: u64,
}

impl Snapshot {
    /// Reads the snapshot file as written now, or as written before groups had their own
    /// state (one state for all, split here by group).
    fn read(bytes: &[u8]) -> Result<Snapshot, serde_json::Error> {
        let error = match serde_json::from_slice::<Snapshot>(bytes) {
            Ok(snapshot) => return Ok(snapshot),
            Err(error) => error,
        };
        match serde_json::from_slice::<ConsumerState>(bytes) {
            Ok(whole) => Ok(Snapshot::split(whole)),
            Err(_) => Err(error),
        }
    }

    fn split(whole: ConsumerState) -> Snapshot {
        let mut shards: BTreeMap<String, ConsumerState> = BTreeMap::new();
        let shard = |shards: &mut BTreeMap<String, ConsumerState>, group: &str| {
            shards
                .entry(group.to_owned())
                .or_insert_with(|| ConsumerState {
                    epoch: whole.epoch,
                    last_op: whole.last_op,
                    ..ConsumerState::default()
                })
                .groups
                .entry(group.to_owned())
                .or_default();
        };
        for (group, topics) in whole.groups {
            shard(&mut shards, &group);
            if let Some(state) = shards.get_mut(&group) {
                state.groups.insert(group, topics);
            }
        }
        for (key, offset) in whole.pull_offsets {
            shard(&mut shards, &key.0);
            if let Some(state) = shards.get_mut(&key.0) {
                state.pull_offsets.insert(key, offset);
            }
        }
        Snapshot {
            shards,
            journal_floor: whole.last_op.map_or(0, |last| last + 1),
        }
    }
}

pub struct ConsumerGroups {
    store: Arc<MessageStore>,
    log: LogWriter,
    metadata: Arc<Metadata>,
    metrics: Arc<Metrics>,
    snapshot_path: PathBuf,
    /// Each group's state; the map's lock is held only to find or add a group.
    shards: RwLock<HashMap<String, Shard>>,
    /// One snapshot at a time; they share a temporary file.
    snapshot_lock: Mutex<()>,
    /// Where the last journaled op ends: a snapshot waits until it is durable, so it never
    /// names an op that a machine crash could take back.
    last_op_end: AtomicU64,
    /// One past the highest journal offset used so far: a snapshot's `journal_floor`.
    next_op: AtomicU64,
    /// The highest lease epoch handed out in any group: epochs stay unique across groups, so
    /// a receipt handle of one group is stale in every other.
    epoch: AtomicU64,
}

impl ConsumerGroups {
    /// Loads the last snapshot and replays the journal written after it.
    pub fn open(
        log: LogWriter,
        metadata: Arc<Metadata>,
        metrics: Arc<Metrics>,
        dir: PathBuf,
    ) -> Result<ConsumerGroups, BrokerError> {
        let store = log.store().clone();
        let snapshot_path = dir.join(SNAPSHOT_FILE);
        let snapshot = match files::read_optional(&snapshot_path)? {
            Some(bytes) => Snapshot::read(&bytes).map_err(|e| BrokerError::Corrupt {
                path: snapshot_path.clone(),
                reason: e.to_string(),
            })?,
            None => Snapshot {
                shards: BTreeMap::new(),
                journal_floor: 0,
            },
        };
        let (mut shards, mut floor) = (snapshot.shards, snapshot.journal_floor);
        // Every recovered record must be in its consume queue before the journal is read.
        if !store.wait_dispatched(store.log().written_pos(), Duration::from_secs(60)) {
            return Err(BrokerError::Corrupt {
                path: dir.join("store"),
                reason: "the dispatcher did not catch up with the log within 60 s".into(),
            });
        }
        let mut replayed = 0u64;
        let journal_end = store
            .consume_queue(OPS_TOPIC, 0)
            .map_or(0, |q| q.max_offset().0);
        // A snapshot naming ops the log no longer has: new ops will reuse those offsets, so
        // replay must not skip them.
        if floor > journal_end {
            tracing::warn!(floor, journal_end, "snapshot ahead of the journal");
            floor = journal_end;
        }
        for state in shards.values_mut() {
            if state.last_op.is_some_and(|last| last >= journal_end) {
                state.last_op = journal_end.checked_sub(1);
            }
        }
        if let Some(queue) = store.consume_queue(OPS_TOPIC, 0) {
            // Every group's ops below the floor are in the snapshot.
            let first = floor;
            if queue.min_offset().0 > first {
                tracing::warn!(
                    from = first,
                    oldest = queue.min_offset().0,
                    "consumer journal entries after the snapshot were deleted by retention"
                );
            }
            for offset in first.max(queue.min_offset().0)..queue.max_offset().0 {
                let Some(entry) = queue.get(QueueOffset(offset)) else {
                    break;
                };
                let record = store.read(entry.log_pos)?;
                let op: Op = serde_json::from_slice(record.view().body).map_err(|e| {
                    BrokerError::Corrupt {
                        path: dir.join("commitlog"),
                        reason: format!("consumer journal entry {offset}: {e}"),
                    }
                })?;
                let state = shards.entry(op.group().to_owned()).or_default();
                if state.last_op.is_none_or(|last| offset > last) {
                    state.apply(&op);
                    state.last_op = Some(offset);
                    replayed += 1;
                }
            }
        }
        tracing::info!(replayed, groups = shards.len(), "consumer state recovered");
        let epoch = shards.values().map(|s| s.epoch).max().unwrap_or(0);
        let shards = shards
            .into_iter()
            .map(|(group, state)| (group, Arc::new(Mutex::new(state))))
            .collect();
        Ok(ConsumerGroups {
            store,
            log,
            metadata,
            metrics,
            snapshot_path,
            shards: RwLock::new(shards),
            snapshot_lock: Mutex::new(()),
            last_op_end: AtomicU64::new(0),
            next_op: AtomicU64::new(journal_end),
            epoch: AtomicU64::new(epoch),
        })
    }

    /// A lease epoch no group has used.
    fn next_epoch(&self, state: &mut ConsumerState) -> u64 {
        let epoch = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        state.epoch = state.epoch.max(epoch);
        epoch
    }

    /// The group's state, added empty if the group has none yet.
    fn shard(&self, group: &str) -> Shard {
        if let Some(shard) = self.existing(group) {
            return shard;
        }
        let mut shards = self.shards.write().unwrap_or_else(PoisonError::into_inner);
        shards.entry(group.to_owned()).or_default().clone()
    }

    /// The group's state, if it has one.
    fn existing(&self, group: &str) -> Option<Shard> {
        self.shards
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(group)
            .cloned()
    }

    /// Every group's state, in no particular order.
    fn all(&self) -> Vec<Shard> {
        self.shards
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// Hands out up to `batch` messages of `topic` from every queue: first messages whose
    /// lease ended (attempt + 1), then new ones. Never waits. With `auto_renew` (a push
    /// consumer's client id and a time limit) the broker keeps extending the leases while
    /// that client stays connected.
    #[allow(clippy::too_many_arguments, reason = "one receive request's fields")]
    pub fn receive(
        &self,
        group: &GroupConfig,
        topic: &TopicConfig,
        filter: &Filter,
        batch: usize,
        invisible_ms: u64,
        now_ms: i64,
        auto_renew: Option<(&str, i64)>,
    ) -> ApiResult<Received> {
        let shard = self.shard(&group.name);
        let mut state = lock(&shard);
        let mut journal_end = None;
        let mut picked: Vec<(u32, u64, u32)> = Vec::new();
        let mut records = Vec::new();
        let queue_ids = rotation(topic.queue_count, state.epoch);

        // Leases that ended: deliver again, or dead-letter at the last attempt. Every queue
        // id the group holds leases on counts, even one a re-created topic no longer has.
        let held: Vec<u32> = state
            .groups
            .get(&group.name)
            .and_then(|t| t.get(&topic.name))
            .map(|q| q.keys().copied().collect())
            .unwrap_or_default();
        for queue_id in held {
            let expired: Vec<(u64, u32)> = state
                .queue(&group.name, &topic.name, queue_id)
                .map(|q| {
                    q.leases
                        .iter()
                        .filter(|(_, l)| l.visible_at_ms <= now_ms)
                        .map(|(o, l)| (o, l.attempt))
                        .collect()
                })
                .unwrap_or_default();
            for (offset, attempt) in expired {
                if picked.len() >= batch {
                    break;
                }
                let record = match self.record_at(&topic.name, queue_id, offset) {
                    Ok(Some(record)) => record,
                    Ok(None) => {
                        // Deleted by retention: nothing left to deliver.
                        let end =
                            self.journal(&mut state, done_op(group, topic, queue_id, offset))?;
                        journal_end = Some(end);
                        continue;
                    }
                    Err(e) => {
                        // Unreadable, not gone: never finished silently. It stays leased,
                        // and the other messages go on.
                        tracing::error!(group = %group.name, topic = %topic.name, queue_id, offset, error = %e.message, "cannot read a message to deliver it again");
                        continue;
                    }
                };
                if attempt >= group.max_delivery_attempts {
                    journal_end = Some(
                        self.dead_letter(&mut state, group, topic, queue_id, offset, &record)?,
                    );
                    continue;
                }
                picked.push((queue_id, offset, attempt + 1));
                records.push(record);
            }
        }

        // New messages, queue by queue. How far each queue was scanned is kept aside and
        // recorded only once the deliveries are journaled: a failure leaves nothing skipped.
        let mut scanned = Vec::new();
        let mut ordered_queues = Vec::new();
        let mut more = false;
        let ordered = group.fifo && topic.accepts(ferrumq_protocol::v2::MessageType::Fifo);
        for &queue_id in &queue_ids {
            if picked.len() >= batch {
                break;
            }
            let Some(queue) = self.store.consume_queue(&topic.name, queue_id) else {
                continue;
            };
            let start = || start_offset(group, &queue);
            let qs = state.queue_mut(&group.name, &topic.name, queue_id, start);
            // Retention deleted what the group never finished: nothing is left to deliver.
            qs.skip_below(queue.min_offset().0);
            if !ordered && !qs.waiting.is_empty() {
                // The group was FIFO until now: what waited behind its message groups is
                // below `scanned`.
                qs.rescan_waiting();
            }
            let room = batch - picked.len();
            let mut pick = |offset: u64, record: StoredRecord| {
                picked.push((queue_id, offset, 1));
                records.push(record);
            };
            let scan = if ordered {
                // What waits behind each message group changes as the scan goes; if this
                // receive fails, it is rebuilt by a rescan.
                ordered_queues.push(queue_id);
                self.scan_ordered(qs, &queue, filter, room, &mut pick)
            } else {
                self.scan(qs, &queue, filter, room, &mut pick)
            };
            let scan = match scan {
                Ok(scan) => scan,
                Err(e) => {
                    rescan_waiting(&mut state, group, topic, &ordered_queues);
                    return Err(e);
                }
            };
            more |= scan.more;
            scanned.push((queue_id, scan.next));
        }
        let record_scans = |state: &mut ConsumerState| {
            for &(queue_id, offset) in &scanned {
                if let Some(q) = state.queue_if_held(&group.name, &topic.name, queue_id) {
                    q.scanned = q.scanned.max(offset);
                }
            }
        };

        if picked.is_empty() {
            record_scans(&mut state);
            return Ok(Received {
                messages: Vec::new(),
                journal_end,
                more,
            });
        }
        let epoch = self.next_epoch(&mut state);
        let invisible = i64::try_from(invisible_ms).unwrap_or(i64::MAX);
        let op = Op::Deliver {
            group: group.name.clone(),
            topic: topic.name.clone(),
            messages: picked.clone(),
            epoch,
            visible_at_ms: now_ms.saturating_add(invisible),
            renew_until_ms: auto_renew.map_or(0, |(_, until)| until),
            owner: auto_renew.map_or_else(String::new, |(owner, _)| owner.to_owned()),
        };
        match self.journal(&mut state, op) {
            Ok(end) => journal_end = Some(end),
            Err(e) => {
                rescan_waiting(&mut state, group, topic, &ordered_queues);
                return Err(e);
            }
        }
        record_scans(&mut state);
        drop(state);
        self.metrics.add_delivered(picked.len() as u64);
        let messages = picked
            .into_iter()
            .zip(records)
            .map(|((queue_id, offset, attempt), record)| Delivered {
                record,
                handle: ReceiptHandle {
                    queue_id,
                    offset,
                    epoch,
                },
                attempt,
            })
            .collect();
        Ok(Received {
            messages,
            journal_end,
            more,
        })
    }

    /// Finishes the messages of an ack's entries, given their receipt handles. Each entry's
    /// outcome is its own: an entry already acked is OK again; a handle from an earlier
    /// delivery is INVALID_RECEIPT_HANDLE.
    pub fn ack(
        &self,
        group: &GroupConfig,
        topic: &TopicConfig,
        handles: &[&[u8]],
    ) -> (Vec<ApiResult<()>>, Option<LogPos>) {
        // Parsed before the lock: other consumers of the group need not wait for it.
        let parsed: Vec<ApiResult<ReceiptHandle>> = handles
            .iter()
            .enumerate()
            .map(|(index, text)| ReceiptHandle::decode(text, &topic.name, &EntryField(index)))
            .collect();
        let shard = self.shard(&group.name);
        let mut state = lock(&shard);
        let mut outcomes = Vec::with_capacity(handles.len());
        let mut finished = Vec::new();
        // The group's queues of the topic, looked up by name once for all entries.
        let queues = state.queues(&group.name, &topic.name);
        for (index, parsed) in parsed.into_iter().enumerate() {
            let field = EntryField(index);
            let outcome = parsed.and_then(|handle| {
                let queue = queues.and_then(|q| q.get(&handle.queue_id));
                match check_lease(queue, group, &handle, &field)? {
                    LeaseCheck::AlreadyDone => Ok(None),
                    LeaseCheck::Current => Ok(Some((handle.queue_id, handle.offset))),
                }
            });
            outcomes.push(outcome.map(|done| {
                if let Some(done) = done {
                    finished.push((index, done));
                }
            }));
        }
        if finished.is_empty() {
            return (outcomes, None);
        }
        let op = Op::Done {
            group: group.name.clone(),
            topic: topic.name.clone(),
            messages: finished.iter().map(|(_, m)| *m).collect(),
        };
        match self.journal(&mut state, op) {
            Ok(end) => {
                self.metrics.add_acked(finished.len() as u64);
                (outcomes, Some(end))
            }
            Err(err) => {
                for (index, _) in finished {
                    outcomes[index] = Err(err.clone());
                }
                (outcomes, None)
            }
        }
    }

    /// Moves a lease to a new epoch that ends `invisible_ms` from now; returns the new
    /// handle. The attempt count stays: it grows when the message is delivered again.
    pub fn change_invisible(
        &self,
        group: &GroupConfig,
        topic: &TopicConfig,
        text: &str,
        invisible_ms: u64,
        now_ms: i64,
    ) -> ApiResult<(String, LogPos)> {
        let shard = self.shard(&group.name);
        let mut state = lock(&shard);
        let handle = current_lease(&state, group, topic, text)?;
        let epoch = self.next_epoch(&mut state);
        let op = Op::Renew {
            group: group.name.clone(),
            topic: topic.name.clone(),
            queue_id: handle.queue_id,
            offset: handle.offset,
            epoch,
            visible_at_ms: now_ms.saturating_add(i64::try_from(invisible_ms).unwrap_or(i64::MAX)),
            // The client set the time itself: the broker stops renewing.
            renew_until_ms: 0,
        };
        let end = self.journal(&mut state, op)?;
        let renewed = ReceiptHandle { epoch, ..handle };
        Ok((renewed.encode(&topic.name), end))
    }

    /// Moves a leased message to the group's dead-letter topic at once.
    pub fn forward_to_dead_letter(
        &self,
        group: &GroupConfig,
        topic: &TopicConfig,
        text: &str,
    ) -> ApiResult<LogPos> {
        let shard = self.shard(&group.name);
        let mut state = lock(&shard);
        let handle = current_lease(&state, group, topic, text)?;
        let record = self
            .record_at(&topic.name, handle.queue_id, handle.offset)?
            .ok_or_else(|| {
                ApiError::new(
                    Code::MessageNotFound,
                    "the message was deleted by retention",
                )
            })?;
        self.dead_letter(
            &mut state,
            group,
            topic,
            handle.queue_id,
            handle.offset,
            &record,
        )
    }

    /// Dead-letters every message whose lease ended at its last attempt, so they reach the
    /// DLQ even when nobody receives from the topic any more.
    pub fn sweep(&self, now_ms: i64) -> ApiResult<Option<LogPos>> {
        // One message that cannot be moved does not hold the others back; it is tried
        // again at the next sweep.
        let mut end = None;
        let mut failed = None;
        for shard in self.all() {
            let mut state = lock(&shard);
            let mut due = Vec::new();
            for (group_name, topics) in &state.groups {
                let Some(group) = self.metadata.group(group_name) else {
                    continue;
                };
                for (topic_name, queues) in topics {
                    for (queue_id, queue) in queues {
                        for (offset, lease) in queue.leases.iter() {
                            if lease.visible_at_ms <= now_ms
                                && lease.attempt >= group.max_delivery_attempts
                            {
                                due.push((group.clone(), topic_name.clone(), *queue_id, offset));
                            }
                        }
                    }
                }
            }
            for (group, topic_name, queue_id, offset) in due {
                let Some(topic) = self.metadata.topic(&topic_name) else {
                    continue;
                };
                let moved = match self.record_at(&topic.name, queue_id, offset) {
                    Ok(Some(record)) => {
                        self.dead_letter(&mut state, &group, &topic, queue_id, offset, &record)
                    }
                    Ok(None) => self.journal(&mut state, done_op(&group, &topic, queue_id, offset)),
                    Err(e) => Err(e),
                };
                match moved {
                    Ok(pos) => end = Some(pos),
                    Err(e) => {
                        tracing::warn!(group = %group.name, topic = %topic.name, queue_id, offset, error = %e.message, "could not dead-letter a message; trying again at the next sweep");
                        failed = Some(e);
                    }
                }
            }
        }
        match (end, failed) {
            (None, Some(e)) => Err(e),
            (end, _) => Ok(end),
        }
    }

    /// Extends auto-renewed leases that end within `ahead_ms` by `lease_ms`, while their
    /// owner is connected and their time limit lasts; a lease whose owner went away becomes
    /// visible after `release_ms`, so another consumer gets the message soon.
    pub fn renew_leases(
        &self,
        now_ms: i64,
        lease_ms: i64,
        ahead_ms: i64,
        release_ms: i64,
        connected: impl Fn(&str) -> bool,
    ) -> ApiResult<Option<LogPos>> {
        let mut end = None;
        for shard in self.all() {
            let mut state = lock(&shard);
            let mut due = Vec::new();
            for (group, topics) in &state.groups {
                for (topic, queues) in topics {
                    for (queue_id, queue) in queues {
                        for (offset, lease) in queue.leases.iter() {
                            if lease.renew_until_ms <= now_ms || lease.visible_at_ms <= now_ms {
                                continue;
                            }
                            let (visible_at_ms, renew_until_ms) = if !connected(&lease.owner) {
                                (
                                    now_ms.saturating_add(release_ms).min(lease.visible_at_ms),
                                    0,
                                )
                            } else if lease.visible_at_ms - now_ms <= ahead_ms {
                                let next =
                                    now_ms.saturating_add(lease_ms).min(lease.renew_until_ms);
                                (next.max(lease.visible_at_ms), lease.renew_until_ms)
                            } else {
                                continue;
                            };
                            due.push(Op::Renew {
                                group: group.clone(),
                                topic: topic.clone(),
                                queue_id: *queue_id,
                                offset,
                                epoch: lease.epoch,
                                visible_at_ms,
                                renew_until_ms,
                            });
                        }
                    }
                }
            }
            for op in due {
                end = Some(self.journal(&mut state, op)?);
            }
        }
        Ok(end)
    }

    /// Lets go of the auto-renewed (push) leases `client` holds, as if its Telemetry stream
    /// had ended: each comes back after `release_ms` and is renewed no more.
    pub fn release_leases_of(
        &self,
        client: &str,
        now_ms: i64,
        release_ms: i64,
    ) -> ApiResult<Option<LogPos>> {
        // Every other owner counts as connected and, with nothing renewed ahead, is left be.
        self.renew_leases(now_ms, 0, 0, release_ms, |owner| owner != client)
    }

    /// The earliest time a lease of `group` on `topic` ends, to wake a waiting receive.
    pub fn next_lease_end(&self, group: &str, topic: &str) -> Option<i64> {
        let shard = self.existing(group)?;
        let state = lock(&shard);
        state
            .groups
            .get(group)?
            .get(topic)?
            .values()
            .flat_map(|q| q.leases.values().map(|l| l.visible_at_ms))
            .min()
    }

    pub fn pull_offset(&self, group: &str, topic: &str, queue_id: u32) -> Option<u64> {
        let shard = self.existing(group)?;
        let state = lock(&shard);
        state
            .pull_offsets
            .get(&(group.to_owned(), topic.to_owned(), queue_id))
            .copied()
    }

    pub fn update_pull_offset(
        &self,
        group: &str,
        topic: &str,
        queue_id: u32,
        offset: u64,
    ) -> ApiResult<LogPos> {
        let shard = self.shard(group);
        let mut state = lock(&shard);
        let op = Op::PullOffset {
            group: group.to_owned(),
            topic: topic.to_owned(),
            queue_id,
            offset,
        };
        self.journal(&mut state, op)
    }

    /// Moves `group`'s position in a queue to `offset` (see [`Op::Reset`]); returns the acked
    /// offset before the move and the journal end to make durable.
    pub fn reset(
        &self,
        group: &str,
        topic: &str,
        queue_id: u32,
        offset: u64,
    ) -> ApiResult<(Option<u64>, LogPos)> {
        let shard = self.shard(group);
        let mut state = lock(&shard);
        let previous = state.queue(group, topic, queue_id).map(|q| q.floor);
        let op = Op::Reset {
            group: group.to_owned(),
            topic: topic.to_owned(),
            queue_id,
            offset,
        };
        Ok((previous, self.journal(&mut state, op)?))
    }

    /// Finishes messages of queue 0 of `topic` for a group by name, outside any lease: the
    /// broker's own readers of internal topics (handled dead letters) use it. A queue the
    /// group has not read yet starts at `start`, journaled first, so a replay rebuilds it.
    pub fn finish(
        &self,
        group: &str,
        topic: &str,
        start: u64,
        messages: Vec<(u32, u64)>,
    ) -> ApiResult<LogPos> {
        let shard = self.shard(group);
        let mut state = lock(&shard);
        if state.queue(group, topic, 0).is_none() {
            let op = Op::Reset {
                group: group.to_owned(),
                topic: topic.to_owned(),
                queue_id: 0,
                offset: start,
            };
            self.journal(&mut state, op)?;
        }
        let op = Op::Done {
            group: group.to_owned(),
            topic: topic.to_owned(),
            messages,
        };
        self.journal(&mut state, op)
    }

    /// The offsets in `from..to` of a queue that `group` has not finished.
    pub fn unfinished(
        &self,
        group: &str,
        topic: &str,
        queue_id: u32,
        from: u64,
        to: u64,
    ) -> Vec<u64> {
        let Some(shard) = self.existing(group) else {
            return (from..to).collect();
        };
        let state = lock(&shard);
        match state.queue(group, topic, queue_id) {
            None => (from..to).collect(),
            Some(q) => (from.max(q.floor)..to).filter(|o| !q.is_done(*o)).collect(),
        }
    }

    /// What each group that reads the queue has done with the message at `offset`: (group,
    /// the lease if it is out, whether it is finished).
    pub fn deliveries(
        &self,
        topic: &str,
        queue_id: u32,
        offset: u64,
    ) -> Vec<(String, Option<state::Lease>, bool)> {
        let mut found: Vec<(String, Option<state::Lease>, bool)> = Vec::new();
        for shard in self.all() {
            let state = lock(&shard);
            found.extend(
                state
                    .groups
                    .iter()
                    .filter(|(group, _)| !crate::metadata::is_system_topic(group))
                    .filter_map(|(group, topics)| {
                        let queue = topics.get(topic)?.get(&queue_id)?;
                        Some((
                            group.clone(),
                            queue.leases.get(offset).cloned(),
                            queue.is_done(offset),
                        ))
                    }),
            );
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found
    }

    /// Per queue of each topic the group has read: (topic, queue, acked below, delivered
    /// below, in flight).
    pub fn progress(&self, group: &str) -> Vec<(String, u32, u64, u64, u64)> {
        let Some(shard) = self.existing(group) else {
            return Vec::new();
        };
        let state = lock(&shard);
        let Some(topics) = state.groups.get(group) else {
            return Vec::new();
        };
        topics
            .iter()
            .flat_map(|(topic, queues)| {
                queues.iter().map(move |(queue_id, q)| {
                    let delivered = q
                        .leases
                        .last_offset()
                        .map_or(q.floor, |o| o + 1)
                        .max(q.next_unscanned());
                    (
                        topic.clone(),
                        *queue_id,
                        q.floor,
                        delivered,
                        q.leases.len() as u64,
                    )
                })
            })
            .collect()
    }

    pub fn inflight(&self) -> u64 {
        self.all()
            .iter()
            .map(|shard| {
                lock(shard)
                    .groups
                    .values()
                    .flat_map(|t| t.values())
                    .flat_map(|q| q.values())
                    .map(|q| q.leases.len() as u64)
                    .sum::<u64>()
            })
            .sum()
    }

    /// Writes the snapshot, so recovery replays only the journal written after it. Each
    /// group is copied under its own lock, one after the other.
    pub fn snapshot(&self) -> Result<(), BrokerError> {
        let _one_at_a_time = self
            .snapshot_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Read before any group is looked at: every op below it is applied in its group by
        // the time that group is copied (an op is appended and applied under its group's
        // lock, and a group is added before its first op).
        let journal_floor = self.next_op.load(Ordering::Acquire);
        let groups: Vec<(String, Shard)> = self
            .shards
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(name, shard)| (name.clone(), shard.clone()))
            .collect();
        let mut shards = BTreeMap::new();
        for (name, shard) in groups {
            let copy = lock(&shard).clone();
            shards.insert(name, copy);
        }
        let snapshot = Snapshot {
            shards,
            journal_floor,
        };
        let bytes = serde_json::to_vec(&snapshot).map_err(|e| BrokerError::Corrupt {
            path: self.snapshot_path.clone(),
            reason: e.to_string(),
        })?;
        let end = self.last_op_end.load(Ordering::Acquire);
        self.store.durable(LogPos(end)).wait()?;
        files::replace_file(&self.store, &self.snapshot_path, &bytes)
    }

    /// New messages in store order, from where the last scan stopped.
    fn scan(
        &self,
        qs: &mut QueueState,
        queue: &ConsumeQueue,
        filter: &Filter,
        room: usize,
        pick: &mut dyn FnMut(u64, StoredRecord),
    ) -> ApiResult<Scan> {
        let end = queue.max_offset().0;
        let mut offset = qs.next_unscanned();
        let scan_limit = offset.saturating_add(MAX_SCAN_PER_RECEIVE);
        let (mut taken, mut more) = (0, false);
        while offset < end && taken < room {
            if offset >= scan_limit {
                more = true;
                break;
            }
            if qs.is_done(offset) || qs.leases.contains(offset) {
                offset += 1;
                continue;
            }
            match self.read_matching(queue, offset, filter)? {
                None => break,
                Some(Some(record)) => {
                    pick(offset, record);
                    taken += 1;
                }
                // Filtered out for this group; not journaled: a restart filters it again.
                Some(None) => qs.mark_done(offset),
            }
            offset += 1;
        }
        Ok(Scan { next: offset, more })
    }

    /// A FIFO group's scan: at most one message of each message group is out at a time.
    /// A message whose group has one out waits in `qs.waiting` and goes first, in store
    /// order, once the group is free; other groups in the queue go on meanwhile.
    fn scan_ordered(
        &self,
        qs: &mut QueueState,
        queue: &ConsumeQueue,
        filter: &Filter,
        room: usize,
        pick: &mut dyn FnMut(u64, StoredRecord),
    ) -> ApiResult<Scan> {
        // A group is busy while one of its messages is leased, even if that lease ended:
        // that message is delivered again before any later one.
        let mut busy: HashSet<String> = qs
            .leases
            .offsets()
            .filter_map(|offset| self.record_in(queue, offset))
            .map(|record| message_group(&record).to_owned())
            .collect();
        let mut taken = 0;
        let free: Vec<String> = qs
            .waiting
            .keys()
            .filter(|g| !busy.contains(*g))
            .cloned()
            .collect();
        for group in free {
            if taken >= room {
                break;
            }
            while let Some(offset) = qs.waiting.get_mut(&group).and_then(VecDeque::pop_front) {
                if qs.is_done(offset) || qs.leases.contains(offset) {
                    continue;
                }
                if let Some(record) = self.record_in(queue, offset) {
                    pick(offset, record);
                    taken += 1;
                    busy.insert(group.clone());
                    break;
                }
            }
            if qs.waiting.get(&group).is_some_and(VecDeque::is_empty) {
                qs.waiting.remove(&group);
            }
        }
        let end = queue.max_offset().0;
        let mut offset = qs.next_unscanned();
        let scan_limit = offset.saturating_add(MAX_SCAN_PER_RECEIVE);
        let mut more = false;
        while offset < end && taken < room {
            if offset >= scan_limit {
                more = true;
                break;
            }
            if qs.is_done(offset) || qs.leases.contains(offset) {
                offset += 1;
                continue;
            }
            match self.read_matching(queue, offset, filter)? {
                None => break,
                Some(None) => qs.mark_done(offset),
                Some(Some(record)) => {
                    let group = message_group(&record);
                    if group.is_empty() {
                        // No message group: no order to keep.
                        pick(offset, record);
                        taken += 1;
                    } else if busy.contains(group) || qs.waiting.contains_key(group) {
                        let waiting = qs.waiting.entry(group.to_owned()).or_default();
                        if waiting.back().is_none_or(|&last| last < offset) {
                            waiting.push_back(offset);
                        }
                    } else {
                        busy.insert(group.to_owned());
                        pick(offset, record);
                        taken += 1;
                    }
                }
            }
            offset += 1;
        }
        Ok(Scan { next: offset, more })
    }

    /// The record at `offset` if it passes `filter` (`Some(None)` if not), or `None` past
    /// the queue's end.
    fn read_matching(
        &self,
        queue: &ConsumeQueue,
        offset: u64,
        filter: &Filter,
    ) -> ApiResult<Option<Option<StoredRecord>>> {
        let Some(entry) = queue.get(QueueOffset(offset)) else {
            return Ok(None);
        };
        if !filter.may_match(entry.tag_hash) {
            return Ok(Some(None));
        }
        let record = self.store.read(entry.log_pos)?;
        // Decoding the properties again is only worth it for a filter that reads them.
        let matches = matches!(filter, Filter::All) || filter.matches(&record.view().properties);
        Ok(Some(matches.then_some(record)))
    }

    fn record_in(&self, queue: &ConsumeQueue, offset: u64) -> Option<StoredRecord> {
        let entry = queue.get(QueueOffset(offset))?;
        self.store.read(entry.log_pos).ok()
    }

    /// The record at `offset` of a queue; `None` only when retention deleted it. A record
    /// that is there but cannot be read (a failed CRC check) is an error.
    fn record_at(
        &self,
        topic: &str,
        queue_id: u32,
        offset: u64,
    ) -> ApiResult<Option<StoredRecord>> {
        let Some(queue) = self.store.consume_queue(topic, queue_id) else {
            return Ok(None);
        };
        if offset < queue.min_offset().0 {
            return Ok(None);
        }
        let entry = queue.get(QueueOffset(offset)).ok_or_else(|| {
            ApiError::internal(format!(
                "{topic} queue {queue_id} has no entry at leased offset {offset}"
            ))
        })?;
        Ok(Some(self.store.read(entry.log_pos)?))
    }

    /// Copies the message to `%DLQ%{group}` with its id and origin, then finishes it.
    fn dead_letter(
        &self,
        state: &mut ConsumerState,
        group: &GroupConfig,
        topic: &TopicConfig,
        queue_id: u32,
        offset: u64,
        record: &StoredRecord,
    ) -> ApiResult<LogPos> {
        let dlq = self.metadata.dead_letter_topic(group)?;
        let view = record.view();
        let mut properties = view.properties.to_owned();
        let id = view.properties.get(keys::MESSAGE_ID).unwrap_or_default();
        properties
            .push(property::DLQ_ORIGIN_TOPIC, &topic.name)
            .and_then(|()| properties.push(property::DLQ_ORIGIN_MESSAGE_ID, id))
            .map_err(|e| ApiError::internal(e.to_string()))?;
        // The copy and the record that finishes the message go in one batch, copy first: a
        // crash cannot leave a copy whose message is still leased, to be dead-lettered again.
        let copy =
            crate::message::moved_record(&view, &dlq.name, 0, MessageType::Normal, &properties);
        let end = self.journal_after(state, Some(copy), done_op(group, topic, queue_id, offset))?;
        self.metrics.add_dead_lettered(1);
        tracing::info!(group = %group.name, topic = %topic.name, queue_id, offset, message_id = id, "dead-lettered");
        Ok(end)
    }

    /// Appends `op` to the journal, then applies it. The caller makes the returned end
    /// durable before it answers.
    fn journal(&self, state: &mut ConsumerState, op: Op) -> ApiResult<LogPos> {
        self.journal_after(state, None, op)
    }

    /// [`journal`](Self::journal), with `first` appended in the same batch before `op`.
    fn journal_after(
        &self,
        state: &mut ConsumerState,
        first: Option<NewRecord<'_>>,
        op: Op,
    ) -> ApiResult<LogPos> {
        let body = serde_json::to_vec(&op).map_err(|e| ApiError::internal(e.to_string()))?;
        let mut records: Vec<NewRecord<'_>> = first.into_iter().collect();
        records.push(crate::message::system_record(OPS_TOPIC, &body));
        let mut out = Vec::with_capacity(records.len());
        self.log.propose_batch(&records, &mut out)?;
        let appended = out
            .last()
            .ok_or_else(|| ApiError::internal("the journal append stored nothing"))?;
        state.apply(&op);
        state.last_op = Some(appended.queue_offset.0);
        self.last_op_end
            .fetch_max(appended.end().0, Ordering::AcqRel);
        self.next_op
            .fetch_max(appended.queue_offset.0 + 1, Ordering::AcqRel);
        Ok(appended.end())
    }
}

/// `entries[i].receipt_handle`, written only when an error names it.
struct EntryField(usize);

impl std::fmt::Display for EntryField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "entries[{}].receipt_handle", self.0)
    }
}

enum LeaseCheck {
    Current,
    AlreadyDone,
}

/// Whether `handle` names a message on its current lease in `queue`, the group's state of
/// the handle's queue (`None` when the group holds none).
fn check_lease(
    queue: Option<&QueueState>,
    group: &GroupConfig,
    handle: &ReceiptHandle,
    field: &dyn std::fmt::Display,
) -> ApiResult<LeaseCheck> {
    if queue.is_some_and(|q| q.is_done(handle.offset)) {
        return Ok(LeaseCheck::AlreadyDone);
    }
    match queue.and_then(|q| q.leases.get(handle.offset)) {
        Some(lease) if lease.issued(handle.epoch) => Ok(LeaseCheck::Current),
        Some(_) => Err(ApiError::new(
            Code::InvalidReceiptHandle,
            format!("{field} is stale: the message was delivered again or its lease changed"),
        )),
        None => Err(ApiError::new(
            Code::InvalidReceiptHandle,
            format!(
                "{field} names queue {} offset {}, which group {:?} does not hold",
                handle.queue_id, handle.offset, group.name
            ),
        )),
    }
}

/// The handle in `text`, if it names a message the group holds on its current lease.
fn current_lease(
    state: &ConsumerState,
    group: &GroupConfig,
    topic: &TopicConfig,
    text: &str,
) -> ApiResult<ReceiptHandle> {
    let handle = ReceiptHandle::decode(text.as_bytes(), &topic.name, &"receipt_handle")?;
    let queue = state.queue(&group.name, &topic.name, handle.queue_id);
    match check_lease(queue, group, &handle, &"receipt_handle")? {
        LeaseCheck::Current => Ok(handle),
        LeaseCheck::AlreadyDone => Err(ApiError::new(
            Code::InvalidReceiptHandle,
            "receipt_handle: the message is already acked",
        )),
    }
}

fn lock(shard: &Shard) -> MutexGuard<'_, ConsumerState> {
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

/// After a FIFO receive failed part-way: the queues it scanned rebuild what waits behind
/// each message group by a rescan, so no group goes out of order.
fn rescan_waiting(
    state: &mut ConsumerState,
    group: &GroupConfig,
    topic: &TopicConfig,
    queue_ids: &[u32],
) {
    for &queue_id in queue_ids {
        if let Some(q) = state.queue_if_held(&group.name, &topic.name, queue_id) {
            q.rescan_waiting();
        }
    }
}

fn done_op(group: &GroupConfig, topic: &TopicConfig, queue_id: u32, offset: u64) -> Op {
    Op::Done {
        group: group.name.clone(),
        topic: topic.name.clone(),
        messages: vec![(queue_id, offset)],
    }
}

fn start_offset(group: &GroupConfig, queue: &ferrumq_storage::ConsumeQueue) -> u64 {
    match group.start_position {
        StartPosition::Earliest => queue.min_offset().0,
        StartPosition::Latest => queue.offset_at_time(group.created_ms).0,
    }
}

/// Queue ids starting at a point that moves with every delivery, so no queue is favoured.
fn rotation(queue_count: u32, seed: u64) -> Vec<u32> {
    let count = queue_count.max(1);
    let start = u32::try_from(seed % u64::from(count)).unwrap_or(0);
    (0..count).map(|i| (start + i) % count).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deliver(group: &str, offset: u64, epoch: u64) -> Op {
        Op::Deliver {
            group: group.into(),
            topic: "t".into(),
            messages: vec![(0, offset, 1)],
            epoch,
            visible_at_ms: 1_000,
            renew_until_ms: 0,
            owner: String::new(),
        }
    }

    /// A snapshot written when one state held every group reads as one state per group,
    /// each holding only its own queues and pull offsets, all as of the same op.
    #[test]
    fn a_snapshot_from_before_groups_had_their_own_state_is_split_by_group() {
        let mut whole = ConsumerState::default();
        whole.apply(&deliver("a", 3, 1));
        whole.apply(&deliver("b", 5, 2));
        whole.apply(&Op::PullOffset {
            group: "c".into(),
            topic: "t".into(),
            queue_id: 1,
            offset: 9,
        });
        whole.last_op = Some(41);
        let bytes = serde_json::to_vec(&whole).unwrap();

        let snapshot = Snapshot::read(&bytes).unwrap();
        assert_eq!(snapshot.journal_floor, 42);
        assert_eq!(snapshot.shards.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
        let a = &snapshot.shards["a"];
        assert!(
            a.queue("a", "t", 0)
                .is_some_and(|q| q.leases.get(3).is_some())
        );
        assert!(!a.groups.contains_key("b"));
        assert_eq!(a.last_op, Some(41));
        assert_eq!(a.epoch, 2);
        let c = &snapshot.shards["c"];
        assert_eq!(c.pull_offsets[&("c".to_owned(), "t".to_owned(), 1)], 9);
        assert!(snapshot.shards["b"].pull_offsets.is_empty());
    }

    #[test]
    fn a_snapshot_reads_back_as_written() {
        let mut a = ConsumerState::default();
        a.apply(&deliver("a", 3, 1));
        a.last_op = Some(7);
        let snapshot = Snapshot {
            shards: [("a".to_owned(), a)].into_iter().collect(),
            journal_floor: 8,
        };
        let back = Snapshot::read(&serde_json::to_vec(&snapshot).unwrap()).unwrap();
        assert_eq!(back.journal_floor, 8);
        assert_eq!(back.shards["a"].last_op, Some(7));
        assert!(back.shards["a"].queue("a", "t", 0).is_some());
        assert!(Snapshot::read(b"{\"shards\": 3}").is_err());
    }
}
