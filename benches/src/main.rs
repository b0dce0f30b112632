//! `ferrumq-bench`: load generator and measurement tool.
//!
//! - `storage`: appends to a `MessageStore` from W concurrent writers and reports throughput,
//!   fsync count and append latency (until durable, in `sync` mode).
//! - `recovery`: fills a log, crashes a child process with SIGKILL, and times the reopen.
//! - `machine`: the machine's own limits, to read the other figures against.
#![allow(clippy::print_stdout, reason = "a command-line tool prints its report")]

mod machine;
mod recovery;
mod report;
mod storage;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ferrumq-bench",
    about = "ferrumq load generator and benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Storage(storage::StorageArgs),
    Recovery(recovery::RecoveryArgs),
    /// Internal: the child process that `recovery` fills the log with and then kills.
    #[command(hide = true)]
    RecoveryFill(recovery::FillArgs),
    Machine(machine::MachineArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Storage(args) => storage::run(&args),
        Command::Recovery(args) => recovery::run(&args),
        Command::RecoveryFill(args) => recovery::fill(&args),
        Command::Machine(args) => machine::run(&args),
    }
}
