#![cfg(test)]
#![allow(
    clippy::cast_possible_truncation,
    reason = "storage requires a 64-bit target, where these casts are lossless"
)]
//! Consume-queue look-ups (offset, time, tags) and index queries (id, key, time range).

mod common;

use std::time::Duration;

use common::{TestMessage, append_all, message_id};
use ferrumq_storage::{MessageStore, QueueOffset, StoreOptions, tag_hash};

#[test]
fn consume_queue_lookups_by_offset_time_and_tag() {
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(dir.path(), StoreOptions::for_tests()).unwrap();
    // Message n goes to topic n%3, queue n%4: topic-0/queue-0 holds n = 0, 12, 24, ...
    let first = append_all(&store, 0..120, 50);
    std::thread::sleep(Duration::from_millis(5));
    let second = append_all(&store, 120..240, 50);
    assert!(store.wait_dispatched(second.last().unwrap().end(), Duration::from_secs(5)));

    let queue = store.consume_queue("topic-0", 0).unwrap();
    assert_eq!(queue.min_offset(), QueueOffset(0));
    assert_eq!(queue.max_offset(), QueueOffset(20));
    let entry = queue.get(QueueOffset(3)).unwrap();
    assert_eq!(entry.log_pos, first[36].pos);
    assert_eq!(entry.tag_hash, tag_hash("even"));
    assert!(queue.get(QueueOffset(20)).is_none());

    // The first message of the second batch in this queue is n = 120, offset 10.
    let at = second[0].store_timestamp_ms;
    let offset = queue.offset_at_time(at);
    let found = queue.get(offset).unwrap();
    assert!(found.store_timestamp_ms >= at);
    assert!(
        offset.0 == 0
            || queue
                .get(QueueOffset(offset.0 - 1))
                .unwrap()
                .store_timestamp_ms
                < at
    );
    assert_eq!(queue.offset_at_time(i64::MAX), queue.max_offset());
    assert_eq!(queue.offset_at_time(0), QueueOffset(0));

    let mut page = Vec::new();
    queue.read(QueueOffset(18), 10, &mut page);
    assert_eq!(page.len(), 2);
}

#[test]
fn query_by_id_and_by_key_within_a_time_range() {
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(dir.path(), StoreOptions::for_tests()).unwrap();
    // Enough messages to fill several small index files (256 entries each, two keys a message).
    let appended = append_all(&store, 0..600, 20);
    assert!(store.wait_dispatched(appended.last().unwrap().end(), Duration::from_secs(5)));

    for n in [0u64, 137, 599] {
        let by_id = store.query_by_id(&message_id(n), 0, i64::MAX);
        assert_eq!(by_id.len(), 1, "message {n}");
        assert_eq!(by_id[0].pos(), appended[n as usize].pos);
        let topic = TestMessage::new(n, 0).topic;
        let by_key = store.query_by_key(&topic, &format!("key-{n}"), 0, i64::MAX, 10);
        assert_eq!(by_key.len(), 1);
        assert!(
            store
                .query_by_key("other-topic", &format!("key-{n}"), 0, i64::MAX, 10)
                .is_empty()
        );
    }
    assert!(store.query_by_id("MSG-NOPE", 0, i64::MAX).is_empty());
    // A time range that ends before the message was stored finds nothing.
    let stored = appended[10].store_timestamp_ms;
    assert!(store.query_by_id(&message_id(10), 0, stored - 1).is_empty());
    assert_eq!(store.query_by_id(&message_id(10), stored, stored).len(), 1);

    // The newest entries, across index files: two per message (its id and its key), newest
    // first, stopping at the bound or the time given.
    let newest = store.newest_index_entries(0, 1000);
    assert_eq!(newest.len(), 1000);
    assert_eq!(newest[0].1, appended[599].pos);
    assert_eq!(newest[999].1, appended[100].pos);
    assert!(newest.windows(2).all(|w| w[0].1 >= w[1].1));
    let id_hash = ferrumq_storage::IndexKey::MessageId(&message_id(599)).hash();
    assert!(newest[..2].iter().any(|e| e.0 == id_hash));
    let since = appended[550].store_timestamp_ms;
    let recent = store.newest_index_entries(since, usize::MAX);
    assert!(recent.iter().all(|e| e.2 >= since));
    assert!(recent.iter().any(|e| e.1 == appended[550].pos));
    assert!(recent.len() < 1200);

    // The index survives a restart.
    drop(store);
    let store = MessageStore::open(dir.path(), StoreOptions::for_tests()).unwrap();
    assert_eq!(store.query_by_id(&message_id(599), 0, i64::MAX).len(), 1);
}
