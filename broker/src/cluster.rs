//! Cluster mode: registering with the nameservers, and asking them for routes.

use std::sync::Arc;
use std::time::Duration;

use ferrumq_protocol::cluster::RegisterBrokerRequest;
use ferrumq_protocol::cluster::cluster_service_client::ClusterServiceClient;
use ferrumq_protocol::v2::messaging_service_client::MessagingServiceClient;
use ferrumq_protocol::v2::{Code, MessageQueue, QueryRouteRequest, Resource};
use tonic::transport::{Channel, Endpoint};

use crate::error::{ApiError, ApiResult};
use crate::service::Broker;

/// The nameservers a broker joined: one channel each, connected on first use and kept (it
/// reconnects by itself), every call, connecting included, bounded by a timeout, so that a
/// nameserver that accepts connections and never answers cannot hold a route query or the
/// heartbeat loop.
#[derive(Clone)]
pub struct Nameservers {
    channels: Vec<(String, Channel)>,
}

impl Nameservers {
    /// Fails on an address that is not a `host:port`.
    pub fn new(addresses: &[String], timeout: Duration) -> ApiResult<Nameservers> {
        let channels = addresses
            .iter()
            .map(|address| {
                let endpoint = Endpoint::from_shared(format!("http://{address}")).map_err(|e| {
                    ApiError::internal(format!("nameserver address {address:?}: {e}"))
                })?;
                let channel = endpoint
                    .connect_timeout(timeout)
                    .timeout(timeout)
                    .tcp_nodelay(true)
                    .connect_lazy();
                Ok((address.clone(), channel))
            })
            .collect::<ApiResult<_>>()?;
        Ok(Nameservers { channels })
    }

    /// Registers with every nameserver once; failures are logged, the next heartbeat retries.
    pub async fn register(&self, broker: &Broker) {
        let registration = broker.registration();
        for (address, channel) in &self.channels {
            let result = ClusterServiceClient::new(channel.clone())
                .register_broker(RegisterBrokerRequest {
                    registration: Some(registration.clone()),
                })
                .await;
            if let Err(e) = result {
                tracing::warn!(nameserver = %address, error = %e, "registration failed");
            }
        }
    }

    /// Asks the nameservers in turn for the route of `topic`.
    pub async fn query_route(&self, topic: &str, client_id: &str) -> ApiResult<Vec<MessageQueue>> {
        let mut last = ApiError::new(Code::InternalServerError, "no nameserver configured");
        for (address, channel) in &self.channels {
            let mut request = tonic::Request::new(QueryRouteRequest {
                topic: Some(Resource {
                    resource_namespace: String::new(),
                    name: topic.to_owned(),
                }),
                endpoints: None,
            });
            if let Ok(value) = client_id.parse() {
                request.metadata_mut().insert("x-mq-client-id", value);
            }
            match MessagingServiceClient::new(channel.clone())
                .query_route(request)
                .await
            {
                Ok(response) => {
                    let response = response.into_inner();
                    let status = response.status.unwrap_or_default();
                    if status.code == Code::Ok as i32 {
                        return Ok(response.message_queues);
                    }
                    last = ApiError::new(
                        Code::try_from(status.code).unwrap_or(Code::InternalServerError),
                        status.message,
                    );
                }
                Err(e) => last = ApiError::internal(format!("nameserver {address}: {e}")),
            }
        }
        Err(last)
    }
}

/// Re-registers every heartbeat interval (the embedded table too, so it never expires).
pub fn spawn_heartbeats(broker: &Arc<Broker>) {
    let weak = Arc::downgrade(broker);
    let interval = broker.config.heartbeat_interval();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        loop {
            tick.tick().await;
            let Some(broker) = weak.upgrade() else { break };
            match &broker.routes {
                crate::service::Routes::Embedded(_) => broker.publish_routes(),
                crate::service::Routes::Nameservers(nameservers) => {
                    let nameservers = nameservers.clone();
                    nameservers.register(&broker).await;
                }
            }
        }
    });
}
