//! Sends and acks as gRPC frames in reused buffers.
//!
//! A batch of 128 messages of 1 KiB is a 135 KiB request. Through tonic's codec it was
//! encoded twice (once here, to be resent unchanged on a retry, and once into the codec's own
//! buffer), and both buffers were fresh allocations: above glibc's thresholds, each one came
//! back from the kernel as new pages to fault in and zero. Together that was about a sixth of
//! a producer's CPU. Here a request is encoded once, with its gRPC frame header, into a buffer
//! that returns to a pool when the connection has written it, and is handed to the HTTP/2
//! channel as it is. An ack is written straight from the acked messages' ids and handles.

use std::sync::{Arc, Mutex, PoisonError};

use bytes::{BufMut, Bytes};
use ferrumq_protocol::v2;
use tonic::codec::{Codec, Streaming};
use tonic::codegen::http;

/// A request encoded and framed once: a `SendMessageRequest`, sent again unchanged on a
/// retry, or an `AckMessageRequest`.
#[derive(Clone)]
pub(crate) struct EncodedRequest(Bytes);

/// The paths of the calls made with an [`EncodedRequest`].
pub(crate) const SEND_MESSAGE: &str = "/apache.rocketmq.v2.MessagingService/SendMessage";
pub(crate) const ACK_MESSAGE: &str = "/apache.rocketmq.v2.MessagingService/AckMessage";

/// The gRPC frame header: a compression flag and the message's length (big endian).
const FRAME_HEADER_LEN: usize = 5;

impl EncodedRequest {
    pub(crate) fn send(messages: &[v2::Message], pool: &BufferPool) -> EncodedRequest {
        // `SendMessageRequest { repeated Message messages = 1; }`
        const MESSAGES: u32 = 1;
        let len: usize = messages
            .iter()
            .map(|m| prost::encoding::message::encoded_len(MESSAGES, m))
            .sum();
        EncodedRequest::framed(len, pool, |buf| {
            for message in messages {
                prost::encoding::message::encode(MESSAGES, message, buf);
            }
        })
    }

    /// An `AckMessageRequest` for `entries` (message id, receipt handle), written from the
    /// messages' own strings: copying them into an owned request, then freeing it, was a
    /// tenth of a consumer's instructions per message.
    pub(crate) fn ack(
        group: &str,
        topic: &str,
        entries: &[(&str, &str)],
        pool: &BufferPool,
    ) -> EncodedRequest {
        // `AckMessageRequest { Resource group = 1; Resource topic = 2;
        //   repeated AckMessageEntry entries = 3; }`, `Resource { string name = 2; }` (the
        //   namespace, 1, is empty) and `AckMessageEntry { string message_id = 1;
        //   string receipt_handle = 2; }`.
        let entry_len = |(id, handle): &(&str, &str)| string_len(1, id) + string_len(2, handle);
        let len = nested_len(1, string_len(2, group))
            + nested_len(1, string_len(2, topic))
            + entries
                .iter()
                .map(|entry| nested_len(3, entry_len(entry)))
                .sum::<usize>();
        EncodedRequest::framed(len, pool, |buf| {
            for (tag, name) in [(1, group), (2, topic)] {
                put_len_prefix(tag, string_len(2, name), buf);
                put_string(2, name, buf);
            }
            for entry @ (id, handle) in entries {
                put_len_prefix(3, entry_len(entry), buf);
                put_string(1, id, buf);
                put_string(2, handle, buf);
            }
        })
    }

    /// A buffer from `pool` holding the frame header for a `len`-byte message, then what
    /// `write` puts after it.
    fn framed(len: usize, pool: &BufferPool, write: impl FnOnce(&mut Vec<u8>)) -> EncodedRequest {
        let mut buf = pool.take(FRAME_HEADER_LEN + len);
        buf.put_u8(0);
        // A request longer than 4 GiB cannot be framed; the broker refuses it by its length
        // long before (`max_message_size`), so a wrong length only ever meets a refusal.
        buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
        write(&mut buf);
        EncodedRequest(Bytes::from_owner(Pooled {
            buf,
            pool: pool.clone(),
        }))
    }

    /// The request as the HTTP/2 body of a gRPC call.
    pub(crate) fn into_body(self) -> tonic::body::Body {
        tonic::body::Body::new(http_body_util::Full::new(self.0))
    }

