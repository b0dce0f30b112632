//! The commit-log record: one message, framed with a magic, a length and a CRC32.
//!
//! The byte layout is specified in `storage/FORMAT.md`; this file is its only implementation.
//! Decoding checks the frame (magic, length, CRC) before it looks at any field, so a torn or
//! corrupt record is never half-parsed.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use crate::pos::{QueueOffset, TermIndex};

/// First four bytes of every record (`b"FQR1"`).
pub(crate) const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"FQR1");
/// Written where a segment ends because the next record did not fit (`b"FQE0"`).
pub(crate) const END_OF_SEGMENT_MAGIC: u32 = u32::from_le_bytes(*b"FQE0");
pub(crate) const RECORD_VERSION: u8 = 1;
/// Bytes before the topic.
pub const HEADER_LEN: usize = 88;
/// The CRC covers every byte from here to the end of the record.
const CRC_START: usize = 12;

/// Well-known property keys the storage layer reads (for the consume queue and the index).
pub mod keys {
    /// The message id; indexed for query by id.
    pub const MESSAGE_ID: &str = "UNIQ_KEY";
    /// The tag; its hash goes into the consume-queue entry for filtering.
    pub const TAG: &str = "TAGS";
    /// A message key; may repeat, each occurrence is indexed.
    pub const KEY: &str = "KEYS";
}

/// What kind of message a record holds. Stored in the record's type byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    Normal = 0,
    Fifo = 1,
    Delay = 2,
    TransactionHalf = 3,
    TransactionCommit = 4,
    TransactionRollback = 5,
    /// Internal bookkeeping written by the broker (op records, timer records).
    System = 6,
}

impl MessageType {
    fn from_byte(byte: u8) -> Option<MessageType> {
        Some(match byte {
            0 => MessageType::Normal,
            1 => MessageType::Fifo,
            2 => MessageType::Delay,
            3 => MessageType::TransactionHalf,
            4 => MessageType::TransactionCommit,
            5 => MessageType::TransactionRollback,
            6 => MessageType::System,
            _ => return None,
        })
    }
}

/// Message properties in their encoded form: `(u16 key length, key, u16 value length, value)`
/// repeated. Built once per message and copied into the log as is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    encoded: Vec<u8>,
}

impl Properties {
    pub const fn new() -> Properties {
        Properties {
            encoded: Vec::new(),
        }
    }

    /// Empty, with room for `bytes` of encoded properties.
    pub fn with_capacity(bytes: usize) -> Properties {
        Properties {
            encoded: Vec::with_capacity(bytes),
        }
    }

    /// Adds a property. Keys and values are at most 65,535 bytes each.
    pub fn push(&mut self, key: &str, value: &str) -> Result<(), crate::Error> {
        for (field, text) in [("property key", key), ("property value", value)] {
            if text.len() > usize::from(u16::MAX) {
                return Err(crate::Error::TooLarge {
                    field,
                    actual: text.len(),
                    limit: usize::from(u16::MAX),
                });
            }
        }
        for text in [key, value] {
            let len = u16::try_from(text.len()).unwrap_or(u16::MAX);
            self.encoded.extend_from_slice(&len.to_le_bytes());
            self.encoded.extend_from_slice(text.as_bytes());
        }
        Ok(())
    }

    pub fn with(mut self, key: &str, value: &str) -> Result<Properties, crate::Error> {
        self.push(key, value)?;
        Ok(self)
    }

    pub fn encoded_len(&self) -> usize {
        self.encoded.len()
    }

    pub fn as_ref(&self) -> PropertiesRef<'_> {
        PropertiesRef {
            encoded: &self.encoded,
        }
    }
}

/// A borrowed, already validated property list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PropertiesRef<'a> {
    encoded: &'a [u8],
}

impl<'a> PropertiesRef<'a> {
    /// Checks the encoding: every length in bounds, every string UTF-8.
    fn parse(encoded: &'a [u8]) -> Option<PropertiesRef<'a>> {
        let mut rest = encoded;
        while !rest.is_empty() {
            for _ in 0..2 {
                let (bytes, tail) = split_string(rest)?;
                text(bytes)?;
                rest = tail;
            }
        }
        Some(PropertiesRef { encoded })
    }

    pub fn iter(&self) -> PropertyIter<'a> {
        PropertyIter {
            bytes: self.iter_bytes(),
        }
    }

