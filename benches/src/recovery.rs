//! `ferrumq-bench recovery`: how long a store takes to open after a crash and after a clean
//! stop, by log size and by the number of topics.
//!
//! A child process fills a fresh store with 1 KiB records (`async` flush, as fast as the
//! machine writes) spread over `--topics` topics of 8 queues each. Once every queue holds a
//! message it waits for dispatch and checkpoints, as a store that has run for a while with
//! these topics has, then writes on. Once the log reaches `--log-size` the parent kills it with
//! SIGKILL mid-write and times `MessageStore::open` on what is left; it then closes the store
//! cleanly and times one more open. The page cache survives a process crash, so this measures
//! recovery work, not a cold disk.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use ferrumq_storage::{
    FlushMode, MessageStore, MessageType, NewRecord, Properties, StoreOptions, TermIndex,
};

use crate::report::{Format, Report, parse_size};

#[derive(Args)]
pub(crate) struct RecoveryArgs {
    /// Size of the log to crash and recover.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    log_size: u64,
    #[arg(long, default_value = "1024", value_parser = parse_size)]
    size: u64,
    /// Topics to spread the records over, 8 queues each; every queue gets at least one.
    #[arg(long, default_value_t = 1)]
    topics: u32,
    /// Directory to create the store in (a fresh temporary directory inside it).
    #[arg(long, default_value = ".")]
    dir: std::path::PathBuf,
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
}

#[derive(Args)]
pub(crate) struct FillArgs {
    #[arg(long)]
    dir: std::path::PathBuf,
    #[arg(long, value_parser = parse_size)]
    log_size: u64,
    #[arg(long, value_parser = parse_size)]
    size: u64,
    #[arg(long)]
    topics: u32,
}

const QUEUES_PER_TOPIC: u32 = 8;

fn options() -> StoreOptions {
    StoreOptions {
        flush: FlushMode::Async {
            interval: Duration::from_millis(200),
        },
        retention: None,
        ..StoreOptions::default()
    }
}

pub(crate) fn run(args: &RecoveryArgs) -> anyhow::Result<()> {
    // The filling process maps a file for every queue (and the kernel's default allows 65,530
    // mappings per process, which RocketMQ and Kafka also ask operators to raise).
    let mappings_needed = u64::from(args.topics.max(1) * QUEUES_PER_TOPIC) + 1_000;
    let max_map_count: u64 = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(u64::MAX);
    anyhow::ensure!(
        max_map_count >= mappings_needed,
        "{} queues need vm.max_map_count >= {mappings_needed} (it is {max_map_count}): \
         sysctl -w vm.max_map_count={}",
        args.topics.max(1) * QUEUES_PER_TOPIC,
        mappings_needed.next_power_of_two()
    );
    let dir = tempfile::tempdir_in(&args.dir)?;
    let mut child = Command::new(std::env::current_exe()?)
        .arg("recovery-fill")
        .arg("--dir")
        .arg(dir.path())
        .arg("--log-size")
        .arg(args.log_size.to_string())
        .arg("--size")
        .arg(args.size.to_string())
        .arg("--topics")
        .arg(args.topics.to_string())
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout from the fill process"))?;
    let filled = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|line| line == "FILLED");
    child.kill()?; // SIGKILL, while it is still appending
    child.wait()?;
    anyhow::ensure!(filled, "the fill process stopped before the log was full");

    let started = Instant::now();
    let store = MessageStore::open(dir.path(), options())?;
    let open_time = started.elapsed();
    let recovery = store.recovery().clone();
    let log_bytes = store.log().written_pos().0;
    store.close()?;
    drop(store);
    let started = Instant::now();
    let store = MessageStore::open(dir.path(), options())?;
    let clean_open_time = started.elapsed();
    anyhow::ensure!(
        store.recovery().clean_shutdown,
        "the second open did not find a clean shutdown"
    );
    drop(store);
    let mut report = Report::default();
    report
        .add("log_bytes", log_bytes)
        .add("topics", args.topics)
        .add("queues", args.topics.max(1) * QUEUES_PER_TOPIC)
        .add("open_ms", open_time.as_secs_f64() * 1e3)
        .add("clean_open_ms", clean_open_time.as_secs_f64() * 1e3)
        .add("clean_shutdown", recovery.clean_shutdown)
        .add("checkpoint_pos", recovery.checkpoint.dispatched.0)
        .add(
            "rechecked_bytes",
            recovery.valid_end.0 - recovery.scanned_from.0,
        )
        .add("records_rechecked", recovery.records_scanned)
        .add("records_redispatched", recovery.records_redispatched);
    report.print(args.format);
    Ok(())
}

/// The child: appends until the log passes `log_size` and every queue of every topic holds a
/// message, says so, and goes on appending.
pub(crate) fn fill(args: &FillArgs) -> anyhow::Result<()> {
    let store = MessageStore::open(&args.dir, options())?;
    let body = vec![0x5Au8; usize::try_from(args.size)?];
    let host = "127.0.0.1:1".parse()?;
    let topics: Vec<String> = (0..args.topics.max(1))
        .map(|t| format!("recovery-{t}"))
        .collect();
    let queues = u64::from(args.topics.max(1) * QUEUES_PER_TOPIC);
    let mut announced = false;
    for i in 0u64.. {
        let properties = Properties::new()
            .with("UNIQ_KEY", &format!("{i:032X}"))?
            .with("TAGS", "recovery")?;
        let queue = i % queues;
        store.append(&NewRecord {
            topic: &topics[usize::try_from(queue / u64::from(QUEUES_PER_TOPIC))?],
            queue_id: u32::try_from(queue % u64::from(QUEUES_PER_TOPIC))?,
            message_type: MessageType::Normal,
            born_timestamp_ms: 0,
            born_host: host,
            properties: properties.as_ref(),
            body: &body,
            term_index: TermIndex::default(),
        })?;
        if i + 1 == queues {
            // Every queue now has its file: dispatch and checkpoint them, as a store that has
            // run for a while with these topics has. From here on the dispatcher checkpoints
            // on its own cadence, as in a run with one topic.
            store.wait_dispatched(store.log().written_pos(), Duration::from_secs(600));
            store.checkpoint()?;
        }
        if !announced && i >= queues && store.log().written_pos().0 >= args.log_size {
            announced = true;
            let mut out = std::io::stdout().lock();
            writeln!(out, "FILLED")?;
            out.flush()?;
        }
    }
    Ok(())
}
