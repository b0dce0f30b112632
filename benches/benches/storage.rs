//! Criterion benches of the storage hot paths: append (copy into the mapped segment, no
//! durability wait) and read by position, for 128 B, 1 KiB and 4 KiB bodies.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ferrumq_storage::{
    FlushMode, MessageStore, MessageType, NewRecord, Properties, StoreOptions, TermIndex,
};

fn store() -> (tempfile::TempDir, MessageStore) {
    let dir = tempfile::tempdir_in(".").unwrap();
    let options = StoreOptions {
        flush: FlushMode::Async {
            interval: Duration::from_millis(200),
        },
        segment_size_bytes: 256 << 20,
        retention: None,
        ..StoreOptions::default()
    };
    let store = MessageStore::open(dir.path(), options).unwrap();
    (dir, store)
}

fn record<'a>(properties: &'a Properties, body: &'a [u8]) -> NewRecord<'a> {
    NewRecord {
        topic: "bench",
        queue_id: 0,
        message_type: MessageType::Normal,
        born_timestamp_ms: 0,
        born_host: "127.0.0.1:1".parse().unwrap(),
        properties: properties.as_ref(),
        body,
        term_index: TermIndex::default(),
    }
}

fn append_and_read(c: &mut Criterion) {
    let properties = Properties::new().with("TAGS", "bench").unwrap();
    for size in [128usize, 1024, 4096] {
        let body = vec![0xA5u8; size];
        let mut group = c.benchmark_group("storage");
        group.throughput(Throughput::Bytes(size as u64));
        group.measurement_time(Duration::from_secs(3));
        group.warm_up_time(Duration::from_millis(500));
        let (_dir, store) = store();
        group.bench_function(BenchmarkId::new("append", size), |b| {
            b.iter(|| store.append(&record(&properties, &body)).unwrap());
        });
        let positions: Vec<_> = (0..1000)
            .map(|_| store.append(&record(&properties, &body)).unwrap().pos)
            .collect();
        let mut i = 0;
        group.bench_function(BenchmarkId::new("read", size), |b| {
            b.iter(|| {
                i = (i + 1) % positions.len();
                let record = store.read(positions[i]).unwrap();
                std::hint::black_box(record.view().body.len())
            });
        });
        group.finish();
    }
}

criterion_group!(benches, append_and_read);
criterion_main!(benches);
