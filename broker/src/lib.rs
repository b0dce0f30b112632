//! The ferrumq broker: speaks Apache RocketMQ 5's gRPC protocol (`apache.rocketmq.v2`) over
//! the storage engine.
//!
//! - [`service::Broker`]: what each request does (send, receive with leases, ack, routes).
//! - [`consumer`]: consumer groups: leases, redelivery, dead letters, FIFO order, durable
//!   state.
//! - [`transaction`]: half messages, decisions, check-backs; [`timer`]: scheduled messages.
//! - [`api`]: the edge, the only place that knows prost, tonic and axum: thin gRPC
//!   handlers (`api::grpc`), the HTTP produce endpoint, health and metrics (`api::http`).
//! - [`metadata`]: topics and groups; [`config`]: the TOML configuration.
//! - [`admin`]: offset resets (replay), dead-letter resend and purge, message deliveries.
//!
//! [`start`] runs a broker in-process (tests use it with port 0); the `ferrumq-broker`
//! binary wraps it.

pub mod admin;
pub mod api;
pub mod cluster;
pub mod config;
pub mod consumer;
pub mod duplicates;
pub mod error;
mod files;
pub mod filter;
pub mod log_writer;
pub mod message;
pub mod metadata;
pub mod metrics;
pub mod service;
pub mod timer;
pub mod transaction;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ferrumq_nameserver::{NameServer, RouteTable};
use ferrumq_storage::{FileSystem, FlushMode, MessageStore, RealFileSystem, StoreOptions};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

pub use config::BrokerConfig;
pub use error::{ApiError, BrokerError};
use log_writer::{Leadership, LogWriter};
use service::{Broker, Routes};

/// A broker running in this process.
pub struct RunningBroker {
    pub broker: Arc<Broker>,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    servers: Vec<JoinHandle<()>>,
    stop_background: Arc<AtomicBool>,
    timer_thread: Option<std::thread::JoinHandle<()>>,
}

/// Opens the data directory, recovers, and starts serving.
pub async fn start(config: BrokerConfig) -> Result<RunningBroker, BrokerError> {
    start_with(config, Arc::new(RealFileSystem)).await
}

