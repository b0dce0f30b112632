//! Load against a running broker over the RocketMQ v2 protocol.
//!
//! - `produce`: C requests in flight, each of B messages, until N messages are stored.
//!   `--client official` drives the official `rocketmq = 5.0.0` client instead (one message
//!   per send, as that client always does).
//! - `consume`: C receivers drain a backlog: receive up to B, ack them in one request. The
//!   time runs until the last message is consumed.
//! - `e2e`: a producer at a fixed rate and long-polling receivers; the latency is from the
//!   send call to the receive that returned the message.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use ferrumq_protocol::admin::admin_service_client::AdminServiceClient;
use ferrumq_protocol::admin::{
    CreateGroupRequest, CreateTopicRequest, Group, StartPosition, Topic,
};
use ferrumq_protocol::v2::messaging_service_client::MessagingServiceClient;
use ferrumq_protocol::v2::{
    AckMessageEntry, AckMessageRequest, Code, FilterExpression, FilterType, Message, MessageQueue,
    MessageType, PullMessageRequest, QueryRouteRequest, ReceiveMessageRequest, Resource,
    SendMessageRequest, SystemProperties, pull_message_response, receive_message_response,
};
use hdrhistogram::Histogram;
use tokio::sync::Mutex;
use tonic::transport::Channel;

use crate::report::{Format, Report};

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(crate) enum ClientKind {
    /// ferrumq's generated v2 client: batching, many requests in flight on one connection.
    Raw,
    /// The official Apache RocketMQ Rust client 5.0.0.
    Official,
    /// ferrumq-client: C tasks each call `send_batch` with B messages, or with `--batch 1`
    /// `send`, whose concurrent calls share `--requests` requests in flight; consume
    /// receives B and acks them with one `ack_all`.
    Native,
}

#[derive(Args, Debug, Clone)]
pub(crate) struct NetArgs {
    /// The broker's gRPC address.
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub(crate) endpoint: String,
    #[arg(long, default_value = "bench")]
    pub(crate) topic: String,
    #[arg(long, default_value = "bench-group")]
    pub(crate) group: String,
    /// Body size in bytes.
    #[arg(long, default_value_t = 1024)]
    pub(crate) size: usize,
    /// Messages in all.
    #[arg(long, default_value_t = 100_000)]
    pub(crate) count: u64,
    /// Requests in flight.
    #[arg(long, default_value_t = 64)]
    pub(crate) concurrency: usize,
    /// Messages per send request, or per receive.
    #[arg(long, default_value_t = 1)]
    pub(crate) batch: usize,
    #[arg(long, value_enum, default_value_t = ClientKind::Raw)]
    pub(crate) client: ClientKind,
    /// `--client native` only: the producer's requests in flight, which the C concurrent
    /// sends share.
    #[arg(long, default_value_t = 16)]
    pub(crate) requests: usize,
    /// consume only: read every queue by offset with PullMessage, as broadcast consumers
    /// do, B messages per pull and one pull in flight per queue: no leases and no acks.
    /// With `--client native`, through ferrumq-client's BroadcastConsumer.
    #[arg(long)]
    pub(crate) pull: bool,
    /// consume only (`--client raw`): N consumer groups at once, group `<group>-i` on topic
    /// `<topic>-i`, each taking `count / N` messages with `concurrency / N` receivers (at
    /// least one). Beside a run with one group, it shows whether groups wait on each other.
    #[arg(long, default_value_t = 1)]
    pub(crate) groups: usize,
    /// e2e only: messages per second the producer sends.
    #[arg(long, default_value_t = 2000)]
    pub(crate) rate: u64,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub(crate) format: Format,
}

pub(crate) fn resource(name: &str) -> Option<Resource> {
    Some(Resource {
        resource_namespace: String::new(),
        name: name.to_owned(),
    })
}

pub(crate) fn request<T>(body: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(body);
    request.metadata_mut().insert(
        "x-mq-client-id",
        tonic::metadata::MetadataValue::from_static("ferrumq-bench@0#0"),
    );
    request.metadata_mut().insert(
        "x-mq-language",
        tonic::metadata::MetadataValue::from_static("RUST"),
    );
    request
}

