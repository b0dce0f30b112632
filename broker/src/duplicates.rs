//! Recognising a producer's retry. A producer that gets no answer sends the message again with
//! the same message id (the official clients and `ferrumq-client` all do); the broker answers
//! the retry with what it answered the first send, and stores nothing, while the first send is
//! within the duplicate window: the last `window_ms` and at most `max_ids` sends.
//!
//! The window is in memory, filled by each send and, at start-up, from the message index, so a
//! retry after a broker restart is recognised too. It holds hashes of message ids and the
//! positions of their records; a hit is a candidate until the record is read back and its id
//! and topic compared.

use ferrumq_storage::{IndexKey, LogPos, MessageStore, StoredRecord, keys};

use crate::message::property;

/// Recent sends by message id.
///
/// The sends are kept in a ring, oldest replaced first, and found through an open-addressing
/// table (linear probing, at most half full) of 8-byte slots into the ring. Every send is
/// looked up, filed and, once the ring is full, forgets the oldest one: a general-purpose map
/// took a cache miss at each of these steps, which made the window up to a tenth of the
/// broker's work at full speed. Here a send's look-up and filing share a slot's cache line, and the
/// ring is written in order.
pub struct DuplicateWindow {
    window_ms: i64,
    capacity: usize,
    ring: Vec<Filed>,
    /// The ring's oldest entry once it is full: the next one replaced.
    oldest: usize,
    /// 0 for an empty slot, else [`slot`]: the high half of the id's mixed hash (which also
    /// gives the slot it belongs in) and the ring index + 1.
    slots: Vec<u64>,
    /// log2 of `slots.len()`.
    slot_bits: u32,
}

#[derive(Debug, Clone, Copy)]
struct Filed {
    hash: u64,
    pos: LogPos,
    stored_ms: i64,
}

impl DuplicateWindow {
    /// An empty window; a zero `window_ms` or `max_ids` turns recognition off.
    pub fn new(window_ms: u64, max_ids: usize) -> DuplicateWindow {
        let window_ms = i64::try_from(window_ms).unwrap_or(i64::MAX);
        // Ring indexes + 1 must fit the slot's 32 bits; a window that large would not fit
        // in memory anyway.
        let capacity = if window_ms > 0 {
            max_ids.min(1 << 30)
        } else {
            0
        };
        let slot_count = (2 * capacity).next_power_of_two();
        DuplicateWindow {
            window_ms,
            capacity,
            ring: Vec::with_capacity(capacity),
            oldest: 0,
            // Zeroed memory comes from the kernel untouched: the table costs nothing until
            // sends fill it.
            slots: vec![0; slot_count],
            slot_bits: slot_count.trailing_zeros(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.capacity > 0
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
            store.newest_index_entries(now_ms.saturating_sub(self.window_ms), self.capacity);
        for &(hash, pos, stored_ms) in entries.iter().rev() {
            if self.filed_under(hash).next().is_none() {
                self.insert(hash, pos, stored_ms);
            }
        }
        self.ring.len()
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
        self.within_window(hash, now_ms).find_map(|pos| {
            let record = store.read(pos).ok()?;
            let view = record.view();
            let same = view.properties.get(keys::MESSAGE_ID) == Some(message_id)
                && (view.topic == topic
                    || view.properties.get(property::REAL_TOPIC) == Some(topic));
            same.then_some(record)
        })
    }

    /// The records filed under `hash` and stored within the window before `now_ms`.
    fn within_window(&self, hash: u64, now_ms: i64) -> impl Iterator<Item = LogPos> + '_ {
        let oldest_kept = now_ms.saturating_sub(self.window_ms);
        self.filed_under(hash)
            .filter(move |filed| filed.stored_ms >= oldest_kept)
            .map(|filed| filed.pos)
    }

    /// Files a stored send; once the window holds `max_ids`, the oldest one leaves.
    pub fn insert(&mut self, hash: u64, pos: LogPos, stored_ms: i64) {
        if !self.enabled() {
            return;
        }
        let filed = Filed {
            hash,
            pos,
            stored_ms,
        };
        let index = if self.ring.len() < self.capacity {
            self.ring.push(filed);
            self.ring.len() - 1
        } else {
            let index = self.oldest;
            self.unslot(index);
            self.ring[index] = filed;
            self.oldest = (index + 1) % self.capacity;
            index
        };
        let tag = mixed(hash);
        let mut at = self.home(tag);
        while self.slots[at] != 0 {
            at = self.after(at);
        }
        self.slots[at] = slot(tag, index);
    }

    /// Every filed send whose hash is `hash`, oldest first among those filed in one run.
    fn filed_under(&self, hash: u64) -> impl Iterator<Item = &Filed> + '_ {
        let tag = mixed(hash);
        let mut at = self.home(tag);
        std::iter::from_fn(move || {
            loop {
                let slot = self.slots[at];
                if slot == 0 {
                    return None;
                }
                at = self.after(at);
                if slot_tag(slot) == tag {
                    let filed = &self.ring[slot_index(slot)];
                    if filed.hash == hash {
                        return Some(filed);
                    }
                }
            }
        })
    }

