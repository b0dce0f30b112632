//! Transactional messages: half messages, their decisions, and check-backs.
//!
//! A TRANSACTION message is stored as a half message in [`HALF_TOPIC`], where no consumer
//! sees it. Its transaction id names its offset there, so `EndTransaction` finds it without
//! any cache, also after a restart. Each transaction moves once from pending to committed,
//! rolled back or discarded; that decision is journaled in [`DECISION_TOPIC`] and the first
//! one wins. A commit appends the visible copy and its decision in one batch, copy first, so
//! a decision on disk always has its copy; a copy without its decision (a crash between the
//! two) is found through the message index on restart.
//!
//! A half message left pending past its check immunity is checked: the broker asks a live
//! producer of the topic over its Telemetry stream (one that sent transactions to it, or
//! else one that declares it), the next time another one, every `check_interval_ms`, up to
//! `max_checks` times. Then it is copied to [`DISCARDED_TOPIC`] for a person to look at. A
//! check with no producer to ask is not counted.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ferrumq_protocol::v2::{Code, TransactionResolution};
use ferrumq_storage::{
    LogPos, MessageStore, MessageType, NewRecord, Properties, QueueOffset, StoredRecord, keys,
};
use serde::{Deserialize, Serialize};

use crate::config::TransactionSettings;
use crate::error::{ApiError, ApiResult, BrokerError};
use crate::log_writer::LogWriter;
use crate::message::{moved_record, property};
use crate::metrics::Metrics;

/// Half messages, queue 0; a transaction id is an offset in this queue.
pub const HALF_TOPIC: &str = "%SYS%TRANS_HALF";
/// Decisions and check counts, journaled.
pub const DECISION_TOPIC: &str = "%SYS%TRANS_OP";
/// Half messages given up on after the maximum number of checks.
pub const DISCARDED_TOPIC: &str = "%SYS%TRANS_DISCARDED";

/// Properties that only the half message carries.
const HALF_ONLY: [&str; 4] = [
    property::REAL_TOPIC,
    property::REAL_QUEUE_ID,
    property::TRANSACTION_PRODUCER,
    property::CHECK_IMMUNITY_MS,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Pending,
    Committed,
    RolledBack,
    Discarded,
}

impl Decision {
    fn describe(self) -> &'static str {
        match self {
            Decision::Pending => "pending",
            Decision::Committed => "committed",
            Decision::RolledBack => "rolled back",
            Decision::Discarded => "discarded after its checks went unanswered",
        }
    }
}

/// One journaled change; `half` is the half message's offset in [`HALF_TOPIC`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Op {
    Commit { half: u64 },
    Rollback { half: u64 },
    Discard { half: u64 },
    Checked { half: u64, checks: u32 },
}

/// A half message waiting for its decision.
#[derive(Debug)]
struct Pending {
    /// Where the half message is: the consume queue may not have it yet.
    log_pos: LogPos,
    topic: String,
    producer: String,
    checks: u32,
    next_check_ms: i64,
    last_asked: Option<String>,
}

#[derive(Default)]
struct State {
    /// Half offset of `decisions[0]`.
    base: u64,
    decisions: VecDeque<Decision>,
    pending: HashMap<u64, Pending>,
    /// `(next_check_ms, half)` of every pending transaction.
    schedule: BTreeSet<(i64, u64)>,
    /// Client ids that sent transactional messages to each topic, oldest first.
    producers: HashMap<String, Vec<String>>,
}

impl State {
    fn decision(&self, half: u64) -> Option<Decision> {
        let index = usize::try_from(half.checked_sub(self.base)?).ok()?;
        self.decisions.get(index).copied()
    }

    fn set(&mut self, half: u64, decision: Decision) {
        let Some(index) = half
            .checked_sub(self.base)
            .and_then(|i| usize::try_from(i).ok())
        else {
            return;
        };
        if self.decisions.len() <= index {
            self.decisions.resize(index + 1, Decision::Pending);
        }
        self.decisions[index] = decision;
        if decision != Decision::Pending
            && let Some(p) = self.pending.remove(&half)
        {
            self.schedule.remove(&(p.next_check_ms, half));
        }
    }

    fn add_pending(&mut self, half: u64, pending: Pending) {
        self.set(half, Decision::Pending);
        let producers = self.producers.entry(pending.topic.clone()).or_default();
        if !producers.contains(&pending.producer) {
            producers.push(pending.producer.clone());
            if producers.len() > 64 {
                producers.remove(0);
            }
        }
        self.schedule.insert((pending.next_check_ms, half));
        self.pending.insert(half, pending);
    }

