//! Consume queues: per (topic, queue id), one fixed-width entry per message, in queue-offset
//! order, pointing into the commit log.
//!
//! Entry `n` of a queue is at byte `(n - file base) * 32` of the file holding it, so a look-up by
//! queue offset is arithmetic, and store timestamps never decrease along a queue, so a look-up by
//! time is a binary search. Everything here is derived: the dispatcher rebuilds it from the commit
//! log. Only the dispatcher thread writes; readers read entries below the published count.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use crate::error::{Error, IoContext, Result};
use crate::fs::{FileSystem, create_dir_all_durably};
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
    /// Maps a queue's files. Entries at or past `boundary` must be gone already (`recover_tail`
    /// after an unclean stop); the queue ends at the last entry below it.
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
            let mut file = MappedFile::open(&path, base, file_size)?;
            file.advise_random();
            file.release_descriptor();
            files.push_back(Arc::new(file));
        }
        let next = files.back().map_or(0, |last| {
            last.base() + valid_prefix(entries_per_file, boundary, |slot| last.entry(slot))
        });
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
    /// offset already written is skipped, so re-dispatching is harmless. A file this creates
    /// is made durable, name and all, by the next checkpoint (see [`NewDirs`]).
    pub(crate) fn put(
        &self,
        offset: QueueOffset,
        entry: &ConsumeQueueEntry,
        new_dirs: &NewDirs,
    ) -> Result<()> {
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
            new_dirs.created(&self.dir)?;
            let mut file = MappedFile::create_unsynced(
                &self.dir,
                offset.0,
                self.entries_per_file * ENTRY_LEN as u64,
            )?;
            file.advise_random();
            file.release_descriptor();
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

impl MappedFile {
    /// The entry in `slot` of a consume-queue file.
    fn entry(&self, slot: u64) -> Option<ConsumeQueueEntry> {
        let at = slot as usize * ENTRY_LEN;
        ConsumeQueueEntry::decode(self.bytes(at, at + ENTRY_LEN))
    }
}

/// The number of leading entries among a file's first `slots` that are intact and point below
/// `boundary`, with `entry` reading a slot. Entries are written in order and made durable
/// before the checkpoint that covers them, so these form a prefix and a binary search finds
/// its end.
fn valid_prefix(
    slots: u64,
    boundary: LogPos,
    entry: impl Fn(u64) -> Option<ConsumeQueueEntry>,
) -> u64 {
    let keep = |slot: u64| entry(slot).is_some_and(|e| e.log_pos < boundary);
    let (mut low, mut high) = (0, slots);
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

/// Drops the entries of one queue's files (`dir`) that point at or past `boundary`, after an
/// unclean stop: they were written after the last checkpoint, may be torn, and may point at
/// records the log no longer has. Reads with `pread` and maps nothing; a file is cut only when
/// something past its valid prefix is not zero, so a queue that was idle at the crash costs a
/// few reads. Cut files and changed directories go into `changed`, to be made durable together.
fn recover_tail(
    dir: &Path,
    entries_per_file: u64,
    boundary: LogPos,
    changed: &mut Changed,
) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let file_size = entries_per_file * ENTRY_LEN as u64;
    let mut bases = numbered_files(dir)?;
    while let Some(base) = bases.pop() {
        let path = dir.join(MappedFile::file_name(base));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .at(&path)?;
        // Entries are written from slot 0 on, so the valid ones lie before the first hole.
        let data_end = crate::mapped_file::data_end(&file).at(&path)?;
        let slots = (data_end / ENTRY_LEN as u64).min(entries_per_file);
        let count = if slots * ENTRY_LEN as u64 <= READ_WHOLE_BYTES {
            let mut bytes = vec![0u8; (slots * ENTRY_LEN as u64) as usize];
            file.read_exact_at(&mut bytes, 0).at(&path)?;
            valid_prefix(slots, boundary, |slot| {
                let at = slot as usize * ENTRY_LEN;
                ConsumeQueueEntry::decode(&bytes[at..at + ENTRY_LEN])
            })
        } else {
            // A slot that cannot be read is an error, never an entry to cut away.
            let failure = std::cell::RefCell::new(None);
            let count = valid_prefix(slots, boundary, |slot| {
                let mut bytes = [0u8; ENTRY_LEN];
                match file.read_exact_at(&mut bytes, slot * ENTRY_LEN as u64) {
                    Ok(()) => ConsumeQueueEntry::decode(&bytes),
                    Err(error) => {
                        failure.borrow_mut().get_or_insert(error);
                        None
                    }
                }
            });
            if let Some(error) = failure.into_inner() {
                return Err(error).at(&path);
            }
            count
        };
        if count == 0 && !bases.is_empty() {
            std::fs::remove_file(&path).at(&path)?;
            changed.dirs.push(dir.to_path_buf());
            continue;
        }
        let cut = count * ENTRY_LEN as u64;
        if crate::mapped_file::holds_data_from(&file, cut).at(&path)? {
            file.set_len(cut).at(&path)?;
            file.set_len(file_size).at(&path)?;
            changed.files.push(path);
        }
        break;
    }
    Ok(())
}

/// Up to this many bytes of a queue file's data, `recover_tail` reads in one call rather than
/// entry by entry.
const READ_WHOLE_BYTES: u64 = 64 << 10;

/// What `recover_tail` changed on disk.
#[derive(Default)]
struct Changed {
    files: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
}

impl Changed {
    /// Makes every change durable. Done after all of them, the file system commits them
    /// together: the first sync carries the rest, which then find nothing left to write.
    fn sync(&self, fs: &dyn FileSystem) -> Result<()> {
        for path in &self.files {
            let file = std::fs::File::open(path).at(path)?;
            fs.sync_file_data(&file).at(path)?;
        }
        self.dirs
            .iter()
            .try_for_each(|dir| fs.sync_dir(dir).at(dir))
    }
}

/// Directories that gained an entry (a consume-queue file, or a queue or topic directory)
/// since the last checkpoint. Creating a file does not wait for an fsync of its directory:
/// the checkpoint syncs each such directory once before it records that dispatch passed the
/// entries in them, so a burst of new queues costs one journal commit, not two fsyncs each.
#[derive(Default)]
pub(crate) struct NewDirs(Mutex<BTreeSet<PathBuf>>);

impl NewDirs {
    /// Creates `dir` and its missing parents below the queue root, noting each directory whose
    /// entries changed.
    fn created(&self, dir: &Path) -> Result<()> {
        let mut dirs = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        dirs.insert(dir.to_path_buf());
        let mut missing = dir;
        while !missing.exists() {
            let Some(parent) = missing.parent() else {
                break;
            };
            dirs.insert(parent.to_path_buf());
            missing = parent;
        }
        drop(dirs);
        std::fs::create_dir_all(dir).at(dir)
    }

    /// Makes every noted directory's entries durable.
    pub(crate) fn sync(&self, fs: &dyn FileSystem) -> Result<()> {
        let dirs = std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner));
        // Deepest first, so a directory's own name is synced after what it holds.
        dirs.iter()
            .rev()
            .try_for_each(|dir| fs.sync_dir(dir).at(dir))
    }
}

