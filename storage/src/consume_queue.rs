//! Consume queues: per (topic, queue id), one fixed-width entry per message, in queue-offset
//! order, pointing into the commit log.
//!
//! Entry `n` of a queue is at byte `(n - file base) * 32` of the file holding it, so a look-up by
//! queue offset is arithmetic, and store timestamps never decrease along a queue, so a look-up by
//! time is a binary search. Everything here is derived: the dispatcher rebuilds it from the commit
//! log. Only the dispatcher thread writes; readers read entries below the published count.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use crate::error::{Error, IoContext, Result};
use crate::fs::FileSystem;
use crate::mapped_file::MappedFile;
use crate::pos::{LogPos, QueueOffset};
use crate::record::{get_u32, get_u64};

pub(crate) const ENTRY_LEN: usize = 32;

/// One consume-queue entry: where a message is, how big, its tag hash and when it was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsumeQueueEntry {
    pub log_pos: LogPos,
    pub size: u32,
    /// `tag_hash` of the message's tag, 0 when it has none.
    pub tag_hash: u64,
    pub store_timestamp_ms: i64,
}

impl ConsumeQueueEntry {
    fn encode(&self, dst: &mut [u8]) {
        dst[0..8].copy_from_slice(&self.log_pos.0.to_le_bytes());
        dst[8..12].copy_from_slice(&self.size.to_le_bytes());
        dst[12..20].copy_from_slice(&self.tag_hash.to_le_bytes());
        dst[20..28].copy_from_slice(&self.store_timestamp_ms.to_le_bytes());
        let crc = crc32fast::hash(&dst[..28]);
        dst[28..32].copy_from_slice(&crc.to_le_bytes());
    }

    /// `None` for an entry that was never written or was torn.
    fn decode(src: &[u8]) -> Option<ConsumeQueueEntry> {
        if crc32fast::hash(&src[..28]) != get_u32(src, 28) {
            return None;
        }
        Some(ConsumeQueueEntry {
            log_pos: LogPos(get_u64(src, 0)),
            size: get_u32(src, 8),
            tag_hash: get_u64(src, 12),
            store_timestamp_ms: get_u64(src, 20).cast_signed(),
        })
    }
}

/// The hash of a tag stored in consume-queue entries (FNV-1a, 64 bits); never 0, which means
/// "no tag".
pub fn tag_hash(tag: &str) -> u64 {
    tag_hash_bytes(tag.as_bytes())
}

