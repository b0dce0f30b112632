//! Replies that stream messages the broker encoded itself.
//!
//! A receive or a pull streams back up to a thousand stored messages. Building a typed
//! [`v2::Message`] for each (a dozen `String`s and nested structs) only for prost to encode
//! and drop it was two fifths of the broker's work per delivered message. So the broker
//! writes each message's protobuf bytes straight from the stored record with a
//! [`MessageWriter`], and the servers of `ReceiveMessage` and `PullMessage` stream
//! [`Frame`]s, which put those bytes in the reply's `message` field. The bytes on the wire
//! are what the typed reply would encode to; clients decode the typed replies.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
use prost::{DecodeError, Message as _};

use crate::v2;

/// The protobuf encoding of one [`v2::Message`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncodedMessage(Bytes);

impl EncodedMessage {
    /// Writes one message with `write` into `out`, a scratch buffer, and takes it out. What
    /// `out` has room for beyond it is left for the next message.
    pub fn write(out: &mut BytesMut, write: impl FnOnce(&mut MessageWriter<'_>)) -> Self {
        out.clear();
        write(&mut MessageWriter { out });
        EncodedMessage(out.split().freeze())
    }

    /// The typed message.
    pub fn decode(&self) -> Result<v2::Message, DecodeError> {
        v2::Message::decode(self.0.clone())
    }

    /// The encoded bytes.
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }
}

/// The field both replies' `content` oneof carries a message in.
const MESSAGE_FIELD: u32 = 2;

/// A streamed reply as a server sends it: typed, or a message already encoded. The typed
/// reply is boxed: it is the rare one, and a stream of 512 messages moves every frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame<T> {
    Response(Box<T>),
    Message(EncodedMessage),
}

/// What a `ReceiveMessage` server streams.
pub type ReceiveFrame = Frame<v2::ReceiveMessageResponse>;
/// What a `PullMessage` server streams.
pub type PullFrame = Frame<v2::PullMessageResponse>;

impl<T: Default> Default for Frame<T> {
    fn default() -> Self {
        Frame::Response(Box::default())
    }
}

impl<T> Frame<T> {
    /// A typed reply.
    pub fn response(response: T) -> Self {
        Frame::Response(Box::new(response))
    }
}

impl<T> From<EncodedMessage> for Frame<T> {
    fn from(message: EncodedMessage) -> Self {
        Frame::Message(message)
    }
}

impl<T: prost::Message + Default> prost::Message for Frame<T> {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        match self {
            Frame::Response(response) => response.encode_raw(buf),
            Frame::Message(EncodedMessage(bytes)) => {
                encode_key(MESSAGE_FIELD, WireType::LengthDelimited, buf);
                encode_varint(bytes.len() as u64, buf);
                buf.put_slice(bytes);
            }
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), DecodeError> {
        if let Frame::Message(_) = self {
            *self = Frame::response(T::decode(self.encode_to_vec().as_slice())?);
        }
        match self {
            Frame::Response(response) => response.merge_field(tag, wire_type, buf, ctx),
            Frame::Message(_) => Ok(()),
        }
    }

    fn encoded_len(&self) -> usize {
        match self {
            Frame::Response(response) => response.encoded_len(),
            Frame::Message(EncodedMessage(bytes)) => {
                key_len(MESSAGE_FIELD) + encoded_len_varint(bytes.len() as u64) + bytes.len()
            }
        }
    }

    fn clear(&mut self) {
        *self = Frame::default();
    }
}

/// Writes the fields of a [`v2::Message`] as protobuf, from parts borrowed elsewhere.
/// Fields may come in any order; a field left out decodes as its default.
pub struct MessageWriter<'a> {
    out: &'a mut BytesMut,
}

impl MessageWriter<'_> {
    pub fn topic(&mut self, name: &str) {
        header(self.out, 1, string_len(2, name));
        string(self.out, 2, name);
    }

    pub fn user_property(&mut self, key: &str, value: &str) {
        two_strings(self.out, 2, key, value);
    }

    pub fn system_properties(&mut self, write: impl FnOnce(&mut SystemPropertiesWriter<'_>)) {
        nested(self.out, 3, |out| {
            write(&mut SystemPropertiesWriter { out })
        });
    }

    pub fn body(&mut self, body: &[u8]) {
        if !body.is_empty() {
            length_delimited(self.out, 4, body);
        }
    }
}

