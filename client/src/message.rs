//! Messages as the application sees them: what it sends, what a send returns, what it receives.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ferrumq_protocol::consumed::ConsumedMessage;
use ferrumq_protocol::v2::{self, Encoding, MessageType, SystemProperties};

use crate::error::{Error, Result};
use crate::transport::resource;

/// A message to send. The type follows from what is set: a message group makes it FIFO, a
/// delivery time makes it scheduled (DELAY), [`Producer::begin`](crate::Producer::begin)
/// makes it transactional, and otherwise it is NORMAL.
///
/// ```
/// use std::time::Duration;
/// use ferrumq_client::Message;
///
/// let paid = Message::new("orders", "order 42 paid")
///     .with_tag("paid")
///     .with_key("order-42")
///     .with_property("region", "eu")
///     .with_message_group("customer-7");
/// assert_eq!(paid.topic(), "orders");
///
/// let reminder = Message::new("reminders", "pay order 43").deliver_after(Duration::from_secs(3600));
/// assert!(reminder.delivery_time().is_some());
/// ```
#[derive(Debug, Clone)]
pub struct Message {
    topic: String,
    body: Bytes,
    tag: Option<String>,
    keys: Vec<String>,
    properties: HashMap<String, String>,
    message_group: Option<String>,
    deliver_at_ms: Option<i64>,
    message_id: Option<String>,
}

impl Message {
    pub fn new(topic: impl Into<String>, body: impl Into<Bytes>) -> Message {
        Message {
            topic: topic.into(),
            body: body.into(),
            tag: None,
            keys: Vec::new(),
            properties: HashMap::new(),
            message_group: None,
            deliver_at_ms: None,
            message_id: None,
        }
    }

    /// One tag, for consumers' tag filters (`paid || refunded`).
    #[must_use]
    pub fn with_tag(mut self, tag: impl Into<String>) -> Message {
        self.tag = Some(tag.into());
        self
    }

    /// A key to find the message by (`ferrumq-admin message query --key`); may repeat.
    #[must_use]
    pub fn with_key(mut self, key: impl Into<String>) -> Message {
        self.keys.push(key.into());
        self
    }

    /// A user property, for SQL92 filters and the consumer.
    #[must_use]
    pub fn with_property(mut self, name: impl Into<String>, value: impl Into<String>) -> Message {
        self.properties.insert(name.into(), value.into());
        self
    }

    /// Makes the message FIFO: a group's messages are delivered one at a time, in order.
    #[must_use]
    pub fn with_message_group(mut self, group: impl Into<String>) -> Message {
        self.message_group = Some(group.into());
        self
    }

    /// Delivers the message at `time` (millisecond precision, never earlier).
    #[must_use]
    pub fn deliver_at(mut self, time: SystemTime) -> Message {
        self.deliver_at_ms = Some(epoch_ms(time));
        self
    }

    /// Delivers the message `delay` from now.
    #[must_use]
    pub fn deliver_after(mut self, delay: Duration) -> Message {
        match SystemTime::now().checked_add(delay) {
            Some(time) => self.deliver_at(time),
            // Past any time the clock can name: the broker refuses it as out of range.
            None => {
                self.deliver_at_ms = Some(i64::MAX);
                self
            }
        }
    }

