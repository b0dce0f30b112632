//! Broadcast consumption: every instance gets every message of the topic.
//!
//! Leases are shared by a group, so they cannot do this. Instead each instance pulls every
//! queue of the topic itself (PullMessage) and keeps its own offsets, in memory and, when an
//! offset file is given, on disk, written every second and at shutdown. A restarted instance
//! goes on from its file: at least once, with at most the last second delivered again after
//! a crash. A queue with no saved offset starts at its end (only new messages) or, if asked,
//! at its beginning.
//!
//! The route is looked at again every `route_refresh_interval`. A queue that appears later (a
//! broker joined) is read from its beginning when this instance has no offset for it: its
//! messages may all be newer than the instance, and skipping them would lose them. A pull loop
//! whose broker fails and has left the route ends.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::Duration;

use ferrumq_protocol::consumed::Consumed;
use ferrumq_protocol::v2::{
    Code, MessageQueue, PullMessageRequest, QueryOffsetPolicy, QueryOffsetRequest,
};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::ClientConfig;
use crate::consumer::Filter;
use crate::error::{Error, Result};
use crate::message::ReceivedMessage;
use crate::push_consumer::{ConsumeResult, Listener};
use crate::telemetry::prost_duration;
use crate::transport::{Route, Transport, queue_endpoint, resource, within};

/// Where an instance starts on a queue it has no offset for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFrom {
    /// Only messages stored from now on.
    Latest,
    /// Everything the broker still holds.
    Earliest,
}

/// Configures a [`BroadcastConsumer`].
pub struct BroadcastConsumerBuilder {
    config: ClientConfig,
    group: String,
    topic: Option<(String, Filter)>,
    offset_file: Option<PathBuf>,
    start_from: StartFrom,
    long_polling: Duration,
    pull_batch: u32,
    max_attempts: u32,
    listener: Option<Listener>,
}

impl BroadcastConsumerBuilder {
    /// The topic to receive all of.
    #[must_use]
    pub fn subscribe(
        mut self,
        topic: impl Into<String>,
        filter: Filter,
    ) -> BroadcastConsumerBuilder {
        self.topic = Some((topic.into(), filter));
        self
    }

    /// Keeps this instance's offsets in `path`, so a restart goes on where it stopped.
    #[must_use]
    pub fn offset_file(mut self, path: impl Into<PathBuf>) -> BroadcastConsumerBuilder {
        self.offset_file = Some(path.into());
        self
    }

    /// Where to start on a queue without a saved offset ([`StartFrom::Latest`] by default).
    #[must_use]
    pub fn start_from(mut self, start: StartFrom) -> BroadcastConsumerBuilder {
        self.start_from = start;
        self
    }

    /// How long a pull waits at the broker for new messages (5 s).
    #[must_use]
    pub fn long_polling(mut self, wait: Duration) -> BroadcastConsumerBuilder {
        self.long_polling = wait;
        self
    }

    /// Messages asked for by each pull (32); more cost fewer calls to the broker for a
    /// backlog. The broker hands out at most 1,024 per pull.
    #[must_use]
    pub fn pull_batch(mut self, messages: u32) -> BroadcastConsumerBuilder {
        self.pull_batch = messages;
        self
    }

    /// Calls of the listener per message before it is skipped (16); a broadcast message has
    /// no dead-letter queue.
    #[must_use]
    pub fn max_attempts(mut self, attempts: u32) -> BroadcastConsumerBuilder {
        self.max_attempts = attempts;
        self
    }

    /// Called for each message, in order within a queue.
    #[must_use]
    pub fn listener<F, Fut>(mut self, listener: F) -> BroadcastConsumerBuilder
    where
        F: Fn(ReceivedMessage) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ConsumeResult> + Send + 'static,
    {
        self.listener = Some(Arc::new(move |message| Box::pin(listener(message))));
        self
    }