/// Message ids in the 34-hex-character shape the official clients use.
pub(crate) fn message_id(counter: u64) -> String {
    format!("01{:08X}{:024X}", std::process::id(), counter)
}

fn message(topic: &str, body: bytes::Bytes, counter: u64) -> Message {
    Message {
        topic: resource(topic),
        user_properties: Default::default(),
        system_properties: Some(SystemProperties {
            message_id: message_id(counter),
            message_type: MessageType::Normal as i32,
            ..SystemProperties::default()
        }),
        body,
    }
}

pub(crate) async fn connect(endpoint: &str) -> anyhow::Result<MessagingServiceClient<Channel>> {
    let channel = Channel::from_shared(format!("http://{endpoint}"))?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to {endpoint}"))?;
    Ok(MessagingServiceClient::new(channel)
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20))
}

pub(crate) fn latency_fields(report: &mut Report, histogram: &Histogram<u64>) {
    report
        .add("latency_p50_us", histogram.value_at_quantile(0.50))
        .add("latency_p99_us", histogram.value_at_quantile(0.99))
        .add("latency_p999_us", histogram.value_at_quantile(0.999))
        .add("latency_max_us", histogram.max());
}

pub(crate) fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

pub(crate) fn produce(args: &NetArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let (elapsed, histogram) = match args.client {
            ClientKind::Raw => produce_raw(args).await?,
            ClientKind::Official => produce_official(args).await?,
            ClientKind::Native => produce_native(args).await?,
        };
        let mut report = Report::default();
        let seconds = elapsed.as_secs_f64();
        report
            .add("mode", "produce")
            .add("client", format!("{:?}", args.client).to_lowercase())
            .add("messages", args.count)
            .add("batch", args.batch as u64)
            .add("concurrency", args.concurrency as u64)
            .add("seconds", seconds)
            .add("messages_per_sec", args.count as f64 / seconds)
            .add(
                "mb_per_sec",
                (args.count as f64 * args.size as f64) / seconds / 1e6,
            );
        latency_fields(&mut report, &histogram);
        report.print(args.format);
        Ok(())
    })
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Runs `concurrency` copies of `task` at once; each returns the latencies it saw.
pub(crate) async fn run_tasks<F, Fut>(
    concurrency: usize,
    task: F,
) -> anyhow::Result<(Duration, Histogram<u64>)>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Histogram<u64>>> + Send + 'static,
{
    let start = Instant::now();
    let handles: Vec<_> = (0..concurrency).map(|_| tokio::spawn(task())).collect();
    let mut histogram = new_histogram()?;
    for handle in handles {
        histogram.add(&handle.await??)?;
    }
    Ok((start.elapsed(), histogram))
}

/// The next `batch` message numbers below `count` that no other task has taken, or `None`
/// once every number is taken.
pub(crate) fn claim_batch(next: &AtomicU64, batch: usize, count: u64) -> Option<Range<u64>> {
    let first = next.fetch_add(batch as u64, Ordering::Relaxed);
    (first < count).then(|| first..(first + batch as u64).min(count))
}

pub(crate) fn micros_since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)
}

async fn produce_raw(args: &NetArgs) -> anyhow::Result<(Duration, Histogram<u64>)> {
    let client = connect(&args.endpoint).await?;
    let next = Arc::new(AtomicU64::new(0));
    // One buffer shared by every message: the client copies nothing per send.
    let body = bytes::Bytes::from(vec![b'x'; args.size]);
    run_tasks(args.concurrency, || {
        let (mut client, next, body, args) =
            (client.clone(), next.clone(), body.clone(), args.clone());
        async move {
            let mut local = new_histogram()?;
            while let Some(numbers) = claim_batch(&next, args.batch, args.count) {
                let messages = numbers
                    .map(|i| message(&args.topic, body.clone(), i))
                    .collect();
                let sent = Instant::now();
                let response = client
                    .send_message(request(SendMessageRequest { messages }))
                    .await?
                    .into_inner();
                let status = response.status.unwrap_or_default();
                if status.code != Code::Ok as i32 {
                    bail!("send failed: {} {}", status.code, status.message);
                }
                local.record(micros_since(sent))?;
            }
            Ok(local)
        }
    })
    .await
}