/// [`tag_hash`] of a tag read from a record as bytes.
pub(crate) fn tag_hash_bytes(tag: &[u8]) -> u64 {
    match fnv1a(tag) {
        0 => 1,
        hash => hash,
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    fnv1a_parts(&[bytes])
}

/// FNV-1a of the concatenation of `parts`.
pub(crate) fn fnv1a_parts(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in parts.iter().flat_map(|part| part.iter()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

pub struct ConsumeQueue {
    topic: String,
    queue_id: u32,
    dir: PathBuf,
    entries_per_file: u64,
    fs: Arc<dyn FileSystem>,
    files: RwLock<VecDeque<Arc<MappedFile>>>,
    /// First retained offset.
    min: AtomicU64,
    /// One past the last written entry; published after the entry (Release).
    next: AtomicU64,
    /// Entries below this are durable.
    flushed: AtomicU64,
}

impl ConsumeQueue {
    /// Opens a queue's files and drops every entry at or past `boundary` (entries that were not
    /// covered by the checkpoint, or point past the valid end of the log).
    fn open(
        dir: PathBuf,
        topic: String,
        queue_id: u32,
        entries_per_file: u64,
        fs: Arc<dyn FileSystem>,
        boundary: LogPos,
    ) -> Result<ConsumeQueue> {
        let file_size = entries_per_file * ENTRY_LEN as u64;
        let mut files = VecDeque::new();
        for base in numbered_files(&dir)? {
            let path = dir.join(MappedFile::file_name(base));
            if let Some(prev) = files.back().map(|f: &Arc<MappedFile>| f.base())
                && prev + entries_per_file != base
            {
                return Err(Error::Corrupt {
                    path,
                    offset: 0,
                    reason: "consume-queue files are not contiguous",
                });
            }
            files.push_back(Arc::new(MappedFile::open(&path, base, file_size)?));
        }
        // Drop files whose entries all lie past the boundary, then cut the last one.
        let mut next = 0;
        while let Some(last) = files.back() {
            let count = valid_prefix(last, entries_per_file, boundary);
            if count == 0 && files.len() > 1 {
                last.remove()?;
                files.pop_back();
                continue;
            }
            last.discard_from(count as usize * ENTRY_LEN, fs.as_ref())?;
            next = last.base() + count;
            break;
        }
        let min = files.front().map_or(0, |f| f.base());
        let queue = ConsumeQueue {
            topic,
            queue_id,
            dir,
            entries_per_file,
            fs,
            files: RwLock::new(files),
            min: AtomicU64::new(min),
            next: AtomicU64::new(next),
            flushed: AtomicU64::new(next),
        };
        if queue.is_empty() {
            queue.min.store(next, Ordering::Release);
        }
        Ok(queue)
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub fn queue_id(&self) -> u32 {
        self.queue_id
    }

    /// The first offset that can be read.
    pub fn min_offset(&self) -> QueueOffset {
        QueueOffset(self.min.load(Ordering::Acquire))
    }

    /// One past the last entry (RocketMQ's "max offset").
    pub fn max_offset(&self) -> QueueOffset {
        QueueOffset(self.next.load(Ordering::Acquire))
    }

    pub fn is_empty(&self) -> bool {
        self.min_offset() >= self.max_offset()
    }

    /// The entry at `offset`, if it is retained and written.
    pub fn get(&self, offset: QueueOffset) -> Option<ConsumeQueueEntry> {
        if offset < self.min_offset() || offset >= self.max_offset() {
            return None;
        }
        let (file, slot) = self.locate(offset)?;
        ConsumeQueueEntry::decode(file.bytes(slot * ENTRY_LEN, (slot + 1) * ENTRY_LEN))
    }

    /// Up to `max` entries from `from` on, appended to `out`.
    pub fn read(&self, from: QueueOffset, max: usize, out: &mut Vec<ConsumeQueueEntry>) {
        let end = self.max_offset().0.min(from.0.saturating_add(max as u64));
        let mut offset = from.0.max(self.min_offset().0);
        while offset < end {
            let Some(entry) = self.get(QueueOffset(offset)) else {
                break;
            };
            out.push(entry);
            offset += 1;
        }
    }

    /// The first offset whose message was stored at or after `timestamp_ms`
    /// (`max_offset` when none was).
    pub fn offset_at_time(&self, timestamp_ms: i64) -> QueueOffset {
        let (mut low, mut high) = (self.min_offset().0, self.max_offset().0);
        while low < high {
            let mid = low + (high - low) / 2;
            match self.get(QueueOffset(mid)) {
                Some(entry) if entry.store_timestamp_ms < timestamp_ms => low = mid + 1,
                _ => high = mid,
            }
        }
        QueueOffset(low)
    }

    /// Writes the entry for `offset`. Called by the dispatcher in queue-offset order; an
    /// offset already written is skipped, so re-dispatching is harmless.
    pub(crate) fn put(&self, offset: QueueOffset, entry: &ConsumeQueueEntry) -> Result<()> {
        let next = self.next.load(Ordering::Acquire);
        if offset.0 < next {
            return Ok(());
        }
        let empty = self.read_files().is_empty();
        if offset.0 > next && !empty {
            return Err(Error::Corrupt {
                path: self.dir.clone(),
                offset: offset.0,
                reason: "queue offset skips ahead of the consume queue",
            });
        }
        let needs_file = match self.read_files().back() {
            Some(last) => offset.0 - last.base() >= self.entries_per_file,
            None => true,
        };
        if needs_file {
            std::fs::create_dir_all(&self.dir).at(&self.dir)?;
            let file = MappedFile::create(
                &self.dir,
                offset.0,
                self.entries_per_file * ENTRY_LEN as u64,
                self.fs.as_ref(),
            )?;
            self.write_files().push_back(Arc::new(file));
            if empty {
                self.min.store(offset.0, Ordering::Release);
                self.flushed.store(offset.0, Ordering::Release);
            }
        }
        let (file, slot) = self.locate(offset).ok_or_else(|| Error::Corrupt {
            path: self.dir.clone(),
            offset: offset.0,
            reason: "no consume-queue file for the offset",
        })?;
        entry.encode(file.bytes_mut(slot * ENTRY_LEN, (slot + 1) * ENTRY_LEN));
        self.next.store(offset.0 + 1, Ordering::Release);
        Ok(())
    }

    /// Makes every written entry durable.
    pub(crate) fn flush(&self) -> Result<()> {
        let (from, to) = (self.flushed.load(Ordering::Acquire), self.max_offset().0);
        if to <= from {
            return Ok(());
        }
        let files: Vec<Arc<MappedFile>> = self.read_files().iter().cloned().collect();
        for file in files {
            let (base, end) = (file.base(), file.base() + self.entries_per_file);
            if end <= from || base >= to {
                continue;
            }
            let start = (from.max(base) - base) as usize * ENTRY_LEN;
            let stop = (to.min(end) - base) as usize * ENTRY_LEN;
            file.sync(self.fs.as_ref(), start, stop).at(file.path())?;
        }
        self.flushed.store(to, Ordering::Release);
        Ok(())
    }

    /// Forgets entries that point below `log_min`: whole files are deleted, and the minimum
    /// offset moves to the first entry still in the log.
    pub(crate) fn trim_below(&self, log_min: LogPos) -> Result<()> {
        loop {
            let first = {
                let files = self.read_files();
                if files.len() < 2 {
                    break;
                }
                match files.front() {
                    Some(f) => f.clone(),
                    None => break,
                }
            };
            let last_offset = QueueOffset(first.base() + self.entries_per_file - 1);
            match self.get(last_offset) {
                Some(entry) if entry.log_pos < log_min => {
                    self.write_files().pop_front();
                    self.min
                        .fetch_max(first.base() + self.entries_per_file, Ordering::AcqRel);
                    first.remove()?;
                }
                _ => break,
            }
        }
        let (mut low, mut high) = (self.min_offset().0, self.max_offset().0);
        while low < high {
            let mid = low + (high - low) / 2;
            match self.get(QueueOffset(mid)) {
                Some(entry) if entry.log_pos < log_min => low = mid + 1,
                _ => high = mid,
            }
        }
        self.min.fetch_max(low, Ordering::AcqRel);
        Ok(())
    }

    fn locate(&self, offset: QueueOffset) -> Option<(Arc<MappedFile>, usize)> {
        let files = self.read_files();
        let first = files.front()?.base();
        let index = offset.0.checked_sub(first)? / self.entries_per_file;
        let file = files.get(usize::try_from(index).ok()?)?.clone();
        let slot = (offset.0 - file.base()) as usize;
        Some((file, slot))
    }

    fn read_files(&self) -> std::sync::RwLockReadGuard<'_, VecDeque<Arc<MappedFile>>> {
        self.files.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_files(&self) -> std::sync::RwLockWriteGuard<'_, VecDeque<Arc<MappedFile>>> {
        self.files.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The number of leading entries of `file` that are intact and point below `boundary`.
/// Entries are written in order and made durable before the checkpoint that covers them, so
/// these form a prefix and a binary search finds its end.
fn valid_prefix(file: &MappedFile, entries_per_file: u64, boundary: LogPos) -> u64 {
    let keep = |slot: u64| {
        let at = slot as usize * ENTRY_LEN;
        ConsumeQueueEntry::decode(file.bytes(at, at + ENTRY_LEN))
            .is_some_and(|e| e.log_pos < boundary)
    };
    let (mut low, mut high) = (0, entries_per_file);
    while low < high {
        let mid = low + (high - low) / 2;
        if keep(mid) { low = mid + 1 } else { high = mid }
    }
    low
}

/// The numbers of the `{:020}`-named files in `dir`, ascending; none if `dir` is missing.
pub(crate) fn numbered_files(dir: &Path) -> Result<Vec<u64>> {
    let mut numbers = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(numbers),
        Err(e) => return Err(e).at(dir),
    };
    for entry in entries {
        let name = entry.at(dir)?.file_name();
        if let Some(name) = name.to_str()
            && name.len() == 20
            && let Ok(number) = name.parse::<u64>()
        {
            numbers.push(number);
        }
    }
    numbers.sort_unstable();
    Ok(numbers)
}

/// Every consume queue of the store, under `<data>/consumequeue/<topic>/<queue id>/`.
pub(crate) struct ConsumeQueues {
    root: PathBuf,
    entries_per_file: u64,
    fs: Arc<dyn FileSystem>,
    queues: RwLock<HashMap<String, HashMap<u32, Arc<ConsumeQueue>>>>,
}

impl ConsumeQueues {
    pub(crate) fn open(
        root: PathBuf,
        entries_per_file: u64,
        fs: Arc<dyn FileSystem>,
        boundary: LogPos,
    ) -> Result<ConsumeQueues> {
        std::fs::create_dir_all(&root).at(&root)?;
        let mut queues: HashMap<String, HashMap<u32, Arc<ConsumeQueue>>> = HashMap::new();
        for topic_entry in std::fs::read_dir(&root).at(&root)? {
            let topic_entry = topic_entry.at(&root)?;
            let Some(topic) = topic_entry
                .file_name()
                .to_str()
                .and_then(topic_from_dir_name)
            else {
                continue;
            };
            for queue_entry in std::fs::read_dir(topic_entry.path()).at(&topic_entry.path())? {
                let queue_entry = queue_entry.at(&topic_entry.path())?;
                let Some(queue_id) = queue_entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse().ok())
                else {
                    continue;
                };
                let queue = ConsumeQueue::open(
                    queue_entry.path(),
                    topic.clone(),
                    queue_id,
                    entries_per_file,
                    fs.clone(),
                    boundary,
                )?;
                queues
                    .entry(topic.clone())
                    .or_default()
                    .insert(queue_id, Arc::new(queue));
            }
        }
        Ok(ConsumeQueues {
            root,
            entries_per_file,
            fs,
            queues: RwLock::new(queues),
        })
    }

    pub(crate) fn get(&self, topic: &str, queue_id: u32) -> Option<Arc<ConsumeQueue>> {
        self.read().get(topic)?.get(&queue_id).cloned()
    }

    /// Every queue, for listings and checkpoints.
    pub(crate) fn all(&self) -> Vec<Arc<ConsumeQueue>> {
        self.read()
            .values()
            .flat_map(|q| q.values().cloned())
            .collect()
    }

    pub(crate) fn get_or_create(&self, topic: &str, queue_id: u32) -> Arc<ConsumeQueue> {
        if let Some(queue) = self.get(topic, queue_id) {
            return queue;
        }
        let mut queues = self.queues.write().unwrap_or_else(PoisonError::into_inner);
        let by_id = queues.entry(topic.to_owned()).or_default();
        by_id
            .entry(queue_id)
            .or_insert_with(|| {
                let dir = self
                    .root
                    .join(topic_dir_name(topic))
                    .join(queue_id.to_string());
                Arc::new(ConsumeQueue {
                    topic: topic.to_owned(),
                    queue_id,
                    dir,
                    entries_per_file: self.entries_per_file,
                    fs: self.fs.clone(),
                    files: RwLock::new(VecDeque::new()),
                    min: AtomicU64::new(0),
                    next: AtomicU64::new(0),
                    flushed: AtomicU64::new(0),
                })
            })
            .clone()
    }

    pub(crate) fn flush(&self) -> Result<()> {
        self.all().iter().try_for_each(|q| q.flush())
    }

    pub(crate) fn trim_below(&self, log_min: LogPos) -> Result<()> {
        self.all().iter().try_for_each(|q| q.trim_below(log_min))
    }

    fn read(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, HashMap<String, HashMap<u32, Arc<ConsumeQueue>>>> {
        self.queues.read().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A topic as a directory name: kept as is when it is made of `[A-Za-z0-9_%-]`, hex-encoded
/// behind a `~` otherwise, so no topic can name a path outside the queue root.
fn topic_dir_name(topic: &str) -> String {
    let plain = !topic.is_empty()
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'%');
    if plain {
        return topic.to_owned();
    }
    let mut name = String::with_capacity(1 + topic.len() * 2);
    name.push('~');
    for byte in topic.bytes() {
        name.push_str(&format!("{byte:02x}"));
    }
    name
}

fn topic_from_dir_name(name: &str) -> Option<String> {
    let Some(hex) = name.strip_prefix('~') else {
        return Some(name.to_owned());
    };
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect();
    String::from_utf8(bytes?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_round_trip_and_torn_entry() {
        let entry = ConsumeQueueEntry {
            log_pos: LogPos(123),
            size: 77,
            tag_hash: tag_hash("paid"),
            store_timestamp_ms: 1_700_000_000_000,
        };
        let mut buf = [0u8; ENTRY_LEN];
        entry.encode(&mut buf);
        assert_eq!(ConsumeQueueEntry::decode(&buf), Some(entry));
        assert_eq!(ConsumeQueueEntry::decode(&[0u8; ENTRY_LEN]), None);
        buf[3] ^= 1;
        assert_eq!(ConsumeQueueEntry::decode(&buf), None);
    }

    #[test]
    fn topic_names_map_to_safe_directories() {
        for topic in ["orders", "%RETRY%g1", "../etc", "a/b", "日本", "."] {
            let dir = topic_dir_name(topic);
            assert!(!dir.contains('/') && dir != "." && dir != "..", "{dir}");
            assert_eq!(topic_from_dir_name(&dir).as_deref(), Some(topic));
        }
    }
}
