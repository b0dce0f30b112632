//! What operators do beyond topics and groups: move a group's position in a topic (replay),
//! resend or drop dead letters, and see what each group did with a message.
//!
//! Handled dead letters are remembered as finished offsets of an internal consumer group,
//! [`DEAD_LETTERS_HANDLED`], on `%DLQ%{group}`, in the consumer journal: durable, replayed
//! after a crash, and a dead letter is resent at most once per handling. A crash between
//! the copy and its journal record can resend one again, with the same message id.

use std::collections::HashSet;
use std::time::Duration;

use ferrumq_protocol::v2::Code;
use ferrumq_storage::{MessageType, NewRecord, QueueOffset, RecordView, StoredRecord, keys};

use crate::consumer::state::Lease;
use crate::error::{ApiError, ApiResult};
use crate::message::{self, property};
use crate::metadata::DLQ_PREFIX;
use crate::service::Broker;

/// The internal group whose finished offsets in `%DLQ%{group}` are the handled dead letters.
pub const DEAD_LETTERS_HANDLED: &str = "%SYS%DLQ_HANDLED";

/// Where an offset reset moves a group.
#[derive(Debug, Clone, Copy)]
pub enum ResetTo {
    /// The first message stored at or after this time (ms since the epoch).
    Time(i64),
    /// This offset in each queue, bounded by what the queue holds.
    Offset(u64),
}

/// One queue's move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueMove {
    pub queue_id: u32,
    /// The group's acked offset before; `None` when it had not read the queue.
    pub previous: Option<u64>,
    pub offset: u64,
}

/// A waiting dead letter.
pub struct DeadLetter {
    pub record: StoredRecord,
    pub dlq_offset: u64,
}

/// The outcome of a resend.
#[derive(Debug, Default)]
pub struct Resent {
    pub resent: usize,
    pub pending: u64,
    pub not_found: Vec<String>,
    /// Ids of dead letters whose original topic is gone: left waiting, not resent.
    pub orphaned: Vec<String>,
    /// Where the dead-letter queue ended when the resend began.
    pub end_offset: u64,
}

/// What one group did with one message.
#[derive(Debug, Clone)]
pub struct GroupDelivery {
    pub group: String,
    /// The lease while the message is out.
    pub lease: Option<Lease>,
    pub done: bool,
    /// Done because it was moved to the group's dead-letter topic.
    pub dead_lettered: bool,
}

impl Broker {
    /// Moves `group` to `to` in each of `queue_ids` of `topic` (every queue when empty);
    /// answered once the moves are durable. Waiting receives look again at once.
    pub async fn reset_offset(
        &self,
        group: &str,
        topic: &str,
        to: ResetTo,
        queue_ids: &[u32],
    ) -> ApiResult<Vec<QueueMove>> {
        let group = self.known_group(group)?;
        let topic = self.readable_topic(topic)?;
        if let Some(q) = queue_ids.iter().find(|q| **q >= topic.queue_count) {
            return Err(ApiError::bad_request(format!(
                "queue_ids: {q} is not a queue of topic {:?} (it has {})",
                topic.name, topic.queue_count
            )));
        }
        let queues: Vec<u32> = if queue_ids.is_empty() {
            (0..topic.queue_count).collect()
        } else {
            queue_ids.to_vec()
        };
        let mut moves = Vec::with_capacity(queues.len());
        let mut end = None;
        for queue_id in queues {
            let queue = self.store.consume_queue(&topic.name, queue_id);
            let offset = match (&queue, to) {
                (None, _) => 0,
                (Some(q), ResetTo::Time(ms)) => q.offset_at_time(ms).0,
                (Some(q), ResetTo::Offset(o)) => o.clamp(q.min_offset().0, q.max_offset().0),
            };
            let (previous, journal_end) =
                self.consumers
                    .reset(&group.name, &topic.name, queue_id, offset)?;
            end = Some(journal_end);
            moves.push(QueueMove {
                queue_id,
                previous,
                offset,
            });
        }
        self.durable(end).await?;
        self.wake_receivers();
        tracing::info!(group = %group.name, topic = %topic.name, ?to, "offsets reset");
        Ok(moves)
    }