/// [`start`], with every write made durable through `fs` (power-loss tests pass a
/// [`ferrumq_storage::CrashFileSystem`]).
pub async fn start_with(
    config: BrokerConfig,
    fs: Arc<dyn FileSystem>,
) -> Result<RunningBroker, BrokerError> {
    config.validate()?;
    let config = Arc::new(config);
    let io = |path: &std::path::Path| {
        let path = path.to_owned();
        move |source| BrokerError::Io { path, source }
    };
    std::fs::create_dir_all(&config.data_dir).map_err(io(&config.data_dir))?;
    let options = StoreOptions {
        segment_size_bytes: config.segment_size_bytes,
        flush: match config.flush {
            config::FlushPolicy::Sync => FlushMode::Sync,
            config::FlushPolicy::Async => FlushMode::Async {
                interval: Duration::from_millis(config.async_flush_interval_ms),
            },
        },
        retention: (config.retention_hours > 0)
            .then(|| Duration::from_secs(config.retention_hours * 3600)),
        disk_watermark: config.disk_watermark,
        fs,
        ..StoreOptions::default()
    };
    let data_dir = config.data_dir.clone();
    let store =
        tokio::task::spawn_blocking(move || MessageStore::open(&data_dir.join("store"), options))
            .await
            .map_err(|e| BrokerError::Corrupt {
                path: config.data_dir.clone(),
                reason: e.to_string(),
            })??;
    let store = Arc::new(store);
    let recovery = store.recovery();
    tracing::info!(
        clean = recovery.clean_shutdown,
        valid_end = recovery.valid_end.0,
        elapsed_ms = u64::try_from(recovery.elapsed.as_millis()).unwrap_or(u64::MAX),
        "storage recovered"
    );
    let log = LogWriter::new(store.clone(), config.flush);
    let leadership = Arc::new(Leadership::standalone(store.clone()));
    let metadata = {
        let (dir, settings, log) = (config.data_dir.clone(), config.clone(), log.clone());
        tokio::task::spawn_blocking(move || metadata::Metadata::open(&dir, settings, log))
            .await
            .map_err(|e| BrokerError::Corrupt {
                path: config.data_dir.clone(),
                reason: e.to_string(),
            })??
    };
    let metadata = Arc::new(metadata);
    let metrics = Arc::new(metrics::Metrics::default());
    let consumers = {
        let (log, metadata, metrics, dir) = (
            log.clone(),
            metadata.clone(),
            metrics.clone(),
            config.data_dir.clone(),
        );
        tokio::task::spawn_blocking(move || {
            consumer::ConsumerGroups::open(log, metadata, metrics, dir)
        })
        .await
        .map_err(|e| BrokerError::Corrupt {
            path: config.data_dir.clone(),
            reason: e.to_string(),
        })??
    };
    let consumers = Arc::new(consumers);
    let (transactions, timers, duplicates) = {
        let (log, metadata, metrics, settings) = (
            log.clone(),
            metadata.clone(),
            metrics.clone(),
            config.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let config = settings;
            let now = service::now_ms();
            let transactions = transaction::Transactions::open(
                log.clone(),
                config.transactions.clone(),
                metrics.clone(),
                now,
            )?;
            let timers = timer::Timers::open(
                log.clone(),
                metadata,
                metrics,
                config.timers.clone(),
                config.data_dir.join("timer"),
                now,
            )?;
            let mut duplicates = duplicates::DuplicateWindow::new(
                config.duplicate_window_ms,
                config.duplicate_window_ids,
            );
            let recent = duplicates.load(log.store(), now);
            tracing::debug!(recent, "duplicate window loaded from the message index");
            Ok::<_, BrokerError>((Arc::new(transactions), Arc::new(timers), duplicates))
        })
        .await
        .map_err(|e| BrokerError::Corrupt {
            path: config.data_dir.clone(),
            reason: e.to_string(),
        })??
    };

    let grpc_listener = tokio::net::TcpListener::bind(config.grpc_listen)
        .await
        .map_err(io(std::path::Path::new("grpc_listen")))?;
    let http_listener = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .map_err(io(std::path::Path::new("http_listen")))?;
    let grpc_addr = grpc_listener
        .local_addr()
        .map_err(io(std::path::Path::new("grpc_listen")))?;
    let http_addr = http_listener
        .local_addr()
        .map_err(io(std::path::Path::new("http_listen")))?;
    let endpoint = config
        .advertised_endpoint
        .clone()
        .unwrap_or_else(|| grpc_addr.to_string());

    let embedded = config
        .nameservers
        .is_empty()
        .then(|| Arc::new(RouteTable::new(config.broker_expiry())));
    let routes = match &embedded {
        Some(table) => Routes::Embedded(table.clone()),
        None => Routes::Nameservers(cluster::Nameservers::new(
            &config.nameservers,
            config.nameserver_timeout(),
        )?),
    };
    let stop_background = Arc::new(AtomicBool::new(false));
    let dispatched = dispatch_watch(&store);
    let broker = Arc::new(Broker::new(service::Parts {
        config: config.clone(),
        store: store.clone(),
        log,
        leadership: leadership.clone(),
        metadata,
        consumers: consumers.clone(),
        transactions,
        timers: timers.clone(),
        duplicates,
        metrics,
        routes,
        endpoint: endpoint.clone(),
        dispatched,
    }));
    broker.publish_routes();
    cluster::spawn_heartbeats(&broker);
    spawn_housekeeping(&broker, stop_background.clone());
    let timer_thread = {
        let stop = stop_background.clone();
        std::thread::Builder::new()
            .name("ferrumq-timer".into())
            .spawn(move || timers.run(&stop, &leadership))
            .map_err(io(std::path::Path::new("timer thread")))?
    };
    if let Some(table) = &embedded {
        NameServer::spawn_expiry(table, config.heartbeat_interval());
    }

    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let nameserver = embedded
        .as_ref()
        .map(|table| NameServer::new(table.clone(), config.heartbeat_interval()));
    let servers = api::serve(
        broker.clone(),
        grpc_listener,
        http_listener,
        nameserver,
        stop_rx,
    );
    tracing::info!(grpc = %grpc_addr, http = %http_addr, endpoint, data_dir = %config.data_dir.display(), "broker serving");
    Ok(RunningBroker {
        broker,
        grpc_addr,
        http_addr,
        stop: Some(stop_tx),
        servers,
        stop_background,
        timer_thread: Some(timer_thread),
    })
}

