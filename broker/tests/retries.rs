//! A producer's retry (a message sent again with the same message id) is answered as the first
//! send was and stored once: within a batch, for half and scheduled messages, and after the
//! broker restarts; a batch naming one id twice is refused.
#![cfg(test)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{create_topic, resource, start, with_client_id};
use ferrumq_broker::BrokerConfig;
use ferrumq_protocol::v2::messaging_service_client::MessagingServiceClient;
use ferrumq_protocol::v2::{
    Code, Message, MessageType, SendMessageRequest, SendResultEntry, SystemProperties,
};
use tonic::transport::Channel;

type Client = MessagingServiceClient<Channel>;

fn message(topic: &str, id: &str, kind: MessageType, deliver_at_ms: Option<i64>) -> Message {
    Message {
        topic: resource(topic),
        user_properties: Default::default(),
        system_properties: Some(SystemProperties {
            message_id: id.to_owned(),
            message_type: kind as i32,
            delivery_timestamp: deliver_at_ms.map(ferrumq_broker::message::timestamp),
            ..SystemProperties::default()
        }),
        body: format!("body of {id}").into_bytes().into(),
    }
}

fn normal(topic: &str, id: &str) -> Message {
    message(topic, id, MessageType::Normal, None)
}

/// Sends `messages` in one request; the reply's status code and entries.
async fn send(client: &mut Client, messages: Vec<Message>) -> (i32, String, Vec<SendResultEntry>) {
    let reply = client
        .send_message(with_client_id(
            SendMessageRequest { messages },
            "retrying@1#1",
        ))
        .await
        .unwrap()
        .into_inner();
    let status = reply.status.unwrap();
    (status.code, status.message, reply.entries)
}

async fn offsets(client: &mut Client, messages: Vec<Message>) -> Vec<i64> {
    let (code, text, entries) = send(client, messages).await;
    assert_eq!(code, Code::Ok as i32, "{text}");
    entries.iter().map(|e| e.offset).collect()
}