    /// Loads the offsets and starts pulling every queue of the topic.
    pub async fn build(self) -> Result<BroadcastConsumer> {
        let (topic, filter) = self.topic.ok_or_else(|| {
            Error::Config("no subscription; call subscribe(topic, filter)".into())
        })?;
        let listener = self.listener.ok_or_else(|| {
            Error::Config(
                "a broadcast consumer needs a listener; set one with .listener(...)".into(),
            )
        })?;
        if self.max_attempts == 0 {
            return Err(Error::Config("max_attempts must be at least 1".into()));
        }
        if self.pull_batch == 0 || i32::try_from(self.pull_batch).is_err() {
            return Err(Error::Config(format!(
                "pull_batch must be between 1 and {}, not {}",
                i32::MAX,
                self.pull_batch
            )));
        }
        let transport = Transport::new(self.config)?;
        let offsets = Arc::new(Offsets::load(self.offset_file)?);
        let route = transport.route(&topic).await?;
        let (stop, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            transport,
            group: self.group,
            topic,
            filter,
            start_from: self.start_from,
            long_polling: self.long_polling,
            pull_batch: i32::try_from(self.pull_batch).unwrap_or(i32::MAX),
            max_attempts: self.max_attempts,
            listener,
            offsets,
            stop,
        });
        // The starts are fixed now, so a message sent once `build` returns is received. A
        // broker that does not answer is asked again by its pull loop.
        let mut first = Vec::new();
        for (queue, endpoint) in readable_queues(&route) {
            let key = queue_key(&inner.topic, &queue);
            if inner.offsets.get(&key).is_none()
                && let Ok(start) = inner
                    .start_offset(&queue, &endpoint, inner.start_from)
                    .await
            {
                inner.offsets.set(&key, start);
            }
            first.push((queue, endpoint));
        }
        let mut tasks = JoinSet::new();
        tasks.spawn(inner.clone().follow_routes(first));
        tasks.spawn(inner.clone().save_loop());
        Ok(BroadcastConsumer { inner, tasks })
    }
}

/// Delivers every message of a topic to this instance; see the [crate docs](crate).
pub struct BroadcastConsumer {
    inner: Arc<Inner>,
    tasks: JoinSet<()>,
}

struct Inner {
    transport: Arc<Transport>,
    group: String,
    topic: String,
    filter: Filter,
    start_from: StartFrom,
    long_polling: Duration,
    pull_batch: i32,
    max_attempts: u32,
    listener: Listener,
    offsets: Arc<Offsets>,
    stop: watch::Sender<bool>,
}

impl BroadcastConsumer {
    pub fn builder(config: ClientConfig, group: impl Into<String>) -> BroadcastConsumerBuilder {
        BroadcastConsumerBuilder {
            config,
            group: group.into(),
            topic: None,
            offset_file: None,
            start_from: StartFrom::Latest,
            long_polling: Duration::from_secs(5),
            pull_batch: 32,
            max_attempts: 16,
            listener: None,
        }
    }

    /// Lets the messages being processed finish, then saves the offsets.
    pub async fn shutdown(mut self) -> Result<()> {
        self.inner.stop.send_replace(true);
        while self.tasks.join_next().await.is_some() {}
        self.inner.offsets.save()
    }
}

impl Drop for BroadcastConsumer {
    fn drop(&mut self) {
        self.inner.stop.send_replace(true);
    }
}

/// The queues of a route this instance can pull, with their brokers' endpoints.
fn readable_queues(route: &Route) -> Vec<(MessageQueue, String)> {
    route
        .queues
        .iter()
        .filter(|q| q.permission != ferrumq_protocol::v2::Permission::Write as i32)
        .filter_map(|q| Some((q.clone(), queue_endpoint(q)?)))
        .collect()
}

