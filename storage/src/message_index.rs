//! The message index: message id and message keys → commit-log positions, for queries by id or
//! key within a time range.
//!
//! Each index file is a hash table with chaining, laid out in place (see FORMAT.md): a header,
//! `slot_count` slots holding the newest entry of their chain, and `capacity` entries that each
//! point to the previous entry of the same slot. Entries are appended in log order and carry a
//! CRC, so recovery finds the intact prefix with a binary search and rebuilds the slots of the
//! newest file from its entries. A hit is only a candidate: the caller re-checks the record,
//! since different keys can share a hash.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};

use crate::consume_queue::{fnv1a_parts, numbered_files};
use crate::error::{Error, IoContext, Result};
use crate::fs::{FileSystem, create_dir_all_durably};
use crate::mapped_file::MappedFile;
use crate::pos::LogPos;
use crate::record::{get_u32, get_u64};

const INDEX_MAGIC: u32 = u32::from_le_bytes(*b"FQI1");
const INDEX_VERSION: u32 = 1;
const HEADER_LEN: usize = 64;
const SLOT_LEN: usize = 4;
pub(crate) const INDEX_ENTRY_LEN: usize = 32;

/// What an index key names.
#[derive(Debug, Clone, Copy)]
pub enum IndexKey<'a> {
    /// A message id; ids are unique across topics.
    MessageId(&'a str),
    /// A message key within a topic.
    Key { topic: &'a str, key: &'a str },
}

impl IndexKey<'_> {
    /// FNV-1a over the key's parts, without building the key in memory (dispatch hot path).
    /// The index files hold these hashes, so they never change.
    pub fn hash(&self) -> u64 {
        match self {
            IndexKey::MessageId(id) => message_id_hash(id.as_bytes()),
            IndexKey::Key { topic, key } => message_key_hash(topic.as_bytes(), key.as_bytes()),
        }
    }
}

/// [`IndexKey::MessageId`]'s hash, from bytes read out of a record.
pub(crate) fn message_id_hash(id: &[u8]) -> u64 {
    fnv1a_parts(&[b"I", id])
}

/// [`IndexKey::Key`]'s hash, from bytes read out of a record.
pub(crate) fn message_key_hash(topic: &[u8], key: &[u8]) -> u64 {
    fnv1a_parts(&[b"K", topic, &[0], key])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IndexEntry {
    key_hash: u64,
    log_pos: LogPos,
    store_timestamp_ms: i64,
    /// The previous entry of the same slot, as entry number + 1 (0: none).
    prev: u32,
}

impl IndexEntry {
    fn encode(&self, dst: &mut [u8]) {
        dst[0..8].copy_from_slice(&self.key_hash.to_le_bytes());
        dst[8..16].copy_from_slice(&self.log_pos.0.to_le_bytes());
        dst[16..24].copy_from_slice(&self.store_timestamp_ms.to_le_bytes());
        dst[24..28].copy_from_slice(&self.prev.to_le_bytes());
        let crc = crc32fast::hash(&dst[..28]);
        dst[28..32].copy_from_slice(&crc.to_le_bytes());
    }

    fn decode(src: &[u8]) -> Option<IndexEntry> {
        if crc32fast::hash(&src[..28]) != get_u32(src, 28) {
            return None;
        }
        Some(IndexEntry {
            key_hash: get_u64(src, 0),
            log_pos: LogPos(get_u64(src, 8)),
            store_timestamp_ms: get_u64(src, 16).cast_signed(),
            prev: get_u32(src, 24),
        })
    }
}

/// The shape of index files: how many slots and entries each holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexShape {
    pub slots: u32,
    pub entries: u32,
}

impl IndexShape {
    fn file_size(&self) -> u64 {
        (HEADER_LEN + self.slots as usize * SLOT_LEN + self.entries as usize * INDEX_ENTRY_LEN)
            as u64
    }
    fn entry_at(&self, n: u32) -> usize {
        HEADER_LEN + self.slots as usize * SLOT_LEN + n as usize * INDEX_ENTRY_LEN
    }
    fn slot_at(&self, slot: u32) -> usize {
        HEADER_LEN + slot as usize * SLOT_LEN
    }
}

