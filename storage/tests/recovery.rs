#![cfg(test)]
#![allow(
    clippy::cast_possible_truncation,
    reason = "storage requires a 64-bit target, where these casts are lossless"
)]
//! Recovery: torn tails, flipped bits, derived structures rebuilt from the log, and the
//! checkpoint bounding the work.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{TestMessage, append_all, body_of, message_id, snapshot_dir};
use ferrumq_storage::{ConsumeQueueEntry, LogPos, MessageStore, QueueOffset, StoreOptions};
use proptest::prelude::*;

/// Every consume-queue entry of the store, by (topic, queue id).
fn all_entries(store: &MessageStore) -> BTreeMap<(String, u32), Vec<ConsumeQueueEntry>> {
    store
        .consume_queues()
        .unwrap()
        .into_iter()
        .map(|q| {
            let mut entries = Vec::new();
            q.read(q.min_offset(), usize::MAX, &mut entries);
            ((q.topic().to_owned(), q.queue_id()), entries)
        })
        .filter(|(_, entries)| !entries.is_empty())
        .collect()
}

/// The message numbers the log holds, in order, checking each body.
fn recovered_numbers(store: &MessageStore, body_len: usize) -> Vec<u64> {
    store
        .log()
        .records(LogPos::ZERO, store.log().written_pos())
        .map(|item| {
            let (_, record) = item.expect("records below the valid end decode");
            let view = record.view();
            let id = view.properties.get("UNIQ_KEY").unwrap();
            let n = u64::from_str_radix(id.trim_start_matches("MSG-"), 16).unwrap();
            assert_eq!(
                view.body,
                body_of(n, body_len).as_slice(),
                "message {n} damaged"
            );
            n
        })
        .collect()
}