impl RunningBroker {
    /// Stops serving, snapshots consumer state and closes the store cleanly.
    pub async fn shutdown(mut self) -> Result<(), BrokerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        for server in self.servers.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        }
        self.stop_background.store(true, Ordering::Release);
        let broker = self.broker.clone();
        let timer_thread = self.timer_thread.take();
        tokio::task::spawn_blocking(move || {
            if let Some(thread) = timer_thread {
                let _ = thread.join();
            }
            broker.consumers.snapshot()?;
            broker.store.close()?;
            Ok::<(), BrokerError>(())
        })
        .await
        .map_err(|e| BrokerError::Corrupt {
            path: self.broker.config.data_dir.clone(),
            reason: e.to_string(),
        })?
    }
}

/// Dispatch progress as a watch value, which wakes waiting receives.
fn dispatch_watch(store: &MessageStore) -> watch::Receiver<u64> {
    let (tx, rx) = watch::channel(store.dispatched_pos().0);
    if !store.on_dispatched(move |pos| {
        tx.send_replace(pos.0);
    }) {
        tracing::error!(
            "the store already has a dispatch listener; receives wait out their poll time"
        );
    }
    rx
}

/// Twice a second: renews push consumers' leases (or releases those of clients that went
/// away), dead-letters expired last attempts and sends due transaction check-backs; every 5 s, snapshots consumer state so
/// recovery replays little.
fn spawn_housekeeping(broker: &Arc<Broker>, stop: Arc<AtomicBool>) {
    let weak = Arc::downgrade(broker);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut ticks = 0u64;
        loop {
            tick.tick().await;
            if stop.load(Ordering::Acquire) {
                break;
            }
            let Some(broker) = weak.upgrade() else { break };
            if broker.store.log().failure().is_some() {
                break; // a failed node does no more work (fail-stop)
            }
            ticks += 1;
            let consumers = broker.consumers.clone();
            let snapshot = ticks.is_multiple_of(10);
            let connected = broker.clone();
            let result = tokio::task::spawn_blocking(move || {
                let limits = &connected.config.limits;
                let ms = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
                let now = service::now_ms();
                // Each step runs even when one before it failed: a failing dead letter
                // must not stop check-backs or the snapshot.
                let step =
                    |what: &str, result: Result<Option<ferrumq_storage::LogPos>, ApiError>| {
                        result.unwrap_or_else(|e| {
                        tracing::warn!(step = what, error = %e.message, "housekeeping step failed");
                        None
                    })
                    };
                if !connected.leadership.holds() {
                    // Leases, dead letters and check-backs are the leader's to move.
                    if snapshot {
                        consumers.snapshot()?;
                    }
                    return Ok(None);
                }
                let renewed = step(
                    "lease renewal",
                    consumers.renew_leases(
                        now,
                        ms(limits.push_lease_ms),
                        ms(limits.push_lease_renew_ahead_ms),
                        ms(limits.push_lease_release_ms),
                        |client| connected.is_connected(client),
                    ),
                );
                let swept = step("dead-letter sweep", consumers.sweep(now));
                step("check-backs", connected.send_check_backs(now).map(|_| None));
                if snapshot {
                    consumers.snapshot()?;
                }
                Ok::<_, BrokerError>(swept.or(renewed))
            })
            .await;
            match result {
                Ok(Ok(Some(end))) => {
                    let _ = broker.store.durable(end).await;
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "consumer housekeeping failed"),
                Err(e) => tracing::warn!(error = %e, "consumer housekeeping panicked"),
            }
        }
    });
}
