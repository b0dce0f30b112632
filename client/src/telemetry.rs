//! The Telemetry stream a client keeps open with each broker it uses.
//!
//! The client sends its Settings first and the broker answers with its policy (body limit,
//! retry schedule, whether a group is FIFO). The open stream is how the broker knows the
//! client is alive, and how it sends commands back: a transaction check-back goes to a
//! producer of the topic over this stream. A stream that ends is opened again after a second,
//! until the client closes or the broker is no longer in any route the client uses.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ferrumq_protocol::v2::telemetry_command::Command;
use ferrumq_protocol::v2::{Settings, TelemetryCommand};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::transport::{Transport, endpoints};

/// Called with the broker's endpoint and each command it pushes (other than Settings).
pub(crate) type CommandHandler = Arc<dyn Fn(&str, TelemetryCommand) + Send + Sync>;

pub(crate) struct Telemetry {
    transport: Arc<Transport>,
    settings: Settings,
    handler: Option<CommandHandler>,
    replies: Mutex<HashMap<String, watch::Receiver<Option<Settings>>>>,
    stop: watch::Sender<bool>,
}

impl Telemetry {
    pub(crate) fn new(
        transport: Arc<Transport>,
        settings: Settings,
        handler: Option<CommandHandler>,
    ) -> Arc<Telemetry> {
        Arc::new(Telemetry {
            transport,
            settings,
            handler,
            replies: Mutex::new(HashMap::new()),
            stop: watch::channel(false).0,
        })
    }

    /// Opens the stream to `endpoint` unless it is open; returns where its Settings reply lands.
    pub(crate) fn open(self: &Arc<Self>, endpoint: &str) -> watch::Receiver<Option<Settings>> {
        let mut replies = self.replies.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(reply) = replies.get(endpoint) {
            return reply.clone();
        }
        let (tx, rx) = watch::channel(None);
        replies.insert(endpoint.to_owned(), rx.clone());
        if !*self.stop.borrow() {
            tokio::spawn(self.clone().run(endpoint.to_owned(), tx));
        }
        rx
    }

    /// The broker's Settings reply, waiting up to the request timeout for the first one.
    pub(crate) async fn settings(self: &Arc<Self>, endpoint: &str) -> Option<Settings> {
        let mut reply = self.open(endpoint);
        let wait = reply.wait_for(Option::is_some);
        match tokio::time::timeout(self.transport.timeout(), wait).await {
            Ok(Ok(settings)) => settings.clone(),
            _ => None,
        }
    }

    /// Ends every stream; the brokers see the client leave. The owner calls it: the
    /// streams' tasks hold the `Telemetry` until then.
    pub(crate) fn close(&self) {
        self.stop.send_replace(true);
    }

    async fn run(self: Arc<Self>, endpoint: String, reply: watch::Sender<Option<Settings>>) {
        let mut stop = self.stop.subscribe();
        while !*stop.borrow_and_update() {
            let mut settings = self.settings.clone();
            settings.access_point = endpoints(&endpoint);
            settings.request_timeout = Some(prost_duration(self.transport.timeout()));
            let (outbound, rx) = mpsc::channel(4);
            let hello = TelemetryCommand {
                status: None,
                command: Some(Command::Settings(settings)),
            };
            // Cannot fail: the receiver is still here.
            let _ = outbound.send(hello).await;
            let opened = match self.transport.rpc(&endpoint) {
                Ok(mut rpc) => rpc
                    .telemetry(self.transport.request(ReceiverStream::new(rx), None))
                    .await
                    .ok(),
                Err(_) => None,
            };
            if let Some(mut inbound) = opened.map(tonic::Response::into_inner) {
                loop {
                    tokio::select! {
                        _ = stop.changed() => return,
                        frame = inbound.message() => match frame {
                            Ok(Some(command)) => self.on_command(&endpoint, command, &reply),
                            Ok(None) | Err(_) => break,
                        },
                    }
                }
            }
            drop(outbound);
            {
                // Decided under the lock `open` takes, so an `open` either finds this task
                // going on or starts a new one.
                let mut replies = self.replies.lock().unwrap_or_else(PoisonError::into_inner);
                if !self.transport.knows(&endpoint) {
                    // The broker left every route: stop; `open` starts again if it returns.
                    tracing::debug!(
                        endpoint,
                        "telemetry stream ended; the broker left the routes"
                    );
                    replies.remove(&endpoint);
                    return;
                }
            }
            tracing::debug!(endpoint, "telemetry stream ended; opening it again in 1 s");
            tokio::select! {
                _ = stop.changed() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    fn on_command(
        &self,
        endpoint: &str,
        command: TelemetryCommand,
        reply: &watch::Sender<Option<Settings>>,
    ) {
        match command.command {
            Some(Command::Settings(settings)) => {
                reply.send_replace(Some(settings));
            }
            Some(_) => {
                if let Some(handler) = &self.handler {
                    handler(endpoint, command);
                }
            }
            None => {
                if let Some(status) = command.status {
                    tracing::warn!(endpoint, code = status.code, message = %status.message, "broker refused the client's settings");
                }
            }
        }
    }
}

pub(crate) fn prost_duration(d: Duration) -> prost_types::Duration {
    ferrumq_protocol::duration_from_ms(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
