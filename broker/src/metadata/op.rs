//! Topic and group changes as entries of the commit log (`%SYS%METADATA`), in the binary
//! form `broker/FORMAT.md` describes byte by byte, and the pure `apply` that turns a state and
//! an op into the next state: every node that applies the same entries holds the same topics
//! and groups.

use std::collections::BTreeMap;

use ferrumq_protocol::v2::MessageType;
use serde::{Deserialize, Serialize};

use super::{GroupConfig, StartPosition, TopicConfig};

/// The only encoding version written; an entry of another version is refused.
const VERSION: u8 = 1;

/// One change to the topics and groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetadataOp {
    PutTopic(TopicConfig),
    DeleteTopic(String),
    PutGroup(GroupConfig),
}

/// The topics and groups: what applying every op in log order gives.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetadataState {
    pub topics: BTreeMap<String, TopicConfig>,
    pub groups: BTreeMap<String, GroupConfig>,
}

impl MetadataState {
    pub fn apply(&mut self, op: &MetadataOp) {
        match op {
            MetadataOp::PutTopic(topic) => {
                self.topics.insert(topic.name.clone(), topic.clone());
            }
            MetadataOp::DeleteTopic(name) => {
                self.topics.remove(name);
            }
            MetadataOp::PutGroup(group) => {
                self.groups.insert(group.name.clone(), group.clone());
            }
        }
    }
}

/// Why an entry is not a metadata op this broker can read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("metadata op version {0} is not 1")]
    Version(u8),
    #[error("unknown metadata op kind {0}")]
    Kind(u8),
    #[error("metadata op ends early")]
    Short,
    #[error("metadata op has {0} bytes after its end")]
    Trailing(usize),
    #[error("metadata op holds a name that is not UTF-8")]
    NotUtf8,
    #[error("metadata op holds unknown {field} {value}")]
    Unknown { field: &'static str, value: i64 },
}

const PUT_TOPIC: u8 = 1;
const DELETE_TOPIC: u8 = 2;
const PUT_GROUP: u8 = 3;

