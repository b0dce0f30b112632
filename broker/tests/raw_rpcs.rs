//! RPCs the official Rust client does not offer (the Java, Python and Node.js clients use
//! them): lease changes, forwarding to the DLQ, assignments, pull and offsets.
#![cfg(test)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

mod common;

use std::time::Duration;

use common::{create_group, resource, start};
use ferrumq_protocol::v2::messaging_service_client::MessagingServiceClient;
use ferrumq_protocol::v2::{
    AckMessageEntry, AckMessageRequest, ChangeInvisibleDurationRequest, Code, DigestType,
    FilterExpression, FilterType, ForwardMessageToDeadLetterQueueRequest, GetOffsetRequest,
    Message, MessageQueue, MessageType, NotifyClientTerminationRequest, PullMessageRequest,
    QueryAssignmentRequest, QueryOffsetPolicy, QueryOffsetRequest, ReceiveMessageRequest,
    SendMessageRequest, SystemProperties, UpdateOffsetRequest, pull_message_response,
    receive_message_response,
};
use tonic::transport::Channel;

type Client = MessagingServiceClient<Channel>;

fn call<T>(body: T) -> tonic::Request<T> {
    common::with_client_id(body, "raw@1#1")
}

fn queue(topic: &str, id: i32) -> Option<MessageQueue> {
    Some(MessageQueue {
        topic: resource(topic),
        id,
        ..MessageQueue::default()
    })
}

