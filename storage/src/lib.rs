//! ferrumq's storage engine: synchronous, file-backed, and unaware of networks, protocols and
//! replication.
//!
//! - [`CommitLog`]: every message of every topic, appended to fixed-size mapped segments, made
//!   durable by one flusher thread with group commit.
//! - [`ConsumeQueue`]: per (topic, queue id), fixed-width entries pointing into the log, looked
//!   up by queue offset or by store time.
//! - [`MessageIndex`]: message id and keys → log positions.
//! - [`MessageStore`]: all of the above, kept in step by the dispatcher, checkpointed, recovered
//!   on open, trimmed by retention, and guarded by a disk-usage watermark.
//!
//! ```
//! use ferrumq_storage::{MessageStore, NewRecord, MessageType, Properties, StoreOptions, TermIndex};
//! # fn main() -> Result<(), ferrumq_storage::Error> {
//! let dir = tempfile::tempdir().map_err(|e| ferrumq_storage::Error::Io { path: "tmp".into(), source: e })?;
//! let store = MessageStore::open(dir.path(), StoreOptions::for_tests())?;
//! let properties = Properties::new().with("TAGS", "paid")?;
//! let appended = store.append(&NewRecord {
//!     topic: "orders",
//!     queue_id: 0,
//!     message_type: MessageType::Normal,
//!     born_timestamp_ms: 0,
//!     born_host: "127.0.0.1:1".parse().unwrap(),
//!     properties: properties.as_ref(),
//!     body: b"hello",
//!     term_index: TermIndex::default(),
//! })?;
//! store.durable(appended.end()).wait()?; // in sync mode: fsynced by the group commit
//! assert_eq!(store.read(appended.pos)?.view().body, b"hello");
//! # Ok(()) }
//! ```

// Offsets inside a mapped file are `u64` on disk and `usize` in memory; on a 64-bit target
// every such cast is lossless, and a 32-bit target could not map a 1 GiB segment anyway.
#![allow(
    clippy::cast_possible_truncation,
    reason = "u64 -> usize is lossless on the 64-bit targets storage requires"
)]
#[cfg(not(target_pointer_width = "64"))]
compile_error!("ferrumq-storage needs a 64-bit target: it maps files of up to 1 TiB");

mod checkpoint;
mod commit_log;
mod consume_queue;
mod error;
mod fs;
mod mapped_file;
mod message_index;
mod options;
mod pos;
mod record;
mod store;

pub use checkpoint::Checkpoint;
pub use commit_log::{Appended, CommitLog, Durable, FlushMode, FlushStats, Records, StoredRecord};
pub use consume_queue::{ConsumeQueue, ConsumeQueueEntry, tag_hash};
pub use error::{Error, Result};
pub use fs::{CrashFileSystem, DiskUsage, FileSystem, RealFileSystem, create_dir_all_durably};
pub use message_index::{IndexKey, IndexShape, MessageIndex};
pub use options::StoreOptions;
pub use pos::{LogPos, QueueOffset, TermIndex};
pub use record::{
    DecodeError, HEADER_LEN, MessageType, NewRecord, Properties, PropertiesRef, PropertyIter,
    RecordView, keys,
};
pub use store::{MessageStore, RecoveryReport, RetentionReport};
