//! Between the wire and the log: checks an incoming `apache.rocketmq.v2.Message` and turns it
//! into stored properties, and turns a stored record back into the message a consumer sees.

use bytes::BytesMut;
use ferrumq_protocol::frame::EncodedMessage;
use ferrumq_protocol::v2::{self, Code, DigestType, Encoding, MessageType, SystemProperties};
use ferrumq_storage::{
    MessageType as StoredType, NewRecord, Properties, PropertiesRef, RecordView, StoredRecord,
    TermIndex, keys,
};
use md5::{Digest as _, Md5};

use crate::config::Limits;
use crate::error::{ApiError, ApiResult};

/// Property keys the broker writes. A user property may not use one.
pub mod property {
    pub const MESSAGE_GROUP: &str = "__SHARDINGKEY";
    pub const BORN_HOST: &str = "__BORNHOST";
    pub const TRACE_CONTEXT: &str = "TRACE_CONTEXT";
    pub const DLQ_ORIGIN_TOPIC: &str = "DLQ_ORIGIN_TOPIC";
    pub const DLQ_ORIGIN_MESSAGE_ID: &str = "DLQ_ORIGIN_MESSAGE_ID";
    pub const DELIVER_AT_MS: &str = "TIMER_DELIVER_MS";
    /// Where a half or scheduled message goes once it is committed or due.
    pub const REAL_TOPIC: &str = "REAL_TOPIC";
    pub const REAL_QUEUE_ID: &str = "REAL_QID";
    pub const TRANSACTION_PRODUCER: &str = "__TXN_PRODUCER";
    pub const CHECK_IMMUNITY_MS: &str = "__CHECK_IMMUNITY_MS";
    pub const TRANSACTION_CHECKS: &str = "__TXN_CHECKS";
}

/// Keys of RocketMQ's system properties; clients may not set them as user properties.
const RESERVED_KEYS: [&str; 33] = [
    keys::MESSAGE_ID,
    keys::TAG,
    keys::KEY,
    property::MESSAGE_GROUP,
    property::BORN_HOST,
    property::TRACE_CONTEXT,
    property::DLQ_ORIGIN_TOPIC,
    property::DLQ_ORIGIN_MESSAGE_ID,
    property::DELIVER_AT_MS,
    property::REAL_TOPIC,
    property::REAL_QUEUE_ID,
    property::TRANSACTION_PRODUCER,
    property::CHECK_IMMUNITY_MS,
    property::TRANSACTION_CHECKS,
    "WAIT",
    "DELAY",
    "RETRY_TOPIC",
    "TRAN_MSG",
    "PGROUP",
    "MIN_OFFSET",
    "MAX_OFFSET",
    "BUYER_ID",
    "ORIGIN_MESSAGE_ID",
    "TRANSFER_FLAG",
    "CORRECTION_FLAG",
    "MQ2_FLAG",
    "RECONSUME_TIME",
    "MSG_REGION",
    "TRACE_ON",
    "MAX_RECONSUME_TIMES",
    "CONSUME_START_TIME",
    "TIMER_DELAY_SEC",
    "CHECK_IMMUNITY_TIME_IN_SECONDS",
];

pub fn is_reserved_key(key: &str) -> bool {
    RESERVED_KEYS.contains(&key)
}

/// Where a message is stored: its own topic, or an internal one until it is committed or
/// due (half and scheduled messages, always queue 0 there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub internal_topic: Option<&'static str>,
    pub queue_id: u32,
    pub stored_type: StoredType,
}

impl Placement {
    pub fn direct(stored_type: StoredType, queue_id: u32) -> Placement {
        Placement {
            internal_topic: None,
            queue_id,
            stored_type,
        }
    }

    pub fn internal(topic: &'static str, stored_type: StoredType) -> Placement {
        Placement {
            internal_topic: Some(topic),
            queue_id: 0,
            stored_type,
        }
    }
}

/// A message that passed every check, ready to append.
#[derive(Debug, Clone)]
pub struct CheckedMessage {
    pub message_id: String,
    pub kind: Kind,
    /// Where the send path decided to store it; the message's own topic until then.
    pub placement: Placement,
    pub queue_id: Option<u32>,
    pub born_timestamp_ms: i64,
    pub properties: Properties,
    pub body: bytes::Bytes,
}

/// What a message is, with what its kind needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Normal,
    Fifo {
        message_group: String,
    },
    /// Visible from `deliver_at_ms` (ms since the epoch) on.
    Delay {
        deliver_at_ms: i64,
    },
    /// A half message; the producer may ask for its first check after `recovery_ms`.
    Transaction {
        recovery_ms: Option<u64>,
    },
}

impl Kind {
    pub fn wire_type(&self) -> MessageType {
        match self {
            Kind::Normal => MessageType::Normal,
            Kind::Fifo { .. } => MessageType::Fifo,
            Kind::Delay { .. } => MessageType::Delay,
            Kind::Transaction { .. } => MessageType::Transaction,
        }
    }
}

