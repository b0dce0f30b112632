//! Sending: one message or many, scheduled, FIFO, and transactions with check-backs.
//!
//! `send` hands the message to the topic's batcher task. While fewer than
//! `max_in_flight_requests` requests are out, a message goes at once; when all are out,
//! messages wait and leave together as one request when a slot frees. So a lone sender sees
//! one round trip and many concurrent senders share requests, with no timer in between.
//!
//! A request that fails for a reason that may pass (a broker gone, throttling, a persistence
//! timeout) is sent again, to another broker if the first one looks gone, with the same
//! message ids. A batch that the broker refuses outright is sent again message by message,
//! so each caller gets the refusal of its own message.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use ferrumq_protocol::v2::telemetry_command::Command;
use ferrumq_protocol::v2::{
    self, ClientType, EndTransactionRequest, Publishing, RecallMessageRequest, SendResultEntry,
    Settings, TelemetryCommand, TransactionSource, settings,
};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;

use crate::config::ClientConfig;
use crate::error::{Error, Result};
use crate::framed::{self, EncodedRequest};
use crate::message::{Message, ReceivedMessage, SendReceipt};
use crate::telemetry::{CommandHandler, Telemetry};
use crate::transport::{Transport, resource};

/// A producer's decision on a transaction, or its answer to a check-back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionResolution {
    /// Deliver the message.
    Commit,
    /// Drop it.
    Rollback,
    /// Not known yet: the broker asks again later.
    Unknown,
}

type Checker = Arc<
    dyn Fn(ReceivedMessage) -> Pin<Box<dyn Future<Output = TransactionResolution> + Send>>
        + Send
        + Sync,
>;

/// Sends messages; see the [crate docs](crate) for examples. Cheap to share behind an `Arc`;
/// dropping it stops its background tasks (call [`Producer::shutdown`] to let queued sends
/// finish first).
pub struct Producer {
    inner: Arc<Inner>,
}

struct Inner {
    transport: Arc<Transport>,
    telemetry: Arc<Telemetry>,
    options: Options,
    batchers: Mutex<HashMap<String, Batcher>>,
    closed: AtomicBool,
    transactional: bool,
}

struct Batcher {
    queue: mpsc::Sender<Pending>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Clone)]
struct Options {
    max_attempts: u32,
    max_batch_messages: usize,
    max_batch_bytes: usize,
    max_in_flight: usize,
    max_body_bytes: usize,
}

struct Pending {
    message: v2::Message,
    /// A FIFO message's group hash: its group always goes to the same broker.
    sticky: Option<u32>,
    reply: oneshot::Sender<Result<SendReceipt>>,
}

/// Configures a [`Producer`].
pub struct ProducerBuilder {
    config: ClientConfig,
    topics: Vec<String>,
    options: Options,
    checker: Option<Checker>,
}