/// Writes the fields of a [`v2::SystemProperties`]; see [`MessageWriter`].
pub struct SystemPropertiesWriter<'a> {
    out: &'a mut BytesMut,
}

impl SystemPropertiesWriter<'_> {
    pub fn tag(&mut self, tag: &str) {
        length_delimited(self.out, 1, tag.as_bytes());
    }

    /// One of the keys; call once for each.
    pub fn key(&mut self, key: &str) {
        length_delimited(self.out, 2, key.as_bytes());
    }

    pub fn message_id(&mut self, id: &str) {
        string(self.out, 3, id);
    }

    pub fn body_digest(&mut self, r#type: v2::DigestType, checksum: &str) {
        let r#type = i64::from(r#type as i32);
        header(self.out, 4, int64_len(1, r#type) + string_len(2, checksum));
        int64(self.out, 1, r#type);
        string(self.out, 2, checksum);
    }

    pub fn body_encoding(&mut self, encoding: v2::Encoding) {
        int32(self.out, 5, encoding as i32);
    }

    pub fn message_type(&mut self, message_type: v2::MessageType) {
        int32(self.out, 6, message_type as i32);
    }

    pub fn born_timestamp(&mut self, ms: i64) {
        timestamp(self.out, 7, ms);
    }

    pub fn born_host(&mut self, host: &str) {
        string(self.out, 8, host);
    }

    pub fn store_timestamp(&mut self, ms: i64) {
        timestamp(self.out, 9, ms);
    }

    pub fn store_host(&mut self, host: &str) {
        string(self.out, 10, host);
    }

    pub fn delivery_timestamp(&mut self, ms: i64) {
        timestamp(self.out, 11, ms);
    }

    pub fn receipt_handle(&mut self, handle: &str) {
        length_delimited(self.out, 12, handle.as_bytes());
    }

    pub fn queue_id(&mut self, queue_id: i32) {
        int32(self.out, 13, queue_id);
    }

    pub fn queue_offset(&mut self, offset: i64) {
        varint(self.out, 14, offset as u64);
    }

    pub fn invisible_duration(&mut self, ms: u64) {
        let duration = crate::duration_from_ms(ms);
        seconds_and_nanos(self.out, 15, duration.seconds, duration.nanos);
    }

    pub fn delivery_attempt(&mut self, attempt: i32) {
        varint(self.out, 16, i64::from(attempt) as u64);
    }

    pub fn message_group(&mut self, group: &str) {
        length_delimited(self.out, 17, group.as_bytes());
    }

    pub fn trace_context(&mut self, context: &str) {
        length_delimited(self.out, 18, context.as_bytes());
    }

    pub fn dead_letter_queue(&mut self, topic: &str, message_id: &str) {
        two_strings(self.out, 20, topic, message_id);
    }
}

// Proto3 leaves a field at its default out; `optional` and repeated fields and nested
// messages are written whatever they hold. Negative integers are varints of their 64-bit
// two's complement, as protobuf specifies for int32 and int64.

fn varint(out: &mut BytesMut, field: u32, value: u64) {
    encode_key(field, WireType::Varint, out);
    encode_varint(value, out);
}

fn int32(out: &mut BytesMut, field: u32, value: i32) {
    int64(out, field, i64::from(value));
}

fn int64(out: &mut BytesMut, field: u32, value: i64) {
    if value != 0 {
        varint(out, field, value as u64);
    }
}

fn int64_len(field: u32, value: i64) -> usize {
    match value {
        0 => 0,
        _ => key_len(field) + encoded_len_varint(value as u64),
    }
}

fn string(out: &mut BytesMut, field: u32, value: &str) {
    if !value.is_empty() {
        length_delimited(out, field, value.as_bytes());
    }
}

fn string_len(field: u32, value: &str) -> usize {
    match value.len() {
        0 => 0,
        len => key_len(field) + encoded_len_varint(len as u64) + len,
    }
}

/// The key and length of a nested message of `len` bytes.
fn header(out: &mut BytesMut, field: u32, len: usize) {
    encode_key(field, WireType::LengthDelimited, out);
    encode_varint(len as u64, out);
}

/// A nested message of two strings, fields 1 and 2 (a map entry, a dead letter queue).
fn two_strings(out: &mut BytesMut, field: u32, first: &str, second: &str) {
    header(out, field, string_len(1, first) + string_len(2, second));
    string(out, 1, first);
    string(out, 2, second);
}

/// A `Timestamp` or a `Duration`. Its fields are put together on the stack and then into
/// `out` in one piece: every message has three of them, six varints in all, and putting
/// each of their bytes into a `BytesMut` checks its capacity.
fn seconds_and_nanos(out: &mut BytesMut, field: u32, seconds: i64, nanos: i32) {
    // Two keys of one byte and two varints of at most ten.
    const CONTENT_MAX: usize = 22;
    let mut content = [0u8; CONTENT_MAX];
    let mut rest = &mut content[..];
    for (number, value) in [(1u8, seconds), (2, i64::from(nanos))] {
        if value != 0 {
            rest.put_u8(number << 3);
            encode_varint(value as u64, &mut rest);
        }
    }
    let len = CONTENT_MAX - rest.len();
    header(out, field, len);
    out.extend_from_slice(&content[..len]);
}

fn length_delimited(out: &mut BytesMut, field: u32, value: &[u8]) {
    encode_key(field, WireType::LengthDelimited, out);
    encode_varint(value.len() as u64, out);
    out.put_slice(value);
}

fn timestamp(out: &mut BytesMut, field: u32, ms: i64) {
    let nanos = (ms.rem_euclid(1000) * 1_000_000) as i32;
    seconds_and_nanos(out, field, ms.div_euclid(1000), nanos);
}

/// The longest varint a length can take.
const MAX_LENGTH_BYTES: usize = 5;

/// A nested message whose length is not known before it is written: its content is written
/// after room for the longest length, then moved back to follow the length it turned out to
/// have.
fn nested(out: &mut BytesMut, field: u32, write: impl FnOnce(&mut BytesMut)) {
    encode_key(field, WireType::LengthDelimited, out);
    let length_at = out.len();
    out.put_bytes(0, MAX_LENGTH_BYTES);
    let content_at = out.len();
    write(out);
    let length = out.len() - content_at;
    let mut prefix = [0; MAX_LENGTH_BYTES];
    let mut space = &mut prefix[..];
    encode_varint(length as u64, &mut space);
    let used = MAX_LENGTH_BYTES - space.len();
    out[length_at..length_at + used].copy_from_slice(&prefix[..used]);
    out.copy_within(content_at.., length_at + used);
    out.truncate(length_at + used + length);
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::v2::{
        DeadLetterQueue, Digest, DigestType, Encoding, MessageType, Resource, SystemProperties,
        pull_message_response, receive_message_response,
    };

    fn timestamp_of(ms: i64) -> prost_types::Timestamp {
        prost_types::Timestamp {
            seconds: ms.div_euclid(1000),
            nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
        }
    }

    /// Every field set, the long user property needing a three-byte length.
    pub(crate) fn typed(long_value: &str) -> v2::Message {
        v2::Message {
            topic: Some(Resource {
                resource_namespace: String::new(),
                name: "orders".into(),
            }),
            user_properties: HashMap::from([("region".to_owned(), long_value.to_owned())]),
            system_properties: Some(SystemProperties {
                tag: Some(String::new()),
                keys: vec!["k1".into(), String::new()],
                message_id: "01AB".into(),
                body_digest: Some(Digest {
                    r#type: DigestType::Crc32 as i32,
                    checksum: "0000ABCD".into(),
                }),
                body_encoding: Encoding::Identity as i32,
                message_type: MessageType::Fifo as i32,
                born_timestamp: Some(timestamp_of(-1_500)),
                born_host: "10.0.0.1".into(),
                store_timestamp: Some(timestamp_of(1_700_000_000_123)),
                store_host: "127.0.0.1:8081".into(),
                delivery_timestamp: Some(timestamp_of(0)),
                receipt_handle: Some("handle".into()),
                queue_id: -3,
                queue_offset: Some(0),
                invisible_duration: Some(crate::duration_from_ms(30_250)),
                delivery_attempt: Some(2),
                message_group: Some("g".into()),
                trace_context: Some("t".into()),
                orphaned_transaction_recovery_duration: None,
                dead_letter_queue: Some(DeadLetterQueue {
                    topic: "orders".into(),
                    message_id: "00FF".into(),
                }),
            }),
            body: Bytes::from_static(b"body"),
        }
    }

    fn written(long_value: &str) -> EncodedMessage {
        let mut out = BytesMut::new();
        EncodedMessage::write(&mut out, |m| {
            m.topic("orders");
            m.user_property("region", long_value);
            m.system_properties(|s| {
                s.tag("");
                s.key("k1");
                s.key("");
                s.message_id("01AB");
                s.body_digest(DigestType::Crc32, "0000ABCD");
                s.body_encoding(Encoding::Identity);
                s.message_type(MessageType::Fifo);
                s.born_timestamp(-1_500);
                s.born_host("10.0.0.1");
                s.store_timestamp(1_700_000_000_123);
                s.store_host("127.0.0.1:8081");
                s.delivery_timestamp(0);
                s.receipt_handle("handle");
                s.queue_id(-3);
                s.queue_offset(0);
                s.invisible_duration(30_250);
                s.delivery_attempt(2);
                s.message_group("g");
                s.trace_context("t");
                s.dead_letter_queue("orders", "00FF");
            });
            m.body(b"body");
        })
    }

    proptest::proptest! {
        #[test]
        fn timestamps_and_durations_are_what_prost_encodes(ms: i64, duration_ms: u64) {
            let mut out = BytesMut::new();
            let message = EncodedMessage::write(&mut out, |m| {
                m.system_properties(|s| {
                    s.born_timestamp(ms);
                    s.invisible_duration(duration_ms);
                })
            });
            let typed = v2::Message {
                system_properties: Some(SystemProperties {
                    born_timestamp: Some(timestamp_of(ms)),
                    invisible_duration: Some(crate::duration_from_ms(duration_ms)),
                    ..SystemProperties::default()
                }),
                ..v2::Message::default()
            };
            proptest::prop_assert_eq!(&message.as_bytes()[..], &typed.encode_to_vec()[..]);
        }
    }

    #[test]
    fn a_message_written_field_by_field_is_what_prost_encodes() {
        for long_value in ["", "eu", &"x".repeat(20_000)] {
            let message = written(long_value);
            assert_eq!(
                message.as_bytes()[..],
                typed(long_value).encode_to_vec()[..]
            );
            assert_eq!(message.decode(), Ok(typed(long_value)));
        }
    }

    #[test]
    fn writing_takes_each_message_out_of_the_buffer() {
        let mut out = BytesMut::with_capacity(1 << 10);
        let first = EncodedMessage::write(&mut out, |m| m.topic("a"));
        let second = EncodedMessage::write(&mut out, |m| m.body(b"b"));
        assert!(out.is_empty() && out.capacity() > 0);
        assert_eq!(first.decode().unwrap().topic.unwrap().name, "a");
        assert_eq!(second.decode().unwrap().body, Bytes::from_static(b"b"));
    }

    #[test]
    fn a_frame_is_the_bytes_of_the_typed_reply_and_decodes_to_it() {
        let message = written("eu");
        let receive = v2::ReceiveMessageResponse {
            content: Some(receive_message_response::Content::Message(typed("eu"))),
        };
        let frame = ReceiveFrame::from(message.clone());
        assert_eq!(frame.encode_to_vec(), receive.encode_to_vec());
        assert_eq!(frame.encoded_len(), receive.encoded_len());
        assert_eq!(
            ReceiveFrame::decode(receive.encode_to_vec().as_slice()),
            Ok(Frame::response(receive.clone()))
        );

        let pull = v2::PullMessageResponse {
            content: Some(pull_message_response::Content::Message(typed("eu"))),
        };
        let mut frame = PullFrame::from(message);
        assert_eq!(frame.encode_to_vec(), pull.encode_to_vec());
        // Merging into a frame that holds a message first turns it into the typed reply.
        let next = v2::PullMessageResponse {
            content: Some(pull_message_response::Content::NextOffset(7)),
        };
        frame.merge(next.encode_to_vec().as_slice()).unwrap();
        assert_eq!(frame, Frame::response(next));
    }
}