    #[cfg(test)]
    fn message(&self) -> &[u8] {
        &self.0[FRAME_HEADER_LEN..]
    }
}

/// The encoded length of a string field; proto3 leaves an empty one out.
fn string_len(tag: u32, text: &str) -> usize {
    if text.is_empty() {
        0
    } else {
        nested_len(tag, text.len())
    }
}

/// The encoded length of a length-delimited field whose contents take `len` bytes.
fn nested_len(tag: u32, len: usize) -> usize {
    prost::encoding::key_len(tag) + prost::encoding::encoded_len_varint(len as u64) + len
}

fn put_len_prefix(tag: u32, len: usize, buf: &mut Vec<u8>) {
    prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, buf);
    prost::encoding::encode_varint(len as u64, buf);
}

fn put_string(tag: u32, text: &str, buf: &mut Vec<u8>) {
    if !text.is_empty() {
        put_len_prefix(tag, text.len(), buf);
        buf.put_slice(text.as_bytes());
    }
}

/// Request buffers that have been written and can be filled again.
#[derive(Clone, Default)]
pub(crate) struct BufferPool(Arc<Mutex<Vec<Vec<u8>>>>);

/// Buffers kept for reuse: enough for every batch a busy producer has in flight.
const POOLED_BUFFERS: usize = 64;
/// A buffer larger than this (an unusually large batch) is freed rather than kept.
const POOLED_BUFFER_MAX: usize = 4 << 20;

impl std::fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let free = self.0.lock().unwrap_or_else(PoisonError::into_inner).len();
        f.debug_struct("BufferPool").field("free", &free).finish()
    }
}

impl BufferPool {
    fn take(&self, len: usize) -> Vec<u8> {
        let reused = self.0.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let mut buf = reused.unwrap_or_default();
        buf.reserve(len);
        buf
    }

    fn give_back(&self, mut buf: Vec<u8>) {
        if buf.capacity() > POOLED_BUFFER_MAX {
            return;
        }
        buf.clear();
        let mut free = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if free.len() < POOLED_BUFFERS {
            free.push(buf);
        }
    }
}

