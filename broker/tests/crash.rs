//! A real `ferrumq-broker` process killed with SIGKILL while producers are sending and a
//! consumer holds leases: after a restart every acknowledged message is delivered, no
//! consumer-acked message comes back, and leases still hold until they end.
#![cfg(test)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    consumer, create_group, create_topic, ids, producer, receive_n, resource, tag, with_client_id,
};
use ferrumq_protocol::v2::messaging_service_client::MessagingServiceClient;
use ferrumq_protocol::v2::{
    Code, EndTransactionRequest, Message, MessageType, SendMessageRequest, Settings,
    SystemProperties, TelemetryCommand, TransactionResolution, TransactionSource,
    telemetry_command,
};
use rocketmq::model::message::MessageBuilder;

struct BrokerProcess {
    child: Child,
    grpc: SocketAddr,
}

fn spawn_broker(dir: &Path) -> BrokerProcess {
    let config = dir.join("broker.toml");
    std::fs::write(
        &config,
        "segment_size_bytes = 8388608\ndisk_watermark = 1.0\n[limits]\nmin_invisible_ms = 1000\n\
         [transactions]\ncheck_immunity_ms = 1000\ncheck_interval_ms = 1000\n\
         [timers]\nslot_ms = 1000\nmemory_window_ms = 2000\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrumq-broker"))
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args([
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let grpc = loop {
        let line = lines
            .next()
            .expect("the broker exited before it was ready")
            .unwrap();
        if let Some(rest) = line.strip_prefix("ferrumq-broker ready grpc=") {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    // Keep draining stderr so the broker never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    BrokerProcess { child, grpc }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_acked_message_and_keeps_offsets_and_leases() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = spawn_broker(dir.path());
    create_group(first.grpc, "g", 17).await;

    let producer = Arc::new(producer(first.grpc, "orders").await);
    let acked_by_broker = Arc::new(Mutex::new(HashSet::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut senders = Vec::new();
    for task in 0..4 {
        let (producer, acked, stop) = (producer.clone(), acked_by_broker.clone(), stop.clone());
        senders.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let body = format!("task {task} message {i}").into_bytes();
                let message = MessageBuilder::builder()
                    .set_topic("orders")
                    .set_body(body)
                    .build()
                    .unwrap();
                match producer.send(message).await {
                    Ok(receipt) => {
                        acked
                            .lock()
                            .unwrap()
                            .insert(receipt.message_id().to_owned());
                    }
                    Err(_) => break,
                }
                i += 1;
            }
        }));
    }
    while acked_by_broker.lock().unwrap().len() < 300 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A consumer acks some messages and holds leases on others.
    let consumer_a = consumer(first.grpc, "g", "orders").await;
    let consumed = receive_n(
        &consumer_a,
        "orders",
        &tag("*"),
        50,
        Duration::from_secs(30),
        true,
        Duration::from_secs(20),
    )
    .await;
    let lease = Duration::from_secs(4);
    let leased = receive_n(
        &consumer_a,
        "orders",
        &tag("*"),
        20,
        lease,
        false,
        Duration::from_secs(20),
    )
    .await;
    let lease_end = Instant::now() + lease - Duration::from_millis(200);
    let consumed = ids(&consumed);
    let leased = ids(&leased);

    // Kill while the producers are still sending.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for sender in senders {
        let _ = sender.await;
    }
    let _ = consumer_a.shutdown().await;
    let acked_by_broker = acked_by_broker.lock().unwrap().clone();
    assert!(acked_by_broker.len() >= 300);

    let mut second = spawn_broker(dir.path());
    let consumer_b = consumer(second.grpc, "g", "orders").await;
    let expected: HashSet<String> = acked_by_broker.difference(&consumed).cloned().collect();
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    while !expected.is_subset(&seen) && Instant::now() < deadline {
        for message in consumer_b
            .receive_with("orders", &tag("*"), 32, Duration::from_secs(30))
            .await
            .unwrap()
        {
            let id = message.message_id().to_owned();
            assert!(
                !consumed.contains(&id),
                "{id} was acked before the crash and came back"
            );
            if leased.contains(&id) {
                assert!(
                    Instant::now() >= lease_end,
                    "{id} came back while its lease still held"
                );
                assert_eq!(message.delivery_attempt(), 2);
            }
            assert!(
                seen.insert(id.clone()),
                "{id} delivered twice after the restart"
            );
            consumer_b.ack(&message).await.unwrap();
        }
    }
    let missing: Vec<_> = expected.difference(&seen).collect();
    assert!(
        missing.is_empty(),
        "{} acked messages lost: {missing:?}",
        missing.len()
    );
    let _ = consumer_b.shutdown().await;
    second.child.kill().unwrap();
    second.child.wait().unwrap();
}

const PRODUCER: &str = "crash-producer";

fn special(topic: &str, body: &str, kind: MessageType, deliver_at_ms: Option<i64>) -> Message {
    Message {
        topic: resource(topic),
        user_properties: std::collections::HashMap::new(),
        system_properties: Some(SystemProperties {
            message_id: body.to_owned(),
            message_type: kind as i32,
            delivery_timestamp: deliver_at_ms.map(ferrumq_broker::message::timestamp),
            ..SystemProperties::default()
        }),
        body: bytes::Bytes::from(body.to_owned()),
    }
}