/// A queue of the store: mapped once something used it, or still only on disk.
enum Slot {
    OnDisk,
    Open(Arc<ConsumeQueue>),
}

/// Every consume queue of the store, under `<data>/consumequeue/<topic>/<queue id>/`.
///
/// A queue's files are mapped the first time it is used, so opening a store costs what
/// recovery changed rather than what the topics cost: a store of 80,000 queues lists their
/// directories at open and maps none of them.
pub(crate) struct ConsumeQueues {
    root: PathBuf,
    entries_per_file: u64,
    fs: Arc<dyn FileSystem>,
    /// Every entry of a queue still on disk points below this.
    boundary: LogPos,
    /// The log's first position: a queue opened later forgets entries below it.
    log_min: AtomicU64,
    queues: RwLock<HashMap<String, HashMap<u32, Slot>>>,
    new_dirs: NewDirs,
}

impl ConsumeQueues {
    /// Lists the queues under `root`. Unless the previous run stopped cleanly with the log
    /// intact up to `boundary` (`trusted`), each queue's entries at or past `boundary` are
    /// dropped first (`recover_tail`).
    pub(crate) fn open(
        root: PathBuf,
        entries_per_file: u64,
        fs: Arc<dyn FileSystem>,
        boundary: LogPos,
        trusted: bool,
    ) -> Result<ConsumeQueues> {
        create_dir_all_durably(fs.as_ref(), &root).at(&root)?;
        let mut queues: HashMap<String, HashMap<u32, Slot>> = HashMap::new();
        let mut changed = Changed::default();
        for topic_entry in std::fs::read_dir(&root).at(&root)? {
            let topic_entry = topic_entry.at(&root)?;
            let Some(topic) = topic_entry
                .file_name()
                .to_str()
                .and_then(topic_from_dir_name)
            else {
                continue;
            };
            let topic_dir = topic_entry.path();
            let by_id = queues.entry(topic).or_default();
            for queue_entry in std::fs::read_dir(&topic_dir).at(&topic_dir)? {
                let queue_entry = queue_entry.at(&topic_dir)?;
                let Some(queue_id) = queue_entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse().ok())
                else {
                    continue;
                };
                if !trusted {
                    recover_tail(
                        &queue_entry.path(),
                        entries_per_file,
                        boundary,
                        &mut changed,
                    )?;
                }
                by_id.insert(queue_id, Slot::OnDisk);
            }
        }
        changed.sync(fs.as_ref())?;
        Ok(ConsumeQueues {
            root,
            entries_per_file,
            fs,
            boundary,
            log_min: AtomicU64::new(0),
            queues: RwLock::new(queues),
            new_dirs: NewDirs::default(),
        })
    }

    /// The queue, mapped if this is its first use; `None` if it has never had an entry.
    pub(crate) fn get(&self, topic: &str, queue_id: u32) -> Result<Option<Arc<ConsumeQueue>>> {
        match self
            .read()
            .get(topic)
            .and_then(|by_id| by_id.get(&queue_id))
        {
            None => return Ok(None),
            Some(Slot::Open(queue)) => return Ok(Some(queue.clone())),
            Some(Slot::OnDisk) => {}
        }
        let mut queues = self.write();
        let Some(slot) = queues
            .get_mut(topic)
            .and_then(|by_id| by_id.get_mut(&queue_id))
        else {
            return Ok(None);
        };
        if let Slot::Open(queue) = slot {
            return Ok(Some(queue.clone()));
        }
        let queue = Arc::new(ConsumeQueue::open(
            self.queue_dir(topic, queue_id),
            topic.to_owned(),
            queue_id,
            self.entries_per_file,
            self.fs.clone(),
            self.boundary,
        )?);
        queue.trim_below(LogPos(self.log_min.load(Ordering::Acquire)))?;
        *slot = Slot::Open(queue.clone());
        Ok(Some(queue))
    }

    /// Every queue, each mapped: for listings and tests, not for a hot path.
    pub(crate) fn all(&self) -> Result<Vec<Arc<ConsumeQueue>>> {
        let keys: Vec<(String, u32)> = self
            .read()
            .iter()
            .flat_map(|(topic, by_id)| by_id.keys().map(|id| (topic.clone(), *id)))
            .collect();
        let mut all = Vec::with_capacity(keys.len());
        for (topic, queue_id) in keys {
            all.extend(self.get(&topic, queue_id)?);
        }
        Ok(all)
    }

    /// The queues mapped so far: only these can hold entries that are not yet durable.
    fn opened(&self) -> Vec<Arc<ConsumeQueue>> {
        self.read()
            .values()
            .flat_map(|by_id| by_id.values())
            .filter_map(|slot| match slot {
                Slot::Open(queue) => Some(queue.clone()),
                Slot::OnDisk => None,
            })
            .collect()
    }

    pub(crate) fn get_or_create(&self, topic: &str, queue_id: u32) -> Result<Arc<ConsumeQueue>> {
        if let Some(queue) = self.get(topic, queue_id)? {
            return Ok(queue);
        }
        let mut queues = self.write();
        let by_id = queues.entry(topic.to_owned()).or_default();
        let slot = by_id.entry(queue_id).or_insert_with(|| {
            Slot::Open(Arc::new(ConsumeQueue {
                topic: topic.to_owned(),
                queue_id,
                dir: self.queue_dir(topic, queue_id),
                entries_per_file: self.entries_per_file,
                fs: self.fs.clone(),
                files: RwLock::new(VecDeque::new()),
                min: AtomicU64::new(0),
                next: AtomicU64::new(0),
                flushed: AtomicU64::new(0),
            }))
        });
        match slot {
            Slot::Open(queue) => Ok(queue.clone()),
            // Only `get` above turns an on-disk slot into an open one, and it just did.
            Slot::OnDisk => Err(Error::Corrupt {
                path: self.queue_dir(topic, queue_id),
                offset: 0,
                reason: "consume queue appeared on disk while being created",
            }),
        }
    }

    /// Writes `entry` to its queue; see [`ConsumeQueue::put`].
    pub(crate) fn put(
        &self,
        queue: &ConsumeQueue,
        offset: QueueOffset,
        entry: &ConsumeQueueEntry,
    ) -> Result<()> {
        queue.put(offset, entry, &self.new_dirs)
    }

    /// Makes every written entry durable, and the names of the files and directories created
    /// for them.
    pub(crate) fn flush(&self) -> Result<()> {
        self.opened().iter().try_for_each(|q| q.flush())?;
        self.new_dirs.sync(self.fs.as_ref())
    }

    /// Forgets entries below `log_min` in the mapped queues; the others forget them when
    /// they are first used.
    pub(crate) fn trim_below(&self, log_min: LogPos) -> Result<()> {
        self.log_min.fetch_max(log_min.0, Ordering::AcqRel);
        self.opened().iter().try_for_each(|q| q.trim_below(log_min))
    }

    fn queue_dir(&self, topic: &str, queue_id: u32) -> PathBuf {
        self.root
            .join(topic_dir_name(topic))
            .join(queue_id.to_string())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, HashMap<u32, Slot>>> {
        self.queues.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, HashMap<u32, Slot>>> {
        self.queues.write().unwrap_or_else(PoisonError::into_inner)
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
    use std::sync::atomic::AtomicUsize;

    use memmap2::MmapRaw;

    use super::*;
    use crate::fs::{DiskUsage, RealFileSystem};

    /// The real file system, counting the files it makes durable and naming the directories.
    #[derive(Default)]
    struct CountingFs {
        file_syncs: AtomicUsize,
        synced_dirs: Mutex<Vec<PathBuf>>,
    }

    impl FileSystem for CountingFs {
        fn sync_mapped_range(
            &self,
            path: &Path,
            map: &MmapRaw,
            offset: usize,
            len: usize,
        ) -> io::Result<()> {
            RealFileSystem.sync_mapped_range(path, map, offset, len)
        }
        fn sync_file_data(&self, file: &std::fs::File) -> io::Result<()> {
            self.file_syncs.fetch_add(1, Ordering::Relaxed);
            RealFileSystem.sync_file_data(file)
        }
        fn sync_dir(&self, dir: &Path) -> io::Result<()> {
            self.synced_dirs
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(dir.to_path_buf());
            RealFileSystem.sync_dir(dir)
        }
        fn disk_usage(&self, path: &Path) -> io::Result<DiskUsage> {
            RealFileSystem.disk_usage(path)
        }
    }

    use std::io;

    fn entry_at(log_pos: u64) -> ConsumeQueueEntry {
        ConsumeQueueEntry {
            log_pos: LogPos(log_pos),
            size: 100,
            tag_hash: 0,
            store_timestamp_ms: 1,
        }
    }

    /// Writes entries `0..count` of `topic`'s queue 0, the entry at `n` pointing at `n * 100`.
    fn write_queue(queues: &ConsumeQueues, topic: &str, count: u64) {
        let queue = queues.get_or_create(topic, 0).unwrap();
        for n in queue.max_offset().0..count {
            queues
                .put(&queue, QueueOffset(n), &entry_at(n * 100))
                .unwrap();
        }
        queues.flush().unwrap();
    }

    fn max_offset(queues: &ConsumeQueues, topic: &str) -> QueueOffset {
        queues.get(topic, 0).unwrap().unwrap().max_offset()
    }

    /// A new queue file is created without an fsync: the checkpoint's flush must sync every
    /// directory that gained an entry, deepest first, or an OS crash after the checkpoint
    /// could lose a file whose entries the checkpoint says are dispatched.
    #[test]
    fn a_flush_syncs_each_directory_that_gained_an_entry_once_deepest_first() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("consumequeue");
        let fs = Arc::new(CountingFs::default());
        let queues = ConsumeQueues::open(root.clone(), 4, fs.clone(), LogPos(0), true).unwrap();
        fs.synced_dirs.lock().unwrap().clear();
        // Queue 0 gets two files; queue 1 of the same topic one.
        let first = queues.get_or_create("t", 0).unwrap();
        for n in 0..6 {
            queues
                .put(&first, QueueOffset(n), &entry_at(n * 100))
                .unwrap();
        }
        let queue = queues.get_or_create("t", 1).unwrap();
        queues.put(&queue, QueueOffset(0), &entry_at(700)).unwrap();
        queues.flush().unwrap();
        let synced = std::mem::take(&mut *fs.synced_dirs.lock().unwrap());
        let topic = root.join("t");
        assert_eq!(
            synced,
            vec![
                topic.join("1"),
                topic.join("0"),
                topic.clone(),
                root.clone()
            ]
        );
        // Nothing new: the next flush syncs no directory.
        queues.put(&queue, QueueOffset(1), &entry_at(800)).unwrap();
        queues.flush().unwrap();
        assert!(fs.synced_dirs.lock().unwrap().is_empty());
    }

    #[test]
    fn a_clean_open_maps_no_queue_until_it_is_used() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("consumequeue");
        let fs = Arc::new(CountingFs::default());
        let queues = ConsumeQueues::open(root.clone(), 64, fs.clone(), LogPos(0), true).unwrap();
        write_queue(&queues, "a", 3);
        write_queue(&queues, "b", 100);
        drop(queues);

        let syncs = fs.file_syncs.load(Ordering::Relaxed);
        let queues = ConsumeQueues::open(root, 64, fs.clone(), LogPos(10_000), true).unwrap();
        assert!(queues.opened().is_empty());
        assert_eq!(fs.file_syncs.load(Ordering::Relaxed), syncs);
        assert_eq!(max_offset(&queues, "b"), QueueOffset(100));
        assert_eq!(queues.opened().len(), 1);
        assert!(queues.get("never", 0).unwrap().is_none());
        assert_eq!(queues.all().unwrap().len(), 2);
        assert_eq!(max_offset(&queues, "a"), QueueOffset(3));
    }

    /// Entries dispatched after the last checkpoint point at or past the boundary. An unclean
    /// open must drop them even in a queue nothing is dispatched to again: otherwise, once the
    /// log has grown past where they point, a later open takes them for real entries.
    #[test]
    fn an_unclean_open_cuts_entries_past_the_boundary_and_syncs_only_what_it_cut() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("consumequeue");
        let fs = Arc::new(CountingFs::default());
        let queues = ConsumeQueues::open(root.clone(), 64, fs.clone(), LogPos(0), true).unwrap();
        write_queue(&queues, "idle", 5);
        write_queue(&queues, "quiet", 2);
        drop(queues);

        // The checkpoint was at 300: entries 3 and 4 of "idle" came after it.
        let syncs = fs.file_syncs.load(Ordering::Relaxed);
        let queues = ConsumeQueues::open(root.clone(), 64, fs.clone(), LogPos(300), false).unwrap();
        assert_eq!(
            fs.file_syncs.load(Ordering::Relaxed),
            syncs + 1,
            "only idle is cut"
        );
        assert!(queues.opened().is_empty());
        drop(queues);

        // The log then grew past 500 without a message for the queue, and stopped cleanly.
        let queues = ConsumeQueues::open(root, 64, fs, LogPos(10_000), true).unwrap();
        assert_eq!(max_offset(&queues, "idle"), QueueOffset(3));
        assert_eq!(max_offset(&queues, "quiet"), QueueOffset(2));
    }

    #[test]
    fn an_unclean_open_removes_a_queue_file_begun_after_the_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("consumequeue");
        let fs: Arc<dyn FileSystem> = Arc::new(RealFileSystem);
        let queues = ConsumeQueues::open(root.clone(), 4, fs.clone(), LogPos(0), true).unwrap();
        write_queue(&queues, "t", 6);
        drop(queues);
        let queue_dir = root.join("t").join("0");
        assert_eq!(numbered_files(&queue_dir).unwrap(), vec![0, 4]);

        let queues = ConsumeQueues::open(root, 4, fs, LogPos(350), false).unwrap();
        assert_eq!(numbered_files(&queue_dir).unwrap(), vec![0]);
        assert_eq!(max_offset(&queues, "t"), QueueOffset(4));
        let queue = queues.get("t", 0).unwrap().unwrap();
        queues.put(&queue, QueueOffset(4), &entry_at(360)).unwrap();
        assert_eq!(queue.get(QueueOffset(4)), Some(entry_at(360)));
    }

    #[test]
    fn holds_data_from_sees_bytes_past_holes() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("sparse"))
            .unwrap();
        file.set_len(1 << 20).unwrap();
        assert!(!crate::mapped_file::holds_data_from(&file, 0).unwrap());
        file.write_all_at(&[7; 32], 0).unwrap();
        assert!(crate::mapped_file::holds_data_from(&file, 0).unwrap());
        assert!(!crate::mapped_file::holds_data_from(&file, 32).unwrap());
        file.write_all_at(&[1], 900_000).unwrap();
        assert!(crate::mapped_file::holds_data_from(&file, 32).unwrap());
        assert!(!crate::mapped_file::holds_data_from(&file, 900_001).unwrap());
    }

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