    /// Sets the message id (34 hex digits, as the RocketMQ clients make them). Left unset, the
    /// producer makes one; it is kept across retries either way, so consumers can recognise
    /// a message sent twice.
    #[must_use]
    pub fn with_message_id(mut self, id: impl Into<String>) -> Message {
        self.message_id = Some(id.into());
        self
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub fn body(&self) -> &Bytes {
        &self.body
    }

    pub fn message_group(&self) -> Option<&str> {
        self.message_group.as_deref()
    }

    pub fn delivery_time(&self) -> Option<SystemTime> {
        self.deliver_at_ms.map(time_from_ms)
    }

    /// The checks a broker would make that need no broker, so a bad message fails alone
    /// instead of failing the batch it would have joined.
    pub(crate) fn validate(&self, max_body_bytes: usize) -> Result<()> {
        let bad = |what: String| Err(Error::InvalidMessage(what));
        if self.topic.is_empty() {
            return bad("topic is empty".into());
        }
        if self.body.is_empty() {
            return bad("body is empty; a message must carry at least one byte".into());
        }
        if self.body.len() > max_body_bytes {
            return bad(format!(
                "body is {} bytes; the broker accepts at most {max_body_bytes}",
                self.body.len()
            ));
        }
        if let Some(tag) = &self.tag
            && (tag.trim().is_empty() || tag.contains('|'))
        {
            return bad(format!("tag {tag:?} must be non-blank and contain no '|'"));
        }
        if let Some(key) = self.keys.iter().find(|k| k.trim().is_empty()) {
            return bad(format!("key {key:?} is blank"));
        }
        if self.message_group.as_deref().is_some_and(str::is_empty) {
            return bad("message group is empty".into());
        }
        if self.message_group.is_some() && self.deliver_at_ms.is_some() {
            return bad(
                "a message cannot have both a message group (FIFO) and a delivery time (DELAY)"
                    .into(),
            );
        }
        Ok(())
    }

    /// The wire form, born at `now` (read once for a whole batch), with its message id fixed
    /// (made from `now` if the caller set none).
    pub(crate) fn into_wire(mut self, transactional: bool, now: SystemTime) -> v2::Message {
        let message_id = self
            .message_id
            .take()
            .unwrap_or_else(|| ferrumq_protocol::message_id::new_message_id_at(now));
        let message_type = if transactional {
            MessageType::Transaction
        } else if self.message_group.is_some() {
            MessageType::Fifo
        } else if self.deliver_at_ms.is_some() {
            MessageType::Delay
        } else {
            MessageType::Normal
        };
        v2::Message {
            topic: resource(&self.topic),
            user_properties: self.properties,
            system_properties: Some(SystemProperties {
                tag: self.tag,
                keys: self.keys,
                message_id,
                body_encoding: Encoding::Identity as i32,
                message_type: message_type as i32,
                born_timestamp: Some(timestamp(epoch_ms(now))),
                delivery_timestamp: self.deliver_at_ms.map(timestamp),
                message_group: self.message_group,
                ..SystemProperties::default()
            }),
            body: self.body,
        }
    }
}

/// What the broker answered for a stored message.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SendReceipt {
    pub message_id: String,
    pub topic: String,
    /// The offset in its queue (for a scheduled message: in the broker's timer store).
    pub offset: i64,
    /// For a scheduled message: the handle that cancels it before its time.
    pub recall_handle: Option<String>,
    /// The broker that stored it.
    pub endpoint: String,
}

impl SendReceipt {
    pub(crate) fn from_wire(
        endpoint: &str,
        topic: &str,
        entry: v2::SendResultEntry,
    ) -> SendReceipt {
        SendReceipt {
            message_id: entry.message_id,
            topic: topic.to_owned(),
            offset: entry.offset,
            recall_handle: Some(entry.recall_handle).filter(|h| !h.is_empty()),
            endpoint: endpoint.to_owned(),
        }
    }
}

/// A message as a consumer receives it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ReceivedMessage {
    pub message_id: String,
    pub topic: String,
    pub body: Bytes,
    pub tag: Option<String>,
    pub keys: Vec<String>,
    pub properties: HashMap<String, String>,
    pub message_group: Option<String>,
    /// 1 the first time, one more for each redelivery.
    pub delivery_attempt: u32,
    pub born_at: SystemTime,
    pub delivery_time: Option<SystemTime>,
    pub queue_id: i32,
    pub queue_offset: Option<i64>,
    /// The broker it came from; acks go back there. Shared by the messages of a receive.
    pub endpoint: Arc<str>,
    /// As the broker sent it; checked for UTF-8 when used.
    pub(crate) receipt_handle: Option<Bytes>,
}

