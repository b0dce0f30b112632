//! The native client against real brokers: every message type, the push consumer under load,
//! broadcast to two instances, failover between two brokers of a cluster, and errors.
#![cfg(test)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]
mod support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ferrumq_client::{
    BroadcastConsumer, ClientConfig, ConsumeResult, Filter, Message, Producer, PushConsumer,
    ReceivedMessage, SimpleConsumer, StartFrom, TransactionResolution,
};
use support::{AnyError, create_group, create_topic, start};

/// Receives (and acks) until `n` messages came or `within` passed.
async fn receive_n(consumer: &SimpleConsumer, n: usize, within: Duration) -> Vec<ReceivedMessage> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < n && Instant::now() < deadline {
        for message in consumer.receive(32, Duration::from_secs(10)).await.unwrap() {
            consumer.ack(&message).await.unwrap();
            got.push(message);
        }
    }
    got
}

fn text(message: &ReceivedMessage) -> String {
    String::from_utf8_lossy(&message.body).into_owned()
}

async fn wait_until(within: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while !done() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

async fn simple(access_point: &str, group: &str, topic: &str) -> SimpleConsumer {
    SimpleConsumer::builder(ClientConfig::new(access_point), group)
        .subscribe(topic, Filter::all())
        .long_polling(Duration::from_millis(500))
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_type_round_trips() -> Result<(), AnyError> {
    let broker = start(|c| {
        c.transactions.check_immunity_ms = 300;
        c.transactions.check_interval_ms = 400;
    })
    .await?;
    let ap = broker.access_point();
    for (topic, kind) in [
        ("plain", "NORMAL"),
        ("later", "DELAY"),
        ("ordered", "FIFO"),
        ("pay", "TRANSACTION"),
    ] {
        create_topic(&ap, topic, 4, &[kind]).await;
        create_group(&ap, &format!("g-{topic}"), 16, &[], topic == "ordered").await;
    }
    let checked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let seen = checked.clone();
    let producer = Producer::builder(ClientConfig::new(&ap))
        .topics(["plain", "later", "ordered", "pay"])
        .transaction_checker(move |message: ReceivedMessage| {
            seen.lock().unwrap().extend(message.keys.iter().cloned());
            async move {
                if message.keys.iter().any(|k| k == "check-commit") {
                    TransactionResolution::Commit
                } else {
                    TransactionResolution::Rollback
                }
            }
        })
        .build()
        .await?;

    // NORMAL: one with every field, then a batch.
    let one = producer
        .send(
            Message::new("plain", "hello")
                .with_tag("greeting")
                .with_key("k1")
                .with_property("Region", "eu"),
        )
        .await?;
    let batch = producer
        .send_batch(
            (0..3)
                .map(|i| Message::new("plain", format!("b{i}")))
                .collect(),
        )
        .await?;
    let consumer = simple(&ap, "g-plain", "plain").await;
    let got = receive_n(&consumer, 4, Duration::from_secs(10)).await;
    let ids: HashSet<_> = got.iter().map(|m| m.message_id.clone()).collect();
    let sent: HashSet<_> = batch
        .iter()
        .map(|r| r.message_id.clone())
        .chain([one.message_id.clone()])
        .collect();
    assert_eq!(ids, sent);
    let hello = got.iter().find(|m| m.message_id == one.message_id).unwrap();
    assert_eq!(
        (text(hello), hello.tag.as_deref(), hello.keys.clone()),
        ("hello".to_owned(), Some("greeting"), vec!["k1".to_owned()])
    );
    assert_eq!(
        hello.properties.get("Region").map(String::as_str),
        Some("eu")
    );
    assert_eq!(hello.delivery_attempt, 1);

    // DELAY: never before its time; a recalled one never.
    let due = SystemTime::now() + Duration::from_millis(1500);
    producer
        .send(Message::new("later", "due").deliver_at(due))
        .await?;
    let recalled = producer
        .send(Message::new("later", "recalled").deliver_after(Duration::from_millis(2500)))
        .await?;
    producer.recall(&recalled).await?;
    let consumer = simple(&ap, "g-later", "later").await;
    let got = receive_n(&consumer, 1, Duration::from_secs(5)).await;
    let arrived = SystemTime::now();
    assert_eq!(got.iter().map(text).collect::<Vec<_>>(), ["due"]);
    assert!(arrived >= due, "delivered before its time");
    assert!(got[0].delivery_time.is_some());
    // Past the recalled message's time: it never comes.
    assert!(
        receive_n(&consumer, 1, Duration::from_secs(2))
            .await
            .is_empty()
    );

    // FIFO: each group's messages in the order sent.
    for i in 0..5 {
        for group in ["c1", "c2"] {
            producer
                .send(Message::new("ordered", format!("{group}-{i}")).with_message_group(group))
                .await?;
        }
    }
    let consumer = simple(&ap, "g-ordered", "ordered").await;
    let got = receive_n(&consumer, 10, Duration::from_secs(10)).await;
    for group in ["c1", "c2"] {
        let order: Vec<String> = got
            .iter()
            .filter(|m| m.message_group.as_deref() == Some(group))
            .map(text)
            .collect();
        let expected: Vec<String> = (0..5).map(|i| format!("{group}-{i}")).collect();
        assert_eq!(order, expected);
    }

    // TRANSACTION: commit, rollback, and two left to the checker.
    producer
        .begin(Message::new("pay", "committed"))
        .await?
        .commit()
        .await?;
    producer
        .begin(Message::new("pay", "rolled back"))
        .await?
        .rollback()
        .await?;
    drop(
        producer
            .begin(Message::new("pay", "checked in").with_key("check-commit"))
            .await?,
    );
    drop(
        producer
            .begin(Message::new("pay", "checked out").with_key("check-rollback"))
            .await?,
    );
    let consumer = simple(&ap, "g-pay", "pay").await;
    let got = receive_n(&consumer, 2, Duration::from_secs(10)).await;
    let mut bodies: Vec<String> = got.iter().map(text).collect();
    bodies.sort();
    assert_eq!(bodies, ["checked in", "committed"]);
    // The rolled-back one was not just left unchecked: the checker saw both.
    let both = HashSet::from(["check-commit".to_owned(), "check-rollback".to_owned()]);
    assert!(wait_until(Duration::from_secs(10), || *checked.lock().unwrap() == both).await);
    assert!(
        receive_n(&consumer, 1, Duration::from_secs(2))
            .await
            .is_empty()
    );

    producer.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_consumer_under_load_renews_leases_retries_and_finishes_work_on_shutdown()
-> Result<(), AnyError> {
    let broker = start(|_| {}).await?;
    let ap = broker.access_point();
    create_topic(&ap, "load", 4, &["NORMAL"]).await;
    create_group(&ap, "workers", 16, &[1000], false).await;
    let producer = Arc::new(Producer::builder(ClientConfig::new(&ap)).build().await?);
    let mut senders = Vec::new();
    for task in 0..8 {
        let producer = producer.clone();
        senders.push(tokio::spawn(async move {
            for i in 0..250 {
                let body = match (task, i) {
                    (0, 0..5) => format!("slow-{i}"),
                    (1, 0..5) => format!("fail-once-{i}"),
                    _ => format!("m-{task}-{i}"),
                };
                producer.send(Message::new("load", body)).await.unwrap();
            }
        }));
    }
    for sender in senders {
        sender.await?;
    }

    let calls: Arc<Mutex<HashMap<String, Vec<u32>>>> = Arc::default();
    let (running, finished) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (log, started, done) = (calls.clone(), running.clone(), finished.clone());
    let consumer = PushConsumer::builder(ClientConfig::new(&ap), "workers")
        .subscribe("load", Filter::all())
        .concurrency(16)
        .invisible_duration(Duration::from_secs(3))
        .long_polling(Duration::from_millis(500))
        .listener(move |message: ReceivedMessage| {
            let (log, started, done) = (log.clone(), started.clone(), done.clone());
            async move {
                let body = text(&message);
                log.lock()
                    .unwrap()
                    .entry(body.clone())
                    .or_default()
                    .push(message.delivery_attempt);
                started.fetch_add(1, Ordering::SeqCst);
                let result = if body.starts_with("slow") {
                    // Far past the 3 s lease: only renewal keeps it from a second delivery.
                    tokio::time::sleep(Duration::from_secs(7)).await;
                    ConsumeResult::Success
                } else if body.starts_with("fail-once") && message.delivery_attempt == 1 {
                    ConsumeResult::Failure
                } else {
                    ConsumeResult::Success
                };
                done.fetch_add(1, Ordering::SeqCst);
                result
            }
        })
        .build()
        .await?;
    assert!(!consumer.is_ordered());
    let all_done = wait_until(Duration::from_secs(60), || {
        let calls = calls.lock().unwrap();
        calls.len() == 2000
            && calls.iter().all(|(body, attempts)| {
                attempts.len() >= if body.starts_with("fail-once") { 2 } else { 1 }
            })
    })
    .await;
    assert!(all_done, "not every message was processed");
    // Longer than a lease: one that lapsed would show up as a second delivery.
    tokio::time::sleep(Duration::from_secs(4)).await;
    for (body, attempts) in calls.lock().unwrap().iter() {
        if body.starts_with("fail-once") {
            assert_eq!(attempts, &[1, 2], "{body}");
        } else {
            assert_eq!(attempts, &[1], "{body} was delivered more than once");
        }
    }

    // Shutdown waits for the work in hand and acks it.
    let started_before = running.load(Ordering::SeqCst);
    for i in 0..4 {
        producer
            .send(Message::new("load", format!("slow-late-{i}")))
            .await?;
    }
    assert!(
        wait_until(Duration::from_secs(10), || running.load(Ordering::SeqCst)
            == started_before + 4)
        .await
    );
    consumer.shutdown().await;
    // 2,000 messages, the 5 retries, and the 4 just sent.
    assert_eq!(finished.load(Ordering::SeqCst), 2000 + 5 + 4);
    let after = simple(&ap, "workers", "load").await;
    assert!(
        receive_n(&after, 1, Duration::from_secs(5))
            .await
            .is_empty()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_push_consumer_keeps_each_group_in_order_through_a_retry() -> Result<(), AnyError> {
    let broker = start(|_| {}).await?;
    let ap = broker.access_point();
    create_topic(&ap, "steps", 2, &["FIFO"]).await;
    create_group(&ap, "fifo-workers", 16, &[1000], true).await;
    let producer = Producer::builder(ClientConfig::new(&ap)).build().await?;
    for i in 0..10 {
        for group in ["a", "b", "c"] {
            producer
                .send(Message::new("steps", format!("{i}")).with_message_group(group))
                .await?;
        }
    }
    let order: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
    let log = order.clone();
    let consumer = PushConsumer::builder(ClientConfig::new(&ap), "fifo-workers")
        .subscribe("steps", Filter::all())
        .concurrency(8)
        .long_polling(Duration::from_millis(500))
        .listener(move |message: ReceivedMessage| {
            let log = log.clone();
            async move {
                let group = message.message_group.clone().unwrap_or_default();
                let body = text(&message);
                log.lock()
                    .unwrap()
                    .entry(group.clone())
                    .or_default()
                    .push(body.clone());
                if group == "a" && body == "3" && message.delivery_attempt == 1 {
                    ConsumeResult::Failure
                } else {
                    ConsumeResult::Success
                }
            }
        })
        .build()
        .await?;
    assert!(
        consumer.is_ordered(),
        "a FIFO group makes the consumer ordered"
    );
    assert!(
        wait_until(Duration::from_secs(20), || {
            order.lock().unwrap().values().map(Vec::len).sum::<usize>() == 31
        })
        .await
    );
    consumer.shutdown().await;
    let order = order.lock().unwrap();
    let expected: Vec<String> = (0..10).map(|i| i.to_string()).collect();
    let mut with_retry = expected.clone();
    with_retry.insert(3, "3".into());
    assert_eq!(order["a"], with_retry);
    assert_eq!(order["b"], expected);
    assert_eq!(order["c"], expected);
    Ok(())
}

fn broadcast_instance(
    ap: &str,
    offsets: std::path::PathBuf,
    seen: Arc<Mutex<Vec<String>>>,
) -> ferrumq_client::BroadcastConsumerBuilder {
    BroadcastConsumer::builder(ClientConfig::new(ap), "cache")
        .subscribe("news", Filter::all())
        .offset_file(offsets)
        .start_from(StartFrom::Earliest)
        .long_polling(Duration::from_millis(300))
        .pull_batch(7)
        .listener(move |message: ReceivedMessage| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(message.message_id);
                ConsumeResult::Success
            }
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_gives_every_instance_every_message_and_resumes_from_its_offsets()
-> Result<(), AnyError> {
    let broker = start(|_| {}).await?;
    let ap = broker.access_point();
    create_topic(&ap, "news", 2, &["NORMAL"]).await;
    let producer = Producer::builder(ClientConfig::new(&ap)).build().await?;
    let send = |range: std::ops::Range<u32>| {
        let producer = &producer;
        async move {
            let mut ids = Vec::new();
            for i in range {
                ids.push(
                    producer
                        .send(Message::new("news", format!("n{i}")))
                        .await
                        .unwrap()
                        .message_id,
                );
            }
            ids
        }
    };
    let first = send(0..100).await;
    let dir = tempfile::tempdir()?;
    let (seen_a, seen_b) = (
        Arc::<Mutex<Vec<String>>>::default(),
        Arc::<Mutex<Vec<String>>>::default(),
    );
    let a = broadcast_instance(&ap, dir.path().join("a"), seen_a.clone())
        .build()
        .await?;
    let b = broadcast_instance(&ap, dir.path().join("b"), seen_b.clone())
        .build()
        .await?;
    let has = |seen: &Arc<Mutex<Vec<String>>>, n: usize| {
        let seen = seen.clone();
        move || seen.lock().unwrap().len() >= n
    };
    assert!(wait_until(Duration::from_secs(10), has(&seen_a, 100)).await);
    assert!(wait_until(Duration::from_secs(10), has(&seen_b, 100)).await);
    for seen in [&seen_a, &seen_b] {
        let got: HashSet<String> = seen.lock().unwrap().iter().cloned().collect();
        assert_eq!(got, first.iter().cloned().collect::<HashSet<_>>());
    }

    // B stops; A goes on; B, restarted from its offset file, gets exactly what it missed.
    b.shutdown().await?;
    let second = send(100..150).await;
    assert!(wait_until(Duration::from_secs(10), has(&seen_a, 150)).await);
    let seen_again = Arc::<Mutex<Vec<String>>>::default();
    let b = broadcast_instance(&ap, dir.path().join("b"), seen_again.clone())
        .build()
        .await?;
    assert!(wait_until(Duration::from_secs(10), has(&seen_again, 50)).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut got = seen_again.lock().unwrap().clone();
    got.sort();
    let mut expected = second.clone();
    expected.sort();
    assert_eq!(got, expected);
    assert_eq!(seen_a.lock().unwrap().len(), 150);
    a.shutdown().await?;
    b.shutdown().await?;
    Ok(())
}

async fn start_nameserver() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(ferrumq_nameserver::NameServer::serve(
        listener,
        Duration::from_millis(1000),
        Duration::from_millis(200),
        std::future::pending(),
    ));
    addr
}

/// A broker config tweak: named `name`, registered with the nameserver at `ns`.
fn joined(name: &'static str, ns: String) -> impl FnOnce(&mut ferrumq_broker::BrokerConfig) {
    move |c: &mut ferrumq_broker::BrokerConfig| {
        c.nameservers = vec![ns];
        c.broker_name = name.into();
        c.heartbeat_interval_ms = 200;
        c.broker_expiry_ms = 1000;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_fail_over_to_the_second_broker_and_come_back_when_the_first_returns()
-> Result<(), AnyError> {
    let nameserver = start_nameserver().await.to_string();
    let a = start(joined("broker-a", nameserver.clone())).await?;
    let b = start(joined("broker-b", nameserver.clone())).await?;
    let (a_addr, b_addr) = (a.access_point(), b.access_point());
    for ap in [&a_addr, &b_addr] {
        create_topic(ap, "pay", 2, &["NORMAL"]).await;
        create_group(ap, "settle", 16, &[], false).await;
    }
    let config = ClientConfig::new(&nameserver)
        .route_refresh_interval(Duration::from_millis(300))
        .request_timeout(Duration::from_secs(2));
    // Both brokers register with the nameserver within a heartbeat or two.
    let producer = Producer::builder(config.clone()).build().await?;
    let mut endpoints = HashSet::new();
    let mut sent = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while endpoints.len() < 2 && Instant::now() < deadline {
        let receipt = producer.send(Message::new("pay", "before")).await?;
        endpoints.insert(receipt.endpoint);
        sent.insert(receipt.message_id);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(endpoints, HashSet::from([a_addr.clone(), b_addr.clone()]));

    // A goes away: every send still succeeds, at B.
    let support::TestBroker { running, dir } = a;
    running.shutdown().await?;
    for i in 0..30 {
        let receipt = producer
            .send(Message::new("pay", format!("during-{i}")))
            .await?;
        assert_eq!(receipt.endpoint, b_addr);
        sent.insert(receipt.message_id);
    }

    // A comes back on its address with its data: sends reach it again, and a consumer gets
    // every message from both.
    let mut config_a = support::config(&dir);
    joined("broker-a", nameserver.clone())(&mut config_a);
    config_a.grpc_listen = a_addr.parse()?;
    let _a = ferrumq_broker::start(config_a).await?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut back = false;
    while !back && Instant::now() < deadline {
        let receipt = producer.send(Message::new("pay", "after")).await?;
        back = receipt.endpoint == a_addr;
        sent.insert(receipt.message_id);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(back, "sends never reached the restarted broker");
    let consumer = SimpleConsumer::builder(config, "settle")
        .subscribe("pay", Filter::all())
        .long_polling(Duration::from_millis(300))
        .build()
        .await?;
    let got: HashSet<String> = receive_n(&consumer, sent.len(), Duration::from_secs(20))
        .await
        .into_iter()
        .map(|m| m.message_id)
        .collect();
    assert_eq!(got, sent);
    drop(b);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_and_broadcast_consumers_follow_a_broker_that_joins_leaves_and_returns()
-> Result<(), AnyError> {
    let nameserver = start_nameserver().await.to_string();
    let a = start(joined("broker-a", nameserver.clone())).await?;
    create_topic(&a.access_point(), "grow", 2, &["NORMAL"]).await;
    create_group(&a.access_point(), "growers", 16, &[], false).await;
    let config = ClientConfig::new(&nameserver)
        .route_refresh_interval(Duration::from_millis(300))
        .request_timeout(Duration::from_secs(2));
    let collect = |seen: &Arc<Mutex<HashSet<String>>>| {
        let seen = seen.clone();
        move |message: ReceivedMessage| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().insert(message.message_id);
                ConsumeResult::Success
            }
        }
    };
    let (pushed, broadcast) = (Arc::default(), Arc::default());
    // The consumers start once A has registered, while B does not exist yet.
    let deadline = Instant::now() + Duration::from_secs(10);
    let push = loop {
        let built = PushConsumer::builder(config.clone(), "growers")
            .subscribe("grow", Filter::all())
            .long_polling(Duration::from_millis(300))
            .listener(collect(&pushed))
            .build()
            .await;
        match built {
            Ok(push) => break push,
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let broadcaster = BroadcastConsumer::builder(config.clone(), "mirror")
        .subscribe("grow", Filter::all())
        .long_polling(Duration::from_millis(300))
        .listener(collect(&broadcast))
        .build()
        .await?;

    // B joins the cluster with the same topic; sends reach both brokers.
    let b = start(joined("broker-b", nameserver.clone())).await?;
    create_topic(&b.access_point(), "grow", 2, &["NORMAL"]).await;
    create_group(&b.access_point(), "growers", 16, &[], false).await;
    let b_addr = b.access_point();
    let producer = Producer::builder(config.clone()).build().await?;
    let mut sent = HashSet::new();
    let send_until_ten_at_b = async |sent: &mut HashSet<String>| -> Result<(), AnyError> {
        let mut at_b = 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        while at_b < 10 && Instant::now() < deadline {
            let receipt = producer.send(Message::new("grow", "hello")).await?;
            at_b += usize::from(receipt.endpoint == b_addr);
            sent.insert(receipt.message_id);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(at_b, 10, "sends never reached broker B");
        Ok(())
    };
    let both_got_all = async |sent: &HashSet<String>| {
        let all = |seen: &Arc<Mutex<HashSet<String>>>| seen.lock().unwrap().is_superset(sent);
        let ok = wait_until(Duration::from_secs(15), || all(&pushed) && all(&broadcast)).await;
        let counts = (
            pushed.lock().unwrap().len(),
            broadcast.lock().unwrap().len(),
        );
        assert!(
            ok,
            "of {} sent: push {}, broadcast {}",
            sent.len(),
            counts.0,
            counts.1
        );
    };
    send_until_ten_at_b(&mut sent).await?;
    both_got_all(&sent).await;

    // B leaves (its registration expires), then comes back on its address with its data.
    let support::TestBroker { running, dir } = b;
    running.shutdown().await?;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let mut config_b = support::config(&dir);
    joined("broker-b", nameserver.clone())(&mut config_b);
    config_b.grpc_listen = b_addr.parse()?;
    let _b = ferrumq_broker::start(config_b).await?;
    send_until_ten_at_b(&mut sent).await?;
    both_got_all(&sent).await;

    push.shutdown().await;
    broadcaster.shutdown().await?;
    producer.shutdown().await;
    drop(a);
    Ok(())
}

/// A TCP proxy from `listener` to `target` whose replies are held back while `hold` is true,
/// as a stalled network would: requests reach the broker, their answers come late.
fn holding_proxy(
    listener: tokio::net::TcpListener,
    target: String,
    hold: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let broker = tokio::net::TcpStream::connect(&target).await.unwrap();
            let (mut from_client, mut to_client) = client.into_split();
            let (mut from_broker, mut to_broker) = broker.into_split();
            tokio::spawn(async move { tokio::io::copy(&mut from_client, &mut to_broker).await });
            let mut hold = hold.clone();
            tokio::spawn(async move {
                let mut buf = vec![0; 64 << 10];
                while let Ok(n @ 1..) = from_broker.read(&mut buf).await {
                    let _ = hold.wait_for(|held| !held).await;
                    if to_client.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_retried_after_a_lost_reply_keeps_its_message_id_and_is_stored_once()
-> Result<(), AnyError> {
    // Clients reach the broker through the proxy: it is the endpoint the broker advertises.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let proxy = listener.local_addr()?.to_string();
    let advertised = proxy.clone();
    let broker = start(move |c| c.advertised_endpoint = Some(advertised)).await?;
    create_topic(&broker.access_point(), "ledger", 1, &["NORMAL"]).await;
    create_group(&broker.access_point(), "auditors", 16, &[], false).await;
    let (hold, held) = tokio::sync::watch::channel(false);
    holding_proxy(listener, broker.access_point(), held);
    let producer =
        Producer::builder(ClientConfig::new(&proxy).request_timeout(Duration::from_millis(400)))
            .topics(["ledger"])
            .max_attempts(6)
            .build()
            .await?;
    producer.send(Message::new("ledger", "warm-up")).await?;

    // The broker stores each attempt, but the first replies come after the client gave up.
    hold.send_replace(true);
    let send = tokio::spawn(async move {
        let receipt = producer.send(Message::new("ledger", "transfer")).await;
        (producer, receipt)
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    hold.send_replace(false);
    let (producer, receipt) = send.await?;
    let receipt = receipt?;

    let consumer = simple(&broker.access_point(), "auditors", "ledger").await;
    let copies: Vec<String> = receive_n(&consumer, 5, Duration::from_secs(3))
        .await
        .into_iter()
        .filter(|m| text(m) == "transfer")
        .map(|m| m.message_id)
        .collect();
    // The resends kept the id, so the broker recognised them and stored the message once.
    assert_eq!(copies, std::slice::from_ref(&receipt.message_id));
    let repeats = metric(broker.running.http_addr, "ferrumq_send_repeats_total");
    assert!(
        repeats >= 1.0,
        "expected a resend, the broker saw {repeats}"
    );
    producer.shutdown().await;
    Ok(())
}

/// A counter of the broker's `/metrics`.
fn metric(http: std::net::SocketAddr, name: &str) -> f64 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(http).unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    reply
        .lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_lookup_moves_past_an_access_point_that_cannot_answer() -> Result<(), AnyError> {
    // A broker of a cluster whose nameserver is gone answers route lookups with an error.
    let lonely = start(|c| {
        c.nameservers = vec!["127.0.0.1:1".into()];
        c.broker_name = "lonely".into();
    })
    .await?;
    let good = start(|_| {}).await?;
    create_topic(&good.access_point(), "routed", 2, &["NORMAL"]).await;
    // Alone, the lonely broker leaves a producer without a route.
    let alone = Producer::builder(ClientConfig::new(lonely.access_point()))
        .build()
        .await?;
    let err = alone.send(Message::new("routed", "x")).await.unwrap_err();
    assert!(err.to_string().contains("nameserver"), "{err}");
    alone.shutdown().await;
    // With the access points in either order, some of these producers look the route up
    // at the lonely broker first.
    for n in 0..4 {
        let (first, second) = if n % 2 == 0 {
            (&lonely, &good)
        } else {
            (&good, &lonely)
        };
        let config = ClientConfig::new(first.access_point())
            .with_access_point(second.access_point())
            .request_timeout(Duration::from_secs(5));
        // `topics` looks the route up once, at build: that lookup must find it.
        let producer = Producer::builder(config).topics(["routed"]).build().await?;
        let receipt = producer
            .send(Message::new("routed", format!("m{n}")))
            .await?;
        assert_eq!(receipt.endpoint, good.access_point());
        producer.shutdown().await;
    }
    lonely.running.shutdown().await?;
    good.running.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_producer_answers_the_check_backs_of_its_predecessor() -> Result<(), AnyError> {
    let broker = start(|c| {
        c.transactions.check_immunity_ms = 200;
        c.transactions.check_interval_ms = 300;
        c.transactions.max_checks = 2;
    })
    .await?;
    let ap = broker.access_point();
    create_topic(&ap, "payouts", 2, &["TRANSACTION"]).await;
    create_group(&ap, "g-payouts", 16, &[], false).await;
    let checker =
        |answer: TransactionResolution| move |_message: ReceivedMessage| async move { answer };
    // The first process begins a transaction and dies before it decides.
    let crashed = Producer::builder(ClientConfig::new(&ap))
        .transaction_checker(checker(TransactionResolution::Unknown))
        .build()
        .await?;
    let open = crashed.begin(Message::new("payouts", "p-1")).await?;
    let id = open.message_id().to_owned();
    drop(open);
    drop(crashed);
    // Several check intervals with nobody to ask: not counted, so not discarded.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    // Its successor, a new client id, declares the topic and commits what it is asked.
    let successor = Producer::builder(ClientConfig::new(&ap))
        .topics(["payouts"])
        .transaction_checker(checker(TransactionResolution::Commit))
        .build()
        .await?;
    let consumer = simple(&ap, "g-payouts", "payouts").await;
    let got = receive_n(&consumer, 1, Duration::from_secs(10)).await;
    assert_eq!(
        got.iter().map(|m| m.message_id.clone()).collect::<Vec<_>>(),
        [id]
    );
    successor.shutdown().await;
    broker.running.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simple_consumer_extends_and_shortens_leases_and_acks_in_bulk() -> Result<(), AnyError> {
    let broker = start(|c| c.limits.min_invisible_ms = 500).await?;
    let ap = broker.access_point();
    create_topic(&ap, "work", 2, &["NORMAL"]).await;
    create_group(&ap, "workers", 16, &[], false).await;
    let producer = Producer::builder(ClientConfig::new(&ap)).build().await?;
    let sent: HashSet<String> = producer
        .send_batch(
            (0..6)
                .map(|i| Message::new("work", format!("w{i}")))
                .collect(),
        )
        .await?
        .into_iter()
        .map(|r| r.message_id)
        .collect();
    let consumer = simple(&ap, "workers", "work").await;
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < 6 && Instant::now() < deadline {
        got.extend(consumer.receive(32, Duration::from_secs(30)).await?);
    }
    assert_eq!(got.len(), 6);
    // Kept: the lease of the first is extended. The copy taken before the change holds the
    // old handle, as after a lost reply; it still acts.
    let before_change = got[0].clone();
    consumer
        .change_invisible_duration(&mut got[0], Duration::from_secs(60))
        .await?;
    // Retried early: the second is shortened, so it comes back first, with attempt 2.
    consumer
        .change_invisible_duration(&mut got[1], Duration::from_millis(500))
        .await?;
    let again = consumer.receive(32, Duration::from_secs(30)).await?;
    assert_eq!(
        again.iter().map(|m| &m.message_id).collect::<Vec<_>>(),
        [&got[1].message_id]
    );
    assert_eq!(again[0].delivery_attempt, 2);
    // The second delivery's handle acts; the first delivery's no longer does.
    assert!(consumer.ack(&got[1]).await.is_err());
    consumer.ack_all(&again).await?;
    consumer.ack(&before_change).await?;
    consumer.ack_all(&got[2..]).await?;
    let ids: HashSet<String> = got.iter().map(|m| m.message_id.clone()).collect();
    assert_eq!(ids, sent);
    // All six done: none is in flight any more.
    assert_eq!(broker.running.broker.consumers.inflight(), 0);
    consumer.shutdown().await;
    producer.shutdown().await;
    broker.running.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mistakes_are_refused_with_what_to_do() -> Result<(), AnyError> {
    let broker = start(|c| c.topics.auto_create = false).await?;
    let ap = broker.access_point();
    let unknown = Producer::builder(ClientConfig::new(&ap))
        .topics(["nowhere"])
        .build()
        .await;
    let text = unknown.err().unwrap().to_string();
    assert!(
        text.contains("TOPIC_NOT_FOUND") && text.contains("ferrumq-admin topic create"),
        "{text}"
    );

    let unreachable = Producer::builder(ClientConfig::new("127.0.0.1:1"))
        .topics(["t"])
        .build()
        .await;
    let text = unreachable.err().unwrap().to_string();
    assert!(text.contains("127.0.0.1:1"), "{text}");

    let bad = Producer::builder(ClientConfig::new("no-port"))
        .build()
        .await;
    assert!(bad.err().unwrap().to_string().contains("host:port"));

    create_topic(&ap, "plain", 1, &["NORMAL"]).await;
    let producer = Producer::builder(ClientConfig::new(&ap)).build().await?;
    let wrong_type = producer
        .send(Message::new("plain", "x").with_message_group("g"))
        .await
        .unwrap_err();
    assert!(
        wrong_type
            .to_string()
            .contains("MESSAGE_PROPERTY_CONFLICT_WITH_TYPE"),
        "{wrong_type}"
    );
    let no_checker = producer
        .begin(Message::new("plain", "x"))
        .await
        .unwrap_err();
    assert!(
        no_checker.to_string().contains("transaction_checker"),
        "{no_checker}"
    );
    let empty = producer.send(Message::new("plain", "")).await.unwrap_err();
    assert!(empty.to_string().contains("body is empty"), "{empty}");
    // A bad message among good ones sent at the same moment fails alone: with one request
    // in flight they share requests, which the broker refuses whole, and the producer sends
    // their messages again one by one.
    let shared = Arc::new(
        Producer::builder(ClientConfig::new(&ap))
            .max_in_flight_requests(1)
            .build()
            .await?,
    );
    let sends: Vec<_> = (0..20)
        .map(|i| {
            let shared = shared.clone();
            tokio::spawn(async move {
                let message = Message::new("plain", format!("m{i}"));
                // A delivery time makes it DELAY, which the NORMAL topic refuses.
                let message = if i == 10 {
                    message.deliver_after(Duration::from_secs(1))
                } else {
                    message
                };
                shared.send(message).await
            })
        })
        .collect();
    for (i, send) in sends.into_iter().enumerate() {
        let result = send.await?;
        assert_eq!(result.is_err(), i == 10, "message {i}: {result:?}");
    }
    Ok(())
}
