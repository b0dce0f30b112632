//! The consumer that drives itself: it receives, calls the listener, and acks.
//!
//! - **Bounded concurrency**: a semaphore of `concurrency` permits; a receive asks for at most
//!   as many messages as there are free permits, and each message holds one until acked.
//! - **Lease renewal**: while the listener runs, the lease is extended every third of the
//!   invisible duration, so slow work is not delivered twice.
//! - **Failure**: the lease is shortened to the group's retry backoff; the broker delivers the
//!   message again (or, after the group's last attempt, to its dead-letter queue).
//! - **Ordered mode** (on by itself for FIFO groups): messages of one message group run one
//!   after another in the order received. The broker gives out a group's next message only
//!   after the previous one is acked, so order holds across retries too.
//! - **Shutdown**: stops receiving (a receive under way is finished and its messages
//!   processed), waits for running listeners, acks them, and leaves.
//! - **Route changes**: one receive loop runs per subscription and broker. The routes are
//!   looked at again every `route_refresh_interval`: a broker that joined gets a loop, and a
//!   loop whose broker fails and has left the route ends.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ferrumq_protocol::v2::{self, ClientType, retry_policy};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch};
use tokio::task::JoinSet;

use crate::config::ClientConfig;
use crate::consumer::{Consumer, Filter};
use crate::error::{Error, Result};
use crate::message::ReceivedMessage;

/// RocketMQ's longest lease.
const MAX_INVISIBLE: Duration = Duration::from_secs(12 * 3600);

/// What the listener made of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsumeResult {
    /// Done: ack it.
    Success,
    /// Deliver it again after the group's retry backoff.
    Failure,
}

/// The application's function for each message, shared by the push and broadcast consumers.
pub(crate) type Listener = Arc<
    dyn Fn(ReceivedMessage) -> Pin<Box<dyn Future<Output = ConsumeResult> + Send>> + Send + Sync,
>;

/// Configures a [`PushConsumer`].
pub struct PushConsumerBuilder {
    config: ClientConfig,
    group: String,
    subscriptions: Vec<(String, Filter)>,
    concurrency: usize,
    invisible: Duration,
    long_polling: Duration,
    ordered: Option<bool>,
    listener: Option<Listener>,
}

impl PushConsumerBuilder {
    #[must_use]
    pub fn subscribe(mut self, topic: impl Into<String>, filter: Filter) -> PushConsumerBuilder {
        self.subscriptions.push((topic.into(), filter));
        self
    }

    /// The function called for each message; it may run `concurrency` times at once.
    #[must_use]
    pub fn listener<F, Fut>(mut self, listener: F) -> PushConsumerBuilder
    where
        F: Fn(ReceivedMessage) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ConsumeResult> + Send + 'static,
    {
        self.listener = Some(Arc::new(move |message| Box::pin(listener(message))));
        self
    }

    /// Messages processed at once (16 by default).
    #[must_use]
    pub fn concurrency(mut self, concurrency: usize) -> PushConsumerBuilder {
        self.concurrency = concurrency;
        self
    }

    /// The lease taken on each message (30 s), renewed while the listener runs.
    #[must_use]
    pub fn invisible_duration(mut self, invisible: Duration) -> PushConsumerBuilder {
        self.invisible = invisible;
        self
    }

    /// How long a receive waits at the broker (5 s); also the longest a shutdown waits for
    /// receives to return.
    #[must_use]
    pub fn long_polling(mut self, wait: Duration) -> PushConsumerBuilder {
        self.long_polling = wait;
        self
    }

    /// Processes a message group's messages one at a time, in order. Left unset, it follows
    /// whether the broker says the group is FIFO.
    #[must_use]
    pub fn ordered(mut self, ordered: bool) -> PushConsumerBuilder {
        self.ordered = Some(ordered);
        self
    }