/// Names a field of the `index`-th message of a send in the caller's terms, for errors.
/// `name` is the field's path in `apache.rocketmq.v2.Message` (`system_properties.tag`).
pub type FieldNames = dyn Fn(usize, &str) -> String + Send + Sync;

/// Field names as gRPC callers know them: `messages[2].system_properties.tag`.
pub fn grpc_field(index: usize, name: &str) -> String {
    format!("messages[{index}].{name}")
}

/// Checks one message of a send against the limits. `names` names its fields in errors.
pub fn check(
    index: usize,
    names: &FieldNames,
    message: v2::Message,
    limits: &Limits,
    now_ms: i64,
) -> ApiResult<CheckedMessage> {
    let field = |name: &str| names(index, name);
    let system = message.system_properties.ok_or_else(|| {
        ApiError::bad_request(format!("{} is missing", field("system_properties")))
    })?;
    let id = system.message_id.as_str();
    if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::new(
            Code::IllegalMessageId,
            format!(
                "{} {id:?} must be 1 to 128 printable ASCII characters",
                field("system_properties.message_id")
            ),
        ));
    }
    if message.body.is_empty() {
        // MESSAGE_BODY_EMPTY (41302) is not known to the 5.0.0 clients.
        return Err(ApiError::bad_request(format!("{} is empty", field("body"))));
    }
    if message.body.len() > limits.max_body_bytes {
        return Err(ApiError::new(
            Code::MessageBodyTooLarge,
            format!(
                "{} is {} bytes; the limit is {}",
                field("body"),
                message.body.len(),
                limits.max_body_bytes
            ),
        ));
    }
    if system.body_encoding == Encoding::Gzip as i32 {
        return Err(ApiError::bad_request(format!(
            "{}: GZIP bodies are not accepted",
            field("system_properties.body_encoding")
        )));
    }
    let kind = kind_of(&field, &system, limits, now_ms)?;
    // Room for what most messages carry (id, tag, a key, born host) without growing.
    let mut properties = Properties::with_capacity(192);
    let mut property_bytes = 0usize;
    let mut push = |key: &str, value: &str, properties: &mut Properties| -> ApiResult<()> {
        property_bytes += key.len() + value.len();
        properties
            .push(key, value)
            .map_err(|e| ApiError::new(Code::MessagePropertiesTooLarge, e.to_string()))
    };
    push(keys::MESSAGE_ID, id, &mut properties)?;
    if let Some(tag) = &system.tag {
        if tag.trim().is_empty() || tag.contains('|') || tag.chars().any(char::is_control) {
            return Err(ApiError::new(
                Code::IllegalMessageTag,
                format!(
                    "{} {tag:?} must be non-blank, without '|' or control characters",
                    field("system_properties.tag")
                ),
            ));
        }
        push(keys::TAG, tag, &mut properties)?;
    }
    for key in &system.keys {
        if key.trim().is_empty() || key.chars().any(char::is_control) {
            return Err(ApiError::new(
                Code::IllegalMessageKey,
                format!(
                    "{} {key:?} must be non-blank, without control characters",
                    field("system_properties.keys")
                ),
            ));
        }
        push(keys::KEY, key, &mut properties)?;
    }
    match &kind {
        Kind::Fifo { message_group } => {
            push(property::MESSAGE_GROUP, message_group, &mut properties)?
        }
        Kind::Delay { deliver_at_ms } => push(
            property::DELIVER_AT_MS,
            &deliver_at_ms.to_string(),
            &mut properties,
        )?,
        Kind::Normal | Kind::Transaction { .. } => {}
    }
    if !system.born_host.is_empty() {
        push(property::BORN_HOST, &system.born_host, &mut properties)?;
    }
    if let Some(trace) = &system.trace_context
        && !trace.is_empty()
    {
        push(property::TRACE_CONTEXT, trace, &mut properties)?;
    }
    if message.user_properties.len() > limits.max_properties {
        return Err(ApiError::new(
            Code::MessagePropertiesTooLarge,
            format!(
                "{} has {} entries; the limit is {}",
                field("user_properties"),
                message.user_properties.len(),
                limits.max_properties
            ),
        ));
    }
    // Sorted, so a message's stored form does not depend on hash order.
    let mut user: Vec<(&String, &String)> = message.user_properties.iter().collect();
    user.sort();
    for (key, value) in user {
        if key.is_empty() || is_reserved_key(key) || key.chars().any(char::is_control) {
            return Err(ApiError::new(
                Code::IllegalMessagePropertyKey,
                format!(
                    "{} key {key:?} is empty, reserved or has control characters",
                    field("user_properties")
                ),
            ));
        }
        push(key, value, &mut properties)?;
    }
    if property_bytes > limits.max_properties_bytes {
        return Err(ApiError::new(
            Code::MessagePropertiesTooLarge,
            format!(
                "{}: properties, tag and keys take {property_bytes} bytes; the limit is {}",
                field("user_properties"),
                limits.max_properties_bytes
            ),
        ));
    }
    let born_timestamp_ms = system.born_timestamp.map_or(0, |t| {
        t.seconds
            .saturating_mul(1000)
            .saturating_add(i64::from(t.nanos / 1_000_000))
    });
    let queue_id = u32::try_from(system.queue_id).ok();
    Ok(CheckedMessage {
        message_id: system.message_id,
        kind,
        placement: Placement::direct(StoredType::Normal, 0),
        queue_id,
        born_timestamp_ms,
        properties,
        body: message.body,
    })
}