    /// The keys and values as bytes, not checked again as UTF-8: for the dispatcher, which
    /// only hashes and compares them.
    pub(crate) fn iter_bytes(&self) -> PropertyBytes<'a> {
        PropertyBytes { rest: self.encoded }
    }

    /// The first value of `key`.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    pub fn encoded(&self) -> &'a [u8] {
        self.encoded
    }

    pub fn to_owned(&self) -> Properties {
        Properties {
            encoded: self.encoded.to_vec(),
        }
    }
}

pub struct PropertyIter<'a> {
    bytes: PropertyBytes<'a>,
}

impl<'a> Iterator for PropertyIter<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<(&'a str, &'a str)> {
        // The bytes were validated by `PropertiesRef::parse` or built by `Properties::push`.
        let (key, value) = self.bytes.next()?;
        Some((text(key)?, text(value)?))
    }
}

/// `bytes` as a string, if they are UTF-8. Topics, keys and values are nearly always ASCII,
/// which `is_ascii` checks a word at a time; `from_utf8` goes byte by byte up to a word
/// boundary and again after the last whole block, most of a short string.
fn text(bytes: &[u8]) -> Option<&str> {
    if bytes.is_ascii() {
        // SAFETY: ASCII is UTF-8.
        #[allow(unsafe_code)]
        return Some(unsafe { std::str::from_utf8_unchecked(bytes) });
    }
    std::str::from_utf8(bytes).ok()
}

pub(crate) struct PropertyBytes<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for PropertyBytes<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<(&'a [u8], &'a [u8])> {
        let (key, rest) = split_string(self.rest)?;
        let (value, rest) = split_string(rest)?;
        self.rest = rest;
        Some((key, value))
    }
}

fn split_string(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let len_bytes: [u8; 2] = buf.get(..2)?.try_into().ok()?;
    let len = usize::from(u16::from_le_bytes(len_bytes));
    let text = buf.get(2..2 + len)?;
    Some((text, &buf[2 + len..]))
}

/// A message to append. The log assigns the queue offset and the store timestamp.
#[derive(Debug, Clone, Copy)]
pub struct NewRecord<'a> {
    pub topic: &'a str,
    pub queue_id: u32,
    pub message_type: MessageType,
    pub born_timestamp_ms: i64,
    pub born_host: SocketAddr,
    pub properties: PropertiesRef<'a>,
    pub body: &'a [u8],
    pub term_index: TermIndex,
}

impl NewRecord<'_> {
    /// The encoded size, or which field breaks the format's limits.
    pub fn encoded_len(&self) -> Result<usize, crate::Error> {
        let fields = [
            ("topic", self.topic.len(), usize::from(u16::MAX)),
            ("properties", self.properties.encoded.len(), MAX_FIELD_LEN),
            ("body", self.body.len(), MAX_FIELD_LEN),
        ];
        for (field, actual, limit) in fields {
            if actual > limit {
                return Err(crate::Error::TooLarge {
                    field,
                    actual,
                    limit,
                });
            }
        }
        Ok(HEADER_LEN + self.topic.len() + self.properties.encoded.len() + self.body.len())
    }
}

/// No single field may exceed 1 GiB, so a record length always fits a `u32`.
const MAX_FIELD_LEN: usize = 1 << 30;

