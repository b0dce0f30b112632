//! Receipt handles: what a consumer echoes back to ack a message or change its lease.
//!
//! A handle names the queue, the queue offset and the lease epoch, and carries a CRC32 over
//! them and the topic, so a handle that was mangled, or sent with another topic, is refused.
//! The epoch changes at every delivery and every lease change. Every handle of the current
//! delivery acts on the message, the first and each one a lease change returned; a handle
//! from an earlier delivery no longer does.

use ferrumq_protocol::v2::Code;

use crate::error::{ApiError, ApiResult};
use crate::message::{HEX_LOWER, HEX_UPPER, push_hex};

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

    /// Parses a handle received for `topic`; `field` names it in the error. The handle is
    /// read as bytes: a valid one is ASCII, so any other text fails as it should.
    pub fn decode(
        text: &[u8],
        topic: &str,
        field: &dyn std::fmt::Display,
    ) -> ApiResult<ReceiptHandle> {
        let invalid = |why: &str| {
            ApiError::new(
                Code::InvalidReceiptHandle,
                format!(
                    "{field} {:?} is not a receipt handle of topic {topic:?}: {why}",
                    truncate(&String::from_utf8_lossy(text))
                ),
            )
        };
        // One pass over the bytes, each digit looked up in a table: splitting on '.' and
        // matching each digit's range were a visible part of every acked message.
        let Some(rest) = text
            .strip_prefix(VERSION.as_bytes())
            .and_then(|rest| rest.strip_prefix(b"."))
        else {
            return Err(invalid("unknown format"));
        };
        const FIELDS: [&str; 4] = ["queue id", "offset", "epoch", "checksum"];
        let bad = |field: usize| invalid(&format!("bad {}", FIELDS[field]));
        let mut numbers = [0u64; 4];
        let (mut field, mut digits) = (0, 0);
        for &byte in rest {
            if byte == b'.' {
                if digits == 0 {
                    return Err(bad(field));
                }
                if field == FIELDS.len() - 1 {
                    return Err(invalid("trailing fields"));
                }
                (field, digits) = (field + 1, 0);
                continue;
            }
            let nibble = HEX_DIGITS[usize::from(byte)];
            digits += 1;
            if nibble > 0xF || digits > 16 {
                return Err(bad(field));
            }
            numbers[field] = numbers[field] << 4 | u64::from(nibble);
        }
        // The text ended in an empty field, or before the last one.
        if digits == 0 {
            return Err(bad(field));
        }
        if field < FIELDS.len() - 1 {
            return Err(bad(field + 1));
        }
        let [queue_id, offset, epoch, checksum] = numbers;
        let queue_id = u32::try_from(queue_id).map_err(|_| bad(0))?;
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

/// Each byte's value as a hex digit, or 0xFF for a byte that is not one.
const HEX_DIGITS: [u8; 256] = {
    let mut table = [0xFF; 256];
    let mut value: u8 = 0;
    while value < 16 {
        table[HEX_LOWER[value as usize] as usize] = value;
        table[HEX_UPPER[value as usize] as usize] = value;
        value += 1;
    }
    table
};

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
        assert_eq!(
            ReceiptHandle::decode(text.as_bytes(), "orders", &"f").unwrap(),
            h
        );
        let err = ReceiptHandle::decode(text.as_bytes(), "other", &"entries[0].receipt_handle")
            .unwrap_err();
        assert_eq!(err.code, Code::InvalidReceiptHandle);
        assert!(err.message.contains("entries[0].receipt_handle"));
    }

    #[test]
    fn fields_are_read_as_encode_writes_them_and_nothing_else_is() {
        let h = ReceiptHandle {
            queue_id: 26,
            offset: u64::MAX,
            epoch: 0,
        };
        let text = h.encode("t");
        assert_eq!(
            text,
            format!("f1.1a.ffffffffffffffff.0.{:08x}", h.checksum("t"))
        );
        let upper = format!("f1.1A.FFFFFFFFFFFFFFFF.0.{:08X}", h.checksum("t"));
        assert_eq!(
            ReceiptHandle::decode(upper.as_bytes(), "t", &"f").unwrap(),
            h
        );
        let checksum = format!("{:08x}", h.checksum("t"));
        let with = |queue: &str, offset: &str, tail: &str| {
            format!("f1.{queue}.{offset}.0.{checksum}{tail}")
        };
        for (bad, why) in [
            (with("", "ffffffffffffffff", ""), "bad queue id"),
            (with("+1a", "ffffffffffffffff", ""), "bad queue id"),
            (with("1g", "ffffffffffffffff", ""), "bad queue id"),
            (with("\u{e9}", "ffffffffffffffff", ""), "bad queue id"),
            (with("100000000", "ffffffffffffffff", ""), "bad queue id"),
            (with("1a", "1ffffffffffffffff", ""), "bad offset"),
            (with("1a", "ff ff", ""), "bad offset"),
            (with("1a", "ffffffffffffffff", "."), "trailing fields"),
            (with("1a", "ffffffffffffffff", ".0"), "trailing fields"),
            ("f1.1a.ffffffffffffffff".to_owned(), "bad epoch"),
            ("f1.1a.ffffffffffffffff.0.".to_owned(), "bad checksum"),
            ("f2.1a.0.0.0".to_owned(), "unknown format"),
            ("f1".to_owned(), "unknown format"),
        ] {
            let err = ReceiptHandle::decode(bad.as_bytes(), "t", &"f").unwrap_err();
            assert!(err.message.ends_with(why), "{bad:?}: {}", err.message);
        }
    }

    proptest! {
        #[test]
        fn every_handle_round_trips(queue_id: u32, offset: u64, epoch: u64) {
            let h = ReceiptHandle { queue_id, offset, epoch };
            prop_assert_eq!(ReceiptHandle::decode(h.encode("t").as_bytes(), "t", &"f").unwrap(), h);
        }

        #[test]
        fn arbitrary_text_is_refused_not_panicked_on(text in ".{0,80}") {
            if let Ok(h) = ReceiptHandle::decode(text.as_bytes(), "t", &"f") {
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
                prop_assert!(ReceiptHandle::decode(changed.as_bytes(), "t", &"f").is_err());
            }
        }
    }
}