/// The message's kind from its type and the fields that go with it. A type left
/// UNSPECIFIED is read from the fields: a message group makes it FIFO, a delivery time DELAY.
fn kind_of(
    field: &dyn Fn(&str) -> String,
    system: &SystemProperties,
    limits: &Limits,
    now_ms: i64,
) -> ApiResult<Kind> {
    let declared = MessageType::try_from(system.message_type).unwrap_or(MessageType::Unspecified);
    let message_type = match declared {
        MessageType::Unspecified if system.message_group.is_some() => MessageType::Fifo,
        MessageType::Unspecified if system.delivery_timestamp.is_some() => MessageType::Delay,
        MessageType::Unspecified => MessageType::Normal,
        other => other,
    };
    let conflict = |name: &str| {
        Err(ApiError::new(
            Code::MessagePropertyConflictWithType,
            format!(
                "{} is set on a {} message",
                field(&format!("system_properties.{name}")),
                message_type.as_str_name()
            ),
        ))
    };
    if message_type != MessageType::Delay && system.delivery_timestamp.is_some() {
        return conflict("delivery_timestamp");
    }
    if message_type != MessageType::Fifo && system.message_group.is_some() {
        return conflict("message_group");
    }
    match message_type {
        MessageType::Fifo => {
            let group = system.message_group.clone().unwrap_or_default();
            if group.trim().is_empty()
                || group.len() > limits.max_message_group_bytes
                || group.chars().any(char::is_control)
            {
                return Err(ApiError::new(
                    Code::IllegalMessageGroup,
                    format!(
                        "{} {group:?} must be 1 to {} bytes, non-blank, without control characters",
                        field("system_properties.message_group"),
                        limits.max_message_group_bytes
                    ),
                ));
            }
            Ok(Kind::Fifo {
                message_group: group,
            })
        }
        MessageType::Delay => {
            let deliver_at_ms = system
                .delivery_timestamp
                .as_ref()
                .and_then(|t| {
                    let nanos = u32::try_from(t.nanos).ok().filter(|n| *n < 1_000_000_000)?;
                    t.seconds
                        .checked_mul(1000)?
                        .checked_add(i64::from(nanos.div_ceil(1_000_000)))
                })
                .ok_or_else(|| {
                    ApiError::new(
                        Code::IllegalDeliveryTime,
                        format!(
                            "{} is missing or not a valid time; a DELAY message needs one",
                            field("system_properties.delivery_timestamp")
                        ),
                    )
                })?;
            let latest =
                now_ms.saturating_add(i64::try_from(limits.max_delay_ms).unwrap_or(i64::MAX));
            if deliver_at_ms > latest {
                return Err(ApiError::new(
                    Code::IllegalDeliveryTime,
                    format!(
                        "{} is {} ms from now; the limit is {} ms",
                        field("system_properties.delivery_timestamp"),
                        deliver_at_ms.saturating_sub(now_ms),
                        limits.max_delay_ms
                    ),
                ));
            }
            Ok(Kind::Delay { deliver_at_ms })
        }
        MessageType::Transaction => {
            let recovery_ms = match &system.orphaned_transaction_recovery_duration {
                None => None,
                Some(d) => Some(duration_ms(d).ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "{} must not be negative",
                        field("system_properties.orphaned_transaction_recovery_duration")
                    ))
                })?),
            };
            Ok(Kind::Transaction { recovery_ms })
        }
        _ => Ok(Kind::Normal),
    }
}

/// A copy of `properties` without the keys in `drop`: what the broker strips when it moves
/// a message on (a due timer, a committed half message, a resent dead letter).
pub fn properties_without(properties: PropertiesRef<'_>, drop: &[&str]) -> ApiResult<Properties> {
    let mut kept = Properties::new();
    for (key, value) in properties.iter() {
        if !drop.contains(&key) {
            kept.push(key, value)
                .map_err(|e| ApiError::internal(e.to_string()))?;
        }
    }
    Ok(kept)
}

/// A stored message moved on to `topic` (a due timer, a committed half message, a dead
/// letter, a resent one): its body, birth and `properties`, under a new type and queue.
pub fn moved_record<'a>(
    view: &RecordView<'a>,
    topic: &'a str,
    queue_id: u32,
    message_type: StoredType,
    properties: &'a Properties,
) -> NewRecord<'a> {
    NewRecord {
        topic,
        queue_id,
        message_type,
        born_timestamp_ms: view.born_timestamp_ms,
        born_host: view.born_host,
        properties: properties.as_ref(),
        body: view.body,
        term_index: TermIndex::default(),
    }
}

static NO_PROPERTIES: Properties = Properties::new();

