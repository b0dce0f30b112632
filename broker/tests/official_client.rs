//! The broker driven by the official Apache RocketMQ Rust client, `rocketmq = "=5.0.0"`.
#![cfg(test)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{consumer, create_group, http_get, ids, producer, receive_n, start, tag};
use rocketmq::model::common::{FilterExpression, FilterType};
use rocketmq::model::message::MessageBuilder;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produced_messages_are_received_and_acked_exactly_once() {
    let broker = start(|_| {}).await;
    create_group(broker.addr(), "g", 17).await;
    let producer = producer(broker.addr(), "orders").await;
    let mut sent = HashSet::new();
    for i in 0..60 {
        let message = MessageBuilder::builder()
            .set_topic("orders")
            .set_tag("paid")
            .set_keys(vec![format!("order-{i}")])
            .set_body(format!("order {i}").into_bytes())
            .build()
            .unwrap();
        sent.insert(
            producer
                .send(message)
                .await
                .unwrap()
                .message_id()
                .to_owned(),
        );
    }
    // A batch: one request, one receipt per message.
    let batch: Vec<_> = (0..10)
        .map(|i| {
            MessageBuilder::builder()
                .set_topic("orders")
                .set_body(vec![i; 10])
                .build()
                .unwrap()
        })
        .collect();
    let receipts = producer.batch_send(batch).await.unwrap();
    assert_eq!(receipts.len(), 10);
    sent.extend(receipts.iter().map(|r| r.message_id().to_owned()));
    assert_eq!(sent.len(), 70);

    let consumer = consumer(broker.addr(), "g", "orders").await;
    let received = receive_n(
        &consumer,
        "orders",
        &tag("*"),
        70,
        Duration::from_secs(30),
        true,
        WAIT,
    )
    .await;
    assert_eq!(received.len(), 70, "every message once");
    assert_eq!(ids(&received), sent, "the ids the producer was given");
    assert!(received.iter().all(|m| m.delivery_attempt() == 1));
    let first = received.iter().find(|m| m.body() == b"order 0").unwrap();
    assert_eq!(first.tag(), Some("paid"));
    assert_eq!(first.keys(), ["order-0".to_owned()]);
    // Everything is acked: nothing comes back, not even after the invisible time.
    let again = consumer
        .receive_with("orders", &tag("*"), 32, Duration::from_secs(1))
        .await
        .unwrap();
    assert!(again.is_empty());
    producer.shutdown().await.unwrap();
    consumer.shutdown().await.unwrap();
    broker.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacked_message_returns_with_attempt_2_then_goes_to_the_dead_letter_queue() {
    let broker = start(|_| {}).await;
    create_group(broker.addr(), "retry-g", 2).await;
    create_group(broker.addr(), "dlq-reader", 17).await;
    let producer = producer(broker.addr(), "payments").await;
    let receipt = producer
        .send(
            MessageBuilder::builder()
                .set_topic("payments")
                .set_tag("t")
                .set_body(b"pay".to_vec())
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    let retry_consumer = consumer(broker.addr(), "retry-g", "payments").await;
    let lease = Duration::from_secs(1);

    let first = receive_n(
        &retry_consumer,
        "payments",
        &tag("*"),
        1,
        lease,
        false,
        WAIT,
    )
    .await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].delivery_attempt(), 1);

    let second = receive_n(
        &retry_consumer,
        "payments",
        &tag("*"),
        1,
        lease,
        false,
        WAIT,
    )
    .await;
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].message_id(), receipt.message_id());
    assert_eq!(second[0].delivery_attempt(), 2);
    // The first delivery's handle is stale now.
    let stale = retry_consumer.ack(&first[0]).await.unwrap_err();
    assert!(
        stale.to_string().contains("INVALID_RECEIPT_HANDLE"),
        "{stale}"
    );

    // Two deliveries were the maximum: once the lease ends it is dead-lettered.
    let dlq_topic = "%DLQ%retry-g";
    let dlq_consumer = consumer(broker.addr(), "dlq-reader", dlq_topic).await;
    let dead = receive_n(
        &dlq_consumer,
        dlq_topic,
        &tag("*"),
        1,
        Duration::from_secs(10),
        true,
        WAIT,
    )
    .await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].message_id(),
        receipt.message_id(),
        "the DLQ keeps the message id"
    );
    assert_eq!(dead[0].body(), b"pay");
    assert!(
        retry_consumer
            .receive_with("payments", &tag("*"), 32, lease)
            .await
            .unwrap()
            .is_empty()
    );
    broker.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_group_shares_messages_and_two_groups_each_get_all() {
    let broker = start(|_| {}).await;
    for group in ["shared", "other"] {
        create_group(broker.addr(), group, 17).await;
    }
    let producer = producer(broker.addr(), "events").await;
    let mut sent = HashSet::new();
    for i in 0..80u32 {
        let message = MessageBuilder::builder()
            .set_topic("events")
            .set_body(i.to_le_bytes().to_vec())
            .build()
            .unwrap();
        sent.insert(
            producer
                .send(message)
                .await
                .unwrap()
                .message_id()
                .to_owned(),
        );
    }
    let a = consumer(broker.addr(), "shared", "events").await;
    let b = consumer(broker.addr(), "shared", "events").await;
    let other = consumer(broker.addr(), "other", "events").await;
    let invisible = Duration::from_secs(30);
    let all = tag("*");
    let (from_a, from_b) = tokio::join!(
        receive_n(
            &a,
            "events",
            &all,
            40,
            invisible,
            true,
            Duration::from_secs(8)
        ),
        receive_n(
            &b,
            "events",
            &all,
            40,
            invisible,
            true,
            Duration::from_secs(8)
        ),
    );
    let mut shared = ids(&from_a);
    assert!(
        shared.is_disjoint(&ids(&from_b)),
        "no message went to both consumers of a group"
    );
    shared.extend(ids(&from_b));
    assert_eq!(from_a.len() + from_b.len(), 80);
    assert_eq!(shared, sent);
    let everything = receive_n(&other, "events", &tag("*"), 80, invisible, true, WAIT).await;
    assert_eq!(
        ids(&everything),
        sent,
        "the second group gets every message too"
    );
    broker.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_and_sql_filters_select_messages() {
    let broker = start(|_| {}).await;
    for group in ["tags", "sql"] {
        create_group(broker.addr(), group, 17).await;
    }
    let producer = producer(broker.addr(), "filtered").await;
    let mut expected_tags = HashSet::new();
    let mut expected_sql = HashSet::new();
    for i in 0..30u32 {
        let tag = ["a", "b", "c"][i as usize % 3];
        let color = if i % 2 == 0 { "red" } else { "blue" };
        let message = MessageBuilder::builder()
            .set_topic("filtered")
            .set_tag(tag)
            .set_properties(HashMap::from([
                ("n".to_owned(), i.to_string()),
                ("color".to_owned(), color.to_owned()),
            ]))
            .set_body(vec![1])
            .build()
            .unwrap();
        let id = producer
            .send(message)
            .await
            .unwrap()
            .message_id()
            .to_owned();
        if tag != "c" {
            expected_tags.insert(id.clone());
        }
        if i > 10 && color == "red" && tag != "b" {
            expected_sql.insert(id);
        }
    }
    let by_tag = consumer(broker.addr(), "tags", "filtered").await;
    let got = receive_n(
        &by_tag,
        "filtered",
        &tag("a || b"),
        expected_tags.len(),
        Duration::from_secs(30),
        true,
        WAIT,
    )
    .await;
    assert_eq!(ids(&got), expected_tags);
    assert!(got.iter().all(|m| m.tag() != Some("c")));

    let by_sql = consumer(broker.addr(), "sql", "filtered").await;
    let sql = FilterExpression::new(
        FilterType::Sql,
        "n > 10 AND color = 'red' AND TAGS IN ('a', 'c')",
    );
    let got = receive_n(
        &by_sql,
        "filtered",
        &sql,
        expected_sql.len(),
        Duration::from_secs(30),
        true,
        WAIT,
    )
    .await;
    assert_eq!(ids(&got), expected_sql);
    let bad = by_sql
        .receive_with(
            "filtered",
            &FilterExpression::new(FilterType::Sql, "n >"),
            32,
            Duration::from_secs(30),
        )
        .await
        .unwrap_err();
    assert!(
        bad.to_string().contains("ILLEGAL_FILTER_EXPRESSION"),
        "{bad}"
    );
    broker.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_flush_delivers_and_http_reports_health_and_metrics() {
    let broker = start(|c| c.flush = ferrumq_broker::config::FlushPolicy::Async).await;
    create_group(broker.addr(), "g", 17).await;
    let producer = producer(broker.addr(), "quick").await;
    let mut sent = HashSet::new();
    for i in 0..10u8 {
        let message = MessageBuilder::builder()
            .set_topic("quick")
            .set_body(vec![i])
            .build()
            .unwrap();
        sent.insert(
            producer
                .send(message)
                .await
                .unwrap()
                .message_id()
                .to_owned(),
        );
    }
    let consumer = consumer(broker.addr(), "g", "quick").await;
    let received = receive_n(
        &consumer,
        "quick",
        &tag("*"),
        10,
        Duration::from_secs(30),
        true,
        WAIT,
    )
    .await;
    assert_eq!(ids(&received), sent);

    let http = broker.running.http_addr;
    let (status, body) = tokio::task::spawn_blocking(move || http_get(http, "/healthz"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(body.trim(), "ok");
    let (status, _) = tokio::task::spawn_blocking(move || http_get(http, "/readyz"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let (_, metrics) = tokio::task::spawn_blocking(move || http_get(http, "/metrics"))
        .await
        .unwrap();
    for line in [
        "rocketmq_messages_in_total 10",
        "rocketmq_messages_out_total 10",
        "ferrumq_messages_acked_total 10",
        "rocketmq_half_messages 0",
        "ferrumq_timer_messages_in_memory 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} missing from:\n{metrics}"
        );
    }
    producer.shutdown().await.unwrap();
    consumer.shutdown().await.unwrap();
    broker.running.shutdown().await.unwrap();
}
