//! Helpers shared by the storage integration tests.
#![allow(dead_code, unreachable_pub)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use ferrumq_storage::{
    DiskUsage, FileSystem, MessageStore, MessageType, NewRecord, Properties, RealFileSystem,
    StoreOptions, TermIndex,
};
use memmap2::MmapRaw;

/// A message the tests can regenerate from its number, to check content after recovery.
pub struct TestMessage {
    pub topic: String,
    pub queue_id: u32,
    pub properties: Properties,
    pub body: Vec<u8>,
}

impl TestMessage {
    pub fn new(n: u64, body_len: usize) -> TestMessage {
        let topic = format!("topic-{}", n % 3);
        let properties = Properties::new()
            .with("UNIQ_KEY", &message_id(n))
            .unwrap()
            .with("TAGS", if n.is_multiple_of(2) { "even" } else { "odd" })
            .unwrap()
            .with("KEYS", &format!("key-{n}"))
            .unwrap();
        TestMessage {
            topic,
            queue_id: (n % 4) as u32,
            properties,
            body: body_of(n, body_len),
        }
    }

    pub fn record(&self) -> NewRecord<'_> {
        NewRecord {
            topic: &self.topic,
            queue_id: self.queue_id,
            message_type: MessageType::Normal,
            born_timestamp_ms: 1_700_000_000_000,
            born_host: "127.0.0.1:9000".parse().unwrap(),
            properties: self.properties.as_ref(),
            body: &self.body,
            term_index: TermIndex::default(),
        }
    }
}

/// Appends messages `numbers` ([`TestMessage::new`], bodies `body_len(n)` long) in one batch.
pub fn append_numbered(
    store: &MessageStore,
    numbers: &[u64],
    body_len: fn(u64) -> usize,
    out: &mut Vec<ferrumq_storage::Appended>,
) -> ferrumq_storage::Result<()> {
    let messages: Vec<_> = numbers
        .iter()
        .map(|&n| TestMessage::new(n, body_len(n)))
        .collect();
    let records: Vec<_> = messages.iter().map(TestMessage::record).collect();
    out.clear();
    store.append_batch(&records, out)
}

/// The record at `pos`, which must be message `n` of [`append_numbered`], intact.
pub fn acked_record(
    store: &MessageStore,
    n: u64,
    pos: u64,
    body_len: fn(u64) -> usize,
    context: &str,
) -> ferrumq_storage::StoredRecord {
    let record = store
        .read(ferrumq_storage::LogPos(pos))
        .unwrap_or_else(|e| panic!("{context}: acked record {n} at {pos} lost: {e}"));
    let view = record.view();
    assert_eq!(
        view.properties.get("UNIQ_KEY"),
        Some(message_id(n).as_str()),
        "{context}: record at {pos}"
    );
    assert_eq!(
        view.body,
        body_of(n, body_len(n)).as_slice(),
        "{context}: body of {n}"
    );
    record
}

pub fn message_id(n: u64) -> String {
    format!("MSG-{n:016X}")
}

/// Deterministic body bytes for message `n`.
pub fn body_of(n: u64, len: usize) -> Vec<u8> {
    let mut state = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect()
}

/// Copies a live data directory: what a process crash would leave (the page cache's view).
pub fn snapshot_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            snapshot_dir(&entry.path(), &target);
        } else if entry.file_name() != "lock" {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// The real file system with switches to fail flushes and to report a chosen disk usage.
#[derive(Default)]
pub struct FaultyFs {
    pub fail_flush: AtomicBool,
    /// Fails only msyncs of mapped files (the dispatcher's consume-queue and index flushes).
    pub fail_mapped_sync: AtomicBool,
    /// Used fraction in per-mille; 0 means "ask the real file system".
    pub used_per_mille: AtomicU64,
    pub flush_calls: AtomicU64,
}

impl FileSystem for FaultyFs {
    fn sync_mapped_range(
        &self,
        path: &Path,
        map: &MmapRaw,
        offset: usize,
        len: usize,
    ) -> std::io::Result<()> {
        self.flush_calls.fetch_add(1, Ordering::Relaxed);
        if self.fail_flush.load(Ordering::SeqCst) || self.fail_mapped_sync.load(Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(5)); // EIO
        }
        RealFileSystem.sync_mapped_range(path, map, offset, len)
    }

    fn sync_file_data(&self, file: &std::fs::File) -> std::io::Result<()> {
        self.flush_calls.fetch_add(1, Ordering::Relaxed);
        if self.fail_flush.load(Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(5));
        }
        RealFileSystem.sync_file_data(file)
    }

    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        RealFileSystem.sync_dir(dir)
    }

    fn disk_usage(&self, path: &Path) -> std::io::Result<DiskUsage> {
        match self.used_per_mille.load(Ordering::SeqCst) {
            0 => RealFileSystem.disk_usage(path),
            used => Ok(DiskUsage {
                total_bytes: 1000,
                free_bytes: 1000 - used,
                available_bytes: 1000 - used,
            }),
        }
    }
}

pub fn options_with(fs: Arc<FaultyFs>) -> StoreOptions {
    StoreOptions {
        fs,
        ..StoreOptions::for_tests()
    }
}

/// Appends messages `range` and waits until each is durable.
pub fn append_all(
    store: &MessageStore,
    range: std::ops::Range<u64>,
    body_len: usize,
) -> Vec<ferrumq_storage::Appended> {
    let mut out = Vec::new();
    for n in range {
        let message = TestMessage::new(n, body_len);
        let appended = store.append(&message.record()).unwrap();
        store.durable(appended.end()).wait().unwrap();
        out.push(appended);
    }
    out
}
