//! Load for the special message types.
//!
//! - `txn`: C producers, each sending a TRANSACTION message and committing it, in turn.
//!   Compare with `produce --batch 1` at the same flush mode.
//! - `delay`: N scheduled messages spread over the next `--spread-ms`, sent in batches,
//!   while receivers take them as they come due: lateness p50/p99/max, how many arrived
//!   early (must be zero), and the broker's resident memory while they wait.
//! - `fifo`: producers send per-message-group sequences over `--groups` groups of a FIFO
//!   topic; FIFO-group receivers check each group's order: throughput and violations.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use clap::Args;
use ferrumq_protocol::admin::admin_service_client::AdminServiceClient;
use ferrumq_protocol::admin::{
    CreateGroupRequest, CreateTopicRequest, Group, StartPosition, Topic,
};
use ferrumq_protocol::v2::{
    Code, EndTransactionRequest, Message, MessageType, SendMessageRequest, SystemProperties,
    TransactionResolution, TransactionSource,
};
use tokio::sync::Mutex;

use crate::network::{
    NetArgs, ack, claim_batch, connect, latency_fields, message_id, micros_since, new_histogram,
    receive, request, resource, run_tasks, runtime,
};
use crate::report::Report;

#[derive(Args, Debug, Clone)]
pub(crate) struct SpecialArgs {
    #[command(flatten)]
    net: NetArgs,
    /// delay: deliveries are spread evenly over this many ms from the start.
    #[arg(long, default_value_t = 60_000)]
    spread_ms: u64,
    /// fifo: message groups.
    #[arg(long, default_value_t = 1000)]
    groups: u64,
    /// delay: the broker's process id, to sample its resident memory.
    #[arg(long)]
    broker_pid: Option<u32>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn ms_of(t: &prost_types::Timestamp) -> i64 {
    t.seconds * 1000 + i64::from(t.nanos / 1_000_000)
}

fn typed(topic: &str, body: bytes::Bytes, counter: u64, kind: MessageType) -> Message {
    Message {
        topic: resource(topic),
        user_properties: HashMap::default(),
        system_properties: Some(SystemProperties {
            message_id: message_id(counter),
            message_type: kind as i32,
            ..SystemProperties::default()
        }),
        body,
    }
}

async fn prepare(args: &NetArgs, kind: MessageType, queues: u32, fifo: bool) -> anyhow::Result<()> {
    let mut admin = AdminServiceClient::connect(format!("http://{}", args.endpoint)).await?;
    admin
        .create_topic(CreateTopicRequest {
            topic: Some(Topic {
                name: args.topic.clone(),
                queue_count: queues,
                accept_message_types: vec![kind as i32],
            }),
            update_existing: true,
        })
        .await?;
    admin
        .create_group(CreateGroupRequest {
            group: Some(Group {
                name: args.group.clone(),
                max_delivery_attempts: 0,
                start_position: StartPosition::Earliest as i32,
                retry_backoff_ms: Vec::new(),
                fifo,
            }),
            update_existing: true,
        })
        .await?;
    Ok(())
}

async fn send(
    client: &mut ferrumq_protocol::v2::messaging_service_client::MessagingServiceClient<
        tonic::transport::Channel,
    >,
    messages: Vec<Message>,
) -> anyhow::Result<Vec<ferrumq_protocol::v2::SendResultEntry>> {
    let response = client
        .send_message(request(SendMessageRequest { messages }))
        .await?
        .into_inner();
    let status = response.status.unwrap_or_default();
    if status.code != Code::Ok as i32 {
        bail!("send failed: {} {}", status.code, status.message);
    }
    Ok(response.entries)
}

pub(crate) fn txn(args: &SpecialArgs) -> anyhow::Result<()> {
    let args = &args.net;
    runtime()?.block_on(async {
        prepare(args, MessageType::Transaction, 8, false).await?;
        let client = connect(&args.endpoint).await?;
        let next = Arc::new(AtomicU64::new(0));
        let body = bytes::Bytes::from(vec![b'x'; args.size]);
        let (elapsed, histogram) = run_tasks(args.concurrency, || {
            let (mut client, next, body, args) =
                (client.clone(), next.clone(), body.clone(), args.clone());
            async move {
                let mut local = new_histogram()?;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= args.count {
                        break;
                    }
                    let sent = Instant::now();
                    let message = typed(&args.topic, body.clone(), i, MessageType::Transaction);
                    let entry = send(&mut client, vec![message]).await?.remove(0);
                    let response = client
                        .end_transaction(request(EndTransactionRequest {
                            topic: resource(&args.topic),
                            message_id: entry.message_id,
                            transaction_id: entry.transaction_id,
                            resolution: TransactionResolution::Commit as i32,
                            source: TransactionSource::SourceClient as i32,
                            trace_context: String::new(),
                        }))
                        .await?
                        .into_inner();
                    let status = response.status.unwrap_or_default();
                    if status.code != Code::Ok as i32 {
                        bail!("commit failed: {} {}", status.code, status.message);
                    }
                    local.record(micros_since(sent))?;
                }
                Ok(local)
            }
        })
        .await?;
        let seconds = elapsed.as_secs_f64();
        let mut report = Report::default();
        report
            .add("mode", "txn")
            .add("transactions", args.count)
            .add("concurrency", args.concurrency as u64)
            .add("seconds", seconds)
            .add("transactions_per_sec", args.count as f64 / seconds);
        latency_fields(&mut report, &histogram);
        report.print(args.format);
        Ok(())
    })
}

