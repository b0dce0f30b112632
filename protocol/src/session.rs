//! What every access point (a broker, a nameserver) does for a client session: insist on a
//! client id, answer the client's Settings with the server's policy merged in, and keep its
//! Telemetry stream open.

use crate::v2::{
    Code, CustomizedBackoff, ExponentialBackoff, Metric, RetryPolicy, Settings, Status,
    retry_policy, settings,
};
use tonic::metadata::MetadataMap;

/// The policy a server tells clients in its Settings reply.
#[derive(Debug, Clone)]
pub struct SettingsPolicy {
    pub max_body_size: i32,
    pub producer_max_attempts: i32,
    /// The group's deliveries before dead-lettering, for consumers.
    pub consumer_max_attempts: i32,
    /// Waits before redelivery attempt 2, 3, ... for push consumers.
    pub retry_backoff_ms: Vec<u64>,
    pub receive_batch_size: i32,
    pub long_polling_timeout_ms: u64,
    /// The consumer group is orderly: messages of one message group are handed out one at
    /// a time, in order.
    pub fifo: bool,
}

impl Default for SettingsPolicy {
    fn default() -> SettingsPolicy {
        SettingsPolicy {
            max_body_size: 4 << 20,
            producer_max_attempts: 3,
            consumer_max_attempts: 17,
            retry_backoff_ms: vec![1000, 5000, 10_000, 30_000, 60_000],
            receive_batch_size: 32,
            long_polling_timeout_ms: 20_000,
            fifo: false,
        }
    }
}

/// The `x-mq-client-id` header, required on every call.
pub fn client_id(metadata: &MetadataMap) -> Result<String, Status> {
    match metadata.get("x-mq-client-id").and_then(|v| v.to_str().ok()) {
        Some(id) if !id.trim().is_empty() => Ok(id.to_owned()),
        _ => Err(Status::new(
            Code::ClientIdRequired,
            "the x-mq-client-id header is missing or empty",
        )),
    }
}

/// The client's Settings with the server's policy merged in. Producers get an exponential
/// backoff (the Java and Node.js clients accept no other) and a body limit (zero would make
/// them refuse every send); consumers get the group's retry schedule, batch size and long
/// polling time (zero would break their receive loops).
pub fn settings_reply(client: &Settings, policy: &SettingsPolicy) -> Settings {
    let mut reply = client.clone();
    reply.metric = Some(Metric {
        on: false,
        endpoints: None,
    });
    match &mut reply.pub_sub {
        Some(settings::PubSub::Subscription(subscription)) => {
            reply.backoff_policy = Some(RetryPolicy {
                max_attempts: policy.consumer_max_attempts,
                strategy: Some(retry_policy::Strategy::CustomizedBackoff(
                    CustomizedBackoff {
                        next: policy
                            .retry_backoff_ms
                            .iter()
                            .map(|&ms| crate::duration_from_ms(ms))
                            .collect(),
                    },
                )),
            });
            subscription.receive_batch_size = Some(policy.receive_batch_size);
            subscription.long_polling_timeout =
                Some(crate::duration_from_ms(policy.long_polling_timeout_ms));
            subscription.fifo = Some(policy.fifo);
        }
        _ => {
            reply.backoff_policy = Some(RetryPolicy {
                max_attempts: policy.producer_max_attempts,
                strategy: Some(retry_policy::Strategy::ExponentialBackoff(
                    ExponentialBackoff {
                        initial: Some(crate::duration_from_ms(10)),
                        max: Some(crate::duration_from_ms(1000)),
                        multiplier: 2.0,
                    },
                )),
            });
            if let Some(settings::PubSub::Publishing(publishing)) = &mut reply.pub_sub {
                publishing.max_body_size = policy.max_body_size;
                publishing.validate_message_type = true;
            }
        }
    }
    reply
}

/// Serves one Telemetry stream: answers each Settings frame with `reply(settings)` and keeps
/// the stream open until the client closes it (the Rust 5.0.0 client spins if the server
/// ends it). Returns the sender, through which the server may push commands later, and the
/// stream to hand to tonic.
pub fn serve_telemetry<F>(
    mut inbound: tonic::Streaming<crate::v2::TelemetryCommand>,
    reply: F,
) -> (TelemetrySender, TelemetryStream)
where
    F: Fn(&Settings) -> Result<Settings, Status> + Send + 'static,
{
    use crate::v2::{TelemetryCommand, telemetry_command::Command};
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let sender = tx.clone();
    tokio::spawn(async move {
        loop {
            let command = match inbound.message().await {
                Ok(Some(command)) => command,
                Ok(None) | Err(_) => break,
            };
            let frame = match command.command {
                Some(Command::Settings(settings)) => match reply(&settings) {
                    Ok(settings) => Ok(TelemetryCommand {
                        status: Some(Status::ok()),
                        command: Some(Command::Settings(settings)),
                    }),
                    // A refusal travels as a status frame: ending the stream would make the
                    // Rust client spin.
                    Err(status) => Ok(TelemetryCommand {
                        status: Some(status),
                        command: None,
                    }),
                },
                // Thread dumps and verification results are not asked for.
                _ => continue,
            };
            if tx.send(frame).await.is_err() {
                break;
            }
        }
    });
    (
        sender,
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
}

pub type TelemetrySender =
    tokio::sync::mpsc::Sender<Result<crate::v2::TelemetryCommand, tonic::Status>>;
pub type TelemetryStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<crate::v2::TelemetryCommand, tonic::Status>> + Send>,
>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v2::{Publishing, Subscription};

    #[test]
    fn producers_get_an_exponential_backoff_and_a_body_limit() {
        let client = Settings {
            pub_sub: Some(settings::PubSub::Publishing(Publishing::default())),
            ..Settings::default()
        };
        let reply = settings_reply(&client, &SettingsPolicy::default());
        let Some(settings::PubSub::Publishing(p)) = reply.pub_sub else {
            panic!()
        };
        assert_eq!(p.max_body_size, 4 << 20);
        assert!(matches!(
            reply.backoff_policy.unwrap().strategy,
            Some(retry_policy::Strategy::ExponentialBackoff(_))
        ));
    }

    #[test]
    fn consumers_get_batch_polling_and_retry_schedule() {
        let client = Settings {
            pub_sub: Some(settings::PubSub::Subscription(Subscription::default())),
            ..Settings::default()
        };
        let reply = settings_reply(&client, &SettingsPolicy::default());
        let Some(settings::PubSub::Subscription(s)) = reply.pub_sub else {
            panic!()
        };
        assert_eq!(s.receive_batch_size, Some(32));
        assert_eq!(s.long_polling_timeout.unwrap().seconds, 20);
        assert_eq!(reply.backoff_policy.unwrap().max_attempts, 17);
    }

    #[test]
    fn a_missing_client_id_is_refused() {
        let err = client_id(&MetadataMap::new()).unwrap_err();
        assert_eq!(err.code, Code::ClientIdRequired as i32);
    }
}
