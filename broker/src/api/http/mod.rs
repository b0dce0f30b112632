//! The HTTP port: the produce endpoint for clients without a RocketMQ SDK, its OpenAPI
//! description, health, readiness and Prometheus metrics.

mod produce;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::routing::{get, post};

use crate::service::Broker;

/// The OpenAPI 3.0 description of this port, served at `/openapi.json`.
const OPENAPI: &str = include_str!("openapi.json");

pub fn router(broker: Arc<Broker>) -> Router {
    // One byte over the body limit still reaches the send path, which names the limit.
    let single_limit = broker.config.limits.max_body_bytes.saturating_add(1);
    Router::new()
        .route(
            "/topics/{topic}/messages",
            post(produce::one).layer(DefaultBodyLimit::max(single_limit)),
        )
        .route(
            "/topics/{topic}/messages/batch",
            post(produce::batch).layer(DefaultBodyLimit::max(produce::MAX_BATCH_REQUEST_BYTES)),
        )
        .route(
            "/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .fallback(produce::no_such_path)
        .method_not_allowed_fallback(produce::wrong_method)
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