    /// Empties the slot of ring entry `index`, moving later slots of its run back into the
    /// gap where their probe passes it, so a look-up still finds them before an empty slot.
    fn unslot(&mut self, index: usize) {
        let tag = mixed(self.ring[index].hash);
        let wanted = slot(tag, index);
        let mut hole = self.home(tag);
        while self.slots[hole] != wanted {
            if self.slots[hole] == 0 {
                return;
            }
            hole = self.after(hole);
        }
        let mask = self.slots.len() - 1;
        let mut next = self.after(hole);
        while self.slots[next] != 0 {
            let home = self.home(slot_tag(self.slots[next]));
            // Probing from `home` to `next` passes the hole: the slot may move into it.
            if next.wrapping_sub(home) & mask >= next.wrapping_sub(hole) & mask {
                self.slots[hole] = self.slots[next];
                hole = next;
            }
            next = self.after(next);
        }
        self.slots[hole] = 0;
    }

    /// The slot a tag's probe starts at: the tag's top bits.
    fn home(&self, tag: u32) -> usize {
        tag.checked_shr(32 - self.slot_bits).unwrap_or(0) as usize
    }

    fn after(&self, at: usize) -> usize {
        (at + 1) & (self.slots.len() - 1)
    }
}

/// The id hash (FNV-1a, weak in its low bits) mixed by a multiplication, high half kept.
fn mixed(hash: u64) -> u32 {
    (hash.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32
}

fn slot(tag: u32, index: usize) -> u64 {
    (u64::from(tag) << 32) | (index as u64 + 1)
}

fn slot_tag(slot: u64) -> u32 {
    (slot >> 32) as u32
}

#[allow(clippy::cast_possible_truncation)] // the low half, an index + 1 of the ring
fn slot_index(slot: u64) -> usize {
    slot as u32 as usize - 1
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    fn positions(window: &DuplicateWindow, hash: u64, now_ms: i64) -> Vec<LogPos> {
        let mut found: Vec<LogPos> = window.within_window(hash, now_ms).collect();
        found.sort();
        found
    }

    #[test]
    fn sends_leave_by_count() {
        let mut window = DuplicateWindow::new(1_000, 3);
        for n in 1..=4 {
            window.insert(n, LogPos(n * 10), 5_000);
        }
        // At most three: 1 went first.
        assert!(positions(&window, 1, 5_000).is_empty());
        for n in 2..=4 {
            assert_eq!(positions(&window, n, 5_000), [LogPos(n * 10)]);
        }
    }

    #[test]
    fn sends_leave_by_age() {
        let mut window = DuplicateWindow::new(1_000, 10);
        window.insert(1, LogPos(10), 5_000);
        window.insert(2, LogPos(20), 5_500);
        // 1 is older than a second at 6,001; 2 is not.
        assert!(positions(&window, 1, 6_001).is_empty());
        assert_eq!(positions(&window, 2, 6_001), [LogPos(20)]);
    }

    #[test]
    fn a_hash_filed_again_keeps_both_sends() {
        let mut window = DuplicateWindow::new(1_000, 10);
        window.insert(7, LogPos(10), 1_000);
        window.insert(7, LogPos(20), 1_900);
        assert_eq!(positions(&window, 7, 1_950), [LogPos(10), LogPos(20)]);
        // The first left the window; the second still stands.
        assert_eq!(positions(&window, 7, 2_100), [LogPos(20)]);
    }

    #[test]
    fn a_zero_window_files_nothing() {
        let mut window = DuplicateWindow::new(0, 10);
        window.insert(1, LogPos(10), 1_000);
        assert!(positions(&window, 1, 1_000).is_empty());
        let mut window = DuplicateWindow::new(1_000, 0);
        window.insert(1, LogPos(10), 1_000);
        assert!(positions(&window, 1, 1_000).is_empty());
    }

    /// Many sends over few hashes in a small table, so runs of slots collide, wrap around
    /// the table's end and lose entries from their middle: the window must find exactly the
    /// last `capacity` sends of each hash, as a plain list of them does.
    #[test]
    fn finds_exactly_the_last_sends_however_their_slots_collide() {
        let capacity = 37;
        let mut window = DuplicateWindow::new(1_000_000, capacity);
        let mut model: VecDeque<(u64, LogPos)> = VecDeque::new();
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for n in 0..5_000u64 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let hash = state % 97;
            window.insert(hash, LogPos(n), 0);
            model.push_back((hash, LogPos(n)));
            if model.len() > capacity {
                model.pop_front();
            }
            for hash in 0..97 {
                let expected: Vec<LogPos> = model
                    .iter()
                    .filter(|(h, _)| *h == hash)
                    .map(|&(_, pos)| pos)
                    .collect();
                assert_eq!(
                    positions(&window, hash, 0),
                    expected,
                    "hash {hash} after {n}"
                );
            }
        }
    }
}
