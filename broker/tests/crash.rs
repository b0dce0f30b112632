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

use common::{consumer, create_group, ids, producer, receive_n, tag};
use rocketmq::model::message::MessageBuilder;

struct BrokerProcess {
    child: Child,
    grpc: SocketAddr,
}

fn spawn_broker(dir: &Path) -> BrokerProcess {
    let config = dir.join("broker.toml");
    std::fs::write(
        &config,
        "segment_size_bytes = 8388608\n[limits]\nmin_invisible_ms = 1000\n",
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
