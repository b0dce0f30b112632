//! Transactional messages end to end with the official 5.0.0 client: commit, rollback,
//! check-backs (COMMIT, ROLLBACK, unknown then COMMIT, a second producer when the first is
//! gone), the first decision winning, and discarding after the last check.
#![cfg(test)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{
    admin, client_option, consumer, create_group, create_topic, receive_n, resource, start, tag,
    with_client_id,
};
use ferrumq_protocol::admin::ListDiscardedTransactionsRequest;
use ferrumq_protocol::v2::messaging_service_client::MessagingServiceClient;
use ferrumq_protocol::v2::{
    Code, EndTransactionRequest, TransactionResolution as Resolution, TransactionSource,
};
use rocketmq::Producer;
use rocketmq::conf::ProducerOption;
use rocketmq::model::message::{MessageBuilder, MessageView};
use rocketmq::model::transaction::{Transaction, TransactionResolution};

type Checker = Box<dyn Fn(String, MessageView) -> TransactionResolution + Send + Sync>;

async fn transaction_producer(addr: SocketAddr, topic: &str, checker: Checker) -> Producer {
    let mut option = ProducerOption::default();
    option.set_topics(vec![topic]);
    let mut producer =
        Producer::new_transaction_producer(option, client_option(addr), checker).unwrap();
    producer.start().await.unwrap();
    producer
}

fn message(topic: &str, body: &str) -> impl rocketmq::model::message::Message {
    MessageBuilder::transaction_message_builder(topic, body.as_bytes().to_vec())
        .build()
        .unwrap()
}

fn bodies(messages: &[MessageView]) -> Vec<String> {
    let mut bodies: Vec<String> = messages
        .iter()
        .map(|m| String::from_utf8(m.body().to_vec()).unwrap())
        .collect();
    bodies.sort();
    bodies
}

async fn end(
    addr: SocketAddr,
    topic: &str,
    message_id: &str,
    transaction_id: &str,
    resolution: Resolution,
) -> ferrumq_protocol::v2::Status {
    let mut client = MessagingServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    client
        .end_transaction(with_client_id(
            EndTransactionRequest {
                topic: resource(topic),
                message_id: message_id.to_owned(),
                transaction_id: transaction_id.to_owned(),
                resolution: resolution as i32,
                source: TransactionSource::SourceClient as i32,
                trace_context: String::new(),
            },
            "raw-end-transaction",
        ))
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap()
}

/// A transaction producer for `topic` whose checker answers "unknown" and counts the
/// check-backs it gets.
async fn undecided_producer(addr: SocketAddr, topic: &str) -> (Producer, Arc<AtomicUsize>) {
    let checks = Arc::new(AtomicUsize::new(0));
    let counted = checks.clone();
    let producer = transaction_producer(
        addr,
        topic,
        Box::new(move |_, _| {
            counted.fetch_add(1, Ordering::SeqCst);
            TransactionResolution::UNKNOWN
        }),
    )
    .await;
    (producer, checks)
}

/// Sends one transactional message to `topic` and leaves it undecided; returns its message
/// id and transaction id.
async fn open_transaction(producer: &Producer, topic: &str, body: &str) -> (String, String) {
    let transaction = producer
        .send_transaction_message(message(topic, body))
        .await
        .unwrap();
    (
        transaction.message_id().to_owned(),
        transaction.transaction_id().to_owned(),
    )
}