async fn produce_official(args: &NetArgs) -> anyhow::Result<(Duration, Histogram<u64>)> {
    use rocketmq::conf::{ClientOption, ProducerOption};
    use rocketmq::model::message::MessageBuilder;
    let mut option = ProducerOption::default();
    option.set_topics(vec![args.topic.clone()]);
    let mut client_option = ClientOption::default();
    client_option.set_access_url(args.endpoint.clone());
    client_option.set_enable_tls(false);
    let mut producer =
        rocketmq::Producer::new(option, client_option).map_err(|e| anyhow::anyhow!("{e}"))?;
    producer.start().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let producer = Arc::new(producer);
    let next = Arc::new(AtomicU64::new(0));
    run_tasks(args.concurrency, || {
        let (producer, next, args) = (producer.clone(), next.clone(), args.clone());
        async move {
            let mut local = new_histogram()?;
            while next.fetch_add(1, Ordering::Relaxed) < args.count {
                let message = MessageBuilder::builder()
                    .set_topic(args.topic.clone())
                    .set_body(vec![b'x'; args.size])
                    .build()
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                let sent = Instant::now();
                producer
                    .send(message)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                local.record(micros_since(sent))?;
            }
            Ok(local)
        }
    })
    .await
}

async fn produce_native(args: &NetArgs) -> anyhow::Result<(Duration, Histogram<u64>)> {
    use ferrumq_client::{ClientConfig, Message, Producer};
    let producer = Producer::builder(ClientConfig::new(args.endpoint.clone()))
        .topics([args.topic.clone()])
        .max_in_flight_requests(args.requests)
        .build()
        .await?;
    let producer = Arc::new(producer);
    let next = Arc::new(AtomicU64::new(0));
    let body = bytes::Bytes::from(vec![b'x'; args.size]);
    run_tasks(args.concurrency, || {
        let (producer, next, body, args) =
            (producer.clone(), next.clone(), body.clone(), args.clone());
        async move {
            let mut local = new_histogram()?;
            while let Some(numbers) = claim_batch(&next, args.batch, args.count) {
                let message = || Message::new(args.topic.as_str(), body.clone());
                let sent = Instant::now();
                if numbers.end - numbers.start == 1 {
                    producer.send(message()).await?;
                } else {
                    producer
                        .send_batch(numbers.map(|_| message()).collect())
                        .await?;
                }
                local.record(micros_since(sent))?;
            }
            Ok(local)
        }
    })
    .await
}

/// Creates the topic (if new) and a group that reads it from the start.
async fn prepare(endpoint: &str, topic: &str, group: &str) -> anyhow::Result<()> {
    let mut admin = AdminServiceClient::connect(format!("http://{endpoint}")).await?;
    admin
        .create_topic(CreateTopicRequest {
            topic: Some(Topic {
                name: topic.to_owned(),
                queue_count: 0,
                accept_message_types: Vec::new(),
            }),
            update_existing: false,
        })
        .await?;
    admin
        .create_group(CreateGroupRequest {
            group: Some(Group {
                name: group.to_owned(),
                max_delivery_attempts: 0,
                start_position: StartPosition::Earliest as i32,
                retry_backoff_ms: Vec::new(),
                fifo: false,
            }),
            update_existing: true,
        })
        .await?;
    Ok(())
}

