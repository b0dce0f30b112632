//! Each kind of bad input gets its RocketMQ code and a message naming the field, and stores
//! nothing. Requests the official client cannot make are sent with the raw v2 client.
#![cfg(test)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{consumer, create_group, producer, resource, start, tag};
use ferrumq_protocol::v2::messaging_service_client::MessagingServiceClient;
use ferrumq_protocol::v2::{
    AckMessageEntry, AckMessageRequest, ChangeInvisibleDurationRequest, ClientType, Code, Message,
    MessageType, SendMessageRequest, SystemProperties,
};
use rocketmq::model::message::MessageBuilder;
use tonic::transport::Channel;

fn client_call<T>(body: T) -> tonic::Request<T> {
    common::with_client_id(body, "test@1#1")
}

/// The status frame that opens a receive of topic `t` (30 s invisible, no long poll).
async fn receive_status(
    client: &mut MessagingServiceClient<Channel>,
    group: &str,
    batch_size: i32,
    filter_expression: Option<ferrumq_protocol::v2::FilterExpression>,
) -> ferrumq_protocol::v2::Status {
    let mut stream = client
        .receive_message(client_call(ferrumq_protocol::v2::ReceiveMessageRequest {
            group: resource(group),
            message_queue: Some(ferrumq_protocol::v2::MessageQueue {
                topic: resource("t"),
                ..Default::default()
            }),
            filter_expression,
            batch_size,
            invisible_duration: Some(prost_types::Duration {
                seconds: 30,
                nanos: 0,
            }),
            auto_renew: false,
            long_polling_timeout: None,
        }))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap().content.unwrap();
    let ferrumq_protocol::v2::receive_message_response::Content::Status(status) = first else {
        panic!("the first frame is not a status");
    };
    status
}

fn message(topic: &str, body: &[u8]) -> Message {
    Message {
        topic: resource(topic),
        user_properties: HashMap::new(),
        system_properties: Some(SystemProperties {
            message_id: "01020304050607080900000000000000AA".into(),
            message_type: MessageType::Normal as i32,
            ..SystemProperties::default()
        }),
        body: body.to_vec().into(),
    }
}

