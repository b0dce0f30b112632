//! What every lease-based consumer does: subscribe, receive with long polling, ack, change a
//! lease, and leave. [`SimpleConsumer`] exposes it directly; the push consumer drives it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ferrumq_protocol::consumed::{AckReply, Consumed};
use ferrumq_protocol::v2::{
    self, ChangeInvisibleDurationRequest, ClientType, Code, FilterExpression, FilterType,
    MessageQueue, NotifyClientTerminationRequest, ReceiveMessageRequest, Settings, Subscription,
    SubscriptionEntry, settings,
};

use crate::config::ClientConfig;
use crate::error::{Error, Result};
use crate::framed::{self, EncodedRequest};
use crate::message::ReceivedMessage;
use crate::telemetry::{Telemetry, prost_duration};
use crate::transport::{Transport, endpoints, resource, within};

impl Drop for Consumer {
    fn drop(&mut self) {
        self.telemetry.close();
    }
}

/// Which messages of a topic a consumer wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// A tag expression: `*`, one tag, or tags joined by `||`.
    Tag(String),
    /// A SQL92 condition over user properties, such as `region = 'eu' AND amount > 100`.
    Sql(String),
}

impl Filter {
    /// Every message.
    pub fn all() -> Filter {
        Filter::Tag("*".into())
    }

    pub(crate) fn wire(&self) -> FilterExpression {
        let (kind, expression) = match self {
            Filter::Tag(e) => (FilterType::Tag, e),
            Filter::Sql(e) => (FilterType::Sql, e),
        };
        FilterExpression {
            r#type: kind as i32,
            expression: expression.clone(),
        }
    }
}

pub(crate) struct Consumer {
    pub(crate) transport: Arc<Transport>,
    pub(crate) telemetry: Arc<Telemetry>,
    pub(crate) group: String,
    pub(crate) subscriptions: Vec<(String, Filter)>,
    next: AtomicUsize,
}

impl Consumer {
    /// Checks the names, looks up every topic (an unknown one fails here) and opens the
    /// brokers' streams.
    pub(crate) async fn start(
        config: ClientConfig,
        group: String,
        subscriptions: Vec<(String, Filter)>,
        client_type: ClientType,
    ) -> Result<Arc<Consumer>> {
        if group.trim().is_empty() {
            return Err(Error::Config("the consumer group name is empty".into()));
        }
        if subscriptions.is_empty() {
            return Err(Error::Config(
                "no subscription; call subscribe(topic, filter) at least once".into(),
            ));
        }
        let transport = Transport::new(config)?;
        let settings = Settings {
            client_type: Some(client_type as i32),
            pub_sub: Some(settings::PubSub::Subscription(Subscription {
                group: resource(&group),
                subscriptions: subscriptions
                    .iter()
                    .map(|(topic, filter)| SubscriptionEntry {
                        topic: resource(topic),
                        expression: Some(filter.wire()),
                    })
                    .collect(),
                ..Subscription::default()
            })),
            ..Settings::default()
        };
        let telemetry = Telemetry::new(transport.clone(), settings, None);
        let consumer = Arc::new(Consumer {
            transport,
            telemetry,
            group,
            subscriptions,
            next: AtomicUsize::new(0),
        });
        for (topic, _) in &consumer.subscriptions {
            for broker in consumer.transport.route(topic).await?.brokers(false) {
                consumer.telemetry.open(&broker);
            }
        }
        Ok(consumer)
    }

    /// The group's policy as the first reachable broker states it.
    pub(crate) async fn subscription_settings(
        &self,
    ) -> Option<(Subscription, Option<v2::RetryPolicy>)> {
        for (topic, _) in &self.subscriptions {
            let Ok(route) = self.transport.route(topic).await else {
                continue;
            };
            for broker in route.brokers(false) {
                if let Some(settings) = self.telemetry.settings(&broker).await
                    && let Some(settings::PubSub::Subscription(s)) = settings.pub_sub
                {
                    return Some((s, settings.backoff_policy));
                }
            }
        }
        None
    }

    /// The next (subscription, broker) in turn, with brokers that failed lately last.
    pub(crate) async fn next_source(&self) -> Result<(usize, String)> {
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let index = turn % self.subscriptions.len();
        let route = self.transport.route(&self.subscriptions[index].0).await?;
        let brokers = self
            .transport
            .in_preference_order(route.brokers(false), None);
        let broker = brokers.into_iter().next().ok_or_else(|| Error::NoRoute {
            topic: self.subscriptions[index].0.clone(),
            reason: "its route has no readable queue".into(),
        })?;
        Ok((index, broker))
    }