impl ProducerBuilder {
    /// Topics to look up when the producer starts: an unknown one fails `build`, and the
    /// connections to their brokers are open before the first send. A transactional
    /// producer declares them to the brokers too, so that after a restart (a new client
    /// id) it is asked about the transactions its predecessor left open.
    #[must_use]
    pub fn topics<I, S>(mut self, topics: I) -> ProducerBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.topics.extend(topics.into_iter().map(Into::into));
        self
    }

    /// Tries per send, counting the first (3 by default).
    #[must_use]
    pub fn max_attempts(mut self, attempts: u32) -> ProducerBuilder {
        self.options.max_attempts = attempts;
        self
    }

    /// Most messages that concurrent `send` calls share one request with (256; at most 1024).
    #[must_use]
    pub fn max_batch_messages(mut self, messages: usize) -> ProducerBuilder {
        self.options.max_batch_messages = messages;
        self
    }

    /// Most body bytes in one shared request (4 MiB).
    #[must_use]
    pub fn max_batch_bytes(mut self, bytes: usize) -> ProducerBuilder {
        self.options.max_batch_bytes = bytes;
        self
    }

    /// Requests out at once per topic (16); more concurrent sends are batched.
    #[must_use]
    pub fn max_in_flight_requests(mut self, requests: usize) -> ProducerBuilder {
        self.options.max_in_flight = requests;
        self
    }

    /// Makes the producer transactional: `checker` answers the broker's check-backs for
    /// transactions whose producer did not decide in time (for example, because it crashed
    /// between sending the half message and committing).
    #[must_use]
    pub fn transaction_checker<F, Fut>(mut self, checker: F) -> ProducerBuilder
    where
        F: Fn(ReceivedMessage) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = TransactionResolution> + Send + 'static,
    {
        self.checker = Some(Arc::new(move |message| Box::pin(checker(message))));
        self
    }

    /// Checks the configuration, looks up the topics and opens the brokers' streams.
    pub async fn build(self) -> Result<Producer> {
        let options = self.options;
        if options.max_attempts == 0 || options.max_in_flight == 0 {
            return Err(Error::Config(
                "max_attempts and max_in_flight_requests must be at least 1".into(),
            ));
        }
        if !(1..=1024).contains(&options.max_batch_messages) {
            return Err(Error::Config(format!(
                "max_batch_messages is {}; it must be between 1 and 1024",
                options.max_batch_messages
            )));
        }
        let transport = Transport::new(self.config)?;
        let settings = Settings {
            client_type: Some(ClientType::Producer as i32),
            pub_sub: Some(settings::PubSub::Publishing(Publishing {
                topics: self.topics.iter().filter_map(|t| resource(t)).collect(),
                max_body_size: 0,
                validate_message_type: false,
            })),
            ..Settings::default()
        };
        let handler = self
            .checker
            .clone()
            .map(|checker| check_back_handler(transport.clone(), checker));
        let telemetry = Telemetry::new(transport.clone(), settings, handler);
        let mut inner = Inner {
            transport,
            telemetry,
            options,
            batchers: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            transactional: self.checker.is_some(),
        };
        for topic in &self.topics {
            let route = inner.transport.route(topic).await?;
            for broker in route.brokers(true) {
                let reply = inner.telemetry.settings(&broker).await;
                if let Some(settings::PubSub::Publishing(p)) = reply.and_then(|s| s.pub_sub)
                    && let Ok(limit @ 1..) = usize::try_from(p.max_body_size)
                {
                    inner.options.max_body_bytes = limit;
                }
            }
        }
        Ok(Producer {
            inner: Arc::new(inner),
        })
    }
}

impl Producer {
    pub fn builder(config: ClientConfig) -> ProducerBuilder {
        ProducerBuilder {
            config,
            topics: Vec::new(),
            options: Options {
                max_attempts: 3,
                max_batch_messages: 256,
                max_batch_bytes: 4 << 20,
                max_in_flight: 16,
                max_body_bytes: 4 << 20,
            },
            checker: None,
        }
    }

    /// Sends one message and waits until the broker has stored it.
    pub async fn send(&self, message: Message) -> Result<SendReceipt> {
        self.inner.check_open()?;
        message.validate(self.inner.options.max_body_bytes)?;
        let sticky = message
            .message_group()
            .map(|g| crc32fast::hash(g.as_bytes()));
        let queue = self.inner.batcher(message.topic())?;
        let (reply, receipt) = oneshot::channel();
        let pending = Pending {
            message: message.into_wire(false, SystemTime::now()),
            sticky,
            reply,
        };
        queue
            .send(pending)
            .await
            .map_err(|_| Error::Shutdown("producer"))?;
        receipt.await.map_err(|_| Error::Shutdown("producer"))?
    }