    /// Starts receiving.
    pub async fn build(self) -> Result<PushConsumer> {
        let listener = self.listener.ok_or_else(|| {
            Error::Config("a push consumer needs a listener; set one with .listener(...)".into())
        })?;
        if self.concurrency == 0 {
            return Err(Error::Config("concurrency must be at least 1".into()));
        }
        if self.invisible < Duration::from_millis(300) || self.invisible > MAX_INVISIBLE {
            return Err(Error::Config(
                "invisible_duration must be between 300 ms and 12 h (the broker's own limits, 10 s to 12 h by default, apply too)".into(),
            ));
        }
        let core = Consumer::start(
            self.config,
            self.group,
            self.subscriptions,
            ClientType::PushConsumer,
        )
        .await?;
        let policy = core.subscription_settings().await;
        let fifo = policy.as_ref().and_then(|(s, _)| s.fifo).unwrap_or(false);
        let receive_batch = policy
            .as_ref()
            .and_then(|(s, _)| s.receive_batch_size)
            .and_then(|n| usize::try_from(n).ok())
            .filter(|n| *n > 0)
            .unwrap_or(32);
        let backoff = policy
            .and_then(|(_, retry)| retry)
            .and_then(|r| r.strategy)
            .map_or_else(Backoff::default, Backoff::from_wire);
        let (stop, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            core,
            listener,
            permits: Arc::new(Semaphore::new(self.concurrency)),
            concurrency: self.concurrency,
            receive_batch,
            loops: AtomicUsize::new(0),
            invisible: self.invisible,
            long_polling: self.long_polling,
            ordered: self.ordered.unwrap_or(fifo),
            backoff,
            group_tails: Mutex::new(HashMap::new()),
            stop,
        });
        let mut receivers = JoinSet::new();
        receivers.spawn(inner.clone().follow_routes());
        Ok(PushConsumer { inner, receivers })
    }
}

/// Calls a listener for each message of its subscriptions; see the [crate docs](crate).
pub struct PushConsumer {
    inner: Arc<Inner>,
    receivers: JoinSet<()>,
}

struct Inner {
    core: Arc<Consumer>,
    listener: Listener,
    permits: Arc<Semaphore>,
    concurrency: usize,
    /// The most one receive asks for, as the broker's Settings say (32 if they do not).
    receive_batch: usize,
    /// Receive loops running: each holds at most its share of the permits while it waits.
    loops: AtomicUsize,
    invisible: Duration,
    long_polling: Duration,
    ordered: bool,
    backoff: Backoff,
    /// Ordered mode: per message group, a receiver that completes when the group's last
    /// dispatched message is done.
    group_tails: Mutex<HashMap<String, oneshot::Receiver<()>>>,
    stop: watch::Sender<bool>,
}

impl PushConsumer {
    pub fn builder(config: ClientConfig, group: impl Into<String>) -> PushConsumerBuilder {
        PushConsumerBuilder {
            config,
            group: group.into(),
            subscriptions: Vec::new(),
            concurrency: 16,
            invisible: Duration::from_secs(30),
            long_polling: Duration::from_secs(5),
            ordered: None,
            listener: None,
        }
    }

    /// Whether messages of one group run in order (set, or because the group is FIFO).
    pub fn is_ordered(&self) -> bool {
        self.inner.ordered
    }

    /// Stops receiving, lets every running listener finish and its message be acked, then
    /// tells the brokers this consumer leaves.
    pub async fn shutdown(mut self) {
        self.inner.stop.send_replace(true);
        while self.receivers.join_next().await.is_some() {}
        let all = u32::try_from(self.inner.concurrency).unwrap_or(u32::MAX);
        let _ = self.inner.permits.acquire_many(all).await;
        self.inner.core.close().await;
    }
}

impl Drop for PushConsumer {
    fn drop(&mut self) {
        self.inner.stop.send_replace(true);
        self.inner.core.telemetry.close();
    }
}

