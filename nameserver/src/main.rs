//! `ferrumq-nameserver`: the route table of a ferrumq cluster.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ferrumq_nameserver::NameServer;

#[derive(Parser)]
#[command(
    version,
    about = "ferrumq nameserver: brokers register here, clients ask it for routes"
)]
struct Args {
    /// gRPC listen address (ClusterService for brokers, MessagingService for clients).
    #[arg(long, default_value = "127.0.0.1:9876")]
    listen: SocketAddr,
    /// Drop a broker not heard from for this many milliseconds.
    #[arg(long, default_value_t = 30_000)]
    broker_expiry_ms: u64,
    /// How often brokers are asked to re-register, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    heartbeat_interval_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    anyhow::ensure!(
        args.broker_expiry_ms > args.heartbeat_interval_ms,
        "--broker-expiry-ms must be above --heartbeat-interval-ms"
    );
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let local = listener.local_addr()?;
    tracing::info!(%local, "nameserver listening");
    NameServer::serve(
        listener,
        Duration::from_millis(args.broker_expiry_ms),
        Duration::from_millis(args.heartbeat_interval_ms),
        async {
            let _ = tokio::signal::ctrl_c().await;
        },
    )
    .await?;
    Ok(())
}