/// A record of the broker's own bookkeeping (journals, done and cancel records): queue 0 of
/// an internal topic, no properties.
pub fn system_record<'a>(topic: &'a str, body: &'a [u8]) -> NewRecord<'a> {
    NewRecord {
        topic,
        queue_id: 0,
        message_type: StoredType::System,
        born_timestamp_ms: 0,
        born_host: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
        properties: NO_PROPERTIES.as_ref(),
        body,
        term_index: TermIndex::default(),
    }
}

/// The body digest put on a delivered message, in the form the receiving client checks.
///
/// The official Java, Python and Node.js clients recompute the digest and compare it as
/// text with their own formatting; a mismatch marks the message corrupted, which a push
/// consumer treats as a failure. MD5 is accepted by all of them, but costs about 2 µs per
/// KiB. CRC32 costs a twentieth of that, and is used for the clients whose CRC32 text format
/// is known, by the language they name in the `x-mq-language` header. The Rust clients
/// never read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyDigest {
    /// Upper-case hex MD5: for every client not listed below.
    #[default]
    Md5,
    /// CRC32 as upper-case hex without leading zeros (Java).
    Crc32Hex,
    /// CRC32 as eight upper-case hex digits (Python).
    Crc32PaddedHex,
    /// CRC32 as an unsigned decimal number (Node.js, whose header says `HTTP`).
    Crc32Decimal,
    /// None at all, for the Rust clients: neither the official crate nor `ferrumq-client`
    /// reads it, and the CRC32 of every body they were sent, with its text, was 6% of the
    /// broker's instructions per delivered message.
    Omitted,
}

impl BodyDigest {
    /// The digest for a client by its `x-mq-language` header.
    pub fn for_language(language: Option<&str>) -> BodyDigest {
        match language {
            Some("JAVA") => BodyDigest::Crc32Hex,
            Some("PYTHON") => BodyDigest::Crc32PaddedHex,
            Some("RUST") => BodyDigest::Omitted,
            Some("HTTP") => BodyDigest::Crc32Decimal,
            _ => BodyDigest::Md5,
        }
    }

    fn of(self, body: &[u8]) -> Option<(DigestType, String)> {
        let crc32 = || crc32fast::hash(body);
        Some(match self {
            BodyDigest::Md5 => (DigestType::Md5, hex::encode_upper(Md5::digest(body))),
            BodyDigest::Crc32Hex => (DigestType::Crc32, hex_text(crc32(), 1)),
            BodyDigest::Crc32PaddedHex => (DigestType::Crc32, hex_text(crc32(), 8)),
            BodyDigest::Crc32Decimal => (DigestType::Crc32, crc32().to_string()),
            BodyDigest::Omitted => return None,
        })
    }
}

/// How a message is being handed out, when it is (receive) rather than only read (pull).
pub struct Delivery<'a> {
    pub receipt_handle: &'a str,
    pub attempt: u32,
    pub invisible_ms: u64,
    pub store_host: &'a str,
}

/// Writes the message a consumer sees for a stored record into `out`, a scratch buffer, and
/// takes it out. This is the one place a stored record becomes a wire message.
pub fn encode_wire(
    record: &StoredRecord,
    delivery: Option<Delivery<'_>>,
    store_host: &str,
    digest: BodyDigest,
    out: &mut BytesMut,
) -> EncodedMessage {
    let view = record.view();
    EncodedMessage::write(out, |message| {
        let mut topic = view.topic;
        let (mut message_id, mut has_keys) = ("", false);
        let (mut tag, mut born_host, mut trace_context, mut group) = (None, None, None, None);
        let (mut dlq_topic, mut dlq_id, mut deliver_at) = (None, None, None);
        for (key, value) in view.properties.iter() {
            match key {
                keys::MESSAGE_ID => message_id = value,
                keys::TAG => tag = Some(value),
                keys::KEY => has_keys = true,
                property::BORN_HOST => born_host = Some(value),
                property::TRACE_CONTEXT => trace_context = Some(value),
                property::MESSAGE_GROUP => group = Some(value),
                property::DLQ_ORIGIN_TOPIC => dlq_topic = Some(value),
                property::DLQ_ORIGIN_MESSAGE_ID => dlq_id = Some(value),
                property::REAL_TOPIC => topic = value,
                property::DELIVER_AT_MS => deliver_at = value.parse::<i64>().ok(),
                _ if is_reserved_key(key) => {}
                _ => message.user_property(key, value),
            }
        }
        message.topic(topic);
        message.system_properties(|system| {
            if let Some(tag) = tag {
                system.tag(tag);
            }
            if has_keys {
                let keys = view.properties.iter().filter(|(k, _)| *k == keys::KEY);
                keys.for_each(|(_, key)| system.key(key));
            }
            system.message_id(message_id);
            if let Some((digest_type, checksum)) = digest.of(view.body) {
                system.body_digest(digest_type, &checksum);
            }
            system.body_encoding(Encoding::Identity);
            system.message_type(match view.message_type {
                StoredType::Fifo => MessageType::Fifo,
                StoredType::Delay => MessageType::Delay,
                StoredType::TransactionHalf | StoredType::TransactionCommit => {
                    MessageType::Transaction
                }
                _ => MessageType::Normal,
            });
            system.born_timestamp(view.born_timestamp_ms);
            match born_host {
                Some(host) if !host.is_empty() => system.born_host(host),
                _ => system.born_host(IpText::new(view.born_host.ip()).as_str()),
            }
            system.store_timestamp(view.store_timestamp_ms);
            system.store_host(delivery.as_ref().map_or(store_host, |d| d.store_host));
            if let Some(at) = deliver_at {
                system.delivery_timestamp(at);
            }
            if let Some(delivery) = &delivery {
                system.receipt_handle(delivery.receipt_handle);
            }
            system.queue_id(i32::try_from(view.queue_id).unwrap_or(i32::MAX));
            if let Ok(offset) = i64::try_from(view.queue_offset.0) {
                system.queue_offset(offset);
            }
            if let Some(delivery) = &delivery {
                system.invisible_duration(delivery.invisible_ms);
                system.delivery_attempt(i32::try_from(delivery.attempt).unwrap_or(i32::MAX));
            }
            if let Some(group) = group {
                system.message_group(group);
            }
            if let Some(context) = trace_context {
                system.trace_context(context);
            }
            if let (Some(topic), Some(id)) = (dlq_topic, dlq_id) {
                system.dead_letter_queue(topic, id);
            }
        });
        message.body(view.body);
    })
}

