//! `ferrumq-bench`: load generator and measurement tool.
//!
//! - `storage`: appends to a `MessageStore` from W concurrent writers and reports throughput,
//!   fsync count and append latency (until durable, in `sync` mode).
//! - `recovery`: fills a log, crashes a child process with SIGKILL, and times the reopen.
//! - `machine`: the machine's own limits, to read the other figures against.
//! - `produce`, `consume`, `e2e`: load against a running broker over the RocketMQ v2 protocol
//!   (`--client raw|official|native`).
//! - `nats`: acked publishes to NATS JetStream, the peer for `produce`.
#![allow(clippy::print_stdout, reason = "a command-line tool prints its report")]

mod machine;
mod nats;
mod network;
mod null_server;
mod recovery;
mod report;
mod special;
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
    /// Send messages to a broker as fast as C requests in flight allow.
    Produce(network::NetArgs),
    /// Drain a backlog: receive a batch, ack it in one request.
    Consume(network::NetArgs),
    /// Latency from send to a waiting receiver at a fixed rate.
    E2e(network::NetArgs),
    /// Send a TRANSACTION message and commit it, C at a time.
    Txn(special::SpecialArgs),
    /// Schedule N messages over the next `--spread-ms` and measure how late they arrive.
    Delay(special::SpecialArgs),
    /// Per-message-group order and throughput over a FIFO topic.
    Fifo(special::SpecialArgs),
    /// A MessagingService that stores nothing: the ceiling for `produce`.
    NullServer(null_server::NullServerArgs),
    /// Acked publishes to NATS JetStream (file storage), C in flight.
    Nats(nats::NatsArgs),
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
        Command::Produce(args) => network::produce(&args),
        Command::Consume(args) => network::consume(&args),
        Command::E2e(args) => network::e2e(&args),
        Command::Txn(args) => special::txn(&args),
        Command::Delay(args) => special::delay(&args),
        Command::Fifo(args) => special::fifo(&args),
        Command::NullServer(args) => null_server::run(&args),
        Command::Nats(args) => nats::run(&args),
    }
}
