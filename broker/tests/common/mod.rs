//! Helpers shared by the integration tests: an in-process broker on free ports, and
//! official RocketMQ 5.0.0 clients pointed at it.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ferrumq_broker::{BrokerConfig, RunningBroker};
use ferrumq_protocol::admin::admin_service_client::AdminServiceClient;
use ferrumq_protocol::admin::{CreateGroupRequest, Group, StartPosition};
use rocketmq::conf::{ClientOption, ProducerOption, SimpleConsumerOption};
use rocketmq::model::common::{FilterExpression, FilterType};
use rocketmq::model::message::MessageView;
use rocketmq::{Producer, SimpleConsumer};
use tempfile::TempDir;

pub struct TestBroker {
    pub running: RunningBroker,
    pub dir: TempDir,
}

impl TestBroker {
    pub fn addr(&self) -> SocketAddr {
        self.running.grpc_addr
    }
}

/// A broker on free ports in a temporary directory; `tweak` adjusts the config.
pub async fn start(tweak: impl FnOnce(&mut BrokerConfig)) -> TestBroker {
    let dir = tempfile::tempdir().unwrap();
    let mut config = BrokerConfig {
        data_dir: dir.path().to_owned(),
        grpc_listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        segment_size_bytes: 16 << 20,
        // Tests must not fail because the machine's disk happens to be nearly full.
        disk_watermark: 1.0,
        ..BrokerConfig::default()
    };
    config.limits.min_invisible_ms = 1000;
    tweak(&mut config);
    let running = ferrumq_broker::start(config).await.unwrap();
    TestBroker { running, dir }
}

pub fn client_option(addr: SocketAddr) -> ClientOption {
    let mut option = ClientOption::default();
    option.set_access_url(addr.to_string());
    option.set_enable_tls(false);
    option.set_timeout(Duration::from_secs(5));
    option.set_long_polling_timeout(Duration::from_secs(2));
    option
}

pub async fn producer(addr: SocketAddr, topic: &str) -> Producer {
    let mut option = ProducerOption::default();
    option.set_topics(vec![topic]);
    let mut producer = Producer::new(option, client_option(addr)).unwrap();
    producer.start().await.unwrap();
    producer
}

pub async fn consumer(addr: SocketAddr, group: &str, topic: &str) -> SimpleConsumer {
    let mut option = SimpleConsumerOption::default();
    option.set_consumer_group(group);
    option.set_topics(vec![topic]);
    let mut consumer = SimpleConsumer::new(option, client_option(addr)).unwrap();
    consumer.start().await.unwrap();
    consumer
}

pub async fn admin(addr: SocketAddr) -> AdminServiceClient<tonic::transport::Channel> {
    AdminServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

/// A group that reads from the start of each queue, so no test races its producer.
pub async fn create_group(addr: SocketAddr, name: &str, max_delivery_attempts: u32) {
    create_group_with(addr, name, max_delivery_attempts, false).await;
}

/// A topic that accepts `types` (`"FIFO"`, `"DELAY"`, `"TRANSACTION"`, `"NORMAL"`).
pub async fn create_topic(addr: SocketAddr, name: &str, queue_count: u32, types: &[&str]) {
    admin(addr)
        .await
        .create_topic(ferrumq_protocol::admin::CreateTopicRequest {
            topic: Some(ferrumq_protocol::admin::Topic {
                name: name.to_owned(),
                queue_count,
                accept_message_types: types
                    .iter()
                    .map(|t| ferrumq_protocol::v2::MessageType::from_str_name(t).unwrap() as i32)
                    .collect(),
            }),
            update_existing: true,
        })
        .await
        .unwrap();
}

/// [`create_group`], orderly (FIFO) if `fifo`.
pub async fn create_group_with(
    addr: SocketAddr,
    name: &str,
    max_delivery_attempts: u32,
    fifo: bool,
) {
    admin(addr)
        .await
        .create_group(CreateGroupRequest {
            group: Some(Group {
                name: name.to_owned(),
                max_delivery_attempts,
                start_position: StartPosition::Earliest as i32,
                retry_backoff_ms: Vec::new(),
                fifo,
            }),
            update_existing: true,
        })
        .await
        .unwrap();
}

/// A v2 resource name (topic or group) without a namespace.
pub fn resource(name: &str) -> Option<ferrumq_protocol::v2::Resource> {
    Some(ferrumq_protocol::v2::Resource {
        resource_namespace: String::new(),
        name: name.to_owned(),
    })
}

/// A raw v2 request carrying the client id header every call needs.
pub fn with_client_id<T>(body: T, client_id: &'static str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(body);
    request.metadata_mut().insert(
        "x-mq-client-id",
        tonic::metadata::MetadataValue::from_static(client_id),
    );
    request
}

pub fn tag(expression: &str) -> FilterExpression {
    FilterExpression::new(FilterType::Tag, expression)
}

/// Receives (and acks, if `ack`) until `expected` messages arrived or `timeout` passed.
pub async fn receive_n(
    consumer: &SimpleConsumer,
    topic: &str,
    filter: &FilterExpression,
    expected: usize,
    invisible: Duration,
    ack: bool,
    timeout: Duration,
) -> Vec<MessageView> {
    let deadline = Instant::now() + timeout;
    let mut all = Vec::new();
    while all.len() < expected && Instant::now() < deadline {
        let batch = consumer
            .receive_with(topic, filter, 32, invisible)
            .await
            .unwrap();
        for message in batch {
            if ack {
                consumer.ack(&message).await.unwrap();
            }
            all.push(message);
        }
    }
    all
}

pub fn ids(messages: &[MessageView]) -> HashSet<String> {
    messages.iter().map(|m| m.message_id().to_owned()).collect()
}

/// One HTTP/1.1 request on the broker's HTTP port (blocking; call from `spawn_blocking`).
/// Returns the status code and the body.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<u8>) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    // A server may refuse before reading the whole body; the reply is still readable.
    let _ = stream.write_all(body);
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete HTTP response");
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, response[split + 4..].to_vec())
}

/// [`http_request`] for a GET, with the body as text.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let (status, body) = http_request(addr, "GET", path, &[], b"");
    (status, String::from_utf8(body).unwrap())
}
