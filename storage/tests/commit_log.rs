#![cfg(test)]
#![allow(
    clippy::cast_possible_truncation,
    reason = "storage requires a 64-bit target, where these casts are lossless"
)]
//! The commit log: appends, reads, segment rolls, group commit, and replication hooks.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{TestMessage, append_all, body_of, message_id};
use ferrumq_storage::{Error, FlushMode, LogPos, MessageStore, QueueOffset, StoreOptions};

#[test]
fn appended_records_read_back_across_segment_rolls() {
    // 300 records of 1 KiB roll the 64 KiB test segments several times; every record reads back.
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(dir.path(), StoreOptions::for_tests()).unwrap();
    let appended = append_all(&store, 0..300, 1024);
    for (n, a) in appended.iter().enumerate() {
        let record = store.read(a.pos).unwrap();
        let view = record.view();
        assert_eq!(view.body, body_of(n as u64, 1024).as_slice());
        assert_eq!(
            view.properties.get("UNIQ_KEY"),
            Some(message_id(n as u64).as_str())
        );
        assert_eq!(view.queue_offset, a.queue_offset);
    }
    let segments = std::fs::read_dir(dir.path().join("commitlog"))
        .unwrap()
        .count();
    assert!(segments >= 4, "expected several segments, found {segments}");
    // Queue offsets count per (topic, queue): message n goes to topic n%3, queue n%4.
    assert_eq!(appended[12].queue_offset, QueueOffset(1));
    let all: Vec<_> = store
        .log()
        .records(LogPos::ZERO, store.log().written_pos())
        .map(|r| r.unwrap().0)
        .collect();
    assert_eq!(all, appended.iter().map(|a| a.pos).collect::<Vec<_>>());
}

#[test]
fn one_flush_covers_many_concurrent_appenders() {
    // 16 threads append in sync mode and each waits for durability; the flusher must batch.
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        segment_size_bytes: 8 << 20,
        ..StoreOptions::for_tests()
    };
    let store = Arc::new(MessageStore::open(dir.path(), options).unwrap());
    let threads: Vec<_> = (0..16u64)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 0..200 {
                    let message = TestMessage::new(t * 1000 + i, 256);
                    let appended = store.append(&message.record()).unwrap();
                    store.durable(appended.end()).wait().unwrap();
                    assert!(store.log().durable_pos() >= appended.end());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let stats = store.log().flush_stats();
    assert!(
        stats.flushes < 3200,
        "3,200 durable appends took {} flushes: no group commit",
        stats.flushes
    );
}

#[test]
fn a_record_larger_than_a_segment_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(dir.path(), StoreOptions::for_tests()).unwrap();
    let big = TestMessage::new(1, 70 * 1024);
    let before = store.log().written_pos();
    match store.append(&big.record()) {
        Err(Error::TooLarge {
            field: "record", ..
        }) => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_eq!(store.log().written_pos(), before);
}

#[test]
fn async_mode_flushes_on_its_interval() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        flush: FlushMode::Async {
            interval: Duration::from_millis(20),
        },
        ..StoreOptions::for_tests()
    };
    let store = MessageStore::open(dir.path(), options).unwrap();
    let message = TestMessage::new(7, 100);
    let appended = store.append(&message.record()).unwrap();
    // Written (readable) at once, durable after the interval's flush.
    assert!(store.read(appended.pos).is_ok());
    store.durable(appended.end()).wait().unwrap();
    assert!(store.log().durable_pos() >= appended.end());
}

#[test]
fn async_mode_writes_single_records_and_batches_across_segment_rolls() {
    // Single records are copied into the mapping; batches of 30 (about 24 KiB) are written
    // with pwrite. Both read back, in order, before and after a reopen.
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        flush: FlushMode::Async {
            interval: Duration::from_millis(20),
        },
        ..StoreOptions::for_tests()
    };
    let store = MessageStore::open(dir.path(), options.clone()).unwrap();
    let mut appended = Vec::new();
    let mut n = 0;
    while n < 500 {
        if (n / 50) % 2 == 0 {
            appended.push(store.append(&TestMessage::new(n, 700).record()).unwrap());
            n += 1;
        } else {
            let batch: Vec<_> = (n..n + 30).map(|m| TestMessage::new(m, 700)).collect();
            let records: Vec<_> = batch.iter().map(TestMessage::record).collect();
            store.append_batch(&records, &mut appended).unwrap();
            n += 30;
        }
    }
    assert!(appended.last().unwrap().pos.0 > 4 * store.log().segment_size());
    let positions: Vec<_> = store
        .log()
        .records(LogPos::ZERO, store.log().written_pos())
        .map(|r| r.unwrap().0)
        .collect();
    assert_eq!(
        positions,
        appended.iter().map(|a| a.pos).collect::<Vec<_>>()
    );
    for (n, a) in appended.iter().enumerate() {
        let record = store.read(a.pos).unwrap();
        assert_eq!(record.view().body, body_of(n as u64, 700).as_slice());
    }
    drop(store);
    let store = MessageStore::open(dir.path(), options).unwrap();
    assert_eq!(store.log().written_pos(), appended.last().unwrap().end());
    assert!(store.read(appended[499].pos).is_ok());
}