impl Inner {
    /// Keeps one receive loop running per subscription and broker of the current routes.
    /// Returns after a shutdown, once every loop has ended.
    async fn follow_routes(self: Arc<Self>) {
        let mut stop = self.stop.subscribe();
        let mut loops = JoinSet::new();
        let mut running = HashSet::new();
        loop {
            while let Some(ended) = loops.try_join_next() {
                if let Ok(source) = ended {
                    running.remove(&source);
                }
            }
            let mut new = Vec::new();
            for (subscription, (topic, _)) in self.core.subscriptions.iter().enumerate() {
                let Ok(route) = self.core.transport.route(topic).await else {
                    continue;
                };
                for broker in route.brokers(false) {
                    if running.insert((subscription, broker.clone())) {
                        new.push((subscription, broker));
                    }
                }
            }
            // Counted before they start, so their first receives take their share only.
            self.loops.store(running.len(), Ordering::Relaxed);
            for (subscription, broker) in new {
                self.core.telemetry.open(&broker);
                loops.spawn(self.clone().receive_loop(subscription, broker));
            }
            tokio::select! {
                () = tokio::time::sleep(self.core.transport.config.route_refresh) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        while loops.join_next().await.is_some() {}
    }

    /// Whether `broker` still serves the subscription's topic; true while the route is
    /// unknown, so a nameserver outage does not stop a loop.
    async fn still_routed(&self, subscription: usize, broker: &str) -> bool {
        let topic = &self.core.subscriptions[subscription].0;
        self.core
            .transport
            .route(topic)
            .await
            .map_or(true, |route| {
                route.brokers(false).iter().any(|b| b == broker)
            })
    }

    /// Receives from one broker until a shutdown, or until the broker fails and is no longer
    /// in the route. Returns its source, so `follow_routes` can start it again later.
    async fn receive_loop(self: Arc<Self>, subscription: usize, broker: String) -> (usize, String) {
        let mut stop = self.stop.subscribe();
        loop {
            let first = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => return (subscription, broker),
                permit = self.permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return (subscription, broker),
                },
            };
            // A loop waiting at an idle broker holds no more than its share of the
            // permits, so it cannot starve the loops whose brokers have messages.
            let share = self.concurrency / self.loops.load(Ordering::Relaxed).max(1);
            let mut permits = vec![first];
            while permits.len() < self.receive_batch.min(share) {
                match self.permits.clone().try_acquire_owned() {
                    Ok(permit) => permits.push(permit),
                    Err(_) => break,
                }
            }
            let max = u32::try_from(permits.len()).unwrap_or(1);
            // Not cut short by a shutdown: messages the broker leased for this receive are
            // processed, instead of staying invisible until their lease ends.
            let received = self
                .core
                .receive_from(
                    subscription,
                    &broker,
                    max,
                    self.invisible,
                    self.long_polling,
                )
                .await;
            match received {
                Ok(messages) => {
                    for (message, permit) in messages.into_iter().zip(permits) {
                        self.clone().dispatch(message, permit);
                    }
                }
                Err(e) => {
                    drop(permits);
                    if e.is_endpoint_down() {
                        self.core.transport.mark_down(&broker);
                    }
                    if !self.still_routed(subscription, &broker).await {
                        tracing::info!(
                            broker,
                            "broker left the route; no longer receiving from it"
                        );
                        return (subscription, broker);
                    }
                    // A lease the broker will never grant is this consumer's configuration, not
                    // a passing fault: say so loudly, and ask again less often.
                    let pause = if e.code() == Some(v2::Code::IllegalInvisibleTime) {
                        tracing::error!(%e, broker, invisible = ?self.invisible, "the broker refuses this consumer's invisible_duration; set PushConsumerBuilder::invisible_duration within its limits");
                        Duration::from_secs(10)
                    } else {
                        tracing::warn!(%e, broker, "receive failed; trying again in 1 s");
                        Duration::from_secs(1)
                    };
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        _ = stop.wait_for(|s| *s) => return (subscription, broker),
                    }
                }
            }
        }
    }

    /// Starts processing; in ordered mode, after the same group's previous message.
    fn dispatch(self: Arc<Self>, message: ReceivedMessage, permit: OwnedSemaphorePermit) {
        let mut previous = None;
        let mut done = None;
        if self.ordered
            && let Some(group) = &message.message_group
        {
            let (tx, rx) = oneshot::channel();
            let mut tails = self
                .group_tails
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if tails.len() > 4 * self.concurrency {
                tails.retain(|_, tail| {
                    matches!(tail.try_recv(), Err(oneshot::error::TryRecvError::Empty))
                });
            }
            previous = tails.insert(group.clone(), rx);
            done = Some(tx);
        }
        tokio::spawn(async move {
            self.process(message, previous).await;
            drop(done);
            drop(permit);
        });
    }

    /// Waits for `previous` (the same group's earlier message), runs the listener, and acks
    /// or reschedules; the lease is renewed throughout.
    async fn process(&self, mut message: ReceivedMessage, previous: Option<oneshot::Receiver<()>>) {
        let every = self.invisible / 3;
        let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        if let Some(mut previous) = previous {
            loop {
                tokio::select! {
                    _ = &mut previous => break,
                    _ = renew.tick() => self.renew(&mut message).await,
                }
            }
        }
        let mut work = tokio::spawn((self.listener)(message.clone()));
        let result = loop {
            tokio::select! {
                finished = &mut work => break finished.unwrap_or_else(|_| {
                    tracing::warn!(message_id = %message.message_id, "the listener panicked; the message will be delivered again");
                    ConsumeResult::Failure
                }),
                _ = renew.tick() => self.renew(&mut message).await,
            }
        };
        let outcome = match result {
            ConsumeResult::Success => self.ack(&message).await,
            ConsumeResult::Failure => {
                let retry_in = self.backoff.after(message.delivery_attempt);
                self.core.change_invisible(&mut message, retry_in).await
            }
        };
        if let Err(e) = outcome {
            // The lease ends by itself and the message comes back: at least once.
            tracing::warn!(message_id = %message.message_id, ?result, %e, "could not finish a message");
        }
    }

    async fn renew(&self, message: &mut ReceivedMessage) {
        if let Err(e) = self.core.change_invisible(message, self.invisible).await {
            tracing::warn!(message_id = %message.message_id, %e, "could not renew a lease");
        }
    }

    async fn ack(&self, message: &ReceivedMessage) -> Result<()> {
        let mut attempt = 0;
        loop {
            match self.core.ack(message).await {
                Err(e) if e.is_retryable() && attempt < 2 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                }
                other => return other,
            }
        }
    }
}

