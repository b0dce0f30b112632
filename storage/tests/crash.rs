#![cfg(test)]
#![allow(
    clippy::cast_possible_truncation,
    reason = "storage requires a 64-bit target, where these casts are lossless"
)]
//! A real crash: a child process appends from several threads and prints each record once it is
//! acknowledged: durable in `sync` mode, written in `async` mode (a process crash leaves the
//! page cache, so it must not lose a written record either). The test kills it with SIGKILL at
//! a random moment, reopens the store, and checks that every acknowledged record is present
//! and intact, and that its consume-queue entry exists. Repeated `FERRUMQ_CRASH_KILLS` times
//! (default 20; half of that in `async` mode) on one data directory, so recoveries stack.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{acked_record, append_numbered};
use ferrumq_storage::{FlushMode, LogPos, MessageStore, StoreOptions};

const CHILD_DIR: &str = "FERRUMQ_CRASH_CHILD_DIR";
const CHILD_FIRST: &str = "FERRUMQ_CRASH_CHILD_FIRST";
const CHILD_ASYNC: &str = "FERRUMQ_CRASH_CHILD_ASYNC";

fn options(asynchronous: bool) -> StoreOptions {
    let flush = if asynchronous {
        FlushMode::Async {
            interval: Duration::from_millis(20),
        }
    } else {
        FlushMode::Sync
    };
    StoreOptions {
        flush,
        ..StoreOptions::for_tests()
    }
}

fn body_len(n: u64) -> usize {
    (n % 7) as usize * 150
}

/// The child's side; a no-op unless the parent started this binary as a child.
#[test]
fn crash_child_writer() {
    let (Ok(dir), Ok(first)) = (std::env::var(CHILD_DIR), std::env::var(CHILD_FIRST)) else {
        return;
    };
    let first: u64 = first.parse().unwrap();
    let asynchronous = std::env::var_os(CHILD_ASYNC).is_some();
    let store = Arc::new(MessageStore::open(dir.as_ref(), options(asynchronous)).unwrap());
    // Writers 0 and 2 append one record at a time; 1 and 3 append batches of 60 (over 16 KiB,
    // which `async` mode writes with pwrite rather than through the mapping).
    let writers: Vec<_> = (0..4u64)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                let per_append = if t % 2 == 0 { 1 } else { 60 };
                let mut appended = Vec::new();
                for i in 0.. {
                    let numbers: Vec<u64> = (i * per_append..(i + 1) * per_append)
                        .map(|k| first + k * 4 + t)
                        .collect();
                    append_numbered(&store, &numbers, body_len, &mut appended).unwrap();
                    if !asynchronous && let Some(last) = appended.last() {
                        store.durable(last.end()).wait().unwrap();
                    }
                    let mut out = std::io::stdout().lock();
                    for (n, a) in numbers.iter().zip(&appended) {
                        writeln!(out, "ACK {n} {}", a.pos.0).unwrap();
                    }
                    out.flush().unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        let _ = writer.join();
    }
}

fn crash_kills() -> u64 {
    std::env::var("FERRUMQ_CRASH_KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(20)
}

#[test]
fn sigkill_never_loses_an_acknowledged_record() {
    kill_loop(false, crash_kills());
}

#[test]
fn sigkill_in_async_mode_never_loses_a_written_record() {
    kill_loop(true, crash_kills().div_ceil(2));
}

fn kill_loop(asynchronous: bool, kills: u64) {
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut total_acked = 0usize;
    for round in 0..kills {
        let stderr_path = logs.path().join(format!("child-{round}.stderr"));
        let mut command = Command::new(std::env::current_exe().unwrap());
        if asynchronous {
            command.env(CHILD_ASYNC, "1");
        }
        let mut child = command
            .args([
                "crash_child_writer",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR, dir.path())
            .env(CHILD_FIRST, (round * 1_000_000_000).to_string())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (first_ack, first_ack_seen) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut acked = Vec::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let Some(rest) = line.strip_prefix("ACK ") else {
                    continue;
                };
                let mut parts = rest.split(' ');
                if let (Some(Ok(n)), Some(Ok(pos))) = (
                    parts.next().map(str::parse::<u64>),
                    parts.next().map(str::parse::<u64>),
                ) {
                    if acked.is_empty() {
                        let _ = first_ack.send(());
                    }
                    acked.push((n, pos));
                }
            }
            acked
        });
        // Kill at a random moment after the child has started acknowledging.
        let started = first_ack_seen.recv_timeout(Duration::from_secs(60)).is_ok();
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(rng % 150));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let acked = reader.join().unwrap();
        assert!(
            started && !acked.is_empty(),
            "round {round}: the child acknowledged nothing; its stderr: {}",
            std::fs::read_to_string(&stderr_path).unwrap_or_default()
        );
        total_acked += acked.len();

        let store = MessageStore::open(dir.path(), options(asynchronous)).unwrap();
        for (n, pos) in &acked {
            let record = acked_record(&store, *n, *pos, body_len, &format!("round {round}"));
            let view = record.view();
            let queue = store.consume_queue(view.topic, view.queue_id).unwrap();
            let entry = queue.get(view.queue_offset).unwrap();
            assert_eq!(entry.log_pos, LogPos(*pos));
        }
        store.close().unwrap();
    }
    assert!(total_acked as u64 >= kills);
}