async fn connect(broker: &common::TestBroker) -> Client {
    MessagingServiceClient::connect(format!("http://{}", broker.addr()))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_again_is_answered_as_before_and_stored_once() {
    let broker = start(|_| {}).await;
    // One queue each, so a message stored twice would show as a skipped offset.
    create_topic(broker.addr(), "payments", 1, &["NORMAL"]).await;
    create_topic(broker.addr(), "refunds", 1, &["NORMAL"]).await;
    let mut client = connect(&broker).await;

    assert_eq!(
        offsets(&mut client, vec![normal("payments", "A")]).await,
        [0]
    );
    assert_eq!(
        offsets(&mut client, vec![normal("payments", "A")]).await,
        [0]
    );
    // A batch retried after a part of it was stored: only the rest is stored.
    let batch = vec![
        normal("payments", "A"),
        normal("payments", "B"),
        normal("payments", "C"),
    ];
    assert_eq!(offsets(&mut client, batch.clone()).await, [0, 1, 2]);
    assert_eq!(offsets(&mut client, batch).await, [0, 1, 2]);
    assert_eq!(
        offsets(&mut client, vec![normal("payments", "D")]).await,
        [3]
    );
    // The same id on another topic is another message.
    assert_eq!(
        offsets(&mut client, vec![normal("refunds", "A")]).await,
        [0]
    );
    assert_eq!(
        offsets(&mut client, vec![normal("refunds", "E")]).await,
        [1]
    );

    // One id twice in a batch is refused, and nothing of the batch is stored.
    let (code, text, entries) = send(
        &mut client,
        vec![
            normal("payments", "F"),
            normal("payments", "G"),
            normal("payments", "F"),
        ],
    )
    .await;
    assert_eq!(code, Code::IllegalMessageId as i32);
    assert!(
        text.contains("messages[2].system_properties.message_id")
            && text.contains("messages[0].system_properties.message_id"),
        "{text}"
    );
    assert!(entries.is_empty());
    assert_eq!(
        offsets(&mut client, vec![normal("payments", "F")]).await,
        [4]
    );

    // Over HTTP, a repeated `ferrumq-message-id` is a retry too.
    let http = broker.running.http_addr;
    let post = || {
        let headers = [("ferrumq-message-id", "HTTP-1")];
        let (status, body) =
            common::http_request(http, "POST", "/topics/payments/messages", &headers, b"x");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()["queue_offset"].clone()
    };
    assert_eq!(post(), 5);
    assert_eq!(post(), 5);
    assert_eq!(
        offsets(&mut client, vec![normal("payments", "H")]).await,
        [6]
    );

    let metrics = common::http_get(http, "/metrics").1;
    assert!(
        metrics.contains("ferrumq_send_repeats_total 6"),
        "{metrics}"
    );
    broker.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_of_one_id_at_the_same_time_store_it_once() {
    let broker = start(|_| {}).await;
    create_topic(broker.addr(), "transfers", 1, &["NORMAL"]).await;
    let mut senders = Vec::new();
    for _ in 0..8 {
        let mut client = connect(&broker).await;
        senders.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            for n in 0..20 {
                let id = format!("SAME-{n}");
                answers.push(offsets(&mut client, vec![normal("transfers", &id)]).await[0]);
            }
            answers
        }));
    }
    let mut answers = Vec::new();
    for sender in senders {
        answers.push(sender.await.unwrap());
    }
    // Every sender got one offset per id, the same for all, and the queue holds 20.
    assert!(answers.iter().all(|a| *a == answers[0]), "{answers:?}");
    let mut first = answers[0].clone();
    first.sort_unstable();
    assert_eq!(first, (0..20).collect::<Vec<i64>>());
    let mut client = connect(&broker).await;
    assert_eq!(
        offsets(&mut client, vec![normal("transfers", "NEXT")]).await,
        [20]
    );
    broker.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn half_and_scheduled_messages_sent_again_keep_their_transaction_id_and_recall_handle() {
    let broker = start(|_| {}).await;
    create_topic(broker.addr(), "orders", 2, &["TRANSACTION", "DELAY"]).await;
    let mut client = connect(&broker).await;

    let half = message("orders", "H1", MessageType::Transaction, None);
    let (_, _, first) = send(&mut client, vec![half.clone()]).await;
    let (code, _, again) = send(&mut client, vec![half]).await;
    assert_eq!(code, Code::Ok as i32);
    assert!(first[0].transaction_id.starts_with('T'));
    assert_eq!(again, first);

    let later = ferrumq_broker::service::now_ms() + 3_600_000;
    let scheduled = message("orders", "S1", MessageType::Delay, Some(later));
    let (_, _, first) = send(&mut client, vec![scheduled.clone()]).await;
    let (_, _, again) = send(&mut client, vec![scheduled]).await;
    assert!(!first[0].recall_handle.is_empty());
    assert_eq!(again, first);
    // A second half message gets the next offset of the half topic: the first is there once.
    let (_, _, next) = send(
        &mut client,
        vec![message("orders", "H2", MessageType::Transaction, None)],
    )
    .await;
    assert_eq!(next[0].offset, 1);
    broker.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_retry_after_a_restart_is_recognised_and_the_window_can_be_turned_off() {
    let broker = start(|_| {}).await;
    create_topic(broker.addr(), "ledger", 1, &["NORMAL"]).await;
    let mut client = connect(&broker).await;
    let sent = vec![normal("ledger", "L1"), normal("ledger", "L2")];
    assert_eq!(offsets(&mut client, sent.clone()).await, [0, 1]);
    drop(client);
    let common::TestBroker { running, dir } = broker;
    running.shutdown().await.unwrap();

    let restarted = |window_ms| {
        let dir = dir.path().to_owned();
        async move {
            let mut config = BrokerConfig {
                data_dir: dir,
                grpc_listen: "127.0.0.1:0".parse().unwrap(),
                http_listen: "127.0.0.1:0".parse().unwrap(),
                segment_size_bytes: 16 << 20,
                disk_watermark: 1.0,
                duplicate_window_ms: window_ms,
                ..BrokerConfig::default()
            };
            config.limits.min_invisible_ms = 1000;
            ferrumq_broker::start(config).await.unwrap()
        }
    };
    let running = restarted(120_000).await;
    let mut client = MessagingServiceClient::connect(format!("http://{}", running.grpc_addr))
        .await
        .unwrap();
    assert_eq!(offsets(&mut client, sent.clone()).await, [0, 1]);
    assert_eq!(
        offsets(&mut client, vec![normal("ledger", "L3")]).await,
        [2]
    );
    drop(client);
    running.shutdown().await.unwrap();

    // Without a window every send is stored.
    let running = restarted(0).await;
    let mut client = MessagingServiceClient::connect(format!("http://{}", running.grpc_addr))
        .await
        .unwrap();
    assert_eq!(offsets(&mut client, sent).await, [3, 4]);
    drop(client);
    running.shutdown().await.unwrap();
}