impl Inner {
    /// Runs the pull loops of `first`, then every `route_refresh_interval` starts one for
    /// each queue that joined the route. Returns after a shutdown, once every loop has ended.
    async fn follow_routes(self: Arc<Self>, first: Vec<(MessageQueue, String)>) {
        let mut stop = self.stop.subscribe();
        let mut loops = JoinSet::new();
        let mut running = HashSet::new();
        for (queue, endpoint) in first {
            running.insert((queue_key(&self.topic, &queue), endpoint.clone()));
            loops.spawn(self.clone().pull_loop(queue, endpoint, self.start_from));
        }
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.transport.config.route_refresh) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            while let Some(ended) = loops.try_join_next() {
                if let Ok(source) = ended {
                    running.remove(&source);
                }
            }
            let Ok(route) = self.transport.route(&self.topic).await else {
                continue;
            };
            for (queue, endpoint) in readable_queues(&route) {
                if running.insert((queue_key(&self.topic, &queue), endpoint.clone())) {
                    loops.spawn(self.clone().pull_loop(queue, endpoint, StartFrom::Earliest));
                }
            }
        }
        while loops.join_next().await.is_some() {}
    }

    /// Whether `endpoint` still serves `queue`; true while the route is unknown.
    async fn still_routed(&self, queue: &MessageQueue, endpoint: &str) -> bool {
        let key = queue_key(&self.topic, queue);
        self.transport
            .route(&self.topic)
            .await
            .map_or(true, |route| {
                readable_queues(&route)
                    .iter()
                    .any(|(q, e)| e == endpoint && queue_key(&self.topic, q) == key)
            })
    }

    /// Pulls one queue until a shutdown, or until its broker fails and is no longer in the
    /// route. With no saved offset it starts at `start`. Returns its queue key and endpoint.
    async fn pull_loop(
        self: Arc<Self>,
        queue: MessageQueue,
        endpoint: String,
        start: StartFrom,
    ) -> (String, String) {
        let key = queue_key(&self.topic, &queue);
        let mut stop = self.stop.subscribe();
        let mut offset = self.offsets.get(&key);
        loop {
            if *stop.borrow_and_update() {
                return (key, endpoint);
            }
            let step = async {
                let from = match offset {
                    Some(offset) => offset,
                    None => self.start_offset(&queue, &endpoint, start).await?,
                };
                offset = Some(from);
                let (messages, next) = self.pull(&queue, &endpoint, from).await?;
                Ok::<_, Error>((messages, next))
            };
            let pulled = tokio::select! {
                pulled = step => pulled,
                _ = stop.wait_for(|s| *s) => return (key, endpoint),
            };
            match pulled {
                Ok((messages, next)) => {
                    let mut done = offset.unwrap_or(0);
                    for message in messages {
                        let after = message.queue_offset.map(|o| o + 1);
                        if !self.deliver(message, &mut stop).await {
                            return (key, endpoint);
                        }
                        if let Some(after) = after {
                            done = done.max(after);
                            self.offsets.set(&key, done);
                        }
                    }
                    // Never backwards, even from a broker that left out the next offset.
                    let next = next.max(done);
                    self.offsets.set(&key, next);
                    offset = Some(next);
                }
                Err(e) => {
                    if e.is_endpoint_down() {
                        self.transport.mark_down(&endpoint);
                    }
                    if !self.still_routed(&queue, &endpoint).await {
                        tracing::info!(endpoint, "queue left the route; no longer pulling it");
                        return (key, endpoint);
                    }
                    tracing::warn!(%e, endpoint, "pull failed; trying again in 1 s");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.wait_for(|s| *s) => return (key, endpoint),
                    }
                }
            }
        }
    }

    /// Runs the listener until it succeeds or the attempts are used up (true), or until a
    /// shutdown stops the retries (false: the message is not done, and its offset stays).
    async fn deliver(
        &self,
        mut message: ReceivedMessage,
        stop: &mut watch::Receiver<bool>,
    ) -> bool {
        for attempt in 1..=self.max_attempts {
            message.delivery_attempt = attempt;
            if run_listener(&self.listener, message.clone()).await == Some(ConsumeResult::Success) {
                return true;
            }
            let wait = Duration::from_millis(100u64 << attempt.min(6));
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|s| *s) => return false,
            }
        }
        tracing::warn!(message_id = %message.message_id, attempts = self.max_attempts, "a broadcast message failed every attempt; skipping it");
        true
    }

    async fn start_offset(
        &self,
        queue: &MessageQueue,
        endpoint: &str,
        start: StartFrom,
    ) -> Result<i64> {
        let policy = match start {
            StartFrom::Latest => QueryOffsetPolicy::End,
            StartFrom::Earliest => QueryOffsetPolicy::Beginning,
        };
        let request = QueryOffsetRequest {
            message_queue: Some(queue.clone()),
            query_offset_policy: policy as i32,
            timestamp: None,
        };
        let reply = self
            .transport
            .unary(endpoint, request, |mut rpc, r| async move {
                rpc.query_offset(r).await
            })
            .await?;
        Ok(reply.offset)
    }

    async fn pull(
        &self,
        queue: &MessageQueue,
        endpoint: &str,
        offset: i64,
    ) -> Result<(Vec<ReceivedMessage>, i64)> {
        let timeout = self.long_polling.saturating_add(self.transport.timeout());
        let request = self.transport.request(
            PullMessageRequest {
                group: resource(&self.group),
                message_queue: Some(queue.clone()),
                offset,
                batch_size: self.pull_batch,
                filter_expression: Some(self.filter.wire()),
                long_polling_timeout: Some(prost_duration(self.long_polling)),
            },
            Some(timeout),
        );
        let rpc_error = |s: tonic::Status| Error::from_rpc(endpoint, timeout, &s);
        let mut rpc = self.transport.rpc(endpoint)?;
        within(endpoint, timeout, async {
            let mut stream = rpc
                .pull_message(request)
                .await
                .map_err(rpc_error)?
                .into_inner();
            let (mut messages, mut next) = (Vec::new(), offset);
            let from: Arc<str> = Arc::from(endpoint);
            while let Some(frame) = stream.message().await.map_err(rpc_error)? {
                match frame.content {
                    Some(Consumed::Status(s)) if s.code == Code::MessageNotFound as i32 => {}
                    Some(Consumed::Status(s)) => Error::check(endpoint, Some(&s))?,
                    Some(Consumed::Message(m)) => {
                        messages.push(ReceivedMessage::from_wire(&from, m));
                    }
                    Some(Consumed::NextOffset(n)) => next = n,
                    None => {}
                }
            }
            Ok((messages, next))
        })
        .await
    }

    async fn save_loop(self: Arc<Self>) {
        let mut stop = self.stop.subscribe();
        loop {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let offsets = self.offsets.clone();
            let saved = tokio::task::spawn_blocking(move || offsets.save()).await;
            if let Ok(Err(e)) = saved {
                tracing::warn!(%e, "could not save broadcast offsets");
            }
        }
    }
}