    /// Sends messages of one topic in one request: all are stored, or none.
    pub async fn send_batch(&self, messages: Vec<Message>) -> Result<Vec<SendReceipt>> {
        self.inner.check_open()?;
        let Some(topic) = messages.first().map(|m| m.topic().to_owned()) else {
            return Ok(Vec::new());
        };
        for (i, message) in messages.iter().enumerate() {
            message
                .validate(self.inner.options.max_body_bytes)
                .map_err(|e| Error::InvalidMessage(format!("messages[{i}]: {e}")))?;
            if message.topic() != topic {
                return Err(Error::InvalidMessage(format!(
                    "messages[{i}] is for topic {:?} and messages[0] for {topic:?}; a batch has one topic",
                    message.topic()
                )));
            }
        }
        let sticky = messages[0]
            .message_group()
            .map(|g| crc32fast::hash(g.as_bytes()));
        let now = SystemTime::now();
        let wire: Vec<v2::Message> = messages
            .into_iter()
            .map(|m| m.into_wire(false, now))
            .collect();
        let (endpoint, entries) = self.inner.send_wire(&topic, &wire, sticky).await?;
        let mut entries = entries.into_iter();
        wire.iter()
            .map(|_| receipt(&endpoint, &topic, entries.next()))
            .collect()
    }

    /// Sends `message` as the half of a transaction: stored, but not delivered until the
    /// returned [`Transaction`] is committed. Needs a
    /// [`transaction_checker`](ProducerBuilder::transaction_checker).
    pub async fn begin(&self, message: Message) -> Result<Transaction> {
        self.inner.check_open()?;
        if !self.inner.transactional {
            return Err(Error::Config(
                "a transaction needs a checker for the broker's check-backs; set one with ProducerBuilder::transaction_checker".into(),
            ));
        }
        message.validate(self.inner.options.max_body_bytes)?;
        let topic = message.topic().to_owned();
        let wire = message.into_wire(true, SystemTime::now());
        let (endpoint, entries) = self
            .inner
            .send_wire(&topic, std::slice::from_ref(&wire), None)
            .await?;
        let entry = entries.into_iter().next();
        let transaction_id = entry
            .as_ref()
            .map(|e| e.transaction_id.clone())
            .unwrap_or_default();
        let half = receipt(&endpoint, &topic, entry)?;
        Ok(Transaction {
            transport: self.inner.transport.clone(),
            topic,
            endpoint,
            message_id: half.message_id,
            transaction_id,
        })
    }

    /// Cancels a scheduled message before its delivery time.
    pub async fn recall(&self, receipt: &SendReceipt) -> Result<()> {
        let handle = receipt.recall_handle.as_deref().ok_or_else(|| {
            Error::InvalidMessage(format!(
                "message {} was not scheduled, so it cannot be recalled",
                receipt.message_id
            ))
        })?;
        let request = RecallMessageRequest {
            topic: resource(&receipt.topic),
            recall_handle: handle.to_owned(),
        };
        self.inner
            .transport
            .unary(&receipt.endpoint, request, |mut rpc, r| async move {
                rpc.recall_message(r).await
            })
            .await?;
        Ok(())
    }

    /// Lets queued sends finish, then closes the brokers' streams.
    pub async fn shutdown(self) {
        self.inner.closed.store(true, Ordering::Release);
        let batchers: Vec<Batcher> = self
            .inner
            .batchers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .map(|(_, b)| b)
            .collect();
        for batcher in batchers {
            drop(batcher.queue);
            let _ = batcher.task.await;
        }
        self.inner.telemetry.close();
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner
            .batchers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        self.inner.telemetry.close();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.telemetry.close();
    }
}