fn end_request(id: &str, txn: &str, resolution: TransactionResolution) -> EndTransactionRequest {
    EndTransactionRequest {
        topic: resource("txn"),
        message_id: id.to_owned(),
        transaction_id: txn.to_owned(),
        resolution: resolution as i32,
        source: TransactionSource::SourceServerCheck as i32,
        trace_context: String::new(),
    }
}

/// The producer after the restart: it answers check-backs on its Telemetry stream,
/// COMMIT for bodies starting with "commit", ROLLBACK for the rest.
async fn answer_check_backs(grpc: SocketAddr) -> tokio::task::JoinHandle<()> {
    let mut client = MessagingServiceClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(TelemetryCommand {
        status: None,
        command: Some(telemetry_command::Command::Settings(Settings {
            client_type: Some(ferrumq_protocol::v2::ClientType::Producer as i32),
            pub_sub: Some(ferrumq_protocol::v2::settings::PubSub::Publishing(
                ferrumq_protocol::v2::Publishing::default(),
            )),
            ..Settings::default()
        })),
    })
    .await
    .unwrap();
    let mut inbound = client
        .telemetry(with_client_id(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            PRODUCER,
        ))
        .await
        .unwrap()
        .into_inner();
    tokio::spawn(async move {
        let _keep_open = tx;
        while let Ok(Some(command)) = inbound.message().await {
            let Some(telemetry_command::Command::RecoverOrphanedTransactionCommand(check)) =
                command.command
            else {
                continue;
            };
            let message = check.message.unwrap();
            let id = message.system_properties.unwrap().message_id;
            let resolution = if id.starts_with("commit") {
                TransactionResolution::Commit
            } else {
                TransactionResolution::Rollback
            };
            let reply = client
                .end_transaction(with_client_id(
                    end_request(&id, &check.transaction_id, resolution),
                    PRODUCER,
                ))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(reply.status.unwrap().code, Code::Ok as i32);
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_keeps_pending_transactions_checked_and_timers_due_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = spawn_broker(dir.path());
    create_topic(first.grpc, "txn", 2, &["TRANSACTION"]).await;
    create_topic(first.grpc, "later", 2, &["DELAY"]).await;
    create_group(first.grpc, "g", 17).await;
    let mut raw = MessagingServiceClient::connect(format!("http://{}", first.grpc))
        .await
        .unwrap();
    let mut send = async |message: Message| {
        let reply = raw
            .send_message(with_client_id(
                SendMessageRequest {
                    messages: vec![message],
                },
                PRODUCER,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.status.unwrap().code, Code::Ok as i32);
        reply.entries[0].transaction_id.clone()
    };
    // Ten decided before the kill, ten left for the checks after it.
    let mut decided = Vec::new();
    for i in 0..10 {
        let body = if i % 2 == 0 {
            format!("commit-early-{i}")
        } else {
            format!("rollback-early-{i}")
        };
        let txn = send(special("txn", &body, MessageType::Transaction, None)).await;
        decided.push((body, txn));
    }
    for i in 0..10 {
        let body = if i % 2 == 0 {
            format!("commit-late-{i}")
        } else {
            format!("rollback-late-{i}")
        };
        send(special("txn", &body, MessageType::Transaction, None)).await;
    }
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut due = std::collections::HashMap::new();
    for i in 0..60 {
        let at = start + 500 + i * 71;
        due.insert(format!("timer-{i}"), at);
        send(special(
            "later",
            &format!("timer-{i}"),
            MessageType::Delay,
            Some(at),
        ))
        .await;
    }
    for (body, txn) in &decided {
        let resolution = if body.starts_with("commit") {
            TransactionResolution::Commit
        } else {
            TransactionResolution::Rollback
        };
        let reply = raw
            .end_transaction(with_client_id(end_request(body, txn, resolution), PRODUCER))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.status.unwrap().code, Code::Ok as i32);
    }
    // Some timers are due and delivering right now; most are still waiting.
    tokio::time::sleep(Duration::from_millis(900)).await;
    first.child.kill().unwrap();
    first.child.wait().unwrap();

    let mut second = spawn_broker(dir.path());
    let checks = answer_check_backs(second.grpc).await;
    let consumer = consumer(second.grpc, "g", "txn").await;
    let committed = receive_n(
        &consumer,
        "txn",
        &tag("*"),
        11,
        Duration::from_secs(30),
        true,
        Duration::from_secs(10),
    )
    .await;
    let mut bodies: Vec<String> = committed
        .iter()
        .map(|m| String::from_utf8(m.body().to_vec()).unwrap())
        .collect();
    bodies.sort();
    let mut expected: Vec<String> = (0..10)
        .step_by(2)
        .flat_map(|i| [format!("commit-early-{i}"), format!("commit-late-{i}")])
        .collect();
    expected.sort();
    assert_eq!(
        bodies, expected,
        "each committed transaction once, no rollback"
    );
    // Decisions made before the kill still stand.
    let mut raw = MessagingServiceClient::connect(format!("http://{}", second.grpc))
        .await
        .unwrap();
    let (body, txn) = &decided[0];
    let flip = raw
        .end_transaction(with_client_id(
            end_request(body, txn, TransactionResolution::Rollback),
            PRODUCER,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(flip.status.unwrap().code, Code::PreconditionFailed as i32);

    let timers = consumer_for(second.grpc, "later").await;
    let delivered = receive_n(
        &timers,
        "later",
        &tag("*"),
        61,
        Duration::from_secs(30),
        true,
        Duration::from_secs(8),
    )
    .await;
    let got = ids(&delivered);
    assert_eq!(delivered.len(), 60, "each scheduled message exactly once");
    assert_eq!(got.len(), 60);
    for message in &delivered {
        assert!(due.contains_key(message.message_id()));
    }
    checks.abort();
    let _ = consumer.shutdown().await;
    let _ = timers.shutdown().await;
    second.child.kill().unwrap();
    second.child.wait().unwrap();
}

async fn consumer_for(grpc: SocketAddr, topic: &str) -> rocketmq::SimpleConsumer {
    consumer(grpc, "g", topic).await
}

/// Producers that never learn whether their last sends were stored (the broker is killed while
/// they wait) send every message again after the restart, with the same ids: each message is
/// stored exactly once, and the ones answered before the kill keep their offsets.
#[tokio::test]
async fn sigkill_then_sending_everything_again_stores_each_message_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = spawn_broker(dir.path());
    create_topic(first.grpc, "transfers", 1, &["NORMAL"]).await;
    let answered = Arc::new(Mutex::new(std::collections::HashMap::<String, i64>::new()));
    let attempted = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut senders = Vec::new();
    for task in 0..3 {
        let (answered, attempted, grpc) = (answered.clone(), attempted.clone(), first.grpc);
        senders.push(tokio::spawn(async move {
            let mut raw = MessagingServiceClient::connect(format!("http://{grpc}"))
                .await
                .unwrap();
            for batch in 0u32.. {
                let ids: Vec<String> = (0..8).map(|i| format!("T{task}-{batch}-{i}")).collect();
                attempted.lock().unwrap().extend(ids.iter().cloned());
                let messages = ids.iter().map(|id| transfer(id)).collect();
                let request = with_client_id(SendMessageRequest { messages }, PRODUCER);
                let Ok(reply) = raw.send_message(request).await else {
                    break;
                };
                let reply = reply.into_inner();
                if reply.status.is_none_or(|s| s.code != Code::Ok as i32) {
                    break;
                }
                let mut answered = answered.lock().unwrap();
                for (id, entry) in ids.into_iter().zip(reply.entries) {
                    answered.insert(id, entry.offset);
                }
            }
        }));
    }
    while answered.lock().unwrap().len() < 400 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    for sender in senders {
        sender.await.unwrap();
    }
    let answered = answered.lock().unwrap().clone();
    let attempted = attempted.lock().unwrap().clone();
    assert!(
        attempted.len() > answered.len(),
        "no send was left unanswered"
    );

    let mut second = spawn_broker(dir.path());
    let mut raw = MessagingServiceClient::connect(format!("http://{}", second.grpc))
        .await
        .unwrap();
    let mut offsets = std::collections::HashMap::new();
    for ids in attempted.chunks(32) {
        let messages = ids.iter().map(|id| transfer(id)).collect();
        let request = with_client_id(SendMessageRequest { messages }, PRODUCER);
        let reply = raw.send_message(request).await.unwrap().into_inner();
        assert_eq!(reply.status.unwrap().code, Code::Ok as i32);
        for (id, entry) in ids.iter().zip(reply.entries) {
            offsets.insert(id.clone(), entry.offset);
        }
    }
    for (id, offset) in &answered {
        assert_eq!(
            offsets[id], *offset,
            "{id} answered at another offset after the restart"
        );
    }
    // Every message at its own offset, and the queue holds exactly as many.
    let mut stored: Vec<i64> = offsets.values().copied().collect();
    stored.sort_unstable();
    let expected: Vec<i64> = (0..attempted.len() as i64).collect();
    assert_eq!(stored, expected, "a message stored twice or lost");
    // Dispatch follows the replies; wait for it to index what they answered.
    let mut admin = common::admin(second.grpc).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let in_queue = loop {
        let queues = admin
            .describe_topic(ferrumq_protocol::admin::DescribeTopicRequest {
                name: "transfers".to_owned(),
            })
            .await
            .unwrap()
            .into_inner()
            .queues;
        if queues[0].max_offset >= attempted.len() as u64 || Instant::now() > deadline {
            break queues[0].max_offset;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(in_queue, attempted.len() as u64);
    second.child.kill().unwrap();
    second.child.wait().unwrap();
}

fn transfer(id: &str) -> Message {
    special("transfers", id, MessageType::Normal, None)
}
