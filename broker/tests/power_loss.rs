//! Power loss under a running broker, through the crash backend: producers send (`sync`
//! flush), a consumer receives and acks, transactions are decided, scheduled messages come due
//! and an operator creates topics, all at once, until the power goes at a random sync. The
//! next round starts a broker on what a machine would find (the durable bytes, some of the
//! rest torn in), checks, and goes on. Through every round: a message the consumer acked never
//! comes back. At the end: every acknowledged send is delivered, every topic whose creation was
//! answered exists, committed transactions are delivered once and rolled-back ones never, and
//! every acknowledged scheduled message is delivered exactly once. `FERRUMQ_BROKER_POWER_CUTS`
//! sets the number of cuts (default 20).
#![cfg(test)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{create_group, create_topic, resource, with_client_id};
use ferrumq_broker::{BrokerConfig, RunningBroker, config::FlushPolicy};
use ferrumq_protocol::admin::admin_service_client::AdminServiceClient;
use ferrumq_protocol::admin::{CreateTopicRequest, ListTopicsRequest, Topic};
use ferrumq_protocol::v2::messaging_service_client::MessagingServiceClient;
use ferrumq_protocol::v2::{
    AckMessageEntry, AckMessageRequest, Code, EndTransactionRequest, FilterExpression, FilterType,
    Message, MessageQueue, MessageType, ReceiveMessageRequest, SendMessageRequest,
    SystemProperties, TransactionResolution, TransactionSource, receive_message_response,
};
use ferrumq_storage::{CrashFileSystem, FileSystem, RealFileSystem};
use tonic::transport::Channel;

type Client = MessagingServiceClient<Channel>;

const CLIENT: &str = "power-loss@1#1";

