//! AckMessage as the broker reads and answers it.
//!
//! An ack of 512 messages carries 1,024 strings, and its reply echoes every one of them.
//! Decoded as the full types, each became a `String` of its own, and each entry's reply a
//! fresh "OK" status: allocating, copying and freeing them was about a fifth of the
//! broker's work per acked message. Here an entry's strings are slices of the request's
//! buffer, the reply echoes those same slices, and an OK status shares one static text.
//! The bytes on the wire are those of `AckMessageRequest` and `AckMessageResponse`;
//! `build.rs`'s second pass gives the server these types.

use bytes::Bytes;

use crate::v2;

/// An `AckMessageRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AckRequest {
    #[prost(message, optional, tag = "1")]
    pub group: Option<v2::Resource>,
    #[prost(message, optional, tag = "2")]
    pub topic: Option<v2::Resource>,
    #[prost(message, repeated, tag = "3")]
    pub entries: Vec<AckRequestEntry>,
}

/// An `AckMessageEntry`; its strings are checked for UTF-8 by [`AckRequest::handles`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct AckRequestEntry {
    #[prost(bytes = "bytes", tag = "1")]
    pub message_id: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    pub receipt_handle: Bytes,
}

/// An entry's string that is not UTF-8, which the full types would have refused to decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotUtf8 {
    pub index: usize,
    /// `message_id` or `receipt_handle`.
    pub field: &'static str,
}

impl std::fmt::Display for NotUtf8 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "entries[{}].{} is not UTF-8", self.index, self.field)
    }
}

impl AckRequest {
    /// Every entry's receipt handle, in order, as bytes checked to be UTF-8; or the first
    /// field that is not UTF-8.
    pub fn handles(&self) -> Result<Vec<&[u8]>, NotUtf8> {
        let mut handles = Vec::with_capacity(self.entries.len());
        for (index, entry) in self.entries.iter().enumerate() {
            let not_utf8 = |field| NotUtf8 { index, field };
            if !is_utf8(&entry.message_id) {
                return Err(not_utf8("message_id"));
            }
            if !is_utf8(&entry.receipt_handle) {
                return Err(not_utf8("receipt_handle"));
            }
            handles.push(&entry.receipt_handle[..]);
        }
        Ok(handles)
    }
}

/// Ids and handles are ASCII, which `is_ascii` checks a word at a time; `from_utf8` goes
/// byte by byte up to a word boundary, which is most of a 40-byte string.
fn is_utf8(text: &[u8]) -> bool {
    text.is_ascii() || std::str::from_utf8(text).is_ok()
}

/// An `AckMessageResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AckResponse {
    #[prost(message, optional, tag = "1")]
    pub status: Option<v2::Status>,
    #[prost(message, repeated, tag = "2")]
    pub entries: Vec<AckResponseEntry>,
}

/// An `AckMessageResultEntry`: the request entry's message id and handle, and its outcome.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AckResponseEntry {
    #[prost(bytes = "bytes", tag = "1")]
    pub message_id: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    pub receipt_handle: Bytes,
    #[prost(message, optional, tag = "3")]
    pub status: Option<EntryStatus>,
}

/// A `Status` whose text can be shared.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EntryStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(bytes = "bytes", tag = "2")]
    pub message: Bytes,
}

impl EntryStatus {
    pub fn ok() -> EntryStatus {
        EntryStatus {
            code: v2::Code::Ok as i32,
            message: Bytes::from_static(b"OK"),
        }
    }
}

impl From<v2::Status> for EntryStatus {
    fn from(status: v2::Status) -> EntryStatus {
        EntryStatus {
            code: status.code,
            message: Bytes::from(status.message),
        }
    }
}

impl AckResponseEntry {
    /// The reply to `entry`.
    pub fn echo(entry: AckRequestEntry, status: EntryStatus) -> AckResponseEntry {
        AckResponseEntry {
            message_id: entry.message_id,
            receipt_handle: entry.receipt_handle,
            status: Some(status),
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    fn resource(name: &str) -> Option<v2::Resource> {
        Some(v2::Resource {
            resource_namespace: String::new(),
            name: name.to_owned(),
        })
    }

    #[test]
    fn a_request_reads_as_the_full_type_wrote_it() {
        let full = v2::AckMessageRequest {
            group: resource("g"),
            topic: resource("orders"),
            entries: vec![
                v2::AckMessageEntry {
                    message_id: "01AB".into(),
                    receipt_handle: "f1.0.5.1.0badcafe".into(),
                },
                v2::AckMessageEntry {
                    message_id: String::new(),
                    receipt_handle: "é".into(),
                },
            ],
        };
        let lean = AckRequest::decode(full.encode_to_vec().as_slice()).unwrap();
        assert_eq!((lean.group, lean.topic), (full.group, full.topic));
        assert_eq!(lean.entries[0].message_id, "01AB");
        assert_eq!(lean.entries[1].message_id, "");
        assert_eq!(lean.entries[1].receipt_handle, "é");
    }

    #[test]
    fn handles_are_the_entries_strings_and_a_non_utf8_field_is_named() {
        let entry = |id: &[u8], handle: &[u8]| AckRequestEntry {
            message_id: Bytes::copy_from_slice(id),
            receipt_handle: Bytes::copy_from_slice(handle),
        };
        let mut request = AckRequest {
            entries: vec![entry(b"a", b"h1"), entry(b"b", b"h2")],
            ..AckRequest::default()
        };
        assert_eq!(request.handles().unwrap(), vec![&b"h1"[..], &b"h2"[..]]);
        // UTF-8 that is not ASCII is still a string.
        request.entries.push(entry("é".as_bytes(), "ü".as_bytes()));
        assert_eq!(request.handles().unwrap()[2], "ü".as_bytes());
        request.entries.push(entry(b"c", b"\xff"));
        assert_eq!(
            request.handles().unwrap_err().to_string(),
            "entries[3].receipt_handle is not UTF-8"
        );
        request.entries.insert(0, entry(b"\xc3", b"h0"));
        assert_eq!(
            request.handles().unwrap_err().to_string(),
            "entries[0].message_id is not UTF-8"
        );
    }

    #[test]
    fn a_response_is_the_bytes_of_the_full_type() {
        let entry = |id: &str, handle: &str, status: v2::Status| v2::AckMessageResultEntry {
            message_id: id.into(),
            receipt_handle: handle.into(),
            status: Some(status),
        };
        let full = v2::AckMessageResponse {
            status: Some(v2::Status {
                code: v2::Code::MultipleResults as i32,
                message: "some entries failed".into(),
            }),
            entries: vec![
                entry(
                    "01AB",
                    "f1.0.5.1.0badcafe",
                    v2::Status {
                        code: v2::Code::Ok as i32,
                        message: "OK".into(),
                    },
                ),
                entry(
                    "",
                    "x",
                    v2::Status {
                        code: v2::Code::InvalidReceiptHandle as i32,
                        message: "bad handle".into(),
                    },
                ),
            ],
        };
        let lean = AckResponse {
            status: full.status.clone(),
            entries: full
                .entries
                .iter()
                .map(|e| {
                    let request = AckRequestEntry {
                        message_id: Bytes::from(e.message_id.clone()),
                        receipt_handle: Bytes::from(e.receipt_handle.clone()),
                    };
                    let status = e.status.clone().unwrap();
                    let status = if status.code == v2::Code::Ok as i32 {
                        EntryStatus::ok()
                    } else {
                        EntryStatus::from(status)
                    };
                    AckResponseEntry::echo(request, status)
                })
                .collect(),
        };
        assert_eq!(lean.encode_to_vec(), full.encode_to_vec());
    }
}