    /// The waiting dead letters of `group`, oldest first, at most `max`, and how many wait
    /// in all.
    pub fn dead_letters(&self, group: &str, max: usize) -> ApiResult<(Vec<DeadLetter>, u64)> {
        let dlq = self.known_group(group)?.dead_letter_topic();
        let waiting = self.waiting_dead_letters(&dlq);
        let pending = waiting.len() as u64;
        let letters = waiting
            .into_iter()
            .filter_map(|offset| self.dead_letter_at(&dlq, offset))
            .take(max)
            .collect();
        Ok((letters, pending))
    }

    /// Sends dead letters of `group` back to their original topics, keeping their message
    /// ids: those named in `ids`, or the oldest `max` when `ids` is empty, of those stored
    /// below `before` in the dead-letter queue when given. One whose topic is gone is passed
    /// over and named in `orphaned`. Answered once the copies and their handling are durable.
    pub async fn resend_dead_letters(
        &self,
        group: &str,
        ids: &[String],
        max: usize,
        before: Option<u64>,
    ) -> ApiResult<Resent> {
        let group = self.known_group(group)?;
        let dlq = group.dead_letter_topic();
        let end_offset = self
            .store
            .consume_queue(&dlq, 0)
            .map_or(0, |q| q.max_offset().0);
        let mut chosen = Vec::new();
        let mut orphaned = Vec::new();
        let mut found = vec![false; ids.len()];
        for offset in self.waiting_dead_letters(&dlq) {
            if (ids.is_empty() && chosen.len() >= max) || before.is_some_and(|b| offset >= b) {
                break;
            }
            let Some(letter) = self.dead_letter_at(&dlq, offset) else {
                continue;
            };
            let id = letter
                .record
                .view()
                .properties
                .get(keys::MESSAGE_ID)
                .unwrap_or_default();
            match ids.iter().position(|wanted| wanted == id) {
                Some(i) => found[i] = true,
                None if ids.is_empty() => {}
                None => continue,
            }
            let origin = letter
                .record
                .view()
                .properties
                .get(property::DLQ_ORIGIN_TOPIC);
            if origin.and_then(|t| self.metadata.topic(t)).is_none() {
                orphaned.push(id.to_owned());
                continue;
            }
            chosen.push(letter);
        }
        let not_found: Vec<String> = ids
            .iter()
            .zip(&found)
            .filter(|(_, found)| !**found)
            .map(|(id, _)| id.clone())
            .collect();

        let mut copies = Vec::with_capacity(chosen.len());
        for letter in &chosen {
            let view = letter.record.view();
            let origin = view
                .properties
                .get(property::DLQ_ORIGIN_TOPIC)
                .unwrap_or_default();
            let topic = self.metadata.topic(origin).ok_or_else(|| {
                ApiError::new(
                    Code::TopicNotFound,
                    format!(
                        "dead letter at {dlq} offset {} came from topic {origin:?}, which no longer exists; nothing was resent",
                        letter.dlq_offset
                    ),
                )
            })?;
            let properties = message::properties_without(
                view.properties,
                &[
                    property::DLQ_ORIGIN_TOPIC,
                    property::DLQ_ORIGIN_MESSAGE_ID,
                    property::DELIVER_AT_MS,
                ],
            )?;
            let (message_type, queue_id) = match view.properties.get(property::MESSAGE_GROUP) {
                Some(message_group) => (
                    MessageType::Fifo,
                    crc32fast::hash(message_group.as_bytes()) % topic.queue_count,
                ),
                None => (
                    MessageType::Normal,
                    u32::try_from(letter.dlq_offset % u64::from(topic.queue_count)).unwrap_or(0),
                ),
            };
            copies.push((topic.name, queue_id, message_type, properties));
        }
        let records: Vec<NewRecord<'_>> = chosen
            .iter()
            .zip(&copies)
            .map(|(letter, (topic, queue_id, message_type, properties))| {
                message::moved_record(
                    &letter.record.view(),
                    topic,
                    *queue_id,
                    *message_type,
                    properties,
                )
            })
            .collect();
        if !records.is_empty() {
            let mut appended = Vec::with_capacity(records.len());
            self.log.propose_batch(&records, &mut appended)?;
            let handled = chosen.iter().map(|l| (0, l.dlq_offset)).collect();
            let end = self
                .consumers
                .finish(DEAD_LETTERS_HANDLED, &dlq, 0, handled)?;
            self.durable(Some(end)).await?;
            tracing::info!(group = %group.name, resent = records.len(), "dead letters resent");
        }
        Ok(Resent {
            resent: records.len(),
            pending: self.waiting_dead_letters(&dlq).len() as u64,
            not_found,
            orphaned,
            end_offset,
        })
    }