fn cuts() -> u64 {
    std::env::var("FERRUMQ_BROKER_POWER_CUTS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(20)
}

/// What the broker acknowledged, across every round.
#[derive(Default)]
struct Acknowledged {
    sent: HashSet<String>,
    consumed: HashSet<String>,
    /// Acks sent when the power went, which the broker may or may not have taken.
    ack_unknown: HashSet<String>,
    topics: HashSet<String>,
    committed: HashSet<String>,
    rolled_back: HashSet<String>,
    scheduled: HashSet<String>,
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

async fn start(data: &Path, fs: Arc<dyn FileSystem>) -> RunningBroker {
    let mut config = BrokerConfig {
        data_dir: data.to_owned(),
        grpc_listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        segment_size_bytes: 1 << 20,
        disk_watermark: 1.0,
        flush: FlushPolicy::Sync,
        ..BrokerConfig::default()
    };
    config.limits.min_invisible_ms = 1000;
    config.transactions.check_immunity_ms = 60_000;
    config.timers.slot_ms = 1000;
    config.timers.memory_window_ms = 2000;
    ferrumq_broker::start_with(config, fs).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_keeps_every_acknowledged_send_ack_decision_timer_and_topic() {
    let dir = tempfile::tempdir().unwrap();
    let mut data = dir.path().join("machine-0");
    std::fs::create_dir(&data).unwrap();
    let acknowledged = Arc::new(Mutex::new(Acknowledged::default()));
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    {
        let broker = start(&data, Arc::new(RealFileSystem)).await;
        create_topic(broker.grpc_addr, "orders", 2, &["NORMAL"]).await;
        create_topic(broker.grpc_addr, "txn", 2, &["TRANSACTION"]).await;
        create_topic(broker.grpc_addr, "later", 2, &["DELAY"]).await;
        create_group(broker.grpc_addr, "g", 100).await;
        broker.shutdown().await.unwrap();
    }
    for round in 0..cuts() {
        let crash = Arc::new(CrashFileSystem::new(&data).unwrap());
        let broker = start(&data, crash.clone()).await;
        crash.cut_at_sync(1 + rng.below(120));
        let stop = Arc::new(AtomicBool::new(false));
        let workers = vec![
            tokio::spawn(send_orders(
                broker.grpc_addr,
                round,
                acknowledged.clone(),
                stop.clone(),
            )),
            tokio::spawn(consume_orders(
                broker.grpc_addr,
                acknowledged.clone(),
                stop.clone(),
            )),
            tokio::spawn(create_topics(
                broker.grpc_addr,
                round,
                acknowledged.clone(),
                stop.clone(),
            )),
            tokio::spawn(decide_transactions(
                broker.grpc_addr,
                round,
                acknowledged.clone(),
                stop.clone(),
            )),
            tokio::spawn(schedule(
                broker.grpc_addr,
                round,
                acknowledged.clone(),
                stop.clone(),
            )),
        ];
        let deadline = Instant::now() + Duration::from_secs(3);
        while !crash.is_cut() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        crash.cut();
        stop.store(true, Ordering::Relaxed);
        for worker in workers {
            worker.await.unwrap();
        }
        let _ = broker.shutdown().await;
        let next = dir.path().join(format!("machine-{}", round + 1));
        crash
            .write_image(&next, (round % 3 != 0).then(|| rng.below(u64::MAX)))
            .unwrap();
        std::fs::remove_dir_all(&data).unwrap();
        data = next;
    }

    let broker = start(&data, Arc::new(RealFileSystem)).await;
    let acknowledged = std::mem::take(&mut *acknowledged.lock().unwrap());
    assert!(!acknowledged.sent.is_empty() && !acknowledged.topics.is_empty());
    let mut admin = AdminServiceClient::connect(format!("http://{}", broker.grpc_addr))
        .await
        .unwrap();
    let topics: HashSet<String> = admin
        .list_topics(ListTopicsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .topics
        .into_iter()
        .map(|t| t.name)
        .collect();
    let lost: Vec<_> = acknowledged.topics.difference(&topics).collect();
    assert!(lost.is_empty(), "topics lost: {lost:?}");

    let mut client = connect(broker.grpc_addr).await;
    let orders = drain(&mut client, "orders", &acknowledged.consumed, |seen| {
        acknowledged.sent.iter().all(|id| {
            acknowledged.consumed.contains(id)
                || acknowledged.ack_unknown.contains(id)
                || seen.contains_key(id)
        })
    })
    .await;
    let lost: Vec<_> = acknowledged
        .sent
        .iter()
        .filter(|id| {
            !acknowledged.consumed.contains(*id)
                && !acknowledged.ack_unknown.contains(*id)
                && !orders.contains_key(*id)
        })
        .collect();
    assert!(lost.is_empty(), "acknowledged sends lost: {lost:?}");

    let txn = drain(&mut client, "txn", &HashSet::new(), |seen| {
        acknowledged
            .committed
            .iter()
            .all(|id| seen.contains_key(id))
    })
    .await;
    for id in &acknowledged.committed {
        assert_eq!(txn.get(id), Some(&1), "committed {id} delivered once");
    }
    for id in &acknowledged.rolled_back {
        assert!(!txn.contains_key(id), "rolled-back {id} delivered");
    }

    let later = drain(&mut client, "later", &HashSet::new(), |seen| {
        acknowledged
            .scheduled
            .iter()
            .all(|id| seen.contains_key(id))
    })
    .await;
    for id in &acknowledged.scheduled {
        assert_eq!(later.get(id), Some(&1), "scheduled {id} delivered once");
    }
    for (id, times) in &later {
        assert_eq!(*times, 1, "scheduled {id} delivered {times} times");
    }
    broker.shutdown().await.unwrap();
}

async fn connect(grpc: SocketAddr) -> Client {
    MessagingServiceClient::connect(format!("http://{grpc}"))
        .await
        .unwrap()
}

fn message(topic: &str, id: &str, kind: MessageType, deliver_at_ms: Option<i64>) -> Message {
    Message {
        topic: resource(topic),
        user_properties: HashMap::new(),
        system_properties: Some(SystemProperties {
            message_id: id.to_owned(),
            message_type: kind as i32,
            delivery_timestamp: deliver_at_ms.map(ferrumq_broker::message::timestamp),
            ..SystemProperties::default()
        }),
        body: bytes::Bytes::from(id.to_owned()),
    }
}

/// Sends `messages`; the transaction ids if the broker acknowledged them all.
async fn send(client: &mut Client, messages: Vec<Message>) -> Option<Vec<String>> {
    let reply = client
        .send_message(with_client_id(SendMessageRequest { messages }, CLIENT))
        .await
        .ok()?
        .into_inner();
    (reply.status?.code == Code::Ok as i32).then(|| {
        reply
            .entries
            .into_iter()
            .map(|e| e.transaction_id)
            .collect()
    })
}

async fn send_orders(
    grpc: SocketAddr,
    round: u64,
    acknowledged: Arc<Mutex<Acknowledged>>,
    stop: Arc<AtomicBool>,
) {
    let mut client = connect(grpc).await;
    for batch in 0.. {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let ids: Vec<String> = (0..1 + batch % 8)
            .map(|i| format!("order-{round}-{batch}-{i}"))
            .collect();
        let messages = ids
            .iter()
            .map(|id| message("orders", id, MessageType::Normal, None))
            .collect();
        if send(&mut client, messages).await.is_none() {
            return;
        }
        acknowledged.lock().unwrap().sent.extend(ids);
    }
}

async fn consume_orders(
    grpc: SocketAddr,
    acknowledged: Arc<Mutex<Acknowledged>>,
    stop: Arc<AtomicBool>,
) {
    let mut client = connect(grpc).await;
    while !stop.load(Ordering::Relaxed) {
        let Some(received) = receive(
            &mut client,
            "orders",
            Duration::from_secs(2),
            Duration::from_millis(500),
        )
        .await
        else {
            return;
        };
        for (id, handle, queue) in received {
            assert!(
                !acknowledged.lock().unwrap().consumed.contains(&id),
                "{id} came back after the consumer acked it"
            );
            if ack(&mut client, "orders", &id, handle, queue).await {
                acknowledged.lock().unwrap().consumed.insert(id);
            } else {
                acknowledged.lock().unwrap().ack_unknown.insert(id);
                return;
            }
        }
    }
}

async fn create_topics(
    grpc: SocketAddr,
    round: u64,
    acknowledged: Arc<Mutex<Acknowledged>>,
    stop: Arc<AtomicBool>,
) {
    let mut admin = AdminServiceClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    for i in 0.. {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let name = format!("created-{round}-{i}");
        let request = CreateTopicRequest {
            topic: Some(Topic {
                name: name.clone(),
                queue_count: 1,
                accept_message_types: vec![MessageType::Normal as i32],
            }),
            update_existing: false,
        };
        if admin.create_topic(request).await.is_err() {
            return;
        }
        acknowledged.lock().unwrap().topics.insert(name);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn decide_transactions(
    grpc: SocketAddr,
    round: u64,
    acknowledged: Arc<Mutex<Acknowledged>>,
    stop: Arc<AtomicBool>,
) {
    let mut client = connect(grpc).await;
    for i in 0.. {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let commit = i % 2 == 0;
        let id = format!("{}-{round}-{i}", if commit { "commit" } else { "rollback" });
        let Some(txn) = send(
            &mut client,
            vec![message("txn", &id, MessageType::Transaction, None)],
        )
        .await
        else {
            return;
        };
        let resolution = if commit {
            TransactionResolution::Commit
        } else {
            TransactionResolution::Rollback
        };
        let request = EndTransactionRequest {
            topic: resource("txn"),
            message_id: id.clone(),
            transaction_id: txn[0].clone(),
            resolution: resolution as i32,
            source: TransactionSource::SourceClient as i32,
            trace_context: String::new(),
        };
        let decided = client
            .end_transaction(with_client_id(request, CLIENT))
            .await
            .is_ok_and(|r| {
                r.into_inner()
                    .status
                    .is_some_and(|s| s.code == Code::Ok as i32)
            });
        if !decided {
            return;
        }
        let mut acknowledged = acknowledged.lock().unwrap();
        if commit {
            acknowledged.committed.insert(id);
        } else {
            acknowledged.rolled_back.insert(id);
        }
    }
}

async fn schedule(
    grpc: SocketAddr,
    round: u64,
    acknowledged: Arc<Mutex<Acknowledged>>,
    stop: Arc<AtomicBool>,
) {
    let mut client = connect(grpc).await;
    for i in 0u64.. {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let id = format!("timer-{round}-{i}");
        let at = ferrumq_broker::service::now_ms() + 100 + (i % 10) as i64 * 150;
        if send(
            &mut client,
            vec![message("later", &id, MessageType::Delay, Some(at))],
        )
        .await
        .is_none()
        {
            return;
        }
        acknowledged.lock().unwrap().scheduled.insert(id);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

type Received = Vec<(String, String, MessageQueue)>;

/// One receive by group `g`, invisible to others for `invisible`: (message id, receipt
/// handle, queue) of each message, or `None` if the broker refused.
async fn receive(
    client: &mut Client,
    topic: &str,
    invisible: Duration,
    wait: Duration,
) -> Option<Received> {
    let mut request = with_client_id(
        ReceiveMessageRequest {
            group: resource("g"),
            message_queue: Some(MessageQueue {
                topic: resource(topic),
                ..MessageQueue::default()
            }),
            filter_expression: Some(FilterExpression {
                r#type: FilterType::Tag as i32,
                expression: "*".into(),
            }),
            batch_size: 32,
            invisible_duration: Some(prost_types::Duration {
                seconds: invisible.as_secs() as i64,
                nanos: 0,
            }),
            auto_renew: false,
            long_polling_timeout: Some(prost_types::Duration {
                seconds: 0,
                nanos: wait.subsec_nanos() as i32,
            }),
        },
        CLIENT,
    );
    request.set_timeout(Duration::from_secs(5));
    let mut stream = client.receive_message(request).await.ok()?.into_inner();
    let mut received = Vec::new();
    while let Ok(Some(frame)) = stream.message().await {
        match frame.content? {
            receive_message_response::Content::Message(m) => {
                let properties = m.system_properties?;
                let queue = MessageQueue {
                    topic: m.topic,
                    id: properties.queue_id,
                    ..MessageQueue::default()
                };
                received.push((properties.message_id, properties.receipt_handle?, queue));
            }
            receive_message_response::Content::Status(status)
                if status.code != Code::Ok as i32
                    && status.code != Code::MessageNotFound as i32 =>
            {
                return None;
            }
            _ => {}
        }
    }
    Some(received)
}

async fn ack(
    client: &mut Client,
    topic: &str,
    id: &str,
    handle: String,
    _queue: MessageQueue,
) -> bool {
    let request = AckMessageRequest {
        group: resource("g"),
        topic: resource(topic),
        entries: vec![AckMessageEntry {
            message_id: id.to_owned(),
            receipt_handle: handle,
        }],
    };
    client
        .ack_message(with_client_id(request, CLIENT))
        .await
        .is_ok_and(|r| {
            r.into_inner()
                .status
                .is_some_and(|s| s.code == Code::Ok as i32)
        })
}

/// Receives and acks from `topic` until `done` holds for what was delivered (or 30 s pass);
/// returns how often each id was delivered. No id in `acked` may be delivered.
async fn drain(
    client: &mut Client,
    topic: &str,
    acked: &HashSet<String>,
    done: impl Fn(&HashMap<String, u32>) -> bool,
) -> HashMap<String, u32> {
    let mut seen: HashMap<String, u32> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut quiet_after_done = 0;
    while Instant::now() < deadline {
        let received = receive(
            client,
            topic,
            Duration::from_secs(60),
            Duration::from_millis(500),
        )
        .await
        .unwrap();
        if received.is_empty() && done(&seen) {
            quiet_after_done += 1;
            if quiet_after_done == 2 {
                break;
            }
        }
        for (id, handle, queue) in received {
            assert!(
                !acked.contains(&id),
                "{id} came back after the consumer acked it"
            );
            *seen.entry(id.clone()).or_default() += 1;
            assert!(ack(client, topic, &id, handle, queue).await);
        }
    }
    seen
}

/// A sync that fails stops the broker (fail-stop): the send waiting on it and every later one
/// is refused, an operator's change too, `/readyz` answers 503, and after a restart only what
/// was acknowledged before the failure is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sync_stops_the_broker_and_nothing_is_acknowledged_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("machine");
    std::fs::create_dir(&data).unwrap();
    let crash = Arc::new(CrashFileSystem::new(&data).unwrap());
    let broker = start(&data, crash.clone()).await;
    create_topic(broker.grpc_addr, "orders", 1, &["NORMAL"]).await;
    create_group(broker.grpc_addr, "g", 100).await;
    let mut client = connect(broker.grpc_addr).await;
    let before = message("orders", "before", MessageType::Normal, None);
    assert!(send(&mut client, vec![before]).await.is_some());
    let http = broker.http_addr;
    let ready = move || tokio::task::spawn_blocking(move || common::http_get(http, "/readyz").0);
    assert_eq!(ready().await.unwrap(), 200);

    crash.cut();
    for id in ["after-1", "after-2"] {
        let after = message("orders", id, MessageType::Normal, None);
        assert!(
            send(&mut client, vec![after]).await.is_none(),
            "{id} refused"
        );
    }
    assert_eq!(ready().await.unwrap(), 503);
    let mut admin = AdminServiceClient::connect(format!("http://{}", broker.grpc_addr))
        .await
        .unwrap();
    let change = CreateTopicRequest {
        topic: Some(Topic {
            name: "made-after".into(),
            queue_count: 1,
            accept_message_types: vec![MessageType::Normal as i32],
        }),
        update_existing: false,
    };
    assert!(admin.create_topic(change).await.is_err());
    let _ = broker.shutdown().await;

    let image = dir.path().join("after-the-cut");
    crash.write_image(&image, None).unwrap();
    let broker = start(&image, Arc::new(RealFileSystem)).await;
    let mut client = connect(broker.grpc_addr).await;
    let delivered = drain(&mut client, "orders", &HashSet::new(), |seen| {
        seen.contains_key("before")
    })
    .await;
    assert_eq!(delivered.keys().collect::<Vec<_>>(), ["before"]);
    broker.shutdown().await.unwrap();
}