async fn send(client: &mut Client, topic: &str, ids: &[&str]) {
    let messages = ids
        .iter()
        .map(|id| Message {
            topic: resource(topic),
            user_properties: Default::default(),
            system_properties: Some(SystemProperties {
                message_id: (*id).to_owned(),
                message_type: MessageType::Normal as i32,
                queue_id: 0,
                ..SystemProperties::default()
            }),
            body: id.as_bytes().to_vec().into(),
        })
        .collect();
    let response = client
        .send_message(call(SendMessageRequest { messages }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.status.unwrap().code, Code::Ok as i32);
    assert_eq!(response.entries.len(), ids.len());
}

async fn receive(client: &mut Client, group: &str, topic: &str, invisible_ms: u64) -> Vec<Message> {
    receive_as(client, group, topic, invisible_ms, None, 32).await
}

/// A receive of up to `batch` messages from a client that names its language in
/// `x-mq-language`.
async fn receive_as(
    client: &mut Client,
    group: &str,
    topic: &str,
    invisible_ms: u64,
    language: Option<&'static str>,
    batch: i32,
) -> Vec<Message> {
    let mut request = call(ReceiveMessageRequest {
        group: resource(group),
        message_queue: queue(topic, 0),
        filter_expression: Some(FilterExpression {
            r#type: FilterType::Tag as i32,
            expression: "*".into(),
        }),
        batch_size: batch,
        invisible_duration: Some(duration(invisible_ms)),
        auto_renew: false,
        long_polling_timeout: Some(prost_types::Duration {
            seconds: 3,
            nanos: 0,
        }),
    });
    request.set_timeout(Duration::from_secs(5));
    if let Some(language) = language {
        request
            .metadata_mut()
            .insert("x-mq-language", language.parse().unwrap());
    }
    let mut stream = client.receive_message(request).await.unwrap().into_inner();
    let mut messages = Vec::new();
    let mut frames = Vec::new();
    while let Some(frame) = stream.message().await.unwrap() {
        let content = frame.content.unwrap();
        frames.push(std::mem::discriminant(&content));
        if let receive_message_response::Content::Message(m) = content {
            messages.push(m);
        }
    }
    // A status first and a delivery timestamp last, always.
    assert!(frames.len() >= 2);
    messages
}

fn duration(ms: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

fn handle(m: &Message) -> String {
    m.system_properties
        .as_ref()
        .unwrap()
        .receipt_handle
        .clone()
        .unwrap()
}

fn attempt(m: &Message) -> i32 {
    m.system_properties
        .as_ref()
        .unwrap()
        .delivery_attempt
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_language_gets_the_body_digest_form_it_checks() {
    let broker = start(|_| {}).await;
    let mut client = Client::connect(format!("http://{}", broker.addr()))
        .await
        .unwrap();
    let md5 = Some((DigestType::Md5 as i32, "AF533170E9968B9DE45AB0842B54A315"));
    let expected = [
        (Some("JAVA"), Some((DigestType::Crc32 as i32, "3E0D52A"))),
        (Some("PYTHON"), Some((DigestType::Crc32 as i32, "03E0D52A"))),
        (Some("HTTP"), Some((DigestType::Crc32 as i32, "65066282"))),
        // The Rust clients never read it.
        (Some("RUST"), None),
        (Some("GO"), md5),
        (None, md5),
    ];
    for n in 0..expected.len() {
        create_group(broker.addr(), &format!("digest-{n}"), 16).await;
    }
    // CRC32("m21") = 0x03E0D52A = 65066282; its MD5 is AF53...A315.
    send(&mut client, "digests", &["m21"]).await;
    for (n, (language, digest)) in expected.into_iter().enumerate() {
        let group = format!("digest-{n}");
        let messages = receive_as(&mut client, &group, "digests", 30_000, language, 32).await;
        assert_eq!(messages.len(), 1, "{language:?}");
        let sent = messages[0].system_properties.as_ref().unwrap();
        let sent = sent.body_digest.as_ref();
        let sent = sent.map(|d| (d.r#type, d.checksum.as_str()));
        assert_eq!(sent, digest, "{language:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receive_hands_out_as_many_as_asked_up_to_the_configured_cap() {
    let broker = start(|c| c.limits.max_receive_batch = 100).await;
    let mut client = Client::connect(format!("http://{}", broker.addr()))
        .await
        .unwrap();
    create_group(broker.addr(), "bulk", 16).await;
    let ids: Vec<String> = (0..250).map(|n| format!("bulk-{n}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    send(&mut client, "bulk", &ids).await;
    // A receive hands out what is dispatched when it looks; let dispatch reach all 250.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sizes = [
        receive_as(&mut client, "bulk", "bulk", 30_000, None, 60)
            .await
            .len(),
        receive_as(&mut client, "bulk", "bulk", 30_000, None, 500)
            .await
            .len(),
    ];
    assert_eq!(sizes, [60, 100]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_invisible_duration_renews_the_lease_with_a_new_handle() {
    let broker = start(|_| {}).await;
    create_group(broker.addr(), "g", 17).await;
    let mut client = MessagingServiceClient::connect(format!("http://{}", broker.addr()))
        .await
        .unwrap();
    send(&mut client, "t", &["M1"]).await;
    let first = receive(&mut client, "g", "t", 30_000).await;
    assert_eq!(first.len(), 1);
    let change = |h: String, seconds: i64| ChangeInvisibleDurationRequest {
        group: resource("g"),
        topic: resource("t"),
        receipt_handle: h,
        invisible_duration: Some(prost_types::Duration { seconds, nanos: 0 }),
        message_id: "M1".into(),
    };
    let response = client
        .change_invisible_duration(call(change(handle(&first[0]), 30)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.status.unwrap().code, Code::Ok as i32);
    let renewed = response.receipt_handle;
    assert_ne!(renewed, handle(&first[0]));
    // A client whose reply to that change was lost still holds the first handle: it acts
    // on the same delivery.
    let response = client
        .change_invisible_duration(call(change(handle(&first[0]), 1)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.status.unwrap().code, Code::Ok as i32);
    let ack = |h: String| AckMessageRequest {
        group: resource("g"),
        topic: resource("t"),
        entries: vec![AckMessageEntry {
            message_id: "M1".into(),
            receipt_handle: h,
        }],
    };
    // The shortened lease ends in a second: the message comes back with attempt 2.
    let mut again = Vec::new();
    for _ in 0..5 {
        again = receive(&mut client, "g", "t", 30_000).await;
        if !again.is_empty() {
            break;
        }
    }
    assert_eq!(again.len(), 1);
    assert_eq!(attempt(&again[0]), 2);
    // Every handle of the first delivery is stale now.
    for old in [handle(&first[0]), renewed] {
        let stale = client
            .ack_message(call(ack(old)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            stale.status.unwrap().code,
            Code::InvalidReceiptHandle as i32
        );
    }
    let ok = client
        .ack_message(call(ack(handle(&again[0]))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.status.unwrap().code, Code::Ok as i32);
    broker.running.shutdown().await.unwrap();
}

/// Each group keeps its own state, but lease epochs are shared: the handle one group got
/// for a message never acks another group's delivery of the same message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_handle_of_one_group_is_stale_in_another() {
    let broker = start(|_| {}).await;
    create_group(broker.addr(), "ga", 17).await;
    create_group(broker.addr(), "gb", 17).await;
    let mut client = MessagingServiceClient::connect(format!("http://{}", broker.addr()))
        .await
        .unwrap();
    send(&mut client, "shared", &["S1"]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let a = receive(&mut client, "ga", "shared", 60_000).await;
    let b = receive(&mut client, "gb", "shared", 60_000).await;
    assert_eq!((a.len(), b.len()), (1, 1));
    let ack = |group: &str, m: &Message| AckMessageRequest {
        group: resource(group),
        topic: resource("shared"),
        entries: vec![AckMessageEntry {
            message_id: "S1".into(),
            receipt_handle: handle(m),
        }],
    };
    let crossed = client
        .ack_message(call(ack("gb", &a[0])))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        crossed.status.unwrap().code,
        Code::InvalidReceiptHandle as i32
    );
    for (group, message) in [("ga", &a[0]), ("gb", &b[0])] {
        let own = client
            .ack_message(call(ack(group, message)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(own.status.unwrap().code, Code::Ok as i32, "{group}");
    }
    broker.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn above_the_disk_watermark_sends_are_refused_and_acks_still_written() {
    let broker = start(|_| {}).await;
    create_group(broker.addr(), "g", 17).await;
    let mut client = MessagingServiceClient::connect(format!("http://{}", broker.addr()))
        .await
        .unwrap();
    send(&mut client, "t", &["W1", "W2"]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let leased = receive(&mut client, "g", "t", 60_000).await;
    assert_eq!(leased.len(), 2);
    // The same data, opened again with a watermark every disk is above.
    let mut config = broker.running.broker.config.as_ref().clone();
    broker.running.shutdown().await.unwrap();
    config.disk_watermark = 0.0;
    config.grpc_listen = "127.0.0.1:0".parse().unwrap();
    config.http_listen = "127.0.0.1:0".parse().unwrap();
    let running = ferrumq_broker::start(config).await.unwrap();
    let mut client = MessagingServiceClient::connect(format!("http://{}", running.grpc_addr))
        .await
        .unwrap();
    let refused = client
        .send_message(call(SendMessageRequest {
            messages: vec![Message {
                topic: resource("t"),
                system_properties: Some(SystemProperties {
                    message_id: "W3".into(),
                    message_type: MessageType::Normal as i32,
                    ..SystemProperties::default()
                }),
                body: b"W3".to_vec().into(),
                ..Message::default()
            }],
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(refused.status.unwrap().code, Code::TooManyRequests as i32);
    // Consumers can still finish what they hold.
    let acked = client
        .ack_message(call(AckMessageRequest {
            group: resource("g"),
            topic: resource("t"),
            entries: leased
                .iter()
                .map(|m| AckMessageEntry {
                    message_id: m.system_properties.as_ref().unwrap().message_id.clone(),
                    receipt_handle: handle(m),
                })
                .collect(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(acked.status.unwrap().code, Code::Ok as i32);
    assert_eq!(running.broker.consumers.inflight(), 0);
    running.shutdown().await.unwrap();
    drop(broker.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leased_message_that_cannot_be_read_is_never_finished_silently() {
    use ferrumq_protocol::admin::{QueryMessageRequest, query_message_request};
    use std::io::{Seek, SeekFrom, Write};
    let broker = start(|_| {}).await;
    create_group(broker.addr(), "g", 17).await;
    let mut client = MessagingServiceClient::connect(format!("http://{}", broker.addr()))
        .await
        .unwrap();
    send(&mut client, "t", &["C1"]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receive(&mut client, "g", "t", 1000).await.len(), 1);
    let stored = common::admin(broker.addr())
        .await
        .query_message(QueryMessageRequest {
            topic: "t".into(),
            by: Some(query_message_request::By::MessageId("C1".into())),
            ..QueryMessageRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .messages;
    // Damage the record on disk (the broker reads it through a shared mapping).
    let position = stored[0].commit_log_position;
    let segment = broker
        .dir
        .path()
        .join("store/commitlog/00000000000000000000");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(segment)
        .unwrap();
    file.seek(SeekFrom::Start(position + 60)).unwrap();
    file.write_all(b"\xff\xfe").unwrap();
    drop(file);
    // Its lease ends; the next receive cannot read it to deliver it again.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(receive(&mut client, "g", "t", 1000).await.is_empty());
    // It is still held, not finished as if retention had deleted it.
    assert_eq!(broker.running.broker.consumers.inflight(), 1);
    broker.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_to_dead_letter_queue_keeps_the_id_and_origin() {
    let broker = start(|_| {}).await;
    create_group(broker.addr(), "g", 17).await;
    create_group(broker.addr(), "dlq-reader", 17).await;
    let mut client = MessagingServiceClient::connect(format!("http://{}", broker.addr()))
        .await
        .unwrap();
    send(&mut client, "t", &["M2"]).await;
    let got = receive(&mut client, "g", "t", 30_000).await;
    let response = client
        .forward_message_to_dead_letter_queue(call(ForwardMessageToDeadLetterQueueRequest {
            group: resource("g"),
            topic: resource("t"),
            receipt_handle: handle(&got[0]),
            message_id: "M2".into(),
            delivery_attempt: 1,
            max_delivery_attempts: 16,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.status.unwrap().code, Code::Ok as i32);
    let dead = receive(&mut client, "dlq-reader", "%DLQ%g", 30_000).await;
    assert_eq!(dead.len(), 1);
    let system = dead[0].system_properties.as_ref().unwrap();
    assert_eq!(system.message_id, "M2");
    let origin = system.dead_letter_queue.as_ref().unwrap();
    assert_eq!(
        (origin.topic.as_str(), origin.message_id.as_str()),
        ("t", "M2")
    );
    // The original is finished: it does not come back.
    assert!(receive(&mut client, "g", "t", 30_000).await.is_empty());
    broker.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assignment_pull_and_offsets() {
    let broker = start(|_| {}).await;
    let mut client = MessagingServiceClient::connect(format!("http://{}", broker.addr()))
        .await
        .unwrap();
    send(&mut client, "p", &["A", "B", "C"]).await;

    let assignment = client
        .query_assignment(call(QueryAssignmentRequest {
            topic: resource("p"),
            group: resource("pg"),
            endpoints: None,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(assignment.status.unwrap().code, Code::Ok as i32);
    assert_eq!(assignment.assignments.len(), 1);
    let endpoints = assignment.assignments[0]
        .message_queue
        .as_ref()
        .unwrap()
        .broker
        .as_ref()
        .unwrap()
        .endpoints
        .as_ref()
        .unwrap();
    assert_eq!(endpoints.addresses[0].port, i32::from(broker.addr().port()));

    // Sends are answered once durable; indexing follows a moment later.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let end = client
            .query_offset(call(QueryOffsetRequest {
                message_queue: queue("p", 0),
                query_offset_policy: QueryOffsetPolicy::End as i32,
                timestamp: None,
            }))
            .await
            .unwrap()
            .into_inner();
        if end.offset == 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the messages were never indexed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut stream = client
        .pull_message(call(PullMessageRequest {
            group: resource("pg"),
            message_queue: queue("p", 0),
            offset: 1,
            batch_size: 10,
            filter_expression: None,
            // Dispatch may still be indexing the messages: wait for them.
            long_polling_timeout: Some(prost_types::Duration {
                seconds: 3,
                nanos: 0,
            }),
        }))
        .await
        .unwrap()
        .into_inner();
    let (mut bodies, mut next) = (Vec::new(), -1);
    while let Some(frame) = stream.message().await.unwrap() {
        match frame.content.unwrap() {
            pull_message_response::Content::Message(m) => bodies.push(m.body.to_vec()),
            pull_message_response::Content::NextOffset(n) => next = n,
            pull_message_response::Content::Status(s) => assert_eq!(s.code, Code::Ok as i32),
        }
    }
    assert_eq!(bodies, vec![b"B".to_vec(), b"C".to_vec()]);
    assert_eq!(next, 3);

    let update = client
        .update_offset(call(UpdateOffsetRequest {
            group: resource("pg"),
            message_queue: queue("p", 0),
            offset: 3,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(update.status.unwrap().code, Code::Ok as i32);
    let got = client
        .get_offset(call(GetOffsetRequest {
            group: resource("pg"),
            message_queue: queue("p", 0),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.offset, 3);
    let missing = client
        .get_offset(call(GetOffsetRequest {
            group: resource("pg"),
            message_queue: queue("p", 1),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(missing.status.unwrap().code, Code::NotFound as i32);
    for (policy, expected) in [
        (QueryOffsetPolicy::Beginning, 0),
        (QueryOffsetPolicy::End, 3),
    ] {
        let offset = client
            .query_offset(call(QueryOffsetRequest {
                message_queue: queue("p", 0),
                query_offset_policy: policy as i32,
                timestamp: None,
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(offset.offset, expected);
    }
    let bad_queue = client
        .update_offset(call(UpdateOffsetRequest {
            group: resource("pg"),
            message_queue: queue("p", 99),
            offset: 0,
        }))
        .await
        .unwrap()
        .into_inner();
    let status = bad_queue.status.unwrap();
    assert_eq!(status.code, Code::BadRequest as i32);
    assert!(
        status.message.contains("message_queue.id"),
        "{}",
        status.message
    );

    // Termination is OK even for a client the broker never saw.
    let bye = client
        .notify_client_termination(call(NotifyClientTerminationRequest { group: None }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bye.status.unwrap().code, Code::Ok as i32);
    broker.running.shutdown().await.unwrap();
}

/// A push consumer's receive: auto-renewed lease, no invisible duration.
async fn receive_auto_renew(client: &mut Client, client_id: &'static str) -> Vec<Message> {
    let mut request = common::with_client_id(
        ReceiveMessageRequest {
            group: resource("push"),
            message_queue: queue("auto", 0),
            filter_expression: None,
            batch_size: 32,
            invisible_duration: None,
            auto_renew: true,
            long_polling_timeout: Some(prost_types::Duration {
                seconds: 3,
                nanos: 0,
            }),
        },
        client_id,
    );
    request.set_timeout(Duration::from_secs(5));
    let mut stream = client.receive_message(request).await.unwrap().into_inner();
    let mut messages = Vec::new();
    while let Some(frame) = stream.message().await.unwrap() {
        if let Some(receive_message_response::Content::Message(m)) = frame.content {
            messages.push(m);
        }
    }
    messages
}

/// Opens a Telemetry stream as a push consumer of group "push" (its Settings sent); the
/// broker counts the client as connected while the returned sender and stream live.
async fn open_push_telemetry(
    client: &mut Client,
    client_id: &'static str,
) -> (
    tokio::sync::mpsc::Sender<ferrumq_protocol::v2::TelemetryCommand>,
    tonic::Streaming<ferrumq_protocol::v2::TelemetryCommand>,
) {
    use ferrumq_protocol::v2::{
        ClientType, Settings, Subscription, TelemetryCommand, settings, telemetry_command,
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(TelemetryCommand {
        status: None,
        command: Some(telemetry_command::Command::Settings(Settings {
            client_type: Some(ClientType::PushConsumer as i32),
            pub_sub: Some(settings::PubSub::Subscription(Subscription {
                group: resource("push"),
                ..Subscription::default()
            })),
            ..Settings::default()
        })),
    })
    .await
    .unwrap();
    let telemetry = client
        .telemetry(common::with_client_id(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            client_id,
        ))
        .await
        .unwrap()
        .into_inner();
    (tx, telemetry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_leases_are_renewed_while_the_client_is_connected_and_released_when_it_leaves() {
    use ferrumq_protocol::v2::{Settings, settings, telemetry_command};
    let broker = start(|c| {
        c.limits.push_lease_ms = 1500;
        c.limits.push_lease_renew_ahead_ms = 1000;
        c.limits.push_lease_release_ms = 300;
    })
    .await;
    create_group(broker.addr(), "push", 17).await;
    let mut client = MessagingServiceClient::connect(format!("http://{}", broker.addr()))
        .await
        .unwrap();
    send(&mut client, "auto", &["M3"]).await;

    // The push consumer's Telemetry stream marks it as connected.
    let (tx, mut telemetry) = open_push_telemetry(&mut client, "push@1#1").await;
    let reply = telemetry.message().await.unwrap().unwrap();
    assert_eq!(reply.status.unwrap().code, Code::Ok as i32);
    // Push consumers are told RocketMQ's 32, however many a receive may hand out.
    let Some(telemetry_command::Command::Settings(Settings {
        pub_sub: Some(settings::PubSub::Subscription(subscription)),
        ..
    })) = reply.command
    else {
        panic!("the reply is not a subscription's Settings");
    };
    assert_eq!(subscription.receive_batch_size, Some(32));

    assert!(broker.running.broker.is_connected("push@1#1"));
    let got = receive_auto_renew(&mut client, "push@1#1").await;
    assert_eq!(got.len(), 1);

    // Well past the 1.5 s lease: renewed, so nobody else gets the message.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        receive_auto_renew(&mut client, "other@1#1")
            .await
            .is_empty()
    );
    let ack = client
        .ack_message(common::with_client_id(
            AckMessageRequest {
                group: resource("push"),
                topic: resource("auto"),
                entries: vec![AckMessageEntry {
                    message_id: "M3".into(),
                    receipt_handle: handle(&got[0]),
                }],
            },
            "push@1#1",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        ack.status.unwrap().code,
        Code::Ok as i32,
        "the original handle still acks"
    );

    // The consumer goes away holding a message: another gets it soon, as attempt 2.
    send(&mut client, "auto", &["M4"]).await;
    let held = receive_auto_renew(&mut client, "push@1#1").await;
    assert_eq!(held.len(), 1);
    drop(tx);
    drop(telemetry);
    let mut again = Vec::new();
    for _ in 0..3 {
        again = receive_auto_renew(&mut client, "other@1#1").await;
        if !again.is_empty() {
            break;
        }
    }
    assert_eq!(again.len(), 1);
    assert_eq!(attempt(&again[0]), 2);
    broker.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminating_client_releases_its_push_leases_at_once() {
    // NotifyClientTermination comes while the Telemetry stream is still open: without it, the
    // message a leaving push consumer held would wait out its whole 60 s lease.
    let broker = start(|c| {
        c.limits.push_lease_ms = 60_000;
        c.limits.push_lease_release_ms = 300;
    })
    .await;
    create_group(broker.addr(), "push", 17).await;
    let mut client = MessagingServiceClient::connect(format!("http://{}", broker.addr()))
        .await
        .unwrap();
    let (_tx, mut telemetry) = open_push_telemetry(&mut client, "push@1#1").await;
    let reply = telemetry.message().await.unwrap().unwrap();
    assert_eq!(reply.status.unwrap().code, Code::Ok as i32);
    send(&mut client, "auto", &["M5"]).await;
    assert_eq!(receive_auto_renew(&mut client, "push@1#1").await.len(), 1);
    assert!(
        receive_auto_renew(&mut client, "other@1#1")
            .await
            .is_empty()
    );

    let status = client
        .notify_client_termination(common::with_client_id(
            NotifyClientTerminationRequest {
                group: resource("push"),
            },
            "push@1#1",
        ))
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(status.code, Code::Ok as i32);
    assert!(broker.running.broker.is_connected("push@1#1"));
    let again = receive_auto_renew(&mut client, "other@1#1").await;
    assert_eq!(again.len(), 1);
    assert_eq!(attempt(&again[0]), 2);
    broker.running.shutdown().await.unwrap();
}