/// The discarded transactions of `topic` at `addr`, once there are `n` (or after 5 s).
async fn discarded_transactions(
    addr: SocketAddr,
    topic: &str,
    n: usize,
) -> Vec<ferrumq_protocol::admin::DiscardedTransaction> {
    let mut discarded = Vec::new();
    for _ in 0..50 {
        discarded = admin(addr)
            .await
            .list_discarded_transactions(ListDiscardedTransactionsRequest {
                topic: topic.into(),
                max: 10,
            })
            .await
            .unwrap()
            .into_inner()
            .transactions;
        if discarded.len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    discarded
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_shows_one_copy_and_rollback_none() {
    let broker = start(|_| {}).await;
    let addr = broker.addr();
    create_topic(addr, "payments", 4, &["TRANSACTION"]).await;
    create_group(addr, "ledger", 17).await;
    let producer = transaction_producer(
        addr,
        "payments",
        Box::new(|_, _| TransactionResolution::UNKNOWN),
    )
    .await;
    let consumer = consumer(addr, "ledger", "payments").await;
    let all = tag("*");

    let committed = producer
        .send_transaction_message(message("payments", "paid"))
        .await
        .unwrap();
    let rolled_back = producer
        .send_transaction_message(message("payments", "cancelled"))
        .await
        .unwrap();
    let committed_id = committed.message_id().to_owned();
    let (rb_id, rb_txn) = (
        rolled_back.message_id().to_owned(),
        rolled_back.transaction_id().to_owned(),
    );
    // Half messages are invisible.
    let seen = receive_n(
        &consumer,
        "payments",
        &all,
        1,
        Duration::from_secs(10),
        false,
        Duration::from_secs(1),
    )
    .await;
    assert!(seen.is_empty(), "a half message was delivered");

    committed.commit().await.unwrap();
    rolled_back.rollback().await.unwrap();
    let seen = receive_n(
        &consumer,
        "payments",
        &all,
        2,
        Duration::from_secs(10),
        true,
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(bodies(&seen), ["paid"]);
    assert_eq!(seen[0].message_id(), committed_id);

    // A repeated rollback is OK and stores nothing; a commit after the rollback is refused.
    let again = end(addr, "payments", &rb_id, &rb_txn, Resolution::Rollback).await;
    assert_eq!(again.code, Code::Ok as i32, "{}", again.message);
    let flip = end(addr, "payments", &rb_id, &rb_txn, Resolution::Commit).await;
    assert_eq!(flip.code, Code::PreconditionFailed as i32);
    assert!(flip.message.contains("rolled back"), "{}", flip.message);
    let seen = receive_n(
        &consumer,
        "payments",
        &all,
        1,
        Duration::from_secs(10),
        true,
        Duration::from_secs(1),
    )
    .await;
    assert!(
        seen.is_empty(),
        "the rollback was undone: {:?}",
        bodies(&seen)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_commit_stores_nothing_and_a_rollback_after_it_is_refused() {
    let broker = start(|_| {}).await;
    let addr = broker.addr();
    create_topic(addr, "payments", 2, &["TRANSACTION"]).await;
    create_group(addr, "ledger", 17).await;
    let producer = transaction_producer(
        addr,
        "payments",
        Box::new(|_, _| TransactionResolution::UNKNOWN),
    )
    .await;
    let consumer = consumer(addr, "ledger", "payments").await;
    let transaction = producer
        .send_transaction_message(message("payments", "once"))
        .await
        .unwrap();
    let (id, txn) = (
        transaction.message_id().to_owned(),
        transaction.transaction_id().to_owned(),
    );
    transaction.commit().await.unwrap();
    for _ in 0..3 {
        let status = end(addr, "payments", &id, &txn, Resolution::Commit).await;
        assert_eq!(status.code, Code::Ok as i32, "{}", status.message);
    }
    // "Unknown" after the decision changes nothing either.
    let status = end(addr, "payments", &id, &txn, Resolution::Unspecified).await;
    assert_eq!(status.code, Code::Ok as i32);
    let status = end(addr, "payments", &id, &txn, Resolution::Rollback).await;
    assert_eq!(status.code, Code::PreconditionFailed as i32);
    assert!(status.message.contains("committed"), "{}", status.message);

    let seen = receive_n(
        &consumer,
        "payments",
        &tag("*"),
        2,
        Duration::from_secs(10),
        true,
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(bodies(&seen), ["once"], "committed more than once");

    // Ids that name nothing, or the wrong message, are refused with INVALID_TRANSACTION_ID.
    for (message_id, transaction_id, field) in [
        (id.as_str(), "", "transaction_id"),
        (id.as_str(), "T00000000000000FF", "transaction_id"),
        (id.as_str(), "not-ours", "transaction_id"),
        ("0000AAAA", txn.as_str(), "message_id"),
    ] {
        let status = end(
            addr,
            "payments",
            message_id,
            transaction_id,
            Resolution::Commit,
        )
        .await;
        assert_eq!(status.code, Code::InvalidTransactionId as i32);
        assert!(status.message.contains(field), "{}", status.message);
    }
}

/// The checker answers by body: "commit", "rollback", or "unknown" once and then COMMIT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_backs_apply_commit_rollback_and_unknown_then_commit() {
    let broker = start(|c| {
        c.transactions.check_immunity_ms = 300;
        c.transactions.check_interval_ms = 500;
    })
    .await;
    let addr = broker.addr();
    create_topic(addr, "orders", 2, &["TRANSACTION"]).await;
    create_group(addr, "shipping", 17).await;
    let asked: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let seen_by_checker = asked.clone();
    let producer = transaction_producer(
        addr,
        "orders",
        Box::new(move |_, message| {
            let body = String::from_utf8(message.body().to_vec()).unwrap();
            let mut asked = seen_by_checker.lock().unwrap();
            let count = asked.entry(body.clone()).or_insert(0);
            *count += 1;
            match (body.as_str(), *count) {
                ("commit", _) | ("unknown", 2..) => TransactionResolution::COMMIT,
                ("rollback", _) => TransactionResolution::ROLLBACK,
                _ => TransactionResolution::UNKNOWN,
            }
        }),
    )
    .await;
    for body in ["commit", "rollback", "unknown"] {
        // Left open: the producer "crashed" before deciding.
        drop(
            producer
                .send_transaction_message(message("orders", body))
                .await
                .unwrap(),
        );
    }
    let consumer = consumer(addr, "shipping", "orders").await;
    let seen = receive_n(
        &consumer,
        "orders",
        &tag("*"),
        3,
        Duration::from_secs(10),
        true,
        Duration::from_secs(8),
    )
    .await;
    assert_eq!(bodies(&seen), ["commit", "unknown"]);
    let asked = asked.lock().unwrap().clone();
    assert_eq!(asked.get("commit"), Some(&1), "{asked:?}");
    assert_eq!(asked.get("rollback"), Some(&1), "{asked:?}");
    assert_eq!(asked.get("unknown"), Some(&2), "{asked:?}");
    // Decided transactions are not checked again.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(asked.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_first_producer_is_gone_or_undecided_another_one_is_asked() {
    let broker = start(|c| {
        c.transactions.check_immunity_ms = 300;
        c.transactions.check_interval_ms = 400;
    })
    .await;
    let addr = broker.addr();
    create_topic(addr, "orders", 2, &["TRANSACTION"]).await;
    create_group(addr, "shipping", 17).await;
    let undecided_calls = Arc::new(AtomicUsize::new(0));
    let calls = undecided_calls.clone();
    // Producer A never decides; producer B commits whatever it is asked about.
    let undecided = transaction_producer(
        addr,
        "orders",
        Box::new(move |_, _| {
            calls.fetch_add(1, Ordering::SeqCst);
            TransactionResolution::UNKNOWN
        }),
    )
    .await;
    let gone = transaction_producer(
        addr,
        "orders",
        Box::new(|_, _| TransactionResolution::ROLLBACK),
    )
    .await;
    let decider = transaction_producer(
        addr,
        "orders",
        Box::new(|_, _| TransactionResolution::COMMIT),
    )
    .await;
    // Every producer has published to the topic, so each may be asked.
    for p in [&undecided, &decider] {
        p.send_transaction_message(message("orders", "warm-up"))
            .await
            .unwrap()
            .rollback()
            .await
            .unwrap();
    }
    drop(
        undecided
            .send_transaction_message(message("orders", "from-a"))
            .await
            .unwrap(),
    );
    drop(
        gone.send_transaction_message(message("orders", "from-gone"))
            .await
            .unwrap(),
    );
    gone.shutdown().await.unwrap();

    let consumer = consumer(addr, "shipping", "orders").await;
    let seen = receive_n(
        &consumer,
        "orders",
        &tag("*"),
        2,
        Duration::from_secs(10),
        true,
        Duration::from_secs(8),
    )
    .await;
    assert_eq!(bodies(&seen), ["from-a", "from-gone"]);
    assert!(undecided_calls.load(Ordering::SeqCst) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_transactions_are_discarded_after_the_last_check() {
    let broker = start(|c| {
        c.transactions.check_immunity_ms = 200;
        c.transactions.check_interval_ms = 200;
        c.transactions.max_checks = 2;
    })
    .await;
    let addr = broker.addr();
    create_topic(addr, "orders", 1, &["TRANSACTION"]).await;
    let (producer, checks) = undecided_producer(addr, "orders").await;
    let (id, txn) = open_transaction(&producer, "orders", "limbo").await;
    let discarded = discarded_transactions(addr, "orders", 1).await;
    assert_eq!(discarded.len(), 1);
    assert_eq!(discarded[0].transaction_id, txn);
    assert_eq!(discarded[0].checks, 2);
    let listed = discarded[0].message.as_ref().unwrap();
    assert_eq!(listed.topic.as_ref().unwrap().name, "orders");
    assert_eq!(listed.system_properties.as_ref().unwrap().message_id, id);
    assert_eq!(checks.load(Ordering::SeqCst), 2);
    let late = end(addr, "orders", &id, &txn, Resolution::Commit).await;
    assert_eq!(late.code, Code::PreconditionFailed as i32);
    assert!(late.message.contains("discarded"), "{}", late.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_nobody_can_be_asked_about_is_discarded_after_max_pending() {
    let broker = start(|c| {
        c.transactions.check_immunity_ms = 200;
        c.transactions.check_interval_ms = 200;
        c.transactions.max_pending_ms = 1500;
    })
    .await;
    let addr = broker.addr();
    create_topic(addr, "orders", 1, &["TRANSACTION"]).await;
    let (producer, _) = undecided_producer(addr, "orders").await;
    let (_, txn) = open_transaction(&producer, "orders", "orphan").await;
    // The producer leaves: from then on no check can be made or counted...
    producer.shutdown().await.unwrap();
    let discarded = discarded_transactions(addr, "orders", 1).await;
    // ...and past max_pending_ms it is discarded all the same, long before 15 checks, and
    // kept for a person to see.
    assert_eq!(discarded.len(), 1);
    assert_eq!(discarded[0].transaction_id, txn);
    assert!(discarded[0].checks < 15, "{}", discarded[0].checks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_the_last_check_still_gets_its_interval() {
    let broker = start(|c| {
        c.transactions.check_immunity_ms = 200;
        c.transactions.check_interval_ms = 3000;
        c.transactions.max_checks = 1;
    })
    .await;
    let addr = broker.addr();
    create_topic(addr, "orders", 1, &["TRANSACTION"]).await;
    let (producer, checks) = undecided_producer(addr, "orders").await;
    open_transaction(&producer, "orders", "asked-once").await;
    for _ in 0..50 {
        if checks.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        checks.load(Ordering::SeqCst),
        1,
        "the one check was not made"
    );
    // Restarted right after its only check: the producer still has the interval to answer.
    producer.shutdown().await.unwrap();
    let mut config = broker.running.broker.config.as_ref().clone();
    broker.running.shutdown().await.unwrap();
    config.grpc_listen = "127.0.0.1:0".parse().unwrap();
    config.http_listen = "127.0.0.1:0".parse().unwrap();
    let running = ferrumq_broker::start(config).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let at_once = discarded_transactions(running.grpc_addr, "orders", 0).await;
    assert_eq!(at_once.len(), 0, "discarded at once");
    let later = discarded_transactions(running.grpc_addr, "orders", 1).await;
    assert_eq!(later.len(), 1, "never discarded after its interval");
    running.shutdown().await.unwrap();
    drop(broker.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_must_name_the_transactions_message_and_topic() {
    let broker = start(|_| {}).await;
    let addr = broker.addr();
    create_topic(addr, "orders", 1, &["TRANSACTION"]).await;
    let (producer, _) = undecided_producer(addr, "orders").await;
    let (id, txn) = open_transaction(&producer, "orders", "guarded").await;
    // Transaction ids follow each other: knowing one is not enough to decide it.
    for (topic, message_id, field) in [
        ("orders", "", "message_id"),
        ("orders", "01SOMEOTHERMESSAGE", "message_id"),
        ("", id.as_str(), "topic"),
    ] {
        let refused = end(addr, topic, message_id, &txn, Resolution::Commit).await;
        assert_eq!(refused.code, Code::InvalidTransactionId as i32, "{field}");
        assert!(refused.message.contains(field), "{}", refused.message);
    }
    let done = end(addr, "orders", &id, &txn, Resolution::Commit).await;
    assert_eq!(done.code, Code::Ok as i32, "{}", done.message);
}