    /// Drops every waiting dead letter of `group`; returns how many.
    pub async fn purge_dead_letters(&self, group: &str) -> ApiResult<u64> {
        let group = self.known_group(group)?;
        let dlq = group.dead_letter_topic();
        let waiting = self.waiting_dead_letters(&dlq);
        let purged = waiting.len() as u64;
        if !waiting.is_empty() {
            let end = self.consumers.finish(
                DEAD_LETTERS_HANDLED,
                &dlq,
                0,
                waiting.into_iter().map(|o| (0, o)).collect(),
            )?;
            self.durable(Some(end)).await?;
            tracing::info!(group = %group.name, purged, "dead letters purged");
        }
        Ok(purged)
    }

    /// What each group reading its queue did with the message stored at `queue_offset` of
    /// `topic`'s queue `queue_id`.
    pub fn deliveries(&self, message: &RecordView<'_>) -> Vec<GroupDelivery> {
        // A dead letter keeps the message's id and names the topic it came from. One stored
        // before this message is not of it: it is of an earlier copy that was resent.
        let id = message.properties.get(keys::MESSAGE_ID).unwrap_or_default();
        let dead_lettered_by: HashSet<String> = if id.is_empty() {
            HashSet::new()
        } else {
            self.store
                .query_by_id(id, 0, i64::MAX)
                .iter()
                .filter_map(|record| {
                    let copy = record.view();
                    let origin = copy.properties.get(property::DLQ_ORIGIN_TOPIC);
                    (origin == Some(message.topic)
                        && copy.store_timestamp_ms >= message.store_timestamp_ms)
                        .then(|| copy.topic.strip_prefix(DLQ_PREFIX).map(str::to_owned))
                        .flatten()
                })
                .collect()
        };
        self.consumers
            .deliveries(message.topic, message.queue_id, message.queue_offset.0)
            .into_iter()
            .map(|(group, lease, done)| GroupDelivery {
                dead_lettered: done && dead_lettered_by.contains(&group),
                group,
                lease,
                done,
            })
            .collect()
    }

    /// Offsets in the dead-letter topic `dlq` neither resent nor purged, oldest first.
    fn waiting_dead_letters(&self, dlq: &str) -> Vec<u64> {
        let Some(queue) = self.store.consume_queue(dlq, 0) else {
            return Vec::new();
        };
        self.consumers.unfinished(
            DEAD_LETTERS_HANDLED,
            dlq,
            0,
            queue.min_offset().0,
            queue.max_offset().0,
        )
    }

    fn dead_letter_at(&self, dlq: &str, offset: u64) -> Option<DeadLetter> {
        let record = self
            .store
            .read_queued(dlq, 0, QueueOffset(offset), Duration::ZERO)?;
        Some(DeadLetter {
            record,
            dlq_offset: offset,
        })
    }
}
