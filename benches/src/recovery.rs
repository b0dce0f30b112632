//! `ferrumq-bench recovery`: how long a store takes to open after a crash, by log size.
//!
//! A child process fills a fresh store with 1 KiB records (`async` flush, as fast as the
//! machine writes) and keeps writing; once the log reaches `--log-size` the parent kills it with
//! SIGKILL mid-write and times `MessageStore::open` on what is left. The page cache survives a
//! process crash, so this measures recovery work, not a cold disk.

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
}

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
    let dir = tempfile::tempdir_in(&args.dir)?;
    let mut child = Command::new(std::env::current_exe()?)
        .arg("recovery-fill")
        .arg("--dir")
        .arg(dir.path())
        .arg("--log-size")
        .arg(args.log_size.to_string())
        .arg("--size")
        .arg(args.size.to_string())
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
    drop(store);
    let mut report = Report::default();
    report
        .add("log_bytes", log_bytes)
        .add("open_ms", open_time.as_secs_f64() * 1e3)
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

/// The child: appends until the log passes `log_size`, says so, and goes on appending.
pub(crate) fn fill(args: &FillArgs) -> anyhow::Result<()> {
    let store = MessageStore::open(&args.dir, options())?;
    let body = vec![0x5Au8; usize::try_from(args.size)?];
    let host = "127.0.0.1:1".parse()?;
    let mut announced = false;
    for i in 0u64.. {
        let properties = Properties::new()
            .with("UNIQ_KEY", &format!("{i:032X}"))?
            .with("TAGS", "recovery")?;
        store.append(&NewRecord {
            topic: "recovery",
            queue_id: (i % 16) as u32,
            message_type: MessageType::Normal,
            born_timestamp_ms: 0,
            born_host: host,
            properties: properties.as_ref(),
            body: &body,
            term_index: TermIndex::default(),
        })?;
        if !announced && store.log().written_pos().0 >= args.log_size {
            announced = true;
            let mut out = std::io::stdout().lock();
            writeln!(out, "FILLED")?;
            out.flush()?;
        }
    }
    Ok(())
}
