//! Receipt handles: what a consumer echoes back to ack a message or change its lease.
//!
//! A handle names the queue, the queue offset and the lease epoch, and carries a CRC32 over
//! them and the topic, so a handle that was mangled, or sent with another topic, is refused.
//! The epoch changes at every delivery and every lease change. Every handle of the current
//! delivery acts on the message, the first and each one a lease change returned; a handle
//! from an earlier delivery no longer does.

use ferrumq_protocol::v2::Code;

use crate::error::{ApiError, ApiResult};
use crate::message::{HEX_LOWER, push_hex};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiptHandle {
    pub queue_id: u32,
    pub offset: u64,
    pub epoch: u64,
}

const VERSION: &str = "f1";

impl ReceiptHandle {
    pub fn encode(&self, topic: &str) -> String {
        let mut text = String::with_capacity(48);
        self.encode_into(topic, &mut text);
        text
    }

    /// [`encode`](Self::encode) into `text`, replacing what it held.
    pub fn encode_into(&self, topic: &str, text: &mut String) {
        text.clear();
        text.push_str(VERSION);
        for value in [u64::from(self.queue_id), self.offset, self.epoch] {
            text.push('.');
            push_hex(text, value, 1, HEX_LOWER);
        }
        text.push('.');
        push_hex(text, u64::from(self.checksum(topic)), 8, HEX_LOWER);
    }

    /// Parses a handle received for `topic`; `field` names it in the error.
    pub fn decode(
        text: &str,
        topic: &str,
        field: &dyn std::fmt::Display,
    ) -> ApiResult<ReceiptHandle> {
        let invalid = |why: &str| {
            ApiError::new(
                Code::InvalidReceiptHandle,
                format!(
                    "{field} {:?} is not a receipt handle of topic {topic:?}: {why}",
                    truncate(text)
                ),
            )
        };
        // Split by hand: `str::split` was a visible part of every acked message.
        let mut parts = text.as_bytes().split(|&byte| byte == b'.');
        if parts.next() != Some(VERSION.as_bytes()) {
            return Err(invalid("unknown format"));
        }
        let mut number = |what: &str| {
            parts
                .next()
                .and_then(hex_field)
                .ok_or_else(|| invalid(&format!("bad {what}")))
        };
        let queue_id = u32::try_from(number("queue id")?).map_err(|_| invalid("bad queue id"))?;
        let offset = number("offset")?;
        let epoch = number("epoch")?;
        let checksum = number("checksum")?;
        if parts.next().is_some() {
            return Err(invalid("trailing fields"));
        }
        let handle = ReceiptHandle {
            queue_id,
            offset,
            epoch,
        };
        if u64::from(handle.checksum(topic)) != checksum {
            return Err(invalid("checksum mismatch"));
        }
        Ok(handle)
    }

    fn checksum(&self, topic: &str) -> u32 {
        let mut numbers = [0u8; 20];
        numbers[..4].copy_from_slice(&self.queue_id.to_le_bytes());
        numbers[4..12].copy_from_slice(&self.offset.to_le_bytes());
        numbers[12..].copy_from_slice(&self.epoch.to_le_bytes());
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(topic.as_bytes());
        hasher.update(&numbers);
        hasher.finalize()
    }
}

/// 1 to 16 hex digits, as `encode` writes them. Hand-written: `from_str_radix` was a
/// visible part of every acked message.
fn hex_field(field: &[u8]) -> Option<u64> {
    if field.is_empty() || field.len() > 16 {
        return None;
    }
    field.iter().try_fold(0u64, |value, &digit| {
        let nibble = match digit {
            b'0'..=b'9' => digit - b'0',
            b'a'..=b'f' => digit - b'a' + 10,
            b'A'..=b'F' => digit - b'A' + 10,
            _ => return None,
        };
        Some(value << 4 | u64::from(nibble))
    })
}

fn truncate(text: &str) -> &str {
    let end = text.char_indices().nth(64).map_or(text.len(), |(i, _)| i);
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_topic_binding() {
        let h = ReceiptHandle {
            queue_id: 3,
            offset: 1 << 40,
            epoch: 7,
        };
        let text = h.encode("orders");
        // Handles outlive a broker version: this one must stay valid.
        assert_eq!(text, "f1.3.10000000000.7.75307ea3");
        assert_eq!(ReceiptHandle::decode(&text, "orders", &"f").unwrap(), h);
        let err = ReceiptHandle::decode(&text, "other", &"entries[0].receipt_handle").unwrap_err();
        assert_eq!(err.code, Code::InvalidReceiptHandle);
        assert!(err.message.contains("entries[0].receipt_handle"));
    }

    #[test]
    fn hex_fields_read_what_encode_writes_and_nothing_else() {
        assert_eq!(hex_field(b"0"), Some(0));
        assert_eq!(hex_field(b"1A"), Some(26));
        assert_eq!(hex_field(b"ffffffffffffffff"), Some(u64::MAX));
        for bad in ["", "+1", "-1", "g", "1 ", "10000000000000000", "\u{e9}"] {
            assert_eq!(hex_field(bad.as_bytes()), None, "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn every_handle_round_trips(queue_id: u32, offset: u64, epoch: u64) {
            let h = ReceiptHandle { queue_id, offset, epoch };
            prop_assert_eq!(ReceiptHandle::decode(&h.encode("t"), "t", &"f").unwrap(), h);
        }

        #[test]
        fn arbitrary_text_is_refused_not_panicked_on(text in ".{0,80}") {
            if let Ok(h) = ReceiptHandle::decode(&text, "t", &"f") {
                prop_assert_eq!(h.encode("t"), text);
            }
        }

        #[test]
        fn any_single_character_change_is_caught(q in 0u32..100, off in 0u64..1_000_000, epoch in 0u64..1000, at in 0usize..40, c in "[0-9a-f.]") {
            let text = ReceiptHandle { queue_id: q, offset: off, epoch }.encode("t");
            let at = at % text.len();
            let mut changed = text.clone();
            changed.replace_range(at..at + 1, &c);
            if changed != text {
                prop_assert!(ReceiptHandle::decode(&changed, "t", &"f").is_err());
            }
        }
    }
}