/// A buffer with room for the wire messages of `records`: a batch's in one allocation.
pub fn wire_buffer<'a>(records: impl IntoIterator<Item = &'a StoredRecord>) -> BytesMut {
    // What a wire message has beyond its stored record: a receipt handle, two hosts, a digest.
    const WIRE_EXTRA: u64 = 256;
    let bytes: u64 = records
        .into_iter()
        .map(|r| r.end().0 - r.pos().0 + WIRE_EXTRA)
        .sum();
    BytesMut::with_capacity(usize::try_from(bytes).unwrap_or(0))
}

/// [`encode_wire`], typed: for replies that hold the message in a larger structure.
pub fn to_wire(
    record: &StoredRecord,
    delivery: Option<Delivery<'_>>,
    store_host: &str,
    digest: BodyDigest,
) -> ApiResult<v2::Message> {
    let encoded = encode_wire(record, delivery, store_host, digest, &mut BytesMut::new());
    encoded
        .decode()
        .map_err(|e| ApiError::internal(format!("stored record at {}: {e}", record.pos().0)))
}

/// `value` in hex, zero-padded to `min_digits`.
pub fn hex_text(value: u32, min_digits: usize) -> String {
    let mut text = String::with_capacity(8);
    push_hex(&mut text, u64::from(value), min_digits, HEX_UPPER);
    text
}

pub const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";
pub const HEX_LOWER: &[u8; 16] = b"0123456789abcdef";

/// Appends `value` in hex with `digits`, zero-padded to `min_digits`. Hand-written because
/// `format!` was a tenth of the broker's time per delivered message.
pub fn push_hex(text: &mut String, value: u64, min_digits: usize, digits: &[u8; 16]) {
    let used = (64 - value.leading_zeros() as usize).div_ceil(4);
    let width = used.max(min_digits).min(16);
    for i in (0..width).rev() {
        text.push(char::from(digits[((value >> (4 * i)) & 0xF) as usize]));
    }
}

/// An IP address as text: IPv4 on the stack, without going through `fmt`.
enum IpText {
    V4 { text: [u8; 15], len: usize },
    Other(String),
}

impl IpText {
    fn new(ip: std::net::IpAddr) -> IpText {
        let std::net::IpAddr::V4(v4) = ip else {
            return IpText::Other(ip.to_string());
        };
        let (mut text, mut len) = ([0; 15], 0);
        let mut push = |byte: u8| {
            text[len] = byte;
            len += 1;
        };
        for (i, octet) in v4.octets().into_iter().enumerate() {
            if i > 0 {
                push(b'.');
            }
            if octet >= 100 {
                push(b'0' + octet / 100);
            }
            if octet >= 10 {
                push(b'0' + octet / 10 % 10);
            }
            push(b'0' + octet % 10);
        }
        IpText::V4 { text, len }
    }

    fn as_str(&self) -> &str {
        match self {
            // Digits and dots only.
            IpText::V4 { text, len } => std::str::from_utf8(&text[..*len]).unwrap_or_default(),
            IpText::Other(text) => text,
        }
    }
}

pub fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