/// A queue's key in the offset file: topic, broker name and queue id.
fn queue_key(topic: &str, queue: &MessageQueue) -> String {
    let broker = queue.broker.as_ref().map_or("", |b| b.name.as_str());
    format!("{topic}\t{broker}\t{}", queue.id)
}

/// The listener's verdict on `message`, or `None` if it panicked: a panicking listener
/// fails that attempt, as an error would, and the pull loop goes on. It runs in the pull
/// loop's own task; a task per message was a visible part of each pulled message's cost.
async fn run_listener(listener: &Listener, message: ReceivedMessage) -> Option<ConsumeResult> {
    let mut work = catch_unwind(AssertUnwindSafe(|| listener(message))).ok()?;
    std::future::poll_fn(move |cx| {
        match catch_unwind(AssertUnwindSafe(|| work.as_mut().poll(cx))) {
            Ok(Poll::Ready(result)) => Poll::Ready(Some(result)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(_) => Poll::Ready(None),
        }
    })
    .await
}

/// This instance's next offset per queue. The file has one `topic TAB broker TAB queue TAB
/// offset` line per queue and is replaced whole (write, fsync, rename).
struct Offsets {
    path: Option<PathBuf>,
    next: Mutex<(BTreeMap<String, i64>, bool)>,
}

impl Offsets {
    fn load(path: Option<PathBuf>) -> Result<Offsets> {
        let mut next = BTreeMap::new();
        if let Some(path) = &path {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    for (n, line) in text.lines().enumerate() {
                        let parsed = line
                            .rsplit_once('\t')
                            .and_then(|(key, offset)| Some((key, offset.parse::<i64>().ok()?)));
                        let Some((key, offset)) = parsed else {
                            return Err(Error::Config(format!(
                                "offset file {}: line {} is not `topic<TAB>broker<TAB>queue<TAB>offset`",
                                path.display(),
                                n + 1
                            )));
                        };
                        next.insert(key.to_owned(), offset);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::Config(format!(
                        "cannot read offset file {}: {e}",
                        path.display()
                    )));
                }
            }
        }
        Ok(Offsets {
            path,
            next: Mutex::new((next, false)),
        })
    }

    fn get(&self, key: &str) -> Option<i64> {
        self.next
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .get(key)
            .copied()
    }

    fn set(&self, key: &str, offset: i64) {
        let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
        let (offsets, changed) = &mut *next;
        // Set after every message: the key is copied only the first time.
        match offsets.get_mut(key) {
            Some(known) if *known == offset => return,
            Some(known) => *known = offset,
            None => {
                offsets.insert(key.to_owned(), offset);
            }
        }
        *changed = true;
    }

    fn save(&self) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let text = {
            let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
            if !next.1 {
                return Ok(());
            }
            next.1 = false;
            next.0
                .iter()
                .map(|(key, offset)| format!("{key}\t{offset}\n"))
                .collect::<String>()
        };
        write_atomically(path, text.as_bytes()).map_err(|e| {
            // Still to be written: the next save tries again.
            self.next.lock().unwrap_or_else(PoisonError::into_inner).1 = true;
            Error::Config(format!("cannot write offset file {}: {e}", path.display()))
        })
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_listener_that_panics_fails_its_attempt_and_nothing_else() {
        let message = ReceivedMessage::from_wire(&Arc::from("b:1"), Default::default());
        let verdict = |listener: Listener| {
            let message = message.clone();
            async move { run_listener(&listener, message).await }
        };
        let ok: Listener = Arc::new(|_| Box::pin(async { ConsumeResult::Success }));
        assert_eq!(verdict(ok).await, Some(ConsumeResult::Success));
        let later: Listener = Arc::new(|_| {
            Box::pin(async {
                tokio::task::yield_now().await;
                ConsumeResult::Failure
            })
        });
        assert_eq!(verdict(later).await, Some(ConsumeResult::Failure));
        let panics_when_polled: Listener = Arc::new(|_| {
            Box::pin(async {
                tokio::task::yield_now().await;
                panic!("listener failed")
            })
        });
        assert_eq!(verdict(panics_when_polled).await, None);
        let panics_when_called: Listener = Arc::new(|_| panic!("listener failed"));
        assert_eq!(verdict(panics_when_called).await, None);
    }

    #[test]
    fn offsets_survive_a_reload_and_a_bad_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("offsets");
        let offsets = Offsets::load(Some(path.clone())).unwrap();
        offsets.set("t\tbroker-a\t0", 7);
        offsets.set("t\tbroker-a\t1", 3);
        offsets.save().unwrap();
        let again = Offsets::load(Some(path.clone())).unwrap();
        assert_eq!(again.get("t\tbroker-a\t0"), Some(7));
        assert_eq!(again.get("t\tbroker-a\t1"), Some(3));
        std::fs::write(&path, "t\tbroker-a\t0\tseven\n").unwrap();
        let error = Offsets::load(Some(path)).err().unwrap().to_string();
        assert!(error.contains("line 1"), "{error}");
    }
}
