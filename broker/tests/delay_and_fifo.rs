//! Scheduled and FIFO messages end to end: delivery never before its time, recall, and
//! per-message-group order across retries with one stuck group not blocking the others.
#![cfg(test)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{
    admin, consumer, create_group, create_group_with, create_topic, producer, receive_n, resource,
    start, tag, with_client_id,
};
use ferrumq_protocol::admin::{QueryMessageRequest, query_message_request};
use ferrumq_protocol::v2::messaging_service_client::MessagingServiceClient;
use ferrumq_protocol::v2::{
    Code, Message, MessageType, RecallMessageRequest, SendMessageRequest, SystemProperties,
};
use rocketmq::model::message::MessageBuilder;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn scheduled(topic: &str, id: &str, deliver_at_ms: i64) -> Message {
    Message {
        topic: resource(topic),
        user_properties: HashMap::new(),
        system_properties: Some(SystemProperties {
            message_id: id.to_owned(),
            message_type: MessageType::Delay as i32,
            delivery_timestamp: Some(ferrumq_broker::message::timestamp(deliver_at_ms)),
            ..SystemProperties::default()
        }),
        body: bytes::Bytes::from(id.to_owned()),
    }
}

/// When the visible copy of message `id` was stored, and the delivery time it carries (ms).
async fn stored_and_delivery_ms(
    admin: &mut ferrumq_protocol::admin::admin_service_client::AdminServiceClient<
        tonic::transport::Channel,
    >,
    id: &str,
) -> (i64, i64) {
    let found = admin
        .query_message(QueryMessageRequest {
            topic: "reminders".into(),
            by: Some(query_message_request::By::MessageId(id.to_owned())),
            from_ms: 0,
            to_ms: 0,
            max: 4,
        })
        .await
        .unwrap()
        .into_inner()
        .messages;
    assert_eq!(found.len(), 1, "{id} is in its topic once");
    let system = found[0]
        .message
        .as_ref()
        .unwrap()
        .system_properties
        .clone()
        .unwrap();
    let ms = |t: prost_types::Timestamp| t.seconds * 1000 + i64::from(t.nanos / 1_000_000);
    (
        ms(system.store_timestamp.unwrap()),
        ms(system.delivery_timestamp.unwrap()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_messages_arrive_on_time_never_early_and_recalled_ones_never() {
    let broker = start(|c| c.timers.slot_ms = 1000).await;
    let addr = broker.addr();
    create_topic(addr, "reminders", 4, &["DELAY"]).await;
    create_group(addr, "mailer", 17).await;
    let mut raw = MessagingServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();

    // Millisecond times over the next 3 s, one in the past, one recalled, one a day away.
    let start = now_ms();
    let mut due: HashMap<String, i64> = HashMap::new();
    let mut messages = Vec::new();
    for i in 0..40 {
        let at = start + 300 + i * 67;
        due.insert(format!("m{i}"), at);
        messages.push(scheduled("reminders", &format!("m{i}"), at));
    }
    due.insert("past".into(), start - 5_000);
    messages.push(scheduled("reminders", "past", start - 5_000));
    messages.push(scheduled("reminders", "recalled", start + 1_500));
    messages.push(scheduled("reminders", "tomorrow", start + 86_400_000));
    let sent = raw
        .send_message(with_client_id(
            SendMessageRequest { messages },
            "delay-test",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sent.status.unwrap().code, Code::Ok as i32);
    let handles: HashMap<&str, &str> = sent
        .entries
        .iter()
        .map(|e| (e.message_id.as_str(), e.recall_handle.as_str()))
        .collect();
    assert!(
        handles["past"].is_empty(),
        "a message due now needs no recall"
    );
    let recall = |handle: &str| RecallMessageRequest {
        topic: resource("reminders"),
        recall_handle: handle.to_owned(),
    };
    let recalled = raw
        .recall_message(with_client_id(recall(handles["recalled"]), "delay-test"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(recalled.status.unwrap().code, Code::Ok as i32);
    assert_eq!(recalled.message_id, "recalled");
    let tampered = format!("{}0", handles["tomorrow"]);
    let refused = raw
        .recall_message(with_client_id(recall(&tampered), "delay-test"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(refused.status.unwrap().code, Code::BadRequest as i32);

    let consumer = consumer(addr, "mailer", "reminders").await;
    let seen = receive_n(
        &consumer,
        "reminders",
        &tag("*"),
        due.len() + 1,
        Duration::from_secs(10),
        true,
        Duration::from_secs(6),
    )
    .await;
    let mut got: Vec<&str> = seen.iter().map(|m| m.message_id()).collect();
    got.sort_unstable();
    let mut expected: Vec<&str> = due.keys().map(String::as_str).collect();
    expected.sort_unstable();
    assert_eq!(
        got, expected,
        "each due message once, the recalled one never"
    );
    let mut admin = admin(addr).await;
    for message in &seen {
        let at = due[message.message_id()];
        let (stored, delivery) = stored_and_delivery_ms(&mut admin, message.message_id()).await;
        // The copy is stored (made visible) no earlier than asked, to the millisecond.
        assert!(
            stored >= at,
            "{} visible at {stored}, {} ms early",
            message.message_id(),
            at - stored
        );
        assert_eq!(delivery, at);
        assert_eq!(message.delivery_timestamp(), Some(at.div_euclid(1000)));
    }
    // A delivered message can no longer be recalled.
    let late = raw
        .recall_message(with_client_id(recall(handles["m0"]), "delay-test"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(late.status.unwrap().code, Code::NotFound as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_client_schedules_in_whole_seconds() {
    let broker = start(|_| {}).await;
    let addr = broker.addr();
    create_topic(addr, "later", 2, &["DELAY"]).await;
    create_group(addr, "g", 17).await;
    let producer = producer(addr, "later").await;
    let at_s = now_ms() / 1000 + 2;
    let receipt = producer
        .send(
            MessageBuilder::delay_message_builder("later", b"hi".to_vec(), at_s)
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    let consumer = consumer(addr, "g", "later").await;
    let seen = receive_n(
        &consumer,
        "later",
        &tag("*"),
        1,
        Duration::from_secs(10),
        true,
        Duration::from_secs(6),
    )
    .await;
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].message_id(), receipt.message_id());
    assert_eq!(seen[0].delivery_timestamp(), Some(at_s));
}

/// Firing timers is leader-only work: a node that does not hold leadership files a due
/// message and keeps it, and fires it once it takes leadership.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_leadership_fires_no_timer_until_it_takes_it() {
    let broker = start(|_| {}).await;
    let addr = broker.addr();
    create_topic(addr, "later", 2, &["DELAY"]).await;
    create_group(addr, "g", 17).await;
    let leadership = broker.running.broker.leadership.clone();
    leadership.set(false);
    let mut raw = MessagingServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let messages = vec![scheduled("later", "due-soon", now_ms() + 200)];
    let sent = raw
        .send_message(with_client_id(SendMessageRequest { messages }, "gate"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sent.status.unwrap().code, Code::Ok as i32);
    let consumer = consumer(addr, "g", "later").await;
    let filter = tag("*");
    let wait = |timeout| {
        receive_n(
            &consumer,
            "later",
            &filter,
            1,
            Duration::from_secs(10),
            true,
            timeout,
        )
    };
    assert!(
        wait(Duration::from_secs(2)).await.is_empty(),
        "a timer fired on a node without leadership"
    );
    leadership.set(true);
    let seen = wait(Duration::from_secs(6)).await;
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].message_id(), "due-soon");
}

/// Three message groups share one queue. Group "stuck" is never acked: its first message
/// keeps coming back (attempt 2, 3) and its second waits, while "a" and "b" go on in order.
/// After the last attempt "stuck" is dead-lettered and its next message follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_groups_keep_order_across_retries_and_a_stuck_group_blocks_only_itself() {
    let broker = start(|_| {}).await;
    let addr = broker.addr();
    create_topic(addr, "ledger", 1, &["FIFO"]).await;
    create_group_with(addr, "posting", 3, true).await;
    let producer = producer(addr, "ledger").await;
    for i in 0..10 {
        for group in ["a", "b", "stuck"] {
            producer
                .send(
                    MessageBuilder::fifo_message_builder(
                        "ledger",
                        format!("{group}-{i}").into_bytes(),
                        group,
                    )
                    .build()
                    .unwrap(),
                )
                .await
                .unwrap();
        }
    }
    let consumer = consumer(addr, "posting", "ledger").await;
    let mut order: HashMap<String, Vec<(String, i32)>> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let done = |order: &HashMap<String, Vec<(String, i32)>>| {
        ["a", "b"]
            .iter()
            .all(|g| order.get(*g).is_some_and(|v| v.len() == 10))
            && order.get("stuck").is_some_and(|v| v.len() >= 5)
    };
    while !done(&order) && Instant::now() < deadline {
        let batch = consumer
            .receive_with("ledger", &tag("*"), 32, Duration::from_secs(1))
            .await
            .unwrap();
        let mut groups_in_batch = Vec::new();
        for message in batch {
            let group = message.message_group().unwrap().to_owned();
            assert!(
                !groups_in_batch.contains(&group),
                "two messages of group {group} out at once"
            );
            groups_in_batch.push(group.clone());
            let body = String::from_utf8(message.body().to_vec()).unwrap();
            order
                .entry(group.clone())
                .or_default()
                .push((body.clone(), message.delivery_attempt()));
            if group != "stuck" || body != "stuck-0" {
                consumer.ack(&message).await.unwrap();
            }
        }
    }
    for group in ["a", "b"] {
        let bodies: Vec<String> = order[group].iter().map(|(b, _)| b.clone()).collect();
        let expected: Vec<String> = (0..10).map(|i| format!("{group}-{i}")).collect();
        assert_eq!(bodies, expected, "group {group} out of order");
    }
    let stuck = &order["stuck"];
    // stuck-0 three times (attempts 1, 2, 3), then dead-lettered; stuck-1 comes next.
    assert_eq!(
        stuck[..4],
        [
            ("stuck-0".to_owned(), 1),
            ("stuck-0".to_owned(), 2),
            ("stuck-0".to_owned(), 3),
            ("stuck-1".to_owned(), 1)
        ]
    );
    assert_eq!(stuck[4].0, "stuck-2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_that_stops_being_fifo_gets_the_messages_that_waited_behind_their_group() {
    let broker = start(|_| {}).await;
    let addr = broker.addr();
    create_topic(addr, "ledger", 1, &["FIFO"]).await;
    create_group_with(addr, "posting", 5, true).await;
    let producer = producer(addr, "ledger").await;
    for i in 0..3 {
        let message =
            MessageBuilder::fifo_message_builder("ledger", format!("a-{i}").into_bytes(), "a")
                .build()
                .unwrap();
        producer.send(message).await.unwrap();
    }
    let consumer = consumer(addr, "posting", "ledger").await;
    let lease = Duration::from_secs(30);
    let wait = Duration::from_secs(10);
    let first = receive_n(&consumer, "ledger", &tag("*"), 1, lease, false, wait).await;
    assert_eq!(first.len(), 1, "FIFO hands out one message of the group");
    // The group stops being FIFO while a-0 is out: a-1 and a-2 come at the next receives.
    create_group_with(addr, "posting", 5, false).await;
    let rest = receive_n(&consumer, "ledger", &tag("*"), 2, lease, false, wait).await;
    let bodies: Vec<String> = rest
        .iter()
        .map(|m| String::from_utf8(m.body().to_vec()).unwrap())
        .collect();
    assert_eq!(bodies, ["a-1", "a-2"]);
}