fn segment_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir.join("commitlog"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

/// The length of the data in the log: the last segment's used bytes.
fn write_then_close(dir: &Path, count: u64, body_len: usize) -> Vec<ferrumq_storage::Appended> {
    let store = MessageStore::open(dir, StoreOptions::for_tests()).unwrap();
    let appended = append_all(&store, 0..count, body_len);
    store.close().unwrap();
    appended
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// A torn write (the log cut at any byte) loses only a suffix: recovery keeps exactly the
    /// records that lie wholly before the cut, and the consume queues agree with the log.
    #[test]
    fn a_log_cut_at_any_byte_recovers_a_prefix(count in 1u64..120, body_len in 0usize..900, cut_seed in any::<u64>()) {
        let dir = tempfile::tempdir().unwrap();
        let appended = write_then_close(dir.path(), count, body_len);
        let end = appended.last().unwrap().end().0;
        let cut = cut_seed % (end + 1);
        let segment_size = StoreOptions::for_tests().segment_size_bytes;
        // Cut the segment holding `cut` at that byte and remove every later one.
        for file in segment_files(dir.path()) {
            let base: u64 = file.file_name().unwrap().to_str().unwrap().parse().unwrap();
            if base > cut {
                std::fs::remove_file(&file).unwrap();
            } else if cut < base + segment_size {
                std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(cut - base).unwrap();
            }
        }
        let store = MessageStore::open(dir.path(), StoreOptions::for_tests()).unwrap();
        let kept = appended.iter().take_while(|a| a.end().0 <= cut).count() as u64;
        let numbers = recovered_numbers(&store, body_len);
        prop_assert_eq!(numbers, (0..kept).collect::<Vec<_>>());
        // Derived structures never point past the valid end.
        for entries in all_entries(&store).values() {
            for entry in entries {
                prop_assert!(entry.log_pos.0 + u64::from(entry.size) <= store.log().written_pos().0);
            }
        }
        let total: usize = all_entries(&store).values().map(Vec::len).sum();
        prop_assert_eq!(total as u64, kept);
    }

    /// Arbitrary bytes after the last record (what a torn or stray write can leave), with or
    /// without a record's magic in front, never panic recovery nor become records.
    #[test]
    fn arbitrary_bytes_after_the_log_never_become_records(count in 1u64..40, garbage in proptest::collection::vec(any::<u8>(), 1..3000), with_magic in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let appended = write_then_close(dir.path(), count, 50);
        let end = appended.last().unwrap().end().0;
        let segment_size = StoreOptions::for_tests().segment_size_bytes;
        let base = end / segment_size * segment_size;
        let mut bytes = garbage;
        if with_magic {
            bytes.splice(0..0, *b"FQR1");
        }
        let room = (base + segment_size - end) as usize;
        bytes.truncate(room);
        let file = dir.path().join("commitlog").join(format!("{base:020}"));
        std::os::unix::fs::FileExt::write_all_at(
            &std::fs::OpenOptions::new().write(true).open(&file).unwrap(),
            &bytes,
            end - base,
        ).unwrap();
        // Recovery scans from the checkpoint (the clean end) into the garbage.
        let store = MessageStore::open(dir.path(), StoreOptions::for_tests()).unwrap();
        prop_assert_eq!(store.log().written_pos().0, end);
        prop_assert_eq!(recovered_numbers(&store, 50), (0..count).collect::<Vec<_>>());
        let total: usize = all_entries(&store).values().map(Vec::len).sum();
        prop_assert_eq!(total as u64, count);
    }

    /// A flipped bit anywhere in an unchecked record is detected: recovery stops there without
    /// a panic and keeps the records before it.
    #[test]
    fn a_flipped_bit_stops_recovery_at_that_record(count in 2u64..60, victim_seed in any::<u64>(), bit in 0usize..(8 * 88)) {
        let dir = tempfile::tempdir().unwrap();
        let appended = write_then_close(dir.path(), count, 64);
        // Without a checkpoint, recovery checks every record (as after a crash before the first).
        std::fs::remove_file(dir.path().join("checkpoint")).unwrap();
        let victim = &appended[(victim_seed % count) as usize];
        let bit = bit % (victim.len as usize * 8);
        let segment_size = StoreOptions::for_tests().segment_size_bytes;
        let file = dir.path().join("commitlog").join(format!("{:020}", victim.pos.0 / segment_size * segment_size));
        let mut bytes = std::fs::read(&file).unwrap();
        let at = (victim.pos.0 % segment_size) as usize + bit / 8;
        bytes[at] ^= 1 << (bit % 8);
        std::fs::write(&file, &bytes).unwrap();

        let store = MessageStore::open(dir.path(), StoreOptions::for_tests()).unwrap();
        let survivors = appended.iter().position(|a| a.pos == victim.pos).unwrap() as u64;
        prop_assert_eq!(recovered_numbers(&store, 64), (0..survivors).collect::<Vec<_>>());
        prop_assert!(store.recovery().damage.is_some());
    }

    /// Consume queues and the index rebuilt from the commit log equal the live ones.
    #[test]
    fn derived_structures_rebuilt_from_the_log_equal_the_live_ones(count in 1u64..200, body_len in 0usize..600) {
        let dir = tempfile::tempdir().unwrap();
        let (live, live_ids) = {
            let store = MessageStore::open(dir.path(), StoreOptions::for_tests()).unwrap();
            let appended = append_all(&store, 0..count, body_len);
            prop_assert!(store.wait_dispatched(appended.last().unwrap().end(), std::time::Duration::from_secs(10)));
            let ids: Vec<_> = (0..count).map(|n| store.query_by_id(&common::message_id(n), 0, i64::MAX).len()).collect();
            (all_entries(&store), ids)
        };
        std::fs::remove_dir_all(dir.path().join("consumequeue")).unwrap();
        std::fs::remove_dir_all(dir.path().join("index")).unwrap();
        std::fs::remove_file(dir.path().join("checkpoint")).unwrap();
        let store = MessageStore::open(dir.path(), StoreOptions::for_tests()).unwrap();
        prop_assert_eq!(all_entries(&store), live);
        let ids: Vec<_> = (0..count).map(|n| store.query_by_id(&common::message_id(n), 0, i64::MAX).len()).collect();
        prop_assert_eq!(ids, live_ids);
    }
}

#[test]
fn clean_reopen_checks_no_records() {
    let dir = tempfile::tempdir().unwrap();
    write_then_close(dir.path(), 500, 200);
    let store = MessageStore::open(dir.path(), StoreOptions::for_tests()).unwrap();
    let report = store.recovery();
    assert!(report.clean_shutdown);
    assert_eq!(report.records_scanned, 0);
    assert_eq!(report.records_redispatched, 0);
    assert_eq!(recovered_numbers(&store, 200).len(), 500);
}

#[test]
fn recovery_after_a_crash_rechecks_only_the_tail_past_the_checkpoint() {
    // Phase 1 is checkpointed; phase 2 is not. A copy of the live directory is what a process
    // crash leaves; recovery re-checks phase 2 only and rebuilds its queue entries.
    let dir = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        checkpoint_interval: std::time::Duration::from_secs(3600),
        ..StoreOptions::for_tests()
    };
    let store = MessageStore::open(dir.path(), options.clone()).unwrap();
    let first = append_all(&store, 0..300, 100);
    assert!(store.wait_dispatched(
        first.last().unwrap().end(),
        std::time::Duration::from_secs(5)
    ));
    store.checkpoint().unwrap();
    let tail = append_all(&store, 300..340, 100);
    assert!(store.wait_dispatched(
        tail.last().unwrap().end(),
        std::time::Duration::from_secs(5)
    ));
    snapshot_dir(dir.path(), crashed.path());
    drop(store);

    let store = MessageStore::open(crashed.path(), options).unwrap();
    let report = store.recovery();
    assert!(!report.clean_shutdown);
    assert_eq!(report.records_scanned, 40);
    assert_eq!(report.records_redispatched, 40);
    assert_eq!(recovered_numbers(&store, 100), (0..340).collect::<Vec<_>>());
    let total: usize = all_entries(&store).values().map(Vec::len).sum();
    assert_eq!(total, 340);
    // The index answers for every message: its slots, which the crash left pointing at the
    // tail's entries, were repaired before the tail was indexed again.
    for n in 0..340 {
        let hits = store.query_by_id(&message_id(n), 0, i64::MAX);
        assert_eq!(hits.len(), 1, "message {n}");
    }
    // New appends continue every queue's offsets without a gap.
    let next = append_all(&store, 340..341, 100);
    let queue = store.consume_queue("topic-1", 0).unwrap();
    assert!(store.wait_dispatched(next[0].end(), std::time::Duration::from_secs(5)));
    assert_eq!(queue.max_offset(), QueueOffset(next[0].queue_offset.0 + 1));
    let mut entries = Vec::new();
    queue.read(queue.min_offset(), usize::MAX, &mut entries);
    assert_eq!(entries.len() as u64, queue.max_offset().0);
}