/// One receive of up to `batch` messages; returns them.
pub(crate) async fn receive(
    client: &mut MessagingServiceClient<Channel>,
    args: &NetArgs,
    long_poll: Duration,
) -> anyhow::Result<Vec<Message>> {
    let mut call = request(ReceiveMessageRequest {
        group: resource(&args.group),
        message_queue: Some(MessageQueue {
            topic: resource(&args.topic),
            id: -1,
            ..MessageQueue::default()
        }),
        filter_expression: Some(FilterExpression {
            r#type: FilterType::Tag as i32,
            expression: "*".into(),
        }),
        batch_size: i32::try_from(args.batch).unwrap_or(32),
        invisible_duration: Some(prost_types::Duration {
            seconds: 30,
            nanos: 0,
        }),
        auto_renew: false,
        long_polling_timeout: Some(prost_types::Duration {
            seconds: i64::try_from(long_poll.as_secs()).unwrap_or(1),
            nanos: 0,
        }),
    });
    call.set_timeout(long_poll + Duration::from_secs(2));
    let mut stream = client.receive_message(call).await?.into_inner();
    let mut messages = Vec::new();
    while let Some(frame) = stream.message().await? {
        match frame.content {
            Some(receive_message_response::Content::Message(m)) => messages.push(m),
            Some(receive_message_response::Content::Status(s))
                if s.code != Code::Ok as i32 && s.code != Code::MessageNotFound as i32 =>
            {
                bail!("receive failed: {} {}", s.code, s.message);
            }
            _ => {}
        }
    }
    Ok(messages)
}

pub(crate) async fn ack(
    client: &mut MessagingServiceClient<Channel>,
    args: &NetArgs,
    messages: &[Message],
) -> anyhow::Result<()> {
    let entries = messages
        .iter()
        .filter_map(|m| {
            let system = m.system_properties.as_ref()?;
            Some(AckMessageEntry {
                message_id: system.message_id.clone(),
                receipt_handle: system.receipt_handle.clone()?,
            })
        })
        .collect();
    let response = client
        .ack_message(request(AckMessageRequest {
            group: resource(&args.group),
            topic: resource(&args.topic),
            entries,
        }))
        .await?
        .into_inner();
    let status = response.status.unwrap_or_default();
    if status.code != Code::Ok as i32 {
        bail!("ack failed: {} {}", status.code, status.message);
    }
    Ok(())
}

pub(crate) fn consume(args: &NetArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let (n, seconds) = if args.groups > 1 {
            consume_groups(args).await?
        } else {
            prepare(&args.endpoint, &args.topic, &args.group).await?;
            let received = Arc::new(Drained::new());
            match args.client {
                ClientKind::Native if args.pull => consume_broadcast(args, &received).await?,
                ClientKind::Native => consume_native(args, &received).await?,
                ClientKind::Raw if args.pull => consume_pull(args, &received).await?,
                ClientKind::Raw => consume_raw(args, &received).await?,
                ClientKind::Official => {
                    bail!("consume drives --client raw or native; the official client is measured by produce")
                }
            }
            (received.count(), received.seconds())
        };
        let mut report = Report::default();
        report
            .add("mode", if args.pull { "consume-pull" } else { "consume" })
            .add("client", format!("{:?}", args.client).to_lowercase())
            .add("messages", n)
            .add("groups", args.groups as u64)
            .add("batch", args.batch as u64)
            .add("concurrency", args.concurrency as u64)
            .add("seconds", seconds)
            .add("messages_per_sec", n as f64 / seconds)
            .add("mb_per_sec", (n as f64 * args.size as f64) / seconds / 1e6);
        report.print(args.format);
        Ok(())
    })
}

/// Messages consumed so far, and when the last of them came. A run's time ends with its last
/// message: the receivers that then find the backlog empty wait out their long polling, and
/// that wait is not consuming.
struct Drained {
    start: Instant,
    messages: AtomicU64,
    last_us: AtomicU64,
}

impl Drained {
    fn new() -> Drained {
        Drained {
            start: Instant::now(),
            messages: AtomicU64::new(0),
            last_us: AtomicU64::new(0),
        }
    }

    fn add(&self, messages: usize) {
        self.messages.fetch_add(messages as u64, Ordering::Relaxed);
        let now = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.last_us.fetch_max(now, Ordering::Relaxed);
    }

    fn count(&self) -> u64 {
        self.messages.load(Ordering::Relaxed)
    }

    fn seconds(&self) -> f64 {
        self.last_us.load(Ordering::Relaxed) as f64 / 1e6
    }
}

