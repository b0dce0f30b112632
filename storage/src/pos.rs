//! Position newtypes. A byte position in the commit log and an entry number in a consume
//! queue are both `u64`s on disk; mixing them up is the classic queue bug, so in code they are
//! distinct types.

use std::fmt;

/// A byte position in the commit log: the first byte of a record, or the end of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct LogPos(pub u64);

impl LogPos {
    pub const ZERO: LogPos = LogPos(0);

    /// The position `bytes` further on.
    pub fn advance(self, bytes: u64) -> LogPos {
        LogPos(self.0 + bytes)
    }
}

impl fmt::Display for LogPos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// An entry number in one consume queue (RocketMQ's "queue offset").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct QueueOffset(pub u64);

impl QueueOffset {
    pub fn next(self) -> QueueOffset {
        QueueOffset(self.0 + 1)
    }
}

impl fmt::Display for QueueOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The opaque replication coordinates of a record. Storage keeps them and never interprets
/// them; a replication layer maps them to its own log ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TermIndex {
    pub term: u64,
    pub index: u64,
}
