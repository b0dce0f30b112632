//! `ferrumq-bench machine`: the limits of this machine that storage figures are read against:
//! sequential write bandwidth with a final fdatasync, the latency of one fdatasync after a 4 KiB
//! and after a 64 KiB write, and memcpy bandwidth. Each is the median of several runs.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use clap::Args;

use crate::report::{Format, Report, parse_size};

#[derive(Args)]
pub(crate) struct MachineArgs {
    /// Bytes written by the sequential-write test.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    write_bytes: u64,
    /// Repetitions of each test; the median is reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[arg(long, default_value = ".")]
    dir: std::path::PathBuf,
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
}

pub(crate) fn run(args: &MachineArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir_in(&args.dir)?;
    let path = dir.path().join("probe");
    let chunk = vec![0x3Cu8; 1 << 20];

    let mut write_mbps = Vec::new();
    for _ in 0..args.runs {
        let _ = std::fs::remove_file(&path);
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)?;
        let started = Instant::now();
        let mut written = 0;
        while written < args.write_bytes {
            file.write_all(&chunk)?;
            written += chunk.len() as u64;
        }
        file.sync_data()?;
        write_mbps.push(written as f64 / started.elapsed().as_secs_f64() / 1e6);
    }

    let sync_us = |size: usize| -> anyhow::Result<f64> {
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)?;
        let block = vec![0x7Eu8; size];
        let mut samples = Vec::new();
        for i in 0..(200 * args.runs) {
            file.write_all_at(&block, (i * size) as u64)?;
            let started = Instant::now();
            file.sync_data()?;
            samples.push(started.elapsed().as_secs_f64() * 1e6);
        }
        Ok(median(&mut samples))
    };
    let fdatasync_4k = sync_us(4096)?;
    let fdatasync_64k = sync_us(65536)?;

    let source = vec![0x11u8; 256 << 20];
    let mut target = vec![0u8; 256 << 20];
    let mut memcpy_gbps = Vec::new();
    for _ in 0..args.runs.max(3) {
        let started = Instant::now();
        target.copy_from_slice(&source);
        std::hint::black_box(&target);
        memcpy_gbps.push(source.len() as f64 / started.elapsed().as_secs_f64() / 1e9);
    }

    let mut report = Report::default();
    report
        .add("seq_write_fdatasync_mb_per_s", median(&mut write_mbps))
        .add("fdatasync_after_4k_us", fdatasync_4k)
        .add("fdatasync_after_64k_us", fdatasync_64k)
        .add("memcpy_gb_per_s", median(&mut memcpy_gbps));
    report.print(args.format);
    Ok(())
}

fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples.get(samples.len() / 2).copied().unwrap_or(0.0)
}
