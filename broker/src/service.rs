//! The broker's domain service: what each client request does, independent of gRPC. The
//! handlers in `grpc/` only convert requests and responses and call in here.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferrumq_nameserver::RouteTable;
use ferrumq_protocol::cluster::{BrokerRegistration, TopicRoute};
use ferrumq_protocol::frame::EncodedMessage;
use ferrumq_protocol::session::{SettingsPolicy, TelemetrySender};
use ferrumq_protocol::v2::{self, Code, MessageQueue, QueryOffsetPolicy, SendResultEntry, Status};
use ferrumq_storage::{
    Appended, LogPos, MessageStore, MessageType, NewRecord, QueueOffset, StoredRecord, TermIndex,
};
use tokio::sync::watch;

use crate::config::BrokerConfig;
use crate::consumer::{ConsumerGroups, OPS_TOPIC};
use crate::duplicates::DuplicateWindow;
use crate::error::{ApiError, ApiResult};
use crate::filter::Filter;
use crate::log_writer::{Leadership, LogWriter};
use crate::message::{
    self, BodyDigest, CheckedMessage, Delivery, FieldNames, Kind, Placement, property,
};
use crate::metadata::{self, GroupConfig, Metadata, TopicConfig};
use crate::metrics::Metrics;
use crate::timer::{self, TIMER_TOPIC, Timers};
use crate::transaction::{HALF_TOPIC, Transactions, transaction_id};

/// Where QueryRoute answers come from.
pub enum Routes {
    /// Standalone: this process keeps the route table.
    Embedded(Arc<RouteTable>),
    /// Cluster: the nameservers keep it; this broker registers with them.
    Nameservers(crate::cluster::Nameservers),
}

/// A receive request after its fields were read off the wire.
pub struct ReceiveRequest<'a> {
    pub group: &'a str,
    pub topic: &'a str,
    /// The wire's `FilterType` number, checked by `Filter::parse`.
    pub filter_type: i32,
    pub filter_expression: &'a str,
    pub batch_size: i32,
    pub invisible: Option<&'a prost_types::Duration>,
    pub auto_renew: bool,
    pub long_polling: Option<&'a prost_types::Duration>,
    /// When the caller stops waiting (the gRPC deadline).
    pub deadline: Option<Instant>,
    pub client_id: &'a str,
    pub digest: BodyDigest,
}

/// A PullMessage: up to `batch_size` messages of one queue from `offset`, whatever any
/// consumer group has done.
pub struct PullRequest<'a> {
    pub topic: &'a str,
    pub queue_id: i32,
    pub offset: i64,
    pub batch_size: i32,
    /// The wire's `FilterType` number and the expression.
    pub filter: Option<(i32, &'a str)>,
    pub long_polling: Option<&'a prost_types::Duration>,
    pub digest: BodyDigest,
}

/// One stored message of a send.
#[derive(Debug, Clone)]
pub struct Sent {
    /// What the gRPC reply says: message id, queue offset, transaction id, recall handle.
    pub result: SendResultEntry,
    /// The queue it is in; `None` while it waits in an internal topic (a half message, or
    /// one scheduled for later), whose offsets are not the topic's.
    pub queue: Option<u32>,
    /// When a DELAY message becomes visible, in ms since the epoch.
    pub deliver_at_ms: Option<i64>,
}

pub struct Broker {
    pub config: Arc<BrokerConfig>,
    pub store: Arc<MessageStore>,
    /// The one way appends reach the log, and when they are committed.
    pub log: LogWriter,
    /// Whether this node starts leader-only work (timers, check-backs, sweeps, retention).
    pub leadership: Arc<Leadership>,
    pub metadata: Arc<Metadata>,
    pub consumers: Arc<ConsumerGroups>,
    pub transactions: Arc<Transactions>,
    pub timers: Arc<Timers>,
    pub metrics: Arc<Metrics>,
    pub routes: Routes,
    /// Recent sends by message id, to recognise a producer's retry; held from the check
    /// through the append, so two sends of one id cannot both be stored.
    duplicates: Mutex<DuplicateWindow>,
    /// `host:port` clients use to reach this broker.
    pub endpoint: String,
    pub started_ms: i64,
    /// The commit-log position dispatched so far; changes wake waiting receives.
    pub dispatched: watch::Receiver<u64>,
    next_queue: AtomicU32,
    telemetry: Mutex<Vec<(String, TelemetrySender)>>,
    /// The topics each producer declared in its Settings: it is asked about their
    /// transactions too, even with a client id the broker has not seen them from.
    declared_topics: Mutex<HashMap<String, Vec<String>>>,
    /// Wakes waiting receives when a message is finished or its lease changes: in a FIFO
    /// group that frees the next message of its message group.
    released: tokio::sync::Notify,
}