    fn reschedule(&mut self, half: u64, next_check_ms: i64) {
        if let Some(p) = self.pending.get_mut(&half) {
            self.schedule.remove(&(p.next_check_ms, half));
            p.next_check_ms = next_check_ms;
            self.schedule.insert((next_check_ms, half));
        }
    }
}

/// A check-back to send: ask `client` about the transaction of `half`.
pub struct CheckBack {
    pub half: StoredRecord,
    pub transaction_id: String,
    pub client: String,
}

/// A half message that was discarded, as the admin service lists it.
pub struct Discarded {
    pub record: StoredRecord,
    pub transaction_id: String,
    pub checks: u32,
}

pub struct Transactions {
    store: Arc<MessageStore>,
    log: LogWriter,
    settings: TransactionSettings,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
}

/// The transaction id the producer gets for a half message.
pub fn transaction_id(half: u64) -> String {
    format!("T{half:016X}")
}

fn parse_transaction_id(id: &str) -> Option<u64> {
    let hex = id.strip_prefix('T').filter(|h| h.len() == 16)?;
    u64::from_str_radix(hex, 16).ok()
}

impl Transactions {
    /// Rebuilds the pending transactions from the half messages and the decision journal.
    pub fn open(
        log: LogWriter,
        settings: TransactionSettings,
        metrics: Arc<Metrics>,
        now_ms: i64,
    ) -> Result<Transactions, BrokerError> {
        let transactions = Transactions {
            store: log.store().clone(),
            log,
            settings,
            metrics,
            state: Mutex::new(State::default()),
        };
        let Some(halves) = transactions.store.consume_queue(HALF_TOPIC, 0) else {
            return Ok(transactions);
        };
        let mut state = transactions.lock();
        state.base = halves.min_offset().0;
        let end = halves.max_offset().0;
        let mut checks: HashMap<u64, u32> = HashMap::new();
        if let Some(ops) = transactions.store.consume_queue(DECISION_TOPIC, 0) {
            for offset in ops.min_offset().0..ops.max_offset().0 {
                let Some(entry) = ops.get(QueueOffset(offset)) else {
                    break;
                };
                let record = transactions.store.read(entry.log_pos)?;
                let op: Op = serde_json::from_slice(record.view().body).map_err(|e| {
                    BrokerError::Corrupt {
                        path: transactions.store.dir().join("commitlog"),
                        reason: format!("transaction journal entry {offset}: {e}"),
                    }
                })?;
                match op {
                    Op::Commit { half } => state.set(half, Decision::Committed),
                    Op::Rollback { half } => state.set(half, Decision::RolledBack),
                    Op::Discard { half } => state.set(half, Decision::Discarded),
                    Op::Checked { half, checks: n } => {
                        checks.insert(half, n);
                    }
                }
            }
        }
        let mut recovered = 0u64;
        let mut torn = Vec::new();
        for half in state.base..end {
            if state.decision(half).is_some_and(|d| d != Decision::Pending) {
                continue;
            }
            let Some(entry) = halves.get(QueueOffset(half)) else {
                break;
            };
            let record = transactions.store.read(entry.log_pos)?;
            let view = record.view();
            let topic = view
                .properties
                .get(property::REAL_TOPIC)
                .unwrap_or_default();
            let id = view.properties.get(keys::MESSAGE_ID).unwrap_or_default();
            // A commit whose decision did not reach the log before a crash.
            let committed = transactions
                .store
                .query_by_id(id, view.store_timestamp_ms, i64::MAX)
                .iter()
                .any(|r| {
                    let v = r.view();
                    v.topic == topic && v.message_type == MessageType::TransactionCommit
                });
            if committed {
                state.set(half, Decision::Committed);
                torn.push(half);
                continue;
            }
            let checks = checks.get(&half).copied().unwrap_or(0);
            let first = view.store_timestamp_ms.saturating_add(immunity_ms(
                &transactions.settings,
                view.properties.get(property::CHECK_IMMUNITY_MS),
            ));
            // A transaction already checked gives its producer a whole interval to answer
            // the last check, as it would have had without the restart.
            let next_check_ms = if checks == 0 {
                first
            } else {
                first.max(now_ms.saturating_add(
                    i64::try_from(transactions.settings.check_interval_ms).unwrap_or(i64::MAX),
                ))
            };
            state.add_pending(
                half,
                Pending {
                    log_pos: entry.log_pos,
                    topic: topic.to_owned(),
                    producer: view
                        .properties
                        .get(property::TRANSACTION_PRODUCER)
                        .unwrap_or_default()
                        .to_owned(),
                    checks,
                    next_check_ms,
                    last_asked: None,
                },
            );
            recovered += 1;
        }
        for half in torn {
            transactions
                .journal(&Op::Commit { half })
                .map_err(|e| BrokerError::Corrupt {
                    path: transactions.store.dir().join("commitlog"),
                    reason: e.message,
                })?;
        }
        drop(state);
        tracing::info!(pending = recovered, "transactions recovered");
        Ok(transactions)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Properties for a half message of `topic` sent by `producer`; the send path appends
    /// the record to [`HALF_TOPIC`] and then calls [`Transactions::prepared`].
    pub fn half_properties(
        message: &Properties,
        topic: &str,
        queue_id: u32,
        producer: &str,
        recovery_ms: Option<u64>,
    ) -> ApiResult<Properties> {
        let mut properties = message.clone();
        properties
            .push(property::REAL_TOPIC, topic)
            .and_then(|()| properties.push(property::REAL_QUEUE_ID, &queue_id.to_string()))
            .and_then(|()| properties.push(property::TRANSACTION_PRODUCER, producer))
            .and_then(|()| match recovery_ms {
                Some(ms) => properties.push(property::CHECK_IMMUNITY_MS, &ms.to_string()),
                None => Ok(()),
            })
            .map_err(|e| ApiError::new(Code::MessagePropertiesTooLarge, e.to_string()))?;
        Ok(properties)
    }

    /// Registers a half message just appended at `half`; returns its transaction id.
    pub fn prepared(
        &self,
        half: u64,
        log_pos: LogPos,
        topic: &str,
        producer: &str,
        store_timestamp_ms: i64,
        recovery_ms: Option<u64>,
    ) -> String {
        let immunity = recovery_ms.unwrap_or(self.settings.check_immunity_ms);
        let mut state = self.lock();
        state.add_pending(
            half,
            Pending {
                log_pos,
                topic: topic.to_owned(),
                producer: producer.to_owned(),
                checks: 0,
                next_check_ms: store_timestamp_ms
                    .saturating_add(i64::try_from(immunity).unwrap_or(i64::MAX)),
                last_asked: None,
            },
        );
        transaction_id(half)
    }

    /// Applies a producer's decision. Returns the log position that must be durable
    /// before the producer hears OK.
    pub fn end(
        &self,
        topic: &str,
        message_id: &str,
        transaction_id: &str,
        resolution: TransactionResolution,
    ) -> ApiResult<LogPos> {
        let invalid = |reason: String| ApiError::new(Code::InvalidTransactionId, reason);
        if transaction_id.trim().is_empty() {
            return Err(invalid("transaction_id is empty".into()));
        }
        let half = parse_transaction_id(transaction_id).ok_or_else(|| {
            invalid(format!(
                "transaction_id {transaction_id:?} is not one this broker gave out"
            ))
        })?;
        let mut state = self.lock();
        let unknown = || {
            invalid(format!(
                "transaction_id {transaction_id:?} names no half message on this broker"
            ))
        };
        let decision = state.decision(half).ok_or_else(unknown)?;
        let record = match state.pending.get(&half) {
            Some(pending) => self.store.read(pending.log_pos).ok(),
            None => self.half_record(half),
        }
        .ok_or_else(unknown)?;
        let view = record.view();
        let real_topic = view
            .properties
            .get(property::REAL_TOPIC)
            .unwrap_or_default();
        let half_id = view.properties.get(keys::MESSAGE_ID).unwrap_or_default();
        // Transaction ids follow each other, so the message id and topic must come with one
        // and match: a client cannot decide a transaction by guessing its id. Every official
        // client sends both.
        if message_id != half_id {
            return Err(invalid(format!(
                "message_id {message_id:?} is not the message of transaction_id {transaction_id:?}"
            )));
        }
        if topic != real_topic {
            return Err(invalid(format!(
                "topic {topic:?} is not the topic of transaction_id {transaction_id:?} ({real_topic:?})"
            )));
        }
        let wanted = match resolution {
            TransactionResolution::Commit => Decision::Committed,
            TransactionResolution::Rollback => Decision::RolledBack,
            // "Unknown": keep the half message and keep checking.
            TransactionResolution::Unspecified => return Ok(LogPos(0)),
        };
        if decision == wanted {
            // Decided before, perhaps by a request still waiting for its flush.
            return Ok(self.store.log().written_pos());
        }
        if decision != Decision::Pending {
            return Err(ApiError::new(
                Code::PreconditionFailed,
                format!(
                    "transaction {transaction_id} was already {}; the first decision stands",
                    decision.describe()
                ),
            ));
        }
        let end = if wanted == Decision::Committed {
            let op = encode(&Op::Commit { half })?;
            let properties = crate::message::properties_without(view.properties, &HALF_ONLY)?;
            let queue_id = view
                .properties
                .get(property::REAL_QUEUE_ID)
                .and_then(|q| q.parse().ok())
                .unwrap_or(0);
            let records = [
                moved_record(
                    &view,
                    real_topic,
                    queue_id,
                    MessageType::TransactionCommit,
                    &properties,
                ),
                decision_record(&op),
            ];
            let mut appended = Vec::with_capacity(2);
            self.log.propose_batch(&records, &mut appended)?;
            self.metrics.add(&self.metrics.transactions_committed, 1);
            appended.last().map_or(LogPos(0), |a| a.end())
        } else {
            self.metrics.add(&self.metrics.transactions_rolled_back, 1);
            self.journal(&Op::Rollback { half })?
        };
        state.set(half, wanted);
        tracing::debug!(
            transaction_id,
            decision = wanted.describe(),
            "transaction ended"
        );
        Ok(end)
    }

    /// The check-backs due at `now_ms`, each to a live producer of the topic, another one
    /// than last time when there is one. The producers are those that sent transactional
    /// messages to the topic and are live (`is_live`); when none is, those connected now
    /// that declare the topic (`declaring`): a producer process that restarted has a new
    /// client id. A check counts only when a producer is asked; transactions checked
    /// `max_checks` times, or stored `max_pending_ms` ago, are discarded instead.
    pub fn due_checks(
        &self,
        now_ms: i64,
        is_live: &dyn Fn(&str) -> bool,
        declaring: &dyn Fn(&str) -> Vec<String>,
    ) -> ApiResult<Vec<CheckBack>> {
        let mut state = self.lock();
        let due: Vec<u64> = state
            .schedule
            .iter()
            .take_while(|(at, _)| *at <= now_ms)
            .map(|(_, half)| *half)
            .take(1024)
            .collect();
        let interval = i64::try_from(self.settings.check_interval_ms).unwrap_or(i64::MAX);
        let mut checks = Vec::new();
        for half in due {
            let Some(pending) = state.pending.get(&half) else {
                continue;
            };
            let record = self.store.read(pending.log_pos).ok();
            let stored_ms = record.as_ref().map(|r| r.view().store_timestamp_ms);
            let producers = state
                .producers
                .get(&pending.topic)
                .map_or(&[][..], Vec::as_slice);
            let step = next_check(
                pending,
                stored_ms,
                producers,
                now_ms,
                &self.settings,
                is_live,
                declaring,
            );
            let checks_so_far = pending.checks;
            match (step, record) {
                (CheckStep::Ask(client), Some(record)) => {
                    let count = checks_so_far + 1;
                    self.journal(&Op::Checked {
                        half,
                        checks: count,
                    })?;
                    if let Some(p) = state.pending.get_mut(&half) {
                        p.checks = count;
                        p.last_asked = Some(client.clone());
                    }
                    state.reschedule(half, now_ms.saturating_add(interval));
                    checks.push(CheckBack {
                        half: record,
                        transaction_id: transaction_id(half),
                        client,
                    });
                }
                (CheckStep::Discard, Some(record)) => {
                    self.discard(&record, checks_so_far)?;
                    self.journal(&Op::Discard { half })?;
                    state.set(half, Decision::Discarded);
                }
                (CheckStep::Wait, _) => {
                    // Not counted as a check, so a transaction whose producers are all
                    // away is not discarded for it. Asked again after the interval.
                    tracing::info!(half, "no live producer to check a transaction with");
                    state.reschedule(half, now_ms.saturating_add(interval));
                }
                (CheckStep::Gone, _) | (_, None) => {
                    tracing::warn!(half, "half message deleted by retention before a decision");
                    self.journal(&Op::Discard { half })?;
                    state.set(half, Decision::Discarded);
                }
            }
        }
        Ok(checks)
    }

    /// Up to `max` discarded transactions, of `topic` only unless it is empty.
    pub fn discarded(&self, topic: &str, max: usize) -> Vec<Discarded> {
        let Some(queue) = self.store.consume_queue(DISCARDED_TOPIC, 0) else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for offset in queue.min_offset().0..queue.max_offset().0 {
            if found.len() >= max {
                break;
            }
            let Some(record) = queue
                .get(QueueOffset(offset))
                .and_then(|e| self.store.read(e.log_pos).ok())
            else {
                continue;
            };
            let view = record.view();
            if !topic.is_empty() && view.properties.get(property::REAL_TOPIC) != Some(topic) {
                continue;
            }
            let number = |key| view.properties.get(key).and_then(|v| v.parse::<u64>().ok());
            let checks = number(property::TRANSACTION_CHECKS)
                .and_then(|c| u32::try_from(c).ok())
                .unwrap_or(0);
            let transaction_id = number(HALF_OFFSET).map(transaction_id).unwrap_or_default();
            found.push(Discarded {
                record,
                transaction_id,
                checks,
            });
        }
        found
    }

    /// How many transactions wait for a decision.
    pub fn pending(&self) -> usize {
        self.lock().pending.len()
    }

    /// A decided transaction's half message, from its consume queue.
    fn half_record(&self, half: u64) -> Option<StoredRecord> {
        let find = || {
            let entry = self
                .store
                .consume_queue(HALF_TOPIC, 0)?
                .get(QueueOffset(half))?;
            self.store.read(entry.log_pos).ok()
        };
        find().or_else(|| {
            // Decided moments after it was stored: dispatch may not have reached it yet.
            let written = self.store.log().written_pos();
            self.store
                .wait_dispatched(written, std::time::Duration::from_secs(1));
            find()
        })
    }

    fn discard(&self, record: &StoredRecord, checks: u32) -> ApiResult<()> {
        let view = record.view();
        let mut properties = view.properties.to_owned();
        properties
            .push(property::TRANSACTION_CHECKS, &checks.to_string())
            .and_then(|()| properties.push(HALF_OFFSET, &view.queue_offset.0.to_string()))
            .map_err(|e| ApiError::internal(e.to_string()))?;
        self.log.propose(&moved_record(
            &view,
            DISCARDED_TOPIC,
            0,
            MessageType::TransactionHalf,
            &properties,
        ))?;
        self.metrics.add(&self.metrics.transactions_discarded, 1);
        tracing::warn!(
            message_id = view.properties.get(keys::MESSAGE_ID).unwrap_or_default(),
            topic = view
                .properties
                .get(property::REAL_TOPIC)
                .unwrap_or_default(),
            checks,
            "transaction discarded: no decision after the maximum number of checks"
        );
        Ok(())
    }

    fn journal(&self, op: &Op) -> ApiResult<LogPos> {
        let body = encode(op)?;
        Ok(self.log.propose(&decision_record(&body))?.end())
    }
}

/// Names the half message a discarded copy came from.
const HALF_OFFSET: &str = "__TXN_HALF_OFFSET";

fn immunity_ms(settings: &TransactionSettings, property: Option<&str>) -> i64 {
    let ms = property
        .and_then(|p| p.parse().ok())
        .unwrap_or(settings.check_immunity_ms);
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// What a due check does for one pending transaction.
#[derive(Debug, PartialEq, Eq)]
enum CheckStep {
    /// Its half message is gone (retention): nothing is left to decide.
    Gone,
    /// Checked `max_checks` times, or pending longer than `max_pending_ms`: given up.
    Discard,
    /// Nobody to ask now; asked again after the interval, not counted as a check.
    Wait,
    /// Ask this producer.
    Ask(String),
}

/// Decides a due check, a pure function of the transaction, when its half message was
/// stored (`None`: deleted), the producers seen sending to its topic (oldest first), the time
/// and who is connected. The producers are asked in turn, starting after the one asked last;
/// those connected first, and only when none is, those that declare the topic.
fn next_check(
    pending: &Pending,
    stored_ms: Option<i64>,
    producers: &[String],
    now_ms: i64,
    settings: &TransactionSettings,
    is_live: &dyn Fn(&str) -> bool,
    declaring: &dyn Fn(&str) -> Vec<String>,
) -> CheckStep {
    let Some(stored_ms) = stored_ms else {
        return CheckStep::Gone;
    };
    let max_pending = i64::try_from(settings.max_pending_ms).unwrap_or(i64::MAX);
    if pending.checks >= settings.max_checks || now_ms.saturating_sub(stored_ms) >= max_pending {
        return CheckStep::Discard;
    }
    let mut candidates: Vec<String> = producers.to_vec();
    if !candidates.contains(&pending.producer) {
        candidates.push(pending.producer.clone());
    }
    candidates.retain(|c| is_live(c));
    if candidates.is_empty() {
        candidates = declaring(&pending.topic);
    }
    let next = pending
        .last_asked
        .as_ref()
        .and_then(|last| candidates.iter().position(|c| c == last))
        .map_or(0, |i| (i + 1) % candidates.len().max(1));
    match candidates.get(next) {
        Some(client) => CheckStep::Ask(client.clone()),
        None => CheckStep::Wait,
    }
}

fn encode(op: &Op) -> ApiResult<Vec<u8>> {
    serde_json::to_vec(op).map_err(|e| ApiError::internal(e.to_string()))
}

fn decision_record(body: &[u8]) -> NewRecord<'_> {
    crate::message::system_record(DECISION_TOPIC, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    fn settings() -> TransactionSettings {
        TransactionSettings {
            max_checks: 3,
            max_pending_ms: 60_000,
            ..TransactionSettings::default()
        }
    }

    fn pending(producer: &str, checks: u32, last_asked: Option<&str>) -> Pending {
        Pending {
            log_pos: LogPos(0),
            topic: "orders".into(),
            producer: producer.into(),
            checks,
            next_check_ms: NOW,
            last_asked: last_asked.map(str::to_owned),
        }
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    fn step(
        pending: &Pending,
        stored_ms: Option<i64>,
        producers: &[&str],
        live: &[&str],
        declaring: &[&str],
    ) -> CheckStep {
        let live = names(live);
        let declaring = names(declaring);
        next_check(
            pending,
            stored_ms,
            &names(producers),
            NOW,
            &settings(),
            &|client| live.iter().any(|l| l == client),
            &|_| declaring.clone(),
        )
    }

    #[test]
    fn a_transaction_whose_half_is_gone_is_dropped() {
        assert_eq!(
            step(&pending("p", 0, None), None, &["p"], &["p"], &[]),
            CheckStep::Gone
        );
    }

    #[test]
    fn one_checked_enough_times_or_pending_too_long_is_given_up() {
        let stored = Some(NOW - 1_000);
        assert_eq!(
            step(&pending("p", 3, None), stored, &["p"], &["p"], &[]),
            CheckStep::Discard
        );
        let old = Some(NOW - 60_000);
        assert_eq!(
            step(&pending("p", 0, None), old, &["p"], &["p"], &[]),
            CheckStep::Discard
        );
        let young = Some(NOW - 59_999);
        assert_eq!(
            step(&pending("p", 2, None), young, &["p"], &["p"], &[]),
            CheckStep::Ask("p".into())
        );
    }

    #[test]
    fn connected_producers_are_asked_in_turn_after_the_last_one_asked() {
        let stored = Some(NOW);
        let all = ["a", "b", "c"];
        assert_eq!(
            step(&pending("a", 0, None), stored, &all, &all, &[]),
            CheckStep::Ask("a".into())
        );
        assert_eq!(
            step(&pending("a", 1, Some("a")), stored, &all, &all, &[]),
            CheckStep::Ask("b".into())
        );
        assert_eq!(
            step(&pending("a", 2, Some("c")), stored, &all, &all, &[]),
            CheckStep::Ask("a".into())
        );
        // "b" went away: after "a" comes "c".
        assert_eq!(
            step(&pending("a", 1, Some("a")), stored, &all, &["a", "c"], &[]),
            CheckStep::Ask("c".into())
        );
        // The producer that sent it is asked even if it was never seen on the topic list.
        assert_eq!(
            step(&pending("z", 0, None), stored, &[], &["z"], &[]),
            CheckStep::Ask("z".into())
        );
    }

    #[test]
    fn with_nobody_connected_those_declaring_the_topic_are_asked_and_else_it_waits() {
        let stored = Some(NOW);
        assert_eq!(
            step(&pending("a", 0, None), stored, &["a"], &[], &["d"]),
            CheckStep::Ask("d".into())
        );
        assert_eq!(
            step(&pending("a", 0, None), stored, &["a"], &[], &[]),
            CheckStep::Wait
        );
    }
}
