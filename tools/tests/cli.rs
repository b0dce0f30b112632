//! Every `ferrumq-admin` command, run as a process against a broker in another process,
//! asserting on its JSON output; and the errors people meet (wrong endpoint, unknown topic
//! or group, a bad time).
#![cfg(test)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

// The official-client helpers the broker's own tests use.
#[path = "../../broker/tests/common/mod.rs"]
mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{client_option, consumer, http_request, ids, receive_n, tag};
use rocketmq::Producer;
use rocketmq::conf::ProducerOption;
use rocketmq::model::message::MessageBuilder;
use rocketmq::model::transaction::{Transaction, TransactionResolution};
use serde_json::{Value, json};

/// Set in the child process that runs the broker.
const BROKER_DIR: &str = "FERRUMQ_ADMIN_TEST_BROKER_DIR";

/// Runs a broker when this test binary is started as the child of [`BrokerProcess`];
/// otherwise does nothing.
#[test]
fn broker_process() {
    let Ok(dir) = std::env::var(BROKER_DIR) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut config = ferrumq_broker::BrokerConfig {
            data_dir: dir.into(),
            grpc_listen: "127.0.0.1:0".parse().unwrap(),
            http_listen: "127.0.0.1:0".parse().unwrap(),
            segment_size_bytes: 16 << 20,
            // Tests must not fail because the machine's disk happens to be nearly full.
            disk_watermark: 1.0,
            ..ferrumq_broker::BrokerConfig::default()
        };
        config.limits.min_invisible_ms = 1000;
        // Undecided transactions are discarded after one quick check.
        config.transactions.check_immunity_ms = 300;
        config.transactions.check_interval_ms = 300;
        config.transactions.max_checks = 1;
        let running = ferrumq_broker::start(config).await.unwrap();
        #[allow(clippy::print_stdout)]
        {
            println!("BROKER {} {}", running.grpc_addr, running.http_addr);
        }
        std::future::pending::<()>().await;
    });
}

/// A broker in a child process, killed when dropped.
struct BrokerProcess {
    child: Child,
    grpc: SocketAddr,
    http: SocketAddr,
    _dir: tempfile::TempDir,
}

impl BrokerProcess {
    fn start() -> BrokerProcess {
        let dir = tempfile::tempdir().unwrap();
        let (child, grpc, http) = spawn_broker(dir.path());
        BrokerProcess {
            child,
            grpc,
            http,
            _dir: dir,
        }
    }

    /// SIGKILL, then a new broker process on the same data.
    fn kill_and_restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        let (child, grpc, http) = spawn_broker(self._dir.path());
        (self.child, self.grpc, self.http) = (child, grpc, http);
    }
}