async fn send(
    client: &mut MessagingServiceClient<Channel>,
    messages: Vec<Message>,
) -> (i32, String) {
    let response = client
        .send_message(client_call(SendMessageRequest { messages }))
        .await
        .unwrap()
        .into_inner();
    let status = response.status.unwrap();
    (status.code, status.message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_send_has_its_code_names_the_field_and_stores_nothing() {
    let broker = start(|c| {
        c.topics.auto_create = false;
        c.groups.auto_create = false;
        c.limits.max_body_bytes = 1024;
    })
    .await;
    let admin = &mut common::admin(broker.addr()).await;
    admin
        .create_topic(ferrumq_protocol::admin::CreateTopicRequest {
            topic: Some(ferrumq_protocol::admin::Topic {
                name: "t".into(),
                queue_count: 2,
                accept_message_types: vec![],
            }),
            update_existing: false,
        })
        .await
        .unwrap();
    let log = broker.running.broker.store.log();
    let mut client = MessagingServiceClient::connect(format!("http://{}", broker.addr()))
        .await
        .unwrap();

    // No client id.
    let before = log.written_pos();
    let response = client
        .send_message(tonic::Request::new(SendMessageRequest {
            messages: vec![message("t", b"x")],
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.status.unwrap().code, Code::ClientIdRequired as i32);
    assert_eq!(log.written_pos(), before);

    let mut reserved = message("t", b"x");
    reserved
        .user_properties
        .insert("UNIQ_KEY".into(), "v".into());
    let mut too_many = message("t", b"x");
    for i in 0..129 {
        too_many.user_properties.insert(format!("k{i}"), "v".into());
    }
    let mut too_large = message("t", b"x");
    too_large
        .user_properties
        .insert("big".into(), "v".repeat(20 << 10));
    let mut no_id = message("t", b"x");
    no_id.system_properties.as_mut().unwrap().message_id.clear();
    let mut bad_tag = message("t", b"x");
    bad_tag.system_properties.as_mut().unwrap().tag = Some("a|b".into());
    let mut long_id = message("t", b"x");
    long_id.system_properties.as_mut().unwrap().message_id = "X".repeat(129);
    let mut gzip = message("t", b"x");
    gzip.system_properties.as_mut().unwrap().body_encoding =
        ferrumq_protocol::v2::Encoding::Gzip as i32;
    let mut timed = message("t", b"x");
    timed.system_properties.as_mut().unwrap().delivery_timestamp = Some(prost_types::Timestamp {
        seconds: 1,
        nanos: 0,
    });
    let mut grouped = message("t", b"x");
    grouped.system_properties.as_mut().unwrap().message_group = Some("g".into());
    let mut bad_key = message("t", b"x");
    bad_key.system_properties.as_mut().unwrap().keys = vec!["a\u{1}b".into()];
    let in_secs = |secs: i64| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        Some(prost_types::Timestamp {
            seconds: i64::try_from(now.as_secs()).unwrap() + secs,
            nanos: 0,
        })
    };
    let mut delay = message("t", b"x");
    delay.system_properties.as_mut().unwrap().message_type = MessageType::Delay as i32;
    delay.system_properties.as_mut().unwrap().delivery_timestamp = in_secs(60);
    let mut untimed_delay = message("t", b"x");
    untimed_delay
        .system_properties
        .as_mut()
        .unwrap()
        .message_type = MessageType::Delay as i32;
    let mut far_delay = untimed_delay.clone();
    // Eight days: past the two-day limit (and what Python's milliseconds-as-seconds gives).
    far_delay
        .system_properties
        .as_mut()
        .unwrap()
        .delivery_timestamp = in_secs(8 * 24 * 3600);
    let mut groupless_fifo = message("t", b"x");
    groupless_fifo
        .system_properties
        .as_mut()
        .unwrap()
        .message_type = MessageType::Fifo as i32;
    let cases: Vec<(Vec<Message>, Code, &str)> = vec![
        (
            vec![message("bad topic", b"x")],
            Code::IllegalTopic,
            "topic",
        ),
        (
            vec![message("rmq_sys_x", b"x")],
            Code::IllegalTopic,
            "system topic",
        ),
        (
            vec![message("%DLQ%g", b"x")],
            Code::IllegalTopic,
            "system topic",
        ),
        (
            vec![message("unknown", b"x")],
            Code::TopicNotFound,
            "unknown",
        ),
        (
            vec![message("t", &[7; 1025])],
            Code::MessageBodyTooLarge,
            "messages[0].body",
        ),
        (
            vec![message("t", b"")],
            Code::BadRequest,
            "messages[0].body",
        ),
        (
            vec![reserved],
            Code::IllegalMessagePropertyKey,
            "user_properties",
        ),
        (
            vec![too_many],
            Code::MessagePropertiesTooLarge,
            "user_properties",
        ),
        (
            vec![too_large],
            Code::MessagePropertiesTooLarge,
            "user_properties",
        ),
        (vec![no_id], Code::IllegalMessageId, "message_id"),
        (vec![bad_tag], Code::IllegalMessageTag, "tag"),
        (
            vec![delay],
            Code::MessagePropertyConflictWithType,
            "message_type",
        ),
        (vec![long_id], Code::IllegalMessageId, "message_id"),
        (vec![gzip], Code::BadRequest, "body_encoding"),
        (
            vec![timed],
            Code::MessagePropertyConflictWithType,
            "delivery_timestamp",
        ),
        (
            vec![grouped],
            Code::MessagePropertyConflictWithType,
            "message_group",
        ),
        (vec![bad_key], Code::IllegalMessageKey, "keys"),
        (
            vec![untimed_delay],
            Code::IllegalDeliveryTime,
            "delivery_timestamp",
        ),
        (
            vec![far_delay],
            Code::IllegalDeliveryTime,
            "delivery_timestamp",
        ),
        (
            vec![groupless_fifo],
            Code::IllegalMessageGroup,
            "message_group",
        ),
        (vec![message("t", b"x"); 1025], Code::BadRequest, "messages"),
        // A good message followed by a bad one: neither is stored.
        (
            vec![message("t", b"fine"), message("t", &[7; 1025])],
            Code::MessageBodyTooLarge,
            "messages[1].body",
        ),
        (
            vec![message("t", b"x"), message("u", b"x")],
            Code::MessageCorrupted,
            "messages[1].topic",
        ),
        (vec![], Code::BadRequest, "messages"),
    ];
    for (messages, code, field) in cases {
        let before = log.written_pos();
        let (got, text) = send(&mut client, messages).await;
        assert_eq!(got, code as i32, "{text}");
        assert!(text.contains(field), "{text:?} should name {field:?}");
        assert_eq!(log.written_pos(), before, "{text}: nothing stored");
    }
    assert!(broker.running.broker.metadata.topic("unknown").is_none());

    // With group auto-creation off, an unknown group cannot receive.
    let status = receive_status(&mut client, "nobody", 32, None).await;
    assert_eq!(
        status.code,
        Code::ConsumerGroupNotFound as i32,
        "{}",
        status.message
    );
    assert!(broker.running.broker.metadata.group("nobody").is_none());

    // The same refusals reach the official client without making it panic.
    let producer = producer(broker.addr(), "t").await;
    let big = MessageBuilder::builder()
        .set_topic("t")
        .set_body(vec![0; 2048])
        .build()
        .unwrap();
    let err = producer.send(big).await.unwrap_err();
    assert!(err.to_string().contains("MESSAGE_BODY_TOO_LARGE"), "{err}");
    let delay = MessageBuilder::delay_message_builder("t", b"x".to_vec(), 4_000_000_000)
        .build()
        .unwrap();
    let err = producer.send(delay).await.unwrap_err();
    assert!(err.to_string().contains("ILLEGAL_DELIVERY_TIME"), "{err}");
    let reserved = MessageBuilder::builder()
        .set_topic("t")
        .set_body(b"x".to_vec())
        .set_properties(HashMap::from([("TRAN_MSG".to_owned(), "true".to_owned())]))
        .build()
        .unwrap();
    let err = producer.send(reserved).await.unwrap_err();
    assert!(
        err.to_string().contains("ILLEGAL_MESSAGE_PROPERTY_KEY"),
        "{err}"
    );
    broker.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_receipt_handles_and_invisible_durations_are_refused() {
    let broker = start(|_| {}).await;
    create_group(broker.addr(), "g", 17).await;
    let producer = producer(broker.addr(), "t").await;
    producer
        .send(
            MessageBuilder::builder()
                .set_topic("t")
                .set_body(b"x".to_vec())
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    let consumer = consumer(broker.addr(), "g", "t").await;

    // Below the minimum invisible duration (1 s in tests).
    let err = consumer
        .receive_with("t", &tag("*"), 32, Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("ILLEGAL_INVISIBLE_TIME"), "{err}");

    let received = common::receive_n(
        &consumer,
        "t",
        &tag("*"),
        1,
        Duration::from_secs(30),
        false,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(received.len(), 1);
    let mut client = MessagingServiceClient::connect(format!("http://{}", broker.addr()))
        .await
        .unwrap();
    let log = broker.running.broker.store.log();
    for handle in ["", "garbage", "f1.0.0.1.00000000", "f1.0.0.1.00000000.9"] {
        let before = log.written_pos();
        let response = client
            .ack_message(client_call(AckMessageRequest {
                group: resource("g"),
                topic: resource("t"),
                entries: vec![AckMessageEntry {
                    message_id: "m".into(),
                    receipt_handle: handle.into(),
                }],
            }))
            .await
            .unwrap()
            .into_inner();
        let status = response.status.unwrap();
        assert_eq!(
            status.code,
            Code::InvalidReceiptHandle as i32,
            "{handle:?}: {}",
            status.message
        );
        assert!(
            status.message.contains("entries[0].receipt_handle"),
            "{}",
            status.message
        );
        assert_eq!(response.entries.len(), 1);
        assert_eq!(log.written_pos(), before);
    }
    // Strings that are not UTF-8, which the typed client cannot send: written by hand.
    for (message_id, handle, code, field) in [
        (
            &b"m"[..],
            &b"f1.\xff"[..],
            Code::InvalidReceiptHandle,
            "entries[0].receipt_handle",
        ),
        (
            b"\xc3",
            b"f1.0.0.1.00000000",
            Code::BadRequest,
            "entries[0].message_id",
        ),
    ] {
        let before = log.written_pos();
        let request = ferrumq_protocol::ack::AckRequest {
            group: resource("g"),
            topic: resource("t"),
            entries: vec![ferrumq_protocol::ack::AckRequestEntry {
                message_id: message_id.to_vec().into(),
                receipt_handle: handle.to_vec().into(),
            }],
        };
        let channel = Channel::from_shared(format!("http://{}", broker.addr()))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        let response: ferrumq_protocol::ack::AckResponse = grpc
            .unary(
                client_call(request),
                tonic::codegen::http::uri::PathAndQuery::from_static(
                    "/apache.rocketmq.v2.MessagingService/AckMessage",
                ),
                ferrumq_protocol::codec::GrpcCodec::default(),
            )
            .await
            .unwrap()
            .into_inner();
        let status = response.status.unwrap();
        assert_eq!(status.code, code as i32, "{}", status.message);
        assert!(status.message.contains(field), "{}", status.message);
        assert_eq!(response.entries.len(), 1);
        assert_eq!(response.entries[0].receipt_handle, handle);
        assert_eq!(log.written_pos(), before);
    }
    let response = client
        .change_invisible_duration(client_call(ChangeInvisibleDurationRequest {
            group: resource("g"),
            topic: resource("t"),
            receipt_handle: "garbage".into(),
            invisible_duration: Some(prost_types::Duration {
                seconds: 5,
                nanos: 0,
            }),
            message_id: "m".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        response.status.unwrap().code,
        Code::InvalidReceiptHandle as i32
    );

    // Receive requests with a bad batch size or group name: one status frame naming the field.
    // A filter type the protocol does not have is refused, not read as a tag expression.
    let unknown_filter = ferrumq_protocol::v2::FilterExpression {
        r#type: 7,
        expression: "*".into(),
    };
    for (group, batch_size, filter, code, field) in [
        ("g", 0, None, Code::BadRequest, "batch_size"),
        (
            "bad group",
            32,
            None,
            Code::IllegalConsumerGroup,
            "consumer group",
        ),
        (
            "g",
            32,
            Some(unknown_filter),
            Code::IllegalFilterExpression,
            "filter_expression.type",
        ),
    ] {
        let status = receive_status(&mut client, group, batch_size, filter).await;
        assert_eq!(status.code, code as i32, "{}", status.message);
        assert!(status.message.contains(field), "{}", status.message);
    }

    // A heartbeat's client type and group are checked too; a producer names no group.
    for (group, client_type, code, field) in [
        (None, ClientType::Producer as i32, Code::Ok, ""),
        (
            resource("g"),
            ClientType::SimpleConsumer as i32,
            Code::Ok,
            "",
        ),
        (None, 99, Code::UnrecognizedClientType, "client_type 99"),
        (
            resource("bad group"),
            ClientType::PushConsumer as i32,
            Code::IllegalConsumerGroup,
            "consumer group",
        ),
    ] {
        let status = client
            .heartbeat(client_call(ferrumq_protocol::v2::HeartbeatRequest {
                group,
                client_type,
            }))
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap();
        assert_eq!(status.code, code as i32, "{}", status.message);
        assert!(status.message.contains(field), "{}", status.message);
    }

    // A lease change beyond the 12 h maximum is refused and changes nothing.
    let response = client
        .change_invisible_duration(client_call(ChangeInvisibleDurationRequest {
            group: resource("g"),
            topic: resource("t"),
            receipt_handle: rocketmq::model::message::AckMessageEntry::receipt_handle(&received[0]),
            invisible_duration: Some(prost_types::Duration {
                seconds: 12 * 3600 + 1,
                nanos: 0,
            }),
            message_id: received[0].message_id().to_owned(),
        }))
        .await
        .unwrap()
        .into_inner();
    let status = response.status.unwrap();
    assert_eq!(status.code, Code::IllegalInvisibleTime as i32);
    assert!(
        status.message.contains("invisible_duration"),
        "{}",
        status.message
    );

    // Acking twice is fine: the second ack changes nothing.
    consumer.ack(&received[0]).await.unwrap();
    let before = log.written_pos();
    consumer.ack(&received[0]).await.unwrap();
    assert_eq!(log.written_pos(), before, "a repeated ack writes nothing");
    broker.running.shutdown().await.unwrap();
}