impl ReceivedMessage {
    pub(crate) fn from_wire(endpoint: &Arc<str>, message: ConsumedMessage) -> ReceivedMessage {
        let system = message.system_properties.unwrap_or_default();
        let ms = |t: Option<prost_types::Timestamp>| {
            t.map(|t| {
                t.seconds
                    .saturating_mul(1000)
                    .saturating_add(i64::from(t.nanos / 1_000_000))
            })
        };
        ReceivedMessage {
            message_id: system.message_id,
            topic: message.topic.map(|t| t.name).unwrap_or_default(),
            body: message.body,
            tag: system.tag,
            keys: system.keys,
            properties: message.user_properties,
            message_group: system.message_group,
            delivery_attempt: system
                .delivery_attempt
                .and_then(|a| u32::try_from(a).ok())
                .unwrap_or(1),
            born_at: time_from_ms(ms(system.born_timestamp).unwrap_or(0)),
            delivery_time: ms(system.delivery_timestamp).map(time_from_ms),
            queue_id: system.queue_id,
            queue_offset: system.queue_offset,
            endpoint: endpoint.clone(),
            receipt_handle: system.receipt_handle,
        }
    }

    /// The lease's receipt handle (it changes when the lease is changed).
    pub fn receipt_handle(&self) -> Option<&str> {
        std::str::from_utf8(self.receipt_handle.as_deref()?).ok()
    }

    pub(crate) fn handle(&self) -> Result<&str> {
        let handle = self.receipt_handle.as_deref().ok_or_else(|| {
            Error::InvalidMessage(format!(
                "message {} has no receipt handle: only messages from receive can be acked",
                self.message_id
            ))
        })?;
        std::str::from_utf8(handle).map_err(|_| {
            Error::InvalidMessage(format!(
                "message {}'s receipt handle is not UTF-8: the broker sent a corrupt reply",
                self.message_id
            ))
        })
    }
}

pub(crate) fn epoch_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn time_from_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_type_follows_from_the_fields() {
        let kind = |m: Message, txn| {
            m.into_wire(txn, SystemTime::now())
                .system_properties
                .unwrap()
                .message_type
        };
        let m = || Message::new("t", "b");
        assert_eq!(kind(m(), false), MessageType::Normal as i32);
        assert_eq!(
            kind(m().with_message_group("g"), false),
            MessageType::Fifo as i32
        );
        assert_eq!(
            kind(m().deliver_after(Duration::from_secs(1)), false),
            MessageType::Delay as i32
        );
        assert_eq!(kind(m(), true), MessageType::Transaction as i32);
    }

    #[test]
    fn a_message_id_is_made_once_and_a_given_one_is_kept() {
        let wire = Message::new("t", "b").into_wire(false, SystemTime::now());
        assert_eq!(wire.system_properties.unwrap().message_id.len(), 34);
        let kept = Message::new("t", "b")
            .with_message_id("01ABC")
            .into_wire(false, SystemTime::now());
        assert_eq!(kept.system_properties.unwrap().message_id, "01ABC");
    }

    #[test]
    fn bad_messages_are_refused_naming_the_field() {
        let error = |m: Message| m.validate(10).unwrap_err().to_string();
        assert!(error(Message::new("", "b")).contains("topic"));
        assert!(error(Message::new("t", "")).contains("body is empty"));
        assert!(error(Message::new("t", "01234567890")).contains("at most 10"));
        assert!(error(Message::new("t", "b").with_tag("a|b")).contains("tag"));
        assert!(error(Message::new("t", "b").with_key(" ")).contains("key"));
        let both = Message::new("t", "b")
            .with_message_group("g")
            .deliver_after(Duration::from_secs(1));
        assert!(error(both).contains("both"));
        assert!(Message::new("t", "b").with_tag("paid").validate(10).is_ok());
    }

    #[test]
    fn a_delay_past_the_clock_is_far_future_not_a_panic() {
        let message = Message::new("t", "x").deliver_after(Duration::MAX);
        assert_eq!(message.deliver_at_ms, Some(i64::MAX));
    }

    #[test]
    fn timestamps_keep_milliseconds() {
        let t = timestamp(1_700_000_000_123);
        assert_eq!((t.seconds, t.nanos), (1_700_000_000, 123_000_000));
    }
}