struct IndexFile {
    map: MappedFile,
    count: u32,
    /// Entries below this are durable.
    flushed: u32,
    first_timestamp_ms: i64,
    last_timestamp_ms: i64,
    last_log_pos: LogPos,
}

impl IndexFile {
    fn entry(&self, shape: IndexShape, n: u32) -> Option<IndexEntry> {
        let at = shape.entry_at(n);
        IndexEntry::decode(self.map.bytes(at, at + INDEX_ENTRY_LEN))
    }

    fn slot(&self, shape: IndexShape, slot: u32) -> u32 {
        let at = shape.slot_at(slot);
        get_u32(self.map.bytes(at, at + SLOT_LEN), 0)
    }

    fn set_slot(&self, shape: IndexShape, slot: u32, value: u32) {
        let at = shape.slot_at(slot);
        self.map
            .bytes_mut(at, at + SLOT_LEN)
            .copy_from_slice(&value.to_le_bytes());
    }

    fn add(&mut self, shape: IndexShape, key_hash: u64, log_pos: LogPos, timestamp_ms: i64) {
        let slot = (key_hash % u64::from(shape.slots)) as u32;
        let entry = IndexEntry {
            key_hash,
            log_pos,
            store_timestamp_ms: timestamp_ms,
            prev: self.slot(shape, slot),
        };
        let at = shape.entry_at(self.count);
        entry.encode(self.map.bytes_mut(at, at + INDEX_ENTRY_LEN));
        self.count += 1;
        self.set_slot(shape, slot, self.count);
        if self.count == 1 {
            self.first_timestamp_ms = timestamp_ms;
        }
        self.last_timestamp_ms = timestamp_ms;
        self.last_log_pos = log_pos;
    }

    /// Points every slot that names an entry at or past `count` back at the newest entry of
    /// its chain below `count`, following the dropped entries' `prev` links. Slots of entries
    /// below `count` were made durable with them by the checkpoint that covered them, so only
    /// slots changed after it can be wrong. Cost: one pass over the slots plus the dropped
    /// entries, not the whole file. Returns false when a dropped entry it needs is unreadable
    /// (torn by an operating-system crash); then only `rebuild_slots` can help.
    fn repair_slots(&mut self, shape: IndexShape) -> bool {
        for slot in 0..shape.slots {
            let mut newest = self.slot(shape, slot);
            if newest <= self.count {
                continue;
            }
            while newest > self.count {
                match self.entry(shape, newest - 1) {
                    Some(entry)
                        if (entry.key_hash % u64::from(shape.slots)) as u32 == slot
                            && entry.prev < newest =>
                    {
                        newest = entry.prev;
                    }
                    _ => return false,
                }
            }
            self.set_slot(shape, slot, newest);
        }
        true
    }

    /// Recomputes every slot from the entries (after a crash the slots may point at entries
    /// that did not survive).
    fn rebuild_slots(&mut self, shape: IndexShape) {
        let start = shape.slot_at(0);
        self.map
            .bytes_mut(start, start + shape.slots as usize * SLOT_LEN)
            .fill(0);
        for n in 0..self.count {
            if let Some(mut entry) = self.entry(shape, n) {
                let slot = (entry.key_hash % u64::from(shape.slots)) as u32;
                let prev = self.slot(shape, slot);
                if entry.prev != prev {
                    entry.prev = prev;
                    let at = shape.entry_at(n);
                    entry.encode(self.map.bytes_mut(at, at + INDEX_ENTRY_LEN));
                }
                self.set_slot(shape, slot, n + 1);
            }
        }
    }
}

pub struct MessageIndex {
    dir: PathBuf,
    shape: IndexShape,
    fs: Arc<dyn FileSystem>,
    files: RwLock<VecDeque<IndexFile>>,
}