#[test]
fn committed_watermark_holds_dispatch_back() {
    // A replication layer holds dispatch at the committed position; consume queues stop there.
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(dir.path(), StoreOptions::for_tests()).unwrap();
    let first = append_all(&store, 0..3, 100);
    store.log().set_committed(Some(first[2].end()));
    let later = append_all(&store, 3..6, 100);
    assert!(store.wait_dispatched(first[2].end(), Duration::from_secs(5)));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(store.dispatched_pos(), first[2].end());
    store.log().set_committed(None);
    assert!(store.wait_dispatched(later[2].end(), Duration::from_secs(5)));
}

#[test]
fn appends_do_not_wait_for_dispatch_that_the_committed_watermark_holds_back() {
    // Appends wait for a lagging dispatcher, but never for one that may not move.
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        max_dispatch_lag_bytes: 1024,
        ..StoreOptions::for_tests()
    };
    let store = MessageStore::open(dir.path(), options).unwrap();
    let first = append_all(&store, 0..1, 100);
    store.log().set_committed(Some(first[0].end()));
    let started = std::time::Instant::now();
    let later = append_all(&store, 1..40, 100);
    // A wrong wait would cost a second per append.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "appends waited for a dispatcher held back by replication"
    );
    assert!(later.last().unwrap().end().0 - store.dispatched_pos().0 > 1024);
    store.log().set_committed(None);
    assert!(store.wait_dispatched(later.last().unwrap().end(), Duration::from_secs(5)));
}

#[test]
fn truncating_an_uncommitted_suffix_rewinds_queue_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(dir.path(), StoreOptions::for_tests()).unwrap();
    let kept = append_all(&store, 0..4, 100);
    store.log().set_committed(Some(kept[3].end()));
    let dropped = append_all(&store, 4..8, 100);
    store.log().truncate_uncommitted(dropped[0].pos).unwrap();
    assert_eq!(store.log().written_pos(), dropped[0].pos);
    assert!(store.read(dropped[0].pos).is_err());
    store.log().set_committed(None);
    // The same message re-appended gets the queue offset the dropped one had.
    let again = append_all(&store, 4..5, 100);
    assert_eq!(again[0].queue_offset, dropped[0].queue_offset);
    assert_eq!(again[0].pos, dropped[0].pos);
    // A reopen sees exactly the kept records plus the re-appended one.
    drop(store);
    let store = MessageStore::open(dir.path(), StoreOptions::for_tests()).unwrap();
    assert_eq!(store.log().written_pos(), again[0].end());
}

#[test]
fn a_reader_holding_a_truncated_record_keeps_reading_it_intact() {
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(dir.path(), StoreOptions::for_tests()).unwrap();
    let kept = append_all(&store, 0..4, 100);
    store.log().set_committed(Some(kept[3].end()));
    let dropped = append_all(&store, 4..8, 100);
    let held = store.read(dropped[1].pos).unwrap();
    let body = held.view().body.to_vec();
    store.log().truncate_uncommitted(dropped[0].pos).unwrap();
    // New records take the dropped ones' positions; the held record does not change.
    let again = append_all(&store, 100..104, 300);
    assert_eq!(again[0].pos, dropped[0].pos);
    assert_eq!(held.view().body, body.as_slice());
    assert_eq!(held.pos(), dropped[1].pos);
    let now = store.read(dropped[1].pos);
    assert!(now.is_err() || now.unwrap().view().body != body.as_slice());
    assert!(store.read(kept[3].pos).is_ok());
}

#[test]
fn the_dispatch_listener_hears_every_move_up_to_the_written_end() {
    let dir = tempfile::tempdir().unwrap();
    let store = MessageStore::open(dir.path(), StoreOptions::for_tests()).unwrap();
    let heard = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = heard.clone();
    assert!(store.on_dispatched(move |pos| sink.lock().unwrap().push(pos)));
    assert!(!store.on_dispatched(|_| {}), "a second listener is refused");
    let appended = append_all(&store, 0..50, 100);
    let end = appended.last().unwrap().end();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while heard.lock().unwrap().last() != Some(&end) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let heard = heard.lock().unwrap().clone();
    assert!(heard.windows(2).all(|w| w[0] <= w[1]), "{heard:?}");
    assert_eq!(heard.last(), Some(&end));
}
