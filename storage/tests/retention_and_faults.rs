#![cfg(test)]
#![allow(
    clippy::cast_possible_truncation,
    reason = "storage requires a 64-bit target, where these casts are lossless"
)]
//! Retention, the disk-usage watermark, and fail-stop after a failed flush.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use common::{FaultyFs, TestMessage, append_all, options_with};
use ferrumq_storage::{Error, LogPos, MessageStore, QueueOffset, StoreOptions};

/// Segment files holding part of the log: the next segment, created ahead of time, does not.
fn log_segments(store: &MessageStore) -> usize {
    let written = store.log().written_pos();
    std::fs::read_dir(store.dir().join("commitlog"))
        .unwrap()
        .filter(|entry| {
            let name = entry.as_ref().unwrap().file_name();
            name.to_str().unwrap().parse::<u64>().unwrap() <= written.0
        })
        .count()
}

#[test]
fn retention_deletes_old_segments_but_never_the_active_one_and_trims_queues() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        retention: Some(Duration::from_secs(3600)),
        ..StoreOptions::for_tests()
    };
    let store = MessageStore::open(dir.path(), options).unwrap();
    let appended = append_all(&store, 0..400, 1000);
    assert!(store.wait_dispatched(appended.last().unwrap().end(), Duration::from_secs(5)));
    store.checkpoint().unwrap();
    let segments_before = log_segments(&store);
    assert!(segments_before > 3);

    // Nothing is an hour old yet.
    let report = store.run_retention(SystemTime::now()).unwrap();
    assert!(report.segments_removed.is_empty());

    // Two hours later everything but the active segment has expired.
    let later = SystemTime::now() + Duration::from_secs(7200);
    let report = store.run_retention(later).unwrap();
    assert_eq!(report.segments_removed.len(), segments_before - 1);
    assert_eq!(log_segments(&store), 1);
    assert!(store.read(appended[0].pos).is_err());
    assert!(store.read(appended[399].pos).is_ok());

    // Every consume queue now starts at its first message still in the log.
    for queue in store.consume_queues().unwrap() {
        if let Some(first) = queue.get(queue.min_offset()) {
            assert!(first.log_pos >= report.min_pos);
            assert!(store.read(first.log_pos).is_ok());
        }
        assert!(queue.min_offset() > QueueOffset(0));
    }
    // Appends go on; a restart keeps the trimmed view.
    append_all(&store, 400..401, 1000);
    drop(store);
    let store = MessageStore::open(dir.path(), StoreOptions::for_tests()).unwrap();
    assert!(store.log().min_pos() > LogPos::ZERO);
    for queue in store.consume_queues().unwrap() {
        if let Some(first) = queue.get(queue.min_offset()) {
            assert!(store.read(first.log_pos).is_ok());
        }
    }
}

#[test]
fn paused_retention_keeps_expired_segments_until_it_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        retention: Some(Duration::from_millis(1)),
        ..StoreOptions::for_tests()
    };
    let store = MessageStore::open(dir.path(), options).unwrap();
    store.pause_retention(true);
    let appended = append_all(&store, 0..400, 1000);
    assert!(store.wait_dispatched(appended.last().unwrap().end(), Duration::from_secs(5)));
    store.checkpoint().unwrap();
    let segments = log_segments(&store);
    assert!(segments > 3);
    // Many housekeeping intervals pass; nothing is removed while paused.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(log_segments(&store), segments);
    store.pause_retention(false);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while log_segments(&store) > 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(log_segments(&store), 1, "retention resumed");
}

#[test]
fn the_store_reports_a_disk_above_the_watermark_and_clears_it_below() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Arc::new(FaultyFs::default());
    let store = MessageStore::open(
        dir.path(),
        StoreOptions {
            disk_watermark: 0.90,
            ..options_with(fs.clone())
        },
    )
    .unwrap();
    append_all(&store, 0..2, 10);

    fs.used_per_mille.store(955, Ordering::SeqCst);
    store.check_disk_usage().unwrap();
    match store.check_space() {
        Err(error @ Error::DiskFull { .. }) => {
            let text = error.to_string();
            assert!(text.contains("95.5%"), "{text}");
            assert!(text.contains("90.0%"), "{text}");
        }
        other => panic!("expected DiskFull, got {other:?}"),
    }
    // What to refuse is the caller's choice: the store still appends.
    append_all(&store, 2..3, 10);

    fs.used_per_mille.store(500, Ordering::SeqCst);
    store.check_disk_usage().unwrap();
    assert!(store.check_space().is_ok());
}

#[test]
fn a_failed_flush_makes_the_log_refuse_appends_and_fail_waiters() {
    // Fail-stop: once an fsync fails, nothing that was not durable before is ever acknowledged,
    // and the log accepts nothing until a restart has recovered it.
    let dir = tempfile::tempdir().unwrap();
    let fs = Arc::new(FaultyFs::default());
    let store = MessageStore::open(dir.path(), options_with(fs.clone())).unwrap();
    let durable = append_all(&store, 0..5, 100);

    fs.fail_flush.store(true, Ordering::SeqCst);
    let message = TestMessage::new(5, 100);
    let appended = store.append(&message.record()).unwrap();
    match store.durable(appended.end()).wait() {
        Err(Error::Poisoned { reason }) => assert!(reason.contains("flush"), "{reason}"),
        other => panic!("expected Poisoned, got {other:?}"),
    }
    assert!(matches!(
        store.append(&message.record()),
        Err(Error::Poisoned { .. })
    ));
    assert!(store.log().failure().is_some());
    // What was durable before stays readable.
    assert!(store.read(durable[4].pos).is_ok());

    drop(store);
    fs.fail_flush.store(false, Ordering::SeqCst);
    let store = MessageStore::open(dir.path(), options_with(fs)).unwrap();
    assert!(store.read(durable[4].pos).is_ok());
    append_all(&store, 6..7, 100);
}

#[test]
fn a_failed_checkpoint_msync_stops_dispatch_and_appends() {
    // A dispatcher that retried after a failed msync could write a checkpoint over entries the
    // kernel never wrote: the failure must stop the store as a failed log flush does.
    let dir = tempfile::tempdir().unwrap();
    let fs = Arc::new(FaultyFs::default());
    let store = MessageStore::open(dir.path(), options_with(fs.clone())).unwrap();
    let durable = append_all(&store, 0..3, 100);
    assert!(store.wait_dispatched(durable[2].end(), Duration::from_secs(5)));

    let message = TestMessage::new(3, 100);
    let appended = store.append(&message.record()).unwrap();
    store.durable(appended.end()).wait().unwrap();
    fs.fail_mapped_sync.store(true, Ordering::SeqCst);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.log().failure().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the store did not stop"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let reason = store.log().failure().unwrap();
    assert!(reason.contains("dispatcher"), "{reason}");
    assert!(matches!(store.checkpoint(), Err(Error::Poisoned { .. })));
    assert!(matches!(
        store.append(&TestMessage::new(4, 100).record()),
        Err(Error::Poisoned { .. })
    ));
    // Dispatch stays where it stopped, even once the disk is well again.
    fs.fail_mapped_sync.store(false, Ordering::SeqCst);
    let stopped_at = store.dispatched_pos();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(store.dispatched_pos(), stopped_at);

    drop(store);
    let store = MessageStore::open(dir.path(), options_with(fs)).unwrap();
    assert!(store.read(durable[2].pos).is_ok());
    assert!(
        store.read(appended.pos).is_ok(),
        "it was durable before the failure"
    );
    append_all(&store, 5..6, 100);
}
