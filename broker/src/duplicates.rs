//! Recognising a producer's retry. A producer that gets no answer sends the message again with
//! the same message id (the official clients and `ferrumq-client` all do); the broker answers
//! the retry with what it answered the first send, and stores nothing, while the first send is
//! within the duplicate window: the last `window_ms` and at most `max_ids` sends.
//!
//! The window is in memory, filled by each send and, at start-up, from the message index, so a
//! retry after a broker restart is recognised too. It holds hashes of message ids and the
//! positions of their records; a hit is a candidate until the record is read back and its id
//! and topic compared.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use ferrumq_storage::{IndexKey, LogPos, MessageStore, StoredRecord, keys};

use crate::message::property;

/// Recent sends by message id, oldest first in `order`.
pub struct DuplicateWindow {
    window_ms: i64,
    max_ids: usize,
    /// Message-id hash → the first record stored under it and its store time.
    by_hash: HashMap<u64, (LogPos, i64), BuildHasherDefault<PreHashed>>,
    order: VecDeque<(u64, LogPos, i64)>,
}

impl DuplicateWindow {
    /// An empty window; a zero `window_ms` or `max_ids` turns recognition off.
    pub fn new(window_ms: u64, max_ids: usize) -> DuplicateWindow {
        DuplicateWindow {
            window_ms: i64::try_from(window_ms).unwrap_or(i64::MAX),
            max_ids,
            by_hash: HashMap::default(),
            order: VecDeque::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.window_ms > 0 && self.max_ids > 0
    }

    /// The hash the window (and the message index) files a message id under.
    pub fn hash(message_id: &str) -> u64 {
        IndexKey::MessageId(message_id).hash()
    }

    /// Fills the window from the message index after a start: the records stored within the
    /// window before `now_ms`, the first of each id kept. The index also holds message keys,
    /// whose entries are never confirmed as an earlier send.
    pub fn load(&mut self, store: &MessageStore, now_ms: i64) -> usize {
        if !self.enabled() {
            return 0;
        }
        let entries =
            store.newest_index_entries(now_ms.saturating_sub(self.window_ms), self.max_ids);
        for &(hash, pos, stored_ms) in entries.iter().rev() {
            if !self.by_hash.contains_key(&hash) {
                self.insert(hash, pos, stored_ms);
            }
        }
        self.by_hash.len()
    }

    /// The earlier send of `message_id` to `topic` within the window, read back from the log.
    /// `topic` is the one the producer named: a half message or a scheduled one is stored in
    /// an internal topic with its own as `REAL_TOPIC`.
    pub fn earlier_send(
        &self,
        store: &MessageStore,
        hash: u64,
        message_id: &str,
        topic: &str,
        now_ms: i64,
    ) -> Option<StoredRecord> {
        let &(pos, stored_ms) = self.by_hash.get(&hash)?;
        if stored_ms < now_ms.saturating_sub(self.window_ms) {
            return None;
        }
        let record = store.read(pos).ok()?;
        let view = record.view();
        let same = view.properties.get(keys::MESSAGE_ID) == Some(message_id)
            && (view.topic == topic || view.properties.get(property::REAL_TOPIC) == Some(topic));
        same.then_some(record)
    }

    /// Files a stored send, and forgets the sends that left the window.
    pub fn insert(&mut self, hash: u64, pos: LogPos, stored_ms: i64) {
        if !self.enabled() {
            return;
        }
        self.by_hash.insert(hash, (pos, stored_ms));
        self.order.push_back((hash, pos, stored_ms));
        let oldest_kept = stored_ms.saturating_sub(self.window_ms);
        while let Some(&(hash, pos, at)) = self.order.front() {
            if at >= oldest_kept && self.order.len() <= self.max_ids {
                break;
            }
            self.order.pop_front();
            if self.by_hash.get(&hash).is_some_and(|&(p, _)| p == pos) {
                self.by_hash.remove(&hash);
            }
        }
    }
}

/// The window's keys are hashes already: they are used as they are.
#[derive(Default)]
struct PreHashed(u64);

impl Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_leave_by_age_and_by_count() {
        let mut window = DuplicateWindow::new(1_000, 3);
        window.insert(1, LogPos(10), 5_000);
        window.insert(2, LogPos(20), 5_500);
        assert_eq!(window.by_hash.len(), 2);
        // 1 is older than a second at 6,001.
        window.insert(3, LogPos(30), 6_001);
        assert_eq!(window.by_hash.len(), 2);
        assert!(!window.by_hash.contains_key(&1));
        window.insert(4, LogPos(40), 6_002);
        window.insert(5, LogPos(50), 6_003);
        // At most three: 2 went first.
        assert_eq!(window.by_hash.len(), 3);
        assert!(!window.by_hash.contains_key(&2));
        assert_eq!(window.order.len(), 3);
    }

    #[test]
    fn a_hash_filed_again_stays_until_its_newest_send_leaves() {
        let mut window = DuplicateWindow::new(1_000, 10);
        window.insert(7, LogPos(10), 1_000);
        window.insert(7, LogPos(20), 1_900);
        window.insert(8, LogPos(30), 2_100);
        // The first send under 7 left the window; the second still stands.
        assert_eq!(window.by_hash.get(&7), Some(&(LogPos(20), 1_900)));
        window.insert(9, LogPos(40), 3_000);
        assert!(!window.by_hash.contains_key(&7));
    }

    #[test]
    fn a_zero_window_files_nothing() {
        let mut window = DuplicateWindow::new(0, 10);
        window.insert(1, LogPos(10), 1_000);
        assert_eq!(window.by_hash.len(), 0);
        let mut window = DuplicateWindow::new(1_000, 0);
        window.insert(1, LogPos(10), 1_000);
        assert_eq!(window.by_hash.len(), 0);
    }
}