impl MetadataOp {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![VERSION];
        match self {
            MetadataOp::PutTopic(topic) => {
                out.push(PUT_TOPIC);
                put_str(&mut out, &topic.name);
                out.extend_from_slice(&topic.queue_count.to_le_bytes());
                let types = topic.message_types();
                let count = u8::try_from(types.len()).unwrap_or(u8::MAX);
                out.push(count);
                for t in types.iter().take(usize::from(count)) {
                    out.push(u8::try_from(*t as i32).unwrap_or(0));
                }
            }
            MetadataOp::DeleteTopic(name) => {
                out.push(DELETE_TOPIC);
                put_str(&mut out, name);
            }
            MetadataOp::PutGroup(group) => {
                out.push(PUT_GROUP);
                put_str(&mut out, &group.name);
                out.extend_from_slice(&group.max_delivery_attempts.to_le_bytes());
                out.push(match group.start_position {
                    StartPosition::Earliest => 0,
                    StartPosition::Latest => 1,
                });
                out.push(u8::from(group.fifo));
                out.extend_from_slice(&group.created_ms.to_le_bytes());
                let count = u8::try_from(group.retry_backoff_ms.len()).unwrap_or(u8::MAX);
                out.push(count);
                for ms in group.retry_backoff_ms.iter().take(usize::from(count)) {
                    out.extend_from_slice(&ms.to_le_bytes());
                }
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<MetadataOp, DecodeError> {
        let mut r = Reader(bytes);
        let version = r.u8()?;
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
        let op = match r.u8()? {
            PUT_TOPIC => {
                let name = r.str()?;
                let queue_count = r.u32()?;
                let count = r.u8()?;
                let mut accept_message_types = Vec::with_capacity(usize::from(count));
                for _ in 0..count {
                    let value = r.u8()?;
                    let t = MessageType::try_from(i32::from(value)).map_err(|_| {
                        DecodeError::Unknown {
                            field: "message type",
                            value: i64::from(value),
                        }
                    })?;
                    accept_message_types.push(t.as_str_name().to_owned());
                }
                MetadataOp::PutTopic(TopicConfig {
                    name,
                    queue_count,
                    accept_message_types,
                })
            }
            DELETE_TOPIC => MetadataOp::DeleteTopic(r.str()?),
            PUT_GROUP => {
                let name = r.str()?;
                let max_delivery_attempts = r.u32()?;
                let start_position = match r.u8()? {
                    0 => StartPosition::Earliest,
                    1 => StartPosition::Latest,
                    other => {
                        return Err(DecodeError::Unknown {
                            field: "start position",
                            value: i64::from(other),
                        });
                    }
                };
                let fifo = match r.u8()? {
                    0 => false,
                    1 => true,
                    other => {
                        return Err(DecodeError::Unknown {
                            field: "fifo flag",
                            value: i64::from(other),
                        });
                    }
                };
                let created_ms = r.i64()?;
                let count = r.u8()?;
                let mut retry_backoff_ms = Vec::with_capacity(usize::from(count));
                for _ in 0..count {
                    retry_backoff_ms.push(r.u64()?);
                }
                MetadataOp::PutGroup(GroupConfig {
                    name,
                    max_delivery_attempts,
                    start_position,
                    retry_backoff_ms,
                    fifo,
                    created_ms,
                })
            }
            kind => return Err(DecodeError::Kind(kind)),
        };
        match r.0.len() {
            0 => Ok(op),
            left => Err(DecodeError::Trailing(left)),
        }
    }
}

/// A name: its length (u16) and its UTF-8 bytes. Names are checked to be far shorter
/// (`Metadata` refuses longer lists and names than this form holds).
fn put_str(out: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..usize::from(len)]);
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let (head, rest) = self.0.split_first_chunk::<N>().ok_or(DecodeError::Short)?;
        self.0 = rest;
        Ok(*head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take()?))
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.take()?))
    }

    fn str(&mut self) -> Result<String, DecodeError> {
        let len = usize::from(u16::from_le_bytes(self.take()?));
        if self.0.len() < len {
            return Err(DecodeError::Short);
        }
        let (bytes, rest) = self.0.split_at(len);
        self.0 = rest;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::NotUtf8)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn topic() -> impl Strategy<Value = TopicConfig> {
        let types =
            prop::sample::subsequence(vec!["NORMAL", "FIFO", "DELAY", "TRANSACTION"], 1..=4);
        ("[a-zA-Z0-9_%|-]{1,40}", 1u32..=1024, types).prop_map(|(name, queue_count, types)| {
            TopicConfig {
                name,
                queue_count,
                accept_message_types: types.into_iter().map(str::to_owned).collect(),
            }
        })
    }

    fn group() -> impl Strategy<Value = GroupConfig> {
        (
            "[a-zA-Z0-9_%|-]{1,60}",
            1u32..100,
            any::<bool>(),
            any::<bool>(),
            any::<i64>(),
            prop::collection::vec(any::<u64>(), 0..20),
        )
            .prop_map(|(name, attempts, earliest, fifo, created_ms, backoff)| {
                GroupConfig {
                    name,
                    max_delivery_attempts: attempts,
                    start_position: if earliest {
                        StartPosition::Earliest
                    } else {
                        StartPosition::Latest
                    },
                    retry_backoff_ms: backoff,
                    fifo,
                    created_ms,
                }
            })
    }

    fn op() -> impl Strategy<Value = MetadataOp> {
        prop_oneof![
            topic().prop_map(MetadataOp::PutTopic),
            "[a-z]{1,8}".prop_map(MetadataOp::DeleteTopic),
            group().prop_map(MetadataOp::PutGroup),
        ]
    }

    proptest! {
        #[test]
        fn every_op_reads_back_as_written(op in op()) {
            prop_assert_eq!(MetadataOp::decode(&op.encode()), Ok(op));
        }

        /// What a follower does: apply the same entries, decoded from the log's bytes, to a
        /// fresh state. It reaches the state the leader reached.
        #[test]
        fn two_fresh_states_applying_the_same_entries_are_equal(ops in prop::collection::vec(op(), 0..40)) {
            let mut leader = MetadataState::default();
            let mut follower = MetadataState::default();
            for op in &ops {
                leader.apply(op);
                follower.apply(&MetadataOp::decode(&op.encode()).unwrap());
            }
            prop_assert_eq!(leader, follower);
        }

        #[test]
        fn every_cut_of_an_op_is_refused_not_misread(op in op(), cut in any::<prop::sample::Index>()) {
            let bytes = op.encode();
            let cut = cut.index(bytes.len());
            prop_assert!(MetadataOp::decode(&bytes[..cut]).is_err());
        }
    }

    #[test]
    fn unknown_versions_kinds_and_trailing_bytes_are_refused() {
        let bytes = MetadataOp::DeleteTopic("t".into()).encode();
        let mut other_version = bytes.clone();
        other_version[0] = 2;
        assert_eq!(
            MetadataOp::decode(&other_version),
            Err(DecodeError::Version(2))
        );
        let mut other_kind = bytes.clone();
        other_kind[1] = 9;
        assert_eq!(MetadataOp::decode(&other_kind), Err(DecodeError::Kind(9)));
        let mut longer = bytes;
        longer.push(0);
        assert_eq!(MetadataOp::decode(&longer), Err(DecodeError::Trailing(1)));
    }
}