/// The wait before a failed message's next delivery, by attempt.
#[derive(Debug, Clone)]
enum Backoff {
    Schedule(Vec<Duration>),
    Exponential {
        initial: Duration,
        max: Duration,
        multiplier: f32,
    },
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff::Exponential {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            multiplier: 2.0,
        }
    }
}

impl Backoff {
    fn from_wire(strategy: retry_policy::Strategy) -> Backoff {
        let duration = |d: Option<prost_types::Duration>| {
            d.map_or(Duration::ZERO, |d| {
                Duration::new(
                    u64::try_from(d.seconds).unwrap_or(0),
                    u32::try_from(d.nanos).unwrap_or(0),
                )
            })
        };
        match strategy {
            retry_policy::Strategy::CustomizedBackoff(c) if !c.next.is_empty() => {
                Backoff::Schedule(c.next.into_iter().map(|d| duration(Some(d))).collect())
            }
            retry_policy::Strategy::ExponentialBackoff(e) => Backoff::Exponential {
                initial: duration(e.initial),
                max: duration(e.max),
                multiplier: e.multiplier.max(1.0),
            },
            retry_policy::Strategy::CustomizedBackoff(_) => Backoff::default(),
        }
    }

    /// The wait after delivery `attempt` (1-based) failed.
    fn after(&self, attempt: u32) -> Duration {
        let index = attempt.saturating_sub(1);
        match self {
            Backoff::Schedule(steps) => {
                let i = usize::try_from(index).unwrap_or(usize::MAX);
                steps
                    .get(i)
                    .or(steps.last())
                    .copied()
                    .unwrap_or(Duration::from_secs(1))
            }
            Backoff::Exponential {
                initial,
                max,
                multiplier,
            } => {
                let exponent = i32::try_from(index.min(64)).unwrap_or(64);
                let factor = f64::from(*multiplier).powi(exponent);
                Duration::try_from_secs_f64(initial.as_secs_f64() * factor)
                    .map_or(*max, |d| d.min(*max))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_follows_the_schedule_then_stays_at_its_end() {
        let schedule = Backoff::Schedule(vec![Duration::from_secs(1), Duration::from_secs(5)]);
        assert_eq!(schedule.after(1), Duration::from_secs(1));
        assert_eq!(schedule.after(2), Duration::from_secs(5));
        assert_eq!(schedule.after(9), Duration::from_secs(5));
        let exponential = Backoff::default();
        assert_eq!(exponential.after(1), Duration::from_secs(1));
        assert_eq!(exponential.after(3), Duration::from_secs(4));
        assert_eq!(exponential.after(30), Duration::from_secs(60));
        assert_eq!(exponential.after(u32::MAX), Duration::from_secs(60));
        let huge = Backoff::Exponential {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            multiplier: f32::MAX,
        };
        assert_eq!(huge.after(3), Duration::from_secs(60));
    }
}
