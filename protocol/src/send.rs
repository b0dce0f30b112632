//! SendMessage as the broker reads it.
//!
//! Decoded as the generated type, a request's messages went into a vector that grew by
//! doubling, each step copying every message decoded so far (a `Message` is a few hundred
//! bytes): for a batch of 128, more copying than the batch's own strings. Here the vector is
//! sized once, from the first message's length and what is left of the request. The bytes on
//! the wire are those of `SendMessageRequest`; `build.rs`'s second pass gives the server
//! this type.

use bytes::{Buf, BufMut};
use prost::DecodeError;
use prost::encoding::{DecodeContext, WireType, decode_varint, message, skip_field};

use crate::v2;

/// The most messages a request is sized for ahead; a larger batch grows past it.
const MAX_PRESIZED: usize = 1024;

/// A `SendMessageRequest`.
#[derive(Clone, PartialEq, Default, Debug)]
pub struct SendRequest {
    pub messages: Vec<v2::Message>,
}

impl prost::Message for SendRequest {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        for m in &self.messages {
            message::encode(1, m, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            1 => {
                if self.messages.capacity() == 0 {
                    self.messages.reserve(expected_messages(buf));
                }
                message::merge_repeated(wire_type, &mut self.messages, buf, ctx).map_err(|mut e| {
                    e.push("SendMessageRequest", "messages");
                    e
                })
            }
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        message::encoded_len_repeated(1, &self.messages)
    }

    fn clear(&mut self) {
        self.messages.clear();
    }
}

/// How many messages the rest of a request holds if they are all as long as the next one.
fn expected_messages(buf: &impl Buf) -> usize {
    let remaining = buf.remaining();
    let mut next = buf.chunk();
    match decode_varint(&mut next) {
        Ok(len) => {
            // Each message also takes its key and length: at least two bytes.
            let each = usize::try_from(len).unwrap_or(usize::MAX).saturating_add(2);
            (remaining / each).clamp(1, MAX_PRESIZED)
        }
        Err(_) => 1,
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    fn request(bodies: &[usize]) -> v2::SendMessageRequest {
        v2::SendMessageRequest {
            messages: bodies
                .iter()
                .map(|&len| v2::Message {
                    body: vec![7u8; len].into(),
                    ..v2::Message::default()
                })
                .collect(),
        }
    }

    #[test]
    fn reads_what_the_generated_type_writes_and_sizes_its_vector_once() {
        let full = request(&[1000; 128]);
        let bytes = full.encode_to_vec();
        let lean = SendRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(lean.messages, full.messages);
        assert_eq!(lean.messages.capacity(), 128);
        assert_eq!(lean.encode_to_vec(), bytes);
    }

    #[test]
    fn messages_of_other_lengths_still_all_arrive() {
        let full = request(&[10, 5000, 1, 0, 300, 70_000]);
        let lean = SendRequest::decode(full.encode_to_vec().as_slice()).unwrap();
        assert_eq!(lean.messages, full.messages);
        assert!(SendRequest::decode(&b"\x0a\x05\x01"[..]).is_err());
        assert_eq!(SendRequest::decode(&b""[..]).unwrap().messages.len(), 0);
    }
}