#[test]
fn a_checkpoint_follows_every_checkpoint_max_bytes_dispatched() {
    // No checkpoint by time for an hour: only the byte trigger keeps the re-checked tail short.
    let dir = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    let max_bytes = 4096;
    let options = StoreOptions {
        checkpoint_interval: std::time::Duration::from_secs(3600),
        checkpoint_max_bytes: max_bytes,
        ..StoreOptions::for_tests()
    };
    let store = MessageStore::open(dir.path(), options.clone()).unwrap();
    let appended = append_all(&store, 0..300, 100);
    let end = appended.last().unwrap().end();
    assert!(store.wait_dispatched(end, std::time::Duration::from_secs(5)));
    snapshot_dir(dir.path(), crashed.path());
    drop(store);

    let store = MessageStore::open(crashed.path(), options).unwrap();
    let report = store.recovery();
    assert!(!report.clean_shutdown);
    assert!(end.0 > 10 * max_bytes);
    // The snapshot may fall between a dispatch step and its checkpoint: at most two steps.
    assert!(
        report.scanned_from.0 + 2 * max_bytes >= end.0,
        "re-checked from {} to {end}",
        report.scanned_from
    );
    assert_eq!(recovered_numbers(&store, 100), (0..300).collect::<Vec<_>>());
}

#[test]
fn a_second_process_cannot_open_a_data_directory_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let _store = MessageStore::open(dir.path(), StoreOptions::for_tests()).unwrap();
    let second = MessageStore::open(dir.path(), StoreOptions::for_tests());
    assert!(second.is_err());
}

#[test]
fn messages_damaged_before_the_checkpoint_are_refused_on_read() {
    let dir = tempfile::tempdir().unwrap();
    let appended = write_then_close(dir.path(), 10, 64);
    let victim = appended[4];
    let file = segment_files(dir.path())[0].clone();
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[victim.pos.0 as usize + 100] ^= 0x10;
    std::fs::write(&file, &bytes).unwrap();
    let store = MessageStore::open(dir.path(), StoreOptions::for_tests()).unwrap();
    assert!(store.read(victim.pos).is_err());
    assert!(store.read(appended[3].pos).is_ok());
    let _ = TestMessage::new(0, 0);
}

#[test]
fn a_record_whose_crc_matches_but_whose_fields_do_not_is_refused_on_read() {
    // A crafted frame: the topic length runs past the record, and the CRC is made to match.
    let dir = tempfile::tempdir().unwrap();
    let appended = write_then_close(dir.path(), 10, 64);
    let victim = appended[4];
    let file = segment_files(dir.path())[0].clone();
    let mut bytes = std::fs::read(&file).unwrap();
    let start = victim.pos.0 as usize;
    let record = &mut bytes[start..start + victim.len as usize];
    record[14..16].copy_from_slice(&u16::MAX.to_le_bytes());
    let crc = crc32fast::hash(&record[12..]);
    record[8..12].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&file, &bytes).unwrap();
    let store = MessageStore::open(dir.path(), StoreOptions::for_tests()).unwrap();
    match store.read(victim.pos) {
        Err(ferrumq_storage::Error::Corrupt { .. }) => {}
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(store.read(appended[5].pos).is_ok());
}

#[test]
fn appends_after_a_clean_reopen_continue_each_queues_offsets() {
    // A clean reopen reads no consume queue: the log learns a queue's end on its first
    // append, from the queue itself. Were it to start again at 0, two messages would share
    // one queue offset. Message n goes to queue n % 4 of topic n % 3: twelve queues.
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(dir.path(), StoreOptions::for_tests()).unwrap();
    append_all(&store, 0..24, 100);
    store.close().unwrap();
    drop(store);

    let store = MessageStore::open(dir.path(), StoreOptions::for_tests()).unwrap();
    assert!(store.recovery().clean_shutdown);
    assert_eq!(store.recovery().records_scanned, 0);
    let next = append_all(&store, 24..36, 100);
    for appended in &next {
        assert_eq!(appended.queue_offset, QueueOffset(2));
    }
    assert!(store.wait_dispatched(next[11].end(), std::time::Duration::from_secs(5)));
    let total: usize = all_entries(&store).values().map(Vec::len).sum();
    assert_eq!(total, 36);
}