/// Writes `record` into `dst`, which must be exactly `record.encoded_len()` bytes.
pub(crate) fn encode_into(
    record: &NewRecord<'_>,
    queue_offset: QueueOffset,
    store_timestamp_ms: i64,
    dst: &mut [u8],
) {
    let (header, rest) = dst.split_at_mut(HEADER_LEN);
    let (topic, rest) = rest.split_at_mut(record.topic.len());
    let (properties, body) = rest.split_at_mut(record.properties.encoded.len());
    topic.copy_from_slice(record.topic.as_bytes());
    properties.copy_from_slice(record.properties.encoded);
    body.copy_from_slice(record.body);

    let (addr, port) = host_bytes(record.born_host);
    put_u32(header, 0, RECORD_MAGIC);
    put_u32(header, 4, len_u32(dst_len(record)));
    header[12] = RECORD_VERSION;
    header[13] = record.message_type as u8;
    header[14..16].copy_from_slice(&len_u16(record.topic.len()).to_le_bytes());
    put_u32(header, 16, record.queue_id);
    put_u32(header, 20, len_u32(record.properties.encoded.len()));
    put_u32(header, 24, len_u32(record.body.len()));
    header[28..30].copy_from_slice(&port.to_le_bytes());
    header[30..32].fill(0);
    put_u64(header, 32, queue_offset.0);
    put_u64(header, 40, record.term_index.term);
    put_u64(header, 48, record.term_index.index);
    put_u64(header, 56, record.born_timestamp_ms.cast_unsigned());
    put_u64(header, 64, store_timestamp_ms.cast_unsigned());
    header[72..88].copy_from_slice(&addr);
    let crc = crc32fast::hash(&dst[CRC_START..]);
    put_u32(dst, 8, crc);
}

fn dst_len(record: &NewRecord<'_>) -> usize {
    HEADER_LEN + record.topic.len() + record.properties.encoded.len() + record.body.len()
}

// Lengths were checked by `NewRecord::encoded_len` before encoding.
fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}
fn len_u16(len: usize) -> u16 {
    u16::try_from(len).unwrap_or(u16::MAX)
}

fn host_bytes(host: SocketAddr) -> ([u8; 16], u16) {
    let v6 = match host.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    (v6.octets(), host.port())
}

fn put_u32(buf: &mut [u8], at: usize, value: u32) {
    buf[at..at + 4].copy_from_slice(&value.to_le_bytes());
}
fn put_u64(buf: &mut [u8], at: usize, value: u64) {
    buf[at..at + 8].copy_from_slice(&value.to_le_bytes());
}
pub(crate) fn get_u32(buf: &[u8], at: usize) -> u32 {
    let mut bytes = [0u8; 4];
    bytes.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(bytes)
}
pub(crate) fn get_u64(buf: &[u8], at: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(bytes)
}

/// Why bytes at a position are not a valid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The segment ends here; the next record starts in the next segment.
    EndOfSegment,
    /// Fewer bytes than the header or the record's length says.
    Truncated,
    /// Neither a record nor an end-of-segment marker starts here (zeros: never written).
    BadMagic,
    BadVersion,
    /// The stored length is smaller than the header or disagrees with the field lengths.
    BadLength,
    BadChecksum,
    /// The frame is intact but a field is malformed (an unknown type, a non-UTF-8 topic).
    BadField(&'static str),
}

impl DecodeError {
    pub fn reason(self) -> &'static str {
        match self {
            DecodeError::EndOfSegment => "end of segment",
            DecodeError::Truncated => "record cut short",
            DecodeError::BadMagic => "no record magic",
            DecodeError::BadVersion => "unknown record version",
            DecodeError::BadLength => "record length disagrees with its fields",
            DecodeError::BadChecksum => "CRC mismatch",
            DecodeError::BadField(field) => field,
        }
    }
}

/// A record read in place from the log; every slice borrows the mapped segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordView<'a> {
    pub len: u32,
    pub message_type: MessageType,
    pub topic: &'a str,
    pub queue_id: u32,
    pub queue_offset: QueueOffset,
    pub term_index: TermIndex,
    pub born_timestamp_ms: i64,
    pub store_timestamp_ms: i64,
    pub born_host: SocketAddr,
    pub properties: PropertiesRef<'a>,
    pub body: &'a [u8],
}

