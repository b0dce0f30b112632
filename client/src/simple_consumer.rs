//! The consumer where the application drives: receive a batch, ack each message (or change
//! its lease) when it is done.

use std::sync::Arc;
use std::time::Duration;

use ferrumq_protocol::v2::ClientType;

use crate::config::ClientConfig;
use crate::consumer::{Consumer, Filter};
use crate::error::Result;
use crate::message::ReceivedMessage;

/// Receives leased messages on the application's call; see the [crate docs](crate).
pub struct SimpleConsumer {
    core: Arc<Consumer>,
    long_polling: Duration,
}

/// Configures a [`SimpleConsumer`].
pub struct SimpleConsumerBuilder {
    config: ClientConfig,
    group: String,
    subscriptions: Vec<(String, Filter)>,
    long_polling: Duration,
}

impl SimpleConsumerBuilder {
    /// Receives `topic`'s messages that pass `filter`.
    #[must_use]
    pub fn subscribe(mut self, topic: impl Into<String>, filter: Filter) -> SimpleConsumerBuilder {
        self.subscriptions.push((topic.into(), filter));
        self
    }

    /// How long a receive waits at the broker for messages to arrive (5 s by default).
    #[must_use]
    pub fn long_polling(mut self, wait: Duration) -> SimpleConsumerBuilder {
        self.long_polling = wait;
        self
    }

    pub async fn build(self) -> Result<SimpleConsumer> {
        let core = Consumer::start(
            self.config,
            self.group,
            self.subscriptions,
            ClientType::SimpleConsumer,
        )
        .await?;
        Ok(SimpleConsumer {
            core,
            long_polling: self.long_polling,
        })
    }
}

impl Drop for SimpleConsumer {
    fn drop(&mut self) {
        self.core.telemetry.close();
    }
}

impl SimpleConsumer {
    pub fn builder(config: ClientConfig, group: impl Into<String>) -> SimpleConsumerBuilder {
        SimpleConsumerBuilder {
            config,
            group: group.into(),
            subscriptions: Vec::new(),
            long_polling: Duration::from_secs(5),
        }
    }

    /// Up to `max` messages, each leased for `invisible`: unacked by then, it is delivered
    /// again. Asks the subscriptions' brokers in turn; empty when the one asked had nothing
    /// within the long-polling time.
    pub async fn receive(&self, max: u32, invisible: Duration) -> Result<Vec<ReceivedMessage>> {
        let (subscription, broker) = self.core.next_source().await?;
        let received = self
            .core
            .receive_from(subscription, &broker, max, invisible, self.long_polling)
            .await;
        if let Err(e) = &received
            && e.is_endpoint_down()
        {
            self.core.transport.mark_down(&broker);
        }
        received
    }

    /// Finishes a message: it is not delivered to this group again.
    pub async fn ack(&self, message: &ReceivedMessage) -> Result<()> {
        self.core.ack(message).await
    }

    /// Finishes many messages with one request per broker and topic. On an error, some may
    /// be acked and some not; the rest come back when their lease ends.
    pub async fn ack_all(&self, messages: &[ReceivedMessage]) -> Result<()> {
        self.core.ack_all(messages).await
    }

    /// Ends the lease `invisible` from now instead (sooner to retry early, later to keep
    /// working); `message` carries the new receipt handle for its ack.
    pub async fn change_invisible_duration(
        &self,
        message: &mut ReceivedMessage,
        invisible: Duration,
    ) -> Result<()> {
        self.core.change_invisible(message, invisible).await
    }

    /// Tells the brokers this consumer leaves; unacked messages come back when their lease ends.
    pub async fn shutdown(self) {
        self.core.close().await;
    }
}
