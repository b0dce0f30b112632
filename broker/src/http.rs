//! The HTTP port: health, readiness and Prometheus metrics.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::service::Broker;

pub fn router(broker: Arc<Broker>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .with_state(broker)
}

async fn ready(State(broker): State<Arc<Broker>>) -> (StatusCode, String) {
    match broker.store.log().failure() {
        None => (StatusCode::OK, "ready".to_owned()),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("storage failed: {reason}"),
        ),
    }
}

async fn metrics(State(broker): State<Arc<Broker>>) -> String {
    let log = broker.store.log();
    let flush = log.flush_stats();
    broker.metrics.render(&[
        (
            "rocketmq_half_messages",
            "Transactions waiting for a decision.",
            broker.transactions.pending() as u64,
        ),
        (
            "ferrumq_timer_messages_in_memory",
            "Scheduled messages due within the memory window.",
            broker.timers.in_memory() as u64,
        ),
        (
            "ferrumq_commit_log_written_bytes",
            "Commit-log write position.",
            log.written_pos().0,
        ),
        (
            "ferrumq_commit_log_durable_bytes",
            "Commit-log position known to be on disk.",
            log.durable_pos().0,
        ),
        (
            "ferrumq_commit_log_flushes",
            "Flushes of the commit log since start.",
            flush.flushes,
        ),
        (
            "rocketmq_consumer_inflight_messages",
            "Messages delivered and not yet acked.",
            broker.consumers.inflight(),
        ),
        (
            "ferrumq_telemetry_streams",
            "Open client Telemetry streams.",
            broker.telemetry_streams() as u64,
        ),
    ])
}