/// `--groups N`: N groups on N topics at once, each drained by `consume_raw`; the messages
/// of all and the seconds until the last one.
async fn consume_groups(args: &NetArgs) -> anyhow::Result<(u64, f64)> {
    if args.client != ClientKind::Raw || args.pull {
        bail!("--groups drives --client raw without --pull");
    }
    let mut runs = Vec::new();
    for i in 0..args.groups {
        let pair = NetArgs {
            topic: format!("{}-{i}", args.topic),
            group: format!("{}-{i}", args.group),
            count: args.count / args.groups as u64,
            concurrency: (args.concurrency / args.groups).max(1),
            ..args.clone()
        };
        prepare(&pair.endpoint, &pair.topic, &pair.group).await?;
        runs.push(pair);
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for pair in runs {
        tasks.push(tokio::spawn(async move {
            let received = Arc::new(Drained::new());
            consume_raw(&pair, &received).await?;
            let end = received.start + Duration::from_secs_f64(received.seconds());
            Ok::<_, anyhow::Error>((received.count(), end))
        }));
    }
    let (mut n, mut last) = (0, start);
    for task in tasks {
        let (count, end) = task.await??;
        n += count;
        last = last.max(end);
    }
    Ok((n, (last - start).as_secs_f64()))
}

/// C receivers: receive up to B, ack them in one request, until a receive comes back empty.
async fn consume_raw(args: &NetArgs, received: &Arc<Drained>) -> anyhow::Result<()> {
    let client = connect(&args.endpoint).await?;
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (mut client, received, args) = (client.clone(), received.clone(), args.clone());
        tasks.push(tokio::spawn(async move {
            while received.count() < args.count {
                let messages = receive(&mut client, &args, Duration::from_secs(1)).await?;
                if messages.is_empty() {
                    break;
                }
                ack(&mut client, &args, &messages).await?;
                received.add(messages.len());
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// One task per queue of the topic pulls it from offset 0 until a pull comes back empty.
async fn consume_pull(args: &NetArgs, received: &Arc<Drained>) -> anyhow::Result<()> {
    let mut client = connect(&args.endpoint).await?;
    let route = client
        .query_route(request(QueryRouteRequest {
            topic: resource(&args.topic),
            endpoints: None,
        }))
        .await?
        .into_inner();
    let mut tasks = Vec::new();
    for queue in route.message_queues {
        let (mut client, received, args) = (client.clone(), received.clone(), args.clone());
        tasks.push(tokio::spawn(async move {
            let mut offset = 0;
            while received.count() < args.count {
                let pull = request(PullMessageRequest {
                    group: resource(&args.group),
                    message_queue: Some(queue.clone()),
                    offset,
                    batch_size: i32::try_from(args.batch).unwrap_or(32),
                    filter_expression: None,
                    long_polling_timeout: None,
                });
                let mut stream = client.pull_message(pull).await?.into_inner();
                let mut pulled = 0;
                while let Some(frame) = stream.message().await? {
                    match frame.content {
                        Some(pull_message_response::Content::Message(_)) => pulled += 1,
                        Some(pull_message_response::Content::NextOffset(next)) => offset = next,
                        Some(pull_message_response::Content::Status(s))
                            if s.code != Code::Ok as i32
                                && s.code != Code::MessageNotFound as i32 =>
                        {
                            bail!("pull failed: {} {}", s.code, s.message);
                        }
                        _ => {}
                    }
                }
                if pulled == 0 {
                    break;
                }
                received.add(pulled);
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// The same loop through ferrumq-client's SimpleConsumer.
async fn consume_native(args: &NetArgs, received: &Arc<Drained>) -> anyhow::Result<()> {
    use ferrumq_client::{ClientConfig, Filter, SimpleConsumer};
    let consumer = SimpleConsumer::builder(ClientConfig::new(args.endpoint.clone()), &args.group)
        .subscribe(args.topic.clone(), Filter::all())
        .long_polling(Duration::from_secs(1))
        .build()
        .await?;
    let consumer = Arc::new(consumer);
    let max = u32::try_from(args.batch).unwrap_or(32);
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (consumer, received, count) = (consumer.clone(), received.clone(), args.count);
        tasks.push(tokio::spawn(async move {
            while received.count() < count {
                let messages = consumer.receive(max, Duration::from_secs(30)).await?;
                if messages.is_empty() {
                    break;
                }
                consumer.ack_all(&messages).await?;
                received.add(messages.len());
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// Every queue read from its beginning through ferrumq-client's BroadcastConsumer, B
/// messages per pull, until `count` messages have come or the backlog ends.
async fn consume_broadcast(args: &NetArgs, received: &Arc<Drained>) -> anyhow::Result<()> {
    use ferrumq_client::{BroadcastConsumer, ClientConfig, ConsumeResult, Filter, StartFrom};
    let counter = received.clone();
    let consumer =
        BroadcastConsumer::builder(ClientConfig::new(args.endpoint.clone()), &args.group)
            .subscribe(args.topic.clone(), Filter::all())
            .start_from(StartFrom::Earliest)
            .long_polling(Duration::from_secs(1))
            .pull_batch(u32::try_from(args.batch).unwrap_or(u32::MAX))
            .listener(move |_| {
                counter.add(1);
                std::future::ready(ConsumeResult::Success)
            })
            .build()
            .await?;
    // Ends with the backlog too: nothing new for a few long polls.
    let (mut seen, mut since) = (0, Instant::now());
    while received.count() < args.count && since.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if received.count() > seen {
            (seen, since) = (received.count(), Instant::now());
        }
    }
    consumer.shutdown().await?;
    Ok(())
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

pub(crate) fn e2e(args: &NetArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        prepare(&args.endpoint, &args.topic, &args.group).await?;
        let client = connect(&args.endpoint).await?;
        // Drain what an earlier run left, so only this run's messages are timed.
        {
            let mut drain = client.clone();
            loop {
                let old = receive(&mut drain, args, Duration::from_millis(200)).await?;
                if old.is_empty() {
                    break;
                }
                ack(&mut drain, args, &old).await?;
            }
        }
        let histogram = Arc::new(Mutex::new(new_histogram()?));
        let received = Arc::new(AtomicU64::new(0));
        let mut receivers = Vec::new();
        for _ in 0..args.concurrency.max(1) {
            let (mut client, histogram, received, args) = (
                client.clone(),
                histogram.clone(),
                received.clone(),
                args.clone(),
            );
            receivers.push(tokio::spawn(async move {
                let mut local = new_histogram()?;
                while received.load(Ordering::Relaxed) < args.count {
                    let messages = receive(&mut client, &args, Duration::from_secs(2)).await?;
                    let now = now_us();
                    for m in &messages {
                        let sent = m
                            .body
                            .get(..8)
                            .and_then(|b| b.try_into().ok())
                            .map_or(now, u64::from_le_bytes);
                        local.record(now.saturating_sub(sent).max(1))?;
                    }
                    received.fetch_add(messages.len() as u64, Ordering::Relaxed);
                    if !messages.is_empty() {
                        ack(&mut client, &args, &messages).await?;
                    }
                }
                histogram.lock().await.add(&local)?;
                Ok::<(), anyhow::Error>(())
            }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let producer = client.clone();
        let interval = Duration::from_nanos(1_000_000_000 / args.rate.max(1));
        let start = Instant::now();
        for i in 0..args.count {
            tokio::time::sleep_until(
                (start + interval * u32::try_from(i).unwrap_or(u32::MAX)).into(),
            )
            .await;
            let mut body = vec![b'x'; args.size.max(8)];
            body[..8].copy_from_slice(&now_us().to_le_bytes());
            let mut client = producer.clone();
            let topic = args.topic.clone();
            tokio::spawn(async move {
                let _ = client
                    .send_message(request(SendMessageRequest {
                        messages: vec![message(&topic, body.into(), i)],
                    }))
                    .await;
            });
        }
        for receiver in receivers {
            tokio::time::timeout(Duration::from_secs(30), receiver)
                .await
                .context("receivers did not finish")???;
        }
        let histogram = histogram.lock().await.clone();
        let mut report = Report::default();
        report
            .add("mode", "e2e")
            .add("messages", histogram.len())
            .add("rate_per_sec", args.rate);
        latency_fields(&mut report, &histogram);
        report.print(args.format);
        Ok(())
    })
}
