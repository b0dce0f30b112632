//! `ferrumq-client`: an async Rust client for ferrumq (and any broker speaking Apache
//! RocketMQ 5's gRPC protocol, `apache.rocketmq.v2`).
//!
//! - [`Producer`]: sends and waits for the broker's receipt; concurrent sends share requests
//!   (batching without a timer); delays, FIFO message groups, transactions with a checker
//!   for the broker's check-backs; retries keep the message id, so a ferrumq broker that stored
//!   the first attempt (within its duplicate window) answers a retry without storing it again.
//! - [`SimpleConsumer`]: receive, ack, change a lease, at the application's pace.
//! - [`PushConsumer`]: a listener with bounded concurrency, lease renewal while it works, an
//!   ordered mode for FIFO groups and a shutdown that finishes the work in hand.
//! - [`BroadcastConsumer`]: every instance gets every message, from its own offsets.
//!
//! Every client finds a topic's brokers through its access points (brokers or nameservers),
//! refreshes routes every 30 s, and sends elsewhere while a broker is unreachable (except a
//! FIFO message group, which stays on its broker). Push and broadcast consumers follow route
//! changes at each refresh: they start reading from a broker that joins, and stop polling one
//! that fails and has left the route.
//! Errors ([`Error`]) name the RocketMQ code and say what to do.
//!
//! # Producing
//!
//! A topic accepts the message types it was created with, for example
//! `ferrumq-admin topic create orders --types NORMAL,DELAY,FIFO`.
//!
//! ```
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! # let (_broker, _dir, access_point) = doc::broker().await?;
//! # doc::create_topic(&access_point, "orders", 4, &["NORMAL", "DELAY", "FIFO"]).await;
//! use std::time::Duration;
//! use ferrumq_client::{ClientConfig, Message, Producer};
//!
//! let producer = Producer::builder(ClientConfig::new(access_point))
//!     .topics(["orders"])
//!     .build()
//!     .await?;
//!
//! // One message; the receipt comes once the broker has stored it.
//! let receipt = producer
//!     .send(Message::new("orders", "order 42 paid").with_tag("paid").with_key("42"))
//!     .await?;
//! println!("stored {} at offset {}", receipt.message_id, receipt.offset);
//!
//! // Several in one request: all stored, or none.
//! let batch = (0..3).map(|i| Message::new("orders", format!("order {i}"))).collect();
//! assert_eq!(producer.send_batch(batch).await?.len(), 3);
//!
//! // Delivered in an hour, not before; recallable until then.
//! let later = producer
//!     .send(Message::new("orders", "remind").deliver_after(Duration::from_secs(3600)))
//!     .await?;
//! producer.recall(&later).await?;
//!
//! // FIFO: one customer's messages are consumed one at a time, in this order.
//! for step in ["created", "paid", "shipped"] {
//!     producer
//!         .send(Message::new("orders", step).with_message_group("customer-7"))
//!         .await?;
//! }
//! producer.shutdown().await;
//! # Ok(()) }
//! # #[allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]
//! # mod doc { include!("../tests/support/mod.rs"); }
//! ```
//!
//! # Transactions
//!
//! The half message is stored but not delivered until the transaction commits. If the
//! producer never decides (it crashed, say), the broker asks the checker.
//!
//! ```
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! # let (_broker, _dir, access_point) = doc::broker().await?;
//! # doc::create_topic(&access_point, "payments", 4, &["TRANSACTION"]).await;
//! use ferrumq_client::{ClientConfig, Message, Producer, TransactionResolution};
//!
//! let producer = Producer::builder(ClientConfig::new(access_point))
//!     .transaction_checker(|message| async move {
//!         // Look the order up in the database: was it saved?
//!         let _order = message.keys.first().cloned();
//!         TransactionResolution::Commit
//!     })
//!     .build()
//!     .await?;
//! let transaction = producer
//!     .begin(Message::new("payments", "debit 10 EUR").with_key("order-42"))
//!     .await?;
//! // ... write the order to the database in the same breath ...
//! transaction.commit().await?;
//! # Ok(()) }
//! # #[allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]
//! # mod doc { include!("../tests/support/mod.rs"); }
//! ```
//!
//! # Consuming at your own pace
//!
//! ```
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! # let (_broker, _dir, access_point) = doc::broker().await?;
//! # let producer = ferrumq_client::Producer::builder(ferrumq_client::ClientConfig::new(access_point.clone())).build().await?;
//! # producer.send(ferrumq_client::Message::new("orders", "order 42 paid").with_tag("paid")).await?;
//! use std::time::Duration;
//! use ferrumq_client::{ClientConfig, Filter, SimpleConsumer};
//!
//! let consumer = SimpleConsumer::builder(ClientConfig::new(access_point), "billing")
//!     .subscribe("orders", Filter::Tag("paid || refunded".into()))
//!     .build()
//!     .await?;
//! // Each message is leased for 30 s: not acked by then, it is delivered again.
//! for mut message in consumer.receive(16, Duration::from_secs(30)).await? {
//!     if message.body.len() > 1_000_000 {
//!         // Needs longer: extend the lease (the message gets the new handle).
//!         consumer.change_invisible_duration(&mut message, Duration::from_secs(120)).await?;
//!     }
//!     consumer.ack(&message).await?;
//! }
//! consumer.shutdown().await;
//! # Ok(()) }
//! # #[allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]
//! # mod doc { include!("../tests/support/mod.rs"); }
//! ```
//!
//! # A listener
//!
//! ```
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! # let (_broker, _dir, access_point) = doc::broker().await?;
//! use ferrumq_client::{ClientConfig, ConsumeResult, Filter, PushConsumer};
//!
//! let consumer = PushConsumer::builder(ClientConfig::new(access_point), "shipping")
//!     .subscribe("orders", Filter::all())
//!     .concurrency(32)
//!     // A shutdown lets the receive under way finish: this bounds how long that takes.
//!     .long_polling(std::time::Duration::from_secs(1))
//!     .listener(|message| async move {
//!         match std::str::from_utf8(&message.body) {
//!             Ok(_order) => ConsumeResult::Success,
//!             // Delivered again after the group's retry backoff.
//!             Err(_) => ConsumeResult::Failure,
//!         }
//!     })
//!     .build()
//!     .await?;
//! // ... later: stop receiving, finish and ack what is in hand.
//! consumer.shutdown().await;
//! # Ok(()) }
//! # #[allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]
//! # mod doc { include!("../tests/support/mod.rs"); }
//! ```
//!
//! # Broadcast
//!
//! ```
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! # let (_broker, dir, access_point) = doc::broker().await?;
//! # let offsets = dir.path().join("cache-offsets");
//! use ferrumq_client::{BroadcastConsumer, ClientConfig, ConsumeResult, Filter, StartFrom};
//!
//! // Every instance of the cache gets every invalidation.
//! let consumer = BroadcastConsumer::builder(ClientConfig::new(access_point), "cache")
//!     .subscribe("invalidations", Filter::all())
//!     .offset_file(offsets)
//!     .start_from(StartFrom::Latest)
//!     .listener(|message| async move {
//!         let _key = message.body;
//!         ConsumeResult::Success
//!     })
//!     .build()
//!     .await?;
//! consumer.shutdown().await?;
//! # Ok(()) }
//! # #[allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]
//! # mod doc { include!("../tests/support/mod.rs"); }
//! ```

mod broadcast;
mod config;
mod consumer;
mod error;
mod framed;
mod message;
mod producer;
mod push_consumer;
mod simple_consumer;
mod telemetry;
mod transport;

pub use broadcast::{BroadcastConsumer, BroadcastConsumerBuilder, StartFrom};
pub use config::ClientConfig;
pub use consumer::Filter;
pub use error::{Error, Result};
pub use message::{Message, ReceivedMessage, SendReceipt};
pub use producer::{Producer, ProducerBuilder, Transaction, TransactionResolution};
pub use push_consumer::{ConsumeResult, PushConsumer, PushConsumerBuilder};
pub use simple_consumer::{SimpleConsumer, SimpleConsumerBuilder};