    /// One long-polling receive from one broker: up to `max` messages, leased for
    /// `invisible`; empty when none came within `poll`.
    pub(crate) async fn receive_from(
        &self,
        subscription: usize,
        endpoint: &str,
        max: u32,
        invisible: Duration,
        poll: Duration,
    ) -> Result<Vec<ReceivedMessage>> {
        // The broker knows this consumer by its Telemetry stream; one that ended when the
        // broker left the routes starts again when the broker is back.
        self.telemetry.open(endpoint);
        let (topic, filter) = &self.subscriptions[subscription];
        let timeout = poll.saturating_add(self.transport.timeout());
        let request = self.transport.request(
            ReceiveMessageRequest {
                group: resource(&self.group),
                message_queue: Some(MessageQueue {
                    topic: resource(topic),
                    id: -1,
                    permission: v2::Permission::ReadWrite as i32,
                    broker: Some(v2::Broker {
                        name: String::new(),
                        id: 0,
                        endpoints: endpoints(endpoint),
                    }),
                    accept_message_types: Vec::new(),
                }),
                filter_expression: Some(filter.wire()),
                batch_size: i32::try_from(max.max(1)).unwrap_or(i32::MAX),
                invisible_duration: Some(prost_duration(invisible)),
                auto_renew: false,
                long_polling_timeout: Some(prost_duration(poll)),
            },
            Some(timeout),
        );
        let rpc_error = |s: tonic::Status| Error::from_rpc(endpoint, timeout, &s);
        let mut rpc = self.transport.rpc(endpoint)?;
        within(endpoint, timeout, async {
            let mut stream = rpc
                .receive_message(request)
                .await
                .map_err(rpc_error)?
                .into_inner();
            let mut messages = Vec::new();
            let from: Arc<str> = Arc::from(endpoint);
            while let Some(frame) = stream.message().await.map_err(rpc_error)? {
                match frame.content {
                    Some(Consumed::Status(status))
                        if status.code == Code::MessageNotFound as i32 => {}
                    Some(Consumed::Status(status)) => Error::check(endpoint, Some(&status))?,
                    Some(Consumed::Message(message)) => {
                        messages.push(ReceivedMessage::from_wire(&from, message));
                    }
                    Some(Consumed::NextOffset(_)) | None => {}
                }
            }
            Ok(messages)
        })
        .await
    }

    pub(crate) async fn ack(&self, message: &ReceivedMessage) -> Result<()> {
        self.ack_all(std::slice::from_ref(message)).await
    }

    /// Acks many messages, one request per broker and topic.
    pub(crate) async fn ack_all(&self, messages: &[ReceivedMessage]) -> Result<()> {
        type Entries<'a> = Vec<(&'a str, &'a str)>;
        let mut requests: Vec<(&str, &str, Entries<'_>)> = Vec::new();
        for message in messages {
            let entry = (message.message_id.as_str(), message.handle()?);
            let key = (&*message.endpoint, message.topic.as_str());
            match requests.iter_mut().find(|(e, t, _)| (*e, *t) == key) {
                Some((_, _, entries)) => entries.push(entry),
                None => requests.push((key.0, key.1, vec![entry])),
            }
        }
        for (endpoint, topic, entries) in requests {
            let request =
                EncodedRequest::ack(&self.group, topic, &entries, &self.transport.buffers);
            let reply: AckReply = self
                .transport
                .call_encoded(endpoint, framed::ACK_MESSAGE, request)
                .await?;
            for entry in &reply.entries {
                Error::check(endpoint, entry.status.as_ref())?;
            }
        }
        Ok(())
    }

    /// Sets the lease to end `invisible` from now; the message carries the new handle.
    pub(crate) async fn change_invisible(
        &self,
        message: &mut ReceivedMessage,
        invisible: Duration,
    ) -> Result<()> {
        let request = ChangeInvisibleDurationRequest {
            group: resource(&self.group),
            topic: resource(&message.topic),
            receipt_handle: message.handle()?.to_owned(),
            invisible_duration: Some(prost_duration(invisible)),
            message_id: message.message_id.clone(),
        };
        let reply = self
            .transport
            .unary(&message.endpoint, request, |mut rpc, r| async move {
                rpc.change_invisible_duration(r).await
            })
            .await?;
        message.receipt_handle = Some(reply.receipt_handle.into());
        Ok(())
    }

    /// Tells the brokers this client leaves, then closes its streams.
    pub(crate) async fn close(&self) {
        let mut brokers = Vec::new();
        for (topic, _) in &self.subscriptions {
            if let Ok(route) = self.transport.route(topic).await {
                brokers.extend(route.brokers(false));
            }
        }
        brokers.sort();
        brokers.dedup();
        for broker in brokers {
            let request = self.transport.request(
                NotifyClientTerminationRequest {
                    group: resource(&self.group),
                },
                Some(self.transport.timeout()),
            );
            if let Ok(mut rpc) = self.transport.rpc(&broker) {
                let _ = within(&broker, self.transport.timeout(), async {
                    rpc.notify_client_termination(request)
                        .await
                        .map_err(|s| Error::from_rpc(&broker, self.transport.timeout(), &s))
                })
                .await;
            }
        }
        self.telemetry.close();
    }
}