/// The resident memory of process `pid` in bytes (Linux).
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

pub(crate) fn delay(special: &SpecialArgs) -> anyhow::Result<()> {
    let args = &special.net;
    runtime()?.block_on(async {
        prepare(args, MessageType::Delay, 8, false).await?;
        let client = connect(&args.endpoint).await?;
        let start_ms = now_ms() + 2_000;
        let spread = special.spread_ms.max(1);
        let count = args.count;
        let body = bytes::Bytes::from(vec![b'x'; args.size]);
        // Message i is due at start + i * spread / count: evenly over the window.
        let due = move |i: u64| start_ms + i64::try_from(i * spread / count).unwrap_or(0);
        let next = Arc::new(AtomicU64::new(0));
        let producers = run_tasks(args.concurrency.min(16), || {
            let (mut client, next, body, args) =
                (client.clone(), next.clone(), body.clone(), args.clone());
            async move {
                while let Some(numbers) = claim_batch(&next, args.batch, args.count) {
                    let messages = numbers
                        .map(|i| {
                            let mut m = typed(&args.topic, body.clone(), i, MessageType::Delay);
                            if let Some(system) = m.system_properties.as_mut() {
                                let at = due(i);
                                system.delivery_timestamp = Some(prost_types::Timestamp {
                                    seconds: at.div_euclid(1000),
                                    nanos: i32::try_from(at.rem_euclid(1000) * 1_000_000)
                                        .unwrap_or(0),
                                });
                            }
                            m
                        })
                        .collect();
                    send(&mut client, messages).await?;
                }
                new_histogram()
            }
        });
        let lateness = Arc::new(Mutex::new(new_histogram()?));
        let early = Arc::new(AtomicU64::new(0));
        let received = Arc::new(AtomicU64::new(0));
        let mut receivers = Vec::new();
        let deadline = Instant::now() + Duration::from_millis(spread + 60_000);
        for _ in 0..args.concurrency.clamp(1, 8) {
            let (mut client, lateness, early, received, args) = (
                client.clone(),
                lateness.clone(),
                early.clone(),
                received.clone(),
                args.clone(),
            );
            receivers.push(tokio::spawn(async move {
                let mut args = args;
                args.batch = 32;
                while received.load(Ordering::Relaxed) < args.count && Instant::now() < deadline {
                    let messages = receive(&mut client, &args, Duration::from_secs(2)).await?;
                    let now = now_ms();
                    {
                        let mut lateness = lateness.lock().await;
                        for m in &messages {
                            let Some(system) = m.system_properties.as_ref() else {
                                continue;
                            };
                            let at = system.delivery_timestamp.as_ref().map_or(0, ms_of);
                            let stored = system.store_timestamp.as_ref().map_or(0, ms_of);
                            if stored < at {
                                early.fetch_add(1, Ordering::Relaxed);
                            }
                            lateness.record(u64::try_from(now - at).unwrap_or(0).max(1) * 1000)?;
                        }
                    }
                    if !messages.is_empty() {
                        ack(&mut client, &args, &messages).await?;
                        received.fetch_add(messages.len() as u64, Ordering::Relaxed);
                    }
                }
                Ok::<(), anyhow::Error>(())
            }));
        }
        let (send_elapsed, _) = producers.await?;
        // Memory while the scheduled messages wait: sampled through the window.
        let mut peak_rss = 0;
        while received.load(Ordering::Relaxed) < count && Instant::now() < deadline {
            if let Some(rss) = special.broker_pid.and_then(rss_bytes) {
                peak_rss = peak_rss.max(rss);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        for receiver in receivers {
            receiver.await??;
        }
        let histogram = lateness.lock().await;
        let mut report = Report::default();
        report
            .add("mode", "delay")
            .add("scheduled", count)
            .add("spread_ms", spread)
            .add("send_seconds", send_elapsed.as_secs_f64())
            .add(
                "scheduled_per_sec",
                count as f64 / send_elapsed.as_secs_f64(),
            )
            .add("delivered", received.load(Ordering::Relaxed))
            .add("early", early.load(Ordering::Relaxed))
            .add("lateness_p50_ms", histogram.value_at_quantile(0.50) / 1000)
            .add("lateness_p99_ms", histogram.value_at_quantile(0.99) / 1000)
            .add("lateness_max_ms", histogram.max() / 1000);
        if special.broker_pid.is_some() {
            report.add("broker_peak_rss_mib", peak_rss / (1 << 20));
        }
        report.print(args.format);
        Ok(())
    })
}

pub(crate) fn fifo(special: &SpecialArgs) -> anyhow::Result<()> {
    let args = &special.net;
    let groups = special.groups.max(1);
    runtime()?.block_on(async {
        prepare(args, MessageType::Fifo, 8, true).await?;
        let client = connect(&args.endpoint).await?;
        let body = bytes::Bytes::from(vec![b'x'; args.size]);
        let producers = args.concurrency.clamp(1, 64) as u64;
        let per_producer = args.count / producers;
        let start = Instant::now();
        let mut tasks = Vec::new();
        // Producer p owns the groups g with g % producers == p and sends their sequences in
        // order, one request at a time: per-group send order is then well defined.
        for p in 0..producers {
            let (mut client, body, args) = (client.clone(), body.clone(), args.clone());
            tasks.push(tokio::spawn(async move {
                let owned: Vec<u64> = (0..groups).filter(|g| g % producers == p).collect();
                if owned.is_empty() {
                    return Ok::<(), anyhow::Error>(());
                }
                let mut sequence = vec![0u64; owned.len()];
                let mut sent = 0;
                while sent < per_producer {
                    let n = (per_producer - sent).min(args.batch as u64);
                    let messages = (0..n)
                        .map(|k| {
                            let slot =
                                usize::try_from((sent + k) % owned.len() as u64).unwrap_or(0);
                            let group = owned[slot];
                            let seq = sequence[slot];
                            sequence[slot] += 1;
                            let mut m = typed(
                                &args.topic,
                                body.clone(),
                                p << 40 | (sent + k),
                                MessageType::Fifo,
                            );
                            if let Some(system) = m.system_properties.as_mut() {
                                system.message_group = Some(format!("g{group}"));
                            }
                            m.user_properties.insert("seq".into(), seq.to_string());
                            m
                        })
                        .collect();
                    send(&mut client, messages).await?;
                    sent += n;
                }
                Ok(())
            }));
        }
        let total = per_producer * producers;
        let last_seen: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
        let violations = Arc::new(AtomicU64::new(0));
        let duplicates = Arc::new(AtomicU64::new(0));
        let received = Arc::new(AtomicU64::new(0));
        let mut consumers = Vec::new();
        for _ in 0..args.concurrency.clamp(1, 16) {
            let (mut client, last_seen, violations, duplicates, received, args) = (
                client.clone(),
                last_seen.clone(),
                violations.clone(),
                duplicates.clone(),
                received.clone(),
                args.clone(),
            );
            consumers.push(tokio::spawn(async move {
                let mut args = args;
                args.batch = 32;
                let mut idle = 0;
                while received.load(Ordering::Relaxed) < total && idle < 5 {
                    let messages = receive(&mut client, &args, Duration::from_secs(1)).await?;
                    if messages.is_empty() {
                        idle += 1;
                        continue;
                    }
                    idle = 0;
                    {
                        let mut last_seen = last_seen.lock().await;
                        for m in &messages {
                            let group = m
                                .system_properties
                                .as_ref()
                                .and_then(|s| s.message_group.clone())
                                .unwrap_or_default();
                            let seq: u64 = m
                                .user_properties
                                .get("seq")
                                .and_then(|s| s.parse().ok())
                                .unwrap_or(0);
                            let expected = last_seen.get(&group).map_or(0, |last| last + 1);
                            if seq < expected {
                                duplicates.fetch_add(1, Ordering::Relaxed);
                            } else {
                                if seq > expected {
                                    violations.fetch_add(1, Ordering::Relaxed);
                                }
                                last_seen.insert(group, seq);
                            }
                        }
                    }
                    ack(&mut client, &args, &messages).await?;
                    received.fetch_add(messages.len() as u64, Ordering::Relaxed);
                }
                Ok::<(), anyhow::Error>(())
            }));
        }
        for task in tasks {
            task.await??;
        }
        let send_seconds = start.elapsed().as_secs_f64();
        for consumer in consumers {
            consumer.await??;
        }
        let seconds = start.elapsed().as_secs_f64();
        let n = received.load(Ordering::Relaxed);
        let mut report = Report::default();
        report
            .add("mode", "fifo")
            .add("messages", total)
            .add("message_groups", groups)
            .add("produced_per_sec", total as f64 / send_seconds)
            .add("received", n)
            .add("consumed_per_sec", n as f64 / seconds)
            .add("order_violations", violations.load(Ordering::Relaxed))
            .add("redelivered", duplicates.load(Ordering::Relaxed));
        report.print(args.format);
        Ok(())
    })
}
