//! `ferrumq-bench storage`: W writers append records of one size; in `sync` mode each waits for
//! its record to be durable before it counts, which is what a broker does before it replies.
//!
//! Writers are logical: a few threads each keep several appends in flight (as a broker's async
//! tasks would), so 1,024 writers do not need 1,024 threads on a 2-core machine.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use ferrumq_storage::{
    FlushMode, LogPos, MessageStore, MessageType, NewRecord, Properties, StoreOptions, TermIndex,
};
use hdrhistogram::Histogram;

use crate::report::{Format, Report, parse_size};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum Flush {
    Sync,
    Async,
}

/// Append throughput and latency of the storage engine.
#[derive(Args)]
pub(crate) struct StorageArgs {
    /// Body size of each record in bytes.
    #[arg(long, default_value = "1024", value_parser = parse_size)]
    size: u64,
    /// Records to append in total.
    #[arg(long, default_value_t = 1_000_000)]
    count: u64,
    /// Concurrent writers (appends in flight).
    #[arg(long, default_value_t = 64)]
    writers: u64,
    /// OS threads carrying the writers.
    #[arg(long, default_value_t = 2)]
    threads: u64,
    #[arg(long, value_enum, default_value = "sync")]
    flush: Flush,
    /// Directory to create the store in (a fresh temporary directory inside it).
    #[arg(long, default_value = ".")]
    dir: std::path::PathBuf,
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    segment_size: u64,
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
}

pub(crate) fn run(args: &StorageArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir_in(&args.dir)?;
    let options = StoreOptions {
        segment_size_bytes: args.segment_size,
        flush: match args.flush {
            Flush::Sync => FlushMode::Sync,
            Flush::Async => FlushMode::Async {
                interval: Duration::from_millis(200),
            },
        },
        retention: None,
        ..StoreOptions::default()
    };
    let store = Arc::new(MessageStore::open(dir.path(), options)?);
    let threads = args.threads.clamp(1, args.writers.max(1));
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let store = store.clone();
            let in_flight = (args.writers / threads + u64::from(t < args.writers % threads)).max(1);
            let count = args.count / threads + u64::from(t < args.count % threads);
            let (size, sync) = (
                usize::try_from(args.size).unwrap_or(usize::MAX),
                matches!(args.flush, Flush::Sync),
            );
            std::thread::spawn(move || write(&store, t, count, in_flight, size, sync))
        })
        .collect();
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for handle in handles {
        let histogram = handle
            .join()
            .map_err(|_| anyhow::anyhow!("a writer thread panicked"))??;
        latency.add(histogram)?;
    }
    let elapsed = started.elapsed();
    let stats = store.log().flush_stats();
    let secs = elapsed.as_secs_f64();
    let bytes = store.log().written_pos().0 as f64;
    let mut report = Report::default();
    report
        .add("flush", format!("{:?}", args.flush).to_lowercase())
        .add("size_bytes", args.size)
        .add("count", args.count)
        .add("writers", args.writers)
        .add("elapsed_s", secs)
        .add("messages_per_s", args.count as f64 / secs)
        .add("mb_per_s", bytes / secs / 1e6)
        .add("fsyncs", stats.flushes)
        .add(
            "records_per_fsync",
            args.count as f64 / stats.flushes.max(1) as f64,
        )
        .add("latency_p50_us", latency.value_at_quantile(0.50))
        .add("latency_p99_us", latency.value_at_quantile(0.99))
        .add("latency_p999_us", latency.value_at_quantile(0.999))
        .add("latency_max_us", latency.max());
    report.print(args.format);
    drop(store);
    Ok(())
}

/// One thread's share: keeps `in_flight` appends outstanding, retiring the oldest once durable.
fn write(
    store: &MessageStore,
    thread: u64,
    count: u64,
    in_flight: u64,
    size: usize,
    sync: bool,
) -> anyhow::Result<Histogram<u64>> {
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let body = vec![0xA5u8; size];
    let properties = Properties::new().with("TAGS", "bench")?;
    let host: SocketAddr = "127.0.0.1:1".parse()?;
    let topic = format!("bench-{thread}");
    let mut outstanding: VecDeque<(LogPos, Instant)> =
        VecDeque::with_capacity(usize::try_from(in_flight).unwrap_or(0));
    let mut record_latency = |started: Instant| {
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        latency.saturating_record(micros.max(1));
    };
    for i in 0..count {
        let started = Instant::now();
        let appended = store.append(&NewRecord {
            topic: &topic,
            queue_id: (i % 8) as u32,
            message_type: MessageType::Normal,
            born_timestamp_ms: 0,
            born_host: host,
            properties: properties.as_ref(),
            body: &body,
            term_index: TermIndex::default(),
        })?;
        if !sync {
            record_latency(started);
            continue;
        }
        outstanding.push_back((appended.end(), started));
        if outstanding.len() as u64 >= in_flight
            && let Some((end, _)) = outstanding.front()
        {
            store.durable(*end).wait()?;
        }
        let durable = store.log().durable_pos();
        while outstanding.front().is_some_and(|(end, _)| *end <= durable) {
            if let Some((_, started)) = outstanding.pop_front() {
                record_latency(started);
            }
        }
    }
    while let Some((end, started)) = outstanding.pop_front() {
        store.durable(end).wait()?;
        record_latency(started);
    }
    Ok(latency)
}
