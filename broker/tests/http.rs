//! The HTTP produce endpoint against a real broker: messages produced over HTTP reach the
//! official client, every refusal is JSON with the RocketMQ code and an HTTP status that
//! fits, and a refused request stores nothing.
#![cfg(test)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{
    TestBroker, consumer, create_group, create_topic, http_get, http_request, receive_n, start, tag,
};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

/// POSTs `body` with `headers`; returns the status and the JSON reply.
async fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, Value) {
    let path = path.to_owned();
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect();
    let body = body.to_vec();
    let (status, reply) = tokio::task::spawn_blocking(move || {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        http_request(addr, "POST", &path, &headers, &body)
    })
    .await
    .unwrap();
    let json = serde_json::from_slice(&reply).unwrap_or_else(|e| {
        panic!(
            "reply is not JSON ({e}): {}",
            String::from_utf8_lossy(&reply)
        )
    });
    (status, json)
}

fn http(broker: &TestBroker) -> SocketAddr {
    broker.running.http_addr
}

fn written(broker: &TestBroker) -> u64 {
    broker.running.broker.store.log().written_pos().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_produced_over_http_reach_the_official_consumer() {
    let broker = start(|_| {}).await;
    create_group(broker.addr(), "g", 17).await;

    let (status, receipt) = post(
        http(&broker),
        "/topics/orders/messages",
        &[
            ("content-type", "application/octet-stream"),
            ("ferrumq-tag", "paid"),
            ("ferrumq-keys", "order-1, order-2"),
            ("ferrumq-property-region", "eu-west"),
        ],
        b"\x00order paid\xff",
    )
    .await;
    assert_eq!(status, 200, "{receipt}");
    let single_id = receipt["message_id"].as_str().unwrap().to_owned();
    assert_eq!(single_id.len(), 34, "a RocketMQ-format id: {receipt}");
    assert_eq!(receipt["topic"], "orders");
    assert!(receipt["queue_id"].as_u64().unwrap() < 8, "{receipt}");
    assert_eq!(receipt["queue_offset"], 0, "{receipt}");

    let batch = json!({"messages": [
        {"body": "first", "message_id": "ID-FROM-CALLER-1", "tag": "paid", "properties": {"Region": "us"}},
        {"body_base64": "AAEC", "keys": ["k"], "tag": "paid"},
        {"body": "third", "tag": "paid"},
    ]});
    let (status, receipts) = post(
        http(&broker),
        "/topics/orders/messages/batch",
        &[("content-type", "application/json")],
        batch.to_string().as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{receipts}");
    let receipts = receipts["messages"].as_array().unwrap().clone();
    assert_eq!(receipts.len(), 3);
    assert_eq!(receipts[0]["message_id"], "ID-FROM-CALLER-1");

    let consumer = consumer(broker.addr(), "g", "orders").await;
    let received = receive_n(
        &consumer,
        "orders",
        &tag("paid"),
        4,
        Duration::from_secs(30),
        true,
        WAIT,
    )
    .await;
    assert_eq!(received.len(), 4);
    let by_id = |id: &str| {
        received
            .iter()
            .find(|m| m.message_id() == id)
            .unwrap_or_else(|| panic!("{id} not received"))
    };
    let single = by_id(&single_id);
    assert_eq!(single.body(), b"\x00order paid\xff");
    assert_eq!(single.tag(), Some("paid"));
    assert_eq!(single.keys(), ["order-1", "order-2"]);
    assert_eq!(single.properties()["region"], "eu-west");
    let first = by_id("ID-FROM-CALLER-1");
    assert_eq!(first.body(), b"first");
    assert_eq!(
        first.properties()["Region"],
        "us",
        "JSON keeps a name's case"
    );
    let second = by_id(receipts[1]["message_id"].as_str().unwrap());
    assert_eq!(second.body(), [0, 1, 2]);
    assert_eq!(second.keys(), ["k"]);
    consumer.shutdown().await.unwrap();
    broker.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_and_fifo_messages_over_http() {
    let broker = start(|_| {}).await;
    create_topic(broker.addr(), "timed", 4, &["DELAY", "FIFO"]).await;
    create_group(broker.addr(), "g", 17).await;

    let before = ferrumq_broker::service::now_ms();
    let (status, receipt) = post(
        http(&broker),
        "/topics/timed/messages",
        &[("ferrumq-delay-ms", "1500"), ("ferrumq-tag", "later")],
        b"later",
    )
    .await;
    assert_eq!(status, 200, "{receipt}");
    assert!(
        receipt.get("queue_id").is_none(),
        "waits for its time: {receipt}"
    );
    assert!(receipt["recall_handle"].as_str().is_some(), "{receipt}");
    let deliver_at = receipt["deliver_at"].as_str().unwrap().to_owned();
    let deliver_at_ms = i64::try_from(
        time::OffsetDateTime::parse(&deliver_at, &time::format_description::well_known::Rfc3339)
            .unwrap()
            .unix_timestamp_nanos()
            / 1_000_000,
    )
    .unwrap();
    assert!(deliver_at_ms >= before + 1500, "{deliver_at} vs {before}");

    for i in 0..3 {
        let (status, receipt) = post(
            http(&broker),
            "/topics/timed/messages",
            &[
                ("ferrumq-message-group", "customer-7"),
                ("ferrumq-tag", "fifo"),
            ],
            format!("step {i}").as_bytes(),
        )
        .await;
        assert_eq!(status, 200, "{receipt}");
        assert_eq!(
            receipt["queue_offset"], i,
            "one group, one queue: {receipt}"
        );
    }

    let consumer = consumer(broker.addr(), "g", "timed").await;
    let fifo = receive_n(
        &consumer,
        "timed",
        &tag("fifo"),
        3,
        Duration::from_secs(30),
        true,
        WAIT,
    )
    .await;
    let bodies: Vec<&[u8]> = fifo.iter().map(|m| m.body()).collect();
    assert_eq!(bodies, [&b"step 0"[..], b"step 1", b"step 2"]);
    assert!(fifo.iter().all(|m| m.message_group() == Some("customer-7")));

    let later = receive_n(
        &consumer,
        "timed",
        &tag("later"),
        1,
        Duration::from_secs(30),
        true,
        WAIT,
    )
    .await;
    assert_eq!(later.len(), 1);
    // The 5.0.0 client reports the delivery time in whole seconds.
    assert_eq!(later[0].delivery_timestamp(), Some(deliver_at_ms / 1000));
    assert!(
        ferrumq_broker::service::now_ms() >= deliver_at_ms,
        "never before its time"
    );
    consumer.shutdown().await.unwrap();
    broker.running.shutdown().await.unwrap();
}

/// Path, headers, body; then the HTTP status, the code, and a text the message must contain.
type Refusal<'a> = (
    &'a str,
    Vec<(&'a str, &'a str)>,
    &'a [u8],
    u16,
    &'a str,
    &'a str,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_names_its_field_and_stores_nothing() {
    let broker = start(|c| c.limits.max_body_bytes = 1024).await;
    let addr = http(&broker);
    // Topic and group metadata are not in the commit log; create them before measuring it.
    create_topic(broker.addr(), "orders", 4, &["NORMAL"]).await;
    let before = written(&broker);

    let big = vec![b'x'; 1025];
    let huge = vec![b'x'; 200_000];
    let cases: Vec<Refusal<'_>> = vec![
        (
            "/topics/orders/messages",
            vec![("ferrumq-tag", "a|b")],
            b"x",
            400,
            "ILLEGAL_MESSAGE_TAG",
            "header ferrumq-tag",
        ),
        (
            "/topics/orders/messages",
            vec![("ferrumq-tagg", "a")],
            b"x",
            400,
            "BAD_REQUEST",
            "ferrumq-tagg",
        ),
        (
            "/topics/orders/messages",
            vec![],
            b"",
            400,
            "BAD_REQUEST",
            "the request body is empty",
        ),
        (
            "/topics/orders/messages",
            vec![],
            &big,
            413,
            "MESSAGE_BODY_TOO_LARGE",
            "the limit is 1024",
        ),
        (
            "/topics/orders/messages",
            vec![],
            &huge,
            413,
            "MESSAGE_BODY_TOO_LARGE",
            "the limit is 1024",
        ),
        (
            "/topics/orders/messages",
            vec![("ferrumq-delivery-time", "tomorrow")],
            b"x",
            400,
            "ILLEGAL_DELIVERY_TIME",
            "header ferrumq-delivery-time",
        ),
        (
            "/topics/orders/messages",
            vec![("ferrumq-delay-ms", "999999999999")],
            b"x",
            400,
            "ILLEGAL_DELIVERY_TIME",
            "header ferrumq-delay-ms",
        ),
        (
            "/topics/orders/messages",
            vec![("ferrumq-message-group", "g1")],
            b"x",
            400,
            "MESSAGE_PROPERTY_CONFLICT_WITH_TYPE",
            "accepts NORMAL",
        ),
        (
            "/topics/orders/messages/batch",
            vec![],
            br#"{"messages": [{"body": "x", "properties": {"__SHARDINGKEY": "x"}}]}"#,
            400,
            "ILLEGAL_MESSAGE_PROPERTY_KEY",
            "messages[0].properties",
        ),
        (
            "/topics/orders/messages",
            vec![("ferrumq-message-id", "has space")],
            b"x",
            400,
            "ILLEGAL_MESSAGE_ID",
            "header ferrumq-message-id",
        ),
        (
            "/topics/%25SYS%25TIMER/messages",
            vec![],
            b"x",
            400,
            "ILLEGAL_TOPIC",
            "%SYS%TIMER",
        ),
        (
            "/topics/orders/messages/batch",
            vec![],
            br#"{"messages": [{"body": "ok"}, {"body": "bad", "tag": "a|b"}]}"#,
            400,
            "ILLEGAL_MESSAGE_TAG",
            "messages[1].tag",
        ),
        (
            "/topics/orders/messages/batch",
            vec![],
            br#"{"messages": [{"body": "ok", "delivery_time": "2026-13-01T00:00:00Z"}]}"#,
            400,
            "ILLEGAL_DELIVERY_TIME",
            "messages[0].delivery_time",
        ),
        (
            "/topics/orders/messages/batch",
            vec![],
            br#"{"messages": [{"body": "ok"}, {"body": "x", "delay_ms": 999999999999}]}"#,
            400,
            "ILLEGAL_DELIVERY_TIME",
            "messages[1].delay_ms",
        ),
        (
            "/topics/unknown-yet/messages",
            vec![("ferrumq-tag", "a|b")],
            b"x",
            400,
            "ILLEGAL_MESSAGE_TAG",
            "header ferrumq-tag",
        ),
        (
            "/topics/unknown-yet/messages",
            vec![("ferrumq-message-group", "g1")],
            b"x",
            400,
            "MESSAGE_PROPERTY_CONFLICT_WITH_TYPE",
            "accepts NORMAL",
        ),
        (
            "/topics/orders/messages/batch",
            vec![],
            br#"{"messages": [{"bdy": "typo"}]}"#,
            400,
            "BAD_REQUEST",
            "unknown field `bdy`",
        ),
        (
            "/topics/orders/messages/batch",
            vec![],
            br#"{"messages": []}"#,
            400,
            "BAD_REQUEST",
            "messages is empty",
        ),
        (
            "/topics/orders/messages/batch",
            vec![],
            b"not json",
            400,
            "BAD_REQUEST",
            "not a batch",
        ),
    ];
    for (path, headers, body, status, code, needle) in cases {
        let (got, error) = post(addr, path, &headers, body).await;
        assert_eq!(got, status, "{path} {headers:?}: {error}");
        assert_eq!(error["code"], code, "{path} {headers:?}: {error}");
        let message = error["message"].as_str().unwrap();
        assert!(
            message.contains(needle),
            "{path} {headers:?}: {message:?} should mention {needle:?}"
        );
    }
    assert_eq!(written(&broker), before, "a refusal stored something");
    assert!(
        broker
            .running
            .broker
            .metadata
            .topic("unknown-yet")
            .is_none(),
        "a refused send created its topic"
    );
    let (_, metrics) = tokio::task::spawn_blocking(move || http_get(addr, "/metrics"))
        .await
        .unwrap();
    assert!(metrics.lines().any(|l| l == "rocketmq_messages_in_total 0"));
    // A path or method the port does not serve is a JSON error too.
    let (status, error) = post(addr, "/topic/orders/messages", &[], b"x").await;
    assert_eq!((status, error["code"].as_str()), (404, Some("NOT_FOUND")));
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("/topic/orders/messages")
    );
    let (status, body) =
        tokio::task::spawn_blocking(move || http_get(addr, "/topics/orders/messages"))
            .await
            .unwrap();
    assert_eq!(status, 405, "{body}");
    assert!(body.contains("does not take GET"), "{body}");
    broker.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_topics_are_404_and_a_full_disk_is_429() {
    let strict = start(|c| c.topics.auto_create = false).await;
    let (status, error) = post(http(&strict), "/topics/nowhere/messages", &[], b"x").await;
    assert_eq!(
        (status, error["code"].as_str()),
        (404, Some("TOPIC_NOT_FOUND")),
        "{error}"
    );
    assert!(
        error["message"].as_str().unwrap().contains("nowhere"),
        "{error}"
    );
    strict.running.shutdown().await.unwrap();

    // A watermark of zero: every disk is "full", so the broker refuses to store.
    let full = start(|c| c.disk_watermark = 0.0).await;
    let before = written(&full);
    let (status, error) = post(http(&full), "/topics/orders/messages", &[], b"x").await;
    assert_eq!(
        (status, error["code"].as_str()),
        (429, Some("TOO_MANY_REQUESTS")),
        "{error}"
    );
    assert!(
        error["message"].as_str().unwrap().contains("watermark"),
        "{error}"
    );
    assert_eq!(written(&full), before);
    full.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_description_lists_the_endpoints() {
    let broker = start(|_| {}).await;
    let addr = http(&broker);
    let (status, text) = tokio::task::spawn_blocking(move || http_get(addr, "/openapi.json"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(doc["openapi"], "3.0.3");
    for path in [
        "/topics/{topic}/messages",
        "/topics/{topic}/messages/batch",
        "/healthz",
        "/readyz",
        "/metrics",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} missing");
    }
    let headers: Vec<&str> = doc["paths"]["/topics/{topic}/messages"]["post"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for header in [
        "ferrumq-message-id",
        "ferrumq-tag",
        "ferrumq-keys",
        "ferrumq-message-group",
        "ferrumq-delivery-time",
        "ferrumq-delay-ms",
    ] {
        assert!(headers.contains(&header), "{header} undocumented");
    }
    broker.running.shutdown().await.unwrap();
}
