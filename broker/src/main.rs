//! `ferrumq-broker`: with no arguments, a standalone broker (embedded nameserver, data in
//! `./data`, gRPC on 127.0.0.1:8081, HTTP on 127.0.0.1:8080).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use ferrumq_broker::BrokerConfig;

#[derive(Parser)]
#[command(
    version,
    about = "ferrumq broker: Apache RocketMQ 5 gRPC, durable by default"
)]
struct Args {
    /// TOML configuration; keys not set keep their defaults, unknown keys are an error.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long)]
    grpc_listen: Option<SocketAddr>,
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    /// Join a cluster through these nameservers (host:port,...) instead of embedding one.
    #[arg(long, value_delimiter = ',')]
    nameserver: Vec<String>,
    /// Print the default configuration as TOML and exit.
    #[arg(long)]
    print_default_config: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    keep_freed_buffers();
    let args = Args::parse();
    if args.print_default_config {
        let text = BrokerConfig::default_toml();
        std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes())?;
        return Ok(());
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let mut config = match &args.config {
        Some(path) => BrokerConfig::load(path)?,
        None => BrokerConfig::default(),
    };
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    if let Some(addr) = args.grpc_listen {
        config.grpc_listen = addr;
    }
    if let Some(addr) = args.http_listen {
        config.http_listen = addr;
    }
    if !args.nameserver.is_empty() {
        config.nameservers = args.nameserver;
    }
    let running = ferrumq_broker::start(config)
        .await
        .context("starting the broker")?;
    // Tests and scripts read this line to learn the bound ports.
    let line = format!(
        "ferrumq-broker ready grpc={} http={}\n",
        running.grpc_addr, running.http_addr
    );
    std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes())?;
    wait_for_signal().await;
    tracing::info!("shutting down");
    running.shutdown().await.context("shutting down")?;
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            let _ = ctrl_c.await;
            return;
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// glibc returns a freed block of 128 KiB or more to the kernel at once, and trims a heap as
/// soon as 128 KiB at its top are free. A receive's buffers (its messages, and tonic's 256 KiB
/// encode buffer) are that large, so every receive had fresh pages faulted in and zeroed, and
/// the trims cost system calls and TLB flushes on both cores: about a tenth of the broker's
/// CPU per consumed message. Blocks up to 4 MiB now come from the heaps, and a heap keeps up
/// to 16 MiB free at its top.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn keep_freed_buffers() {
    // SAFETY: `mallopt` only sets two of glibc's allocation thresholds.
    let set = unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20) == 1
    };
    if !set {
        eprintln!("warning: glibc refused the allocation thresholds; running with its defaults");
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_buffers() {}