/// What a [`Broker`] is made of; `start` in the crate root opens each part.
pub struct Parts {
    pub config: Arc<BrokerConfig>,
    pub store: Arc<MessageStore>,
    pub log: LogWriter,
    pub leadership: Arc<Leadership>,
    pub metadata: Arc<Metadata>,
    pub consumers: Arc<ConsumerGroups>,
    pub transactions: Arc<Transactions>,
    pub timers: Arc<Timers>,
    pub duplicates: DuplicateWindow,
    pub metrics: Arc<Metrics>,
    pub routes: Routes,
    pub endpoint: String,
    pub dispatched: watch::Receiver<u64>,
}

/// Runs `work`, which may block for a while, without stalling the other tasks of this
/// worker thread (on a multi-threaded runtime; elsewhere it simply runs).
fn blocking<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

/// Waits until dispatch moves or `until`, whichever is first. Without a dispatch watcher
/// (it stopped), waits until `until`, so a long poll never spins.
async fn wait_for_progress(dispatched: &mut watch::Receiver<u64>, until: Instant) {
    tokio::select! {
        changed = dispatched.changed() => {
            if changed.is_err() {
                tokio::time::sleep_until(until.into()).await;
            }
        }
        () = tokio::time::sleep_until(until.into()) => {}
    }
}

/// A batch that names one message id twice is refused: the second could only be a mistake,
/// since a retry sends the whole message again on its own.
fn refuse_repeated_ids(
    checked: &[CheckedMessage],
    hashes: &[u64],
    names: &FieldNames,
) -> ApiResult<()> {
    if checked.len() < 2 {
        return Ok(());
    }
    let mut by_hash: Vec<(u64, usize)> = hashes.iter().copied().zip(0..).collect();
    by_hash.sort_unstable();
    for pair in by_hash.windows(2) {
        let ((h1, first), (h2, second)) = (pair[0], pair[1]);
        if h1 == h2 && checked[first].message_id == checked[second].message_id {
            let (first, second) = (first.min(second), first.max(second));
            return Err(ApiError::new(
                Code::IllegalMessageId,
                format!(
                    "{} {:?} repeats {}; each message of a batch needs its own id",
                    names(second, "system_properties.message_id"),
                    checked[second].message_id,
                    names(first, "system_properties.message_id"),
                ),
            ));
        }
    }
    Ok(())
}

/// An OK reply entry for a message stored at queue `offset`.
fn stored_entry(message_id: &str, offset: u64) -> SendResultEntry {
    SendResultEntry {
        status: Some(Status::ok()),
        message_id: message_id.to_owned(),
        transaction_id: String::new(),
        offset: i64::try_from(offset).unwrap_or(i64::MAX),
        recall_handle: String::new(),
    }
}

