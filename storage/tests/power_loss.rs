#![cfg(test)]
#![allow(
    clippy::cast_possible_truncation,
    reason = "storage requires a 64-bit target, where these casts are lossless"
)]
//! Power loss through the crash backend: writers append in `sync` mode and note each record
//! once it is acknowledged (durable); the power goes at a random sync, possibly while the store
//! is still recovering from the last cut. The next round opens what a machine would find: the
//! durable bytes, with some of the rest torn in at random. After every open, every
//! acknowledged record is there and intact, and each queue lists exactly the log's records of
//! that queue, in order, once each. `FERRUMQ_POWER_CUTS` sets the number of cuts (default 200).

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{acked_record, append_numbered};
use ferrumq_storage::{
    CrashFileSystem, FlushMode, LogPos, MessageStore, QueueOffset, StoreOptions,
};

fn cuts() -> u64 {
    std::env::var("FERRUMQ_POWER_CUTS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(200)
}

/// Cuts that stack on one data directory before the test starts on an empty one.
const ROUNDS_PER_MACHINE: u64 = 20;

fn body_len(n: u64) -> usize {
    (n % 5) as usize * 300
}

fn options(fs: Arc<CrashFileSystem>) -> StoreOptions {
    StoreOptions {
        flush: FlushMode::Sync,
        fs,
        ..StoreOptions::for_tests()
    }
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn power_loss_during_sync_appends_keeps_every_acknowledged_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut data = dir.path().join("machine-0");
    std::fs::create_dir(&data).unwrap();
    let mut acked: Vec<(u64, u64)> = Vec::new();
    let mut opened = 0;
    let mut total_acked = 0;
    for round in 0..cuts() {
        let started = std::time::Instant::now();
        if round > 0 && round % ROUNDS_PER_MACHINE == 0 {
            // A new machine now and then keeps each round's copying and checking short.
            let store = MessageStore::open(&data, StoreOptions::for_tests()).unwrap();
            check(&store, &acked, round);
            store.close().unwrap();
            std::fs::remove_dir_all(&data).unwrap();
            std::fs::create_dir(&data).unwrap();
            acked.clear();
        }
        let crash = Arc::new(CrashFileSystem::new(&data).unwrap());
        // Opening an unclean store syncs what recovery cut (some tens of syncs): every third
        // cut falls in that stretch or soon after it, the others while appending.
        let during_open = round % 3 == 0;
        if during_open {
            crash.cut_at_sync(1 + rng.below(40));
        }
        if let Ok(store) = MessageStore::open(&data, options(crash.clone())) {
            opened += 1;
            if !during_open {
                crash.cut_at_sync(1 + rng.below(60));
            }
            check(&store, &acked, round);
            let appended = append_until_cut(&store, round);
            total_acked += appended.len();
            acked.extend(appended);
            let _ = store.close();
        }
        crash.cut();
        let next = dir.path().join(format!("machine-{}", round + 1));
        let tear = (round % 4 != 0).then(|| rng.below(u64::MAX));
        crash.write_image(&next, tear).unwrap();
        std::fs::remove_dir_all(&data).unwrap();
        if std::env::var_os("DBG").is_some() {
            eprintln!(
                "round {round}: {:?} acked {}",
                started.elapsed(),
                acked.len()
            );
        }
        data = next;
    }
    let store = MessageStore::open(&data, StoreOptions::for_tests()).unwrap();
    check(&store, &acked, cuts());
    store.close().unwrap();
    assert!(
        opened > cuts() / 2,
        "most rounds open before the cut ({opened})"
    );
    assert!(opened < cuts(), "some cuts fall while opening");
    assert!(total_acked as u64 > cuts(), "{total_acked} acknowledged");
}

/// Two writers, one record at a time and batches of 20, until the power goes; returns the
/// records acknowledged as (number, position).
fn append_until_cut(store: &MessageStore, round: u64) -> Vec<(u64, u64)> {
    let acked = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for writer in 0..2u64 {
            let acked = &acked;
            scope.spawn(move || {
                let per_append = if writer == 0 { 1 } else { 20 };
                let mut appended = Vec::new();
                for i in 0..200 {
                    let numbers: Vec<u64> = (0..per_append)
                        .map(|k| (round << 32) | (writer << 31) | (i * per_append + k))
                        .collect();
                    let written = append_numbered(store, &numbers, body_len, &mut appended);
                    let durable = appended
                        .last()
                        .is_some_and(|last| store.durable(last.end()).wait().is_ok());
                    if written.is_err() || !durable {
                        return;
                    }
                    let mut acked = acked.lock().unwrap();
                    acked.extend(numbers.iter().zip(&appended).map(|(&n, a)| (n, a.pos.0)));
                }
            });
        }
    });
    acked.into_inner().unwrap()
}

/// Every acknowledged record is intact at its position, and every queue holds exactly the
/// log's records of that queue, in log order.
fn check(store: &MessageStore, acked: &[(u64, u64)], round: u64) {
    for &(n, pos) in acked {
        acked_record(store, n, pos, body_len, &format!("round {round}"));
    }
    let log = store.log();
    let end = log.written_pos();
    assert!(
        store.wait_dispatched(end, Duration::from_secs(30)),
        "round {round}: dispatch reaches the log's end"
    );
    let mut expected: BTreeMap<(String, u32), Vec<LogPos>> = BTreeMap::new();
    for item in log.records(log.min_pos(), end) {
        let (pos, record) = item.unwrap_or_else(|e| panic!("round {round}: log unreadable: {e}"));
        let view = record.view();
        let queue = expected
            .entry((view.topic.to_owned(), view.queue_id))
            .or_default();
        assert_eq!(
            view.queue_offset.0,
            queue.len() as u64,
            "round {round}: record at {} has the queue offset that follows",
            pos.0
        );
        queue.push(pos);
    }
    let queues = store.consume_queues().unwrap();
    assert_eq!(queues.len(), expected.len(), "round {round}: queues");
    for queue in queues {
        let key = (queue.topic().to_owned(), queue.queue_id());
        let listed: Vec<Option<LogPos>> = (queue.min_offset().0..queue.max_offset().0)
            .map(|offset| queue.get(QueueOffset(offset)).map(|entry| entry.log_pos))
            .collect();
        let expected: Vec<Option<LogPos>> = expected[&key].iter().copied().map(Some).collect();
        if listed != expected {
            let first = listed.iter().zip(&expected).position(|(a, b)| a != b);
            panic!(
                "round {round}: queue {key:?} lists {} entries, the log has {}; first difference at {first:?}: {:?} vs {:?}; dispatched {:?} written {:?}",
                listed.len(),
                expected.len(),
                first.map(|i| listed[i]),
                first.map(|i| expected[i]),
                store.dispatched_pos(),
                end,
            );
        }
    }
}