fn spawn_broker(dir: &std::path::Path) -> (Child, SocketAddr, SocketAddr) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "broker_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(BROKER_DIR, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    for line in stdout.lines() {
        let line = line.unwrap();
        // The test harness may have written "test broker_process ... " on the same line.
        if let Some((_, addrs)) = line.split_once("BROKER ") {
            let (grpc, http) = addrs.split_once(' ').unwrap();
            return (child, grpc.parse().unwrap(), http.parse().unwrap());
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the broker process ended before it was ready");
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `ferrumq-admin --endpoint <grpc> <args>`: (succeeded, stdout, stderr).
fn run(endpoint: SocketAddr, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_ferrumq-admin"))
        .arg("--endpoint")
        .arg(endpoint.to_string())
        .args(args)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

/// Runs a command that must succeed with `--output json`; returns its JSON.
fn json(endpoint: SocketAddr, args: &[&str]) -> Value {
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(args);
    let (ok, stdout, stderr) = run(endpoint, &all);
    assert!(ok, "ferrumq-admin {args:?} failed: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout}"))
}

/// Runs a command that must fail; returns its stderr.
fn fails(endpoint: SocketAddr, args: &[&str]) -> String {
    let (ok, stdout, stderr) = run(endpoint, args);
    assert!(!ok, "ferrumq-admin {args:?} should fail; printed {stdout}");
    stderr
}

/// Polls `dlq list` until `pending` dead letters wait.
fn wait_for_dead_letters(endpoint: SocketAddr, group: &str, pending: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = json(endpoint, &["dlq", "list", "--group", group]);
        if list["pending"] == pending || Instant::now() > deadline {
            assert_eq!(list["pending"], pending, "{list}");
            return list;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `offset reset` of group billing in topic orders to `target`.
fn reset_billing(endpoint: SocketAddr, target: &[&str]) -> Value {
    let mut args = vec!["offset", "reset", "--group", "billing", "--topic", "orders"];
    args.extend_from_slice(target);
    json(endpoint, &args)
}

fn strings(value: &Value, field: &str) -> HashSet<String> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v[field].as_str().unwrap().to_owned())
        .collect()
}

async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_against_a_broker_process() {
    let mut broker = BrokerProcess::start();
    let at = broker.grpc;

    // cluster status
    let status = blocking(move || json(at, &["cluster", "status"])).await;
    assert_eq!(status["broker"]["endpoint"], at.to_string());
    assert_eq!(status["broker"]["storage"], "ok");
    assert_eq!(status["members"][0]["endpoint"], at.to_string());

    // topic create | update | delete | list | describe
    let topic = blocking(move || {
        json(
            at,
            &[
                "topic",
                "create",
                "orders",
                "--queues",
                "2",
                "--types",
                "NORMAL,FIFO",
            ],
        )
    })
    .await;
    assert_eq!(
        topic,
        json!({"name": "orders", "queue_count": 2, "message_types": ["NORMAL", "FIFO"]})
    );
    let err = blocking(move || fails(at, &["topic", "create", "orders", "--queues", "5"])).await;
    assert!(err.contains("exists"), "{err}");
    let err = blocking(move || fails(at, &["topic", "create", "orders", "--types", "DELAY"])).await;
    assert!(
        err.contains("exists with 2 queues accepting NORMAL, FIFO"),
        "{err}"
    );
    // An update changes what it names and keeps the rest.
    let topic = blocking(move || json(at, &["topic", "update", "orders", "--queues", "3"])).await;
    assert_eq!(
        topic,
        json!({"name": "orders", "queue_count": 3, "message_types": ["NORMAL", "FIFO"]})
    );
    let topic = blocking(move || {
        json(
            at,
            &["topic", "update", "orders", "--types", "NORMAL,FIFO,DELAY"],
        )
    })
    .await;
    assert_eq!(topic["queue_count"], 3);
    assert_eq!(topic["message_types"], json!(["NORMAL", "FIFO", "DELAY"]));
    let err = blocking(move || fails(at, &["topic", "update", "orders"])).await;
    assert!(err.contains("give --queues, --types or both"), "{err}");
    blocking(move || {
        json(at, &["topic", "create", "scratch"]);
        json(
            at,
            &["topic", "create", "payments", "--types", "TRANSACTION"],
        );
        assert_eq!(
            json(at, &["topic", "delete", "scratch"]),
            json!({"deleted": "scratch"})
        );
        let names = strings(&json(at, &["topic", "list"]), "name");
        assert!(
            names.contains("orders") && !names.contains("scratch"),
            "{names:?}"
        );
    })
    .await;

    // group create | list
    blocking(move || {
        for group in ["billing", "audit"] {
            let created = json(
                at,
                &[
                    "group",
                    "create",
                    group,
                    "--from",
                    "earliest",
                    "--max-attempts",
                    "1",
                ],
            );
            assert_eq!(created["max_delivery_attempts"], 1);
            assert_eq!(created["start_position"], "EARLIEST");
        }
        // Creating it again with other settings would silently keep the old ones.
        json(at, &["group", "create", "ledger", "--from", "earliest"]);
        let err = fails(at, &["group", "create", "ledger", "--max-attempts", "5"]);
        assert!(err.contains("exists with other settings"), "{err}");
        // Naming nothing that differs is no conflict.
        assert_eq!(
            json(at, &["group", "create", "ledger"])["start_position"],
            "EARLIEST"
        );
        let updated = json(at, &["group", "update", "ledger", "--max-attempts", "5"]);
        assert_eq!(updated["max_delivery_attempts"], 5);
        assert_eq!(updated["start_position"], "EARLIEST", "kept: {updated}");
        let updated = json(at, &["group", "update", "ledger", "--fifo"]);
        assert_eq!(updated["fifo"], true);
        assert_eq!(updated["max_delivery_attempts"], 5, "kept: {updated}");
        let names = strings(&json(at, &["group", "list"]), "name");
        assert!(names.contains("billing") && names.contains("audit"));
    })
    .await;

    // Six messages over HTTP, three before `middle` and three after.
    let http = broker.http;
    let produce = move |first: usize| {
        let messages: Vec<Value> = (first..first + 3)
            .map(
                |i| json!({"body": format!("order {i}"), "tag": "o", "keys": [format!("key-{i}")]}),
            )
            .collect();
        let body = json!({"messages": messages}).to_string();
        let (status, reply) = http_request(
            http,
            "POST",
            "/topics/orders/messages/batch",
            &[],
            body.as_bytes(),
        );
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&reply));
        let reply: Value = serde_json::from_slice(&reply).unwrap();
        strings(&reply["messages"], "message_id")
    };
    let early = blocking(move || produce(0)).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let middle = ferrumq_broker::service::now_ms();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let late = blocking(move || produce(3)).await;
    let all: HashSet<String> = early.union(&late).cloned().collect();

    let billing = consumer(at, "billing", "orders").await;
    let any = tag("*");
    let long = Duration::from_secs(30);
    let wait = Duration::from_secs(20);
    let got = receive_n(&billing, "orders", &any, 6, long, true, wait).await;
    assert_eq!(ids(&got), all);

    // group describe: everything acked
    let described = blocking(move || json(at, &["group", "describe", "billing"])).await;
    let queues = described["queues"].as_array().unwrap();
    assert_eq!(
        queues
            .iter()
            .map(|q| q["max_offset"].as_u64().unwrap())
            .sum::<u64>(),
        6
    );
    assert!(
        queues.iter().all(|q| q["lag"] == 0 && q["inflight"] == 0),
        "{described}"
    );

    // topic describe: the offsets per queue
    let described = blocking(move || json(at, &["topic", "describe", "orders"])).await;
    let max: u64 = described["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["max_offset"].as_u64().unwrap())
        .sum();
    assert_eq!(max, 6, "{described}");

    // offset reset --to-time: the three later messages come again
    let time = ferrumq_broker::service::now_ms();
    assert!(time > middle);
    let middle_text = {
        let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(middle) * 1_000_000)
            .unwrap();
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let moved = blocking(move || reset_billing(at, &["--to-time", &middle_text])).await;
    let back: u64 = moved
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["previous_offset"].as_u64().unwrap() - q["offset"].as_u64().unwrap())
        .sum();
    assert_eq!(back, 3, "{moved}");
    let again = receive_n(&billing, "orders", &any, 3, long, true, wait).await;
    assert_eq!(ids(&again), late);

    // offset reset --to-offset 0, and no acks: with one attempt allowed, all six are
    // dead-lettered, for both groups.
    blocking(move || reset_billing(at, &["--to-offset", "0"])).await;
    let audit = consumer(at, "audit", "orders").await;
    let short = Duration::from_secs(1);
    assert_eq!(
        ids(&receive_n(&billing, "orders", &any, 6, short, false, wait).await),
        all
    );
    assert_eq!(
        ids(&receive_n(&audit, "orders", &any, 6, short, false, wait).await),
        all
    );
    let listed = blocking(move || wait_for_dead_letters(at, "billing", 6)).await;
    let letters = &listed["dead_letters"];
    assert_eq!(strings(letters, "message_id"), all);
    assert!(
        letters
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["origin_topic"] == "orders")
    );
    blocking(move || wait_for_dead_letters(at, "audit", 6)).await;

    // message query by key, message show with its deliveries
    let found = blocking(move || {
        json(
            at,
            &["message", "query", "--topic", "orders", "--key", "key-4"],
        )
    })
    .await;
    assert_eq!(found.as_array().unwrap().len(), 1, "{found}");
    assert_eq!(found[0]["body_preview"], "order 4");
    let id = found[0]["message_id"].as_str().unwrap().to_owned();
    let shown_id = id.clone();
    let shown =
        blocking(move || json(at, &["message", "show", &shown_id, "--topic", "orders"])).await;
    assert_eq!(shown[0]["keys"], json!(["key-4"]));
    let states: HashSet<(String, String)> = shown[0]["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["group"].as_str().unwrap().to_owned(),
                d["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        states.contains(&("billing".to_owned(), "dead-lettered".to_owned())),
        "{shown}"
    );
    assert!(
        states.contains(&("audit".to_owned(), "dead-lettered".to_owned())),
        "{shown}"
    );

    // dlq resend --id: back in the topic with its id, received by both groups' consumers
    let resend_id = id.clone();
    let resent = blocking(move || {
        json(
            at,
            &["dlq", "resend", "--group", "billing", "--id", &resend_id],
        )
    })
    .await;
    assert_eq!(
        resent,
        json!({"resent": 1, "pending": 5, "not_found": [], "orphaned": []})
    );
    let back = receive_n(&billing, "orders", &any, 1, long, true, wait).await;
    assert_eq!(ids(&back), HashSet::from([id.clone()]));
    // The resent copy, acked by billing, is done there; the first copy stays dead-lettered.
    let shown_id = id.clone();
    let copies =
        blocking(move || json(at, &["message", "show", &shown_id, "--topic", "orders"])).await;
    let mut copies = copies.as_array().unwrap().clone();
    assert_eq!(copies.len(), 2, "{copies:?}");
    copies.sort_by_key(|c| c["commit_log_position"].as_u64().unwrap());
    let billing_state = |copy: &Value| {
        copy["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["group"] == "billing")
            .map(|d| d["state"].as_str().unwrap().to_owned())
    };
    assert_eq!(billing_state(&copies[0]).as_deref(), Some("dead-lettered"));
    assert_eq!(billing_state(&copies[1]).as_deref(), Some("done"));
    let err = blocking(move || {
        fails(
            at,
            &["dlq", "resend", "--group", "billing", "--id", "NO-SUCH-ID"],
        )
    })
    .await;
    assert!(err.contains("not waiting dead letters"), "{err}");

    // dlq resend --all: the other five, once
    let resent =
        blocking(move || json(at, &["dlq", "resend", "--group", "billing", "--all"])).await;
    assert_eq!(resent["resent"], 5);
    assert_eq!(resent["pending"], 0);
    let rest = receive_n(&billing, "orders", &any, 5, long, true, wait).await;
    let mut expected = all.clone();
    expected.remove(&id);
    assert_eq!(ids(&rest), expected);

    // dlq purge: refused without --yes, then drops audit's six
    let err = blocking(move || fails(at, &["dlq", "purge", "--group", "audit"])).await;
    assert!(err.contains("add --yes"), "{err}");
    let purged = blocking(move || json(at, &["dlq", "purge", "--group", "audit", "--yes"])).await;
    assert_eq!(purged, json!({"purged": 6}));
    blocking(move || wait_for_dead_letters(at, "audit", 0)).await;

    // dlq resend --all when the topic the dead letters came from is gone: they are left
    // waiting and named, and the command fails saying so
    blocking(move || {
        json(at, &["topic", "create", "doomed"]);
        json(
            at,
            &[
                "group",
                "create",
                "mourners",
                "--from",
                "earliest",
                "--max-attempts",
                "1",
            ],
        );
        let body = json!({"messages": [{"body": "d1"}, {"body": "d2"}]}).to_string();
        let (status, _) = http_request(
            http,
            "POST",
            "/topics/doomed/messages/batch",
            &[],
            body.as_bytes(),
        );
        assert_eq!(status, 200);
    })
    .await;
    let mourners = consumer(at, "mourners", "doomed").await;
    receive_n(&mourners, "doomed", &any, 2, short, false, wait).await;
    blocking(move || wait_for_dead_letters(at, "mourners", 2)).await;
    let err = blocking(move || {
        json(at, &["topic", "delete", "doomed"]);
        fails(at, &["dlq", "resend", "--group", "mourners", "--all"])
    })
    .await;
    assert!(
        err.contains("2 dead letters of group mourners were left waiting"),
        "{err}"
    );
    blocking(move || wait_for_dead_letters(at, "mourners", 2)).await;

    // txn list-discarded: a transaction nobody decides is discarded after one check
    let mut option = ProducerOption::default();
    option.set_topics(vec!["payments"]);
    let mut producer = Producer::new_transaction_producer(
        option,
        client_option(at),
        Box::new(|_, _| TransactionResolution::UNKNOWN),
    )
    .unwrap();
    producer.start().await.unwrap();
    let message = MessageBuilder::transaction_message_builder("payments", b"undecided".to_vec())
        .build()
        .unwrap();
    let sent = producer.send_transaction_message(message).await.unwrap();
    let txn_id = sent.message_id().to_owned();
    let discarded = blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let list = json(at, &["txn", "list-discarded", "--topic", "payments"]);
            if !list.as_array().unwrap().is_empty() || Instant::now() > deadline {
                return list;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })
    .await;
    assert_eq!(discarded[0]["message_id"], txn_id, "{discarded}");
    assert_eq!(discarded[0]["topic"], "payments");
    assert_eq!(discarded[0]["checks"], 1);

    producer.shutdown().await.unwrap();
    billing.shutdown().await.unwrap();
    audit.shutdown().await.unwrap();

    // What the commands changed survives a SIGKILL: resent and purged dead letters stay
    // handled, the topics and groups stay.
    broker.kill_and_restart();
    let at = broker.grpc;
    blocking(move || {
        wait_for_dead_letters(at, "billing", 0);
        wait_for_dead_letters(at, "audit", 0);
        assert_eq!(
            json(at, &["topic", "describe", "orders"])["topic"]["queue_count"],
            3
        );
        let billing = json(at, &["group", "describe", "billing"]);
        assert!(
            billing["queues"]
                .as_array()
                .unwrap()
                .iter()
                .all(|q| q["lag"] == 0),
            "{billing}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_say_what_is_wrong() {
    // Nobody listens on port 1.
    let nowhere: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let err = blocking(move || fails(nowhere, &["topic", "list"])).await;
    assert!(
        err.contains("cannot reach a broker at 127.0.0.1:1"),
        "{err}"
    );
    assert!(err.contains("--endpoint"), "{err}");

    let broker = BrokerProcess::start();
    let at = broker.grpc;
    blocking(move || {
        let err = fails(at, &["topic", "describe", "nowhere"]);
        assert!(err.contains("topic \"nowhere\" does not exist"), "{err}");
        let err = fails(at, &["group", "describe", "nobody"]);
        assert!(err.contains("group \"nobody\" does not exist"), "{err}");
        let err = fails(at, &["dlq", "list", "--group", "nobody"]);
        assert!(err.contains("nobody"), "{err}");
        let err = fails(at, &["topic", "update", "nowhere", "--queues", "2"]);
        assert!(err.contains("topic \"nowhere\" does not exist"), "{err}");
        let err = fails(
            at,
            &["message", "query", "--topic", "nowhere", "--key", "k"],
        );
        assert!(err.contains("topic \"nowhere\" does not exist"), "{err}");
        let err = fails(at, &["txn", "list-discarded", "--topic", "nowhere"]);
        assert!(err.contains("topic \"nowhere\" does not exist"), "{err}");
        let err = fails(at, &["topic", "create", "t", "--types", "NORML"]);
        assert!(err.contains("NORML"), "{err}");
        json(at, &["group", "create", "g"]);
        json(at, &["topic", "create", "t"]);
        let err = fails(
            at,
            &[
                "offset",
                "reset",
                "--group",
                "g",
                "--topic",
                "t",
                "--to-time",
                "yesterday",
            ],
        );
        assert!(err.contains("RFC 3339"), "{err}");
        let err = fails(at, &["offset", "reset", "--group", "g", "--topic", "t"]);
        assert!(err.contains("--to-time"), "{err}");
        let err = fails(
            at,
            &[
                "offset",
                "reset",
                "--group",
                "g",
                "--topic",
                "t",
                "--to-offset",
                "0",
                "--queue",
                "99",
            ],
        );
        assert!(err.contains("queue_ids: 99"), "{err}");
        let err = fails(at, &["message", "show", "NO-SUCH-ID"]);
        assert!(err.contains("NO-SUCH-ID is not stored"), "{err}");
    })
    .await;
}