/// The reply the first send of `record` got, rebuilt from the record: its queue offset, and
/// for a half message its transaction id, for one scheduled later its recall handle.
fn answer_again(topic: &str, message_id: &str, record: &StoredRecord) -> Sent {
    let view = record.view();
    let offset = view.queue_offset.0;
    let deliver_at_ms = view
        .properties
        .get(property::DELIVER_AT_MS)
        .and_then(|at| at.parse().ok());
    let mut result = stored_entry(message_id, offset);
    let queue = match view.topic {
        HALF_TOPIC => {
            result.transaction_id = transaction_id(offset);
            None
        }
        TIMER_TOPIC => {
            if let Some(at) = deliver_at_ms {
                result.recall_handle = timer::recall_handle(topic, offset, at);
            }
            None
        }
        _ => Some(view.queue_id),
    };
    Sent {
        result,
        queue,
        deliver_at_ms,
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Broker {
    pub fn new(parts: Parts) -> Broker {
        Broker {
            config: parts.config,
            store: parts.store,
            log: parts.log,
            leadership: parts.leadership,
            metadata: parts.metadata,
            consumers: parts.consumers,
            transactions: parts.transactions,
            timers: parts.timers,
            metrics: parts.metrics,
            routes: parts.routes,
            duplicates: Mutex::new(parts.duplicates),
            endpoint: parts.endpoint,
            started_ms: now_ms(),
            dispatched: parts.dispatched,
            next_queue: AtomicU32::new(0),
            telemetry: Mutex::new(Vec::new()),
            declared_topics: Mutex::new(HashMap::new()),
            released: tokio::sync::Notify::new(),
        }
    }

    /// Wakes waiting receives after a change that may free messages without new ones
    /// arriving (an ack, a lease change, an offset reset).
    pub(crate) fn wake_receivers(&self) {
        self.released.notify_waiters();
    }

    /// Waits until the log's entries before `end` are committed (see [`LogWriter`]).
    pub(crate) async fn durable(&self, end: Option<LogPos>) -> ApiResult<()> {
        self.log.committed(end).await.map_err(|e| {
            ApiError::new(Code::MasterPersistenceTimeout, format!("flush failed: {e}"))
        })
    }

    /// A client said it is leaving (NotifyClientTermination): the push leases it holds come
    /// back after `push_lease_release_ms`, as when its Telemetry stream ends, instead of
    /// waiting out their lease while that stream is still open.
    pub async fn client_left(&self, client_id: &str) -> ApiResult<()> {
        let release_ms =
            i64::try_from(self.config.limits.push_lease_release_ms).unwrap_or(i64::MAX);
        let end = self
            .consumers
            .release_leases_of(client_id, now_ms(), release_ms)?;
        self.durable(end).await?;
        self.wake_receivers();
        Ok(())
    }

    /// Stores a send's messages, all of one topic. Every message is checked before any is
    /// stored; the reply comes once they are durable (sync flush). `names` names the
    /// fields of a refused message in the caller's terms.
    pub async fn send(
        &self,
        messages: Vec<v2::Message>,
        names: &FieldNames,
        peer: SocketAddr,
        client_id: &str,
    ) -> ApiResult<Vec<Sent>> {
        let result = self.send_inner(messages, names, peer, client_id).await;
        if result.is_err() {
            self.metrics.add_send_error();
        }
        result
    }

    async fn send_inner(
        &self,
        messages: Vec<v2::Message>,
        names: &FieldNames,
        peer: SocketAddr,
        client_id: &str,
    ) -> ApiResult<Vec<Sent>> {
        let limits = &self.config.limits;
        if messages.is_empty() {
            return Err(ApiError::bad_request("messages is empty"));
        }
        if messages.len() > limits.max_batch_messages {
            return Err(ApiError::bad_request(format!(
                "messages has {} entries; the limit is {}",
                messages.len(),
                limits.max_batch_messages
            )));
        }
        let topic_name = messages[0]
            .topic
            .as_ref()
            .map(|t| t.name.clone())
            .unwrap_or_default();
        if let Some(i) = messages
            .iter()
            .position(|m| m.topic.as_ref().map(|t| t.name.as_str()) != Some(topic_name.as_str()))
        {
            return Err(ApiError::new(
                Code::MessageCorrupted,
                format!(
                    "{} differs from {}; a batch has one topic",
                    names(i, "topic"),
                    names(0, "topic")
                ),
            ));
        }
        metadata::check_topic_name(&topic_name)?;
        if metadata::is_system_topic(&topic_name) {
            return Err(ApiError::new(
                Code::IllegalTopic,
                format!(
                    "{} {topic_name:?} is a system topic; producers cannot send to it",
                    names(0, "topic")
                ),
            ));
        }
        // Everything is checked before an unknown topic is created: a refused send leaves
        // no topic behind.
        let now = now_ms();
        let mut checked = messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| message::check(i, names, m, limits, now))
            .collect::<ApiResult<Vec<_>>>()?;
        let hashes: Vec<u64> = checked
            .iter()
            .map(|m| DuplicateWindow::hash(&m.message_id))
            .collect();
        refuse_repeated_ids(&checked, &hashes, names)?;
        // Above the disk watermark new messages are refused; what finishes the messages
        // already held (acks, decisions, due timers, dead letters) is still written.
        self.store.check_space()?;
        let (topic, new_topic) = self.metadata.topic_or_default(&topic_name)?;
        let unplaced = new_topic.then(|| checked.clone());
        self.place_all(&topic, &mut checked, names, now, client_id)?;
        let topic = match unplaced {
            None => topic,
            Some(unplaced) => {
                let created = self.topic_or_create(&topic_name)?;
                if created != topic {
                    // Created meanwhile with other settings: place the messages as they
                    // were checked against those instead.
                    checked = unplaced;
                    self.place_all(&created, &mut checked, names, now, client_id)?;
                }
                created
            }
        };

        let (earlier, appended) = self.append_new(&checked, &hashes, &topic, peer, now)?;
        let records = appended.len();
        let mut last_end = appended.last().map(|a| a.end());
        let mut appended = appended.iter();
        let mut bytes = 0u64;
        let mut sent = Vec::with_capacity(checked.len());
        for (message, earlier) in checked.iter().zip(&earlier) {
            if let Some(record) = earlier {
                // Its reply waits until the first send is durable, as the first one's does.
                last_end = last_end.max(Some(record.end()));
                sent.push(answer_again(&topic.name, &message.message_id, record));
                continue;
            }
            let Some(appended) = appended.next() else {
                return Err(ApiError::internal(
                    "the append stored fewer messages than sent",
                ));
            };
            bytes += message.body.len() as u64;
            let offset = appended.queue_offset.0;
            let mut result = stored_entry(&message.message_id, offset);
            match (&message.kind, message.placement.internal_topic) {
                (Kind::Transaction { recovery_ms }, _) => {
                    result.transaction_id = self.transactions.prepared(
                        offset,
                        appended.pos,
                        &topic.name,
                        client_id,
                        appended.store_timestamp_ms,
                        *recovery_ms,
                    );
                }
                (Kind::Delay { deliver_at_ms }, Some(TIMER_TOPIC)) => {
                    result.recall_handle =
                        timer::recall_handle(&topic.name, offset, *deliver_at_ms);
                }
                _ => {}
            }
            let queue = match message.placement.internal_topic {
                None => Some(message.placement.queue_id),
                Some(_) => None,
            };
            let deliver_at_ms = match message.kind {
                Kind::Delay { deliver_at_ms } => Some(deliver_at_ms),
                _ => None,
            };
            sent.push(Sent {
                result,
                queue,
                deliver_at_ms,
            });
        }
        let repeated = sent.len() - records;
        if repeated > 0 {
            tracing::debug!(topic = %topic.name, repeated, "sends recognised as retries");
            self.metrics.add_repeated_sends(repeated as u64);
        }
        self.durable(last_end).await?;
        self.metrics.add_received(records as u64, bytes);
        Ok(sent)
    }

    /// Appends the messages that are not a retry of a send within the duplicate window and
    /// files them in the window, which is held meanwhile, so two sends of one id cannot both
    /// be stored. Returns each message's earlier send (`None`: stored now) and the appends.
    fn append_new(
        &self,
        checked: &[CheckedMessage],
        hashes: &[u64],
        topic: &TopicConfig,
        peer: SocketAddr,
        now: i64,
    ) -> ApiResult<(Vec<Option<StoredRecord>>, Vec<Appended>)> {
        let mut window = self
            .duplicates
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let earlier: Vec<Option<StoredRecord>> = checked
            .iter()
            .zip(hashes)
            .map(|(m, &hash)| {
                window.earlier_send(&self.store, hash, &m.message_id, &topic.name, now)
            })
            .collect();
        let records: Vec<NewRecord<'_>> = checked
            .iter()
            .zip(&earlier)
            .filter(|(_, earlier)| earlier.is_none())
            .map(|(message, _)| NewRecord {
                topic: message.placement.internal_topic.unwrap_or(&topic.name),
                queue_id: message.placement.queue_id,
                message_type: message.placement.stored_type,
                born_timestamp_ms: message.born_timestamp_ms,
                born_host: peer,
                properties: message.properties.as_ref(),
                body: &message.body,
                term_index: TermIndex::default(),
            })
            .collect();
        let mut appended = Vec::with_capacity(records.len());
        let stored = match records.is_empty() {
            true => Ok(()),
            false => self.log.propose_batch(&records, &mut appended),
        };
        // Filed even when the batch failed part-way: a retry then stores only the rest.
        let new_hashes = hashes.iter().zip(&earlier).filter(|(_, e)| e.is_none());
        for ((&hash, _), appended) in new_hashes.zip(&appended) {
            window.insert(hash, appended.pos, appended.store_timestamp_ms);
        }
        stored?;
        Ok((earlier, appended))
    }

    /// Decides where a checked message is stored: its topic and queue, or the internal
    /// topic of half messages or of messages due later.
    fn place(
        &self,
        topic: &TopicConfig,
        message: &mut CheckedMessage,
        now: i64,
        client_id: &str,
    ) -> ApiResult<()> {
        let chosen_queue = match (&message.kind, message.queue_id) {
            (_, Some(q)) if q < topic.queue_count => q,
            (Kind::Fifo { message_group }, _) => {
                crc32fast::hash(message_group.as_bytes()) % topic.queue_count
            }
            _ => self.next_queue.fetch_add(1, Ordering::Relaxed) % topic.queue_count,
        };
        message.placement = match &message.kind {
            Kind::Normal => Placement::direct(MessageType::Normal, chosen_queue),
            Kind::Fifo { .. } => Placement::direct(MessageType::Fifo, chosen_queue),
            Kind::Delay { deliver_at_ms } if *deliver_at_ms <= now => {
                Placement::direct(MessageType::Delay, chosen_queue)
            }
            Kind::Delay { .. } => {
                message
                    .properties
                    .push(property::REAL_TOPIC, &topic.name)
                    .map_err(|e| ApiError::new(Code::MessagePropertiesTooLarge, e.to_string()))?;
                Placement::internal(TIMER_TOPIC, MessageType::Delay)
            }
            Kind::Transaction { recovery_ms } => {
                message.properties = Transactions::half_properties(
                    &message.properties,
                    &topic.name,
                    chosen_queue,
                    client_id,
                    *recovery_ms,
                )?;
                Placement::internal(HALF_TOPIC, MessageType::TransactionHalf)
            }
        };
        Ok(())
    }

    /// A producer's COMMIT, ROLLBACK or "unknown" for a transaction; answered once the
    /// decision is durable.
    pub async fn end_transaction(
        &self,
        topic: &str,
        message_id: &str,
        transaction_id: &str,
        resolution: v2::TransactionResolution,
    ) -> ApiResult<()> {
        let end = self
            .transactions
            .end(topic, message_id, transaction_id, resolution)?;
        self.durable(Some(end)).await
    }

    /// Sends the due transaction check-backs to their producers' Telemetry streams.
    pub fn send_check_backs(&self, now: i64) -> ApiResult<usize> {
        let checks =
            self.transactions
                .due_checks(now, &|client| self.is_connected(client), &|topic| {
                    self.declaring(topic)
                })?;
        let mut sent = 0;
        for check in checks {
            let mut message = message::to_wire(&check.half, None, &self.endpoint, BodyDigest::Md5)?;
            if let Some(system) = message.system_properties.as_mut() {
                system.queue_id = check
                    .half
                    .view()
                    .properties
                    .get(property::REAL_QUEUE_ID)
                    .and_then(|q| q.parse().ok())
                    .unwrap_or(0);
            }
            let command = v2::TelemetryCommand {
                status: Some(Status::ok()),
                command: Some(
                    v2::telemetry_command::Command::RecoverOrphanedTransactionCommand(
                        v2::RecoverOrphanedTransactionCommand {
                            message: Some(message),
                            transaction_id: check.transaction_id.clone(),
                        },
                    ),
                ),
            };
            if self.send_to_client(&check.client, command) {
                sent += 1;
                self.metrics.add(&self.metrics.transaction_checks, 1);
                tracing::debug!(client = %check.client, transaction_id = %check.transaction_id, "transaction check-back sent");
            }
        }
        Ok(sent)
    }

    /// Cancels a scheduled message; answered once the cancellation is durable.
    pub async fn recall(&self, topic: &str, handle: &str) -> ApiResult<String> {
        metadata::check_topic_name(topic)?;
        let (message_id, end) = self.timers.recall(topic, handle)?;
        self.durable(Some(end)).await?;
        Ok(message_id)
    }

    /// Checks that `topic` accepts each message's type and picks its queue.
    fn place_all(
        &self,
        topic: &TopicConfig,
        checked: &mut [CheckedMessage],
        names: &FieldNames,
        now: i64,
        client_id: &str,
    ) -> ApiResult<()> {
        for (i, message) in checked.iter_mut().enumerate() {
            let wire_type = message.kind.wire_type();
            if !topic.accepts(wire_type) {
                return Err(ApiError::new(
                    Code::MessagePropertyConflictWithType,
                    format!(
                        "{} is {}; topic {:?} accepts {}",
                        names(i, "system_properties.message_type"),
                        wire_type.as_str_name(),
                        topic.name,
                        topic.accept_message_types.join(", ")
                    ),
                ));
            }
            self.place(topic, message, now, client_id)?;
        }
        Ok(())
    }

    pub fn topic_or_create(&self, name: &str) -> ApiResult<TopicConfig> {
        let known = self.metadata.topic(name).is_some();
        let topic = self.metadata.topic_or_create(name)?;
        if !known {
            tracing::info!(topic = name, queues = topic.queue_count, "topic created");
            self.publish_routes();
        }
        Ok(topic)
    }

    pub fn group_or_create(&self, name: &str) -> ApiResult<GroupConfig> {
        metadata::check_group_name(name)?;
        self.metadata.group_or_create(name, now_ms())
    }

    pub(crate) fn readable_topic(&self, name: &str) -> ApiResult<TopicConfig> {
        metadata::check_topic_name(name)?;
        self.metadata.topic(name).ok_or_else(|| {
            ApiError::new(
                Code::TopicNotFound,
                format!("topic {name:?} does not exist"),
            )
        })
    }

    /// Receives with long polling: returns as soon as there are messages, or when the poll
    /// time (bounded by the caller's deadline) is up, with none.
    pub async fn receive(&self, request: ReceiveRequest<'_>) -> ApiResult<Vec<EncodedMessage>> {
        let limits = &self.config.limits;
        let group = self.group_or_create(request.group)?;
        let topic = self.readable_topic(request.topic)?;
        let filter = Filter::parse(request.filter_type, request.filter_expression)?;
        if request.batch_size <= 0 {
            return Err(ApiError::bad_request(format!(
                "batch_size is {}; it must be at least 1",
                request.batch_size
            )));
        }
        let batch = usize::try_from(
            request
                .batch_size
                .unsigned_abs()
                .min(limits.max_receive_batch),
        )
        .unwrap_or(1);
        let invisible_ms = match request.invisible {
            Some(d) => {
                let ms = message::duration_ms(d).unwrap_or(0);
                if ms < limits.min_invisible_ms || ms > limits.max_invisible_ms {
                    return Err(ApiError::new(
                        Code::IllegalInvisibleTime,
                        format!(
                            "invisible_duration is {ms} ms; it must be between {} and {} ms",
                            limits.min_invisible_ms, limits.max_invisible_ms
                        ),
                    ));
                }
                ms
            }
            None if request.auto_renew => limits.push_lease_ms,
            None => {
                return Err(ApiError::new(
                    Code::IllegalInvisibleTime,
                    "invisible_duration is missing",
                ));
            }
        };
        let poll = request
            .long_polling
            .and_then(message::duration_ms)
            .unwrap_or(limits.max_long_polling_ms)
            .min(limits.max_long_polling_ms);
        let mut until = Instant::now() + Duration::from_millis(poll);
        if let Some(deadline) = request.deadline {
            // Answer before the caller gives up: the Rust client's deadline equals its poll.
            let left = deadline.saturating_duration_since(Instant::now());
            let margin = (left / 10).clamp(Duration::from_millis(50), Duration::from_millis(500));
            until = until.min(deadline.checked_sub(margin).unwrap_or_else(Instant::now));
        }
        let (group, topic, filter) = (&group, &topic, &filter);
        let mut dispatched = self.dispatched.clone();
        loop {
            dispatched.borrow_and_update();
            let released = self.released.notified();
            // The lease record is not awaited: a process crash keeps it (it is in the page
            // cache), and if a machine crash loses it, the message is only delivered again.
            let now = now_ms();
            let renew_until =
                now.saturating_add(i64::try_from(limits.push_lease_max_ms).unwrap_or(i64::MAX));
            // A scan may read thousands of records under the consumer-state lock; the
            // runtime moves this worker's other tasks elsewhere meanwhile.
            let auto_renew = request
                .auto_renew
                .then_some((request.client_id, renew_until));
            let received = blocking(|| {
                self.consumers
                    .receive(group, topic, filter, batch, invisible_ms, now, auto_renew)
            })?;
            if !received.messages.is_empty() {
                let store_host = self.endpoint.as_str();
                let mut out = message::wire_buffer(received.messages.iter().map(|d| &d.record));
                let mut handle = String::with_capacity(48);
                return Ok(received
                    .messages
                    .into_iter()
                    .map(|d| {
                        d.handle.encode_into(&topic.name, &mut handle);
                        let delivery = Delivery {
                            receipt_handle: &handle,
                            attempt: d.attempt,
                            invisible_ms,
                            store_host,
                        };
                        let digest = request.digest;
                        message::encode_wire(
                            &d.record,
                            Some(delivery),
                            store_host,
                            digest,
                            &mut out,
                        )
                    })
                    .collect());
            }
            // More to scan past what this pass looked at, within the long-polling time.
            if received.more && Instant::now() < until {
                tokio::task::yield_now().await;
                continue;
            }
            let now = Instant::now();
            if now >= until {
                return Ok(Vec::new());
            }
            let mut wake = until;
            if let Some(lease_end) = self.consumers.next_lease_end(&group.name, &topic.name) {
                let wait = u64::try_from(lease_end.saturating_sub(now_ms())).unwrap_or(0);
                wake = wake.min(now + Duration::from_millis(wait.max(1)));
            }
            tokio::select! {
                () = wait_for_progress(&mut dispatched, wake) => {}
                () = released => {}
            }
        }
    }

    /// Acks the entries' receipt handles; one outcome per entry.
    pub async fn ack(
        &self,
        group: &str,
        topic: &str,
        handles: &[&[u8]],
    ) -> ApiResult<Vec<ApiResult<()>>> {
        let group = self.known_group(group)?;
        let topic = self.readable_topic(topic)?;
        let (outcomes, end) = self.consumers.ack(&group, &topic, handles);
        self.durable(end).await?;
        self.wake_receivers();
        Ok(outcomes)
    }

    pub async fn change_invisible(
        &self,
        group: &str,
        topic: &str,
        handle: &str,
        invisible: Option<&prost_types::Duration>,
    ) -> ApiResult<String> {
        let group = self.known_group(group)?;
        let topic = self.readable_topic(topic)?;
        let max = self.config.limits.max_invisible_ms;
        let ms = invisible.and_then(message::duration_ms).ok_or_else(|| {
            ApiError::new(
                Code::IllegalInvisibleTime,
                "invisible_duration is missing or negative",
            )
        })?;
        if ms > max {
            return Err(ApiError::new(
                Code::IllegalInvisibleTime,
                format!("invisible_duration is {ms} ms; the limit is {max} ms"),
            ));
        }
        let (handle, end) =
            self.consumers
                .change_invisible(&group, &topic, handle, ms, now_ms())?;
        self.durable(Some(end)).await?;
        self.wake_receivers();
        Ok(handle)
    }

    pub async fn forward_to_dead_letter(
        &self,
        group: &str,
        topic: &str,
        handle: &str,
    ) -> ApiResult<()> {
        let group = self.known_group(group)?;
        let topic = self.readable_topic(topic)?;
        let end = self
            .consumers
            .forward_to_dead_letter(&group, &topic, handle)?;
        self.durable(Some(end)).await?;
        self.wake_receivers();
        Ok(())
    }

    pub(crate) fn known_group(&self, name: &str) -> ApiResult<GroupConfig> {
        metadata::check_group_name(name)?;
        self.metadata.group(name).ok_or_else(|| {
            ApiError::new(
                Code::ConsumerGroupNotFound,
                format!("consumer group {name:?} does not exist"),
            )
        })
    }

    /// The route of `topic`: from the embedded table, or from a nameserver.
    pub async fn query_route(&self, topic: &str, client_id: &str) -> ApiResult<Vec<MessageQueue>> {
        metadata::check_topic_name(topic)?;
        match &self.routes {
            Routes::Embedded(table) => {
                self.topic_or_create(topic)?;
                table.query(topic).ok_or_else(|| {
                    ApiError::new(Code::TopicNotFound, format!("topic {topic:?} has no route"))
                })
            }
            Routes::Nameservers(nameservers) => {
                if self.config.topics.auto_create && self.metadata.topic(topic).is_none() {
                    self.topic_or_create(topic)?;
                    nameservers.register(self).await;
                }
                nameservers.query_route(topic, client_id).await
            }
        }
    }

    /// One assignment per broker: this one, any queue (the broker balances by leases).
    pub fn query_assignment(&self, topic: &str, group: &str) -> ApiResult<Vec<MessageQueue>> {
        self.group_or_create(group)?;
        let topic = self.readable_topic(topic)?;
        Ok(vec![MessageQueue {
            topic: Some(v2::Resource {
                resource_namespace: String::new(),
                name: topic.name.clone(),
            }),
            id: -1,
            permission: v2::Permission::ReadWrite as i32,
            broker: Some(v2::Broker {
                name: self.config.broker_name.clone(),
                id: 0,
                endpoints: Some(ferrumq_nameserver::route::endpoints(std::slice::from_ref(
                    &self.endpoint,
                ))),
            }),
            accept_message_types: topic
                .message_types()
                .into_iter()
                .map(|t| t as i32)
                .collect(),
        }])
    }

    /// Reads a queue from an offset without leases (PullMessage); returns the messages and
    /// the next offset to read.
    pub async fn pull(&self, request: PullRequest<'_>) -> ApiResult<(Vec<EncodedMessage>, i64)> {
        let PullRequest {
            topic,
            queue_id,
            offset,
            batch_size,
            filter,
            long_polling,
            digest,
        } = request;
        let topic = self.readable_topic(topic)?;
        let queue_id = self.queue_id(&topic, queue_id)?;
        let filter = match filter {
            Some((t, e)) => Filter::parse(t, e)?,
            None => Filter::All,
        };
        let from = u64::try_from(offset)
            .map_err(|_| ApiError::bad_request(format!("offset {offset} is negative")))?;
        let batch = u64::from(batch_size.clamp(1, 1024).unsigned_abs());
        let poll = long_polling
            .and_then(message::duration_ms)
            .unwrap_or(0)
            .min(self.config.limits.max_long_polling_ms);
        let until = Instant::now() + Duration::from_millis(poll);
        let mut dispatched = self.dispatched.clone();
        loop {
            dispatched.borrow_and_update();
            let mut records = Vec::new();
            let mut next = from;
            if let Some(queue) = self.store.consume_queue(&topic.name, queue_id) {
                next = next.max(queue.min_offset().0);
                while next < queue.max_offset().0 && (records.len() as u64) < batch {
                    let Some(entry) = queue.get(QueueOffset(next)) else {
                        break;
                    };
                    next += 1;
                    if !filter.may_match(entry.tag_hash) {
                        continue;
                    }
                    let record = self.store.read(entry.log_pos)?;
                    if filter.matches(&record.view().properties) {
                        records.push(record);
                    }
                }
            }
            if !records.is_empty() || next > from || Instant::now() >= until {
                let mut out = message::wire_buffer(&records);
                let messages = records
                    .iter()
                    .map(|r| message::encode_wire(r, None, &self.endpoint, digest, &mut out))
                    .collect();
                return Ok((messages, i64::try_from(next).unwrap_or(i64::MAX)));
            }
            wait_for_progress(&mut dispatched, until).await;
        }
    }

    pub async fn update_offset(
        &self,
        group: &str,
        topic: &str,
        queue_id: i32,
        offset: i64,
    ) -> ApiResult<()> {
        let group = self.group_or_create(group)?;
        let topic = self.readable_topic(topic)?;
        let queue_id = self.queue_id(&topic, queue_id)?;
        let offset = u64::try_from(offset)
            .map_err(|_| ApiError::bad_request(format!("offset {offset} is negative")))?;
        let end = self
            .consumers
            .update_pull_offset(&group.name, &topic.name, queue_id, offset)?;
        self.durable(Some(end)).await
    }

    pub fn get_offset(&self, group: &str, topic: &str, queue_id: i32) -> ApiResult<i64> {
        let group = self.known_group(group)?;
        let topic = self.readable_topic(topic)?;
        let queue_id = self.queue_id(&topic, queue_id)?;
        self.consumers
            .pull_offset(&group.name, &topic.name, queue_id)
            .map(|o| i64::try_from(o).unwrap_or(i64::MAX))
            .ok_or_else(|| {
                ApiError::new(
                    Code::NotFound,
                    format!(
                        "group {:?} has no offset for {:?} queue {queue_id}",
                        group.name, topic.name
                    ),
                )
            })
    }

    pub fn query_offset(
        &self,
        topic: &str,
        queue_id: i32,
        policy: QueryOffsetPolicy,
        timestamp_ms: Option<i64>,
    ) -> ApiResult<i64> {
        let topic = self.readable_topic(topic)?;
        let queue_id = self.queue_id(&topic, queue_id)?;
        let Some(queue) = self.store.consume_queue(&topic.name, queue_id) else {
            return Ok(0);
        };
        let offset = match policy {
            QueryOffsetPolicy::Beginning => queue.min_offset(),
            QueryOffsetPolicy::End => queue.max_offset(),
            QueryOffsetPolicy::Timestamp => {
                let ms = timestamp_ms
                    .ok_or_else(|| ApiError::bad_request("timestamp is required with TIMESTAMP"))?;
                queue.offset_at_time(ms)
            }
        };
        Ok(i64::try_from(offset.0).unwrap_or(i64::MAX))
    }

    fn queue_id(&self, topic: &TopicConfig, queue_id: i32) -> ApiResult<u32> {
        u32::try_from(queue_id)
            .ok()
            .filter(|q| *q < topic.queue_count)
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "message_queue.id {queue_id} is not a queue of topic {:?} (it has {})",
                    topic.name, topic.queue_count
                ))
            })
    }

    /// The Settings policy for a client: its group's retry rules for consumers.
    pub fn settings_policy(&self, group: Option<&str>) -> ApiResult<SettingsPolicy> {
        let mut policy = SettingsPolicy {
            max_body_size: i32::try_from(self.config.limits.max_body_bytes).unwrap_or(i32::MAX),
            receive_batch_size: i32::try_from(self.config.limits.push_receive_batch).unwrap_or(32),
            long_polling_timeout_ms: self.config.limits.max_long_polling_ms,
            ..SettingsPolicy::default()
        };
        if let Some(group) = group.filter(|g| !g.is_empty()) {
            let group = self.group_or_create(group)?;
            policy.consumer_max_attempts =
                i32::try_from(group.max_delivery_attempts).unwrap_or(i32::MAX);
            policy.retry_backoff_ms = group.retry_backoff_ms;
            policy.fifo = group.fifo;
        }
        Ok(policy)
    }

    /// Keeps a client's Telemetry stream, through which the broker may send it commands.
    pub fn add_telemetry(self: &Arc<Self>, client_id: String, sender: TelemetrySender) {
        let mut streams = self
            .telemetry
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        streams.retain(|(_, s)| !s.is_closed());
        streams.push((client_id, sender));
    }

    /// Pushes a command down one of the client's open Telemetry streams; false when none
    /// takes it.
    fn send_to_client(&self, client_id: &str, command: v2::TelemetryCommand) -> bool {
        let streams = self
            .telemetry
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        streams
            .iter()
            .filter(|(id, s)| id == client_id && !s.is_closed())
            .any(|(_, s)| s.try_send(Ok(command.clone())).is_ok())
    }

    /// Records the topics a producer declared in its Settings.
    pub fn declare_topics(&self, client_id: &str, topics: Vec<String>) {
        let mut declared = self
            .declared_topics
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        declared.retain(|client, _| self.is_connected(client));
        declared.insert(client_id.to_owned(), topics);
    }

    /// The connected producers that declared `topic`.
    fn declaring(&self, topic: &str) -> Vec<String> {
        let declared = self
            .declared_topics
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        declared
            .iter()
            .filter(|(client, topics)| {
                topics.iter().any(|t| t == topic) && self.is_connected(client)
            })
            .map(|(client, _)| client.clone())
            .collect()
    }

    /// Whether the client still has a Telemetry stream open with this broker.
    pub fn is_connected(&self, client_id: &str) -> bool {
        let streams = self
            .telemetry
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        streams
            .iter()
            .any(|(id, s)| id == client_id && !s.is_closed())
    }

    pub fn telemetry_streams(&self) -> usize {
        let mut streams = self
            .telemetry
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        streams.retain(|(_, s)| !s.is_closed());
        streams.len()
    }

    /// What this broker tells nameservers about itself.
    pub fn registration(&self) -> BrokerRegistration {
        let topics = self
            .metadata
            .topics()
            .into_iter()
            .filter(|t| t.name != OPS_TOPIC)
            .map(|t| TopicRoute {
                accept_message_types: t.message_types().into_iter().map(|m| m as i32).collect(),
                name: t.name,
                queue_count: t.queue_count,
            })
            .collect();
        BrokerRegistration {
            cluster: self.config.cluster_name.clone(),
            broker_name: self.config.broker_name.clone(),
            broker_id: 0,
            endpoints: vec![self.endpoint.clone()],
            topics,
            auto_create_topics: self.config.topics.auto_create,
        }
    }

    /// Refreshes the embedded route table after a topic change (cluster mode re-registers
    /// on its own schedule, and at once when a client asks for a new topic).
    pub fn publish_routes(&self) {
        if let Routes::Embedded(table) = &self.routes {
            table.register(self.registration());
        }
    }
}
