//! A broker joined to a nameserver: clients use the nameserver as their access point, and
//! the nameserver drops the broker once it stops heartbeating.
#![cfg(test)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{consumer, create_group, producer, receive_n, start, tag};
use ferrumq_nameserver::NameServer;
use ferrumq_protocol::cluster::ListBrokersRequest;
use ferrumq_protocol::cluster::cluster_service_client::ClusterServiceClient;
use ferrumq_protocol::v2::messaging_service_client::MessagingServiceClient;
use ferrumq_protocol::v2::{Code, QueryRouteRequest, Resource};
use rocketmq::model::message::MessageBuilder;

async fn start_nameserver(expiry: Duration) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(NameServer::serve(
        listener,
        expiry,
        Duration::from_millis(200),
        std::future::pending(),
    ));
    addr
}

async fn route_code(nameserver: SocketAddr, topic: &str) -> i32 {
    route_status(nameserver, topic).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_reach_the_broker_through_the_nameserver_which_drops_it_when_silent() {
    let nameserver = start_nameserver(Duration::from_millis(1000)).await;
    let broker = start(|c| {
        c.nameservers = vec![nameserver.to_string()];
        c.heartbeat_interval_ms = 200;
        c.broker_expiry_ms = 1000;
    })
    .await;
    create_group(broker.addr(), "g", 17).await;

    // The nameserver is the access point; sends and receives go to the broker it names.
    let producer = producer(nameserver, "routed").await;
    let receipt = producer
        .send(
            MessageBuilder::builder()
                .set_topic("routed")
                .set_body(b"via nameserver".to_vec())
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
    let consumer = consumer(nameserver, "g", "routed").await;
    let got = receive_n(
        &consumer,
        "routed",
        &tag("*"),
        1,
        Duration::from_secs(30),
        true,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message_id(), receipt.message_id());
    let _ = producer.shutdown().await;
    let _ = consumer.shutdown().await;

    let mut cluster = ClusterServiceClient::connect(format!("http://{nameserver}"))
        .await
        .unwrap();
    let brokers = cluster
        .list_brokers(ListBrokersRequest {})
        .await
        .unwrap()
        .into_inner()
        .brokers;
    assert_eq!(brokers.len(), 1);
    assert_eq!(route_code(nameserver, "routed").await, Code::Ok as i32);

    // The broker stops; within the expiry it leaves the routes.
    broker.running.shutdown().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let brokers = cluster
            .list_brokers(ListBrokersRequest {})
            .await
            .unwrap()
            .into_inner()
            .brokers;
        if brokers.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the silent broker was never dropped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        route_code(nameserver, "routed").await,
        Code::TopicNotFound as i32
    );
}

/// QueryRoute of `topic` sent to `addr` (a broker or a nameserver): the status's code and
/// message, and how long the answer took. The client waits at most 10 s.
async fn route_status(addr: SocketAddr, topic: &str) -> (i32, String, Duration) {
    let mut client = MessagingServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let mut request = tonic::Request::new(QueryRouteRequest {
        topic: Some(Resource {
            resource_namespace: String::new(),
            name: topic.into(),
        }),
        endpoints: None,
    });
    request
        .metadata_mut()
        .insert("x-mq-client-id", "t@1#1".parse().unwrap());
    request.set_timeout(Duration::from_secs(10));
    let started = Instant::now();
    let status = client
        .query_route(request)
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    (status.code, status.message, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_nameserver_costs_a_route_query_its_timeout_and_the_next_one_answers() {
    // A nameserver that accepts connections and never answers (a hung process) used to hold a
    // broker's route query, and its heartbeat loop, for as long as the caller would wait.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let nameserver = start_nameserver(Duration::from_secs(30)).await;

    // Only the silent one: a refusal naming it, within the timeout, not the caller's 10 s.
    let alone = start(|c| {
        c.nameservers = vec![silent_addr.to_string()];
        c.nameserver_timeout_ms = 300;
    })
    .await;
    let (code, message, took) = route_status(alone.addr(), "lonely").await;
    assert_ne!(code, Code::Ok as i32);
    assert!(message.contains(&silent_addr.to_string()), "{message}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    alone.running.shutdown().await.unwrap();

    // The silent one first: the broker moves on to the one that answers.
    let broker = start(|c| {
        c.nameservers = vec![silent_addr.to_string(), nameserver.to_string()];
        c.nameserver_timeout_ms = 300;
    })
    .await;
    let (code, message, took) = route_status(broker.addr(), "routed").await;
    assert_eq!(code, Code::Ok as i32, "{message}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    broker.running.shutdown().await.unwrap();
}