impl<'a> RecordView<'a> {
    /// Decodes the record at the start of `buf` (which may hold more after it).
    pub fn decode(buf: &'a [u8]) -> Result<RecordView<'a>, DecodeError> {
        let len = frame_len(buf)?;
        RecordView::decode_fields(&buf[..len])
    }

    /// Decodes the fields of a record whose frame (magic, length, CRC) was already checked.
    pub(crate) fn decode_fields(record: &'a [u8]) -> Result<RecordView<'a>, DecodeError> {
        let view = RecordView::decode_layout(record)?;
        PropertiesRef::parse(view.properties.encoded)
            .ok_or(DecodeError::BadField("malformed properties"))?;
        Ok(view)
    }

    /// [`decode_fields`](Self::decode_fields) without checking the properties' encoding, for
    /// a record that `decode_fields` accepted before: walking them again was a visible part
    /// of every dispatched and delivered message.
    pub(crate) fn decode_checked_fields(record: &'a [u8]) -> Result<RecordView<'a>, DecodeError> {
        RecordView::decode_layout(record)
    }

    /// Everything but the properties' encoding: version, lengths, type, a UTF-8 topic.
    fn decode_layout(record: &'a [u8]) -> Result<RecordView<'a>, DecodeError> {
        let len = record.len();
        if record[12] != RECORD_VERSION {
            return Err(DecodeError::BadVersion);
        }
        let topic_len = usize::from(u16::from_le_bytes([record[14], record[15]]));
        let properties_len = get_u32(record, 20) as usize;
        let body_len = get_u32(record, 24) as usize;
        if HEADER_LEN
            .checked_add(topic_len)
            .and_then(|n| n.checked_add(properties_len))
            .and_then(|n| n.checked_add(body_len))
            != Some(len)
        {
            return Err(DecodeError::BadLength);
        }
        let message_type =
            MessageType::from_byte(record[13]).ok_or(DecodeError::BadField("message type"))?;
        let topic_end = HEADER_LEN + topic_len;
        let properties_end = topic_end + properties_len;
        let topic = text(&record[HEADER_LEN..topic_end])
            .ok_or(DecodeError::BadField("topic is not UTF-8"))?;
        let properties = PropertiesRef {
            encoded: &record[topic_end..properties_end],
        };
        let mut addr = [0u8; 16];
        addr.copy_from_slice(&record[72..88]);
        let v6 = Ipv6Addr::from(addr);
        let ip = v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4);
        Ok(RecordView {
            len: get_u32(record, 4),
            message_type,
            topic,
            queue_id: get_u32(record, 16),
            queue_offset: QueueOffset(get_u64(record, 32)),
            term_index: TermIndex {
                term: get_u64(record, 40),
                index: get_u64(record, 48),
            },
            born_timestamp_ms: get_u64(record, 56).cast_signed(),
            store_timestamp_ms: get_u64(record, 64).cast_signed(),
            born_host: SocketAddr::new(ip, u16::from_le_bytes([record[28], record[29]])),
            properties,
            body: &record[properties_end..],
        })
    }
}

/// Checks magic, length and CRC; returns the record's length.
pub(crate) fn frame_len(buf: &[u8]) -> Result<usize, DecodeError> {
    let len = frame_len_unchecked_crc(buf)?;
    if crc32fast::hash(&buf[CRC_START..len]) != get_u32(buf, 8) {
        return Err(DecodeError::BadChecksum);
    }
    Ok(len)
}

/// Checks magic and length only, for a record this process wrote or recovery already checked.
pub(crate) fn frame_len_unchecked_crc(buf: &[u8]) -> Result<usize, DecodeError> {
    if buf.len() < 4 {
        return Err(DecodeError::Truncated);
    }
    match get_u32(buf, 0) {
        RECORD_MAGIC => {}
        END_OF_SEGMENT_MAGIC => return Err(DecodeError::EndOfSegment),
        _ => return Err(DecodeError::BadMagic),
    }
    if buf.len() < HEADER_LEN {
        return Err(DecodeError::Truncated);
    }
    let len = get_u32(buf, 4) as usize;
    if len < HEADER_LEN {
        return Err(DecodeError::BadLength);
    }
    if buf.len() < len {
        return Err(DecodeError::Truncated);
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_read_as_bytes_are_the_same_pairs_in_the_same_order() {
        let properties = Properties::default()
            .with("TAGS", "paid")
            .and_then(|p| p.with("KEYS", "order-1"))
            .and_then(|p| p.with("KEYS", "client-7"))
            .and_then(|p| p.with("TAGS", "second"))
            .unwrap();
        let as_text: Vec<(&[u8], &[u8])> = properties
            .as_ref()
            .iter()
            .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
            .collect();
        let as_bytes: Vec<(&[u8], &[u8])> = properties.as_ref().iter_bytes().collect();
        assert_eq!(as_bytes, as_text);
        assert_eq!(as_bytes.len(), 4);
    }

    fn sample<'a>(properties: &'a Properties, body: &'a [u8]) -> NewRecord<'a> {
        NewRecord {
            topic: "orders",
            queue_id: 3,
            message_type: MessageType::Fifo,
            born_timestamp_ms: 1_700_000_000_123,
            born_host: "10.1.2.3:4567".parse().unwrap(),
            properties: properties.as_ref(),
            body,
            term_index: TermIndex { term: 2, index: 9 },
        }
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let props = Properties::new()
            .with(keys::TAG, "paid")
            .unwrap()
            .with(keys::KEY, "order-1")
            .unwrap();
        let record = sample(&props, b"hello");
        let mut buf = vec![0u8; record.encoded_len().unwrap()];
        encode_into(&record, QueueOffset(42), 1_700_000_000_999, &mut buf);
        let view = RecordView::decode(&buf).unwrap();
        assert_eq!(view.topic, "orders");
        assert_eq!(view.queue_id, 3);
        assert_eq!(view.queue_offset, QueueOffset(42));
        assert_eq!(view.message_type, MessageType::Fifo);
        assert_eq!(view.born_host, record.born_host);
        assert_eq!(view.store_timestamp_ms, 1_700_000_000_999);
        assert_eq!(view.term_index, TermIndex { term: 2, index: 9 });
        assert_eq!(view.properties.get(keys::TAG), Some("paid"));
        assert_eq!(view.body, b"hello");
        assert_eq!(view.len as usize, buf.len());
    }

    #[test]
    fn strings_are_read_as_utf8_whether_or_not_they_are_ascii() {
        for ok in [
            "",
            "TAGS",
            "a-forty-byte-long-key-that-is-plain-ascii",
            "zürich",
            "€",
        ] {
            assert_eq!(text(ok.as_bytes()), Some(ok));
        }
        for bad in [&b"\xff"[..], b"0123456789abcdef\xc3", b"\xc3(", b"ok\x80ok"] {
            assert_eq!(text(bad), None, "{bad:?}");
        }
        let props = Properties::new().with("city", "zürich").unwrap();
        let record = NewRecord {
            topic: "bestellungen-ü",
            ..sample(&props, b"body")
        };
        let mut buf = vec![0u8; record.encoded_len().unwrap()];
        encode_into(&record, QueueOffset(0), 1, &mut buf);
        let view = RecordView::decode(&buf).unwrap();
        assert_eq!(view.topic, "bestellungen-ü");
        assert_eq!(view.properties.get("city"), Some("zürich"));
        // A value that is not UTF-8 under a valid CRC is refused all the same.
        let at = buf.windows(2).position(|w| w == "ü".as_bytes()).unwrap();
        let at = at
            + buf[at + 2..]
                .windows(2)
                .position(|w| w == "ü".as_bytes())
                .unwrap()
            + 2;
        buf[at] = 0xff;
        let crc = crc32fast::hash(&buf[12..]);
        buf[8..12].copy_from_slice(&crc.to_le_bytes());
        assert!(RecordView::decode(&buf).is_err());
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let props = Properties::new().with("a", "b").unwrap();
        let record = sample(&props, b"payload");
        let mut buf = vec![0u8; record.encoded_len().unwrap()];
        encode_into(&record, QueueOffset(0), 1, &mut buf);
        for bit in 0..buf.len() * 8 {
            let mut bad = buf.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                RecordView::decode(&bad).is_err(),
                "bit {bit} went unnoticed"
            );
        }
    }

    #[test]
    fn oversized_property_is_refused() {
        let long = "x".repeat(70_000);
        assert!(matches!(
            Properties::new().push("k", &long),
            Err(crate::Error::TooLarge {
                field: "property value",
                ..
            })
        ));
    }
}