impl MessageIndex {
    /// Opens the index and drops every entry at or past `boundary`. After an unclean shutdown
    /// (`clean == false`) the slots of the newest file are rebuilt from its entries.
    pub(crate) fn open(
        dir: PathBuf,
        shape: IndexShape,
        fs: Arc<dyn FileSystem>,
        boundary: LogPos,
        clean: bool,
    ) -> Result<MessageIndex> {
        if shape.slots == 0 || shape.entries == 0 {
            return Err(Error::InvalidOption {
                field: "index shape",
                reason: "slots and entries must be at least 1".into(),
            });
        }
        create_dir_all_durably(fs.as_ref(), &dir).at(&dir)?;
        let mut files = VecDeque::new();
        for number in numbered_files(&dir)? {
            let path = dir.join(MappedFile::file_name(number));
            let map = MappedFile::open(&path, number, shape.file_size())?;
            let header = map.bytes(0, HEADER_LEN);
            if get_u32(header, 0) != INDEX_MAGIC
                || get_u32(header, 4) != INDEX_VERSION
                || get_u32(header, 8) != shape.slots
                || get_u32(header, 12) != shape.entries
            {
                // Index files are derived; one that does not match is rebuilt from the log.
                tracing::warn!(path = %path.display(), "index file header does not match; dropping it");
                map.remove()?;
                continue;
            }
            files.push_back(IndexFile {
                map,
                count: 0,
                flushed: 0,
                first_timestamp_ms: 0,
                last_timestamp_ms: 0,
                last_log_pos: LogPos::ZERO,
            });
        }
        let mut recovered = VecDeque::with_capacity(files.len());
        let mut newest = true;
        while let Some(mut file) = files.pop_back() {
            let count = valid_prefix(&file, shape, boundary);
            if count == 0 && newest {
                file.map.remove()?;
                continue;
            }
            file.count = count;
            file.flushed = count;
            if count > 0 {
                file.first_timestamp_ms = file.entry(shape, 0).map_or(0, |e| e.store_timestamp_ms);
                if let Some(last) = file.entry(shape, count - 1) {
                    file.last_timestamp_ms = last.store_timestamp_ms;
                    file.last_log_pos = last.log_pos;
                }
            }
            if newest {
                let repaired = clean || file.repair_slots(shape);
                file.map.discard_from(shape.entry_at(count), fs.as_ref())?;
                if !repaired {
                    tracing::warn!(path = %file.map.path().display(), "index slots unrepairable; rebuilding them from every entry");
                    file.rebuild_slots(shape);
                }
                if !clean {
                    file.map
                        .sync(fs.as_ref(), 0, shape.entry_at(count))
                        .at(file.map.path())?;
                }
            }
            newest = false;
            recovered.push_front(file);
        }
        let files = recovered;
        Ok(MessageIndex {
            dir,
            shape,
            fs,
            files: RwLock::new(files),
        })
    }

    /// Adds entries for one record. Called by the dispatcher in log order.
    pub(crate) fn add(
        &self,
        keys: impl IntoIterator<Item = u64>,
        log_pos: LogPos,
        timestamp_ms: i64,
    ) -> Result<()> {
        let mut files = self.files.write().unwrap_or_else(PoisonError::into_inner);
        for key_hash in keys {
            let full = files.back().is_none_or(|f| f.count >= self.shape.entries);
            if full {
                files.push_back(self.create_file(log_pos)?);
            }
            if let Some(file) = files.back_mut() {
                file.add(self.shape, key_hash, log_pos, timestamp_ms);
            }
        }
        Ok(())
    }