/// A protobuf duration in milliseconds; `None` if it is negative or out of range.
pub fn duration_ms(d: &prost_types::Duration) -> Option<u64> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return None;
    }
    u64::try_from(d.seconds)
        .ok()?
        .checked_mul(1000)?
        .checked_add(u64::try_from(d.nanos / 1_000_000).ok()?)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use ferrumq_protocol::v2::Resource;

    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    fn message() -> v2::Message {
        v2::Message {
            topic: Some(Resource {
                resource_namespace: String::new(),
                name: "t".into(),
            }),
            user_properties: HashMap::from([("k".to_owned(), "v".to_owned())]),
            system_properties: Some(SystemProperties {
                message_id: "01ABCDEF".into(),
                tag: Some("tag".into()),
                keys: vec!["key1".into(), "key2".into()],
                message_type: MessageType::Normal as i32,
                ..SystemProperties::default()
            }),
            body: bytes::Bytes::from_static(b"body"),
        }
    }

    #[test]
    fn a_good_message_keeps_its_id_tag_keys_and_properties() {
        let checked = check(0, &grpc_field, message(), &Limits::default(), NOW).unwrap();
        let p = checked.properties.as_ref();
        assert_eq!(p.get(keys::MESSAGE_ID), Some("01ABCDEF"));
        assert_eq!(p.get(keys::TAG), Some("tag"));
        assert_eq!(p.iter().filter(|(k, _)| *k == keys::KEY).count(), 2);
        assert_eq!(p.get("k"), Some("v"));
    }

    #[test]
    fn each_bad_field_has_its_code_and_name() {
        let limits = Limits {
            max_body_bytes: 8,
            ..Limits::default()
        };
        type Mutation = Box<dyn Fn(&mut v2::Message)>;
        let cases: Vec<(Mutation, Code, &str)> = vec![
            (
                Box::new(|m| m.system_properties.as_mut().unwrap().message_id.clear()),
                Code::IllegalMessageId,
                "message_id",
            ),
            (
                Box::new(|m| m.body = bytes::Bytes::new()),
                Code::BadRequest,
                "body",
            ),
            (
                Box::new(|m| m.body = vec![0; 9].into()),
                Code::MessageBodyTooLarge,
                "body",
            ),
            (
                Box::new(|m| m.system_properties.as_mut().unwrap().tag = Some("a|b".into())),
                Code::IllegalMessageTag,
                "tag",
            ),
            (
                Box::new(|m| m.system_properties.as_mut().unwrap().keys = vec![" ".into()]),
                Code::IllegalMessageKey,
                "keys",
            ),
            (
                Box::new(|m| {
                    m.user_properties.insert("UNIQ_KEY".into(), "x".into());
                }),
                Code::IllegalMessagePropertyKey,
                "user_properties",
            ),
            (
                Box::new(|m| {
                    for i in 0..129 {
                        m.user_properties.insert(format!("p{i}"), "x".into());
                    }
                }),
                Code::MessagePropertiesTooLarge,
                "user_properties",
            ),
            (
                Box::new(|m| {
                    m.user_properties.insert("big".into(), "x".repeat(17 << 10));
                }),
                Code::MessagePropertiesTooLarge,
                "user_properties",
            ),
            (
                Box::new(|m| {
                    m.system_properties.as_mut().unwrap().message_type = MessageType::Delay as i32
                }),
                Code::IllegalDeliveryTime,
                "delivery_timestamp",
            ),
            (
                Box::new(|m| {
                    let system = m.system_properties.as_mut().unwrap();
                    system.message_type = MessageType::Delay as i32;
                    system.delivery_timestamp = Some(timestamp(NOW + 8 * 24 * 3600 * 1000));
                }),
                Code::IllegalDeliveryTime,
                "delivery_timestamp",
            ),
            (
                Box::new(|m| {
                    let system = m.system_properties.as_mut().unwrap();
                    system.message_type = MessageType::Fifo as i32;
                    system.message_group = Some(String::new());
                }),
                Code::IllegalMessageGroup,
                "message_group",
            ),
            (
                Box::new(|m| {
                    m.system_properties.as_mut().unwrap().message_type = MessageType::Fifo as i32
                }),
                Code::IllegalMessageGroup,
                "message_group",
            ),
            (
                Box::new(|m| {
                    let system = m.system_properties.as_mut().unwrap();
                    system.message_type = MessageType::Transaction as i32;
                    system.message_group = Some("g".into());
                }),
                Code::MessagePropertyConflictWithType,
                "message_group",
            ),
            (
                Box::new(|m| {
                    let system = m.system_properties.as_mut().unwrap();
                    system.message_type = MessageType::Fifo as i32;
                    system.message_group = Some("g".into());
                    system.delivery_timestamp = Some(timestamp(NOW));
                }),
                Code::MessagePropertyConflictWithType,
                "delivery_timestamp",
            ),
            (
                Box::new(|m| m.system_properties = None),
                Code::BadRequest,
                "system_properties",
            ),
        ];
        for (mutate, code, field) in cases {
            let mut m = message();
            mutate(&mut m);
            let err = check(3, &grpc_field, m, &limits, NOW).unwrap_err();
            assert_eq!(err.code, code, "{}", err.message);
            assert!(
                err.message.contains("messages[3]") && err.message.contains(field),
                "{}",
                err.message
            );
        }
    }

    proptest::proptest! {
        /// Whatever a client sends, `check` answers with a result, never a panic, and an
        /// accepted message keeps its id.
        #[test]
        fn check_never_panics(
            id in ".{0,140}",
            tag in proptest::option::of(".{0,20}"),
            keys in proptest::collection::vec(".{0,10}", 0..4),
            props in proptest::collection::hash_map(".{0,12}", ".{0,40}", 0..8),
            body_len in 0usize..64,
            message_type in -2i32..6,
            seconds in proptest::num::i64::ANY,
            deliver in proptest::option::of((proptest::num::i64::ANY, proptest::num::i32::ANY)),
            group in proptest::option::of(".{0,70}"),
        ) {
            let message = v2::Message {
                topic: Some(Resource { resource_namespace: String::new(), name: "t".into() }),
                user_properties: props,
                system_properties: Some(SystemProperties {
                    message_id: id.clone(),
                    tag,
                    keys,
                    message_type,
                    born_timestamp: Some(prost_types::Timestamp { seconds, nanos: 0 }),
                    delivery_timestamp: deliver
                        .map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }),
                    message_group: group,
                    ..SystemProperties::default()
                }),
                body: vec![1; body_len].into(),
            };
            let limits = Limits { max_body_bytes: 32, ..Limits::default() };
            if let Ok(checked) = check(0, &grpc_field, message, &limits, NOW) {
                proptest::prop_assert_eq!(checked.message_id, id);
            }
        }

        /// The hand-written text forms are what `fmt` writes.
        #[test]
        fn hex_and_ip_text_match_fmt(value in proptest::num::u64::ANY, octets in proptest::array::uniform4(0u8..)) {
            let mut lower = String::new();
            push_hex(&mut lower, value, 1, HEX_LOWER);
            proptest::prop_assert_eq!(lower, format!("{value:x}"));
            let small = u32::try_from(value & 0xFFFF_FFFF).unwrap();
            proptest::prop_assert_eq!(hex_text(small, 1), format!("{small:X}"));
            proptest::prop_assert_eq!(hex_text(small, 8), format!("{small:08X}"));
            let ip = std::net::IpAddr::from(octets);
            let text = IpText::new(ip);
            proptest::prop_assert_eq!(text.as_str(), ip.to_string());
        }
    }

    #[test]
    fn each_kind_is_read_from_its_type_and_fields() {
        let with = |f: &dyn Fn(&mut SystemProperties)| {
            let mut m = message();
            f(m.system_properties.as_mut().unwrap());
            check(0, &grpc_field, m, &Limits::default(), NOW).unwrap()
        };
        let fifo = with(&|s| {
            s.message_type = MessageType::Unspecified as i32;
            s.message_group = Some("order-1".into());
        });
        assert_eq!(
            fifo.kind,
            Kind::Fifo {
                message_group: "order-1".into()
            }
        );
        assert_eq!(
            fifo.properties.as_ref().get(property::MESSAGE_GROUP),
            Some("order-1")
        );
        // Whole seconds from the Rust and Python clients; milliseconds round up, never early.
        let delay = with(&|s| {
            s.message_type = MessageType::Delay as i32;
            s.delivery_timestamp = Some(prost_types::Timestamp {
                seconds: NOW / 1000 + 5,
                nanos: 1,
            });
        });
        assert_eq!(
            delay.kind,
            Kind::Delay {
                deliver_at_ms: NOW + 5_001
            }
        );
        let txn = with(&|s| {
            s.message_type = MessageType::Transaction as i32;
            s.orphaned_transaction_recovery_duration =
                Some(ferrumq_protocol::duration_from_ms(2_000));
        });
        assert_eq!(
            txn.kind,
            Kind::Transaction {
                recovery_ms: Some(2_000)
            }
        );
    }

    #[test]
    fn durations_convert_both_ways() {
        assert_eq!(
            duration_ms(&ferrumq_protocol::duration_from_ms(12_345)),
            Some(12_345)
        );
        assert_eq!(
            duration_ms(&prost_types::Duration {
                seconds: -1,
                nanos: 0
            }),
            None
        );
        assert_eq!(timestamp(1_500).seconds, 1);
        assert_eq!(timestamp(1_500).nanos, 500_000_000);
    }

    #[test]
    fn body_digest_takes_each_clients_text_form() {
        // CRC32("m21") = 0x03E0D52A: a leading zero shows the padded and unpadded forms apart.
        let digest = |language| BodyDigest::for_language(language).of(b"m21");
        let crc32 = DigestType::Crc32;
        assert_eq!(digest(Some("JAVA")), Some((crc32, "3E0D52A".to_owned())));
        assert_eq!(digest(Some("PYTHON")), Some((crc32, "03E0D52A".to_owned())));
        assert_eq!(digest(Some("HTTP")), Some((crc32, "65066282".to_owned())));
        assert_eq!(digest(Some("RUST")), None);
        for other in [Some("GO"), Some("DOTNET"), Some("java"), Some("rust"), None] {
            let md5 = Some((
                DigestType::Md5,
                "AF533170E9968B9DE45AB0842B54A315".to_owned(),
            ));
            assert_eq!(digest(other), md5);
        }
    }

    /// Appends one record to a fresh store and reads it back.
    fn stored(
        dir: &tempfile::TempDir,
        message_type: StoredType,
        properties: &[(&str, &str)],
    ) -> StoredRecord {
        let options = ferrumq_storage::StoreOptions {
            segment_size_bytes: 1 << 20,
            ..ferrumq_storage::StoreOptions::default()
        };
        let store = ferrumq_storage::MessageStore::open(dir.path(), options).unwrap();
        let log = crate::log_writer::LogWriter::new(
            std::sync::Arc::new(store),
            crate::config::FlushPolicy::Sync,
        );
        let mut stored = Properties::default();
        for (key, value) in properties {
            stored.push(key, value).unwrap();
        }
        let appended = log
            .propose(&NewRecord {
                topic: "stored-topic",
                queue_id: 3,
                message_type,
                born_timestamp_ms: NOW - 1_500,
                born_host: "10.1.2.3:4567".parse().unwrap(),
                properties: stored.as_ref(),
                body: b"m21",
                term_index: TermIndex::default(),
            })
            .unwrap();
        log.store().read(appended.pos).unwrap()
    }

    #[test]
    fn a_delivered_record_becomes_the_message_its_properties_describe() {
        let dir = tempfile::tempdir().unwrap();
        let record = stored(
            &dir,
            StoredType::Fifo,
            &[
                (keys::MESSAGE_ID, "01AB"),
                (keys::TAG, "paid"),
                (keys::KEY, "order-1"),
                (keys::KEY, "order-2"),
                (property::BORN_HOST, "client-host"),
                (property::TRACE_CONTEXT, "trace"),
                (property::MESSAGE_GROUP, "group-7"),
                (property::DLQ_ORIGIN_TOPIC, "origin"),
                (property::DLQ_ORIGIN_MESSAGE_ID, "00FF"),
                (property::REAL_TOPIC, "orders"),
                (property::DELIVER_AT_MS, "1800000000500"),
                ("WAIT", "true"),
                ("region", "eu"),
                ("empty", ""),
            ],
        );
        let delivery = Delivery {
            receipt_handle: "handle",
            attempt: 2,
            invisible_ms: 30_250,
            store_host: "10.0.0.9:8081",
        };
        let digest = BodyDigest::Crc32PaddedHex;
        let wire = to_wire(&record, Some(delivery), "unused:1", digest).unwrap();
        let store_timestamp = record.view().store_timestamp_ms;
        let expected = v2::Message {
            topic: Some(Resource {
                resource_namespace: String::new(),
                name: "orders".into(),
            }),
            user_properties: HashMap::from([
                ("region".to_owned(), "eu".to_owned()),
                ("empty".to_owned(), String::new()),
            ]),
            system_properties: Some(SystemProperties {
                tag: Some("paid".into()),
                keys: vec!["order-1".into(), "order-2".into()],
                message_id: "01AB".into(),
                body_digest: Some(v2::Digest {
                    r#type: DigestType::Crc32 as i32,
                    checksum: "03E0D52A".into(),
                }),
                body_encoding: Encoding::Identity as i32,
                message_type: MessageType::Fifo as i32,
                born_timestamp: Some(timestamp(NOW - 1_500)),
                born_host: "client-host".into(),
                store_timestamp: Some(timestamp(store_timestamp)),
                store_host: "10.0.0.9:8081".into(),
                delivery_timestamp: Some(timestamp(1_800_000_000_500)),
                receipt_handle: Some("handle".into()),
                queue_id: 3,
                queue_offset: Some(0),
                invisible_duration: Some(ferrumq_protocol::duration_from_ms(30_250)),
                delivery_attempt: Some(2),
                message_group: Some("group-7".into()),
                trace_context: Some("trace".into()),
                orphaned_transaction_recovery_duration: None,
                dead_letter_queue: Some(v2::DeadLetterQueue {
                    topic: "origin".into(),
                    message_id: "00FF".into(),
                }),
            }),
            body: bytes::Bytes::from_static(b"m21"),
        };
        assert_eq!(wire, expected);
    }

    #[test]
    fn a_read_record_has_no_lease_and_its_born_address_as_host() {
        let dir = tempfile::tempdir().unwrap();
        let record = stored(&dir, StoredType::Normal, &[(keys::MESSAGE_ID, "01AB")]);
        let wire = to_wire(&record, None, "10.0.0.9:8081", BodyDigest::Md5).unwrap();
        let system = wire.system_properties.unwrap();
        assert_eq!(wire.topic.unwrap().name, "stored-topic");
        assert!(wire.user_properties.is_empty());
        assert_eq!(system.born_host, "10.1.2.3");
        assert_eq!(system.store_host, "10.0.0.9:8081");
        assert_eq!(system.message_type, MessageType::Normal as i32);
        assert_eq!((system.tag, system.keys.len()), (None, 0));
        assert_eq!(system.receipt_handle, None);
        assert_eq!(system.delivery_attempt, None);
        assert_eq!(system.invisible_duration, None);
        assert_eq!(system.delivery_timestamp, None);
        assert_eq!(system.dead_letter_queue, None);
        assert_eq!(
            system.body_digest.unwrap().checksum,
            "AF533170E9968B9DE45AB0842B54A315"
        );
    }
}
