//! Cluster mode: registering with the nameservers, and asking them for routes.

use std::sync::Arc;

use ferrumq_protocol::cluster::RegisterBrokerRequest;
use ferrumq_protocol::cluster::cluster_service_client::ClusterServiceClient;
use ferrumq_protocol::v2::messaging_service_client::MessagingServiceClient;
use ferrumq_protocol::v2::{Code, MessageQueue, QueryRouteRequest, Resource};

use crate::error::{ApiError, ApiResult};
use crate::service::Broker;

/// Registers with every nameserver once; failures are logged, the next heartbeat retries.
pub async fn register_once(broker: &Broker, nameservers: &[String]) {
    let registration = broker.registration();
    for address in nameservers {
        let result = async {
            let mut client = ClusterServiceClient::connect(format!("http://{address}")).await?;
            client
                .register_broker(RegisterBrokerRequest {
                    registration: Some(registration.clone()),
                })
                .await?;
            Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(nameserver = %address, error = %e, "registration failed");
        }
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
                crate::service::Routes::Nameservers(list) => {
                    let list = list.clone();
                    register_once(&broker, &list).await;
                }
            }
        }
    });
}

/// Asks the nameservers in turn for the route of `topic`.
pub async fn query_route(
    nameservers: &[String],
    topic: &str,
    client_id: &str,
) -> ApiResult<Vec<MessageQueue>> {
    let mut last = ApiError::new(Code::InternalServerError, "no nameserver configured");
    for address in nameservers {
        let Ok(mut client) = MessagingServiceClient::connect(format!("http://{address}")).await
        else {
            last = ApiError::internal(format!("nameserver {address} is unreachable"));
            continue;
        };
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
        match client.query_route(request).await {
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