    /// Positions of records indexed under `key` and stored within `[from_ms, to_ms]`, newest
    /// first, at most `max`. Candidates only: re-check each record.
    pub fn lookup(&self, key: IndexKey<'_>, from_ms: i64, to_ms: i64, max: usize) -> Vec<LogPos> {
        let key_hash = key.hash();
        let slot = (key_hash % u64::from(self.shape.slots)) as u32;
        let files = self.files.read().unwrap_or_else(PoisonError::into_inner);
        let mut found = Vec::new();
        for file in files.iter().rev() {
            if file.count == 0
                || file.last_timestamp_ms < from_ms
                || file.first_timestamp_ms > to_ms
            {
                continue;
            }
            let mut next = file.slot(self.shape, slot);
            // A chain is at most `count` long; the bound guards against a damaged file.
            let mut steps = 0;
            while next > 0 && next <= file.count && steps < file.count && found.len() < max {
                let Some(entry) = file.entry(self.shape, next - 1) else {
                    break;
                };
                if entry.key_hash == key_hash
                    && (from_ms..=to_ms).contains(&entry.store_timestamp_ms)
                {
                    found.push(entry.log_pos);
                }
                if entry.prev >= next {
                    break;
                }
                next = entry.prev;
                steps += 1;
            }
        }
        found
    }

    /// Every entry stored at or after `since_ms`, newest first, at most `max`: the key's
    /// hash and its record's position and store time.
    pub fn newest(&self, since_ms: i64, max: usize) -> Vec<(u64, LogPos, i64)> {
        let files = self.files.read().unwrap_or_else(PoisonError::into_inner);
        let mut found = Vec::new();
        for file in files.iter().rev() {
            if file.count == 0 || file.last_timestamp_ms < since_ms {
                break;
            }
            for n in (0..file.count).rev() {
                match file.entry(self.shape, n) {
                    Some(entry) if entry.store_timestamp_ms >= since_ms && found.len() < max => {
                        found.push((entry.key_hash, entry.log_pos, entry.store_timestamp_ms));
                    }
                    _ => return found,
                }
            }
        }
        found
    }

    /// Makes every entry and slot written so far durable.
    pub(crate) fn flush(&self) -> Result<()> {
        let mut files = self.files.write().unwrap_or_else(PoisonError::into_inner);
        for file in files.iter_mut() {
            if file.flushed == file.count {
                continue;
            }
            // The slots change with every entry, so the whole front of the file is flushed.
            file.map
                .sync(self.fs.as_ref(), 0, self.shape.entry_at(file.count))
                .at(file.map.path())?;
            file.flushed = file.count;
        }
        Ok(())
    }

    /// Deletes index files whose every entry points below `log_min`.
    pub(crate) fn trim_below(&self, log_min: LogPos) -> Result<()> {
        let mut files = self.files.write().unwrap_or_else(PoisonError::into_inner);
        while files.len() > 1 && files.front().is_some_and(|f| f.last_log_pos < log_min) {
            if let Some(file) = files.pop_front() {
                file.map.remove()?;
            }
        }
        Ok(())
    }

    fn create_file(&self, first: LogPos) -> Result<IndexFile> {
        let map = MappedFile::create(&self.dir, first.0, self.shape.file_size(), self.fs.as_ref())?;
        let header = map.bytes_mut(0, HEADER_LEN);
        header[0..4].copy_from_slice(&INDEX_MAGIC.to_le_bytes());
        header[4..8].copy_from_slice(&INDEX_VERSION.to_le_bytes());
        header[8..12].copy_from_slice(&self.shape.slots.to_le_bytes());
        header[12..16].copy_from_slice(&self.shape.entries.to_le_bytes());
        Ok(IndexFile {
            map,
            count: 0,
            flushed: 0,
            first_timestamp_ms: 0,
            last_timestamp_ms: 0,
            last_log_pos: first,
        })
    }
}

/// How many leading entries are intact and point below `boundary` (a prefix: see module doc).
fn valid_prefix(file: &IndexFile, shape: IndexShape, boundary: LogPos) -> u32 {
    let (mut low, mut high) = (0u32, shape.entries);
    while low < high {
        let mid = low + (high - low) / 2;
        if file.entry(shape, mid).is_some_and(|e| e.log_pos < boundary) {
            low = mid + 1;
        } else {
            high = mid;
        }
    }
    low
}