/// A pooled buffer behind a `Bytes`: back to the pool when the last copy of the `Bytes` (the
/// producer's, for retries, and the connection's, until written) is dropped.
struct Pooled {
    buf: Vec<u8>,
    pool: BufferPool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

/// The one message of a unary gRPC reply, or the status that ended the call: what tonic's
/// client does for a unary call once the response headers are in.
pub(crate) async fn unary_reply<M>(
    response: http::Response<tonic::body::Body>,
) -> Result<M, tonic::Status>
where
    M: prost::Message + Default + Send + 'static,
{
    // A call that failed before any message carries its status in the headers.
    if let Some(status) = tonic::Status::from_header_map(response.headers())
        && status.code() != tonic::Code::Ok
    {
        return Err(status);
    }
    let status_code = response.status();
    let mut codec = ferrumq_protocol::codec::GrpcCodec::<(), M>::default();
    let mut reply = Streaming::new_response(
        codec.decoder(),
        response.into_body(),
        status_code,
        None,
        None,
    );
    let message = reply
        .message()
        .await?
        .ok_or_else(|| tonic::Status::internal("the reply carries no message"))?;
    // The status is in the trailers; a message followed by an error status is an error.
    reply.trailers().await?;
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn an_encoded_send_is_the_framed_request_prost_would_encode() {
        let messages: Vec<v2::Message> = ["a", "bb", ""]
            .iter()
            .map(|body| v2::Message {
                topic: crate::transport::resource("t"),
                body: Bytes::from(body.as_bytes().to_vec()),
                ..v2::Message::default()
            })
            .collect();
        let expected = v2::SendMessageRequest {
            messages: messages.clone(),
        }
        .encode_to_vec();
        let encoded = EncodedRequest::send(&messages, &BufferPool::default());
        assert_eq!(encoded.0[0], 0, "not compressed");
        assert_eq!(
            bytes::Buf::get_u32(&mut &encoded.0[1..5]) as usize,
            expected.len()
        );
        assert_eq!(encoded.message(), expected);
    }

    #[test]
    fn an_encoded_ack_is_the_request_prost_would_encode() {
        let long = "h".repeat(300);
        for (group, topic, entries) in [
            (
                "g",
                "orders",
                vec![("01AB", "f1.0.5.1.0badcafe"), ("", "é"), ("x", "")],
            ),
            ("", "", vec![("id", long.as_str())]),
        ] {
            let expected = v2::AckMessageRequest {
                group: crate::transport::resource(group),
                topic: crate::transport::resource(topic),
                entries: entries
                    .iter()
                    .map(|(id, handle)| v2::AckMessageEntry {
                        message_id: (*id).to_owned(),
                        receipt_handle: (*handle).to_owned(),
                    })
                    .collect(),
            }
            .encode_to_vec();
            let encoded = EncodedRequest::ack(group, topic, &entries, &BufferPool::default());
            assert_eq!(
                bytes::Buf::get_u32(&mut &encoded.0[1..5]) as usize,
                expected.len()
            );
            assert_eq!(encoded.message(), expected);
        }
    }

    #[test]
    fn a_written_request_returns_its_buffer_to_the_pool() {
        let pool = BufferPool::default();
        let message = v2::Message {
            body: Bytes::from(vec![7; 1000]),
            ..v2::Message::default()
        };
        let encoded = EncodedRequest::send(std::slice::from_ref(&message), &pool);
        let retry = encoded.clone();
        drop(encoded);
        assert!(pool.0.lock().unwrap().is_empty(), "a copy is still held");
        drop(retry);
        let buffers = pool.0.lock().unwrap();
        assert_eq!(buffers.len(), 1);
        assert!(buffers[0].is_empty() && buffers[0].capacity() >= 1000);
    }

    fn response(
        headers: &[(&'static str, &'static str)],
        body: &[u8],
        trailers: Option<(&'static str, &'static str)>,
    ) -> http::Response<tonic::body::Body> {
        use http_body_util::BodyExt as _;
        let mut trailer_map = http::HeaderMap::new();
        if let Some((status, message)) = trailers {
            trailer_map.insert("grpc-status", http::HeaderValue::from_static(status));
            trailer_map.insert("grpc-message", http::HeaderValue::from_static(message));
        }
        let body = http_body_util::Full::new(Bytes::copy_from_slice(body))
            .map_err(|never| match never {})
            .with_trailers(async move { Some(Ok(trailer_map)) });
        let mut response = http::Response::new(tonic::body::Body::new(body));
        for (name, value) in headers {
            response
                .headers_mut()
                .insert(*name, http::HeaderValue::from_static(value));
        }
        response
    }

    fn framed(message: &impl prost::Message) -> Vec<u8> {
        let encoded = message.encode_to_vec();
        let mut framed = vec![0];
        framed.put_u32(u32::try_from(encoded.len()).unwrap());
        framed.extend_from_slice(&encoded);
        framed
    }

    #[tokio::test]
    async fn a_unary_reply_is_its_message_or_the_status_that_ended_the_call() {
        let reply = v2::SendMessageResponse {
            entries: vec![v2::SendResultEntry {
                message_id: "01AB".into(),
                offset: 7,
                ..v2::SendResultEntry::default()
            }],
            ..v2::SendMessageResponse::default()
        };
        let ok = response(&[], &framed(&reply), Some(("0", "")));
        assert_eq!(
            unary_reply::<v2::SendMessageResponse>(ok).await.unwrap(),
            reply
        );

        // Refused before any message: the status is in the headers.
        let refused = response(
            &[("grpc-status", "8"), ("grpc-message", "too large")],
            &[],
            None,
        );
        let status = unary_reply::<v2::SendMessageResponse>(refused)
            .await
            .unwrap_err();
        assert_eq!(
            (status.code(), status.message()),
            (tonic::Code::ResourceExhausted, "too large")
        );

        // A message, then an error status in the trailers.
        let failed = response(&[], &framed(&reply), Some(("13", "broke")));
        let status = unary_reply::<v2::SendMessageResponse>(failed)
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Internal);

        // A message that does not parse.
        let garbage = response(&[], &[0, 0, 0, 0, 2, 0x0A, 0xFF], Some(("0", "")));
        let status = unary_reply::<v2::SendMessageResponse>(garbage)
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Internal);

        // An OK status without a message.
        let empty = response(&[], &[], Some(("0", "")));
        assert!(unary_reply::<v2::SendMessageResponse>(empty).await.is_err());
    }
}