impl Inner {
    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Shutdown("producer"));
        }
        Ok(())
    }

    /// The queue of `topic`'s batcher task, started on first use.
    fn batcher(self: &Arc<Self>, topic: &str) -> Result<mpsc::Sender<Pending>> {
        let mut batchers = self.batchers.lock().unwrap_or_else(PoisonError::into_inner);
        self.check_open()?;
        if let Some(batcher) = batchers.get(topic) {
            return Ok(batcher.queue.clone());
        }
        let (queue, pending) = mpsc::channel(self.options.max_batch_messages * 4);
        let task = tokio::spawn(self.clone().run_batcher(topic.to_owned(), pending));
        batchers.insert(
            topic.to_owned(),
            Batcher {
                queue: queue.clone(),
                task,
            },
        );
        Ok(queue)
    }

    async fn run_batcher(self: Arc<Self>, topic: String, mut queue: mpsc::Receiver<Pending>) {
        let slots = Arc::new(Semaphore::new(self.options.max_in_flight));
        let mut requests = JoinSet::new();
        while let Some(first) = queue.recv().await {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            let mut bytes = first.message.body.len();
            let mut batch = vec![first];
            while batch.len() < self.options.max_batch_messages
                && bytes < self.options.max_batch_bytes
            {
                match queue.try_recv() {
                    Ok(next) => {
                        bytes += next.message.body.len();
                        batch.push(next);
                    }
                    Err(_) => break,
                }
            }
            let (inner, topic) = (self.clone(), topic.clone());
            requests.spawn(async move {
                inner.send_pending(&topic, batch).await;
                drop(slot);
            });
            while requests.try_join_next().is_some() {}
        }
        while requests.join_next().await.is_some() {}
    }

    /// Sends a batch of queued messages, FIFO groups apart so each goes to its own broker.
    async fn send_pending(&self, topic: &str, batch: Vec<Pending>) {
        let brokers = match self.transport.route(topic).await {
            Ok(route) => u32::try_from(route.brokers(true).len().max(1)).unwrap_or(1),
            Err(_) => 1,
        };
        let mut parts: Vec<(Option<u32>, Vec<Pending>)> = Vec::new();
        for pending in batch {
            let key = pending.sticky.map(|h| h % brokers);
            match parts.iter_mut().find(|(k, _)| *k == key) {
                Some((_, part)) => part.push(pending),
                None => parts.push((key, vec![pending])),
            }
        }
        for (sticky, part) in parts {
            let (messages, replies): (Vec<_>, Vec<_>) =
                part.into_iter().map(|p| (p.message, p.reply)).unzip();
            match self.send_wire(topic, &messages, sticky).await {
                Ok((endpoint, entries)) => {
                    let mut entries = entries.into_iter();
                    for reply in replies {
                        let _ = reply.send(receipt(&endpoint, topic, entries.next()));
                    }
                }
                Err(e) if messages.len() == 1 || e.is_retryable() => {
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
                Err(_) => {
                    for (message, reply) in messages.into_iter().zip(replies) {
                        let alone = self
                            .send_wire(topic, std::slice::from_ref(&message), sticky)
                            .await
                            .and_then(|(endpoint, entries)| {
                                receipt(&endpoint, topic, entries.into_iter().next())
                            });
                        let _ = reply.send(alone);
                    }
                }
            }
        }
    }

    /// Sends `messages` in one request, with retries; returns the broker and its entries.
    async fn send_wire(
        &self,
        topic: &str,
        messages: &[v2::Message],
        sticky: Option<u32>,
    ) -> Result<(String, Vec<SendResultEntry>)> {
        let encoded = EncodedRequest::send(messages, &self.transport.buffers);
        let mut last = None;
        for attempt in 0..self.options.max_attempts {
            // A broker that is gone is left at once for another; anything else waits a bit.
            if let Some(e) = &last
                && !matches!(e, Error::Unreachable { .. })
            {
                let backoff = Duration::from_millis(10 << attempt.min(7));
                tokio::time::sleep(backoff.min(Duration::from_secs(1))).await;
            }
            let route = match self.transport.route(topic).await {
                Ok(route) => route,
                Err(e) if e.is_retryable() => {
                    last = Some(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let brokers = self
                .transport
                .in_preference_order(route.brokers(true), sticky.map(|h| h as usize));
            let Some(endpoint) = brokers.into_iter().next() else {
                return Err(Error::NoRoute {
                    topic: topic.to_owned(),
                    reason: "its route has no writable queue".into(),
                });
            };
            self.telemetry.open(&endpoint);
            match self
                .transport
                .call_encoded::<v2::SendMessageResponse>(
                    &endpoint,
                    framed::SEND_MESSAGE,
                    encoded.clone(),
                )
                .await
            {
                Ok(reply) => return Ok((endpoint, reply.entries)),
                Err(e) if e.is_retryable() => {
                    tracing::debug!(%e, attempt, "send failed; trying again");
                    if e.is_endpoint_down() {
                        self.transport.mark_down(&endpoint);
                        let _ = self.transport.refresh_route(topic).await;
                    }
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(Error::Shutdown("producer")))
    }
}

/// One message's receipt from its entry in the reply.
fn receipt(endpoint: &str, topic: &str, entry: Option<SendResultEntry>) -> Result<SendReceipt> {
    let entry = entry.ok_or_else(|| Error::Broker {
        endpoint: endpoint.to_owned(),
        code: v2::Code::InternalError as i32,
        message: "the reply has fewer entries than messages were sent".into(),
    })?;
    Error::check(endpoint, entry.status.as_ref())?;
    Ok(SendReceipt::from_wire(endpoint, topic, entry))
}

/// A transaction whose half message is stored; [`commit`](Transaction::commit) or
/// [`rollback`](Transaction::rollback) it. Dropped undecided, it is left to the broker's
/// check-back, which the producer's checker answers.
#[derive(Debug)]
#[must_use = "a transaction is decided by commit or rollback, or else by a check-back"]
pub struct Transaction {
    transport: Arc<Transport>,
    topic: String,
    endpoint: String,
    message_id: String,
    transaction_id: String,
}

impl Transaction {
    pub fn message_id(&self) -> &str {
        &self.message_id
    }

    pub fn transaction_id(&self) -> &str {
        &self.transaction_id
    }

    /// Delivers the message; returns once the decision is durable.
    pub async fn commit(self) -> Result<()> {
        self.end(TransactionResolution::Commit).await
    }

    /// Drops the message; returns once the decision is durable.
    pub async fn rollback(self) -> Result<()> {
        self.end(TransactionResolution::Rollback).await
    }

    async fn end(self, resolution: TransactionResolution) -> Result<()> {
        end_transaction(
            &self.transport,
            &self.endpoint,
            &self.topic,
            &self.message_id,
            &self.transaction_id,
            resolution,
            TransactionSource::SourceClient,
        )
        .await
    }
}

/// Tells the broker holding the half message the decision, trying again while it may pass.
async fn end_transaction(
    transport: &Transport,
    endpoint: &str,
    topic: &str,
    message_id: &str,
    transaction_id: &str,
    resolution: TransactionResolution,
    source: TransactionSource,
) -> Result<()> {
    let resolution = match resolution {
        TransactionResolution::Commit => v2::TransactionResolution::Commit,
        TransactionResolution::Rollback => v2::TransactionResolution::Rollback,
        TransactionResolution::Unknown => return Ok(()),
    };
    let mut attempt = 0;
    loop {
        let request = EndTransactionRequest {
            topic: resource(topic),
            message_id: message_id.to_owned(),
            transaction_id: transaction_id.to_owned(),
            resolution: resolution as i32,
            source: source as i32,
            trace_context: String::new(),
        };
        let result = transport
            .unary(endpoint, request, |mut rpc, r| async move {
                rpc.end_transaction(r).await
            })
            .await
            .map(drop);
        match result {
            Err(e) if e.is_retryable() && attempt < 2 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
            }
            other => return other,
        }
    }
}

/// Answers each check-back with the checker's resolution (nothing for "unknown": the broker
/// asks again later).
fn check_back_handler(transport: Arc<Transport>, checker: Checker) -> CommandHandler {
    Arc::new(move |endpoint: &str, command: TelemetryCommand| {
        let Some(Command::RecoverOrphanedTransactionCommand(check)) = command.command else {
            return;
        };
        let Some(message) = check.message else {
            return;
        };
        let message = ReceivedMessage::from_wire(&Arc::from(endpoint), message.into());
        let (transport, checker, endpoint) =
            (transport.clone(), checker.clone(), endpoint.to_owned());
        tokio::spawn(async move {
            let (topic, id) = (message.topic.clone(), message.message_id.clone());
            let resolution = checker(message).await;
            tracing::debug!(message_id = %id, ?resolution, "answering a transaction check-back");
            let answered = end_transaction(
                &transport,
                &endpoint,
                &topic,
                &id,
                &check.transaction_id,
                resolution,
                TransactionSource::SourceServerCheck,
            )
            .await;
            if let Err(e) = answered {
                tracing::warn!(message_id = %id, %e, "could not answer a transaction check-back; the broker will ask again");
            }
        });
    })
}
